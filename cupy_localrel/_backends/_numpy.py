"""The NumPy reference: every op, forward and backward, on the CPU.

Vectorised over pixels, and over the ``kh*kw`` window slots too when a chunk's gathered
slots fit the memory budget (else a Python loop over the slots). The work is cut into
chunks of (batch, heads, output rows) so that the extra memory stays under a fixed budget
whatever the input size (:func:`set_memory_budget`). Inputs of any float
dtype are computed in float32 (float64 for float64) and the results cast back.

Geometry comes from :mod:`cupy_localrel._geometry`: each slot's input position, validity
and table index per axis. Here they are only applied.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .. import _geometry as G
from .._geometry import Geometry, axis_window, lse_dtype

_MIB = 1 << 20
_budget = 256 * _MIB
# Chunks larger than this gain nothing in NumPy and only cost cache; the budget caps them.
_PREFERRED_CHUNK = 48 * _MIB


def available():
    return True, "always (pure NumPy)"


def set_memory_budget(nbytes: int) -> int:
    """Cap the reference's extra memory per call at ``nbytes``; returns the old cap."""
    global _budget
    if int(nbytes) < _MIB:
        raise ValueError(f"nbytes must be at least 1 MiB, got {nbytes!r}")
    old, _budget = _budget, int(nbytes)
    return old


def get_memory_budget() -> int:
    return _budget


# ---------------------------------------------------------------------------------------
# Chunks
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Chunk:
    """One piece of work: batches ``b``, heads ``h``, output rows ``i`` (slices)."""

    b: slice
    h: slice
    i: slice
    in_rows: slice  # the input rows the chunk's windows touch (a halo around ``i``)
    all_slots: bool = False  # computed with every slot at once (see "All slots at once")


