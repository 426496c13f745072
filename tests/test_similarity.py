"""LR-Net's relation family: similarity functions, the per-key logit ``key_bias`` and empty
windows (docs/contract.md), on the NumPy reference and on the kernels (``sim``, and
``cupy`` when a GPU is present).

Every similarity x border x dtype against the scalar oracle (tests/oracle.py, written from
the issue's table), with a ``key_bias`` that holds a ``-inf`` region and removes every key
of one (batch, head), so that some windows have no slot at all; the kernels under two
thread orders. Finite differences in float64 for every similarity, ``key_bias`` included.
The padding-mask equivalence: two images of different sizes padded into one batch give,
on their own pixels, what each gives alone. Removed keys take no part: NaN and inf in their
k and v give, value for value, what zeros there give (both reference paths, the kernels).
"""
import functools
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cupy_localrel as cl
from cupy_localrel import _geometry as G
from cupy_localrel._backends import backend_status
from cupy_localrel._backends import _numpy as N
from tests import oracle
from tests.test_api import problems
from tests.helpers import ATOL, assert_close, central_difference, make_inputs
from tests.test_kernels import BACKENDS, SEEDS, Arrays, _dtype, _require

SIMILARITIES = G.SIMILARITIES
BORDERS = ("mask", "zeros", "shift")
DTYPES = ("float64", "float32", "float16", "bfloat16")
# B, heads, Dqk, Dv, H, W; kernel 3, stride 1 (the general kernels take every case: the
# similarity or key_bias keeps them off the fast paths) and one strided window.
SHAPE = (2, 2, 2, 2, 5, 6)
KERNEL, SCALE = 3, 0.7


@pytest.fixture(params=SEEDS, ids=lambda s: f"seed{s}")
def sim_seed(request, monkeypatch):
    monkeypatch.setenv("CUPY_LOCALREL_SIM_SEED", str(request.param))
    return request.param


def _key_bias(rng, B, heads, H, W):
    """Random key logits with a -inf region (batch 0, head 0: the top two rows) and one
    (batch, head) whose every key is removed: all its windows are empty."""
    kb = rng.standard_normal((B, heads, H, W))
    kb[0, 0, :2] = -np.inf
    kb[B - 1, heads - 1] = -np.inf
    return kb


def _problem(dtype, border, seed=0, shape=SHAPE, bias=True):
    """Inputs rounded to ``dtype`` (so the float64 oracle sees the same numbers)."""
    rng = np.random.default_rng(seed)
    B, heads, dqk, dv, H, W = shape
    table = (heads,) + ((2 * KERNEL - 1,) * 2 if border == "shift" else (KERNEL,) * 2)
    x = dict(q=rng.standard_normal((B, heads * dqk, H, W)),
             k=rng.standard_normal((B, heads * dqk, H, W)),
             v=rng.standard_normal((B, heads * dv, H, W)),
             bias=rng.standard_normal(table) if bias else None,
             key_bias=_key_bias(rng, B, heads, H, W),
             grad=rng.standard_normal((B, heads * dv, H, W)))
    return {n: None if a is None else a.astype(dtype) for n, a in x.items()}


@functools.lru_cache(maxsize=None)
def _oracle(similarity, border, dtype_name):
    """Oracle forward, backward and logits on the rounded inputs (cached across seeds)."""
    x = {n: None if a is None else a.astype(np.float64)
         for n, a in _problem(_dtype(dtype_name), border).items()}
    kw = dict(bias=x["bias"], scale=SCALE, border=border, similarity=similarity,
              key_bias=x["key_bias"])
    out, lse = oracle.attention(x["q"], x["k"], x["v"], SHAPE[1], KERNEL, **kw)
    grads = oracle.attention_backward(x["grad"], x["q"], x["k"], x["v"], SHAPE[1], KERNEL, **kw)
    logits = oracle.qk(x["q"], x["k"], SHAPE[1], KERNEL, **kw)
    # Nonzero everywhere: the backward must ignore it at masked slots and removed keys.
    grad_logits = np.random.default_rng(7).standard_normal(logits.shape)
    qk_grads = oracle.qk_backward(grad_logits, x["q"], x["k"], SHAPE[1], KERNEL, **kw)
    return out, lse, grads, logits, grad_logits, qk_grads


