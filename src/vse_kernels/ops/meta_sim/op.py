"""`vse_kernels.meta_sim`: the registered op, its fake and autograd, the public function and a chunked
evaluation helper.

Schemas (opaque custom ops, so opcheck and torch.compile(fullgraph=True) work on CPU and CUDA alike):
  vse_kernels::meta_sim_fwd(img_units, txt_units, with_argmax) -> (scores, argmax)
  vse_kernels::meta_sim_bwd(grad, img_units, txt_units, argmax) -> (grad_img_units, grad_txt_units)
Units are (N, units, d). argmax is (Ni, Nt, Q) int32 (the winning image unit of each (a, b, j)) when
with_argmax, else an empty (0,) tensor, so inference keeps memory at O(Ni*Nt). CUDA float16/bfloat16/
float32 run the Triton kernels; CPU tensors (and CUDA float64) the blocked PyTorch implementation.
L2 normalisation is done before the op (`_normalized`), so autograd differentiates it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._checks import check_same_device, check_same_dtype, check_tensor
from . import cpu
from .naive import resolve_block_dim, result_dtype, to_units

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _use_triton(t: torch.Tensor) -> bool:
    return t.device.type == "cuda" and t.dtype in _TRITON_DTYPES


@torch.library.custom_op("vse_kernels::meta_sim_fwd", mutates_args=())
def _meta_sim_fwd(img: torch.Tensor, txt: torch.Tensor, with_argmax: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(img):
        from . import triton_kernels  # imported lazily: CPU users need no triton

        return triton_kernels.meta_sim_forward(img, txt, with_argmax)
    return cpu.meta_sim_forward(img, txt, with_argmax)


@_meta_sim_fwd.register_fake
def _(img, txt, with_argmax):
    ni, nt, q = img.size(0), txt.size(0), txt.size(1)
    scores = img.new_empty((ni, nt), dtype=result_dtype(img.dtype))
    argmax = img.new_empty((ni, nt, q) if with_argmax else (0,), dtype=torch.int32)
    return scores, argmax


@torch.library.custom_op("vse_kernels::meta_sim_bwd", mutates_args=())
def _meta_sim_bwd(grad: torch.Tensor, img: torch.Tensor, txt: torch.Tensor,
                  argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(img):
        from . import triton_kernels

        return triton_kernels.meta_sim_backward(grad, img, txt, argmax)
    return cpu.meta_sim_backward(grad, img, txt, argmax)


@_meta_sim_bwd.register_fake
def _(grad, img, txt, argmax):
    return (img.new_empty(img.shape, dtype=img.dtype), txt.new_empty(txt.shape, dtype=txt.dtype))


def _setup_context(ctx, inputs, output):
    img, txt, with_argmax = inputs
    _, argmax = output
    ctx.with_argmax = with_argmax
    ctx.save_for_backward(img, txt, argmax)
    ctx.mark_non_differentiable(argmax)


def _backward(ctx, grad_scores, _grad_argmax):
    img, txt, argmax = ctx.saved_tensors
    if not ctx.with_argmax:  # called without it although inputs need grad: recompute rather than fail
        _, argmax = torch.ops.vse_kernels.meta_sim_fwd(img, txt, True)
    grad_img, grad_txt = torch.ops.vse_kernels.meta_sim_bwd(grad_scores, img, txt, argmax)
    return grad_img, grad_txt, None


torch.library.register_autograd("vse_kernels::meta_sim_fwd", _backward, setup_context=_setup_context)


def _normalized(units: torch.Tensor) -> torch.Tensor:
    """Units L2-normalised along d, like F.normalize(eps=1e-12). Half precision is normalised in float32 and
    rounded back: a float16 norm overflows past 65504 (every unit would become 0) and eps underflows to 0
    (a zero unit would become NaN); the unit vectors themselves are exact enough in the input dtype, which
    the kernels keep reading."""
    if units.dtype in (torch.float16, torch.bfloat16):
        return F.normalize(units.float(), dim=-1, eps=1e-12).to(units.dtype)
    return F.normalize(units, dim=-1, eps=1e-12)


def _check_block_dim(block_dim) -> None:
    if block_dim is None:
        return
    if not isinstance(block_dim, int) or isinstance(block_dim, bool):
        raise TypeError(f"block_dim must be an int or None, got {type(block_dim).__name__}")
    if block_dim <= 0:
        raise ValueError(f"block_dim must be positive, got {block_dim}")


def _units(name: str, x: torch.Tensor, block_dim: int) -> torch.Tensor:
    if x.dim() == 2:
        if x.size(1) == 0 or x.size(1) % block_dim != 0:
            raise ValueError(f"{name} of shape {tuple(x.shape)} has width {x.size(1)}, which is not a positive "
                             f"multiple of block_dim={block_dim}")
    elif x.size(1) == 0 or x.size(2) == 0:
        raise ValueError(f"{name} must have at least one unit of size >= 1, got shape {tuple(x.shape)}")
    return to_units(x, block_dim)


def prepare_units(img: torch.Tensor, txt: torch.Tensor, block_dim: int | None = None):
    """Validates the arguments of meta_sim and returns the unit views (Ni, M, d), (Nt, Q, d).

    block_dim splits 2-D inputs; it defaults to the unit size of a 3-D input when there is one, else 256.
    For a 3-D input, a given block_dim must equal its unit size."""
    check_tensor("img", img, ndim=(2, 3))
    check_tensor("txt", txt, ndim=(2, 3))
    check_same_device(img=img, txt=txt)
    check_same_dtype(img=img, txt=txt)
    _check_block_dim(block_dim)
    for name, x in (("img", img), ("txt", txt)):
        if x.dim() == 3 and block_dim is not None and x.size(2) != block_dim:
            raise ValueError(f"{name} is 3-D with unit size d={x.size(2)}, but block_dim={block_dim} was given; "
                             f"pass block_dim=None or {x.size(2)}")
    block_dim = resolve_block_dim(img, txt, block_dim)
    img_units, txt_units = _units("img", img, block_dim), _units("txt", txt, block_dim)
    if img_units.size(2) != txt_units.size(2):
        raise ValueError(f"img and txt units must have the same size d, got img units of {img_units.size(2)} "
                         f"(shape {tuple(img.shape)}) and txt units of {txt_units.size(2)} (shape {tuple(txt.shape)})")
    return img_units, txt_units


def meta_sim(img: torch.Tensor, txt: torch.Tensor, block_dim: int | None = None,
             normalize: bool = True) -> torch.Tensor:
    """AVSE meta-semantic similarity of every image-text pair (SPEC §1.1): (Ni, Nt).

    S[a, b] = sum_j max_i <img_unit[a, i], txt_unit[b, j]>: max over the image's M units, sum over the
    text's Q units. img: (Ni, Di) split into units of block_dim (default 256), or (Ni, M, d) units; txt
    likewise. normalize=True L2-normalises every unit first (cosine; half-precision units in float32, so
    norms beyond float16's range are fine). The result is float32 (float64 for float64 inputs); under
    CUDA autocast the dot products use the autocast dtype. The gradient of the max goes to one arg-max
    unit, the lowest index on ties. The (Ni, Nt, M, Q) unit tensor is never built: extra memory is
    O(Ni*Nt), plus O(Ni*Nt*Q) for the saved arg-max when a gradient is needed.
    CUDA float16/bfloat16/float32 run fused Triton kernels; CPU tensors a blocked PyTorch implementation.
    """
    img_units, txt_units = prepare_units(img, txt, block_dim)
    if normalize:
        img_units, txt_units = _normalized(img_units), _normalized(txt_units)
    if img_units.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
        # Under CUDA AMP the unit dot products run in the autocast dtype, as einsum's would (output stays fp32).
        dtype = torch.get_autocast_dtype("cuda")
        img_units, txt_units = img_units.to(dtype), txt_units.to(dtype)
    with_argmax = torch.is_grad_enabled() and (img_units.requires_grad or txt_units.requires_grad)
    scores, _ = torch.ops.vse_kernels.meta_sim_fwd(img_units, txt_units, with_argmax)
    return scores


@torch.no_grad()
def meta_sim_chunked(img: torch.Tensor, txt: torch.Tensor, block_dim: int | None = None, normalize: bool = True,
                     *, chunk_size: tuple[int, int] = (1024, 8192), device: torch.device | str | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """meta_sim for large evaluations (e.g. 5000 x 25000), without gradient, one (images x texts) chunk at
    a time: each chunk is moved to `device` (default: the inputs' device), computed there and written into
    `out` (default: a new tensor on the inputs' device). So embeddings kept on the CPU can be scored on a
    GPU while only a chunk of them, normalised, is on it at any time."""
    img_units, txt_units = prepare_units(img, txt, block_dim)
    if (not isinstance(chunk_size, (tuple, list)) or len(chunk_size) != 2
            or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in chunk_size)):
        raise ValueError(f"chunk_size must be a pair of positive ints (images, texts), got {chunk_size!r}")
    device = img.device if device is None else torch.device(device)
    shape, dtype = (img_units.size(0), txt_units.size(0)), result_dtype(img.dtype)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=img.device)
    elif not isinstance(out, torch.Tensor) or tuple(out.shape) != shape or out.dtype != dtype:
        got = f"shape {tuple(out.shape)} and dtype {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out must be a tensor of shape {shape} and dtype {dtype}, got {got}")
    rows, cols = chunk_size

    def prepared(units):
        units = units.to(device, non_blocking=True)
        return _normalized(units) if normalize else units

    for t0 in range(0, shape[1], cols):
        txt_chunk = prepared(txt_units[t0:t0 + cols])
        for i0 in range(0, shape[0], rows):
            scores, _ = torch.ops.vse_kernels.meta_sim_fwd(prepared(img_units[i0:i0 + rows]), txt_chunk, False)
            out[i0:i0 + rows, t0:t0 + cols].copy_(scores)
    return out
