"""Argument checks shared by the ops: every message names the argument, what was expected and what came."""

from __future__ import annotations

from typing import Iterable

import torch

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value, *, ndim: int | Iterable[int] | None = None, floating: bool = True) -> None:
    """`value` is a tensor of an accepted rank and, with `floating`, of a supported floating dtype."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.dim() not in ranks:
            expected = " or ".join(f"{r}-D" for r in ranks)
            raise ValueError(f"{name} must be {expected}, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOATING:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {value.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """All given tensors (None entries skipped) are on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"expected all tensors on one device, got {where}")


def check_same_dtype(**tensors: torch.Tensor) -> None:
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) > 1:
        what = ", ".join(f"{name} {t.dtype}" for name, t in tensors.items())
        raise TypeError(f"expected one dtype, got {what}")


def check_choice(name: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