def _check_against_oracle(backend, similarity, border, dtype_name):
    dtype = _dtype(dtype_name, backend)
    tol = ATOL[dtype_name]
    x = _problem(dtype, border)
    a = Arrays(backend)
    d = {n: a.put(v) for n, v in x.items()}
    want_out, want_lse, want_grads, want_logits, grad_logits, want_qk = _oracle(similarity, border, dtype_name)
    kw = dict(bias=d["bias"], scale=SCALE, border=border, similarity=similarity, key_bias=d["key_bias"],
              backend=backend)

    out, lse = cl.local_attention2d(d["q"], d["k"], d["v"], SHAPE[1], KERNEL, return_lse=True, **kw)
    out, lse = Arrays.get(out).astype(np.float64), Arrays.get(lse).astype(np.float64)
    empty = np.isneginf(want_lse)
    assert empty.any() and not empty.all()                # the problem has empty windows
    np.testing.assert_array_equal(np.isneginf(lse), empty, err_msg="lse = -inf exactly where empty")
    assert_close(out, want_out, tol, "out")
    assert (out[np.repeat(empty, SHAPE[3], axis=1)] == 0).all()   # exactly 0 where empty
    assert_close(np.where(empty, 0, lse), np.where(empty, 0, want_lse), tol, "lse")

    got = cl.local_attention2d_backward(d["grad"], d["q"], d["k"], d["v"], a.put(out.astype(dtype)),
                                        a.put(lse.astype(G.lse_dtype(dtype))), SHAPE[1], KERNEL, **kw)
    for name, g, w in zip(got._fields, got, want_grads):
        if name == "rel":
            assert g is None and w is None
            continue
        g = Arrays.get(g)
        assert g.dtype == dtype, name
        assert_close(g.astype(np.float64), w, 4 * tol, f"attention d{name}")
    # Removed keys (key_bias -inf) get gradient 0, their values too: nobody attends them.
    removed = np.isneginf(x["key_bias"].astype(np.float64))
    assert (Arrays.get(got.key_bias)[removed] == 0).all()
    assert (Arrays.get(got.v)[np.repeat(removed, SHAPE[3], axis=1)] == 0).all()

    logits = Arrays.get(cl.local_qk2d(d["q"], d["k"], SHAPE[1], KERNEL, **kw)).astype(np.float64)
    np.testing.assert_array_equal(np.isneginf(logits), np.isneginf(want_logits), err_msg="logits -inf")
    finite = np.isfinite(want_logits)
    assert_close(np.where(finite, logits, 0), np.where(finite, want_logits, 0), tol, "logits")
    got = cl.local_qk2d_backward(a.put(grad_logits.astype(dtype)), d["q"], d["k"], SHAPE[1], KERNEL, **kw)
    for name, g, w in zip(got._fields, got, want_qk):
        if w is not None:
            assert_close(Arrays.get(g).astype(np.float64), w, 4 * tol, f"qk d{name}")


_CASES = [pytest.param(s, b, d, id=f"{s}-{b}-{d}") for s, b, d in itertools.product(SIMILARITIES, BORDERS, DTYPES)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the oracle's own exp(-inf)
@pytest.mark.parametrize("similarity,border,dtype", _CASES)
def test_reference_matches_oracle(similarity, border, dtype):
    _check_against_oracle("numpy", similarity, border, dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("similarity,border,dtype", _CASES)
def test_sim_kernels_match_oracle(sim_seed, similarity, border, dtype):
    _require("sim")
    _check_against_oracle("sim", similarity, border, dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("similarity,border,dtype", _CASES)
def test_cupy_kernels_match_oracle(similarity, border, dtype):
    _require("cupy")
    _check_against_oracle("cupy", similarity, border, dtype)


@pytest.mark.parametrize("backend", [pytest.param("numpy", id="numpy"), *BACKENDS])
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_strided_dilated_windows_match_oracle(backend, similarity):
    """A strided, dilated, rectangular window (queries only at window centres)."""
    _require(backend) if backend != "numpy" else None
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 4, 7, 9)) for _ in range(3))
    kb = rng.standard_normal((1, 2, 7, 9))
    kb[0, 1, 3:, 4:] = -np.inf
    kw = dict(kernel_size=(3, 5), dilation=(2, 1), stride=(2, 3), border="zeros", similarity=similarity,
              scale=0.5)
    a = Arrays(backend)
    out, lse = cl.local_attention2d(a.put(q), a.put(k), a.put(v), 2, key_bias=a.put(kb), return_lse=True,
                                    backend=backend, **kw)
    want_out, want_lse = oracle.attention(q, k, v, 2, key_bias=kb, **kw)
    assert_close(Arrays.get(out), want_out, ATOL["float64"], "out")
    grad = rng.standard_normal(want_out.shape)
    got = cl.local_attention2d_backward(a.put(grad), a.put(q), a.put(k), a.put(v), out, lse, 2,
                                        key_bias=a.put(kb), backend=backend, **kw)
    want = oracle.attention_backward(grad, q, k, v, 2, key_bias=kb, **kw)
    for name, g, w in zip(got._fields, got, want):
        if w is not None:
            assert_close(Arrays.get(g), w, ATOL["float64"], name)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(), st.sampled_from(SIMILARITIES), st.floats(0.0, 0.6))
