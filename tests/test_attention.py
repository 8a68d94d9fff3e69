"""multi_head_attention (op, Triton kernels, CPU math path) and nn.MultiheadSelfAttention (SPEC §1.3)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vse_kernels as vk
from vse_kernels.ops.attention import multi_head_attention, multi_head_attention_reference, packed_self_attention
from vse_kernels.ops.attention import op as attention_op
from utils import assert_close, assert_matches_reference, relative_error, values_and_grads


def make_inputs(b, h, lq, lk, dh, *, dtype=torch.float32, device="cpu", mask=None, layout="bhld"):
    """q, k, v (requires_grad) and a key-padding mask. mask: None, "random", or "full_rows" (random, with
    the first batch entry entirely padding). layout "blhd": views of (B, L, H, Dh) tensors (non-contiguous),
    "strided": every other element along Dh."""
    def tensor(length):
        if layout == "blhd":
            t = torch.randn(b, length, h, dh, device=device).transpose(1, 2)
        elif layout == "strided":
            t = torch.randn(b, h, length, 2 * dh, device=device)[..., ::2]
        else:
            t = torch.randn(b, h, length, dh, device=device)
        return t.to(dtype).requires_grad_()

    q, k, v = tensor(lq), tensor(lk), tensor(lk)
    pad = None
    if mask is not None:
        pad = torch.rand(b, lk, device=device) < 0.4
        pad[:, -1] = False if mask == "random" else pad[:, -1]
        if mask == "full_rows":
            pad[0] = True
    return q, k, v, pad


def reference_in(dtype):
    """The reference computed in `dtype` (float64 for exactness), cast back to the inputs' dtype."""
    def run(q, k, v, pad, scale=None):
        out = multi_head_attention_reference(q.to(dtype), k.to(dtype), v.to(dtype), pad, scale)
        return out.to(q.dtype)
    return run


CASES = {  # (B, H, Lq, Lk, Dh, mask)
    "odd-lengths": (3, 2, 7, 13, 16, None),
    "lq-ne-lk-mask": (2, 3, 5, 11, 24, "random"),
    "fully-masked-rows": (3, 2, 9, 6, 16, "full_rows"),
    "batch-1": (1, 4, 36, 36, 32, "random"),
    "one-query-one-key": (2, 2, 1, 1, 16, None),
    "regions-words": (2, 2, 36, 17, 64, "random"),
}


# ---------------------------------------------------------------------------------------------- CPU path

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference_cpu(case, dtype):
    *shape, mask = CASES[case]
    q, k, v, pad = make_inputs(*shape, dtype=dtype, mask=mask)
    assert_matches_reference(lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad),
                             lambda a, b, c: multi_head_attention_reference(a, b, c, pad), [q, k, v])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu(dtype):
    q, k, v, pad = make_inputs(2, 2, 11, 36, 32, dtype=dtype, mask="full_rows")
    assert_matches_reference(lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad),
                             lambda a, b, c: reference_in(torch.float64)(a, b, c, pad), [q, k, v], dtype=dtype)


@pytest.mark.parametrize("layout", ["blhd", "strided"])
def test_non_contiguous_inputs_cpu(layout):
    q, k, v, pad = make_inputs(2, 3, 10, 7, 16, mask="random", layout=layout)
    assert not q.is_contiguous()
    assert_matches_reference(lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad, scale=0.3),
                             lambda a, b, c: multi_head_attention_reference(a, b, c, pad, 0.3), [q, k, v])


def test_output_layout_follows_input():
    q, k, v, _ = make_inputs(2, 3, 5, 5, 8, layout="blhd")
    out = multi_head_attention(q, k, v)
    assert out.transpose(1, 2).is_contiguous()          # (B, L, H, Dh)-ordered like q
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.transpose(1, 2).is_contiguous() for g in grads)
    q, k, v, _ = make_inputs(2, 3, 5, 5, 8, layout="strided")
    assert multi_head_attention(q, k, v).is_contiguous()


