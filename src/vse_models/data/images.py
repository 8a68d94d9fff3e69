"""Raw images and captions (the `backbones` extra: pillow), for end-to-end training and for vse-extract.

Two layouts (`vse-train --data ...`):

- Karpathy split JSON (`dataset_flickr30k.json`, `dataset_coco.json`, as Flickr30K / COCO users have them):
  `{"images": [{"split": "train"|"restval"|"val"|"test", "filename": ..., "filepath": ... (COCO),
  "sentences": [{"raw": ...}, ...]}, ...]}` and an image folder (`--images`). Split names: `train` =
  train + restval (COCO's 113K training images, as VSE∞ / SCAN train), `dev` = val, `test` = test
  (`testall` is accepted too: COCO's 5000 test images). The first `captions_per_image` (5) sentences of
  each image are used; an image with fewer is an error naming it.
- Plain folder: `{split}_images.txt` (one image path per line, relative to the folder or to --images)
  + `{split}_caps.txt` (k captions per image, caption c of image c // k) (+ optional `{split}_ids.txt`).

Transforms follow the release (liuyyy111/AVSE lib/image_caption.py `RawImageDataset._process_image`):
training: a random crop of each side times r ~ U[0.6, 1) at a random position, resized to S x S
(bilinear, no antialiasing: cv2.INTER_LINEAR's sampling), a horizontal flip with probability 0.5; evaluation:
the whole image resized to S x S; then ImageNet mean/std. Grey and RGBA images become RGB.

Images are decoded with PIL in DataLoader workers, one batch per task. The augmentation of caption c in
epoch e draws from a generator seeded by (seed, e, c): the same images whatever the number of workers,
and a resumed run repeats them.

Missing files are found when the split is opened (one error naming the first and how many). An unreadable
or corrupt image (truncated files included: PIL's LOAD_TRUNCATED_IMAGES stays off) is, with
`bad_images="error"` (the default), an error naming the file, the split and the step; with "skip", a
training batch leaves out that image's pairs and the run says so in one line per image (console and
train.log). Evaluation never skips: a metric over fewer images would not be the split's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import IMAGENET_MEAN, IMAGENET_STD, require
from .precomp import Batch, CaptionSplit, attach_images, read_captions

AUGMENTS = ("crop_flip", "crop", "none")
BAD_IMAGES = ("error", "skip")
KARPATHY_SPLITS = {"train": ("train", "restval"), "dev": ("val",), "val": ("val",), "test": ("test",),
                   "testall": ("test",), "restval": ("restval",)}


class BadImageError(ValueError):
    """An image file that cannot be decoded; names it."""


@dataclass
class ImageOptions:
    image_size: int = 224
    augment: str = "crop_flip"    # [code] random crop 0.6-1 + flip; "crop": no flip; "none"
    workers: int = 0
    bad_images: str = "error"

    def check(self) -> "ImageOptions":
        if not (isinstance(self.image_size, int) and self.image_size >= 8):
            raise ValueError(f"--image-size must be an integer >= 8, got {self.image_size!r}")
        if self.augment not in AUGMENTS:
            raise ValueError(f"--augment must be one of {list(AUGMENTS)}, got {self.augment!r}")
        if not (isinstance(self.workers, int) and self.workers >= 0):
            raise ValueError(f"--workers must be an integer >= 0, got {self.workers!r}")
        if self.bad_images not in BAD_IMAGES:
            raise ValueError(f"--bad-images must be one of {list(BAD_IMAGES)}, got {self.bad_images!r}")
        return self


# ------------------------------------------------------------------------------------------ layouts
def is_raw_image_data(data: str) -> bool:
    """A Karpathy JSON file or a folder in the plain image layout (train_images.txt)."""
    p = Path(str(data)).expanduser()
    return data == "synthetic-images" or (p.suffix == ".json" and p.is_file()) or (p / "train_images.txt").is_file()


def read_karpathy(json_path: Path, split: str, images: Path | None, k: int = 5):
    """(image paths, captions (k per image), ids) of `split` from a Karpathy split JSON."""
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"{json_path}: unknown split {split!r}; Karpathy splits: {sorted(KARPATHY_SPLITS)}")
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))["images"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{json_path}: not a Karpathy split JSON with an 'images' list ({type(e).__name__}: {e})") from None
    if images is None:
        raise ValueError(f"{json_path}: pass the image folder with --images DIR (e.g. flickr30k-images/)")
    paths, captions, ids = [], [], []
    for n, entry in enumerate(entries):
        if entry.get("split") not in KARPATHY_SPLITS[split]:
            continue
        try:
            rel = Path(entry.get("filepath", "")) / entry["filename"]
            raws = [s["raw"].strip() for s in entry["sentences"]]
        except (KeyError, TypeError, AttributeError):
            raise ValueError(f"{json_path}: image entry {n} lacks 'filename' or 'sentences[].raw'") from None
        if len(raws) < k or not all(raws[:k]):
            raise ValueError(f"{json_path}: image entry {n} ({rel}) has {sum(map(bool, raws))} captions, need {k}")
        paths.append(images / rel)
        captions += raws[:k]
        ids.append(str(entry.get("cocoid", entry.get("imgid", n))))
    if not paths:
        raise ValueError(f"{json_path}: no images in split {split!r} (its 'split' values: {sorted(KARPATHY_SPLITS[split])})")
    return paths, captions, ids


def read_plain(folder: Path, split: str, images: Path | None):
    """(image paths, captions, ids or None) of the plain layout."""
    listing = folder / f"{split}_images.txt"
    if not listing.is_file():
        raise FileNotFoundError(f"image list not found: {listing} (the plain layout has {{split}}_images.txt "
                                f"with one image path per line beside {{split}}_caps.txt)")
    base = images if images is not None else folder
    lines = [line.strip() for line in listing.read_text(encoding="utf-8").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for n, line in enumerate(lines, 1):
        if not line:
            raise ValueError(f"{listing}:{n}: empty image path")
    captions = read_captions(folder / f"{split}_caps.txt")
    ids_path = folder / f"{split}_ids.txt"
    ids = [x.strip() for x in ids_path.read_text(encoding="utf-8").splitlines() if x.strip()] if ids_path.is_file() else None
    return [base / line for line in lines], captions, ids


# --------------------------------------------------------------------------------------- transforms
def decode_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB; BadImageError naming the file when it cannot be read or decoded."""
    Image = require("PIL.Image")
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file raises here (LOAD_TRUNCATED_IMAGES stays off)
            return np.array(im.convert("RGB"))  # writable (torch.from_numpy warns on read-only arrays)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise BadImageError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


