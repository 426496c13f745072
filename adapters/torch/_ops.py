"""The core's operations as ``torch.library`` custom ops (namespace ``localrel``).

Ten ops: five forward ops and their five backward ops, each with a fake (meta) kernel so
``torch.compile(fullgraph=True)``, FakeTensor and the meta device see them, autograd
formulas that call the backward ops, FLOP formulas for ``FlopCounterMode`` and, where the
torch version has it, a CUDA autocast rule (float16).

No math here: every kernel converts its tensors (:mod:`._convert`) and calls the function
of the same name in :mod:`cupy_localrel`. 4-D outputs keep a ``channels_last`` input's
memory format (gradients their input's), as ``Conv2d`` does. Double backward is not
supported: differentiating a backward op raises a ``RuntimeError`` saying so. Optional tensors that were not given have no
gradient; the backward ops return an empty tensor in their place (a custom op cannot
return ``None``), which the autograd formulas turn back into ``None``.
"""
# No ``from __future__ import annotations`` here: torch 2.4's custom_op reads the schema
# from the annotations and does not understand stringified ones.
import inspect
from typing import List, Optional, Tuple

import torch
from torch import Tensor

import cupy_localrel as core
from cupy_localrel import _geometry as G

from ._convert import Bridge, check_tensors

NAMESPACE = "localrel"

__all__ = [
    "local_attention2d", "local_qk2d", "local_av2d", "local_relation2d", "sasa2d",
]


# ---------------------------------------------------------------------------------------
# Helpers: run a core function on tensors; shapes for the fake kernels
# ---------------------------------------------------------------------------------------

def _run(fn, ref: Tensor, backend, arrays: dict, params: dict, keep=()):
    """``fn(**arrays, **params)`` on the core; tensors in, tensors out.

    Outputs take the memory format of :func:`_memory_format`: a forward's 4-D outputs that
    of its inputs, each gradient (a named tuple's field) that of its own input.
    """
    bridge = Bridge(ref, backend)
    fmt = _memory_format(*arrays.values())
    with bridge.context():
        result = fn(**{n: bridge.array(t) for n, t in arrays.items()}, **params,
                    backend=bridge.backend)
        if not isinstance(result, tuple):
            return _to_format(bridge.tensor(result), fmt)
        fields = getattr(result, "_fields", None)
        return tuple(_to_format(bridge.tensor(r, keep_dtype=i in keep),
                                _memory_format(arrays[fields[i]]) if fields else fmt)
                     for i, r in enumerate(result))


# Memory format. Like Conv2d, 4-D outputs are channels_last when an input is (so the next
# conv pays no layout copy), and gradients have their input's format. The core computes
# in NCHW either way; the fake kernels below allocate with the same rule.

def _memory_format(*tensors) -> torch.memory_format:
    """``channels_last`` if a given 4-D tensor is stored so (and not also NCHW-contiguous)."""
    for t in tensors:
        if (t is not None and t.dim() == 4 and not t.is_contiguous()
                and t.is_contiguous(memory_format=torch.channels_last)):
            return torch.channels_last
    return torch.contiguous_format


def _to_format(t: Optional[Tensor], fmt) -> Optional[Tensor]:
    if t is None or t.dim() != 4 or fmt is torch.contiguous_format:
        return t
    return t.contiguous(memory_format=fmt)


def _like(t: Tensor) -> Tensor:
    """Fake gradient of ``t``: its shape, dtype, device and memory format (as ``_run``)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=_memory_format(t))


def _window(kernel_size, dilation, stride):
    return dict(kernel_size=tuple(kernel_size), dilation=tuple(dilation), stride=tuple(stride))


def _out_hw(x: Tensor, stride) -> tuple[int, int]:
    return (G.output_length(x.shape[2], stride[0]), G.output_length(x.shape[3], stride[1]))


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_out_lse(x: Tensor, channels: int, heads: int, stride,
                  *inputs) -> tuple[Tensor, Tensor]:
    """Meta outputs of a fused forward op: out (B, channels, Ho, Wo) like x, lse (B, heads,
    Ho, Wo), in the memory format of the op's ``inputs`` (as ``_run``)."""
    ho, wo = _out_hw(x, stride)
    fmt = _memory_format(*inputs)
    return (torch.empty((x.shape[0], channels, ho, wo), dtype=x.dtype, device=x.device,
                        memory_format=fmt),
            torch.empty((x.shape[0], heads, ho, wo), dtype=_lse_dtype(x.dtype), device=x.device,
                        memory_format=fmt))


