"""Raw images and backbones from local files (issue 19): loaders, transforms, timm / transformers loading and
their errors, AVSE with backbones (package vs reference), a few end-to-end training steps, the rendered
synthetic set. Tiny models only: a ViT with patch 8 on 32 x 32 images, one block; a one-layer BERT of width 32."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("timm")
pytest.importorskip("transformers")
pytest.importorskip("PIL")

from backbone_fixtures import VIT, VIT_ARGS, make_bert, make_image_folder, make_vit_weights  # noqa: E402

from vse_models.backbones import ImageBackbone, MissingExtraError, TextBackbone, from_checkpoint  # noqa: E402
from vse_models.data import Vocabulary  # noqa: E402
from vse_models.data.images import (BadImageError, ImageOptions, ImageSplit, read_karpathy,  # noqa: E402
                                    transform)
from vse_models.models import DataInfo, build_model  # noqa: E402


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"data": make_image_folder(root / "data"), "bert": make_bert(root / "bert"),
            "vit": make_vit_weights(root / "vit.pth"), "root": root}


def test_importing_the_package_imports_no_backbone_library():
    code = ("import sys, vse_models, vse_models.train, vse_models.evaluate, vse_models.extract;"
            "from vse_models.models import available_models; available_models();"
            "bad = [m for m in ('timm', 'transformers', 'PIL') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_missing_extra_is_one_line_naming_it(assets, tmp_path):
    code = ("import sys; sys.modules['timm'] = None\n"
            "from vse_models.train import main\n"
            f"sys.exit(main(['--data', {str(assets['data'])!r}, '--out', {str(tmp_path / 'run')!r},"
            f" '--option', 'image_backbone=vit_base_patch16_224', '--option', 'image_weights=random']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and 'pip install ".[backbones]"' in r.stderr, r.stderr
    assert issubclass(MissingExtraError, ValueError)


# ------------------------------------------------------------------------------------------ backbones
def test_vit_weights_round_trip_and_misfits(assets, tmp_path):
    a = ImageBackbone(VIT, str(assets["vit"]), 32, VIT_ARGS)
    ref = __import__("timm").create_model(VIT, pretrained=False, num_classes=0, **VIT_ARGS)
    ref.load_state_dict(torch.load(assets["vit"], weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.tokens(x), ref.forward_features(x))
    assert (a.grid_size, a.has_cls, a.num_features) == (4, True, 32)
    assert ImageBackbone(VIT, str(assets["vit"]), 48, VIT_ARGS).grid_size == 6  # position embeddings interpolated
    wide = make_vit_weights(tmp_path / "wide.pth", embed_dim=48)
    with pytest.raises(ValueError, match=r"wide\.pth does not fit .*key 'cls_token' has shape \(1, 1, 48\)"):
        ImageBackbone(VIT, str(wide), 32, VIT_ARGS)
    with pytest.raises(ValueError, match=r"vit\.pth does not fit .*missing key 'blocks\.1\."):
        ImageBackbone(VIT, str(assets["vit"]), 32, {**VIT_ARGS, "depth": 2})
    with pytest.raises(FileNotFoundError, match="weights file not found.*image_weights=FILE"):
        ImageBackbone(VIT, str(tmp_path / "nope.pth"), 32, VIT_ARGS)
    with pytest.raises(ValueError, match="needs weights: pass --option image_weights"):
        ImageBackbone(VIT, None, 32, VIT_ARGS)
    with from_checkpoint():  # a checkpoint replaces the weights: the file is not read
        ImageBackbone(VIT, str(tmp_path / "nope.pth"), 32, VIT_ARGS)


def test_swin_gives_a_grid_without_cls():
    s = ImageBackbone("swin_tiny_patch4_window7_224", "random", 56,
                      {"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "img_size": 56, "window_size": 7})
    assert (s.grid_size, s.has_cls, s.tokens(torch.zeros(1, 3, 56, 56)).shape) == (7, False, (1, 49, 32))


def test_bert_folder_round_trip_masks_and_errors(assets, tmp_path):
    from transformers import BertModel

    t = TextBackbone(str(assets["bert"]))
    ids, lengths = t.tokenize(["a red dogs on the left .", "a cat"])
    assert ids[0].tolist() == t.tokenizer("a red dogs on the left .")["input_ids"]  # [CLS] ... [SEP]
    assert lengths.tolist() == [10, 4] and ids[1, 4:].eq(t.pad_id).all()
    ref = BertModel.from_pretrained(str(assets["bert"]), add_pooling_layer=False).eval()
    out = t.eval()(ids, lengths)
    torch.testing.assert_close(out[1, :4], ref(input_ids=ids[1:, :4]).last_hidden_state[0])  # padding masked
    torch.manual_seed(0)
    aug1 = t.tokenize(["a red dogs on the left ."] * 20, augment=True)
    torch.manual_seed(0)
    assert torch.equal(aug1[0], t.tokenize(["a red dogs on the left ."] * 20, augment=True)[0])
    assert not torch.equal(aug1[0][:, :10], ids[:1].expand(20, -1))  # some words masked / replaced / deleted
    with pytest.raises(FileNotFoundError, match="text backbone folder not found.*nothing is downloaded"):
        TextBackbone("bert-base-uncased")
    other = make_bert(tmp_path / "two", layers=2)
    (assets["bert"] / "config.json").rename(tmp_path / "config.keep")
    try:
        with pytest.raises(FileNotFoundError, match="no config.json"):
            TextBackbone(str(assets["bert"]))
    finally:
        (tmp_path / "config.keep").rename(assets["bert"] / "config.json")
    (other / "config.json").write_text((assets["bert"] / "config.json").read_text().replace(
        '"num_hidden_layers": 1', '"num_hidden_layers": 3'))
    with pytest.raises(ValueError, match="weights do not fit its config.json: missing key 'encoder.layer.2"):
        TextBackbone(str(other))


# ----------------------------------------------------------------------------------------------- data
def test_plain_layout_loader_transforms_and_worker_independence(assets):
    split = ImageSplit(assets["data"], "train", options=ImageOptions(image_size=32))
    assert (split.n_images, split.n_captions, split.captions_per_image) == (12, 60, 5)
    split.set_vocab(Vocabulary.build(split.captions, 1))
    batch = split.image_batch([0, 3])
    assert batch.images.shape == (2, 3, 32, 32)
    from PIL import Image

    raw = np.array(Image.open(split.paths[3]).convert("RGB"))
    torch.testing.assert_close(batch.images[1], transform(raw, 32, None))  # evaluation: deterministic resize
    idx = [np.arange(10), np.arange(20, 30)]
    inline = list(split.train_batches(idx, epoch=1, seed=3))
    workers = ImageSplit(assets["data"], "train", split.vocab, options=ImageOptions(image_size=32, workers=2))
    pooled = list(workers.train_batches(idx, epoch=1, seed=3))
    for a, b in zip(inline, pooled):  # the augmentation is seeded per (seed, epoch, caption): workers change nothing
        assert torch.equal(a.images, b.images) and a.extra["captions"] == b.extra["captions"]
    assert not torch.equal(inline[0].images, next(split.train_batches(idx[:1], epoch=2, seed=3)).images)


def test_karpathy_json_splits_and_missing_images(assets, tmp_path):
    entries = [{"split": s, "filename": f"{s}_{i:03d}.png", "filepath": "img", "imgid": k,
                "sentences": [{"raw": f"a red car number {j} ."} for j in range(6)]}
               for k, (s, i) in enumerate([("train", 0), ("restval", 1), ("val", 0), ("test", 0)])]
    entries[1]["filename"] = "train_001.png"
    entries[2]["filename"], entries[3]["filename"] = "dev_000.png", "test_000.png"
    js = tmp_path / "dataset_coco.json"
    js.write_text(json.dumps({"images": entries}))
    paths, caps, ids = read_karpathy(js, "train", assets["data"])
    assert [p.name for p in paths] == ["train_000.png", "train_001.png"] and len(caps) == 10  # train + restval, 5 each
    assert ImageSplit(js, "dev", images=assets["data"]).n_images == 1
    with pytest.raises(ValueError, match="pass the image folder with --images"):
        ImageSplit(js, "test")
    entries[3]["filename"] = "gone.png"
    js.write_text(json.dumps({"images": entries}))
    with pytest.raises(FileNotFoundError, match=r"1 of 1 images are missing, e.g. .*gone\.png"):
        ImageSplit(js, "test", images=assets["data"])


def test_a_corrupt_image_is_named_or_skipped_with_a_warning(assets, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(assets["data"], data)
    bad = data / "img" / "train_002.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    split = ImageSplit(data, "train", options=ImageOptions(image_size=32))
    split.set_vocab(Vocabulary.build(split.captions, 1))
    with pytest.raises(BadImageError, match=r"train_002\.png: cannot read the image.*--bad-images skip"):
        list(split.train_batches([np.arange(20)]))
    said = []
    skipping = ImageSplit(data, "train", split.vocab, options=ImageOptions(image_size=32, bad_images="skip"))
    skipping.on_bad_image = said.append
    (batch,) = list(skipping.train_batches([np.arange(20)]))
    assert len(batch) == 15 and batch.images.shape[0] == 15 and 2 not in batch.img_ids.tolist()
    assert len(said) == 1 and "train_002.png" in said[0]
    with pytest.raises(BadImageError, match="train_002.png"):  # evaluation never skips
        list(skipping.image_batches(8))


# --------------------------------------------------------------------------------------------- models
def _model(assets, backend="kernels", **options):
    opts = {"features": "images", "image_backbone": VIT, "image_weights": str(assets["vit"]),
            "image_backbone_args": VIT_ARGS, "text_backbone": str(assets["bert"]), "embed_size": 64,
            "backend": backend, "grid_drop": True, **options}
    return build_model("avse", opts, DataInfo(vocab_size=10, feature_dim=3, set_size=0, image_size=32))


@pytest.mark.parametrize("rbs_on", ["embeddings", "tokens"])
def test_package_model_equals_reference_with_backbones(assets, rbs_on):
    split = ImageSplit(assets["data"], "train", options=ImageOptions(image_size=32))
    split.set_vocab(Vocabulary.build(split.captions, 1))
    batch = next(split.train_batches([np.arange(0, 60, 4)]))
    results = []
    for backend in ("kernels", "reference"):
        torch.manual_seed(0)
        model = _model(assets, backend, rbs_on=rbs_on)
        if results:
            model.load_state_dict(results[0][0])
        torch.manual_seed(1)  # the same RBS centres, dropped tokens and caption augmentation
        img, txt = model.encode_images(batch), model.encode_texts(batch)
        loss, _ = model.embedding_loss(img, txt, batch.img_ids, epoch=1)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((model.state_dict(), img.detach(), txt.detach(), model.similarity(img, txt).detach(), loss, grads))
    (_, *a), (_, *b) = results
    for x, y in zip(a[:4], b[:4]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert a[4].keys() == b[4].keys() and any(k.startswith("image_backbone.") for k in a[4])
    for name in a[4]:
        torch.testing.assert_close(a[4][name], b[4][name], rtol=1e-4, atol=1e-5, msg=name)


def test_lr_factor_freeze_and_swin_needs_tokens(assets):
    model = _model(assets)
    groups = model.param_groups(1e-3)
    backbone = {id(p) for m in (model.image_backbone, model.text_backbone) for p in m.parameters()}
    assert [g["lr"] for g in groups] == [1e-3, 1e-4] and {id(p) for p in groups[1]["params"]} == backbone
    frozen = _model(assets, freeze_backbone=True).train()
    assert len(frozen.param_groups(1e-3)) == 1 and not frozen.image_backbone.training
    with pytest.raises(ValueError, match="needs raw-image data"):
        build_model("avse", {"image_backbone": VIT}, DataInfo(vocab_size=10, feature_dim=8, set_size=36))
    with pytest.raises(ValueError, match="rbs_on='embeddings' samples a ViT's token embeddings"):
        _model(assets, image_backbone="swin_tiny_patch4_window7_224", image_weights="random",
               image_backbone_args={"embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2), "img_size": 32,
                                    "window_size": 4})


@pytest.mark.parametrize("model", ["avse", "vse"])
def test_a_few_end_to_end_training_steps_then_vse_eval(assets, tmp_path, model, capsys):
    from vse_models.evaluate import evaluate_checkpoint
    from vse_models.train import main

    out = tmp_path / "run"
    args = ["--model", model, "--data", str(assets["data"]), "--out", str(out), "--epochs", "1", "--batch-size", "10",
            "--image-size", "32", "--workers", "0", "--threads", "1", "--no-progress", "--lr", "1e-3",
            "--option", f"image_backbone={VIT}", "--option", f"image_weights={assets['vit']}",
            "--option", "image_backbone_args=" + json.dumps(VIT_ARGS), "--option", f"text_backbone={assets['bert']}",
            "--option", "embed_size=64", "--option", "grad_checkpointing=true"]
    assert main(args) == 0
    result = json.loads((out / "metrics.json").read_text())
    assert result["features"] == "images" and result["test"]["rsum"] >= 0
    again = evaluate_checkpoint(out, "dev", threads=1)
    assert again == result["dev"]  # the checkpoint (backbones included) evaluates to the same numbers

    # Search from the run: an index of the raw-image test split, text queries through the BERT tokenizer,
    # and image files through the evaluation transform give the index's own embeddings.
    import vse_models

    retriever = vse_models.load(out)
    index = retriever.build_index(tmp_path / "test.safetensors", split="test")
    hits = retriever.search(index, texts=["a red car on the left", "the blue dog"], k=3)
    assert hits.indices.shape == (2, 3) and torch.isfinite(hits.scores).all()
    paths = [assets["data"] / line for line in (assets["data"] / "test_images.txt").read_text().split()[:2]]
    from PIL import Image

    emb = retriever.encode_images(paths)
    torch.testing.assert_close(emb, index.images[:2].float(), rtol=1e-5, atol=1e-6)
    arrays = [np.array(Image.open(p).convert("RGB")) for p in paths]
    torch.testing.assert_close(retriever.encode_images(arrays), emb)
    with pytest.raises(ValueError, match="image 0 must be a file path, a PIL image or an"):
        retriever.encode_images([torch.zeros(3, 32, 32)])



@pytest.mark.slow
def test_torchrun_two_processes_train_avse_with_backbones(assets, tmp_path):
    """The distributed path works unchanged with backbones: torchrun, 2 CPU processes (gloo), one epoch."""
    import os

    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "vse_models.train", "--model", "avse", "--data", str(assets["data"]), "--out", str(out),
               "--epochs", "1", "--batch-size", "5", "--image-size", "32", "--workers", "0", "--device", "cpu",
               "--no-progress", "--option", f"image_backbone={VIT}", "--option", f"image_weights={assets['vit']}",
               "--option", "image_backbone_args=" + json.dumps(VIT_ARGS),
               "--option", f"text_backbone={assets['bert']}", "--option", "embed_size=64"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x 2 processes (global batch 10)" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["features"] == "images" and set(metrics["test"]) >= {"rsum", "i2t_r1", "t2i_r1"}

def test_synthetic_images_share_the_feature_set_s_captions(tmp_path):
    from vse_models.data.synthetic import ensure_synthetic, ensure_synthetic_images

    small = {"n_train": 6, "n_dev": 3, "n_test": 3}
    images = ensure_synthetic_images(small, cache_dir=tmp_path)
    features = ensure_synthetic(small, cache_dir=tmp_path)
    for split in ("train", "dev", "test"):
        assert (images / f"{split}_caps.txt").read_text() == (features / f"{split}_caps.txt").read_text()
    again = ensure_synthetic_images(small, cache_dir=tmp_path / "again")
    assert (images / "images" / "train-000004.png").read_bytes() == (again / "images" / "train-000004.png").read_bytes()
    s = ImageSplit(images, "train", options=ImageOptions(image_size=48))
    assert s.image_batch([0]).images.shape == (1, 3, 48, 48)
    TextBackbone(str(images / "bert"))  # the presets' text backbone loads from the folder written beside the images


# ---------------------------------------------------------------------------------------- vse-extract
def _extract(assets, out, *extra, env=None):
    cmd = [sys.executable, "-m", "vse_models.extract", "--data", str(assets["data"]), "--split", "train",
           "--split", "dev", "--out", str(out), "--backbone", VIT, "--weights", str(assets["vit"]),
           "--backbone-args", json.dumps(VIT_ARGS), "--image-size", "32", "--batch-size", "4", "--workers", "0",
           "--dtype", "float32", *extra]
    import os

    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})


def test_extraction_round_trip_resume_and_refusal(assets, tmp_path):
    from vse_models.data import Split
    from vse_models.extract import KILL_ENV

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _extract(assets, whole).returncode == 0
    grids = np.load(whole / "train_grids.npy")
    assert grids.shape == (12, 4, 4, 32) and np.load(whole / "train_grid_cls.npy").shape == (12, 32)
    backbone = ImageBackbone(VIT, str(assets["vit"]), 32, VIT_ARGS).eval()
    split = ImageSplit(assets["data"], "train", options=ImageOptions(image_size=32))
    with torch.no_grad():
        tokens = backbone.tokens(split.image_batch(np.arange(12)).images)
    np.testing.assert_allclose(grids.reshape(12, 16, 32), tokens[:, 1:].numpy(), rtol=1e-5, atol=1e-5)
    Split(whole, "train", features="grids")  # the precomputed path reads it (captions copied beside it)

    r = _extract(assets, killed, env={KILL_ENV: "2"})  # killed after 2 of 3 batches of train
    assert r.returncode != 0 and not (killed / "train_grids.npy").exists()
    assert json.loads((killed / "train_grids.extract.json").read_text())["done"] == 8
    r = _extract(assets, killed)
    assert r.returncode == 0 and "resuming after 8 of 12" in r.stdout
    for name in ("train_grids.npy", "train_grid_cls.npy", "dev_grids.npy"):
        assert np.array_equal(np.load(killed / name), np.load(whole / name)), name
    assert "already extracted" in _extract(assets, killed).stdout

    other = make_vit_weights(tmp_path / "other.pth", seed=1)
    r = _extract(assets, killed, "--weights", str(other))
    assert r.returncode == 2 and "exists and it was written by another extraction (weights" in r.stderr
    assert np.array_equal(np.load(killed / "train_grids.npy"), grids)  # untouched
    mine = tmp_path / "mine"
    mine.mkdir()
    np.save(mine / "train_grids.npy", np.zeros((1, 1, 1, 1), np.float32))
    r = _extract(assets, mine)
    assert r.returncode == 2 and "vse-extract did not write it" in r.stderr
    assert _extract(assets, mine, "--overwrite").returncode == 0
