"""bench/gpu_check.py's dry run: the prepared first-GPU command runs its own code end to end at tiny sizes,
so it cannot crash the first time it meets a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(data["stages"]) == {"build", "tests", "meta_sim", "attention", "hinge_loss", "search", "models"}
    assert all(not s["status"].startswith("failed") for s in data["stages"].values()), data["stages"]
    # every stage measured our op and its references (the CPU run has no SDPA flash/efficient backends)
    for stage in ("meta_sim", "attention", "hinge_loss", "search", "models"):
        rows = [r for r in data["rows"] if r["stage"] == stage]
        assert rows and any("ms" in r for r in rows if r["impl"] in ("vse_kernels", "kernels", "streamed top-k")), stage
    # the kernel variants timed beside the default (issue 16), each where it applies
    impls = {r["impl"] for r in data["rows"] if r["stage"] == "meta_sim" and "ms" in r}
    assert {"vse_kernels [split_units]", "vse_kernels [problem_tiles]", "vse_kernels [backward_splits=auto]",
            "vse_kernels [all]"} <= impls, impls
    assert not any("backward_splits" in r["impl"] for r in data["rows"] if r["case"].endswith("eval"))
    # the largest batch of the loss from embeddings, tiled and materialised
    largest = {r["impl"]: r["largest_batch"] for r in data["rows"] if "largest_batch" in r}
    assert largest == {"tiled": 16, "materialised_kernel": 16}, largest
    assert (tmp_path / "gpu_check.md").read_text().startswith("# gpu_check (dry run)")
