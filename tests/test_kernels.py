"""The CUDA kernels against the NumPy reference: on the CPU engine (``sim``) always, on the
GPU (``cupy``) when one is present.

Every op (fused attention forward/backward, qk and av forward/backward) x border x window
(stride, dilation, rectangular kernels) x dtype x optional bias/rel, on tiny shapes, under
two thread orders of the engine; the fast path's LR-Net and SASA configurations; the general
fused forward for the dtypes the fast path would take; bitwise-deterministic backward;
empty problems; inputs never modified.

Comparisons follow docs/contract.md: the float64 reference run on the same (rounded) inputs, max abs
error relative to max(1, max|reference|).
"""
import itertools

import numpy as np
import pytest

import cupy_localrel as cl
from cupy_localrel import _geometry as G
from cupy_localrel._backends import backend_status
from tests.helpers import ATOL, assert_close, attention_summands, table_shape

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

BORDERS = ("mask", "zeros", "shift")
# (kernel, dilation, stride) on a 7x9 image: valid for every border.
WINDOWS = [(3, 1, 1), ((3, 5), 1, 1), (3, 2, 1), (3, 1, 2), ((1, 3), (2, 1), (2, 3))]
DTYPES = ["float64", "float32", "float16", "bfloat16"]


# ---------------------------------------------------------------------------------------
# Backends under test
# ---------------------------------------------------------------------------------------

def _backend_params():
    params = []
    for name in ("sim", "cupy"):
        ok, why = backend_status(name)
        marks = [] if ok else [pytest.mark.skip(reason=f"backend {name!r} unavailable: {why}")]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


BACKENDS = _backend_params()
# Thread orders of the CPU engine (CUPY_LOCALREL_SIM_SEED): forward, and a seeded shuffle.
SEEDS = (0, 12345)


@pytest.fixture(params=SEEDS, ids=lambda s: f"seed{s}")
def sim_seed(request, monkeypatch):
    monkeypatch.setenv("CUPY_LOCALREL_SIM_SEED", str(request.param))
    return request.param


class Arrays:
    """Moves NumPy inputs to a backend's array kind and results back."""

    def __init__(self, backend):
        self.backend = backend
        if backend == "cupy":
            import cupy
            self.xp = cupy
        else:
            self.xp = np

    def put(self, x):
        return None if x is None else self.xp.asarray(x)

    @staticmethod
    def get(x):
        if x is None:
            return None
        return x.get() if hasattr(x, "get") else np.asarray(x)


def _dtype(name, backend="sim"):
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("ml_dtypes is not installed")
        if backend == "cupy":
            import cupy
            try:
                cupy.asarray(np.zeros(1, BF16))
            except Exception as exc:
                pytest.skip(f"this CuPy cannot hold bfloat16 arrays: {type(exc).__name__}: {exc}")
        return BF16
    return np.dtype(name)


def _inputs(B, heads, dqk, dv, H, W, kernel, border, with_bias, with_rel, dtype, seed):
    """Random inputs already rounded to ``dtype`` (so the float64 reference sees the same)."""
    rng = np.random.default_rng(seed)
    shape = table_shape(kernel, border)
    arrays = dict(q=rng.standard_normal((B, heads * dqk, H, W)),
                  k=rng.standard_normal((B, heads * dqk, H, W)),
                  v=rng.standard_normal((B, heads * dv, H, W)),
                  bias=rng.standard_normal((heads, *shape)) if with_bias else None,
                  rel=rng.standard_normal((heads, dqk, *shape)) if with_rel else None)
    return {n: None if a is None else a.astype(dtype) for n, a in arrays.items()}


def _f64(x):
    return None if x is None else np.asarray(x).astype(np.float64)


def _compare(got, want, dtype, name, summands=None):
    assert (got is None) == (want is None), name
    if want is None:
        return
    got = Arrays.get(got)
    assert_close(_f64(got), want, ATOL[dtype.name], name, summands=summands)


def _compare_logits(got, want, dtype, name):
    got, want = _f64(Arrays.get(got)), _f64(want)
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want), err_msg=name)
    assert_close(np.where(np.isinf(want), 0, got), np.where(np.isinf(want), 0, want), ATOL[dtype.name], name)


# ---------------------------------------------------------------------------------------
# Every op x border x window x dtype x bias/rel
# ---------------------------------------------------------------------------------------

def _cases():
    for border, window, dtype, extras in itertools.product(
            BORDERS, WINDOWS, DTYPES, [(False, False), (True, True)]):
        yield pytest.param(border, *window, dtype, *extras,
                           id=f"{border}-k{window[0]}-d{window[1]}-s{window[2]}-{dtype}"
                              f"{'-bias-rel' if extras[0] else ''}")