def test_fully_masked_rows_give_zeros_and_zero_grads():
    q, k, v, pad = make_inputs(3, 2, 4, 5, 16, mask="full_rows")
    out, (dq, dk, dv) = values_and_grads(lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad),
                                         [q, k, v])
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (dq[0] == 0).all() and (dk[0] == 0).all() and (dv[0] == 0).all()
    assert out[1:].abs().sum() > 0
    # masked keys get no gradient in k and v
    assert (dk[1:].permute(0, 2, 1, 3)[pad[1:]] == 0).all() and (dv[1:].permute(0, 2, 1, 3)[pad[1:]] == 0).all()


def test_expanded_incoming_gradient():
    q, k, v, pad = make_inputs(2, 2, 6, 6, 16, mask="random")
    grads = torch.autograd.grad(multi_head_attention(q, k, v, key_padding_mask=pad).sum(), (q, k, v))
    expected = torch.autograd.grad(multi_head_attention_reference(q, k, v, pad).sum(), (q, k, v))
    for g, e in zip(grads, expected):
        assert_close(g, e)


@pytest.mark.parametrize("shape", [(0, 2, 3, 4, 8), (2, 2, 3, 0, 8), (2, 2, 0, 4, 8)])
def test_empty_inputs(shape):
    q, k, v, _ = make_inputs(*shape)
    out = multi_head_attention(q, k, v)
    assert out.shape == q.shape and (out == 0).all()   # no keys: every row is "fully masked"
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(g.shape == t.shape and (g == 0).all() for g, t in zip(grads, (q, k, v)))


def test_gradcheck_float64():
    q, k, v, pad = make_inputs(2, 2, 3, 5, 4, dtype=torch.float64, mask="full_rows")
    assert torch.autograd.gradcheck(lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad), (q, k, v))


def test_deterministic_cpu():
    q, k, v, pad = make_inputs(2, 2, 17, 9, 16, mask="random")
    grad = torch.randn(2, 2, 17, 16)
    fn = lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad)
    first, second = values_and_grads(fn, [q, k, v], grad), values_and_grads(fn, [q, k, v], grad)
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_opcheck():
    q, k, v, pad = make_inputs(2, 2, 5, 7, 8, mask="full_rows")
    torch.library.opcheck(torch.ops.vse_kernels.attention_fwd.default, (q, k, v, pad, 0.35))
    torch.library.opcheck(torch.ops.vse_kernels.attention_fwd.default, (q, k, v, None, 0.35))
    out, lse = torch.ops.vse_kernels.attention_fwd(q.detach(), k.detach(), v.detach(), pad, 0.35)
    torch.library.opcheck(torch.ops.vse_kernels.attention_bwd.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), pad, out, lse, 0.35))
    qb, kb, vb, _ = make_inputs(2, 2, 5, 7, 8, layout="blhd")   # non-contiguous outputs: strides of the fake
    torch.library.opcheck(torch.ops.vse_kernels.attention_fwd.default, (qb, kb, vb, None, 0.35))


def test_torch_compile_fullgraph():
    q, k, v, pad = make_inputs(2, 2, 6, 9, 16, mask="full_rows")

    def loss(a, b, c):
        return (multi_head_attention(a, b, c, key_padding_mask=pad) * 2).square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    value, grads = values_and_grads(compiled, [q, k, v], torch.tensor(1.0))
    ref_value, ref_grads = values_and_grads(loss, [q, k, v], torch.tensor(1.0))
    assert_close(value, ref_value)
    for g, e in zip(grads, ref_grads):
        assert_close(g, e)


