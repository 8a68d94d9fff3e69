"""Checkpoints (SPEC §5): a folder per checkpoint, written atomically.

    <ckpt>/model.safetensors   weights (and persistent buffers) — safetensors, no pickle
    <ckpt>/config.json         {"model", "model_options", "data_info", "run": the run config}
    <ckpt>/vocab.json          SCAN vocabulary
    <ckpt>/meta.json           epoch, step, dev metrics, history so far
    <ckpt>/train_state.pt      optional: optimizer, scheduler, grad scaler, RNG state (torch.save of
                               tensors and plain containers only, loaded with weights_only=True)

Atomicity: everything goes to a temporary sibling folder first; then the old folder is moved aside,
the new one renamed into place and the old one removed. A run killed at any moment leaves either the
old or the new checkpoint complete (`resolve` falls back to the moved-aside one).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data.vocab import Vocabulary
from .models import DataInfo, build_model


def _fsync_dir_files(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def save_checkpoint(folder: str | Path, model, *, config: dict, vocab: Vocabulary, meta: dict,
                    train_state: dict | None = None) -> Path:
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    ckpt_config = {"model": model.name, "model_options": model.options, "data_info": model.info.to_dict(),
                   "run": config}
    (tmp / "config.json").write_text(json.dumps(ckpt_config, indent=1))
    vocab.save(tmp / "vocab.json")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    _fsync_dir_files(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def resolve(folder: str | Path) -> Path | None:
    """The complete checkpoint at `folder` (or the one moved aside by an interrupted save), else None."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(f".{folder.name}.old")):
        if (candidate / "meta.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    return None


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """`path` is a checkpoint folder, or a run folder holding `best/` and `last/`."""
    path = Path(path)
    found = resolve(path) or resolve(path / which)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {path} (looked for {path}/model.safetensors and "
                                f"{path / which}/model.safetensors)")
    return found


def read_checkpoint_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def load_checkpoint(path: str | Path, which: str = "best", device="cpu"):
    """(model in eval mode on `device`, vocab, config, meta) from a checkpoint or run folder."""
    folder = find_checkpoint(path, which)
    config = read_checkpoint_config(folder)
    model = build_model(config["model"], config["model_options"], DataInfo(**config["data_info"]))
    load_weights(model, folder)
    vocab = Vocabulary.load(folder / "vocab.json")
    meta = json.loads((folder / "meta.json").read_text())
    return model.to(device).eval(), vocab, config, meta


def load_weights(model, folder: str | Path) -> None:
    state = load_file(str(Path(folder) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder}/model.safetensors does not fit model {model.name!r}: "
                         f"missing {missing}, unexpected {unexpected}")


def load_train_state(folder: str | Path) -> dict:
    return torch.load(Path(folder) / "train_state.pt", map_location="cpu", weights_only=True)
