"""vse_kernels.meta_sim (Triton on CUDA, blocked PyTorch on CPU) against AVSE's einsum reference.

CPU tests run the registered op (blocked CPU path); `triton_interpret` tests run the Triton launchers
themselves on CPU tensors through TRITON_INTERPRET=1; `cuda` tests run everything natively on a GPU.
"""

import pytest
import torch

import vse_kernels as vk
from vse_kernels.nn import MetaSim
from vse_kernels.ops.meta_sim import cpu as cpu_impl
from vse_kernels.ops.meta_sim import meta_sim_chunked
from vse_kernels.ops.meta_sim import meta_sim_reference as reference
from vse_kernels.ops.meta_sim import op as op_module
from vse_kernels.ops.meta_sim.op import _meta_sim_bwd, _meta_sim_fwd
from memory import rss_growth_mib
from utils import DEVICES, assert_close, assert_matches_reference, relative_error, values_and_grads

# (name, img shape, txt shape, block_dim): 2-D inputs are split into units of block_dim.
SHAPES = [
    ("2d", (5, 3 * 24), (7, 2 * 24), 24),
    ("3d-odd", (6, 5, 33), (4, 3, 33), None),
    ("d>256", (3, 2, 300), (4, 2, 300), None),
    ("one-pair", (1, 4, 16), (1, 1, 16), None),
    ("one-unit", (3, 1, 8), (2, 1, 8), 8),
    ("2d-default-256", (3, 512), (4, 768), None),
    ("mixed-2d-3d", (4, 3 * 20), (5, 2, 20), None),
    ("avse-grid", (9, 8, 32), (11, 4, 32), None),
]


def op(block_dim, normalize):
    return lambda img, txt: vk.meta_sim(img, txt, block_dim=block_dim, normalize=normalize)


def ref(block_dim, normalize):
    return lambda img, txt: reference(img, txt, block_dim=block_dim, normalize=normalize)


def leaf(shape, device="cpu", dtype=torch.float64):
    return torch.randn(shape, device=device, dtype=dtype).requires_grad_()


# ---------------------------------------------------------------- the registered op (CPU path; CUDA too)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name,img_shape,txt_shape,block_dim", SHAPES, ids=[s[0] for s in SHAPES])
def test_values_and_grads(device, dtype, normalize, name, img_shape, txt_shape, block_dim):
    img, txt = leaf(img_shape, device, dtype), leaf(txt_shape, device, dtype)
    assert_matches_reference(op(block_dim, normalize), ref(block_dim, normalize), [img, txt])


@pytest.mark.parametrize("device", DEVICES)
def test_output_dtype_and_shape(device):
    for dtype, expected in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.float16, torch.float32), (torch.bfloat16, torch.float32)]:
        out = vk.meta_sim(torch.randn(3, 2, 16, device=device, dtype=dtype), torch.randn(5, 3, 16, device=device,
                                                                                       dtype=dtype))
        assert out.shape == (3, 5) and out.dtype == expected and out.device.type == device


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_close_to_float64(device):
    img, txt = torch.randn(6, 4, 40, device=device), torch.randn(5, 3, 40, device=device)
    exact = reference(img.double(), txt.double())
    for dtype in (torch.float16, torch.bfloat16):
        out = vk.meta_sim(img.to(dtype), txt.to(dtype))
        assert relative_error(out, exact) < (4e-3 if dtype == torch.float16 else 2e-2)


