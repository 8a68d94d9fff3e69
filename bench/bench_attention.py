"""Short-sequence multi-head attention: vse_kernels vs scaled_dot_product_attention and nn.MultiheadAttention.

`pytest bench/bench_attention.py --benchmark-only`. On a GPU: bf16, B in {128, 1024, 4096}, H = 8, Dh = 128,
L in {36, 64, 128}, forward and forward + backward, without and with a key-padding mask. The op is compared
with SDPA's flash and memory-efficient backends (flash takes no mask: skipped with one), the module with
nn.MultiheadAttention (E = 1024, train mode, need_weights=False).

extra_info: effective_GBps = the bytes an ideal fused kernel must move (q, k, v read and out written;
backward also reads q, k, v, out, dout and writes dq, dk, dv; mask and lse ignored) / median time, and
hbm_fraction against the H100's 3.35 TB/s datasheet bandwidth (at these lengths attention is memory-bound,
SPEC §9); speedup_vs_* = a baseline's median time / ours, both timed with CUDA events in the same process;
peak_mib from common.run_benchmark. On CPU (no Triton timing there: the interpreter is not a measure of
anything) a small fp32 configuration compares the op's CPU math path with SDPA and the modules.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import vse_kernels as vk
from common import DEVICE, HAS_GPU, run_benchmark

HEADS, HEAD_DIM = 8, 128
HBM_GBPS = 3350.0   # H100 SXM datasheet
if HAS_GPU:
    BATCHES, LENGTHS, DTYPE, ROUNDS = [128, 1024, 4096], [36, 64, 128], torch.bfloat16, 20
else:
    BATCHES, LENGTHS, DTYPE, ROUNDS = [16], [36], torch.float32, 5

MODES = ["fwd", "fwd+bwd"]


def _sdpa(backend):
    def run(q, k, v, pad):
        mask = None if pad is None else ~pad[:, None, None, :]
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return run


OPS = {
    "vse_kernels": lambda q, k, v, pad: vk.multi_head_attention(q, k, v, key_padding_mask=pad),
    "sdpa_flash": _sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa_efficient": _sdpa(SDPBackend.EFFICIENT_ATTENTION),
    "sdpa_default": _sdpa(None),   # the CPU baseline (flash/efficient are CUDA backends)
}


def _inputs(batch, length, masked, backward):
    q, k, v = (torch.randn(batch, HEADS, length, HEAD_DIM, device=DEVICE, dtype=DTYPE, requires_grad=backward)
               for _ in range(3))
    pad = None
    if masked:   # words: random lengths between 5 and L
        lengths = torch.randint(5, length + 1, (batch,), device=DEVICE)
        pad = torch.arange(length, device=DEVICE)[None, :] >= lengths[:, None]
    return q, k, v, pad


def _step(fn, inputs, backward):
    q, k, v, pad = inputs
    grad = torch.randn(q.shape, device=DEVICE, dtype=DTYPE) if backward else None

    def step():
        out = fn(q, k, v, pad)
        if backward:
            return torch.autograd.grad(out, (q, k, v), grad)
        return out
    return step


def _median_ms(fn, iters=20):
    """CUDA-event median of fn() in ms, for the speedup columns."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _skip_reason(impl, masked):
    if not HAS_GPU and impl in ("sdpa_flash", "sdpa_efficient"):
        return "SDPA's flash/efficient backends need a CUDA GPU"
    if HAS_GPU and impl == "sdpa_default":
        return "on a GPU SDPA is benchmarked per backend (sdpa_flash, sdpa_efficient)"
    if impl == "sdpa_flash" and masked:
        return "SDPA's flash backend does not accept an attention mask"
    return None


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", list(OPS))
def test_attention_op(benchmark, impl, batch, length, mode, masked):
    reason = _skip_reason(impl, masked)
    if reason:
        pytest.skip(reason)
    backward = mode == "fwd+bwd"
    inputs = _inputs(batch, length, masked, backward)
    step = _step(OPS[impl], inputs, backward)
    run_benchmark(benchmark, step, rounds=ROUNDS, impl=impl, batch=batch, heads=HEADS, length=length,
                  head_dim=HEAD_DIM, mode=mode, masked=masked, dtype=str(DTYPE).removeprefix("torch."))
    tensor_bytes = batch * HEADS * length * HEAD_DIM * DTYPE.itemsize
    moved = tensor_bytes * (12 if backward else 4)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["effective_GBps"] = moved / seconds / 1e9
    if HAS_GPU:
        benchmark.extra_info["hbm_fraction"] = moved / seconds / 1e9 / HBM_GBPS
        if impl == "vse_kernels":
            ours = _median_ms(step)
            for name in ("sdpa_flash", "sdpa_efficient"):
                if not _skip_reason(name, masked):
                    benchmark.extra_info[f"speedup_vs_{name}"] = _median_ms(_step(OPS[name], inputs, backward)) / ours


def _modules(batch, length, masked, backward):
    embed = HEADS * HEAD_DIM
    mha = nn.MultiheadAttention(embed, HEADS, batch_first=True, device=DEVICE, dtype=DTYPE)
    ours = vk.nn.MultiheadSelfAttention.from_torch(mha)
    x = torch.randn(batch, length, embed, device=DEVICE, dtype=DTYPE, requires_grad=backward)
    pad = None
    if masked:
        pad = torch.arange(length, device=DEVICE)[None, :] >= torch.randint(5, length + 1, (batch, 1), device=DEVICE)
    grad = torch.randn_like(x) if backward else None

    def make(module, call):
        params = [p for p in module.parameters()]

        def step():
            out = call(x, pad)
            if backward:
                return torch.autograd.grad(out, [x, *params], grad)
            return out
        return step

    return {
        "vse_kernels": make(ours, lambda t, m: ours(t, m)),
        "nn_mha": make(mha, lambda t, m: mha(t, t, t, key_padding_mask=m, need_weights=False)[0]),
    }


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padmask"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", ["vse_kernels", "nn_mha"])
def test_attention_module(benchmark, impl, batch, length, mode, masked):
    backward = mode == "fwd+bwd"
    steps = _modules(batch, length, masked, backward)
    run_benchmark(benchmark, steps[impl], rounds=ROUNDS, impl=impl, batch=batch, heads=HEADS, length=length,
                  embed_dim=HEADS * HEAD_DIM, mode=mode, masked=masked, dtype=str(DTYPE).removeprefix("torch."))
    if HAS_GPU and impl == "vse_kernels":
        benchmark.extra_info["speedup_vs_nn_mha"] = _median_ms(steps["nn_mha"]) / _median_ms(steps["vse_kernels"])
