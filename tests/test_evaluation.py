import math

import numpy as np
import pytest
import torch

from vse_models.evaluation import (METRIC_KEYS, fold_metrics, metrics_from_ranks, ranks, retrieval_metrics,
                                   streamed_ranks)


def test_hand_computed_two_images():
    # Image 0: its captions 0-4 score 0.5..0.9; caption 5 (image 1) scores 1.0 -> i2t rank 1.
    # Image 1: its captions score 0.8; every caption of image 0 scores lower -> i2t rank 0.
    sims = np.array([[0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.0, 0.0, 0.0, 0.0],
                     [0.1, 0.2, 0.3, 0.4, 0.95, 0.8, 0.8, 0.8, 0.8, 0.8]], dtype=np.float32)
    i2t, t2i = ranks(sims)
    assert i2t.tolist() == [0 + 1, 1]  # image 1: caption 4 scores 0.95 > 0.8
    # t2i: caption c ranks image c // 5 among the 2 images.
    assert t2i.tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]
    m = retrieval_metrics(sims)
    assert set(m) == set(METRIC_KEYS)
    assert m["i2t_r1"] == 0.0 and m["i2t_r5"] == 100.0 and m["i2t_medr"] == 2 and m["i2t_meanr"] == 2.0
    assert m["t2i_r1"] == 80.0 and m["t2i_r5"] == 100.0 and m["t2i_medr"] == 1 and m["t2i_meanr"] == 1.2
    assert m["rsum"] == pytest.approx(0 + 100 + 100 + 80 + 100 + 100)


def test_ties_count_against_the_positive():
    # A collapsed model (every score equal) ranks every positive behind all its negatives: rsum ~0, not 600.
    for value in (0.0, 0.37):
        m = retrieval_metrics(torch.full((1000, 5000), value))
        assert m["rsum"] == 0.0 and m["i2t_medr"] == 4996 and m["t2i_medr"] == 1000  # 4995 captions, 999 images
    sims = torch.zeros(3, 15)
    i2t, t2i = ranks(sims)
    assert i2t.tolist() == [10] * 3 and t2i.tolist() == [2] * 15  # the other images (2) and their captions (10) tie
    # Image 0's best caption ties with caption 5 (of image 1) only; its own other captions never count.
    sims[0, :5] = torch.tensor([0.1, 0.5, 0.5, 0.2, 0.3])
    sims[0, 5] = 0.5
    assert ranks(sims)[0][0] == 1


