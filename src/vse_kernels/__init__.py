"""vse-kernels: fused kernels for visual-semantic embedding (image-text retrieval) models.

Public ops (SPEC §1): hinge_triplet_loss (C++/CUDA), meta_sim and multi_head_attention (Triton), and the
modules in vse_kernels.nn. `python -m vse_kernels.info` reports what was built and how kernels run.
"""

from . import _extension  # first: loads the compiled ops (or explains why not)
from .ops.hinge_loss import hinge_triplet_loss, hinge_triplet_loss_embeddings
from .ops.meta_sim import meta_sim
from .ops.attention import multi_head_attention
from . import nn  # vk.nn.MultiheadSelfAttention (SPEC §1)

__version__ = "0.1.0"

__all__ = ["hinge_triplet_loss", "hinge_triplet_loss_embeddings", "meta_sim", "multi_head_attention"]