def test_random_problems_match_oracle(p, similarity, removed):
    """Any window (stride, dilation, rectangular, every border), any similarity, a random
    share of removed keys: the reference, and the kernels on sim, against the oracle."""
    x = make_inputs(p["B"], p["heads"], p["dqk"], p["dv"], p["H"], p["W"], p["kernel"],
                    p["border"], p["bias"], p["rel"] and similarity == "dot", p["seed"])
    rng = np.random.default_rng(p["seed"])
    kb = rng.standard_normal((p["B"], p["heads"], p["H"], p["W"]))
    kb[rng.random(kb.shape) < removed] = -np.inf
    kw = dict(bias=x.bias, rel=x.rel, scale=p["scale"], dilation=p["dilation"], stride=p["stride"],
              border=p["border"], similarity=similarity, key_bias=kb)
    want_out, want_lse = oracle.attention(x.q, x.k, x.v, p["heads"], p["kernel"], **kw)
    grad = rng.standard_normal(want_out.shape)
    want = oracle.attention_backward(grad, x.q, x.k, x.v, p["heads"], p["kernel"], **kw)
    for backend in ("numpy", "sim"):
        if backend == "sim" and not backend_status("sim")[0]:
            continue
        out, lse = cl.local_attention2d(x.q, x.k, x.v, p["heads"], p["kernel"], return_lse=True,
                                        backend=backend, **kw)
        assert_close(out, want_out, ATOL["float64"], f"{backend} out")
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(want_lse))
        assert_close(np.where(np.isinf(lse), 0, lse), np.where(np.isinf(want_lse), 0, want_lse),
                     ATOL["float64"], f"{backend} lse")
        got = cl.local_attention2d_backward(grad, x.q, x.k, x.v, out, lse, p["heads"], p["kernel"],
                                            backend=backend, **kw)
        for name, g, w in zip(got._fields, got, want):
            if w is not None:
                assert_close(g, w, ATOL["float64"], f"{backend} d{name}")


# ---------------------------------------------------------------------------------------
# Finite differences (float64), subgradients at the kinks
# ---------------------------------------------------------------------------------------

def _fd_check(loss, analytic, x, rng, entries=6):
    """Central differences at a few random finite entries of ``x`` against ``analytic``."""
    finite = np.flatnonzero(np.isfinite(x))
    picked = rng.choice(finite, size=min(entries, finite.size), replace=False)
    fd = central_difference(loss, x, entries=picked).reshape(-1)[picked]
    got = analytic.reshape(-1)[picked]
    assert np.all(np.abs(got - fd) <= 1e-6 * np.maximum(1.0, np.abs(fd))), (picked, got, fd)


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_gradients_match_finite_differences(similarity, border):
    """Every input, key_bias with a -inf region and fully masked windows included."""
    x = _problem(np.float64, border, seed=3, shape=(2, 2, 2, 2, 4, 5))
    weight = x["grad"][:, :, :4, :5]
    kw = dict(bias=x["bias"], scale=SCALE, border=border, similarity=similarity, key_bias=x["key_bias"])

    def loss():
        return float((cl.local_attention2d(x["q"], x["k"], x["v"], 2, KERNEL, **kw) * weight).sum())

    out, lse = cl.local_attention2d(x["q"], x["k"], x["v"], 2, KERNEL, return_lse=True, **kw)
    got = cl.local_attention2d_backward(weight, x["q"], x["k"], x["v"], out, lse, 2, KERNEL, **kw)
    rng = np.random.default_rng(0)
    for name in ("q", "k", "v", "bias", "key_bias"):
        _fd_check(loss, getattr(got, name), x[name], rng)
    assert (got.key_bias[np.isneginf(x["key_bias"])] == 0).all()
    if border != "zeros":   # (with zeros, out-of-image slots keep a border window alive)
        assert np.isneginf(lse[-1, -1]).all() and (out[-1, -2:] == 0).all()

    # local_qk2d: a loss over the finite logits.
    grad_logits = np.random.default_rng(1).standard_normal((2, 2, 9, 4, 5))
    logits = cl.local_qk2d(x["q"], x["k"], 2, KERNEL, **kw)
    got = cl.local_qk2d_backward(grad_logits, x["q"], x["k"], 2, KERNEL, **kw)

    def qk_loss():
        z = cl.local_qk2d(x["q"], x["k"], 2, KERNEL, **kw)
        return float(np.where(np.isinf(logits), 0, z * grad_logits).sum())

    for name in ("q", "k", "bias", "key_bias"):
        _fd_check(qk_loss, getattr(got, name), x[name], rng)


