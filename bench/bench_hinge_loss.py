"""Hinge triplet loss: C++/CUDA op vs the PyTorch reference and torch.compile(reference).

`pytest bench/bench_hinge_loss.py --benchmark-only`. Records time, peak memory (CUDA) and the effective
bandwidth of reading the B x B score matrix once (forward) or reading it and writing its gradient.
"""

import pytest
import torch

import vse_kernels as vk
from vse_kernels.ops.hinge_loss import hinge_triplet_loss_reference
from common import DEVICE, HAS_GPU, run_benchmark

SIZES = [128, 512, 1024, 2048, 4096]
IMPLEMENTATIONS = {
    "vse_kernels": vk.hinge_triplet_loss,
    "reference": hinge_triplet_loss_reference,
    "compiled_reference": torch.compile(hinge_triplet_loss_reference),
}


@pytest.mark.parametrize("max_violation", [True, False], ids=["hardest", "all"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", SIZES)
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_hinge_loss(benchmark, impl, batch, backward, max_violation):
    loss_fn = IMPLEMENTATIONS[impl]
    scores = torch.randn(batch, batch, device=DEVICE, requires_grad=backward)
    img_ids = torch.arange(batch, device=DEVICE) // 5

    def step():
        loss = loss_fn(scores, max_violation=max_violation, img_ids=img_ids)
        if backward:
            return torch.autograd.grad(loss, scores)[0]
        return loss

    result = run_benchmark(benchmark, step, rounds=50 if HAS_GPU else 5, impl=impl, batch=batch,
                           mode="fwd+bwd" if backward else "fwd", dtype="float32")
    moved = batch * batch * 4 * (2 if backward else 1)
    benchmark.extra_info["effective_GBps"] = moved / benchmark.stats.stats.median / 1e9
    assert result is not None
