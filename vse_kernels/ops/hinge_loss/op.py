"""`vse_kernels.hinge_triplet_loss`: the C++/CUDA op (csrc/hinge_loss/) with its fake and autograd.

Schemas (defined in C++):
  vse_kernels::hinge_triplet_loss_fwd(scores, margin, max_violation, img_ids) -> (loss, row_stat, col_stat)
  vse_kernels::hinge_triplet_loss_bwd(grad, scores, margin, max_violation, img_ids, row_stat, col_stat)
row_stat/col_stat are (B,) int64: the arg-max negative per row/column in max mode (-1: none), the number
of active hinge terms in sum mode. Devices without a compiled kernel use the reference (naive.py).
"""

from __future__ import annotations

import torch

from ..._checks import check_choice, check_same_device, check_tensor
from ..._extension import has_kernel
from .naive import hinge_triplet_loss_reference

_FORWARD = "hinge_triplet_loss_fwd"


def _validate(scores, margin, img_ids, reduction):
    check_tensor("scores", scores, ndim=2)
    if scores.size(0) != scores.size(1):
        raise ValueError(f"scores must be square (B, B), got shape {tuple(scores.shape)}")
    if not isinstance(margin, (int, float)) or isinstance(margin, bool):
        raise TypeError(f"margin must be a number, got {type(margin).__name__}")
    check_choice("reduction", reduction, ("sum", "mean"))
    if img_ids is None:
        return None
    check_tensor("img_ids", img_ids, ndim=1, floating=False)
    if img_ids.dtype.is_floating_point or img_ids.dtype.is_complex or img_ids.dtype == torch.bool:
        raise TypeError(f"img_ids must be an integer tensor, got {img_ids.dtype}")
    if img_ids.size(0) != scores.size(0):
        raise ValueError(f"img_ids must have shape ({scores.size(0)},) to match scores, got {tuple(img_ids.shape)}")
    check_same_device(scores=scores, img_ids=img_ids)
    return img_ids.long()


def hinge_triplet_loss(scores: torch.Tensor, *, margin: float = 0.2, max_violation: bool = True,
                       img_ids: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """VSE++ hinge triplet loss on a (B, B) score matrix with positives on the diagonal (SPEC §1.2).

    max_violation=True: each image and each caption is ranked against its hardest negative (VSE++);
    False: against all negatives (VSE0). Pairs (i, j) with img_ids[i] == img_ids[j] are not negatives.
    reduction: "sum" (the VSE++/AVSE/CVSE convention) or "mean" (divided by B). The gradient at an
    exact hinge boundary (violation == 0) is zero; ties between hardest negatives go to the lowest index.
    """
    img_ids = _validate(scores, margin, img_ids, reduction)
    if not has_kernel(_FORWARD, scores.device.type):
        return hinge_triplet_loss_reference(scores, float(margin), bool(max_violation), img_ids, reduction)
    loss, _, _ = torch.ops.vse_kernels.hinge_triplet_loss_fwd(scores, float(margin), bool(max_violation), img_ids)
    return loss / scores.size(0) if reduction == "mean" else loss


def _register() -> None:
    @torch.library.register_fake("vse_kernels::hinge_triplet_loss_fwd")
    def _(scores, margin, max_violation, img_ids):
        batch = scores.size(0)
        stat = scores.new_empty((batch,), dtype=torch.long)
        return scores.new_empty(()), stat, torch.empty_like(stat)

    @torch.library.register_fake("vse_kernels::hinge_triplet_loss_bwd")
    def _(grad, scores, margin, max_violation, img_ids, row_stat, col_stat):
        return torch.empty_like(scores, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        scores, margin, max_violation, img_ids = inputs
        _, row_stat, col_stat = output
        ctx.save_for_backward(scores, img_ids, row_stat, col_stat)
        ctx.margin, ctx.max_violation = margin, max_violation
        ctx.mark_non_differentiable(row_stat, col_stat)

    def backward(ctx, grad_loss, _grad_row, _grad_col):
        scores, img_ids, row_stat, col_stat = ctx.saved_tensors
        grad_scores = torch.ops.vse_kernels.hinge_triplet_loss_bwd(
            grad_loss, scores, ctx.margin, ctx.max_violation, img_ids, row_stat, col_stat)
        return grad_scores, None, None, None

    torch.library.register_autograd("vse_kernels::hinge_triplet_loss_fwd", backward, setup_context=setup_context)


if has_kernel(_FORWARD, "cpu"):
    _register()
