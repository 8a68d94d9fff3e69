"""AVSE end to end from raw images (issue 19): one training step with a ViT-B/16 and a BERT-base (random weights,
the shapes of the release's recipe), package model vs reference model; and vse-extract's forward, images/s.

`pytest bench/bench_backbones.py --benchmark-only`. On a GPU: batch 128, 224 x 224 images, ViT-B/16
(`vit_base_patch16_224`: 14 x 14 patches + CLS, 12 blocks of 768), BERT-base (12 layers of 768, vocabulary 30522,
captions of 16 wordpieces), AVSE's release path (2 RBS views of 157 patches + CLS on the token embeddings, each
through the ViT's blocks; D = 1024, 256-d units), bf16 autocast and fp32; AdamW, backbone lr x 0.1.
extra_info: images_per_s, speedup_vs_reference. Extraction: the ViT's whole forward on 256 images, no gradient.
On CPU (CI, `--benchmark-disable`) the same code runs at tiny sizes (a 2-block ViT of width 64 on 32 x 32 images, a
1-layer BERT of width 32, batch 16) so that it stays runnable; those numbers say nothing about a GPU.
No GPU number has been measured yet (no session had a GPU): see bench/RESULTS.md.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from common import DEVICE, HAS_GPU, median_seconds, run_benchmark, training_step

pytest.importorskip("timm")
pytest.importorskip("transformers")

from vse_models.data.precomp import Batch  # noqa: E402
from vse_models.models import DataInfo, build_model  # noqa: E402

if HAS_GPU:
    BATCH, IMAGE, VIT, VIT_ARGS, WORDS = 128, 224, "vit_base_patch16_224", {}, 16
    BERT = dict(hidden=768, layers=12, heads=12, vocab=30_522)
    EXTRACT_BATCH, ROUNDS = 256, 10
else:
    BATCH, IMAGE, VIT, WORDS = 16, 32, "vit_base_patch16_224", 8
    VIT_ARGS = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2, "img_size": 32}
    BERT = dict(hidden=32, layers=1, heads=2, vocab=200)
    EXTRACT_BATCH, ROUNDS = 16, 2
PRECISIONS = ["bf16", "fp32"] if HAS_GPU else ["fp32"]
_BERT_DIR = tempfile.mkdtemp(prefix="bench-bert-")


def _bert_folder() -> str:
    """A BERT configuration with random weights and a vocabulary of the right size, saved with save_pretrained."""
    folder = Path(_BERT_DIR)
    if not (folder / "config.json").is_file():
        from transformers import BertConfig, BertModel, BertTokenizerFast

        words = [f"w{i}" for i in range(BERT["vocab"] - 5)]
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
        torch.manual_seed(0)
        BertModel(BertConfig(vocab_size=BERT["vocab"], hidden_size=BERT["hidden"], num_hidden_layers=BERT["layers"],
                             num_attention_heads=BERT["heads"], intermediate_size=4 * BERT["hidden"])).save_pretrained(folder)
        BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    return str(folder)


def _model(backend: str):
    torch.manual_seed(0)
    options = {"features": "images", "image_backbone": VIT, "image_weights": "random", "image_backbone_args": VIT_ARGS,
               "text_backbone": _bert_folder(), "text_random_init": True, "embed_size": 1024 if HAS_GPU else 64,
               "meta_dim": 256 if HAS_GPU else 16, "grid_drop": True, "backend": backend}
    return build_model("avse", options, DataInfo(vocab_size=10, feature_dim=3, set_size=0, image_size=IMAGE)).to(DEVICE)


def _batch():
    gen = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(BERT["vocab"] - 5)]
    picks = torch.randint(len(words), (BATCH, WORDS), generator=gen).tolist()
    return Batch(images=torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen), img_ids=torch.arange(BATCH),
                 extra={"captions": [" ".join(words[i] for i in row) for row in picks]}).to(DEVICE)


def _step(backend, precision):
    model = _model(backend).train()
    optimizer = torch.optim.AdamW(model.param_groups(2e-4), lr=2e-4, weight_decay=1e-4)
    return training_step(model, optimizer, _batch(), precision)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_end_to_end_train_step(benchmark, backend, precision):
    step = _step(backend, precision)
    extra = dict(backend=backend, precision=precision, batch=BATCH, image=IMAGE, vit=VIT, bert=BERT)
    if backend == "kernels":
        ref_s, ours_s = median_seconds(_step("reference", precision), ROUNDS), median_seconds(step, ROUNDS)
        extra.update(speedup_vs_reference=ref_s / ours_s, reference_images_per_s=BATCH / ref_s)
    run_benchmark(benchmark, step, rounds=ROUNDS, warmup=1, **extra)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["images_per_s"] = BATCH / stats.stats.median


@pytest.mark.parametrize("precision", PRECISIONS)
def test_extraction_forward(benchmark, precision):
    """vse-extract's work per batch: the frozen backbone's whole forward (transfer included, decoding not)."""
    from vse_models.backbones import ImageBackbone

    torch.manual_seed(0)
    backbone = ImageBackbone(VIT, "random", IMAGE, VIT_ARGS).eval().to(DEVICE)
    pixels = torch.randn(EXTRACT_BATCH, 3, IMAGE, IMAGE, pin_memory=HAS_GPU)
    amp = torch.bfloat16 if precision == "bf16" else None

    @torch.no_grad()
    def run():
        with torch.autocast(DEVICE, dtype=amp, enabled=amp is not None):
            return backbone.tokens(pixels.to(DEVICE, non_blocking=True)).float().cpu()

    run_benchmark(benchmark, run, rounds=ROUNDS, warmup=1, precision=precision, batch=EXTRACT_BATCH, image=IMAGE)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["images_per_s"] = EXTRACT_BATCH / stats.stats.median
