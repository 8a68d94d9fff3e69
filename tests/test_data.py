import numpy as np
import pytest
import torch

from vse_models.data import Split, SyntheticConfig, Vocabulary, ensure_synthetic, generate, shuffled_batches
from vse_models.data.synthetic import NOUNS

TINY = dict(n_train=12, n_dev=6, n_test=6, n_regions=10, feat_dim=16, grid_size=4)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return generate(SyntheticConfig(**TINY), tmp_path_factory.mktemp("tiny"))


def _copy_split(src, dst, split="train"):
    dst.mkdir()
    for suffix in ("ims.npy", "grids.npy", "caps.txt", "ids.txt"):
        (dst / f"{split}_{suffix}").write_bytes((src / f"{split}_{suffix}").read_bytes())
    return dst


def test_generator_is_deterministic_by_seed(tiny_root, tmp_path):
    again = generate(SyntheticConfig(**TINY), tmp_path / "again")
    other = generate(SyntheticConfig(**TINY, seed=1), tmp_path / "other")
    for name in ("train_ims.npy", "test_grids.npy", "dev_caps.txt"):
        assert (again / name).read_bytes() == (tiny_root / name).read_bytes()
        assert (other / name).read_bytes() != (tiny_root / name).read_bytes()


def test_ensure_synthetic_caches_by_parameters(tmp_path):
    a = ensure_synthetic(TINY, tmp_path)
    stamp = (a / "train_ims.npy").stat().st_mtime_ns
    assert ensure_synthetic(TINY, tmp_path) == a and (a / "train_ims.npy").stat().st_mtime_ns == stamp
    assert ensure_synthetic({**TINY, "seed": 3}, tmp_path) != a
    with pytest.raises(ValueError, match="unknown synthetic"):
        ensure_synthetic({"n_imgs": 3}, tmp_path)


def test_region_and_grid_readers_and_batches(tiny_root):
    vocab = Vocabulary.build(Split(tiny_root, "train").captions, min_count=1)
    reg = Split(tiny_root, "test", vocab)
    assert reg.images.shape == (6, 10, 16) and isinstance(reg.images, np.memmap)
    assert reg.n_captions == 30 and reg.captions_per_image == 5 and reg.ids[0] == "test-000000"
    grid = Split(tiny_root, "test", vocab, features="grids")
    assert grid.images.shape == (6, 16, 16) and grid.grid_size == 4
    b = reg.pair_batch([0, 7, 29])
    assert b.img_ids.tolist() == [0, 1, 5] and b.caption_ids.tolist() == [0, 7, 29]
    assert torch.equal(b.images[1], torch.from_numpy(np.array(reg.images[1])))
    assert b.image_lengths.tolist() == [10, 10, 10]
    assert torch.equal(b.padding_mask, torch.arange(b.tokens.size(1))[None] >= b.lengths[:, None])
    assert (b.tokens[:, 0] == 1).all() and (b.tokens[torch.arange(3), b.lengths - 1] == 2).all()
    assert (b.tokens[b.padding_mask] == 0).all()
    g = grid.image_batch([2, 2])
    assert g.grid_size == 4 and torch.equal(g.images[0], g.images[1])


def test_grid_cls_token_is_prepended(tiny_root, tmp_path):
    root = _copy_split(tiny_root, tmp_path / "d")
    cls = np.arange(12 * 16, dtype=np.float32).reshape(12, 16)
    np.save(root / "train_grid_cls.npy", cls)
    s = Split(root, "train", features="grids")
    assert s.set_size == 17 and s.grid_size == 4
    b = s.image_batch([3, 0])
    assert b.images.shape == (2, 17, 16) and b.image_lengths.tolist() == [17, 17]
    assert torch.equal(b.images[0, 0], torch.from_numpy(cls[3]))
    assert torch.equal(b.images[1, 1:], torch.from_numpy(np.array(s.images[0])))
    assert Split(root, "train").set_size == 10  # region features ignore the grid CLS
    np.save(root / "train_grid_cls.npy", cls[:, :8])
    with pytest.raises(ValueError, match=r"train_grid_cls.npy: expected CLS features of shape \(12, 16\)"):
        Split(root, "train", features="grids")


def test_each_caption_describes_only_part_of_its_image(tiny_root):
    s = Split(tiny_root, "train")
    nouns = set(NOUNS)
    per_caption = [{w for w in c.split() if w in nouns} for c in s.captions]
    for i in range(s.n_images):
        caps = per_caption[5 * i:5 * i + 5]
        union = set().union(*caps)
        assert all(len(c) <= 2 for c in caps) and len(union) > max(len(c) for c in caps)


def test_shuffling_is_reproducible():
    a = list(shuffled_batches(10, 3, torch.Generator().manual_seed(5)))
    b = list(shuffled_batches(10, 3, torch.Generator().manual_seed(5)))
    c = list(shuffled_batches(10, 3, torch.Generator().manual_seed(6)))
    assert len(a) == 3 and all(len(x) == 3 for x in a)  # drop_last
    assert all((x == y).all() for x, y in zip(a, b)) and any((x != y).any() for x, y in zip(a, c))
    assert sorted(np.concatenate(list(shuffled_batches(10, 3, torch.Generator(), drop_last=False)))) == list(range(10))


def test_missing_files_are_named(tiny_root, tmp_path):
    root = _copy_split(tiny_root, tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="dev_ims.npy"):
        Split(root, "dev")
    (root / "train_caps.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_caps.txt"):
        Split(root, "train")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Split(tmp_path / "nowhere", "train")


@pytest.mark.parametrize("content, message", [
    (b"a dog\n" * 59, "59 captions is not a multiple of the 12 images"),
    (b"a dog\n" * 30 + b"\n" + b"a dog\n" * 29, r"train_caps.txt:31: empty caption"),
    (b"a dog\n" * 4 + b"a \xff dog\n" + b"a dog\n" * 55, r"train_caps.txt:5: not valid UTF-8"),
    (b"a dog\n" * 9 + b". ,\n" + b"a dog\n" * 50, r"train_caps.txt:10: caption has no words"),
])
def test_bad_caption_files(tiny_root, tmp_path, content, message):
    root = _copy_split(tiny_root, tmp_path / "d")
    (root / "train_caps.txt").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        Split(root, "train")


def test_bad_feature_and_id_files(tiny_root, tmp_path):
    root = _copy_split(tiny_root, tmp_path / "d")
    np.save(root / "train_ims.npy", np.zeros((12, 10), np.float32))
    with pytest.raises(ValueError, match=r"train_ims.npy: expected region features of shape \(N, K, F\)"):
        Split(root, "train")
    np.save(root / "train_grids.npy", np.zeros((12, 4, 3, 16), np.float32))
    with pytest.raises(ValueError, match=r"train_grids.npy: expected grid features of shape \(N, s, s, C\)"):
        Split(root, "train", features="grids")
    np.save(root / "train_ims.npy", np.zeros((12, 10, 16), np.int32))
    with pytest.raises(ValueError, match="train_ims.npy: expected a float array"):
        Split(root, "train")
    (root / "train_ims.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="train_ims.npy: not a readable"):
        Split(root, "train")
    np.save(root / "train_ims.npy", np.zeros((12, 10, 16), np.float32))
    (root / "train_ids.txt").write_text("1\n2\n3\n")
    with pytest.raises(ValueError, match="train_ids.txt: 3 lines"):
        Split(root, "train")
