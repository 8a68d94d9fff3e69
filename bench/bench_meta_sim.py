"""AVSE meta-semantic similarity: vse_kernels.meta_sim vs the einsum reference and torch.compile(reference).

`pytest bench/bench_meta_sim.py --benchmark-only`. AVSE shapes (SPEC §2.1): region setting D = 1024,
block 512, 6 views -> M = 12, Q = 2, d = 512; grid setting D = 1024, block 256 -> M = 8, Q = 4, d = 256.
Inputs are the (N, M*d) / (N, Q*d) embeddings split by block_dim, normalize=True, as AVSE calls it.
On a GPU (bf16): training sizes 128^2 and 512^2 (fwd, fwd+bwd) and evaluation sizes 1000 x 5000 and
5000 x 25000 (fwd under no_grad), plus a dense bf16 matmul (8192^3) as the tensor-core yardstick.
On CPU (fp32, the blocked PyTorch path; Triton is not timed: the interpreter measures nothing) the same
shapes at training size 128^2 and a scaled-down evaluation size 250 x 1250; the GPU sizes are skipped.

extra_info: tflops = 2*Ni*Nt*M*Q*d (x3 with backward) / median time; unit_tensor_mib = what the
reference materialises; peak_mib (CUDA only, common.run_benchmark) = peak allocation above the inputs;
speedup_vs_reference = the reference's median / ours, both measured in this process (CUDA events or
perf_counter); at 5000 x 25000 fraction_of_dense_bf16 = our TFLOP/s / the measured dense matmul rate.
Targets on an H100: >= 10x the reference at 1000 x 5000, >= 3x at 512^2 fwd+bwd, >= 40% of dense at
5000 x 25000; on CPU: faster than the reference.
"""

import functools

import pytest
import torch

import vse_kernels as vk
from common import DEVICE, HAS_GPU, run_benchmark, median_seconds
from vse_kernels.ops.meta_sim import meta_sim_reference

SETTINGS = {"region": (12, 2, 512), "grid": (8, 4, 256)}  # (M, Q, d)
TRAIN_SIZES = [(128, 128), (512, 512)]
EVAL_SIZES = [(1000, 5000), (5000, 25000)]
CPU_SIZES = {(128, 128), (250, 1250)}
DTYPE = torch.bfloat16 if HAS_GPU else torch.float32
ROUNDS = 10 if HAS_GPU else 3
CASES = ([(size, mode) for size in TRAIN_SIZES for mode in ("fwd", "fwd+bwd")]
         + [(size, "eval") for size in EVAL_SIZES] + [((250, 1250), "eval")])


def _reference(img, txt, block_dim):
    return meta_sim_reference(img, txt, block_dim)


_compiled_reference = torch.compile(_reference, dynamic=False)
IMPLS = {
    "vse_kernels": lambda img, txt, block_dim: vk.meta_sim(img, txt, block_dim),
    "reference": _reference,
    "reference_compiled": _compiled_reference,
}


def _step(fn, size, setting, mode):
    m, q, d = SETTINGS[setting]
    ni, nt = size
    backward = mode == "fwd+bwd"
    img = torch.randn(ni, m * d, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    txt = torch.randn(nt, q * d, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    grad = torch.randn(ni, nt, device=DEVICE) if backward else None

    def step():
        if backward:
            return torch.autograd.grad(fn(img, txt, d), (img, txt), grad)
        with torch.no_grad():
            return fn(img, txt, d)
    return step



@functools.cache
def _dense_bf16_tflops(n=8192):
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * n**3 / median_seconds(lambda: a @ b, 20) / 1e12


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("size,mode", CASES, ids=[f"{s[0]}x{s[1]}-{m}" for s, m in CASES])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_meta_sim(benchmark, setting, size, mode, impl):
    if not HAS_GPU and size not in CPU_SIZES:
        pytest.skip("GPU-size case: on CPU only 128^2 training and 250 x 1250 evaluation are timed")
    if HAS_GPU and size == (250, 1250):
        pytest.skip("scaled-down CPU evaluation size")
    m, q, d = SETTINGS[setting]
    ni, nt = size
    flops = 2 * ni * nt * m * q * d * (3 if mode == "fwd+bwd" else 1)
    step = _step(IMPLS[impl], size, setting, mode)
    extra = dict(setting=setting, mode=mode, ni=ni, nt=nt, m=m, q=q, d=d, dtype=str(DTYPE),
                 unit_tensor_mib=ni * nt * m * q * torch.finfo(DTYPE).bits / 8 / 2**20)
    try:
        if impl == "vse_kernels":
            try:
                reference_s = median_seconds(_step(_reference, size, setting, mode), ROUNDS)
            except torch.OutOfMemoryError:
                reference_s = None
            ours_s = median_seconds(step, ROUNDS)
            extra["speedup_vs_reference"] = None if reference_s is None else reference_s / ours_s
            if HAS_GPU and size == (5000, 25000):
                dense = _dense_bf16_tflops()
                extra.update(dense_bf16_tflops=dense, fraction_of_dense_bf16=flops / ours_s / 1e12 / dense)
        run_benchmark(benchmark, step, rounds=ROUNDS, warmup=1, **extra)
    except torch.OutOfMemoryError:
        pytest.skip(f"{impl} runs out of GPU memory at {ni} x {nt} (it builds the unit tensor)")
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None with --benchmark-disable
        benchmark.extra_info["tflops"] = flops / stats.stats.median / 1e12


@pytest.mark.skipif(not HAS_GPU, reason="the dense bf16 tensor-core yardstick needs a CUDA GPU")
def test_dense_bf16_matmul(benchmark):
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    run_benchmark(benchmark, lambda: a @ b, rounds=20, n=n)
    benchmark.extra_info["tflops"] = 2 * n**3 / benchmark.stats.stats.median / 1e12
