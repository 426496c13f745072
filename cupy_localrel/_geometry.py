"""Arguments and window geometry: the one home of both.

Every public call is checked here once, before any backend runs, and every backend
takes its window geometry from here. The border rule (docs/contract.md, "Geometry") lives in
:func:`axis_window`; nothing else in the package decides which input position a window
slot looks at, whether it is valid, or which ``bias``/``rel`` entry it uses.

Geometry is separable: the 2-D window is the product of two 1-D windows, so a
:class:`AxisWindow` per axis (arrays of shape ``(Lo, k)``) describes it completely and
costs ``O(Lo * k)`` memory. The CUDA kernels receive these same tables, so they carry no
border logic of their own.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

BORDERS = ("mask", "zeros", "shift")
BACKENDS = ("numpy", "cupy", "sim")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
CENTRED_BORDERS = ("mask", "zeros")
#: ``phi(q, k)`` of the logit, summed over a head's channels (docs/contract.md "Similarity functions"),
#: in the order of ``localrel::Similarity`` in kernels/localrel_common.cuh.
SIMILARITIES = ("dot", "key", "neg_abs", "neg_abs_normalized", "neg_square_normalized",
                "neg_square")


# ---------------------------------------------------------------------------------------
# Per-axis window geometry
# ---------------------------------------------------------------------------------------

def output_length(length: int, stride: int) -> int:
    """``ceil(length / stride)``: output index ``i`` is centred on input ``i * stride``."""
    return -(-length // stride)


def table_length(kernel: int, border: str) -> int:
    """Length of the ``bias``/``rel`` table along one axis: ``k``, or ``2k-1`` for shift."""
    return 2 * kernel - 1 if border == "shift" else kernel


def table_offsets(kernel: int, border: str) -> np.ndarray:
    """Relative offset, in dilated steps, of each ``bias``/``rel`` table entry on one axis.

    Entry ``a`` of a table row stands for the slots whose input lies ``offset[a] * d``
    from the window centre: ``a - k//2`` for centred borders (``k`` entries),
    ``a - (k-1)`` for ``shift`` (``2k-1`` entries). Geometry priors (LR-Net's MLP) take
    these as their input.
    """
    centre = kernel - 1 if border == "shift" else kernel // 2
    return np.arange(table_length(kernel, border), dtype=np.int64) - centre


@dataclass(frozen=True)
class AxisWindow:
    """The window along one axis, for every output index and slot.

    Attributes (``(Lo, k)`` int32 arrays, ``Lo = ceil(L / stride)``):
        pos:   input position slot ``t`` of output ``i`` looks at, ``-1`` where invalid.
        table: index of that slot into the ``bias``/``rel`` table along this axis.
    """

    pos: np.ndarray
    table: np.ndarray
    length: int  # L, the input length along the axis

    @property
    def valid(self) -> np.ndarray:
        """``(Lo, k)`` bool: the slot looks inside the image."""
        return self.pos >= 0

    @functools.cached_property
    def users(self) -> tuple[np.ndarray, np.ndarray]:
        """Who looks at each input position: ``(out_index, slot)``, each ``(L, m)`` int32.

        Row ``n`` lists the pairs ``(i, t)`` with ``pos[i, t] == n`` (sorted by ``i``),
        padded with ``-1``; ``m`` is the largest count. Backward passes gather through it
        (each key collects from the queries whose window holds it) instead of scattering
        with atomics.
        """
        length = self.length
        out_index, slot = np.nonzero(self.pos >= 0)
        position = self.pos[out_index, slot]
        order = np.lexsort((out_index, position))
        out_index, slot, position = out_index[order], slot[order], position[order]
        counts = np.bincount(position, minlength=length)
        width = int(counts.max()) if counts.size else 0
        rank = np.arange(len(position)) - np.repeat(np.cumsum(counts) - counts, counts)
        users_i = np.full((length, width), -1, np.int32)
        users_t = np.full((length, width), -1, np.int32)
        users_i[position, rank], users_t[position, rank] = out_index, slot
        return users_i, users_t


@functools.lru_cache(maxsize=256)
def axis_window(length: int, kernel: int, dilation: int, stride: int, border: str) -> AxisWindow:
    """Window geometry along one axis (docs/contract.md, "Geometry").

    ``mask``/``zeros``: centred windows, slot ``t`` looks at ``c + (t - k//2) * d`` and is
    valid inside ``[0, L)``; the table index is ``t``.
    ``shift`` (NATTEN): among positions of the same residue ``c mod d`` the window slides
    to stay inside the image, so every slot is valid; the table index is the relative
    offset ``start + t - c//d`` shifted into ``0 .. 2k-2``.
    """
    centre = np.arange(output_length(length, stride), dtype=np.int64)[:, None] * stride
    slot = np.arange(kernel, dtype=np.int64)[None, :]
    if border in CENTRED_BORDERS:
        pos = centre + (slot - kernel // 2) * dilation
        pos = np.where((pos >= 0) & (pos < length), pos, -1)
        table = np.broadcast_to(slot, pos.shape)
    else:
        residue = centre % dilation
        same_residue = (length - residue + dilation - 1) // dilation
        centre_in_residue = centre // dilation
        start = np.clip(centre_in_residue - kernel // 2, 0, same_residue - kernel)
        pos = residue + dilation * (start + slot)
        table = start + slot - centre_in_residue + (kernel - 1)
    pos = np.ascontiguousarray(pos, dtype=np.int32)
    table = np.ascontiguousarray(table, dtype=np.int32)
    pos.flags.writeable = False  # cached and shared: nobody may change it
    table.flags.writeable = False
    return AxisWindow(pos, table, length)


# ---------------------------------------------------------------------------------------
# The checked description of one call
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Geometry:
    """Everything a backend needs to know about one call, already checked.

    Shapes: ``q``/``k`` ``(batch, heads*dqk, height, width)``, ``v`` ``(batch, heads*dv,
    height, width)``, output ``(batch, heads*dv, out_h, out_w)``, attention
    ``(batch, heads, kh*kw, out_h, out_w)``.
    """

    batch: int
    heads: int
    dqk: int
    dv: int
    height: int
    width: int
    kernel: tuple[int, int]
    dilation: tuple[int, int]
    stride: tuple[int, int]
    border: str
    scale: float
    dtype: np.dtype
    similarity: str = "dot"
    rows: AxisWindow = field(init=False, repr=False, compare=False)
    cols: AxisWindow = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        (kh, kw), (dh, dw), (sh, sw) = self.kernel, self.dilation, self.stride
        object.__setattr__(self, "rows", axis_window(self.height, kh, dh, sh, self.border))
        object.__setattr__(self, "cols", axis_window(self.width, kw, dw, sw, self.border))

    @property
    def out_h(self) -> int:
        return output_length(self.height, self.stride[0])

    @property
    def out_w(self) -> int:
        return output_length(self.width, self.stride[1])

    @property
    def slots(self) -> int:
        """``K = kh * kw``, window slots, row-major from the top-left."""
        return self.kernel[0] * self.kernel[1]

    @property
    def table_shape(self) -> tuple[int, int]:
        """``(kh, kw)``, or ``(2kh-1, 2kw-1)`` for ``border="shift"``."""
        return (table_length(self.kernel[0], self.border), table_length(self.kernel[1], self.border))

    @property
    def acc_dtype(self) -> np.dtype:
        """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
        return lse_dtype(self.dtype)

    @property
    def out_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads * self.dv, self.out_h, self.out_w)

    @property
    def attn_shape(self) -> tuple[int, int, int, int, int]:
        return (self.batch, self.heads, self.slots, self.out_h, self.out_w)

    @property
    def lse_shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.out_h, self.out_w)


