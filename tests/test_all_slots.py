"""The NumPy reference's two ways through a chunk: every slot at once (small chunks, issue
12 point 12) and the per-slot loop (chunks whose gathered slots would not fit the memory
budget). Both are forced here and checked against the scalar oracle (tests/oracle.py) and
against each other: every border x similarity, ``key_bias`` with a ``-inf`` region and a
(batch, head) whose keys are all removed (empty windows), stride and dilation, both dtypes
the reference accumulates in. A spy proves which path ran, so a test cannot pass on the
wrong one.
"""
import numpy as np
import pytest

import cupy_localrel as cl
from cupy_localrel import _geometry as G
from cupy_localrel._backends import _numpy as N
from tests import oracle
from tests.helpers import ATOL, assert_close

BORDERS = ("mask", "zeros", "shift")
PATHS = ("all_slots", "loop")
# (kernel, dilation, stride): plain, and a strided, dilated, non-square window.
WINDOWS = [(3, 1, 1), ((3, 5), (2, 1), (2, 1))]
B, HEADS, DQK, DV, H, W = 2, 2, 2, 3, 7, 8
SCALE = 0.7


@pytest.fixture
def path(request, monkeypatch):
    """Force one path and count the chunks each path computed."""
    monkeypatch.setattr(N, "_ALL_SLOTS", request.param == "all_slots")
    calls = {"all_slots": 0}
    for name in ("_all_logits", "_all_weighted_sum", "_all_av_grads", "_all_qk_grads"):
        original = getattr(N, name)

        def counted(*args, _original=original, **kwargs):
            calls["all_slots"] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(N, name, counted)
    return request.param, calls


def _check_path(path, calls):
    name, counted = path, calls["all_slots"]
    assert (counted > 0) == (name == "all_slots"), f"{name} path: {counted} all-slots chunks"


def _table(kernel, border):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return (2 * kh - 1, 2 * kw - 1) if border == "shift" else (kh, kw)


def _inputs(border, kernel, similarity, dtype, seed=0):
    rng = np.random.default_rng(seed)
    kb = rng.standard_normal((B, HEADS, H, W))
    kb[0, 0, :2] = -np.inf            # a removed region
    kb[B - 1, HEADS - 1] = -np.inf    # every key of one (batch, head): empty windows
    table = _table(kernel, border)
    x = dict(q=rng.standard_normal((B, HEADS * DQK, H, W)),
             k=rng.standard_normal((B, HEADS * DQK, H, W)),
             v=rng.standard_normal((B, HEADS * DV, H, W)),
             bias=rng.standard_normal((HEADS, *table)),
             rel=rng.standard_normal((HEADS, DQK, *table)) if similarity == "dot" else None,
             key_bias=kb)
    return {n: None if a is None else a.astype(dtype) for n, a in x.items()}


def _window_kwargs(window, border):
    kernel, dilation, stride = window
    return dict(kernel_size=kernel, dilation=dilation, stride=stride, border=border)


CASES = [(border, sim, window) for border in BORDERS for sim in G.SIMILARITIES
         for window in WINDOWS]


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("border,similarity,window", CASES,
                         ids=[f"{b}-{s}-{'plain' if w[0] == 3 else 'strided'}"
                              for b, s, w in CASES])
def test_attention_both_paths_match_the_oracle(path, border, similarity, window):
    name, calls = path
    x = _inputs(border, window[0], similarity, np.float64)
    win = _window_kwargs(window, border)
    kw = dict(bias=x["bias"], rel=x["rel"], scale=SCALE, similarity=similarity,
              key_bias=x["key_bias"], **win)
    out, lse = cl.local_attention2d(x["q"], x["k"], x["v"], HEADS, return_lse=True,
                                    backend="numpy", **kw)
    grad = np.random.default_rng(3).standard_normal(out.shape)
    got = cl.local_attention2d_backward(grad, x["q"], x["k"], x["v"], out, lse, HEADS,
                                        backend="numpy", **kw)
    _check_path(name, calls)

    want_out, want_lse = oracle.attention(x["q"], x["k"], x["v"], HEADS, **kw)
    want = oracle.attention_backward(grad, x["q"], x["k"], x["v"], HEADS, **kw)
    tol = ATOL["float64"]
    assert_close(out, want_out, tol, "out")
    empty = np.isneginf(want_lse)
    assert empty.any() and np.array_equal(np.isneginf(lse), empty)   # empty windows: lse -inf
    assert_close(lse[~empty], want_lse[~empty], tol, "lse")
    for label, g, w in zip(("q", "k", "v", "bias", "rel", "key_bias"), got, want):
        if w is None:
            assert g is None, label
            continue
        assert_close(g, w, tol, label)


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("window", WINDOWS, ids=["plain", "strided"])
def test_unfused_halves_both_paths_match_the_oracle(path, border, window):
    """``local_qk2d``/``local_av2d`` and their gradients; the weights hold ``inf`` and NaN at
    every slot, and invalid slots must still add nothing."""
    name, calls = path
    x = _inputs(border, window[0], "dot", np.float64, seed=1)
    win = _window_kwargs(window, border)
    kw = dict(bias=x["bias"], rel=x["rel"], scale=SCALE, key_bias=x["key_bias"], **win)
    logits = cl.local_qk2d(x["q"], x["k"], HEADS, backend="numpy", **kw)
    want_logits = oracle.qk(x["q"], x["k"], HEADS, **kw)
    finite = np.isfinite(want_logits)
    assert np.array_equal(np.isfinite(logits), finite)
    assert_close(logits[finite], want_logits[finite], ATOL["float64"], "logits")
    g = np.random.default_rng(5).standard_normal(logits.shape)
    got = cl.local_qk2d_backward(g, x["q"], x["k"], HEADS, backend="numpy", **kw)
    want = oracle.qk_backward(g, x["q"], x["k"], HEADS, **kw)
    for label, a, b in zip(("q", "k", "bias", "rel"), got, want):
        assert_close(a, b, ATOL["float64"], label)

    attn = np.random.default_rng(6).random(logits.shape)
    valid = cl.local_qk2d(np.ones_like(x["q"]), np.ones_like(x["k"]), HEADS, backend="numpy",
                          border="mask", **{k: v for k, v in win.items() if k != "border"})
    if border != "shift":  # weights the invalid slots must ignore
        attn = np.where(np.isfinite(valid), attn, np.inf)
    out = cl.local_av2d(attn, x["v"], backend="numpy", **win)
    assert np.isfinite(out).all()
    assert_close(out, oracle.av(np.where(np.isfinite(attn), attn, 0), x["v"], **win),
                 ATOL["float64"], "av out")
    go = np.random.default_rng(8).standard_normal(out.shape)
    attn0 = np.where(np.isfinite(attn), attn, 0)
    got_av = cl.local_av2d_backward(go, attn0, x["v"], backend="numpy", **win)
    want_av = oracle.av_backward(go, attn0, x["v"], **win)
    assert_close(got_av.attn, want_av[0], ATOL["float64"], "dattn")
    assert_close(got_av.v, want_av[1], ATOL["float64"], "dv")
    _check_path(name, calls)