def _chunks(geo: Geometry, channels_per_head: int):
    """Yield chunks whose temporaries fit the memory budget.

    ``channels_per_head`` counts the per-head channels the op touches (for example
    ``2*Dqk + Dv`` for attention); the estimate counts the ``K`` slot arrays
    (logits, weights and their gradients) and a few copies of the gathered channels; the
    all-slots path adds every slot's gathered channels, and is taken when one output row
    of one head fits the budget with them.
    """
    acc = geo.acc_dtype.itemsize
    per_row = acc * geo.out_w * (5 * geo.slots + 6 * channels_per_head) \
        + acc * geo.width * 3 * channels_per_head * geo.stride[0]
    halo = acc * geo.width * 3 * channels_per_head * (geo.kernel[0] * geo.dilation[0])
    target = min(_budget, _PREFERRED_CHUNK)
    all_slots_row = acc * geo.out_w * geo.slots * (channels_per_head + 4)
    all_slots = _ALL_SLOTS and per_row + all_slots_row + halo <= target
    if all_slots:
        per_row += all_slots_row
    whole_image = per_row * geo.out_h + halo
    if whole_image <= target:
        rows = geo.out_h
        units = max(1, target // whole_image)
    else:
        rows = max(1, (target - halo) // per_row)
        units = 1
    nh = min(geo.heads, units)
    nb = max(1, min(geo.batch, units // geo.heads)) if nh == geo.heads else 1
    for b0 in range(0, geo.batch, nb):
        for h0 in range(0, geo.heads, nh):
            for i0 in range(0, geo.out_h, rows):
                i = slice(i0, min(i0 + rows, geo.out_h))
                yield _Chunk(slice(b0, min(b0 + nb, geo.batch)), slice(h0, min(h0 + nh, geo.heads)),
                             i, _input_rows(geo, i), all_slots)


def _input_rows(geo: Geometry, i: slice) -> slice:
    """The input rows that output rows ``i`` use: their centres and every valid slot."""
    return slice(*_input_row_range(geo.height, geo.kernel[0], geo.dilation[0], geo.stride[0],
                                   geo.border, i.start, i.stop))


@functools.lru_cache(maxsize=1024)
def _input_row_range(height, kernel, dilation, stride, border, i0, i1):
    """``(first, stop)`` of :func:`_input_rows`: pure geometry, cached (a small call's
    fixed cost)."""
    pos = axis_window(height, kernel, dilation, stride, border).pos[i0:i1]
    centres = np.arange(i0, i1) * stride
    used = np.concatenate([pos[pos >= 0], centres])
    return int(used.min()), int(used.max()) + 1


def _heads_view(x, geo: Geometry, c: _Chunk, per_head: int, rows: slice | None = None):
    """``x[c.b, channels of heads c.h, rows]`` as ``(nb, nh, per_head, rows, W)`` in acc dtype."""
    ch = slice(c.h.start * per_head, c.h.stop * per_head)
    part = x[c.b, ch] if rows is None else x[c.b, ch, rows]
    part = part.reshape(part.shape[0], c.h.stop - c.h.start, per_head, *part.shape[2:])
    return part.astype(geo.acc_dtype, copy=False)


def _centres(x_rows, geo: Geometry, c: _Chunk):
    """Values at the window centres of the chunk's outputs: ``(..., rows, Wo)``."""
    sh, sw = geo.stride
    first = c.i.start * sh - c.in_rows.start
    return x_rows[..., first:first + (c.i.stop - c.i.start - 1) * sh + 1:sh, ::sw]


# ---------------------------------------------------------------------------------------
# Applying the geometry of one slot
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Slot:
    """Slot ``(ty, tx)`` for the outputs of one chunk; positions relative to ``in_rows``."""

    ys: np.ndarray     # (rows,) input row, or -1
    xs: np.ndarray     # (Wo,) input column, or -1
    ay: np.ndarray     # (rows,) table row
    ax: np.ndarray     # (Wo,) table column

    @functools.cached_property
    def valid(self) -> np.ndarray:
        """``(rows, Wo)`` bool."""
        return (self.ys >= 0)[:, None] & (self.xs >= 0)[None, :]

    @functools.cached_property
    def table_entry(self):
        """``(ay, ax)`` when every output of the slot uses one table entry (centred
        windows), else ``None``."""
        ay, ax = _constant(self.ay), _constant(self.ax)
        return None if ay is None or ax is None else (ay, ax)

    @functools.cached_property
    def strided(self):
        """``((oi, oj), (ii, ij))``: basic slices of the valid outputs and of the inputs they
        read; ``()`` when no output is valid; ``None`` when the slot needs index arrays
        (shift windows at the borders). See :func:`_axis_slices`."""
        ry, rx = _axis_slices(self.ys), _axis_slices(self.xs)
        if ry is None or rx is None:
            return None
        if ry == () or rx == ():
            return ()
        (oi, ii), (oj, ij) = ry, rx
        return (oi, oj), (ii, ij)

    @functools.cached_property
    def injective(self) -> bool:
        """No two outputs of this slot look at the same input (true for centred windows)."""
        y, x = self.ys[self.ys >= 0], self.xs[self.xs >= 0]
        return len(np.unique(y)) == len(y) and len(np.unique(x)) == len(x)


def _slots(geo: Geometry, c: _Chunk):
    """``(t, _Slot)`` for every window slot, row-major from the top-left."""
    return _slot_plan(geo.height, geo.width, geo.kernel, geo.dilation, geo.stride, geo.border,
                      c.i.start, c.i.stop, c.in_rows.start)


@functools.lru_cache(maxsize=256)
def _slot_plan(height, width, kernel, dilation, stride, border, i0, i1, r0):
    """The slots of output rows ``i0:i1`` (inputs from row ``r0``), with what each slot
    derives (slices, masks, table entries) computed once: pure geometry, so cached and
    shared by every call of the same shape, which removes most of a small call's cost."""
    rows = axis_window(height, kernel[0], dilation[0], stride[0], border)
    cols = axis_window(width, kernel[1], dilation[1], stride[1], border)
    plan = []
    for ty in range(kernel[0]):
        ys = rows.pos[i0:i1, ty].astype(np.int64)
        ys = np.where(ys >= 0, ys - r0, -1)
        for tx in range(kernel[1]):
            s = _Slot(ys, cols.pos[:, tx].astype(np.int64), rows.table[i0:i1, ty],
                      cols.table[:, tx])
            s.strided, s.valid, s.table_entry, s.injective  # noqa: B018 - fill the caches
            for a in (s.ys, s.xs, s.valid):
                a.flags.writeable = False                   # shared: nobody may change it
            plan.append((ty * kernel[1] + tx, s))
    return tuple(plan)


def _axis_slices(pos: np.ndarray):
    """``(out_slice, in_slice)`` when the valid entries of ``pos`` (``-1``: invalid) are a
    contiguous run of outputs reading an increasing arithmetic progression of inputs (true
    of every centred window, any stride/dilation); ``()`` when none is valid; ``None``
    otherwise (shift windows at the borders). Basic slices let NumPy copy and add through
    strided views instead of building index arrays."""
    idx = np.flatnonzero(pos >= 0)
    if idx.size == 0:
        return ()
    i0, i1 = int(idx[0]), int(idx[-1]) + 1
    if i1 - i0 != idx.size:
        return None
    vals = pos[i0:i1]
    first = int(vals[0])
    step = int(vals[1]) - first if vals.size > 1 else 1
    if step <= 0 or np.any(np.diff(vals) != step):
        return None
    return slice(i0, i1), slice(first, first + step * (vals.size - 1) + 1, step)


def _gather(x_rows, s: _Slot):
    """``x`` at the slot's inputs, ``(..., rows, Wo)``, exactly 0 where invalid."""
    if s.strided is None:  # shift windows: fancy indexing
        picked = x_rows[..., np.maximum(s.ys, 0)[:, None], np.maximum(s.xs, 0)[None, :]]
        return np.where(s.valid, picked, 0)
    out = np.empty(x_rows.shape[:-2] + (s.ys.size, s.xs.size), x_rows.dtype)
    if s.strided == ():
        out[...] = 0
        return out
    (oi, oj), (ii, ij) = s.strided
    out[..., oi, oj] = x_rows[..., ii, ij]      # one strided copy, no index arrays
    out[..., :oi.start, :] = 0                  # zero only the border strips
    out[..., oi.stop:, :] = 0
    out[..., oi, :oj.start] = 0
    out[..., oi, oj.stop:] = 0
    return out


def _scatter_add(dst_rows, src, s: _Slot):
    """``dst[..., y, x] += src[..., i, j]`` for every valid output ``(i, j)`` of the slot."""
    if s.strided is not None:
        if s.strided:                           # in place on a strided view: one pass
            (oi, oj), (ii, ij) = s.strided
            dst_rows[..., ii, ij] += src[..., oi, oj]
        return
    vy, vx = s.ys >= 0, s.xs >= 0
    index = (Ellipsis, s.ys[vy][:, None], s.xs[vx][None, :])
    values = src[..., vy, :][..., vx]
    if s.injective:
        dst_rows[index] += values
    else:  # shift windows: several outputs may share an input in one slot
        np.add.at(dst_rows, index, values)


def _constant(a: np.ndarray):
    """The single value of ``a`` if all its entries are equal, else None."""
    if a.size == 0:
        return None
    first = int(a.flat[0])
    return first if bool((a == first).all()) else None


def _table(t, s: _Slot):
    """``t[..., ay, ax]`` per output of the slot: ``(..., rows, Wo)``, or a broadcastable
    ``(..., 1, 1)`` view when the index is the same for every output (centred windows)."""
    if s.table_entry is not None:
        ay, ax = s.table_entry
        return t[..., ay, ax, None, None]
    return t[..., s.ay[:, None], s.ax[None, :]]


def _table_add(dst, src, s: _Slot):
    """``dst[..., ay, ax] += src[..., i, j]`` summed over outputs: one reduction when the
    index is constant (centred windows), else a tiny one-hot product."""
    if s.table_entry is not None:
        ay, ax = s.table_entry
        dst[..., ay, ax] += src.sum(axis=(-2, -1))
        return
    one_y = np.eye(dst.shape[-2], dtype=src.dtype)[s.ay]  # (rows, Ty)
    one_x = np.eye(dst.shape[-1], dtype=src.dtype)[s.ax]  # (Wo, Tx)
    dst += np.einsum("...ij,ia,jb->...ab", src, one_y, one_x, optimize=True)


# ---------------------------------------------------------------------------------------
# Similarity functions: phi(q, k) per channel and its two partial derivatives
# ---------------------------------------------------------------------------------------

def _phi(similarity: str, q, k):
    """``phi(q, k)`` elementwise (docs/contract.md "Similarity functions"); ``"dot"`` is ``q * k``."""
    if similarity == "dot":
        return q * k
    if similarity == "key":
        return np.broadcast_to(k, np.broadcast_shapes(q.shape, k.shape))
    if similarity == "neg_abs":
        return -np.abs(q - k)
    if similarity == "neg_abs_normalized":
        return -np.abs(q - k) / (np.abs(q) + np.abs(k) + 1)
    if similarity == "neg_square_normalized":
        return -(q - k) ** 2 / (np.abs(q * k) + 1)
    return -(q - k) ** 2                                   # neg_square


def _dphi(similarity: str, q, k):
    """``(dphi/dq, dphi/dk)`` elementwise; ``|x|`` has the subgradient ``sign(0) = 0``."""
    d = q - k
    if similarity == "dot":
        return k, q
    if similarity == "key":
        return np.zeros_like(d), np.ones_like(d)
    if similarity == "neg_abs":
        return -np.sign(d), np.sign(d)
    if similarity == "neg_abs_normalized":
        den = np.abs(q) + np.abs(k) + 1
        a = np.abs(d) / den ** 2
        return -np.sign(d) / den + a * np.sign(q), np.sign(d) / den + a * np.sign(k)
    if similarity == "neg_square_normalized":
        den = np.abs(q * k) + 1
        e = d * d / den ** 2 * np.sign(q * k)
        return -2 * d / den + e * k, 2 * d / den + e * q
    return -2 * d, 2 * d                                   # neg_square


# ---------------------------------------------------------------------------------------
# Chunk kernels: logits, weighted sums and their gradients
# ---------------------------------------------------------------------------------------

def _chunk_logits(geo, c, q_rows, k_rows, bias, rel, mask_invalid: bool, kb_rows=None,
                  key=None):
    """Logits ``(nb, nh, K, rows, Wo)`` of a chunk; invalid slots ``-inf`` if masked.

    ``kb_rows``: the chunk's ``key_bias`` rows ``(nb, nh, 1, rows, W)`` or ``None``; an
    invalid slot gets 0 from it, a slot whose key is removed (``-inf``) gets ``-inf``
    whatever its similarity gave (the caller zeroes its key: :func:`_without_removed`).
    ``key``: the all-slots path's gathered keys, when the caller has them
    (:func:`_all_keys`).
    """
    if c.all_slots:
        return _all_logits(geo, c, _window(geo, c), q_rows, k_rows, bias, rel, mask_invalid,
                           kb_rows, key)
    qc = _centres(q_rows, geo, c)                         # (nb, nh, Dqk, rows, Wo)
    bias_h = None if bias is None else bias[c.h].astype(geo.acc_dtype, copy=False)
    rel_h = None if rel is None else rel[c.h].astype(geo.acc_dtype, copy=False)
    logits = np.empty((qc.shape[0], qc.shape[1], geo.slots) + qc.shape[3:], geo.acc_dtype)
    for t, s in _slots(geo, c):
        key = _gather(k_rows, s)
        if rel_h is not None:
            key = key + _table(rel_h, s)[None]
        if geo.similarity == "dot":
            logit = geo.scale * np.einsum("bhdij,bhdij->bhij", qc, key)
        else:
            logit = geo.scale * _phi(geo.similarity, qc, key).sum(axis=2)
        if bias_h is not None:
            logit += _table(bias_h, s)[None]
        if kb_rows is not None:
            kb = _gather(kb_rows, s)[:, :, 0]
            logit += kb
            logit[kb == -np.inf] = -np.inf   # a removed key: -inf whatever phi gave, like a mask
        if mask_invalid:
            logit = np.where(s.valid, logit, -np.inf)
        logits[:, :, t] = logit
    return logits


def _chunk_weighted_sum(geo, c, weights, v_rows, finite=False):
    """``sum_t weights[:, :, t] * v at slot t``: ``(nb, nh, Dv, rows, Wo)``.

    Invalid slots add nothing whatever their weight (an ``inf`` weight times a zero value
    would be NaN), as in the kernels. ``finite``: the weights are a softmax's (finite, or
    NaN in every slot of a window), so the gathered zero of an invalid slot already adds 0.
    """
    if c.all_slots:
        return _all_weighted_sum(geo, c, _window(geo, c), weights, v_rows, finite)
    out = np.zeros(weights.shape[:2] + (v_rows.shape[2],) + weights.shape[3:], geo.acc_dtype)
    for t, s in _slots(geo, c):
        w = weights[:, :, t, None]
        if s.strided is None:  # shift windows: gather, then drop the invalid outputs
            out += np.where(s.valid, w * _gather(v_rows, s), 0)
        elif s.strided:        # valid outputs only, through strided views
            (oi, oj), (ii, ij) = s.strided
            out[..., oi, oj] += w[..., oi, oj] * v_rows[..., ii, ij]
    return out


def _chunk_av_grads(geo, c, grad_out, weights, v_rows, dv_rows):
    """Returns ``dweights``; adds the value gradient into ``dv_rows``.

    Invalid slots add nothing to the output whatever their weight, so their weight
    gradient is 0 and they pass no gradient to ``v``.
    """
    if c.all_slots:
        return _all_av_grads(geo, c, _window(geo, c), grad_out, weights, v_rows, dv_rows)
    dweights = np.empty_like(weights)
    for t, s in _slots(geo, c):
        dweights[:, :, t] = np.where(s.valid, np.einsum("bhdij,bhdij->bhij", grad_out,
                                                        _gather(v_rows, s)), 0)
        _scatter_add(dv_rows, weights[:, :, t, None] * grad_out, s)
    return dweights


def _chunk_qk_grads(geo, c, dlogits, q_rows, k_rows, rel, dq_rows, dk_rows, dbias, drel,
                    dkb_rows=None, key=None):
    """Adds the gradients of the chunk's logits into ``dq``/``dk``/``dbias``/``drel`` (and
    ``key_bias``'s rows ``dkb_rows``: each valid slot's logit gradient lands on its key);
    ``key`` as :func:`_chunk_logits`."""
    if c.all_slots:
        return _all_qk_grads(geo, c, _window(geo, c), dlogits, q_rows, k_rows, rel, dq_rows,
                             dk_rows, dbias, drel, dkb_rows, key)
    qc = _centres(q_rows, geo, c)
    dqc = _centres(dq_rows, geo, c)
    rel_h = None if rel is None else rel[c.h].astype(geo.acc_dtype, copy=False)
    for t, s in _slots(geo, c):
        g = geo.scale * dlogits[:, :, t, None]            # (nb, nh, 1, rows, Wo)
        key = _gather(k_rows, s)
        if rel_h is not None:
            key = key + _table(rel_h, s)[None]
            _table_add(drel[c.h], (g * qc).sum(axis=0), s)
        if geo.similarity == "dot":
            dqc += g * key
            _scatter_add(dk_rows, g * qc, s)
        else:
            by_q, by_k = _dphi(geo.similarity, qc, key)
            dqc += g * by_q
            _scatter_add(dk_rows, g * by_k, s)
        if dbias is not None:
            _table_add(dbias[c.h], dlogits[:, :, t].sum(axis=0), s)
        if dkb_rows is not None:
            _scatter_add(dkb_rows, dlogits[:, :, t, None], s)


# ---------------------------------------------------------------------------------------
# All slots at once: the same chunk kernels for small problems
# ---------------------------------------------------------------------------------------
#
# The loop above costs a few NumPy calls per slot; when the chunk is small (a 14x14 image:
# 49 slots of a few thousand values each) those calls, not the arithmetic, are the time
# (profile of issue 12, point 12). Here a chunk gathers every slot at once (a strided view
# of its zero-padded rows for centred windows, a cached flat index for shift windows), so a
# chunk is a handful of einsums on (..., kh, kw, rows, Wo) arrays. Only the scatter of
# gradients into keys/values still walks the slots (basic-slice adds, cheaper than
# np.add.at). The chunk plan counts the gathered channels against the memory budget.

#: Whether chunks that fit the budget with every slot gathered take this path (always
#: faster in benchmarks/run.py's sweeps, where it is taken: the gathers are strided
#: copies and the sums single einsums); tests switch it off to run the per-slot loop.
_ALL_SLOTS = True


@dataclass(frozen=True)
class _Window:
    """Every slot of one chunk's outputs at once (positions relative to ``in_rows``).

    Arrays over slots have the slot axes ``(kh, kw)`` split, as NumPy's strided window
    views need them."""

    kernel: tuple[int, int]
    index: np.ndarray | None  # (kh, kw, rows, Wo) flat index into the chunk's rows*W
                              # inputs, rows*W where invalid; None when ``regular`` (the
                              # cache would hold K int64 per output for nothing)
    valid: np.ndarray       # (K, rows, Wo) bool
    all_valid: bool
    ay: np.ndarray          # table row per slot: (K, 1, 1) if constant, else (K, rows, 1)
    ax: np.ndarray          # table column per slot: (K, 1, 1) or (K, 1, Wo)
    constant_table: bool    # every slot uses one table entry (centred windows)
    # When every slot reads ``first + i*stride + t*dilation`` on both axes and that
    # progression leaves the chunk's inputs exactly where the slot is invalid (centred
    # windows): ``((top, bottom, left, right), (y0, x0))``, the zero padding and the first
    # input in the padded rows. Then a strided view of the padded rows is the gather.
    regular: tuple | None


def _progression(pos, length, stride, dilation):
    """``(first, pad_before, pad_after)`` when ``pos`` ``(Lo, k)`` (``-1``: invalid) is
    ``first + i*stride + t*dilation`` at every valid entry and outside ``[0, length)`` at
    every invalid one; else ``None``."""
    i = np.arange(pos.shape[0])[:, None] * stride
    t = np.arange(pos.shape[1])[None, :] * dilation
    valid = pos >= 0
    if not valid.any():
        return None
    first = int(pos[valid][0] - (i + t)[valid][0])
    regular = first + i + t
    if (regular[valid] != pos[valid]).any():
        return None
    inside = (regular >= 0) & (regular < length)
    if (inside & ~valid).any():
        return None
    return first, max(0, -int(regular.min())), max(0, int(regular.max()) - (length - 1))


@functools.lru_cache(maxsize=256)
def _window_plan(height, width, kernel, dilation, stride, border, i0, i1, r0, r1):
    """The :class:`_Window` of output rows ``i0:i1`` reading input rows ``r0:r1``: pure
    geometry (from :func:`axis_window`), so cached like :func:`_slot_plan`."""
    rows = axis_window(height, kernel[0], dilation[0], stride[0], border)
    cols = axis_window(width, kernel[1], dilation[1], stride[1], border)
    pos_y = np.where(rows.pos[i0:i1] >= 0, rows.pos[i0:i1].astype(np.intp) - r0, -1)
    pos_x = cols.pos.astype(np.intp)
    ys, xs = pos_y.T[:, None, :, None], pos_x.T[None, :, None, :]  # (kh,1,rows,1), (1,kw,1,Wo)
    valid = (ys >= 0) & (xs >= 0)
    k, nr, nc = kernel[0] * kernel[1], i1 - i0, cols.pos.shape[0]
    ay = np.broadcast_to(rows.table[i0:i1].T[:, None, :, None], kernel + (nr, 1))
    ax = np.broadcast_to(cols.table.T[None, :, None, :], kernel + (1, nc))
    ay, ax = ay.reshape(k, nr, 1), ax.reshape(k, 1, nc)
    constant = bool((ay == ay[:, :1]).all() and (ax == ax[:, :, :1]).all())
    if constant:
        ay, ax = ay[:, :1], ax[:, :, :1]
    py = _progression(pos_y, r1 - r0, stride[0], dilation[0])
    px = _progression(pos_x, width, stride[1], dilation[1])
    regular = None if py is None or px is None else (
        (py[1], py[2], px[1], px[2]), (py[0] + py[1], px[0] + px[1]))
    # the flat gather index only where no strided view serves (positions not an arithmetic
    # progression, as with shift windows); invalid
    # slots read the zero row past the chunk's rows
    index = None if regular else np.ascontiguousarray(np.broadcast_to(
        np.where(valid, ys * width + xs, (r1 - r0) * width), kernel + (nr, nc)))
    w = _Window(kernel, index,
                np.ascontiguousarray(np.broadcast_to(valid, kernel + (nr, nc)).reshape(k, nr, nc)),
                bool(valid.all()), np.ascontiguousarray(ay), np.ascontiguousarray(ax), constant,
                regular)
    for a in (w.index, w.valid, w.ay, w.ax):
        if a is not None:
            a.flags.writeable = False                       # shared: nobody may change it
    return w


def _window(geo: Geometry, c: _Chunk) -> _Window:
    return _window_plan(geo.height, geo.width, geo.kernel, geo.dilation, geo.stride, geo.border,
                        c.i.start, c.i.stop, c.in_rows.start, c.in_rows.stop)


def _split(a, w: _Window):
    """``(..., K, rows, Wo)`` as ``(..., kh, kw, rows, Wo)``."""
    return a.reshape(a.shape[:-3] + w.kernel + a.shape[-2:])


def _merge(a, w: _Window):
    """``(..., kh, kw, rows, Wo)`` as ``(..., K, rows, Wo)``."""
    return a.reshape(a.shape[:-4] + (w.kernel[0] * w.kernel[1],) + a.shape[-2:])


def _gather_all(x_rows, geo, w: _Window):
    """``x`` at every slot's inputs: ``(..., kh, kw, rows, Wo)`` from ``(..., rows_in, W)``,
    exactly 0 where invalid. Regular windows: a read-only strided view of the zero-padded
    rows, copied out once; others (shift windows) gather by index, reading one appended
    zero."""
    lead, (n_rows, n_cols) = x_rows.shape[:-2], x_rows.shape[-2:]
    shape = lead + w.kernel + w.valid.shape[1:]
    if w.regular is None:
        flat = np.empty(lead + (n_rows * n_cols + 1,), x_rows.dtype)
        flat[..., -1] = 0
        flat[..., :-1].reshape(x_rows.shape)[...] = x_rows
        return np.take(flat, w.index, axis=-1)
    (top, bottom, left, right), (y0, x0) = w.regular
    padded = np.zeros(lead + (n_rows + top + bottom, n_cols + left + right), x_rows.dtype)
    padded[..., top:top + n_rows, left:left + n_cols] = x_rows
    st = padded.strides
    (dy, dx), (sy, sx) = geo.dilation, geo.stride
    view = np.lib.stride_tricks.as_strided(
        padded[..., y0:, x0:], shape,
        st[:-2] + (dy * st[-2], dx * st[-1], sy * st[-2], sx * st[-1]), writeable=False)
    out = np.empty(shape, x_rows.dtype)   # contiguous: NumPy's einsum is slow on the view
    np.copyto(out, view)
    return out


def _lookup_all(t, w: _Window):
    """``t[..., ay, ax]`` for every slot: ``(..., kh, kw, rows, Wo)``, or
    ``(..., kh, kw, 1, 1)`` with one table entry per slot."""
    return _split(t[..., w.ay, w.ax], w)


def _tables_add(dst, src, w: _Window):
    """``dst[..., ay, ax] += src[..., t, i, j]`` summed over slots and outputs."""
    if w.constant_table:      # one entry per slot, distinct slots: distinct entries
        dst[..., w.ay[:, 0, 0], w.ax[:, 0, 0]] += src.sum(axis=(-2, -1))
        return
    ay = np.broadcast_to(w.ay[..., 0], w.valid.shape[:2])        # (K, rows)
    ax = np.broadcast_to(w.ax[:, 0], (w.valid.shape[0], w.valid.shape[2]))  # (K, Wo)
    one_y = np.eye(dst.shape[-2], dtype=src.dtype)[ay]           # (K, rows, Ty)
    one_x = np.eye(dst.shape[-1], dtype=src.dtype)[ax]           # (K, Wo, Tx)
    dst += np.einsum("...kij,kia,kjb->...ab", src, one_y, one_x, optimize=True)


def _scatter_all(dst_rows, src, geo, c):
    """``dst[..., y, x] += src[..., ty, tx, i, j]`` for every valid slot of every output."""
    kw = geo.kernel[1]
    for t, s in _slots(geo, c):
        _scatter_add(dst_rows, src[..., t // kw, t % kw, :, :], s)


def _rel_term(geo, c, w, rel):
    """``rel`` at every slot ``(nh, Dqk, kh, kw)`` when each slot uses one table entry
    (centred windows): then ``q . (k + rel) = q . k + q . rel`` without a ``K``-times larger
    sum; else ``None`` (the key gets ``rel`` added per output)."""
    if rel is None or not w.constant_table:
        return None
    return _lookup_all(rel[c.h].astype(geo.acc_dtype, copy=False), w)[..., 0, 0]


def _all_keys(geo, c, w, k_rows, rel):
    """The chunk's keys at every slot ``(nb, nh, Dqk, kh, kw, rows, Wo)``, with ``rel``
    added unless :func:`_rel_term` takes it."""
    key = _gather_all(k_rows, geo, w)
    if rel is not None and not w.constant_table:
        key += _lookup_all(rel[c.h].astype(geo.acc_dtype, copy=False), w)[None]
    return key


def _all_logits(geo, c, w, q_rows, k_rows, bias, rel, mask_invalid, kb_rows, key=None):
    """:func:`_chunk_logits` with every slot at once (``key``: :func:`_all_keys`, if the
    caller keeps it for the backward)."""
    qc = _centres(q_rows, geo, c)                                 # (nb, nh, Dqk, rows, Wo)
    key = _all_keys(geo, c, w, k_rows, rel) if key is None else key
    rel_slots = _rel_term(geo, c, w, rel)
    if geo.similarity == "dot":   # linear in q: scale the (small) centres, not the logits
        qs = geo.scale * qc
        logits = np.einsum("bhdij,bhdyxij->bhyxij", qs, key)
        if rel_slots is not None:
            logits += np.einsum("bhdij,hdyx->bhyxij", qs, rel_slots)
        logits = _merge(logits, w)                                # (nb, nh, K, rows, Wo)
    else:
        logits = _merge(_phi(geo.similarity, qc[:, :, :, None, None], key).sum(axis=2), w)
        logits *= geo.scale
    if bias is not None:
        logits += _merge(_lookup_all(bias[c.h].astype(geo.acc_dtype, copy=False), w), w)[None]
    if kb_rows is not None:
        kb = _merge(_gather_all(kb_rows[:, :, 0], geo, w), w)
        logits += kb
        logits[kb == -np.inf] = -np.inf   # a removed key: as in _chunk_logits
    if mask_invalid and not w.all_valid:
        logits = np.where(w.valid, logits, -np.inf)
    return logits


def _all_weighted_sum(geo, c, w, weights, v_rows, finite):
    """:func:`_chunk_weighted_sum` with every slot at once."""
    if not (w.all_valid or finite):  # invalid slots add nothing whatever their weight
        weights = np.where(w.valid, weights, 0)
    return np.einsum("bhyxij,bhdyxij->bhdij", _split(weights, w), _gather_all(v_rows, geo, w))


def _all_av_grads(geo, c, w, grad_out, weights, v_rows, dv_rows):
    """:func:`_chunk_av_grads` with every slot at once."""
    dweights = _merge(np.einsum("bhdij,bhdyxij->bhyxij", grad_out,
                                _gather_all(v_rows, geo, w)), w)
    if not w.all_valid:
        dweights = np.where(w.valid, dweights, 0)
    _scatter_all(dv_rows, _split(weights, w)[:, :, None] * grad_out[:, :, :, None, None], geo, c)
    return dweights


def _all_qk_grads(geo, c, w, dlogits, q_rows, k_rows, rel, dq_rows, dk_rows, dbias, drel,
                  dkb_rows, key=None):
    """:func:`_chunk_qk_grads` with every slot at once (``key`` as :func:`_all_logits`)."""
    qc = _centres(q_rows, geo, c)
    dqc = _centres(dq_rows, geo, c)
    g = _split(geo.scale * dlogits, w)                            # (nb, nh, kh, kw, rows, Wo)
    key = _all_keys(geo, c, w, k_rows, rel) if key is None else key
    rel_slots = _rel_term(geo, c, w, rel)
    if rel is not None:
        if rel_slots is not None:  # one entry per slot: a contraction over batch and pixels
            # NumPy's own einsum, not BLAS: BLAS threads stall when the CPUs are shared.
            per_slot = np.einsum("bhyxij,bhdij->hdyx", g, qc)             # (nh, Dqk, kh, kw)
            _tables_add(drel[c.h], _merge(per_slot[..., None, None], w), w)
        else:
            _tables_add(drel[c.h], _merge(np.einsum("bhyxij,bhdij->hdyxij", g, qc), w), w)
    if geo.similarity == "dot":
        dqc += np.einsum("bhyxij,bhdyxij->bhdij", g, key)
        if rel_slots is not None:
            dqc += np.einsum("bhyxij,hdyx->bhdij", g, rel_slots)
        by_k = qc[:, :, :, None, None]
    else:
        by_q, by_k = _dphi(geo.similarity, qc[:, :, :, None, None], key)
        dqc += np.einsum("bhyxij,bhdyxij->bhdij", g, by_q)
    _scatter_all(dk_rows, g[:, :, None] * by_k, geo, c)
    if dbias is not None:
        _tables_add(dbias[c.h], dlogits.sum(axis=0), w)
    if dkb_rows is not None:
        _scatter_all(dkb_rows, _split(dlogits, w)[:, :, None], geo, c)

def _softmax(logits):
    """``(weights, lse)`` over axis 2; ``-inf`` logits get weight exactly 0. A window whose
    logits are all ``-inf`` (no slot takes part) gets weights 0 and ``lse = -inf``.

    One ``exp`` per logit, in place: the weights are the shifted exponentials over their
    sum (small windows spend most of their time here)."""
    top = logits.max(axis=2, keepdims=True)
    top[top == -np.inf] = 0                                # empty window: nothing to shift
    weights = np.subtract(logits, top)                     # -inf stays -inf: exp gives 0
    np.exp(weights, out=weights)
    total = weights.sum(axis=2, keepdims=True)
    with np.errstate(divide="ignore"):                     # log(0) = -inf: the empty window
        lse = top + np.log(total)
    inverse = np.divide(1, total, out=np.zeros_like(total), where=total > 0)
    weights *= inverse                                     # empty window: 0 * 0
    return weights, lse[:, :, 0]


def _weights(logits, lse):
    """``exp(logits - lse)``, exactly 0 at ``-inf`` logits (also where ``lse = -inf``: the
    empty window's logits are all ``-inf``, and ``-inf - +inf`` is ``-inf``, not NaN)."""
    weights = np.subtract(logits, np.where(lse == -np.inf, np.inf, lse))
    return np.exp(weights, out=weights)


# ---------------------------------------------------------------------------------------
# Gradient buffers: each chunk accumulates in the acc dtype, then lands in the result
# ---------------------------------------------------------------------------------------

def _grad_rows(geo, c, per_head):
    return np.zeros((c.b.stop - c.b.start, c.h.stop - c.h.start, per_head,
                     c.in_rows.stop - c.in_rows.start, geo.width), geo.acc_dtype)


def _land(dst, rows_grad, c, per_head):
    """Add a chunk's ``(nb, nh, per_head, rows, W)`` gradient into ``dst`` ``(B, C, H, W)``."""
    ch = slice(c.h.start * per_head, c.h.stop * per_head)
    region = dst[c.b, ch, c.in_rows]
    region += rows_grad.reshape(region.shape).astype(dst.dtype)


def _out_rows(x, geo, c, per_head):
    """The ``(nb, nh, per_head, rows, Wo)`` view of output ``x`` for this chunk."""
    ch = slice(c.h.start * per_head, c.h.stop * per_head)
    part = x[c.b, ch, c.i]
    return part.reshape(part.shape[0], c.h.stop - c.h.start, per_head, *part.shape[2:])


def _key_bias_rows(key_bias, geo, c):
    """The chunk's ``key_bias`` rows ``(nb, nh, 1, rows, W)``, or ``None``."""
    return None if key_bias is None else _heads_view(key_bias, geo, c, 1, c.in_rows)


# Removed keys (key_bias -inf, docs/contract.md "Per-key logit") take no part, like invalid
# slots under border="mask": nothing read at them (k, v, even NaN or inf) reaches a result.
# Both chunk paths get this the same way: the chunk's k and v rows are 0 at removed keys (so
# their slots compute like invalid ones, key 0 and value 0), their logits are -inf
# (_chunk_logits), and their own dk, dv and d key_bias are set to exactly 0.

def _removed_keys(kb_rows):
    """``(nb, nh, 1, rows, W)`` bool, true at the chunk's removed keys; ``None`` if none."""
    if kb_rows is None:
        return None
    removed = kb_rows == -np.inf
    return removed if removed.any() else None


def _without_removed(x_rows, removed):
    """``x_rows`` ``(nb, nh, per_head, rows, W)`` with every channel of a removed key 0 (a
    new array: the inputs are never modified)."""
    return x_rows if removed is None else np.where(removed, 0, x_rows)


def _zero_removed(rows_grad, removed):
    """Set a chunk's key-side gradient rows to exactly 0 at its removed keys, in place."""
    if rows_grad is not None and removed is not None:
        rows_grad[np.broadcast_to(removed, rows_grad.shape)] = 0


def _small_grads(geo, bias, rel):
    dbias = None if bias is None else np.zeros(bias.shape, geo.acc_dtype)
    drel = None if rel is None else np.zeros(rel.shape, geo.acc_dtype)
    return dbias, drel


def _cast(geo, *arrays):
    return tuple(None if a is None else a.astype(geo.dtype) for a in arrays)


def _full_rel(rel):
    """The reference computes with the full ``rel`` table: a :class:`_geometry.SplitRel`
    (``sasa2d``'s factored form) is expanded to ``(heads, Dqk, th, tw)`` here, entry for
    entry (no arithmetic)."""
    return rel.expanded(np) if isinstance(rel, G.SplitRel) else rel


def _small_results(geo, dbias, drel, rel):
    """``(dbias, drel)`` in the inputs' dtype; ``drel`` a SplitRel when ``rel`` was one,
    summed from the full table in the accumulation dtype before rounding."""
    if isinstance(rel, G.SplitRel):
        return _cast(geo, dbias) + (G.SplitRel(*_cast(geo, *G.SplitRel.from_full_grad(drel))),)
    return _cast(geo, dbias, drel)


# ---------------------------------------------------------------------------------------
# The backend's function set
# ---------------------------------------------------------------------------------------

def qk_forward(geo: Geometry, q, k, bias, rel, key_bias=None):
    """Logits ``(B, heads, K, Ho, Wo)``; masked slots ``-inf`` with ``border="mask"``."""
    rel = _full_rel(rel)
    logits = np.empty(geo.attn_shape, geo.dtype)
    for c in _chunks(geo, 2 * geo.dqk):
        kb_rows = _key_bias_rows(key_bias, geo, c)
        q_rows = _heads_view(q, geo, c, geo.dqk, c.in_rows)
        k_rows = _without_removed(_heads_view(k, geo, c, geo.dqk, c.in_rows), _removed_keys(kb_rows))
        logits[c.b, c.h, :, c.i] = _chunk_logits(geo, c, q_rows, k_rows, bias, rel,
                                                 geo.border == "mask", kb_rows)
    return logits


def qk_backward(geo: Geometry, grad_logits, q, k, bias, rel, key_bias=None):
    given_rel, rel = rel, _full_rel(rel)
    dq, dk = np.zeros(q.shape, q.dtype), np.zeros(k.shape, k.dtype)
    dbias, drel = _small_grads(geo, bias, rel)
    dkey_bias = None if key_bias is None else np.zeros(key_bias.shape, key_bias.dtype)
    for c in _chunks(geo, 4 * geo.dqk):
        g = grad_logits[c.b, c.h, :, c.i].astype(geo.acc_dtype, copy=False)
        if geo.border == "mask":  # gradients at masked slots are ignored
            g = _mask_slots(geo, c, g)
        kb_rows = _key_bias_rows(key_bias, geo, c)
        if kb_rows is not None:   # and at slots whose key is removed (key_bias -inf)
            if c.all_slots:
                w = _window(geo, c)
                removed_slots = _merge(_gather_all(kb_rows[:, :, 0], geo, w), w) == -np.inf
            else:
                removed_slots = np.stack([_gather(kb_rows, s)[:, :, 0] == -np.inf
                                          for _, s in _slots(geo, c)], axis=2)
            g = np.where(removed_slots, 0, g)
        removed = _removed_keys(kb_rows)   # the keys themselves: their k is not read
        dq_rows, dk_rows = _grad_rows(geo, c, geo.dqk), _grad_rows(geo, c, geo.dqk)
        dkb_rows = None if key_bias is None else _grad_rows(geo, c, 1)
        _chunk_qk_grads(geo, c, g, _heads_view(q, geo, c, geo.dqk, c.in_rows),
                        _without_removed(_heads_view(k, geo, c, geo.dqk, c.in_rows), removed),
                        rel, dq_rows, dk_rows, dbias, drel, dkb_rows)
        _zero_removed(dk_rows, removed)
        _zero_removed(dkb_rows, removed)
        _land(dq, dq_rows, c, geo.dqk)
        _land(dk, dk_rows, c, geo.dqk)
        if dkb_rows is not None:
            _land(dkey_bias, dkb_rows, c, 1)
    return (dq, dk) + _small_results(geo, dbias, drel, given_rel) + (dkey_bias,)


def _mask_slots(geo, c, per_slot):
    """Zero ``per_slot`` ``(nb, nh, K, rows, Wo)`` at invalid slots."""
    return np.where(_window(geo, c).valid, per_slot, 0)


def av_forward(geo: Geometry, attn, v):
    out = np.empty(geo.out_shape, geo.dtype)
    for c in _chunks(geo, 2 * geo.dv):
        w = attn[c.b, c.h, :, c.i].astype(geo.acc_dtype, copy=False)
        _out_rows(out, geo, c, geo.dv)[...] = _chunk_weighted_sum(
            geo, c, w, _heads_view(v, geo, c, geo.dv, c.in_rows))
    return out


def av_backward(geo: Geometry, grad_out, attn, v):
    dattn, dv = np.empty(attn.shape, attn.dtype), np.zeros(v.shape, v.dtype)
    for c in _chunks(geo, 3 * geo.dv):
        w = attn[c.b, c.h, :, c.i].astype(geo.acc_dtype, copy=False)
        g = _out_rows(grad_out, geo, c, geo.dv).astype(geo.acc_dtype, copy=False)
        dv_rows = _grad_rows(geo, c, geo.dv)
        dattn[c.b, c.h, :, c.i] = _chunk_av_grads(
            geo, c, g, w, _heads_view(v, geo, c, geo.dv, c.in_rows), dv_rows)
        _land(dv, dv_rows, c, geo.dv)
    return dattn, dv


def attention_forward(geo: Geometry, q, k, v, bias, rel, key_bias=None):
    rel = _full_rel(rel)
    out = np.empty(geo.out_shape, geo.dtype)
    lse = np.empty(geo.lse_shape, lse_dtype(geo.dtype))
    for c in _chunks(geo, 2 * geo.dqk + 2 * geo.dv):
        kb_rows = _key_bias_rows(key_bias, geo, c)
        removed = _removed_keys(kb_rows)
        logits = _chunk_logits(geo, c, _heads_view(q, geo, c, geo.dqk, c.in_rows),
                               _without_removed(_heads_view(k, geo, c, geo.dqk, c.in_rows), removed),
                               bias, rel, geo.border == "mask", kb_rows)
        weights, lse[c.b, c.h, c.i] = _softmax(logits)
        v_rows = _without_removed(_heads_view(v, geo, c, geo.dv, c.in_rows), removed)
        _out_rows(out, geo, c, geo.dv)[...] = _chunk_weighted_sum(geo, c, weights, v_rows,
                                                                  finite=True)
    return out, lse


def attention_backward(geo: Geometry, grad_out, q, k, v, out, lse, bias, rel, key_bias=None):
    given_rel, rel = rel, _full_rel(rel)
    dq, dk, dv = np.zeros(q.shape, q.dtype), np.zeros(k.shape, k.dtype), np.zeros(v.shape, v.dtype)
    dbias, drel = _small_grads(geo, bias, rel)
    dkey_bias = None if key_bias is None else np.zeros(key_bias.shape, key_bias.dtype)
    for c in _chunks(geo, 4 * geo.dqk + 3 * geo.dv):
        kb_rows = _key_bias_rows(key_bias, geo, c)
        removed = _removed_keys(kb_rows)
        q_rows = _heads_view(q, geo, c, geo.dqk, c.in_rows)
        k_rows = _without_removed(_heads_view(k, geo, c, geo.dqk, c.in_rows), removed)
        # All slots: gather the keys once for the logits and their gradients.
        key = _all_keys(geo, c, _window(geo, c), k_rows, rel) if c.all_slots else None
        logits = _chunk_logits(geo, c, q_rows, k_rows, bias, rel, geo.border == "mask",
                               kb_rows, key)
        # Recompute the weights from the saved log-sum-exp instead of storing them.
        weights = _weights(logits, lse[c.b, c.h, None, c.i].astype(geo.acc_dtype))
        del logits
        g = _out_rows(grad_out, geo, c, geo.dv).astype(geo.acc_dtype, copy=False)
        dq_rows, dk_rows, dv_rows = (_grad_rows(geo, c, geo.dqk), _grad_rows(geo, c, geo.dqk),
                                     _grad_rows(geo, c, geo.dv))
        dkb_rows = None if key_bias is None else _grad_rows(geo, c, 1)
        dweights = _chunk_av_grads(geo, c, g, weights, _without_removed(
            _heads_view(v, geo, c, geo.dv, c.in_rows), removed), dv_rows)
        # Softmax backward: dlogit_t = p_t * (dp_t - sum_s p_s dp_s).
        dweights -= (weights * dweights).sum(axis=2, keepdims=True)
        dweights *= weights
        _chunk_qk_grads(geo, c, dweights, q_rows, k_rows, rel, dq_rows, dk_rows, dbias, drel,
                        dkb_rows, key)
        del key
        for rows_grad in (dk_rows, dv_rows, dkb_rows):
            _zero_removed(rows_grad, removed)
        for dst, rows_grad, per_head in ((dq, dq_rows, geo.dqk), (dk, dk_rows, geo.dqk),
                                         (dv, dv_rows, geo.dv), (dkey_bias, dkb_rows, 1)):
            if dst is not None:
                _land(dst, rows_grad, c, per_head)
    return (dq, dk, dv) + _small_results(geo, dbias, drel, given_rel) + (dkey_bias,)
