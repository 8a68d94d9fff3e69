"""The compiled part: loaded, built as asked, reported by `python -m vse_kernels.info`, optional at import."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vse_kernels import _extension


def test_extension_is_loaded():
    # CI installs the package with its compiled part: the fallback must not hide a broken build.
    assert _extension.C is not None, _extension.PROBLEM
    assert _extension.has_kernel("hinge_triplet_loss_fwd", "cpu")
    assert _extension.BUILD_INFO["torch_version"] == torch.__version__


@pytest.mark.skipif(os.environ.get("VSE_KERNELS_CUDA") != "1", reason="CUDA build not requested")
def test_cuda_sources_were_compiled():
    # CI sets VSE_KERNELS_CUDA=1: the .cu files must have compiled (they cannot run here).
    assert _extension.BUILD_INFO["with_cuda"] and _extension.C.with_cuda
    assert _extension.has_kernel("hinge_triplet_loss_fwd", "cuda")


def test_fallback_without_extension():
    # A missing or mismatched build must not break the import: the reference path takes over.
    code = (
        "import warnings, torch\n"
        "import vse_kernels as vk, vse_kernels._extension as ext\n"
        "from vse_kernels.ops.hinge_loss import hinge_triplet_loss_reference as ref\n"
        "assert ext.C is None and 'VSE_KERNELS_DISABLE_EXT' in ext.PROBLEM\n"
        "s = torch.randn(6, 6, requires_grad=True)\n"
        "assert torch.allclose(vk.hinge_triplet_loss(s), ref(s))\n"
        "vk.hinge_triplet_loss(s).backward()\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, VSE_KERNELS_DISABLE_EXT="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def test_info_reports_the_build():
    result = subprocess.run([sys.executable, "-m", "vse_kernels.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"compiled ops \(_C\) +loaded", result.stdout), result.stdout
    assert re.search(rf"torch +{re.escape(torch.__version__)}\n", result.stdout), result.stdout


def test_build_for_another_torch_is_not_loaded(tmp_path, monkeypatch):
    # Loading a binary built against another torch can crash: the loader must refuse it and say why.
    info = tmp_path / "_build_info.json"
    info.write_text('{"torch_version": "1.0.0", "with_cuda": false}')
    monkeypatch.setattr(_extension, "_BUILD_INFO_PATH", info)
    module, build_info, problem = _extension._load()
    assert module is None and build_info["torch_version"] == "1.0.0"
    assert f"built for torch 1.0.0, but torch {torch.__version__} is running" in problem
    monkeypatch.setattr(_extension, "_BUILD_INFO_PATH", tmp_path / "missing.json")
    assert "was not built" in _extension._load()[2]


def test_import_is_light_and_compile_still_treats_has_kernel_as_constant():
    # `import vse_kernels` must cost little beyond `import torch`: torch._dynamo (~3 s) and triton load
    # only when used. has_kernel carries the mark torch.compiler.assume_constant_result would give it.
    code = "import sys, vse_kernels\nprint(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    marked = torch.compiler.assume_constant_result(lambda: None)
    assert vars(marked) and all(getattr(_extension.has_kernel, k) == v for k, v in vars(marked).items())


@pytest.mark.slow
def test_python_at_the_repository_root_runs_the_installed_package(tmp_path):
    # src layout: a non-editable install, then `python -m vse_kernels.info` started in the clone's root must
    # import the installed package with its compiled part, not a source folder there. C++ only (VSE_KERNELS_CUDA=0):
    # what is checked is where Python finds the package; CI's own install compiles the CUDA sources.
    repo = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    env = dict(os.environ, VSE_KERNELS_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                    "--target", str(site), str(repo)], env=env, check=True, capture_output=True, timeout=1200)
    out = subprocess.run([sys.executable, "-m", "vse_kernels.info"], cwd=repo, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(site)), check=True).stdout
    assert re.search(rf"imported from\s+{re.escape(str(site / 'vse_kernels'))}\n", out), out
    assert re.search(r"compiled ops \(_C\)\s+loaded", out), out
