"""What a user sees of a run: one epoch numbering, train.log, Ctrl-C and resume messages, plots, records."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from vse_models.train import KILL_ENV, SIGNAL_ENV

TINY = ["--synthetic", "n_train=40", "--synthetic", "n_dev=10", "--synthetic", "n_test=10", "--synthetic",
        "n_regions=8", "--synthetic", "feat_dim=16", "--synthetic", "grid_size=4", "--model", "vse",
        "--option", "embed_size=16", "--option", "word_dim=8", "--batch-size", "20", "--threads", "1"]


def _default_sigint():
    # A runner started in the background by a non-interactive shell (`pytest &`) ignores SIGINT, and Python
    # keeps an inherited SIG_IGN: the simulated Ctrl-C would do nothing. The child gets the default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _train(args, tmp_path, **env):
    env = {**os.environ, "VSE_DATA_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "vse_models.train", *TINY, *args], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, preexec_fn=_default_sigint)


@pytest.mark.slow
def test_interrupt_resume_and_a_finished_run(tmp_path):
    out = tmp_path / "run"
    # Ctrl-C in the middle of epoch 2 (10 steps per epoch): one line saying how to resume, exit 130.
    stopped = _train(["--epochs", "3", "--out", str(out)], tmp_path, **{KILL_ENV: "15", SIGNAL_ENV: "INT"})
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == (
        f"vse-train: interrupted. Checkpoints are written whole or not at all; the last one holds epochs 1-1. "
        f"Continue with: vse-train --out {out} --resume")
    assert "Traceback" not in stopped.stderr and "\r" not in stopped.stderr  # no progress bars off a terminal

    resumed = _train(["--epochs", "3", "--out", str(out), "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "epochs 1-1 of 3 are done (step 10); training goes on with epoch 2 from its start" in resumed.stdout
    assert re.search(r"^epoch 2/3: ", resumed.stdout, re.M) and not re.search(r"^epoch 1/3: ", resumed.stdout, re.M)
    metrics = json.loads((out / "metrics.json").read_text())
    best = int(re.search(r"best epoch (\d+)", resumed.stdout).group(1))
    assert metrics["best_epoch"] == best and 1 <= best <= 3  # the console's numbering
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert all(v == round(v, 4) for v in metrics["test"].values())
    # train.log holds what both consoles showed, epoch lines of both processes included.
    log = (out / "train.log").read_text()
    assert "epoch 1/3: " in log and "epoch 3/3: " in log and "best epoch" in log and "\r" not in log

    (out / "loss.png").unlink()
    again = _train(["--epochs", "3", "--out", str(out), "--resume"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "is finished (3 of 3 epochs); its metrics.json is kept, loss.png and rsum.png drawn again" in again.stdout
    assert json.loads((out / "metrics.json").read_text()) == metrics  # wall_time_s included
    assert (out / "loss.png").is_file()


def test_interrupt_before_the_first_checkpoint_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    stopped = _train(["--epochs", "2", "--out", str(out), "--no-progress"], tmp_path,
                     **{KILL_ENV: "3", SIGNAL_ENV: "INT"})
    assert stopped.returncode == 130, stopped.stderr
    assert "No epoch had finished, so there is nothing to resume" in stopped.stderr
    assert not out.exists()


def test_loss_plot_has_a_panel_per_loss_term(tmp_path):
    pytest.importorskip("matplotlib")
    from vse_models.train import Logger

    history = [{"epoch": e, "train_loss": 260.0 - e, "train_l_m": 20.0 / e, "train_l_reg": 252.8, "dev": {"rsum": 10.0 * e}}
               for e in (1, 2, 3)]
    logger = Logger(tmp_path, say=lambda *_: None)
    assert logger.plot(history) == ["loss.png", "rsum.png"]
    import matplotlib.image

    width = matplotlib.image.imread(tmp_path / "loss.png").shape[1]
    assert width > 2.5 * matplotlib.image.imread(tmp_path / "rsum.png").shape[1]  # 3 panels vs 1
