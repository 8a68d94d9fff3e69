"""vse_kernels.hinge_triplet_loss (C++/CUDA op) against its plain-PyTorch reference."""

import json
import os
import subprocess
import sys

import pytest
import torch

import vse_kernels as vk
from vse_kernels.ops.hinge_loss import hinge_triplet_loss_reference as reference
from utils import DEVICES, INF, NAN, assert_close, assert_matches_reference, assert_matches_reference_with_nan

OP_FWD = torch.ops.vse_kernels.hinge_triplet_loss_fwd.default
OP_BWD = torch.ops.vse_kernels.hinge_triplet_loss_bwd.default


def repeated_ids(batch, device="cpu"):
    """Captions of the same image side by side (5 per image, like the data loader gives)."""
    return torch.arange(batch, device=device) // 5


def loss_fn(**options):
    return lambda s: vk.hinge_triplet_loss(s, **options)


def reference_fn(**options):
    return lambda s: reference(s, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 2, 7, 33, 128, 301])
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("same_image", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_reference(device, batch, max_violation, same_image, reduction):
    scores = torch.randn(batch, batch, device=device, requires_grad=True)
    options = dict(margin=0.2, max_violation=max_violation, reduction=reduction,
                   img_ids=repeated_ids(batch, device) if same_image else None)
    assert_matches_reference(loss_fn(**options), reference_fn(**options), [scores])


def scattered(batch, count, seed=1):
    """(i, j, value) for `count` random positions of a batch x batch matrix, NaN, +inf and -inf in turn."""
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, batch, (count, 2), generator=generator).tolist()
    return [(i, j, (NAN, INF, -INF)[n % 3]) for n, (i, j) in enumerate(positions)]


