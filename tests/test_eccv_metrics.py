"""Exact multi-positive ground truth of the synthetic set and the ECCV-Caption-style metrics (issue 20)."""

import warnings

import numpy as np
import pytest
import torch

from vse_models.data import SyntheticConfig, ensure_synthetic, generate
from vse_models.data.synthetic import describes, parse_caption, positive_images, scenes_and_claims
from vse_models.eccv_metrics import (ECCV_KEYS, Positives, load_positives, positive_metrics,
                                     streamed_positive_metrics)
from vse_models.errors import NonFiniteError
from vse_models.evaluation import metrics_from_ranks, retrieval_metrics, streamed_ranks

SMALL = dict(n_train=12, n_dev=6, n_test=9)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    return generate(SyntheticConfig(**SMALL), tmp_path_factory.mktemp("small"))


def test_saved_ground_truth_is_every_image_the_caption_describes(small_root):
    cfg = SyntheticConfig(**SMALL)
    for split, n in (("train", 12), ("dev", 6), ("test", 9)):
        gt = load_positives(small_root / f"{split}_positives.npz").check_own(5)
        texts = (small_root / f"{split}_caps.txt").read_text().splitlines()
        scenes, claims = scenes_and_claims(cfg, split)
        assert gt.n_queries == len(texts) == 5 * n and gt.n_gallery == n
        for c, (text, claim) in enumerate(zip(texts, claims)):
            assert parse_caption(text, cfg) == claim          # the recorded claims are what the text says
            assert gt.row(c).tolist() == [i for i, s in enumerate(scenes) if describes(claim, s)]
            assert c // 5 in gt.row(c)                         # the caption's own image


def test_ground_truth_of_hand_made_scenes():
    cfg = SyntheticConfig()
    # types: 0 man, 1 woman, 2 child, 3 boy, 4 girl, 5 dog, 6 cat; attributes: 0 red, 1 blue, 2 green, 3 yellow
    s0 = [[0, 1, 0], [1, 2, 0], [2, 3, 1], [3, 3, 1], [4, 0, 2], [5, 1, 2]]
    s1 = [[0, 0, 0], [1, 2, 0], [2, 3, 1], [3, 3, 1], [4, 0, 2], [5, 1, 2]]   # the man is red
    s2 = [[1, 2, 0], [6, 3, 0], [2, 3, 1], [3, 3, 1], [4, 0, 2], [0, 1, 2]]   # a blue man on the right
    texts = {"a blue man and a green woman on the left .": [0],
             "a man and a woman .": [0, 1, 2],
             "a man on the right and a woman on the left .": [2],
             "on the left , a man beside a green woman .": [0, 1],
             "a yellow child near a boy in the middle .": [0, 1, 2],
             "a red girl and a cat in the picture .": [2],
             "a dog and a cat .": []}
    claims = [parse_caption(t, cfg) for t in texts]
    assert claims[2] == ((0, -1, 2), (1, -1, 0), -1) and claims[0] == ((0, 1, 0), (1, 2, 0), -1)
    assert positive_images([s0, s1, s2], claims) == list(texts.values())
    with pytest.raises(ValueError, match="outside the synthetic grammar"):
        parse_caption("a man .", cfg)


def test_old_caches_get_their_ground_truth(tmp_path):
    root = ensure_synthetic(SMALL, tmp_path)
    want = (root / "dev_positives.npz").read_bytes()
    for split in ("train", "dev", "test"):
        (root / f"{split}_positives.npz").unlink()
    assert ensure_synthetic(SMALL, tmp_path) == root and (root / "dev_positives.npz").read_bytes() == want


