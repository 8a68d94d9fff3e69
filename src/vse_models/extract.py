"""`vse-extract`: precompute patch-grid features from raw images with a frozen local backbone, so that the fast
precomputed path (`vse-train --features grids`) works on anyone's images.

    vse-extract --data data/dataset_flickr30k.json --images data/flickr30k-images --split train --split dev \\
        --split test --backbone vit_base_patch16_224 --weights vit_b16.safetensors --out data/f30k_vit_grids

Writes, per split, into --out (a folder in the SCAN precomp layout): `{split}_grids.npy` (N, s, s, C),
`{split}_grid_cls.npy` (N, C) when the backbone has a CLS token, `{split}_caps.txt`, `{split}_ids.txt`, and
`{split}_grids.extract.json` (what produced them: backbone, its arguments, the weights file's SHA-256, image
size, dtype, the image list's SHA-256; how many images are done). Images get the evaluation transform
(resize to S x S, ImageNet mean/std) and the backbone's whole forward (final norm included).

Streaming and resuming: features go into memory-mapped `{split}_grids.partial.npy` (+ CLS), flushed after every
batch before the sidecar's count is advanced, so a killed run (Ctrl-C, OOM, a power cut) continues where it
stopped when the same command runs again; the finished file is renamed into place. An existing file from
another backbone, weights file, image size or image list, or a file vse-extract did not write, is never
overwritten: the run refuses unless --overwrite is given. An unreadable image stops the run with its name
(the images done so far are kept: fix or replace it and run again); NaN or infinite features stop it too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from .checkpoint import _sha256

KILL_ENV = "VSE_EXTRACT_KILL_AFTER_BATCHES"  # testing hook: SIGKILL this process after N batches


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vse-extract", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    a = p.add_argument
    a("--data", required=True, help="a Karpathy split JSON or a folder with {split}_images.txt + {split}_caps.txt")
    a("--images", help="the image folder (Karpathy JSON: required; plain layout: default the data folder)")
    a("--split", action="append", required=True, help="split to extract (repeatable): train, dev, test, ...")
    a("--out", required=True, help="output folder (SCAN precomp layout)")
    a("--backbone", required=True, help="timm model name, e.g. vit_base_patch16_224 or swin_base_patch4_window7_224")
    a("--weights", required=True, help="local weights file of the backbone (.safetensors / .pth), or 'random'")
    a("--backbone-args", default="{}", help="JSON of timm.create_model arguments (default {})")
    a("--image-size", type=int, default=224)
    a("--batch-size", type=int, default=64)
    a("--workers", type=int, default=2, help="image-decoding worker processes")
    a("--device", default="auto")
    a("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast of the backbone's forward")
    a("--dtype", choices=["float16", "float32"], default="float16", help="stored feature dtype (default float16)")
    a("--seed", type=int, default=0, help="seed of random weights (--weights random)")
    a("--overwrite", action="store_true", help="replace existing files of another extraction")
    a("--no-progress", dest="progress", action="store_false")
    return p


def extract_split(split_name: str, args, backbone, header_base: dict, device, amp, say=print) -> Path:
    from .data.images import ImageOptions, ImageSplit

    out = Path(args.out)
    split = ImageSplit(args.data, split_name, images=args.images,
                       options=ImageOptions(image_size=args.image_size, workers=args.workers))
    n, s, c = split.n_images, backbone.grid_size, backbone.num_features
    header = {**header_base, "split": split_name, "shape": [n, s, s, c], "cls": backbone.has_cls,
              "images_sha256": hashlib.sha256("\n".join(map(str, split.paths)).encode()).hexdigest()}
    final, cls_final = out / f"{split_name}_grids.npy", out / f"{split_name}_grid_cls.npy"
    partial, cls_partial = out / f"{split_name}_grids.partial.npy", out / f"{split_name}_grid_cls.partial.npy"
    sidecar = out / f"{split_name}_grids.extract.json"
    caps, ids = out / f"{split_name}_caps.txt", out / f"{split_name}_ids.txt"
    caps_text = "\n".join(split.captions) + "\n"
    ids_text = "\n".join(split.ids if split.ids else [str(p) for p in split.paths]) + "\n"
    record = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    same = record is not None and {k: record.get(k) for k in header} == header
    mine = [f for f in (final, cls_final, partial, cls_partial, sidecar) if f.exists()]
    clash = [f for f in (caps, ids) if f.exists() and f.read_text(encoding="utf-8") != (caps_text if f == caps else ids_text)]
    if (mine and not same) or clash:
        if not args.overwrite:
            why = ("it was written by another extraction (" + ", ".join(
                f"{k}: {record.get(k)!r} there, {v!r} now" for k, v in header.items() if record.get(k) != v)[:300] + ")"
                if record is not None else "vse-extract did not write it (no matching .extract.json)")
            raise FileExistsError(f"{(mine or clash)[0]} exists and {why if mine else 'differs from this split'}; "
                                  f"pass --overwrite to replace it, or choose another --out")
        for f in mine + clash:
            f.unlink()
        record = None
    if record is not None and record.get("complete") and final.is_file():
        say(f"{split_name}: already extracted ({final}), nothing to do")
        return final
    done = int(record["done"]) if record is not None and partial.is_file() else 0
    out.mkdir(parents=True, exist_ok=True)
    caps.write_text(caps_text, encoding="utf-8")
    ids.write_text(ids_text, encoding="utf-8")
    dtype = np.dtype(args.dtype)
    mode = "r+" if done else "w+"
    grids = np.lib.format.open_memmap(partial, mode=mode, dtype=dtype, shape=(n, s, s, c))
    cls = np.lib.format.open_memmap(cls_partial, mode=mode, dtype=dtype, shape=(n, c)) if backbone.has_cls else None
    _write_json(sidecar, {**header, "done": done, "complete": False})
    if done:
        say(f"{split_name}: resuming after {done} of {n} images")
    batches = [np.arange(k, min(n, k + args.batch_size)) for k in range(done, n, args.batch_size)]
    bar = None
    if args.progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=done, desc=f"{split_name}", unit="img", dynamic_ncols=True)
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    from .data.images import BadImageError

    for count, (idx, loaded) in enumerate(zip(batches, split._loader(batches, None)), 1):
        if len(loaded["ok"]) != len(idx):
            raise BadImageError(f"{split_name}: {loaded['bad'][0]} ({idx[0]} images are done and kept: fix or "
                                f"remove it, then run the same command again to continue)")
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            tokens = backbone.tokens(loaded["images"].to(device)).float()
        if not torch.isfinite(tokens).all():
            bad = (~torch.isfinite(tokens.flatten(1))).any(1).nonzero().flatten().tolist()
            raise ValueError(f"{split_name}: NaN or infinite features for images {[split.paths[idx[b]] for b in bad[:3]]}")
        tokens = tokens.cpu().numpy()
        k0, k1 = int(idx[0]), int(idx[-1]) + 1
        grids[k0:k1] = tokens[:, int(backbone.has_cls):].reshape(len(idx), s, s, c)
        if cls is not None:
            cls[k0:k1] = tokens[:, 0]
            cls.flush()
        grids.flush()
        _write_json(sidecar, {**header, "done": k1, "complete": False})  # only after the data is on disk
        if bar is not None:
            bar.update(len(idx))
        if kill_after and count >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    if bar is not None:
        bar.close()
    del grids, cls
    os.replace(partial, final)
    if backbone.has_cls:
        os.replace(cls_partial, cls_final)
    _write_json(sidecar, {**header, "done": n, "complete": True})
    say(f"{split_name}: {n} images -> {final} ({n} x {s} x {s} x {c} {args.dtype})"
        + (f" + {cls_final}" if backbone.has_cls else ""))
    return final


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .backbones import ImageBackbone
        from .train import autocast_dtype, pick_device

        for name in ("image_size", "batch_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        try:
            backbone_args = json.loads(args.backbone_args)
            assert isinstance(backbone_args, dict)
        except (json.JSONDecodeError, AssertionError):
            raise ValueError(f"--backbone-args must be a JSON object, got {args.backbone_args!r}") from None
        device = pick_device(args.device)
        amp = autocast_dtype(args.precision, device)
        torch.manual_seed(args.seed)
        backbone = ImageBackbone(args.backbone, args.weights, args.image_size, backbone_args).eval().to(device)
        weights = "random" if args.weights == "random" else str(Path(args.weights).expanduser().resolve())
        header = {"format": 1, "backbone": args.backbone, "backbone_args": backbone_args, "weights": weights,
                  "weights_sha256": None if weights == "random" else _sha256(Path(weights)),
                  "seed": args.seed if weights == "random" else None, "image_size": args.image_size,
                  "dtype": args.dtype, "precision": args.precision,
                  "transform": "resize SxS bilinear, ImageNet mean/std; backbone forward_features (final norm)"}
        for split in args.split:
            extract_split(split, args, backbone, header, device, amp)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"vse-extract: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
