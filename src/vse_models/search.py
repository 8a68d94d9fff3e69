"""`vse-search`: search a trained run's gallery index by text (images) or by image (captions).

    vse-search RUN --build-index --index test.safetensors [--data DIR] [--split test] [--faiss]
    vse-search RUN --index test.safetensors --text "a red dog on the left" -k 10
    vse-search RUN --index test.safetensors --image 123 -k 5
    vse-search RUN --index test.safetensors --text "..." --faiss [--nprobe 16] [--k-units 80]

RUN is a run folder (its best/ checkpoint, or --which last) or a checkpoint folder. The index holds a split's
image and caption embeddings (vse_models.gallery); it is refused when another model, configuration, set of
weights or vocabulary built it. Results: rank, score, image id (text queries) or caption and its image id
(image queries); equal scores are ordered by gallery row. Brute force by default (streamed top-k, exact);
--faiss uses the FAISS unit index built with --build-index --faiss (candidates + exact rerank).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .api import load
from .gallery import STORAGE_DTYPES
from .models import is_int, slice_embeddings
from .topk import check_k


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vse-search", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("run", help="run folder (uses its best/ or last/) or checkpoint folder")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--index", required=True, help="gallery index file (.safetensors)")
    p.add_argument("--text", action="append", help="a text query (repeatable): images ranked")
    p.add_argument("--image", action="append", help="an image id of the index (repeatable): captions ranked")
    p.add_argument("-k", type=int, default=10, help="results per query (10)")
    p.add_argument("--faiss", action="store_true", help="search: FAISS candidates + exact rerank; "
                   "--build-index: also build the FAISS unit index (<index>.faiss)")
    p.add_argument("--nprobe", type=int, help="FAISS IVF lists probed per query unit (16)")
    p.add_argument("--k-units", type=int, help="image units each query unit retrieves (default: k x units per image)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--build-index", action="store_true", help="encode --split of --data and write --index")
    p.add_argument("--data", help="data folder (default: the one the run was trained on)")
    p.add_argument("--split", default="test")
    p.add_argument("--dtype", choices=list(STORAGE_DTYPES), default="float32", help="stored embeddings (float32)")
    p.add_argument("--no-captions", action="store_true", help="index the images only (no --image queries then)")
    p.add_argument("--factory", help="FAISS index factory string (default: Flat up to 2^18 units, else IVF-PQ)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index file")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N, auto")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--no-verify", action="store_true", help="skip the index checksum (a full read of the file)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _check_args(args) -> None:
    for name in ("k", "batch_size", "threads", "nprobe", "k_units"):
        value = getattr(args, name)
        if value is not None and not (is_int(value) and value >= 1):
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if args.build_index:
        if args.text or args.image:
            raise ValueError("--build-index builds an index; search with it in a second call (no --text / --image)")
    else:
        if not args.text and not args.image:
            raise ValueError("give --text or --image queries (or --build-index)")
        if args.text and args.image:
            raise ValueError("give --text or --image queries, not both")
        if args.image and args.faiss:
            raise ValueError("--faiss searches images for --text queries; --image queries use brute force")
        ignored = [f"--{n}" for n, v in (("data", args.data), ("factory", args.factory)) if v is not None]
        if ignored or args.no_captions or args.overwrite or args.split != "test" or args.dtype != "float32":
            raise ValueError(f"{', '.join(ignored) or 'the build options'} only apply with --build-index")
    if (args.nprobe or args.k_units) and not (args.faiss and not args.build_index):
        raise ValueError("--nprobe and --k-units only apply to a --faiss search")


def build(args, retriever, progress) -> None:
    from .ann import UnitIndexFile, import_faiss

    if args.faiss:
        import_faiss()  # before any work: a missing extra is reported at once
        faiss_path = UnitIndexFile.path_for(args.index)
        if faiss_path.exists() and not args.overwrite:
            raise FileExistsError(f"{faiss_path} exists; pass --overwrite to replace it")
    index = retriever.build_index(args.index, split=args.split, data=args.data, captions=not args.no_captions,
                                  dtype=args.dtype, batch_size=args.batch_size, overwrite=args.overwrite,
                                  progress=progress)
    print(f"wrote {index.path}: {index.n_images} images, {index.n_texts} captions of split {args.split!r} "
          f"({args.dtype}, {index.path.stat().st_size / 2**20:.1f} MiB)")
    if args.faiss:
        from .ann import UnitIndex

        units = UnitIndex.build(lambda s, e: retriever.search_units(slice_embeddings(index.images, s, e), "image").cpu(),
                                index.n_images, factory=args.factory,
                                progress=None if progress is None else (lambda it: progress(it, desc="faiss")))
        path = UnitIndexFile.save(units, index, overwrite=args.overwrite)
        print(f"wrote {path}: FAISS {units.factory} over {units.index.ntotal} image units")


def run_search(args, retriever) -> list[dict]:
    index = retriever.open_index(args.index, verify=not args.no_verify)
    unit_index = None
    if args.faiss:
        from .ann import UnitIndexFile

        unit_index = UnitIndexFile.load(index, verify=not args.no_verify)
    if args.text:
        check_k(args.k, index.n_images, "gallery's images")  # before any note about the queries
        for t in args.text:
            unknown = retriever.unknown_words(t)
            if unknown:
                print(f"note: {len(unknown)} word(s) of {t!r} are not in the run's vocabulary and are read as <unk>: "
                      f"{', '.join(unknown)}", file=sys.stderr)
        hits = retriever.search(index, texts=args.text, k=args.k, unit_index=unit_index, k_units=args.k_units,
                                nprobe=args.nprobe)
        queries = args.text
    else:
        hits = retriever.search(index, image_ids=args.image, k=args.k)
        queries = args.image
    results = []
    for q, query in enumerate(queries):
        method = "FAISS + exact rerank" if unit_index is not None else "exact"
        if args.text:
            print(f"{query!r}: top {args.k} of {index.n_images} images ({method})")
            rows = [{"rank": r + 1, "score": s, "image": hits.labels[q][r], "row": hits.indices[q, r].item()}
                    for r, s in enumerate(hits.scores[q].tolist())]
            for row in rows:
                print(f"{row['rank']:5d}  {row['score']:9.4f}  image {row['image']}")
        else:
            print(f"image {query}: top {args.k} of {index.n_texts} captions ({method})")
            rows = [{"rank": r + 1, "score": s, "caption": hits.labels[q][r], "row": hits.indices[q, r].item(),
                     "image": index.image_ids[hits.images[q][r]]} for r, s in enumerate(hits.scores[q].tolist())]
            for row in rows:
                print(f"{row['rank']:5d}  {row['score']:9.4f}  image {row['image']}: {row['caption']}")
        results.append({"query": query, "results": rows})
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .train import _progress

        _check_args(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        retriever = load(args.run, device=args.device, which=args.which)
        progress = None if args.no_progress else (lambda it, **kw: _progress(it, True, **kw))
        if args.build_index:
            build(args, retriever, progress)
            return 0
        results = run_search(args, retriever)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"vse-search: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
