"""MH-CVSE (SPEC §3.3): concept graph on a hand-computed example, concept selection and labels, the
kernels and reference backends agreeing (embeddings, scores, loss, parameter gradients) for all three
fusion modes, the reference path importing no vse_kernels, dynamic loss weights, cosine schedule,
block similarity, checkpoint buffers, label completion, GloVe, the F30K config."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vse_models.cvse_parts import (AttentionPool, Fusion, InstancePool, SelfAttentionBlock, caption_labels,
                                   concept_adjacency, cooccurrence, loss_weights, select_concepts, slot_batch_norm,
                                   word_to_concept_map)
from vse_models.data import Vocabulary, pad_tokens
from vse_models.data.precomp import Batch
from vse_models.models import DataInfo, slice_embeddings
from vse_models.models.mhcvse import MHCVSE

REPO = Path(__file__).resolve().parents[1]

CAPTIONS = [  # 4 images x 3 captions
    "a red dog on the grass .", "the dog runs on grass", "a dog and a red ball",
    "a blue car near a tree", "the car is blue", "a tree and a car on the street",
    "a man with a red hat", "the man rides a horse", "a horse and a man on the grass",
    "a cat on a blue sofa", "the cat sleeps", "a small cat near the sofa",
]
SMALL = dict(embed_size=32, word_dim=16, num_concepts=12, gcn_hidden=24, num_heads=8)


def _split():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    return SimpleNamespace(vocab=vocab, tokens=[vocab.encode(c) for c in CAPTIONS], captions_per_image=3,
                           n_images=4, n_captions=len(CAPTIONS))


def _model(split, **options):
    info = DataInfo(vocab_size=len(split.vocab), feature_dim=20, set_size=6)
    m = MHCVSE(MHCVSE.resolve_options({**SMALL, **options}), info)
    m.prepare(split)
    return m


def _batch(split, caps, seed=0):
    g = torch.Generator().manual_seed(seed)
    caps = np.asarray(caps)
    tokens, lengths, mask = pad_tokens([split.tokens[c] for c in caps])
    img_ids = torch.from_numpy(caps // 3)
    return Batch(images=torch.randn(len(caps), 6, 20, generator=g).relu(),
                 image_lengths=torch.full((len(caps),), 6, dtype=torch.long), tokens=tokens, lengths=lengths,
                 padding_mask=mask, img_ids=img_ids, caption_ids=torch.from_numpy(caps))


# ------------------------------------------------------------------------------------------ graph
def test_concept_graph_hand_computed():
    # 10 captions: concept 0 in all, 1 in two, 2 and 3 in one each (always with 0).
    sets = [[0, 1], [0, 1], [0, 2], [0, 3]] + [[0]] * 6
    cooc, counts = cooccurrence(sets, 4)
    np.testing.assert_array_equal(counts, [10, 2, 1, 1])
    np.testing.assert_array_equal(cooc, [[0, 2, 1, 1], [2, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]])
    # P: row 0 = (0, .2, .1, .1); rows 1..3 have P[i, 0] = 1. R = 5^(P-.02) - 5^-.02: P=.2 -> .368 (kept,
    # >= .3), P=.1 -> .169 (dropped), P=1 -> kept. Binary: B01 = B10 = B20 = B30 = 1. Column sums
    # (3, 1, 0, 0) -> R10 = R20 = R30 = .25/3, R01 = .25; A = R + I; row sums d = (1.25, 13/12, 13/12, 13/12).
    a = np.array([[1, .25, 0, 0], [1 / 12, 1, 0, 0], [1 / 12, 0, 1, 0], [1 / 12, 0, 0, 1]])
    d = np.array([1.25, 13 / 12, 13 / 12, 13 / 12])
    expected = a.T / np.sqrt(d[:, None] * d[None, :])       # Â_ij = A_ji / sqrt(d_i d_j)
    assert expected[0, 0] == pytest.approx(0.8) and expected[1, 1] == pytest.approx(12 / 13)
    assert expected[1, 0] == pytest.approx(0.25 / math.sqrt(1.25 * 13 / 12))
    np.testing.assert_allclose(concept_adjacency(cooc, counts).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_unseen_concepts_keep_only_their_self_loop():
    adj = concept_adjacency(*cooccurrence([[0, 1]], 3)).numpy()
    assert adj[2, 2] == pytest.approx(1.0) and adj[2, :2].sum() == 0 and adj[:2, 2].sum() == 0
    assert np.isfinite(adj).all()


def test_a_concept_that_never_occurs_keeps_the_graph_and_the_model_finite():
    # counts 0 (P = C / count would be 0/0, NaN in CVSE's gen_A_concept): only the self-loop, no NaN,
    # whatever the counts' dtype (integer counts from a user's own co-occurrence file)
    cooc, counts = cooccurrence([[0, 1], [1], [0, 1]], 4)
    assert counts.tolist() == [2, 3, 0, 0]
    for c, n in ((cooc, counts), (cooc.astype(np.int64), counts.astype(np.int64))):
        adj = concept_adjacency(c, n).numpy()
        assert np.isfinite(adj).all() and adj[2, 2] == pytest.approx(1) and adj[3, 3] == pytest.approx(1)
        assert adj[2].sum() == pytest.approx(1) and adj[:, 3].sum() == pytest.approx(1)
    # q = 40 > the 17 content words of the captions: 23 concepts never occur in training
    split = _split()
    for backend in ("kernels", "reference"):
        m = _model(split, backend=backend, num_concepts=40)
        assert len(m.concept_words) < 40 and torch.isfinite(m.adjacency).all()
        assert torch.isfinite(m.concept_embeddings()).all()
        m.train()
        loss, _ = m.loss(_batch(split, [0, 3, 6, 9]), 1)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        m.eval()
        with torch.no_grad():
            img, txt = m.encode_images(_batch(split, [0, 3])), m.encode_texts(_batch(split, [0, 1, 2]))
            assert all(torch.isfinite(x).all() for x in (*img, *txt)) and torch.isfinite(m.similarity(img, txt)).all()


def test_concepts_labels_and_prepare_are_deterministic():
    split = _split()
    v = split.vocab
    concepts = select_concepts(split.tokens, v.idx2word, 5)
    words = [v.idx2word[i] for i in concepts]
    # blue, car, cat, dog, grass, man, red all occur 3 times: ties alphabetical; stop words and "." never
    assert words == ["blue", "car", "cat", "dog", "grass"]
    w2c = word_to_concept_map(concepts, len(v))
    tokens, _, _ = pad_tokens([split.tokens[0], split.tokens[3]])  # "a red dog on the grass ." / "a blue car near a tree"
    labels = caption_labels(tokens, w2c, 5)
    assert labels.tolist() == [[0, 0, 0, 1, 1], [1, 1, 0, 0, 0]]

    m1, m2 = _model(split), _model(split)
    assert torch.equal(m1.word_to_concept, m2.word_to_concept) and torch.equal(m1.adjacency, m2.adjacency)
    # image labels = union of its captions' concepts (q = 12: the 10 words seen >= 2 times, then "ball",
    # "hat" of the words seen once; "runs" is not a concept)
    img0 = m1.train_image_labels[0].nonzero().flatten().tolist()
    assert sorted(m1.concept_words[i] for i in img0) == ["ball", "dog", "grass", "red"]
    # training: y = the image's labels; evaluation: the caption's own concepts
    b = _batch(split, [1])
    m1.train()
    assert m1.text_labels(b)[0].nonzero().flatten().tolist() == img0
    m1.eval()
    own = sorted(m1.concept_words[i] for i in m1.text_labels(b)[0].nonzero().flatten().tolist())
    assert own == ["dog", "grass"]
    # train_text_labels="caption": the caption's own concepts in training too
    m1.options["train_text_labels"] = "caption"
    m1.train()
    assert sorted(m1.concept_words[i] for i in m1.text_labels(b)[0].nonzero().flatten().tolist()) == own


def test_concept_data_is_cached_beside_the_data(tmp_path, monkeypatch):
    import vse_models.cvse_parts as parts

    split = _split()
    args = (split.tokens, split.vocab.idx2word, 6, 3, 4)
    first = parts.concept_data(*args, cache_dir=tmp_path)
    files = list(tmp_path.glob("cvse-concepts-*.pt"))
    assert len(files) == 1 and not list(tmp_path.glob(".*tmp*"))

    def fail(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(parts, "build_concept_data", fail)
    again = parts.concept_data(*args, cache_dir=tmp_path)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)
    monkeypatch.undo()
    fresh = parts.build_concept_data(*args)
    assert all(torch.equal(fresh[k], first[k]) for k in first)
    # another q or another caption set is another file, never the stale one
    parts.concept_data(split.tokens, split.vocab.idx2word, 5, 3, 4, cache_dir=tmp_path)
    parts.concept_data(split.tokens[:-1] + [split.tokens[-1][:-1]], split.vocab.idx2word, 6, 3, 4, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("cvse-concepts-*.pt"))) == 3


# ---------------------------------------------------------------------------------- backends agree
def _pair(split, dtype=torch.float32, **options):
    torch.manual_seed(0)
    ker = _model(split, backend="kernels", **options).to(dtype)
    ref = _model(split, backend="reference", **options).to(dtype)
    with torch.no_grad():  # ReZero's γ starts at 0, which would hide the attention from the comparison
        for name, p in ker.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    ref.load_state_dict(ker.state_dict())
    return ker, ref


def _close(a, b, what):
    # float64: the two backends differ only in summation order (fp32 gradients reach ~50 through the
    # softmax(10·) consensus and differ by ~1e-5 relative, so the gradient comparison runs in float64)
    tol = 1e-9 if a.dtype == torch.float64 else 1e-5
    torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol, msg=lambda m: f"{what}: {m}")


# CVSE's instance level, and the ablation options of ours (dropped regions are padding: masked attention keys,
# kept out of region_mlp's BatchNorm), the self-attention's residual forms and sides
INSTANCE_OPTIONS = [{}, {"region_drop": 0.3}, {"pooling": "gpo"}, {"self_attention": False, "pool_dropout": 0.0},
                    {"region_drop": 0.3, "region_mlp": True, "pooling": "gpo"},
                    {"attention_residual": "pre_norm", "self_attention": "image"},
                    {"attention_residual": "rezero", "self_attention": "text", "kl_reduction": "batchmean"}]


@pytest.mark.parametrize("fusion", Fusion.MODES)
@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("instance", INSTANCE_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "cvse")
def test_kernels_and_reference_agree(fusion, dynamic, instance):
    split = _split()
    ker, ref = _pair(split, torch.float64, fusion=fusion, dynamic_loss_weights=dynamic, **instance)
    batch = _batch(split, [0, 1, 3, 5, 6, 8, 9, 11])  # two captions per image: same-image rows masked
    batch.images = batch.images.double()
    for epoch in (0, 1):   # all negatives, then hardest (warmup_epochs = 1)
        ker.options["warmup_epochs"] = ref.options["warmup_epochs"] = 1
        losses, logs = [], []
        for m in (ker, ref):
            m.train()
            m.zero_grad()
            torch.manual_seed(1)   # same dropout masks and dropped regions
            loss, log = m.loss(batch, epoch)
            loss.backward()
            losses.append(loss)
            logs.append(log)
        _close(losses[0], losses[1], f"loss epoch {epoch}")
        for k in logs[0]:
            assert logs[0][k] == pytest.approx(logs[1][k], rel=1e-4, abs=1e-5), k
        for (name, p), (_, q) in zip(ker.named_parameters(), ref.named_parameters()):
            assert p.grad is not None, name
            _close(p.grad, q.grad, f"grad {name}")
    # evaluation embeddings and scores (BatchNorm running statistics moved identically)
    ker.eval()
    ref.eval()
    with torch.no_grad():
        ei, et = ker.encode_images(batch), ker.encode_texts(batch)
        ri, rt = ref.encode_images(batch), ref.encode_texts(batch)
        for i, (a, b) in enumerate(zip(ei + et, ri + rt)):
            _close(a, b, f"embedding {i}")
        _close(ker.similarity(ei, et), ref.similarity(ri, rt), "scores")


def test_reference_has_no_nan_on_shortest_caption_and_empty_caption_is_rejected():
    split = _split()
    ker, ref = _pair(split)
    batch = _batch(split, [0, 4])
    batch.tokens[1, 1:] = 0          # a one-token caption: its attention row keeps one key
    batch.lengths[1] = 1
    batch.padding_mask = batch.tokens == 0
    for m in (ker, ref):
        m.eval()
    with torch.no_grad():
        a, b = ker.encode_texts(batch), ref.encode_texts(batch)
    assert all(torch.isfinite(x).all() for x in b)
    _close(a[2], b[2], "fused text embedding")
    batch.lengths[1] = 0
    with pytest.raises(ValueError, match="at least one token"):
        ref.encode_texts(batch)


def test_reference_path_imports_no_vse_kernels():
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / 'tests')!r})
        import torch
        from test_mhcvse import _split, _model, _batch
        split = _split()
        m = _model(split, backend="reference")
        loss, _ = m.loss(_batch(split, [0, 3, 6, 9]), 1)
        loss.backward()
        m.eval()
        m.similarity(m.encode_images(_batch(split, [0])), m.encode_texts(_batch(split, [0, 1])))
        assert "vse_kernels" not in sys.modules, sorted(k for k in sys.modules if "vse_kernels" in k)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


# --------------------------------------------------------------------------- CVSE's attention pooling
def _cvse_visual_pool(pool, v, training, p=0.4):
    """CVSE's V_single_modal_atten (model_CVSE.py, use_BatchNorm=True, tanh), re-written in plain torch as an
    oracle on the same weights: v (B, 36, D) L2-normalised regions, guided by their (unnormalised) mean
    (EncoderImagePrecomp's features_mean); embedding_1 = fc1 -> BatchNorm1d(36) -> Tanh -> Dropout,
    embedding_2 = fc2 -> BatchNorm1d(D) -> Tanh -> Dropout, fc3, Softmax(dim=1), l2norm of the weighted sum.
    The BatchNorms run on copies of the pool's running statistics (returned for comparison)."""
    stats = [t.clone() for t in (pool.bn1.running_mean, pool.bn1.running_var, pool.bn2.running_mean,
                                 pool.bn2.running_var)]
    w_v = F.dropout(torch.tanh(F.batch_norm(pool.fc1(v), stats[0], stats[1], pool.bn1.weight, pool.bn1.bias,
                                            training)), p, training)
    w_m = F.dropout(torch.tanh(F.batch_norm(pool.fc2(v.mean(1)), stats[2], stats[3], pool.bn2.weight, pool.bn2.bias,
                                            training)), p, training)
    weights = torch.softmax(pool.fc3(w_v * w_m[:, None]).squeeze(2), dim=1)
    return F.normalize((weights[..., None] * v).sum(1), dim=-1), stats


def _cvse_textual_pool(pool, u, training, p=0.4):
    """CVSE's T_single_modal_atten (no BatchNorm whatever use_BatchNorm says): u (B, L, D) L2-normalised
    words, zero past each length, guided by EncoderText's l2norm(torch.mean(cap_emb, 1)) (the padding
    counted in the mean, the softmax over every position: no mask)."""
    w_u = F.dropout(torch.tanh(pool.fc1(u)), p, training)
    w_m = F.dropout(torch.tanh(pool.fc2(F.normalize(u.mean(1), dim=-1))), p, training)
    weights = torch.softmax(pool.fc3(w_u * w_m[:, None]).squeeze(2), dim=1)
    return F.normalize((weights[..., None] * u).sum(1), dim=-1)


@pytest.mark.parametrize("training", [True, False])
def test_attention_pooling_equals_cvses(training):
    torch.manual_seed(0)
    b, k, d = 16, 36, 24
    img, txt = InstancePool("attention", d, "image", k), InstancePool("attention", d, "text")
    assert isinstance(img.pool.bn1, torch.nn.BatchNorm1d) and img.pool.bn1.num_features == 36  # over region slots
    assert img.pool.bn2.num_features == d and txt.pool.bn1 is None and txt.pool.bn2 is None
    assert img.pool.dropout.p == 0.4 and (img.pool.fc1.out_features, img.pool.fc3.out_features) == (d, 1)
    with torch.no_grad():  # BatchNorm affine parameters away from (1, 0), running statistics away from (0, 1)
        for bn in (img.pool.bn1, img.pool.bn2):
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
            bn.running_mean.uniform_(-0.1, 0.1), bn.running_var.uniform_(0.5, 2)
    img.train(training), txt.train(training)
    regions = torch.randn(b, k, d)
    v = F.normalize(regions, dim=-1)
    torch.manual_seed(5)
    expect, stats = _cvse_visual_pool(img.pool, v, training)
    torch.manual_seed(5)   # the same dropout masks: the same draws in the same order
    got = img(regions, torch.full((b,), k), None)
    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip((img.pool.bn1.running_mean, img.pool.bn1.running_var, img.pool.bn2.running_mean,
                             img.pool.bn2.running_var), stats):
        torch.testing.assert_close(ours, theirs)
    # words: zero padding past each length; CVSE's unmasked mean and softmax give the masked result
    lengths = torch.tensor([7, 3, 1, 5] * 4)
    pad = torch.arange(7)[None] >= lengths[:, None]
    words = torch.randn(b, 7, d).masked_fill(pad[..., None], 0)
    torch.manual_seed(6)
    expect = _cvse_textual_pool(txt.pool, F.normalize(words, dim=-1), training)
    torch.manual_seed(6)
    torch.testing.assert_close(txt(words, lengths, pad), expect, rtol=1e-5, atol=1e-6)
    # masked: the padding's content never matters (after self-attention it is not zero)
    if not training:
        noisy = words + pad[..., None] * torch.randn_like(words)
        torch.testing.assert_close(txt(noisy, lengths, pad), expect, rtol=1e-5, atol=1e-6)


def test_slot_batch_norm_masks_padding_and_needs_the_set_size():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm1d(5).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    bn = bn.double()
    full = torch.nn.BatchNorm1d(5).double().train()
    full.load_state_dict(bn.state_dict())
    torch.testing.assert_close(slot_batch_norm(bn, x, torch.ones(6, 5, dtype=torch.bool)), full(x))  # CVSE's
    lengths = torch.tensor([5, 3, 2, 5, 1, 3])
    valid = torch.arange(5)[None] < lengths[:, None]
    valid_before = bn.running_mean.clone(), bn.running_var.clone()
    out = slot_batch_norm(bn, x, valid)
    for k in range(5):
        vals = x[valid[:, k], k]                         # (n_k, 3): the slot's valid entries only
        mean, var = vals.mean(), vals.var(unbiased=False)
        expect = (x[valid[:, k], k] - mean) / torch.sqrt(var + bn.eps) * bn.weight[k] + bn.bias[k]
        torch.testing.assert_close(out[valid[:, k], k], expect)
        torch.testing.assert_close(bn.running_mean[k], 0.9 * valid_before[0][k] + 0.1 * mean)
        torch.testing.assert_close(bn.running_var[k], 0.9 * valid_before[1][k] + 0.1 * vals.var(unbiased=True))
    # a slot that is padding in the whole batch keeps its running statistics
    before = bn.running_mean.clone()
    slot_batch_norm(bn, x, torch.arange(5)[None].expand(6, 5) < 4)
    assert bn.running_mean[4] == before[4] and bn.running_mean[0] != before[0]
    with pytest.raises(ValueError, match="5 set slots"):
        slot_batch_norm(bn, x[:, :4], None)


def _slot_bn_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, 3, generator=g)
    valid = torch.ones(8, 5, dtype=torch.bool)
    valid[4:] = torch.arange(5)[None] < torch.tensor([3, 5, 1, 2])[:, None]  # padding in the second half only
    bn = torch.nn.BatchNorm1d(5).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g), bn.bias.uniform_(-1, 1, generator=g)
    return x, valid, bn, torch.randn(8, 5, 3, generator=g)