def _packed_reference(heads, pad):
    def run(qkv):
        batch, length, width = qkv.shape
        q, k, v = qkv.unflatten(-1, (3, heads, width // (3 * heads))).permute(2, 0, 3, 1, 4)
        return multi_head_attention_reference(q, k, v, pad).transpose(1, 2).reshape(batch, length, width // 3)
    return run


@pytest.mark.parametrize("backend", ["math", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_packed_self_attention(backend, monkeypatch):
    monkeypatch.setattr(attention_op, "_TRITON_ON_CPU", backend == "triton")
    qkv = torch.randn(3, 7, 3 * 2 * 16, requires_grad=True)
    pad = torch.rand(3, 7) < 0.3
    pad[1] = True
    assert_matches_reference(lambda t: packed_self_attention(t, 2, key_padding_mask=pad), _packed_reference(2, pad),
                             [qkv])
    out = packed_self_attention(qkv, 2, key_padding_mask=pad)
    assert out.shape == (3, 7, 32) and out.is_contiguous() and (out[1] == 0).all()
    (grad,) = torch.autograd.grad(out.sum(), qkv)     # expanded incoming gradient; packed, contiguous result
    assert grad.is_contiguous()
    assert_close(grad, torch.autograd.grad(_packed_reference(2, pad)(qkv).sum(), qkv)[0])


def test_packed_opcheck_and_validation():
    qkv = torch.randn(2, 5, 3 * 2 * 8, requires_grad=True)
    pad = torch.rand(2, 5) < 0.4
    pad[0] = True
    torch.library.opcheck(torch.ops.vse_kernels.attention_packed_fwd.default, (qkv, pad, 2, 0.3))
    out, lse = torch.ops.vse_kernels.attention_packed_fwd(qkv.detach(), pad, 2, 0.3)
    torch.library.opcheck(torch.ops.vse_kernels.attention_packed_bwd.default,
                          (torch.randn_like(out), qkv.detach(), pad, out, lse, 2, 0.3))
    with pytest.raises(ValueError, match=r"qkv must have shape \(B, L, 3·num_heads·Dh\), got \(2, 5, 48\) with num_heads=5"):
        packed_self_attention(qkv, 5)
    with pytest.raises(ValueError, match=r"qkv must be 3-D"):
        packed_self_attention(qkv[0], 2)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Lk\) = \(2, 5\), got \(2, 4\)"):
        packed_self_attention(qkv, 2, key_padding_mask=pad[:, :4])


def _bad(**changes):
    q, k, v, pad = (t.detach() if t is not None else None for t in make_inputs(2, 3, 4, 5, 8, mask="random"))
    args = dict(q=q, k=k, v=v, key_padding_mask=pad, scale=None)
    args.update({name: (fn(args) if callable(fn) else fn) for name, fn in changes.items()})
    return args


@pytest.mark.parametrize("args, error, pattern", [
    (_bad(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
    (_bad(q=lambda a: a["q"][0]), ValueError, r"q must be 4-D, got shape \(3, 4, 8\)"),
    (_bad(k=lambda a: a["k"][..., :4]), ValueError, r"k must have shape .*got \(2, 3, 5, 4\)"),
    (_bad(v=lambda a: a["v"][:, :, :3]), ValueError, r"v must have the shape of k, \(2, 3, 5, 8\), got \(2, 3, 3, 8\)"),
    (_bad(k=lambda a: a["k"][:1]), ValueError, "k must have shape"),
    (_bad(v=lambda a: a["v"].double()), TypeError, "expected one dtype"),
    (_bad(q=lambda a: a["q"].long()), TypeError, "q must be float16, bfloat16, float32 or float64, got torch.int64"),
    (_bad(key_padding_mask=lambda a: a["key_padding_mask"].float()), TypeError,
     "key_padding_mask must be a bool tensor .*got torch.float32"),
    (_bad(key_padding_mask=lambda a: a["key_padding_mask"][:, :4]), ValueError,
     r"key_padding_mask must have shape \(B, Lk\) = \(2, 5\), got \(2, 4\)"),
    (_bad(scale="big"), TypeError, "scale must be a finite number"),
    (_bad(scale=float("nan")), TypeError, "scale must be a finite number"),
    (_bad(key_padding_mask=lambda a: a["key_padding_mask"].to("meta")), ValueError, "expected all tensors on one device"),
])
def test_validation(args, error, pattern):
    with pytest.raises(error, match=pattern):
        multi_head_attention(**args)


def test_public_exports():
    assert vk.multi_head_attention is multi_head_attention
    assert vk.nn.MultiheadSelfAttention.__name__ == "MultiheadSelfAttention"


# ------------------------------------------------------------------------- Triton kernels, interpreted

@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setattr(attention_op, "_TRITON_ON_CPU", True)


def _launch(q, k, v, pad, scale, grad, **config):
    from vse_kernels.ops.attention import triton_kernels as tk
    q, k, v = q.detach(), k.detach(), v.detach()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = tk.attention_forward(q, k, v, pad, scale, out, **config)
    dq, dk, dv = (torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
    tk.attention_backward(grad, q, k, v, pad, out, lse, scale, dq, dk, dv, **config)
    return out, lse, (dq, dk, dv)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("shape, mask, config", [
    ((3, 2, 37, 21, 24), "full_rows", dict(pairs=4, block_m=16)),   # tail program, 3 query blocks
    ((2, 2, 36, 36, 32), None, {}),                                  # default config
    ((1, 3, 5, 60, 16), "random", dict(pairs=2)),                    # words: Lk padded to 64
    ((2, 1, 1, 1, 16), None, {}),
    ((2, 3, 9, 5, 8), "random", {}),                                 # Dh < 16: padded tile
    ((1, 1, 33, 128, 128), "random", {}),                            # the largest tile
])
def test_triton_kernels_match_reference(shape, mask, config):
    q, k, v, pad = make_inputs(*shape, mask=mask)
    scale = 0.2
    grad = torch.randn_like(q)
    out, lse, grads = _launch(q, k, v, pad, scale, grad, **config)
    ref_out, ref_grads = values_and_grads(lambda a, b, c: multi_head_attention_reference(a, b, c, pad, scale),
                                          [q, k, v], grad)
    assert_close(out, ref_out, msg="forward")
    for name, g, e in zip("qkv", grads, ref_grads):
        assert_close(g, e, msg=f"d{name}")
    _, ref_lse = attention_op._math_probs(q.detach(), k.detach(), pad, scale)
    assert_close(lse, ref_lse, msg="lse")
    if mask == "full_rows":
        assert (out[0] == 0).all() and (lse[0] == float("inf")).all()


@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernels_half_precision(dtype):
    q, k, v, pad = make_inputs(2, 2, 12, 20, 32, dtype=dtype, mask="random")
    grad = torch.randn_like(q)
    out, _, grads = _launch(q, k, v, pad, 32 ** -0.5, grad)
    ref_out, ref_grads = values_and_grads(lambda a, b, c: reference_in(torch.float64)(a, b, c, pad), [q, k, v], grad)
    # the interpreter truncates (not rounds) fp32 -> 16-bit stores: up to one more unit in the last place
    assert_close(out, ref_out, dtype=dtype, scale=2)
    for g, e in zip(grads, ref_grads):
        assert_close(g, e, dtype=dtype, scale=2)


@pytest.mark.triton_interpret
def test_triton_through_op_and_autograd(triton_on_cpu):
    """The registered op routed to the Triton kernels: strided (B, L, H, Dh) views in and out, autograd."""
    q, k, v, pad = make_inputs(2, 3, 10, 13, 16, mask="full_rows", layout="blhd")
    fn = lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad)
    assert_matches_reference(fn, lambda a, b, c: multi_head_attention_reference(a, b, c, pad), [q, k, v])
    assert fn(q, k, v).transpose(1, 2).is_contiguous()
    grads = torch.autograd.grad(fn(q, k, v).sum(), (q, k, v))   # expanded incoming gradient
    expected = torch.autograd.grad(multi_head_attention_reference(q, k, v, pad).sum(), (q, k, v))
    for g, e in zip(grads, expected):
        assert_close(g, e)


@pytest.mark.triton_interpret
def test_triton_module_matches_torch(triton_on_cpu):
    mha = nn.MultiheadAttention(32, 2, batch_first=True)
    module = vk.nn.MultiheadSelfAttention.from_torch(mha)
    x = torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    x.requires_grad_()
    ours = module(x, pad)
    theirs = mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    assert_close(ours, theirs)
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, [x, module.in_proj_weight], grad),
                    torch.autograd.grad(theirs, [x, mha.in_proj_weight], grad)):
        assert_close(a, b, scale=2)


# -------------------------------------------------------------------------------------------- module

def _module_pair(embed=48, heads=4, bias=True, dtype=torch.float32, device="cpu"):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(embed, heads, bias=bias, batch_first=True, device=device, dtype=dtype)
    if bias:   # non-zero biases, so that loading them is tested
        with torch.no_grad():
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha, vk.nn.MultiheadSelfAttention.from_torch(mha)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_module_matches_nn_multihead_attention(bias, masked):
    mha, module = _module_pair(bias=bias)
    x = torch.randn(3, 11, 48, requires_grad=True)
    pad = None
    if masked:
        pad = torch.zeros(3, 11, dtype=torch.bool)
        pad[0, 7:] = True
        pad[2, 1:] = True
    grad = torch.randn(3, 11, 48)
    ours = module(x, pad)
    theirs = mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]
    assert_close(ours, theirs)
    params = [module.in_proj_weight, module.out_proj.weight]
    ref_params = [mha.in_proj_weight, mha.out_proj.weight]
    g = torch.autograd.grad(ours, [x, *params], grad)
    e = torch.autograd.grad(theirs, [x, *ref_params], grad)
    for a, b in zip(g, e):
        assert_close(a, b, scale=2)


def test_module_fully_masked_rows_give_output_bias():
    mha, module = _module_pair()
    x = torch.randn(2, 5, 48)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0] = True
    out = module(x, pad)
    assert torch.equal(out[0], module.out_proj.bias.detach().expand(5, 48))   # attention output 0
    assert_close(out[1], mha(x, x, x, key_padding_mask=pad, need_weights=False)[0][1])


def test_module_loading_paths_and_refusals():
    mha, module = _module_pair()
    fresh = vk.nn.MultiheadSelfAttention(48, 4)
    fresh.load_state_dict(mha.state_dict())                 # same parameter names as nn.MultiheadAttention
    x = torch.randn(2, 6, 48)
    assert torch.equal(fresh(x), module(x))
    assert torch.equal(vk.nn.MultiheadSelfAttention(48, 4).load_from_torch(mha)(x), module(x))
    with pytest.raises(ValueError, match="dropout must be 0.0"):
        vk.nn.MultiheadSelfAttention(48, 4, dropout=0.1)
    with pytest.raises(ValueError, match=r"mha.dropout must be 0.0 .*got 0.1"):
        vk.nn.MultiheadSelfAttention.from_torch(nn.MultiheadAttention(48, 4, dropout=0.1))
    with pytest.raises(ValueError, match="add_bias_kv"):
        vk.nn.MultiheadSelfAttention.from_torch(nn.MultiheadAttention(48, 4, add_bias_kv=True))
    with pytest.raises(ValueError, match="must match"):
        vk.nn.MultiheadSelfAttention(48, 2).load_from_torch(mha)
    with pytest.raises(ValueError, match="positive multiple of num_heads"):
        vk.nn.MultiheadSelfAttention(48, 5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 48\), got \(2, 6, 40\)"):
        module(torch.randn(2, 6, 40))
    with pytest.raises(TypeError, match="key_padding_mask must be a bool tensor"):
        module(x, torch.zeros(2, 6))


def test_module_compiles():
    _, module = _module_pair()
    x = torch.randn(2, 7, 48, requires_grad=True)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 4:] = True
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x, pad)
    assert_close(out, module(x, pad))
    (dx,) = torch.autograd.grad(out.sum(), x)
    (ex,) = torch.autograd.grad(module(x, pad).sum(), x)
    assert_close(dx, ex)