class SplitRel(NamedTuple):
    """SASA's ``rel`` in its factored form, as ``sasa2d`` hands it to the backends (never
    expanded per call): ``rows`` ``(heads, Dqk/2, th)`` is channel ``d < Dqk/2``'s entry at
    the slot's table row, ``cols`` ``(heads, Dqk/2, tw)`` channel ``Dqk/2 + d``'s at its table
    column. It stands for the full table ``rel`` ``(heads, Dqk, th, tw)`` of
    :func:`expanded`; a backend's ``drel`` for it is a ``SplitRel`` of the same shapes.
    """

    rows: object
    cols: object

    def expanded(self, xp):
        """The full table ``(heads, Dqk, th, tw)`` (``xp``: the arrays' module)."""
        (heads, half, th), tw = self.rows.shape, self.cols.shape[2]
        rows = xp.broadcast_to(self.rows[:, :, :, None], (heads, half, th, tw))
        cols = xp.broadcast_to(self.cols[:, :, None, :], (heads, half, th, tw))
        return xp.concatenate([rows, cols], axis=1)

    @staticmethod
    def from_full_grad(drel) -> "SplitRel":
        """The gradient of ``rows``/``cols`` from that of the full table ``(heads, Dqk, th,
        tw)``: ``rows[h, d, a]`` feeds every column of table row ``a``, so its gradient sums
        over the columns (and ``cols``' over the rows)."""
        half = drel.shape[1] // 2
        return SplitRel(drel[:, :half].sum(axis=3), drel[:, half:].sum(axis=2))


