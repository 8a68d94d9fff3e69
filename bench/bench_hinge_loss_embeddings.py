"""Hinge loss straight from embeddings (tiled) vs materialising the B x B score matrix.

`pytest bench/bench_hinge_loss_embeddings.py --benchmark-only`. On a GPU: B from 4k to 256k at D = 1024 in
bf16 (the materialising paths are skipped where the matrix and its gradient do not fit); on CPU a small
size so the file runs anywhere. Records time and peak memory above the inputs (CUDA).
"""

import pytest
import torch

import vse_kernels as vk
from vse_kernels.ops.hinge_loss import hinge_triplet_loss_embeddings_reference
from common import DEVICE, HAS_GPU, run_benchmark

SIZES = [4096, 16384, 65536, 262144] if HAS_GPU else [1024, 4096]
DIM, DTYPE = (1024, torch.bfloat16) if HAS_GPU else (128, torch.float32)
MATERIALISED_LIMIT = 65536  # B x B scores plus their gradient: 16 GiB in bf16 at this size

IMPLEMENTATIONS = {
    "tiled": vk.hinge_triplet_loss_embeddings,
    "materialised_kernel": lambda img, txt, **kw: vk.hinge_triplet_loss(img @ txt.T, **kw),
    "materialised_reference": hinge_triplet_loss_embeddings_reference,
}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("batch", SIZES)
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_hinge_loss_embeddings(benchmark, impl, batch, backward):
    if impl != "tiled" and batch > MATERIALISED_LIMIT:
        pytest.skip(f"the {batch} x {batch} matrix and its gradient do not fit")
    loss_fn = IMPLEMENTATIONS[impl]
    img = torch.nn.functional.normalize(torch.randn(batch, DIM, device=DEVICE), dim=1).to(DTYPE)
    txt = torch.nn.functional.normalize(img.float() + torch.randn_like(img, dtype=torch.float), dim=1).to(DTYPE)
    img.requires_grad_(backward), txt.requires_grad_(backward)
    img_ids = torch.arange(batch, device=DEVICE) // 5

    def step():
        loss = loss_fn(img, txt, img_ids=img_ids)
        return torch.autograd.grad(loss, (img, txt)) if backward else loss

    run_benchmark(benchmark, step, rounds=10 if HAS_GPU else 3, warmup=1, impl=impl, batch=batch, dim=DIM,
                  dtype=str(DTYPE), mode="fwd+bwd" if backward else "fwd")
    benchmark.extra_info["TFLOPs"] = 2 * batch * batch * DIM / benchmark.stats.stats.median / 1e12