# ---------------------------------------------------------------------------------------------- CUDA

def _sdpa(q, k, v, pad, scale=None):
    mask = None if pad is None else ~pad[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, mask", [
    ((4, 8, 36, 36, 128), None), ((3, 8, 36, 17, 64), "full_rows"), ((2, 4, 60, 60, 16), "random"),
    ((2, 2, 128, 128, 128), "random"), ((1, 3, 200, 64, 96), "random"), ((5, 2, 7, 13, 24), "full_rows"),
])
def test_cuda_matches_reference(dtype, shape, mask):
    q, k, v, pad = make_inputs(*shape, dtype=dtype, mask=mask, device="cuda")
    assert_matches_reference(lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad),
                             lambda a, b, c: reference_in(torch.float64)(a, b, c, pad), [q, k, v],
                             dtype=dtype, scale=2)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["blhd", "strided"])
def test_cuda_non_contiguous_and_long_keys(layout):
    for lk in (45, 300):   # 300 > MAX_LK: the math path
        q, k, v, pad = make_inputs(2, 4, 33, lk, 32, device="cuda", mask="full_rows", layout=layout)
        assert_matches_reference(lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad),
                                 lambda a, b, c: reference_in(torch.float64)(a, b, c, pad), [q, k, v])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lq, lk, dh", [(36, 36, 128), (60, 60, 64), (128, 128, 128), (36, 12, 16)])