@pytest.mark.parametrize("backend", [pytest.param("numpy", id="numpy"), *BACKENDS])
def test_subgradient_of_abs_is_zero_at_zero(backend):
    """q == k and q == 0 (the kinks of |x|) get sign(0) = 0, as in the oracle."""
    _require(backend) if backend != "numpy" else None
    rng = np.random.default_rng(8)
    q = rng.standard_normal((1, 2, 4, 4))
    k = q.copy()
    k[:, :, ::2] = rng.standard_normal((1, 2, 2, 4))
    q[0, 0, 1, 1] = 0.0
    v = rng.standard_normal((1, 2, 4, 4))
    a = Arrays(backend)
    for similarity in ("neg_abs", "neg_abs_normalized", "neg_square_normalized"):
        out, lse = cl.local_attention2d(a.put(q), a.put(k), a.put(v), 2, 3, similarity=similarity,
                                        return_lse=True, backend=backend)
        got = cl.local_attention2d_backward(a.put(v), a.put(q), a.put(k), a.put(v), out, lse, 2, 3,
                                            similarity=similarity, backend=backend)
        want = oracle.attention_backward(v, q, k, v, 2, 3, similarity=similarity)
        for name in ("q", "k", "v"):
            assert_close(Arrays.get(getattr(got, name)), want[got._fields.index(name)], ATOL["float64"],
                         f"{similarity} d{name}")


# ---------------------------------------------------------------------------------------
# Empty windows and padding masks
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [pytest.param("numpy", id="numpy"), *BACKENDS])
@pytest.mark.parametrize("dtype,stride", [("float32", 1), ("float32", 2), ("float64", 1)])
def test_windows_without_slots_give_zero_and_minus_inf(backend, dtype, stride):
    """bias -inf everywhere in one head (the dot product's fast path takes float32 with
    stride 1): out 0, lse -inf, gradients 0 there; the other head is untouched."""
    _require(backend) if backend != "numpy" else None
    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal((1, 4, 7, 8)).astype(dtype) for _ in range(3))
    bias = rng.standard_normal((2, 3, 3)).astype(dtype)
    bias[1] = -np.inf
    a = Arrays(backend)
    kw = dict(kernel_size=3, stride=stride, backend=backend)
    out, lse = cl.local_attention2d(a.put(q), a.put(k), a.put(v), 2, bias=a.put(bias), return_lse=True, **kw)
    out, lse = Arrays.get(out), Arrays.get(lse)
    assert (out[:, 2:] == 0).all() and np.isneginf(lse[:, 1]).all()
    want_out, want_lse = oracle.attention(q, k, v, 2, 3, bias=bias, stride=stride)
    assert_close(out, want_out, ATOL[dtype], "out")
    grad = rng.standard_normal(out.shape).astype(dtype)
    got = cl.local_attention2d_backward(a.put(grad), a.put(q), a.put(k), a.put(v), a.put(out), a.put(lse), 2,
                                        bias=a.put(bias), **kw)
    want = oracle.attention_backward(grad, q, k, v, 2, 3, bias=bias, stride=stride)
    for name, g, w in zip(got._fields, got, want):
        if w is not None:
            g = Arrays.get(g)
            assert np.isfinite(g).all(), name
            assert_close(g, w, 4 * ATOL[dtype], name)
    assert (Arrays.get(got.bias)[1] == 0).all() and (Arrays.get(got.v)[:, 2:] == 0).all()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", [pytest.param("numpy", id="numpy"), *BACKENDS])
