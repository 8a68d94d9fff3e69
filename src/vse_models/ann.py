"""Beyond brute force: FAISS candidate generation over image units + exact rerank (late-interaction
retrieval, as ColBERT/PLAID-style engines do it).

AVSE's score `sum_j max_i cos(img_unit_i, txt_unit_j)` is no single dot product, so one vector search
cannot rank by it. Instead every image *unit* (M per image) goes into one FAISS inner-product index; a text
query's Q units each retrieve their `k_units` nearest image units; the union of those units' images is the
candidate set, which is scored exactly (the model's similarity) and ranked with the tie rule of
`vse_models.topk`. Models with one vector per side (`vse`, `mh-cvse`) have one unit each (U = 1): then this
is plain maximum-inner-product search plus an exact rerank. The units come from `model.search_units`.

What is approximate is only which images become candidates: an image none of whose units is among any
query unit's k_units nearest (as FAISS finds them: IVF probes `nprobe` lists, PQ compresses the units) is
missed; the scores and the order of the candidates found are exact. faiss-cpu is an optional extra
(`pip install "vse-kernels[search]"`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import CheckpointError, NonFiniteError
from .gallery import GalleryWriter, IndexFile
from .models import is_int, take_embeddings
from .topk import chunk_topk, check_k, num_items, to_device
from .evaluation import _FiniteScores


DEFAULT_NPROBE = 16  # IVF lists probed per query unit (FAISS's own default, 1, misses too much here)


def import_faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("FAISS search needs the faiss-cpu package: pip install 'vse-kernels[search]' "
                          "(or pip install faiss-cpu); brute-force search needs nothing extra") from None
    return faiss


def default_factory(n_units: int, d: int) -> str:
    """Exact search (Flat) up to 2^18 units; above, IVF with about sqrt(n) lists (a power of two) and PQ
    codes of d/8 bytes (8 dimensions per sub-quantizer; 32 bytes per 256-d unit)."""
    if n_units <= 1 << 18:
        return "Flat"
    nlist = 1 << round(math.log2(math.sqrt(n_units)))
    m = max(1, d // 8)
    while d % m:
        m -= 1
    return f"IVF{nlist},PQ{m}"


class UnitIndex:
    """A FAISS inner-product index over the units of a gallery's images: unit `u` is unit `u % U` of image
    `u // U` (every image has U units of size d)."""

    def __init__(self, index, units_per_item: int, n_items: int, factory: str):
        self.index, self.units_per_item, self.n_items, self.factory = index, units_per_item, n_items, factory

    @classmethod
    def build(cls, units_of: Callable[[int, int], torch.Tensor], n_items: int, *, factory: str | None = None,
              train_size: int = 1 << 17, chunk: int = 1 << 14, seed: int = 0, progress=None) -> "UnitIndex":
        """`units_of(start, stop)` -> (stop - start, U, d) units of images [start, stop) (normalised, as the
        score compares them). Trains on the units of a seeded sample of images (up to `train_size` units)."""
        faiss = import_faiss()
        first = units_of(0, 1)
        u, d = first.shape[1], first.shape[2]
        factory = factory or default_factory(n_items * u, d)
        index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            g = torch.Generator().manual_seed(seed)
            sample = torch.randperm(n_items, generator=g)[:max(1, train_size // u)].sort().values
            index.train(_as_faiss(_units_at(units_of, sample).reshape(-1, d)))
        starts = range(0, n_items, chunk)
        for s in (progress(starts) if progress else starts):
            index.add(_as_faiss(units_of(s, min(n_items, s + chunk)).reshape(-1, d)))
        return cls(index, u, n_items, factory)

    def candidates(self, query_units: torch.Tensor, k_units: int, nprobe: int | None = None) -> list[torch.Tensor]:
        """Per query, the sorted image indices whose units are among the k_units nearest of any of its units
        (IVF indexes probe `nprobe` lists per query unit, DEFAULT_NPROBE if None)."""
        if not is_int(k_units) or k_units < 1:
            raise ValueError(f"k_units must be an integer >= 1, got {k_units!r}")
        nprobe = DEFAULT_NPROBE if nprobe is None else nprobe
        if not is_int(nprobe) or nprobe < 1:
            raise ValueError(f"nprobe must be an integer >= 1, got {nprobe!r}")
        if "IVF" in self.factory:  # exact (Flat) indexes probe nothing
            import_faiss().extract_index_ivf(self.index).nprobe = nprobe
        nq, q, d = query_units.shape
        _, labels = self.index.search(_as_faiss(query_units.reshape(-1, d)), min(k_units, self.index.ntotal))
        labels = torch.from_numpy(labels).view(nq, -1)
        out = []
        for row in labels:
            row = row[row >= 0]
            out.append(torch.unique(row // self.units_per_item))  # sorted ascending
        return out

    def to_bytes(self) -> torch.Tensor:
        return torch.from_numpy(import_faiss().serialize_index(self.index).copy())

    @classmethod
    def from_bytes(cls, data: torch.Tensor, units_per_item: int, n_items: int, factory: str) -> "UnitIndex":
        index = import_faiss().deserialize_index(np.ascontiguousarray(data.numpy()))
        if index.ntotal != units_per_item * n_items:
            raise ValueError(f"the FAISS index holds {index.ntotal} units, expected {units_per_item} x {n_items}")
        return cls(index, units_per_item, n_items, factory)


def _units_at(units_of, items: torch.Tensor) -> torch.Tensor:
    """Units of the (sorted) sample `items`, read in runs of consecutive indices."""
    parts, i = [], 0
    items = items.tolist()
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(units_of(items[i], items[j] + 1))
        i = j + 1
    return torch.cat(parts)


def _as_faiss(x: torch.Tensor) -> np.ndarray:
    x = x.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(x).all():
        raise NonFiniteError("FAISS: NaN or infinite units (the embeddings are not finite)")
    return x.numpy()


def rerank(queries, gallery, candidates: list[torch.Tensor], k: int, *, score: Callable, device=None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of each text query among its candidate images: (scores (Nq, k), image indices (Nq, k)),
    the tie rule of `vse_models.topk`. A query with fewer than k candidates is an error (raise k_units)."""
    device = torch.device(device) if device is not None else (queries.device if isinstance(queries, torch.Tensor)
                                                              else queries[0].device)
    n_q = num_items(queries)
    values = torch.empty(n_q, k, device=device)
    indices = torch.empty(n_q, k, dtype=torch.long, device=device)
    for q, cand in enumerate(candidates):
        if cand.numel() < k:
            raise ValueError(f"query {q} has {cand.numel()} candidate images, fewer than k={k}: raise k_units "
                             f"(or nprobe)")
        query = to_device(take_embeddings(queries, torch.tensor([q])), device)
        with torch.no_grad():
            sims = score(to_device(take_embeddings(gallery, cand), device), query).float()  # (c, 1)
        finite = _FiniteScores(1)
        finite.check(sims, 0)
        finite.raise_if_any()
        vals, pos = chunk_topk(sims.t(), k)
        values[q], indices[q] = vals[0], cand.to(device)[pos[0]]
    return values, indices


