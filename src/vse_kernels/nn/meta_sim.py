"""`vse_kernels.nn.MetaSim`: the AVSE meta-semantic similarity as a module."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.meta_sim import meta_sim, meta_sim_chunked


class MetaSim(nn.Module):
    """S[a, b] = sum_j max_i cos(img_unit[a, i], txt_unit[b, j]) for all image-text pairs (SPEC §1.1).

    forward(img, txt) -> (Ni, Nt): differentiable; img (Ni, Di) / txt (Nt, Dt) are split into units of
    block_dim, 3-D (N, units, d) inputs are used as units (block_dim must then equal d, or be None).
    evaluate(img, txt) -> (Ni, Nt) without gradient, chunk by chunk (e.g. COCO 5K: 5000 x 25000), on
    `device` (default: the inputs' device), with the result on the inputs' device.
    """

    def __init__(self, block_dim: int | None = 256, normalize: bool = True):
        super().__init__()
        self.block_dim = block_dim
        self.normalize = normalize

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return meta_sim(img, txt, self.block_dim, self.normalize)

    def evaluate(self, img: torch.Tensor, txt: torch.Tensor, *, chunk_size: tuple[int, int] = (1024, 8192),
                 device: torch.device | str | None = None) -> torch.Tensor:
        return meta_sim_chunked(img, txt, self.block_dim, self.normalize, chunk_size=chunk_size, device=device)

    def extra_repr(self) -> str:
        return f"block_dim={self.block_dim}, normalize={self.normalize}"
