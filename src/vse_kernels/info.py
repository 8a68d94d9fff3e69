"""`python -m vse_kernels.info`: versions, what was built, and how the kernels will run here."""

from __future__ import annotations

import os
import platform


def collect() -> dict:
    import torch

    from . import _extension

    info = {
        "vse_kernels": __import__("vse_kernels").__version__,
        "imported from": os.path.dirname(__import__("vse_kernels").__file__),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "no (CPU-only torch)",
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none visible",
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if os.environ.get("TRITON_INTERPRET") == "1":
        info["Triton kernels"] = "interpreter (TRITON_INTERPRET=1): CPU tensors, slow, for testing"
    elif info["triton"] != "not installed" and torch.cuda.is_available():
        info["Triton kernels"] = "native on CUDA tensors; CPU tensors use the CPU implementations"
    else:
        info["Triton kernels"] = "not used here (no GPU): CPU tensors use the CPU implementations"
    build = _extension.BUILD_INFO
    if _extension.C is not None:
        info["compiled ops (_C)"] = f"loaded, built for torch {build.get('torch_version')}"
        info["C++ (CPU) kernels"] = "yes"
        if build.get("with_cuda"):
            info["CUDA kernels"] = f"yes (CUDA {build.get('cuda_version')}, {build.get('nvcc')}, archs {build.get('cuda_archs')})"
        else:
            info["CUDA kernels"] = f"no ({build.get('cuda_reason')})"
    else:
        info["compiled ops (_C)"] = f"NOT loaded: {_extension.PROBLEM}; {_extension.REBUILD_HINT}"
        info["C++ (CPU) kernels"] = "no: pure-PyTorch fallbacks"
        info["CUDA kernels"] = "no: pure-PyTorch fallbacks"
    return info


def main() -> None:
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
