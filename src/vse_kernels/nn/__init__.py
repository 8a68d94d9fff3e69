"""Modules built on the fused ops."""

from .attention import MultiheadSelfAttention
from .meta_sim import MetaSim

__all__: list[str] = ["MetaSim", "MultiheadSelfAttention"]