def _slot_bn_worker(rank, world_size, port, result_path):
    from vse_models import distributed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    ctx = distributed.setup(torch.device("cpu"))
    try:
        x, valid, bn, w = _slot_bn_case()
        distributed.convert_batchnorm(wrapper := torch.nn.Sequential(bn))
        bn = wrapper[0]
        half = slice(4 * rank, 4 * rank + 4)    # rank 0: no padding (GlobalBatchNorm1d itself), rank 1: the masked path
        xs = x[half].clone().requires_grad_()
        out = slot_batch_norm(bn, xs, valid[half])
        (out * w[half]).sum().backward()
        torch.save({"out": out.detach(), "x_grad": xs.grad, "w_grad": bn.weight.grad, "mean": bn.running_mean,
                    "var": bn.running_var}, f"{result_path}.{rank}")
    finally:
        distributed.teardown(ctx)


def test_slot_batch_norm_under_torchrun_equals_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    x, valid, bn, w = _slot_bn_case()
    xs = x.clone().requires_grad_()
    out = slot_batch_norm(bn, xs, valid)
    (out * w).sum().backward()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_slot_bn_worker, args=(2, port, str(tmp_path / "r")), nprocs=2)
    parts = [torch.load(tmp_path / f"r.{r}") for r in range(2)]
    torch.testing.assert_close(torch.cat([p["out"] for p in parts]), out.detach())
    torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]), xs.grad)
    torch.testing.assert_close(parts[0]["w_grad"] + parts[1]["w_grad"], bn.weight.grad)   # each rank's share
    for p in parts:
        torch.testing.assert_close(p["mean"], bn.running_mean)
    # rank 1 (the masked path) also keeps the running variance; rank 0's GlobalBatchNorm1d applies slot 0's
    # count to every slot's unbiased factor n / (n - 1) (its own inputs have equal counts), a ~1% difference
    torch.testing.assert_close(parts[1]["var"], bn.running_var)
    torch.testing.assert_close(parts[0]["var"], bn.running_var, rtol=0.02, atol=0)