# Where the op runs: the blocked CPU path, the Triton kernels on CPU tensors through the interpreter (the
# op's dispatch patched), or natively on a GPU.
PATHS = ["cpu", pytest.param("triton", marks=pytest.mark.triton_interpret),
         pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_units_are_normalised_in_float32(path, dtype, monkeypatch):
    # Unit norms above 65504 overflow float16 (every unit became 0) and eps=1e-12 underflows to 0 there
    # (a zero unit became NaN): half units are normalised in float32 before the kernels read them.
    if path == "triton":
        monkeypatch.setattr(op_module, "_use_triton", lambda t: t.dtype in op_module._TRITON_DTYPES)
    device = "cuda" if path == "cuda" else "cpu"
    matching = torch.full((1, 2, 16), 20000.0, device=device, dtype=dtype)  # the example: norm 80000
    assert vk.meta_sim(matching, matching).item() == pytest.approx(2.0, rel=1e-2)
    zero = torch.zeros(1, 2, 16, device=device, dtype=dtype)
    assert torch.equal(vk.meta_sim(zero, matching), torch.zeros(1, 1, device=device))
    img = (torch.randn(4, 3, 64, device=device) * 1e4).clamp(-6e4, 6e4).to(dtype)  # norms ~ 80000
    txt = (torch.randn(5, 2, 64, device=device) * 1e4).clamp(-6e4, 6e4).to(dtype)
    grad = torch.randn(4, 5, device=device, dtype=torch.float64)
    exact, exact_grads = values_and_grads(reference, [img.double().requires_grad_(), txt.double().requires_grad_()],
                                          grad)
    out, grads = values_and_grads(vk.meta_sim, [img.requires_grad_(), txt.requires_grad_()], grad.float())
    assert relative_error(out, exact) < (4e-3 if dtype == torch.float16 else 2e-2)
    assert_close(meta_sim_chunked(img, txt, chunk_size=(3, 2)), out)
    for g, e in zip(grads, exact_grads):  # ~1e-5 each: float16 subnormals, hence the bound
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert relative_error(g, e) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base_img = torch.randn(12, 40, 3, device=device, dtype=torch.float64)
    base_txt = torch.randn(30, 9, device=device, dtype=torch.float64)
    img = base_img[::2].transpose(1, 2).requires_grad_()                     # (6, 3, 40) units, strided
    txt = base_img[:4].transpose(1, 2).requires_grad_()                      # (4, 3, 40)
    assert_matches_reference(op(None, True), ref(None, True), [img, txt])
    img2 = base_img.transpose(1, 2).reshape(12, 120)[:, ::3].requires_grad_()  # (12, 40): every third column
    txt2 = base_txt[:, :8].requires_grad_()                                     # (30, 8): row stride 9
    assert not img.is_contiguous() and not img2.is_contiguous() and not txt2.is_contiguous()
    assert_matches_reference(op(4, True), ref(4, True), [img2, txt2])


@pytest.mark.parametrize("device", DEVICES)
def test_expanded_upstream_gradient(device):
    img, txt = leaf((5, 3, 20), device), leaf((4, 2, 20), device)
    grad = torch.randn(1, 1, device=device, dtype=torch.float64).expand(5, 4)  # stride 0
    assert_matches_reference(op(None, True), ref(None, True), [img, txt], grad_output=grad)
    out = vk.meta_sim(img, txt)
    out.sum().backward()  # .sum() sends an expanded gradient too
    expected = torch.autograd.grad(reference(img, txt).sum(), (img, txt))
    assert_close(img.grad, expected[0])
    assert_close(txt.grad, expected[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # CUDA: torch path, Triton path
def test_ties_go_to_lowest_index(device, dtype):
    # Identical image units: every unit ties, so the whole gradient goes to unit 0, as torch.max does.
    unit = torch.randn(1, 1, 16, device=device, dtype=dtype)
    img = unit.repeat(2, 4, 1).requires_grad_()
    txt = leaf((3, 2, 16), device, dtype)
    vk.meta_sim(img, txt, normalize=False).sum().backward()
    assert img.grad[:, 1:].abs().max() == 0 and img.grad[:, 0].abs().max() > 0
    expected, = torch.autograd.grad(reference(img, txt, normalize=False).sum(), img)
    assert_close(img.grad, expected)


def test_gradcheck():
    img, txt = leaf((4, 3, 6)), leaf((3, 2, 6))
    assert torch.autograd.gradcheck(lambda a, b: vk.meta_sim(a, b), (img, txt))
    assert torch.autograd.gradcheck(lambda a, b: vk.meta_sim(a, b, block_dim=3, normalize=False),
                                    (leaf((3, 9)), leaf((2, 6))))


def test_only_one_input_requires_grad():
    img, txt = leaf((4, 3, 10)), torch.randn(5, 2, 10, dtype=torch.float64)
    assert_matches_reference(op(None, True), ref(None, True), [img, txt])


def test_inference_saves_no_argmax(monkeypatch):
    seen = []
    original = cpu_impl.meta_sim_forward
    monkeypatch.setattr(cpu_impl, "meta_sim_forward", lambda *a: seen.append(a[2]) or original(*a))
    img, txt = leaf((3, 2, 8)), leaf((4, 2, 8))
    with torch.no_grad():
        vk.meta_sim(img, txt)
    vk.meta_sim(img.detach(), txt.detach())
    vk.meta_sim(img, txt)
    assert seen == [False, False, True]
    _, argmax = _meta_sim_fwd(img.detach(), txt.detach(), False)
    assert argmax.numel() == 0


def test_cpu_blocks_cover_everything(monkeypatch):
    # Tiny blocks: many image and text blocks, ragged edges in both directions.
    monkeypatch.setattr(cpu_impl, "BLOCK_ELEMENTS", 7 * 3 * 2)
    assert cpu_impl._blocks(10, 11, 3, 2) == (1, 7)
    img, txt = leaf((10, 3, 5)), leaf((11, 2, 5))
    assert_matches_reference(op(None, False), ref(None, False), [img, txt])


def test_empty_batch():
    assert vk.meta_sim(torch.randn(0, 2, 8), torch.randn(3, 2, 8)).shape == (0, 3)
    img, txt = leaf((2, 2, 8)), leaf((0, 2, 8))
    vk.meta_sim(img, txt).sum().backward()
    assert img.grad.shape == img.shape and img.grad.abs().max() == 0


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("img,txt,kwargs,error,match", [
    ((4, 3, 16), (5, 2, 8), {}, ValueError, "same size d"),
    ((4, 50), (5, 2, 8), {}, ValueError, "block_dim=8"),  # block_dim defaults to txt's unit size
    ((4, 50), (5, 64), {"block_dim": 16}, ValueError, "block_dim=16"),
    ((4, 3, 16), (5, 2, 16), {"block_dim": 8}, ValueError, "block_dim=8"),
    ((4, 64), (5, 64), {"block_dim": 0}, ValueError, "positive"),
    ((4, 64), (5, 64), {"block_dim": 16.0}, TypeError, "block_dim"),
    ((4, 64), (5, 64), {"block_dim": True}, TypeError, "block_dim"),
    ((4,), (5, 64), {}, ValueError, "img must be 2-D or 3-D"),
    ((4, 64), (5, 2, 2, 16), {}, ValueError, "txt must be 2-D or 3-D"),
    ((4, 0, 16), (5, 2, 16), {}, ValueError, "at least one unit"),
])
def test_bad_shapes(img, txt, kwargs, error, match):
    with pytest.raises(error, match=match):
        vk.meta_sim(torch.randn(img), torch.randn(txt), **kwargs)


def test_bad_dtypes_and_devices():
    with pytest.raises(TypeError, match="img must be float16, bfloat16, float32 or float64, got torch.int64"):
        vk.meta_sim(torch.ones(2, 256, dtype=torch.long), torch.randn(3, 256))
    with pytest.raises(TypeError, match="txt must be .* got torch.int32"):
        vk.meta_sim(torch.randn(2, 256), torch.ones(3, 256, dtype=torch.int32))
    with pytest.raises(TypeError, match="img torch.float32, txt torch.float16"):
        vk.meta_sim(torch.randn(2, 256), torch.randn(3, 256).half())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        vk.meta_sim([[1.0]], torch.randn(3, 256))
    with pytest.raises(ValueError, match="img on cpu, txt on meta"):
        vk.meta_sim(torch.randn(2, 256), torch.randn(3, 256, device="meta"))


# ---------------------------------------------------------------- torch.library / torch.compile

def test_opcheck():
    img, txt = torch.randn(5, 3, 12, requires_grad=True), torch.randn(4, 2, 12, requires_grad=True)
    torch.library.opcheck(_meta_sim_fwd, (img, txt, True))
    torch.library.opcheck(_meta_sim_fwd, (img, txt, False))  # backward recomputes the arg-max
    _, argmax = _meta_sim_fwd(img.detach(), txt.detach(), True)
    torch.library.opcheck(_meta_sim_bwd, (torch.randn(5, 4), img.detach(), txt.detach(), argmax))


def test_compile_fullgraph_forward_backward():
    fn = torch.compile(lambda a, b: vk.meta_sim(a, b, block_dim=16), fullgraph=True)
    img, txt = torch.randn(5, 48, requires_grad=True), torch.randn(4, 2, 16, requires_grad=True)
    out, grads = values_and_grads(fn, [img, txt], torch.ones(5, 4))
    ref_out, ref_grads = values_and_grads(lambda a, b: reference(a, b, 16), [img, txt], torch.ones(5, 4))
    assert_close(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r)


# ---------------------------------------------------------------- module and chunked evaluation

def test_module_matches_function():
    module = MetaSim(block_dim=32)
    assert "block_dim=32" in repr(module)
    img, txt = leaf((4, 96)), leaf((6, 64))
    assert_matches_reference(module, ref(32, True), [img, txt])
    assert_close(module.evaluate(img, txt, chunk_size=(3, 4)), reference(img, txt, 32).detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [True, False])
def test_chunked_evaluation(device, normalize):
    img, txt = torch.randn(11, 3 * 16, device=device), torch.randn(13, 2, 16, device=device)
    expected = reference(img, txt, normalize=normalize)
    assert_close(meta_sim_chunked(img, txt, normalize=normalize, chunk_size=(4, 5)), expected)
    out = torch.full((11, 13), float("nan"), device=device)
    assert meta_sim_chunked(img, txt, normalize=normalize, chunk_size=(100, 3), out=out) is out
    assert_close(out, expected)
    with pytest.raises(ValueError, match="chunk_size"):
        meta_sim_chunked(img, txt, chunk_size=(0, 4))
    with pytest.raises(ValueError, match=r"out must be a tensor of shape \(11, 13\)"):
        meta_sim_chunked(img, txt, out=torch.empty(11, 12, device=device))


@pytest.mark.cuda
def test_cuda_autocast_uses_half_kernels():
    img, txt = leaf((6, 3, 64), "cuda", torch.float32), leaf((5, 2, 64), "cuda", torch.float32)
    with torch.autocast("cuda", dtype=torch.float16):
        out = vk.meta_sim(img, txt)
    assert out.dtype == torch.float32
    assert_close(out, reference(img.half(), txt.half()), dtype=torch.float16)
    out.sum().backward()
    assert img.grad.dtype == torch.float32 and txt.grad.dtype == torch.float32


@pytest.mark.cuda
def test_chunked_evaluation_cpu_inputs_on_gpu():
    img, txt = torch.randn(9, 2, 64), torch.randn(14, 2, 64)
    out = meta_sim_chunked(img, txt, chunk_size=(4, 6), device="cuda")
    assert out.device.type == "cpu"
    assert_close(out, reference(img, txt))


# ---------------------------------------------------------------- Triton kernels in the interpreter (CPU)

TRITON_CASES = [  # (Ni, Nt, M, Q, d, tile_rows, tile_cols)
    (5, 7, 3, 5, 40, None, None),     # M, Q, d not powers of two
    (9, 6, 12, 2, 300, 16, 16),       # AVSE region-like units, d > 256, several blocks both ways
    (1, 1, 1, 1, 16, None, None),     # one pair, one unit
    (17, 3, 8, 4, 24, 16, 16),        # ragged image blocks
]


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_kernels_match_reference(case):
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    ni, nt, m, q, d, rows, cols = case
    img, txt = leaf((ni, m, d)), leaf((nt, q, d))
    expected = reference(img, txt, normalize=False)
    grad = torch.randn_like(expected)
    ref_grads = torch.autograd.grad(expected, (img, txt), grad)
    img32, txt32 = img.detach().float(), txt.detach().float()
    scores, argmax = tk.meta_sim_forward(img32, txt32, True, tile_rows=rows, tile_cols=cols)
    assert scores.dtype == torch.float32 and argmax.shape == (ni, nt, q)
    assert_close(scores, expected.detach(), dtype=torch.float32)
    _, cpu_argmax = cpu_impl.meta_sim_forward(img32, txt32, True)
    assert torch.equal(argmax, cpu_argmax)
    no_argmax, empty = tk.meta_sim_forward(img32, txt32, False, tile_rows=rows, tile_cols=cols)
    assert empty.numel() == 0 and torch.equal(no_argmax, scores)
    grads = tk.meta_sim_backward(grad.float(), img32, txt32, argmax, tile_rows=rows, tile_cols=cols, block_d=16)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32
        assert_close(g, r, dtype=torch.float32)


# The variants (triton_kernels.Variant): each must give the default's results, values and gradients.
VARIANT_CASES = [  # (Ni, Nt, M, Q, d)
    (5, 40, 12, 2, 40),    # region-like M = 12 (8 + 4 rows), 3 text blocks to split over
    (37, 7, 6, 3, 24),     # M = 6 (4 + 2), 3 image blocks to split over, ragged
    (3, 5, 3, 1, 16),      # M = 3 (2 + 1: 16 images per program), one text unit
    (9, 11, 5, 4, 20),     # M = 5 (4 + 1)
    (4, 6, 7, 2, 16),      # M = 7: no split (4 + 4 = 8 rows anyway)
]
VARIANTS = [dict(split_units=True), dict(problem_tiles=True), dict(backward_splits=2), dict(backward_splits=3),
            dict(backward_splits=0), dict(split_units=True, problem_tiles=True, backward_splits=0)]


@pytest.mark.triton_interpret
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()))
@pytest.mark.parametrize("case", VARIANT_CASES, ids=str)
def test_triton_variants_match_reference(case, variant):
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    ni, nt, m, q, d = case
    img, txt = leaf((ni, m, d)), leaf((nt, q, d))
    expected = reference(img, txt, normalize=False)
    grad = torch.randn_like(expected)
    ref_grads = torch.autograd.grad(expected, (img, txt), grad)
    img32, txt32 = img.detach().float(), txt.detach().float()
    _, cpu_argmax = cpu_impl.meta_sim_forward(img32, txt32, True)
    with tk.use_variant(**variant):
        scores, argmax = tk.meta_sim_forward(img32, txt32, True)
        no_argmax, _ = tk.meta_sim_forward(img32, txt32, False)
        grads = tk.meta_sim_backward(grad.float(), img32, txt32, argmax, block_d=16)
        again = tk.meta_sim_backward(grad.float(), img32, txt32, argmax, block_d=16)
    assert tk.VARIANT == tk.Variant()   # restored
    assert_close(scores, expected.detach(), dtype=torch.float32)
    assert torch.equal(argmax, cpu_argmax) and torch.equal(no_argmax, scores)
    for g, r, g2 in zip(grads, ref_grads, again):
        assert g.dtype == torch.float32
        assert_close(g, r, dtype=torch.float32)
        assert torch.equal(g, g2)   # split parts are added in a fixed order: bitwise reproducible


@pytest.mark.triton_interpret
def test_triton_split_units_ties_and_nan():
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    # Integer units: exact ties. Unit 9 (second row group) equals unit 1 and unit 10 equals unit 8 (the
    # second group's first row): the lower index must win, as torch.max and the unsplit kernel do.
    img = torch.randint(-2, 3, (4, 12, 16)).float()
    img[:, 9], img[:, 10] = img[:, 1], img[:, 8]
    txt = torch.randint(-2, 3, (5, 2, 16)).float()
    with tk.use_variant(split_units=True):
        scores, argmax = tk.meta_sim_forward(img, txt, True)
    expected, expected_argmax = cpu_impl.meta_sim_forward(img, txt, True)
    assert torch.equal(scores, expected) and torch.equal(argmax, expected_argmax)
    assert not ((argmax == 9) | (argmax == 10)).any()


@pytest.mark.triton_interpret
@pytest.mark.parametrize("split_units", [False, True])
def test_triton_nan_units_propagate(split_units):
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    # A NaN image unit (either row group of the split) makes its image's scores NaN and a NaN text unit its
    # text's, like the reference's max (tl.max alone skips NaN: the score came out finite). Infinite units
    # follow the reference too: -inf loses the max, +inf wins it.
    for unit, with_argmax in [(2, False), (9, False), (2, True), (9, True)]:
        # (The interpreter's arg-max, numpy's nanargmax, raises on an all-NaN column, which a NaN text unit
        # makes when no padded row is left: with the split's exact 8 + 4 rows.)
        nan_text = not (split_units and with_argmax)
        img, txt = torch.randn(3, 12, 16), torch.randn(4, 2, 16)
        img[1, unit, 0] = float("nan")
        if nan_text:
            txt[2, 1, 3] = float("nan")
        img[[0, 2], unit] = 0.0
        img[0, unit, 0], img[2, unit, 0] = float("-inf"), float("inf")
        txt[:, :, 0] = 1.0   # so that image 0's unit is -inf and image 2's +inf against every text unit
        with tk.use_variant(split_units=split_units):
            out, _ = tk.meta_sim_forward(img, txt, with_argmax)
        expected = reference(img.double(), txt.double(), normalize=False)
        assert out.isnan().sum() == (6 if nan_text else 4) and out.isinf().sum() == (3 if nan_text else 4)
        torch.testing.assert_close(out, expected.float(), equal_nan=True)


@pytest.mark.triton_interpret
def test_variant_through_the_op(monkeypatch):
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    monkeypatch.setattr(op_module, "_use_triton", lambda t: t.dtype in op_module._TRITON_DTYPES)
    launches = []
    monkeypatch.setattr(tk, "_launch", lambda kernel, grid, *a, **kw: launches.append((grid, kw)) or
                        kernel[grid](*a, **kw))
    img, txt = leaf((6, 12, 32), dtype=torch.float32), leaf((40, 2, 32), dtype=torch.float32)
    with tk.use_variant(split_units=True, backward_splits=2):
        assert_matches_reference(op(None, True), ref(None, True), [img, txt])
    forward, backward = launches[0][1], launches[-1]
    assert forward["MP"] == 8 and forward["MP2"] == 4
    assert backward[0][2] == 2   # the dTxt launch: two parts


def test_variant_parsing():
    from vse_kernels.ops.meta_sim import Variant, triton_kernels, use_variant

    assert Variant is triton_kernels.Variant and use_variant is triton_kernels.use_variant   # the public names

    assert Variant.parse("") == Variant()
    assert Variant.parse("split_units, backward_splits=4") == Variant(split_units=True, backward_splits=4)
    assert Variant.parse("problem_tiles,backward_splits=0") == Variant(problem_tiles=True, backward_splits=0)
    with pytest.raises(ValueError, match="unknown variant 'split'"):
        Variant.parse("split")
    with pytest.raises(ValueError, match="backward_splits must be an int >= 0"):
        Variant(backward_splits=-1)


def test_variant_tile_rules():
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    assert [tk._split_rows(m) for m in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24)] == [0, 0, 1, 0, 1, 2, 0, 0, 4, 0, 8]
    # The 128^2 region forward (M = 12 -> 16 rows, Q = 2): 8 x 64 pairs per program is 16 x 2 = 32 programs;
    # halving the larger side: 64 x 128 unit rows/columns (64 programs), 64 x 64 (128), 32 x 64 (256).
    assert tk._problem_tiles(128, 128, 16, 2, 8, 64, 132) == (2, 32)
    assert tk._problem_tiles(5000, 25000, 16, 2, 8, 64, 132) == (8, 64)   # big grids keep their tile
    assert tk._problem_tiles(1, 1, 16, 2, 8, 64, 132) == (1, 8)           # down to 16 x 16, no further
    # Backward splits: the loop items per part, a multiple of the step; auto fills the SMs.
    assert tk._splits(tk.Variant(backward_splits=0), 16, 128, 8, 132) == 16     # 9 parts wanted, 8 of 16
    assert tk._splits(tk.Variant(backward_splits=4), 16, 100, 8, 132) == 32     # 13 blocks in 4 parts
    assert tk._splits(tk.Variant(backward_splits=0), 512, 512, 64, 132) == 512  # enough programs: unsplit


