"""Ranking loss: the kernels backend (`vse_kernels.hinge_triplet_loss`, C++/CUDA) and a pure-PyTorch
reference (imports nothing from vse_kernels) with the same semantics (SPEC §1.2)."""

from __future__ import annotations

import torch


def hinge_triplet_loss_reference(scores: torch.Tensor, margin: float = 0.2, max_violation: bool = True,
                                 img_ids: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """VSE++ hinge loss on (B, B) scores, positives on the diagonal; same-image pairs are not negatives."""
    b = scores.size(0)
    diag = scores.diagonal()
    negative = ~torch.eye(b, dtype=torch.bool, device=scores.device)
    if img_ids is not None:
        negative &= img_ids[:, None] != img_ids[None, :]
    # relu, not clamp: zero gradient at an exact hinge boundary, like the kernel (SPEC §1.2).
    cost_s = torch.relu(margin + scores - diag[:, None]).masked_fill(~negative, 0)
    cost_im = torch.relu(margin + scores - diag[None, :]).masked_fill(~negative, 0)
    if max_violation:
        loss = cost_s.max(1)[0].sum() + cost_im.max(0)[0].sum()
    else:
        loss = cost_s.sum() + cost_im.sum()
    return loss / b if reduction == "mean" else loss


def hinge_triplet_loss(scores, *, margin=0.2, max_violation=True, img_ids=None, reduction="sum",
                       backend: str = "kernels") -> torch.Tensor:
    if backend == "kernels":
        import vse_kernels

        return vse_kernels.hinge_triplet_loss(scores, margin=margin, max_violation=max_violation,
                                              img_ids=img_ids, reduction=reduction)
    if backend == "reference":
        return hinge_triplet_loss_reference(scores, margin, max_violation, img_ids, reduction)
    raise ValueError(f"backend must be 'kernels' or 'reference', got {backend!r}")


def hinge_triplet_loss_embeddings(img: torch.Tensor, txt: torch.Tensor, *, backend: str = "kernels",
                                  **options) -> torch.Tensor:
    """The hinge loss of `img @ txt.T`; the kernels backend never holds the (B, B) matrix."""
    if backend == "kernels":
        import vse_kernels

        return vse_kernels.hinge_triplet_loss_embeddings(img, txt, **options)
    return hinge_triplet_loss(img @ txt.t(), backend=backend, **options)
