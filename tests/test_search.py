"""Search (issue 18): the streamed top-k and its tie rule in both directions, bounded memory, gallery index
files (round trip, refusal of another model's index, corrupt / truncated / existing files), the Python API,
vse-search on a tiny trained run, and FAISS candidates + exact rerank."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vse_kernels as vk
import vse_models
from vse_kernels.ops.meta_sim import meta_sim_reference
from memory import rss_growth_mib
from utils import env_var
from vse_models.checkpoint import load_checkpoint, save_checkpoint
from vse_models.data import Split, Vocabulary, ensure_synthetic
from vse_models.errors import CheckpointError, NonFiniteError
from vse_models.evaluation import encode_split
from vse_models.gallery import GalleryIndex, GalleryWriter
from vse_models.models import DataInfo, build_model, slice_embeddings
from vse_models.search import main as search_main
from vse_models.topk import reference_topk, search
from vse_models.train import main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = {"n_train": 40, "n_dev": 10, "n_test": 10, "n_regions": 8, "feat_dim": 16, "grid_size": 4}
TINY_RUN = [a for kv in TINY_DATA.items() for a in ("--synthetic", f"{kv[0]}={kv[1]}")] + [
    "--model", "avse", "--option", "embed_size=32", "--option", "word_dim=16", "--batch-size", "20",
    "--no-progress", "--threads", "1", "--epochs", "1"]


def dot(img, txt):
    return img @ txt.t()


def integer_embeddings(n, dim=5, seed=0):
    # Values in {-1, 0, 1}: every dot product is exact in float32 whatever the chunking, and ties abound.
    return torch.randint(-1, 2, (n, dim), generator=torch.Generator().manual_seed(seed)).float()


# ----------------------------------------------------------------------------------- streamed top-k

@pytest.mark.parametrize("query_side", ["text", "image"])
@pytest.mark.parametrize("k", [1, 3, 10, 97])
@pytest.mark.parametrize("chunk", [1, 4, 13, 97, None])
def test_topk_is_the_stable_sort_of_the_full_matrix_ties_included(query_side, k, chunk):
    queries, gallery = integer_embeddings(23, seed=1), integer_embeddings(97, seed=2)
    vals, idx = search(queries, gallery, k, score=dot, query_side=query_side, chunk=chunk)
    full = dot(gallery, queries).t() if query_side == "text" else dot(queries, gallery)
    ref_vals, ref_idx = reference_topk(full, k)
    assert (full[:, :, None] == full[:, None, :]).sum() > 10 * full.numel()  # many ties
    assert torch.equal(vals, ref_vals) and torch.equal(idx, ref_idx)
    assert torch.equal(vals, full.topk(k, dim=1).values)  # the values are torch.topk's


def test_all_scores_equal_returns_the_first_k_rows():
    vals, idx = search(torch.ones(3, 4), torch.ones(50, 4), 7, score=dot, chunk=6)
    assert torch.equal(idx, torch.arange(7).expand(3, 7)) and (vals == 4).all()


def test_meta_sim_ties_with_avse_units():
    # Units that are signed basis vectors: normalised they stay exact, so meta_sim's sums of maxima are exact
    # integers and many images tie. M = 8 image units, Q = 4 text units, d = 16.
    g = torch.Generator().manual_seed(0)

    def units(n, m):
        return torch.nn.functional.one_hot(torch.randint(16, (n, m), generator=g), 16).float() * (
            torch.randint(0, 2, (n, m, 1), generator=g) * 2 - 1)

    img, txt = units(300, 8), units(9, 4)
    score = lambda i, t: vk.meta_sim(i, t)  # noqa: E731
    ref = reference_topk(score(img, txt).t(), 20)
    for chunk in (7, 64, None):
        assert all(torch.equal(a, b) for a, b in zip(search(txt, img, 20, score=score, chunk=chunk), ref))
    ref = reference_topk(score(img[:5], txt), 9)
    assert all(torch.equal(a, b) for a, b in zip(search(img[:5], txt, 9, score=score, query_side="image", chunk=2), ref))


@pytest.mark.parametrize("args, message", [
    (dict(k=0), "k must be an integer >= 1"), (dict(k=2.0), "k must be an integer"),
    (dict(k=11), "k=11 is larger than the gallery (10 items)"), (dict(k=2, chunk=0), "chunk must be"),
    (dict(k=2, query_side="images"), "query_side must be one of"),
])
def test_bad_arguments_are_refused(args, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        search(torch.ones(2, 3), torch.ones(10, 3), score=dot, **args)


def test_non_finite_scores_and_queries_are_errors_naming_where():
    gallery = integer_embeddings(40)
    gallery[33, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"\(33, 0\)"):
        search(integer_embeddings(3), gallery, 2, score=dot, chunk=8)
    with pytest.raises(NonFiniteError, match=r"\(1, 33\)"):
        search(integer_embeddings(3), gallery, 2, score=dot, query_side="image", chunk=8)
    queries = integer_embeddings(3)
    queries[2, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="query text"):
        search(queries, integer_embeddings(40), 2, score=dot)


def test_memory_stays_bounded_when_the_score_matrix_would_not():
    # 256 queries x 2^21 gallery items: the full float32 score matrix is 2 GiB; the streamed top-k holds one
    # chunk (default: 2^22 scores) and the running (256, k).
    setup = """
        import torch
        from vse_models.topk import search
        g = torch.Generator().manual_seed(0)
        gallery = torch.randn(1 << 21, 8, generator=g)
        queries = torch.randn(256, 8, generator=g)
        dot = lambda i, t: i @ t.t()
        search(queries[:2], gallery[:5000], 3, score=dot)  # load lazy libraries
    """
    call = """
        vals, idx = search(queries, gallery, 10, score=dot)
        assert vals.shape == (256, 10) and bool((vals[:, :-1] >= vals[:, 1:]).all())
        i = 7
        ref = torch.topk(gallery @ queries[i], 10)
        assert torch.equal(idx[i], ref.indices) and torch.allclose(vals[i], ref.values)
    """
    growth = rss_growth_mib(setup, call, env={"OMP_NUM_THREADS": "2"})
    assert growth < 400, f"peak anonymous memory grew by {growth:.0f} MiB (the full matrix: 2048 MiB)"


# ------------------------------------------------------------------------------ a tiny trained run

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 1-epoch AVSE run on tiny synthetic data, and its test-split index."""
    base = tmp_path_factory.mktemp("search")
    with env_var("VSE_DATA_CACHE", str(base / "cache")):
        assert train_main(["--out", str(base / "run"), *TINY_RUN]) == 0
        assert search_main([str(base / "run"), "--build-index", "--index", str(base / "test.safetensors"),
                            "--no-progress"]) == 0
    return base


