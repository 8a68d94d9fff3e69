"""MH-CVSE training-step throughput: package model (vse_kernels attention + hinge loss) vs the pure-PyTorch
reference model (nn.MultiheadAttention + the PyTorch hinge loss), same weights, same batch.

`pytest bench/bench_mhcvse.py --benchmark-only`. One step = encode both sides, the four-term loss,
backward, Adam step. GPU: the paper's sizes (D = 1024, q = 300 concepts, 36 regions x 2048, batch 128,
captions of 8-20 words, vocabulary 10k), fp32 and bf16 autocast. CPU: a small fp32 configuration (the
kernels' CPU path is a math fallback, so CPU timings say nothing about the GPU target).

extra_info: pairs_per_s (image-caption pairs per second), speedup_vs_reference = the reference's median
step time / the package's, both timed in the same process (target >= 1.3x on an H100), peak_mib.
"""

from types import SimpleNamespace

import pytest
import torch

from common import DEVICE, HAS_GPU, run_benchmark, training_step, median_seconds
from vse_models.data import Vocabulary
from vse_models.data.precomp import Batch
from vse_models.models import DataInfo
from vse_models.models.mhcvse import MHCVSE

if HAS_GPU:
    SIZES = dict(batch=128, regions=36, feat=2048, vocab=10000, min_len=8, max_len=20,
                 options=dict(embed_size=1024, word_dim=300, num_concepts=300, gcn_hidden=512))
    PRECISIONS, ROUNDS = ["fp32", "bf16"], 20
else:
    SIZES = dict(batch=32, regions=36, feat=256, vocab=500, min_len=8, max_len=20,
                 options=dict(embed_size=128, word_dim=64, num_concepts=64, gcn_hidden=128))
    PRECISIONS, ROUNDS = ["fp32"], 3


def _train_split(g):
    """A random 'training split' (5 captions per image) for prepare(): concepts and graph need captions."""
    words = [f"w{i}" for i in range(SIZES["vocab"] - 4)]
    vocab = Vocabulary(words)
    n_img = 200
    tokens = [[1] + (torch.randint(4, len(vocab), (int(torch.randint(SIZES["min_len"], SIZES["max_len"] + 1, (1,), generator=g)),), generator=g)).tolist() + [2]
              for _ in range(5 * n_img)]
    return SimpleNamespace(vocab=vocab, tokens=tokens, captions_per_image=5, n_images=n_img)


def _setup(backend):
    g = torch.Generator().manual_seed(0)
    split = _train_split(g)
    info = DataInfo(vocab_size=SIZES["vocab"], feature_dim=SIZES["feat"], set_size=SIZES["regions"])
    torch.manual_seed(0)
    model = MHCVSE(MHCVSE.resolve_options({**SIZES["options"], "backend": backend}), info)
    model.prepare(split)
    model.to(DEVICE).train()
    b = SIZES["batch"]
    caps = torch.randperm(len(split.tokens), generator=g)[:b]
    seqs = [split.tokens[int(c)] for c in caps]
    lengths = torch.tensor([len(s) for s in seqs])
    tokens = torch.zeros(b, int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s)
    batch = Batch(images=torch.randn(b, SIZES["regions"], SIZES["feat"], generator=g).relu(),
                  image_lengths=torch.full((b,), SIZES["regions"]), tokens=tokens, lengths=lengths,
                  padding_mask=tokens == 0, img_ids=caps // 5, caption_ids=caps).to(DEVICE)
    return model, torch.optim.Adam(model.parameters(), lr=2e-4), batch


def _step_fn(backend, precision):
    model, opt, batch = _setup(backend)
    return training_step(model, opt, batch, precision)



@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_mhcvse_train_step(benchmark, backend, precision):
    step = _step_fn(backend, precision)
    result = run_benchmark(benchmark, step, rounds=ROUNDS, warmup=2, backend=backend, precision=precision,
                           **{k: v for k, v in SIZES.items() if k != "options"}, **SIZES["options"])
    assert torch.isfinite(result)
    benchmark.extra_info["pairs_per_s"] = SIZES["batch"] / benchmark.stats.stats.median
    if backend == "kernels":
        ours = benchmark.stats.stats.median
        benchmark.extra_info["speedup_vs_reference"] = median_seconds(_step_fn("reference", precision), ROUNDS) / ours