def test_cuda_accuracy_two_times_rule(dtype, lq, lk, dh):
    """Error vs float64 at most 2x that of PyTorch's SDPA in the same precision (values and gradients)."""
    q, k, v, pad = make_inputs(64, 8, lq, lk, dh, dtype=dtype, mask="random", device="cuda")
    grad = torch.randn(64, 8, lq, dh, device="cuda", dtype=dtype)
    exact = values_and_grads(lambda a, b, c: multi_head_attention_reference(a, b, c, pad),
                             [t.double() for t in (q, k, v)], grad.double())
    ours = values_and_grads(lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad), [q, k, v], grad)
    torch_ = values_and_grads(lambda a, b, c: _sdpa(a, b, c, pad), [q, k, v], grad)
    for name, a, t, e in zip(["out", "dq", "dk", "dv"], [ours[0], *ours[1]], [torch_[0], *torch_[1]],
                             [exact[0], *exact[1]]):
        mine, theirs = relative_error(a, e), relative_error(t, e)
        assert mine <= 2 * theirs + 1e-7, f"{name}: error {mine:.3e} vs PyTorch {theirs:.3e}"


@pytest.mark.cuda
def test_cuda_deterministic():
    q, k, v, pad = make_inputs(256, 8, 36, 36, 128, dtype=torch.bfloat16, mask="random", device="cuda")
    grad = torch.randn(256, 8, 36, 128, device="cuda", dtype=torch.bfloat16)
    fn = lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad)
    first = values_and_grads(fn, [q, k, v], grad)
    for _ in range(3):
        again = values_and_grads(fn, [q, k, v], grad)
        assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[1], again[1]))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_module_matches_nn_multihead_attention(dtype):
    mha, module = _module_pair(embed=256, heads=8, dtype=dtype, device="cuda")
    x = torch.randn(16, 36, 256, device="cuda", dtype=dtype, requires_grad=True)
    pad = torch.rand(16, 36, device="cuda") < 0.3
    pad[:, 0] = False
    grad = torch.randn_like(x)
    ours = values_and_grads(lambda t: module(t, pad), [x], grad)
    theirs = values_and_grads(lambda t: mha(t, t, t, key_padding_mask=pad, need_weights=False)[0], [x], grad)
    assert_close(ours[0], theirs[0], dtype=dtype, scale=2)
    assert_close(ours[1][0], theirs[1][0], dtype=dtype, scale=2)


@pytest.mark.cuda
def test_cuda_compile_and_opcheck():
    q, k, v, pad = make_inputs(4, 8, 36, 20, 64, dtype=torch.bfloat16, mask="full_rows", device="cuda")
    torch.library.opcheck(torch.ops.vse_kernels.attention_fwd.default, (q, k, v, pad, 0.125))
    qkv = torch.randn(4, 20, 3 * 8 * 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(torch.ops.vse_kernels.attention_packed_fwd.default, (qkv, pad, 8, 0.125))
    fn = lambda a, b, c: multi_head_attention(a, b, c, key_padding_mask=pad)
    grad = torch.randn_like(q)
    compiled = values_and_grads(torch.compile(fn, fullgraph=True), [q, k, v], grad)
    eager = values_and_grads(fn, [q, k, v], grad)
    assert torch.equal(compiled[0], eager[0]) and all(torch.equal(a, b) for a, b in zip(compiled[1], eager[1]))
