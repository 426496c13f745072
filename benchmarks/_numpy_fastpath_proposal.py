"""Scratch prototype (not used by the package): slice-based gather/scatter for the NumPy
reference, proposed to the owner of ``cupy_localrel/_backends/_numpy.py``.

Why: at B=8, C=64, 56x56, k=7 (LR-Net layout) forward+backward spends most of its time in
``_gather`` (a 2-D fancy-index gather, then ``np.where`` over the result: two full passes
and two temporaries per slot) and ``_scatter_add`` (two boolean-mask copies of ``src``,
then ``dst[fancy] += values``, which is itself gather + add + scatter).

For centred windows (``mask``/``zeros``, any stride/dilation) the valid outputs of one
slot are a contiguous range of output rows/columns and the inputs they read are an
arithmetic progression, i.e. a basic (strided) slice. Then

- gather  = one ``np.empty`` + a slice copy + zeroing the border strips only;
- scatter = ``dst[..., y0:y1:sy, x0:x1:sx] += src[..., i0:i1, j0:j1]`` in place (no copies,
  injective by construction, so no ``np.add.at``).

``shift`` windows (clamped at the borders, not injective) keep the fancy-index path.

Second hotspot once those are gone (SASA shapes, ``rel`` given): ``_table`` builds a
``rows x Wo`` copy of ``rel``/``bias`` per slot with a fancy index, and ``_table_add``
runs an einsum with two one-hot matrices per slot. For centred windows the table index of a
slot is the same for every output, so ``_table`` can return a broadcastable ``(..., 1, 1)``
view and ``_table_add`` one ``sum`` over the outputs.

Measured at B=8, C=64, 56x56, k=7 (forward+backward, float32, interleaved medians on a
shared 2-core VM): LR-Net 1.10 s -> 0.29 s, seed SASA (heads=64) 4.00 s -> 1.40 s, SASA
(heads=8, Dqk=Dv=8) 2.35 s -> 0.67 s. Bit-identical in float32/float64 for the gather and
scatter; the table sums differ by summation order only (<= 4e-16 relative in float64). The
same change as a diff against ``_numpy.py``: ``benchmarks/numpy_reference_speedup.diff``
(the project's reference and API tests pass with it applied).

Use: ``install()`` patches the running module (for measuring), ``uninstall()`` undoes it.
"""
from __future__ import annotations

import numpy as np

from cupy_localrel._backends import _numpy as ref

_ORIGINAL = {"_gather": ref._gather, "_scatter_add": ref._scatter_add,
             "_table": ref._table, "_table_add": ref._table_add}


_SLICES: dict = {}


def _axis_slices(pos: np.ndarray):
    """Memoised :func:`_axis_slices_of` (one chunk asks the same few axes many times)."""
    key = pos.tobytes()
    hit = _SLICES.get(key, False)
    if hit is False:
        if len(_SLICES) > 4096:
            _SLICES.clear()
        hit = _SLICES[key] = _axis_slices_of(pos)
    return hit


def _axis_slices_of(pos: np.ndarray):
    """``(out_slice, in_slice)`` when the valid entries of ``pos`` (``-1`` = invalid) are
    a contiguous run of outputs reading an increasing arithmetic progression of inputs;
    ``()`` when none is valid; ``None`` otherwise (fall back to fancy indexing)."""
    idx = np.flatnonzero(pos >= 0)
    if idx.size == 0:
        return ()
    i0, i1 = int(idx[0]), int(idx[-1]) + 1
    if i1 - i0 != idx.size:
        return None
    vals = pos[i0:i1]
    first = int(vals[0])
    if vals.size == 1:
        return slice(i0, i1), slice(first, first + 1)
    step = int(vals[1]) - first
    if step <= 0 or np.any(np.diff(vals) != step):
        return None
    return slice(i0, i1), slice(first, first + step * (vals.size - 1) + 1, step)


def _gather(x_rows, s):
    """``x`` at the slot's inputs, ``(..., rows, Wo)``, exactly 0 where invalid."""
    ry, rx = _axis_slices(s.ys), _axis_slices(s.xs)
    if ry is None or rx is None:
        return _ORIGINAL["_gather"](x_rows, s)
    out = np.empty(x_rows.shape[:-2] + (s.ys.size, s.xs.size), x_rows.dtype)
    if ry == () or rx == ():
        out[...] = 0
        return out
    (oi, ii), (oj, ij) = ry, rx
    out[..., oi, oj] = x_rows[..., ii, ij]
    # Zero only the border strips that no valid input covers.
    out[..., :oi.start, :] = 0
    out[..., oi.stop:, :] = 0
    out[..., oi, :oj.start] = 0
    out[..., oi, oj.stop:] = 0
    return out


def _scatter_add(dst_rows, src, s):
    """``dst[..., y, x] += src[..., i, j]`` for every valid output ``(i, j)`` of the slot."""
    ry, rx = _axis_slices(s.ys), _axis_slices(s.xs)
    if ry is None or rx is None:
        return _ORIGINAL["_scatter_add"](dst_rows, src, s)
    if ry == () or rx == ():
        return None
    (oi, ii), (oj, ij) = ry, rx
    dst_rows[..., ii, ij] += src[..., oi, oj]
    return None


def _constant(a: np.ndarray):
    """The single value of ``a`` if all its entries are equal, else None."""
    if a.size == 0:
        return None
    first = int(a.flat[0])
    return first if bool((a == first).all()) else None


def _table(t, s):
    """``t[..., ay, ax]`` per output: for centred windows the table index of a slot is the
    same for every output, so return a broadcastable ``(..., 1, 1)`` view, not a copy of
    ``rows x Wo``."""
    ay, ax = _constant(s.ay), _constant(s.ax)
    if ay is None or ax is None:
        return _ORIGINAL["_table"](t, s)
    return t[..., ay, ax, None, None]


def _table_add(dst, src, s):
    """``dst[..., ay, ax] += src`` summed over outputs; one reduction when the index is
    constant (centred windows), the one-hot product otherwise."""
    ay, ax = _constant(s.ay), _constant(s.ax)
    if ay is None or ax is None:
        return _ORIGINAL["_table_add"](dst, src, s)
    dst[..., ay, ax] += src.sum(axis=(-2, -1))
    return None


def install(tables: bool = True):
    ref._gather, ref._scatter_add = _gather, _scatter_add
    if tables:
        ref._table, ref._table_add = _table, _table_add


def uninstall():
    for name, fn in _ORIGINAL.items():
        setattr(ref, name, fn)
