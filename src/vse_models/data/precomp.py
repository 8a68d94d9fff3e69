"""Readers for precomputed features (SPEC §4) and batching.

Layout of a data folder (SCAN's `f30k_precomp` / `coco_precomp`, and what the synthetic generator writes):

    {split}_ims.npy    (N, K, F) float region features (K=36, F=2048 for BUTD), memory-mapped
    {split}_grids.npy  (N, s, s, C) patch-grid features, memory-mapped (the grid variant)
    {split}_caps.txt   one caption per line, k per image (k = lines / N, 5 for F30K/COCO);
                       caption c belongs to image c // k
    {split}_ids.txt    optional, one id per image (or per caption)

Both feature kinds reach the models as a *set* of vectors per image, `(B, K, F)`; a grid is flattened
row-major to K = s*s (patch (r, c) at index r*s + c) and `Split.grid_size` gives s; with a CLS file
the set is [CLS] + patches (K = s*s + 1, CLS at index 0). Malformed input
raises an error naming the file (and line).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..errors import NonFiniteError
from .vocab import PAD, Vocabulary, tokenize

FEATURE_FILES = {"regions": "{split}_ims.npy", "grids": "{split}_grids.npy"}


@dataclass
class Batch:
    """What a model sees. Image fields are None in a text-only batch and vice versa.

    images: (B, K, F) float; image_lengths: (B,) int64 (valid set elements; features past it are padding).
    tokens: (B, L) int64 padded with 0; lengths: (B,) int64; padding_mask: (B, L) bool, True = padding
    (the nn.MultiheadAttention convention). img_ids: (B,) int64 index of the image each row belongs to
    (same value = same image: not a negative in the loss). caption_ids: (B,) int64 caption index.
    """

    images: torch.Tensor | None = None
    image_lengths: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    lengths: torch.Tensor | None = None
    padding_mask: torch.Tensor | None = None
    img_ids: torch.Tensor | None = None
    caption_ids: torch.Tensor | None = None
    grid_size: int | None = None
    extra: dict = field(default_factory=dict)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=non_blocking)
        moved["extra"] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.extra.items()}
        return Batch(**moved)

    def __len__(self) -> int:
        return len(self.tokens) if self.tokens is not None else len(self.images)


def pad_tokens(seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pads token lists: (tokens (B, L), lengths (B,), padding_mask (B, L) True = padding)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.full((len(seqs), int(lengths.max()) if len(seqs) else 0), PAD, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    mask = torch.arange(tokens.size(1))[None, :] >= lengths[:, None]
    return tokens, lengths, mask


def read_captions(path: Path) -> list[str]:
    """Caption lines; an undecodable, empty or word-less line is an error naming file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"caption file not found: {path}")
    raw = path.read_bytes().split(b"\n")
    while raw and not raw[-1].strip():  # trailing newline(s) at the end of the file
        raw.pop()
    captions = []
    for lineno, line in enumerate(raw, 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid UTF-8 ({e.reason})") from None
        if not text:
            raise ValueError(f"{path}:{lineno}: empty caption line")
        if not any(t.isalnum() for tok in tokenize(text) for t in tok):
            raise ValueError(f"{path}:{lineno}: caption has no words: {text!r}")
        captions.append(text)
    if not captions:
        raise ValueError(f"{path}: no captions")
    return captions


def load_features(path: Path, kind: str) -> tuple[np.ndarray, int | None]:
    """Memory-maps a feature file: regions (N, K, F) -> itself, grids (N, s, s, C) -> (N, s*s, C)."""
    if not path.is_file():
        raise FileNotFoundError(f"feature file not found: {path}")
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as e:  # numpy raises several types for a bad header
        raise ValueError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        raise ValueError(f"{path}: expected a float array, got dtype {getattr(arr, 'dtype', type(arr))}")
    if kind == "regions":
        if arr.ndim != 3 or 0 in arr.shape:
            raise ValueError(f"{path}: expected region features of shape (N, K, F), got {arr.shape}")
        return arr, None
    if arr.ndim != 4 or arr.shape[1] != arr.shape[2] or 0 in arr.shape:
        raise ValueError(f"{path}: expected grid features of shape (N, s, s, C), got {arr.shape}")
    return arr.reshape(arr.shape[0], -1, arr.shape[3]), arr.shape[1]


def _check_finite_features(feats: np.ndarray, image_index: np.ndarray, path: Path) -> None:
    """Per batch, so that a 32 GB feature file is never scanned up front: NaN/inf features are an error
    naming the file and the images."""
    finite = np.isfinite(feats.reshape(len(feats), -1))
    if not finite.all():
        bad = np.flatnonzero(~finite.all(1))
        shown = ", ".join(f"{image_index[b]} ({int((~finite[b]).sum())} values)" for b in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise NonFiniteError(f"{path}: NaN or infinite features in image(s) {shown}{more}")


class CaptionSplit:
    """What every split shares: captions (k per image, caption c of image c // k), their tokens, batching.
    Subclasses provide `n_images` and `image_batch(img_idx)`."""

    split: str
    captions: list[str]
    captions_per_image: int
    tokens: list[list[int]] | None = None

    def set_vocab(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.tokens = [vocab.encode(c) for c in self.captions]

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def image_of(self, caption_ids) -> np.ndarray:
        return np.asarray(caption_ids) // self.captions_per_image

    def caption_batch(self, cap_idx) -> Batch:
        """Captions: package-vocabulary tokens, and the raw strings in `extra["captions"]` (for a model
        with its own tokenizer, e.g. a BERT text backbone)."""
        if self.tokens is None:
            raise RuntimeError(f"split {self.split!r} has no vocabulary: call set_vocab first")
        cap_idx = np.asarray(cap_idx, dtype=np.int64)
        tokens, lengths, mask = pad_tokens([self.tokens[i] for i in cap_idx])
        return Batch(tokens=tokens, lengths=lengths, padding_mask=mask,
                     img_ids=torch.from_numpy(self.image_of(cap_idx)), caption_ids=torch.from_numpy(cap_idx.copy()),
                     extra={"captions": [self.captions[i] for i in cap_idx]})

    def pair_batch(self, cap_idx) -> Batch:
        """Captions with their images (row b: caption cap_idx[b] and image cap_idx[b] // k)."""
        text = self.caption_batch(cap_idx)
        return attach_images(text, self.image_batch(text.img_ids.numpy()))

    def train_batches(self, index_batches: list, epoch: int = 0, seed: int = 0) -> Iterator[Batch]:
        """The training pair batches of `index_batches` (caption indices), in order. Raw-image splits load
        them in DataLoader workers with the training augmentation seeded by (seed, epoch, caption)."""
        for idx in index_batches:
            yield self.pair_batch(idx)

    def image_batches(self, batch_size: int) -> Iterator[Batch]:
        """All images in order, in batches (evaluation)."""
        for idx in sequential_batches(self.n_images, batch_size):
            yield self.image_batch(idx)


def attach_images(text: Batch, images: Batch) -> Batch:
    text.images, text.image_lengths, text.grid_size = images.images, images.image_lengths, images.grid_size
    return text


class Split(CaptionSplit):
    """One split of a precomputed data folder: memory-mapped features + tokenised captions."""

    kind_of_data = "features"

    def __init__(self, root: str | Path, split: str, vocab: Vocabulary | None = None, features: str = "regions"):
        if features not in FEATURE_FILES:
            raise ValueError(f"features must be one of {tuple(FEATURE_FILES)}, got {features!r}")
        self.root, self.split, self.kind = Path(root), split, features
        if not self.root.is_dir():
            raise FileNotFoundError(f"data folder not found: {self.root}")
        self.feature_path = self.root / FEATURE_FILES[features].format(split=split)
        self.caption_path = self.root / f"{split}_caps.txt"
        self.images, self.grid_size = load_features(self.feature_path, features)
        self.cls = None
        self.cls_path = cls_path = self.root / f"{split}_grid_cls.npy"
        if features == "grids" and cls_path.is_file():
            self.cls = np.load(cls_path, mmap_mode="r")
            if self.cls.shape != (self.images.shape[0], self.images.shape[2]):
                raise ValueError(f"{cls_path}: expected CLS features of shape {(self.images.shape[0], self.images.shape[2])} "
                                 f"to match {self.feature_path}, got {self.cls.shape}")
        self.captions = read_captions(self.caption_path)
        n, c = len(self.images), len(self.captions)
        if c % n:
            raise ValueError(f"{self.caption_path}: {c} captions is not a multiple of the {n} images "
                             f"in {self.feature_path}")
        self.captions_per_image = c // n
        ids_path = self.root / f"{split}_ids.txt"
        self.ids = None
        if ids_path.is_file():
            self.ids = [line.strip() for line in ids_path.read_text(encoding="utf-8", errors="replace").splitlines()]
            while self.ids and not self.ids[-1]:
                self.ids.pop()
            if len(self.ids) not in (n, c):
                raise ValueError(f"{ids_path}: {len(self.ids)} lines, expected one per image ({n}) "
                                 f"or per caption ({c})")
        self.tokens: list[list[int]] | None = None
        if vocab is not None:
            self.set_vocab(vocab)

    @property
    def n_images(self) -> int:
        return len(self.images)

    @property
    def feature_dim(self) -> int:
        return int(self.images.shape[2])

    @property
    def set_size(self) -> int:
        return int(self.images.shape[1]) + (self.cls is not None)

    def _gather_images(self, img_idx: np.ndarray) -> torch.Tensor:
        # Sorted unique reads from the memory map, then scatter back: cheap on a cold page cache.
        uniq, inverse = np.unique(img_idx, return_inverse=True)
        feats = np.asarray(self.images[uniq], dtype=np.float32)
        _check_finite_features(feats, uniq, self.feature_path)
        if self.cls is not None:
            cls = np.asarray(self.cls[uniq], dtype=np.float32)
            _check_finite_features(cls, uniq, self.cls_path)
            feats = np.concatenate([cls[:, None], feats], axis=1)
        return torch.from_numpy(feats[inverse.reshape(-1)])

    def image_batch(self, img_idx) -> Batch:
        img_idx = np.asarray(img_idx, dtype=np.int64)
        images = self._gather_images(img_idx)
        return Batch(images=images, image_lengths=torch.full((len(img_idx),), self.set_size, dtype=torch.long),
                     img_ids=torch.from_numpy(img_idx.copy()), grid_size=self.grid_size)



def shuffled_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> Iterator[np.ndarray]:
    """Index batches of a seeded permutation of range(n) (reproducible: depends only on the generator)."""
    perm = torch.randperm(n, generator=generator).numpy()
    stop = n - n % batch_size if drop_last else n
    for s in range(0, stop, batch_size):
        yield perm[s:s + batch_size]


def sequential_batches(n: int, batch_size: int) -> Iterator[np.ndarray]:
    for s in range(0, n, batch_size):
        yield np.arange(s, min(n, s + batch_size))