def transform(pixels: np.ndarray, size: int, rng: np.random.Generator | None, augment: str = "crop_flip") -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float, normalised. rng None: evaluation (resize only)."""
    x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).float()
    if rng is not None and augment != "none":  # [code] crop ratio U[0.6, 1) of each side, random corner
        h, w = x.shape[1:]
        ratio = rng.random() * 0.4 + 0.6
        ch, cw = max(1, int(h * ratio)), max(1, int(w * ratio))
        y0 = int(rng.integers(h - ch)) if h > ch else 0
        x0 = int(rng.integers(w - cw)) if w > cw else 0
        x = x[:, y0:y0 + ch, x0:x0 + cw]
    x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=False)[0]
    if rng is not None and augment == "crop_flip" and rng.random() > 0.5:
        x = x.flip(-1)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None] * 255
    std = torch.tensor(IMAGENET_STD)[:, None, None] * 255
    return (x - mean) / std


# ----------------------------------------------------------------------------------------- the split
class _BatchTask(torch.utils.data.Dataset):
    """Dataset whose item i is the i-th batch: a worker decodes a whole batch."""

    def __init__(self, split: "ImageSplit", index_batches: list, seeds: list | None):
        self.split, self.index_batches, self.seeds = split, index_batches, seeds

    def __len__(self) -> int:
        return len(self.index_batches)

    def __getitem__(self, i):
        return self.split.load_images(self.index_batches[i], self.seeds[i] if self.seeds is not None else None)


def _identity(x):
    return x


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the training threads


class ImageSplit(CaptionSplit):
    """One split of raw images + captions, with the interface of `precomp.Split` (Batch.images is
    (B, 3, S, S) pixels, normalised)."""

    kind = "images"
    grid_size = None
    cls = None
    feature_dim = 3
    set_size = 0

    def __init__(self, source: str | Path, split: str, vocab=None, images: str | Path | None = None,
                 options: ImageOptions | None = None, captions_per_image: int = 5):
        self.options = (options or ImageOptions()).check()
        self.image_size = self.options.image_size
        source = Path(str(source)).expanduser()
        images = Path(str(images)).expanduser() if images else None
        if images is not None and not images.is_dir():
            raise FileNotFoundError(f"--images: image folder not found: {images}")
        self.split, self.root = split, source
        if source.suffix == ".json":
            self.paths, self.captions, self.ids = read_karpathy(source, split, images, captions_per_image)
        elif source.is_dir():
            self.paths, self.captions, self.ids = read_plain(source, split, images)
        else:
            raise FileNotFoundError(f"--data: neither a Karpathy JSON file nor a folder: {source}")
        self.feature_path = source  # what error messages name
        n, c = len(self.paths), len(self.captions)
        if c % n:
            raise ValueError(f"{source} ({split}): {c} captions is not a multiple of the {n} images")
        self.captions_per_image = c // n
        missing = [p for p in self.paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{source} ({split}): {len(missing)} of {n} images are missing, e.g. {missing[0]}"
                                    + ("" if images else " (relative paths are read from the data folder; "
                                                         "pass --images DIR for another image root)"))
        self.tokens = None
        self.on_bad_image = None  # callable(str): how a skipped image is reported (the trainer's console)
        if vocab is not None:
            self.set_vocab(vocab)

    @property
    def n_images(self) -> int:
        return len(self.paths)

    def load_images(self, img_idx, seeds=None) -> dict:
        """{"images": (b, 3, S, S) of the readable ones, "ok": indices into img_idx, "bad": [messages]}.
        seeds None: evaluation transforms; else one seed (a tuple) per image, training augmentation."""
        pics, ok, bad = [], [], []
        for j, i in enumerate(np.asarray(img_idx).tolist()):
            try:
                pixels = decode_image(self.paths[i])
            except BadImageError as e:
                bad.append(str(e))
                continue
            rng = np.random.default_rng(list(seeds[j])) if seeds is not None else None
            pics.append(transform(pixels, self.image_size, rng, self.options.augment))
            ok.append(j)
        s = self.image_size
        return {"images": torch.stack(pics) if pics else torch.zeros(0, 3, s, s), "ok": ok, "bad": bad}

    def _as_batch(self, img_idx, loaded: dict) -> Batch:
        img_idx = np.asarray(img_idx, dtype=np.int64)
        if len(loaded["ok"]) != len(img_idx):
            raise BadImageError(f"split {self.split!r}: {loaded['bad'][0]}")
        return Batch(images=loaded["images"], img_ids=torch.from_numpy(img_idx.copy()))

    def image_batch(self, img_idx) -> Batch:
        return self._as_batch(img_idx, self.load_images(img_idx))

    def _loader(self, index_batches: list, seeds: list | None):
        workers = min(self.options.workers, len(index_batches))
        if workers == 0:
            return (self.load_images(b, s) for b, s in zip(index_batches, seeds or [None] * len(index_batches)))
        return torch.utils.data.DataLoader(_BatchTask(self, index_batches, seeds), batch_size=None, shuffle=False,
                                           num_workers=workers, collate_fn=_identity, worker_init_fn=_one_thread,
                                           prefetch_factor=2)

    def image_batches(self, batch_size: int) -> Iterator[Batch]:
        batches = [np.arange(s, min(self.n_images, s + batch_size)) for s in range(0, self.n_images, batch_size)]
        for idx, loaded in zip(batches, self._loader(batches, None)):
            yield self._as_batch(idx, loaded)

    def train_batches(self, index_batches: list, epoch: int = 0, seed: int = 0) -> Iterator[Batch]:
        index_batches = [np.asarray(b, dtype=np.int64) for b in index_batches]
        image_batches = [self.image_of(b) for b in index_batches]
        seeds = [[(seed, epoch, int(c)) for c in b] for b in index_batches]
        for cap_idx, loaded in zip(index_batches, self._loader(image_batches, seeds)):
            if loaded["bad"]:
                if self.options.bad_images == "error":
                    raise BadImageError(f"split {self.split!r}: {loaded['bad'][0]} (pass --bad-images skip to leave "
                                        f"unreadable images out of training)")
                for message in dict.fromkeys(loaded["bad"]):
                    if self.on_bad_image is not None:
                        self.on_bad_image(f"warning: skipped an unreadable training image, its pairs are left out of "
                                          f"this batch: {message}")
                cap_idx = cap_idx[loaded["ok"]]
                if len(cap_idx) < 2:
                    continue
            text = self.caption_batch(cap_idx)
            yield attach_images(text, Batch(images=loaded["images"]))


__all__ = ["AUGMENTS", "BadImageError", "ImageOptions", "ImageSplit", "decode_image", "is_raw_image_data",
           "read_karpathy", "read_plain", "transform"]
