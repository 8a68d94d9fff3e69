"""Named parts of CVSE / MH-CVSE (SPEC §3.3), kept separate from the model so each can be tested alone:
concept vocabulary and labels, the concept co-occurrence graph, a local GloVe reader, the GCN, masked
attention pooling, the consensus level, the three fusion modes, self-attention with a backend switch and
the dynamic loss weights.

Nothing here imports vse_kernels at module level: the reference backend must run without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .distributed import GlobalBatchNorm1d
from .layers import GPO, l2norm

# [ours] CVSE picks nouns/adjectives/verbs with a POS tagger (needs downloads); we take the most frequent
# caption words after removing these stop words and punctuation.
STOP_WORDS = frozenset("""
a an the and or but if then than so of in on at to from by for with without into onto over under above
below up down out off near next beside behind between through while during before after about against
is are was were be been being am has have had having do does did doing it its this that these those
there here their they them he him his she her we us our you your i me my mine who whom whose which what
where when why how all any both each few more most other some such no nor not only own same too very can
will just should now as one two three another while s t
""".split())


# --------------------------------------------------------------------------------------- concepts
def select_concepts(token_lists: Sequence[Sequence[int]], idx2word: Sequence[str], num_concepts: int) -> list[int]:
    """Vocabulary ids of the `num_concepts` most frequent content words of the training captions
    (ties: alphabetical, so the choice is deterministic). May return fewer if there are fewer words."""
    counts = Counter(t for toks in token_lists for t in toks)
    candidates = [i for i in counts if i >= 4 and idx2word[i].isalpha() and idx2word[i] not in STOP_WORDS]
    candidates.sort(key=lambda i: (-counts[i], idx2word[i]))
    return candidates[:num_concepts]


def word_to_concept_map(concept_words: Sequence[int], vocab_size: int) -> torch.Tensor:
    """(vocab_size,) long: concept index of each word id, -1 for non-concepts."""
    m = torch.full((vocab_size,), -1, dtype=torch.long)
    if len(concept_words):
        m[torch.as_tensor(list(concept_words), dtype=torch.long)] = torch.arange(len(concept_words))
    return m


def caption_labels(tokens: torch.Tensor, word_to_concept: torch.Tensor, num_concepts: int) -> torch.Tensor:
    """(B, L) padded token ids -> (B, q) float multi-hot of the concepts each caption mentions."""
    c = word_to_concept[tokens]                       # padding id 0 maps to -1
    labels = torch.zeros(tokens.size(0), num_concepts + 1, device=tokens.device)
    labels.scatter_(1, torch.where(c < 0, num_concepts, c), 1.0)  # slot q collects the non-concepts
    return labels[:, :num_concepts]


def cooccurrence(label_sets: Sequence[Sequence[int]], num_concepts: int) -> tuple[np.ndarray, np.ndarray]:
    """Co-occurrence counts C (q, q) over captions (C_ij = captions mentioning both i and j, i != j,
    diagonal 0 as in ML-GCN, the self-loop comes from `+ I`) and counts (q,) = captions mentioning i."""
    cooc = np.zeros((num_concepts, num_concepts), dtype=np.float64)
    counts = np.zeros(num_concepts, dtype=np.float64)
    for labels in label_sets:
        idx = np.unique(np.asarray(list(labels), dtype=np.int64))
        if idx.size == 0:
            continue
        counts[idx] += 1
        cooc[np.ix_(idx, idx)] += 1
    np.fill_diagonal(cooc, 0)
    return cooc, counts


def concept_adjacency(cooc: np.ndarray, counts: np.ndarray, threshold: float = 0.3, base: float = 5.0,
                      shift: float = 0.02, reweight: float = 0.25) -> torch.Tensor:
    """CVSE's normalised concept graph (SPEC §3.3):
    P = C / count[:, None]; R = base^(P - shift) - base^(-shift); binarise R >= threshold;
    columns re-weighted R * reweight / (colsum + 1e-6); A = R + I; returns D^-1/2 A^T D^-1/2 with
    D = diag(row sums of A). A concept never seen (count 0) gets P = 0, so only its self-loop (CVSE's
    gen_A_concept divides by the count and would give NaN); counts of any numeric dtype."""
    cooc, counts = np.asarray(cooc, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    q = cooc.shape[0]
    p = np.divide(cooc, counts[:, None], out=np.zeros_like(cooc), where=counts[:, None] > 0)
    r = base ** (p - shift) - base ** (-shift)
    r = (r >= threshold).astype(np.float64)
    r = r * reweight / (r.sum(0, keepdims=True) + 1e-6)
    a = r + np.eye(q)
    d = np.power(a.sum(1), -0.5)
    return torch.from_numpy(d[:, None] * a.T * d[None, :]).float()


CONCEPT_DATA_VERSION = 1  # bump when anything that concept_data computes changes


def build_concept_data(token_lists: Sequence[Sequence[int]], idx2word: Sequence[str], num_concepts: int,
                       captions_per_image: int, n_images: int) -> dict[str, torch.Tensor]:
    """Everything the consensus level takes from the training captions: `concepts` (vocabulary ids),
    `word_to_concept`, the normalised `adjacency` and the images' multi-hot `image_labels` (union of the
    concepts of their captions)."""
    concepts = select_concepts(token_lists, idx2word, num_concepts)
    w2c = word_to_concept_map(concepts, len(idx2word))
    cap_labels = [sorted({int(c) for c in w2c[torch.as_tensor(t, dtype=torch.long)].tolist() if c >= 0})
                  for t in token_lists]
    cooc, counts = cooccurrence(cap_labels, num_concepts)
    image_labels = torch.zeros(n_images, num_concepts, dtype=torch.bool)
    for c, labels in enumerate(cap_labels):
        image_labels[c // captions_per_image, labels] = True
    return {"concepts": torch.tensor(concepts, dtype=torch.long), "word_to_concept": w2c,
            "adjacency": concept_adjacency(cooc, counts), "image_labels": image_labels}


def concept_data(token_lists: Sequence[Sequence[int]], idx2word: Sequence[str], num_concepts: int,
                 captions_per_image: int, n_images: int, cache_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """`build_concept_data`, cached as `cache_dir/cvse-concepts-<key>.pt`, the key a hash of every input (so
    another vocabulary, caption set or q never reads a stale file). Written atomically; a folder that cannot
    be written to (a read-only data set) only means it is computed again next time."""
    if cache_dir is None:
        return build_concept_data(token_lists, idx2word, num_concepts, captions_per_image, n_images)
    h = hashlib.sha256(json.dumps([CONCEPT_DATA_VERSION, num_concepts, captions_per_image, n_images,
                                   list(idx2word)]).encode())
    h.update(np.asarray([len(t) for t in token_lists], dtype=np.int64).tobytes())
    if len(token_lists):
        h.update(np.concatenate([np.asarray(t, dtype=np.int64) for t in token_lists]).tobytes())
    path = Path(cache_dir) / f"cvse-concepts-{h.hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path)
    data = build_concept_data(token_lists, idx2word, num_concepts, captions_per_image, n_images)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return data


# ------------------------------------------------------------------------------------------ GloVe
def read_glove(path: str | Path, words: Sequence[str], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors of `words` from a local GloVe text file ("word v1 ... vd" per line; nothing downloaded).
    Returns (len(words), dim) float vectors and a (len(words),) bool mask of the words found."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GloVe file not found: {path}")
    wanted = {w: i for i, w in enumerate(words)}
    vectors = torch.zeros(len(words), dim)
    found = torch.zeros(len(words), dtype=torch.bool)
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            word, _, rest = line.rstrip("\n").partition(" ")
            i = wanted.get(word)
            if i is None or found[i]:
                continue
            values = rest.split()
            if len(values) != dim:
                raise ValueError(f"{path}:{lineno}: expected {dim} values for {word!r} (word_dim), got {len(values)}")
            vectors[i] = torch.tensor([float(v) for v in values])
            found[i] = True
    return vectors, found


# ---------------------------------------------------------------------------------------- modules
class GCN(nn.Module):
    """Two graph convolutions on the fixed normalised adjacency: H1 = LeakyReLU_0.2(Â E W1),
    Z = l2norm(Â H1 W2). Â is passed in (a buffer of the model, no gradient)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, out_dim, bias=False)

    def forward(self, emb: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(adj @ self.w1(emb), 0.2)
        return l2norm(adj @ self.w2(h))


def _sum_over_ranks(x: torch.Tensor, bn: nn.BatchNorm1d) -> torch.Tensor:
    """x summed over the ranks (autograd-aware) when `bn` is a GlobalBatchNorm1d training in a torchrun job,
    exactly when its own forward all-reduces the same (3, K) float32 statistics; x otherwise."""
    if not (isinstance(bn, GlobalBatchNorm1d) and dist.is_initialized() and dist.get_world_size() > 1):
        return x
    with warnings.catch_warnings():  # as in distributed.gather
        warnings.simplefilter("ignore", FutureWarning)
        return dist.nn.functional.all_reduce(x.float()).to(x.dtype)  # float32 like GlobalBatchNorm1d's


def slot_batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """CVSE's BatchNorm1d(K) on a (B, K, H) set (model_CVSE.py V_single_modal_atten: BatchNorm1d(36) on the
    (B, 36, D) regions): each of the K set *slots* is normalised with its mean and variance over the batch
    and the H channels. K is the data's set size; another size is an error (the statistics are per slot).
    [ours] padded slots (`valid` False: dropped regions) stay out of the statistics and the running
    averages (a slot that is padding in the whole batch keeps its running statistics); with no padding it
    is `bn` itself (and under torchrun its GlobalBatchNorm1d, whose (3, K) all-reduce this path mirrors)."""
    if x.size(1) != bn.num_features:
        raise ValueError(f"region BatchNorm is over {bn.num_features} set slots (the data's set_size), "
                         f"got sets of {x.size(1)}")
    if valid is None or not bn.training or bool(valid.all()):
        return bn(x)
    acc = torch.promote_types(x.dtype, torch.float32)  # statistics in at least fp32 (float64 stays)
    m, xf = valid[..., None].to(acc), x.to(acc)
    total, square, count = _sum_over_ranks(torch.stack([(xf * m).sum((0, 2)), (xf * xf * m).sum((0, 2)),
                                                        m.sum((0, 2)) * x.size(2)]), bn)
    n = count.clamp(min=1)
    mean = total / n
    var = (square / n - mean * mean).clamp(min=0)
    with torch.no_grad():
        bn.num_batches_tracked += 1
        momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
        seen = count > 0
        unbiased = var * count / (count - 1).clamp(min=1)
        bn.running_mean[seen] = torch.lerp(bn.running_mean[seen], mean[seen].to(bn.running_mean.dtype), momentum)
        bn.running_var[seen] = torch.lerp(bn.running_var[seen], unbiased[seen].to(bn.running_var.dtype), momentum)
    out = (x - mean[:, None].to(x.dtype)) * torch.rsqrt(var[:, None] + bn.eps).to(x.dtype)
    return out * bn.weight[:, None] + bn.bias[:, None] if bn.affine else out


class AttentionPool(nn.Module):
    """CVSE's instance pooling guided by the set's mean (model_CVSE.py V_single_modal_atten for regions,
    T_single_modal_atten for words; CVSE's defaults use_BatchNorm, tanh, dropout_rate 0.4):
    a_i = fc3(drop(tanh(BN_e(fc1 v_i))) ⊙ drop(tanh(BN_g(fc2 g)))), α = softmax_i(a), pooled = l2norm(Σ α_i v_i),
    v_i the (L2-normalised) elements, fc1, fc2: dim -> hidden, fc3: hidden -> 1, dropout in training only.
    - side "image": BN_e = BatchNorm1d(set_size) over the set slots (slot_batch_norm; CVSE's BatchNorm1d(36)),
      BN_g = BatchNorm1d(hidden), g = the mean of the v_i, not normalised;
    - side "text": no BatchNorm, g = l2norm(mean of the v_i).
    Padding is masked in the mean, the slot statistics and the softmax (CVSE's region sets have none; its
    zero-padded words give the masked result anyway, but after self-attention padding is not zero)."""

    SIDES = ("image", "text")

    def __init__(self, dim: int, hidden: int, side: str, set_size: int | None = None, dropout: float = 0.4):
        super().__init__()
        if side not in self.SIDES:
            raise ValueError(f"side must be one of {self.SIDES}, got {side!r}")
        if side == "image" and not set_size:
            raise ValueError("the image side's attention pooling needs the set size (BatchNorm1d over its slots)")
        self.side = side
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, 1)
        if side == "image":
            self.bn1, self.bn2 = nn.BatchNorm1d(set_size), nn.BatchNorm1d(hidden)
        else:
            self.bn1 = self.bn2 = None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        valid = None if pad is None else ~pad
        if valid is None:
            mean = x.mean(1)
        else:
            mean = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).clamp(min=1)
        elements, guide = self.fc1(x), self.fc2(l2norm(mean) if self.side == "text" else mean)
        if self.side == "image":
            elements, guide = slot_batch_norm(self.bn1, elements, valid), self.bn2(guide)
        h = self.dropout(torch.tanh(elements)) * self.dropout(torch.tanh(guide))[:, None]
        a = self.fc3(h).squeeze(-1)
        if pad is not None:
            a = a.masked_fill(pad, float("-inf"))
        alpha = torch.softmax(a, dim=1)
        return l2norm((alpha[..., None] * x).sum(1))


