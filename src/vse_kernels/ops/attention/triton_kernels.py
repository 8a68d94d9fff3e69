"""Triton kernels for short-sequence multi-head attention (SPEC §2.3) and their launchers.

One program owns whole (batch, head) pairs (PAIRS of them, one after another; several only when pairs
are tiny, see _config): the entire key range of a pair (Lk <= MAX_LK) is one tile kept on chip, so the
softmax is exact (no online rescaling) and the query rows are walked in blocks of BLOCK_M (usually one).
Backward: the same program recomputes P from the saved log-sum-exp, writes dQ per query block and
accumulates dK, dV for the whole key range in registers, so every output element is written by exactly
one program: no atomics, deterministic. D_i = rowsum(dO ⊙ O) is computed in the backward kernel itself
(one launch forward, one launch backward).

Layout: every tensor is passed with its four strides (b, h, l, d), so permuted views of a packed QKV
projection need no copy. LSE is (B·H, Lq) float32 in natural log; +inf marks a fully-masked query row,
which makes exp(s - lse) = 0 for every key, hence zero output and zero gradients for that row.

Under TRITON_INTERPRET=1 (CPU tensors) tiles are upcast to fp32 after loading: the interpreter computes
bf16 dots wrongly. On a GPU fp16/bf16 tiles go to the tensor cores with fp32 accumulation; so do fp32
inputs, as TF32 when torch allows it for matmuls, else as 3-pass "tf32x3" dots (fp32-level accuracy; see
meta_sim's dot_precision).

Launch configurations are untuned on hardware: they were chosen from ptxas register/spill reports of
sm_90 builds made without a GPU (tests/test_compile_sm90.py); pass pairs=/block_m= to the launchers to tune.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..meta_sim.triton_kernels import dot_precision

MAX_LK = 128   # key range held in one tile; longer key sequences use the op's math path
MAX_DH = 128
_LOG2E = 1.4426950408889634


@triton.jit
def _load_pair_keys(K, V, MASK, pair, H, Lk, skb, skh, skl, skd, svb, svh, svl, svd, offs_n, offs_d, n_ok, kv_ok,
                    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr):
    """The K and V tiles of one (batch, head) pair and which of its keys may be attended (forward and
    backward share this prologue; Triton inlines it).

    int64 offsets: B·H·L·Dh can exceed 2**31 elements at the batch sizes this is built for. The per-pair part
    is folded into 1-D row offsets so that no loop-invariant 2-D offset tensor is hoisted out of the pair loop
    (that costs ~64 registers per tensor and made ptxas spill)."""
    b = (pair // H).to(tl.int64)
    h = (pair % H).to(tl.int64)
    k = tl.load(K + (b * skb + h * skh + offs_n * skl)[:, None] + (offs_d * skd)[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + (b * svb + h * svh + offs_n * svl)[:, None] + (offs_d * svd)[None, :], mask=kv_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_ok = n_ok
    if HAS_MASK:
        pad = tl.load(MASK + b * Lk + offs_n, mask=n_ok, other=1)
        key_ok = key_ok & (pad == 0)
    return b, h, k, v, key_ok


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, MASK, O, LSE,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    H, BH, Lq, Lk, Dh, qk_scale,
    HAS_MASK: tl.constexpr, PAIRS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, M_BLOCKS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < Dh
    n_ok = offs_n < Lk
    kv_ok = n_ok[:, None] & d_ok[None, :]
    for i in range(PAIRS):
        # The last program's surplus iterations redo pair BH - 1 (same values, same program) instead of
        # branching: a branch-free body lets the compiler pipeline the next pair's loads.
        pair = tl.minimum(pid * PAIRS + i, BH - 1)
        b, h, k, v, key_ok = _load_pair_keys(K, V, MASK, pair, H, Lk, skb, skh, skl, skd, svb, svh, svl, svd,
                                             offs_n, offs_d, n_ok, kv_ok, HAS_MASK, UPCAST)
        for m0 in range(0, M_BLOCKS * BLOCK_M, BLOCK_M):
            rows = m0 + offs_m
            r_ok = rows < Lq
            q = tl.load(Q + (b * sqb + h * sqh + rows * sql)[:, None] + (offs_d * sqd)[None, :],
                        mask=r_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale   # base-2 logits
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m = tl.max(s, axis=1)
            m = tl.where(m == float("-inf"), 0.0, m)          # fully-masked row: avoid -inf - -inf
            p = tl.exp2(s - m[:, None])
            l = tl.sum(p, axis=1)
            l_safe = tl.where(l == 0.0, 1.0, l)
            o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC) / l_safe[:, None]
            tl.store(O + (b * sob + h * soh + rows * sol)[:, None] + (offs_d * sod)[None, :],
                     o.to(O.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
            lse = tl.where(l == 0.0, float("inf"), (m + tl.log2(l_safe)) * 0.6931471805599453)
            tl.store(LSE + pair.to(tl.int64) * Lq + rows, lse, mask=r_ok)


@triton.jit
def _attn_bwd_kernel(
    Q, K, V, MASK, O, DO, LSE, DQ, DK, DV,
    sqb, sqh, sql, sqd, skb, skh, skl, skd, svb, svh, svl, svd, sob, soh, sol, sod,
    sgb, sgh, sgl, sgd, sdqb, sdqh, sdql, sdqd, sdkb, sdkh, sdkl, sdkd, sdvb, sdvh, sdvl, sdvd,
    H, BH, Lq, Lk, Dh, scale, qk_scale,
    HAS_MASK: tl.constexpr, PAIRS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, M_BLOCKS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < Dh
    n_ok = offs_n < Lk
    kv_ok = n_ok[:, None] & d_ok[None, :]
    for i in range(PAIRS):
        # The last program's surplus iterations redo pair BH - 1 (same values, same program) instead of
        # branching: a branch-free body lets the compiler pipeline the next pair's loads.
        pair = tl.minimum(pid * PAIRS + i, BH - 1)
        b, h, k, v, key_ok = _load_pair_keys(K, V, MASK, pair, H, Lk, skb, skh, skl, skd, svb, svh, svl, svd,
                                             offs_n, offs_d, n_ok, kv_ok, HAS_MASK, UPCAST)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for m0 in range(0, M_BLOCKS * BLOCK_M, BLOCK_M):
            rows = m0 + offs_m
            r_ok = rows < Lq
            qd_ok = r_ok[:, None] & d_ok[None, :]
            q = tl.load(Q + (b * sqb + h * sqh + rows * sql)[:, None] + (offs_d * sqd)[None, :], mask=qd_ok, other=0.0)
            do = tl.load(DO + (b * sgb + h * sgh + rows * sgl)[:, None] + (offs_d * sgd)[None, :], mask=qd_ok, other=0.0)
            o = tl.load(O + (b * sob + h * soh + rows * sol)[:, None] + (offs_d * sod)[None, :], mask=qd_ok, other=0.0)
            # padded rows read lse = +inf, so they contribute nothing below
            lse = tl.load(LSE + pair.to(tl.int64) * Lq + rows, mask=r_ok, other=float("inf"))
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            s = tl.where(key_ok[None, :], s, float("-inf"))
            p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC) * scale
            tl.store(DQ + (b * sdqb + h * sdqh + rows * sdql)[:, None] + (offs_d * sdqd)[None, :],
                     dq.to(DQ.dtype.element_ty), mask=qd_ok)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
        tl.store(DK + (b * sdkb + h * sdkh + offs_n * sdkl)[:, None] + (offs_d * sdkd)[None, :],
                 (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV + (b * sdvb + h * sdvh + offs_n * sdvl)[:, None] + (offs_d * sdvd)[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_ok)


def supported(q: torch.Tensor, k: torch.Tensor, backward: bool = False) -> bool:
    """Whether these kernels handle the shapes/dtype (the device is the caller's business).

    Not the fp32 backward with heads over 64: its K, V, dK and dV tiles alone fill the register file, and
    it spills (or needs more than 227 KB of shared memory) at every tile ptxas was tried with for sm_90;
    the math path's cuBLAS matmuls do it better."""
    if backward and q.dtype == torch.float32 and q.size(3) > 64:
        return False
    return (q.dtype in (torch.float16, torch.bfloat16, torch.float32) and 1 <= k.size(2) <= MAX_LK
            and 1 <= q.size(3) <= MAX_DH and q.numel() > 0)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))   # tl.dot tiles must be >= 16 on a GPU


