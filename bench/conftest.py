"""Benchmarks (pytest-benchmark): `pytest bench/ --benchmark-only` (all), `-m "not slow"` (the quick tier).
Shared helpers are in common.py; `python -m bench.gpu_check` is the prepared first-GPU run (a subset, side
by side, in one process). After pytest-benchmark's tables, one line per group gives each implementation's
time relative to the reference's."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # only so that imports work; Triton is not timed on CPU


@pytest.fixture(autouse=True)
def _group_by_op_and_shape(request):
    """One pytest-benchmark table per op and shape: the implementations (impl / backend parameters) of a
    case land in the same group, so the table's (ratio) columns compare them side by side."""
    if "benchmark" not in request.fixturenames:
        return
    params = getattr(request.node, "callspec", None)
    shape = ", ".join(f"{k}={v}" for k, v in (params.params.items() if params else ()) if k not in ("impl", "backend"))
    request.getfixturevalue("benchmark").group = f"{request.node.originalname.removeprefix('test_')}: {shape}"


# The baseline of a group's ratios: the first of these among its implementations.
BASELINES = ("reference", "materialised_reference", "sdpa_default", "nn_mha")


def _implementation(bench) -> str | None:
    params = bench.params or {}
    return params.get("impl", params.get("backend"))


def ratio_lines(benchmarks) -> list[str]:
    """One line per group: the median of each implementation and the baseline's median divided by it
    (> 1: faster than the baseline), in the order they ran."""
    groups: dict[str, dict[str, float]] = {}
    for bench in benchmarks:
        impl = _implementation(bench)
        if bench and impl is not None:
            groups.setdefault(bench.group or bench.name, {})[impl] = bench.stats.median
    lines = []
    for group, medians in groups.items():
        baseline = next((name for name in BASELINES if name in medians), None)
        cells = [f"{impl} {1e3 * t:.4g} ms" + (f" ({medians[baseline] / t:.2f}x)" if baseline and impl != baseline
                                                 else " (baseline)" if impl == baseline else "")
                 for impl, t in medians.items()]
        lines.append(f"{group}: " + " | ".join(cells))
    return lines


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    lines = ratio_lines(session.benchmarks) if session is not None else []
    if lines:
        terminalreporter.write_sep("-", "time relative to the reference: baseline median / median (> 1: faster)")
        for line in lines:
            terminalreporter.write_line(line)
