"""Plain-PyTorch reference of the AVSE meta-semantic similarity (SPEC §1.1), AVSE's einsum formulation.

It builds the full (Ni, Nt, M, Q) unit-similarity tensor, so it is only for testing and small sizes;
differentiated by autograd. torch.max (not amax, which splits the gradient between ties) sends the
gradient to one arg-max unit, the lowest index on ties.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_BLOCK_DIM = 256  # AVSE's released default unit size


def to_units(x: torch.Tensor, block_dim: int | None) -> torch.Tensor:
    """(N, D) -> (N, D // block_dim, block_dim) view; 3-D inputs are already units. No validation here."""
    if x.dim() == 3:
        return x
    block_dim = DEFAULT_BLOCK_DIM if block_dim is None else block_dim
    return x.reshape(x.size(0), x.size(1) // block_dim, block_dim)


def resolve_block_dim(img: torch.Tensor, txt: torch.Tensor, block_dim: int | None) -> int:
    """block_dim if given, else the unit size of a 3-D input if there is one, else 256."""
    if block_dim is not None:
        return block_dim
    three_d = [x.size(2) for x in (img, txt) if x.dim() == 3]
    return three_d[0] if three_d else DEFAULT_BLOCK_DIM


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float16/bfloat16/float32 give float32 (SPEC §1.1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def meta_sim_reference(img: torch.Tensor, txt: torch.Tensor, block_dim: int | None = None,
                       normalize: bool = True) -> torch.Tensor:
    """S[a, b] = sum_j max_i <img_unit[a, i], txt_unit[b, j]>, computed in the inputs' dtype."""
    block_dim = resolve_block_dim(img, txt, block_dim)
    img_units, txt_units = to_units(img, block_dim), to_units(txt, block_dim)
    if normalize:
        img_units = F.normalize(img_units, dim=-1, eps=1e-12)
        txt_units = F.normalize(txt_units, dim=-1, eps=1e-12)
    unit_sims = torch.einsum("aid,bjd->abij", img_units, txt_units)  # (Ni, Nt, M, Q): what the kernels avoid
    return unit_sims.max(dim=2).values.sum(dim=2).to(result_dtype(img.dtype))
