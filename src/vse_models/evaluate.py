"""`vse-eval`: evaluate a saved run (or checkpoint folder) on any split (SPEC §6).

    vse-eval --checkpoint runs/vse-synthetic                    # best checkpoint, test split
    vse-eval --checkpoint runs/vse-synthetic --split dev --which last
    vse-eval --checkpoint runs/coco --data data/coco_precomp --split testall --fold5   # COCO 1K and 5K
    vse-eval --checkpoint runs/vse-synthetic --metrics eccv     # + mAP@R, R-Precision on the exact ground truth
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .evaluation import evaluate_split, format_table
from .models import is_int
from .train import autocast_dtype, data_root, load_split, pick_device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vse-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", required=True, help="run folder (uses its best/ or last/) or checkpoint folder")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--split", default="test", help="split name: train, dev, test, testall, ...")
    p.add_argument("--fold5", action="store_true", help="COCO 1K protocol (5 folds averaged) plus all images (5K)")
    p.add_argument("--data", help="data folder (default: the one the run was trained on)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, help="CPU threads (default: the run's setting, else one per core)")
    p.add_argument("--metrics", choices=["recall", "eccv"], default="recall",
                   help="eccv: also mAP@R, R-Precision and R@1 on multi-positive ground truth (the synthetic sets' "
                        "{split}_positives.npz; COCO 5K test ids: ECCV Caption and CxC via eccv-caption)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    return p


def evaluate_checkpoint(checkpoint, split="test", *, which="best", fold5=False, data=None, device="auto",
                        precision="fp32", batch_size=256, threads=None, metrics="recall") -> dict:
    for name, value in (("batch-size", batch_size), ("threads", threads)):
        if value is not None and not (is_int(value) and value >= 1):
            raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
    device = pick_device(device)
    model, vocab, config, meta = load_checkpoint(checkpoint, which, device)
    run = dict(config["run"])
    if threads or run.get("threads"):
        torch.set_num_threads(threads or run["threads"])
    if data is not None:
        run["data"] = data
    from .models import DataInfo

    info = DataInfo(**config["data_info"])
    root = data_root(run, verbose=True)
    s = load_split(root, split, vocab, run["features"], info, run=run)
    return evaluate_split(model, s, fold5=fold5, batch_size=batch_size,
                          autocast_dtype=autocast_dtype(precision, device), metrics=metrics)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.split, which=args.which, fold5=args.fold5,
                                     data=args.data, device=args.device, precision=args.precision,
                                     batch_size=args.batch_size, threads=args.threads, metrics=args.metrics)
    except (FileNotFoundError, ValueError) as e:
        print(f"vse-eval: error: {e}", file=sys.stderr)
        return 2
    rows = ({f"{args.split} 5-fold (1K)": result["fold5"], f"{args.split} all": result["all"]}
            if args.fold5 else {args.split: result})
    print(format_table(rows))
    if "eccv" in result:
        from .eccv_metrics import format_coco_package_table, format_eccv_table

        eccv = result["eccv"]
        print(f"\nmulti-positive ground truth: {eccv['ground_truth']} (all images)")
        print(format_coco_package_table(eccv) if eccv["ground_truth"] == "eccv-caption"
              else format_eccv_table({args.split: eccv}))
    if args.json:
        Path(args.json).write_text(json.dumps({args.split: result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