# ---------------------------------------------------------------------------------------- metrics
def test_hand_computed_example():
    # 4 images x 2 captions; caption 0 describes images {0, 2}, caption 1 images {1, 2, 3}.
    sims = np.array([[0.9, 0.5], [0.8, 0.4], [0.7, 0.6], [0.1, 0.3]])
    gt = Positives.from_lists([[0, 2], [1, 2, 3]], 4)
    m = positive_metrics(sims, gt)
    # t2i caption 0: images 0+ 1- 2+ 3-, R=2: R-P 1/2, mAP@R (1/2)(1/1) = 1/2, R@1 1.
    # t2i caption 1: images 2+ 0- 1+ 3+, R=3: R-P 2/3, mAP@R (1/3)(1/1 + 2/3) = 5/9, R@1 1.
    assert m["t2i_r_precision"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2, abs=1e-4)
    assert m["t2i_map_at_r"] == pytest.approx(100 * (1 / 2 + 5 / 9) / 2, abs=1e-4)
    assert m["t2i_r1"] == 100
    # i2t: image 0 {c0} first; image 1 {c1} second of 2 (R=1: 0); image 2 {c0, c1} both; image 3 {c1} first.
    assert (m["i2t_map_at_r"], m["i2t_r_precision"], m["i2t_r1"]) == (75, 75, 75)


def test_ties_never_flatter():
    # A collapsed model: every score equal. Caption 0 -> {0}, caption 1 -> {1, 2}, caption 2 -> {2}.
    gt = Positives.from_lists([[0], [1, 2], [2]], 3)
    m = positive_metrics(np.zeros((3, 3)), gt)
    # Caption 1: the negative image 0 ranks first, its positives 2nd and 3rd: R-P 1/2, mAP@R (1/2)(1/2).
    # Captions 0 and 2: both negatives first: 0. Image 2 -> {c1, c2} likewise; images 0, 1: 0.
    for side in ("i2t", "t2i"):
        assert m[f"{side}_r_precision"] == pytest.approx(100 / 6, abs=1e-4)
        assert m[f"{side}_map_at_r"] == pytest.approx(100 / 12, abs=1e-4)
        assert m[f"{side}_r1"] == 0
    # A positive tied with a negative ranks after it, a positive tied with positives does not lose.
    sims = np.array([[0.5, 0.1], [0.5, 0.2], [0.1, 0.3]])
    m = positive_metrics(sims, Positives.from_lists([[0], [1, 2]], 3))
    assert m["t2i_r1"] == 50 and m["t2i_map_at_r"] == 50   # caption 0: image 1 (tied, negative) first
    sims[1, 0] = 0.4
    assert positive_metrics(sims, Positives.from_lists([[0, 1], [2]], 3))["t2i_map_at_r"] == 100


def test_non_finite_scores_are_an_error():
    sims = np.eye(3)
    sims[1, 2] = np.nan
    with pytest.raises(NonFiniteError, match=r"\(1, 2\)"):
        positive_metrics(sims, Positives.from_lists([[0], [1], [2]], 3))


def _brute_force(sims, lists):
    """Per query: sort by (score descending, positive last), then the paper's definitions."""
    out = {}
    for side, scores, gt in (("t2i", sims.T, lists), ("i2t", sims, [[c for c, l in enumerate(lists) if i in l]
                                                                     for i in range(sims.shape[0])])):
        ap, rp, r1 = [], [], []
        for q, pos in enumerate(gt):
            rel = np.isin(np.arange(scores.shape[1]), pos)
            order = np.lexsort((rel, -scores[q]))
            hit = rel[order][:len(pos)]
            prec = np.cumsum(hit) / np.arange(1, len(pos) + 1)
            ap.append((prec * hit).sum() / len(pos))
            rp.append(hit.mean())
            r1.append(hit[0])
        out.update({f"{side}_map_at_r": 100 * np.mean(ap), f"{side}_r_precision": 100 * np.mean(rp),
                    f"{side}_r1": 100 * np.mean(r1)})
    return out


class _DotModel:
    def similarity(self, img, txt):
        return img @ txt.t()


