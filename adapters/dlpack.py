"""docs/contract.md's operations on any array with ``__dlpack__``.

NumPy, CuPy, torch, JAX, ... arrays go in; the results come back as the caller's kind
of array. Conversions are zero-copy where the device allows: CPU arrays are viewed as
NumPy arrays (``numpy.from_dlpack``) and run on the NumPy reference, CUDA arrays as CuPy
arrays (``cupy.from_dlpack``) and run on the CuPy kernels; results go back through the
input's own ``from_dlpack`` (``torch.from_dlpack``, ``jax.dlpack.from_dlpack``, ...).

Array arguments (``key_bias`` included) are converted; ``similarity=`` and the other
keywords pass through unchanged. This adapter has no autograd (use :mod:`cupy_localrel.adapters.torch` for that); the
``*_backward`` functions are here for frameworks that bring their own.

bfloat16: NumPy's DLPack import does not know bfloat16, so bfloat16 inputs are viewed
as 16-bit integers across DLPack and as ``ml_dtypes.bfloat16`` on the NumPy side (needs
``ml_dtypes``); on CUDA this adapter does not take bfloat16 (a ``TypeError``; the torch
adapter passes it natively with CuPy >= 14 and through float32 before).
"""
from __future__ import annotations

import sys

import numpy as np

import cupy_localrel as _core

__all__ = [
    "local_attention2d", "local_attention2d_backward",
    "local_qk2d", "local_qk2d_backward",
    "local_av2d", "local_av2d_backward",
    "local_relation2d", "local_relation2d_backward",
    "sasa2d", "sasa2d_backward",
]

_CPU, _CUDA, _CUDA_HOST, _CUDA_MANAGED = 1, 2, 3, 13


