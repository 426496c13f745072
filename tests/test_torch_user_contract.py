"""The torch adapter as a new user meets it (issue 12): non-finite ``scale``, layer
constructors that check what they can, double backward that fails with our message, and
channels_last kept on outputs and gradients like ``Conv2d``."""
import pytest

torch = pytest.importorskip("torch")

from cupy_localrel.adapters import torch as lt  # noqa: E402
from cupy_localrel.adapters.torch import LocalRelation2d, SASA2d  # noqa: E402
from cupy_localrel.adapters.torch.layers import AttentionStem  # noqa: E402

F64 = torch.float64
CL = torch.channels_last


def _rand(*shape, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def _op_calls(dtype=F64):
    """Every public op on small inputs: name -> (function of its tensors, tensors)."""
    q, k, v = _rand(1, 4, 6, 5, seed=1, dtype=dtype), _rand(1, 4, 6, 5, seed=2, dtype=dtype), \
        _rand(1, 6, 6, 5, seed=3, dtype=dtype)
    bias, rh, rw = (_rand(2, 3, 3, seed=4, dtype=dtype), _rand(2, 1, 3, seed=5, dtype=dtype),
                    _rand(2, 1, 3, seed=6, dtype=dtype))
    attn = torch.softmax(_rand(1, 2, 9, 6, 5, seed=7, dtype=dtype), 2)
    return {
        "local_attention2d": (lambda q, k, v, bias: lt.local_attention2d(q, k, v, 2, 3, bias=bias),
                              (q, k, v, bias)),
        "local_qk2d": (lambda q, k: lt.local_qk2d(q, k, 2, 3, border="shift"), (q, k)),
        "local_av2d": (lambda attn, v: lt.local_av2d(attn, v, 3), (attn, v)),
        "local_relation2d": (lambda x, key, query, geometry: lt.local_relation2d(
            x, key, query, geometry, 3), (v, q[:, :2], k[:, :2], bias)),
        "sasa2d": (lambda q, k, v, rh, rw: lt.sasa2d(q, k, v, rh, rw, 2, 3), (q, k, v[:, :4], rh, rw)),
    }


# ---------------------------------------------------------------------------------------
# scale must be finite
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_non_finite_scale_is_rejected(scale):
    q = torch.randn(1, 4, 5, 5)
    rel = torch.zeros(2, 1, 3)
    for call in (lambda: lt.local_attention2d(q, q, q, 2, 3, scale=scale),
                 lambda: lt.local_qk2d(q, q, 2, 3, scale=scale),
                 lambda: lt.local_relation2d(q, q[:, :2], q[:, :2], None, 3, scale=scale),
                 lambda: lt.sasa2d(q, q, q, rel, rel, 2, 3, scale=scale),
                 lambda: torch.ops.localrel.local_attention2d(q, q, q, 2, [3, 3], None, None,
                                                              scale, [1, 1], [1, 1], "mask", None, "dot",
                                                              None),
                 lambda: LocalRelation2d(8, 3, m=4, scale=scale),
                 lambda: SASA2d(8, 8, 3, heads=2, scale=scale)):
        with pytest.raises(ValueError, match="scale must be finite"):
            call()


# ---------------------------------------------------------------------------------------
# Layers check their configuration when built
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("build,pattern", [
    (lambda: SASA2d(8, 8, heads=0), "heads must be a positive int, got 0"),
    (lambda: SASA2d(8, 8, kernel_size=4, heads=2), r"kernel_size must be odd with border='mask'"),
    (lambda: SASA2d(8, 8, kernel_size=(3, 4), heads=2, border="zeros"), "kernel_size must be odd"),
    (lambda: SASA2d(0, 8, heads=2), "in_channels must be a positive int"),
    (lambda: SASA2d(8, 6, heads=2), "out_channels/heads must be even"),
    (lambda: SASA2d(8, 8, heads=2, stride=0), "stride must be positive"),
    (lambda: LocalRelation2d(8, kernel_size=4), r"kernel_size must be odd with border='mask'"),
    (lambda: LocalRelation2d(8, kernel_size=4, border="zeros"), "kernel_size must be odd"),
    (lambda: LocalRelation2d(8, m=0), "m must be a positive int, got 0"),
    (lambda: LocalRelation2d(0, m=1), "channels must be a positive int, got 0"),
    (lambda: LocalRelation2d(8, m=3), "m=3 must divide channels=8"),
    (lambda: LocalRelation2d(8, m=4, border="same"), "border must be one of"),
    (lambda: LocalRelation2d(8, m=4, geometry_hidden=0), "geometry_hidden must be a positive int"),
    (lambda: LocalRelation2d(8, m=4, dilation=0), "dilation must be positive"),
    (lambda: AttentionStem(3, 8, heads=0), "heads must be a positive int"),
    (lambda: AttentionStem(3, 8, kernel_size=4), "kernel_size must be odd"),
])
def test_layer_constructors_reject_impossible_configurations(build, pattern):
    with pytest.raises(ValueError, match=pattern):
        build()


def test_even_kernels_build_where_the_border_allows_them():
    layer = LocalRelation2d(8, kernel_size=4, m=4, border="shift")
    assert layer(torch.randn(1, 8, 6, 6)).shape == (1, 8, 6, 6)


# ---------------------------------------------------------------------------------------
# Double backward: not supported, and says so
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(_op_calls()))
def test_double_backward_fails_with_our_message(name):
    fn, tensors = _op_calls()[name]
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out = torch.where(torch.isinf(out), torch.zeros_like(out), out)
    # the first derivative with create_graph=True works and equals the plain one
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    plain = torch.autograd.grad(fn(*leaves).nan_to_num(neginf=0).square().sum(), leaves)
    for g, p in zip(grads, plain):
        torch.testing.assert_close(g.detach(), p)
    with pytest.raises(RuntimeError, match=rf"double backward of localrel ops is not "
                                           rf"supported: localrel::{name}_backward"):
        sum(g.sum() for g in grads).backward()