def _argsort_ranks(sims: np.ndarray, k: int = 5):
    """SCAN's / VSE∞'s i2t / t2i (evaluation.py there): positions in the descending argsort."""
    n = sims.shape[0]
    i2t = np.array([min(np.where(np.argsort(sims[i])[::-1] == c)[0][0] for c in range(k * i, k * i + k))
                    for i in range(n)])
    t2i = np.array([np.where(np.argsort(sims[:, c])[::-1] == c // k)[0][0] for c in range(k * n)])
    return i2t, t2i


@pytest.mark.parametrize("n", [1, 2, 7, 40])
def test_tie_free_ranks_equal_the_argsort_formulation(n):
    sims = np.random.default_rng(n).standard_normal((n, 5 * n))
    i2t, t2i = ranks(sims)
    want_i2t, want_t2i = _argsort_ranks(sims)
    assert i2t.tolist() == want_i2t.tolist() and t2i.tolist() == want_t2i.tolist()
    assert retrieval_metrics(sims) == metrics_from_ranks(want_i2t, want_t2i)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_are_an_error_naming_where(bad):
    sims = torch.randn(4, 20)
    sims[2, 7] = bad
    sims[3, 19] = bad
    with pytest.raises(ValueError, match=r"2 similarity score\(s\) are NaN or infinite, at \(image, caption\) "
                                         r"\(2, 7\), \(3, 19\)"):
        retrieval_metrics(sims)
    with pytest.raises(ValueError, match="NaN or infinite"):
        fold_metrics(torch.cat([sims] * 5).repeat(1, 5)[:5, :25].clone().fill_(bad))
    with pytest.raises(ValueError, match=r"\(2, 7\)"):  # every block size finds it, the count over all blocks
        streamed_ranks(_Sims(sims), torch.arange(4), torch.arange(20), 5, block=3)


class _Sims:
    """A model whose similarity is a fixed matrix (rows/columns picked by the index 'embeddings')."""

    def __init__(self, sims):
        self.sims = sims

    def similarity(self, img, txt):
        return self.sims[img][:, txt]


def test_non_finite_embeddings_are_an_error_naming_the_items():
    img, txt = torch.randn(4, 3), torch.randn(20, 3)
    img[1, 0] = float("nan")
    txt[[3, 11], 2] = float("inf")
    with pytest.raises(ValueError, match=r"1 of 4 image embeddings hold NaN or infinite values \(image 1\)"):
        streamed_ranks(_Dot(), img, txt)
    img[1, 0] = 0
    with pytest.raises(ValueError, match=r"2 of 20 caption embeddings .*\(caption 3, 11\)"):
        streamed_ranks(_Dot(), (img, img), (txt * 0, txt))


def test_medr_is_floor_of_median_plus_one_and_numpy_equals_torch():
    m = metrics_from_ranks(np.array([0, 1, 2, 3]), np.array([5]))
    assert m["i2t_medr"] == math.floor(1.5) + 1 and m["i2t_meanr"] == 2.5 and m["t2i_medr"] == 6
    sims = np.random.default_rng(0).standard_normal((20, 100)).astype(np.float32)
    assert retrieval_metrics(sims) == retrieval_metrics(torch.from_numpy(sims))
    # chance level: R@1 near 100/N for t2i
    big = torch.randn(200, 1000, generator=torch.Generator().manual_seed(0))
    assert retrieval_metrics(big)["t2i_r1"] < 2.0


def test_captions_per_image_and_shape_checks():
    sims = torch.eye(4).repeat_interleave(2, dim=1)  # 4 images x 8 captions, k=2, perfect
    assert retrieval_metrics(sims, captions_per_image=2)["rsum"] == 600.0
    with pytest.raises(ValueError, match=r"shape \(N, 5\*N\)"):
        retrieval_metrics(sims)
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(torch.full((1, 5), float("nan")))
    assert retrieval_metrics(torch.tensor([[1.0, 0, 0, 0, 0]]))["rsum"] == 600.0  # one image: no negatives


def test_fold5_averages_each_metric_over_folds():
    rng = np.random.default_rng(1)
    sims = rng.standard_normal((10, 50))
    folds = [retrieval_metrics(sims[2 * f:2 * f + 2, 10 * f:10 * f + 10]) for f in range(5)]
    got = fold_metrics(sims)
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(np.mean([f[key] for f in folds]))
    assert got["rsum"] == pytest.approx(np.mean([f["rsum"] for f in folds]))  # not 6 x the i2t mean
    with pytest.raises(ValueError, match="equal folds"):
        fold_metrics(sims[:9, :45])


class _Dot:
    def similarity(self, img, txt):
        if isinstance(img, tuple):  # two embeddings per side, like MH-CVSE
            return img[0] @ txt[0].t() + 0.5 * img[1] @ txt[1].t()
        return img @ txt.t()


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_streamed_ranks_equal_full_matrix(block):
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(7, 4, generator=g), torch.randn(35, 4, generator=g)
    txt[::3] = txt[::3].round()  # some exact ties
    img = img.round()
    full = ranks(img @ txt.t())
    got = streamed_ranks(_Dot(), img, txt, 5, block)
    assert torch.equal(got[0], full[0]) and torch.equal(got[1], full[1])
    img2, txt2 = (img, img * 2), (txt, txt + 1)
    full2 = ranks(img @ txt.t() + 0.5 * (img * 2) @ (txt + 1).t())
    got2 = streamed_ranks(_Dot(), img2, txt2, 5, block)
    assert torch.equal(got2[0], full2[0]) and torch.equal(got2[1], full2[1])
