"""What a new user met first (issue 12): byte order, errors in the caller's own argument
names, non-finite ``scale``. Values are checked against the float64 reference."""
import numpy as np
import pytest

import cupy_localrel as cl
from cupy_localrel._backends import backend_status
from tests.helpers import ATOL, assert_close, make_inputs


def _backends():
    params = [pytest.param("numpy", id="numpy")]
    ok, why = backend_status("sim")
    params.append(pytest.param("sim", id="sim", marks=[] if ok else [
        pytest.mark.skip(reason=f"backend 'sim' unavailable: {why}")]))
    return params


# ---------------------------------------------------------------------------------------
# Byte order: accepted, computed at the dtype's full precision, results in native order
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_big_endian_inputs_give_the_native_answer(backend, dtype):
    x = make_inputs(2, 2, 4, 3, 7, 8, 3, "mask", True, True, seed=5, dtype=np.dtype(dtype))
    native = {n: getattr(x, n) for n in ("q", "k", "v", "bias", "rel")}
    native["key_bias"] = np.random.default_rng(3).standard_normal((2, 2, 7, 8)).astype(dtype)
    swapped = {n: a.astype(np.dtype(dtype).newbyteorder(">")) for n, a in native.items()}
    copies = {n: a.copy() for n, a in swapped.items()}
    assert not swapped["q"].dtype.isnative
    kw = dict(scale=0.7, backend=backend)
    out, lse = cl.local_attention2d(swapped["q"], swapped["k"], swapped["v"], 2, 3,
                                    bias=swapped["bias"], rel=swapped["rel"], key_bias=swapped["key_bias"],
                                    return_lse=True, **kw)
    f64 = {n: a.astype(np.float64) for n, a in native.items()}
    want_out, want_lse = cl.local_attention2d(f64["q"], f64["k"], f64["v"], 2, 3, bias=f64["bias"],
                                              rel=f64["rel"], key_bias=f64["key_bias"], return_lse=True,
                                              scale=0.7, backend="numpy")
    # full precision: float64 inputs are computed in float64, not float32
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    assert lse.dtype == (np.float64 if dtype == "float64" else np.float32) and lse.dtype.isnative
    assert_close(out, want_out, ATOL[dtype], "out")
    assert_close(lse, want_lse, ATOL[dtype], "lse")

    # backward from byte-swapped saved tensors too (lse, out and grad_out as a user holds them)
    grad = np.random.default_rng(1).standard_normal(out.shape).astype(np.dtype(dtype).newbyteorder(">"))
    got = cl.local_attention2d_backward(grad, swapped["q"], swapped["k"], swapped["v"],
                                        out.astype(out.dtype.newbyteorder(">")),
                                        lse.astype(lse.dtype.newbyteorder(">")), 2, 3,
                                        bias=swapped["bias"], rel=swapped["rel"],
                                        key_bias=swapped["key_bias"], **kw)
    want = cl.local_attention2d_backward(grad.astype(np.float64), f64["q"], f64["k"], f64["v"],
                                         out.astype(np.float64), lse.astype(np.float64), 2, 3,
                                         bias=f64["bias"], rel=f64["rel"],
                                         key_bias=f64["key_bias"], scale=0.7, backend="numpy")
    for name in got._fields:
        g = getattr(got, name)
        assert g.dtype == np.dtype(dtype) and g.dtype.isnative, name
        assert_close(g, getattr(want, name), ATOL[dtype] * 4, name)
    for n, a in swapped.items():       # never modified, still big-endian
        np.testing.assert_array_equal(a, copies[n])
        assert a.dtype == copies[n].dtype