def _config(q, k, backward: bool, pairs: int | None, block_m: int | None, gpu: bool | None = None):
    """(grid, constexprs, launch options). Meta tensors plan a GPU launch (the sm_90 compile test)."""
    gpu = q.device.type != "cpu" if gpu is None else gpu
    batch, heads, lq, dh = q.shape
    block_n, block_d = _pow2(k.size(2)), _pow2(dh)
    fp32 = q.dtype == torch.float32   # tf32x3 / tf32 dots hold twice the operand registers of bf16
    if block_m is None:
        # From ptxas register/spill reports for sm_90 (compiled without a GPU; not timed): 64-row query
        # blocks fit without spilling except in the backward with a 128-key tile (it also holds 128-row
        # dK, dV accumulators) and the fp32 backward, which walk the queries 16 rows at a time, and the
        # fp32 forward with 128-wide heads (32 rows).
        block_m = 16 if (backward and (block_n >= 128 or fp32)) else 32 if fp32 and block_d >= 128 else 64
        block_m = min(block_m, _pow2(lq))
    bh = batch * heads
    if pairs is None:
        # Several pairs per program only in the forward, when each pair is tiny (Lk <= 32) and there are
        # enough pairs to still fill the GPU several times over: a multi-pair loop roughly doubles register
        # use: the backward (which also carries dK, dV) spills with 2 pairs, fp32 with 4 (ptxas, sm_90).
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 132
        pairs = max(1, min(4, bh // (8 * sms))) if block_n <= 32 and not backward and not fp32 else 1
    num_warps = 8 if fp32 or (backward and block_n * block_d >= 128 * 128) else 4
    meta = dict(PAIRS=pairs, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, M_BLOCKS=triton.cdiv(lq, block_m),
                UPCAST=not gpu, DOT_PREC=dot_precision(q.dtype))
    launch = dict(num_warps=num_warps, num_stages=1 if fp32 and backward else 2) if gpu else {}
    return (triton.cdiv(bh, pairs),), meta, launch


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Every launch goes through here, so tests/test_compile_sm90.py can compile each one for sm_90 instead
    (from meta tensors, without a GPU) and no config the launcher can choose escapes it."""
    kernel[grid](*args, **kwargs)


def _mask_arg(key_padding_mask, q):
    if key_padding_mask is None:
        return q, False   # never read (HAS_MASK=False)
    return key_padding_mask.contiguous(), True   # bool: Triton loads it as int1 (no conversion launch)


def attention_forward(q, k, v, key_padding_mask, scale: float, out: torch.Tensor,
                      *, pairs: int | None = None, block_m: int | None = None) -> torch.Tensor:
    """Writes softmax(q kᵀ scale) v into `out` (any strides, shape of q) and returns lse (B, H, Lq) fp32."""
    batch, heads, lq, dh = q.shape
    lse = torch.empty((batch, heads, lq), device=q.device, dtype=torch.float32)
    mask, has_mask = _mask_arg(key_padding_mask, q)
    grid, meta, launch = _config(q, k, False, pairs, block_m)
    _launch(_attn_fwd_kernel, grid,
        q, k, v, mask, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, batch * heads, lq, k.size(2), dh, scale * _LOG2E, HAS_MASK=has_mask, **meta, **launch)
    return lse


def attention_backward(grad_out, q, k, v, key_padding_mask, out, lse, scale: float, dq, dk, dv,
                       *, pairs: int | None = None, block_m: int | None = None) -> None:
    """Writes dq, dk, dv (preallocated, any strides) from the forward's out and lse."""
    if 0 in grad_out.stride():
        grad_out = grad_out.contiguous()   # expanded (stride-0) gradients, e.g. from out.sum()
    batch, heads, lq, dh = q.shape
    mask, has_mask = _mask_arg(key_padding_mask, q)
    grid, meta, launch = _config(q, k, True, pairs, block_m)
    _launch(_attn_bwd_kernel, grid,
        q, k, v, mask, out, grad_out, lse.contiguous(), dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(),
        *dq.stride(), *dk.stride(), *dv.stride(),
        heads, batch * heads, lq, k.size(2), dh, scale, scale * _LOG2E, HAS_MASK=has_mask, **meta, **launch)


def attention_triton(q, k, v, key_padding_mask=None, scale=None, **config):
    """Convenience for tests and benchmarks: forward only, contiguous output."""
    scale = q.size(-1) ** -0.5 if scale is None else scale
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = attention_forward(q, k, v, key_padding_mask, scale, out, **config)
    return out, lse
