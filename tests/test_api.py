"""The public contract: property tests against the oracle, bad input, untouched inputs."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cupy_localrel as cl
from cupy_localrel._backends import backend_status
from tests import oracle
from tests.helpers import ATOL, assert_close, make_inputs


@st.composite
def problems(draw):
    border = draw(st.sampled_from(["mask", "zeros", "shift"]))
    centred = border != "shift"
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    size = (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    kernel = []
    for length, d in zip(size, dilation):
        if centred:
            kernel.append(draw(st.sampled_from([1, 3, 5])))
        else:
            if length // d < 1:
                length = d  # make room for a window of one
            kernel.append(draw(st.integers(1, max(1, min(4, length // d)))))
    if not centred:
        size = tuple(max(s, k * d) for s, k, d in zip(size, kernel, dilation))
    return dict(border=border, dilation=dilation, kernel=tuple(kernel), H=size[0], W=size[1],
                stride=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                heads=draw(st.integers(1, 2)), dqk=draw(st.integers(1, 3)), dv=draw(st.integers(1, 2)),
                B=draw(st.integers(1, 2)), bias=draw(st.booleans()), rel=draw(st.booleans()),
                scale=draw(st.sampled_from([None, 0.5, 2.0])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_reference_equals_oracle_on_random_problems(p):
    x = make_inputs(p["B"], p["heads"], p["dqk"], p["dv"], p["H"], p["W"], p["kernel"],
                    p["border"], p["bias"], p["rel"], p["seed"])
    kw = dict(dilation=p["dilation"], stride=p["stride"], border=p["border"])
    out, lse = cl.local_attention2d(x.q, x.k, x.v, p["heads"], p["kernel"], bias=x.bias,
                                    rel=x.rel, scale=p["scale"], return_lse=True, **kw)
    want_out, want_lse = oracle.attention(x.q, x.k, x.v, p["heads"], p["kernel"], x.bias,
                                          x.rel, p["scale"], **kw)
    assert_close(out, want_out, ATOL["float64"], "out")
    assert_close(lse, want_lse, ATOL["float64"], "lse")
    grad = np.random.default_rng(p["seed"]).standard_normal(out.shape)
    got = cl.local_attention2d_backward(grad, x.q, x.k, x.v, out, lse, p["heads"], p["kernel"],
                                        bias=x.bias, rel=x.rel, scale=p["scale"], **kw)
    want = oracle.attention_backward(grad, x.q, x.k, x.v, p["heads"], p["kernel"], x.bias,
                                     x.rel, p["scale"], **kw)
    for name, g, w in zip(got._fields, got, want):
        if w is not None:
            assert_close(g, w, ATOL["float64"], name)


# ---------------------------------------------------------------------------------------
# Bad input: the named exception, a message naming the argument, before any work
# ---------------------------------------------------------------------------------------

def _good():
    return make_inputs(B=1, heads=2, dqk=2, dv=2, H=6, W=6, kernel=3, border="mask",
                       bias=True, rel=True, seed=0)


def _call(**change):
    x = _good()
    args = dict(q=x.q, k=x.k, v=x.v, heads=2, kernel_size=3, bias=x.bias, rel=x.rel)
    args.update(change)
    return cl.local_attention2d(**args)


@pytest.mark.parametrize("change,exc,pattern", [
    (dict(q=[[1.0]]), TypeError, "q must be a NumPy or CuPy array"),
    (dict(k=np.ones((1, 4, 6, 6), np.int32)), TypeError, "k must have a floating dtype"),
    (dict(v=np.ones((1, 4, 6, 6), np.float32)), TypeError, "v: float32"),
    (dict(kernel_size=4), ValueError, "kernel_size must be odd"),
    (dict(kernel_size=(3, 2)), ValueError, "kernel_size must be odd"),
    (dict(kernel_size=0), ValueError, "kernel_size must be positive"),
    (dict(kernel_size="3"), ValueError, "kernel_size must be a positive int"),
    (dict(heads=3), ValueError, "heads=3 must divide the channels of q"),
    (dict(heads=0), ValueError, "heads must be a positive int"),
    (dict(v=np.ones((1, 3, 6, 6))), ValueError, "heads=2 must divide the channels of v"),
    (dict(k=np.ones((1, 4, 6, 5))), ValueError, "k must have shape"),
    (dict(v=np.ones((1, 4, 5, 6))), ValueError, "v must have shape"),
    (dict(q=np.ones((4, 6, 6))), ValueError, "q must be 4-D"),
    (dict(stride=0), ValueError, "stride must be positive"),
    (dict(dilation=-1), ValueError, "dilation must be positive"),
    (dict(bias=np.ones((2, 5, 5))), ValueError, "bias must have shape"),
    (dict(rel=np.ones((2, 1, 3, 3))), ValueError, "rel must have shape"),
    (dict(border="reflect"), ValueError, "border must be one of"),
    (dict(backend="torch"), ValueError, "backend must be None or one of"),
    (dict(scale="big"), ValueError, "scale must be a real number"),
])
def test_bad_input_raises_named_error(change, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(**change)


def test_shift_window_larger_than_image_is_rejected():
    x = make_inputs(B=1, heads=1, dqk=1, dv=1, H=5, W=8, kernel=3, border="shift",
                    bias=False, rel=False, seed=0)
    with pytest.raises(ValueError, match=r"height // dilation >= kernel_size"):
        cl.local_attention2d(x.q, x.k, x.v, 1, 3, dilation=2, border="shift")
    with pytest.raises(ValueError, match="kernel_size"):
        cl.local_qk2d(x.q, x.k, 1, 6, border="shift")


def test_sasa_needs_even_dqk_and_centred_border():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 6, 5, 5))
    rel_h, rel_w = np.zeros((2, 1, 3)), np.zeros((2, 1, 3))
    with pytest.raises(ValueError, match="even Dqk"):
        cl.sasa2d(q, q, q, rel_h, rel_w, 2, 3)
    q = rng.standard_normal((1, 4, 5, 5))
    with pytest.raises(ValueError, match="centred border"):
        cl.sasa2d(q, q, q, rel_h, rel_w, 2, 3, border="shift")
    with pytest.raises(ValueError, match="rel_w must have shape"):
        cl.sasa2d(q, q, q, rel_h, np.zeros((2, 1, 5)), 2, 3)


def test_backward_checks_saved_tensors():
    x = _good()
    out, lse = cl.local_attention2d(x.q, x.k, x.v, 2, 3, return_lse=True)
    with pytest.raises(TypeError, match="lse must have dtype float64"):
        cl.local_attention2d_backward(out, x.q, x.k, x.v, out, lse.astype(np.float32), 2, 3)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        cl.local_attention2d_backward(out[:, :2], x.q, x.k, x.v, out, lse, 2, 3)
    with pytest.raises(ValueError, match="attn must have shape"):
        cl.local_av2d(np.ones((1, 2, 8, 6, 6)), x.v, 3)
    with pytest.raises(ValueError, match="grad_logits must have shape"):
        cl.local_qk2d_backward(np.ones((1, 2, 9, 6, 5)), x.q, x.k, 2, 3)


@pytest.mark.parametrize("backend", ["numpy", "sim"])
def test_av_checks_the_batch_of_v(backend):
    """A v with another batch than attn is rejected before any work (NumPy would broadcast
    it, the kernels would read and write past its end)."""
    attn, v = np.ones((4, 2, 9, 5, 6), np.float32), np.ones((1, 6, 5, 6), np.float32)
    with pytest.raises(ValueError, match=r"v must have the batch of attn \(4\)"):
        cl.local_av2d(attn, v, 3, backend=backend)
    with pytest.raises(ValueError, match=r"v must have the batch of attn \(4\)"):
        cl.local_av2d_backward(np.ones((4, 6, 5, 6), np.float32), attn, v, 3, backend=backend)


def test_papers_ops_check_their_own_arguments():
    x = _good()
    key, geometry = x.q[:, :2], np.zeros((2, 3, 3))
    for call in (lambda key, query: cl.local_relation2d(x.v, key, query, geometry, 3),
                 lambda key, query: cl.local_relation2d_backward(
                     x.v, x.v, key, query, geometry, x.v, np.zeros((1, 2, 6, 6)), 3)):
        with pytest.raises(TypeError, match="key must be a NumPy or CuPy array"):
            call(key.tolist(), key)
        with pytest.raises(TypeError, match="query must be a NumPy or CuPy array"):
            call(key, key.tolist())
        with pytest.raises(ValueError, match="key must have at least one channel"):
            call(key[:, :0], key[:, :0])
        with pytest.raises(ValueError, match="scale must be a real number"):
            cl.local_relation2d(x.v, key, key, geometry, 3, scale="1")


def test_papers_ops_take_none_as_their_default_scale_of_one():
    x = _good()
    key, geometry = x.q[:, :2], np.random.default_rng(3).standard_normal((2, 3, 3))
    np.testing.assert_array_equal(cl.local_relation2d(x.v, key, key, geometry, 3, scale=None),
                                  cl.local_relation2d(x.v, key, key, geometry, 3))
    rel_h = rel_w = np.random.default_rng(4).standard_normal((2, 1, 3))
    np.testing.assert_array_equal(cl.sasa2d(x.q, x.k, x.v, rel_h, rel_w, 2, 3, scale=None),
                                  cl.sasa2d(x.q, x.k, x.v, rel_h, rel_w, 2, 3, scale=1.0))


def test_unavailable_backend_raises_runtime_error_naming_it():
    ok, reason = backend_status("cupy")
    if ok:
        pytest.skip("a CUDA device is present: the cupy backend is available")
    with pytest.raises(RuntimeError, match="backend 'cupy' is not available"):
        _call(backend="cupy")


def test_numpy_backend_rejects_nothing_it_should_take():
    out = _call(backend="numpy")
    assert out.shape == (1, 4, 6, 6)


# ---------------------------------------------------------------------------------------
# Inputs are never modified
# ---------------------------------------------------------------------------------------

def _frozen_copies(*arrays):
    return [None if a is None else a.copy() for a in arrays]


def test_no_call_modifies_its_inputs():
    x = _good()
    rng = np.random.default_rng(1)
    inputs = [x.q, x.k, x.v, x.bias, x.rel]
    before = _frozen_copies(*inputs)
    out, lse = cl.local_attention2d(*inputs[:3], 2, 3, bias=x.bias, rel=x.rel, return_lse=True)
    grad = rng.standard_normal(out.shape)
    saved = _frozen_copies(out, lse, grad)
    cl.local_attention2d_backward(grad, x.q, x.k, x.v, out, lse, 2, 3, bias=x.bias, rel=x.rel)
    logits = cl.local_qk2d(x.q, x.k, 2, 3, bias=x.bias, rel=x.rel, border="zeros")
    logit_copy = logits.copy()
    cl.local_qk2d_backward(logits, x.q, x.k, 2, 3, bias=x.bias, rel=x.rel, border="zeros")
    cl.local_av2d(logits, x.v, 3, border="zeros")
    cl.local_av2d_backward(out, logits, x.v, 3, border="zeros")
    rel_h, rel_w = rng.standard_normal((2, 1, 3)), rng.standard_normal((2, 1, 3))
    rel_copies = _frozen_copies(rel_h, rel_w)
    o2, l2 = cl.sasa2d(x.q, x.k, x.v, rel_h, rel_w, 2, 3, return_lse=True)
    cl.sasa2d_backward(o2, x.q, x.k, x.v, rel_h, rel_w, o2, l2, 2, 3)
    for a, b in zip(inputs + [out, lse, grad, logits, rel_h, rel_w],
                    before + saved + [logit_copy] + rel_copies):
        np.testing.assert_array_equal(a, b)
