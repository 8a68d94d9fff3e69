"""`vse_kernels.multi_head_attention`: registered op (opaque custom ops + fake + autograd) and dispatch.

Ops (opaque to torch.compile; each picks its implementation at run time):
  vse_kernels::attention_fwd(q, k, v, key_padding_mask?, scale) -> (out, lse)
  vse_kernels::attention_bwd(grad_out, q, k, v, key_padding_mask?, out, lse, scale) -> (dq, dk, dv)
  vse_kernels::attention_packed_fwd(qkv, key_padding_mask?, num_heads, scale) -> (out, lse)
  vse_kernels::attention_packed_bwd(grad_out, qkv, key_padding_mask?, out, lse, num_heads, scale) -> dqkv
(the packed pair serves the module: (B, L, 3E) in, (B, L, E) out, no head split/merge copies).
lse is the per-query-row natural log-sum-exp of the scaled, masked scores ((B, H, Lq), float32, float64
for float64 inputs), +inf on fully-masked rows; it is internal (not differentiable).

Implementations: CUDA fp16/bf16/fp32 with Lk <= 128 and Dh <= 128 -> Triton kernels (triton_kernels.py),
except the fp32 backward with Dh > 64 (see triton_kernels.supported).
Everything else (CPU, float64, longer key sequences, larger heads) -> the "math path" below: the same
algorithm with dense torch matmuls in fp32 (fp64 for fp64 inputs), O(B·H·Lq·Lk) extra memory.

Output layout: out (and dq/dk/dv) follow their input's layout: "heads inside sequence" inputs (views
of a (B, L, H, Dh) tensor, as made from a packed QKV projection) get (B, L, H, Dh)-ordered outputs, so
the module's head merge is a free view; any other input gets contiguous (B, H, L, Dh) outputs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..._checks import check_same_device, check_same_dtype, check_tensor

# Test hook: run the Triton kernels on CPU tensors too (only meaningful under TRITON_INTERPRET=1).
_TRITON_ON_CPU = False


def _kernels():
    from . import triton_kernels   # imported lazily: importing triton must wait for TRITON_INTERPRET
    return triton_kernels


def _use_triton(q: Tensor, k: Tensor, backward: bool = False) -> bool:
    if not (q.is_cuda or (_TRITON_ON_CPU and q.device.type == "cpu")):
        return False
    return _kernels().supported(q, k, backward)


def _empty_in_layout(like: Tensor, shape=None, dtype=None) -> Tensor:
    batch, heads, length, dim = like.shape if shape is None else shape
    dtype = like.dtype if dtype is None else dtype
    if heads > 1 and length > 1 and like.stride(1) < like.stride(2):
        return like.new_empty((batch, length, heads, dim), dtype=dtype).transpose(1, 2)
    return like.new_empty((batch, heads, length, dim), dtype=dtype)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _math_probs(q, k, mask, scale, lse=None):
    """Scaled masked scores -> (probabilities, lse) in the working precision."""
    work = _lse_dtype(q)
    s = torch.matmul(q.to(work), k.to(work).transpose(-2, -1)).mul_(scale)   # in place: s is fresh
    if mask is not None:
        s.masked_fill_(mask[:, None, None, :], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(s, dim=-1)
        lse.masked_fill_(lse == float("-inf"), float("inf"))   # fully masked: exp(s - inf) = 0
    return s.sub_(lse[..., None]).exp_(), lse


def _forward_into(q, k, v, key_padding_mask, scale, out) -> Tensor:
    """Writes the attention of (B, H, L, Dh) views into `out` (any strides); returns lse."""
    if _use_triton(q, k):
        return _kernels().attention_forward(q, k, v, key_padding_mask, scale, out)
    p, lse = _math_probs(q, k, key_padding_mask, scale)
    out.copy_(torch.matmul(p, v.to(p.dtype)))
    return lse


def _backward_into(grad_out, q, k, v, key_padding_mask, out, lse, scale, dq, dk, dv) -> None:
    if _use_triton(q, k, backward=True):
        _kernels().attention_backward(grad_out, q, k, v, key_padding_mask, out, lse, scale, dq, dk, dv)
        return
    p, _ = _math_probs(q, k, key_padding_mask, scale, lse)
    work = p.dtype
    g = grad_out.to(work)
    dp = torch.matmul(g, v.to(work).transpose(-2, -1))
    # rowsum(P ⊙ dP) = rowsum(dO ⊙ O) exactly, without the rounding of the stored (low-precision) out
    ds = dp.sub_((p * dp).sum(dim=-1, keepdim=True)).mul_(p).mul_(scale)
    dq.copy_(torch.matmul(ds, k.to(work)))
    dk.copy_(torch.matmul(ds.transpose(-2, -1), q.to(work)))
    dv.copy_(torch.matmul(p.transpose(-2, -1), g))


@torch.library.custom_op("vse_kernels::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                   scale: float) -> tuple[Tensor, Tensor]:
    out = _empty_in_layout(q)
    return out, _forward_into(q, k, v, key_padding_mask, scale, out)


@_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, scale):
    return _empty_in_layout(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


@torch.library.custom_op("vse_kernels::attention_bwd", mutates_args=())
def _attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                   out: Tensor, lse: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = _empty_in_layout(q), _empty_in_layout(k), _empty_in_layout(v)
    _backward_into(grad_out, q, k, v, key_padding_mask, out, lse, scale, dq, dk, dv)
    return dq, dk, dv


@_attention_bwd.register_fake
def _(grad_out, q, k, v, key_padding_mask, out, lse, scale):
    return _empty_in_layout(q), _empty_in_layout(k), _empty_in_layout(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_padding_mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, key_padding_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.vse_kernels.attention_bwd(grad_out, q, k, v, key_padding_mask, out, lse, ctx.scale)
    return dq, dk, dv, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# Packed self-attention for the module: qkv (B, L, 3E) straight from the input projection, out (B, L, E)
# straight into the output projection, dqkv (B, L, 3E) written in place by the backward kernel. Saves
# the copies that autograd would otherwise make to stack dq, dk, dv back into the packed layout.

def _split_heads(packed: Tensor, parts: int, num_heads: int) -> list[Tensor]:
    """(B, L, parts·E) -> `parts` (B, H, L, Dh) views (heads inside sequence: no copy)."""
    batch, length, width = packed.shape
    head_dim = width // (parts * num_heads)
    return list(packed.unflatten(-1, (parts, num_heads, head_dim)).permute(2, 0, 3, 1, 4).unbind(0))


@torch.library.custom_op("vse_kernels::attention_packed_fwd", mutates_args=())
def _attention_packed_fwd(qkv: Tensor, key_padding_mask: Optional[Tensor], num_heads: int,
                          scale: float) -> tuple[Tensor, Tensor]:
    q, k, v = _split_heads(qkv, 3, num_heads)
    out = qkv.new_empty(qkv.shape[:2] + (qkv.size(2) // 3,))
    return out, _forward_into(q, k, v, key_padding_mask, scale, _split_heads(out, 1, num_heads)[0])


@_attention_packed_fwd.register_fake
def _(qkv, key_padding_mask, num_heads, scale):
    batch, length, width = qkv.shape
    return qkv.new_empty((batch, length, width // 3)), qkv.new_empty((batch, num_heads, length), dtype=_lse_dtype(qkv))


@torch.library.custom_op("vse_kernels::attention_packed_bwd", mutates_args=())
def _attention_packed_bwd(grad_out: Tensor, qkv: Tensor, key_padding_mask: Optional[Tensor], out: Tensor,
                          lse: Tensor, num_heads: int, scale: float) -> Tensor:
    dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
    q, k, v = _split_heads(qkv, 3, num_heads)
    (g,), (o,) = _split_heads(grad_out, 1, num_heads), _split_heads(out, 1, num_heads)
    _backward_into(g, q, k, v, key_padding_mask, o, lse, scale, *_split_heads(dqkv, 3, num_heads))
    return dqkv


@_attention_packed_bwd.register_fake
def _(grad_out, qkv, key_padding_mask, out, lse, num_heads, scale):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _packed_setup_context(ctx, inputs, output):
    qkv, key_padding_mask, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, key_padding_mask, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale
    ctx.mark_non_differentiable(lse)


def _packed_backward(ctx, grad_out, _grad_lse):
    qkv, key_padding_mask, out, lse = ctx.saved_tensors
    dqkv = torch.ops.vse_kernels.attention_packed_bwd(grad_out, qkv, key_padding_mask, out, lse,
                                                       ctx.num_heads, ctx.scale)
    return dqkv, None, None, None


_attention_packed_fwd.register_autograd(_packed_backward, setup_context=_packed_setup_context)


def _validate(q, k, v, key_padding_mask, scale) -> float:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask)
    batch, heads, _, dh = q.shape
    lk = k.size(2)
    if tuple(k.shape) != (batch, heads, lk, dh):
        raise ValueError(f"k must have shape (B, H, Lk, Dh) = ({batch}, {heads}, Lk, {dh}) to match q of shape "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k, {tuple(k.shape)}, got {tuple(v.shape)}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, lk):
            raise ValueError(f"key_padding_mask must have shape (B, Lk) = ({batch}, {lk}), "
                             f"got {tuple(key_padding_mask.shape)}")
    if scale is None:
        return dh ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def multi_head_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None,
                         scale: float | None = None) -> Tensor:
    """softmax(q kᵀ · scale, masked keys = -inf) v for short sequences (SPEC §1.3).

    q: (B, H, Lq, Dh); k, v: (B, H, Lk, Dh); key_padding_mask: (B, Lk) bool, True = padding (the
    nn.MultiheadAttention convention); scale defaults to Dh ** -0.5. Returns (B, H, Lq, Dh) in q's dtype.
    A query row whose keys are all masked returns zeros, and its gradients are zero. Differentiable in
    q, k, v; deterministic. CUDA: fused Triton kernels (Lk <= 128, Dh <= 128; longer keys or larger heads
    use the math path, correct but O(Lq·Lk) memory). CPU: the math path (fp32 accumulation).
    """
    scale = _validate(q, k, v, key_padding_mask, scale)
    out, _ = torch.ops.vse_kernels.attention_fwd(q, k, v, key_padding_mask, scale)
    return out


def packed_self_attention(qkv: Tensor, num_heads: int, key_padding_mask: Tensor | None = None,
                          scale: float | None = None) -> Tensor:
    """Self-attention on a packed projection: qkv (B, L, 3E) laid out [q | k | v], each E = H·Dh split
    into heads like nn.MultiheadAttention; returns the merged-head output (B, L, E). Same semantics as
    multi_head_attention on the split heads, without the copies of splitting and merging (used by
    vse_kernels.nn.MultiheadSelfAttention)."""
    check_tensor("qkv", qkv, ndim=3)
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads <= 0 \
            or qkv.size(2) % (3 * num_heads) != 0:
        raise ValueError(f"qkv must have shape (B, L, 3·num_heads·Dh), got {tuple(qkv.shape)} with "
                         f"num_heads={num_heads!r}")
    scale = _validate(*_split_heads(qkv, 3, num_heads), key_padding_mask, scale)
    out, _ = torch.ops.vse_kernels.attention_packed_fwd(qkv, key_padding_mask, num_heads, scale)
    return out
