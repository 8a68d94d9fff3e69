"""Python API for a trained run: `vse_models.load(run_or_checkpoint)` -> `Retriever`.

    import vse_models
    r = vse_models.load("runs/avse-synthetic")          # best checkpoint, eval mode, CPU
    txt = r.encode_texts(["a red dog on the left"])      # the run's vocabulary and tokeniser
    img = r.encode_images(features)                      # (B, K, F) region features (or (B, s, s, C) grids)
    S = r.score(img, txt)                                # (B, 1): meta_sim (avse), cosine (vse), fused (mh-cvse)
    index = r.build_index("test.safetensors", split="test")   # encode a split once (vse_models.gallery)
    hits = r.search(index, texts=["a red dog on the left"], k=10)

`search` is the streamed top-k of `vse_models.topk` (never the query x gallery matrix; tie rule: score
descending, then lower gallery index) on the retriever's device, or, with a FAISS unit index
(`vse_models.ann`), candidates + exact rerank. An index built by another model, configuration, set of
weights or vocabulary is refused (CheckpointError naming the file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .checkpoint import find_checkpoint, load_checkpoint
from .data.precomp import Batch, _check_finite_features, pad_tokens
from .data.vocab import UNK, tokenize
from .evaluation import iter_embeddings
from .gallery import STORAGE_DTYPES, GalleryIndex, GalleryWriter, encode_strings, model_fingerprint
from .models import cat_embeddings, float_embeddings, is_int, take_embeddings
from .topk import check_k, search as streamed_search, to_device


@dataclass
class Hits:
    """Search results, best first: scores and gallery rows (Nq, k); labels[q][r]: the image id (text queries)
    or the caption (image queries) of each hit; images[q][r]: the image row of each hit."""

    scores: torch.Tensor
    indices: torch.Tensor
    labels: list
    images: list
    candidates: torch.Tensor | None = None  # FAISS: candidates per query


def load(run_or_checkpoint, device="cpu", which: str = "best") -> "Retriever":
    """A run folder (its best/ or last/ checkpoint) or a checkpoint folder -> Retriever (model in eval mode)."""
    from .train import pick_device

    folder = find_checkpoint(run_or_checkpoint, which)
    model, vocab, config, meta = load_checkpoint(folder, device=pick_device(str(device)))
    return Retriever(model, vocab, config, meta, folder)


class Retriever:
    def __init__(self, model, vocab, config: dict, meta: dict, folder: Path):
        self.model, self.vocab, self.config, self.meta, self.folder = model.eval(), vocab, config, meta, Path(folder)
        self.device = next(model.parameters()).device
        self.fingerprint = model_fingerprint(folder)

    @property
    def info(self):
        return self.model.info

    # ------------------------------------------------------------------------------------- encoders
    @torch.no_grad()
    def encode_texts(self, texts, batch_size: int = 256):
        """Embeddings of a list of strings (or one string), tokenised with the run's vocabulary."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("encode_texts: no texts given")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not any(c.isalnum() for c in t):
                raise ValueError(f"encode_texts: text {i} has no words: {t!r}")
        parts = []
        for s in range(0, len(texts), batch_size):
            tokens, lengths, mask = pad_tokens([self.vocab.encode(t) for t in texts[s:s + batch_size]])
            ids = torch.arange(s, s + len(tokens))
            batch = Batch(tokens=tokens, lengths=lengths, padding_mask=mask, caption_ids=ids,
                          extra={"captions": texts[s:s + batch_size]})   # a BERT text backbone reads these
            parts.append(self.model.encode_texts(batch.to(self.device)))
        return float_embeddings(cat_embeddings(parts))

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` that the run's vocabulary reads as <unk>."""
        return [w for w in tokenize(text) if self.vocab.word2idx.get(w, UNK) == UNK and any(c.isalnum() for c in w)]

    @property
    def raw_images(self) -> bool:
        """True for a run trained on raw images (an image backbone is attached)."""
        return self.config["run"].get("features") == "images"

    @torch.no_grad()
    def encode_images(self, images, ids=None, batch_size: int = 256):
        """Embeddings of precomputed features: (B, K, F) region sets or (B, s, s, C) grids like the run's
        training data; for a run with an image backbone, a list of image files, PIL images or (H, W, 3) uint8
        arrays, taken through the run's evaluation transform (a `data.Batch` is used as is). `ids` (B,) ints:
        the image ids, which seed the fixed evaluation views of AVSE's grid model (default 0..B-1, as
        `vse-eval` numbers a split)."""
        if isinstance(images, Batch):
            return float_embeddings(self.model.encode_images(images.to(self.device)))
        if self.raw_images:
            return self._encode_pictures(images, ids, batch_size)
        feats = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        info = self.info
        if feats.ndim == 4 and info.grid_size and feats.shape[1] == feats.shape[2] == info.grid_size:
            feats = feats.reshape(feats.shape[0], -1, feats.shape[3])
        if feats.ndim != 3 or feats.shape[1:] != (info.set_size, info.feature_dim) or feats.dtype.kind != "f":
            grid = f" or (B, {info.grid_size}, {info.grid_size}, {info.feature_dim}) grids" if info.grid_size else ""
            raise ValueError(f"encode_images: images must be float features of shape (B, {info.set_size}, "
                             f"{info.feature_dim}){grid} like the run's training data, got {feats.dtype} {feats.shape}")
        ids = torch.arange(len(feats)) if ids is None else torch.as_tensor(ids, dtype=torch.long)
        if ids.shape != (len(feats),):
            raise ValueError(f"encode_images: ids must have shape ({len(feats)},), got {tuple(ids.shape)}")
        parts = []
        for s in range(0, len(feats), batch_size):
            chunk = np.array(feats[s:s + batch_size], dtype=np.float32)  # a copy: the input may be read-only
            _check_finite_features(chunk, np.arange(s, s + len(chunk)), "encode_images: images")
            batch = Batch(images=torch.from_numpy(chunk), img_ids=ids[s:s + len(chunk)], grid_size=info.grid_size,
                          image_lengths=torch.full((len(chunk),), info.set_size, dtype=torch.long))
            parts.append(self.model.encode_images(batch.to(self.device)))
        return float_embeddings(cat_embeddings(parts))

    def _encode_pictures(self, images, ids, batch_size: int):
        from .data.images import decode_image, transform
        from .train import image_options

        if isinstance(images, (str, Path, np.ndarray)) or not hasattr(images, "__len__"):
            images = [images]
        size = image_options(self.config["run"]).image_size
        ids = torch.arange(len(images)) if ids is None else torch.as_tensor(ids, dtype=torch.long)
        if ids.shape != (len(images),):
            raise ValueError(f"encode_images: ids must have shape ({len(images)},), got {tuple(ids.shape)}")

        def pixels(i, image):
            if isinstance(image, (str, Path)):
                return decode_image(Path(image))   # BadImageError names the file
            if hasattr(image, "convert"):          # a PIL image
                return np.array(image.convert("RGB"))
            if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
                return image
            raise ValueError(f"encode_images: image {i} must be a file path, a PIL image or an (H, W, 3) uint8 "
                             f"array (this run has an image backbone), got {type(image).__name__}")

        parts = []
        for s in range(0, len(images), batch_size):
            chunk = [transform(pixels(s + j, im), size, None) for j, im in enumerate(images[s:s + batch_size])]
            batch = Batch(images=torch.stack(chunk), img_ids=ids[s:s + len(chunk)])
            parts.append(self.model.encode_images(batch.to(self.device)))
        return float_embeddings(cat_embeddings(parts))

    @torch.no_grad()
    def score(self, img_emb, txt_emb) -> torch.Tensor:
        """(Ni, Nt) float32 scores: the model's similarity (meta_sim for avse, cosine for vse, the fused
        score for mh-cvse)."""
        return self.model.similarity(to_device(img_emb, self.device), to_device(txt_emb, self.device)).float()

    def search_units(self, emb, side: str) -> torch.Tensor:
        return self.model.search_units(to_device(emb, self.device), side)

    # ---------------------------------------------------------------------------------------- index
    def build_index(self, path, *, split: str = "test", data=None, captions: bool = True, dtype: str = "float32",
                    batch_size: int = 256, overwrite: bool = False, progress=None) -> GalleryIndex:
        """Encodes a split of the run's data (or of `data`, a folder in the SCAN layout) and writes a gallery
        index to `path` (atomically; an existing file only with overwrite=True). Images are encoded and written
        batch by batch; captions (captions=True) are held while the model completes the set (mh-cvse's
        optional label completion), as vse-eval does."""
        from .train import data_root, load_split

        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype must be one of {list(STORAGE_DTYPES)}, got {dtype!r}")
        if not (is_int(batch_size) and batch_size >= 1):
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (vse-search: --overwrite) to replace it")
        run = dict(self.config["run"])
        if data is not None:
            run["data"] = str(data)
        root = data_root(run, verbose=False)
        s = load_split(root, split, self.vocab, run.get("features", "regions"), self.info, run=run)
        store = STORAGE_DTYPES[dtype]
        images = iter_embeddings(self.model, s, "image", batch_size, self.device,
                                 progress=_labelled(progress, "images"))
        start, first = next(images)
        specs, image_names = _specs("image", first, s.n_images, store)
        texts, strings = None, {"image_ids": _image_ids(s)}
        if captions:
            texts = self.model.complete_text_set(cat_embeddings([e for _, e in iter_embeddings(
                self.model, s, "text", batch_size, self.device, progress=_labelled(progress, "captions"))]))
            text_specs, text_names = _specs("text", texts, s.n_captions, store)
            specs.update(text_specs)
            specs["text_image"] = (torch.int64, (s.n_captions,))
            strings["texts"] = s.captions
        encoded = {name: encode_strings(values) for name, values in strings.items()}
        for name, (data_bytes, offsets) in encoded.items():
            specs[f"{name}.bytes"] = (torch.uint8, tuple(data_bytes.shape))
            specs[f"{name}.offsets"] = (torch.int64, tuple(offsets.shape))
        meta = {**self.fingerprint, "n_images": str(s.n_images), "n_texts": str(s.n_captions if captions else 0),
                "captions_per_image": str(s.captions_per_image), "dtype": dtype,
                "image_tuple": str(not isinstance(first, torch.Tensor)).lower(),
                "text_tuple": str(texts is not None and not isinstance(texts, torch.Tensor)).lower(),
                "source": {"data": str(root), "split": split, "features": run.get("features", "regions")}}
        with GalleryWriter(path, specs, meta, overwrite=overwrite) as w:
            _write_parts(w, image_names, start, first)
            for start, emb in images:
                _write_parts(w, image_names, start, emb)
            if captions:
                _write_parts(w, text_names, 0, texts)
                w.write("text_image", 0, torch.from_numpy(s.image_of(np.arange(s.n_captions))))
            for name, (data_bytes, offsets) in encoded.items():
                w.write(f"{name}.bytes", 0, data_bytes)
                w.write(f"{name}.offsets", 0, offsets)
        return self.open_index(path, verify=False)  # just written and checksummed

    def open_index(self, path, *, verify: bool = True) -> GalleryIndex:
        """Opens a gallery index (checks header, size and, with verify, the checksum) built by this model."""
        index = GalleryIndex(path, verify=verify)
        index.check_model(self.fingerprint)
        return index

    # --------------------------------------------------------------------------------------- search
    def search(self, index: GalleryIndex, *, texts=None, image_ids=None, text_emb=None, image_emb=None, k: int = 10,
               chunk: int | None = None, unit_index=None, k_units: int | None = None, nprobe: int | None = None,
               progress=None) -> Hits:
        """Top-k of the index for text queries (texts: strings, or text_emb: embeddings) over its images, or for
        image queries (image_ids: ids of the index's images, or image_emb) over its captions. With
        `unit_index` (a `vse_models.ann.UnitIndex` of this index's images): FAISS candidates + exact rerank."""
        given = [name for name, v in (("texts", texts), ("image_ids", image_ids), ("text_emb", text_emb),
                                      ("image_emb", image_emb)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"search: give exactly one of texts, image_ids, text_emb, image_emb (got {given or 'none'})")
        if texts is not None or text_emb is not None:
            queries = self.encode_texts(texts) if texts is not None else text_emb
            gallery, side, n_gallery, what = index.images, "text", index.n_images, "gallery's images"
        else:
            if index.texts is None:
                raise ValueError(f"{index.path} holds no captions (built without them): image queries need them")
            queries = (to_device(take_embeddings(index.images, self.image_rows(index, image_ids)), self.device)
                       if image_ids is not None else image_emb)
            gallery, side, n_gallery, what = index.texts, "image", index.n_texts, "gallery's captions"
        check_k(k, n_gallery, what)
        candidates = None
        if unit_index is not None:
            if side != "text":
                raise ValueError("FAISS search is for text queries over images; image queries use brute force")
            if unit_index.n_items != index.n_images:
                raise ValueError(f"the FAISS unit index covers {unit_index.n_items} images, {index.path} has "
                                 f"{index.n_images}: it was built for another gallery")
            from .ann import ann_search

            values, rows, candidates = ann_search(queries, gallery, k, score=self.model.similarity,
                                                  query_units=self.search_units(queries, "text"), unit_index=unit_index,
                                                  k_units=k_units, nprobe=nprobe, device=self.device)
        else:
            values, rows = streamed_search(queries, gallery, k, score=self.model.similarity, query_side=side,
                                           chunk=chunk, device=self.device, progress=progress)
        rows = rows.cpu()
        if side == "text":
            labels = [[index.image_ids[r] for r in row] for row in rows.tolist()]
            images = rows.tolist()
        else:
            labels = [[index.captions[r] for r in row] for row in rows.tolist()]
            images = index.text_image[rows].tolist()
        return Hits(values.cpu(), rows, labels, images, candidates)

    @staticmethod
    def image_rows(index: GalleryIndex, image_ids) -> torch.Tensor:
        """Rows of the index's images with these ids (strings; ints are read as their decimal strings)."""
        ids = [image_ids] if isinstance(image_ids, (str, int)) else list(image_ids)
        where: dict[str, int] = {}
        for row, i in enumerate(index.image_ids):
            where.setdefault(i, row)
        unknown = [i for i in ids if str(i) not in where]
        if unknown:
            shown = ", ".join(index.image_ids[:5])
            raise ValueError(f"unknown image id(s) {unknown[:5]} in {index.path} ({index.n_images} images, ids like "
                             f"{shown}{', ...' if index.n_images > 5 else ''})")
        return torch.tensor([where[str(i)] for i in ids], dtype=torch.long)


def _parts_of(emb) -> list[torch.Tensor]:
    return [emb] if isinstance(emb, torch.Tensor) else list(emb)


def _specs(side: str, emb, n: int, store: torch.dtype):
    names = [f"{side}.{i}" for i in range(len(_parts_of(emb)))]
    specs = {name: (store if p.is_floating_point() else p.dtype, (n, *p.shape[1:]))
             for name, p in zip(names, _parts_of(emb))}
    return specs, names


def _write_parts(writer: GalleryWriter, names: list[str], start: int, emb) -> None:
    for name, part in zip(names, _parts_of(emb)):
        writer.write(name, start, part)


def _image_ids(split) -> list[str]:
    """One id per image: the split's ids file (per image, or per caption: the first of each image's), else
    the row number."""
    ids = split.ids
    if ids is None:
        return [str(i) for i in range(split.n_images)]
    return ids if len(ids) == split.n_images else ids[::split.captions_per_image]


def _labelled(progress, what: str):
    return None if progress is None else (lambda it: progress(it, desc=what))