def _is_torch(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_bf16(x) -> bool:
    return "bfloat16" in str(getattr(x, "dtype", ""))


def _device_type(x, name: str) -> int:
    if not hasattr(x, "__dlpack__"):
        raise TypeError(f"{name} must be an array with __dlpack__, got {type(x).__name__}")
    if hasattr(x, "__dlpack_device__"):
        return int(x.__dlpack_device__()[0])
    return _CPU


def _to_core(x, name):
    """A NumPy or CuPy view of ``x`` (no copy)."""
    if x is None or isinstance(x, np.ndarray):
        return x
    if type(x).__module__.startswith("cupy"):
        return x
    device = _device_type(x, name)
    if device in (_CPU, _CUDA_HOST):
        if _is_torch(x):
            x = x.detach()
            if _is_bf16(x):
                import torch
                from ml_dtypes import bfloat16
                return np.from_dlpack(x.contiguous().view(torch.int16)).view(bfloat16)
        elif _is_bf16(x):
            raise TypeError(f"{name}: bfloat16 arrays of {type(x).__name__} cannot cross "
                            "DLPack into NumPy; cast them to float32 first")
        return np.from_dlpack(x)
    if device in (_CUDA, _CUDA_MANAGED):
        import cupy
        if _is_torch(x):
            x = x.detach()
        if _is_bf16(x):
            raise TypeError(f"{name}: bfloat16 is not supported on CUDA through DLPack "
                            "(not taken by this adapter); use the torch adapter or float32")
        return cupy.from_dlpack(x)
    raise TypeError(f"{name}: unsupported DLPack device type {device} "
                    f"(CPU or CUDA only), got {type(x).__name__}")


def _back_converter(x):
    """A function turning a NumPy/CuPy result into ``x``'s kind of array."""
    if isinstance(x, np.ndarray) or type(x).__module__.startswith("cupy"):
        return lambda a: a
    if _is_torch(x):
        import torch

        def to_torch(a):
            if a is None:
                return None
            if str(a.dtype) == "bfloat16":
                return torch.from_dlpack(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
            return torch.from_dlpack(a)
        return to_torch
    module = sys.modules.get(type(x).__module__.split(".")[0])
    for candidate in ("from_dlpack", "dlpack.from_dlpack"):
        fn = module
        for part in candidate.split("."):
            fn = getattr(fn, part, None)
        if callable(fn):
            return lambda a, fn=fn: None if a is None else fn(a)
    if module is not None and module.__name__ == "jax":  # pragma: no cover - optional
        import jax.numpy as jnp
        return lambda a: None if a is None else jnp.from_dlpack(a)
    return lambda a: a  # unknown framework: hand back the NumPy/CuPy array


def _call(fn, arrays: dict, params: dict, first: str):
    back = _back_converter(arrays[first])
    converted = {n: _to_core(a, n) for n, a in arrays.items()}
    result = fn(**converted, **params)
    if isinstance(result, tuple) and hasattr(result, "_fields"):  # named gradients
        return type(result)(*(None if r is None else back(r) for r in result))
    if isinstance(result, tuple):
        return tuple(back(r) for r in result)
    return back(result)


def local_attention2d(q, k, v, heads, kernel_size, *, bias=None, rel=None, key_bias=None, **kwargs):
    """:func:`cupy_localrel.local_attention2d` on DLPack arrays; same arguments."""
    return _call(_core.local_attention2d, dict(q=q, k=k, v=v, bias=bias, rel=rel, key_bias=key_bias),
                 dict(heads=heads, kernel_size=kernel_size, **kwargs), "q")


def local_attention2d_backward(grad_out, q, k, v, out, lse, heads, kernel_size, *, bias=None,
                               rel=None, key_bias=None, **kwargs):
    """:func:`cupy_localrel.local_attention2d_backward` on DLPack arrays."""
    return _call(_core.local_attention2d_backward,
                 dict(grad_out=grad_out, q=q, k=k, v=v, out=out, lse=lse, bias=bias, rel=rel,
                      key_bias=key_bias),
                 dict(heads=heads, kernel_size=kernel_size, **kwargs), "q")


def local_qk2d(q, k, heads, kernel_size, *, bias=None, rel=None, key_bias=None, **kwargs):
    """:func:`cupy_localrel.local_qk2d` on DLPack arrays."""
    return _call(_core.local_qk2d, dict(q=q, k=k, bias=bias, rel=rel, key_bias=key_bias),
                 dict(heads=heads, kernel_size=kernel_size, **kwargs), "q")


def local_qk2d_backward(grad_logits, q, k, heads, kernel_size, *, bias=None, rel=None, key_bias=None,
                        **kwargs):
    """:func:`cupy_localrel.local_qk2d_backward` on DLPack arrays."""
    return _call(_core.local_qk2d_backward,
                 dict(grad_logits=grad_logits, q=q, k=k, bias=bias, rel=rel, key_bias=key_bias),
                 dict(heads=heads, kernel_size=kernel_size, **kwargs), "q")


def local_av2d(attn, v, kernel_size, **kwargs):
    """:func:`cupy_localrel.local_av2d` on DLPack arrays."""
    return _call(_core.local_av2d, dict(attn=attn, v=v), dict(kernel_size=kernel_size, **kwargs),
                 "v")


def local_av2d_backward(grad_out, attn, v, kernel_size, **kwargs):
    """:func:`cupy_localrel.local_av2d_backward` on DLPack arrays."""
    return _call(_core.local_av2d_backward, dict(grad_out=grad_out, attn=attn, v=v),
                 dict(kernel_size=kernel_size, **kwargs), "v")


def local_relation2d(x, key, query, geometry, kernel_size, *, key_bias=None, **kwargs):
    """:func:`cupy_localrel.local_relation2d` on DLPack arrays."""
    return _call(_core.local_relation2d,
                 dict(x=x, key=key, query=query, geometry=geometry, key_bias=key_bias),
                 dict(kernel_size=kernel_size, **kwargs), "x")


def local_relation2d_backward(grad_out, x, key, query, geometry, out, lse, kernel_size, *,
                              key_bias=None, **kwargs):
    """:func:`cupy_localrel.local_relation2d_backward` on DLPack arrays."""
    return _call(_core.local_relation2d_backward,
                 dict(grad_out=grad_out, x=x, key=key, query=query, geometry=geometry, out=out,
                      lse=lse, key_bias=key_bias),
                 dict(kernel_size=kernel_size, **kwargs), "x")


def sasa2d(q, k, v, rel_h, rel_w, heads, kernel_size, *, key_bias=None, **kwargs):
    """:func:`cupy_localrel.sasa2d` on DLPack arrays."""
    return _call(_core.sasa2d, dict(q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w, key_bias=key_bias),
                 dict(heads=heads, kernel_size=kernel_size, **kwargs), "q")


def sasa2d_backward(grad_out, q, k, v, rel_h, rel_w, out, lse, heads, kernel_size, *, key_bias=None,
                    **kwargs):
    """:func:`cupy_localrel.sasa2d_backward` on DLPack arrays."""
    return _call(_core.sasa2d_backward,
                 dict(grad_out=grad_out, q=q, k=k, v=v, rel_h=rel_h, rel_w=rel_w, out=out,
                      lse=lse, key_bias=key_bias),
                 dict(heads=heads, kernel_size=kernel_size, **kwargs), "q")
