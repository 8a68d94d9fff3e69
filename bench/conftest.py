"""Benchmarks (pytest-benchmark): `pytest bench/ --benchmark-only`. Shared helpers are in common.py."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # only so that imports work; Triton is not timed on CPU