@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("similarity", ["dot", "neg_square_normalized"])
def test_paths_agree_in_float32(border, similarity, monkeypatch):
    """float32 inputs accumulate in float32 on both paths; they agree to the contract."""
    x = _inputs(border, 3, similarity, np.float32, seed=2)
    kw = dict(kernel_size=3, bias=x["bias"], rel=x["rel"], scale=SCALE, border=border,
              similarity=similarity, key_bias=x["key_bias"], backend="numpy")
    grad = np.random.default_rng(4).standard_normal((B, HEADS * DV, H, W)).astype(np.float32)
    results = {}
    for flag in (True, False):
        monkeypatch.setattr(N, "_ALL_SLOTS", flag)
        out, lse = cl.local_attention2d(x["q"], x["k"], x["v"], HEADS, return_lse=True, **kw)
        grads = cl.local_attention2d_backward(grad, x["q"], x["k"], x["v"], out, lse, HEADS, **kw)
        assert out.dtype == np.float32 and lse.dtype == np.float32
        results[flag] = [out, lse] + [g for g in grads if g is not None]
    for a, b in zip(results[True], results[False]):
        both = np.isfinite(b)
        assert np.array_equal(np.isfinite(a), both)
        assert_close(a[both], b[both], ATOL["float32"])


def test_memory_budget_chooses_the_path():
    """The budget decides: a row of this image with every slot gathered is more than 1 MiB,
    so under a 1 MiB budget every chunk loops over the slots, and under the default one the
    chunks gather every slot; the results agree."""
    rng = np.random.default_rng(9)
    q, k, v = (rng.standard_normal((1, 8, 10, 64)) for _ in range(3))
    grad = rng.standard_normal(v.shape)
    geo = G.qk_geometry(q, k, 1, 7, 1, 1, "zeros", None, None, None, v=v)

    def run():
        out, lse = cl.local_attention2d(q, k, v, 1, 7, border="zeros", return_lse=True,
                                        backend="numpy")
        return [out, lse, *cl.local_attention2d_backward(grad, q, k, v, out, lse, 1, 7,
                                                         border="zeros", backend="numpy")[:3]]
    assert all(c.all_slots for c in N._chunks(geo, 4 * 8 + 3 * 8))
    wide = run()
    old = cl.set_numpy_memory_budget(1 << 20)
    try:
        chunks = list(N._chunks(geo, 4 * 8 + 3 * 8))
        assert not any(c.all_slots for c in chunks) and len(chunks) > 1
        narrow = run()
    finally:
        cl.set_numpy_memory_budget(old)
    for a, b in zip(wide, narrow):
        assert_close(a, b, 1e-12)


@pytest.mark.parametrize("border", ["mask", "zeros"])
def test_centred_windows_gather_through_a_strided_view(border):
    """Centred windows are regular (a strided view of the zero-padded rows); shift windows
    at the border are not and gather by index. Either gather equals the slot-by-slot one."""
    rng = np.random.default_rng(10)
    for bd, regular in ((border, True), ("shift", False)):
        x = rng.standard_normal((1, 2, 3, 9, 11))
        q = np.zeros((1, 6, 9, 11))
        geo = G.qk_geometry(q, q, 2, (3, 5), (2, 1), (1, 2), bd, None, None, None)
        for c in N._chunks(geo, 4):
            w = N._window(geo, c)
            assert (w.regular is not None) == regular
            rows = x[..., c.in_rows, :]
            got = N._merge(N._gather_all(rows, geo, w), w)
            want = np.stack([N._gather(rows, s) for _, s in N._slots(geo, c)], axis=-3)
            np.testing.assert_array_equal(got, want)
