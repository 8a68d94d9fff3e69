"""Benchmark helpers: synchronised timing, peak memory, and the facts RESULTS.md needs.

Each benchmark records device, versions and, on CUDA, the peak memory allocated above the inputs in
benchmark.extra_info, so `--benchmark-json` output carries everything.
"""

import statistics
import time

import torch

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


def synchronize():
    if HAS_GPU:
        torch.cuda.synchronize()


def peak_memory_mib(fn) -> float | None:
    """Peak CUDA memory allocated by one call of fn beyond what was allocated before it (None on CPU)."""
    if not HAS_GPU:
        return None
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return peak / 2**20


def run_benchmark(benchmark, fn, *, rounds: int = 20, warmup: int = 3, **extra):
    """Times fn (synchronised), records its peak memory and the given extra fields."""
    def timed():
        out = fn()
        synchronize()
        return out

    for _ in range(warmup):
        timed()
    benchmark.extra_info.update(device=torch.cuda.get_device_name(0) if HAS_GPU else "cpu",
                                torch=torch.__version__, peak_mib=peak_memory_mib(fn), **extra)
    return benchmark.pedantic(timed, rounds=rounds, iterations=1)


def training_step(model, optimizer, batch, precision: str = "fp32", grad_clip: float = 2.0):
    """A closure running one optimizer step of a vse_models model (autocast for bf16), as vse-train does."""
    amp = torch.bfloat16 if precision == "bf16" else None

    def step():
        with torch.autocast(DEVICE, dtype=amp, enabled=amp is not None):
            loss, _ = model.loss(batch, 1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss.detach()

    return step


def median_seconds(fn, iters: int, warmup: int = 1) -> float:
    """Median wall seconds of fn() (synchronised), for comparison columns outside pytest-benchmark's timer."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