def test_mh_cvse_pooling_defaults_follow_cvse():
    split = _split()
    m = _model(split)   # set_size 6 here: BatchNorm1d(6) over the region slots (36 on BUTD features)
    assert m.img_pool.pool.bn1.num_features == 6 and m.txt_pool.pool.bn1 is None
    assert m.img_pool.pool.dropout.p == m.txt_pool.pool.dropout.p == 0.4   # text_dropout's, CVSE's dropout_rate
    assert _model(split, text_dropout=0.1).img_pool.pool.dropout.p == 0.1
    assert _model(split, pool_dropout=0.0).txt_pool.pool.dropout.p == 0.0
    with pytest.raises(ValueError, match="side must be"):
        AttentionPool(8, 8, "audio", 6)
    with pytest.raises(ValueError, match="set size"):
        AttentionPool(8, 8, "image")


# ----------------------------------------------------------------------------------- loss, scores
def test_dynamic_loss_weights_hand_computed():
    losses = torch.tensor([1.0, 3.0], requires_grad=True)
    base = torch.tensor([2.0, 1.0])
    w = loss_weights(losses, base, dynamic=True)    # base * K * L / sum L = (2*2*1/4, 1*2*3/4)
    torch.testing.assert_close(w, torch.tensor([1.0, 1.5]))
    assert not w.requires_grad
    assert torch.equal(loss_weights(losses, base, dynamic=False), base)


