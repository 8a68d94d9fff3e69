"""`vse-train` / `python -m vse_models.train`: train a model, validate on dev each epoch, keep the best
checkpoint, evaluate it on test (SPEC §5).

With no arguments: AVSE on the embedded synthetic data set, on CPU in a few minutes.

Config precedence (later wins): trainer defaults < the model's recipe < the packaged preset
`configs/<model>-synthetic.toml` (only with --data synthetic) < --config FILE (TOML or JSON) <
command-line options. `--resume` continues the run in --out from its last checkpoint (end of the last
finished epoch), with its stored config; options given on the command line still override it.

Run folder: config.json, vocab.json, best/ and last/ checkpoints (see checkpoint.py), metrics.jsonl,
metrics.csv, loss.png, rsum.png, tensorboard/ (when installed), metrics.json (test of the best).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import shutil
import signal
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from . import backbones, distributed
from .checkpoint import (check_finite_state, load_train_state, load_weights, read_checkpoint_config,
                         read_checkpoint_json, read_json, resolve, save_checkpoint, verified)
from .data import Split, SyntheticConfig, Vocabulary, ensure_synthetic, shuffled_batches
from .data.images import BadImageError, ImageOptions, ImageSplit, is_raw_image_data
from .errors import NonFiniteError
from .evaluation import evaluate_split, format_table
from .models import DataInfo, available_models, build_model, get_model_class, is_finite_number, is_int

DEFAULTS = {
    "model": "avse",
    "data": "synthetic",
    "features": None,          # None: the model's choice ("regions" or "grids")
    "out": None,               # None: runs/<model>-<data name>
    "seed": 0,
    "device": "auto",          # auto: cuda when available, else cpu
    "precision": "fp32",       # fp32 | bf16 | fp16 (fp16: CUDA only, with a grad scaler)
    "epochs": 25,
    "batch_size": 128,
    "lr": 2e-4,
    "optimizer": "adam",       # adam | adamw
    "weight_decay": 0.0,
    "grad_clip": 2.0,          # on unscaled gradients (AVSE's release clipped AMP-scaled ones)
    "lr_milestones": [],
    "lr_gamma": 0.1,
    "eval_batch_size": 256,
    "vocab_min_count": 4,
    "vocab": None,             # a SCAN vocab JSON to use instead of building one from train captions
    "test_split": "test",
    "images": None,            # raw images: the image folder (Karpathy JSON; plain layout: default the data folder)
    "image_size": 224,         # raw images: side S of the S x S network input
    "augment": "crop_flip",    # raw images: the release's random crop + flip; "crop" (no flip) or "none"
    "workers": 2,              # raw images: DataLoader worker processes decoding images (0: in the training process)
    "bad_images": "error",     # raw images: an unreadable image stops training ("skip": its pairs are left out)
    "progress": True,
    "threads": None,           # CPU threads for torch (None: torch's default, one per core)
    "model_options": {},
    "synthetic": {},           # SyntheticConfig fields
}

KILL_ENV = "VSE_TRAIN_KILL_AFTER_STEPS"  # testing hook: signal this process after N optimizer steps,
SIGNAL_ENV = "VSE_TRAIN_KILL_SIGNAL"    # with this signal (default KILL; INT stands for Ctrl-C)


# ----------------------------------------------------------------------------------------- config
def _read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        if p.suffix == ".json":
            cfg = json.loads(p.read_text())
        else:
            import tomllib

            cfg = tomllib.loads(p.read_text())
    except Exception as e:
        raise ValueError(f"{p}: cannot parse config ({e})") from None
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"{p}: unknown key(s) {unknown}; known: {sorted(DEFAULTS)}")
    return cfg


def _preset(model: str, data: str = "synthetic") -> dict:
    try:
        text = resources.files("vse_models").joinpath("configs", f"{model}-{data}.toml").read_text()
    except (FileNotFoundError, OSError):
        return {}
    import tomllib

    return tomllib.loads(text)


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if k in ("model_options", "synthetic") and isinstance(v, dict):
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return out


def _parse_kv(items: list[str] | None, what: str) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"{what} expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vse-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", help=f"model name, one of {available_models()} (default avse)")
    a("--data", help="'synthetic' (default: the embedded data set), 'synthetic-images' (the same world rendered "
                     "as images), a folder in the SCAN precomp layout, a folder with {split}_images.txt + "
                     "{split}_caps.txt, or a Karpathy split JSON (dataset_flickr30k.json)")
    a("--features", choices=["regions", "grids", "images"], help="what to read (default: the model's; raw-image "
                                                                 "data: images)")
    a("--images", help="raw images: the image folder (Karpathy JSON: required; plain layout: default the data folder)")
    a("--image-size", type=int, help="raw images: network input side (default 224)")
    a("--augment", choices=["crop_flip", "crop", "none"], help="raw images: training augmentation (default "
                                                               "crop_flip, the release's)")
    a("--workers", type=int, help="raw images: image-decoding worker processes (default 2)")
    a("--bad-images", choices=["error", "skip"], help="raw images: an unreadable training image stops the run "
                                                      "(error, default) or its pairs are left out (skip)")
    a("--epochs", type=int)
    a("--batch-size", type=int)
    a("--lr", type=float)
    a("--optimizer", choices=["adam", "adamw"])
    a("--weight-decay", type=float)
    a("--grad-clip", type=float, help="max gradient norm, 0 = off")
    a("--lr-milestones", type=lambda s: [int(x) for x in s.split(",") if x], help="e.g. 15,20")
    a("--seed", type=int)
    a("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    a("--precision", choices=["fp32", "bf16", "fp16"])
    a("--out", help="run folder (default runs/<model>-<data>)")
    a("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    a("--overwrite", action="store_true",
      help="start a new run in a non-empty --out, replacing the files an earlier run wrote there")
    a("--config", help="TOML or JSON file with any of these options (command line wins)")
    a("--option", action="append", metavar="KEY=VALUE", help="model option (repeatable), e.g. embed_size=512")
    a("--synthetic", action="append", metavar="KEY=VALUE", help="synthetic data option, e.g. n_train=500")
    a("--vocab", help="SCAN vocab JSON to use (default: built from the training captions)")
    a("--eval-batch-size", type=int)
    a("--test-split", help="split evaluated at the end (default test; COCO: testall)")
    a("--threads", type=int, help="CPU threads (default: one per core; 1 is faster on a busy machine)")
    a("--no-progress", dest="progress", action="store_const", const=False, help="no progress bars")
    return p


def _cli_overrides(args) -> dict:
    skip = {"resume", "overwrite", "config", "option", "synthetic"}
    out = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    if args.option:
        out["model_options"] = _parse_kv(args.option, "--option")
    if args.synthetic:
        out["synthetic"] = _parse_kv(args.synthetic, "--synthetic")
    return out


def resolve_config(args) -> dict:
    cli = _cli_overrides(args)
    file_cfg = _read_config_file(args.config) if args.config else {}
    model = cli.get("model", file_cfg.get("model", DEFAULTS["model"]))
    data = cli.get("data", file_cfg.get("data", DEFAULTS["data"]))
    cls = get_model_class(model)
    cfg = _merge(DEFAULTS, {"model": model, **cls.recipe})
    if data in ("synthetic", "synthetic-images"):
        cfg = _merge(cfg, _preset(model, data))
    cfg = _merge(_merge(cfg, file_cfg), cli)
    if cfg["out"] is None:
        cfg["out"] = str(Path("runs") / f"{cfg['model']}-{Path(cfg['data']).stem}")
    if is_raw_image_data(cfg["data"]):  # raw images: the model's image side is a backbone
        if cfg["features"] not in (None, "images"):
            raise ValueError(f"--features {cfg['features']}: --data {cfg['data']} holds raw images (use --features "
                             f"images, or vse-extract to precompute grids)")
        cfg["features"] = "images"
        cfg["model_options"] = {**cfg["model_options"], "features": "images"}
    cls.resolve_options(cfg["model_options"])  # fail early on unknown or mistyped model options
    if cfg["features"] is None:
        cfg["features"] = cls.features_for(cfg["model_options"])
    validate_run_config(cfg)
    return cfg


# key: (check, what it must be). Checked on the merged config, so config files get the same checks.
_RUN_CHECKS = {
    "epochs": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "eval_batch_size": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "threads": (lambda v: v is None or (is_int(v) and v >= 1), "an integer >= 1 (or unset: one per core)"),
    "seed": (is_int, "an integer"),
    "lr": (lambda v: is_finite_number(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: is_finite_number(v) and v >= 0, "a finite number >= 0"),
    "grad_clip": (lambda v: v is None or (is_finite_number(v) and v >= 0), "a finite number >= 0 (0 = off)"),
    "lr_gamma": (lambda v: is_finite_number(v) and v > 0, "a finite number > 0"),
    "lr_milestones": (lambda v: isinstance(v, list) and all(is_int(m) and m >= 0 for m in v),
                      "a list of epoch numbers >= 0"),
    "vocab_min_count": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "precision": (lambda v: v in ("fp32", "bf16", "fp16"), "one of fp32, bf16, fp16"),
    "optimizer": (lambda v: v in ("adam", "adamw"), "adam or adamw"),
    "features": (lambda v: v in ("regions", "grids", "images"), "regions, grids or images"),
    "image_size": (lambda v: is_int(v) and v >= 8, "an integer >= 8"),
    "workers": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "augment": (lambda v: v in ("crop_flip", "crop", "none"), "crop_flip, crop or none"),
    "bad_images": (lambda v: v in ("error", "skip"), "error or skip"),
    "images": (lambda v: v is None or isinstance(v, str), "a folder"),
    "progress": (lambda v: isinstance(v, bool), "true or false"),
    "device": (lambda v: isinstance(v, str), "a device name"),
    "data": (lambda v: isinstance(v, str), "'synthetic' or a folder"),
    "test_split": (lambda v: isinstance(v, str) and v != "", "a split name"),
}


def validate_run_config(cfg: dict) -> None:
    """Refuses bad values before any work, naming the option: `--batch-size 0` must not reach a loop."""
    for key, (ok, what) in _RUN_CHECKS.items():
        if not ok(cfg.get(key)):
            raise ValueError(f"--{key.replace('_', '-')} must be {what}, got {cfg.get(key)!r}")
    pick_device(cfg["device"])


# ------------------------------------------------------------------------------------------ data
def data_root(cfg: dict, verbose: bool = True) -> Path:
    if cfg["data"] == "synthetic":
        return ensure_synthetic(SyntheticConfig.from_dict(cfg["synthetic"]), verbose=verbose)
    if cfg["data"] == "synthetic-images":
        from .data.synthetic import ensure_synthetic_images

        return ensure_synthetic_images(SyntheticConfig.from_dict(cfg["synthetic"]), verbose=verbose)
    root = Path(cfg["data"]).expanduser()
    if root.suffix == ".json" and root.is_file():  # a Karpathy split JSON
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"--data: folder not found: {root} (expected the SCAN precomp layout, "
                                f"e.g. data/f30k_precomp with train_ims.npy, train_caps.txt, ...)")
    return root


def with_data_paths(options: dict, root: Path) -> dict:
    """Model options with "{data}" in a backbone path replaced by the data folder (the synthetic-images presets'
    text backbone is `{data}/bert`, written beside the images)."""
    folder = root if root.is_dir() else root.parent
    return {k: v.replace("{data}", str(folder)) if isinstance(v, str) and k in ("text_backbone", "image_weights") else v
            for k, v in options.items()}


def image_options(run: dict) -> ImageOptions:
    """The raw-image settings of a run config; a key it lacks takes the run default (DEFAULTS)."""
    return ImageOptions(**{key: run.get(key, DEFAULTS[key])
                           for key in ("image_size", "augment", "workers", "bad_images")}).check()


def load_split(root: Path, split: str, vocab: Vocabulary | None, features: str, info: DataInfo | None = None,
               run: dict | None = None) -> Split | ImageSplit:
    if features == "images":
        run = run or {}
        return ImageSplit(root, split, vocab, images=run.get("images"), options=image_options(run))
    s = Split(root, split, vocab, features)
    if info is not None and (s.feature_dim != info.feature_dim):
        raise ValueError(f"{s.feature_path}: feature size {s.feature_dim} does not match the model's "
                         f"{info.feature_dim} (from the training data or checkpoint)")
    return s


# --------------------------------------------------------------------------------------- helpers
def pick_device(name: str) -> torch.device:
    """'auto' (CUDA when present), or a torch device name that exists on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device: unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda}); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif device.type != "cpu":
        backend = getattr(torch.backends, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"--device {name}: device type {device.type!r} is not available here; use cpu or cuda")
    return device


