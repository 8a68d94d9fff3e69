"""Retrieval evaluation (SPEC §6).

`sims` is (N_img, k·N_img) with caption c belonging to image c // k (k = captions_per_image, 5).
- i2t rank of image i: the number of *other images'* captions scoring at least as high as its best
  caption; t2i rank of caption c: the number of other images scoring at least as high as image c // k.
  Tie rule: a tie never counts for the positive (a collapsed model, all scores equal, scores ~0, not 600).
  On tie-free scores this is SCAN's / VSE∞'s argsort formulation.
- Non-finite scores or embeddings are an error naming how many and where, never a number.
- R@K = 100 · mean(rank < K); medr = floor(median(rank)) + 1; meanr = mean(rank) + 1 (1-based ranks).
- rsum = i2t R@1+R@5+R@10 + t2i R@1+R@5+R@10.
- COCO 1K: 5 folds of N/5 images, every metric averaged over folds (rsum = mean of the per-fold
  rsums); COCO 5K: all images at once.
Model evaluation streams the similarity in blocks of images on the model's device, two passes
(positives first, then counts), so a 5000 x 25000 matrix is never built.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .data.precomp import Split, sequential_batches
from .errors import NonFiniteError
from .models import cat_embeddings, float_embeddings, slice_embeddings

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
               "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr", "rsum")


def _as_tensor(sims) -> torch.Tensor:
    if isinstance(sims, np.ndarray):
        sims = torch.from_numpy(sims)
    if not isinstance(sims, torch.Tensor):
        raise TypeError(f"sims must be a numpy array or a torch tensor, got {type(sims).__name__}")
    if sims.dim() != 2:
        raise ValueError(f"sims must be 2-D (N_img, k*N_img), got shape {tuple(sims.shape)}")
    if not sims.dtype.is_floating_point:
        sims = sims.double()
    return sims


def _where(flat_positions: torch.Tensor, n_cols: int | None, limit: int = 5) -> str:
    pos = flat_positions[:limit].tolist()
    shown = ", ".join(f"({p // n_cols}, {p % n_cols})" if n_cols else str(p) for p in pos)
    return shown + (", ..." if flat_positions.numel() > limit else "")


class _FiniteScores:
    """Counts non-finite scores over the blocks of a (N_img, N_txt) matrix; `raise_if_any` reports them."""

    def __init__(self, n_txt: int):
        self.n_txt, self.count, self.first = n_txt, 0, []

    def check(self, sims: torch.Tensor, row0: int, col0: int = 0) -> None:
        """`sims` is the block at rows row0.. and columns col0.. of the matrix."""
        bad = ~torch.isfinite(sims)
        if bad.any():
            pos = bad.nonzero()[:5]
            self.count += int(bad.sum())
            self.first.append(((pos[:, 0] + row0) * self.n_txt + pos[:, 1] + col0).cpu())

    def raise_if_any(self) -> None:
        if self.count:
            first = torch.cat(self.first)
            raise NonFiniteError(f"{self.count} similarity score(s) are NaN or infinite, at (image, caption) "
                                 f"{_where(first, self.n_txt)}; refusing to rank them")


def check_finite_embeddings(emb, what: str) -> None:
    """Raises NonFiniteError naming the items (rows) of `emb` (a tensor or tuple of tensors) that hold a
    NaN or infinite value."""
    parts = (emb,) if isinstance(emb, torch.Tensor) else tuple(emb)
    bad = torch.zeros(parts[0].size(0), dtype=torch.bool, device=parts[0].device)
    for part in parts:
        bad |= ~torch.isfinite(part.reshape(part.size(0), -1)).all(1)
    if bad.any():
        rows = bad.nonzero().flatten().cpu()
        raise NonFiniteError(f"{rows.numel()} of {bad.numel()} {what} embeddings hold NaN or infinite values "
                             f"({what} {_where(rows, None)}); the model (or its input features) is not finite")


def _check_shape(n_img: int, n_txt: int, k: int) -> None:
    if k < 1 or n_img < 1 or n_txt != k * n_img:
        raise ValueError(f"sims must have shape (N, {k}*N) for captions_per_image={k}, got ({n_img}, {n_txt})")


def metrics_from_ranks(i2t_ranks, t2i_ranks) -> dict:
    """Metric dict from 0-based ranks (numpy or torch)."""
    out = {}
    for side, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
        for k in (1, 5, 10):
            out[f"{side}_r{k}"] = float(100.0 * np.mean(r < k))
        out[f"{side}_medr"] = float(math.floor(np.median(r)) + 1)
        out[f"{side}_meanr"] = float(r.mean() + 1)
    out["rsum"] = sum(out[f"{s}_r{k}"] for s in ("i2t", "t2i") for k in (1, 5, 10))
    return _rounded(out)


def _rounded(metrics: dict) -> dict:
    # 4 decimals hold every value a recall over <= 25,000 items (or a 5-fold mean) can take; more digits are
    # float noise (95.19999999999999).
    return {k: round(v, 4) for k, v in metrics.items()}


def _i2t_block(sims: torch.Tensor, row0: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [row0, row0 + b) of the matrix: (i2t ranks (b,), their positives (b, k))."""
    b = sims.size(0)
    rows = torch.arange(b, device=sims.device)
    own = sims.view(b, -1, k)[rows, rows + row0]                                # (b, k)
    best = own.max(1, keepdim=True)[0]
    # Everything scoring >= the best positive, minus the image's own captions among them.
    return (sims >= best).sum(1) - (own >= best).sum(1), own.reshape(-1)


