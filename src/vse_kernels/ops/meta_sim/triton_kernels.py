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

import contextlib
import dataclasses
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
    MP2: tl.constexpr = 0,
):
    """MP2 > 0 (the split_units variant): an image's units are two row groups, MP rows (units 0..MP-1) and
    MP2 rows (units MP..MP+MP2-1), each a power of two, with two dots per k-step: M = 12 takes 8 + 4 rows
    instead of 16, so no dot computes padding."""
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
    if MP2 > 0:
        rows2 = tl.arange(0, BI * MP2)
        a2 = (pid_i * BI + rows2 // MP2).to(tl.int64)
        i2 = MP + rows2 % MP2
        row2_ok = (a2 < NI) & (i2 < M)
        img_rows2 = img_ptr + a2 * s_ia + i2 * s_im
        acc2 = tl.zeros((BI * MP2, C), dtype=tl.float32)

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
        if MP2 > 0:
            x2 = tl.load(img_rows2[:, None] + k[None, :] * s_id, mask=row2_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                x2 = x2.to(tl.float32)
            acc2 = tl.dot(x2, y, acc2, input_precision=PRECISION)

    # Padded units never win the max; rows of images past NI are computed but never stored.
    acc = tl.where((i < M)[:, None], acc, float("-inf"))
    acc = tl.reshape(acc, (BI, MP, C))
    if WITH_ARGMAX:
        best, best_unit = tl.max(acc, axis=1, return_indices=True, return_indices_tie_break_left=True)
    else:
        best = tl.max(acc, axis=1)
    if MP2 > 0:
        acc2 = tl.reshape(tl.where((i2 < M)[:, None], acc2, float("-inf")), (BI, MP2, C))
        if WITH_ARGMAX:
            best2, best_unit2 = tl.max(acc2, axis=1, return_indices=True, return_indices_tie_break_left=True)
        else:
            best2 = tl.max(acc2, axis=1)
        # The second group's units come after the first's: it wins only when strictly greater (ties keep
        # the lower index). NaN is dealt with by the launcher.
        second = best2 > best
        best = tl.where(second, best2, best)
        if WITH_ARGMAX:
            best_unit = tl.where(second, best_unit2 + MP, best_unit)
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
    s_ga, s_gb, s_xa, s_xb, s_xq, s_tb, s_tq, s_td, s_oa, s_om, s_od, SPLIT, s_os,
    MP: tl.constexpr, QP: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dImg[a, i, k] = sum over (b, j) of W[(a, i), (b, j)] * txt[b, j, k], for BI images and BD columns of d,
    over the texts [SPLIT * s, SPLIT * (s + 1)) of split s = program_id(2) (all texts when unsplit), written to
    out + s * s_os."""
    R: tl.constexpr = BI * MP
    C: tl.constexpr = BT * QP
    pid_i = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
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
    for t0 in range(pid_s * SPLIT, tl.minimum(NT, (pid_s + 1) * SPLIT), BT):
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
    tl.store(out_ptr + pid_s.to(tl.int64) * s_os + a[:, None] * s_oa + i[:, None] * s_om + k[None, :] * s_od,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & k_ok[None, :])


@triton.jit
def _meta_sim_bwd_txt_kernel(
    grad_ptr, argmax_ptr, img_ptr, out_ptr,
    NI, NT, M, Q, D,
    s_ga, s_gb, s_xa, s_xb, s_xq, s_ia, s_im, s_id, s_ob, s_oq, s_od, SPLIT, s_os,
    MP: tl.constexpr, QP: tl.constexpr, BI: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """dTxt[b, j, k] = sum over (a, i) of W[(a, i), (b, j)] * img[a, i, k], for BT texts and BD columns of d,
    over the images of split program_id(2), as in the image kernel."""
    R: tl.constexpr = BI * MP
    C: tl.constexpr = BT * QP
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
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
    for a0 in range(pid_s * SPLIT, tl.minimum(NI, (pid_s + 1) * SPLIT), BI):
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

    tl.store(out_ptr + pid_s.to(tl.int64) * s_os + b[:, None] * s_ob + j[:, None] * s_oq + k[None, :] * s_od,
             acc.to(out_ptr.dtype.element_ty), mask=col_ok[:, None] & k_ok[None, :])


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


@dataclasses.dataclass(frozen=True)
class Variant:
    """Kernel variants that remove a cap the sm_90 compile analysis predicts, selectable behind the same API;
    each is exact (tests/test_meta_sim.py) and compiles clean for sm_90 (tests/test_compile_sm90.py), and
    `python -m bench.gpu_check` times each against the default, so the first GPU run can pick the default
    from measurement. The default (all off) is the code every earlier measurement ran.

    split_units:     M units as two power-of-two row groups (M = 12: 8 + 4 rows instead of 16 padded ones:
                     the region setting's forward dots compute 25% padding otherwise); only where it saves
                     rows (M = 3, 5, 6, 9..12, ...).
    problem_tiles:   the fixed (untuned) forward tile halved until the grid has a program per SM (the 128^2
                     training forward launches 32 programs on 132 SMs); never below 16 x 16 unit rows/columns.
    backward_splits: the backward's loop (over all texts for dImg, over all images for dTxt) split into this
                     many parts run by separate programs, each writing fp32 partial sums that a second pass
                     adds in a fixed order (deterministic); 0 = enough parts for a program per SM. 1 = unsplit
                     (the 128^2 region backward: 16 dTxt programs, each looping over all 128 images).
    """

    split_units: bool = False
    problem_tiles: bool = False
    backward_splits: int = 1

    def __post_init__(self):
        if not (isinstance(self.backward_splits, int) and not isinstance(self.backward_splits, bool)
                and self.backward_splits >= 0):
            raise ValueError(f"backward_splits must be an int >= 0 (0 = auto), got {self.backward_splits!r}")

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """'split_units,problem_tiles,backward_splits=4' (the VSE_KERNELS_META_SIM_VARIANT syntax); '' = default."""
        fields, names = {}, {f.name for f in dataclasses.fields(cls)}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            if name not in names:
                raise ValueError(f"VSE_KERNELS_META_SIM_VARIANT: unknown variant {name!r} in {text!r}; "
                                 f"known: {', '.join(sorted(names))}")
            fields[name] = int(value) if name == "backward_splits" and value else value in ("", "1", "true")
        return cls(**fields)


VARIANT = Variant.parse(os.environ.get("VSE_KERNELS_META_SIM_VARIANT", ""))


@contextlib.contextmanager
def use_variant(variant: Variant | None = None, **fields):
    """Runs the block with another Variant (given, or the current one with `fields` changed), e.g.
    `with use_variant(split_units=True): vk.meta_sim(img, txt)`. Read at each launch, so it also holds
    inside torch.compile'd code (the op is opaque to the compiler)."""
    global VARIANT
    saved, VARIANT = VARIANT, dataclasses.replace(variant or VARIANT, **fields)
    try:
        yield VARIANT
    finally:
        VARIANT = saved


def _split_rows(m: int) -> int:
    """MP2 of the split_units variant (0 = no split): M = MP + MP2 rows with MP the largest power of two <= M,
    MP2 = the power of two covering the rest, where that is fewer rows than one padded group."""
    hi = _pow2(m + 1) // 2
    lo = _pow2(m - hi) if m > hi else 0
    return lo if lo and hi + lo < _pow2(m) else 0


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors to fill (the lent H200's 132 where there is no GPU: meta tensors, interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _tiles(m: int, q: int, tile_rows: int | None, tile_cols: int | None) -> tuple[int, int, int, int]:
    """(MP, QP, BI, BT): BI images x BT texts per program, with BI*MP and BT*QP >= 16 (GPU tl.dot minimum).

    Default tile: 128 unit rows x 128 unit columns on a GPU; 32 x 32 in the interpreter, whose cost per
    program grows with the tile while its grids stay small in tests."""
    default = 32 if INTERPRET else 128
    mp, qp = _pow2(m), _pow2(q)
    bi = max(1, _pow2(tile_rows or default) // mp, 16 // mp)
    bt = max(1, _pow2(tile_cols or default) // qp, 16 // qp)
    return mp, qp, bi, bt


def _problem_tiles(ni: int, nt: int, mp: int, qp: int, bi: int, bt: int, sms: int) -> tuple[int, int]:
    """(BI, BT) halved, the larger tile side first, until the grid has `sms` programs or both sides are at
    16 unit rows/columns."""
    while triton.cdiv(ni, bi) * triton.cdiv(nt, bt) < sms:
        if bi * mp >= bt * qp and bi * mp > 16:
            bi //= 2
        elif bt * qp > 16:
            bt //= 2
        elif bi * mp > 16:
            bi //= 2
        else:
            break
    return bi, bt


# Large forwards (>= 4 GFLOP: 512^2 training and up) pick their tile among these (unit rows, unit columns,
# BK, warps, stages) once per (M, Q, d, dtype); set VSE_KERNELS_META_SIM_AUTOTUNE=0 for the fixed default
# tile, e.g. for bitwise reproducibility across processes (tuning may pick another tile next time).
AUTOTUNE = os.environ.get("VSE_KERNELS_META_SIM_AUTOTUNE", "1") != "0"
# 64 x 256 takes 8 warps: with 4, the grid setting's arg-max epilogue spills (ptxas, sm_90).
_FORWARD_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                    (64, 256, 64, 8, 4), (128, 128, 128, 8, 2)]


@functools.cache
def _tuned_forward(mp: int, qp: int, half: bool, precision: str, mp2: int = 0):
    """The autotuned forward for one (padded M, padded Q, dtype, precision, split_units row group): its own
    Autotuner, so a config tuned for one variant is never reused for another."""
    min_bi = 16 // mp2 if mp2 else 1
    configs, seen = [], set()
    for rows, cols, bk, warps, stages in _FORWARD_CONFIGS:
        if precision == "tf32x3" and not (rows == cols == 128 and warps == 8):
            continue  # 3 passes hold split operands in registers: larger tiles per warp spill
        if not half and bk > 64:
            continue  # fp32 takes BK = 32 (below): this would be the first config with 2 stages (split_units spills)
        bi, bt = max(1, rows // mp, 16 // mp, min_bi), max(1, cols // qp, 16 // qp)
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


def _splits(variant: Variant, programs: int, loop_length: int, step: int, sms: int) -> int:
    """Items of the backward loop per split (a multiple of its step; loop_length = unsplit)."""
    blocks = triton.cdiv(loop_length, step)
    parts = variant.backward_splits or triton.cdiv(sms, programs)
    return triton.cdiv(blocks, max(1, min(parts, blocks))) * step


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
    argmax (Ni, Nt, Q) int32, or an empty (0,) tensor without with_argmax). Runs the current VARIANT."""
    _check(img, txt)
    (ni, m, d), (nt, q, _) = img.shape, txt.shape
    scores = torch.empty((ni, nt), dtype=torch.float32, device=img.device)
    argmax = torch.empty((ni, nt, q) if with_argmax else (0,), dtype=torch.int32, device=img.device)
    if ni == 0 or nt == 0:
        return scores, argmax
    variant = VARIANT
    upcast = INTERPRET or img.dtype == torch.float32
    half = img.dtype != torch.float32
    args = (img, txt, scores, argmax, ni, nt, m, q, d, *img.stride(), *txt.stride(), *scores.stride(),
            *(argmax.stride() if with_argmax else (0, 0, 0)))
    flags = dict(WITH_ARGMAX=with_argmax, UPCAST=upcast, PRECISION=dot_precision(img.dtype))
    # split_units: the images per program stay those of the padded tile; the rows are MP + MP2 instead.
    mp2 = _split_rows(m) if variant.split_units else 0
    min_bi = 16 // mp2 if mp2 else 1
    if mp2:
        flags["MP2"] = mp2
    rows = _pow2(m + 1) // 2 if mp2 else _pow2(m)   # MP: the first row group (all of it, unsplit)
    if AUTOTUNE and not INTERPRET and tile_rows is None and tile_cols is None and 2 * ni * nt * m * q * d >= 2**32:
        mp, qp = _pow2(m), _pow2(q)
        kernel = _tuned_forward(mp, qp, half, flags["PRECISION"], mp2)
        _launch(kernel, lambda meta: (triton.cdiv(ni, meta["BI"]) * triton.cdiv(nt, meta["BT"]),), *args,
                MP=rows, QP=qp, **flags)
        return _with_nan(scores, img, txt), argmax
    mp, qp, bi, bt = _tiles(m, q, tile_rows, tile_cols)
    if variant.problem_tiles and tile_rows is None and tile_cols is None:
        bi, bt = _problem_tiles(ni, nt, mp, qp, bi, bt, _sm_count(img.device))
    _launch(_meta_sim_fwd_kernel, (triton.cdiv(ni, max(bi, min_bi)) * triton.cdiv(nt, bt),),
        *args, MP=rows, QP=qp, BI=max(bi, min_bi), BT=bt,
        BK=64 if half and not INTERPRET else 32, **flags,
        **({} if INTERPRET else {"num_warps": 8, "num_stages": 3}))
    return _with_nan(scores, img, txt), argmax


def _with_nan(scores: torch.Tensor, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """Scores of pairs with a NaN unit set to NaN: tl.max skips NaN, so a NaN unit would vanish from the score,
    where the reference's max propagates it. From per-item flags, in place: no host sync, and O(Ni + Nt)
    beyond one read of the inputs (NaN logic in the epilogue made the arg-max configs spill). ±inf units
    need nothing: tl.max orders them as torch.max does."""
    bad_img = img.isnan().flatten(1).any(1)
    bad_txt = txt.isnan().flatten(1).any(1)
    return scores.masked_fill_(bad_img[:, None] | bad_txt[None, :], float("nan"))


def meta_sim_backward(grad: torch.Tensor, img: torch.Tensor, txt: torch.Tensor, argmax: torch.Tensor, *,
                      tile_rows: int | None = None, tile_cols: int | None = None, block_d: int | None = None):
    """Gradients of sum(grad * S) w.r.t. img and txt (in their dtype), from the forward's saved argmax.
    Runs the current VARIANT (backward_splits)."""
    _check(img, txt)
    (ni, m, d), (nt, q, _) = img.shape, txt.shape
    # An expanded (stride-0) grad, e.g. from S.sum(), must be materialised: SPEC §8.
    grad = grad.to(torch.float32).contiguous()
    argmax = argmax.contiguous()
    if ni == 0 or nt == 0:  # nothing to route: the gradients are zero
        return img.new_zeros((ni, m, d)), txt.new_zeros((nt, q, d))
    # fp32 tiles are twice as big: at 128 x 128 x 64, 3 stages need 240-256 KB of shared memory (more
    # than a block may have) and tf32x3's split operands spill (ptxas, sm_90).
    fp32 = img.dtype == torch.float32 and not INTERPRET
    mp, qp, bi, bt = _backward_tiles(m, q, tile_rows, tile_cols or (64 if fp32 else None))
    bd = block_d or (32 if INTERPRET or fp32 else 64)
    upcast = INTERPRET or img.dtype == torch.float32
    meta = dict(MP=mp, QP=qp, BI=bi, BT=bt, BD=bd, UPCAST=upcast, PRECISION=dot_precision(img.dtype),
                **({} if INTERPRET else {"num_warps": 8, "num_stages": 3}))
    sms, variant = _sm_count(img.device), VARIANT

    def run(kernel, blocks, loop_length, loop_step, units, out_shape, dtype):
        programs = blocks * triton.cdiv(d, bd)
        split = loop_length if variant.backward_splits == 1 else _splits(variant, programs, loop_length, loop_step, sms)
        parts = triton.cdiv(loop_length, split)
        # Split: fp32 partial sums, one slice per part, added in the order of the parts (deterministic).
        out = torch.empty((parts, *out_shape), dtype=torch.float32 if parts > 1 else dtype, device=img.device)
        _launch(kernel, (blocks, triton.cdiv(d, bd), parts), grad, argmax, units, out, ni, nt, m, q, d,
                *grad.stride(), *argmax.stride(), *units.stride(), *out.stride()[1:], split, out.stride(0), **meta)
        total = out[0]
        for part in out[1:]:
            total = total + part
        return total.to(dtype)

    grad_img = run(_meta_sim_bwd_img_kernel, triton.cdiv(ni, bi), nt, bt, txt, (ni, m, d), img.dtype)
    grad_txt = run(_meta_sim_bwd_txt_kernel, triton.cdiv(nt, bt), ni, bi, img, (nt, q, d), txt.dtype)
    return grad_img, grad_txt