def _check_all_ops(backend, border, kernel, dilation, stride, dtype_name, with_bias, with_rel,
                   shape=(2, 2, 3, 5, 7, 9), seed=0, scale=0.7):
    dtype = _dtype(dtype_name, backend)
    B, heads, dqk, dv, H, W = shape
    x = _inputs(B, heads, dqk, dv, H, W, kernel, border, with_bias, with_rel, dtype, seed)
    r = {n: _f64(a) for n, a in x.items()}
    a = Arrays(backend)
    d = {n: a.put(v) for n, v in x.items()}
    copies = {n: None if v is None else v.copy() for n, v in x.items()}
    win = dict(kernel_size=kernel, dilation=dilation, stride=stride, border=border)
    extra = dict(bias=d["bias"], rel=d["rel"], scale=scale)
    ref_extra = dict(bias=r["bias"], rel=r["rel"], scale=scale)
    rng = np.random.default_rng(seed + 1)

    # fused attention: forward, backward (from our own out/lse, rounded as a user would hold them)
    out, lse = cl.local_attention2d(d["q"], d["k"], d["v"], heads, return_lse=True, backend=backend,
                                    **extra, **win)
    want_out, want_lse = cl.local_attention2d(r["q"], r["k"], r["v"], heads, return_lse=True,
                                              backend="numpy", **ref_extra, **win)
    assert Arrays.get(out).dtype == dtype and Arrays.get(lse).dtype == G.lse_dtype(dtype)
    _compare(out, want_out, dtype, "out")
    _compare(lse, want_lse, dtype, "lse")
    grad_out = rng.standard_normal(want_out.shape).astype(dtype)
    out_h, lse_h = Arrays.get(out), Arrays.get(lse)
    got = cl.local_attention2d_backward(a.put(grad_out), d["q"], d["k"], d["v"], out, lse, heads,
                                        backend=backend, **extra, **win)
    want = cl.local_attention2d_backward(_f64(grad_out), r["q"], r["k"], r["v"], _f64(out_h),
                                         _f64(lse_h), heads, backend="numpy", **ref_extra, **win)
    # gradients: tolerance scaled by the magnitude of their summands (docs/contract.md)
    summands = attention_summands(_f64(grad_out), r["q"], r["k"], r["v"], heads, **ref_extra,
                                  **win)
    for name in got._fields:
        _compare(getattr(got, name), getattr(want, name), dtype, f"attention d{name}",
                 summands[name])

    # local_qk2d
    logits = cl.local_qk2d(d["q"], d["k"], heads, backend=backend, **extra, **win)
    want_logits = cl.local_qk2d(r["q"], r["k"], heads, backend="numpy", **ref_extra, **win)
    _compare_logits(logits, want_logits, dtype, "logits")
    grad_logits = rng.standard_normal(want_logits.shape).astype(dtype)
    got = cl.local_qk2d_backward(a.put(grad_logits), d["q"], d["k"], heads, backend=backend, **extra, **win)
    want = cl.local_qk2d_backward(_f64(grad_logits), r["q"], r["k"], heads, backend="numpy",
                                  **ref_extra, **win)
    for name in got._fields:
        _compare(getattr(got, name), getattr(want, name), dtype, f"qk d{name}")

    # local_av2d (weights from a softmax, so magnitudes are realistic)
    attn = np.exp(np.where(np.isinf(want_logits), -np.inf, want_logits) - want_lse[:, :, None])
    attn = attn.astype(dtype)
    av = cl.local_av2d(a.put(attn), d["v"], backend=backend, **win)
    _compare(av, cl.local_av2d(_f64(attn), r["v"], backend="numpy", **win), dtype, "av out")
    got = cl.local_av2d_backward(a.put(grad_out), a.put(attn), d["v"], backend=backend, **win)
    want = cl.local_av2d_backward(_f64(grad_out), _f64(attn), r["v"], backend="numpy", **win)
    for name in got._fields:
        _compare(getattr(got, name), getattr(want, name), dtype, f"av d{name}")

    for n, v in d.items():   # inputs are never modified
        if v is not None:
            np.testing.assert_array_equal(Arrays.get(v), copies[n], err_msg=f"{n} was modified")


@pytest.mark.parametrize("border,kernel,dilation,stride,dtype,with_bias,with_rel", list(_cases()))
def test_all_ops_sim(sim_seed, border, kernel, dilation, stride, dtype, with_bias, with_rel):
    _require("sim")
    _check_all_ops("sim", border, kernel, dilation, stride, dtype, with_bias, with_rel)


@pytest.mark.parametrize("border,kernel,dilation,stride,dtype,with_bias,with_rel", list(_cases()))
def test_all_ops_cupy(border, kernel, dilation, stride, dtype, with_bias, with_rel):
    _require("cupy")
    _check_all_ops("cupy", border, kernel, dilation, stride, dtype, with_bias, with_rel)


def _require(backend):
    ok, why = backend_status(backend)
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")


# ---------------------------------------------------------------------------------------
# Fast path configurations, and the general path for the dtypes the fast path takes
# ---------------------------------------------------------------------------------------

