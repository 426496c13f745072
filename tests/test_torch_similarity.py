"""The relation family through the torch adapter: similarity functions and ``key_bias`` in
the custom ops (gradcheck for every similarity and function, key_bias with -inf entries
and empty windows), the layers (LR-Net's key saliency, padding masks in SASA2d), FLOP
formulas and torch.compile."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cupy_localrel as core  # noqa: E402
from cupy_localrel import _geometry as G  # noqa: E402
from cupy_localrel.adapters import torch as lt  # noqa: E402
from cupy_localrel.adapters.torch import layers  # noqa: E402

F64 = torch.float64


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_()


def _key_bias(b, heads, h, w, seed):
    """Random, with -inf on the top row of (0, 0) and on every key of the last head of the
    last batch (all its windows are empty)."""
    kb = torch.randn(b, heads, h, w, generator=torch.Generator().manual_seed(seed), dtype=F64)
    kb[0, 0, 0] = float("-inf")
    kb[-1, -1] = float("-inf")
    return kb.requires_grad_()


def _finite(logits):
    return torch.where(torch.isinf(logits), torch.zeros_like(logits), logits)


def _check(fn, inputs):
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("similarity", G.SIMILARITIES)
@pytest.mark.parametrize("border", ["mask", "zeros"])
def test_gradcheck_every_function(similarity, border):
    """local_attention2d, local_qk2d and local_relation2d for every similarity (and
    sasa2d, dot only), key_bias included, in float64."""
    q, k, v = _rand(2, 4, 4, 3, seed=1), _rand(2, 4, 4, 3, seed=2), _rand(2, 2, 4, 3, seed=3)
    bias, kb = _rand(2, 3, 3, seed=4), _key_bias(2, 2, 4, 3, seed=5)
    kw = dict(border=border, similarity=similarity, scale=0.8)
    _check(lambda q, k, v, bias, kb: lt.local_attention2d(q, k, v, 2, 3, bias=bias, key_bias=kb, **kw),
           (q, k, v, bias, kb))
    _check(lambda q, k, kb: _finite(lt.local_qk2d(q, k, 2, 3, key_bias=kb, **kw)), (q, k, kb))
    key, query = _rand(2, 2, 4, 3, seed=6), _rand(2, 2, 4, 3, seed=7)
    _check(lambda x, key, query, g, kb: lt.local_relation2d(x, key, query, g, 3, key_bias=kb, **kw),
           (v, key, query, bias, kb))
    if similarity == "dot":
        rh, rw = _rand(2, 1, 3, seed=8), _rand(2, 1, 3, seed=9)
        _check(lambda q, k, v, rh, rw, kb: lt.sasa2d(q, k, v, rh, rw, 2, 3, key_bias=kb, border=border),
               (q, k, v, rh, rw, kb))


def test_torch_ops_equal_the_core_and_key_bias_gradient_is_zero_at_minus_inf():
    q, k, v = _rand(1, 4, 5, 4, seed=1), _rand(1, 4, 5, 4, seed=2), _rand(1, 4, 5, 4, seed=3)
    kb = _key_bias(1, 2, 5, 4, seed=4)
    kw = dict(similarity="neg_square_normalized", border="mask")
    out, lse = lt.local_attention2d(q, k, v, 2, 3, key_bias=kb, return_lse=True, **kw)
    n = lambda t: t.detach().numpy()  # noqa: E731
    want, want_lse = core.local_attention2d(n(q), n(k), n(v), 2, 3, key_bias=n(kb), return_lse=True, **kw)
    np.testing.assert_array_equal(n(out), want)
    np.testing.assert_array_equal(n(lse), want_lse)
    assert torch.isneginf(lse[0, 1]).all() and (out[0, 2:] == 0).all()   # empty windows
    out.square().sum().backward()
    assert torch.isfinite(kb.grad).all() and (kb.grad[torch.isneginf(kb.detach())] == 0).all()
    assert kb.grad[0, 0, 1:].abs().sum() > 0


def test_similarity_errors_name_the_argument():
    q = torch.zeros(1, 4, 5, 5)
    with pytest.raises(ValueError, match="similarity must be one of"):
        lt.local_attention2d(q, q, q, 2, 3, similarity="cos")
    with pytest.raises(ValueError, match="rel .*'dot' only"):
        lt.local_qk2d(q, q, 2, 3, rel=torch.zeros(2, 2, 3, 3), similarity="key")
    with pytest.raises(ValueError, match="key_bias must have shape"):
        lt.local_relation2d(q, q[:, :2], q[:, :2], torch.zeros(2, 3, 3), 3, key_bias=torch.zeros(1, 3, 5, 5))
    with pytest.raises(ValueError, match="similarity must be one of"):
        lt.LocalRelation2d(16, 3, m=8, similarity="dots")


def test_flop_formula_counts_the_similarity():
    from torch.utils.flop_counter import FlopCounterMode
    b, heads, dqk, dv, h, w, k = 1, 2, 4, 3, 6, 5, 3
    q = torch.randn(b, heads * dqk, h, w)
    v = torch.randn(b, heads * dv, h, w)
    counts = {}
    for similarity in ("dot", "neg_abs_normalized"):
        with FlopCounterMode(display=False) as counter:
            lt.local_attention2d(q, q, v, heads, k, similarity=similarity)
        counts[similarity] = counter.get_total_flops()
    pairs = b * heads * k * k * h * w
    assert counts["dot"] == 2 * pairs * (dqk + dv)
    assert counts["neg_abs_normalized"] == pairs * (7 * dqk + 2 * dv)


def test_compile_fullgraph_with_similarity_and_key_bias():
    torch._dynamo.reset()
    q, v = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6)
    kb = torch.zeros(1, 2, 6, 6)
    kb[..., 4:] = float("-inf")

    def f(q, v, kb):
        return lt.local_attention2d(q, q, v, 2, 3, similarity="neg_abs", key_bias=kb).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (compiled, f):
        qq, kk = q.clone().requires_grad_(), kb.clone().requires_grad_()
        fn(qq, v, kk).backward()
        grads.append((qq.grad, kk.grad))
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------

def test_local_relation_key_saliency_is_key_bias_from_an_extra_conv():
    torch.manual_seed(0)
    layer = lt.LocalRelation2d(16, 3, m=4, similarity="neg_square", key_saliency=True).double()
    assert layer.saliency.out_channels == layer.heads == 4
    x = torch.randn(2, 16, 6, 5, dtype=F64, requires_grad=True)
    out = layer(x)
    want = lt.local_relation2d(x, layer.key(x), layer.query(x), layer.geometry(), 3,
                               similarity="neg_square", key_bias=layer.saliency(x))
    torch.testing.assert_close(out, want)
    out.square().sum().backward()
    assert layer.saliency.weight.grad.abs().sum() > 0
    # A padding mask adds to the saliency: masked keys are removed.
    valid = torch.ones(2, 6, 5, dtype=torch.bool)
    valid[1, :, 3:] = False
    mask = lt.padding_key_bias(valid, layer.heads, dtype=F64)
    assert mask.shape == (2, 4, 6, 5) and torch.isneginf(mask[1, :, :, 3:]).all() and (mask[0] == 0).all()
    with torch.no_grad():
        masked = layer(x, key_bias=mask)
        want = lt.local_relation2d(x, layer.key(x), layer.query(x), layer.geometry(), 3,
                                   similarity="neg_square", key_bias=layer.saliency(x) + mask)
    torch.testing.assert_close(masked, want)
    # A key_bias of the wrong shape is refused before it is added to the saliency
    # (the sum would broadcast it).
    for wrong in (mask[:, :1], mask[:1], mask[0, 0]):
        with pytest.raises(ValueError, match="key_bias must have shape"):
            layer(x, key_bias=wrong)
    # ... and so is a bool mask or another dtype (the sum would promote it: a bool padding
    # mask would add +1 instead of removing the padded keys).
    for wrong in (~valid[:, None].expand(2, 4, 6, 5), mask.float()):
        with pytest.raises(TypeError, match="key_bias"):
            layer(x, key_bias=wrong)
    plain = lt.LocalRelation2d(16, 3, m=4)
    assert plain.saliency is None and plain.similarity == "dot"


def test_sasa2d_padding_mask_equals_each_image_alone():
    """Two images of different sizes padded into one batch: with padding_key_bias, each
    image's own pixels get what the image gives alone (border="mask")."""
    torch.manual_seed(1)
    layer = lt.SASA2d(4, 8, kernel_size=3, heads=2).double()
    sizes, pad_to = [(5, 7), (7, 4)], (7, 7)
    images = [torch.randn(1, 4, h, w, dtype=F64) for h, w in sizes]
    batch = torch.zeros(2, 4, *pad_to, dtype=F64)
    valid = torch.zeros(2, *pad_to, dtype=torch.bool)
    for b, ((h, w), img) in enumerate(zip(sizes, images)):
        batch[b, :, :h, :w] = img[0]
        valid[b, :h, :w] = True
    out = layer(batch, key_bias=lt.padding_key_bias(valid, layer.heads, dtype=F64))
    for b, ((h, w), img) in enumerate(zip(sizes, images)):
        torch.testing.assert_close(out[b:b + 1, :, :h, :w], layer(img), rtol=1e-12, atol=1e-12)
    # Without the mask the padding leaks into the border pixels.
    assert not torch.allclose(layer(batch)[1:, :, :7, :4], layer(images[1]))


def test_padding_key_bias_checks_its_mask():
    with pytest.raises(ValueError, match="valid must be a"):
        layers.padding_key_bias(torch.ones(4, 4, dtype=torch.bool), 2)