def test_fixed_weights_loss_is_the_cvse_sum():
    split = _split()
    m = _model(split, dynamic_loss_weights=False, backend="reference")
    m.train()
    torch.manual_seed(0)
    loss, logs = m.loss(_batch(split, [0, 3, 6, 9]), 1)
    expected = 3 * logs["rank_fused"] + 5 * logs["rank_instance"] + logs["rank_consensus"] + 2 * logs["kl"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs["kl"] > 0


def test_similarity_is_weighted_and_works_on_blocks():
    split = _split()
    m = _model(split, backend="reference")
    m.eval()
    with torch.no_grad():
        img, txt = m.encode_images(_batch(split, [0, 3, 6, 9])), m.encode_texts(_batch(split, list(range(12))))
        full = m.similarity(img, txt)
        torch.testing.assert_close(full, 0.95 * img[2] @ txt[2].t() + 0.05 * img[1] @ txt[1].t())
        torch.testing.assert_close(m.similarity(slice_embeddings(img, 1, 3), slice_embeddings(txt, 2, 7)),
                                   full[1:3, 2:7])
    for x in img[:3] + txt[:3]:    # instance, consensus and fused embeddings are unit vectors
        torch.testing.assert_close(x.norm(dim=1), torch.ones(len(x)))


def test_learned_fusion_modes_start_as_weight_sum():
    torch.manual_seed(0)
    x_inst, x_cons = F.normalize(torch.randn(5, 16), dim=1), F.normalize(torch.randn(5, 16), dim=1)
    fused = [Fusion(mode, 16, 0.7)(x_inst, x_cons) for mode in Fusion.MODES]
    expected = F.normalize(0.7 * x_inst + 0.3 * x_cons, dim=1)
    for mode, x in zip(Fusion.MODES, fused):
        torch.testing.assert_close(x, expected, msg=lambda m: f"{mode}: {m}")
    for mode, alpha in (("weight_sum", 1.5), ("adap_sum", 1.0), ("concat", -0.1)):
        with pytest.raises(ValueError, match="fusion_alpha must be in"):
            Fusion(mode, 16, alpha)


def test_each_fusion_mode_learns():
    split = _split()
    batch = _batch(split, [0, 3, 6, 9])
    for fusion in Fusion.MODES:
        torch.manual_seed(0)
        m = _model(split, fusion=fusion, backend="reference", text_dropout=0.0)
        opt = torch.optim.Adam(m.parameters(), 1e-2)
        first = None
        for _ in range(8):
            loss, _ = m.loss(batch, 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = loss.item() if first is None else first
        assert loss.item() < first, fusion
    with pytest.raises(ValueError, match="fusion"):
        _model(split, fusion="sum")
    with pytest.raises(ValueError, match="pooling .*must be one of"):
        _model(split, pooling="max")
    for option, value in (("train_text_labels", "both"), ("kl_reduction", "mean"), ("lr_schedule", "linear"),
                          ("attention_residual", "sandwich"), ("self_attention", "both"),
                          ("pool_dropout", "0.4")):
        with pytest.raises(ValueError, match=f"{option}( of model 'mh-cvse')? must be"):
            _model(split, **{option: value})


def test_self_attention_residual_forms_and_sides():
    torch.manual_seed(0)
    x, pad = torch.randn(3, 5, 16), torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] + [True] * 4])
    blocks = {r: SelfAttentionBlock(16, 4, "reference", r) for r in SelfAttentionBlock.RESIDUALS}
    post, pre, rezero = (blocks[r] for r in ("post_norm", "pre_norm", "rezero"))
    attend = lambda b, y: b.attn(y, y, y, key_padding_mask=pad, need_weights=False)[0]
    torch.testing.assert_close(post(x, pad), post.norm(x + attend(post, x)))
    torch.testing.assert_close(pre(x, pad), x + attend(pre, pre.norm(x)))
    assert torch.equal(rezero(x, pad), x)                  # ReZero starts as the identity ...
    rezero(x, pad).pow(2).sum().backward()
    assert rezero.gamma.grad.abs().sum() > 0                # ... and learns how much attention to let in
    split = _split()
    for sides, (img, txt) in ((True, (True, True)), ("image", (True, False)), ("text", (False, True)),
                              (False, (False, False))):
        m = _model(split, self_attention=sides)
        assert (m.img_attn is not None, m.txt_attn is not None) == (img, txt), sides


