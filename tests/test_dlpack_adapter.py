"""The DLPack adapter: any ``__dlpack__`` array in, the caller's kind of array out."""
import numpy as np
import pytest

import cupy_localrel as core
from cupy_localrel.adapters import dlpack as dl


def _arrays(seed=0, heads=2, dqk=2, dv=3, h=5, w=4, dtype=np.float64):
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    return dict(q=r(2, heads * dqk, h, w), k=r(2, heads * dqk, h, w), v=r(2, heads * dv, h, w),
                bias=r(heads, 3, 3), rel=r(heads, dqk, 3, 3), rh=r(heads, dqk // 2, 3),
                rw=r(heads, dqk // 2, 3))


def test_numpy_passthrough_equals_core():
    a = _arrays()
    out, lse = dl.local_attention2d(a["q"], a["k"], a["v"], 2, 3, bias=a["bias"], rel=a["rel"],
                                    return_lse=True)
    ref, ref_lse = core.local_attention2d(a["q"], a["k"], a["v"], 2, 3, bias=a["bias"],
                                          rel=a["rel"], return_lse=True)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(lse, ref_lse)
    g = dl.local_attention2d_backward(np.ones_like(out), a["q"], a["k"], a["v"], out, lse, 2, 3,
                                      bias=a["bias"])
    assert g.rel is None and g.bias.shape == a["bias"].shape


def test_bad_input():
    with pytest.raises(TypeError, match="attn must be an array with __dlpack__, got list"):
        dl.local_av2d([[1.0]], np.zeros((1, 2, 3, 3)), 3)
    a = _arrays()
    with pytest.raises(TypeError, match="k must be an array with __dlpack__"):
        dl.local_attention2d(a["q"], a["k"].tolist(), a["v"], 2, 3)


class TestTorch:
    torch = pytest.importorskip("torch")

    def _t(self, a):
        return {n: self.torch.from_numpy(x) for n, x in a.items()}

    def test_every_function_returns_torch_and_matches(self):
        torch = self.torch
        a = _arrays()
        t = self._t(a)
        out, lse = dl.local_attention2d(t["q"], t["k"], t["v"], 2, 3, bias=t["bias"],
                                        rel=t["rel"], return_lse=True, border="zeros")
        assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
        np.testing.assert_array_equal(out.numpy(), core.local_attention2d(
            a["q"], a["k"], a["v"], 2, 3, bias=a["bias"], rel=a["rel"], border="zeros"))
        g = dl.local_attention2d_backward(torch.ones_like(out), t["q"], t["k"], t["v"], out, lse,
                                          2, 3, bias=t["bias"], rel=t["rel"], border="zeros")
        assert all(isinstance(x, torch.Tensor) for x in g[:5]) and g.key_bias is None
        logits = dl.local_qk2d(t["q"], t["k"], 2, 3, rel=t["rel"])
        assert isinstance(logits, torch.Tensor) and logits.shape == (2, 2, 9, 5, 4)
        gq = dl.local_qk2d_backward(torch.ones_like(logits), t["q"], t["k"], 2, 3)
        assert gq.bias is None and isinstance(gq.q, torch.Tensor)
        attn = torch.softmax(logits, 2)
        o = dl.local_av2d(attn, t["v"], 3)
        np.testing.assert_array_equal(o.numpy(), core.local_av2d(attn.numpy(), a["v"], 3))
        ga = dl.local_av2d_backward(torch.ones_like(o), attn, t["v"], 3)
        assert ga.attn.shape == attn.shape
        x, key = t["v"], t["q"][:, :2].contiguous()
        r, rl = dl.local_relation2d(x, key, key, t["bias"], 3, return_lse=True)
        gr = dl.local_relation2d_backward(torch.ones_like(r), x, key, key, t["bias"], r, rl, 3)
        assert gr.geometry.shape == (2, 3, 3) and isinstance(gr.x, torch.Tensor)
        s, sl = dl.sasa2d(t["q"], t["k"], t["v"], t["rh"], t["rw"], 2, 3, return_lse=True)
        gs = dl.sasa2d_backward(torch.ones_like(s), t["q"], t["k"], t["v"], t["rh"], t["rw"],
                                s, sl, 2, 3)
        assert gs.rel_h.shape == t["rh"].shape

    def test_similarity_and_key_bias_cross_dlpack(self):
        """key_bias is converted like every array; similarity passes through; results and
        the key_bias gradients are torch tensors equal to the core's."""
        torch = self.torch
        a = _arrays(seed=4)
        kb = np.random.default_rng(5).standard_normal((2, 2, 5, 4))
        kb[0, :, 3:] = -np.inf
        t = self._t(dict(a, kb=kb))
        kw = dict(similarity="neg_abs_normalized", key_bias=t["kb"])
        core_kw = dict(kw, key_bias=kb)
        out, lse = dl.local_attention2d(t["q"], t["k"], t["v"], 2, 3, return_lse=True, **kw)
        want, want_lse = core.local_attention2d(a["q"], a["k"], a["v"], 2, 3, return_lse=True, **core_kw)
        assert isinstance(out, torch.Tensor)
        np.testing.assert_array_equal(out.numpy(), want)
        g = dl.local_attention2d_backward(torch.ones_like(out), t["q"], t["k"], t["v"], out, lse, 2, 3, **kw)
        want_g = core.local_attention2d_backward(np.ones_like(want), a["q"], a["k"], a["v"], want, want_lse,
                                                 2, 3, **core_kw)
        assert isinstance(g.key_bias, torch.Tensor)
        np.testing.assert_array_equal(g.key_bias.numpy(), want_g.key_bias)
        x, key, query = t["v"], t["q"][:, :2].contiguous(), t["k"][:, :2].contiguous()
        r, rl = dl.local_relation2d(x, key, query, t["bias"], 3, return_lse=True, **kw)
        gr = dl.local_relation2d_backward(torch.ones_like(r), x, key, query, t["bias"], r, rl, 3, **kw)
        want_r = core.local_relation2d(a["v"], a["q"][:, :2], a["k"][:, :2], a["bias"], 3, **core_kw)
        np.testing.assert_array_equal(r.numpy(), want_r)
        assert isinstance(gr.key_bias, torch.Tensor) and gr.key_bias.shape == (2, 2, 5, 4)
        gq = dl.local_qk2d_backward(torch.ones(2, 2, 9, 5, 4, dtype=torch.float64), t["q"], t["k"], 2, 3,
                                    **kw)
        want_q = core.local_qk2d_backward(np.ones((2, 2, 9, 5, 4)), a["q"], a["k"], 2, 3, **core_kw)
        np.testing.assert_array_equal(gq.key_bias.numpy(), want_q.key_bias)

    def test_zero_copy_inputs_and_outputs(self):
        torch = self.torch
        q = torch.randn(1, 4, 5, 5, dtype=torch.float64)
        out = dl.local_av2d(torch.full((1, 2, 9, 5, 5), 1 / 9, dtype=torch.float64), q, 3)
        assert out.is_contiguous()
        # The core saw a view of q, not a copy: a NumPy view shares the memory.
        assert np.shares_memory(np.from_dlpack(q), q.numpy())

    def test_requires_grad_and_bfloat16(self):
        torch = self.torch
        pytest.importorskip("ml_dtypes")
        q = torch.randn(1, 4, 5, 5, requires_grad=True)
        out = dl.local_attention2d(q, q, q, 2, 3)
        assert out.dtype == torch.float32 and not out.requires_grad
        qb = q.detach().to(torch.bfloat16)
        ob = dl.local_attention2d(qb, qb, qb, 2, 3)
        assert ob.dtype == torch.bfloat16
        ref = core.local_attention2d(*(qb.float().numpy(),) * 3, 2, 3)
        assert np.abs(ob.float().numpy() - ref).max() < 3e-2 * max(1, np.abs(ref).max())

    def test_mixed_dtypes(self):
        torch = self.torch
        q = torch.randn(1, 4, 5, 5)
        with pytest.raises(TypeError, match="dtype"):
            dl.local_attention2d(q, q, q.double(), 2, 3)
