"""Plain-PyTorch reference of the VSE++ hinge triplet loss (SPEC §1.2); differentiated by autograd."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_mask(batch: int, img_ids: torch.Tensor | None, device) -> torch.Tensor:
    """(B, B) bool: True where (i, j) is a negative pair (off the diagonal and, with img_ids, another image)."""
    negative = ~torch.eye(batch, dtype=torch.bool, device=device)
    if img_ids is not None:
        negative &= img_ids[:, None] != img_ids[None, :]
    return negative


def reduce_loss(loss: torch.Tensor, batch: int, reduction: str) -> torch.Tensor:
    """The summed loss under `reduction`; an empty batch has no terms, so 0 under both (never 0 / 0)."""
    return loss / max(batch, 1) if reduction == "mean" else loss


def hinge_triplet_loss_reference(scores: torch.Tensor, margin: float = 0.2, max_violation: bool = True,
                                 img_ids: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    diagonal = scores.diagonal()
    negative = negative_mask(scores.size(0), img_ids, scores.device)
    # relu, not clamp: its gradient at an exact hinge boundary (violation == 0) is zero.
    cost_s = F.relu(margin + scores - diagonal[:, None]).masked_fill(~negative, 0)   # captions for image i
    cost_im = F.relu(margin + scores - diagonal[None, :]).masked_fill(~negative, 0)  # images for caption j
    if max_violation and scores.size(0) > 0:  # torch.max rejects the rows of an empty batch
        loss = cost_s.max(dim=1).values.sum() + cost_im.max(dim=0).values.sum()
    else:
        loss = cost_s.sum() + cost_im.sum()
    return reduce_loss(loss, scores.size(0), reduction)


def hinge_triplet_loss_embeddings_reference(img: torch.Tensor, txt: torch.Tensor, margin: float = 0.2,
                                            max_violation: bool = True, img_ids: torch.Tensor | None = None,
                                            reduction: str = "sum") -> torch.Tensor:
    """The loss of the materialised (B, B) score matrix `img @ txt.T`."""
    return hinge_triplet_loss_reference(img @ txt.T, margin, max_violation, img_ids, reduction)
