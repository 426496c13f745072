"""The PyTorch adapter: values, gradients, compile, FLOPs, layouts, errors, layers."""
import math
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cupy_localrel as core  # noqa: E402
from cupy_localrel.adapters import torch as lt  # noqa: E402
from cupy_localrel.adapters.torch import LocalRelation2d, SASA2d  # noqa: E402
from cupy_localrel.adapters.torch.layers import AttentionStem, relative_offsets  # noqa: E402

BORDERS = ("mask", "zeros", "shift")
F64 = torch.float64


def _rand(*shape, dtype=F64, grad=True, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else hash(shape) % 1000)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def _table(border, k=3):
    return 2 * k - 1 if border == "shift" else k


def _inputs(border, heads=2, dqk=2, dv=3, h=5, w=4, k=3, b=1):
    t = _table(border, k)
    return dict(q=_rand(b, heads * dqk, h, w, seed=1), k=_rand(b, heads * dqk, h, w, seed=2),
                v=_rand(b, heads * dv, h, w, seed=3), bias=_rand(heads, t, t, seed=4),
                rel=_rand(heads, dqk, t, t, seed=5))


def _np(t):
    return None if t is None else t.detach().numpy()


def _gradcheck(fn, inputs, full=False):
    """float64 gradcheck; fast mode (random projections of the Jacobian) unless ``full``."""
    return torch.autograd.gradcheck(fn, inputs, fast_mode=not full)


def _finite(logits):
    return torch.where(torch.isinf(logits), torch.zeros_like(logits), logits)


# ---------------------------------------------------------------------------------------
# Values equal the NumPy reference
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("border", BORDERS)
def test_attention_matches_reference(border):
    a = _inputs(border)
    stride = 1 if border == "shift" else 2
    out, lse = lt.local_attention2d(a["q"], a["k"], a["v"], 2, 3, bias=a["bias"], rel=a["rel"],
                                    border=border, stride=stride, return_lse=True)
    ref_out, ref_lse = core.local_attention2d(*map(_np, (a["q"], a["k"], a["v"])), 2, 3,
                                              bias=_np(a["bias"]), rel=_np(a["rel"]),
                                              border=border, stride=stride, return_lse=True)
    np.testing.assert_array_equal(out.detach().numpy(), ref_out)
    np.testing.assert_array_equal(lse.numpy(), ref_lse)
    assert not lse.requires_grad


def test_unfused_and_papers_ops_match_reference():
    a = _inputs("mask")
    q, k, v = a["q"], a["k"], a["v"]
    logits = lt.local_qk2d(q, k, 2, 3, bias=a["bias"], scale=0.5)
    np.testing.assert_array_equal(logits.detach().numpy(),
                                  core.local_qk2d(_np(q), _np(k), 2, 3, bias=_np(a["bias"]),
                                                  scale=0.5))
    attn = torch.softmax(logits, dim=2)
    out = lt.local_av2d(attn, v, 3)
    np.testing.assert_array_equal(out.detach().numpy(), core.local_av2d(_np(attn), _np(v), 3))
    x, key, query, geo = _rand(1, 8, 5, 4), _rand(1, 2, 5, 4), _rand(1, 2, 5, 4), _rand(2, 3, 3)
    np.testing.assert_array_equal(
        lt.local_relation2d(x, key, query, geo, 3).detach().numpy(),
        core.local_relation2d(_np(x), _np(key), _np(query), _np(geo), 3))
    rh, rw = _rand(2, 1, 3), _rand(2, 1, 3)
    np.testing.assert_array_equal(
        lt.sasa2d(q, k, v, rh, rw, 2, 3).detach().numpy(),
        core.sasa2d(_np(q), _np(k), _np(v), _np(rh), _np(rw), 2, 3))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 5e-3),
                                       (torch.bfloat16, 3e-2)])