def test_cosine_schedule_and_step_option():
    split = _split()
    m = _model(split, eta_min=1e-5)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    sched = m.make_scheduler(opt, {"epochs": 4, "lr_milestones": [2], "lr_gamma": 0.1}, 10)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]
    assert lrs == pytest.approx(expected)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)
    m2 = _model(split, lr_schedule="step")
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-3)
    assert isinstance(m2.make_scheduler(opt2, {"lr_milestones": [2], "lr_gamma": 0.1}, 10),
                      torch.optim.lr_scheduler.MultiStepLR)


# -------------------------------------------------------------------------- checkpoint, options
def test_concept_state_is_saved_and_evaluation_needs_no_training_data():
    split = _split()
    m = _model(split, backend="reference")
    state = m.state_dict()
    assert "word_to_concept" in state and "adjacency" in state and "train_image_labels" not in state
    fresh = MHCVSE(m.options, m.info)          # never prepared
    fresh.load_state_dict(state)
    for x in (m, fresh):
        x.eval()
    batch = _batch(split, [2, 7])
    with torch.no_grad():
        for a, b in zip(m.encode_texts(batch), fresh.encode_texts(batch)):
            torch.testing.assert_close(a, b)


def test_label_completion_ors_nearest_captions_labels():
    split = _split()
    m = _model(split, backend="reference", label_completion_k=1)
    m.eval()
    t_inst = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0]])
    t_inst = torch.nn.functional.pad(t_inst / t_inst.norm(dim=1, keepdim=True), (0, 30))
    q = m.options["num_concepts"]
    labels = torch.zeros(3, q)
    labels[0, 0] = labels[1, 1] = labels[2, 2] = 1
    p_t = torch.full((3, q), 1.0 / q)
    emb = m._text_from_instance(t_inst, p_t, labels, m.concept_embeddings())
    done = m.complete_text_labels(emb)
    # nearest of 0 is 1 and vice versa; nearest of 2 is 1
    assert done[5][:, :3].tolist() == [[1, 1, 0], [1, 1, 0], [0, 1, 1]]
    assert not torch.allclose(done[1], emb[1]) and torch.equal(done[0], emb[0])
    assert m.complete_text_labels(emb, k=0) is emb


