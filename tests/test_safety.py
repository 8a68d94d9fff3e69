"""No silent wrong answer from vse-train / vse-eval: non-finite data and models, checkpoints that are corrupt
or half-written, run folders that hold something, and bad option values all stop with one line naming what
is wrong and where."""

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from vse_models import checkpoint as ckpt
from vse_models.checkpoint import load_checkpoint, resolve, save_checkpoint
from vse_models.data import ensure_synthetic
from vse_models.evaluate import main as eval_main
from vse_models.models import DataInfo, build_model
from vse_models.train import main as train_main
from utils import env_var

TINY_DATA = ["n_train=40", "n_dev=10", "n_test=10", "n_regions=8", "feat_dim=16", "grid_size=4"]
TINY = [a for kv in TINY_DATA for a in ("--synthetic", kv)] + [
    "--model", "vse", "--option", "embed_size=16", "--option", "word_dim=8", "--batch-size", "20",
    "--no-progress", "--threads", "1"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VSE_DATA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _copy_tiny_data(cache, dest):
    root = ensure_synthetic({kv.split("=")[0]: int(kv.split("=")[1]) for kv in TINY_DATA}, cache)
    shutil.copytree(root, dest)
    return dest


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("vse-train: error:") or err.startswith("vse-eval: error:"), err
    assert "\n" not in err, f"not one line: {err}"
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One finished 1-epoch run (vse, tiny data), copied by the tests that damage it."""
    base = tmp_path_factory.mktemp("finished")
    with env_var("VSE_DATA_CACHE", str(base / "cache")):
        assert train_main(["--epochs", "1", "--out", str(base / "run"), *TINY]) == 0
    return base


@pytest.fixture
def run(finished_run, tmp_path, monkeypatch):
    monkeypatch.setenv("VSE_DATA_CACHE", str(finished_run / "cache"))
    shutil.copytree(finished_run / "run", tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_training_features_stop_the_run_naming_file_image_epoch_and_step(cache, tmp_path, capsys, bad):
    data = _copy_tiny_data(cache, tmp_path / "data")
    ims = np.load(data / "train_ims.npy")
    ims[17, 3, 5] = bad
    np.save(data / "train_ims.npy", ims)
    out = tmp_path / "run"
    assert train_main(["--data", str(data), "--epochs", "2", "--out", str(out), *TINY]) == 2
    err = _error(capsys)
    assert "epoch 1, step " in err and "train_ims.npy" in err and "image(s) 17 (1 values)" in err
    assert not out.exists()  # failed before its first checkpoint: nothing left behind


def test_non_finite_dev_features_stop_evaluation(cache, tmp_path, capsys):
    data = _copy_tiny_data(cache, tmp_path / "data")
    ims = np.load(data / "dev_ims.npy")
    ims[[2, 9]] = np.nan
    np.save(data / "dev_ims.npy", ims)
    assert train_main(["--data", str(data), "--epochs", "1", "--out", str(tmp_path / "run"), *TINY]) == 2
    err = _error(capsys)
    assert "dev_ims.npy" in err and "image(s) 2 (128 values), 9 (128 values)" in err


def test_a_diverging_model_stops_the_run_and_is_never_saved(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--epochs", "3", "--lr", "1e30", "--option", "tiled_loss=true", "--out", str(out), *TINY]) == 2
    err = _error(capsys)
    assert "epoch " in err and ("diverged" in err or "NaN or infinite" in err), err
    for which in ("best", "last"):
        found = resolve(out / which)
        if found is not None:  # a checkpoint written before the divergence: finite
            ckpt.check_finite_state(ckpt.load_file(str(found / "model.safetensors")), which)


def test_save_checkpoint_refuses_non_finite_weights(tmp_path):
    from vse_models.data import Vocabulary

    model = build_model("vse", {"embed_size": 8, "word_dim": 4}, DataInfo(10, 6, 4))
    with torch.no_grad():
        model.img_enc.fc.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save .*ck: NaN or infinite values in img_enc.fc.weight \(1 of"):
        save_checkpoint(tmp_path / "ck", model, config={}, vocab=Vocabulary.build(["a b c"], 1), meta={})
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------- checkpoints
def test_flipped_bytes_in_the_weights_are_found(run, capsys):
    path = run / "best" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data: the file still parses
    path.write_bytes(bytes(data))
    assert eval_main(["--checkpoint", str(run)]) == 2
    assert f"{path}: checksum mismatch" in _error(capsys)


@pytest.mark.parametrize("name", ["model.safetensors", "meta.json", "config.json", "vocab.json"])
def test_truncated_checkpoint_files_give_one_line_naming_the_file(run, capsys, name):
    path = run / "best" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert eval_main(["--checkpoint", str(run)]) == 2
    assert str(path) in _error(capsys)
    # Without checksums (a checkpoint of an older version) the file's own parser still names it.
    (run / "best" / "checksums.json").unlink()
    assert eval_main(["--checkpoint", str(run)]) == 2
    assert str(path) in _error(capsys)


@pytest.mark.parametrize("name", ["train_state.pt", "meta.json", "model.safetensors"])
def test_resume_from_a_corrupt_last_checkpoint_names_the_file(run, capsys, name):
    path = run / "last" / name
    path.write_bytes(path.read_bytes()[:200])
    assert train_main(["--epochs", "2", "--out", str(run), "--resume", *TINY]) == 2
    assert str(path) in _error(capsys)


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def _interrupted_save(monkeypatch, after: int, *args, **kwargs) -> None:
    """save_checkpoint stopped after `after` of its renames / removals (a kill at that point)."""
    calls = {"n": 0}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def counted(real):
        def wrapper(*a, **k):
            if calls["n"] == after:
                raise _Killed
            calls["n"] += 1
            return real(*a, **k)
        return wrapper

    monkeypatch.setattr(ckpt.os, "replace", counted(real_replace))
    monkeypatch.setattr(ckpt.shutil, "rmtree", counted(real_rmtree))
    try:
        save_checkpoint(*args, **kwargs)
    except _Killed:
        pass
    finally:
        monkeypatch.setattr(ckpt.os, "replace", real_replace)
        monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)


@pytest.mark.parametrize("first_kill", range(6))
def test_two_kills_in_a_row_never_remove_the_only_complete_checkpoint(tmp_path, monkeypatch, first_kill):
    from vse_models.data import Vocabulary

    model = build_model("vse", {"embed_size": 8, "word_dim": 4}, DataInfo(10, 6, 4))
    vocab = Vocabulary.build(["a b c"], 1)
    folder = tmp_path / "last"
    save_checkpoint(folder, model, config={}, vocab=vocab, meta={"epoch": 0})
    for second_kill in range(7):
        _interrupted_save(monkeypatch, first_kill, folder, model, config={}, vocab=vocab, meta={"epoch": 1})
        assert resolve(folder) is not None, (first_kill, "first")
        _interrupted_save(monkeypatch, second_kill, folder, model, config={}, vocab=vocab, meta={"epoch": 2})
        found = resolve(folder)
        assert found is not None, (first_kill, second_kill)
        load_checkpoint(found)  # complete and verified
    save_checkpoint(folder, model, config={}, vocab=vocab, meta={"epoch": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # leftovers of the killed saves are gone
    assert load_checkpoint(folder)[3]["epoch"] == 3


# -------------------------------------------------------------------------------------- run folders
def test_out_refuses_a_finished_run_without_last_and_a_foreign_folder(run, tmp_path, capsys):
    shutil.rmtree(run / "last")
    before = sorted(p.name for p in run.iterdir())
    assert train_main(["--epochs", "1", "--out", str(run), *TINY]) == 2
    assert "already holds files of an earlier run" in _error(capsys)
    assert sorted(p.name for p in run.iterdir()) == before
    mine = tmp_path / "thesis"
    mine.mkdir()
    (mine / "chapter1.tex").write_text("precious")
    assert train_main(["--epochs", "1", "--out", str(mine), *TINY]) == 2
    assert "files that are not a run's (chapter1.tex)" in _error(capsys)
    assert [p.name for p in mine.iterdir()] == ["chapter1.tex"]


def test_overwrite_replaces_the_run_and_keeps_everything_else(run, capsys):
    (run / "notes.txt").write_text("mine")
    (run / "metrics.json").write_text("{}")
    assert train_main(["--epochs", "1", "--out", str(run), "--overwrite", *TINY]) == 0
    assert "kept 1 file(s)" in capsys.readouterr().out
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / "metrics.json").read_text())["best_epoch"] == 1
    assert train_main(["--epochs", "1", "--out", str(run), "--overwrite", "--resume", *TINY]) == 2
    assert "pass one of them" in _error(capsys)


def test_resume_without_a_usable_checkpoint_is_an_error(run, tmp_path, capsys):
    assert train_main(["--epochs", "2", "--out", str(tmp_path / "new"), "--resume", *TINY]) == 2
    assert "no complete checkpoint" in _error(capsys)
    assert not (tmp_path / "new").exists()
    (run / "last" / "meta.json").unlink()
    best = (run / "best" / "model.safetensors").read_bytes()
    assert train_main(["--epochs", "2", "--out", str(run), "--resume", *TINY]) == 2
    assert "no complete checkpoint" in _error(capsys)
    assert (run / "best" / "model.safetensors").read_bytes() == best


# ------------------------------------------------------------------------------------ bad values
@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--batch-size", "-3"], "--batch-size must be an integer >= 1, got -3"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--threads", "-1"], "--threads must be an integer >= 1"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be"),
    (["--device", "gpu"], "--device: unknown device 'gpu'"),
    (["--option", "embed_size=abc"], "option embed_size of model 'vse' must be an integer, got 'abc'"),
    (["--option", "tiled_loss=False"], "option tiled_loss of model 'vse' must be true or false, got 'False'"),
    (["--option", "backend=kernel"], "option backend of model 'vse' must be one of ['kernels', 'reference']"),
    (["--option", "margin=inf"], "option margin of model 'vse' must be a finite number"),
    (["--test-split", "nosuch"], "nosuch_ims.npy"),
])
def test_bad_values_are_refused_before_any_work(cache, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert train_main(["--epochs", "1", "--out", str(out), *TINY, *args]) == 2
    assert message in _error(capsys)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_cuda_without_a_gpu_is_one_line_with_the_fix(cache, tmp_path, capsys):
    assert train_main(["--epochs", "1", "--out", str(tmp_path / "run"), *TINY, "--device", "cuda"]) == 2
    assert "no CUDA GPU is visible here" in _error(capsys)
    assert eval_main(["--checkpoint", str(tmp_path), "--device", "cuda:0"]) == 2
    assert "use --device cpu" in _error(capsys)


def test_config_file_values_are_checked_like_options(cache, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('batch_size = "64"\n')
    without_batch_size = [a for i, a in enumerate(TINY) if "--batch-size" not in TINY[max(0, i - 1):i + 1]]
    assert train_main(["--config", str(cfg), "--out", str(tmp_path / "run"), *without_batch_size]) == 2
    assert "--batch-size must be an integer >= 1, got '64'" in _error(capsys)


@pytest.mark.parametrize("model, option, value, message", [
    ("mh-cvse", "fusion", "adap_summ", "must be one of ['weight_sum', 'adap_sum', 'concat']"),
    ("mh-cvse", "pooling", "mean", "must be one of ['attention', 'gpo']"),
    ("mh-cvse", "self_attention", "False", "must be one of [True, False, 'image', 'text']"),
    ("mh-cvse", "dynamic_loss_weights", 0, "must be true or false"),
    ("mh-cvse", "loss_weights", "3,5,1,2", "must be a list"),
    ("avse", "reg_form", "Paper", "must be one of ['paper', 'code']"),
    ("avse", "meta_dim", "256", "must be a int (or null: unset)"),
    ("avse", "group_keep", True, "must be a finite number"),
])
def test_mistyped_model_options_are_refused(model, option, value, message):
    from vse_models.models import get_model_class

    with pytest.raises(ValueError, match=re.escape(f"option {option} of model '{model}' {message}, got {value!r}")):
        get_model_class(model).resolve_options({option: value})
    get_model_class(model).resolve_options({option: get_model_class(model).default_options[option]})
