"""Every code block of README.md runs as written: Python blocks are executed, shell blocks parsed."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.M | re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
SHELL = [code for lang, code in BLOCKS if lang == "bash"]


def test_the_readme_has_code_blocks():
    assert len(PYTHON) >= 3 and len(SHELL) >= 2


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_block_runs(index, tmp_path):
    result = subprocess.run([sys.executable, "-c", PYTHON[index]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"README python block {index}:\n{PYTHON[index]}\n{result.stderr}"


@pytest.mark.parametrize("index", range(len(SHELL)))
def test_shell_block_parses(index):
    result = subprocess.run(["bash", "-n", "-c", SHELL[index]], capture_output=True, text=True)
    assert result.returncode == 0, f"README bash block {index}:\n{SHELL[index]}\n{result.stderr}"


def test_the_main_command_installs_what_draws_the_plots():
    # vse-train's loss.png / rsum.png need matplotlib: the main command must install it (through an extra).
    import tomllib

    main = re.search(r"<!-- main-command -->\n```bash\n(.*?)```", README, re.S).group(1)
    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    installed = [dep for extra in re.findall(r'"\.\[([\w,]+)\]"', main) for e in extra.split(",") for dep in extras[e]]
    assert any(dep.startswith("matplotlib") for dep in installed), main
