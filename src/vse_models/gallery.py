"""Gallery index files: a split's embeddings, encoded once, saved as one safetensors file that is read
memory-mapped (a 1M-image gallery is paged in chunk by chunk, never loaded whole).

File = a standard safetensors file (`safetensors.torch.load_file` reads it too):

    image.0, image.1, ...    the model's image embeddings, (N, ...) per part (one part for avse / vse,
                             a tuple of parts for mh-cvse: metadata image_tuple "true"), float32 (default)
                             or float16 / bfloat16
    text.0, ...              the split's caption embeddings (k·N, ...), when built with captions
    text_image               int64 (k·N,): the image (row of image.*) each caption belongs to
    image_ids.bytes/.offsets the image ids (UTF-8, offsets int64 (N + 1,)); absent: ids are "0", "1", ...
    texts.bytes/.offsets     the caption strings
    __metadata__             format "vse-kernels-gallery", version, what built it (model name, config_hash,
                             weights_sha256, vocab_sha256, checkpoint path), counts, parts, source data and
                             split, and data_sha256: the SHA-256 of all tensor bytes

Opening checks the header, every tensor's dtype/shape/offsets, the file size (a truncated or extended file
is refused) and, unless verify=False, the data checksum; `check_model` refuses an index built by another
model, configuration, set of weights or vocabulary. Writing goes to a temporary sibling file that is
renamed into place when complete (a killed build leaves no partial index); an existing file is replaced
only with overwrite=True; non-finite embeddings are refused before they are written. Every error is a
CheckpointError / NonFiniteError (ValueErrors) naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

from .checkpoint import _fsync, _sha256, read_checkpoint_config, read_json
from .errors import CheckpointError, NonFiniteError

FORMAT, VERSION = "vse-kernels-gallery", "1"
_DTYPES = {torch.float32: ("F32", np.float32), torch.float16: ("F16", np.float16),
           torch.bfloat16: ("BF16", np.int16), torch.int64: ("I64", np.int64), torch.uint8: ("U8", np.uint8)}
_BY_NAME = {name: (dt, np_dt) for dt, (name, np_dt) in _DTYPES.items()}
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PLACEHOLDER = "0" * 64
FINGERPRINT_KEYS = ("model", "config_hash", "weights_sha256", "vocab_sha256")


def model_fingerprint(checkpoint_folder: str | Path) -> dict:
    """What an index must have been built by: the model name, a hash of its configuration (model, options,
    data info) and the SHA-256 of its weights and vocabulary (from the checkpoint's checksums.json, else
    computed)."""
    folder = Path(checkpoint_folder)
    config = read_checkpoint_config(folder)
    canonical = json.dumps({k: config[k] for k in ("model", "model_options", "data_info")}, sort_keys=True)
    sums = read_json(folder / "checksums.json").get("sha256", {}) if (folder / "checksums.json").is_file() else {}
    return {"model": config["model"], "config_hash": hashlib.sha256(canonical.encode()).hexdigest(),
            "weights_sha256": sums.get("model.safetensors") or _sha256(folder / "model.safetensors"),
            "vocab_sha256": sums.get("vocab.json") or _sha256(folder / "vocab.json"),
            "checkpoint": str(folder)}


def encode_strings(strings: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(UTF-8 bytes uint8, offsets int64 (n + 1,)) of a list of strings."""
    raw = [s.encode("utf-8") for s in strings]
    offsets = np.zeros(len(raw) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in raw], out=offsets[1:])
    return torch.from_numpy(np.frombuffer(b"".join(raw), dtype=np.uint8).copy()), torch.from_numpy(offsets)


def decode_strings(data: torch.Tensor, offsets: torch.Tensor) -> list[str]:
    raw, off = data.numpy().tobytes(), offsets.tolist()
    return [raw[a:b].decode("utf-8") for a, b in zip(off[:-1], off[1:])]


def _header_bytes(header: dict) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to 8 bytes


