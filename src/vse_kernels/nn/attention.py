"""`MultiheadSelfAttention`: packed QKV projection -> fused attention -> output projection (SPEC §1.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_tensor
from ..ops.attention import packed_self_attention


class MultiheadSelfAttention(nn.Module):
    """Self-attention over (B, L, E) inputs, a drop-in for
    ``nn.MultiheadAttention(E, H, bias=bias, batch_first=True)(x, x, x, key_padding_mask=m,
    need_weights=False)[0]``.

    Parameters have nn.MultiheadAttention's names and shapes (in_proj_weight (3E, E), in_proj_bias (3E,),
    out_proj.weight, out_proj.bias), so its state_dict loads directly; see also `from_torch` and
    `load_from_torch`. key_padding_mask: (B, L) bool, True = padding. Differences: a query whose keys are
    all padding attends to nothing (attention output 0, so the result is out_proj.bias) where
    nn.MultiheadAttention returns NaN; attention dropout is not supported (dropout must be 0).
    """

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0,
                 device=None, dtype=None):
        super().__init__()
        if dropout != 0.0:
            raise ValueError(f"dropout must be 0.0: the fused attention kernel does not implement attention "
                             f"dropout (got dropout={dropout}); apply nn.Dropout to the module's output instead")
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim must be a positive multiple of num_heads, got embed_dim={embed_dim}, "
                             f"num_heads={num_heads}")
        factory = dict(device=device, dtype=dtype)
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory)) if bias else None
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.MultiheadAttention's initialisation
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    @staticmethod
    def _check_compatible(mha: nn.MultiheadAttention) -> None:
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim:
            raise ValueError("mha must use kdim == vdim == embed_dim (one packed in_proj_weight), got "
                             f"kdim={mha.kdim}, vdim={mha.vdim}, embed_dim={mha.embed_dim}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("mha must not use add_bias_kv or add_zero_attn (not supported)")
        if mha.dropout != 0.0:
            raise ValueError(f"mha.dropout must be 0.0 (attention dropout is not supported), got {mha.dropout}")

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiheadSelfAttention":
        """A new module with `mha`'s weights, device and dtype."""
        cls._check_compatible(mha)
        weight = mha.in_proj_weight
        module = cls(mha.embed_dim, mha.num_heads, bias=mha.in_proj_bias is not None,
                     device=weight.device, dtype=weight.dtype)
        module.load_from_torch(mha)
        return module

    def load_from_torch(self, mha: nn.MultiheadAttention) -> "MultiheadSelfAttention":
        """Copies `mha`'s weights into this module (same embed_dim, num_heads and bias setting)."""
        self._check_compatible(mha)
        mine = (self.embed_dim, self.num_heads, self.in_proj_bias is not None)
        theirs = (mha.embed_dim, mha.num_heads, mha.in_proj_bias is not None)
        if mine != theirs:
            raise ValueError(f"(embed_dim, num_heads, bias) must match: this module has {mine}, mha has {theirs}")
        self.load_state_dict(mha.state_dict())
        return self

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_tensor("x", x, ndim=3)
        batch, length, embed = x.shape
        if embed != self.embed_dim:
            raise ValueError(f"x must have shape (B, L, {self.embed_dim}), got {tuple(x.shape)}")
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        # The kernels read q, k, v as strided views of the packed projection and write the merged-head
        # (B, L, E) output (and, backward, the packed (B, L, 3E) gradient) directly: no copies.
        out = packed_self_attention(qkv, self.num_heads, key_padding_mask=key_padding_mask)
        return self.out_proj(out)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, bias={self.in_proj_bias is not None}"
