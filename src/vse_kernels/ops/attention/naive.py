"""Plain-PyTorch reference of multi-head attention with a key-padding mask (SPEC §1.3).

softmax(q kᵀ · scale, masked keys = -inf) v, differentiated by autograd, in the inputs' dtype.
A query row whose keys are all masked returns zeros (and zero gradients), not NaN.
"""

from __future__ import annotations

import torch


def multi_head_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   key_padding_mask: torch.Tensor | None = None,
                                   scale: float | None = None) -> torch.Tensor:
    """q: (B, H, Lq, Dh); k, v: (B, H, Lk, Dh); key_padding_mask: (B, Lk) bool, True = padding."""
    if scale is None:
        scale = q.size(-1) ** -0.5
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if key_padding_mask is None:
        return torch.matmul(torch.softmax(scores, dim=-1), v)
    masked = key_padding_mask[:, None, None, :].bool()          # (B, 1, 1, Lk)
    all_masked = masked.all(dim=-1, keepdim=True)                # (B, 1, 1, 1)
    # A fully-masked row is softmaxed unmasked and then zeroed: softmax over all -inf would give NaN,
    # and NaN * 0 in softmax's backward would leak NaN into the gradients of q and k.
    attn = torch.softmax(scores.masked_fill(masked & ~all_masked, float("-inf")), dim=-1)
    attn = attn.masked_fill(all_masked, 0.0)
    return torch.matmul(attn, v)