@pytest.mark.parametrize("backend", _backends())
def test_byte_orders_mix_in_one_call(backend):
    """'>f4' and '<f4' are one dtype (same kind and size), also in the papers' ops."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 8, 6, 6)).astype(">f4")
    key, query = (rng.standard_normal((1, 2, 6, 6)).astype("<f4") for _ in range(2))
    geometry = rng.standard_normal((2, 3, 3)).astype(">f4")
    out = cl.local_relation2d(x, key, query, geometry, 3, backend=backend)
    want = cl.local_relation2d(*(a.astype(np.float64) for a in (x, key, query, geometry)), 3)
    assert out.dtype == np.float32 and out.dtype.isnative
    assert_close(out, want, ATOL["float32"])


# ---------------------------------------------------------------------------------------
# Every public function reports in its own argument names
# ---------------------------------------------------------------------------------------

def _relation_inputs():
    rng = np.random.default_rng(0)
    return dict(x=rng.standard_normal((2, 8, 9, 9)), key=rng.standard_normal((2, 2, 9, 9)),
                query=rng.standard_normal((2, 2, 9, 9)), geometry=rng.standard_normal((2, 3, 3)))


@pytest.mark.parametrize("change,pattern", [
    (dict(x=np.ones((2, 7, 9, 9))), r"key's 2 channels \(one per head\) must divide the channels of x, got 7"),
    (dict(query=np.ones((3, 2, 9, 9))), r"query must have shape \(2, 2, 9, 9\), got \(3, 2, 9, 9\)"),
    (dict(key=np.ones((2, 2, 9, 8))), r"key must have shape \(B, heads, H, W\) = \(2, heads, 9, 9\) like x"),
    (dict(geometry=np.ones((2, 5, 5))), r"geometry must have shape \(2, 3, 3\)"),
    (dict(x=np.ones((8, 9, 9))), r"x must be 4-D"),
])
def test_local_relation2d_names_its_own_arguments(change, pattern):
    args = dict(_relation_inputs(), **change)
    with pytest.raises(ValueError, match=pattern) as info:
        cl.local_relation2d(args["x"], args["key"], args["query"], args["geometry"], 3)
    for foreign in ("heads=", " of v", " q ", "bias"):   # local_attention2d's names
        assert foreign not in str(info.value)
    out = np.ones((2, 8, 9, 9))
    with pytest.raises(ValueError, match=pattern):
        cl.local_relation2d_backward(out, args["x"], args["key"], args["query"], args["geometry"],
                                     out, np.zeros((2, 2, 9, 9)), 3)


def test_sasa2d_lists_only_its_own_arrays_in_dtype_errors():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 4, 5, 5)), rng.standard_normal((1, 4, 5, 5))
    v = rng.standard_normal((1, 4, 5, 5)).astype(np.float32)
    rel = rng.standard_normal((2, 1, 3))
    with pytest.raises(TypeError, match="v: float32") as info:
        cl.sasa2d(q, k, v, rel, rel, 2, 3)
    assert "rel:" not in str(info.value)
    out, lse = cl.sasa2d(q, k, q, rel, rel, 2, 3, return_lse=True)
    with pytest.raises(TypeError, match="grad_out: float32") as info:
        cl.sasa2d_backward(out.astype(np.float32), q, k, q, rel, rel, out, lse, 2, 3)
    assert "rel:" not in str(info.value)


def test_local_av2d_blames_v_when_v_is_wrong():
    attn, v = np.ones((1, 2, 9, 6, 6)), np.ones((1, 4, 6, 5))   # v one column short
    with pytest.raises(ValueError, match=r"^v must have \(H, W\) .* attn's \(Ho, Wo\) \(6, 6\)"):
        cl.local_av2d(attn, v, 3)
    with pytest.raises(ValueError, match=r"^attn's 2 heads .* must divide the channels of v, got 3"):
        cl.local_av2d(attn, np.ones((1, 3, 6, 6)), 3)
    with pytest.raises(ValueError, match=r"^attn must have shape"):   # wrong window: attn
        cl.local_av2d(np.ones((1, 2, 8, 6, 6)), np.ones((1, 4, 6, 6)), 3)


# ---------------------------------------------------------------------------------------
# scale must be finite
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale_is_rejected(scale):
    x = make_inputs(1, 2, 2, 2, 5, 5, 3, "mask", False, False, seed=0)
    rel = np.zeros((2, 1, 3))
    calls = [
        lambda: cl.local_attention2d(x.q, x.k, x.v, 2, 3, scale=scale),
        lambda: cl.local_qk2d(x.q, x.k, 2, 3, scale=scale),
        lambda: cl.local_relation2d(x.v, x.q[:, :2], x.k[:, :2], None, 3, scale=scale),
        lambda: cl.sasa2d(x.q, x.k, x.v, rel, rel, 2, 3, scale=scale),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="scale must be finite"):
            call()


# ---------------------------------------------------------------------------------------
# Gradients whose exact value is 0: the tolerance scales with the summands (contract)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", _backends())
def test_exactly_zero_gradient_is_judged_against_its_summands(backend):
    """With kh = 1, rel_h adds one constant q . rel_h to every logit of a window: softmax
    ignores it and its gradient is exactly 0. In float32 the long sum of its terms does not
    cancel exactly (errors above 2e-5 here, on both backends): docs/contract.md bounds the
    error by the tolerance times the sum of the terms' magnitudes, not times 1."""
    from tests.helpers import attention_summands
    B, heads, dqk, H, W, kw = 4, 2, 16, 16, 16, 7
    rng = np.random.default_rng(0)
    q, k, v, grad = (rng.standard_normal((B, heads * dqk, H, W)).astype(np.float32)
                     for _ in range(4))
    rel_h = rng.standard_normal((heads, dqk // 2, 1)).astype(np.float32)
    rel_w = rng.standard_normal((heads, dqk // 2, kw)).astype(np.float32)
    out, lse = cl.sasa2d(q, k, v, rel_h, rel_w, heads, (1, kw), return_lse=True, backend=backend)
    got = cl.sasa2d_backward(grad, q, k, v, rel_h, rel_w, out, lse, heads, (1, kw),
                             backend=backend)
    f64 = [a.astype(np.float64) for a in (grad, q, k, v, rel_h, rel_w)]
    out64, lse64 = cl.sasa2d(*f64[1:], heads, (1, kw), return_lse=True)
    want = cl.sasa2d_backward(f64[0], *f64[1:], out64, lse64, heads, (1, kw))
    assert np.abs(want.rel_h).max() < 1e-9                     # exactly 0, up to float64
    half = dqk // 2
    rel = np.concatenate([np.broadcast_to(f64[4][:, :, :, None], (heads, half, 1, kw)),
                          np.broadcast_to(f64[5][:, :, None, :], (heads, half, 1, kw))], axis=1)
    summands = attention_summands(f64[0], *f64[1:4], heads, (1, kw), rel=rel, scale=1.0)
    rel_h_summands = summands["rel"][:, :half].sum(axis=3)     # rel_h sums rel over columns
    with pytest.raises(AssertionError):                       # the plain rule would fail ...
        assert_close(got.rel_h, want.rel_h, ATOL["float32"], "rel_h")
    # ... the contract's rule holds, and by a wide margin (it is not vacuous):
    assert_close(got.rel_h, want.rel_h, ATOL["float32"], "rel_h", summands=rel_h_summands)
    assert_close(got.rel_h, want.rel_h, ATOL["float32"] * 1e-2, "rel_h", summands=rel_h_summands)
    for name in ("q", "k", "v", "rel_w"):
        assert_close(getattr(got, name), getattr(want, name), ATOL["float32"], name)
