"""Tiny local backbones and image folders for the raw-image tests (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VIT = "vit_base_patch16_224"
VIT_ARGS = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "img_size": 32}
WORDS = "a an the dog cat bird car tree red blue green big small on left right middle and with near .".split()


def make_bert(folder: Path, hidden: int = 32, layers: int = 1, seed: int = 0) -> Path:
    """A BERT with `layers` layers of `hidden` units and a word-level vocabulary, saved with save_pretrained."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["##s"]) + "\n")
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=len(WORDS) + 6, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64))
    model.save_pretrained(folder)
    BertTokenizerFast(str(vocab)).save_pretrained(folder)
    return folder


def make_vit_weights(path: Path, seed: int = 0, **override) -> Path:
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(VIT, pretrained=False, num_classes=0, **{**VIT_ARGS, **override})
    torch.save(model.state_dict(), path)
    return path


def make_image_folder(root: Path, splits=(("train", 12), ("dev", 6), ("test", 6)), size: int = 40, seed: int = 0) -> Path:
    """The plain layout: {split}_images.txt + {split}_caps.txt (5 per image) and PNG images (coloured squares)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    (root / "img").mkdir(parents=True, exist_ok=True)
    for split, n in splits:
        names, caps = [], []
        for i in range(n):
            colour = list(colours)[i % 3]
            side = ["left", "right"][(i // 3) % 2]
            pixels = np.full((size, size + 8, 3), 90, np.uint8) + rng.integers(0, 20, (size, size + 8, 3)).astype(np.uint8)
            x0 = 2 if side == "left" else size - 14
            pixels[10:26, x0:x0 + 16] = colours[colour]
            name = f"img/{split}_{i:03d}.png"
            Image.fromarray(pixels).save(root / name)
            names.append(name)
            caps += [f"a {colour} car on the {side} .", f"the {colour} dog", f"a small {colour} bird",
                     f"a tree on the {side}", f"a {colour} cat"]
        (root / f"{split}_images.txt").write_text("\n".join(names) + "\n")
        (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
    return root
