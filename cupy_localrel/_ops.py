"""The public operations: check once (``_geometry``), then dispatch (``_backends``).

Shapes (docs/contract.md): ``q``/``k`` ``(B, heads*Dqk, H, W)``, ``v`` ``(B, heads*Dv, H, W)``,
``attn``/``logits`` ``(B, heads, kh*kw, Ho, Wo)``, ``out`` ``(B, heads*Dv, Ho, Wo)``,
``lse`` ``(B, heads, Ho, Wo)``, ``bias`` ``(heads, kh, kw)`` and ``rel``
``(heads, Dqk, kh, kw)`` (``2k-1`` per axis with ``border="shift"``), ``key_bias``
``(B, heads, H, W)`` (one logit per key pixel: key saliency, padding masks).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from . import _backends
from . import _geometry as G


class AttentionGrads(NamedTuple):
    q: object
    k: object
    v: object
    bias: object
    rel: object
    key_bias: object


class QKGrads(NamedTuple):
    q: object
    k: object
    bias: object
    rel: object
    key_bias: object


class AVGrads(NamedTuple):
    attn: object
    v: object


class LocalRelationGrads(NamedTuple):
    x: object
    key: object
    query: object
    geometry: object
    key_bias: object


class SASAGrads(NamedTuple):
    q: object
    k: object
    v: object
    rel_h: object
    rel_w: object
    key_bias: object


def _on_inputs_device(op):
    """Run ``op`` with CuPy's current device = the device of its first CuPy array.

    The kernels launch on the inputs' device anyway; this also puts what the public layer
    itself allocates there (empty results, SASA's ``rel_h``/``rel_w`` gradient sums), whatever
    device is current. Every public op passes here first, so this is also where byte-swapped
    NumPy inputs become native copies (:func:`_geometry.native_byte_order`).
    """
    @functools.wraps(op)
    def wrapper(*args, **kwargs):
        args = tuple(G.native_byte_order(a) for a in args)
        kwargs = {n: G.native_byte_order(a) for n, a in kwargs.items()}
        first = next((a for a in (*args, *kwargs.values()) if G.array_kind(a) == "cupy"), None)
        if first is None:
            return op(*args, **kwargs)
        import cupy
        with cupy.cuda.Device(first.device.id):
            return op(*args, **kwargs)
    return wrapper


def _array_module(kind: str):
    if kind == "cupy":
        import cupy
        return cupy
    return np


def _is_empty(geo: G.Geometry) -> bool:
    return geo.batch == 0 or geo.out_h * geo.out_w == 0


def _zeros_like_each(xp, *arrays):
    """Zeros shaped like each array (``None`` stays ``None``; a SplitRel gives a SplitRel)."""
    def zeros(a):
        if isinstance(a, G.SplitRel):
            return G.SplitRel(*_zeros_like_each(xp, *a))
        return None if a is None else xp.zeros(a.shape, a.dtype)
    return tuple(zeros(a) for a in arrays)


# ---------------------------------------------------------------------------------------
# local_attention2d
# ---------------------------------------------------------------------------------------

@_on_inputs_device
def local_attention2d(q, k, v, heads, kernel_size, *, bias=None, rel=None, scale=None,
                      return_lse=False, dilation=1, stride=1, border="mask", backend=None,
                      similarity="dot", key_bias=None):
    """Fused local attention over a ``kernel_size`` window around each output pixel.

    Args:
        q, k: ``(B, heads*Dqk, H, W)``. v: ``(B, heads*Dv, H, W)``.
        heads: number of heads; head ``h`` owns channel group ``h`` of ``q``/``k``/``v``.
        kernel_size: int or ``(kh, kw)``; odd for ``border="mask"``/``"zeros"``.
        bias: ``(heads, kh, kw)`` additive logit per window offset
            (``(heads, 2kh-1, 2kw-1)`` with ``border="shift"``).
        rel: ``(heads, Dqk, kh, kw)`` content-position embedding, adds ``q . rel``
            (``2k-1`` per axis with ``border="shift"``). Inside the package also a
            ``_geometry.SplitRel`` (how :func:`sasa2d` passes its factored ``rel``).
        scale: logit scale, default ``1/sqrt(Dqk)``.
        return_lse: also return the log-sum-exp of the logits.
        dilation, stride: int or pair. border: ``"mask"``, ``"zeros"`` or ``"shift"``.
        backend: ``None`` (by array type), ``"numpy"``, ``"cupy"`` or ``"sim"``.
        similarity: ``phi(q, k)`` summed over a head's channels for the logit: ``"dot"``
            (``q*k``), ``"key"`` (``k``), ``"neg_abs"``, ``"neg_abs_normalized"``,
            ``"neg_square_normalized"``, ``"neg_square"`` (docs/contract.md); ``rel`` needs
            ``"dot"``.
        key_bias: ``(B, heads, H, W)`` additive logit of each key pixel, added to every
            valid slot that looks at it; ``-inf`` removes the key (padding masks).

    Returns:
        ``out`` ``(B, heads*Dv, Ho, Wo)`` with ``Ho = ceil(H / stride)``, or
        ``(out, lse)`` with ``lse`` ``(B, heads, Ho, Wo)`` in float32 (float64 for
        float64 inputs). A window where no slot takes part (every logit ``-inf``) gives
        ``out = 0`` and ``lse = -inf``.
    """
    kind, _ = G.check_arrays(dict(q=q, k=k, v=v, bias=bias, rel=rel, key_bias=key_bias))
    G.check_backend_name(backend)
    geo = G.qk_geometry(q, k, heads, kernel_size, dilation, stride, border, bias, rel, scale, v=v,
                        similarity=similarity, key_bias=key_bias)
    impl = _backends.resolve(backend, kind)
    if _is_empty(geo):
        xp = _array_module(kind)
        out, lse = xp.zeros(geo.out_shape, geo.dtype), xp.zeros(geo.lse_shape, G.lse_dtype(geo.dtype))
    else:
        out, lse = impl.attention_forward(geo, q, k, v, bias, rel, key_bias)
    return (out, lse) if return_lse else out


@_on_inputs_device
def local_attention2d_backward(grad_out, q, k, v, out, lse, heads, kernel_size, *, bias=None,
                               rel=None, scale=None, dilation=1, stride=1, border="mask",
                               backend=None, similarity="dot", key_bias=None) -> AttentionGrads:
    """Gradients of :func:`local_attention2d`.

    Args: ``grad_out`` and ``out`` ``(B, heads*Dv, Ho, Wo)``; ``lse`` ``(B, heads, Ho,
    Wo)`` as returned by the forward with ``return_lse=True``; the rest as the forward.

    Returns:
        ``AttentionGrads(q, k, v, bias, rel, key_bias)`` with the inputs' shapes;
        ``bias``/``rel``/``key_bias`` are ``None`` when not given. ``key_bias``: the sum of
        the logit gradients of every (query, slot) that sees the key (0 at ``-inf`` entries).
    """
    kind, _ = G.check_arrays(dict(grad_out=grad_out, q=q, k=k, v=v, out=out, bias=bias, rel=rel,
                                  key_bias=key_bias))
    G.check_backend_name(backend)
    geo = G.qk_geometry(q, k, heads, kernel_size, dilation, stride, border, bias, rel, scale, v=v,
                        similarity=similarity, key_bias=key_bias)
    G.check_shape(grad_out, "grad_out", geo.out_shape)
    G.check_shape(out, "out", geo.out_shape)
    G.check_lse(lse, geo)
    impl = _backends.resolve(backend, kind)
    if _is_empty(geo):
        return AttentionGrads(*_zeros_like_each(_array_module(kind), q, k, v, bias, rel, key_bias))
    return AttentionGrads(*impl.attention_backward(geo, grad_out, q, k, v, out, lse, bias, rel,
                                                   key_bias))


# ---------------------------------------------------------------------------------------
# local_qk2d / local_av2d: the unfused halves, for users who want the weights
# ---------------------------------------------------------------------------------------

@_on_inputs_device
def local_qk2d(q, k, heads, kernel_size, *, bias=None, rel=None, scale=None, dilation=1,
               stride=1, border="mask", backend=None, similarity="dot", key_bias=None):
    """Window logits ``(B, heads, kh*kw, Ho, Wo)``; masked slots are ``-inf``.

    Args as :func:`local_attention2d` (no ``v``). With ``border="zeros"`` an out-of-image
    slot has the logit of a zero key: ``scale * sum_c phi(q_c, 0) (+ scale * q . rel) +
    bias`` (``key_bias`` 0). Logits include ``key_bias``.
    """
    kind, _ = G.check_arrays(dict(q=q, k=k, bias=bias, rel=rel, key_bias=key_bias))
    G.check_backend_name(backend)
    geo = G.qk_geometry(q, k, heads, kernel_size, dilation, stride, border, bias, rel, scale,
                        similarity=similarity, key_bias=key_bias)
    impl = _backends.resolve(backend, kind)
    if _is_empty(geo):
        return _array_module(kind).zeros(geo.attn_shape, geo.dtype)
    return impl.qk_forward(geo, q, k, bias, rel, key_bias)


@_on_inputs_device
def local_qk2d_backward(grad_logits, q, k, heads, kernel_size, *, bias=None, rel=None,
                        scale=None, dilation=1, stride=1, border="mask", backend=None,
                        similarity="dot", key_bias=None) -> QKGrads:
    """Gradients of :func:`local_qk2d`; ``grad_logits`` ``(B, heads, kh*kw, Ho, Wo)``.

    Gradients at masked slots, and at slots whose key has ``key_bias = -inf``, are
    ignored. Returns ``QKGrads(q, k, bias, rel, key_bias)``.
    """
    kind, _ = G.check_arrays(dict(grad_logits=grad_logits, q=q, k=k, bias=bias, rel=rel,
                                  key_bias=key_bias))
    G.check_backend_name(backend)
    geo = G.qk_geometry(q, k, heads, kernel_size, dilation, stride, border, bias, rel, scale,
                        similarity=similarity, key_bias=key_bias)
    G.check_shape(grad_logits, "grad_logits", geo.attn_shape)
    impl = _backends.resolve(backend, kind)
    if _is_empty(geo):
        return QKGrads(*_zeros_like_each(_array_module(kind), q, k, bias, rel, key_bias))
    return QKGrads(*impl.qk_backward(geo, grad_logits, q, k, bias, rel, key_bias))


@_on_inputs_device
def local_av2d(attn, v, kernel_size, *, dilation=1, stride=1, border="mask", backend=None):
    """Weighted sum of each window's values: ``out`` ``(B, heads*Dv, Ho, Wo)``.

    Args: ``attn`` ``(B, heads, kh*kw, Ho, Wo)`` (heads from ``attn.shape[1]``), ``v``
    ``(B, heads*Dv, H, W)``. Invalid slots add nothing, whatever their weight.
    """
    kind, _ = G.check_arrays(dict(attn=attn, v=v))
    G.check_backend_name(backend)
    geo = G.av_geometry(attn, v, kernel_size, dilation, stride, border)
    impl = _backends.resolve(backend, kind)
    if _is_empty(geo):
        return _array_module(kind).zeros(geo.out_shape, geo.dtype)
    return impl.av_forward(geo, attn, v)


@_on_inputs_device
def local_av2d_backward(grad_out, attn, v, kernel_size, *, dilation=1, stride=1,
                        border="mask", backend=None) -> AVGrads:
    """Gradients of :func:`local_av2d`: ``AVGrads(attn, v)``; invalid slots get 0."""
    kind, _ = G.check_arrays(dict(grad_out=grad_out, attn=attn, v=v))
    G.check_backend_name(backend)
    geo = G.av_geometry(attn, v, kernel_size, dilation, stride, border)
    G.check_shape(grad_out, "grad_out", geo.out_shape)
    impl = _backends.resolve(backend, kind)
    if _is_empty(geo):
        return AVGrads(*_zeros_like_each(_array_module(kind), attn, v))
    return AVGrads(*impl.av_backward(geo, grad_out, attn, v))


# ---------------------------------------------------------------------------------------
# The two papers' layers, as compositions of local_attention2d
# ---------------------------------------------------------------------------------------

def _relation_heads(arrays: dict, kernel_size, border) -> int:
    """``heads`` of LR-Net (one per channel of ``key``), after checking the call's arrays
    in ``local_relation2d``'s own names (``x``, ``key``, ``query``, ``geometry``)."""
    G.check_arrays(arrays)
    return G.relation_heads(arrays["x"], arrays["key"], arrays["query"], arrays["geometry"],
                            kernel_size, border)


@_on_inputs_device
def local_relation2d(x, key, query, geometry, kernel_size, *, scale=1.0, return_lse=False,
                     dilation=1, stride=1, border="mask", backend=None, similarity="dot",
                     key_bias=None):
    """LR-Net aggregation (Hu et al. 2019).

    Args:
        x: ``(B, C, H, W)`` values; ``C/m`` channels share each weight map.
        key, query: ``(B, C/m, H, W)``, one channel per head (``heads = key.shape[1]``).
        geometry: ``(heads, kh, kw)`` geometry-prior logits (the ``bias``).
        scale: appearance-composability scale, default (and ``None``) 1.
        similarity: LR-Net's key/query composition, as :func:`local_attention2d`.
        key_bias: ``(B, heads, H, W)``: LR-Net's key saliency (or a padding mask).

    Returns: ``out`` ``(B, C, Ho, Wo)``, or ``(out, lse)`` with ``return_lse=True``.
    """
    heads = _relation_heads(dict(x=x, key=key, query=query, geometry=geometry, key_bias=key_bias),
                            kernel_size, border)
    return local_attention2d(query, key, x, heads, kernel_size, bias=geometry,
                             scale=G.check_papers_scale(scale),
                             return_lse=return_lse, dilation=dilation, stride=stride,
                             border=border, backend=backend, similarity=similarity,
                             key_bias=key_bias)


@_on_inputs_device
def local_relation2d_backward(grad_out, x, key, query, geometry, out, lse, kernel_size, *,
                              scale=1.0, dilation=1, stride=1, border="mask",
                              backend=None, similarity="dot",
                              key_bias=None) -> LocalRelationGrads:
    """Gradients of :func:`local_relation2d`:
    ``LocalRelationGrads(x, key, query, geometry, key_bias)``."""
    heads = _relation_heads(dict(grad_out=grad_out, x=x, key=key, query=query,
                                 geometry=geometry, out=out, key_bias=key_bias), kernel_size, border)
    g = local_attention2d_backward(grad_out, query, key, x, out, lse, heads, kernel_size,
                                   bias=geometry, scale=G.check_papers_scale(scale),
                                   dilation=dilation,
                                   stride=stride, border=border, backend=backend,
                                   similarity=similarity, key_bias=key_bias)
    return LocalRelationGrads(x=g.v, key=g.k, query=g.q, geometry=g.bias, key_bias=g.key_bias)


def _sasa_rel(arrays: dict, heads, kernel_size, border) -> G.SplitRel:
    """Check SASA's arrays (in its own names, :func:`_geometry.sasa_embeddings`); its ``rel``
    as the backends take it: ``SplitRel(rel_h, rel_w)``, never expanded to ``(heads, Dqk,
    kh, kw)`` (the kernels add ``q . rel`` from the two factors)."""
    G.sasa_embeddings(arrays, heads, kernel_size, border)
    return G.SplitRel(arrays["rel_h"], arrays["rel_w"])


@_on_inputs_device
def sasa2d(q, k, v, rel_h, rel_w, heads, kernel_size, *, scale=1.0, return_lse=False,
           dilation=1, stride=1, border="mask", backend=None, key_bias=None):
    """Stand-alone self-attention (Ramachandran et al. 2019).

    Args:
        q, k: ``(B, heads*Dqk, H, W)``, ``Dqk`` even. v: ``(B, heads*Dv, H, W)``.
        rel_h: ``(heads, Dqk/2, kh)`` row-offset embedding (first half of the channels).
        rel_w: ``(heads, Dqk/2, kw)`` column-offset embedding (second half). Both go
            to the kernels as they are (``_geometry.SplitRel``): no ``(heads, Dqk, kh, kw)``
            table is built per call.
        scale: default (and ``None``) 1: the paper has no ``1/sqrt(d)``.
        border: ``"mask"`` or ``"zeros"``.
        key_bias: ``(B, heads, H, W)`` per-key logit, e.g. ``-inf`` on padding.

    Returns: ``out`` ``(B, heads*Dv, Ho, Wo)``, or ``(out, lse)``.
    """
    rel = _sasa_rel(dict(q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w, key_bias=key_bias), heads,
                    kernel_size, border)
    return local_attention2d(q, k, v, heads, kernel_size, rel=rel,
                             scale=G.check_papers_scale(scale), return_lse=return_lse,
                             dilation=dilation, stride=stride, border=border, backend=backend,
                             key_bias=key_bias)


@_on_inputs_device
def sasa2d_backward(grad_out, q, k, v, rel_h, rel_w, out, lse, heads, kernel_size, *,
                    scale=1.0, dilation=1, stride=1, border="mask", backend=None,
                    key_bias=None) -> SASAGrads:
    """Gradients of :func:`sasa2d`: ``SASAGrads(q, k, v, rel_h, rel_w, key_bias)``."""
    rel = _sasa_rel(dict(grad_out=grad_out, q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w, out=out,
                         key_bias=key_bias),
                    heads, kernel_size, border)
    g = local_attention2d_backward(grad_out, q, k, v, out, lse, heads, kernel_size, rel=rel,
                                   scale=G.check_papers_scale(scale), dilation=dilation,
                                   stride=stride, border=border, backend=backend,
                                   key_bias=key_bias)
    return SASAGrads(q=g.q, k=g.k, v=g.v, rel_h=g.rel.rows, rel_w=g.rel.cols, key_bias=g.key_bias)