def test_glove_file_sets_word_and_concept_vectors(tmp_path):
    split = _split()
    lines = [f"dog {' '.join(['0.5'] * 16)}", f"cat {' '.join(['-0.25'] * 16)}", "zebra " + " ".join(["1"] * 16)]
    (tmp_path / "glove.txt").write_text("\n".join(lines) + "\n")
    m = _model(split, glove_path=str(tmp_path / "glove.txt"))
    v = split.vocab
    assert torch.equal(m.txt_enc.embed.weight[v.word2idx["dog"]], torch.full((16,), 0.5))
    assert torch.equal(m.concept_emb[m.concept_words.index("cat")], torch.full((16,), -0.25))
    (tmp_path / "bad.txt").write_text("dog 1 2 3\n")
    with pytest.raises(ValueError, match="expected 16 values"):
        _model(split, glove_path=str(tmp_path / "bad.txt"))
    with pytest.raises(FileNotFoundError):
        _model(split, glove_path=str(tmp_path / "missing.txt"))


def test_f30k_config_resolves_with_the_papers_recipe():
    from vse_models.train import build_parser, resolve_config

    cfg = resolve_config(build_parser().parse_args(
        ["--config", str(REPO / "src/vse_models/configs/mhcvse_f30k.toml"), "--data", "data/f30k_precomp"]))
    assert (cfg["model"], cfg["optimizer"], cfg["lr"], cfg["batch_size"], cfg["epochs"]) == ("mh-cvse", "adam", 2e-4, 128, 50)
    o = MHCVSE.resolve_options(cfg["model_options"])
    assert (o["embed_size"], o["num_concepts"], o["num_heads"], o["lr_schedule"]) == (1024, 300, 8, "cosine")