def autocast_dtype(precision: str, device: torch.device):
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (use bf16 on CPU)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def make_optimizer(model, cfg):
    groups = model.param_groups(cfg["lr"])
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise ValueError(f"optimizer must be 'adam' or 'adamw', got {cfg['optimizer']!r}")


def _progress(iterable, enabled: bool, **kw):
    """A tqdm bar on a terminal; a redirected stderr gets none (it would fill a log with carriage returns)."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, dynamic_ncols=True, leave=False, **kw)


class Console:
    """What the console shows, also appended to the run folder's train.log (without progress bars) from
    the moment the folder exists; lines said before that are written then. Silent on ranks other than 0."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.pending, self.log = enabled, [], None

    def __call__(self, text: str = "", **_print_options) -> None:
        if not self.enabled:
            return
        print(text, flush=True)
        if self.log is not None:
            self.log.write(text + "\n")
            self.log.flush()
        else:
            self.pending.append(text)

    def attach(self, path: Path) -> None:
        if self.enabled:
            self.log = open(path, "a", encoding="utf-8")
            self.log.write("".join(line + "\n" for line in self.pending))
            self.log.flush()
            self.pending = []

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


class Logger:
    """metrics.jsonl + metrics.csv rewritten from the history (consistent after a resume), TensorBoard
    when installed, PNG plots when matplotlib is installed: loss.png with one panel per loss term the model
    reports (AVSE's near-constant regulariser would flatten its matching loss in a single curve), rsum.png."""

    def __init__(self, out: Path, say=print):
        self.out, self.say = out, say
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard not installed
            say("note: TensorBoard is not installed; logging to metrics.jsonl / metrics.csv only")
        self.warned_plot = False

    def write(self, history: list[dict]) -> None:
        rows = [{k: v for k, v in h.items() if k != "dev"} | {f"dev_{k}": v for k, v in h["dev"].items()}
                for h in history]
        tmp = self.out / "metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.out / "metrics.jsonl")
        with open(self.out / "metrics.csv.tmp", "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
            w.writeheader()
            w.writerows(rows)
        os.replace(self.out / "metrics.csv.tmp", self.out / "metrics.csv")
        if self.tb is not None:
            last = rows[-1]
            for k, v in last.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, last["epoch"])
            self.tb.flush()
        self.plot(history)

    def plot(self, history: list[dict]) -> list[str]:
        """Draws loss.png and rsum.png from the history; returns the names of the files written."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            if not self.warned_plot:
                self.say("note: matplotlib is not installed, so no loss.png / rsum.png "
                         "(pip install matplotlib, then vse-train --out RUN --resume draws them)")
                self.warned_plot = True
            return []
        epochs = [h["epoch"] for h in history]
        terms = ["train_loss"] + sorted({k for h in history for k in h if k.startswith("train_") and k != "train_loss"})
        panels = {"loss": [(t, [h.get(t, float("nan")) for h in history]) for t in terms],
                  "rsum": [("dev rsum", [h["dev"]["rsum"] for h in history])]}
        for name, curves in panels.items():
            fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.3), squeeze=False)
            for ax, (label, ys) in zip(axes[0], curves):
                ax.plot(epochs, ys, marker="o")
                finite = [y for y in ys if y == y]
                if finite and min(finite) > 0 and max(finite) > 20 * min(finite):
                    ax.set_yscale("log")  # all-negatives warm-up losses are ~100x the hardest-negative ones
                ax.set_title({"train_loss": "training loss (total)"}.get(label, label.replace("train_", "")))
                ax.set_xlabel("epoch")
                ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(self.out / f"{name}.png.tmp.png", dpi=100)
            plt.close(fig)
            os.replace(self.out / f"{name}.png.tmp.png", self.out / f"{name}.png")
        return [f"{name}.png" for name in panels]


# ------------------------------------------------------------------------------------- run folder
# What a run writes into its folder (and the leftovers of killed saves: .best.old, .last.tmp-<pid>, *.tmp).
RUN_FILES = {"config.json", "vocab.json", "metrics.json", "metrics.jsonl", "metrics.csv", "loss.png", "rsum.png",
             "train.log", "best", "last", "tensorboard"}


def _is_run_file(name: str) -> bool:
    if name.split(".tmp")[0] in RUN_FILES:  # metrics.jsonl.tmp, loss.png.tmp.png: a killed write
        return True
    return any(name == f".{c}.old" or name.startswith(f".{c}.tmp-") for c in ("best", "last"))


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to resume from (None for a new run), or an error before anything is written:
    a new run needs an empty or new --out (or --overwrite); --resume needs a usable last checkpoint."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if resume:
        last = resolve(out / "last")
        if last is None:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {out / 'last'} to continue from "
                                    f"(start the run again with --overwrite, or choose another --out)")
        return last
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        ours = [e for e in entries if _is_run_file(e)]
        what = (f"files of an earlier run ({', '.join(ours[:6])})" if ours
                else f"files that are not a run's ({', '.join(entries[:6])})")
        raise FileExistsError(f"--out {out} already holds {what}; pass --resume to continue that run, "
                              f"--overwrite to replace it, or choose another --out")
    return None


def remove_run_files(out: Path, say=print, quiet: bool = False) -> None:
    """--overwrite: removes what a run writes; anything else in the folder is left alone (and said so)."""
    if not out.is_dir():
        return
    kept = []
    for p in sorted(out.iterdir()):
        if _is_run_file(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        else:
            kept.append(p.name)
    if kept and not quiet:
        say(f"note: --overwrite kept {len(kept)} file(s) in {out} that a run does not write: {', '.join(kept[:6])}")


# ------------------------------------------------------------------------------------------ train
class _GlobalBatchLoss(torch.nn.Module):
    """What DistributedDataParallel wraps: encode the local batch, gather embeddings (with gradients) and
    image ids from all ranks, and take the model's loss on the global batch."""

    def __init__(self, model, ctx: distributed.Context):
        super().__init__()
        self.model, self.ctx = model, ctx

    def forward(self, batch, epoch: int):
        img = distributed.gather(self.model.encode_images(batch), self.ctx)
        txt = distributed.gather(self.model.encode_texts(batch), self.ctx)
        return self.model.embedding_loss(img, txt, distributed.gather(batch.img_ids, self.ctx), epoch)