def test_nan_in_key_bias_propagates(backend):
    _require(backend) if backend != "numpy" else None
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((1, 2, 6, 6)) for _ in range(3))
    kb = np.zeros((1, 1, 6, 6))
    kb[0, 0, 0, 0] = np.nan
    a = Arrays(backend)
    out, lse = cl.local_attention2d(a.put(q), a.put(k), a.put(v), 1, 3, key_bias=a.put(kb),
                                    similarity="neg_square", return_lse=True, backend=backend)
    nan = np.zeros((6, 6), bool)
    nan[:2, :2] = True                     # the windows that hold pixel (0, 0)
    np.testing.assert_array_equal(np.isnan(Arrays.get(out)[0, 0]), nan)
    np.testing.assert_array_equal(np.isnan(Arrays.get(lse)[0, 0]), nan)


def _removed_keys_problem(seed, dtype, border):
    """Inputs whose removed keys (key_bias -inf) hold NaN and +-inf in k and v, and the
    same inputs with those k and v set to 0: an independent statement of "takes no part"."""
    rng = np.random.default_rng(seed)
    B, heads, dqk, dv, H, W = SHAPE
    x = dict(q=rng.standard_normal((B, heads * dqk, H, W)), k=rng.standard_normal((B, heads * dqk, H, W)),
             v=rng.standard_normal((B, heads * dv, H, W)), bias=rng.standard_normal((heads,) + (2 * KERNEL - 1 if border == "shift" else KERNEL,) * 2),
             key_bias=rng.standard_normal((B, heads, H, W)), grad=rng.standard_normal((B, heads * dv, H, W)))
    kb = x["key_bias"]
    kb[0, 0, 0, :3] = -np.inf          # the image corner and edge: windows with masked slots too
    kb[0, 1, 2, 2:4] = -np.inf         # the interior
    kb[1, 0, 1:4, 1:4] = -np.inf       # a block that empties the window at its centre
    kb[1, 1, 4, 5] = -np.inf
    removed = np.isneginf(kb)
    zeroed = {n: a.copy() for n, a in x.items()}
    for name, per_head in (("k", dqk), ("v", dv)):
        at = np.repeat(removed, per_head, axis=1)
        zeroed[name][at] = 0.0
        poison = np.resize(np.array([np.nan, np.inf, -np.inf]), int(at.sum()))
        x[name][at] = poison           # NaN, inf and -inf, in every channel of a removed key
    cast = lambda d: {n: a.astype(dtype) for n, a in d.items()}   # noqa: E731
    return cast(x), cast(zeroed), removed


def _removed_keys_results(backend, x, border, similarity):
    """Forward, backward, logits and their backward of one backend as NumPy arrays."""
    a = Arrays(backend)
    d = {n: a.put(v) for n, v in x.items()}
    kw = dict(bias=d["bias"], scale=SCALE, border=border, similarity=similarity, key_bias=d["key_bias"],
              backend=backend)
    out, lse = cl.local_attention2d(d["q"], d["k"], d["v"], SHAPE[1], KERNEL, return_lse=True, **kw)
    grads = cl.local_attention2d_backward(d["grad"], d["q"], d["k"], d["v"], out, lse, SHAPE[1], KERNEL, **kw)
    logits = cl.local_qk2d(d["q"], d["k"], SHAPE[1], KERNEL, **kw)
    grad_logits = np.random.default_rng(3).standard_normal(logits.shape).astype(x["q"].dtype)
    qk_grads = cl.local_qk2d_backward(a.put(grad_logits), d["q"], d["k"], SHAPE[1], KERNEL, **kw)
    res = {"out": out, "lse": lse, "logits": logits}
    res.update({f"attention d{n}": g for n, g in zip(grads._fields, grads) if g is not None})
    res.update({f"qk d{n}": g for n, g in zip(qk_grads._fields, qk_grads) if g is not None})
    return {n: Arrays.get(v) for n, v in res.items()}


# The reference's two chunk paths (every slot at once, the per-slot loop), then the kernels.
_REFERENCE_PATHS = [pytest.param("numpy", id="numpy"), pytest.param("numpy-loop", id="numpy-loop")]