# (cvse, mh-cvse) of the additions the presets switch; the parameterised fusion stays at CVSE's weight_sum in
# both (its other modes are options, measured one at a time).
MH_CVSE_ADDITIONS = {"self_attention": (False, True), "dynamic_loss_weights": (False, True),
                     "lr_schedule": ("step", "cosine")}


def test_cvse_is_mh_cvse_without_its_additions_and_the_presets_differ_only_there():
    from vse_models.models import get_model_class
    from vse_models.train import build_parser, resolve_config

    cvse = get_model_class("cvse")
    assert issubclass(cvse, MHCVSE)
    differs = {k for k in MHCVSE.default_options if cvse.default_options[k] != MHCVSE.default_options[k]}
    assert differs == {"self_attention", "dynamic_loss_weights", "lr_schedule"}   # fusion: weight_sum in both
    resolved = {}
    for name in ("cvse", "mh-cvse"):
        cfg = resolve_config(build_parser().parse_args(["--model", name]))
        resolved[name] = (cfg, get_model_class(name).resolve_options(cfg["model_options"]))
    (c_cfg, c_opt), (m_cfg, m_opt) = resolved["cvse"], resolved["mh-cvse"]
    assert {k for k in c_opt if c_opt[k] != m_opt[k]} == {"self_attention", "attention_residual",
                                                         "dynamic_loss_weights", "lr_schedule"}
    for key, (off, on) in MH_CVSE_ADDITIONS.items():
        assert (c_opt[key], m_opt[key]) == (off, on)
    assert c_opt["fusion"] == m_opt["fusion"] == "weight_sum"
    run_keys = (set(c_cfg) | set(m_cfg)) - {"model", "model_options", "out"}
    assert {k for k in run_keys if c_cfg.get(k, "missing") != m_cfg.get(k, "missing")} == set()