def _grad_or_empty(g, like: Tensor):
    """A gradient tensor for an output slot of a backward op (empty for a missing input)."""
    return like.new_empty((0,)) if g is None else g


def _none_if_absent(g: Tensor, given) -> Optional[Tensor]:
    return g if given is not None else None


def _has_op(name: str) -> bool:
    try:
        getattr(getattr(torch.ops, NAMESPACE), name)
        return True
    except (AttributeError, RuntimeError):
        return False


_ALREADY_DEFINED = _has_op("local_attention2d")


def _op_tags() -> dict:
    """``cudagraph_unsafe`` where torch has it (2.8+): the CUDA path allocates from CuPy's
    pool, which a CUDA graph capture must not see, so Inductor's CUDA graphs
    (``mode="reduce-overhead"``) run these ops outside the graph instead of failing."""
    tag = getattr(torch.Tag, "cudagraph_unsafe", None)
    if tag is None or "tags" not in inspect.signature(torch.library.custom_op).parameters:
        return {}
    return {"tags": (tag,)}


def _custom_op(name):
    """``torch.library.custom_op`` unless the op exists already (then a no-op decorator)."""
    if _ALREADY_DEFINED:
        return lambda fn: getattr(getattr(torch.ops, NAMESPACE), name)
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), **_op_tags())


def _register_fake(op):
    if _ALREADY_DEFINED:
        return lambda fn: fn
    return torch.library.register_fake(f"{NAMESPACE}::{op}")


# ---------------------------------------------------------------------------------------
# Fused attention
# ---------------------------------------------------------------------------------------

@_custom_op("local_attention2d")
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, heads: int, kernel_size: List[int],
                   bias: Optional[Tensor], rel: Optional[Tensor], scale: Optional[float],
                   dilation: List[int], stride: List[int], border: str,
                   backend: Optional[str], similarity: str,
                   key_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    ref = check_tensors("local_attention2d", dict(q=q, k=k, v=v, bias=bias, rel=rel, key_bias=key_bias))
    return _run(core.local_attention2d, ref, backend,
                dict(q=q, k=k, v=v, bias=bias, rel=rel, key_bias=key_bias),
                dict(heads=heads, scale=scale, return_lse=True, border=border, similarity=similarity,
                     **_window(kernel_size, dilation, stride)), keep=(1,))


@_register_fake("local_attention2d")
def _(q, k, v, heads, kernel_size, bias, rel, scale, dilation, stride, border, backend, similarity,
      key_bias):
    return _fake_out_lse(q, v.shape[1], heads, stride, q, k, v, bias, rel, key_bias)


@_custom_op("local_attention2d_backward")
def _attention_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   heads: int, kernel_size: List[int], bias: Optional[Tensor],
                   rel: Optional[Tensor], scale: Optional[float], dilation: List[int],
                   stride: List[int], border: str,
                   backend: Optional[str], similarity: str,
                   key_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ref = check_tensors("local_attention2d_backward",
                        dict(grad_out=grad_out, q=q, k=k, v=v, out=out, bias=bias, rel=rel,
                             key_bias=key_bias))
    g = _run(core.local_attention2d_backward, ref, backend,
             dict(grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse, bias=bias, rel=rel,
                  key_bias=key_bias),
             dict(heads=heads, scale=scale, border=border, similarity=similarity,
                  **_window(kernel_size, dilation, stride)))
    return (g[0], g[1], g[2], _grad_or_empty(g[3], q), _grad_or_empty(g[4], q),
            _grad_or_empty(g[5], q))


@_register_fake("local_attention2d_backward")
def _(grad_out, q, k, v, out, lse, heads, kernel_size, bias, rel, scale, dilation, stride,
      border, backend, similarity, key_bias):
    return (_like(q), _like(k), _like(v),
            q.new_empty((0,) if bias is None else bias.shape),
            q.new_empty((0,)) if rel is None else _like(rel),
            q.new_empty((0,)) if key_bias is None else _like(key_bias))


def _attention_setup(ctx, inputs, output):
    (q, k, v, heads, kernel_size, bias, rel, scale, dilation, stride, border, backend, similarity,
     key_bias) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, bias, rel, key_bias, out, lse)
    ctx.params = (heads, kernel_size, scale, dilation, stride, border, backend, similarity)
    ctx.mark_non_differentiable(lse)