# ---------------------------------------------------------------------------------------
# channels_last: outputs and gradients keep the input's memory format, values unchanged
# ---------------------------------------------------------------------------------------

def _is_cl(t):
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


@pytest.mark.parametrize("name", list(_op_calls()))
def test_channels_last_is_kept_by_every_op(name):
    fn, tensors = _op_calls()[name]
    nchw = [t.clone().requires_grad_() for t in tensors]
    nhwc = [(t.to(memory_format=CL) if t.dim() == 4 else t.clone()).requires_grad_() for t in tensors]
    want, got = fn(*nchw), fn(*nhwc)
    assert want.is_contiguous()
    if got.dim() == 4:     # local_qk2d's logits are 5-D: no channels_last for them
        assert _is_cl(got), name
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grad = _rand(*want.shape, seed=9).nan_to_num()
    torch.autograd.backward(want, grad)
    torch.autograd.backward(got, grad.to(memory_format=CL) if grad.dim() == 4 else grad)
    for a, b in zip(nhwc, nchw):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
        if a.dim() == 4:
            assert _is_cl(a.grad)


def test_backward_ops_give_each_gradient_its_input_format():
    q, k, v = (_rand(1, 4, 6, 5, seed=s).to(memory_format=CL) for s in (1, 2, 3))
    q_nchw = q.contiguous()
    out, lse = lt.local_attention2d(q, k, v, 2, 3, return_lse=True)
    assert _is_cl(out) and _is_cl(lse)
    dq, dk, dv, _, _, _ = torch.ops.localrel.local_attention2d_backward(
        out, q_nchw, k, v, out, lse, 2, [3, 3], None, None, None, [1, 1], [1, 1], "mask", None,
        "dot", None)
    assert dq.is_contiguous() and _is_cl(dk) and _is_cl(dv)


@pytest.mark.parametrize("layer", [lambda: LocalRelation2d(16, 3, m=4),
                                   lambda: SASA2d(16, 16, 3, heads=2),
                                   lambda: SASA2d(16, 16, 3, heads=2, stride=2),
                                   lambda: SASA2d(16, 16, 3, heads=2, stride=2,
                                                  downsample="subsample")],
                         ids=["lrnet", "sasa", "sasa-pool", "sasa-subsample"])
def test_channels_last_layers_like_conv2d(layer):
    torch.manual_seed(0)
    model = layer().double()
    x = _rand(2, 16, 7, 6, seed=11)
    want = model(x)
    model_cl = model.to(memory_format=CL)
    x_cl = x.to(memory_format=CL).requires_grad_()
    got = model_cl(x_cl)
    assert _is_cl(got) and want.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    got.square().sum().backward()
    assert _is_cl(x_cl.grad)


def test_fake_kernels_follow_the_same_memory_format_rule():
    """opcheck compares the fake kernels' strides with the real ones', also channels_last."""
    q, k, v = (_rand(1, 4, 6, 5, seed=s).to(memory_format=CL).requires_grad_() for s in (1, 2, 3))
    bias = _rand(2, 3, 3, seed=4).requires_grad_()
    ops = torch.ops.localrel
    common = ([1, 1], [1, 1], "mask", None)
    torch.library.opcheck(ops.local_attention2d.default,
                          (q, k, v, 2, [3, 3], bias, None, None, *common, "dot", None))
    attn = torch.softmax(_rand(1, 2, 9, 6, 5, seed=5), 2).requires_grad_()
    torch.library.opcheck(ops.local_av2d.default, (attn, v, [3, 3], *common))
    torch.library.opcheck(ops.local_relation2d.default,
                          (v, q[:, :2], k[:, :2], bias, [3, 3], 1.0, *common, "dot", None))
    rh = _rand(2, 1, 3, seed=6).requires_grad_()
    torch.library.opcheck(ops.sasa2d.default, (q, k, v, rh, rh, 2, [3, 3], 1.0, *common, None))


def test_channels_last_model_compiles_fullgraph():
    """The fake kernels' memory format matches the real one's: a compiled channels_last
    model gives the eager values and layout."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(LocalRelation2d(16, 3, m=4), SASA2d(16, 16, 3, heads=2))
    model = model.to(memory_format=CL)
    x = torch.randn(2, 16, 8, 8).to(memory_format=CL)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got_x, want_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = compiled(got_x), model(want_x)
    assert _is_cl(got)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(got_x.grad, want_x.grad, rtol=0, atol=0)