# (batch, [(i, j, value)]) written into random scores. With img_ids = arange(B) // 2, (0, 1) and (4, 5) are
# the same image (masked: the reference never reads them), (0, 3) is a negative either way.
NON_FINITE_SCORES = {
    "nan-negative": (6, [(0, 3, NAN)]),
    "nan-same-image": (6, [(0, 1, NAN), (5, 4, NAN)]),
    "nan-diagonal": (6, [(2, 2, NAN)]),
    "nans-in-a-row-and-column": (6, [(4, 3, NAN), (4, 0, NAN), (1, 0, NAN)]),  # the lowest NaN index wins
    "all-nan": (6, [(i, j, NAN) for i in range(6) for j in range(6)]),
    "nan-beats-inf": (6, [(1, 4, INF), (1, 5, NAN)]),
    "+inf-negative": (6, [(0, 3, INF), (2, 3, INF)]),  # equal infinite costs: the lowest index wins
    "-inf-negative": (6, [(0, 3, -INF)]),
    "+inf-diagonal": (6, [(2, 2, INF)]),
    "-inf-diagonal": (6, [(2, 2, -INF)]),
    "inf-minus-inf": (6, [(2, 2, INF), (2, 4, INF)]),  # (margin + inf) - inf is NaN
    # Spread over CUDA threads, row chunks and CPU column blocks, whose partial maxima are merged.
    "scattered": (600, scattered(600, 40)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", NON_FINITE_SCORES)
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("same_image", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_non_finite_scores_propagate_like_the_reference(device, case, max_violation, same_image, reduction):
    # The reference: a NaN cost of a negative pair makes the loss NaN and, in max mode, wins its row/column
    # max at the lowest NaN index; its gradient is finite (relu passes it where the output is NaN).
    batch, entries = NON_FINITE_SCORES[case]
    scores = torch.randn(batch, batch, dtype=torch.float64)
    for i, j, value in entries:
        scores[i, j] = value
    options = dict(max_violation=max_violation, reduction=reduction,
                   img_ids=torch.arange(batch, device=device) // 2 if same_image else None)
    assert_matches_reference_with_nan(loss_fn(**options), reference_fn(**options), [scores.to(device).requires_grad_()],
                                      grad_output=torch.tensor(1.5, dtype=torch.float64, device=device))


@pytest.mark.parametrize("max_violation", [True, False])
def test_ties_go_to_the_lowest_index(max_violation):
    # Small integers: many exactly equal hardest negatives and hinges at exactly zero violation.
    scores = torch.randint(-3, 4, (40, 40)).double().requires_grad_()
    for margin in (0.0, 1.0):
        options = dict(margin=margin, max_violation=max_violation)
        out = vk.hinge_triplet_loss(scores, **options)
        grad = torch.autograd.grad(out, scores)[0]
        ref_out = reference(scores, **options)
        ref_grad = torch.autograd.grad(ref_out, scores)[0]
        assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)


def test_zero_gradient_at_the_hinge_boundary():
    # Every violation is exactly 0: loss 0 and gradient 0 (documented convention).
    scores = torch.zeros(4, 4, dtype=torch.float64, requires_grad=True)
    loss = vk.hinge_triplet_loss(scores, margin=0.0)
    assert loss.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(loss, scores)[0]) == 0


def test_rows_without_negatives_contribute_nothing():
    # All captions belong to one image: no negatives at all.
    scores = torch.randn(5, 5, requires_grad=True)
    loss = vk.hinge_triplet_loss(scores, img_ids=torch.zeros(5, dtype=torch.long))
    assert loss.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(loss, scores)[0]) == 0


def test_known_value():
    # Hand-computed: image 0 prefers caption 1 by 0.5 over its own (cost 0.7); caption 1's hardest image
    # is 1 itself excluded, so image 0 (0.9 vs 0.6: cost 0.5); others inactive.
    scores = torch.tensor([[0.4, 0.9], [0.1, 0.6]], dtype=torch.float64)
    # cost_s: row 0: 0.2 + 0.9 - 0.4 = 0.7; row 1: 0.2 + 0.1 - 0.6 < 0.
    # cost_im: col 0: 0.2 + 0.1 - 0.4 < 0; col 1: 0.2 + 0.9 - 0.6 = 0.5.
    assert vk.hinge_triplet_loss(scores).item() == pytest.approx(1.2)
    assert vk.hinge_triplet_loss(scores, reduction="mean").item() == pytest.approx(0.6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("max_violation", [True, False])
def test_half_precision(device, dtype, max_violation):
    # The kernel reads half inputs and computes in float32: compare with the float32 reference on the
    # same (rounded) values; gradients are +-g sums, exact in half for these magnitudes.
    scores = torch.randn(65, 65, device=device).to(dtype)
    ids = repeated_ids(65, device)
    options = dict(max_violation=max_violation, img_ids=ids)
    assert_matches_reference(loss_fn(**options), lambda s: reference(s.float(), **options),
                             [scores.requires_grad_()], grad_output=torch.ones((), device=device), dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_integer_ids(device):
    base = torch.randn(50, 50, device=device)
    scores = base.t().requires_grad_()  # transposed view
    ids = (torch.arange(50, device=device) // 5).to(torch.int32)
    options = dict(img_ids=ids)
    assert_matches_reference(loss_fn(**options), reference_fn(img_ids=ids.long()), [scores])
    strided = torch.randn(60, 120, device=device)[:, ::2].requires_grad_()
    assert_matches_reference(loss_fn(), reference_fn(), [strided])


@pytest.mark.parametrize("max_violation", [True, False])
def test_gradcheck(max_violation):
    # Continuous random scores keep away from the hinge kinks, where the loss is not differentiable.
    scores = torch.randn(9, 9, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    assert torch.autograd.gradcheck(lambda s: vk.hinge_triplet_loss(s, max_violation=max_violation, img_ids=ids),
                                    (scores,))


@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("with_ids", [False, True])
def test_opcheck(max_violation, with_ids):
    scores = torch.randn(12, 12, requires_grad=True)
    ids = repeated_ids(12) if with_ids else None
    torch.library.opcheck(OP_FWD, (scores, 0.2, max_violation, ids))


def test_torch_compile_fullgraph():
    def step(scores, ids):
        return vk.hinge_triplet_loss(scores * 2.0, img_ids=ids, reduction="mean")

    compiled = torch.compile(step, fullgraph=True)
    scores = torch.randn(16, 16, requires_grad=True)
    ids = repeated_ids(16)
    out = compiled(scores, ids)
    grad = torch.autograd.grad(out, scores)[0]
    ref = step(scores, ids)
    assert_close(out, ref)
    assert_close(grad, torch.autograd.grad(ref, scores)[0])


def test_deterministic():
    scores = torch.randn(513, 513)
    for max_violation in (True, False):
        runs = []
        for _ in range(2):
            s = scores.clone().requires_grad_()
            loss = vk.hinge_triplet_loss(s, max_violation=max_violation)
            runs.append((loss.detach(), torch.autograd.grad(loss, s)[0]))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("bad, error, match", [
    (dict(scores=torch.randn(3, 4)), ValueError, r"scores must be square \(B, B\), got shape \(3, 4\)"),
    (dict(scores=torch.randn(3)), ValueError, r"scores must be 2-D, got shape \(3,\)"),
    (dict(scores=torch.randn(2, 3, 3)), ValueError, r"scores must be 2-D"),
    (dict(scores=torch.ones(3, 3, dtype=torch.long)), TypeError, r"scores must be float16.*got torch.int64"),
    (dict(scores=[[1.0]]), TypeError, r"scores must be a torch.Tensor, got list"),
    (dict(img_ids=torch.arange(4)), ValueError, r"img_ids must have shape \(3,\) to match scores, got \(4,\)"),
    (dict(img_ids=torch.zeros(3)), TypeError, r"img_ids must be an integer tensor, got torch.float32"),
    (dict(img_ids=torch.zeros(3, 1, dtype=torch.long)), ValueError, r"img_ids must be 1-D"),
    (dict(img_ids=torch.zeros(3, dtype=torch.long, device="meta")), ValueError, r"scores on cpu, img_ids on meta"),
    (dict(reduction="avg"), ValueError, r"reduction must be one of \('sum', 'mean'\), got 'avg'"),
    (dict(margin="0.2"), TypeError, r"margin must be a number, got str"),
    (dict(max_violation="False"), TypeError, r"max_violation must be True or False, got 'False'"),
    (dict(max_violation=1), TypeError, r"max_violation must be True or False, got 1"),
])
def test_bad_input(bad, error, match):
    args = dict(scores=torch.randn(3, 3)) | bad
    scores = args.pop("scores")
    with pytest.raises(error, match=match):
        vk.hinge_triplet_loss(scores, **args)


@pytest.mark.parametrize("margin", [NAN, INF, -INF])
def test_non_finite_margin_is_rejected(margin):
    scores = torch.randn(3, 3)
    with pytest.raises(ValueError, match=r"margin must be finite, got"):
        vk.hinge_triplet_loss(scores, margin=margin)
    # The registered ops check it too: calling them directly is as safe.
    with pytest.raises(RuntimeError, match=r"margin must be finite"):
        OP_FWD(scores, margin, True, None)
    stat = torch.full((3,), -1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"margin must be finite"):
        OP_BWD(torch.ones(()), scores, margin, False, None, stat, stat)


# Run here (compiled ops) and in a process without the extension (references): both must print the same.
_EMPTY_BATCH = """
import itertools, json, torch, vse_kernels as vk
results = []
no_ids = torch.empty(0, dtype=torch.long)
for max_violation, reduction, ids in itertools.product([True, False], ["sum", "mean"], [None, no_ids]):
    options = dict(max_violation=max_violation, reduction=reduction, img_ids=ids)
    scores, img, txt = (torch.empty(shape, requires_grad=True) for shape in [(0, 0), (0, 8), (0, 8)])
    for loss, inputs in [(vk.hinge_triplet_loss(scores, **options), [scores]),
                         (vk.hinge_triplet_loss_embeddings(img, txt, **options), [img, txt])]:
        grads = torch.autograd.grad(loss, inputs)
        results.append([loss.item(), [list(g.shape) for g in grads]])
print(json.dumps(results))
"""


def test_empty_batch_with_and_without_extension(capsys):
    # B = 0 has no terms: loss 0 under both reductions (not 0 / 0) and empty gradients, for both ops.
    exec(_EMPTY_BATCH, {})
    compiled = json.loads(capsys.readouterr().out)
    env = dict(os.environ, VSE_KERNELS_DISABLE_EXT="1")
    result = subprocess.run([sys.executable, "-c", _EMPTY_BATCH], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == compiled
    assert len(compiled) == 16
    assert all(loss == 0.0 and shapes in ([[0, 0]], [[0, 8], [0, 8]]) for loss, shapes in compiled)


def test_op_checks_its_inputs():
    # Calling the registered op directly bypasses the Python checks: the C++ ones still hold.
    with pytest.raises(RuntimeError, match=r"scores must be a square \(B, B\) matrix"):
        OP_FWD(torch.randn(3, 4), 0.2, True, None)
    with pytest.raises(RuntimeError, match=r"img_ids must be int64"):
        OP_FWD(torch.randn(3, 3), 0.2, True, torch.zeros(3, dtype=torch.int32))


@pytest.mark.cuda
@pytest.mark.parametrize("max_violation", [True, False])
def test_cuda_matches_cpu_kernel_and_is_deterministic(max_violation):
    scores = torch.randn(1031, 1031)
    ids = repeated_ids(1031)
    results = {}
    for device in ("cpu", "cuda", "cuda"):
        s = scores.to(device).requires_grad_()
        loss = vk.hinge_triplet_loss(s, max_violation=max_violation, img_ids=ids.to(device))
        results.setdefault(device, []).append((loss.detach().cpu(), torch.autograd.grad(loss, s)[0].cpu()))
    (cpu_loss, cpu_grad), = results["cpu"]
    (a_loss, a_grad), (b_loss, b_grad) = results["cuda"]
    assert torch.equal(a_loss, b_loss) and torch.equal(a_grad, b_grad), "CUDA runs differ"
    assert_close(a_loss, cpu_loss)
    assert torch.equal(a_grad, cpu_grad)


@pytest.mark.cuda
@pytest.mark.parametrize("max_violation", [True, False])
def test_cuda_no_square_temporaries(max_violation):
    # Forward + backward may allocate the B x B gradient, but no other B x B buffer.
    batch = 4096
    scores = torch.randn(batch, batch, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grad = torch.autograd.grad(vk.hinge_triplet_loss(scores, max_violation=max_violation), scores)[0]
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= grad.numel() * grad.element_size() + 4 * 2**20, f"{extra / 2**20:.1f} MiB extra"