@pytest.fixture
def run(trained, monkeypatch):
    monkeypatch.setenv("VSE_DATA_CACHE", str(trained / "cache"))
    return trained / "run"


def _test_split(trained):
    root = ensure_synthetic(TINY_DATA, trained / "cache")
    _, vocab, _, _ = load_checkpoint(trained / "run")
    return Split(root, "test", vocab)


def test_index_round_trip_equals_the_evaluation_embeddings(trained, run):
    r = vse_models.load(run)
    index = r.open_index(trained / "test.safetensors")
    split = _test_split(trained)
    img, txt = encode_split(r.model, split)
    assert torch.equal(index.images, img) and torch.equal(index.texts, txt)
    assert index.captions == split.captions and index.image_ids == split.ids == [f"test-{i:06d}" for i in range(10)]
    assert torch.equal(index.text_image, torch.arange(50) // 5)
    plain = load_file(str(trained / "test.safetensors"))  # a standard safetensors file
    assert torch.equal(plain["image.0"], img) and index.metadata["model"] == "avse"
    assert not index.images.is_floating_point() or index.images.dtype == torch.float32


def test_python_api_encodes_like_evaluation_and_searches_like_the_full_matrix(trained, run):
    r = vse_models.load(run)
    split = _test_split(trained)
    img, txt = encode_split(r.model, split)
    assert torch.equal(r.encode_images(np.asarray(split.images)), img)
    assert torch.equal(r.encode_texts(split.captions), txt)
    index = r.open_index(trained / "test.safetensors")
    hits = r.search(index, texts=split.captions[:7], k=10)
    ref_vals, ref_idx = reference_topk(r.score(img, txt[:7]).t(), 10)
    torch.testing.assert_close(hits.scores, ref_vals)
    assert torch.equal(hits.indices, ref_idx) and hits.labels[0] == [split.ids[i] for i in ref_idx[0].tolist()]
    hits = r.search(index, image_ids=["test-000003", "test-000004"], k=6)
    ref_vals, ref_idx = reference_topk(r.score(img[[3, 4]], txt), 6)
    torch.testing.assert_close(hits.scores, ref_vals)
    assert torch.equal(hits.indices, ref_idx) and hits.labels[1][0] == split.captions[ref_idx[1, 0]]
    assert hits.images[1] == (ref_idx[1] // 5).tolist()
    with pytest.raises(ValueError, match=r"unknown image id\(s\) \['3'\] .* ids like test-000000, "):
        r.search(index, image_ids=["3"], k=1)
    with pytest.raises(ValueError, match=r"k=11 is larger than the gallery's images \(10 items\)"):
        r.search(index, texts=["a dog"], k=11)
    with pytest.raises(ValueError, match="text 1 has no words"):
        r.encode_texts(["a dog", " ,. "])
    with pytest.raises(ValueError, match=r"shape \(B, 8, 16\)"):
        r.encode_images(np.zeros((2, 8, 15), np.float32))
    bad = np.array(split.images[:3])
    bad[1, 2, 3] = np.nan
    with pytest.raises(NonFiniteError, match="image"):
        r.encode_images(bad)


def test_an_index_of_another_model_config_or_weights_is_refused(trained, run, tmp_path):
    index_path = trained / "test.safetensors"
    model, vocab, config, meta = load_checkpoint(run)
    other = tmp_path / "other"
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    save_checkpoint(other, model, config=config["run"], vocab=vocab, meta=meta)
    with pytest.raises(CheckpointError, match="weights differ"):
        vse_models.load(other).open_index(index_path)
    vse = build_model("vse", {"embed_size": 32, "word_dim": 16}, DataInfo(**config["data_info"]))
    save_checkpoint(tmp_path / "vse", vse, config=config["run"], vocab=vocab, meta=meta)
    with pytest.raises(CheckpointError, match=r"built by model 'avse' .* is 'vse'"):
        vse_models.load(tmp_path / "vse").open_index(index_path)
    assert search_main([str(tmp_path / "vse"), "--index", str(index_path), "--text", "a dog"]) == 2


def test_corrupt_truncated_and_existing_index_files(trained, run, tmp_path, capsys):
    src = trained / "test.safetensors"
    data = src.read_bytes()
    r = vse_models.load(run)
    cases = {"truncated": data[:-7], "header": data[:8] + b"#" + data[9:], "flipped": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
             "empty": b"", "short": data[:5]}
    messages = {"truncated": "truncated", "header": "not valid JSON", "flipped": "checksum mismatch",
                "empty": "only 0 bytes", "short": "only 5 bytes"}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match=messages[name]) as e:
            r.open_index(bad)
        assert str(bad) in str(e.value)
        assert search_main([str(run), "--index", str(bad), "--text", "a dog"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vse-search: error:") and err.count("\n") == 1 and messages[name] in err
    # An existing file is never replaced without --overwrite; with it, atomically (no temporary left).
    target = tmp_path / "mine.safetensors"
    target.write_text("something of mine")
    assert search_main([str(run), "--build-index", "--index", str(target), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err and target.read_text() == "something of mine"
    assert search_main([str(run), "--build-index", "--index", str(target), "--overwrite", "--no-progress",
                        "--dtype", "float16", "--no-captions"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if "mine" in p.name) == ["mine.safetensors"]
    index = r.open_index(target)
    assert index.images.dtype == torch.float16 and index.texts is None
    with pytest.raises(ValueError, match="holds no captions"):
        r.search(index, image_ids=["test-000001"], k=2)


def test_the_writer_refuses_non_finite_embeddings_and_leaves_nothing(tmp_path):
    path = tmp_path / "g.safetensors"
    rows = torch.randn(4, 3)
    rows[2, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"rows \[6\]"):
        with GalleryWriter(path, {"image.0": (torch.float32, (8, 3))}, {"model": "x"}) as w:
            w.write("image.0", 0, torch.randn(4, 3))
            w.write("image.0", 4, rows)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not every row was written"):
        with GalleryWriter(path, {"image.0": (torch.float32, (8, 3))}, {"model": "x"}) as w:
            w.write("image.0", 0, torch.randn(4, 3))
    assert list(tmp_path.iterdir()) == []
    with GalleryWriter(path, {"image.0": (torch.bfloat16, (2, 3))}, {"model": "x"}) as w:
        w.write("image.0", 0, torch.ones(2, 3))
    assert GalleryIndex(path).images.dtype == torch.bfloat16 and (GalleryIndex(path).images == 1).all()


def test_vse_search_cli_on_a_tiny_trained_run(trained, run, tmp_path, capsys):
    index = str(trained / "test.safetensors")
    capsys.readouterr()
    assert search_main([str(run), "--index", index, "--text", "a red dog on the left", "--text", "zzz dog",
                        "-k", "3", "--json", str(tmp_path / "r.json")]) == 0
    out, err = capsys.readouterr()
    assert "'a red dog on the left': top 3 of 10 images (exact)" in out and "image " in out
    assert "zzz" in err and "<unk>" in err  # words outside the vocabulary are reported
    results = json.loads((tmp_path / "r.json").read_text())
    assert [len(r["results"]) for r in results] == [3, 3]
    r = vse_models.load(run)
    hits = r.search(r.open_index(index), texts=["a red dog on the left"], k=3)
    assert [x["row"] for x in results[0]["results"]] == hits.indices[0].tolist()
    assert search_main([str(run), "--index", index, "--image", "test-000002", "-k", "5"]) == 0
    out = capsys.readouterr().out
    assert "image test-000002: top 5 of 50 captions" in out and len(out.strip().splitlines()) == 6
    for args, message in [
        (["--image", "77"], "unknown image id(s) ['77']"), (["--text", "a dog", "-k", "11"], "k=11 is larger"),
        (["--text", "a dog", "-k", "0"], "-k must be an integer >= 1"), ([], "give --text or --image"),
        (["--text", "a", "--image", "1"], "not both"), (["--text", "a", "--split", "dev"], "only apply with --build-index"),
        (["--text", ". ,"], "text 0 has no words"),
    ]:
        assert search_main([str(run), "--index", index, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("vse-search: error:") and message in err and err.count("\n") == 1, err
    assert search_main([str(run), "--index", str(tmp_path / "none.safetensors"), "--text", "a"]) == 2
    assert "index file not found" in capsys.readouterr().err


def test_vse_search_builds_with_a_progress_bar_on_a_terminal_only(trained, run, tmp_path):
    # The console script, in a subprocess (stderr is a pipe: no bar, one summary line).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "vse_models.search", str(run), "--build-index", "--split", "dev",
                             "--index", str(tmp_path / "dev.safetensors")], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote ") and "10 images, 50 captions of split 'dev'" in result.stdout
    assert "\r" not in result.stderr


# -------------------------------------------------------------------------------------------- FAISS

def _tiny_models(tmp_path, monkeypatch):
    monkeypatch.setenv("VSE_DATA_CACHE", str(tmp_path / "cache"))
    root = ensure_synthetic(TINY_DATA, tmp_path / "cache")
    train = Split(root, "train")
    vocab = Vocabulary.build(train.captions, 1)
    train.set_vocab(vocab)
    dev = Split(root, "dev", vocab)
    info = DataInfo(len(vocab), dev.feature_dim, dev.set_size)
    small = {"embed_size": 32, "word_dim": 16}
    models = {"avse": build_model("avse", small, info), "vse": build_model("vse", small, info),
              "mh-cvse": build_model("mh-cvse", {**small, "num_concepts": 12, "gcn_hidden": 24}, info)}
    models["mh-cvse"].prepare(train)
    return models, dev


def test_search_units_reproduce_every_models_score(tmp_path, monkeypatch):
    models, dev = _tiny_models(tmp_path, monkeypatch)
    for name, model in models.items():
        img, txt = encode_split(model.eval(), dev)
        with torch.no_grad():
            units = meta_sim_reference(model.search_units(img, "image"), model.search_units(txt, "text"),
                                       normalize=False)
            torch.testing.assert_close(units, model.similarity(img, txt), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["mh-cvse", "vse"])
def test_index_and_search_for_the_other_models(name, tmp_path, monkeypatch):
    # mh-cvse's embeddings are tuples of parts (image_tuple / text_tuple in the file); vse's one vector.
    models, dev = _tiny_models(tmp_path, monkeypatch)
    model = models[name].eval()
    save_checkpoint(tmp_path / name, model, config={"features": "regions"}, vocab=dev.vocab, meta={})
    r = vse_models.load(tmp_path / name)
    index = r.build_index(tmp_path / "dev.safetensors", split="dev", data=dev.root)
    img, txt = encode_split(r.model, dev)
    assert type(index.images) is type(img) and type(index.texts) is type(txt)
    for a, b in zip(*(x if isinstance(x, tuple) else (x,) for x in (index.images, img))):
        assert torch.equal(a, b)
    hits = r.search(r.open_index(tmp_path / "dev.safetensors"), texts=dev.captions[:6], k=4)
    ref_vals, ref_idx = reference_topk(r.score(img, slice_embeddings(txt, 0, 6)).t(), 4)
    torch.testing.assert_close(hits.scores, ref_vals)
    assert torch.equal(hits.indices, ref_idx)
    hits = r.search(index, image_ids=index.image_ids[:2], k=7)
    ref_vals, ref_idx = reference_topk(r.score(slice_embeddings(img, 0, 2), txt), 7)
    torch.testing.assert_close(hits.scores, ref_vals)
    assert torch.equal(hits.indices, ref_idx)


def test_faiss_candidates_and_exact_rerank(tmp_path):
    pytest.importorskip("faiss")
    from vse_models.ann import UnitIndex, ann_search, default_factory

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(500, 8, 32, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img[torch.arange(0, 40, 2), :4] + 0.05 * torch.randn(20, 4, 32, generator=g), dim=-1)
    score = lambda i, t: vk.meta_sim(i, t)  # noqa: E731
    exact = search(txt, img, 10, score=score)
    flat = UnitIndex.build(lambda s, e: img[s:e], 500)
    assert flat.factory == "Flat" and flat.index.ntotal == 4000
    # Exhaustive candidates (every unit): the exact answer, the tie rule included.
    vals, idx, ncand = ann_search(txt, img, 10, score=score, query_units=txt, unit_index=flat, k_units=4000)
    assert (ncand == 500).all() and torch.equal(idx, exact[1]) and torch.allclose(vals, exact[0])
    vals, idx, ncand = ann_search(txt, img, 10, score=score, query_units=txt, unit_index=flat)  # k_units = 80
    assert (idx[:, 0] == torch.arange(0, 40, 2)).all() and (ncand < 500).all()
    ivf = UnitIndex.build(lambda s, e: img[s:e], 500, factory="IVF16,Flat", train_size=4000)
    blob = ivf.to_bytes()
    again = UnitIndex.from_bytes(blob, 8, 500, "IVF16,Flat")
    v1, i1, _ = ann_search(txt, img, 10, score=score, query_units=txt, unit_index=again, nprobe=16, k_units=4000)
    assert torch.equal(i1, exact[1])
    assert default_factory(1 << 18, 256) == "Flat" and default_factory(8_000_000, 256) == "IVF2048,PQ32"
    with pytest.raises(ValueError, match="fewer than k=10"):
        ann_search(txt, img, 10, score=score, query_units=txt, unit_index=flat, k_units=1)


def test_vse_search_faiss_on_the_tiny_run(trained, run, tmp_path, capsys):
    pytest.importorskip("faiss")
    index = str(tmp_path / "f.safetensors")
    assert search_main([str(run), "--build-index", "--index", index, "--faiss", "--no-progress"]) == 0
    assert "FAISS Flat over 120 image units" in capsys.readouterr().out  # 10 images x 12 units
    for mode in ([], ["--faiss", "--k-units", "120"]):
        assert search_main([str(run), "--index", index, "--text", "a red dog", "-k", "4",
                            "--json", str(tmp_path / "r.json"), *mode]) == 0
        rows = [x["row"] for x in json.loads((tmp_path / "r.json").read_text())[0]["results"]]
        if not mode:
            exact = rows
    assert rows == exact and "FAISS + exact rerank" in capsys.readouterr().out
    assert search_main([str(run), "--build-index", "--index", index, "--faiss", "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err
    other = str(tmp_path / "dev.safetensors")
    assert search_main([str(run), "--build-index", "--split", "dev", "--index", other, "--no-progress"]) == 0
    shutil.copy(other, index)  # another gallery under the .faiss file's name
    assert search_main([str(run), "--index", index, "--text", "a dog", "--faiss"]) == 2
    assert "built for another gallery" in capsys.readouterr().err


def test_the_1m_benchmark_runs_at_a_small_size(tmp_path):
    pytest.importorskip("faiss")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "bench.search_1m", "--n", "3000", "--queries", "8",
                             "--prototypes", "256", "--workdir", str(tmp_path), "--nprobe", "4", "--k-units", "80",
                             "--json", str(tmp_path / "r.json"), "--threads", "1"],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    out = json.loads((tmp_path / "r.json").read_text())
    assert out["brute_force"]["true_neighbour_first"] == 1.0 and out["faiss_rerank"][0]["recall_at_10"] > 0.5
    assert not (tmp_path / "gallery.safetensors").exists()


@pytest.mark.cuda
def test_search_on_cuda_equals_cpu():
    # Unverified here (no GPU): chunked scoring with a running top-k on the queries' device.
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(3000, 8, 256, generator=g), torch.randn(40, 4, 256, generator=g)
    score = lambda i, t: vk.meta_sim(i, t)  # noqa: E731
    cpu = search(txt, img, 10, score=score, chunk=512)
    gpu = search(txt, img, 10, score=score, chunk=512, device="cuda")
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-4, atol=1e-4)
    assert (gpu[1].cpu() == cpu[1]).float().mean() > 0.99
