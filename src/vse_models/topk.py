"""Streamed top-k search over a gallery, in either direction, without the query x gallery score matrix.

`search(queries, gallery, k, score=..., query_side="text")` scores the gallery one chunk at a time with
`score(img_emb, txt_emb) -> (Ni, Nt)` (a model's `similarity`, `vse_kernels.meta_sim`, ...) on `device`,
and keeps a running top-k per query: memory O(Nq·k + one chunk), whatever the gallery size. The gallery
may be any sequence of embeddings that slices along dim 0 (a tensor, a tuple of tensors, a memory-mapped
index's tensors): only the chunk being scored is copied to `device`.

Tie rule (deterministic, the same on every chunk size and device): results are ordered by score,
descending; equal scores by gallery index, ascending (lower index first). So the top-k is the first k of a
*stable* descending sort of the query's full score row (`torch.topk`'s order on ties is unspecified).
Non-finite scores are an error (`NonFiniteError`, naming the (image, text) pairs), like evaluation's;
k must be an integer in [1, gallery size].
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch

from .errors import NonFiniteError
from .evaluation import _FiniteScores, _num_items as num_items, check_finite_embeddings
from .models import is_int, slice_embeddings

SIDES = ("text", "image")
SCORE_BUDGET = 1 << 22   # scores per chunk (Nq x chunk): 16 MiB of float32, about 64 MiB with the tie work
GALLERY_BUDGET = 1 << 23  # gallery values per chunk: 32 MiB in float32


def _values_per_item(emb) -> int:
    parts = (emb,) if isinstance(emb, torch.Tensor) else tuple(emb)
    return sum(max(1, p[0].numel()) if p.size(0) else 1 for p in parts)


def to_device(emb, device, dtype=torch.float32):
    """A tensor or tuple of tensors copied to `device` as `dtype` (float parts only; integer parts keep theirs)."""
    def move(t):
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    return move(emb) if isinstance(emb, torch.Tensor) else type(emb)(move(t) for t in emb)


def check_k(k, n_gallery: int, what: str = "gallery") -> int:
    if not is_int(k) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if k > n_gallery:
        raise ValueError(f"k={k} is larger than the {what} ({n_gallery} items)")
    return k


def check_side(query_side: str) -> str:
    if query_side not in SIDES:
        raise ValueError(f"query_side must be one of {SIDES}, got {query_side!r}")
    return query_side


def chunk_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, column indices), each (Nq, min(k, C)), of a (Nq, C) score block under the tie rule:
    score descending, then column ascending. `torch.topk` gives the k-th largest *value* exactly; which of
    several columns tied at it are kept is settled here: the lowest ones."""
    kk = min(k, scores.size(1))
    kth = scores.topk(kk, dim=1, sorted=False).values.amin(1, keepdim=True)
    above = scores > kth
    tied = scores == kth
    need = kk - above.sum(1, keepdim=True)                 # slots left for columns tied at the k-th value
    keep = above | (tied & (tied.cumsum(1) <= need))        # exactly kk per row
    cols = keep.nonzero()[:, 1].view(-1, kk)                # row-major: ascending columns per row
    vals = scores.gather(1, cols)
    order = vals.argsort(dim=1, descending=True, stable=True)  # stable: ascending column among equal scores
    return vals.gather(1, order), cols.gather(1, order)


class RunningTopK:
    """Top-k of a score matrix fed one block of columns at a time, in increasing column order."""

    def __init__(self, n_queries: int, k: int, device=None):
        self.k = k
        self.values = torch.empty(n_queries, 0, device=device)
        self.indices = torch.empty(n_queries, 0, dtype=torch.long, device=device)

    def update(self, scores: torch.Tensor, col0: int) -> None:
        vals, cols = chunk_topk(scores, self.k)
        # Kept entries come first and all have lower columns than this block, and within each part equal
        # scores are in ascending column order: a stable sort of the concatenation keeps the tie rule.
        vals = torch.cat([self.values, vals.to(self.values.dtype)], 1)
        idx = torch.cat([self.indices, cols + col0], 1)
        order = vals.argsort(dim=1, descending=True, stable=True)[:, :self.k]
        self.values, self.indices = vals.gather(1, order), idx.gather(1, order)


def default_chunk(n_queries: int, gallery, k: int) -> int:
    """Gallery items per chunk: at most SCORE_BUDGET scores and GALLERY_BUDGET gallery values, at least k."""
    by_scores = SCORE_BUDGET // max(1, n_queries)
    by_values = GALLERY_BUDGET // _values_per_item(gallery)
    return max(k, 1, min(num_items(gallery), by_scores, by_values))


def score_chunks(queries, gallery, score: Callable, query_side: str, chunk: int, device,
                 progress: Callable[[Iterable], Iterable] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, scores (Nq, c)) per gallery chunk [start, start + c), scored on `device`; non-finite scores
    raise at once, naming the (image, text) pairs in gallery and query numbering."""
    n_q, n_g = num_items(queries), num_items(gallery)
    starts = range(0, n_g, chunk)
    for s in (progress(starts) if progress else starts):
        part = to_device(slice_embeddings(gallery, s, min(n_g, s + chunk)), device)
        with torch.no_grad():
            if query_side == "text":   # gallery = images: (c, Nq) with rows at s
                sims = score(part, queries).float()
                finite = _FiniteScores(n_q)
                finite.check(sims, s)
                sims = sims.t()
            else:                       # gallery = texts: (Nq, c) with columns at s
                sims = score(queries, part).float()
                finite = _FiniteScores(n_g)
                finite.check(sims, 0, s)
        finite.raise_if_any()
        yield s, sims


def search(queries, gallery, k: int, *, score: Callable, query_side: str = "text", chunk: int | None = None,
           device=None, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (Nq, k) float32, gallery indices (Nq, k) int64), best first, tie rule of the module docstring.

    queries: text embeddings (query_side="text", the gallery holds images) or image embeddings
    (query_side="image", the gallery holds texts), already on `device` or copied there; gallery: its
    embeddings, anywhere (sliced per chunk). `score(img_emb, txt_emb)` -> (Ni, Nt)."""
    check_side(query_side)
    n_g = num_items(gallery)
    check_k(k, n_g)
    if chunk is not None and not (is_int(chunk) and chunk >= 1):
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    device = torch.device(device) if device is not None else _device_of(queries)
    queries = to_device(queries, device)
    check_finite_embeddings(queries, f"query {query_side}")
    running = RunningTopK(num_items(queries), k, device)
    for s, sims in score_chunks(queries, gallery, score, query_side, chunk or default_chunk(num_items(queries), gallery, k),
                                device, progress):
        running.update(sims, s)
    return running.values, running.indices


def _device_of(emb) -> torch.device:
    return emb.device if isinstance(emb, torch.Tensor) else emb[0].device


def reference_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tie rule on a full (Nq, Ng) matrix: the first k of a stable descending sort (for tests and checks)."""
    if not torch.isfinite(scores).all():
        raise NonFiniteError("reference_topk: non-finite scores")
    vals, idx = torch.sort(scores, dim=1, descending=True, stable=True)
    return vals[:, :k], idx[:, :k]
