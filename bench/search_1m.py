"""Search over a synthetic 1,000,000-image AVSE gallery: brute-force streamed top-k vs FAISS + exact rerank.

    python -m bench.search_1m [--n 1000000] [--queries 200] [--workdir /tmp/vse-search-1m] [--json FILE]

from the repository root (needs faiss-cpu for the FAISS part). No model and no training: the embeddings are
generated (seeded), in AVSE's grid-setting shape, M = 8 units of d = 256 per image, Q = 4 per text, stored
as float16 in a gallery index file (`vse_models.gallery`, 4 GiB at 1M images) that is searched memory-mapped.

Gallery: P prototype units (random directions); each image unit = normalize(prototype + 0.5·noise), its
prototype drawn uniformly (so every prototype recurs in ~N·M/P images: at 1M, 65,536 prototypes, ~122).
Queries: noisy copies (noise 0.5) of Q = 4 of the 8 units of a random gallery image, its "true neighbour"
(cos ~0.9 per unit); the next best images share one prototype with a query unit, so the exact top-10 is a
strong match and a hard tail decided by small differences (what an approximate search loses first).

Measured: brute force (`vse_models.topk.search` with `vse_kernels.meta_sim`, all queries in one batch, the
gallery streamed in chunks) and FAISS (`vse_models.ann`: IVF-PQ over the 8M units, built from the same
file) + exact meta_sim rerank, for a few nprobe / k_units; queries/s, peak anonymous memory growth
(RssAnon, as tests/memory.py: the memory-mapped gallery's page cache is not counted; VmRSS peak too),
build and open times, recall@10 against the exact top-10 and how often the true neighbour is first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vse_models.ann import UnitIndex, ann_search
from vse_models.gallery import GalleryIndex, GalleryWriter
from vse_models.topk import search


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Peak:
    """Peak RssAnon and VmRSS (MiB) while the block runs, sampled every 5 ms, and the wall time."""

    def __enter__(self):
        self.before = _status_kib("RssAnon")
        self.anon = self.rss = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.anon = max(self.anon, _status_kib("RssAnon"))
            self.rss = max(self.rss, _status_kib("VmRSS"))
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.done.set()
        self.thread.join()
        self.anon = max(self.anon, _status_kib("RssAnon"))
        self.growth_mib = (self.anon - self.before) / 1024
        self.rss_mib = self.rss / 1024
        return False


def _units(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def generate(path: Path, n: int, m: int, d: int, prototypes: int, noise: float, seed: int, chunk: int = 1 << 15):
    g = torch.Generator().manual_seed(seed)
    protos = _units(torch.randn(prototypes, d, generator=g))
    meta = {"model": "synthetic", "config_hash": "", "weights_sha256": "", "vocab_sha256": "",
            "source": {"bench": "search_1m", "n": n, "m": m, "d": d, "prototypes": prototypes, "noise": noise, "seed": seed}}
    with GalleryWriter(path, {"image.0": (torch.float16, (n, m, d))}, meta, overwrite=True) as w:
        for s in range(0, n, chunk):
            c = min(chunk, n - s)
            ids = torch.randint(prototypes, (c, m), generator=g)
            w.write("image.0", s, _units(protos[ids] + noise * torch.randn(c, m, d, generator=g) / d ** 0.5).half())


def make_queries(gallery: torch.Tensor, nq: int, q: int, noise: float, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    src = torch.randint(gallery.size(0), (nq,), generator=g)
    pick = torch.stack([torch.randperm(gallery.size(1), generator=g)[:q] for _ in range(nq)])
    units = gallery[src].float().gather(1, pick[:, :, None].expand(-1, -1, gallery.size(2)))
    d = gallery.size(2)
    return _units(units + noise * torch.randn(units.shape, generator=g) / d ** 0.5), src


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--m", type=int, default=8)
    p.add_argument("--q", type=int, default=4)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--noise", type=float, default=0.5)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--factory", default=None, help="FAISS index factory string (default: vse_models.ann.default_factory)")
    p.add_argument("--nprobe", default="16,64")
    p.add_argument("--k-units", default="80,320", help="units each query unit retrieves (comma list)")
    p.add_argument("--workdir", default="/tmp/vse-search-1m")
    p.add_argument("--keep", action="store_true", help="keep the generated gallery file")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import vse_kernels as vk

    out = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "threads": a.threads, "python": platform.python_version(), "torch": torch.__version__,
           "shapes": {"n_images": a.n, "M": a.m, "Q": a.q, "d": a.d, "storage": "float16", "queries": a.queries, "k": a.k,
                      "prototypes": a.prototypes, "noise": a.noise}}
    try:
        import faiss
        faiss.omp_set_num_threads(a.threads)
        out["faiss"] = faiss.__version__
    except ImportError:
        faiss = None
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "gallery.safetensors"

    def say(key, value):
        out[key] = value
        print(f"{key}: {json.dumps(value)}", flush=True)

    with Peak() as pk:
        generate(path, a.n, a.m, a.d, a.prototypes, a.noise, a.seed)
    say("generate", {"seconds": round(pk.seconds, 1), "file_gib": round(path.stat().st_size / 2**30, 3)})
    with Peak() as pk:
        index = GalleryIndex(path)  # verifies the 4 GiB checksum
    say("open_verified", {"seconds": round(pk.seconds, 2), "anon_growth_mib": round(pk.growth_mib, 1)})
    gallery = index.images
    queries, truth = make_queries(gallery, a.queries, a.q, a.noise, a.seed)

    def score(img, txt):
        return vk.meta_sim(img, txt)

    with Peak() as pk:
        exact_vals, exact_idx = search(queries, gallery, a.k, score=score)
    say("brute_force", {"seconds": round(pk.seconds, 2), "queries_per_s": round(a.queries / pk.seconds, 2),
                        "anon_growth_mib": round(pk.growth_mib, 1), "vmrss_peak_mib": round(pk.rss_mib, 1),
                        "full_matrix_would_be_mib": round(a.queries * a.n * 4 / 2**20, 1),
                        "true_neighbour_first": float((exact_idx[:, 0] == truth).float().mean())})
    with Peak() as pk:
        one_vals, one_idx = search(queries[:1], gallery, a.k, score=score)
    assert torch.equal(one_idx[0], exact_idx[0])
    say("brute_force_one_query", {"seconds": round(pk.seconds, 2), "anon_growth_mib": round(pk.growth_mib, 1)})

    if faiss is not None:
        with Peak() as pk:
            units = UnitIndex.build(lambda s, e: _units(gallery[s:e]), a.n, factory=a.factory, seed=a.seed)
        blob = units.to_bytes()
        say("faiss_build", {"factory": units.factory, "seconds": round(pk.seconds, 1), "index_mib": round(blob.numel() / 2**20, 1),
                            "anon_growth_mib": round(pk.growth_mib, 1), "vmrss_peak_mib": round(pk.rss_mib, 1)})
        del blob
        rows = []
        for nprobe in (int(x) for x in a.nprobe.split(",")):
            for k_units in (int(x) for x in a.k_units.split(",")):
                with Peak() as pk:
                    vals, idx, ncand = ann_search(queries, gallery, a.k, score=score, query_units=queries,
                                                  unit_index=units, k_units=k_units, nprobe=nprobe)
                recall = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(idx, exact_idx)) / idx.numel()
                rows.append({"nprobe": nprobe, "k_units": k_units, "seconds": round(pk.seconds, 2),
                             "queries_per_s": round(a.queries / pk.seconds, 1), "recall_at_10": round(recall, 4),
                             "true_neighbour_first": float((idx[:, 0] == truth).float().mean()),
                             "mean_candidates": round(float(ncand.float().mean()), 1),
                             "anon_growth_mib": round(pk.growth_mib, 1)})
                print(json.dumps(rows[-1]), flush=True)
        out["faiss_rerank"] = rows
    out["ru_maxrss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(out, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    del index, gallery
    if not a.keep:
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