def test_low_precision_dtypes(dtype, tol):
    a = _inputs("mask", h=6, w=6)
    args = [a[n].detach().to(dtype) for n in ("q", "k", "v")]
    out, lse = lt.local_attention2d(*args, 2, 3, bias=a["bias"].detach().to(dtype),
                                    return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref = core.local_attention2d(*[t.to(F64).numpy() for t in args], 2, 3,
                                 bias=a["bias"].detach().to(dtype).to(F64).numpy())
    err = np.abs(out.to(F64).numpy() - ref).max() / max(1.0, np.abs(ref).max())
    assert err <= tol


def test_empty_batch():
    q = torch.zeros(0, 4, 5, 5, dtype=F64)
    out = lt.local_attention2d(q, q, q, 2, 3)
    assert out.shape == (0, 4, 5, 5)


# ---------------------------------------------------------------------------------------
# Gradients: float64 gradcheck for every function and border
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("border", BORDERS)
def test_gradcheck_attention(border):
    a = _inputs(border)
    stride = 1 if border == "shift" else 2

    def f(q, k, v, bias, rel):
        return lt.local_attention2d(q, k, v, 2, 3, bias=bias, rel=rel, border=border,
                                    stride=stride)
    assert _gradcheck(f, (a["q"], a["k"], a["v"], a["bias"], a["rel"]), full=border == "mask")
    # optional inputs absent, default scale
    assert _gradcheck(
        lambda q, k, v: lt.local_attention2d(q, k, v, 2, 3, border=border),
        (a["q"], a["k"], a["v"]))


@pytest.mark.parametrize("border", BORDERS)
def test_gradcheck_qk(border):
    a = _inputs(border)
    assert _gradcheck(
        lambda q, k, bias, rel: _finite(lt.local_qk2d(q, k, 2, 3, bias=bias, rel=rel,
                                                      border=border, scale=0.7)),
        (a["q"], a["k"], a["bias"], a["rel"]))


@pytest.mark.parametrize("border", BORDERS)
def test_gradcheck_av(border):
    v = _rand(1, 4, 5, 4, seed=7)
    attn = _rand(1, 2, 9, 3 if border != "shift" else 5, 2 if border != "shift" else 4, seed=8)
    stride = 1 if border == "shift" else 2
    assert _gradcheck(
        lambda a, v: lt.local_av2d(a, v, 3, border=border, stride=stride), (attn, v))


@pytest.mark.parametrize("border", BORDERS)
def test_gradcheck_relation(border):
    t = _table(border)
    x, key, query, geo = _rand(1, 6, 5, 4), _rand(1, 2, 5, 4), _rand(1, 2, 5, 4), _rand(2, t, t)
    assert _gradcheck(
        lambda *a: lt.local_relation2d(*a, 3, border=border, dilation=(1, 1)),
        (x, key, query, geo))
    assert _gradcheck(
        lambda x, key, query: lt.local_relation2d(x, key, query, None, 3, border=border),
        (x, key, query))


@pytest.mark.parametrize("border", ("mask", "zeros"))
def test_gradcheck_sasa(border):
    a = _inputs(border)
    rh, rw = _rand(2, 1, 3, seed=11), _rand(2, 1, 3, seed=12)
    assert _gradcheck(
        lambda q, k, v, rh, rw: lt.sasa2d(q, k, v, rh, rw, 2, 3, border=border, stride=2),
        (a["q"], a["k"], a["v"], rh, rw))


def test_opcheck_custom_ops():
    a = _inputs("mask")
    q, k, v, bias, rel = (a[n] for n in ("q", "k", "v", "bias", "rel"))
    ops = torch.ops.localrel
    common = ([1, 1], [1, 1], "mask", None)
    key_bias = _rand(1, 2, 5, 4)
    torch.library.opcheck(ops.local_attention2d.default,
                          (q, k, v, 2, [3, 3], bias, rel, None, *common, "dot", None))
    torch.library.opcheck(ops.local_attention2d.default,
                          (q, k, v, 2, [3, 3], None, None, 1.0, *common, "neg_square", key_bias))
    torch.library.opcheck(ops.local_qk2d.default,
                          (q, k, 2, [3, 3], bias, None, None, *common, "neg_abs", key_bias))
    torch.library.opcheck(ops.local_av2d.default,
                          (_rand(1, 2, 9, 5, 4), v, [3, 3], *common))
    torch.library.opcheck(ops.local_relation2d.default,
                          (v, q[:, :2], k[:, :2], bias, [3, 3], 1.0, *common, "dot", None))
    torch.library.opcheck(ops.local_relation2d.default,
                          (v, q[:, :2], k[:, :2], bias, [3, 3], 1.0, *common, "key", key_bias))
    torch.library.opcheck(ops.sasa2d.default,
                          (q, k, v, _rand(2, 1, 3), _rand(2, 1, 3), 2, [3, 3], 1.0, *common, key_bias))


# ---------------------------------------------------------------------------------------
# torch.compile, FLOP counting, layouts
# ---------------------------------------------------------------------------------------

def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    a = _inputs("mask", h=6, w=6)
    q, k, v, bias = (a[n].detach().float() for n in ("q", "k", "v", "bias"))
    rh, rw = torch.randn(2, 1, 3), torch.randn(2, 1, 3)

    def f(q, k, v, bias):
        x = lt.local_attention2d(q, k, v, 2, 3, bias=bias)
        logits = lt.local_qk2d(q, k, 2, 3)
        y = lt.local_av2d(torch.softmax(logits, 2), v, 3)
        z = lt.sasa2d(q, k, v, rh, rw, 2, 3)
        w = lt.local_relation2d(v, q[:, :2], k[:, :2], bias, 3)
        return (x.relu() + y + z + w).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, f):
        qq = q.clone().requires_grad_()
        loss = fn(qq, k, v, bias)
        loss.backward()
        grads.append((loss.detach(), qq.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


@pytest.mark.slow
def test_compile_inductor_forward_backward():
    import shutil
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("inductor on the CPU needs a C++ compiler")
    torch._dynamo.reset()
    q0 = torch.randn(1, 8, 6, 6)

    def f(q):
        return (lt.local_attention2d(q.sin(), q, q, 2, 3, border="zeros") * 2).sum()

    compiled = torch.compile(f, fullgraph=True)
    grads = []
    for fn in (compiled, f):
        q = q0.clone().requires_grad_()
        loss = fn(q)
        loss.backward()
        grads.append((loss.detach(), q.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_flop_counter_counts_ops():
    from torch.utils.flop_counter import FlopCounterMode
    b, heads, dqk, dv, h, w, k = 2, 2, 4, 3, 6, 5, 3
    q = torch.randn(b, heads * dqk, h, w, requires_grad=True)
    v = torch.randn(b, heads * dv, h, w)
    with FlopCounterMode(display=False) as counter:
        lt.local_attention2d(q, q, v, heads, k).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    forward = 2 * b * heads * k * k * h * w * (dqk + dv)
    assert counts["localrel.local_attention2d"] == forward
    assert counts["localrel.local_attention2d_backward"] > forward


def test_meta_device_and_fake_tensors():
    with torch.device("meta"):
        q = torch.empty(2, 8, 9, 7)
        v = torch.empty(2, 12, 9, 7)
    out, lse = lt.local_attention2d(q, q, v, 4, 3, stride=2, return_lse=True)
    assert out.shape == (2, 12, 5, 4) and lse.shape == (2, 4, 5, 4) and out.is_meta
    assert lt.local_qk2d(q, q, 4, 3).shape == (2, 4, 9, 9, 7)


def test_channels_last_and_non_contiguous():
    a = _inputs("mask", h=6, w=6)
    q, k, v = (a[n].detach() for n in ("q", "k", "v"))
    ref = lt.local_attention2d(q, k, v, 2, 3)
    cl = [t.to(memory_format=torch.channels_last) for t in (q, k, v)]
    torch.testing.assert_close(lt.local_attention2d(*cl, 2, 3), ref, rtol=0, atol=0)
    strided = [t.transpose(2, 3).contiguous().transpose(2, 3) for t in (q, k, v)]
    assert not strided[0].is_contiguous()
    torch.testing.assert_close(lt.local_attention2d(*strided, 2, 3), ref, rtol=0, atol=0)
    qq = cl[0].clone().requires_grad_()
    lt.local_attention2d(qq, cl[1], cl[2], 2, 3).sum().backward()
    assert qq.grad.shape == qq.shape


def test_cpu_autocast_runs_in_bfloat16():
    if not hasattr(torch.library, "register_autocast"):
        pytest.skip("torch.library.register_autocast needs torch >= 2.5")
    layer = LocalRelation2d(8, kernel_size=3, m=4)
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)   # the convs give bfloat16, x stays float32: the rule casts both
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_zero_copy_bridge():
    from cupy_localrel.adapters.torch._convert import Bridge
    t = torch.randn(2, 3, 4, 5)
    bridge = Bridge(t, None)
    a = bridge.array(t)
    assert np.shares_memory(a, t.numpy())
    back = bridge.tensor(a)
    assert back.data_ptr() == t.data_ptr()


def test_bfloat16_without_ml_dtypes(monkeypatch):
    from cupy_localrel.adapters.torch import _convert
    q = torch.randn(1, 4, 5, 5).to(torch.bfloat16)
    native = lt.local_attention2d(q, q, q, 2, 3)
    monkeypatch.setattr(_convert, "_NP_BF16", None)   # as if ml_dtypes were missing
    via_f32 = lt.local_attention2d(q, q, q, 2, 3)
    assert via_f32.dtype == torch.bfloat16
    torch.testing.assert_close(via_f32.float(), native.float(), rtol=0, atol=1e-2)



def test_native_bfloat16_from_cupy_14_on(monkeypatch):
    """The one decision: bfloat16 crosses as bfloat16 with CuPy >= 14 (and NumPy >= 2.1.2,
    ml_dtypes), through float32 with CuPy 13 or without ml_dtypes; the CPU needs ml_dtypes."""
    import types

    from cupy_localrel.adapters.torch import _convert
    monkeypatch.setattr(_convert, "_NUMPY_TAKES_CUPY_BFLOAT16", True)
    if _convert._NP_BF16 is None:
        pytest.skip("ml_dtypes is not installed")
    for version, native in (("13.6.0", False), ("14.0.0", True), ("14.2.0", True),
                            ("15.0.0rc1", True), ("12.3.0", False), ("dev", False)):
        assert _convert.native_bfloat16(True, version) is native, version
    assert _convert.native_bfloat16(False, "13.6.0") is True   # the CPU never asks CuPy
    # the installed CuPy's version by default, and the Bridge of a CUDA tensor follows it
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    cuda_ref = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16)
    for version, via_f32 in (("13.6.0", True), ("14.0.0", False)):
        monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(__version__=version))
        assert _convert.native_bfloat16(True) is not via_f32
        assert _convert.Bridge(cuda_ref, None).via_f32 is via_f32, version
    cuda_ref.dtype = torch.float16
    assert _convert.Bridge(cuda_ref, None).via_f32 is False
    cuda_ref.dtype = torch.bfloat16
    monkeypatch.setattr(_convert, "_NUMPY_TAKES_CUPY_BFLOAT16", False)   # NumPy < 2.1.2
    assert _convert.Bridge(cuda_ref, None).via_f32 is True
    monkeypatch.setattr(_convert, "_NUMPY_TAKES_CUPY_BFLOAT16", True)
    monkeypatch.setattr(_convert, "_NP_BF16", None)                     # no ml_dtypes
    assert _convert.Bridge(cuda_ref, None).via_f32 is True
    assert _convert.native_bfloat16(False) is False

# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------

def test_mixed_dtypes_raise_type_error():
    q = torch.randn(1, 4, 5, 5)
    with pytest.raises(TypeError, match="dtype"):
        lt.local_attention2d(q, q, q.double(), 2, 3)
    with pytest.raises(TypeError, match="bias"):
        lt.local_attention2d(q, q, q, 2, 3, bias=torch.zeros(2, 3, 3, dtype=F64))


def test_mixed_devices_raise_type_error():
    q = torch.randn(1, 4, 5, 5)
    with pytest.raises(TypeError, match="device"):
        lt.local_attention2d(q, q, q.to("meta"), 2, 3)


def test_bad_arguments():
    q = torch.randn(1, 4, 5, 5)
    with pytest.raises(TypeError, match="torch.Tensor"):
        lt.local_attention2d(q.numpy(), q, q, 2, 3)
    with pytest.raises(TypeError, match="floating"):
        lt.local_attention2d(q.long(), q.long(), q.long(), 2, 3)
    with pytest.raises(ValueError, match="border"):
        lt.local_attention2d(q, q, q, 2, 3, border="reflect")
    with pytest.raises(ValueError, match="odd"):
        lt.local_attention2d(q, q, q, 2, 4)
    with pytest.raises(ValueError, match="heads"):
        lt.local_attention2d(q, q, q, 3, 3)
    with pytest.raises(TypeError, match="cupy"):
        lt.local_attention2d(q, q, q, 2, 3, backend="cupy")
    with pytest.raises(ValueError, match="scale must be a real number"):
        lt.local_attention2d(q, q, q, 2, 3, scale="0.5")
    with pytest.raises(ValueError, match="scale must be a real number"):
        lt.local_qk2d(q, q, 2, 3, scale=[1.0])
    with pytest.raises(ValueError, match="v must have the batch of attn"):
        lt.local_av2d(torch.rand(2, 2, 9, 5, 5), q, 3)


def test_papers_ops_take_none_as_their_default_scale_of_one():
    q = torch.randn(1, 4, 5, 5, dtype=F64)
    rel = torch.randn(2, 1, 3, dtype=F64)
    torch.testing.assert_close(lt.sasa2d(q, q, q, rel, rel, 2, 3, scale=None),
                               lt.sasa2d(q, q, q, rel, rel, 2, 3), rtol=0, atol=0)
    key, geometry = q[:, :2], torch.randn(2, 3, 3, dtype=F64)
    torch.testing.assert_close(lt.local_relation2d(q, key, key, geometry, 3, scale=None),
                               lt.local_relation2d(q, key, key, geometry, 3), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------

def test_relative_offsets():
    off = relative_offsets(3)
    assert off.shape == (1, 2, 3, 3)
    assert off[0, 0, :, 0].tolist() == [-1.0, 0.0, 1.0]   # rows
    assert off[0, 1, 0, :].tolist() == [-1.0, 0.0, 1.0]   # columns
    assert relative_offsets(3, "shift").shape == (1, 2, 5, 5)
    assert relative_offsets(7).abs().max() == 1


@pytest.mark.parametrize("border", BORDERS)
def test_local_relation_layer(border):
    layer = LocalRelation2d(16, kernel_size=3, m=4, stride=1 if border == "shift" else 2,
                            border=border)
    x = torch.randn(2, 16, 7, 6)
    y = layer(x)
    assert y.shape == ((2, 16, 7, 6) if border == "shift" else (2, 16, 4, 3))
    assert "offsets" in layer.state_dict()
    y.sum().backward()
    assert layer.key.weight.grad is not None and layer.geometry_prior[0].weight.grad is not None
    layer64 = layer.to(F64)
    assert layer64.offsets.dtype == F64
    assert layer64(x.double()).dtype == F64
    # The layer is the op on its own projections and geometry prior.
    with torch.no_grad():
        ref = lt.local_relation2d(x, layer.key(x.double()).float(), layer.query(x.double()).float(),
                                  layer.geometry().float(), 3, stride=layer.stride, border=border)
        torch.testing.assert_close(layer64(x.double()).float(), ref, rtol=1e-4, atol=1e-4)


def test_local_relation_seed_options():
    layer = LocalRelation2d(8, kernel_size=3, m=8, border="zeros", final_conv=True)
    assert layer.heads == 1 and layer.final is not None
    assert layer(torch.randn(1, 8, 5, 5)).shape == (1, 8, 5, 5)
    with pytest.raises(ValueError, match="m=3"):
        LocalRelation2d(8, m=3)


@pytest.mark.parametrize("downsample", ("pool", "subsample"))
def test_sasa_layer(downsample):
    layer = SASA2d(16, 32, kernel_size=3, heads=4, stride=2, downsample=downsample)
    assert layer.query.groups == 4 and layer.rel_h.shape == (4, 4, 3)
    x = torch.randn(2, 16, 7, 6, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 32, 4, 3)
    y.square().sum().backward()
    assert layer.rel_w.grad is not None and x.grad is not None
    with pytest.raises(ValueError, match="even"):
        SASA2d(8, 12, heads=4)
    assert SASA2d(8, 8, 3, heads=2, projection="dense").key.groups == 1


def test_attention_stem():
    stem = AttentionStem(3, 16, kernel_size=3, heads=2, mixtures=3)
    x = torch.randn(1, 3, 6, 6)
    y = stem(x)
    assert y.shape == (1, 16, 6, 6)
    y.sum().backward()
    assert stem.mix_row.grad is not None and stem.rel_h.grad is not None


def test_layer_compiles_fullgraph():
    torch._dynamo.reset()
    layer = LocalRelation2d(8, kernel_size=3, m=4)
    x = torch.randn(1, 8, 5, 5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


# ---------------------------------------------------------------------------------------
# CUDA (skipped cleanly without a GPU)
# ---------------------------------------------------------------------------------------

def _cuda_ready():
    if not torch.cuda.is_available():
        return False
    ok, _ = core._backends.backend_status("cupy")
    return ok


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_ready(), reason="needs a CUDA device and the CuPy backend")
class TestCUDA:
    def test_matches_cpu(self):
        a = _inputs("mask", h=9, w=7)
        cpu = {n: t.detach().float() for n, t in a.items()}
        cuda = {n: t.cuda() for n, t in cpu.items()}
        out = lt.local_attention2d(cuda["q"], cuda["k"], cuda["v"], 2, 3, bias=cuda["bias"],
                                   rel=cuda["rel"])
        ref = lt.local_attention2d(cpu["q"], cpu["k"], cpu["v"], 2, 3, bias=cpu["bias"],
                                   rel=cpu["rel"])
        torch.testing.assert_close(out.cpu(), ref, rtol=2e-5, atol=2e-5)

    def test_gradcheck_cuda(self):
        a = {n: t.detach().cuda().requires_grad_() for n, t in _inputs("zeros").items()}
        assert _gradcheck(
            lambda q, k, v, b: lt.local_attention2d(q, k, v, 2, 3, bias=b, border="zeros"),
            (a["q"], a["k"], a["v"], a["bias"]))

    def test_autocast_runs_in_float16(self):
        q = torch.randn(1, 8, 6, 6, device="cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            out = lt.local_attention2d(q, q, q, 2, 3)
        if hasattr(torch.library, "register_autocast"):
            assert out.dtype == torch.float16

    def test_layer_under_autocast(self):
        # The conv outputs are float16 under autocast while x stays float32: the autocast
        # rule casts every input of the op to float16.
        layer = LocalRelation2d(16, 3, m=4).cuda()
        x = torch.randn(2, 16, 8, 8, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.float16):
            y = layer(x)
        y.float().sum().backward()
        assert x.grad is not None and x.grad.dtype == torch.float32

    def test_mixed_devices(self):
        q = torch.randn(1, 4, 5, 5)
        with pytest.raises(TypeError, match="device"):
            lt.local_attention2d(q, q, q.cuda(), 2, 3)

    def test_bfloat16_and_layer(self):
        layer = LocalRelation2d(16, 3, m=4).cuda()
        x = torch.randn(2, 16, 8, 8, device="cuda")
        layer(x).sum().backward()
        y = lt.local_attention2d(*(torch.randn(1, 8, 6, 6, device="cuda",
                                               dtype=torch.bfloat16),) * 3, 2, 3)
        assert y.dtype == torch.bfloat16


@pytest.mark.slow
def test_sim_backend_through_the_adapter():
    ok, reason = core._backends.backend_status("sim")
    if not ok:
        pytest.skip(f"sim backend unavailable: {reason}")
    a = _inputs("mask", h=6, w=5)
    q, k, v, bias = (a[n].detach().requires_grad_() for n in ("q", "k", "v", "bias"))
    grads = []
    for backend in ("sim", None):
        out = lt.local_attention2d(q, k, v, 2, 3, bias=bias, backend=backend)
        grads.append((out,) + torch.autograd.grad(out.square().sum(), (q, k, v, bias)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_compile_dynamic_shapes():
    torch._dynamo.reset()

    def f(q):
        logits = lt.local_qk2d(q, q, 2, 3)
        return lt.local_attention2d(q, q, q, 2, 3, stride=2).sum() + _finite(logits).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for shape in ((1, 4, 5, 5), (2, 4, 7, 6)):
        q = torch.randn(*shape)
        torch.testing.assert_close(compiled(q), f(q))


def test_ops_are_tagged_cudagraph_unsafe_where_torch_has_the_tag():
    """CUDA graph capture must not see CuPy's allocations: Inductor keeps the ops out."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None:
        pytest.skip(f"torch {torch.__version__} has no Tag.cudagraph_unsafe")
    for name in ("local_attention2d", "local_attention2d_backward", "local_qk2d", "local_av2d",
                 "local_relation2d", "sasa2d_backward"):
        assert tag in getattr(torch.ops.localrel, name).default.tags, name
