"""Shared helpers for the tests: dtype-aware tolerances, value-and-gradient comparison, devices, and an
environment variable set for a module-scoped fixture (which cannot use monkeypatch)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

# (rtol, atol) for comparing an implementation with its reference run in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def assert_close(actual, expected, *, dtype: torch.dtype | None = None, scale: float = 1.0, msg: str = ""):
    """torch.testing.assert_close with the tolerance of `dtype` (default: expected's), times `scale`."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale, check_dtype=False,
                               msg=(lambda default: f"{msg}\n{default}") if msg else None)


def values_and_grads(fn, inputs, grad_output=None):
    """Runs fn on fresh leaf copies of `inputs` (tensors that require grad stay so) and returns
    (output, [gradient of each such input]). The upstream gradient defaults to a random tensor."""
    leaves = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    out = fn(*leaves)
    differentiable = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
    if grad_output is None:
        grad_output = torch.randn_like(out)
    grads = torch.autograd.grad(out, differentiable, grad_output) if differentiable else []
    return out.detach(), list(grads)


def assert_matches_reference(fn, reference, inputs, *, grad_output=None, dtype=None, scale=1.0):
    """Values and all input gradients of `fn` equal those of `reference` (same inputs, same upstream grad)."""
    out, grads = values_and_grads(fn, inputs, grad_output)
    if grad_output is None:
        grad_output = torch.randn_like(out)
        out, grads = values_and_grads(fn, inputs, grad_output)
    ref_out, ref_grads = values_and_grads(reference, inputs, grad_output)
    assert_close(out, ref_out, dtype=dtype, scale=scale, msg="forward value")
    for k, (g, ref_g) in enumerate(zip(grads, ref_grads)):
        assert_close(g, ref_g, dtype=dtype, scale=scale, msg=f"gradient of differentiable input {k}")


NAN, INF = float("nan"), float("inf")


def assert_matches_reference_with_nan(fn, reference, inputs, grad_output):
    """Values and input gradients equal the reference's, NaN where the reference has NaN (and only there)."""
    out, grads = values_and_grads(fn, inputs, grad_output)
    ref_out, ref_grads = values_and_grads(reference, inputs, grad_output)
    torch.testing.assert_close(out, ref_out, equal_nan=True, msg=lambda m: f"forward value\n{m}")
    for k, (g, ref_g) in enumerate(zip(grads, ref_grads)):
        torch.testing.assert_close(g, ref_g, equal_nan=True, msg=lambda m: f"gradient of input {k}\n{m}")


def relative_error(actual: torch.Tensor, exact: torch.Tensor) -> float:
    """||actual - exact|| / ||exact||, computed in float64."""
    exact = exact.double()
    return ((actual.double() - exact).norm() / exact.norm().clamp_min(1e-300)).item()


@contextlib.contextmanager
def env_var(name: str, value: str):
    """`name=value` in os.environ inside the block, the previous value (or its absence) restored after it."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name) if old is None else os.environ.__setitem__(name, old)
