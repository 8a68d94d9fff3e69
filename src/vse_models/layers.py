"""Shared building blocks (SPEC §3.1), generic so that the baseline, AVSE and MH-CVSE reuse them.

Conventions: a *set* is `(B, N, D)` with true `lengths` `(B,)` (elements past the length are padding);
`padding_mask` is `(B, N)` bool, True = padding. Masks are built on the device of `lengths`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


def l2norm(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """x / max(||x||, eps) along `dim`."""
    return F.normalize(x, dim=dim, eps=eps)


def padding_mask(lengths: torch.Tensor, max_len: int | None = None) -> torch.Tensor:
    """(B, max_len) bool, True past each length."""
    max_len = int(lengths.max()) if max_len is None else max_len
    return torch.arange(max_len, device=lengths.device)[None, :] >= lengths[:, None]


def positional_encoding_1d(d_model: int, length: int) -> torch.Tensor:
    """(length, d_model) sin/cos encoding (the Transformer's, as VSE∞'s GPO uses it)."""
    pe = torch.zeros(length, d_model)
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


class GPO(nn.Module):
    """Generalized Pooling Operator (VSE∞, exactly as its code): a BiGRU over positional encodings of
    positions 0..n-1 scores each *rank*; every channel is sorted descending over the set and the pooled
    vector is the softmax(score / 0.1)-weighted sum of the sorted values. Padding never contributes."""

    def __init__(self, d_pe: int = 32, d_hidden: int = 32):
        super().__init__()
        self.d_pe = d_pe
        self.gru = nn.GRU(d_pe, d_hidden, 1, batch_first=True, bidirectional=True)
        self.linear = nn.Linear(d_hidden, 1, bias=False)

    def pool_weights(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """(B, max_len, 1) weights over ranks; zero past each length. The weights depend on the length
        only, so the GRU runs once per distinct length (a batch of B sets has a few dozen at most)."""
        distinct, inverse = torch.unique(lengths, return_inverse=True)
        return self._weights_per_length(distinct, max_len)[inverse]

    def _weights_per_length(self, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        pad = padding_mask(lengths, max_len)[..., None]
        pes = positional_encoding_1d(self.d_pe, max_len).to(lengths.device, self.gru.weight_ih_l0.dtype)
        pes = pes[None].expand(lengths.size(0), -1, -1).masked_fill(pad, 0)
        packed = pack_padded_sequence(pes, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=max_len)
        half = out.size(2) // 2
        scores = self.linear((out[..., :half] + out[..., half:]) / 2).masked_fill(pad, -10000.0)
        return torch.softmax(scores / 0.1, dim=1)

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, N, D), lengths (B,) -> pooled (B, D), weights (B, N', 1) with N' = max length."""
        max_len = int(lengths.max())
        features = features[:, :max_len]
        weights = self.pool_weights(lengths, max_len).to(features.dtype)
        pad = padding_mask(lengths, max_len)[..., None]
        sorted_feats = features.masked_fill(pad, -10000.0).sort(dim=1, descending=True)[0]
        sorted_feats = sorted_feats.masked_fill(pad, 0)
        return (sorted_feats * weights).sum(1), weights


class MLP(nn.Module):
    """Linear -> (BatchNorm -> ReLU -> Linear)*: VSE∞'s residual branch. Works on (..., D) inputs
    (BatchNorm over all leading positions)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.bns = nn.ModuleList(nn.BatchNorm1d(d) for d in dims[1:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.bns):
                x = F.relu(self.bns[i](x))
        return x.reshape(*shape[:-1], x.size(-1))


class RegionEncoder(nn.Module):
    """Per-element projection of a feature set: `fc(x) + MLP(x)` (VSE∞; `residual_mlp=False`: fc only).
    Returns (B, N, D), unpooled, so callers can group, attend or pool as they need."""

    def __init__(self, in_dim: int, embed_dim: int, residual_mlp: bool = True):
        super().__init__()
        self.fc = nn.Linear(in_dim, embed_dim)
        self.mlp = MLP(in_dim, embed_dim // 2, embed_dim, 2) if residual_mlp else None
        r = math.sqrt(6.0) / math.sqrt(in_dim + embed_dim)  # Xavier, as VSE∞ initialises fc
        nn.init.uniform_(self.fc.weight, -r, r)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.fc(features)
        return out + self.mlp(features) if self.mlp is not None else out


def set_lengths(features: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """The (B,) lengths of a (B, N, F) set; None means every set is full (N elements)."""
    if lengths is not None:
        return lengths
    return torch.full((features.size(0),), features.size(1), dtype=torch.long, device=features.device)


def project_set(module: nn.Module, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """module applied per element of a (B, N, F) set; padding rows stay 0 and never reach the module
    (its BatchNorm would otherwise count them)."""
    if lengths is None or bool((lengths == x.size(1)).all()):
        return module(x)
    valid = ~padding_mask(lengths, x.size(1))
    y = module(x[valid])
    out = y.new_zeros(x.size(0), x.size(1), y.size(-1))
    out[valid] = y
    return out


class BiGRUTextEncoder(nn.Module):
    """Word embedding -> dropout -> BiGRU(hidden D) with the forward and backward halves averaged.
    Returns per-word features (B, L, D); padded positions are zero."""

    def __init__(self, vocab_size: int, word_dim: int, embed_dim: int, num_layers: int = 1,
                 dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, word_dim, padding_idx=0)
        self.dropout = nn.Dropout(dropout)
        self.rnn = nn.GRU(word_dim, embed_dim, num_layers, batch_first=True, bidirectional=True)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)

    def load_word_vectors(self, vectors: torch.Tensor) -> None:
        """Copies (vocab_size, word_dim) vectors (e.g. read from a local GloVe file) into the embedding."""
        if vectors.shape != self.embed.weight.shape:
            raise ValueError(f"vectors must have shape {tuple(self.embed.weight.shape)}, got {tuple(vectors.shape)}")
        with torch.no_grad():
            self.embed.weight.copy_(vectors)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.embed(tokens))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=tokens.size(1))
        half = out.size(2) // 2
        return (out[..., :half] + out[..., half:]) / 2


def drop_set_elements(features: torch.Tensor, lengths: torch.Tensor, p: float | torch.Tensor,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Training augmentation of VSE∞: drops each valid set element with probability p (a number, or a (B,)
    tensor: one probability per set) keeping at least one, packs the kept elements first and returns
    (features, new lengths). Order is preserved."""
    if not isinstance(p, torch.Tensor) and p <= 0:
        return features, lengths
    b, n, _ = features.shape
    valid = ~padding_mask(lengths, n)
    p = p[:, None] if isinstance(p, torch.Tensor) else p
    keep = (torch.rand(b, n, device=features.device, generator=generator) >= p) & valid
    keep[:, 0] |= keep.sum(1) == 0  # never an empty set
    new_lengths = keep.sum(1)
    # Stable sort puts kept elements first in their original order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True)[1]
    packed = features.gather(1, order[..., None].expand_as(features))
    packed = packed.masked_fill(padding_mask(new_lengths, n)[..., None], 0)
    return packed, new_lengths