FAST_SHAPES = {
    # LR-Net: Dqk = 1 per head, m = 8 value channels per head, k = 7, geometry prior as bias.
    "lrnet": dict(shape=(1, 2, 1, 8, 19, 21), kernel=7, with_bias=True, with_rel=False, scale=1.0),
    # SASA: Dqk = Dv = 16, relative embeddings, no scaling.
    "sasa": dict(shape=(1, 2, 16, 16, 11, 18), kernel=5, with_bias=False, with_rel=True, scale=1.0),
    # Dilated, rectangular, several tiles per plane with partial ones at the edges.
    "dilated": dict(shape=(1, 1, 3, 9, 19, 37), kernel=(5, 3), dilation=(2, 3), with_bias=True,
                    with_rel=True, scale=0.5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("config", sorted(FAST_SHAPES))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fast_path_configs(backend, config, border, dtype, sim_seed):
    c = FAST_SHAPES[config]
    _check_all_ops(backend, border, c["kernel"], c.get("dilation", 1), 1, dtype, c["with_bias"], c["with_rel"],
                   shape=c["shape"], scale=c["scale"])


# The staged halo's edges (localrel_common.cuh: ChunkLayout, stage_halo): tail chunks (nch < C,
# staged as 0 past nch; the rel chunk is not, so its reads stay guarded), odd W (planes of odd
# H*W: a half/bfloat16 pair's alignment changes from channel to channel and row to row, and
# interior tiles start at odd x0 = 16 - 3), and last tiles straddling the right and bottom edges.
TAIL_SHAPES = {
    # LR-Net config (CK=1, CV=8): Dv = 12 is one full value chunk and a tail of 4.
    "lrnet_tail": dict(shape=(1, 2, 3, 12, 13, 37), kernel=7, with_bias=True, with_rel=True),
    # With a full rel table, SASA's heads take CK = 8 (CV = 16) in every tiled kernel: Dqk = 12
    # (a tail after a full chunk) and Dv = 6, whose only chunk is a tail: its channels 6..15
    # would read the block's poisoned (NaN) shared memory if they were not staged as 0.
    "sasa_tail": dict(shape=(1, 1, 12, 6, 11, 35), kernel=5, with_bias=False, with_rel=True),
    # Without: CK = 16 in the forward and the key side (8 on the query side). Dqk = 20: a tail
    # of 4 after a full chunk of 16 (after two of 8 on the query side).
    "sasa_long_keys": dict(shape=(1, 1, 20, 6, 11, 35), kernel=5, with_bias=True, with_rel=False),
    # Dqk = 6: the only key chunk is a tail, so rel channels 6, 7 were never staged (poisoned):
    # the tail's rel reads must stay guarded. Dv = 20: a value tail after a full chunk.
    "sasa_short_keys": dict(shape=(1, 1, 6, 20, 9, 21), kernel=3, with_bias=True, with_rel=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("config", sorted(TAIL_SHAPES))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_fast_path_tail_chunks_and_odd_edges(backend, config, border, dtype, sim_seed):
    from cupy_localrel._backends import _kernel_ops
    _require(backend)
    c = TAIL_SHAPES[config]
    B, heads, dqk, dv, H, W = c["shape"]
    dt = _dtype(dtype, backend)
    x = _inputs(B, heads, dqk, dv, H, W, c["kernel"], border, c["with_bias"], c["with_rel"], dt, 3)
    geo = G.qk_geometry(x["q"], x["k"], heads, c["kernel"], 1, 1, border, x["bias"], x["rel"], None, v=x["v"])
    call = _kernel_ops._Call(_kernel_ops.Target(backend), geo, x["bias"], x["rel"])
    plan = _kernel_ops._tiled_config(geo, call)
    assert plan is not None and _kernel_ops._tiled_key_config(geo, call) is not None
    ck, cv = plan[:2]
    assert dv % cv and (dqk % ck or ck == 1)   # the shapes do make tail chunks
    _check_all_ops(backend, border, c["kernel"], 1, 1, dtype, c["with_bias"], c["with_rel"], shape=c["shape"],
                   scale=0.6)


@pytest.mark.parametrize("layout, dqk, rel, want", [
    # (CK, CV) of the forward, the query side and the key side (_kernel_ops.TILED_CONFIGS)
    ("lrnet", 1, None, [(1, 8)] * 3),
    ("sasa", 32, None, [(16, 16), (8, 16), (16, 16)]),
    ("sasa split rel", 32, "split", [(16, 16), (8, 16), (16, 16)]),
    ("sasa split rel, Dqk <= 4", 4, "split", [(16, 16), (8, 16), (16, 16)]),
    ("full rel", 32, "full", [(8, 16)] * 3),   # its rel chunk keeps 8 channels of the table
])
def test_tiled_channel_chunks_per_layout(layout, dqk, rel, want):
    from cupy_localrel._backends import _kernel_ops as K
    _require("sim")
    x = _inputs(1, 2, dqk, 8, 20, 20, 5, "mask", False, rel == "full", np.float32, 0)
    if rel == "split":
        half = np.zeros((2, dqk // 2, 5), np.float32)
        x["rel"] = G.SplitRel(half, half.copy())
    geo = G.qk_geometry(x["q"], x["k"], 2, 5, 1, 1, "mask", None, x["rel"], 1.0, v=x["v"])
    c = K._Call(K.Target("sim"), geo, None, x["rel"])
    th, tw = geo.table_shape
    plans = [K._tiled_config(geo, c), K._tiled_backward_config(geo, c, lambda b: 4 * (b[1] * th + b[0] * tw))[1],
             K._tiled_key_config(geo, c)[1]]
    assert [tuple(p[:2]) for p in plans] == want


# Register blocking of the tiled kernels' hot loops (localrel_common.cuh: RowPair): each
# thread takes two outputs of one tile column (rows 2i, 2i+1), merging the two windows' halo
# rows; the weighted sums for half the chunk's channels, the query-side logits (key chunks
# of C > 1, tiles at most 16 wide: the (16, 6) shapes here) for every other slot column.
# Tile heights that are odd keep one output per thread, and so do the logits with a full
# rel table (with_rel). Other block
# shapes than the shipped (16, 8) / (16, 8) or (16, 4): whole warps, even and odd heights, with odd H
# (a pair's second row outside the plane), dilation and tail chunks (Dqk = 12, Dv = 20).
# Row dilation 2 gives the two windows of a pair disjoint halo rows (only the merge's
# single-output branches run), column dilation 2 shared ones (the paired rows).
@pytest.mark.parametrize("dilation", [(2, 1), (1, 2)])
@pytest.mark.parametrize("with_rel", [True, False])
@pytest.mark.parametrize("border", BORDERS)
@pytest.mark.parametrize("blocks", [((32, 2), (32, 2)), ((32, 3), (32, 1)), ((16, 6), (16, 2))])
def test_fast_path_weighted_sums_over_block_shapes(border, blocks, with_rel, dilation, monkeypatch):
    from cupy_localrel._backends import _kernel_ops
    _require("sim")
    monkeypatch.setattr(_kernel_ops, "TILED_BLOCK", blocks[0])
    monkeypatch.setattr(_kernel_ops, "TILED_BWD_BLOCKS", (blocks[1],))
    shape = (1, 1, 12, 20, 11, 35)
    x = _inputs(*shape, (5, 3), border, True, with_rel, np.float32, 3)
    geo = G.qk_geometry(x["q"], x["k"], 1, (5, 3), dilation, 1, border, x["bias"], x["rel"], None, v=x["v"])
    call = _kernel_ops._Call(_kernel_ops.Target("sim"), geo, x["bias"], x["rel"])
    plan = _kernel_ops._tiled_config(geo, call)
    assert plan and _kernel_ops._tiled_key_config(geo, call)   # fast paths
    ck, cv = plan[:2]
    assert 12 % ck and 20 % cv   # tail chunks in both the key and the value phases
    _check_all_ops("sim", border, (5, 3), dilation, 1, "float32", True, with_rel, shape=shape, scale=0.6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("border", BORDERS)
def test_general_path_where_fast_path_would_run(backend, dtype, border):
    from cupy_localrel._backends import _kernel_ops
    target = _kernel_ops.Target(backend)
    dt = _dtype(dtype, backend)
    x = _inputs(2, 2, 3, 10, 9, 11, 5, border, True, True, dt, 5)
    geo = G.qk_geometry(x["q"], x["k"], 2, 5, 1, 1, border, x["bias"], x["rel"], None, v=x["v"])
    a = Arrays(backend)
    assert _kernel_ops._tiled_config(geo, _kernel_ops._Call(target, geo, x["bias"], x["rel"])) is not None
    out, lse = _kernel_ops.attention_forward(target, geo, *(a.put(x[n]) for n in ("q", "k", "v", "bias", "rel")),
                                             allow_tiled=False)
    r = {n: _f64(v) for n, v in x.items()}
    want_out, want_lse = cl.local_attention2d(r["q"], r["k"], r["v"], 2, 5, bias=r["bias"], rel=r["rel"],
                                              border=border, return_lse=True, backend="numpy")
    _compare(out, want_out, dt, "out")
    _compare(lse, want_lse, dt, "lse")
    grad = np.random.default_rng(6).standard_normal(want_out.shape).astype(dt)
    got = _kernel_ops.attention_backward(target, geo, a.put(grad), *(a.put(x[n]) for n in ("q", "k", "v")),
                                         out, lse, a.put(x["bias"]), a.put(x["rel"]), allow_tiled=False)
    want = cl.local_attention2d_backward(_f64(grad), r["q"], r["k"], r["v"], _f64(Arrays.get(out)),
                                         _f64(Arrays.get(lse)), 2, 5, bias=r["bias"], rel=r["rel"],
                                         border=border, backend="numpy")
    for name, g in zip(want._fields, got):
        _compare(g, getattr(want, name), dt, f"d{name}")


# ---------------------------------------------------------------------------------------
# Determinism, empty problems
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("border", ["zeros", "shift"])
@pytest.mark.parametrize("similarity", ["dot", "neg_abs_normalized"])
def test_backward_is_bitwise_deterministic(backend, border, similarity, monkeypatch):
    """The dot product on the fast paths; another similarity with key_bias on the general
    kernels (d key_bias gathered through the users tables, like dk)."""
    dot = similarity == "dot"
    x = _inputs(2, 2, 4, 8, 13, 17, 5, border, True, dot, np.float32, 9)
    a = Arrays(backend)
    d = {n: a.put(v) for n, v in x.items()}
    key_bias = None if dot else a.put(np.random.default_rng(2).standard_normal((2, 2, 13, 17)).astype(np.float32))
    kw = dict(kernel_size=5, bias=d["bias"], rel=d["rel"], border=border, backend=backend,
              similarity=similarity, key_bias=key_bias)
    out, lse = cl.local_attention2d(d["q"], d["k"], d["v"], 2, return_lse=True, **kw)
    grad = a.put(np.random.default_rng(1).standard_normal(out.shape).astype(np.float32))
    runs = []
    for seed in ("0", "777"):   # a different thread order must not change a bit either
        monkeypatch.setenv("CUPY_LOCALREL_SIM_SEED", seed)
        g1 = cl.local_attention2d_backward(grad, d["q"], d["k"], d["v"], out, lse, 2, **kw)
        g2 = cl.local_qk2d_backward(a.put(np.ones((2, 2, 25, 13, 17), np.float32)), d["q"], d["k"], 2, **kw)
        runs.append([Arrays.get(g) for g in (*g1, *g2) if g is not None])
    for first, second in zip(*runs):
        np.testing.assert_array_equal(first.view(np.uint32), second.view(np.uint32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_problems(backend):
    a = Arrays(backend)
    # B == 0: the public layer answers without launching.
    q = a.put(np.zeros((0, 4, 5, 6), np.float32))
    out, lse = cl.local_attention2d(q, q, q, 2, 3, return_lse=True, backend=backend)
    assert out.shape == (0, 4, 5, 6) and lse.shape == (0, 2, 5, 6)
    # heads * Dv == 0 reaches the kernels: out is empty, lse is real, gradients are right.
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 4, 5, 6)).astype(np.float32)
    v = np.zeros((1, 0, 5, 6), np.float32)
    out, lse = cl.local_attention2d(a.put(q), a.put(q), a.put(v), 2, 3, return_lse=True, backend=backend)
    want_out, want_lse = cl.local_attention2d(q, q, v, 2, 3, return_lse=True, backend="numpy")
    assert out.shape == (1, 0, 5, 6)
    assert_close(Arrays.get(lse), want_lse, ATOL["float32"])
    g = cl.local_attention2d_backward(a.put(np.zeros((1, 0, 5, 6), np.float32)), a.put(q), a.put(q),
                                      a.put(v), out, lse, 2, 3, backend=backend)
    assert g.v.shape == (1, 0, 5, 6)
    assert_close(Arrays.get(g.q), np.zeros_like(q), ATOL["float32"])
    av = cl.local_av2d(a.put(np.ones((1, 2, 9, 5, 6), np.float32)), a.put(v), 3, backend=backend)
    assert av.shape == (1, 0, 5, 6)
    dattn, dv = cl.local_av2d_backward(a.put(np.zeros((1, 0, 5, 6), np.float32)),
                                       a.put(np.ones((1, 2, 9, 5, 6), np.float32)), a.put(v), 3, backend=backend)
    assert dv.shape == (1, 0, 5, 6) and float(abs(Arrays.get(dattn)).max()) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    rng = np.random.default_rng(3)
    a = Arrays(backend)
    base = rng.standard_normal((2, 8, 9, 12)).astype(np.float32)
    q, k, v = base[:, 0:4, :, ::2], base[:, 4:8, :, ::2], base[:, 0:8:2, :, 1::2]
    dq, dk, dv = a.put(q), a.put(k), a.put(v)
    if backend == "cupy":   # keep them non-contiguous on the device too
        full = a.put(base)
        dq, dk, dv = full[:, 0:4, :, ::2], full[:, 4:8, :, ::2], full[:, 0:8:2, :, 1::2]
    got = cl.local_attention2d(dq, dk, dv, 2, 3, border="zeros", backend=backend)
    want = cl.local_attention2d(*(np.ascontiguousarray(x, np.float64) for x in (q, k, v)), 2, 3,
                                border="zeros", backend="numpy")
    assert_close(Arrays.get(got), want, ATOL["float32"])


def test_backend_status_names_the_missing_piece():
    ok, why = backend_status("sim")
    assert isinstance(ok, bool) and why
    ok, why = backend_status("cupy")
    assert isinstance(ok, bool) and why


# ---------------------------------------------------------------------------------------
# Large windows (the fast path and the big blocks no longer fit shared memory), and the
# papers' layers composed on top of the kernels
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("border", ["mask", "shift"])
def test_large_window(backend, dtype, border):
    _check_all_ops(backend, border, (11, 9), 1, 1, dtype, True, True, shape=(1, 1, 2, 3, 12, 13))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_huge_window_work_arrays_in_global_scratch(backend, dtype, monkeypatch):
    """A window whose backward work arrays leave shared memory no room for a warp runs from
    global scratch; a small scratch limit splits the grid into several launches, which
    changes no bit."""
    from cupy_localrel._backends import _kernel_ops
    kernel, shape = (17, 15), (2, 2, 2, 3, 9, 10)
    geo = G.qk_geometry(np.zeros((2, 4, 9, 10)), np.zeros((2, 4, 9, 10)), 2, kernel, 1, 1,
                        "mask", None, None, None)
    per_thread = 8 * (2 * geo.slots + 1)      # query_grad's arrays in float64
    assert _kernel_ops._work_arrays_plan(9, 10, lambda b: per_thread * b[0] * b[1])[2] > 0
    _check_all_ops(backend, "mask", kernel, 1, 1, dtype, True, True, shape=shape)

    x = _inputs(*shape[:4], *shape[4:], kernel, "mask", True, True, np.dtype(dtype), 3)
    a = Arrays(backend)
    d = {n: a.put(v) for n, v in x.items()}
    kw = dict(kernel_size=kernel, bias=d["bias"], rel=d["rel"], backend=backend)
    out, lse = cl.local_attention2d(d["q"], d["k"], d["v"], 2, return_lse=True, **kw)
    runs = []
    for limit in (_kernel_ops.SCRATCH_LIMIT, 20_000):
        monkeypatch.setattr(_kernel_ops, "SCRATCH_LIMIT", limit)
        runs.append([Arrays.get(g) for g in cl.local_attention2d_backward(
            out, d["q"], d["k"], d["v"], out, lse, 2, **kw)])
    for whole, split in zip(*runs):
        np.testing.assert_array_equal(whole, split)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the reference's own -inf - -inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,stride", [("float32", 1), ("float32", 2), ("float64", 1)])
def test_minus_inf_logits_weigh_zero(backend, dtype, stride):
    """A -inf bias entry gives its slot weight 0 on every path (the online softmax of the
    general kernel must not compute -inf - -inf); a head whose logits are all -inf has
    empty windows: out 0 and lse -inf, as the reference gives (docs/contract.md "Empty windows")."""
    dt = np.dtype(dtype)
    x = _inputs(1, 2, 2, 3, 7, 8, 3, "mask", True, False, dt, 12)
    x["bias"][0, 0, :] = -np.inf       # head 0: the top row of every window
    x["bias"][1] = -np.inf             # head 1: every slot
    a = Arrays(backend)
    kw = dict(kernel_size=3, stride=stride, return_lse=True)
    out, lse = cl.local_attention2d(*(a.put(x[n]) for n in "qkv"), 2, bias=a.put(x["bias"]),
                                    backend=backend, **kw)
    r = {n: _f64(v) for n, v in x.items() if v is not None}
    want_out, want_lse = cl.local_attention2d(r["q"], r["k"], r["v"], 2, bias=r["bias"],
                                              backend="numpy", **kw)
    out, lse = _f64(Arrays.get(out)), _f64(Arrays.get(lse))
    assert np.isfinite(want_out).all() and (want_out[:, 3:] == 0).all() and np.isneginf(want_lse[:, 1]).all()
    assert_close(out[:, :3], want_out[:, :3], ATOL[dtype], "out, head 0")
    assert_close(lse[:, 0], want_lse[:, 0], ATOL[dtype], "lse, head 0")
    assert (out[:, 3:] == 0).all() and np.isneginf(lse[:, 1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_papers_layers(backend):
    rng = np.random.default_rng(11)
    a = Arrays(backend)
    B, C, m, H, W, k = 1, 16, 8, 9, 10, 5
    x = rng.standard_normal((B, C, H, W)).astype(np.float32)
    key, query = (rng.standard_normal((B, C // m, H, W)).astype(np.float32) for _ in range(2))
    geometry = rng.standard_normal((C // m, k, k)).astype(np.float32)
    got = cl.local_relation2d(a.put(x), a.put(key), a.put(query), a.put(geometry), k, backend=backend)
    want = cl.local_relation2d(*(_f64(y) for y in (x, key, query, geometry)), k, backend="numpy")
    assert_close(Arrays.get(got), want, ATOL["float32"])

    heads, d = 2, 4
    q, kk, v = (rng.standard_normal((B, heads * d, H, W)).astype(np.float32) for _ in range(3))
    rel_h, rel_w = (rng.standard_normal((heads, d // 2, k)).astype(np.float32) for _ in range(2))
    out, lse = cl.sasa2d(*(a.put(y) for y in (q, kk, v, rel_h, rel_w)), heads, k, return_lse=True,
                         backend=backend)
    ref = [_f64(y) for y in (q, kk, v, rel_h, rel_w)]
    want_out, want_lse = cl.sasa2d(*ref, heads, k, return_lse=True, backend="numpy")
    assert_close(Arrays.get(out), want_out, ATOL["float32"])
    grad = rng.standard_normal(want_out.shape).astype(np.float32)
    got = cl.sasa2d_backward(a.put(grad), *(a.put(y) for y in (q, kk, v, rel_h, rel_w)), out, lse, heads, k,
                             backend=backend)
    want = cl.sasa2d_backward(_f64(grad), *ref, _f64(Arrays.get(out)), _f64(Arrays.get(lse)), heads, k,
                              backend="numpy")
    for name in got._fields:
        if getattr(want, name) is not None:
            assert_close(Arrays.get(getattr(got, name)), getattr(want, name), ATOL["float32"], f"sasa d{name}")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the reference's own inf - inf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("border", BORDERS)
def test_non_finite_inputs_propagate(backend, border):
    """A NaN/inf input poisons exactly the outputs whose window sees it; nothing hangs."""
    x = _inputs(1, 2, 2, 3, 8, 9, 3, border, True, False, np.float32, 4)
    x["v"][0, 1, 2, 3] = np.nan
    x["k"][0, 0, 5, 6] = np.inf
    a = Arrays(backend)
    d = {n: a.put(v) for n, v in x.items()}
    kw = dict(kernel_size=3, bias=d["bias"], border=border)
    out, lse = cl.local_attention2d(d["q"], d["k"], d["v"], 2, return_lse=True, backend=backend, **kw)
    r = {n: _f64(v) for n, v in x.items()}
    want_out, want_lse = cl.local_attention2d(r["q"], r["k"], r["v"], 2, return_lse=True, backend="numpy",
                                              **dict(kw, bias=r["bias"]))
    for got, want in ((out, want_out), (lse, want_lse)):
        got = Arrays.get(got).astype(np.float64)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        finite = np.isfinite(want)
        assert_close(got[finite], want[finite], ATOL["float32"])
    grads = cl.local_attention2d_backward(out, d["q"], d["k"], d["v"], out, lse, 2, backend=backend, **kw)
    assert any(np.isnan(Arrays.get(g)).any() for g in grads if g is not None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zero_query_channels(backend, dtype):
    """Dqk == 0: logits are the bias alone; the fast and general paths both cope."""
    rng = np.random.default_rng(2)
    a = Arrays(backend)
    q = np.zeros((2, 0, 6, 7), dtype)
    v = rng.standard_normal((2, 6, 6, 7)).astype(dtype)
    bias = rng.standard_normal((2, 3, 3)).astype(dtype)
    out, lse = cl.local_attention2d(a.put(q), a.put(q), a.put(v), 2, 3, bias=a.put(bias), return_lse=True,
                                    backend=backend)
    want_out, want_lse = cl.local_attention2d(_f64(q), _f64(q), _f64(v), 2, 3, bias=_f64(bias), return_lse=True,
                                              backend="numpy")
    assert_close(Arrays.get(out), want_out, ATOL[dtype])
    grad = rng.standard_normal(want_out.shape).astype(dtype)
    got = cl.local_attention2d_backward(a.put(grad), a.put(q), a.put(q), a.put(v), out, lse, 2, 3,
                                        bias=a.put(bias), backend=backend)
    want = cl.local_attention2d_backward(_f64(grad), _f64(q), _f64(q), _f64(v), _f64(Arrays.get(out)),
                                         _f64(Arrays.get(lse)), 2, 3, bias=_f64(bias), backend="numpy")
    for name in ("v", "bias"):
        assert_close(Arrays.get(getattr(got, name)), getattr(want, name), ATOL[dtype], name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_backward_takes_delta_from_the_weights_not_from_out(backend, dtype):
    """Like the reference, the backward does not read `out` (it arrives rounded)."""
    x = _inputs(1, 2, 4, 8, 9, 18, 3, "zeros", True, True, np.dtype(dtype), 8)
    a = Arrays(backend)
    d = {n: a.put(v) for n, v in x.items()}
    kw = dict(kernel_size=3, border="zeros", bias=d["bias"], rel=d["rel"], backend=backend)
    out, lse = cl.local_attention2d(d["q"], d["k"], d["v"], 2, return_lse=True, **kw)
    grad = a.put(np.random.default_rng(0).standard_normal(out.shape).astype(dtype))
    wrong_out = a.put(np.zeros(out.shape, dtype))
    first = cl.local_attention2d_backward(grad, d["q"], d["k"], d["v"], out, lse, 2, **kw)
    second = cl.local_attention2d_backward(grad, d["q"], d["k"], d["v"], wrong_out, lse, 2, **kw)
    for f, s in zip(first, second):
        np.testing.assert_array_equal(Arrays.get(f), Arrays.get(s))


@pytest.mark.parametrize("border", BORDERS)
def test_large_windows_take_the_fast_path_above_48_kib(border, sim_seed):
    """k = 9..13 opt in to more than 48 KiB of dynamic shared memory on the tiled kernels
    (forward, query side and, except k = 13 with shift, key side), and still match the
    reference on sim, whose kernels refuse more than 48 KiB unless the limit is raised."""
    from cupy_localrel._backends import _kernel_ops as K
    _require("sim")
    target = K.Target("sim")
    for k in (9, 11, 13):
        x = _inputs(1, 1, 8, 8, 56, 56, k, border, True, True, np.float32, 3)
        geo = G.qk_geometry(x["q"], x["k"], 1, k, 1, 1, border, x["bias"], x["rel"], None, v=x["v"])
        c = K._Call(target, geo, x["bias"], x["rel"])
        plan = K._tiled_config(geo, c)
        assert plan is not None and K.SMEM_LIMIT < plan[2] <= K.SIM_SMEM_OPTIN, (k, plan)
        th, tw = geo.table_shape
        query_side = K._tiled_backward_config(geo, c, lambda b: 4 * (b[1] * th + b[0] * tw))
        assert query_side is not None, k
        # The larger backward tile where it fits sm_80's shared memory, the smaller at k = 13.
        assert query_side[0] == ((16, 4) if k == 13 else (16, 8)), (k, query_side)
        assert K._tiled_key_config(geo, c) is not None or (border == "shift" and k == 13)
    _check_all_ops("sim", border, 13, 1, 1, "float32", True, True, shape=(1, 1, 8, 8, 17, 19))


# ---------------------------------------------------------------------------------------
# SASA's split rel: rel_h/rel_w reach the kernels as they are (kHasRelSplit), never
# expanded to (heads, Dqk, kh, kw). Against the scalar oracle, given the full table that
# the two embeddings stand for (built here, independently of the package).
# ---------------------------------------------------------------------------------------

def _full_rel(rel_h, rel_w):
    """(heads, Dqk, kh, kw): channel d < Dqk/2 reads rel_h at the slot row, the rest rel_w
    at the slot column (SASA's borders mask/zeros: table index = slot index)."""
    heads, half, kh = rel_h.shape
    kw = rel_w.shape[2]
    full = np.empty((heads, 2 * half, kh, kw))
    full[:, :half] = rel_h[:, :, :, None]
    full[:, half:] = rel_w[:, :, None, :]
    return full


SPLIT_CASES = {
    # (B, heads, Dqk, Dv, H, W, kernel, stride, key_bias)
    # SASA's fast-path configuration (CK = 16, 8 on the query side); Dqk/2 = 3: a key chunk
    # straddles the halves.
    "tiled-sasa-odd": (1, 2, 6, 5, 9, 10, (3, 5), 1, False),
    # Dqk/2 = 17: two register passes of the short dot products; three key chunks (five on
    # the query side), one straddling the halves.
    "tiled-sasa-wide": (1, 1, 34, 3, 6, 7, (3, 3), 1, False),
    # Dqk = 4 (LR-Net's CK = 1 range without split rel) runs SASA's kernels: a tail chunk; kh > kw.
    "tiled-lrnet-even": (2, 1, 4, 3, 8, 6, (5, 3), 1, False),
    # key_bias runs the general kernels (for every dtype), as does stride 2.
    "general-key-bias": (1, 2, 6, 4, 7, 8, (3, 5), 1, True),
    "general-stride2": (1, 2, 4, 3, 7, 6, (3, 3), 2, False),
}
SPLIT_BACKENDS = [pytest.param("numpy", id="numpy")] + BACKENDS


def _split_inputs(case, dtype, seed):
    B, heads, dqk, dv, H, W, kernel, stride, with_key_bias = SPLIT_CASES[case]
    rng = np.random.default_rng(seed)
    kh, kw = kernel
    x = dict(q=rng.standard_normal((B, heads * dqk, H, W)), k=rng.standard_normal((B, heads * dqk, H, W)),
             v=rng.standard_normal((B, heads * dv, H, W)), rel_h=rng.standard_normal((heads, dqk // 2, kh)),
             rel_w=rng.standard_normal((heads, dqk // 2, kw)),
             key_bias=rng.standard_normal((B, heads, H, W)) if with_key_bias else None)
    if with_key_bias:
        x["key_bias"][0, 0, 1, 2] = -np.inf   # one removed key
    x = {n: None if a is None else a.astype(dtype) for n, a in x.items()}
    return x, heads, kernel, stride


@pytest.mark.parametrize("backend", SPLIT_BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("border", ["mask", "zeros"])
@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_sasa_split_rel_matches_oracle(backend, dtype, border, case, sim_seed):
    from tests import oracle
    if backend == "numpy" and sim_seed != SEEDS[0]:
        pytest.skip("the reference has no thread order")
    dt = _dtype(dtype, backend)
    x, heads, kernel, stride = _split_inputs(case, dt, 21)
    a = Arrays(backend)
    opts = dict(border=border, stride=stride, backend=backend)
    args = [a.put(x[n]) for n in ("q", "k", "v", "rel_h", "rel_w")]
    out, lse = cl.sasa2d(*args, heads, kernel, return_lse=True, key_bias=a.put(x["key_bias"]), **opts)
    r = {n: _f64(v) for n, v in x.items()}
    full = _full_rel(r["rel_h"], r["rel_w"])
    window = dict(scale=1.0, stride=stride, border=border, key_bias=r["key_bias"])
    want_out, want_lse = oracle.attention(r["q"], r["k"], r["v"], heads, kernel, rel=full, **window)
    _compare(out, want_out, dt, "out")
    _compare(lse, want_lse, dt, "lse")

    grad = np.random.default_rng(22).standard_normal(want_out.shape).astype(dt)
    got = cl.sasa2d_backward(a.put(grad), *args, out, lse, heads, kernel, key_bias=a.put(x["key_bias"]), **opts)
    dq, dk, dv, _, drel, dkey_bias = oracle.attention_backward(_f64(grad), r["q"], r["k"], r["v"], heads, kernel,
                                                               rel=full, **window)
    half = r["q"].shape[1] // heads // 2
    summands = attention_summands(_f64(grad), r["q"], r["k"], r["v"], heads, kernel, rel=full, **window)
    summed = summands["rel"]
    want = dict(q=dq, k=dk, v=dv, rel_h=drel[:, :half].sum(axis=3), rel_w=drel[:, half:].sum(axis=2),
                key_bias=dkey_bias)
    bounds = dict(summands, rel_h=summed[:, :half].sum(axis=3), rel_w=summed[:, half:].sum(axis=2))
    for name in got._fields:
        _compare(getattr(got, name), want[name], dt, f"d{name}", summands=bounds[name])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["tiled-sasa-odd", "tiled-sasa-wide", "general-key-bias"])
def test_sasa_split_rel_backward_is_bitwise_deterministic(backend, case, monkeypatch):
    """SASA's split rel (its row/column sums of dlogit, the drel partials) keeps the backward
    free of atomics: two thread orders give the same bits, on the fast and general paths."""
    x, heads, kernel, stride = _split_inputs(case, np.float32, 31)
    a = Arrays(backend)
    args = [a.put(x[n]) for n in ("q", "k", "v", "rel_h", "rel_w")]
    opts = dict(border="zeros", stride=stride, backend=backend, key_bias=a.put(x["key_bias"]))
    out, lse = cl.sasa2d(*args, heads, kernel, return_lse=True, **opts)
    grad = a.put(np.random.default_rng(32).standard_normal(Arrays.get(out).shape).astype(np.float32))
    runs = []
    for seed in ("0", "777"):   # a different thread order must not change a bit either
        monkeypatch.setenv("CUPY_LOCALREL_SIM_SEED", seed)
        g = cl.sasa2d_backward(grad, *args, out, lse, heads, kernel, **opts)
        runs.append([Arrays.get(t) for t in g if t is not None])
    assert len(runs[0]) == (6 if x["key_bias"] is not None else 5)
    for first, second in zip(*runs):
        np.testing.assert_array_equal(first.view(np.uint32), second.view(np.uint32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("border", ["mask", "zeros"])
def test_split_rel_on_general_kernels_where_fast_path_would_run(backend, dtype, border, sim_seed):
    """The fused op's general kernels (allow_tiled=False) and local_qk2d's (query_grad and
    key_grad in kQK mode) with a split rel, against the oracle's full table."""
    from tests import oracle
    from cupy_localrel._backends import _kernel_ops
    target = _kernel_ops.Target(backend)
    dt = _dtype(dtype, backend)
    x, heads, kernel, _ = _split_inputs("tiled-sasa-odd", dt, 23)
    a = Arrays(backend)
    q, k, v = (a.put(x[n]) for n in "qkv")
    split = G.SplitRel(a.put(x["rel_h"]), a.put(x["rel_w"]))
    geo = G.qk_geometry(x["q"], x["k"], heads, kernel, 1, 1, border, None, G.SplitRel(x["rel_h"], x["rel_w"]),
                        1.0, v=x["v"])
    assert _kernel_ops._tiled_config(geo, _kernel_ops._Call(target, geo, None, split)) is not None
    r = {n: _f64(v) for n, v in x.items()}
    full, half = _full_rel(r["rel_h"], r["rel_w"]), r["rel_h"].shape[1]
    window = dict(scale=1.0, border=border)

    def check_rel_grad(got, drel, summed):
        assert isinstance(got, G.SplitRel)
        _compare(got.rows, drel[:, :half].sum(axis=3), dt, "drel rows", summands=summed[:, :half].sum(axis=3))
        _compare(got.cols, drel[:, half:].sum(axis=2), dt, "drel cols", summands=summed[:, half:].sum(axis=2))

    out, lse = _kernel_ops.attention_forward(target, geo, q, k, v, None, split, allow_tiled=False)
    want_out, want_lse = oracle.attention(r["q"], r["k"], r["v"], heads, kernel, rel=full, **window)
    _compare(out, want_out, dt, "out")
    _compare(lse, want_lse, dt, "lse")
    grad = np.random.default_rng(24).standard_normal(want_out.shape).astype(dt)
    got = _kernel_ops.attention_backward(target, geo, a.put(grad), q, k, v, out, lse, None, split,
                                         allow_tiled=False)
    want = oracle.attention_backward(_f64(grad), r["q"], r["k"], r["v"], heads, kernel, rel=full, **window)
    summands = attention_summands(_f64(grad), r["q"], r["k"], r["v"], heads, kernel, rel=full, **window)
    for name, g, w in zip(("q", "k", "v"), got[:3], want[:3]):
        _compare(g, w, dt, f"d{name}", summands=summands[name])
    check_rel_grad(got[4], want[4], summands["rel"])

    logits = _kernel_ops.qk_forward(target, geo, q, k, None, split)
    want_logits = oracle.qk(r["q"], r["k"], heads, kernel, rel=full, **window)
    _compare_logits(logits, want_logits, dt, "logits")
    grad_logits = np.random.default_rng(25).standard_normal(want_logits.shape).astype(dt)
    got = _kernel_ops.qk_backward(target, geo, a.put(grad_logits), q, k, None, split)
    want = oracle.qk_backward(_f64(grad_logits), r["q"], r["k"], heads, kernel, rel=full, **window)
    _compare(got[0], want[0], dt, "qk dq")
    _compare(got[1], want[1], dt, "qk dk")
    check_rel_grad(got[3], want[3], np.abs(want[3]))