# ---------------------------------------------------------------------------------------
# Checks of scalars and parameters
# ---------------------------------------------------------------------------------------

def to_pair(value, name: str) -> tuple[int, int]:
    """Normalise an int or a pair of ints to a pair of positive ints."""
    items = (value, value) if _is_int(value) else value
    try:
        items = tuple(items)
    except TypeError:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}") from None
    if len(items) != 2 or not all(_is_int(x) for x in items):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    if min(items) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return int(items[0]), int(items[1])


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_border(border) -> str:
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    return border


def check_similarity(similarity, rel=None, rel_name: str = "rel") -> str:
    """A name of :data:`SIMILARITIES`; ``rel`` (``q . rel``) exists for ``"dot"`` only."""
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
    if rel is not None and similarity != "dot":
        raise ValueError(f"{rel_name} (the q . rel term) is defined for similarity='dot' only, "
                         f"got similarity={similarity!r}")
    return similarity


def check_key_bias(key_bias, geo: "Geometry", name: str = "key_bias") -> None:
    """``key_bias`` ``(B, heads, H, W)``: one logit per key pixel and head."""
    if key_bias is not None:
        check_shape(key_bias, name, (geo.batch, geo.heads, geo.height, geo.width))


def check_backend_name(backend):
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")
    return backend


def check_heads(heads, name: str = "heads") -> int:
    if not _is_int(heads) or heads < 1:
        raise ValueError(f"{name} must be a positive int, got {heads!r}")
    return int(heads)


def check_scale(scale, default: float) -> float:
    if scale is None:
        return float(default)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise ValueError(f"scale must be a real number or None, got {scale!r}")
    if not math.isfinite(scale):  # a NaN or infinite scale makes every output NaN
        raise ValueError(f"scale must be finite, got {scale!r}")
    return float(scale)


#: Default ``scale`` of ``local_relation2d`` and ``sasa2d`` (docs/contract.md: both papers use none).
PAPERS_SCALE = 1.0


def check_papers_scale(scale) -> float:
    """``scale`` of ``local_relation2d``/``sasa2d``: ``None`` means their default, 1."""
    return check_scale(scale, PAPERS_SCALE)


def check_kernel_for_border(kernel: tuple[int, int], border: str) -> None:
    """Centred windows (``mask``/``zeros``) need odd kernels; what a layer checks at build."""
    if border in CENTRED_BORDERS and (kernel[0] % 2 == 0 or kernel[1] % 2 == 0):
        raise ValueError(f"kernel_size must be odd with border={border!r}, got {kernel}")


def check_window(height, width, kernel, dilation, border) -> None:
    """Kernel/border rules: odd kernels for centred modes; ``L // d >= k`` for shift."""
    check_kernel_for_border(kernel, border)
    for axis, length, k, d in (("height", height, kernel[0], dilation[0]),
                               ("width", width, kernel[1], dilation[1])):
        if border == "shift" and length // d < k:
            raise ValueError(
                f"kernel_size {kernel} with dilation {dilation} does not fit the input {axis} "
                f"{length} with border='shift' (needs {axis} // dilation >= kernel_size)")


