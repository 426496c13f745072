"""The host path of the ``cupy`` backend: what every public op costs a GPU user outside its
kernels, counted with a stand-in CuPy (tests/fake_cupy.py; no GPU needed, kernels are
launched but not run: their values are tested on ``sim`` in test_kernels.py).

For the second call of a geometry, forward and backward of every public op:
no device query, no host synchronisation, no host<->device copy, no compile or kernel
look-up, one read of the current device; allocations = the results + the scratch the kernels
need, no memset of a result the kernels write in full; the launches named. The first call
of a new geometry uploads its table once (one copy and one synchronisation) and nothing else.
A test shows each of these checks failing when its rule is broken, and one runs every op
on ``sim`` with ``empty`` filled with NaN: what is not zeroed is written in full.
"""
import sys

import numpy as np
import pytest

import cupy_localrel as cl
from cupy_localrel import _loader
from cupy_localrel._backends import _cupy as cupy_backend
from cupy_localrel._backends import _kernel_ops as K
from tests.fake_cupy import FakeCupy

B, H, W, KS = 2, 8, 8, 3
try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None


@pytest.fixture
def fake(monkeypatch):
    f = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", f.module)
    monkeypatch.setattr(_loader, "_cache", {})            # the loader's RawModules
    monkeypatch.setattr(_loader, "_cupy_status", None)   # cupy_available()'s memory
    monkeypatch.setattr(cupy_backend, "TARGET", K.Target("cupy"))   # kernels, tables, dummies
    return f