@pytest.mark.triton_interpret
def test_triton_non_contiguous_ties_and_expanded_grad():
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    # Small integers: every dot product is exact in any summation order, so tied units tie exactly (with
    # random floats, the interpreter's BLAS may round two equal rows of a tile differently).
    img = torch.randint(-3, 4, (6, 20, 3)).float().transpose(1, 2)   # (6, 3, 20), strided
    img[:, 2] = img[:, 0]                                             # units 0 and 2 tie: unit 0 must win
    txt = torch.randint(-3, 4, (2, 5, 4, 20)).float()[1, :, ::2]      # (5, 2, 20), strided
    assert not img.is_contiguous() and not txt.is_contiguous()
    img64, txt64 = img.double().requires_grad_(), txt.double().requires_grad_()
    expected = reference(img64, txt64, normalize=False)
    grad = torch.full((1, 1), 0.5, dtype=torch.float64).expand(6, 5)
    ref_grads = torch.autograd.grad(expected, (img64, txt64), grad)
    scores, argmax = tk.meta_sim_forward(img, txt, True)
    assert_close(scores, expected.detach(), dtype=torch.float32)
    assert (argmax != 2).all()
    grads = tk.meta_sim_backward(grad.float(), img, txt, argmax)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, dtype=torch.float32)


