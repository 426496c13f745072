"""The NumPy reference against the scalar-loop oracle, finite differences and known answers."""
import itertools

import numpy as np
import pytest

import cupy_localrel as cl
from tests import oracle
from tests.helpers import ATOL, assert_close, attention_summands, make_inputs, table_shape
from tests.helpers import central_difference as _central_difference

BORDERS = ("mask", "zeros", "shift")
# (kernel, dilation, stride) on a 7x6 image; every combination is valid for every border.
WINDOWS = [(3, 1, 1), ((3, 5), 1, 1), (3, 2, 1), (3, 1, 2), ((1, 3), (2, 1), (2, 3)), (5, 1, (1, 2))]
EXTRAS = [(False, False), (True, False), (False, True), (True, True)]


def _cases():
    for border, window, (with_bias, with_rel) in itertools.product(BORDERS, WINDOWS, EXTRAS):
        yield pytest.param(border, *window, with_bias, with_rel,
                           id=f"{border}-k{window[0]}-d{window[1]}-s{window[2]}"
                              f"{'-bias' if with_bias else ''}{'-rel' if with_rel else ''}")


CASES = list(_cases())


@pytest.mark.parametrize("border,kernel,dilation,stride,with_bias,with_rel", CASES)
def test_attention_forward_and_backward_match_oracle(border, kernel, dilation, stride, with_bias, with_rel):
    x = make_inputs(B=2, heads=2, dqk=2, dv=3, H=7, W=6, kernel=kernel, border=border,
                    bias=with_bias, rel=with_rel, seed=1)
    kw = dict(dilation=dilation, stride=stride, border=border)
    out, lse = cl.local_attention2d(x.q, x.k, x.v, 2, kernel, bias=x.bias, rel=x.rel,
                                    scale=0.7, return_lse=True, **kw)
    want_out, want_lse = oracle.attention(x.q, x.k, x.v, 2, kernel, x.bias, x.rel, 0.7, **kw)
    assert_close(out, want_out, ATOL["float64"])
    assert_close(lse, want_lse, ATOL["float64"])
    grad_out = np.random.default_rng(2).standard_normal(out.shape)
    got = cl.local_attention2d_backward(grad_out, x.q, x.k, x.v, out, lse, 2, kernel,
                                        bias=x.bias, rel=x.rel, scale=0.7, **kw)
    want = oracle.attention_backward(grad_out, x.q, x.k, x.v, 2, kernel, x.bias, x.rel, 0.7, **kw)
    for name, g, w in zip(got._fields, got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            assert_close(g, w, ATOL["float64"], name)


@pytest.mark.parametrize("border,kernel,dilation,stride,with_bias,with_rel", CASES)
def test_qk_and_av_match_oracle(border, kernel, dilation, stride, with_bias, with_rel):
    x = make_inputs(B=1, heads=2, dqk=3, dv=2, H=7, W=6, kernel=kernel, border=border,
                    bias=with_bias, rel=with_rel, seed=3)
    kw = dict(dilation=dilation, stride=stride, border=border)
    logits = cl.local_qk2d(x.q, x.k, 2, kernel, bias=x.bias, rel=x.rel, **kw)
    want = oracle.qk(x.q, x.k, 2, kernel, x.bias, x.rel, None, **kw)
    np.testing.assert_array_equal(np.isinf(logits), np.isinf(want))
    assert_close(np.where(np.isinf(want), 0, logits), np.where(np.isinf(want), 0, want), ATOL["float64"])

    rng = np.random.default_rng(4)
    grad_logits = rng.standard_normal(logits.shape)
    got = cl.local_qk2d_backward(grad_logits, x.q, x.k, 2, kernel, bias=x.bias, rel=x.rel, **kw)
    want = oracle.qk_backward(grad_logits, x.q, x.k, 2, kernel, x.bias, x.rel, None, **kw)
    for name, g, w in zip(got._fields, got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            assert_close(g, w, ATOL["float64"], name)

    attn = rng.standard_normal(logits.shape)  # any weights, not only softmax outputs
    out = cl.local_av2d(attn, x.v, kernel, **kw)
    assert_close(out, oracle.av(attn, x.v, kernel, **kw), ATOL["float64"])
    grad_out = rng.standard_normal(out.shape)
    got = cl.local_av2d_backward(grad_out, attn, x.v, kernel, **kw)
    want = oracle.av_backward(grad_out, attn, x.v, kernel, **kw)
    assert got._fields == ("attn", "v")
    assert_close(got.attn, want[0], ATOL["float64"], "attn")
    assert_close(got.v, want[1], ATOL["float64"], "v")




@pytest.mark.parametrize("border", BORDERS)
def test_attention_gradients_match_finite_differences(border):
    x = make_inputs(B=1, heads=2, dqk=2, dv=2, H=5, W=4, kernel=3, border=border,
                    bias=True, rel=True, seed=5)
    kw = dict(dilation=1, stride=(1, 2), border=border)
    weight = np.random.default_rng(6).standard_normal((1, 4, 5, 2))
    loss = lambda: float((cl.local_attention2d(x.q, x.k, x.v, 2, 3, bias=x.bias, rel=x.rel, **kw) * weight).sum())
    out, lse = cl.local_attention2d(x.q, x.k, x.v, 2, 3, bias=x.bias, rel=x.rel, return_lse=True, **kw)
    got = cl.local_attention2d_backward(weight, x.q, x.k, x.v, out, lse, 2, 3, bias=x.bias, rel=x.rel, **kw)
    for name in ("q", "k", "v", "bias", "rel"):
        assert_close(getattr(got, name), _central_difference(loss, getattr(x, name)), 1e-7, name)


@pytest.mark.parametrize("border", BORDERS)
def test_qk_av_gradients_match_finite_differences(border):
    x = make_inputs(B=1, heads=1, dqk=2, dv=2, H=4, W=5, kernel=3, border=border,
                    bias=True, rel=True, seed=7)
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((1, 1, 9, 4, 5))
    finite = lambda a: np.where(np.isinf(a), 0, a)
    loss = lambda: float((finite(cl.local_qk2d(x.q, x.k, 1, 3, bias=x.bias, rel=x.rel, border=border)) * weight).sum())
    got = cl.local_qk2d_backward(weight, x.q, x.k, 1, 3, bias=x.bias, rel=x.rel, border=border)
    for name in ("q", "k", "bias", "rel"):
        assert_close(getattr(got, name), _central_difference(loss, getattr(x, name)), 1e-7, name)
    attn, out_weight = rng.standard_normal((1, 1, 9, 4, 5)), rng.standard_normal((1, 2, 4, 5))
    loss = lambda: float((cl.local_av2d(attn, x.v, 3, border=border) * out_weight).sum())
    got = cl.local_av2d_backward(out_weight, attn, x.v, 3, border=border)
    assert_close(got.attn, _central_difference(loss, attn), 1e-7, "attn")
    assert_close(got.v, _central_difference(loss, x.v), 1e-7, "v")


@pytest.mark.parametrize("border", ["mask", "zeros"])
def test_layer_gradients_match_finite_differences(border):
    rng = np.random.default_rng(9)
    x, key, query = rng.standard_normal((1, 4, 5, 4)), rng.standard_normal((1, 2, 5, 4)), rng.standard_normal((1, 2, 5, 4))
    geometry = rng.standard_normal((2, 3, 3))
    weight = rng.standard_normal((1, 4, 5, 4))
    loss = lambda: float((cl.local_relation2d(x, key, query, geometry, 3, border=border) * weight).sum())
    out, lse = cl.local_relation2d(x, key, query, geometry, 3, border=border, return_lse=True)
    got = cl.local_relation2d_backward(weight, x, key, query, geometry, out, lse, 3, border=border)
    assert got._fields == ("x", "key", "query", "geometry", "key_bias")
    for name, value in zip(got._fields, (x, key, query, geometry)):
        assert_close(getattr(got, name), _central_difference(loss, value), 1e-7, name)

    q, k, v = (rng.standard_normal((1, 4, 5, 4)) for _ in range(3))
    rel_h, rel_w = rng.standard_normal((2, 1, 3)), rng.standard_normal((2, 1, 5))
    loss = lambda: float((cl.sasa2d(q, k, v, rel_h, rel_w, 2, (3, 5), border=border) * weight).sum())
    out, lse = cl.sasa2d(q, k, v, rel_h, rel_w, 2, (3, 5), border=border, return_lse=True)
    got = cl.sasa2d_backward(weight, q, k, v, rel_h, rel_w, out, lse, 2, (3, 5), border=border)
    assert got._fields == ("q", "k", "v", "rel_h", "rel_w", "key_bias")
    for name, value in zip(got._fields, (q, k, v, rel_h, rel_w)):
        assert_close(getattr(got, name), _central_difference(loss, value), 1e-7, name)


# ---------------------------------------------------------------------------------------
# Semantics pinned by known answers
# ---------------------------------------------------------------------------------------

def test_shift_with_kernel_as_large_as_image_is_full_attention():
    x = make_inputs(B=2, heads=2, dqk=3, dv=2, H=5, W=4, kernel=(5, 4), border="shift",
                    bias=False, rel=False, seed=10)
    out = cl.local_attention2d(x.q, x.k, x.v, 2, (5, 4), border="shift")
    q = x.q.reshape(2, 2, 3, 20)
    k = x.k.reshape(2, 2, 3, 20)
    v = x.v.reshape(2, 2, 2, 20)
    logits = np.einsum("bhdi,bhdj->bhij", q, k) / np.sqrt(3)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bhij,bhdj->bhdi", p, v).reshape(2, 4, 5, 4)
    assert_close(out, want, ATOL["float64"])


@pytest.mark.parametrize("border", BORDERS)
def test_constant_values_give_constant_output_except_zero_padding(border):
    x = make_inputs(B=1, heads=2, dqk=2, dv=1, H=6, W=6, kernel=3, border=border,
                    bias=True, rel=False, seed=11)
    v = np.full((1, 2, 6, 6), 2.5)
    out = cl.local_attention2d(x.q, x.k, v, 2, 3, bias=x.bias, border=border)
    if border == "zeros":
        # Out-of-image slots take softmax weight with v = 0: border outputs shrink.
        assert np.all(out[..., 0, :] < 2.5) and np.all(out[..., :, -1] < 2.5)
        np.testing.assert_allclose(out[..., 1:-1, 1:-1], 2.5, rtol=1e-12)
    else:
        np.testing.assert_allclose(out, 2.5, rtol=1e-12)


def _seed_sasa_with_torch(torch, x_q, x_k, x_v, rel_h, rel_w, k):
    """The seed's AttentionConv (unfold, per-channel softmax), rewritten from its description."""
    F = torch.nn.functional
    B, C, H, W = x_q.shape
    pad = (k - 1) // 2
    kp = F.pad(x_k, [pad] * 4).unfold(2, k, 1).unfold(3, k, 1)  # (B, C, H, W, k, k)
    vp = F.pad(x_v, [pad] * 4).unfold(2, k, 1).unfold(3, k, 1)
    k_h, k_w = kp.split(C // 2, dim=1)
    # rel_h varies with the window row, rel_w with the window column
    kp = torch.cat((k_h + rel_h.view(1, C // 2, 1, 1, k, 1), k_w + rel_w.view(1, C // 2, 1, 1, 1, k)), dim=1)
    logits = (x_q[..., None, None] * kp).reshape(B, C, H, W, k * k)
    p = F.softmax(logits, dim=-1)
    return (p * vp.reshape(B, C, H, W, k * k)).sum(-1)


def test_seed_sasa_equals_torch_unfold_implementation():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    B, C, H, W, k = 2, 4, 6, 5, 3
    q, kk, v = (rng.standard_normal((B, C, H, W)) for _ in range(3))
    rel_h, rel_w = rng.standard_normal((C // 2, k)), rng.standard_normal((C // 2, k))
    want = _seed_sasa_with_torch(torch, *(torch.from_numpy(a) for a in (q, kk, v, rel_h, rel_w)), k).numpy()
    # heads = C, Dqk = Dv = 1: channel c < C/2 uses the row embedding, the rest the column one.
    rel = np.zeros((C, 1, k, k))
    rel[: C // 2, 0] = rel_h[:, :, None]
    rel[C // 2:, 0] = rel_w[:, None, :]
    out = cl.local_attention2d(q, kk, v, C, k, rel=rel, scale=1.0, border="zeros")
    assert_close(out, want, ATOL["float64"])


# ---------------------------------------------------------------------------------------
# Dtypes, budget, empty inputs
# ---------------------------------------------------------------------------------------

def _dtypes():
    names = ["float16", "float32", "float64"]
    try:
        import ml_dtypes  # noqa: F401
        names.append("bfloat16")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("dtype", _dtypes())
@pytest.mark.parametrize("border", BORDERS)
def test_low_precision_matches_float64_on_rounded_inputs(dtype, border):
    if dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    x = make_inputs(B=2, heads=2, dqk=4, dv=3, H=6, W=7, kernel=3, border=border,
                    bias=True, rel=True, seed=13)
    low = {n: getattr(x, n).astype(dtype) for n in ("q", "k", "v", "bias", "rel")}
    out, lse = cl.local_attention2d(low["q"], low["k"], low["v"], 2, 3, bias=low["bias"],
                                    rel=low["rel"], border=border, return_lse=True)
    assert out.dtype == np.dtype(dtype)
    assert lse.dtype == (np.float64 if np.dtype(dtype) == np.float64 else np.float32)
    rounded = {n: a.astype(np.float64) for n, a in low.items()}
    want_out, want_lse = oracle.attention(rounded["q"], rounded["k"], rounded["v"], 2, 3,
                                          rounded["bias"], rounded["rel"], None, border=border)
    tol = ATOL[np.dtype(dtype).name]
    assert_close(out.astype(np.float64), want_out, tol)
    assert_close(lse, want_lse, tol)
    grad = np.random.default_rng(14).standard_normal(out.shape).astype(dtype)
    got = cl.local_attention2d_backward(grad, low["q"], low["k"], low["v"], out, lse, 2, 3,
                                        bias=low["bias"], rel=low["rel"], border=border)
    want = oracle.attention_backward(grad.astype(np.float64), rounded["q"], rounded["k"], rounded["v"],
                                     2, 3, rounded["bias"], rounded["rel"], None, border=border)
    # Gradients: the tolerance scales with the magnitude of their summands (contract).
    summands = attention_summands(grad.astype(np.float64), rounded["q"], rounded["k"],
                                  rounded["v"], 2, 3, bias=rounded["bias"], rel=rounded["rel"],
                                  border=border)
    for name, g, w in zip(got._fields, got, want):
        if w is None:   # key_bias was not given
            assert g is None, name
            continue
        assert g.dtype == np.dtype(dtype), name
        assert_close(g.astype(np.float64), w, tol, name, summands=summands[name])


def test_small_budget_splits_work_without_changing_results():
    from cupy_localrel._backends import _numpy
    from cupy_localrel._geometry import qk_geometry
    x = make_inputs(B=2, heads=2, dqk=2, dv=3, H=60, W=50, kernel=5, border="shift",
                    bias=True, rel=True, seed=15)
    kw = dict(bias=x.bias, rel=x.rel, border="shift", dilation=2)
    out, lse = cl.local_attention2d(x.q, x.k, x.v, 2, 5, return_lse=True, **kw)
    grads = cl.local_attention2d_backward(out, x.q, x.k, x.v, out, lse, 2, 5, **kw)
    old = cl.set_numpy_memory_budget(1 << 20)
    try:
        geo = qk_geometry(x.q, x.k, 2, 5, 2, 1, "shift", x.bias, x.rel, None, v=x.v)
        chunks = list(_numpy._chunks(geo, 2 * geo.dqk + 2 * geo.dv))
        small_out, small_lse = cl.local_attention2d(x.q, x.k, x.v, 2, 5, return_lse=True, **kw)
        small_grads = cl.local_attention2d_backward(out, x.q, x.k, x.v, out, lse, 2, 5, **kw)
    finally:
        cl.set_numpy_memory_budget(old)
    assert len({c.i.start for c in chunks}) > 1  # the budget really splits the output rows
    assert_close(small_out, out, 1e-12)
    assert_close(small_lse, lse, 1e-12)
    for name, g, w in zip(grads._fields, small_grads, grads):
        if w is not None:
            assert_close(g, w, 1e-12, name)


def test_memory_budget_is_checked():
    with pytest.raises(ValueError, match="nbytes"):
        cl.set_numpy_memory_budget(10)


def test_empty_batch_and_empty_values():
    q = np.zeros((0, 4, 5, 5))
    out, lse = cl.local_attention2d(q, q, np.zeros((0, 6, 5, 5)), 2, 3, return_lse=True)
    assert out.shape == (0, 6, 5, 5) and lse.shape == (0, 2, 5, 5)
    x = make_inputs(B=1, heads=2, dqk=1, dv=1, H=5, W=5, kernel=3, border="mask", bias=False, rel=False, seed=0)
    out, lse = cl.local_attention2d(x.q, x.k, np.zeros((1, 0, 5, 5)), 2, 3, return_lse=True, stride=2)
    assert out.shape == (1, 0, 3, 3) and lse.shape == (1, 2, 3, 3)
    assert_close(lse, oracle.attention(x.q, x.k, np.zeros((1, 2, 5, 5)), 2, 3, stride=2)[1], ATOL["float64"])
    grads = cl.local_attention2d_backward(np.zeros((0, 6, 5, 5)), q, q, np.zeros((0, 6, 5, 5)),
                                          np.zeros((0, 6, 5, 5)), np.zeros((0, 2, 5, 5)), 2, 3)
    assert grads.q.shape == q.shape and grads.v.shape == (0, 6, 5, 5) and grads.bias is None


def test_non_finite_inputs_propagate():
    x = make_inputs(B=1, heads=1, dqk=2, dv=2, H=5, W=5, kernel=3, border="mask", bias=False, rel=False, seed=16)
    v = x.v.copy()
    v[0, 0, 2, 2] = np.nan
    out = cl.local_attention2d(x.q, x.k, v, 1, 3)
    assert np.isnan(out[0, 0, 1:4, 1:4]).all()
    assert np.isfinite(out[0, 0, 0, :]).all() and np.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("length,kernel,dilation,stride", [(9, 3, 1, 1), (11, 5, 2, 1), (10, 3, 3, 2), (7, 1, 1, 3)])
def test_table_offsets_are_the_slots_relative_positions(border, length, kernel, dilation, stride):
    from cupy_localrel._geometry import axis_window, table_offsets
    w = axis_window(length, kernel, dilation, stride, border)
    centre = np.arange(w.pos.shape[0])[:, None] * stride
    offsets = table_offsets(kernel, border)
    assert offsets.shape == (table_shape(kernel, border)[0],)
    np.testing.assert_array_equal((w.pos - centre)[w.valid], dilation * offsets[w.table][w.valid])


def test_table_shape_helper_matches_spec():
    assert table_shape((3, 5), "mask") == (3, 5)
    assert table_shape((3, 5), "shift") == (5, 9)


@pytest.mark.parametrize("border", ["mask", "zeros", "shift"])
def test_av_invalid_slots_add_nothing_whatever_their_weight(border):
    """docs/contract.md: invalid slots add 0; an inf or NaN weight there must not turn into NaN."""
    rng = np.random.default_rng(21)
    v = rng.standard_normal((1, 4, 5, 6))
    # docs/contract.md "Geometry", k = 3, stride = dilation = 1: slot (ty, tx) of output (i, j) looks at
    # (i + ty - 1, j + tx - 1); every slot of a shift window is valid.
    t, i, j = np.meshgrid(np.arange(9), np.arange(5), np.arange(6), indexing="ij")
    y, x = i + t // 3 - 1, j + t % 3 - 1
    valid = (0 <= y) & (y < 5) & (0 <= x) & (x < 6) | (border == "shift")   # (K, Ho, Wo)
    attn = rng.random((1, 2, 9, 5, 6))
    poisoned = attn.copy()
    poisoned[:, 0, ~valid] = np.inf
    poisoned[:, 1, ~valid] = np.nan
    np.testing.assert_array_equal(cl.local_av2d(poisoned, v, 3, border=border),
                                  cl.local_av2d(np.where(valid, attn, 0), v, 3, border=border))