# ---------------------------------------------------------------------------------------
# Checks of arrays
# ---------------------------------------------------------------------------------------

def array_kind(x) -> str:
    """``"numpy"`` or ``"cupy"`` for a supported array, else raise ``TypeError`` later."""
    module = type(x).__module__
    if isinstance(x, np.ndarray):
        return "numpy"
    if module.split(".")[0] == "cupy":   # not this package's own types (cupy_localrel...)
        return "cupy"
    return "other"


def native_byte_order(x):
    """``x`` itself, or a native-byte-order copy of a NumPy array stored byte-swapped.

    The contract accepts either byte order (docs/contract.md, "Dtypes and byte order"): the
    public functions convert once, here, so that every backend computes on native arrays
    at the dtype's full precision and returns native-order results. The caller's array is
    never modified. (CuPy and torch arrays are always native.)
    """
    if isinstance(x, np.ndarray) and not x.dtype.isnative:
        return x.astype(x.dtype.newbyteorder("="))
    return x


def same_dtype(a, b) -> bool:
    """One dtype up to byte order: same kind and size (``'>f4'`` is float32 too)."""
    a, b = np.dtype(a), np.dtype(b)
    return a.kind == b.kind and a.itemsize == b.itemsize


def check_arrays(arrays: dict) -> tuple[str, np.dtype]:
    """Check the given arrays (``None`` values skipped) for one kind and one float dtype.

    Dtypes are compared up to byte order (:func:`same_dtype`). Returns ``(kind, dtype)``:
    ``kind`` is ``"numpy"`` or ``"cupy"``, ``dtype`` in native byte order.
    """
    kinds, dtypes = {}, {}
    for name, x in _split_rel_parts(arrays):
        if x is None:
            continue
        kind = array_kind(x)
        if kind == "other":
            raise TypeError(f"{name} must be a NumPy or CuPy array, got {type(x).__name__} "
                            "(torch tensors go through cupy_localrel.adapters.torch, other "
                            "arrays through cupy_localrel.adapters.dlpack)")
        if np.dtype(x.dtype).name not in FLOAT_DTYPES:
            raise TypeError(f"{name} must have a floating dtype {FLOAT_DTYPES}, got {x.dtype}")
        kinds[name], dtypes[name] = kind, np.dtype(x.dtype).newbyteorder("=")
    if len(set(kinds.values())) > 1:
        raise TypeError("arrays must all be NumPy or all CuPy, got " +
                        ", ".join(f"{n}: {k}" for n, k in kinds.items()))
    if len(set(dtypes.values())) > 1:
        raise TypeError("all floating inputs must share one dtype, got " +
                        ", ".join(f"{n}: {d}" for n, d in dtypes.items()))
    first = next(iter(kinds))
    return kinds[first], dtypes[first]


def _split_rel_parts(arrays: dict):
    """``(name, array)`` pairs of ``arrays``, a :class:`SplitRel` as its two arrays."""
    for name, x in arrays.items():
        if isinstance(x, SplitRel):
            yield from ((f"{name}.rows", x.rows), (f"{name}.cols", x.cols))
        else:
            yield name, x