def _loss_step(model, batch, epoch: int, ctx: distributed.Context, ddp_loss):
    return ddp_loss(batch, epoch) if ctx.enabled else model.loss(batch, epoch)


def train(cfg: dict, resume: bool = False) -> dict | None:
    """Trains, then evaluates the best checkpoint on test. Under torchrun every rank calls this; rank 0
    alone writes the run folder and returns the result (the other ranks return None)."""
    ctx = distributed.setup(pick_device(cfg["device"]))
    run = {"created": False, "checkpointed": False}
    try:
        return _train(cfg, resume, ctx, run)
    except BaseException:
        # A new run that fails (or is interrupted) before its first checkpoint leaves nothing behind.
        if ctx.is_main and run["created"] and not run["checkpointed"]:
            remove_run_files(Path(cfg["out"]), quiet=True)
            if not any(Path(cfg["out"]).iterdir()):
                Path(cfg["out"]).rmdir()
        raise
    finally:
        distributed.teardown(ctx)


def epochs_done(meta: dict) -> int:
    """Finished epochs recorded in a checkpoint's meta.json (of any version: see _upgrade_meta)."""
    return int(_upgrade_meta(meta)["epochs_done"])


def _train(cfg: dict, resume: bool, ctx: distributed.Context, run: dict) -> dict | None:
    t_start = time.time()
    say = Console(ctx.is_main)
    out = Path(cfg["out"])
    overwrite = cfg.get("_overwrite", False)
    last_dir = check_run_folder(out, resume, overwrite)
    state = None
    if resume:
        stored = read_checkpoint_config(last_dir)["run"]
        cfg = _merge(stored, {k: v for k, v in cfg.items() if k in cfg.get("_explicit", ())})
        state = load_train_state(last_dir)
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    distributed.barrier(ctx)  # every rank has looked at --out before rank 0 changes it

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = ctx.device
    amp = autocast_dtype(cfg["precision"], device)
    torch.manual_seed(cfg["seed"])
    if not ctx.is_main:
        distributed.barrier(ctx)  # rank 0 generates the synthetic data set (once) first
    root = data_root(cfg, verbose=ctx.is_main)
    if ctx.is_main:
        distributed.barrier(ctx)
    cfg["model_options"] = with_data_paths(cfg["model_options"], root)
    train_split = load_split(root, "train", None, cfg["features"], run=cfg)
    train_split.on_bad_image = say
    if state is not None:
        vocab = Vocabulary.load(verified(last_dir / "vocab.json"))
    elif cfg["vocab"]:
        vocab = Vocabulary.load(cfg["vocab"])
    else:
        vocab = Vocabulary.build(train_split.captions, cfg["vocab_min_count"])
    train_split.set_vocab(vocab)
    info = DataInfo(vocab_size=len(vocab), feature_dim=train_split.feature_dim, set_size=train_split.set_size,
                    grid_size=train_split.grid_size, captions_per_image=train_split.captions_per_image,
                    image_size=getattr(train_split, "image_size", None))
    dev_split = load_split(root, "dev", vocab, cfg["features"], info, run=cfg)
    # Read now, so that a missing or malformed test split stops the run before training, not after it.
    test_split = load_split(root, cfg["test_split"], vocab, cfg["features"], info, run=cfg)

    with backbones.from_checkpoint() if state is not None else contextlib.nullcontext():
        model = build_model(cfg["model"], cfg["model_options"], info)  # resumed: the checkpoint has the weights
    model.prepare(train_split)
    model.to(device)
    if ctx.is_main:  # data and model are set up: only now does the run folder change
        if overwrite:
            remove_run_files(out, say)
        run["created"] = not resume
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        vocab.save(out / "vocab.json")
        say.attach(out / "train.log")
    ddp_loss = None
    if ctx.enabled:
        # --batch-size is per process: the loss ranks the global batch of batch_size * world_size pairs.
        distributed.convert_batchnorm(model)
        ddp_loss = torch.nn.parallel.DistributedDataParallel(
            _GlobalBatchLoss(model, ctx), device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=model.has_unused_parameters)
        torch.manual_seed(cfg["seed"] + 7919 * ctx.rank)  # distinct augmentation per rank
    optimizer = make_optimizer(model, cfg)
    global_batch = cfg["batch_size"] * ctx.world_size
    steps_per_epoch = train_split.n_captions // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"global batch {global_batch} exceeds the {train_split.n_captions} training captions")
    scheduler = model.make_scheduler(optimizer, cfg, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg["precision"] == "fp16")

    # Epochs are numbered from 1 everywhere (console, metrics, checkpoints); `start_epoch` is the 0-based
    # index of the next epoch, i.e. the number of epochs done.
    start_epoch, step, best_rsum, history, best_epoch, wall_before = 0, 0, -1.0, [], 0, 0.0
    if state is not None:
        load_weights(model, last_dir)
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        meta = _upgrade_meta(read_checkpoint_json(last_dir, "meta.json"))
        start_epoch, step, best_rsum = epochs_done(meta), meta["step"], meta["best_rsum"]
        history, best_epoch, wall_before = meta["history"], meta["best_epoch"], meta.get("wall_time_s", 0.0)
        if ctx.enabled:  # the saved RNG state is rank 0's: give each rank its own stream again
            torch.manual_seed(cfg["seed"] + 7919 * ctx.rank + 104_729 * start_epoch)
        if start_epoch < cfg["epochs"]:
            say(f"resuming {out}: epochs 1-{start_epoch} of {cfg['epochs']} are done (step {step}); training goes "
                f"on with epoch {start_epoch + 1} from its start (steps after that checkpoint are redone)")

    n_params = sum(p.numel() for p in model.parameters())
    ranks = f" x {ctx.world_size} processes (global batch {global_batch})" if ctx.enabled else ""
    say(f"model {cfg['model']} ({n_params / 1e6:.2f} M parameters) on {device}{ranks}, data {root} "
          f"({cfg['features']}: {train_split.n_images} train images, {train_split.n_captions} captions, "
          f"vocab {len(vocab)}), {cfg['epochs']} epochs of {steps_per_epoch} steps", flush=True)
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    logger = Logger(out, say) if ctx.is_main else None
    for epoch in range(start_epoch, cfg["epochs"]):
        t0 = time.time()
        model.train()
        gen = torch.Generator().manual_seed(cfg["seed"] * 1_000_003 + epoch)  # same order on resume
        # Global batches of one seeded permutation; each rank takes its slice (a distributed sampler).
        share = slice(ctx.rank * cfg["batch_size"], (ctx.rank + 1) * cfg["batch_size"])
        index_batches = [idx[share] for idx in shuffled_batches(train_split.n_captions, global_batch, gen)]
        batches = _progress(range(len(index_batches)), cfg["progress"] and ctx.is_main,
                            desc=f"epoch {epoch + 1}/{cfg['epochs']}")
        loader = train_split.train_batches(index_batches, epoch=epoch, seed=cfg["seed"])
        loss_sum, n_batches, part_sums = 0.0, 0, {}
        for _ in batches:
            where = f"epoch {epoch + 1}, step {step + 1}"
            try:
                batch = next(loader, None)
            except (NonFiniteError, BadImageError) as e:
                raise type(e)(f"{where}: {e}") from None
            if batch is None:  # raw images with --bad-images skip: the last batches were left out
                break
            batch = batch.to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss, logs = _loss_step(model, batch, epoch, ctx, ddp_loss)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                terms = ", ".join(f"{k} {v:.4g}" for k, v in logs.items() if k != "loss")
                raise NonFiniteError(f"{where}: the training loss is {loss_value}{f' ({terms})' if terms else ''} "
                                     f"although the batch's features are finite: the model diverged (try a lower --lr)")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # a no-op without fp16's grad scaler
            clip = cfg["grad_clip"] if cfg["grad_clip"] and cfg["grad_clip"] > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            if not math.isfinite(grad_norm) and not scaler.is_enabled():  # fp16: the scaler skips the step
                raise NonFiniteError(f"{where}: the gradient norm is {grad_norm} (loss {loss_value:.4g}): "
                                     f"the model diverged (try a lower --lr)")
            scaler.step(optimizer)
            scaler.update()
            step += 1
            loss_sum += loss_value
            n_batches += 1
            for key, value in logs.items():  # the model's loss terms (e.g. AVSE's l_m, l_reg)
                if key != "loss":
                    part_sums[key] = part_sums.get(key, 0.0) + float(value)
            if hasattr(batches, "set_postfix"):
                batches.set_postfix(loss=f"{loss_value:.3f}")
            if kill_after and step >= kill_after:
                os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get(SIGNAL_ENV, "KILL")))
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        check_finite_state(model.state_dict(), f"after epoch {epoch + 1} (step {step}), the model")
        if not ctx.is_main:  # rank 0 evaluates and saves; the others wait for it
            distributed.barrier(ctx)
            continue
        dev = evaluate_split(model, dev_split, batch_size=cfg["eval_batch_size"], autocast_dtype=amp)
        record = {"epoch": epoch + 1, "step": step, "train_loss": _round(loss_sum / max(1, n_batches)), "lr": lr,
                  **{f"train_{key}": _round(total / max(1, n_batches)) for key, total in part_sums.items()},
                  "epoch_time_s": round(time.time() - t0, 2), "dev": dev}
        history.append(record)
        improved = dev["rsum"] > best_rsum
        say(f"epoch {epoch + 1}/{cfg['epochs']}: loss {record['train_loss']:.4f}, dev rsum {dev['rsum']:.1f} "
              f"(i2t R@1 {dev['i2t_r1']:.1f}, t2i R@1 {dev['t2i_r1']:.1f}){' *best*' if improved else ''} "
              f"[{record['epoch_time_s']:.0f} s]", flush=True)
        if improved:
            best_rsum, best_epoch = dev["rsum"], epoch + 1
        meta = {"epoch": epoch + 1, "epochs_done": epoch + 1, "step": step, "best_rsum": best_rsum,
                "best_epoch": best_epoch, "dev": dev, "history": history,
                "wall_time_s": round(wall_before + time.time() - t_start, 1)}
        if improved:
            save_checkpoint(out / "best", model, config=cfg, vocab=vocab, meta=meta)
        train_state = {"optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict() if scheduler is not None else None,
                       "scaler": scaler.state_dict(), "rng_cpu": torch.get_rng_state(),
                       "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        save_checkpoint(out / "last", model, config=cfg, vocab=vocab, meta=meta, train_state=train_state)
        run["checkpointed"] = True
        logger.write(history)
        distributed.barrier(ctx)

    if not ctx.is_main:
        return None

    if start_epoch >= cfg["epochs"] and (out / "metrics.json").is_file():
        # A finished run resumed: its record stays as it is; the plots are drawn again (e.g. after
        # matplotlib was installed).
        result = read_json(out / "metrics.json")
        drawn = logger.plot(history)
        say(f"the run in {out} is finished ({cfg['epochs']} of {cfg['epochs']} epochs); its metrics.json is kept"
            + (f", {' and '.join(drawn)} drawn again" if drawn else ""))
        say.close()
        return result

    # Final: the best-by-dev checkpoint on the test split (never looked at during training).
    best_dir = resolve(out / "best")
    if best_dir is None:
        raise RuntimeError(f"no best checkpoint in {out}")
    load_weights(model, best_dir)
    test = evaluate_split(model, test_split, batch_size=cfg["eval_batch_size"], autocast_dtype=amp)
    best_meta = _upgrade_meta(read_checkpoint_json(best_dir, "meta.json"))
    result = {"test": test, "dev": best_meta["dev"], "best_epoch": epochs_done(best_meta), "model": cfg["model"],
              "data": cfg["data"], "features": cfg["features"], "test_split": cfg["test_split"],
              "epochs": cfg["epochs"], "seed": cfg["seed"], "device": str(device),
              "threads": torch.get_num_threads() if device.type == "cpu" else None,
              "wall_time_s": round(wall_before + time.time() - t_start, 1)}
    (out / "metrics.json.tmp").write_text(json.dumps(result, indent=1))
    os.replace(out / "metrics.json.tmp", out / "metrics.json")
    say(f"\nbest epoch {result['best_epoch']} (dev rsum {best_meta['dev']['rsum']:.1f}); "
        f"{cfg['model']} on {cfg['data']} {cfg['test_split']} ({test_split.n_images} images):")
    say(format_table({f"{cfg['test_split']}": test, "dev (best)": best_meta["dev"]}))
    written = [f for f in ("metrics.json", "metrics.jsonl", "metrics.csv", "loss.png", "rsum.png", "train.log",
                           "tensorboard") if (out / f).exists()]
    say(f"run folder: {out}  ({', '.join(written)}, best/, last/); wall time {result['wall_time_s']:.0f} s")
    say.close()
    return result


def _round(x: float) -> float:
    return float(f"{x:.6g}")  # a loss mean carries no more than float32's digits


def _upgrade_meta(meta: dict) -> dict:
    """meta.json in today's form. Checkpoints written before epochs were numbered from 1 stored the 0-based
    index of the last finished epoch as "epoch" and had no "epochs_done"."""
    if "epochs_done" in meta:
        return meta
    meta = dict(meta, epochs_done=int(meta["epoch"]) + 1, epoch=int(meta["epoch"]) + 1,
                best_epoch=int(meta["best_epoch"]) + 1)
    meta["history"] = [dict(h, epoch=int(h["epoch"]) + 1) for h in meta["history"]]
    return meta


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = None
    try:
        cfg = resolve_config(args)
        cfg["_explicit"] = tuple(_cli_overrides(args))
        cfg["_overwrite"] = args.overwrite
        train(cfg, resume=args.resume)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"vse-train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vse-train: interrupted. {_resume_hint(Path(cfg['out']) if cfg else None)}", file=sys.stderr)
        return 130
    return 0


def _resume_hint(out: Path | None) -> str:
    last = resolve(out / "last") if out is not None else None
    if last is None:
        return "No epoch had finished, so there is nothing to resume (and nothing was left in --out)."
    try:
        done = epochs_done(read_checkpoint_json(last, "meta.json"))
    except ValueError:
        done = "?"
    return (f"Checkpoints are written whole or not at all; the last one holds epochs 1-{done}. "
            f"Continue with: vse-train --out {out} --resume")


if __name__ == "__main__":
    sys.exit(main())