@pytest.mark.triton_interpret
def test_triton_empty_batch():
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    img, txt = torch.randn(3, 2, 16), torch.randn(0, 2, 16)
    scores, argmax = tk.meta_sim_forward(img, txt, True)
    assert scores.shape == (3, 0) and argmax.shape == (3, 0, 2)
    grad_img, grad_txt = tk.meta_sim_backward(torch.randn(3, 0), img, txt, argmax)
    assert torch.equal(grad_img, torch.zeros_like(img)) and grad_txt.shape == txt.shape


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_inputs(dtype):
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    img, txt = torch.randn(4, 3, 48).to(dtype), torch.randn(6, 2, 48).to(dtype)
    exact = reference(img.double(), txt.double(), normalize=False)
    scores, argmax = tk.meta_sim_forward(img, txt, True)
    assert_close(scores, exact, dtype=torch.float32, scale=10)  # inputs are exact in fp64; fp32 math
    grad = torch.randn(4, 6)
    grad_img, grad_txt = tk.meta_sim_backward(grad, img, txt, argmax)
    assert grad_img.dtype == dtype and grad_txt.dtype == dtype
    img64, txt64 = img.double().requires_grad_(), txt.double().requires_grad_()
    ref_grads = torch.autograd.grad(reference(img64, txt64, normalize=False), (img64, txt64), grad.double())
    assert_close(grad_img, ref_grads[0], dtype=dtype)
    assert_close(grad_txt, ref_grads[1], dtype=dtype)


