"""Test session setup: Triton runs in its CPU interpreter unless a GPU is present.

TRITON_INTERPRET must be set before anything imports triton; `import torch` does not, so checking for a
GPU through torch first is safe.
"""

import os
import sys

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    native = pytest.mark.skip(reason="Triton runs natively here (TRITON_INTERPRET is not 1)")
    for item in items:
        if "cuda" in item.keywords and not HAS_GPU:
            item.add_marker(no_gpu)
        if "triton_interpret" in item.keywords and not INTERPRETING:
            item.add_marker(native)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