def _t2i_block(sims: torch.Tensor, row0: int, positives: torch.Tensor, k: int) -> torch.Tensor:
    """Contribution of rows [row0, row0 + b) to the t2i ranks: other images scoring >= each caption's own."""
    at_least = sims >= positives[None, :]
    cols = torch.arange(row0 * k, min(sims.size(1), (row0 + sims.size(0)) * k), device=sims.device)
    at_least[cols // k - row0, cols] = False  # the caption's own image is not a negative
    return at_least.sum(0)


def ranks(sims, captions_per_image: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t ranks (N,), t2i ranks (kN,)), 0-based: the number of negatives scoring >= the (best) positive."""
    sims = _as_tensor(sims)
    n, k = sims.size(0), captions_per_image
    _check_shape(n, sims.size(1), k)
    finite = _FiniteScores(sims.size(1))
    finite.check(sims, 0)
    finite.raise_if_any()
    i2t, positives = _i2t_block(sims, 0, k)
    return i2t, _t2i_block(sims, 0, positives, k)


def retrieval_metrics(sims, captions_per_image: int = 5) -> dict:
    """The metric dict (METRIC_KEYS) of a (N, k·N) similarity matrix, numpy or torch."""
    return metrics_from_ranks(*ranks(sims, captions_per_image))


def fold_metrics(sims, captions_per_image: int = 5, folds: int = 5) -> dict:
    """COCO 1K protocol: `folds` equal folds of images (with their captions), metrics averaged."""
    sims = _as_tensor(sims)
    n, k = sims.size(0), captions_per_image
    _check_shape(n, sims.size(1), k)
    if n % folds:
        raise ValueError(f"{n} images cannot be split into {folds} equal folds")
    m = n // folds
    per_fold = [retrieval_metrics(sims[f * m:(f + 1) * m, f * m * k:(f + 1) * m * k], k) for f in range(folds)]
    return _rounded({key: float(np.mean([p[key] for p in per_fold])) for key in METRIC_KEYS})


@torch.no_grad()
def iter_embeddings(model, split: Split, side: str, batch_size: int = 256, device=None, autocast_dtype=None,
                    progress=None):
    """(start, float32 embeddings of items [start, start + b)) per batch of the split's images (side="image")
    or captions (side="text"), in eval mode (restored afterwards), on `device`: a gallery is encoded
    without holding it all."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if side == "image":   # raw-image splits load theirs in DataLoader workers (image_batches)
        batches = (split.image_batches(batch_size) if hasattr(split, "image_batches")
                   else (split.image_batch(idx) for idx in sequential_batches(split.n_images, batch_size)))
        encode = model.encode_images
    else:
        batches = (split.caption_batch(idx) for idx in sequential_batches(split.n_captions, batch_size))
        encode = model.encode_texts
    was_training = model.training
    model.eval()  # older code evaluated in train mode (dropout, BatchNorm statistics)
    try:
        start = 0
        for batch in (progress(batches) if progress else batches):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                emb = encode(batch.to(device))
            # Scores are computed in float32 outside autocast, whatever precision the encoders ran in.
            yield start, float_embeddings(emb)
            start += len(batch)
    finally:
        model.train(was_training)


def encode_split(model, split: Split, batch_size: int = 256, device=None, autocast_dtype=None):
    """(image embeddings of all N images, text embeddings of all k·N captions), on `device`."""
    return tuple(cat_embeddings([emb for _, emb in iter_embeddings(model, split, side, batch_size, device, autocast_dtype)])
                 for side in ("image", "text"))


def _num_items(emb) -> int:
    return emb.size(0) if isinstance(emb, torch.Tensor) else emb[0].size(0)


@torch.no_grad()
def streamed_ranks(model, img_emb, txt_emb, captions_per_image: int = 5, block: int = 256):
    """ranks() of model.similarity(img_emb, txt_emb), computed in blocks of `block` images (two passes),
    so only (block, k·N) scores exist at a time."""
    n, k = _num_items(img_emb), captions_per_image
    n_txt = _num_items(txt_emb)
    _check_shape(n, n_txt, k)
    check_finite_embeddings(img_emb, "image")
    check_finite_embeddings(txt_emb, "caption")
    finite = _FiniteScores(n_txt)
    i2t, pos = [], []
    for s in range(0, n, block):
        sims = model.similarity(slice_embeddings(img_emb, s, min(n, s + block)), txt_emb).float()
        finite.check(sims, s)
        block_ranks, own = _i2t_block(sims, s, k)
        i2t.append(block_ranks.cpu())
        pos.append(own)
    finite.raise_if_any()
    pos = torch.cat(pos)
    t2i = torch.zeros(n_txt, dtype=torch.long, device=pos.device)
    for s in range(0, n, block):
        sims = model.similarity(slice_embeddings(img_emb, s, min(n, s + block)), txt_emb).float()
        t2i += _t2i_block(sims, s, pos, k)
    return torch.cat(i2t), t2i.cpu()


def evaluate_split(model, split: Split, *, fold5: bool = False, batch_size: int = 256, block: int = 256,
                   device=None, autocast_dtype=None, metrics: str = "recall") -> dict:
    """Metrics of `model` on `split`. fold5=False: {metric: value} over all images. fold5=True:
    {"fold5": 1K-protocol averages over 5 folds, "all": the metrics over all images (COCO 5K)}.
    metrics="eccv" adds "eccv": the multi-positive metrics of `eccv_metrics.split_eccv_metrics` (all images)."""
    if metrics not in ("recall", "eccv"):
        raise ValueError(f"metrics must be 'recall' or 'eccv', got {metrics!r}")
    k = split.captions_per_image
    img, txt = encode_split(model, split, batch_size, device, autocast_dtype)
    txt_all = model.complete_text_set(txt)
    full = metrics_from_ranks(*streamed_ranks(model, img, txt_all, k, block))
    extra = {}
    if metrics == "eccv":
        from .eccv_metrics import split_eccv_metrics

        extra = {"eccv": split_eccv_metrics(model, split, img, txt_all, block)}
    if not fold5:
        return {**full, **extra}
    n = split.n_images
    if n % 5:
        raise ValueError(f"--fold5 needs a number of images divisible by 5, split {split.split!r} has {n}")
    m = n // 5
    per_fold = [metrics_from_ranks(*streamed_ranks(
                    model, slice_embeddings(img, f * m, (f + 1) * m),
                    model.complete_text_set(slice_embeddings(txt, f * m * k, (f + 1) * m * k)), k, block))
                for f in range(5)]
    return {"fold5": _rounded({key: float(np.mean([p[key] for p in per_fold])) for key in METRIC_KEYS}), "all": full,
            **extra}


def format_table(rows: dict[str, dict]) -> str:
    """A markdown table: one row per (name -> metric dict)."""
    head = "| | i2t R@1 | R@5 | R@10 | medr | t2i R@1 | R@5 | R@10 | medr | rsum |"
    lines = [head, "|---" * 10 + "|"]
    for name, m in rows.items():
        vals = [m["i2t_r1"], m["i2t_r5"], m["i2t_r10"], m["i2t_medr"],
                m["t2i_r1"], m["t2i_r5"], m["t2i_r10"], m["t2i_medr"], m["rsum"]]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines)