class InstancePool(nn.Module):
    """Instance-level pooling of a (B, N, D) set to (B, D) L2-normalised embeddings: "attention" is
    CVSE's (AttentionPool over the L2-normalised elements, for `side` "image" or "text"); "gpo" [ours] is
    VSE∞'s GPO on the elements as they are (the baseline's pooling), for the ablation of pooling against
    the other MH-CVSE parts."""

    KINDS = ("attention", "gpo")

    def __init__(self, kind: str, dim: int, side: str = "image", set_size: int | None = None, dropout: float = 0.4):
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"pooling must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.pool = AttentionPool(dim, dim, side, set_size, dropout) if kind == "attention" else GPO(32, 32)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "attention":
            return self.pool(l2norm(x), pad)
        return l2norm(self.pool(x, lengths)[0])


class SelfAttentionBlock(nn.Module):
    """MH-CVSE's multi-head self-attention before pooling, as a Transformer sub-layer ([ours]), `residual`:
    "post_norm" LayerNorm(x + MHSA(x)); "pre_norm" x + MHSA(LayerNorm(x)) (the residual stream stays
    un-normalised); "rezero" x + γ ⊙ MHSA(LayerNorm(x)) with a per-channel γ that starts at 0 (ReZero /
    LayerScale: the block starts as the identity and the attention is let in as far as the loss wants it).
    backend "kernels": vse_kernels.nn.MultiheadSelfAttention (imported lazily); "reference":
    torch.nn.MultiheadAttention. Both have the same parameter names, so a state_dict moves between backends
    unchanged. Key-padding mask: True = padding; every row must keep ≥ 1 key (the reference returns NaN on a
    fully masked row, the kernel zeros)."""

    RESIDUALS = ("post_norm", "pre_norm", "rezero")

    def __init__(self, dim: int, heads: int, backend: str, residual: str = "post_norm"):
        super().__init__()
        if residual not in self.RESIDUALS:
            raise ValueError(f"attention_residual must be one of {self.RESIDUALS}, got {residual!r}")
        if backend == "kernels":
            from vse_kernels.nn import MultiheadSelfAttention

            self.attn = MultiheadSelfAttention(dim, heads)
        elif backend == "reference":
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        else:
            raise ValueError(f"backend must be 'kernels' or 'reference', got {backend!r}")
        self.backend, self.residual = backend, residual
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.zeros(dim)) if residual == "rezero" else None

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        if self.residual == "post_norm":
            return self.norm(x + self._attend(x, pad))
        out = self._attend(self.norm(x), pad)
        return x + (out if self.gamma is None else self.gamma * out)

    def _attend(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        if self.backend == "kernels":
            return self.attn(x, key_padding_mask=pad)
        return self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]


