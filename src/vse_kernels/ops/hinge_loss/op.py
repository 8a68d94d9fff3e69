"""`hinge_triplet_loss` and `hinge_triplet_loss_embeddings`: the C++/CUDA ops of csrc/hinge_loss/.

Schemas (defined in C++, see csrc/hinge_loss/hinge_loss.h for the statistics):
  hinge_triplet_loss_fwd(scores, margin, max_violation, img_ids) -> (loss, row_stat, col_stat)
  hinge_triplet_loss_bwd(grad, scores, margin, max_violation, img_ids, row_stat, col_stat) -> grad_scores
  hinge_triplet_loss_emb_fwd(img, txt, margin, max_violation, img_ids) -> (loss, row_stat, col_stat)
  hinge_triplet_loss_emb_bwd(grad, img, txt, margin, max_violation, img_ids, row_stat, col_stat)
      -> (grad_img, grad_txt)
Devices without a compiled kernel use the plain-PyTorch references (naive.py).
"""

from __future__ import annotations

import math

import torch

from ..._checks import check_choice, check_same_device, check_same_dtype, check_tensor
from ..._extension import has_kernel
from .naive import hinge_triplet_loss_embeddings_reference, hinge_triplet_loss_reference, reduce_loss


def _check_options(margin, max_violation, reduction):
    if not isinstance(max_violation, bool):  # bool("False") is True: a string would silently pick a mode
        raise TypeError(f"max_violation must be True or False, got {max_violation!r}")
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise TypeError(f"margin must be a number, got {type(margin).__name__}")
    if not math.isfinite(margin):  # every cost would be +-inf or NaN
        raise ValueError(f"margin must be finite, got {margin}")
    check_choice("reduction", reduction, ("sum", "mean"))


def _check_img_ids(img_ids, batch: int, like: torch.Tensor, like_name: str):
    if img_ids is None:
        return None
    check_tensor("img_ids", img_ids, ndim=1, floating=False)
    if img_ids.dtype.is_floating_point or img_ids.dtype.is_complex or img_ids.dtype == torch.bool:
        raise TypeError(f"img_ids must be an integer tensor, got {img_ids.dtype}")
    if img_ids.size(0) != batch:
        raise ValueError(f"img_ids must have shape ({batch},) to match {like_name}, got {tuple(img_ids.shape)}")
    check_same_device(**{like_name: like, "img_ids": img_ids})
    return img_ids.long()


def hinge_triplet_loss(scores: torch.Tensor, *, margin: float = 0.2, max_violation: bool = True,
                       img_ids: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """VSE++ hinge triplet loss on a (B, B) score matrix with positives on the diagonal (SPEC §1.2).

    max_violation=True: each image and each caption is ranked against its hardest negative (VSE++);
    False: against all negatives (VSE0). Pairs (i, j) with img_ids[i] == img_ids[j] are not negatives.
    reduction: "sum" (the VSE++/AVSE/CVSE convention) or "mean" (divided by B). The gradient at an
    exact hinge boundary (violation == 0) is zero; ties between hardest negatives go to the lowest index.
    Non-finite scores give the reference's loss and gradient: a NaN cost of a negative pair makes the loss
    NaN and is an active hinge (in max mode the hardest negative, the lowest NaN index, like torch.max);
    NaNs of masked pairs change nothing. margin must be finite. An empty batch (B = 0) gives 0.
    """
    check_tensor("scores", scores, ndim=2)
    if scores.size(0) != scores.size(1):
        raise ValueError(f"scores must be square (B, B), got shape {tuple(scores.shape)}")
    _check_options(margin, max_violation, reduction)
    img_ids = _check_img_ids(img_ids, scores.size(0), scores, "scores")
    if not has_kernel("hinge_triplet_loss_fwd", scores.device.type):
        return hinge_triplet_loss_reference(scores, float(margin), bool(max_violation), img_ids, reduction)
    loss, _, _ = torch.ops.vse_kernels.hinge_triplet_loss_fwd(scores, float(margin), bool(max_violation), img_ids)
    return reduce_loss(loss, scores.size(0), reduction)


def hinge_triplet_loss_embeddings(img: torch.Tensor, txt: torch.Tensor, *, margin: float = 0.2,
                                  max_violation: bool = True, img_ids: torch.Tensor | None = None,
                                  reduction: str = "sum") -> torch.Tensor:
    """`hinge_triplet_loss(img @ txt.T, ...)` without ever holding the (B, B) matrix.

    img, txt: (B, D) embeddings of B matching image-caption pairs (normalise them first for cosine
    similarity). The forward streams score tiles from a GEMM, keeping per-row and per-column hardest
    negatives; in max_violation mode the backward is O(B * D) gathers. Extra memory: one tile of at most
    2^26 scores plus O(B). Same options and conventions as `hinge_triplet_loss`.
    """
    check_tensor("img", img, ndim=2)
    check_tensor("txt", txt, ndim=2)
    if img.shape != txt.shape:
        raise ValueError(f"img and txt must have the same shape (B, D), got {tuple(img.shape)} and {tuple(txt.shape)}")
    check_same_dtype(img=img, txt=txt)
    check_same_device(img=img, txt=txt)
    _check_options(margin, max_violation, reduction)
    img_ids = _check_img_ids(img_ids, img.size(0), img, "img")
    if not has_kernel("hinge_triplet_loss_emb_fwd", img.device.type):
        return hinge_triplet_loss_embeddings_reference(img, txt, float(margin), bool(max_violation), img_ids, reduction)
    loss, _, _ = torch.ops.vse_kernels.hinge_triplet_loss_emb_fwd(img, txt, float(margin), bool(max_violation), img_ids)
    return reduce_loss(loss, img.size(0), reduction)


def _register(forward: str, backward: str, num_tensors: int) -> None:
    """Fake kernels and autograd for a forward op `(*tensors, margin, max_violation, img_ids)` returning
    (loss, row_stat, col_stat), and its backward op `(grad, *tensors, ..., row_stat, col_stat)`."""

    @torch.library.register_fake(f"vse_kernels::{forward}")
    def _(*args):
        first = args[0]
        stat = first.new_empty((first.size(0),), dtype=torch.long)
        return first.new_empty(()), stat, torch.empty_like(stat)

    @torch.library.register_fake(f"vse_kernels::{backward}")
    def _(grad, *args):
        grads = tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in args[:num_tensors])
        return grads if num_tensors > 1 else grads[0]

    def setup_context(ctx, inputs, output):
        *tensors, margin, max_violation, img_ids = inputs
        _, row_stat, col_stat = output
        ctx.save_for_backward(*tensors, img_ids, row_stat, col_stat)
        ctx.margin, ctx.max_violation = margin, max_violation
        ctx.mark_non_differentiable(row_stat, col_stat)

    def backward_fn(ctx, grad_loss, _grad_row, _grad_col):
        *tensors, img_ids, row_stat, col_stat = ctx.saved_tensors
        grads = getattr(torch.ops.vse_kernels, backward)(
            grad_loss, *tensors, ctx.margin, ctx.max_violation, img_ids, row_stat, col_stat)
        return (*(grads if num_tensors > 1 else (grads,)), None, None, None)

    torch.library.register_autograd(f"vse_kernels::{forward}", backward_fn, setup_context=setup_context)


if has_kernel("hinge_triplet_loss_fwd", "cpu"):
    _register("hinge_triplet_loss_fwd", "hinge_triplet_loss_bwd", num_tensors=1)
    _register("hinge_triplet_loss_emb_fwd", "hinge_triplet_loss_emb_bwd", num_tensors=2)