def _attention_grad(ctx, grad_out, grad_lse):
    q, k, v, bias, rel, key_bias, out, lse = ctx.saved_tensors
    heads, kernel_size, scale, dilation, stride, border, backend, similarity = ctx.params
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dbias, drel, dkey_bias = torch.ops.localrel.local_attention2d_backward(
        grad_out.contiguous(), q, k, v, out, lse, heads, kernel_size, bias, rel, scale,
        dilation, stride, border, backend, similarity, key_bias)
    return (dq, dk, dv, None, None, _none_if_absent(dbias, bias), _none_if_absent(drel, rel),
            None, None, None, None, None, None, _none_if_absent(dkey_bias, key_bias))


# ---------------------------------------------------------------------------------------
# Unfused halves: logits and weighted sums
# ---------------------------------------------------------------------------------------

@_custom_op("local_qk2d")
def _qk_fwd(q: Tensor, k: Tensor, heads: int, kernel_size: List[int], bias: Optional[Tensor],
            rel: Optional[Tensor], scale: Optional[float], dilation: List[int],
            stride: List[int], border: str, backend: Optional[str], similarity: str,
            key_bias: Optional[Tensor]) -> Tensor:
    ref = check_tensors("local_qk2d", dict(q=q, k=k, bias=bias, rel=rel, key_bias=key_bias))
    return _run(core.local_qk2d, ref, backend, dict(q=q, k=k, bias=bias, rel=rel, key_bias=key_bias),
                dict(heads=heads, scale=scale, border=border, similarity=similarity,
                     **_window(kernel_size, dilation, stride)))


@_register_fake("local_qk2d")
def _(q, k, heads, kernel_size, bias, rel, scale, dilation, stride, border, backend, similarity,
      key_bias):
    ho, wo = _out_hw(q, stride)
    return q.new_empty((q.shape[0], heads, kernel_size[0] * kernel_size[1], ho, wo))