@pytest.mark.parametrize("quantised", [False, True])
def test_streamed_equals_full_matrix_and_brute_force(quantised):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(30, 8, generator=g), torch.randn(150, 8, generator=g)
    if quantised:  # many ties
        img, txt = img.round(), txt.round().clamp(-1, 1)
    rng = np.random.default_rng(0)
    lists = [sorted({c // 5} | set(rng.choice(30, size=rng.integers(0, 4)).tolist())) for c in range(150)]
    gt = Positives.from_lists(lists, 30).check_own(5)
    sims = (img @ txt.t()).numpy()
    full = positive_metrics(sims, gt)
    assert streamed_positive_metrics(_DotModel(), img, txt, gt, block=7) == full
    assert full == pytest.approx(_brute_force(sims, lists), abs=1e-3)
    # With only the own image as positive, R@1 is the Karpathy R@1 (t2i) of the tie rule.
    own = Positives.from_lists([[c // 5] for c in range(150)], 30)
    assert positive_metrics(sims, own)["t2i_r1"] == pytest.approx(retrieval_metrics(sims)["t2i_r1"], abs=1e-3)
    assert set(full) == set(ECCV_KEYS)


def test_eccv_caption_package_recalls_equal_ours():
    """Original-ground-truth COCO 5K R@K from eccv-caption == ours, random scores over its COCO test ids."""
    pytest.importorskip("eccv_caption")
    from vse_models.eccv_metrics import _eccv_package, coco_package_metrics

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "failed to import ujson"
        metrics = _eccv_package()()
    test_caps = [int(c) for c in metrics.coco_ids]
    image_ids = list(dict.fromkeys(metrics.coco_gts["t2i"][c][0] for c in test_caps))   # 5000, in test order
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(5000, 16, generator=g), torch.randn(25000, 16, generator=g)
    ours = metrics_from_ranks(*streamed_ranks(_DotModel(), img, txt, 5, 1000))
    theirs = coco_package_metrics(_DotModel(), img, txt, [str(i) for i in image_ids], 5, block=1000)
    for side in ("i2t", "t2i"):
        for k in (1, 5, 10):
            assert theirs[f"coco_{side}_r{k}"] == pytest.approx(ours[f"{side}_r{k}"], abs=1e-6)
    assert {f"eccv_{s}_{m}" for s in ("i2t", "t2i") for m in ("map_at_r", "r_precision", "r1")} <= set(theirs)
    assert all(0 <= v <= 100 for v in theirs.values())



def test_vse_eval_metrics_eccv(tmp_path, monkeypatch, capsys):
    import json

    from vse_models.data import Split
    from vse_models.evaluate import main as eval_main
    from vse_models.evaluation import evaluate_split
    from vse_models.train import main as train_main

    monkeypatch.setenv("VSE_DATA_CACHE", str(tmp_path / "cache"))
    data = ["n_train=40", "n_dev=10", "n_test=10", "n_regions=8", "feat_dim=16", "grid_size=4"]
    out = tmp_path / "run"
    assert train_main(["--epochs", "1", "--out", str(out), "--model", "vse", "--batch-size", "20", "--no-progress",
                       "--option", "embed_size=32", "--option", "word_dim=16",
                       *[a for kv in data for a in ("--synthetic", kv)]]) == 0
    assert eval_main(["--checkpoint", str(out), "--metrics", "eccv", "--json", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "mAP@R" in printed and "test_positives.npz" in printed
    result = json.loads((tmp_path / "m.json").read_text())["test"]
    assert set(result["eccv"]) == {"ground_truth", *ECCV_KEYS}
    assert result["i2t_r1"] <= result["eccv"]["i2t_r1"] and result["t2i_r1"] <= result["eccv"]["t2i_r1"]

    # A folder without a ground-truth file or COCO ids: a clear error.
    from vse_models.checkpoint import load_checkpoint

    model, vocab, _, _ = load_checkpoint(out, "best", "cpu")
    root = ensure_synthetic({kv.split("=")[0]: int(kv.split("=")[1]) for kv in data})
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("test_ims.npy", "test_caps.txt", "test_ids.txt"):
        (bare / name).write_bytes((root / name).read_bytes())
    with pytest.raises(ValueError, match="test_positives.npz"):
        evaluate_split(model, Split(bare, "test", vocab), metrics="eccv")
    (bare / "test_ids.txt").unlink()
    with pytest.raises(ValueError, match="COCO 5K test image ids"):
        evaluate_split(model, Split(bare, "test", vocab), metrics="eccv")