class GalleryWriter:
    """Writes a gallery file whose tensor shapes are known up front, rows in any order and in pieces:

        with GalleryWriter(path, {"image.0": (torch.float16, (N, 8, 256))}, metadata) as w:
            w.write("image.0", start, rows)       # rows [start, start + len(rows))
        # on leaving the block: checksum, header, rename into place (an exception removes the temp file)
    """

    def __init__(self, path: str | Path, specs: dict, metadata: dict, *, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite=True (vse-search: --overwrite) to replace it")
        if self.path.is_dir():
            raise FileExistsError(f"{self.path} is a folder, not an index file")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.specs, offset, entries = {}, 0, {}
        for name, (dtype, shape) in specs.items():
            code, np_dtype = _DTYPES[dtype]
            shape = tuple(int(s) for s in shape)
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
            self.specs[name] = (dtype, shape, offset, nbytes)
            entries[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.data_bytes = offset
        meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
        self.header = {"__metadata__": {**meta, "format": FORMAT, "version": VERSION, "data_sha256": _PLACEHOLDER},
                       **entries}
        head = _header_bytes(self.header)
        self.data_start = 8 + len(head)
        self.rows_written = {name: 0 for name in specs}
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self.fh = open(self.tmp, "wb")
        self.fh.write(struct.pack("<Q", len(head)) + head)
        self.fh.truncate(self.data_start + self.data_bytes)

    def write(self, name: str, start: int, rows: torch.Tensor) -> None:
        dtype, shape, offset, nbytes = self.specs[name]
        rows = rows.detach().to("cpu", dtype).contiguous()
        if tuple(rows.shape[1:]) != shape[1:] or start < 0 or start + rows.size(0) > shape[0]:
            raise ValueError(f"{self.path}: rows {start}..{start + rows.size(0)} of shape {tuple(rows.shape)} do not "
                             f"fit tensor {name!r} of shape {shape}")
        if rows.is_floating_point() and not torch.isfinite(rows).all():
            bad = (~torch.isfinite(rows.reshape(rows.size(0), -1))).any(1).nonzero().flatten()[:5] + start
            raise NonFiniteError(f"{self.path}: refusing to write NaN or infinite embeddings ({name}, rows "
                                 f"{bad.tolist()}); the model or its input features are not finite")
        array = (rows.view(torch.int16) if dtype == torch.bfloat16 else rows).numpy()
        row_bytes = nbytes // max(1, shape[0])
        self.fh.seek(self.data_start + offset + start * row_bytes)
        self.fh.write(memoryview(array).cast("B"))
        self.rows_written[name] += rows.size(0)

    def finish(self) -> Path:
        missing = {n: (c, self.specs[n][1][0]) for n, c in self.rows_written.items() if c != self.specs[n][1][0]}
        if missing:
            raise ValueError(f"{self.path}: not every row was written: {missing} (rows written, rows)")
        self.fh.flush()
        self.header["__metadata__"]["data_sha256"] = _data_sha256(self.tmp, self.data_start, self.data_bytes)
        head = _header_bytes(self.header)
        assert 8 + len(head) == self.data_start  # the digest has the placeholder's length
        self.fh.seek(8)
        self.fh.write(head)
        self.fh.close()
        _fsync(self.tmp)
        os.replace(self.tmp, self.path)
        _fsync(self.path.parent)
        return self.path

    def abort(self) -> None:
        if not self.fh.closed:
            self.fh.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.finish()
        finally:
            if self.tmp.exists():  # an error here or in finish(): no partial file is left
                self.abort()
        return False


def _data_sha256(path: Path, start: int, nbytes: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        left = nbytes
        while left:
            block = fh.read(min(left, 1 << 24))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def _parts(prefix: str, names) -> list[str]:
    parts = sorted((n for n in names if n.startswith(prefix + ".") and n[len(prefix) + 1:].isdigit()),
                   key=lambda n: int(n.split(".")[1]))
    return parts


class IndexFile:
    """A file written by GalleryWriter, opened: header, tensor layout, size and (verify=True) checksum checked;
    `tensor(name)` memory-maps one tensor (copy-on-write: the file is never changed). `content` is the
    metadata's kind of file ("gallery"; vse_models.ann writes "faiss-units")."""

    content = "gallery"

    def __init__(self, path: str | Path, *, verify: bool = True):
        self.path = path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"index file not found: {path}")
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a gallery index (a safetensors file): only {size} bytes")
            n = struct.unpack("<Q", head)[0]
            if n > size - 8 or n > 1 << 30:
                raise CheckpointError(f"{path}: not a gallery index: header length {n} does not fit a {size}-byte file "
                                      f"(truncated, or not a safetensors file)")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: the header is not valid JSON, the file is truncated or corrupt ({e})") from None
        meta = header.pop("__metadata__", None) if isinstance(header, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a vse-kernels gallery index (no '{FORMAT}' format tag); "
                                  f"build one with vse-search RUN --build-index")
        if meta.get("version") != VERSION:
            raise CheckpointError(f"{path}: index format version {meta.get('version')!r}, this package reads {VERSION!r}")
        self.metadata, self.tensors = meta, {}
        end = 0
        for name, entry in sorted(header.items(), key=lambda kv: _offsets(path, kv)[0]):
            dtype, np_dtype, shape, (a, b) = *_dtype(path, name, entry), _shape(path, name, entry), _offsets(path, (name, entry))
            expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(np_dtype).itemsize
            if a != end or b - a != expected:
                raise CheckpointError(f"{path}: tensor {name!r} has data offsets [{a}, {b}], expected [{end}, {end + expected}]"
                                      f" for shape {shape}: the header is corrupt")
            end = b
            self.tensors[name] = (dtype, np_dtype, shape, 8 + n + a)
        if size != 8 + n + end:
            raise CheckpointError(f"{path}: {size} bytes, the header describes {8 + n + end}: the file is "
                                  f"{'truncated' if size < 8 + n + end else 'longer than its header says'} (rebuild it)")
        if meta.get("content", "gallery") != self.content:  # before the checksum: no hashing of a wrong file
            raise CheckpointError(f"{path} holds {meta.get('content', 'gallery')!r}, not {self.content!r}")
        if verify and _data_sha256(path, 8 + n, end) != meta.get("data_sha256"):
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt or was changed after it was built")

    def tensor(self, name: str) -> torch.Tensor:
        dtype, np_dtype, shape, offset = self.tensors[name]
        if 0 in shape:
            return torch.empty(shape, dtype=dtype)
        array = np.memmap(self.path, dtype=np_dtype, mode="c", offset=offset, shape=shape)
        t = torch.from_numpy(array)
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


class GalleryIndex(IndexFile):
    """An opened gallery file, its embeddings memory-mapped.

    images / texts: embeddings as the model returns them (a tensor, or a tuple for several parts), or None;
    image_ids: list of str; captions: list of str (or None); text_image: int64 tensor (or None);
    metadata: the header's metadata (str -> str)."""

    def __init__(self, path: str | Path, *, verify: bool = True):
        super().__init__(path, verify=verify)
        path = self.path
        image_parts = _parts("image", self.tensors)
        if not image_parts:
            raise CheckpointError(f"{path}: holds no image embeddings (image.0)")
        self.images = self._emb(image_parts, "image")
        self.n_images = self.images.size(0) if isinstance(self.images, torch.Tensor) else self.images[0].size(0)
        text_parts = _parts("text", self.tensors)
        self.texts = self._emb(text_parts, "text") if text_parts else None
        self.n_texts = 0 if self.texts is None else (self.texts.size(0) if isinstance(self.texts, torch.Tensor)
                                                     else self.texts[0].size(0))
        self.text_image = self.tensor("text_image") if "text_image" in self.tensors else None
        self.image_ids = (decode_strings(self.tensor("image_ids.bytes"), self.tensor("image_ids.offsets"))
                          if "image_ids.bytes" in self.tensors else [str(i) for i in range(self.n_images)])
        self.captions = (decode_strings(self.tensor("texts.bytes"), self.tensor("texts.offsets"))
                         if "texts.bytes" in self.tensors else None)
        if len(self.image_ids) != self.n_images or (self.captions is not None and len(self.captions) != self.n_texts):
            raise CheckpointError(f"{path}: {len(self.image_ids)} image ids for {self.n_images} images or "
                                  f"{len(self.captions or [])} captions for {self.n_texts} text embeddings")

    def _emb(self, names: list[str], side: str):
        parts = [self.tensor(n) for n in names]
        return parts[0] if len(parts) == 1 and self.metadata.get(f"{side}_tuple", "false") != "true" else tuple(parts)

    @property
    def source(self) -> dict:
        """What was encoded: {"data": folder, "split": name, "features": kind} (empty if not recorded)."""
        try:
            value = json.loads(self.metadata.get("source", "{}"))
        except json.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}

    def fingerprint(self) -> dict:
        return {k: self.metadata.get(k, "") for k in FINGERPRINT_KEYS}

    def check_model(self, fingerprint: dict) -> None:
        """CheckpointError unless this index was built by the model `fingerprint` describes."""
        mine = self.fingerprint()
        built_by = self.metadata.get("checkpoint", "?")
        if mine["model"] != fingerprint["model"] or mine["config_hash"] != fingerprint["config_hash"]:
            raise CheckpointError(
                f"{self.path} was built by model {mine['model']!r} with config hash {mine['config_hash'][:12]} "
                f"(checkpoint {built_by}); the checkpoint {fingerprint.get('checkpoint', '?')} is {fingerprint['model']!r} "
                f"with config hash {fingerprint['config_hash'][:12]}: its embeddings are not comparable; "
                f"rebuild the index with this model")
        for key, what in (("weights_sha256", "weights"), ("vocab_sha256", "vocabulary")):
            if mine[key] != fingerprint[key]:
                raise CheckpointError(
                    f"{self.path} was built by checkpoint {built_by}, whose {what} differ from those of "
                    f"{fingerprint.get('checkpoint', '?')} (same model and configuration: another run, seed or "
                    f"epoch); rebuild the index with this model")


def _dtype(path, name, entry):
    if not isinstance(entry, dict) or entry.get("dtype") not in _BY_NAME:
        raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or missing dtype "
                              f"({entry.get('dtype') if isinstance(entry, dict) else entry!r})")
    return _BY_NAME[entry["dtype"]]


def _shape(path, name, entry):
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
    return tuple(shape)


def _offsets(path, item):
    name, entry = item
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
            or offsets[0] > offsets[1] or offsets[0] < 0):
        raise CheckpointError(f"{path}: tensor {name!r} has bad data offsets {offsets!r}")
    return offsets
