"""Loads the compiled part, vse_kernels._C, only when it was built for the running torch.

A missing or mismatched build never breaks `import vse_kernels`: it is reported once (here and by
`python -m vse_kernels.info`) and every op falls back to its pure-PyTorch path.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

REBUILD_HINT = "rebuild it against this torch with: pip install --no-build-isolation --no-deps --force-reinstall ."
_BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")


def _load():
    if os.environ.get("VSE_KERNELS_DISABLE_EXT") == "1":
        return None, {}, "disabled by VSE_KERNELS_DISABLE_EXT=1"
    if not _BUILD_INFO_PATH.exists():
        return None, {}, "vse_kernels._C was not built (no _build_info.json next to the package)"
    build_info = json.loads(_BUILD_INFO_PATH.read_text())
    built_for = build_info.get("torch_version")
    if built_for != torch.__version__:
        # Loading a binary built for another torch can crash at import or later: do not try.
        return None, build_info, f"vse_kernels._C was built for torch {built_for}, but torch {torch.__version__} is running"
    try:
        from . import _C
    except ImportError as error:
        return None, build_info, f"importing vse_kernels._C failed: {error}"
    return _C, build_info, None


C, BUILD_INFO, PROBLEM = _load()
if PROBLEM is not None and os.environ.get("VSE_KERNELS_DISABLE_EXT") != "1":
    warnings.warn(f"{PROBLEM}; the C++/CUDA ops use their pure-PyTorch fallbacks (slower); {REBUILD_HINT}",
                  RuntimeWarning, stacklevel=2)


def has_kernel(op: str, device_type: str) -> bool:
    """Whether the compiled library registered `vse_kernels::<op>` for this device type ("cpu", "cuda")."""
    if C is None:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"vse_kernels::{op}", key)


# A dispatcher query dynamo cannot trace, fixed after import: torch.compile treats its result as a constant.
# This is what torch.compiler.assume_constant_result does, without importing torch._dynamo (~3 s) at
# `import vse_kernels`; tests/test_build.py checks that torch.compile still sees the mark.
has_kernel._dynamo_marked_constant = True
