"""Backends are peers behind one dispatch.

Each backend is a module with the same function set, taking a checked
:class:`~cupy_localrel._geometry.Geometry` and arrays of its own kind:

- ``attention_forward(geo, q, k, v, bias, rel, key_bias=None) -> (out, lse)``
- ``attention_backward(geo, grad_out, q, k, v, out, lse, bias, rel, key_bias=None)
  -> (dq, dk, dv, dbias, drel, dkey_bias)``
- ``qk_forward(geo, q, k, bias, rel, key_bias=None) -> logits``
- ``qk_backward(geo, grad_logits, q, k, bias, rel, key_bias=None)
  -> (dq, dk, dbias, drel, dkey_bias)``
- ``av_forward(geo, attn, v) -> out``
- ``av_backward(geo, grad_out, attn, v) -> (dattn, dv)``

The similarity function is ``geo.similarity``. ``rel`` is ``None``, the full table
``(heads, Dqk, th, tw)``, or :class:`~cupy_localrel._geometry.SplitRel` ``(rows (heads,
Dqk/2, th), cols (heads, Dqk/2, tw))``, SASA's factored form as ``sasa2d`` passes it (never
expanded per call by the kernel backends); ``drel`` has the form ``rel`` had. Gradients of
optional inputs that were not given (``bias``/``rel``/``key_bias`` is ``None``) are ``None``. Arguments are already checked; a backend never re-checks them.
"""
from __future__ import annotations

import importlib

# Which array kind each backend takes.
_ARRAY_KIND = {"numpy": "numpy", "sim": "numpy", "cupy": "cupy"}
_MODULES = {"numpy": "._numpy", "sim": "._sim", "cupy": "._cupy"}


def backend_status(name: str) -> tuple[bool, str]:
    """``(available, reason)`` for one backend, without raising."""
    try:
        module = importlib.import_module(_MODULES[name], __name__)
    except ImportError as exc:  # a backend whose module or dependency is missing
        return False, f"not importable: {exc}"
    status = getattr(module, "available", None)
    return status() if status else (True, "")


def resolve(backend: str | None, kind: str):
    """The backend module for ``backend`` (``None``: by array ``kind``).

    Raises ``TypeError`` when the arrays are of the wrong kind for the backend and
    ``RuntimeError`` (naming the missing piece) when the backend cannot run here.
    """
    name = kind if backend is None else backend
    ok, reason = backend_status(name)
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {reason}")
    if _ARRAY_KIND[name] != kind:
        expected = "CuPy" if _ARRAY_KIND[name] == "cupy" else "NumPy"
        raise TypeError(f"backend={name!r} takes {expected} arrays, got {kind} arrays")
    return importlib.import_module(_MODULES[name], __name__)
