"""Retrieval metrics on multi-positive ground truth, as in ECCV Caption (Chun et al., ECCV 2022), SPEC §6.

A query (an image for i2t, a caption for t2i) has R >= 1 positives in the gallery. With 1-based ranks of
the ranked gallery and rel(i) = 1 when the item at rank i is a positive:
- R-Precision = (positives among the top R) / R;
- mAP@R = (1/R) · sum_{i=1..R} P(i) · rel(i), P(i) = (positives among the top i) / i;
- R@1 = 1 when the top item is a positive.
Each is averaged over the queries and reported x100 (like R@K). These are the definitions of the paper and
of the `eccv-caption` package (`eccv_caption/_metrics.py`: `compute_eccv_metrics`, `rprecision`).
Tie rule (as for R@K): a negative tied with a positive ranks before it, so ties never flatter; the rank of
the m-th best positive (0-based) is m + (negatives scoring >= it). Non-finite scores are an error.

Ground truth file (`{split}_positives.npz`, written by the synthetic generator): CSR arrays over captions,
`indptr` (int64, n_captions + 1) and `indices` (int32, sorted image indices of caption c at
indices[indptr[c]:indptr[c + 1]]), and `n_images`; caption c's own image c // k is always among them.

Real COCO: where a split's ids are the COCO 5K test image ids and `eccv-caption` is installed
(`pip install vse-kernels[eccv]`), `coco_package_metrics` computes ECCV Caption mAP@R / R-P / R@1, CxC
R@K and the original-ground-truth COCO 5K R@K with the package's `Metrics`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .evaluation import _as_tensor, _FiniteScores, _rounded, check_finite_embeddings
from .models import slice_embeddings

ECCV_KEYS = ("i2t_map_at_r", "i2t_r_precision", "i2t_r1", "t2i_map_at_r", "t2i_r_precision", "t2i_r1")


@dataclass
class Positives:
    """CSR ground truth: the gallery items of query q are indices[indptr[q]:indptr[q + 1]] (sorted)."""

    indptr: np.ndarray
    indices: np.ndarray
    n_gallery: int

    @classmethod
    def from_lists(cls, lists, n_gallery: int) -> "Positives":
        indptr = np.zeros(len(lists) + 1, dtype=np.int64)
        indptr[1:] = np.cumsum([len(x) for x in lists])
        indices = np.fromiter((i for x in lists for i in sorted(x)), dtype=np.int32, count=int(indptr[-1]))
        return cls(indptr, indices, int(n_gallery)).check()

    @property
    def n_queries(self) -> int:
        return len(self.indptr) - 1

    def row(self, q: int) -> np.ndarray:
        return self.indices[self.indptr[q]:self.indptr[q + 1]]

    def check(self, where: str = "ground truth") -> "Positives":
        ip, ix = self.indptr, self.indices
        counts = np.diff(ip)
        if ip.ndim != 1 or len(ip) < 2 or ip[0] != 0 or (counts < 1).any() or ip[-1] != len(ix):
            raise ValueError(f"{where}: malformed positives (every query needs >= 1 positive, indptr from 0 to "
                             f"len(indices))")
        if len(ix) and (ix.min() < 0 or ix.max() >= self.n_gallery):
            raise ValueError(f"{where}: a positive index is outside the gallery of {self.n_gallery} items")
        inner = np.ones(len(ix), bool)
        inner[ip[1:-1]] = False  # the first item of each row
        if (np.diff(ix.astype(np.int64), prepend=-1)[inner] <= 0).any():
            raise ValueError(f"{where}: positives of a query are not sorted and unique")
        return self

    def transpose(self) -> "Positives":
        """Gallery -> queries (captions -> images becomes images -> captions)."""
        rows = np.repeat(np.arange(self.n_queries, dtype=np.int32), np.diff(self.indptr))
        order = np.lexsort((rows, self.indices))
        indptr = np.zeros(self.n_gallery + 1, dtype=np.int64)
        indptr[1:] = np.cumsum(np.bincount(self.indices, minlength=self.n_gallery))
        return Positives(indptr, rows[order], self.n_queries).check("transposed ground truth")

    def check_own(self, captions_per_image: int, where: str = "ground truth") -> "Positives":
        """Caption c's own image c // k must be among its positives."""
        rows = np.repeat(np.arange(self.n_queries), np.diff(self.indptr))
        hit = np.zeros(self.n_queries, bool)
        hit[rows[self.indices == rows // captions_per_image]] = True
        if not hit.all():
            raise ValueError(f"{where}: caption(s) {np.flatnonzero(~hit)[:5].tolist()} lack their own image")
        return self


def save_positives(path: str | Path, lists, n_images: int) -> Path:
    """Writes caption -> image positives (`lists[c]`: image indices) as the documented npz (atomically)."""
    path = Path(path)
    gt = Positives.from_lists(lists, n_images)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, indptr=gt.indptr, indices=gt.indices, n_images=np.int64(n_images))
    os.replace(tmp, path)
    return path


def load_positives(path: str | Path) -> Positives:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    try:
        with np.load(path) as z:
            gt = Positives(z["indptr"].astype(np.int64), z["indices"].astype(np.int32), int(z["n_images"]))
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a positives file (npz with indptr, indices, n_images): {e}") from None
    return gt.check(str(path))


# ------------------------------------------------------------------------------------------ ranking
class _Accumulator:
    """Per-query mAP@R, R-Precision and R@1 of one direction, fed blocks of (queries, whole gallery) scores."""

    def __init__(self, positives: Positives):
        self.gt, self.ap, self.rp, self.r1 = positives, [], [], []

    def add(self, scores: torch.Tensor, q0: int) -> None:
        q, g = scores.shape
        ip = torch.from_numpy(self.gt.indptr[q0:q0 + q + 1])
        counts = (ip[1:] - ip[:-1]).to(scores.device)
        width = int(counts.max())
        slot = torch.arange(width, device=scores.device)
        valid = slot[None, :] < counts[:, None]
        flat = torch.from_numpy(self.gt.indices[int(ip[0]):int(ip[-1])].astype(np.int64)).to(scores.device)
        idx = torch.zeros(q, width, dtype=torch.long, device=scores.device)
        idx[valid] = flat
        pos = scores.gather(1, idx).masked_fill(~valid, float("-inf")).sort(1, descending=True).values
        at_least_all = g - torch.searchsorted(scores.sort(1).values.contiguous(), pos.contiguous(), side="left")
        at_least_pos = ((pos[:, None, :] >= pos[:, :, None]) & valid[:, None, :]).sum(2)
        rank = slot[None, :] + (at_least_all - at_least_pos)      # 0-based, ties against the positive
        hits = valid & (rank < counts[:, None])
        r = counts.double()
        self.rp.append((hits.sum(1) / r).cpu())
        self.ap.append(((hits * (slot[None, :] + 1) / (rank + 1).double()).sum(1) / r).cpu())
        self.r1.append((rank[:, 0] == 0).double().cpu())

    def result(self, side: str) -> dict:
        return {f"{side}_map_at_r": 100 * float(torch.cat(self.ap).mean()),
                f"{side}_r_precision": 100 * float(torch.cat(self.rp).mean()),
                f"{side}_r1": 100 * float(torch.cat(self.r1).mean())}


def positive_metrics(sims, caption_positives: Positives, block: int = 1024) -> dict:
    """ECCV_KEYS of a (N_img, N_txt) similarity matrix (numpy or torch) with caption -> image positives."""
    sims = _as_tensor(sims)
    n_img, n_txt = sims.shape
    _check_gt(caption_positives, n_img, n_txt)
    finite = _FiniteScores(n_txt)
    finite.check(sims, 0)
    finite.raise_if_any()
    i2t, t2i = _Accumulator(caption_positives.transpose()), _Accumulator(caption_positives)
    for s in range(0, n_img, block):
        i2t.add(sims[s:s + block], s)
    for s in range(0, n_txt, block):
        t2i.add(sims[:, s:s + block].t(), s)
    return _rounded({**i2t.result("i2t"), **t2i.result("t2i")})


def _check_gt(gt: Positives, n_img: int, n_txt: int) -> None:
    if gt.n_queries != n_txt or gt.n_gallery != n_img:
        raise ValueError(f"the ground truth covers {gt.n_queries} captions x {gt.n_gallery} images, the "
                         f"scores {n_txt} captions x {n_img} images")


def _n(emb) -> int:
    return emb.size(0) if isinstance(emb, torch.Tensor) else emb[0].size(0)


@torch.no_grad()
def streamed_positive_metrics(model, img_emb, txt_emb, caption_positives: Positives, block: int = 256) -> dict:
    """positive_metrics of model.similarity(img_emb, txt_emb), in blocks of `block` query images, then of
    `block` query captions: only (block, N) scores exist at a time."""
    n_img, n_txt = _n(img_emb), _n(txt_emb)
    _check_gt(caption_positives, n_img, n_txt)
    check_finite_embeddings(img_emb, "image")
    check_finite_embeddings(txt_emb, "caption")
    finite = _FiniteScores(n_txt)
    i2t, t2i = _Accumulator(caption_positives.transpose()), _Accumulator(caption_positives)
    for s in range(0, n_img, block):
        sims = model.similarity(slice_embeddings(img_emb, s, min(n_img, s + block)), txt_emb).float()
        finite.check(sims, s)
        i2t.add(sims, s)
    finite.raise_if_any()
    for s in range(0, n_txt, block):
        sims = model.similarity(img_emb, slice_embeddings(txt_emb, s, min(n_txt, s + block))).float()
        finite.check(sims, 0, s)
        t2i.add(sims.t(), s)
    finite.raise_if_any()
    return _rounded({**i2t.result("i2t"), **t2i.result("t2i")})


def split_positives(split) -> Positives | None:
    """The saved ground truth of a split (`{split}_positives.npz` beside its captions), or None."""
    root = getattr(split, "root", None)
    if root is None:
        return None
    root = Path(root)
    path = (root if root.is_dir() else root.parent) / f"{split.split}_positives.npz"
    if not path.is_file():
        return None
    gt = load_positives(path)
    _check_gt(gt, split.n_images, split.n_captions)
    return gt.check_own(split.captions_per_image, str(path))


def split_eccv_metrics(model, split, img_emb, txt_emb, block: int = 256) -> dict:
    """The multi-positive metrics of encoded `split`: on the saved exact ground truth (ECCV_KEYS, "ground_truth":
    its file), else, where the split's ids are the COCO 5K test images, the eccv-caption package's
    (`coco_package_metrics`, "ground_truth": "eccv-caption")."""
    gt = split_positives(split)
    if gt is not None:
        return {"ground_truth": f"{split.split}_positives.npz",
                **streamed_positive_metrics(model, img_emb, txt_emb, gt, block)}
    ids = getattr(split, "ids", None)
    if not ids or not all(str(x).isdigit() for x in ids):  # COCO ids are integers
        raise ValueError(f"--metrics eccv needs a ground truth for split {split.split!r}: a "
                         f"{split.split}_positives.npz beside its captions (the synthetic sets write one), or COCO "
                         f"5K test image ids in {split.split}_ids.txt with eccv-caption installed")
    return {"ground_truth": "eccv-caption",
            **coco_package_metrics(model, img_emb, txt_emb, split.ids, split.captions_per_image, block)}


def format_coco_package_table(m: dict) -> str:
    """The eccv-caption metrics (coco_package_metrics) as a markdown table."""
    lines = ["| ground truth | i2t | | | t2i | | |", "|---" * 7 + "|"]
    for name, metric_keys in (("ECCV Caption mAP@R / R-P / R@1", ("map_at_r", "r_precision", "r1")),
                              ("CxC R@1 / 5 / 10", ("r1", "r5", "r10")), ("COCO 5K R@1 / 5 / 10", ("r1", "r5", "r10"))):
        prefix = name.split()[0].lower()
        vals = [m[f"{prefix}_{side}_{k}"] for side in ("i2t", "t2i") for k in metric_keys]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ eccv-caption (COCO)
def _eccv_package():
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "failed to import ujson"
            from eccv_caption import Metrics
    except ImportError:
        raise ValueError("the COCO ECCV Caption / CxC metrics need the eccv-caption package: "
                         "pip install 'vse-kernels[eccv]' (or pip install eccv-caption)") from None
    return Metrics


def coco_caption_ids(metrics, image_ids, captions_per_image: int) -> np.ndarray | None:
    """The COCO caption id of each caption of a split whose images are the COCO 5K test images (`image_ids`,
    one per image or per caption), or None when they are not. Captions of an image are taken in the order
    of the package's `coco_test_ids` (the Karpathy / SCAN `testall_caps.txt` order)."""
    k = captions_per_image
    coco_images = metrics.coco_gts["i2t"]
    try:
        ids = [int(x) for x in image_ids]
    except (TypeError, ValueError):
        return None
    test_caps = [int(c) for c in metrics.coco_ids]
    if len(ids) == len(test_caps) and set(ids) == set(test_caps):   # one COCO caption id per caption
        return np.asarray(ids, dtype=np.int64)
    if len(ids) == k * len(coco_images) and all(len(set(ids[i:i + k])) == 1 for i in range(0, len(ids), k)):
        ids = ids[::k]                                                  # the image id repeated per caption
    if k != 5 or len(ids) != len(coco_images) or set(ids) != set(coco_images):
        return None
    by_image: dict[int, list[int]] = {}
    for c in test_caps:
        by_image.setdefault(metrics.coco_gts["t2i"][c][0], []).append(c)
    return np.asarray([c for i in ids for c in by_image[i]], dtype=np.int64)


def _top_lists(blocks, gallery_ids: np.ndarray, query_ids: np.ndarray, gts: dict, length: int) -> dict:
    """{query id: the `length` best gallery ids}, a negative tied with a positive of `gts` ranked first."""
    out = {}
    for q0, scores in blocks:
        vals, idx = scores.topk(min(length + 1, scores.size(1)), dim=1)
        tied = (vals[:, 1:] == vals[:, :-1]).any(1)
        for r in range(scores.size(0)):
            qid = int(query_ids[q0 + r])
            if not tied[r]:
                out[qid] = gallery_ids[idx[r, :length].cpu().numpy()].tolist()
                continue
            row = scores[r].cpu().numpy()
            cand = np.flatnonzero(row >= row[int(idx[r, min(length, idx.size(1)) - 1])])
            positive = np.isin(gallery_ids[cand], list(gts.get(qid, ())))
            order = np.lexsort((positive, -row[cand]))[:length]
            out[qid] = gallery_ids[cand[order]].tolist()
    return out


@torch.no_grad()
def coco_package_metrics(model, img_emb, txt_emb, image_ids, captions_per_image: int = 5, block: int = 256) -> dict:
    """ECCV Caption (mAP@R, R-Precision, R@1), CxC R@1/5/10 and COCO 5K R@1/5/10 (original ground truth) from the
    eccv-caption package, on a split whose ids are the COCO 5K test images. x100, keys
    {gt}_{i2t|t2i}_{metric}. Ranked lists are cut at the longest ground-truth list (>= 10), with the tie
    rule applied per ground truth."""
    Metrics = _eccv_package()
    import contextlib
    import io
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "failed to import ujson"
        metrics = Metrics()
    n_img, n_txt = _n(img_emb), _n(txt_emb)
    cap_ids = coco_caption_ids(metrics, image_ids, captions_per_image)
    if cap_ids is None or len(cap_ids) != n_txt:
        raise ValueError("the COCO metrics (eccv-caption) need a split of the 5000 COCO 5K test images (Karpathy "
                         "testall) with 5 captions each and their COCO image ids (or caption ids) in its ids file")
    img_ids = np.asarray([int(metrics.coco_gts["t2i"][int(c)][0]) for c in cap_ids[::captions_per_image]])
    check_finite_embeddings(img_emb, "image")
    check_finite_embeddings(txt_emb, "caption")

    def i2t_blocks():
        for s in range(0, n_img, block):
            yield s, model.similarity(slice_embeddings(img_emb, s, min(n_img, s + block)), txt_emb).float()

    def t2i_blocks():
        for s in range(0, n_txt, block):
            yield s, model.similarity(img_emb, slice_embeddings(txt_emb, s, min(n_txt, s + block))).float().t()

    finite = _FiniteScores(n_txt)
    for s, sims in i2t_blocks():
        finite.check(sims, s)
    finite.raise_if_any()
    out = {}
    for name in ("coco", "cxc", "eccv"):
        gts = getattr(metrics, f"{name}_gts")
        length = max(10, max(len(v) for v in gts["i2t"].values()), max(len(v) for v in gts["t2i"].values()))
        items = {"i2t": _top_lists(i2t_blocks(), cap_ids, img_ids, gts["i2t"], length),
                 "t2i": _top_lists(t2i_blocks(), img_ids, cap_ids, gts["t2i"], length)}
        with contextlib.redirect_stderr(io.StringIO()):  # the package's progress bars
            if name == "eccv":
                scores = metrics.eccv_metrics(items, "all")
                for key, short in (("eccv_map_at_r", "map_at_r"), ("eccv_rprecision", "r_precision"), ("eccv_r1", "r1")):
                    for side in ("i2t", "t2i"):
                        out[f"eccv_{side}_{short}"] = 100 * float(scores[key][side])
            else:
                recall = metrics.coco_5k_recalls if name == "coco" else metrics.cxc_recalls
                for kk in (1, 5, 10):
                    scores = recall(items, "all", K=kk)
                    for side in ("i2t", "t2i"):
                        out[f"{name}_{side}_r{kk}"] = 100 * float(scores[side])
    return _rounded(out)


def format_eccv_table(rows: dict[str, dict]) -> str:
    """A markdown table of ECCV_KEYS per (name -> metric dict)."""
    lines = ["| | i2t mAP@R | R-P | R@1 | t2i mAP@R | R-P | R@1 |", "|---" * 7 + "|"]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.1f}" for k in ECCV_KEYS) + " |")
    return "\n".join(lines)
