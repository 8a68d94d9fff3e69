"""Triton kernels of meta_sim (SPEC §2.1): a GEMM with a segmented max/sum epilogue, and a two-kernel
deterministic backward.

Units are flattened: rows r = (image a, unit i) of A = img (Ni*M, d), columns c = (text b, unit j) of
B = txt (Nt*Q, d). A program owns a tile of BI images x BT texts, i.e. rows BI*MP and columns BT*QP (MP, QP:
M, Q padded to powers of two), accumulates G = A B^T over d in fp32, then reduces in registers:
padded rows -> -inf, max over the MP rows of each image (arg-max kept, lowest index on ties), padded
columns -> 0, sum over the QP columns of each text. Nothing unit-level reaches memory.

Backward, with W[(a, i), (b, j)] = dS[a, b] * [argmax[a, b, j] == i] rebuilt tile by tile in registers:
dImg = W @ B (one program per image block and d-chunk, looping over all texts) and dTxt = W^T @ A (one per
text block and d-chunk, looping over all images). Every output element is written by exactly one program,
so there are no atomics and results are bitwise reproducible.

Inputs: float16 / bfloat16 / float32 unit tensors of any strides. Under TRITON_INTERPRET=1 (CPU) tiles are
upcast to fp32 after loading: the interpreter mis-computes raw bf16 dots (SPEC §8).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _meta_sim_fwd_kernel(
    img_ptr, txt_ptr, scores_ptr, argmax_ptr,
    NI, NT, M, Q, D,
    s_ia, s_im, s_id, s_tb, s_tq, s_td, s_sa, s_sb, s_xa, s_xb, s_xq,
    MP: tl.constexpr, QP: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    WITH_ARGMAX: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr = 8,
):
    R: tl.constexpr = BI * MP
    C: tl.constexpr = BT * QP
    # 1-D grid (no 65535 limit on a second axis), grouped like Triton's matmul tutorial: GROUP image blocks
    # sweep the text blocks together, so text tiles are reused from L2 (COCO 5K texts exceed it).
    pid = tl.program_id(0)
    blocks_i = tl.cdiv(NI, BI)
    per_group = GROUP * tl.cdiv(NT, BT)
    first_i = (pid // per_group) * GROUP
    group_size = tl.minimum(blocks_i - first_i, GROUP)
    pid_i = first_i + (pid % per_group) % group_size
    pid_t = (pid % per_group) // group_size
    rows = tl.arange(0, R)
    cols = tl.arange(0, C)
    a = (pid_i * BI + rows // MP).to(tl.int64)  # image of each row (int64: offsets of big evaluations)
    i = rows % MP
    b = (pid_t * BT + cols // QP).to(tl.int64)  # text of each column
    j = cols % QP
    row_ok = (a < NI) & (i < M)
    col_ok = (b < NT) & (j < Q)
    img_rows = img_ptr + a * s_ia + i * s_im
    txt_cols = txt_ptr + b * s_tb + j * s_tq

    acc = tl.zeros((R, C), dtype=tl.float32)
    for k0 in range(0, D, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < D
        x = tl.load(img_rows[:, None] + k[None, :] * s_id, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(txt_cols[None, :] + k[:, None] * s_td, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)

    # Padded units never win the max; rows of images past NI are computed but never stored.
    acc = tl.where((i < M)[:, None], acc, float("-inf"))
    acc = tl.reshape(acc, (BI, MP, C))
    if WITH_ARGMAX:
        best, best_unit = tl.max(acc, axis=1, return_indices=True, return_indices_tie_break_left=True)
    else:
        best = tl.max(acc, axis=1)
    best = tl.where((j < Q)[None, :], best, 0.0)  # (BI, C); padded text units add nothing
    scores = tl.sum(tl.reshape(best, (BI, BT, QP)), axis=2)

    ai = (pid_i * BI + tl.arange(0, BI)).to(tl.int64)
    bt = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
    tl.store(scores_ptr + ai[:, None] * s_sa + bt[None, :] * s_sb, scores,
             mask=(ai < NI)[:, None] & (bt < NT)[None, :])
    if WITH_ARGMAX:
        tl.store(argmax_ptr + ai[:, None] * s_xa + b[None, :] * s_xb + j[None, :] * s_xq,
                 best_unit.to(tl.int32), mask=(ai < NI)[:, None] & col_ok[None, :])


@triton.jit
def _meta_sim_bwd_img_kernel(
    grad_ptr, argmax_ptr, txt_ptr, out_ptr,
    NI, NT, M, Q, D,
    s_ga, s_gb, s_xa, s_xb, s_xq, s_tb, s_tq, s_td, s_oa, s_om, s_od,
    MP: tl.constexpr, QP: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dImg[a, i, k] = sum over (b, j) of W[(a, i), (b, j)] * txt[b, j, k], for BI images and BD columns of d."""
    R: tl.constexpr = BI * MP
    C: tl.constexpr = BT * QP
    pid_i = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, R)
    a = (pid_i * BI + rows // MP).to(tl.int64)
    i = rows % MP
    k = pid_k * BD + tl.arange(0, BD)
    k_ok = k < D
    cols = tl.arange(0, C)
    j = cols % QP

    # W is built from compact (BI, C) tiles of dS and arg-max broadcast over the MP units in registers:
    # loading it as a gathered (R, C) tile would pipeline MP times more data through shared memory.
    ai = (pid_i * BI + tl.arange(0, BI)).to(tl.int64)
    units = tl.arange(0, MP)[None, :, None]
    acc = tl.zeros((R, BD), dtype=tl.float32)
    for t0 in range(0, NT, BT):
        b = (t0 + cols // QP).to(tl.int64)
        col_ok = (b < NT) & (j < Q)
        pair_ok = (ai < NI)[:, None] & col_ok[None, :]
        g = tl.load(grad_ptr + ai[:, None] * s_ga + b[None, :] * s_gb, mask=pair_ok, other=0.0)  # (BI, C)
        unit = tl.load(argmax_ptr + ai[:, None] * s_xa + b[None, :] * s_xb + j[None, :] * s_xq,
                       mask=pair_ok, other=-1)
        w = tl.reshape(tl.where(unit[:, None, :] == units, g[:, None, :], 0.0), (R, C))
        y = tl.load(txt_ptr + b[:, None] * s_tb + j[:, None] * s_tq + k[None, :] * s_td,
                    mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # (C, BD)
        if UPCAST:
            y = y.to(tl.float32)
        else:
            w = w.to(y.dtype)  # tensor-core dot in the input precision, like PyTorch's own backward
        acc = tl.dot(w, y, acc, input_precision=PRECISION)

    row_ok = (a < NI) & (i < M)
    tl.store(out_ptr + a[:, None] * s_oa + i[:, None] * s_om + k[None, :] * s_od,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _meta_sim_bwd_txt_kernel(
    grad_ptr, argmax_ptr, img_ptr, out_ptr,
    NI, NT, M, Q, D,
    s_ga, s_gb, s_xa, s_xb, s_xq, s_ia, s_im, s_id, s_ob, s_oq, s_od,
    MP: tl.constexpr, QP: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dTxt[b, j, k] = sum over (a, i) of W[(a, i), (b, j)] * img[a, i, k], for BT texts and BD columns of d."""
    R: tl.constexpr = BI * MP
    C: tl.constexpr = BT * QP
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = tl.arange(0, C)
    b = (pid_t * BT + cols // QP).to(tl.int64)
    j = cols % QP
    col_ok = (b < NT) & (j < Q)
    k = pid_k * BD + tl.arange(0, BD)
    k_ok = k < D
    rows = tl.arange(0, R)
    i = rows % MP

    units = tl.arange(0, MP)[None, None, :]
    acc = tl.zeros((C, BD), dtype=tl.float32)
    for a0 in range(0, NI, BI):
        a = (a0 + rows // MP).to(tl.int64)
        row_ok = (a < NI) & (i < M)
        ai = (a0 + tl.arange(0, BI)).to(tl.int64)
        pair_ok = col_ok[:, None] & (ai < NI)[None, :]
        g = tl.load(grad_ptr + ai[None, :] * s_ga + b[:, None] * s_gb, mask=pair_ok, other=0.0)  # (C, BI)
        unit = tl.load(argmax_ptr + ai[None, :] * s_xa + b[:, None] * s_xb + j[:, None] * s_xq,
                       mask=pair_ok, other=-1)
        w = tl.reshape(tl.where(unit[:, :, None] == units, g[:, :, None], 0.0), (C, R))  # W^T
        x = tl.load(img_ptr + a[:, None] * s_ia + i[:, None] * s_im + k[None, :] * s_id,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (R, BD)
        if UPCAST:
            x = x.to(tl.float32)
        else:
            w = w.to(x.dtype)
        acc = tl.dot(w, x, acc, input_precision=PRECISION)

    tl.store(out_ptr + b[:, None] * s_ob + j[:, None] * s_oq + k[None, :] * s_od,
             acc.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & k_ok[None, :])


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _tiles(m: int, q: int, tile_rows: int | None, tile_cols: int | None) -> tuple[int, int, int, int]:
    """(MP, QP, BI, BT): BI images x BT texts per program, with BI*MP and BT*QP >= 16 (GPU tl.dot minimum).

    Default tile: 128 unit rows x 128 unit columns on a GPU; 32 x 32 in the interpreter, whose cost per
    program grows with the tile while its grids stay small in tests."""
    default = 32 if INTERPRET else 128
    mp, qp = _pow2(m), _pow2(q)
    bi = max(1, _pow2(tile_rows or default) // mp, 16 // mp)
    bt = max(1, _pow2(tile_cols or default) // qp, 16 // qp)
    return mp, qp, bi, bt


# Large forwards (>= 4 GFLOP: 512^2 training and up) pick their tile among these (unit rows, unit columns,
# BK, warps, stages) once per (M, Q, d, dtype); set VSE_KERNELS_META_SIM_AUTOTUNE=0 for the fixed default
# tile, e.g. for bitwise reproducibility across processes (tuning may pick another tile next time).
AUTOTUNE = os.environ.get("VSE_KERNELS_META_SIM_AUTOTUNE", "1") != "0"
# 64 x 256 takes 8 warps: with 4, the grid setting's arg-max epilogue spills (ptxas, sm_90).
_FORWARD_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                    (64, 256, 64, 8, 4), (128, 128, 128, 8, 2)]


@functools.cache
def _tuned_forward(mp: int, qp: int, half: bool, precision: str):
    configs, seen = [], set()
    for rows, cols, bk, warps, stages in _FORWARD_CONFIGS:
        if precision == "tf32x3" and not (rows == cols == 128 and warps == 8):
            continue  # 3 passes hold split operands in registers: larger tiles per warp spill
        bi, bt = max(1, rows // mp, 16 // mp), max(1, cols // qp, 16 // qp)
        bk = bk if half else 32  # fp32 tiles take twice the shared memory
        if (bi, bt, bk, warps, stages) not in seen:
            seen.add((bi, bt, bk, warps, stages))
            configs.append(triton.Config({"BI": bi, "BT": bt, "BK": bk}, num_warps=warps, num_stages=stages))
    return triton.autotune(configs, key=["M", "Q", "D"])(_meta_sim_fwd_kernel)


def _backward_tiles(m: int, q: int, tile_rows: int | None = None, tile_cols: int | None = None):
    """Like _tiles, but the (BI, BT*QP) dS and arg-max tiles, which go through shared memory once per
    pipeline stage, are capped (M = Q = 1 would otherwise need ~280 KB, more than an H100 SM has)."""
    mp, qp, bi, bt = _tiles(m, q, tile_rows, tile_cols)
    while bi * bt * qp > 2048 and bi * mp > 16:
        bi //= 2
    return mp, qp, bi, bt


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision of tl.dot: fp32 inputs take the tensor cores either way, as TF32 when torch allows
    it for matmuls (its own switch), else as the 3-pass "tf32x3" (fp32-level accuracy; "ieee" would be
    FMAs, ~7x slower and, at these tiles, register-starved). fp16/bf16 ignore it; the interpreter
    computes every dot exactly."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Every launch goes through here, so tests/test_compile_sm90.py can compile each one for sm_90 instead
    (from meta tensors, without a GPU) and no config the launchers can choose escapes it."""
    kernel[grid](*args, **kwargs)


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in SUPPORTED:
            raise TypeError(f"the Triton meta_sim kernels take float16, bfloat16 or float32, got {t.dtype}")


def meta_sim_forward(img: torch.Tensor, txt: torch.Tensor, with_argmax: bool, *,
                     tile_rows: int | None = None, tile_cols: int | None = None):
    """img (Ni, M, d), txt (Nt, Q, d), same dtype and device, any strides -> (S (Ni, Nt) fp32,
    argmax (Ni, Nt, Q) int32, or an empty (0,) tensor without with_argmax)."""
    _check(img, txt)
    (ni, m, d), (nt, q, _) = img.shape, txt.shape
    scores = torch.empty((ni, nt), dtype=torch.float32, device=img.device)
    argmax = torch.empty((ni, nt, q) if with_argmax else (0,), dtype=torch.int32, device=img.device)
    if ni == 0 or nt == 0:
        return scores, argmax
    upcast = INTERPRET or img.dtype == torch.float32
    half = img.dtype != torch.float32
    args = (img, txt, scores, argmax, ni, nt, m, q, d, *img.stride(), *txt.stride(), *scores.stride(),
            *(argmax.stride() if with_argmax else (0, 0, 0)))
    flags = dict(WITH_ARGMAX=with_argmax, UPCAST=upcast, PRECISION=dot_precision(img.dtype))
    if AUTOTUNE and not INTERPRET and tile_rows is None and tile_cols is None and 2 * ni * nt * m * q * d >= 2**32:
        mp, qp = _pow2(m), _pow2(q)
        kernel = _tuned_forward(mp, qp, half, flags["PRECISION"])
        _launch(kernel, lambda meta: (triton.cdiv(ni, meta["BI"]) * triton.cdiv(nt, meta["BT"]),), *args,
                MP=mp, QP=qp, **flags)
        return scores, argmax
    mp, qp, bi, bt = _tiles(m, q, tile_rows, tile_cols)
    _launch(_meta_sim_fwd_kernel, (triton.cdiv(ni, bi) * triton.cdiv(nt, bt),),
        *args, MP=mp, QP=qp, BI=bi, BT=bt, BK=64 if half and not INTERPRET else 32, **flags,
        **({} if INTERPRET else {"num_warps": 8, "num_stages": 3}))
    return scores, argmax


def meta_sim_backward(grad: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, argmax: torch.Tensor, *,
                      tile_rows: int | None = None, tile_cols: int | None = None, block_d: int | None = None):
    """Gradients of sum(grad * S) w.r.t. img and txt (in their dtype), from the forward's saved argmax."""
    _check(img, txt)
    (ni, m, d), (nt, q, _) = img.shape, txt.shape
    # An expanded (stride-0) grad, e.g. from S.sum(), must be materialised: SPEC §8.
    grad = grad.to(torch.float32).contiguous()
    argmax = argmax.contiguous()
    grad_img = torch.empty((ni, m, d), dtype=img.dtype, device=img.device)
    grad_txt = torch.empty((nt, q, d), dtype=txt.dtype, device=txt.device)
    if ni == 0 or nt == 0:  # nothing to route: the gradients are zero
        return grad_img.zero_(), grad_txt.zero_()
    # fp32 tiles are twice as big: at 128 x 128 x 64, 3 stages need 240-256 KB of shared memory (more
    # than a block may have) and tf32x3's split operands spill (ptxas, sm_90).
    fp32 = img.dtype == torch.float32 and not INTERPRET
    mp, qp, bi, bt = _backward_tiles(m, q, tile_rows, tile_cols or (64 if fp32 else None))
    bd = block_d or (32 if INTERPRET or fp32 else 64)
    upcast = INTERPRET or img.dtype == torch.float32
    meta = dict(MP=mp, QP=qp, BI=bi, BT=bt, BD=bd, UPCAST=upcast, PRECISION=dot_precision(img.dtype),
                **({} if INTERPRET else {"num_warps": 8, "num_stages": 3}))
    _launch(_meta_sim_bwd_img_kernel, (triton.cdiv(ni, bi), triton.cdiv(d, bd)),
        grad, argmax, txt, grad_img, ni, nt, m, q, d,
        *grad.stride(), *argmax.stride(), *txt.stride(), *grad_img.stride(), **meta)
    _launch(_meta_sim_bwd_txt_kernel, (triton.cdiv(nt, bt), triton.cdiv(d, bd)),
        grad, argmax, img, grad_txt, ni, nt, m, q, d,
        *grad.stride(), *argmax.stride(), *img.stride(), *grad_txt.stride(), **meta)
    return grad_img, grad_txt