@_custom_op("local_qk2d_backward")
def _qk_bwd(grad_logits: Tensor, q: Tensor, k: Tensor, heads: int, kernel_size: List[int],
            bias: Optional[Tensor], rel: Optional[Tensor], scale: Optional[float],
            dilation: List[int], stride: List[int], border: str,
            backend: Optional[str], similarity: str,
            key_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ref = check_tensors("local_qk2d_backward",
                        dict(grad_logits=grad_logits, q=q, k=k, bias=bias, rel=rel, key_bias=key_bias))
    g = _run(core.local_qk2d_backward, ref, backend,
             dict(grad_logits=grad_logits, q=q, k=k, bias=bias, rel=rel, key_bias=key_bias),
             dict(heads=heads, scale=scale, border=border, similarity=similarity,
                  **_window(kernel_size, dilation, stride)))
    return g[0], g[1], _grad_or_empty(g[2], q), _grad_or_empty(g[3], q), _grad_or_empty(g[4], q)


@_register_fake("local_qk2d_backward")
def _(grad_logits, q, k, heads, kernel_size, bias, rel, scale, dilation, stride, border,
      backend, similarity, key_bias):
    return (_like(q), _like(k),
            q.new_empty((0,) if bias is None else bias.shape),
            q.new_empty((0,)) if rel is None else _like(rel),
            q.new_empty((0,)) if key_bias is None else _like(key_bias))


def _qk_setup(ctx, inputs, output):
    (q, k, heads, kernel_size, bias, rel, scale, dilation, stride, border, backend, similarity,
     key_bias) = inputs
    ctx.save_for_backward(q, k, bias, rel, key_bias)
    ctx.params = (heads, kernel_size, scale, dilation, stride, border, backend, similarity)


def _qk_grad(ctx, grad_logits):
    q, k, bias, rel, key_bias = ctx.saved_tensors
    heads, kernel_size, scale, dilation, stride, border, backend, similarity = ctx.params
    dq, dk, dbias, drel, dkey_bias = torch.ops.localrel.local_qk2d_backward(
        grad_logits.contiguous(), q, k, heads, kernel_size, bias, rel, scale, dilation,
        stride, border, backend, similarity, key_bias)
    return (dq, dk, None, None, _none_if_absent(dbias, bias), _none_if_absent(drel, rel),
            None, None, None, None, None, None, _none_if_absent(dkey_bias, key_bias))


@_custom_op("local_av2d")
def _av_fwd(attn: Tensor, v: Tensor, kernel_size: List[int], dilation: List[int],
            stride: List[int], border: str, backend: Optional[str]) -> Tensor:
    ref = check_tensors("local_av2d", dict(attn=attn, v=v))
    return _run(core.local_av2d, ref, backend, dict(attn=attn, v=v),
                dict(border=border, **_window(kernel_size, dilation, stride)))


@_register_fake("local_av2d")
def _(attn, v, kernel_size, dilation, stride, border, backend):
    ho, wo = _out_hw(v, stride)
    return torch.empty((v.shape[0], v.shape[1], ho, wo), dtype=v.dtype, device=v.device,
                       memory_format=_memory_format(attn, v))


@_custom_op("local_av2d_backward")
def _av_bwd(grad_out: Tensor, attn: Tensor, v: Tensor, kernel_size: List[int],
            dilation: List[int], stride: List[int], border: str,
            backend: Optional[str]) -> Tuple[Tensor, Tensor]:
    ref = check_tensors("local_av2d_backward", dict(grad_out=grad_out, attn=attn, v=v))
    return _run(core.local_av2d_backward, ref, backend,
                dict(grad_out=grad_out, attn=attn, v=v),
                dict(border=border, **_window(kernel_size, dilation, stride)))


@_register_fake("local_av2d_backward")
def _(grad_out, attn, v, kernel_size, dilation, stride, border, backend):
    return attn.new_empty(attn.shape), _like(v)


def _av_setup(ctx, inputs, output):
    attn, v, kernel_size, dilation, stride, border, backend = inputs
    ctx.save_for_backward(attn, v)
    ctx.params = (kernel_size, dilation, stride, border, backend)


def _av_grad(ctx, grad_out):
    attn, v = ctx.saved_tensors
    kernel_size, dilation, stride, border, backend = ctx.params
    dattn, dv = torch.ops.localrel.local_av2d_backward(
        grad_out.contiguous(), attn, v, kernel_size, dilation, stride, border, backend)
    return dattn, dv, None, None, None, None, None


# ---------------------------------------------------------------------------------------
# The papers' layers
# ---------------------------------------------------------------------------------------

@_custom_op("local_relation2d")
def _relation_fwd(x: Tensor, key: Tensor, query: Tensor, geometry: Optional[Tensor],
                  kernel_size: List[int], scale: float, dilation: List[int], stride: List[int],
                  border: str, backend: Optional[str], similarity: str,
                  key_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    ref = check_tensors("local_relation2d", dict(x=x, key=key, query=query, geometry=geometry,
                                                 key_bias=key_bias))
    return _run(core.local_relation2d, ref, backend,
                dict(x=x, key=key, query=query, geometry=geometry, key_bias=key_bias),
                dict(scale=scale, return_lse=True, border=border, similarity=similarity,
                     **_window(kernel_size, dilation, stride)), keep=(1,))


@_register_fake("local_relation2d")
def _(x, key, query, geometry, kernel_size, scale, dilation, stride, border, backend, similarity,
      key_bias):
    return _fake_out_lse(x, x.shape[1], key.shape[1], stride, x, key, query, geometry, key_bias)


@_custom_op("local_relation2d_backward")
def _relation_bwd(grad_out: Tensor, x: Tensor, key: Tensor, query: Tensor,
                  geometry: Optional[Tensor], out: Tensor, lse: Tensor, kernel_size: List[int],
                  scale: float, dilation: List[int], stride: List[int], border: str,
                  backend: Optional[str], similarity: str,
                  key_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    ref = check_tensors("local_relation2d_backward",
                        dict(grad_out=grad_out, x=x, key=key, query=query, geometry=geometry,
                             out=out, key_bias=key_bias))
    g = _run(core.local_relation2d_backward, ref, backend,
             dict(grad_out=grad_out, x=x, key=key, query=query, geometry=geometry, out=out,
                  lse=lse, key_bias=key_bias),
             dict(scale=scale, border=border, similarity=similarity,
                  **_window(kernel_size, dilation, stride)))
    return g[0], g[1], g[2], _grad_or_empty(g[3], x), _grad_or_empty(g[4], x)


@_register_fake("local_relation2d_backward")
def _(grad_out, x, key, query, geometry, out, lse, kernel_size, scale, dilation, stride, border,
      backend, similarity, key_bias):
    return (_like(x), _like(key), _like(query),
            x.new_empty((0,) if geometry is None else geometry.shape),
            x.new_empty((0,)) if key_bias is None else _like(key_bias))


def _relation_setup(ctx, inputs, output):
    (x, key, query, geometry, kernel_size, scale, dilation, stride, border, backend, similarity,
     key_bias) = inputs
    out, lse = output
    ctx.save_for_backward(x, key, query, geometry, key_bias, out, lse)
    ctx.params = (kernel_size, scale, dilation, stride, border, backend, similarity)
    ctx.mark_non_differentiable(lse)


def _relation_grad(ctx, grad_out, grad_lse):
    x, key, query, geometry, key_bias, out, lse = ctx.saved_tensors
    kernel_size, scale, dilation, stride, border, backend, similarity = ctx.params
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dx, dkey, dquery, dgeo, dkey_bias = torch.ops.localrel.local_relation2d_backward(
        grad_out.contiguous(), x, key, query, geometry, out, lse, kernel_size, scale,
        dilation, stride, border, backend, similarity, key_bias)
    return (dx, dkey, dquery, _none_if_absent(dgeo, geometry),
            None, None, None, None, None, None, None, _none_if_absent(dkey_bias, key_bias))


@_custom_op("sasa2d")
def _sasa_fwd(q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, heads: int,
              kernel_size: List[int], scale: float, dilation: List[int], stride: List[int],
              border: str, backend: Optional[str],
              key_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    ref = check_tensors("sasa2d", dict(q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w, key_bias=key_bias))
    return _run(core.sasa2d, ref, backend,
                dict(q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w, key_bias=key_bias),
                dict(heads=heads, scale=scale, return_lse=True, border=border,
                     **_window(kernel_size, dilation, stride)), keep=(1,))


@_register_fake("sasa2d")
def _(q, k, v, rel_h, rel_w, heads, kernel_size, scale, dilation, stride, border, backend, key_bias):
    return _fake_out_lse(q, v.shape[1], heads, stride, q, k, v, rel_h, rel_w, key_bias)


@_custom_op("sasa2d_backward")
def _sasa_bwd(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor,
              out: Tensor, lse: Tensor, heads: int, kernel_size: List[int], scale: float,
              dilation: List[int], stride: List[int], border: str,
              backend: Optional[str],
              key_bias: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    ref = check_tensors("sasa2d_backward", dict(grad_out=grad_out, q=q, k=k, v=v, rel_h=rel_h,
                                                rel_w=rel_w, out=out, key_bias=key_bias))
    g = _run(core.sasa2d_backward, ref, backend,
             dict(grad_out=grad_out, q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w, out=out,
                  lse=lse, key_bias=key_bias),
             dict(heads=heads, scale=scale, border=border,
                  **_window(kernel_size, dilation, stride)))
    return (*g[:5], _grad_or_empty(g[5], q))


@_register_fake("sasa2d_backward")
def _(grad_out, q, k, v, rel_h, rel_w, out, lse, heads, kernel_size, scale, dilation, stride,
      border, backend, key_bias):
    return (_like(q), _like(k), _like(v), rel_h.new_empty(rel_h.shape),
            rel_w.new_empty(rel_w.shape), q.new_empty((0,)) if key_bias is None else _like(key_bias))


def _sasa_setup(ctx, inputs, output):
    (q, k, v, rel_h, rel_w, heads, kernel_size, scale, dilation, stride, border, backend,
     key_bias) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_h, rel_w, key_bias, out, lse)
    ctx.params = (heads, kernel_size, scale, dilation, stride, border, backend)
    ctx.mark_non_differentiable(lse)


def _sasa_grad(ctx, grad_out, grad_lse):
    q, k, v, rel_h, rel_w, key_bias, out, lse = ctx.saved_tensors
    heads, kernel_size, scale, dilation, stride, border, backend = ctx.params
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    *grads, dkey_bias = torch.ops.localrel.sasa2d_backward(
        grad_out.contiguous(), q, k, v, rel_h, rel_w, out, lse, heads, kernel_size, scale,
        dilation, stride, border, backend, key_bias)
    return (*grads, None, None, None, None, None, None, None, _none_if_absent(dkey_bias, key_bias))


# ---------------------------------------------------------------------------------------
# Registrations: autograd, autocast, FLOP formulas
# ---------------------------------------------------------------------------------------

_FORWARD_OPS = ("local_attention2d", "local_qk2d", "local_av2d", "local_relation2d", "sasa2d")

DOUBLE_BACKWARD = ("double backward of localrel ops is not supported: {op} has no derivative "
                   "(gradients of gradients, e.g. gradient penalties or Hessian-vector "
                   "products, need another implementation; see docs/contract.md)")


def _no_double_backward(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(DOUBLE_BACKWARD.format(op=f"{NAMESPACE}::{op}"))
    return backward


def _no_setup(ctx, inputs, output):
    pass

if not _ALREADY_DEFINED:
    for _name, _grad, _setup in (("local_attention2d", _attention_grad, _attention_setup),
                                 ("local_qk2d", _qk_grad, _qk_setup),
                                 ("local_av2d", _av_grad, _av_setup),
                                 ("local_relation2d", _relation_grad, _relation_setup),
                                 ("sasa2d", _sasa_grad, _sasa_setup)):
        torch.library.register_autograd(f"{NAMESPACE}::{_name}", _grad, setup_context=_setup)
        # The backward ops have no derivative: differentiating one (double backward, e.g.
        # torch.autograd.grad(..., create_graph=True) and then .backward()) raises ours
        # instead of torch's generic "no autograd formula" (docs/contract.md).
        torch.library.register_autograd(f"{NAMESPACE}::{_name}_backward",
                                        _no_double_backward(f"{_name}_backward"),
                                        setup_context=_no_setup)

    # Under autocast the ops run in the usual low-precision dtype of the device (like
    # matmul-class ops): float16 on CUDA, bfloat16 on the CPU. Only torch versions with
    # torch.library.register_autocast (2.5+) get the rules.
    if hasattr(torch.library, "register_autocast"):
        for _name in _FORWARD_OPS:
            torch.library.register_autocast(f"{NAMESPACE}::{_name}", "cuda", torch.float16)
            torch.library.register_autocast(f"{NAMESPACE}::{_name}", "cpu", torch.bfloat16)


def _window_work(batch, kernel_size, out_shape_hw):
    """``B * K * Ho * Wo``: the number of (query, slot) pairs."""
    return batch * kernel_size[0] * kernel_size[1] * out_shape_hw[0] * out_shape_hw[1]


#: FLOPs per channel of a slot's logit, ``phi(q_c, k_c)`` and its accumulation, per
#: similarity: dot a multiply-add; key an add; neg_abs/neg_square a subtract, an abs or
#: square and an add; the normalized ones add their denominator and a division.
LOGIT_FLOPS = {"dot": 2, "key": 1, "neg_abs": 3, "neg_square": 3, "neg_abs_normalized": 7,
               "neg_square_normalized": 7}
assert set(LOGIT_FLOPS) == set(G.SIMILARITIES), "a FLOP count for every similarity"


def _qk_factor(similarity) -> float:
    """The logits' cost per channel relative to the dot product's 2 FLOPs."""
    return LOGIT_FLOPS[similarity] / 2


def _register_flops():
    """FLOPs count a multiply-add as 2 (like torch's conv/matmul formulas).

    Forward: ``2 * B * K * Ho * Wo * (f C_qk + C_v)`` (logits plus weighted sum), i.e.
    ``2 * B * heads * K * Ho * Wo * (f Dqk + Dv)``, with ``f = LOGIT_FLOPS[similarity] / 2``
    (1 for the dot product). Backward: logits are recomputed and ``dq``, ``dk``, ``dp`` and
    ``dv`` each cost one more pass: ``2 * B * K * Ho * Wo * (3 f C_qk + 2 C_v)``, about
    twice the forward (the derivatives of ``phi`` are counted like ``phi``). Softmax,
    ``bias``, ``key_bias`` and ``rel`` additions are lower-order terms and not counted.
    """
    from torch.utils import flop_counter

    def register_flop_formula(packet):
        def register(formula):
            flop_counter.register_flop_formula(packet)(formula)
            # torch 2.4 files the formula under each overload (localrel.op.default) while
            # FlopCounterMode looks ops up by packet (torch.ops.localrel.op): file it there too.
            if packet not in flop_counter.flop_registry:
                flop_counter.flop_registry[packet] = flop_counter.flop_registry[packet.default]
            return formula
        return register

    ops = torch.ops.localrel

    @register_flop_formula(ops.local_attention2d)
    def _(q, k, v, heads, kernel_size, bias, rel, scale, dilation, stride, border, backend,
          similarity="dot", *args, out_shape=None, **kwargs):
        f = _qk_factor(similarity)
        return int(2 * _window_work(q[0], kernel_size, out_shape[0][2:]) * (f * q[1] + v[1]))

    @register_flop_formula(ops.local_attention2d_backward)
    def _(grad_out, q, k, v, out, lse, heads, kernel_size, bias, rel, scale, dilation, stride,
          border, backend, similarity="dot", *args, out_shape=None, **kwargs):
        f = _qk_factor(similarity)
        return int(2 * _window_work(q[0], kernel_size, grad_out[2:]) * (3 * f * q[1] + 2 * v[1]))

    @register_flop_formula(ops.sasa2d)
    def _(q, k, v, rel_h, rel_w, heads, kernel_size, *args, out_shape=None, **kwargs):
        return 2 * _window_work(q[0], kernel_size, out_shape[0][2:]) * (q[1] + v[1])

    @register_flop_formula(ops.sasa2d_backward)
    def _(grad_out, q, k, v, rel_h, rel_w, out, lse, heads, kernel_size, *args,
          out_shape=None, **kwargs):
        return 2 * _window_work(q[0], kernel_size, grad_out[2:]) * (3 * q[1] + 2 * v[1])

    @register_flop_formula(ops.local_relation2d)
    def _(x, key, query, geometry, kernel_size, scale, dilation, stride, border, backend,
          similarity="dot", *args, out_shape=None, **kwargs):
        f = _qk_factor(similarity)
        return int(2 * _window_work(x[0], kernel_size, out_shape[0][2:]) * (f * key[1] + x[1]))

    @register_flop_formula(ops.local_relation2d_backward)
    def _(grad_out, x, key, query, geometry, out, lse, kernel_size, scale, dilation, stride,
          border, backend, similarity="dot", *args, out_shape=None, **kwargs):
        f = _qk_factor(similarity)
        return int(2 * _window_work(x[0], kernel_size, grad_out[2:]) * (3 * f * key[1] + 2 * x[1]))

    @register_flop_formula(ops.local_qk2d)
    def _(q, k, heads, kernel_size, bias, rel, scale, dilation, stride, border, backend,
          similarity="dot", *args, out_shape=None, **kwargs):
        return int(2 * _window_work(q[0], kernel_size, out_shape[3:]) * _qk_factor(similarity) * q[1])

    @register_flop_formula(ops.local_qk2d_backward)
    def _(grad_logits, q, k, heads, kernel_size, bias, rel, scale, dilation, stride, border,
          backend, similarity="dot", *args, out_shape=None, **kwargs):
        return int(2 * _window_work(q[0], kernel_size, grad_logits[3:]) * 2 * _qk_factor(similarity) * q[1])

    @register_flop_formula(ops.local_av2d)
    def _(attn, v, kernel_size, *args, out_shape=None, **kwargs):
        return 2 * _window_work(v[0], kernel_size, out_shape[2:]) * v[1]

    @register_flop_formula(ops.local_av2d_backward)
    def _(grad_out, attn, v, kernel_size, *args, out_shape=None, **kwargs):
        return 2 * _window_work(v[0], kernel_size, grad_out[2:]) * 2 * v[1]


try:
    _register_flops()
except (ImportError, RuntimeError, ValueError):  # pragma: no cover - reload/older torch
    pass


# ---------------------------------------------------------------------------------------
# Public functions (docs/contract.md's names and arguments, on tensors)
# ---------------------------------------------------------------------------------------

def _pairs(kernel_size, dilation, stride):
    return ([*G.to_pair(kernel_size, "kernel_size")], [*G.to_pair(dilation, "dilation")],
            [*G.to_pair(stride, "stride")])


def _check_common(op, border, backend, heads=None):
    G.check_border(border)
    G.check_backend_name(backend)
    if heads is not None:
        G.check_heads(heads)


def local_attention2d(q, k, v, heads, kernel_size, *, bias=None, rel=None, scale=None,
                      return_lse=False, dilation=1, stride=1, border="mask", backend=None,
                      similarity="dot", key_bias=None):
    """Fused local attention on tensors; see :func:`cupy_localrel.local_attention2d`.

    Differentiable in ``q``, ``k``, ``v``, ``bias``, ``rel`` and ``key_bias`` ``(B, heads,
    H, W)`` (``lse`` is not), once: double backward raises ``RuntimeError`` (as for every
    op here; docs/contract.md). Outputs are ``channels_last`` when an input is. Returns
    ``out`` or ``(out, lse)``.
    """
    check_tensors("local_attention2d", dict(q=q, k=k, v=v, bias=bias, rel=rel, key_bias=key_bias))
    _check_common("local_attention2d", border, backend, heads)
    G.check_similarity(similarity, rel)
    ks, dil, st = _pairs(kernel_size, dilation, stride)
    scale = None if scale is None else G.check_scale(scale, None)  # None: 1/sqrt(Dqk)
    out, lse = torch.ops.localrel.local_attention2d(q, k, v, int(heads), ks, bias, rel, scale,
                                                    dil, st, border, backend, similarity, key_bias)
    return (out, lse) if return_lse else out


def local_qk2d(q, k, heads, kernel_size, *, bias=None, rel=None, scale=None, dilation=1,
               stride=1, border="mask", backend=None, similarity="dot", key_bias=None):
    """Window logits ``(B, heads, K, Ho, Wo)``, ``key_bias`` included; masked slots are
    ``-inf`` (no gradient).

    Differentiable once (double backward raises ``RuntimeError``).
    """
    check_tensors("local_qk2d", dict(q=q, k=k, bias=bias, rel=rel, key_bias=key_bias))
    _check_common("local_qk2d", border, backend, heads)
    G.check_similarity(similarity, rel)
    ks, dil, st = _pairs(kernel_size, dilation, stride)
    scale = None if scale is None else G.check_scale(scale, None)  # None: 1/sqrt(Dqk)
    return torch.ops.localrel.local_qk2d(q, k, int(heads), ks, bias, rel, scale, dil, st,
                                         border, backend, similarity, key_bias)


def local_av2d(attn, v, kernel_size, *, dilation=1, stride=1, border="mask", backend=None):
    """Weighted window sums ``(B, heads*Dv, Ho, Wo)``; heads from ``attn.shape[1]``.

    Differentiable once (double backward raises ``RuntimeError``); ``channels_last`` ``v``
    gives a ``channels_last`` output.
    """
    check_tensors("local_av2d", dict(attn=attn, v=v))
    _check_common("local_av2d", border, backend)
    ks, dil, st = _pairs(kernel_size, dilation, stride)
    return torch.ops.localrel.local_av2d(attn, v, ks, dil, st, border, backend)


def local_relation2d(x, key, query, geometry, kernel_size, *, scale=1.0, return_lse=False,
                     dilation=1, stride=1, border="mask", backend=None, similarity="dot",
                     key_bias=None):
    """LR-Net aggregation on tensors; see :func:`cupy_localrel.local_relation2d`.

    ``key_bias`` ``(B, heads, H, W)``: key saliency or a padding mask (``-inf``).
    Differentiable once (double backward raises ``RuntimeError``); outputs are
    ``channels_last`` when an input is.
    """
    check_tensors("local_relation2d", dict(x=x, key=key, query=query, geometry=geometry,
                                           key_bias=key_bias))
    _check_common("local_relation2d", border, backend)
    G.check_similarity(similarity)
    ks, dil, st = _pairs(kernel_size, dilation, stride)
    scale = G.check_papers_scale(scale)
    out, lse = torch.ops.localrel.local_relation2d(x, key, query, geometry, ks, scale,
                                                   dil, st, border, backend, similarity, key_bias)
    return (out, lse) if return_lse else out


def sasa2d(q, k, v, rel_h, rel_w, heads, kernel_size, *, scale=1.0, return_lse=False,
           dilation=1, stride=1, border="mask", backend=None, key_bias=None):
    """Stand-alone self-attention on tensors; see :func:`cupy_localrel.sasa2d`.

    ``key_bias`` ``(B, heads, H, W)``: e.g. a padding mask (``-inf`` on padded pixels).
    Differentiable once (double backward raises ``RuntimeError``); outputs are
    ``channels_last`` when an input is.
    """
    check_tensors("sasa2d", dict(q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w, key_bias=key_bias))
    _check_common("sasa2d", border, backend, heads)
    ks, dil, st = _pairs(kernel_size, dilation, stride)
    scale = G.check_papers_scale(scale)
    out, lse = torch.ops.localrel.sasa2d(q, k, v, rel_h, rel_w, int(heads), ks, scale,
                                         dil, st, border, backend, key_bias)
    return (out, lse) if return_lse else out
