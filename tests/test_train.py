"""Layers, the baseline model, the vse-train / vse-eval CLIs, checkpoints and kill + resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vse_models.checkpoint import load_checkpoint, save_checkpoint
from vse_models.data import Split, Vocabulary, ensure_synthetic
from vse_models.evaluate import main as eval_main
from vse_models.evaluation import METRIC_KEYS, evaluate_split
from vse_models.layers import GPO, drop_set_elements
from vse_models.models import DataInfo, build_model, get_model_class
from vse_models.train import KILL_ENV, main as train_main

TINY_DATA = ["n_train=40", "n_dev=10", "n_test=10", "n_regions=8", "feat_dim=16", "grid_size=4"]
TINY_ARGS = [a for kv in TINY_DATA for a in ("--synthetic", kv)] + [
    "--option", "embed_size=32", "--option", "word_dim=16", "--batch-size", "20", "--no-progress"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("VSE_DATA_CACHE", str(path))
    return path


def _tiny_split(cache, split="train"):
    root = ensure_synthetic({kv.split("=")[0]: int(kv.split("=")[1]) for kv in TINY_DATA}, cache)
    train = Split(root, "train")
    vocab = Vocabulary.build(train.captions, 1)
    return Split(root, split, vocab), vocab


def test_gpo_ignores_padding_and_sorts_per_channel():
    gpo = GPO(32, 32)
    x = torch.randn(3, 6, 5)
    lengths = torch.tensor([6, 4, 1])
    pooled, w = gpo(x, lengths)
    y = x.clone()
    y[1, 4:] = 1e3
    y[2, 1:] = -7
    assert torch.allclose(gpo(y, lengths)[0], pooled)
    assert torch.allclose(w.sum(1), torch.ones(3, 1)) and (w[1, 4:] < 1e-30).all()
    assert torch.allclose(pooled[2], x[2, 0])  # a one-element set pools to itself
    perm = torch.randperm(6)
    assert torch.allclose(gpo(x[:1, perm], lengths[:1])[0], pooled[:1], atol=1e-6)  # order invariant


def test_gpo_weights_once_per_distinct_length_equal_per_set_weights():
    torch.manual_seed(0)
    gpo = GPO(32, 32)
    lengths = torch.tensor([5, 3, 5, 1, 3, 5, 2])
    shared = gpo.pool_weights(lengths, 5)
    per_set = torch.cat([gpo._weights_per_length(lengths[i:i + 1], 5) for i in range(len(lengths))])
    torch.testing.assert_close(shared, per_set, rtol=1e-6, atol=1e-7)
    g = torch.randn_like(shared)
    grads = [torch.autograd.grad((w * g).sum(), list(gpo.parameters())) for w in (shared, per_set)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_drop_set_elements_packs_kept_elements():
    x = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1) + 1
    out, lengths = drop_set_elements(x, torch.tensor([5, 3]), 0.5, torch.Generator().manual_seed(0))
    for b in range(2):
        kept = out[b, :lengths[b], 0]
        assert lengths[b] >= 1 and (kept > 0).all() and (out[b, lengths[b]:] == 0).all()
        assert torch.equal(kept, kept.sort()[0])  # original order kept
    assert (out[1, :lengths[1], 0] <= 8).all()  # nothing from image 1's padding


def test_vse_kernels_and_reference_backends_agree(cache):
    train, vocab = _tiny_split(cache)
    info = DataInfo(len(vocab), train.feature_dim, train.set_size)
    batch = train.pair_batch(list(range(0, 40, 2)))
    results = []
    for backend in ("kernels", "reference"):
        torch.manual_seed(0)
        model = build_model("vse", {"embed_size": 16, "word_dim": 8, "backend": backend, "region_drop": 0.0}, info)
        for epoch in (0, 1):  # all negatives, then hardest negatives
            model.zero_grad()
            loss, logs = model.loss(batch, epoch)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    for (la, ga), (lb, gb) in zip(results[:2], results[2:]):
        torch.testing.assert_close(la, lb)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="unknown option"):
        build_model("vse", {"embed_dim": 3}, info)
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        get_model_class("nope")


def test_checkpoint_round_trip(cache, tmp_path):
    dev, vocab = _tiny_split(cache, "dev")
    info = DataInfo(len(vocab), dev.feature_dim, dev.set_size)
    model = build_model("vse", {"embed_size": 16, "word_dim": 8}, info).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ckpt = save_checkpoint(tmp_path / "ck", model, config={"features": "regions"}, vocab=vocab, meta={"epoch": 3})
    save_checkpoint(tmp_path / "ck", model, config={"features": "regions"}, vocab=vocab, meta={"epoch": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ck"]  # no temporary leftovers
    loaded, vocab2, config, meta = load_checkpoint(ckpt)
    assert vocab2 == vocab and meta["epoch"] == 3 and config["model_options"]["embed_size"] == 16
    b = dev.pair_batch(range(10))
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(b), model.encode_images(b), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_texts(b), model.encode_texts(b), rtol=0, atol=0)
    assert evaluate_split(loaded, dev) == evaluate_split(model, dev)


def test_one_epoch_cli_run_and_vse_eval(cache, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(["--epochs", "1", "--out", str(out), *TINY_ARGS]) == 0
    for name in ("config.json", "vocab.json", "metrics.jsonl", "metrics.csv", "metrics.json", "loss.png",
                 "rsum.png", "best/model.safetensors", "best/config.json", "last/train_state.pt"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) == set(METRIC_KEYS) and metrics["best_epoch"] == 1  # epochs count from 1
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "dev_rsum" in json.loads(lines[0])
    assert "| test |" in capsys.readouterr().out

    assert eval_main(["--checkpoint", str(out), "--json", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["test"] == metrics["test"]
    assert eval_main(["--checkpoint", str(out), "--split", "dev", "--fold5"]) == 0
    assert "5-fold" in capsys.readouterr().out

    # A second run into the same folder without --resume is refused.
    assert train_main(["--epochs", "1", "--out", str(out), *TINY_ARGS]) == 2
    assert "--resume" in capsys.readouterr().err
    assert eval_main(["--checkpoint", str(tmp_path / "nothing")]) == 2


def test_config_file_and_command_line_precedence(tmp_path, monkeypatch):
    from vse_models.train import build_parser, resolve_config

    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('epochs = 3\nlr = 1e-3\n[model_options]\nembed_size = 64\n')
    cfg = resolve_config(build_parser().parse_args(["--config", str(cfg_file), "--lr", "0.01"]))
    assert cfg["epochs"] == 3 and cfg["lr"] == 0.01 and cfg["model_options"]["embed_size"] == 64
    assert cfg["model"] == "avse"  # the default model
    assert cfg["model_options"]["word_dim"] == 128 and cfg["model_options"]["group_keep"] == 0.5  # its preset
    assert cfg["out"] == os.path.join("runs", "avse-synthetic") and cfg["features"] == "regions"
    (tmp_path / "bad.json").write_text('{"epochz": 3}')
    with pytest.raises(ValueError, match=r"bad.json: unknown key\(s\) \['epochz'\]"):
        resolve_config(build_parser().parse_args(["--config", str(tmp_path / "bad.json")]))


def test_bad_data_folder_is_reported(tmp_path, capsys):
    assert train_main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "d").mkdir()
    assert train_main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "train_ims.npy" in capsys.readouterr().err


def _run(args, env_extra, cwd):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "vse_models.train", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(cache, tmp_path):
    env = {"VSE_DATA_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    common = ["--epochs", "3", *TINY_ARGS, "--features", "grids"]
    full = _run([*common, "--out", str(tmp_path / "full")], env, tmp_path)
    assert full.returncode == 0, full.stderr
    # 10 steps per epoch: killed (SIGKILL) in the middle of the second epoch, after one checkpoint.
    killed = _run([*common, "--out", str(tmp_path / "re")], {**env, KILL_ENV: "15"}, tmp_path)
    assert killed.returncode == -9, killed.stderr
    assert json.loads((tmp_path / "re" / "last" / "meta.json").read_text())["epochs_done"] == 1
    resumed = _run([*common, "--out", str(tmp_path / "re"), "--resume"], env, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    for which in ("last", "best"):
        a = load_file(str(tmp_path / "full" / which / "model.safetensors"))
        b = load_file(str(tmp_path / "re" / which / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), which
    ma = json.loads((tmp_path / "full" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "re" / "metrics.json").read_text())
    assert ma["test"] == mb["test"]
    assert len((tmp_path / "re" / "metrics.jsonl").read_text().splitlines()) == 3
