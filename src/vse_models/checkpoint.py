"""Checkpoints (SPEC §5): a folder per checkpoint, written atomically, every file checksummed.

    <ckpt>/model.safetensors   weights (and persistent buffers) — safetensors, no pickle
    <ckpt>/config.json         {"model", "model_options", "data_info", "run": the run config}
    <ckpt>/vocab.json          SCAN vocabulary
    <ckpt>/meta.json           epoch, step, dev metrics, history so far
    <ckpt>/train_state.pt      optional: optimizer, scheduler, grad scaler, RNG state (torch.save of
                               tensors and plain containers only, loaded with weights_only=True)
    <ckpt>/checksums.json      {"sha256": {file: hex digest}} of the files above, verified on every read

Atomicity: everything goes to a temporary sibling folder `.<name>.tmp-<pid>` first; then the old folder is
moved aside to `.<name>.old`, the new one renamed into place and the old one removed. At every moment one
of `<name>` and `.<name>.old` is complete (`resolve` falls back to the moved-aside one), and a save first
puts a moved-aside checkpoint back and removes the leftovers of killed saves, so two kills in a row cannot
remove the only complete checkpoint. Weights that are not finite are never written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import backbones
from .data.vocab import Vocabulary
from .errors import CheckpointError, NonFiniteError
from .models import DataInfo, build_model

CHECKSUMS = "checksums.json"
_REQUIRED = ("model.safetensors", "config.json", "vocab.json", "meta.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_finite_state(state: dict, what: str) -> None:
    """Raises NonFiniteError naming the first tensors of `state` that hold NaN or infinite values."""
    bad = [f"{name} ({int((~torch.isfinite(t)).sum())} of {t.numel()} values)"
           for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise NonFiniteError(f"{what}: NaN or infinite values in {', '.join(bad[:5])}"
                             f"{f' and {len(bad) - 5} more tensors' if len(bad) > 5 else ''}")


def _clean_leftovers(folder: Path) -> None:
    """Before a save: put a checkpoint moved aside by a killed save back in place (when `folder` is not a
    complete checkpoint) and remove the temporary folders of killed saves."""
    old = folder.with_name(f".{folder.name}.old")
    if _is_complete(old) and not _is_complete(folder):
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(old, folder)
    shutil.rmtree(old, ignore_errors=True)
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(folder: str | Path, model, *, config: dict, vocab: Vocabulary, meta: dict,
                    train_state: dict | None = None) -> Path:
    folder = Path(folder)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    check_finite_state(state, f"refusing to save {folder}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    old = folder.with_name(f".{folder.name}.old")
    tmp.mkdir()
    save_file(state, str(tmp / "model.safetensors"))
    ckpt_config = {"model": model.name, "model_options": model.options, "data_info": model.info.to_dict(),
                   "run": config}
    (tmp / "config.json").write_text(json.dumps(ckpt_config, indent=1))
    vocab.save(tmp / "vocab.json")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    files = sorted(p.name for p in tmp.iterdir())
    (tmp / CHECKSUMS).write_text(json.dumps({"sha256": {f: _sha256(tmp / f) for f in files}}, indent=1))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    _fsync(folder.parent)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def _is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _REQUIRED)


def resolve(folder: str | Path) -> Path | None:
    """The complete checkpoint at `folder` (or the one moved aside by an interrupted save), else None."""
    folder = Path(folder)
    for candidate in (folder, folder.with_name(f".{folder.name}.old")):
        if _is_complete(candidate):
            return candidate
    return None


def find_checkpoint(path: str | Path, which: str = "best") -> Path:
    """`path` is a checkpoint folder, or a run folder holding `best/` and `last/`."""
    path = Path(path)
    found = resolve(path) or resolve(path / which)
    if found is None:
        raise FileNotFoundError(f"no checkpoint at {path} (looked for {path}/model.safetensors and "
                                f"{path / which}/model.safetensors, each beside config.json, vocab.json, meta.json)")
    return found


def verified(path: Path) -> Path:
    """`path` after checking it against its folder's checksums.json (CheckpointError naming the file).
    Checkpoints written before checksums existed are read unchecked."""
    sums_path = path.parent / CHECKSUMS
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    if not sums_path.is_file():
        return path
    sums = read_json(sums_path).get("sha256")
    if not isinstance(sums, dict) or path.name not in sums:
        raise CheckpointError(f"{sums_path}: has no checksum for {path.name} (the checkpoint is incomplete or was edited)")
    if _sha256(path) != sums[path.name]:
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt or was changed after it was saved")
    return path


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a missing, truncated or corrupt file is a CheckpointError naming it."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON, the file is truncated or corrupt ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_checkpoint_json(folder: str | Path, name: str) -> dict:
    return read_json(verified(Path(folder) / name))


def read_checkpoint_config(folder: str | Path) -> dict:
    config = read_checkpoint_json(folder, "config.json")
    missing = [k for k in ("model", "model_options", "data_info", "run") if k not in config]
    if missing:
        raise CheckpointError(f"{Path(folder) / 'config.json'}: missing key(s) {missing}")
    return config


def load_checkpoint(path: str | Path, which: str = "best", device="cpu"):
    """(model in eval mode on `device`, vocab, config, meta) from a checkpoint or run folder."""
    folder = find_checkpoint(path, which)
    config = read_checkpoint_config(folder)
    try:
        with backbones.from_checkpoint():  # a backbone's pretrained weights are replaced by the checkpoint's
            model = build_model(config["model"], config["model_options"], DataInfo(**config["data_info"]))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: cannot build the model it describes ({e})") from None
    load_weights(model, folder)
    vocab_path = verified(folder / "vocab.json")
    try:
        vocab = Vocabulary.load(vocab_path)
    except ValueError as e:  # names the file already
        raise CheckpointError(str(e)) from None
    meta = read_checkpoint_json(folder, "meta.json")
    return model.to(device).eval(), vocab, config, meta


def load_weights(model, folder: str | Path) -> None:
    path = verified(Path(folder) / "model.safetensors")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header or size
        raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
    check_finite_state(state, str(path))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{path} does not fit model {model.name!r}: {e}".replace("\n", " ")) from None
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit model {model.name!r}: missing {missing}, unexpected {unexpected}")


def load_train_state(folder: str | Path) -> dict:
    path = verified(Path(folder) / "train_state.pt")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip / unpickling errors of a truncated or corrupt file
        raise CheckpointError(f"{path}: cannot be read, truncated or corrupt ({type(e).__name__}: {e})") from None
