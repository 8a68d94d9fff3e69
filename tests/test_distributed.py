"""Training under torch.distributed (gloo on CPU): two processes equal one process on the concatenated batch,
and `torchrun ... -m vse_models.train` completes a run."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from vse_models import distributed
from vse_models.data import Split, Vocabulary, ensure_synthetic
from vse_models.models import DataInfo, build_model
from vse_models.train import _GlobalBatchLoss

TINY_DATA = {"n_train": 40, "n_dev": 10, "n_test": 10, "n_regions": 8, "feat_dim": 16, "grid_size": 4}
# Augmentation and dropout off: the two runs must compute the same function.
MODEL_OPTIONS = {
    "vse": {"embed_size": 32, "word_dim": 16, "region_drop": 0.0},
    "avse": {"embed_size": 32, "word_dim": 16, "region_drop": 0.0},
    "mh-cvse": {"embed_size": 32, "word_dim": 16, "num_concepts": 12, "gcn_hidden": 16, "num_heads": 4,
                "text_dropout": 0.0},
}
GLOBAL_BATCH = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup(cache, model_name):
    root = ensure_synthetic(TINY_DATA, cache)
    train = Split(root, "train")
    vocab = Vocabulary.build(train.captions, 1)
    train.set_vocab(vocab)
    info = DataInfo(vocab_size=len(vocab), feature_dim=train.feature_dim, set_size=train.set_size,
                    grid_size=train.grid_size, captions_per_image=train.captions_per_image)
    torch.manual_seed(0)
    model = build_model(model_name, MODEL_OPTIONS[model_name], info)
    model.prepare(train)
    model.train()
    indices = torch.randperm(train.n_captions, generator=torch.Generator().manual_seed(1))[:GLOBAL_BATCH].numpy()
    return model, train, indices


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(actual: dict, expected: dict):
    """float32 sums over the batch in another order, so compare norms: each gradient within 1e-4 of its own
    norm plus 1e-4 of the largest one (biases feeding BatchNorm have a true gradient of 0 and only noise)."""
    assert actual.keys() == expected.keys()
    largest = max(float(g.norm()) for g in expected.values())
    for name, grad in expected.items():
        error = float((actual[name] - grad).norm())
        assert error <= 1e-4 * float(grad.norm()) + 1e-4 * largest, f"gradient of {name}: error {error:.3g}"


def _worker(rank, world_size, port, cache, model_name, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    ctx = distributed.setup(torch.device("cpu"))
    try:
        model, train, indices = _setup(cache, model_name)
        distributed.convert_batchnorm(model)
        ddp = torch.nn.parallel.DistributedDataParallel(_GlobalBatchLoss(model, ctx),
                                                    find_unused_parameters=model.has_unused_parameters)
        share = GLOBAL_BATCH // world_size
        loss, _ = ddp(train.pair_batch(indices[rank * share:(rank + 1) * share]), 1)
        loss.backward()
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": _grads(model)}, result_path)
    finally:
        distributed.teardown(ctx)


@pytest.mark.parametrize("model_name", sorted(MODEL_OPTIONS))
def test_two_processes_equal_one_on_the_concatenated_batch(tmp_path, model_name):
    cache = tmp_path / "cache"
    model, train, indices = _setup(cache, model_name)
    loss, _ = model.loss(train.pair_batch(indices), 1)  # epoch 1: hardest negatives of the global batch
    loss.backward()
    expected = _grads(model)

    result_path = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(2, _free_port(), cache, model_name, result_path), nprocs=2)
    result = torch.load(result_path)
    # float32 sums in another order, as for the gradients: mh-cvse's KL summed over batch and concepts makes
    # its loss ~170, where the two orders differ by ~1e-5 relative
    torch.testing.assert_close(result["loss"], loss.detach(), rtol=1e-4, atol=1e-5)
    assert_same_gradients(result["grads"], expected)


@pytest.mark.slow
def test_torchrun_two_processes_complete_a_run(tmp_path):
    out = tmp_path / "run"
    tiny = [a for key, value in TINY_DATA.items() for a in ("--synthetic", f"{key}={value}")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vse_models.train", "--data", "synthetic", "--epochs", "1", "--device", "cpu", "--out", str(out),
               *tiny, "--option", "embed_size=32", "--option", "word_dim=16", "--batch-size", "10", "--no-progress",
               "--model", "vse"]
    env = dict(os.environ, VSE_DATA_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]) >= {"rsum", "i2t_r1", "t2i_r1"}
    assert "x 2 processes (global batch 20)" in result.stdout
    assert (out / "last" / "model.safetensors").exists() or any((out / "last").rglob("*.safetensors"))


@pytest.mark.parametrize("model_name", ["vse", "mh-cvse"])
def test_tiled_loss_option_trains_the_same(tmp_path, model_name):
    # `tiled_loss` (vse_kernels.hinge_triplet_loss_embeddings) must not change the loss or any gradient.
    results = []
    for tiled in (False, True):
        MODEL_OPTIONS[model_name]["tiled_loss"] = tiled
        try:
            model, train, indices = _setup(tmp_path / "cache", model_name)
        finally:
            MODEL_OPTIONS[model_name].pop("tiled_loss")
        loss, _ = model.loss(train.pair_batch(indices), 1)
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    assert_same_gradients(grads_b, grads_a)