@pytest.mark.parametrize("backend", [*_REFERENCE_PATHS, *BACKENDS])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_removed_keys_take_no_part(backend, similarity, border, dtype, monkeypatch):
    """docs/contract.md "Per-key logit": NaN and inf in k and v at keys with key_bias -inf
    reach nothing. Every result equals, value for value, the result with those k and v set
    to 0; d key_bias, dk and dv are exactly 0 there; nothing is NaN."""
    all_slots = []
    if backend.startswith("numpy"):
        monkeypatch.setattr(N, "_ALL_SLOTS", backend == "numpy")
        original = N._all_logits
        monkeypatch.setattr(N, "_all_logits", lambda *a, **kw: all_slots.append(1) or original(*a, **kw))
        backend = "numpy"
    else:
        _require(backend)
    x, zeroed, removed = _removed_keys_problem(4, np.dtype(dtype), border)
    got = _removed_keys_results(backend, x, border, similarity)
    want = _removed_keys_results(backend, zeroed, border, similarity)
    if backend == "numpy":   # the path the parameter names ran
        assert bool(all_slots) == N._ALL_SLOTS
    for name, g in got.items():
        assert not np.isnan(g).any(), name
        np.testing.assert_array_equal(g, want[name], err_msg=name)
    for grad in ("attention", "qk"):
        assert (got[f"{grad} dkey_bias"][removed] == 0).all()
        assert (got[f"{grad} dk"][np.repeat(removed, SHAPE[2], axis=1)] == 0).all()
    assert (got["attention dv"][np.repeat(removed, SHAPE[3], axis=1)] == 0).all()
    # And the zeroed problem is what the oracle (which never reads a removed key) gives.
    if dtype == "float64":
        kw = dict(bias=x["bias"], scale=SCALE, border=border, similarity=similarity, key_bias=x["key_bias"])
        want_out, _ = oracle.attention(x["q"], x["k"], x["v"], SHAPE[1], KERNEL, **kw)
        assert_close(got["out"], want_out, ATOL[dtype], "out against the oracle")
        want_grads = oracle.attention_backward(x["grad"], x["q"], x["k"], x["v"], SHAPE[1], KERNEL, **kw)
        for name, w in zip(("q", "k", "v", "bias", "rel", "key_bias"), want_grads):
            if w is not None:
                assert_close(got[f"attention d{name}"], w, 4 * ATOL[dtype], f"d{name} against the oracle")


@pytest.mark.parametrize("backend", [*_REFERENCE_PATHS, *BACKENDS])
def test_removed_key_with_nan_value_reaches_nothing_but_nan_elsewhere_does(backend, monkeypatch):
    """The reviewer's case: one head, 4x4, k = 3, v NaN at a key with key_bias -inf: no
    output and no gradient is NaN and d key_bias is 0 there. The same NaN at a kept key
    (key_bias 0) reaches the four windows that hold it."""
    if backend.startswith("numpy"):
        monkeypatch.setattr(N, "_ALL_SLOTS", backend == "numpy")
        backend = "numpy"
    else:
        _require(backend)
    rng = np.random.default_rng(6)
    q, k, v, grad = (rng.standard_normal((1, 2, 4, 4)) for _ in range(4))
    v[0, 0, 0, 0] = np.nan
    a = Arrays(backend)
    for kept in (False, True):
        kb = np.zeros((1, 1, 4, 4))
        kb[0, 0, 0, 0] = 0.0 if kept else -np.inf
        out, lse = cl.local_attention2d(a.put(q), a.put(k), a.put(v), 1, 3, key_bias=a.put(kb), return_lse=True,
                                        backend=backend)
        g = cl.local_attention2d_backward(a.put(grad), a.put(q), a.put(k), a.put(v), out, lse, 1, 3,
                                          key_bias=a.put(kb), backend=backend)
        nan = np.isnan(Arrays.get(out)[0])
        if kept:
            want = np.zeros((2, 4, 4), bool)
            want[0, :2, :2] = True         # value channel 0 of the windows holding (0, 0)
            np.testing.assert_array_equal(nan, want)
        else:
            assert not nan.any()
            assert not any(np.isnan(Arrays.get(x)).any() for x in g if x is not None)
            assert Arrays.get(g.key_bias)[0, 0, 0, 0] == 0 and (Arrays.get(g.v)[0, :, 0, 0] == 0).all()