def ann_search(queries, gallery, k: int, *, score: Callable, query_units: torch.Tensor, unit_index: UnitIndex,
               k_units: int | None = None, nprobe: int | None = None, device=None):
    """FAISS candidates + exact rerank for text queries over an image gallery: (scores, indices), both (Nq, k),
    and the number of candidates per query. k_units defaults to k·U (so that every query unit alone can
    bring k distinct images)."""
    check_k(k, unit_index.n_items)
    cands = unit_index.candidates(query_units, k_units or k * unit_index.units_per_item, nprobe)
    vals, idx = rerank(queries, gallery, cands, k, score=score, device=device)
    return vals, idx, torch.tensor([c.numel() for c in cands])



class UnitIndexFile(IndexFile):
    """A gallery's FAISS unit index saved beside it as `<gallery file>.faiss`: a GalleryWriter file
    (checksummed, written atomically) with the serialised index and the checksum of the gallery it indexes."""

    content = "faiss-units"

    @staticmethod
    def path_for(gallery_path) -> Path:
        return Path(f"{gallery_path}.faiss")

    @classmethod
    def save(cls, unit_index: UnitIndex, gallery, *, overwrite: bool = False) -> Path:
        blob = unit_index.to_bytes()
        meta = {"content": cls.content, "gallery_data_sha256": gallery.metadata["data_sha256"],
                "factory": unit_index.factory, "units_per_item": str(unit_index.units_per_item),
                "n_items": str(unit_index.n_items)}
        with GalleryWriter(cls.path_for(gallery.path), {"faiss": (torch.uint8, tuple(blob.shape))}, meta,
                           overwrite=overwrite) as w:
            w.write("faiss", 0, blob)
        return cls.path_for(gallery.path)

    @classmethod
    def load(cls, gallery, *, verify: bool = True) -> UnitIndex:
        """The unit index saved beside `gallery` (an opened GalleryIndex); refused if built for another gallery."""
        f = cls(cls.path_for(gallery.path), verify=verify)
        m = f.metadata
        if m.get("gallery_data_sha256") != gallery.metadata["data_sha256"]:
            raise CheckpointError(f"{f.path} was built for another gallery than {gallery.path} (rebuild it: "
                                  f"vse-search RUN --build-index --faiss --overwrite ...)")
        return UnitIndex.from_bytes(f.tensor("faiss"), int(m["units_per_item"]), int(m["n_items"]), m["factory"])