class ConsensusLevel(nn.Module):
    """p = softmax(10 · fc3(tanh(BN(fc2 x_I)) ⊙ tanh(BN(fc1 Z)))) over the q concepts. fc3 of the
    (B, q, h) product is computed as (tanh(..x_I..) * w3) @ tanh(..Z..)^T + b3: the same numbers without
    materialising B·q·h."""

    def __init__(self, dim: int, hidden: int, temperature: float = 10.0):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, 1)
        self.bn1, self.bn2 = nn.BatchNorm1d(hidden), nn.BatchNorm1d(hidden)
        self.temperature = temperature

    def forward(self, x_inst: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        a = torch.tanh(self.bn2(self.fc2(x_inst))) * self.fc3.weight    # (B, h)
        b = torch.tanh(self.bn1(self.fc1(z)))                            # (q, h)
        return torch.softmax(self.temperature * (a @ b.t() + self.fc3.bias), dim=1)


def text_concept_distribution(p_t: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """s_t = β · softmax(10·y) + (1 − β) · p_t (CVSE)."""
    return beta * torch.softmax(10.0 * labels, dim=1) + (1.0 - beta) * p_t


class Fusion(nn.Module):
    """x_F from the instance and consensus embeddings (one per modality): `weight_sum`
    l2norm(α x_I + (1 − α) x_C); `adap_sum` per-sample gate g = σ(wᵀ(x_I + x_C)/2 + b),
    l2norm(g x_I + (1 − g) x_C); `concat` l2norm(W [x_I; x_C] + b).
    [ours] The learned modes start as `weight_sum` (adap_sum: w = 0, b = logit α; concat: W = [α I, (1 − α) I],
    b = 0) and learn a correction from there. With PyTorch's default init, concat's random W and a bias as
    large as W·x mix x_I with noise and a shared offset, and at the synthetic preset's lr both modes stalled
    in the all-negatives warm-up (README)."""

    MODES = ("weight_sum", "adap_sum", "concat")

    def __init__(self, mode: str, dim: int, alpha: float = 0.85):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"fusion must be one of {self.MODES}, got {mode!r}")
        if not 0.0 <= alpha <= 1.0 or (mode == "adap_sum" and alpha in (0.0, 1.0)):
            raise ValueError(f"fusion_alpha must be in [0, 1] (strictly inside for adap_sum), got {alpha}")
        self.mode, self.alpha = mode, alpha
        if mode == "adap_sum":
            self.gate = nn.Linear(dim, 1)
            with torch.no_grad():
                self.gate.weight.zero_()
                self.gate.bias.fill_(math.log(alpha / (1 - alpha)))
        elif mode == "concat":
            self.proj = nn.Linear(2 * dim, dim)
            with torch.no_grad():
                eye = torch.eye(dim)
                self.proj.weight.copy_(torch.cat([alpha * eye, (1 - alpha) * eye], dim=1))
                self.proj.bias.zero_()

    def forward(self, x_inst: torch.Tensor, x_cons: torch.Tensor) -> torch.Tensor:
        if self.mode == "weight_sum":
            return l2norm(self.alpha * x_inst + (1 - self.alpha) * x_cons)
        if self.mode == "adap_sum":
            g = torch.sigmoid(self.gate((x_inst + x_cons) / 2))
            return l2norm(g * x_inst + (1 - g) * x_cons)
        return l2norm(self.proj(torch.cat([x_inst, x_cons], dim=-1)))


def loss_weights(losses: torch.Tensor, base: torch.Tensor, dynamic: bool, eps: float = 1e-8) -> torch.Tensor:
    """Weights of the K loss terms. Fixed: the CVSE base weights. Dynamic ([ours], SPEC §3.3):
    base_k · K · L_k / Σ_j L_j from the detached loss values, so a term that is large relative to the
    others gets more weight this step; the weights carry no gradient."""
    if not dynamic:
        return base
    detached = losses.detach()
    return base * detached.numel() * detached / (detached.sum() + eps)
