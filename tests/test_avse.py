"""AVSE (SPEC §3.2): package model (vse_kernels) == pure-PyTorch reference with shared weights,
radial bias sampling, the group encoder, L_reg, Sinkhorn, and vse-train --model avse on tiny data."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from vse_models.avse_parts import (GroupEncoder, RBSEncoder, aeom_reference, grid_coordinates, log_sinkhorn,
                                   rbs_fixed_centres, rbs_indices, rbs_num_kept, view_regularizer)
from vse_models.data.precomp import Batch
from vse_models.layers import GPO, l2norm
from vse_models.models import DataInfo, build_model

SMALL = {"embed_size": 64, "meta_dim": 32, "word_dim": 16}
RTOL, ATOL = 1e-4, 2e-5


def _batch(b=10, k=12, f=16, vocab=40, seed=0, grid=None, cls=False, dup=True):
    g = torch.Generator().manual_seed(seed)
    n_tok = grid * grid + int(cls) if grid else k
    lengths = torch.randint(1, 9, (b,), generator=g)
    lengths[0] = 8
    tokens = torch.randint(4, vocab, (b, 8), generator=g)
    tokens[torch.arange(8)[None] >= lengths[:, None]] = 0
    img_ids = torch.arange(b)
    if dup:
        img_ids[1] = img_ids[0]  # two captions of one image: not a negative
    images = torch.randn(b, n_tok, f, generator=g).relu()
    images[1] = images[0]
    return Batch(images=images, image_lengths=torch.full((b,), n_tok), tokens=tokens, lengths=lengths,
                 padding_mask=tokens == 0, img_ids=img_ids, grid_size=grid)


def _info(grid=None, cls=False, k=12, f=16, vocab=40):
    if grid:
        return DataInfo(vocab_size=vocab, feature_dim=f, set_size=grid * grid + int(cls), grid_size=grid)
    return DataInfo(vocab_size=vocab, feature_dim=f, set_size=k)


def _pair(options, info):
    torch.manual_seed(1)
    pkg = build_model("avse", {**SMALL, **options, "backend": "kernels"}, info)
    ref = build_model("avse", {**SMALL, **options, "backend": "reference"}, info)
    ref.load_state_dict(pkg.state_dict())
    return pkg, ref


def _close(a, b, what, scale=1.0):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL * scale, msg=lambda m: f"{what}: {m}")


def _run_step(model, batch, epoch, seed):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # same region drop / RBS centres on both models
    img = model.encode_images(batch)
    txt = model.encode_texts(batch)
    scores = model.similarity(img, txt)
    torch.manual_seed(seed)
    loss, logs = model.loss(batch, epoch)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return img, txt, scores, loss, logs, grads


CASES = {
    "regions": ({}, {}),
    "regions-code-reg-no-drop": ({"reg_form": "code", "region_drop": 0.0}, {}),
    "regions-sinkhorn": ({"sinkhorn": True, "sinkhorn_iters": 5}, {}),
    "grids": ({"features": "grids"}, {"grid": 4}),
    "grids-cls-stochastic": ({"features": "grids", "rbs_mode": "stochastic"}, {"grid": 4, "cls": True}),
    "grids-cls-grid-mlp": ({"features": "grids", "grid_mlp": True}, {"grid": 4, "cls": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_package_model_equals_reference(case):
    options, data = CASES[case]
    pkg, ref = _pair(options, _info(**data))
    batch = _batch(**data)
    for epoch in (0, 1):  # all negatives, then hardest negatives
        out_p = _run_step(pkg, batch, epoch, seed=10 + epoch)
        out_r = _run_step(ref, batch, epoch, seed=10 + epoch)
        for what, a, b in zip(("image embedding", "text embedding", "scores", "loss"), out_p[:4], out_r[:4]):
            _close(a, b, f"{case} epoch {epoch} {what}")
        assert out_p[4].keys() == {"loss", "l_m", "l_reg"}
        assert out_p[3].item() > 0
        gp, gr = out_p[5], out_r[5]
        assert gp.keys() == gr.keys()
        missing = [n for n, g in gp.items() if g is None]
        assert not missing, f"parameters without gradient: {missing}"
        # fp32 rounding noise of a summed loss grows with its size (e.g. the exactly-zero gradient of
        # a bias in front of BatchNorm comes out as +-1e-5 * loss): absolute tolerance scaled by it.
        scale = max(1.0, out_r[3].item())
        for name in gp:
            _close(gp[name], gr[name], f"{case} epoch {epoch} grad {name}", scale)
    # evaluation mode: deterministic, blockable similarity
    pkg.eval(), ref.eval()
    with torch.no_grad():
        ip, tp = pkg.encode_images(batch), pkg.encode_texts(batch)
        ir, tr = ref.encode_images(batch), ref.encode_texts(batch)
        _close(ip, ir, "eval image embedding")
        _close(pkg.similarity(ip, tp), ref.similarity(ir, tr), "eval scores")
        full = pkg.similarity(ip, tp)
        blocks = torch.cat([pkg.similarity(ip[s:s + 3], tp) for s in range(0, len(ip), 3)])
        _close(blocks, full, "blocked scores")
        _close(pkg.encode_images(batch), ip, "eval is deterministic")


def test_aeom_reference_matches_definition():
    img, txt = torch.randn(3, 6 * 8), torch.randn(4, 2 * 8)
    s = aeom_reference(img, txt, 8, block=2)
    iu, tu = F.normalize(img.view(3, 6, 8), dim=-1), F.normalize(txt.view(4, 2, 8), dim=-1)
    for a in range(3):
        for b in range(4):
            expect = sum(max(float(iu[a, i] @ tu[b, j]) for i in range(6)) for j in range(2))
            assert math.isclose(float(s[a, b]), expect, rel_tol=1e-5, abs_tol=1e-6)


def test_reference_backend_imports_no_vse_kernels():
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_avse import _batch, _info, SMALL\n"
        "from vse_models.models import build_model\n"
        "for opts, data in (({}, {}), ({'features': 'grids'}, {'grid': 4})):\n"
        "    m = build_model('avse', {**SMALL, **opts, 'backend': 'reference'}, _info(**data))\n"
        "    loss, _ = m.loss(_batch(**data), 1)\n"
        "    loss.backward()\n"
        "    m.eval(); m.similarity(m.encode_images(_batch(**data)), m.encode_texts(_batch(**data)))\n"
        "assert 'vse_kernels' not in sys.modules, sorted(k for k in sys.modules if 'vse_kernels' in k)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# ------------------------------------------------------------------------------ radial bias sampling
RBS_RATIOS = (0.5, 0.7, 0.8, 0.9)


def _release_rbs(tokens, keep_ratio, centres=None, n_group=2, alpha=4.0):
    """The released radial bias sampling, re-written in plain torch as an oracle (liuyyy111/AVSE
    lib/encoders.py: VisionTransEncoder.forward_vit's count, new_n = int(tokens * r) with the CLS slot
    counted, then radial_bias_sampling_groups: token 0 is CLS, centres torch.randint(0, N, (B, V)),
    probabilities exp(-alpha * dist) normalised, topk(new_n, sorted=False), CLS prepended).
    tokens (B, 1 + N, d) -> (views [(B, 1 + new_n, d)] * V, patch indices (B, V, new_n))."""
    cls, patches = tokens[:, :1], tokens[:, 1:]
    b, n, d = patches.shape
    side = int(n ** 0.5)
    new_n = int(tokens.shape[1] * keep_ratio)
    gy, gx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([gy, gx], dim=-1).reshape(n, 2).float()
    if centres is None:
        centres = torch.randint(0, n, (b, n_group))
    dists = torch.norm(coords[None, None] - coords[centres][:, :, None], dim=-1)
    probs = torch.exp(-alpha * dists)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    idx = probs.reshape(-1, n).topk(new_n, dim=-1, largest=True, sorted=False).indices.view(b, -1, new_n)
    sampled = patches[:, None].expand(b, idx.size(1), n, d).gather(2, idx[..., None].expand(-1, -1, -1, d))
    return [torch.cat([cls, sampled[:, v]], dim=1) for v in range(idx.size(1))], idx


def test_rbs_counts_are_the_releases():
    # int(r * (1 + N)) patches (the CLS slot counted), + CLS: N = 196 keeps 157 / 177 (not 156 / 176)
    for n, expect in ((36, (18, 25, 29, 33)), (196, (98, 137, 157, 177))):
        assert tuple(rbs_num_kept(n, r) for r in RBS_RATIOS) == expect
        for r in RBS_RATIOS:
            _, idx = _release_rbs(torch.zeros(1, 1 + n, 1), r)
            assert idx.shape[-1] == rbs_num_kept(n, r)
            assert rbs_indices(torch.zeros(1, 1, dtype=torch.long), int(n ** 0.5), r, has_cls=True).shape[-1] == \
                rbs_num_kept(n, r) + 1
    assert rbs_num_kept(196, 0.57) == int(0.57 * 197) == 112  # Python's truncating int(), as the release
    assert rbs_num_kept(4, 0.1) == 1 and rbs_num_kept(4, 1.0) == 4  # clamped to [1, N]


@pytest.mark.parametrize("s", [6, 14])
@pytest.mark.parametrize("r", RBS_RATIOS)
def test_rbs_keeps_the_releases_patches(s, r):
    n = s * s
    centres = torch.arange(n)[:, None]  # every centre once
    ours = rbs_indices(centres, s, r, has_cls=True)
    assert (ours[..., 0] == 0).all()  # CLS first, always kept
    ours = ours[..., 1:] - 1
    _, release = _release_rbs(torch.zeros(n, 1 + n, 1), r, centres)
    assert ours.shape == release.shape
    coords = grid_coordinates(s)
    agree = 0
    for c in range(n):
        d = (coords - coords[c]).norm(dim=1)
        mine, theirs = set(ours[c, 0].tolist()), set(release[c, 0].tolist())
        assert len(mine) == ours.size(-1)
        cut = d[release[c, 0]].max()
        # the same patches strictly inside the cut radius, none beyond it, as many on it: only which of
        # the equidistant patches on the cut are kept may differ (ours: lower index; the release: topk's)
        assert {p for p in mine if d[p] < cut} == {p for p in theirs if d[p] < cut}
        assert d[ours[c, 0]].max() == cut
        agree += mine == theirs
        if not bool((d == cut).sum() > sum(1 for p in theirs if d[p] == cut)):
            assert mine == theirs  # no tie at the cut: exactly the release's set
    assert agree > 0


def test_rbs_views_equal_the_releases_encoder():
    """Training-mode views equal the release's fc -> GPO -> l2norm of its sampled tokens (lib/encoders.py
    EncoderImageAggr, without its size augmentation) on the same tokens and weights: the centres are the
    same torch.randint draw; compared wherever both keep the same patches (no tie at the cut)."""
    s, b = 6, 16
    torch.manual_seed(0)
    enc = RBSEncoder(8, 16, s, has_cls=True, keep_train=0.8).train()
    assert enc.proj.mlp is None  # the release's grid encoder: fc alone
    tokens = torch.randn(b, 1 + s * s, 8)
    for seed in range(3):
        torch.manual_seed(seed)
        views, release_idx = _release_rbs(tokens, 0.8)
        torch.manual_seed(seed)
        ours_idx = enc.view_indices(b, None, "cpu")[..., 1:] - 1
        torch.manual_seed(seed)
        with torch.no_grad():
            ours = enc(tokens)
            lengths = torch.full((b,), views[0].size(1))
            release = torch.stack([l2norm(enc.pool(enc.proj.fc(v), lengths)[0]) for v in views], 1)
        same = torch.tensor([[set(ours_idx[i, v].tolist()) == set(release_idx[i, v].tolist()) for v in range(2)]
                             for i in range(b)])
        assert same.any()
        torch.testing.assert_close(ours[same], release[same], rtol=1e-5, atol=1e-6)


def test_grid_encoder_is_fc_gpo_and_grid_mlp_adds_the_residual_mlp():
    info = _info(grid=4, cls=True)
    plain = build_model("avse", {**SMALL, "features": "grids"}, info)
    assert plain.img_enc.proj.mlp is None and plain.options["grid_mlp"] is False
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.img_enc.modules())
    mlp = build_model("avse", {**SMALL, "features": "grids", "grid_mlp": True}, info)
    assert mlp.img_enc.proj.mlp is not None
    # the region setting keeps VSE∞'s fc + residual MLP (residual_mlp, unchanged)
    assert build_model("avse", SMALL, _info()).img_enc.proj.mlp is not None
    # evaluation views by hand: fc -> GPO -> l2norm over the chosen tokens
    batch = _batch(b=3, grid=4, cls=True, dup=False)
    plain.eval()
    with torch.no_grad():
        views = plain.image_views(batch)
        idx = plain.img_enc.view_indices(3, batch.img_ids, "cpu")
        x = plain.img_enc.proj.fc(batch.images)
        for v in range(2):
            sel = x.gather(1, idx[:, v, :, None].expand(-1, -1, x.size(-1)))
            manual = l2norm(plain.img_enc.pool(sel, torch.full((3,), sel.size(1)))[0])
            torch.testing.assert_close(views[:, v], manual, rtol=1e-5, atol=1e-6)


def test_rbs_nearest_patches_and_cls():
    s = 6
    centres = torch.tensor([[0, 14], [35, 21]])  # corner (0,0), (2,2), corner (5,5), (3,3)
    idx = rbs_indices(centres, s, 0.8)
    n = rbs_num_kept(s * s, 0.8)
    assert idx.shape == (2, 2, n)
    coords = grid_coordinates(s)
    for b in range(2):
        for v in range(2):
            chosen = idx[b, v]
            assert len(set(chosen.tolist())) == n  # distinct patches
            d = (coords - coords[centres[b, v]]).norm(dim=1)
            assert int(centres[b, v]) in chosen.tolist()  # the centre itself
            # every kept patch is at least as near as every dropped one (ties broken by index)
            dropped = torch.tensor(sorted(set(range(s * s)) - set(chosen.tolist())))
            assert d[chosen].max() <= d[dropped].min()
    # corner centre (0, 0) keeps 29 and drops the 7 farthest patches: (5,5), (4,5), (5,4), (3,5), (5,3), (4,4), ...
    far = set(range(36)) - set(idx[0, 0].tolist())
    assert len(far) == 7 and {35, 29, 34} <= far and 0 not in far
    with_cls = rbs_indices(centres, s, 0.8, has_cls=True)
    assert with_cls.shape == (2, 2, n + 1)
    assert (with_cls[..., 0] == 0).all() and ((with_cls[..., 1:] - 1) == idx).all()  # CLS kept, patches shift


def test_rbs_stochastic_variant():
    centres = torch.full((200, 1), 14)
    idx = rbs_indices(centres, 6, 0.5, has_cls=True, mode="stochastic", alpha=4.0)
    n = rbs_num_kept(36, 0.5)
    assert idx.shape == (200, 1, n + 1) and (idx[..., 0] == 0).all()
    assert all(len(set(row.tolist())) == n + 1 for row in idx[:, 0])
    counts = torch.bincount(idx[:, 0, 1:].reshape(-1) - 1, minlength=36).float()
    d = (grid_coordinates(6) - grid_coordinates(6)[14]).norm(dim=1)
    assert counts[d <= 1].mean() > counts[d >= 4].mean()  # biased towards the centre
    assert not (idx == idx[:1]).all()  # random
    # exactly Gumbel top-k of log p = -alpha * dist in patch units (the release's demo, ddd.py:
    # multinomial(exp(-alpha * dist)) without replacement has this distribution)
    g = torch.Generator().manual_seed(3)
    got = rbs_indices(centres[:5], 6, 0.5, mode="stochastic", alpha=4.0, generator=g)
    u = torch.rand(5, 1, 36, generator=torch.Generator().manual_seed(3)).clamp_(1e-20, 1.0)
    expect = (-4.0 * d - torch.log(-torch.log(u))).topk(n, dim=-1).indices
    assert torch.equal(got, expect)


def test_rbs_deterministic_at_evaluation_and_random_in_training():
    info = _info(grid=6)
    model = build_model("avse", {**SMALL, "features": "grids"}, info)
    batch = _batch(b=8, grid=6, dup=False)
    model.eval()
    with torch.no_grad():
        e1 = model.encode_images(batch)
        perm = torch.randperm(8)
        sub = Batch(images=batch.images[perm], image_lengths=batch.image_lengths[perm], img_ids=batch.img_ids[perm],
                    grid_size=6)
        e2 = model.encode_images(sub)  # other order, other batch: the same views per image
    torch.testing.assert_close(e2, e1[perm])
    centres = rbs_fixed_centres(torch.arange(1000), 2, 36, seed=0)
    assert centres.min() >= 0 and centres.max() < 36
    assert len(torch.unique(centres[:, 0])) > 30 and (centres[:, 0] != centres[:, 1]).any()  # spread out
    assert not torch.equal(rbs_fixed_centres(torch.arange(50), 2, 36, seed=1), centres[:50])
    model.train()
    idx = [model.img_enc.view_indices(64, None, "cpu") for _ in range(2)]
    assert idx[0].shape == (64, 2, rbs_num_kept(36, 0.8)) and not torch.equal(idx[0], idx[1])
    model.eval()
    assert model.img_enc.view_indices(4, torch.arange(4), "cpu").shape[-1] == rbs_num_kept(36, 0.9)


# ------------------------------------------------------------------------------------- group encoder
def test_group_encoder_selects_top_regions_and_pools():
    torch.manual_seed(0)
    enc = GroupEncoder(16, 32, num_views=6, keep_ratio=0.8).eval()
    feats = torch.randn(3, 10, 16).relu()
    lengths = torch.tensor([10, 7, 1])
    with torch.no_grad():
        x = enc.proj(feats)  # full sets give the same projection as the masked path
        sims, idx, kept = enc.assign(x, lengths)
        assert kept.tolist() == [8, 5, 1]  # floor(0.8 n), at least 1
        for b in range(3):
            n, k = int(lengths[b]), int(kept[b])
            for v in range(6):
                chosen = idx[b, v, :k]
                assert (chosen < n).all()  # padding never chosen
                expect = sims[b, v, :n].topk(k).indices
                assert set(chosen.tolist()) == set(expect.tolist())
        views = enc(feats, lengths)
        assert views.shape == (3, 6, 32)
        torch.testing.assert_close(views.norm(dim=-1), torch.ones(3, 6))
        # one view by hand: GPO over the kept projected regions of image 1
        b, v = 1, 4
        padded = feats[b:b + 1].clone()
        manual = GPO.forward(enc.pool, enc.proj(feats[b:b + 1, :7])[:, idx[b, v, :5]], torch.tensor([5]))[0]
        torch.testing.assert_close(views[b, v], l2norm(manual)[0], rtol=1e-5, atol=1e-6)
        # padding content is irrelevant, and the region order too
        padded = feats.clone()
        padded[1, 7:] = 50.0
        padded[2, 1:] = -3.0
        torch.testing.assert_close(enc(padded, lengths), views, rtol=1e-5, atol=1e-6)
        perm = torch.randperm(10)
        torch.testing.assert_close(enc(feats[:1, perm], lengths[:1]), views[:1], rtol=1e-5, atol=1e-6)
    # the straight-through gate gives the tokens a gradient; the views differ between groups
    enc.train()
    out = enc(feats, torch.tensor([10, 10, 10]))
    (out * torch.randn_like(out)).sum().backward()
    assert enc.tokens.grad is not None and enc.tokens.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- L_reg, Sinkhorn
def test_view_regularizer_matches_formula():
    views = torch.randn(7, 3, 5)
    lam = 0.005
    total = 0.0
    for v in range(2):
        z1, z2 = views[:, v], views[:, v + 1]
        c = torch.empty(5, 5)
        for k in range(5):
            for m in range(5):
                c[k, m] = (z1[:, k] * z2[:, m]).sum() / (z1[:, k].norm() * z2[:, m].norm())
        off = sum(float(c[k, m]) ** 2 for k in range(5) for m in range(5) if k != m)
        total += sum((1 - float(c[k, k])) ** 2 for k in range(5)) + lam * off
    assert math.isclose(float(view_regularizer(views, lam, "paper")), total / 2, rel_tol=1e-5)
    # identical views: C_kk = 1, so only the off-diagonal term is left
    same = views[:, :1].expand(7, 2, 5)
    c = F.normalize(views[:, 0], dim=0).t() @ F.normalize(views[:, 0], dim=0)
    assert math.isclose(float(view_regularizer(same, lam)), lam * float((c ** 2).sum() - 5), rel_tol=1e-4)
    code = view_regularizer(views[:, :2], lam, "code")
    c = F.normalize(views[:, 0], dim=0).t() @ F.normalize(views[:, 1], dim=0) / 7
    expect = ((1 - c.diagonal()) ** 2).sum() + lam * ((c ** 2).sum() - (c.diagonal() ** 2).sum())
    assert math.isclose(float(code), float(expect), rel_tol=1e-5)
    assert float(view_regularizer(views[:, :1])) == 0.0
    with pytest.raises(ValueError, match="reg_form"):
        view_regularizer(views, lam, "other")


def test_sinkhorn_plan_marginals():
    scores = torch.randn(4, 12, 2)
    plan = log_sinkhorn(scores, torch.tensor(0.0), iters=100).exp()
    # each real text unit is fully transported (matched or to the dustbin): columns sum to <= 1
    assert (plan.sum(-2) <= 1 + 1e-4).all() and (plan >= 0).all()
    assert plan.sum(-2).min() > 0.05


# -------------------------------------------------------------------------------------- options, CLI
def test_options_are_validated():
    with pytest.raises(ValueError, match="multiple of meta_dim"):
        build_model("avse", {"embed_size": 100, "meta_dim": 32}, _info())
    with pytest.raises(ValueError, match="grid"):
        build_model("avse", {**SMALL, "features": "grids"}, _info())
    with pytest.raises(ValueError, match="unknown option"):
        build_model("avse", {"nope": 1}, _info())
    m = build_model("avse", {"embed_size": 1024}, _info())
    assert m.meta_dim == 512 and m.num_views == 6  # paper defaults (regions)
    g = build_model("avse", {"embed_size": 1024, "features": "grids"}, _info(grid=4))
    assert g.meta_dim == 256 and g.num_views == 2  # code defaults (grids)
    # unset meta_dim follows D (q = 2 / 4 text units); grid data gets RBS even with features="regions"
    assert build_model("avse", {"embed_size": 32}, _info()).meta_dim == 16
    g = build_model("avse", {"embed_size": 32}, _info(grid=4))
    assert g.meta_dim == 8 and g.grids and g.num_views == 2


@pytest.mark.parametrize("features", ["regions", "grids"])
def test_vse_train_avse_tiny(tmp_path, monkeypatch, features):
    from vse_models.train import main as train_main

    monkeypatch.setenv("VSE_DATA_CACHE", str(tmp_path / "cache"))
    data = ["n_train=40", "n_dev=10", "n_test=10", "n_regions=8", "feat_dim=16", "grid_size=4"]
    args = ["--model", "avse", "--epochs", "2", "--batch-size", "20", "--no-progress", "--out", str(tmp_path / "run"),
            "--features", features, "--option", "embed_size=32", "--option", "meta_dim=16", "--option",
            "word_dim=16", "--option", f"features={features}"]
    for kv in data:
        args += ["--synthetic", kv]
    assert train_main(args) == 0
    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert result["model"] == "avse" and result["features"] == features
    assert 0 <= result["test"]["rsum"] <= 600


@pytest.mark.parametrize("name", ["avse_f30k", "avse_coco", "avse_f30k_grid"])
def test_packaged_configs_resolve(name):
    from importlib import resources

    from vse_models.train import build_parser, resolve_config

    path = resources.files("vse_models").joinpath("configs", f"{name}.toml")
    cfg = resolve_config(build_parser().parse_args(["--config", str(path)]))
    assert cfg["model"] == "avse" and cfg["model_options"]["embed_size"] == 1024
    model = build_model("avse", cfg["model_options"], _info(grid=14, f=32) if "grid" in name else _info(f=32))
    assert (model.meta_dim, model.num_views) == ((256, 2) if "grid" in name else (512, 6))
