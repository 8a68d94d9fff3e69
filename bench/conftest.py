"""Benchmarks (pytest-benchmark): `pytest bench/ --benchmark-only`. Shared helpers are in common.py;
`python -m bench.gpu_check` is the prepared first-GPU run (a subset, side by side, in one process)."""

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
