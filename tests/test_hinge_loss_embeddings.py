"""vse_kernels.hinge_triplet_loss_embeddings (tiled, never holds B x B) against the materialising reference."""

import pytest
import torch

import vse_kernels as vk
from vse_kernels.ops.hinge_loss import hinge_triplet_loss_embeddings_reference as reference
from memory import rss_growth_mib
from utils import DEVICES, INF, NAN, assert_close, assert_matches_reference, assert_matches_reference_with_nan

OP_FWD = torch.ops.vse_kernels.hinge_triplet_loss_emb_fwd.default
OP_BWD = torch.ops.vse_kernels.hinge_triplet_loss_emb_bwd.default


def embeddings(batch, dim, device="cpu", dtype=torch.float32):
    img = torch.nn.functional.normalize(torch.randn(batch, dim, device=device), dim=1)
    txt = torch.nn.functional.normalize(img + 0.8 * torch.randn(batch, dim, device=device), dim=1)
    return img.to(dtype).requires_grad_(), txt.to(dtype).requires_grad_()


def loss_fn(**options):
    return lambda img, txt: vk.hinge_triplet_loss_embeddings(img, txt, **options)


def reference_fn(**options):
    return lambda img, txt: reference(img, txt, **options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, dim", [(1, 4), (2, 3), (37, 16), (300, 33)])
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("same_image", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_matches_reference(device, batch, dim, max_violation, same_image, reduction):
    ids = torch.arange(batch, device=device) // 5 if same_image else None
    options = dict(max_violation=max_violation, img_ids=ids, reduction=reduction)
    img, txt = embeddings(batch, dim, device, torch.float64)
    assert_matches_reference(loss_fn(**options), reference_fn(**options), [img, txt],
                             grad_output=torch.tensor(1.5, dtype=torch.float64, device=device))


def scattered(batch, dim, count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [(("img", "txt")[n % 2], int(torch.randint(batch, (), generator=generator)),
             int(torch.randint(dim, (), generator=generator)), (NAN, INF, -INF)[n % 3]) for n in range(count)]


# (batch, dim, [(side, row, column, value)]) written into random embeddings: a non-finite entry spoils a
# whole row (or column) of the scores, positive included.
NON_FINITE_EMBEDDINGS = {
    "nan-img": (6, 4, [("img", 1, 0, NAN)]),
    "nan-txt": (6, 4, [("txt", 4, 3, NAN)]),
    "+inf-img": (6, 4, [("img", 0, 2, INF)]),
    "-inf-txt": (6, 4, [("txt", 5, 1, -INF)]),
    "inf-img-and-txt": (6, 4, [("img", 2, 0, INF), ("txt", 3, 0, -INF)]),
    "all-nan": (6, 4, [(side, i, d, NAN) for side in ("img", "txt") for i in range(6) for d in range(4)]),
    "scattered": (300, 16, scattered(300, 16, 12)),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", NON_FINITE_EMBEDDINGS)
@pytest.mark.parametrize("max_violation", [True, False])
@pytest.mark.parametrize("same_image", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_non_finite_embeddings_propagate_like_the_reference(device, case, max_violation, same_image, reduction):
    # The reference differentiates img @ txt.T densely: a zero of d scores times a non-finite embedding entry
    # is NaN, so its gradient is NaN in every column that holds one; the max-mode gathers must agree.
    batch, dim, entries = NON_FINITE_EMBEDDINGS[case]
    tensors = dict(zip(("img", "txt"), embeddings(batch, dim, dtype=torch.float64)))
    with torch.no_grad():
        for side, i, d, value in entries:
            tensors[side][i, d] = value
    options = dict(max_violation=max_violation, reduction=reduction,
                   img_ids=torch.arange(batch, device=device) // 2 if same_image else None)
    assert_matches_reference_with_nan(loss_fn(**options), reference_fn(**options),
                                      [t.detach().to(device).requires_grad_() for t in tensors.values()],
                                      grad_output=torch.tensor(1.5, dtype=torch.float64, device=device))


@pytest.mark.parametrize("margin", [NAN, INF, -INF])
def test_non_finite_margin_is_rejected(margin):
    img, txt = torch.randn(3, 8), torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"margin must be finite, got"):
        vk.hinge_triplet_loss_embeddings(img, txt, margin=margin)
    with pytest.raises(RuntimeError, match=r"margin must be finite"):
        OP_FWD(img, txt, margin, True, None)
    stat = torch.full((3,), -1, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"margin must be finite"):
        OP_BWD(torch.ones(()), img, txt, margin, True, None, stat, stat)


@pytest.mark.parametrize("max_violation", [True, False])
def test_several_tiles(max_violation):
    # Tiles hold 2^26 scores: at B = 8200 the forward (and the sum-mode backward) take two row tiles, so
    # column maxima and the text-side gradient are carried across tiles. float64 keeps the check exact.
    img, txt = embeddings(8200, 4, dtype=torch.float64)
    ids = torch.arange(8200) // 5
    options = dict(max_violation=max_violation, img_ids=ids)
    assert_matches_reference(loss_fn(**options), reference_fn(**options), [img, txt],
                             grad_output=torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    img, txt = embeddings(64, 32, dtype=dtype)
    ids = torch.arange(64) // 5
    assert_matches_reference(loss_fn(img_ids=ids), reference_fn(img_ids=ids), [img, txt],
                             grad_output=torch.tensor(1.0), dtype=dtype, scale=4)


def test_non_contiguous():
    img = torch.randn(40, 64)[:, ::2].requires_grad_()
    txt = torch.randn(32, 40).t().requires_grad_()
    assert_matches_reference(loss_fn(), reference_fn(), [img, txt])


@pytest.mark.parametrize("max_violation", [True, False])
def test_gradcheck(max_violation):
    img, txt = embeddings(7, 5, dtype=torch.float64)
    ids = torch.tensor([0, 0, 1, 2, 2, 3, 4])
    assert torch.autograd.gradcheck(loss_fn(max_violation=max_violation, img_ids=ids), (img, txt))


@pytest.mark.parametrize("max_violation", [True, False])
def test_opcheck(max_violation):
    img, txt = embeddings(10, 6)
    torch.library.opcheck(OP_FWD, (img, txt, 0.2, max_violation, torch.arange(10) // 2))


def test_torch_compile_fullgraph():
    def step(img, txt):
        img, txt = torch.nn.functional.normalize(img, dim=1), torch.nn.functional.normalize(txt, dim=1)
        return vk.hinge_triplet_loss_embeddings(img, txt, reduction="mean")

    img, txt = embeddings(16, 8)
    out = torch.compile(step, fullgraph=True)(img, txt)
    grads = torch.autograd.grad(out, (img, txt))
    ref = step(img, txt)
    assert_close(out, ref)
    for g, ref_g in zip(grads, torch.autograd.grad(ref, (img, txt))):
        assert_close(g, ref_g)


def test_deterministic():
    img, txt = embeddings(700, 24)
    runs = [torch.autograd.grad(vk.hinge_triplet_loss_embeddings(img, txt), (img, txt)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("bad, error, match", [
    (dict(txt=torch.randn(4, 8)), ValueError, r"img and txt must have the same shape \(B, D\), got \(3, 8\) and \(4, 8\)"),
    (dict(img=torch.randn(3, 8, 1)), ValueError, r"img must be 2-D, got shape \(3, 8, 1\)"),
    (dict(txt=torch.randn(3, 8, dtype=torch.float64)), TypeError, r"img torch.float32, txt torch.float64"),
    (dict(txt=torch.ones(3, 8, dtype=torch.long)), TypeError, r"txt must be float16.*got torch.int64"),
    (dict(txt=torch.randn(3, 8, device="meta")), ValueError, r"img on cpu, txt on meta"),
    (dict(img_ids=torch.arange(2)), ValueError, r"img_ids must have shape \(3,\) to match img, got \(2,\)"),
    (dict(img_ids=torch.zeros(3)), TypeError, r"img_ids must be an integer tensor"),
    (dict(reduction="none"), ValueError, r"reduction must be one of"),
])
def test_bad_input(bad, error, match):
    args = dict(img=torch.randn(3, 8), txt=torch.randn(3, 8)) | bad
    with pytest.raises(error, match=match):
        vk.hinge_triplet_loss_embeddings(args.pop("img"), args.pop("txt"), **args)


@pytest.mark.slow
def test_65536_pairs_on_cpu_in_bounded_memory():
    # The B x B matrix alone would be 16 GiB in float32; forward + backward must stay under 2 GB extra.
    setup = """
        import torch, vse_kernels as vk
        torch.manual_seed(0)
        img = torch.nn.functional.normalize(torch.randn(65536, 128), dim=1).requires_grad_()
        txt = torch.nn.functional.normalize(torch.randn(65536, 128), dim=1).requires_grad_()
        small = torch.randn(300, 128, requires_grad=True)
        vk.hinge_triplet_loss_embeddings(small, small.detach().clone()).backward()  # load lazy libraries
    """
    call = """
        loss = vk.hinge_triplet_loss_embeddings(img, txt, img_ids=torch.arange(65536) // 5)
        loss.backward()
        assert torch.isfinite(loss) and loss > 0 and img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0
    """
    growth = rss_growth_mib(setup, call)
    assert growth < 2000, f"peak RSS grew by {growth:.0f} MiB"


@pytest.mark.cuda
@pytest.mark.parametrize("max_violation", [True, False])
def test_cuda_matches_cpu_and_is_deterministic(max_violation):
    img, txt = embeddings(9001, 64)
    ids = torch.arange(9001) // 5
    cpu = [vk.hinge_triplet_loss_embeddings(img, txt, max_violation=max_violation, img_ids=ids)]
    cpu += torch.autograd.grad(cpu[0], (img, txt))
    runs = []
    for _ in range(2):
        i, t = img.detach().cuda().requires_grad_(), txt.detach().cuda().requires_grad_()
        loss = vk.hinge_triplet_loss_embeddings(i, t, max_violation=max_violation, img_ids=ids.cuda())
        runs.append([loss, *torch.autograd.grad(loss, (i, t))])
    assert all(torch.equal(a, b) for a, b in zip(*runs)), "CUDA runs differ"
    for gpu, host in zip(runs[0], cpu):
        assert_close(gpu.cpu(), host, scale=20)  # TF32 GEMM tiles on the GPU


@pytest.mark.cuda
def test_cuda_65536_pairs_in_bounded_memory():
    img, txt = embeddings(65536, 1024, "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    grads = torch.autograd.grad(vk.hinge_triplet_loss_embeddings(img, txt), (img, txt))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - sum(g.numel() * g.element_size() for g in grads)
    assert extra < 2**30, f"{extra / 2**20:.0f} MiB beyond the gradients"