def test_evaluation_applies_the_label_completion_option():
    from vse_models.evaluation import encode_split, evaluate_split, metrics_from_ranks, ranks

    split = _split()
    m = _model(split, backend="reference")
    g = torch.Generator().manual_seed(0)
    images = torch.randn(10, 6, 20, generator=g).relu()

    class EvalSplit:  # the two Split methods evaluation uses; 10 images (5 folds of 2), 3 captions each
        captions_per_image, n_images, n_captions, split = 3, 10, 30, "test"

        def image_batch(self, idx):
            idx = torch.as_tensor(idx)
            return Batch(images=images[idx], image_lengths=torch.full((len(idx),), 6), img_ids=idx)

        def caption_batch(self, idx):
            return _batch(split, [i % len(split.tokens) for i in idx])

    plain = evaluate_split(m, EvalSplit(), batch_size=4)
    img, txt = encode_split(m, EvalSplit(), batch_size=4)
    m.options["label_completion_k"] = 2
    completed = m.complete_text_labels(txt)
    assert not torch.equal(completed[1], txt[1])  # the captions' consensus embeddings changed
    assert evaluate_split(m, EvalSplit(), batch_size=4) == metrics_from_ranks(*ranks(m.similarity(img, completed), 3))
    # the 5-fold protocol completes each fold's captions among themselves
    per_fold = [metrics_from_ranks(*ranks(m.similarity(slice_embeddings(img, 2 * f, 2 * f + 2),
                                                       m.complete_text_labels(slice_embeddings(txt, 6 * f, 6 * f + 6))), 3))
                for f in range(5)]
    folds = evaluate_split(m, EvalSplit(), batch_size=4, fold5=True)["fold5"]
    # evaluation rounds its metrics to 4 decimals, the fold means too
    assert folds == pytest.approx({key: round(float(np.mean([p[key] for p in per_fold])), 4) for key in folds})
    m.options["label_completion_k"] = 0
    assert evaluate_split(m, EvalSplit(), batch_size=4) == plain


def test_mean_average_precision_by_hand():
    from vse_models.probe_consensus import mean_average_precision

    scores = torch.tensor([[0.9, 0.1, 0.5], [0.9, 0.1, 0.5], [0.3, 0.2, 0.1]])
    labels = torch.tensor([[1, 0, 1], [0, 1, 1], [0, 0, 0]])
    # row 0: hits at ranks 1, 2 -> AP 1; row 1: hits at ranks 2, 3 -> (1/2 + 2/3) / 2; row 2: no positive, skipped
    assert math.isclose(mean_average_precision(scores, labels), (1 + (0.5 + 2 / 3) / 2) / 2, rel_tol=1e-6)


def test_consensus_probe_of_a_tiny_run(tmp_path, monkeypatch, capsys):
    from vse_models.probe_consensus import main as probe_main, probe
    from vse_models.train import main as train_main

    monkeypatch.setenv("VSE_DATA_CACHE", str(tmp_path / "cache"))
    tiny = ["--synthetic", "n_train=40", "--synthetic", "n_dev=10", "--synthetic", "n_test=10", "--synthetic",
            "n_regions=8", "--synthetic", "feat_dim=16", "--batch-size", "20", "--epochs", "1", "--no-progress",
            "--option", "embed_size=32", "--option", "word_dim=16"]
    concepts = ["--option", "gcn_hidden=16", "--option", "num_concepts=20"]
    assert train_main(["--model", "mh-cvse", "--out", str(tmp_path / "mh"), *tiny, *concepts]) == 0
    assert len(list((tmp_path / "cache").glob("synthetic-*/cvse-concepts-*.pt"))) == 1  # the graph, beside the data
    out = probe(str(tmp_path / "mh"), "dev")
    dev_rsum = json.loads((tmp_path / "mh" / "metrics.json").read_text())["dev"]["rsum"]
    assert out["rsum"]["model (fused)"] == round(dev_rsum, 1)     # the score the run itself evaluated
    assert 0 <= out["image_concepts_map"] <= 1 and 0 <= out["linear_probe_map"] <= 1 and -1 <= out["concept_cos_trained"] <= 1
    assert out["graph_self_weight"] > 0
    assert probe_main([str(tmp_path / "mh")]) == 0 and "bag-of-concepts oracle" in capsys.readouterr().out
    assert train_main(["--model", "vse", "--out", str(tmp_path / "vse"), *tiny]) == 0
    with pytest.raises(ValueError, match="an mh-cvse or cvse run is needed"):
        probe(str(tmp_path / "vse"))
