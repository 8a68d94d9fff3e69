"""AVSE end to end: one training step and a 1000 x 5000 evaluation, package model vs reference model.

`pytest bench/bench_avse.py --benchmark-only`. Paper sizes (SPEC §3.2): D = 1024, regions 36 x 2048 with
6 group views and 512-d units (M = 12, Q = 2); grids 14 x 14 (+ CLS) x 768 with 2 RBS views and 256-d
units (M = 8, Q = 4); BiGRU text with 300-d words, captions of 12 words, vocabulary 10000.
- train step: forward + backward + AdamW step at batch 128 (the model's `loss(batch, epoch=1)`, hardest
  negatives), `backend="kernels"` (vse_kernels.meta_sim + hinge loss) vs `backend="reference"` (einsum +
  PyTorch hinge). extra_info: samples_per_s, speedup_vs_reference (both timed in this process).
- eval: encode N images + 5N captions (batches of 256), streamed similarity + ranks + metrics
  (vse_models.evaluation, blocks of 256 images). N = 1000 on a GPU (target < 1 s on an H100 with the
  package model), N = 100 on CPU (scaled down; the full size takes minutes there).
Precision: fp32 everywhere, plus bf16 autocast on a GPU. Targets on an H100: package >= 1.5x the
reference's training throughput.
All marked `slow`: at paper sizes each case takes 10-140 s on 2 CPU cores (5.5 of the suite's 7.7 minutes
there), so the quick tier (`-m "not slow"`) leaves them out; bench_mhcvse.py keeps a model step in it.
"""


import pytest
import torch

from common import DEVICE, HAS_GPU, run_benchmark, training_step, median_seconds
from vse_models.data.precomp import Batch
from vse_models.evaluation import metrics_from_ranks, streamed_ranks
from vse_models.models import DataInfo, build_model

pytestmark = pytest.mark.slow

BATCH = 128
VOCAB, WORDS = 10_000, 12
SETTINGS = {
    "regions": (DataInfo(vocab_size=VOCAB, feature_dim=2048, set_size=36), {"features": "regions"}),
    "grids": (DataInfo(vocab_size=VOCAB, feature_dim=768, set_size=14 * 14 + 1, grid_size=14), {"features": "grids"}),
}
PRECISIONS = ["fp32", "bf16"] if HAS_GPU else ["fp32"]
EVAL_N = 1000 if HAS_GPU else 100
ROUNDS = 10 if HAS_GPU else 3


def _model(setting, backend):
    info, options = SETTINGS[setting]
    torch.manual_seed(0)
    return build_model("avse", {**options, "backend": backend}, info).to(DEVICE), info


def _images(n, info, gen):
    feats = torch.randn(n, info.set_size, info.feature_dim, generator=gen).relu()
    return feats, torch.full((n,), info.set_size, dtype=torch.long)


def _texts(n, gen):
    lengths = torch.randint(6, WORDS + 1, (n,), generator=gen)
    tokens = torch.randint(4, VOCAB, (n, WORDS), generator=gen)
    mask = torch.arange(WORDS)[None] >= lengths[:, None]
    return tokens.masked_fill(mask, 0), lengths, mask


def _train_batch(info):
    gen = torch.Generator().manual_seed(0)
    images, image_lengths = _images(BATCH, info, gen)
    tokens, lengths, mask = _texts(BATCH, gen)
    return Batch(images=images, image_lengths=image_lengths, tokens=tokens, lengths=lengths, padding_mask=mask,
                 img_ids=torch.arange(BATCH), grid_size=info.grid_size).to(DEVICE)


def _train_step(setting, backend, precision):
    model, info = _model(setting, backend)
    model.train()
    return training_step(model, torch.optim.AdamW(model.parameters(), lr=1e-4), _train_batch(info), precision)



@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_avse_train_step(benchmark, setting, backend, precision):
    step = _train_step(setting, backend, precision)
    extra = dict(setting=setting, backend=backend, precision=precision, batch=BATCH)
    if backend == "kernels":
        ref_s = median_seconds(_train_step(setting, "reference", precision), ROUNDS)
        ours_s = median_seconds(step, ROUNDS)
        extra.update(speedup_vs_reference=ref_s / ours_s, reference_samples_per_s=BATCH / ref_s)
    run_benchmark(benchmark, step, rounds=ROUNDS, warmup=1, **extra)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["samples_per_s"] = BATCH / stats.stats.median


def _evaluate(setting, backend, precision):
    model, info = _model(setting, backend)
    model.eval()
    gen = torch.Generator().manual_seed(1)
    images, image_lengths = _images(EVAL_N, info, gen)
    tokens, lengths, mask = _texts(5 * EVAL_N, gen)
    amp = torch.bfloat16 if precision == "bf16" else None

    @torch.no_grad()
    def run():
        with torch.autocast(DEVICE, dtype=amp, enabled=amp is not None):
            img = torch.cat([model.encode_images(Batch(
                images=images[s:s + 256].to(DEVICE), image_lengths=image_lengths[s:s + 256].to(DEVICE),
                img_ids=torch.arange(s, min(EVAL_N, s + 256), device=DEVICE), grid_size=info.grid_size))
                for s in range(0, EVAL_N, 256)])
            txt = torch.cat([model.encode_texts(Batch(
                tokens=tokens[s:s + 256].to(DEVICE), lengths=lengths[s:s + 256].to(DEVICE),
                padding_mask=mask[s:s + 256].to(DEVICE))) for s in range(0, 5 * EVAL_N, 256)])
        return metrics_from_ranks(*streamed_ranks(model, img, txt, 5, 256))
    return run


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_avse_evaluation(benchmark, setting, backend, precision):
    """Encoding + similarity + metrics of N images x 5N captions (features already in host memory)."""
    run = _evaluate(setting, backend, precision)
    run_benchmark(benchmark, run, rounds=ROUNDS if HAS_GPU else 2, warmup=1, setting=setting, backend=backend,
                  precision=precision, n_images=EVAL_N, n_captions=5 * EVAL_N)