def check_ndim(x, name: str, ndim: int, layout: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")


def check_shape(x, name: str, expected: tuple) -> None:
    if tuple(x.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(x.shape)}")


def lse_dtype(dtype: np.dtype) -> np.dtype:
    """``lse`` is float32, or float64 for float64 inputs (docs/contract.md, "Layout and names")."""
    return np.dtype(np.float64) if same_dtype(dtype, np.float64) else np.dtype(np.float32)


def check_lse(lse, geo: Geometry) -> None:
    if array_kind(lse) == "other":
        raise TypeError(f"lse must be a NumPy or CuPy array, got {type(lse).__name__}")
    if not same_dtype(lse.dtype, lse_dtype(geo.dtype)):
        raise TypeError(f"lse must have dtype {lse_dtype(geo.dtype)} for {geo.dtype} inputs, "
                        f"got {lse.dtype}")
    check_shape(lse, "lse", geo.lse_shape)


# ---------------------------------------------------------------------------------------
# Whole-call checks, one per family of ops
# ---------------------------------------------------------------------------------------

def _window_params(kernel_size, dilation, stride, border):
    kernel = to_pair(kernel_size, "kernel_size")
    return kernel, to_pair(dilation, "dilation"), to_pair(stride, "stride"), check_border(border)


def _split_heads(channels: int, heads: int, name: str) -> int:
    if channels % heads:
        raise ValueError(f"heads={heads} must divide the channels of {name}, got {channels}")
    return channels // heads


def qk_geometry(q, k, heads, kernel_size, dilation, stride, border, bias, rel, scale,
                default_scale=None, v=None, *, similarity="dot", key_bias=None) -> Geometry:
    """Check ``q``/``k`` (and ``v``, ``bias``, ``rel``, ``key_bias``) and describe the call.

    ``q``, ``k``: ``(B, heads*Dqk, H, W)``; ``v``: ``(B, heads*Dv, H, W)`` or ``None``;
    ``key_bias``: ``(B, heads, H, W)`` or ``None``.
    """
    kernel, dilation, stride, border = _window_params(kernel_size, dilation, stride, border)
    similarity = check_similarity(similarity, rel)
    heads = check_heads(heads)
    check_ndim(q, "q", 4, "(B, heads*Dqk, H, W)")
    check_shape(k, "k", q.shape) if k.ndim == 4 else check_ndim(k, "k", 4, "(B, heads*Dqk, H, W)")
    batch, channels, height, width = (int(s) for s in q.shape)
    dqk = _split_heads(channels, heads, "q")
    dv = 0
    if v is not None:
        check_ndim(v, "v", 4, "(B, heads*Dv, H, W)")
        if (v.shape[0], v.shape[2], v.shape[3]) != (batch, height, width):
            raise ValueError(f"v must have shape (B, heads*Dv, H, W) = ({batch}, heads*Dv, "
                             f"{height}, {width}) like q, got {tuple(v.shape)}")
        dv = _split_heads(int(v.shape[1]), heads, "v")
    check_window(height, width, kernel, dilation, border)
    if default_scale is None:
        default_scale = 1.0 / math.sqrt(dqk) if dqk else 1.0
    geo = Geometry(batch, heads, dqk, dv, height, width, kernel, dilation, stride, border,
                   check_scale(scale, default_scale), np.dtype(q.dtype).newbyteorder("="), similarity)
    if bias is not None:
        check_shape(bias, "bias", (heads, *geo.table_shape))
    if isinstance(rel, SplitRel):   # sasa2d's (checked in its names by sasa_embeddings)
        if dqk % 2:
            raise ValueError(f"a split rel needs an even Dqk, got Dqk={dqk}")
        check_shape(rel.rows, "rel.rows", (heads, dqk // 2, geo.table_shape[0]))
        check_shape(rel.cols, "rel.cols", (heads, dqk // 2, geo.table_shape[1]))
    elif rel is not None:
        check_shape(rel, "rel", (heads, dqk, *geo.table_shape))
    check_key_bias(key_bias, geo)
    return geo


def av_geometry(attn, v, kernel_size, dilation, stride, border) -> Geometry:
    """Check ``attn`` ``(B, heads, K, Ho, Wo)`` and ``v`` ``(B, heads*Dv, H, W)``."""
    kernel, dilation, stride, border = _window_params(kernel_size, dilation, stride, border)
    check_ndim(attn, "attn", 5, "(B, heads, kh*kw, Ho, Wo)")
    check_ndim(v, "v", 4, "(B, heads*Dv, H, W)")
    batch, heads = int(attn.shape[0]), int(attn.shape[1])
    if heads < 1:
        raise ValueError(f"attn must have at least one head, got shape {tuple(attn.shape)}")
    v_batch, channels, height, width = (int(s) for s in v.shape)
    if v_batch != batch:
        raise ValueError(f"v must have the batch of attn ({batch}), got shape {tuple(v.shape)}")
    if channels % heads:
        raise ValueError(f"attn's {heads} heads (attn.shape[1]) must divide the channels of v, "
                         f"got {channels}")
    dv = channels // heads
    check_window(height, width, kernel, dilation, border)
    geo = Geometry(batch, heads, 0, dv, height, width, kernel, dilation, stride, border,
                   1.0, np.dtype(v.dtype).newbyteorder("="))
    if int(attn.shape[2]) != geo.slots:
        check_shape(attn, "attn", geo.attn_shape)
    if tuple(attn.shape[3:]) != (geo.out_h, geo.out_w):
        # attn fixes (Ho, Wo) but not (H, W) (any of ``stride`` sizes give one Ho): the
        # message starts from v, whose size decides, and says what attn asks of it.
        raise ValueError(f"v must have (H, W) with (ceil(H/{stride[0]}), ceil(W/{stride[1]})) "
                         f"= attn's (Ho, Wo) {tuple(int(s) for s in attn.shape[3:])}, got "
                         f"v of shape {tuple(v.shape)}")
    return geo


def relation_heads(x, key, query, geometry, kernel_size, border) -> int:
    """Check ``local_relation2d``'s arrays in its own names; returns ``heads``.

    ``x`` ``(B, C, H, W)``; ``key``, ``query`` ``(B, heads, H, W)`` (one channel per head,
    ``heads`` dividing ``C``); ``geometry`` ``(heads, kh, kw)`` (``2k-1`` per axis with
    ``border="shift"``) or ``None``. The op then runs as ``local_attention2d`` with
    ``q=query``, ``k=key``, ``v=x``, ``bias=geometry``, whose checks would name those.
    """
    check_ndim(x, "x", 4, "(B, C, H, W)")
    check_ndim(key, "key", 4, "(B, C/m, H, W)")
    check_ndim(query, "query", 4, "(B, C/m, H, W)")
    batch, channels, height, width = (int(s) for s in x.shape)
    heads = int(key.shape[1])
    if heads < 1:
        raise ValueError(f"key must have at least one channel (one per head), got shape "
                         f"{tuple(key.shape)}")
    if (int(key.shape[0]), int(key.shape[2]), int(key.shape[3])) != (batch, height, width):
        raise ValueError(f"key must have shape (B, heads, H, W) = ({batch}, heads, {height}, "
                         f"{width}) like x, got {tuple(key.shape)}")
    check_shape(query, "query", (batch, heads, height, width))
    if channels % heads:
        raise ValueError(f"key's {heads} channels (one per head) must divide the channels of "
                         f"x, got {channels}")
    if geometry is not None:
        kernel, border = to_pair(kernel_size, "kernel_size"), check_border(border)
        check_shape(geometry, "geometry",
                    (heads, table_length(kernel[0], border), table_length(kernel[1], border)))
    return heads


def sasa_embeddings(arrays: dict, heads, kernel_size, border) -> tuple[int, int, int, int]:
    """Check ``sasa2d``'s arrays in its own names; returns ``(heads, Dqk/2, kh, kw)``.

    ``arrays`` holds ``q`` ``(B, heads*Dqk, H, W)`` (``Dqk`` even), ``rel_h``
    ``(heads, Dqk/2, kh)``, ``rel_w`` ``(heads, Dqk/2, kw)`` and the call's other arrays
    (dtypes checked together). The op then runs as ``local_attention2d`` with
    ``rel=SplitRel(rel_h, rel_w)``, whose checks would name neither: so they are checked here.
    """
    if border not in CENTRED_BORDERS:
        raise ValueError(f"sasa2d needs a centred border ('mask' or 'zeros'), got border={border!r}")
    check_arrays(arrays)
    q = arrays["q"]
    heads = check_heads(heads)
    check_ndim(q, "q", 4, "(B, heads*Dqk, H, W)")
    dqk = _split_heads(int(q.shape[1]), heads, "q")
    if dqk % 2:
        raise ValueError(f"sasa2d needs an even Dqk (half rows, half columns), got Dqk={dqk}")
    kh, kw = to_pair(kernel_size, "kernel_size")
    check_shape(arrays["rel_h"], "rel_h", (heads, dqk // 2, kh))
    check_shape(arrays["rel_w"], "rel_w", (heads, dqk // 2, kw))
    return heads, dqk // 2, kh, kw
