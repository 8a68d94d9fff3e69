"""Build vse_kernels._C from csrc/: C++ (CPU) always, CUDA sources when possible.

Switches (environment variables):
  VSE_KERNELS_CUDA=auto|1|0   auto (default): build CUDA when torch is a CUDA build and a toolkit is
                              found; 1: require it (fail otherwise); 0: C++ only.
  TORCH_CUDA_ARCH_LIST        e.g. "9.0" or "8.0;9.0+PTX"; default: the visible GPUs, else "9.0".
  MAX_JOBS                    parallel compile jobs (ninja).
  CUDA_HOME                   toolkit root; default: /usr/local/cuda when it holds a toolkit.
"""

import glob
import json
import os
import subprocess

from setuptools import setup


def _cuda_home_default():
    # torch derives CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin then yields
    # /usr/local, which has no CUDA headers. Prefer a real toolkit root when there is one.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    root = "/usr/local/cuda"
    if os.path.exists(os.path.join(root, "include", "cuda_runtime.h")):
        os.environ["CUDA_HOME"] = root


_cuda_home_default()

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402



def _want_cuda():
    mode = os.environ.get("VSE_KERNELS_CUDA", "auto").strip().lower()
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"VSE_KERNELS_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return False, "disabled by VSE_KERNELS_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append("torch is not a CUDA build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        problems.append(f"no CUDA toolkit found (CUDA_HOME={CUDA_HOME})")
    if problems:
        if mode == "1":
            raise SystemExit("VSE_KERNELS_CUDA=1 but " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, f"CUDA toolkit at {CUDA_HOME}"


def _nvcc_version():
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[-1]
    except Exception:  # reported as unknown; the build itself fails loudly if nvcc is broken
        return "unknown"


def _extension():
    with_cuda, why = _want_cuda()
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cuda_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    cxx_flags = ["-O3", "-fopenmp"]  # ATen's parallel_for is an OpenMP pragma in a header
    info = {"torch_version": torch.__version__, "with_cuda": with_cuda, "cuda_reason": why,
            "cuda_version": None, "nvcc": None, "cuda_archs": None}
    if not with_cuda:
        print(f"vse_kernels: building C++ only ({why})")
        ext = CppExtension("vse_kernels._C", cpp_sources,
                           extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"])
        return ext, info
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to ask: compile for Hopper
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPUs: " + ";".join(
        "{}.{}".format(*torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count()))
    info.update(cuda_version=torch.version.cuda, nvcc=_nvcc_version(), cuda_archs=archs)
    print(f"vse_kernels: building C++ and CUDA ({why}; archs {archs})")
    ext = CUDAExtension(
        "vse_kernels._C", cpp_sources + cuda_sources,
        define_macros=[("VSE_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"])
    return ext, info


class BuildWithInfo(BuildExtension):
    """Also writes _build_info.json beside the built vse_kernels._C, which the loader checks before importing it."""

    def run(self):
        super().run()
        path = os.path.join(os.path.dirname(self.get_ext_fullpath("vse_kernels._C")), "_build_info.json")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(BUILD_INFO, f, indent=1)


EXTENSION, BUILD_INFO = _extension()

setup(ext_modules=[EXTENSION], cmdclass={"build_ext": BuildWithInfo})