# ---------------------------------------------------------------- CUDA only: accuracy, determinism

def _errors(fn, img, txt, grad, exact_out, exact_grads):
    out, grads = values_and_grads(fn, [img, txt], grad)
    return [relative_error(out, exact_out)] + [relative_error(g, e) for g, e in zip(grads, exact_grads)]


CUDA_VARIANTS = [{}, dict(split_units=True, problem_tiles=True, backward_splits=0)]
CUDA_DTYPES = [torch.float16, torch.bfloat16, torch.float32, "tf32"]   # "tf32": fp32 with allow_tf32


@pytest.fixture
def cuda_dtype(request, monkeypatch):
    """The dtype to run; "tf32" runs float32 with torch's TF32 switch on (the kernels follow it)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", request.param == "tf32")
    return torch.float32 if request.param == "tf32" else request.param


@pytest.mark.cuda
@pytest.mark.parametrize("variant", CUDA_VARIANTS, ids=["default", "all-variants"])
@pytest.mark.parametrize("cuda_dtype", CUDA_DTYPES, indirect=True, ids=str)
@pytest.mark.parametrize("m,q,d", [(12, 2, 512), (8, 4, 256)], ids=["region", "grid"])
@pytest.mark.parametrize("n", [128, 512])
def test_cuda_accuracy_vs_pytorch(n, m, q, d, cuda_dtype, variant):
    """At training shapes: values and both gradients of the kernels are within 2x of PyTorch's own error in
    the same precision (both against float64; flash-attn's rule), for every dtype and the variants."""
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    img, txt = torch.randn(n, m * d, device="cuda"), torch.randn(n + 1, q * d, device="cuda")
    img64, txt64 = img.double().requires_grad_(), txt.double().requires_grad_()
    exact = reference(img64, txt64, d)
    grad = torch.randn_like(exact)
    exact_grads = torch.autograd.grad(exact, (img64, txt64), grad)
    low = [img.to(cuda_dtype).requires_grad_(), txt.to(cuda_dtype).requires_grad_()]
    with tk.use_variant(**variant):
        ours = _errors(lambda a, b: vk.meta_sim(a, b, d), *low, grad, exact.detach(), exact_grads)
    theirs = _errors(lambda a, b: reference(a, b, d), *low, grad, exact.detach(), exact_grads)
    for name, e_ours, e_theirs in zip(["value", "grad img", "grad txt"], ours, theirs):
        assert e_ours <= 2 * e_theirs + 1e-6, f"{name}: kernel error {e_ours:.3g} vs PyTorch {e_theirs:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("variant", CUDA_VARIANTS, ids=["default", "all-variants"])
@pytest.mark.parametrize("cuda_dtype", CUDA_DTYPES, indirect=True, ids=str)
@pytest.mark.parametrize("m,q,d", [(12, 2, 512), (8, 4, 256)], ids=["region", "grid"])
def test_cuda_evaluation_accuracy_vs_pytorch(m, q, d, cuda_dtype, variant):
    """Flickr30K's evaluation shape, 1000 x 5000 (no gradient: the autotuned forward without arg-max)."""
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    img, txt = torch.randn(1000, m * d, device="cuda"), torch.randn(5000, q * d, device="cuda")
    with torch.no_grad():
        exact = reference(img.double(), txt.double(), d)
        with tk.use_variant(**variant):
            ours = relative_error(vk.meta_sim(img.to(cuda_dtype), txt.to(cuda_dtype), d), exact)
        theirs = relative_error(reference(img.to(cuda_dtype), txt.to(cuda_dtype), d), exact)
    assert ours <= 2 * theirs + 1e-6, f"kernel error {ours:.3g} vs PyTorch {theirs:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("variant", CUDA_VARIANTS, ids=["default", "all-variants"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic(dtype, variant):
    from vse_kernels.ops.meta_sim import triton_kernels as tk

    img = torch.randn(300, 12, 512, device="cuda", dtype=dtype, requires_grad=True)
    txt = torch.randn(257, 2, 512, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(300, 257, device="cuda")
    with tk.use_variant(**variant):
        first = values_and_grads(vk.meta_sim, [img, txt], grad)
        for _ in range(3):
            again = values_and_grads(vk.meta_sim, [img, txt], grad)
            assert torch.equal(again[0], first[0])
            assert all(torch.equal(a, b) for a, b in zip(again[1], first[1]))


@pytest.mark.cuda
def test_cuda_float64_and_large_evaluation():
    img, txt = leaf((7, 3, 20), "cuda"), leaf((5, 2, 20), "cuda")
    assert_matches_reference(op(None, True), ref(None, True), [img, txt])  # float64: blocked torch path
    img, txt = torch.randn(1000, 12, 512, device="cuda"), torch.randn(2500, 2, 512, device="cuda")
    with torch.no_grad():
        vk.meta_sim(img, txt)  # autotuning (its benchmark buffers) happens here, outside the measurement
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = vk.meta_sim(img, txt)
    extra = torch.cuda.max_memory_allocated() - before
    # result + normalised copies of the inputs; the unit tensor alone would be 1000*2500*24*4 B = 240 MB
    assert extra < out.numel() * 4 + 2 * (img.numel() + txt.numel()) * 4 + (8 << 20)
    assert_close(out[:50], reference(img[:50], txt), dtype=torch.float32, scale=10)


# ---------------------------------------------------------------- CPU memory bound (fresh process)

@pytest.mark.slow
def test_cpu_memory_3000x3000():
    """A 3000 x 3000 call with 16 x 4 units grows memory by < 1 GB, forward + backward; the unit tensor alone
    would be 3000 * 3000 * 64 * 4 B = 2.3 GB whatever d is (d = 64 keeps the test short)."""
    setup = """
        import torch, vse_kernels as vk
        torch.set_num_threads(2)
        vk.meta_sim(torch.randn(4, 16, 64, requires_grad=True), torch.randn(4, 4, 64)).sum().backward()
        img = torch.randn(3000, 16, 64, requires_grad=True)
        txt = torch.randn(3000, 4, 64, requires_grad=True)
        grad = torch.randn(3000, 3000)
    """
    call = "vk.meta_sim(img, txt).backward(grad)"
    growth = rss_growth_mib(setup, call)
    # S 36 MB, arg-max 144 MB, S's gradient, normalised copies and gradients ~15 MB each, 16-32 MB blocks
    assert growth < 1000, f"peak RSS grew by {growth:.0f} MiB"