def _inputs(f, heads, dqk, dv, *, bias, rel, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    arr = lambda *shape: f.array(rng.standard_normal(shape).astype(dtype))   # noqa: E731
    return dict(q=arr(B, heads * dqk, H, W), k=arr(B, heads * dqk, H, W), v=arr(B, heads * dv, H, W),
                bias=arr(heads, KS, KS) if bias else None, rel=arr(heads, dqk, KS, KS) if rel else None,
                grad_out=arr(B, heads * dv, H, W), heads=heads, arr=arr)


# Each case: (forward, backward) closures over fake inputs; the scratch each allocates
# besides what it returns; its launches in order; the memsets of the backward.
def _attention(f, stride=1, bias=True, rel=False, dqk=1, dv=4, dtype=np.float32):
    x = _inputs(f, 2, dqk, dv, bias=bias, rel=rel, dtype=dtype)
    opts = dict(bias=x["bias"], rel=x["rel"], stride=stride)
    state = {}

    def forward():
        state["out"], state["lse"] = cl.local_attention2d(x["q"], x["k"], x["v"], 2, KS, return_lse=True,
                                                          **opts)
        return state["out"], state["lse"]

    def backward():
        grad = f.array(np.ones(state["out"].shape, dtype))
        return cl.local_attention2d_backward(grad, x["q"], x["k"], x["v"], state["out"], state["lse"], 2,
                                             KS, **opts)
    return forward, backward


def _relation(f):
    x = _inputs(f, 2, 1, 4, bias=True, rel=False)
    state = {}

    def forward():
        state["out"], state["lse"] = cl.local_relation2d(x["v"], x["k"], x["q"], x["bias"], KS,
                                                         return_lse=True)
        return state["out"], state["lse"]

    def backward():
        return cl.local_relation2d_backward(x["grad_out"], x["v"], x["k"], x["q"], x["bias"], state["out"],
                                            state["lse"], KS)
    return forward, backward


def _sasa(f):
    x = _inputs(f, 2, 4, 4, bias=False, rel=False)
    rel_h, rel_w = x["arr"](2, 2, KS), x["arr"](2, 2, KS)
    state = {}

    def forward():
        state["out"], state["lse"] = cl.sasa2d(x["q"], x["k"], x["v"], rel_h, rel_w, 2, KS, return_lse=True)
        return state["out"], state["lse"]

    def backward():
        return cl.sasa2d_backward(x["grad_out"], x["q"], x["k"], x["v"], rel_h, rel_w, state["out"],
                                  state["lse"], 2, KS)
    return forward, backward


def _qk(f):
    x = _inputs(f, 2, 2, 0, bias=True, rel=True)
    grad = x["arr"](B, 2, KS * KS, H, W)
    opts = dict(bias=x["bias"], rel=x["rel"])
    return (lambda: (cl.local_qk2d(x["q"], x["k"], 2, KS, **opts),),
            lambda: cl.local_qk2d_backward(grad, x["q"], x["k"], 2, KS, **opts))


def _av(f):
    x = _inputs(f, 2, 1, 4, bias=False, rel=False)
    attn = x["arr"](B, 2, KS * KS, H, W)
    return (lambda: (cl.local_av2d(attn, x["v"], KS),),
            lambda: cl.local_av2d_backward(x["grad_out"], attn, x["v"], KS))


TABLE_REDUCE = "table_reduce"
CASES = {
    # name: (make, forward scratch, forward launches, backward scratch, backward launches, backward memsets)
    "attention, LR-Net heads": (_attention, 0, ["attention_forward_tiled"],
                                2, ["query_grad_tiled", TABLE_REDUCE, "key_grad_tiled"], 0),   # delta, partials
    "attention, SASA heads, rel": (lambda f: _attention(f, bias=False, rel=True, dqk=8, dv=8), 0,
                                   ["attention_forward_tiled"],
                                   2, ["query_grad_tiled", TABLE_REDUCE, "key_grad_tiled"], 0),  # delta, partials
    # bfloat16 arrays as CuPy >= 14 holds them (ml_dtypes): the same path, no casts
    "attention, bfloat16": (lambda f: _attention(f, dtype=BF16), 0, ["attention_forward_tiled"],
                            2, ["query_grad_tiled", TABLE_REDUCE, "key_grad_tiled"], 0),
    "attention, stride 2": (lambda f: _attention(f, stride=2), 0, ["attention_forward"],
                            2, ["query_grad", TABLE_REDUCE, "key_grad"], 1),   # dq: only centres written
    "local_relation2d": (_relation, 0, ["attention_forward_tiled"],
                         2, ["query_grad_tiled", TABLE_REDUCE, "key_grad_tiled"], 0),
    # SASA's rel_h/rel_w go to the kernels as they are (no rel table built per call); the
    # backward reduces the drel partials to the full table, then sums its rows/columns.
    "sasa2d": (_sasa, 0, ["attention_forward_tiled"],   # backward: delta, partials; drel's rows, columns
               2, ["query_grad_tiled", TABLE_REDUCE, "key_grad_tiled"], 0),
    "local_qk2d": (_qk, 0, ["qk_forward"], 2, ["query_grad", TABLE_REDUCE, TABLE_REDUCE, "key_grad"], 0),
    "local_av2d": (_av, 0, ["av_forward"], 0, ["av_dattn", "key_grad"], 0),
}

# What one call may do besides allocating and launching: read the current device once
# (the key of the per-device caches) and enter the inputs' device (a cheap read/switch, no
# query): once in the public layer (twice for the papers' layers, which call
# local_attention2d) and once in the backend, which checks that all inputs share it.
NOTHING_ELSE = dict(device_query=0, sync=0, h2d=0, d2h=0, compile=0, get_function=0, current_device=1,
                    broadcast=0, concatenate=0)


def _results(value):
    return [r for r in (value if isinstance(value, tuple) else (value,)) if r is not None]


def _check_call(fake, call, scratch, launches, memsets, device_enters):
    """Problems with the host path of ``call`` (a list of strings; empty when all is well)."""
    fake.reset()
    results = _results(call())
    counts, problems = fake.counts(), []
    for kind, want in dict(NOTHING_ELSE, memset=memsets, device_enter=device_enters).items():
        if counts[kind] != want:
            problems.append(f"{kind}: {counts[kind]} (expected {want}) {fake.details(kind)}")
    allocated = fake.details("alloc")
    missing = [i for i, r in enumerate(results) if not any(r is a for a in allocated)]
    if missing:
        problems.append(f"results {missing} were not allocated by this call")
    if len(allocated) != len(results) + scratch:
        problems.append(f"alloc: {len(allocated)} (expected {len(results)} results + {scratch} scratch)")
    names = [n.split("<")[0] for n in fake.details("launch")]
    if names != launches:
        problems.append(f"launches {names} (expected {launches})")
    return problems


def _enters(name):
    return 3 if name in ("local_relation2d", "sasa2d") else 2


@pytest.mark.parametrize("name", list(CASES))
def test_second_call_pays_only_results_scratch_and_launches(fake, name):
    make, f_scratch, f_launches, b_scratch, b_launches, b_memsets = CASES[name]
    if "bfloat16" in name and BF16 is None:
        pytest.skip("ml_dtypes is not installed")
    forward, backward = make(fake)
    forward(), backward()                         # first call: compiles, uploads the table
    assert _check_call(fake, forward, f_scratch, f_launches, 0, _enters(name)) == []
    assert _check_call(fake, backward, b_scratch, b_launches, b_memsets, _enters(name)) == []


def _old_sasa_rel(arrays, heads, kernel_size, border):
    """SASA's rel as it was built before issue 10: expanded to (heads, Dqk, kh, kw) per call."""
    from cupy_localrel import _geometry as G
    heads, half, kh, kw = G.sasa_embeddings(arrays, heads, kernel_size, border)
    xp = sys.modules["cupy"]
    rows = xp.broadcast_to(arrays["rel_h"][:, :, :, None], (heads, half, kh, kw))
    cols = xp.broadcast_to(arrays["rel_w"][:, :, None, :], (heads, half, kh, kw))
    return xp.ascontiguousarray(xp.concatenate([rows, cols], axis=1))


def test_sasa_builds_no_rel_table(fake, monkeypatch):
    """sasa2d hands rel_h/rel_w to the kernels as they are: no broadcast, no concatenate and
    no (heads, Dqk, kh, kw) array in the forward or the backward (query_grad_tiled sums
    drel per table row and column itself). The old expansion is caught."""
    from cupy_localrel import _ops
    forward, backward = _sasa(fake)
    forward(), backward()

    def rel_sized(call):   # (heads, channels, kh, kw) arrays: rel, or a half of it
        fake.reset()
        call()
        return [a.shape for kind in ("alloc", "broadcast") for a in fake.details(kind)
                if a.ndim == 4 and a.shape[0] == 2 and a.shape[2:] == (KS, KS)]

    assert rel_sized(forward) == [] and fake.counts()["concatenate"] == fake.counts()["broadcast"] == 0
    assert rel_sized(backward) == [] and fake.counts()["concatenate"] == fake.counts()["broadcast"] == 0
    _, f_scratch, f_launches, _, _, _ = CASES["sasa2d"]
    assert _check_call(fake, forward, f_scratch, f_launches, 0, 3) == []
    monkeypatch.setattr(_ops, "_sasa_rel", _old_sasa_rel)
    assert len(rel_sized(forward)) == 3   # two broadcasts and their concatenation
    problems = _check_call(fake, forward, f_scratch, f_launches, 0, 3)
    assert any(p.startswith("broadcast") for p in problems) and any(p.startswith("concatenate") for p in problems)
    assert any(p.startswith("alloc") for p in problems), problems


def test_first_call_of_a_geometry_uploads_its_table_once(fake):
    forward, backward = _attention(fake)
    fake.reset()
    forward(), backward()
    counts = fake.counts()
    # CuPy's devices queried once (cupy_available) and once per kernel file (the loader).
    assert counts["device_query"] == 2 + 2
    assert counts["compile"] == 2 and counts["h2d"] == 1 and counts["sync"] == 1
    assert counts["d2h"] == 0
    # a new geometry: its table only (one copy, one synchronisation before it is shared)
    x = _inputs(fake, 2, 1, 4, bias=True, rel=False)
    fake.reset()
    cl.local_attention2d(x["q"][:, :, :5], x["k"][:, :, :5], x["v"][:, :, :5], 2, KS)
    counts = fake.counts()
    assert (counts["h2d"], counts["sync"], counts["device_query"], counts["compile"]) == (1, 1, 0, 0)
    fake.reset()
    cl.local_attention2d(x["q"][:, :, :5], x["k"][:, :, :5], x["v"][:, :, :5], 2, KS)
    assert fake.counts()["h2d"] == fake.counts()["sync"] == 0


def test_halo_extents_are_computed_once_per_geometry(fake, monkeypatch):
    forward, backward = _attention(fake)
    forward(), backward()
    computed = []
    real = K._compute_halo_extent
    monkeypatch.setattr(K, "_compute_halo_extent", lambda pos, tile: computed.append(tile) or real(pos, tile))
    forward(), backward()
    assert computed == []


def _regressions(target):
    """Each rule of the host path broken on purpose (a function of a MonkeyPatch), and the
    problem the check must report."""
    window, function, table_reduce = K.Target.window, K.Target.function, K._table_reduce
    yield "device query per call", "device_query", lambda m: m.setattr(_loader, "_cupy_status", None)
    def window_after(forget):
        return lambda self, geo, device=None: (forget(self), window(self, geo, device))[1]
    yield "table upload per call", "h2d", lambda m: m.setattr(
        K.Target, "window", window_after(lambda self: self._tables.clear()))
    yield "synchronisation per call", "sync", lambda m: m.setattr(
        K.Target, "window", window_after(K.Target._drop_tables))
    yield "memset of a fully written result", "memset", lambda m: m.setattr(
        K._Call, "query_grad_buffer", lambda self, shape: self.t.xp.zeros(shape, self.geo.dtype))
    yield "a dummy allocated per call", "alloc", lambda m: m.setattr(
        K.Target, "dummy", lambda self, dtype, device=None: self.xp.zeros(1, dtype))
    yield "kernel looked up per launch", "get_function", lambda m: target._functions.clear()
    yield "a device read per kernel", "current_device", lambda m: m.setattr(
        K.Target, "function", lambda self, filename, name, device=None: function(self, filename, name))
    yield "a value read back", "d2h", lambda m: m.setattr(
        K, "_table_reduce", lambda c, part, *args: (float(part[0]), table_reduce(c, part, *args))[1])


def test_each_broken_rule_is_caught(fake, monkeypatch):
    forward, backward = _attention(fake)
    forward(), backward()
    _, _, _, scratch, launches, memsets = CASES["attention, LR-Net heads"]
    assert _check_call(fake, backward, scratch, launches, memsets, 2) == []
    for label, kind, breaks in _regressions(cupy_backend.TARGET):
        with monkeypatch.context() as m:
            breaks(m)
            problems = _check_call(fake, backward, scratch, launches, memsets, 2)
        assert any(p.startswith(kind) for p in problems), (label, problems)
        assert _check_call(fake, backward, scratch, launches, memsets, 2) == [], label   # undone


# ---------------------------------------------------------------------------------------
# `empty` is honest: every result (and scratch) the kernels get uninitialised is written
# in full before it is read. On `sim` (the same kernels on the CPU) with every `empty`
# filled with NaN, the results still match the reference.
# ---------------------------------------------------------------------------------------

class _NaNEmpty:
    """NumPy, except that ``empty`` arrays start as NaN."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def empty(shape, dtype=float):
        return np.full(shape, np.nan, dtype)


@pytest.mark.parametrize("stride, border, dqk, dv, dtype, similarity", [
    (1, "mask", 1, 4, "float32", "dot"),    # LR-Net-like heads: the tiled kernels
    (1, "zeros", 4, 4, "float32", "dot"),   # SASA-like heads with rel
    (1, "shift", 2, 3, "float64", "dot"),   # the general kernels at stride 1 (no fast path for float64)
    (2, "mask", 2, 3, "float32", "dot"),    # stride 2: only centres have a query
    (1, "mask", 1, 4, "float32", "neg_abs"),   # another similarity with key_bias: d key_bias too
])
def test_results_of_empty_are_written_in_full(monkeypatch, stride, border, dqk, dv, dtype, similarity):
    from cupy_localrel._backends import backend_status
    if not backend_status("sim")[0]:
        pytest.skip("sim backend unavailable")
    from tests.helpers import ATOL, assert_close, make_inputs
    dot = similarity == "dot"
    x = make_inputs(1, 2, dqk, dv, 6, 7, 3, border, True, dot, seed=5, dtype=dtype)
    out_hw = (-(-6 // stride), -(-7 // stride))
    grad = np.random.default_rng(6).standard_normal((1, 2 * dv, *out_hw)).astype(dtype)
    attn_grad = np.random.default_rng(7).standard_normal((1, 2, 9, *out_hw)).astype(dtype)
    key_bias = None if dot else np.random.default_rng(8).standard_normal((1, 2, 6, 7)).astype(dtype)
    opts = dict(bias=x.bias, rel=x.rel, stride=stride, border=border, similarity=similarity,
                key_bias=key_bias)
    av_opts = dict(stride=stride, border=border)

    def run(backend):
        out, lse = cl.local_attention2d(x.q, x.k, x.v, 2, 3, return_lse=True, backend=backend, **opts)
        grads = cl.local_attention2d_backward(grad, x.q, x.k, x.v, out, lse, 2, 3, backend=backend, **opts)
        logits = cl.local_qk2d(x.q, x.k, 2, 3, backend=backend, **opts)
        qk_grads = cl.local_qk2d_backward(attn_grad, x.q, x.k, 2, 3, backend=backend, **opts)
        attn = np.exp(attn_grad) / 3
        av = cl.local_av2d(attn, x.v, 3, backend=backend, **av_opts)
        av_grads = cl.local_av2d_backward(grad, attn, x.v, 3, backend=backend, **av_opts)
        return [out, lse, *grads, np.where(np.isinf(logits), 0, logits), *qk_grads, av, *av_grads]

    want = run("numpy")
    sim_xp = K.Target.xp
    monkeypatch.setattr(K.Target, "xp",
                        property(lambda self: _NaNEmpty() if self.name == "sim" else sim_xp.fget(self)))
    got = run("sim")
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            continue
        assert not np.isnan(np.asarray(g, np.float64)).any(), f"result {i} has unwritten entries"
        assert_close(g, w, ATOL[dtype], name=f"result {i}")


def test_large_window_opts_in_to_shared_memory_once(fake):
    """A window whose tiled kernels need more than 48 KiB (here the backward's) queries the
    device's opt-in limit once and raises that kernel's limit (the fake refuses a launch
    above a kernel's limit); the next call queries nothing."""
    x = _inputs(fake, 2, 8, 8, bias=False, rel=True)
    rel = fake.array(np.zeros((2, 8, 9, 9), np.float32))

    def call():
        out, lse = cl.local_attention2d(x["q"], x["k"], x["v"], 2, 9, rel=rel, return_lse=True)
        return cl.local_attention2d_backward(x["grad_out"], x["q"], x["k"], x["v"], out, lse, 2, 9, rel=rel)

    fake.reset()
    call()
    assert fake.counts()["device_query"] >= 1
    raised = {name: fn.max_dynamic_shared_size_bytes for name, fn in fake.functions.items()
              if "_tiled" in name}
    above = {name: v for name, v in raised.items() if v > 48 * 1024}   # the backward's two
    assert len(raised) == 3 and sorted(above) == ["key_grad_tiled<float, 8, 16>", "query_grad_tiled<float, 8, 16>"]
    assert set(above.values()) == {227 * 1024}, raised
    fake.reset()
    call()
    assert fake.counts()["device_query"] == 0