def _padded_pair(rng, heads, dqk, dv, sizes, pad_to):
    """Two images of different sizes zero-padded into one batch, and their key_bias mask."""
    H, W = pad_to
    arrays = {n: np.zeros((2, heads * c, H, W)) for n, c in (("q", dqk), ("k", dqk), ("v", dv))}
    key_bias = np.full((2, heads, H, W), -np.inf)
    alone = []
    for b, (h, w) in enumerate(sizes):
        own = {n: rng.standard_normal((1, a.shape[1], h, w)) for n, a in arrays.items()}
        for n, a in arrays.items():
            a[b, :, :h, :w] = own[n][0]
        key_bias[b, :, :h, :w] = 0
        alone.append(own)
    return arrays, key_bias, alone


@pytest.mark.parametrize("backend", [pytest.param("numpy", id="numpy"), *BACKENDS])
@pytest.mark.parametrize("similarity", ["dot", "neg_square"])
def test_padding_mask_equals_each_image_alone(backend, similarity):
    """border="mask": with key_bias -inf on the padding, each image's own pixels get what
    the image gives alone (outputs, and gradients of a loss on the own pixels)."""
    _require(backend) if backend != "numpy" else None
    rng = np.random.default_rng(21)
    sizes = [(5, 7), (7, 4)]
    x, key_bias, alone = _padded_pair(rng, 2, 3, 2, sizes, (7, 7))
    a = Arrays(backend)
    kw = dict(kernel_size=3, border="mask", similarity=similarity, backend=backend)
    out, lse = cl.local_attention2d(a.put(x["q"]), a.put(x["k"]), a.put(x["v"]), 2, key_bias=a.put(key_bias),
                                    return_lse=True, **kw)
    grad = rng.standard_normal(out.shape)
    for b, (h, w) in enumerate(sizes):   # the loss sees each image's own pixels only
        grad[b, :, h:] = 0
        grad[b, :, :, w:] = 0
    g = cl.local_attention2d_backward(a.put(grad), a.put(x["q"]), a.put(x["k"]), a.put(x["v"]), out, lse, 2,
                                      key_bias=a.put(key_bias), **kw)
    out = Arrays.get(out)
    for b, ((h, w), own) in enumerate(zip(sizes, alone)):
        o, s = cl.local_attention2d(own["q"], own["k"], own["v"], 2, return_lse=True, **kw)
        assert_close(out[b:b + 1, :, :h, :w], o, ATOL["float64"], f"image {b} out")
        ga = cl.local_attention2d_backward(grad[b:b + 1, :, :h, :w], own["q"], own["k"], own["v"], o, s, 2, **kw)
        for name in ("q", "k", "v"):
            assert_close(Arrays.get(getattr(g, name))[b:b + 1, :, :h, :w], getattr(ga, name), ATOL["float64"],
                         f"image {b} d{name}")
        # Padded keys are never attended: no gradient reaches them.
        assert (Arrays.get(g.k)[b, :, h:, :] == 0).all() and (Arrays.get(g.v)[b, :, :, w:] == 0).all()


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_bad_similarity_key_bias_and_rel_are_refused():
    q = np.zeros((1, 4, 5, 5))
    rel = np.zeros((2, 2, 3, 3))
    with pytest.raises(ValueError, match="similarity must be one of"):
        cl.local_attention2d(q, q, q, 2, 3, similarity="cosine")
    with pytest.raises(ValueError, match="rel .*similarity='dot' only"):
        cl.local_qk2d(q, q, 2, 3, rel=rel, similarity="neg_abs")
    with pytest.raises(ValueError, match=r"key_bias must have shape \(1, 2, 5, 5\)"):
        cl.local_attention2d(q, q, q, 2, 3, key_bias=np.zeros((1, 4, 5, 5)))
    with pytest.raises(TypeError, match="key_bias"):
        cl.local_attention2d(q, q, q, 2, 3, key_bias=np.zeros((1, 2, 5, 5), np.float32))
    with pytest.raises(ValueError, match="key_bias must have shape"):
        cl.local_relation2d(q, q[:, :2], q[:, :2], np.zeros((2, 3, 3)), 3, key_bias=np.zeros((2, 2, 5, 5)))
    with pytest.raises(ValueError, match="similarity must be one of"):
        cl.local_relation2d_backward(q, q, q[:, :2], q[:, :2], np.zeros((2, 3, 3)), q, np.zeros((1, 2, 5, 5)), 3,
                                     similarity="Dot")
