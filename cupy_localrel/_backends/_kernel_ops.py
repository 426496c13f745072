"""Launch code of the CUDA kernels, shared by the GPU (``cupy``) and CPU (``sim``) backends.

The kernels (``cupy_localrel/kernels/*.cu``) carry no border logic: the window tables of
:mod:`cupy_localrel._geometry` are packed into one small int32 buffer (:func:`_window_table`
on the host, ``localrel::Window`` on the device, same field order) uploaded once per
geometry (and device). This module only chooses kernels, block shapes and shared memory,
allocates results and launches; :class:`Target` hides the array module (NumPy standing in
for device memory on ``sim``, CuPy on ``cupy``).

Host path (what a call costs outside the kernels; tests/test_host_path.py counts it): one
read of the current device, no device-property query, no host synchronisation, no table
upload or compile after the first call of a geometry/device; allocations are the results
plus the scratch a kernel needs (``delta``, the dbias/drel block partials, the global work
arrays of very large windows), all ``empty`` except ``dq`` at stride > 1 (only window
centres have a query, the rest must read 0). Kernels, window tables, halo extents and the
float dummy standing in for absent pointers are cached per device.

Kernel choice (see the .cu files for what each does):

- fused forward: ``attention_forward_tiled`` (keys/values of a tile's halo staged in shared
  memory) when the stride is 1, the dtype is not float64 and the tile fits the shared
  memory a block may opt in to (48 KiB without opting in; Target.smem_optin);
  configuration ``<T, 1, 8>`` for LR-Net-like heads (Dqk <= 4: one key channel per
  stage, 8 value channels per thread, m = 8), ``<T, 16, 16>`` for SASA-like heads (Dqk, Dv
  16..64; ``<T, 8, 16>`` with a full rel table; TILED_CONFIGS). Otherwise
  ``attention_forward<T, 8>`` (online softmax, one thread per query and 8 value channels).
- fused backward: ``query_grad<T, 0>`` (delta, dq, dbias/drel partials) then
  ``key_grad<T, 0>`` (dk, dv gathered through the users tables), then ``table_reduce``
  (dbias/drel in a fixed order). Fast paths ``query_grad_tiled<T, CK, CV>`` and
  ``key_grad_tiled<T, CK, CV>`` under the forward's conditions and configurations. For
  windows so large that not even a warp's work arrays fit shared memory, ``query_grad``
  and ``key_grad`` keep them in a global scratch buffer (at most SCRATCH_LIMIT per launch).
- ``local_qk2d``/``local_av2d``: one general kernel each way (``qk_forward``, ``av_forward``;
  ``query_grad<T, 1>`` + ``key_grad<T, 1>``; ``av_dattn`` + ``key_grad<T, 2>``).
- ``rel`` as a :class:`~cupy_localrel._geometry.SplitRel` (``sasa2d``): flag HAS_REL_SPLIT,
  its two arrays as the kernels' ``rel``/``rel_w`` pointers (:func:`_rel_args`); the
  query-side fast paths add its ``kh + kw`` short dot products per query outside their hot
  loop. ``drel``: the full table's block partials and ``table_reduce`` as for a full ``rel``,
  then summed per axis (:func:`_rel_grad`).
- similarity functions other than the dot product, and ``key_bias``, run the general kernels
  (the similarity is their last template parameter, ``<..., SIM>``, omitted for the dot
  product, whose instantiations keep their names and code); the fast paths serve the dot
  product without ``key_bias``.
"""
from __future__ import annotations

import functools
import threading

import numpy as np

from .. import _geometry as G
from .. import _loader
from .._geometry import SIMILARITIES, Geometry, lse_dtype

FORWARD_FILE, BACKWARD_FILE = "local_forward.cu", "local_backward.cu"
SMEM_LIMIT = 48 * 1024          # dynamic shared memory usable without opting in
# The fast paths opt in to more (cudaFuncSetAttribute through CuPy's
# max_dynamic_shared_size_bytes) up to the device's cudaDevAttrMaxSharedMemoryPerBlockOptin;
# sim stands for the smallest of the NVRTC targets, sm_80 (sm_90 allows 227 KiB).
SIM_SMEM_OPTIN = 163 * 1024
CUDA_ATTR_SMEM_OPTIN = 97       # cudaDevAttrMaxSharedMemoryPerBlockOptin
SCRATCH_LIMIT = 256 * 2**20     # global scratch of one launch, for windows too large for it
WARP = 32
MAX_THREADS = 128               # LOCALREL_THREADS: the kernels' __launch_bounds__
VPT = 8                         # value channels per thread of the general kernels
# (CK, CV) of each *_tiled kernel: key (query) channels per staged chunk, value (grad_out)
# channels per chunk, per head layout. SASA's forward and key side take 16 key channels a
# chunk: half the passes over the slots (users) of 8, each of which reloads and stores the
# per-slot sums; its query side keeps 8 (at 16, its dq loop's code doubles for a modelled
# +13%). With a full rel table, every key chunk stages that many channels of it too: 8
# keep the tables' shared memory where it was (k = 13 still fits sm_80).
TILED_CONFIGS = {
    "lrnet": {"attention_forward_tiled": (1, 8), "query_grad_tiled": (1, 8), "key_grad_tiled": (1, 8)},
    "sasa": {"attention_forward_tiled": (16, 16), "query_grad_tiled": (8, 16), "key_grad_tiled": (16, 16)},
    "full_rel": {"attention_forward_tiled": (8, 16), "query_grad_tiled": (8, 16), "key_grad_tiled": (8, 16)},
}
TILED_BLOCK = (16, 8)           # (x: columns, y: rows) of the fast path's query tile
# The backward fast path's tiles, largest first: each kernel takes the first whose plan fits
# the device's shared memory (two [K][tile] arrays per block; 16 x 8 halves the halo
# staging per output of 16 x 4, and k = 13 on sm_80 falls back to 16 x 4).
TILED_BWD_BLOCKS = ((16, 8), (16, 4))
REDUCE_RUN, REDUCE_SEGMENTS = 8, 16   # table_reduce's block: kReduceRun x kReduceSegments
TABLE_CHANNELS = 8              # kTableChannels of query_grad_tiled: query rows per drel pass
SPLIT_DREL_CHANNELS = 8         # kSplitDrelChannels of query_grad_tiled (split rel's drel)
HAS_BIAS, HAS_REL, HAS_KEY_BIAS, HAS_REL_SPLIT = 1, 2, 4, 8   # localrel::Flags
MODE_ATTENTION, MODE_QK, MODE_AV = 0, 1, 2   # Mode in local_backward.cu

_CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double"}
_HEADER_INTS = 32   # localrel::kHeaderInts


# ---------------------------------------------------------------------------------------
# Where the kernels run
# ---------------------------------------------------------------------------------------

class Target:
    """The array module and kernel loader of one backend (``"sim"`` or ``"cupy"``)."""

    def __init__(self, name: str):
        self.name = name
        self._modules: dict = {}
        self._functions: dict = {}
        self._tables: dict = {}
        self._dummies: dict = {}
        self._optin: dict = {}       # device -> opt-in shared memory limit per block
        self._raised: set = set()    # (device, kernel name) whose shared memory limit is raised
        self._lock = threading.Lock()

    @property
    def xp(self):
        if self.name == "cupy":
            import cupy
            return cupy
        return np

    def device_key(self):
        """The current CUDA device's id (``None`` on ``sim``): the key of the per-device caches."""
        return self.xp.cuda.Device().id if self.name == "cupy" else None

    def function(self, filename: str, name: str, device=None):
        """The compiled kernel ``name`` of ``filename`` (every registered instantiation of
        the file is built together, once per device: one g++/NVRTC run per file). Kernels
        are cached too: a launch looks up nothing on the device. ``device``: a
        :meth:`device_key` the caller already read."""
        device = self.device_key() if device is None else device
        kernel = self._functions.get((device, filename, name))
        if kernel is not None:
            return kernel
        key = (device, filename)
        with self._lock:
            module = self._modules.get(key)
        if module is None:
            module = _loader.load_module(filename, _loader.INSTANTIATIONS[filename], target=self.name)
            with self._lock:
                module = self._modules.setdefault(key, module)
        kernel = module.get_function(name)
        with self._lock:
            return self._functions.setdefault((device, filename, name), kernel)

    def dummy(self, dtype: np.dtype, device=None):
        """A 1-element array of ``dtype`` (zero), cached per device: what the kernels get
        for the accumulator pointers they do not use in a launch (never written)."""
        key = (self.device_key() if device is None else device, np.dtype(dtype))
        array = self._dummies.get(key)
        if array is None:
            with self._lock:
                array = self._dummies.setdefault(key, self.xp.zeros(1, dtype))
        return array

    def upload(self, host: np.ndarray):
        if self.name != "cupy":
            return host
        device = self.xp.asarray(host)
        # Cached tables are read later from any stream: let the copy finish first (once).
        self.xp.cuda.get_current_stream().synchronize()
        return device

    def smem_optin(self, device) -> int:
        """The most dynamic shared memory a block may opt in to on ``device``: queried once
        per device, and only by a plan that needs more than SMEM_LIMIT."""
        limit = self._optin.get(device)
        if limit is None:
            if self.name == "cupy":
                limit = int(self.xp.cuda.runtime.deviceGetAttribute(CUDA_ATTR_SMEM_OPTIN, device))
            else:
                limit = SIM_SMEM_OPTIN
            with self._lock:
                limit = self._optin.setdefault(device, max(SMEM_LIMIT, limit))
        return limit

    def allow_smem(self, kernel, name: str, device, smem: int):
        """Before a launch with ``smem`` bytes of dynamic shared memory: above SMEM_LIMIT, raise
        the kernel's limit to the device's opt-in limit (once per kernel and device)."""
        if smem > SMEM_LIMIT and (device, name) not in self._raised:
            kernel.max_dynamic_shared_size_bytes = self.smem_optin(device)
            with self._lock:
                self._raised.add((device, name))

    def window(self, geo: Geometry, device=None):
        """The geometry buffer of ``geo`` on this target, cached per geometry and device."""
        device = self.device_key() if device is None else device
        key = (device, geo.height, geo.width, geo.kernel, geo.dilation, geo.stride, geo.border)
        with self._lock:
            table = self._tables.get(key)
        if table is None:
            table = self.upload(_window_table(geo))
            with self._lock:
                if len(self._tables) > 256:   # bound the cache; geometries are cheap to rebuild
                    self._drop_tables()
                table = self._tables.setdefault(key, table)
        return table

    def _drop_tables(self):
        """Forget the cached tables. On the GPU a kernel queued on another stream may still
        read one, and a freed table could be reused by the memory pool at once: wait for
        every device that holds tables first."""
        if self.name == "cupy":
            for device in {key[0] for key in self._tables}:
                self.xp.cuda.Device(device).synchronize()
        self._tables.clear()

    def contiguous(self, x):
        """A C-contiguous array with x's values (x itself when it already is; never modified);
        a SplitRel of two such arrays."""
        if isinstance(x, G.SplitRel):
            return G.SplitRel(*map(self.contiguous, x))
        return None if x is None else self.xp.ascontiguousarray(x)


def _window_table(geo: Geometry) -> np.ndarray:
    """Header (localrel::WindowField order) followed by the tables, all int32."""
    rows, cols = geo.rows, geo.cols
    (ru_out, ru_slot), (cu_out, cu_slot) = rows.users, cols.users
    parts = [rows.pos, rows.table, cols.pos, cols.table, ru_out, ru_slot, cu_out, cu_slot]
    offsets, at = [], _HEADER_INTS
    for part in parts:
        offsets.append(at)
        at += part.size
    th, tw = geo.table_shape
    header = [geo.height, geo.width, geo.out_h, geo.out_w, geo.kernel[0], geo.kernel[1],
              geo.stride[0], geo.stride[1], ru_out.shape[1], cu_out.shape[1], th, tw,
              int(geo.border == "zeros"), *offsets]
    head = np.zeros(_HEADER_INTS, np.int32)
    head[:len(header)] = header
    return np.concatenate([head] + [np.ascontiguousarray(p, np.int32).ravel() for p in parts])


# ---------------------------------------------------------------------------------------
# Launch shapes
# ---------------------------------------------------------------------------------------

def _pow2_at_least(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _plane_block(rows: int, cols: int, threads: int = MAX_THREADS) -> tuple[int, int]:
    """(x, y) block over a rows x cols plane: up to 32 threads along the contiguous axis."""
    bx = min(32, _pow2_at_least(cols), threads)
    by = max(1, min(threads // bx, _pow2_at_least(rows)))
    return bx, by


def _tiles(rows: int, cols: int, block: tuple[int, int]) -> int:
    return -(-rows // block[1]) * -(-cols // block[0])


def _grid(planes: int, rows: int, cols: int, block) -> tuple[int, int, int]:
    blocks = planes * _tiles(rows, cols, block)
    if blocks > 2**31 - 1:
        raise ValueError(f"problem too large for one launch ({blocks} blocks)")
    return (blocks, 1, 1)


def _work_arrays_plan(rows: int, cols: int, bytes_for) -> tuple[tuple[int, int], int, int]:
    """Block shape of query_grad/key_grad and where their per-block work arrays live.

    Returns ``(block, shared_bytes, scratch_bytes_per_block)``: the largest power-of-two
    block (<= MAX_THREADS, >= a warp) whose arrays fit SMEM_LIMIT of shared memory; or, for
    windows so large (K of hundreds) that not even a warp fits, a warp-sized block with its
    arrays in global scratch (``block_scratch`` in local_backward.cu). Any window size runs.
    """
    threads = MAX_THREADS
    while threads >= WARP:
        block = _plane_block(rows, cols, threads)
        if bytes_for(block) <= SMEM_LIMIT:
            return block, bytes_for(block), 0
        threads //= 2
    block = _plane_block(rows, cols, WARP)
    return block, 0, bytes_for(block)


def _launch_work(c: "_Call", kernel, rows: int, cols: int, block, args: tuple,
                 shared_bytes: int, scratch_bytes: int) -> None:
    """Launch query_grad/key_grad over ``c.planes`` planes of ``rows x cols``: once with the
    work arrays in shared memory, or in as many launches (``first_block``) as keep the global
    scratch under SCRATCH_LIMIT."""
    blocks = _grid(c.planes, rows, cols, block)[0]
    if not scratch_bytes:
        kernel((blocks, 1, 1), block, args + (c.acc_dummy, np.int64(0), np.int32(0)),
               shared_mem=shared_bytes)
        return
    per_block = -(-scratch_bytes // c.acc.itemsize)          # in accumulator elements
    group = max(1, min(blocks, SCRATCH_LIMIT // (per_block * c.acc.itemsize)))
    scratch = c.t.xp.empty(group * per_block, c.acc)
    for first in range(0, blocks, group):
        kernel((min(group, blocks - first), 1, 1), block,
               args + (scratch, np.int64(per_block), np.int32(first)))


@functools.lru_cache(maxsize=1024)
def _halo_extent(length: int, kernel: int, dilation: int, stride: int, border: str,
                 table: str, tile: int) -> int:
    """Largest span of valid positions in ``tile`` consecutive rows of one axis's ``table``
    (``"pos"``: the inputs a tile of outputs looks at; ``"users"``: the outputs that use a
    tile of inputs). Pure geometry, so cached by the axis's parameters."""
    window = G.axis_window(length, kernel, dilation, stride, border)
    return _compute_halo_extent(window.pos if table == "pos" else window.users[0], tile)


def _compute_halo_extent(pos: np.ndarray, tile: int) -> int:
    lo = np.where(pos >= 0, pos, np.iinfo(np.int32).max).min(axis=1)
    hi = pos.max(axis=1)
    extent = 0
    for start in range(0, len(pos), tile):
        extent = max(extent, int(hi[start:start + tile].max()) - int(lo[start:start + tile].min()) + 1)
    return extent


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------

class _Call:
    """Per-call scalars and dummies in the kernels' parameter types."""

    def __init__(self, target: Target, geo: Geometry, bias=None, rel=None, key_bias=None):
        self.t, self.geo = target, geo
        self.ctype = _CTYPE[geo.dtype.name]
        self.acc = lse_dtype(geo.dtype)           # float32, or float64 for float64 inputs
        self.scale = self.acc.type(geo.scale)
        self.flags = np.int32((HAS_BIAS if bias is not None else 0) | _rel_flag(rel)
                              | (HAS_KEY_BIAS if key_bias is not None else 0))
        # localrel::Similarity; the fast paths exist for the dot product without key_bias.
        self.sim = SIMILARITIES.index(geo.similarity)
        self.fast = self.sim == 0 and key_bias is None
        self.heads, self.dqk, self.dv = np.int32(geo.heads), np.int32(geo.dqk), np.int32(geo.dv)
        self.planes = geo.batch * geo.heads
        self.device = target.device_key()         # read once per call
        self.win = target.window(geo, self.device)
        self.acc_dummy = target.dummy(self.acc, self.device)

    def fn(self, filename, template, *params):
        inner = ", ".join([self.ctype, *map(str, params)])
        return self.t.function(filename, f"{template}<{inner}>", self.device)

    def fn_smem(self, smem: int, filename, template, *params):
        """:meth:`fn`, allowed ``smem`` bytes of dynamic shared memory (opting in above 48 KiB)."""
        kernel = self.fn(filename, template, *params)
        self.t.allow_smem(kernel, f"{filename}:{template}<{self.ctype}, {params}>", self.device, smem)
        return kernel

    def query_grad_buffer(self, shape):
        """``dq``: at stride 1 every pixel is a window centre and query_grad writes it, so
        it needs no memset; at stride > 1 only the centres are written, the rest reads 0."""
        allocate = self.t.xp.empty if self.geo.stride == (1, 1) else self.t.xp.zeros
        return allocate(shape, self.geo.dtype)

    def fn_sim(self, filename, template, *params):
        """A kernel whose last template parameter is the similarity (default: the dot product,
        left out of the name, so the dot instantiations keep theirs)."""
        return self.fn(filename, template, *params, *((self.sim,) if self.sim else ()))


def _or(x, fallback):
    """Kernels take a pointer for every optional input; a flag says whether it is read."""
    return fallback if x is None else x


def _rel_flag(rel) -> int:
    """localrel::Flags of ``rel``: the full table, SASA's split form, or none."""
    if rel is None:
        return 0
    return HAS_REL_SPLIT if isinstance(rel, G.SplitRel) else HAS_REL


def _rel_args(rel, fallback) -> tuple:
    """The kernels' ``(rel, rel_w)`` pointers: the full table and ``fallback``, or the split
    form's ``rows`` and ``cols`` (localrel::RelOfHead), or ``fallback`` twice."""
    if isinstance(rel, G.SplitRel):
        return tuple(rel)
    return _or(rel, fallback), fallback


def _rel_grad(c: "_Call", rel, part_rel, tiles: int):
    """``drel`` from the blocks' partials of the full table (heads, Dqk, th, tw): summed over
    its rows/columns into a SplitRel when ``rel`` is one (a reduction of the gradient; the
    kernels never see a full table for it)."""
    geo = c.geo
    full = _table_reduce(c, part_rel, (geo.heads, geo.dqk, *geo.table_shape), tiles,
                         geo.dqk * geo.table_shape[0] * geo.table_shape[1])
    return G.SplitRel.from_full_grad(full) if isinstance(rel, G.SplitRel) else full


def _split_rel_grad(c: "_Call", part_rel, tiles: int):
    """A split rel's ``drel`` from query_grad_tiled's partials (per block: rows ``(Dqk/2,
    th)``, then columns ``(Dqk/2, tw)``), reduced over the blocks by one launch into the two
    gradients."""
    geo = c.geo
    half, (th, tw) = geo.dqk // 2, geo.table_shape
    return G.SplitRel(*_table_reduce(c, part_rel, (geo.heads, half, th), tiles, half * (th + tw),
                                     (geo.heads, half, tw)))


# ---------------------------------------------------------------------------------------
# The backend function set (see cupy_localrel/_backends/__init__.py)
# ---------------------------------------------------------------------------------------

def qk_forward(t: Target, geo: Geometry, q, k, bias, rel, key_bias=None):
    q, k, bias, rel, key_bias = map(t.contiguous, (q, k, bias, rel, key_bias))
    c = _Call(t, geo, bias, rel, key_bias)
    logits = t.xp.empty(geo.attn_shape, geo.dtype)
    block = _plane_block(geo.out_h, geo.out_w)
    c.fn_sim(FORWARD_FILE, "qk_forward")(
        _grid(c.planes, geo.out_h, geo.out_w, block), block,
        (c.win, q, k, _or(bias, q), *_rel_args(rel, q), _or(key_bias, q), logits, c.heads, c.dqk,
         c.flags, c.scale))
    return logits


def av_forward(t: Target, geo: Geometry, attn, v):
    attn, v = t.contiguous(attn), t.contiguous(v)
    c = _Call(t, geo)
    out = t.xp.empty(geo.out_shape, geo.dtype)
    if geo.dv == 0:
        return out
    chunks = -(-geo.dv // VPT)
    block = _plane_block(geo.out_h, geo.out_w)
    c.fn(FORWARD_FILE, "av_forward", VPT)(
        _grid(c.planes * chunks, geo.out_h, geo.out_w, block), block,
        (c.win, attn, v, out, c.dv, np.int32(chunks)))
    return out


def _tiled_plan(geo: Geometry, c: _Call, kernel: str, block, table: str, before_halo: int, after_halo: int):
    """(CK, CV, shared bytes, halo_h, halo_w) of the fast-path kernel ``kernel`` (a key of
    TILED_CONFIGS' layouts), or None where it does not apply.

    Fast paths need stride 1 (a query sits at its output's position, halos stay small), skip
    float64 (twice the shared memory for little use), serve the dot product without
    ``key_bias`` only (``c.fast``) and must fit the shared memory a block may opt in to on
    the device (Target.smem_optin; SMEM_LIMIT needs no opt-in). The halo is
    the largest span of the (-1 padded) ``table`` (``"pos"`` or ``"users"``, see
    :func:`_halo_extent`) over ``block`` consecutive rows/columns; ``before_halo`` and
    ``after_halo`` are the kernel's other shared bytes, before and after the staging buffer,
    which starts at the next 16-byte boundary (localrel::align16: its wide loads). A full
    rel table is staged a chunk of CK channels x th*tw entries at a time next to the halo; a
    split rel once per block, in the kernels' ``after_halo`` bytes (_split_rel_head_floats).
    """
    if geo.stride != (1, 1) or geo.dtype == np.float64 or not c.fast:
        return None
    # Split rel only on the CK > 1 configuration (localrel::tiled_flags): LR-Net's kernels
    # compile without it.
    layout = "lrnet" if geo.dqk <= 4 and not c.flags & HAS_REL_SPLIT else \
        "full_rel" if c.flags & HAS_REL else "sasa"
    ck, cv = TILED_CONFIGS[layout][kernel]
    halo_h, halo_w = (_halo_extent(length, k, d, st, geo.border, table, tile) for length, k, d, st, tile
                      in zip((geo.height, geo.width), geo.kernel, geo.dilation, geo.stride,
                             (block[1], block[0])))
    staging = max(ck, cv) * halo_h * halo_w   # localrel::staging_floats: rel chunk after CK channels
    if c.flags & HAS_REL:
        staging = max(staging, ck * (halo_h * halo_w + geo.table_shape[0] * geo.table_shape[1]))
    smem = -(-before_halo // 16) * 16 + c.acc.itemsize * staging + after_halo
    if smem > SMEM_LIMIT and smem > c.t.smem_optin(c.device):   # query the device only if needed
        return None
    return ck, cv, smem, halo_h, halo_w


def _tiled_config(geo: Geometry, c: _Call):
    """Plan of attention_forward_tiled: logits/weights [K][tile], the per-tile tables and
    (split rel) the short dot products' terms [kh + kw][tile]."""
    bx, by = TILED_BLOCK
    return _tiled_plan(geo, c, "attention_forward_tiled", TILED_BLOCK, "pos",
                       c.acc.itemsize * geo.slots * bx * by, c.acc.itemsize * _split_rel_floats(geo, c, bx * by)
                       + _tile_tables(geo.kernel, TILED_BLOCK))


def _split_rel_floats(geo: Geometry, c: _Call, stride: int) -> int:
    """localrel::split_rel_floats: the query-side tiled kernels' [kh + kw][stride] terms of
    a split rel (its short dot products, then dlogit's row/column sums; stride: the tile, or
    tile + 1 in query_grad_tiled) and the head's rel_h and rel_w staged next to them, else 0."""
    if not c.flags & HAS_REL_SPLIT:
        return 0
    return sum(geo.kernel) * stride + _split_rel_head_floats(geo, c)


def _split_rel_head_floats(geo: Geometry, c: _Call) -> int:
    """localrel::split_rel_head_floats: one head's rel_h and rel_w staged in shared memory."""
    return geo.dqk // 2 * sum(geo.table_shape) if c.flags & HAS_REL_SPLIT else 0


def _tile_tables(slots: tuple[int, int], block) -> int:
    """Bytes of a tiled kernel's per-tile tables (offset and table index per slot, per axis)."""
    return 4 * 2 * (slots[0] * block[1] + slots[1] * block[0])


def attention_forward(t: Target, geo: Geometry, q, k, v, bias, rel, key_bias=None, *,
                      allow_tiled=True):
    q, k, v, bias, rel, key_bias = map(t.contiguous, (q, k, v, bias, rel, key_bias))
    c = _Call(t, geo, bias, rel, key_bias)
    out = t.xp.empty(geo.out_shape, geo.dtype)
    lse = t.xp.empty(geo.lse_shape, c.acc)
    inputs = (c.win, q, k, v, _or(bias, q), *_rel_args(rel, q))
    results = (out, lse, c.heads, c.dqk, c.dv)
    tiled = _tiled_config(geo, c) if allow_tiled else None
    if tiled is not None:
        ck, cv, smem, halo_h, halo_w = tiled
        c.fn_smem(smem, FORWARD_FILE, "attention_forward_tiled", ck, cv)(
            _grid(c.planes, geo.out_h, geo.out_w, TILED_BLOCK), TILED_BLOCK,
            inputs + results + (c.flags, c.scale, np.int32(halo_h), np.int32(halo_w)),
            shared_mem=smem)
    else:
        chunks = max(1, -(-geo.dv // VPT))   # Dv == 0: one chunk still writes lse
        block = _plane_block(geo.out_h, geo.out_w)
        c.fn_sim(FORWARD_FILE, "attention_forward", VPT)(
            _grid(c.planes * chunks, geo.out_h, geo.out_w, block), block,
            inputs + (_or(key_bias, q),) + results + (np.int32(chunks), c.flags, c.scale))
    return out, lse


def _query_grad(c: _Call, mode: int, grad, q, k, v, lse, bias, rel, dq, delta, key_bias=None, *,
                allow_tiled=True):
    """Launch query_grad (or its fast path); returns (dbias, drel) after the table reduction."""
    geo, xp = c.geo, c.t.xp
    th, tw = geo.table_shape
    acc = c.acc.itemsize
    tables = lambda block: 4 * (block[1] * th + block[0] * tw)   # noqa: E731  row_slot, col_slot
    tiled = _tiled_backward_config(geo, c, tables) if allow_tiled and mode == MODE_ATTENTION else None
    if tiled is not None:
        block, (ck, cv, smem_bytes, halo_h, halo_w) = tiled
        kernel = c.fn_smem(smem_bytes, BACKWARD_FILE, "query_grad_tiled", ck, cv)
        extra = (np.int32(halo_h), np.int32(halo_w))
    else:
        arrays = 2 * geo.slots if mode == MODE_ATTENTION else geo.slots   # dlogit (and weight)

        def smem(block):   # [K][tile] arrays and qs[tile] (A), row_slot and col_slot (int)
            return acc * (arrays + 1) * block[0] * block[1] + tables(block)

        block, smem_bytes, scratch_bytes = _work_arrays_plan(geo.out_h, geo.out_w, smem)
        kernel = c.fn_sim(BACKWARD_FILE, "query_grad", mode)
    tiles = _tiles(geo.out_h, geo.out_w, block)
    blocks = c.planes * tiles
    part_bias = xp.empty(blocks * th * tw, c.acc) if bias is not None else c.acc_dummy
    # query_grad_tiled sums a split rel's partials per table row and column itself
    # (split_rel_partials); the other kernels write the full table's.
    split_partials = tiled is not None and bool(c.flags & HAS_REL_SPLIT)
    rel_entries = geo.dqk // 2 * (th + tw) if split_partials else geo.dqk * th * tw
    part_rel = xp.empty(blocks * rel_entries, c.acc) if rel is not None else c.acc_dummy
    inputs = (c.win, grad, q, k, _or(v, q), _or(lse, c.acc_dummy), _or(bias, q), *_rel_args(rel, q))
    results = (dq, _or(delta, c.acc_dummy), part_bias, part_rel, c.heads, c.dqk, c.dv,
               c.flags, c.scale)
    if tiled is not None:
        kernel(_grid(c.planes, geo.out_h, geo.out_w, block), block, inputs + results + extra,
               shared_mem=smem_bytes)
    else:
        _launch_work(c, kernel, geo.out_h, geo.out_w, block,
                     inputs + (_or(key_bias, q),) + results, smem_bytes, scratch_bytes)
    dbias = None if bias is None else _table_reduce(c, part_bias, bias.shape, tiles, th * tw)
    if rel is None:
        drel = None
    elif split_partials:
        drel = _split_rel_grad(c, part_rel, tiles)
    else:
        drel = _rel_grad(c, rel, part_rel, tiles)
    return dbias, drel


def _first_fitting_block(plan_of):
    """(block, plan) of the first of TILED_BWD_BLOCKS whose plan ``plan_of(block)`` fits, or None."""
    for block in TILED_BWD_BLOCKS:
        plan = plan_of(block)
        if plan is not None:
            return block, plan
    return None


def _tiled_backward_config(geo: Geometry, c: _Call, tables):
    """(block, plan) of query_grad_tiled: dlogit and dp [K][tile + 1] (the + 1 spreads the
    table sums' reads over the banks), the query rows for the drel partials (TABLE_CHANNELS
    x tile, or split rel's 2 SPLIT_DREL_CHANNELS + 1 per output), split rel's terms and
    staged rel_h/rel_w, inverse and per-tile tables."""
    # localrel query_rows_floats: the tile's queries for the drel partials
    query_rows = 2 * SPLIT_DREL_CHANNELS + 1 if c.flags & HAS_REL_SPLIT else TABLE_CHANNELS

    def plan(block):
        tile = block[0] * block[1]
        after = c.acc.itemsize * (query_rows * tile + _split_rel_floats(geo, c, tile + 1)) \
            + tables(block) + _tile_tables(geo.kernel, block)
        return _tiled_plan(geo, c, "query_grad_tiled", block, "pos", c.acc.itemsize * 2 * geo.slots * (tile + 1),
                           after)
    return _first_fitting_block(plan)


def _table_reduce(c: _Call, part, shape, tiles: int, entries: int, shape2=None):
    """Sum the blocks' partials (``entries`` per block) into ``shape``; with ``shape2``, each
    head's entries past ``shape``'s go to a second result (split rel: rows, then columns)."""
    dst = c.t.xp.empty(shape, c.geo.dtype)
    dst2 = dst if shape2 is None else c.t.xp.empty(shape2, c.geo.dtype)
    split = entries if shape2 is None else int(np.prod(shape[1:]))   # entries of dst per head
    total = c.geo.heads * entries
    if total:   # block: REDUCE_RUN outputs x REDUCE_SEGMENTS segments of the partials
        c.fn(BACKWARD_FILE, "table_reduce")(
            (-(-total // REDUCE_RUN), 1, 1), (REDUCE_RUN, REDUCE_SEGMENTS, 1),
            (part, dst, dst2, np.int32(c.geo.batch), c.heads, np.int32(tiles), np.int32(entries),
             np.int32(split)))
    return dst if shape2 is None else (dst, dst2)


def _key_grad(c: _Call, mode: int, grad, q, k, v, attn, lse, delta, bias, rel, dk, dv,
              key_bias=None, dkey_bias=None, *, allow_tiled=True):
    """Launch key_grad (or its fast path): dk, dv and (with ``key_bias``) ``dkey_bias``.
    ``rel``: the kernels' ``(rel, rel_w)`` pointer pair (:func:`_rel_args`)."""
    geo = c.geo
    tiled = _tiled_key_config(geo, c) if allow_tiled and mode == MODE_ATTENTION else None
    common = (c.win, grad, q, k, v)
    scalars = (c.heads, c.dqk, c.dv, c.flags, c.scale)
    if tiled is not None:
        block, (ck, cv, smem_bytes, halo_h, halo_w) = tiled
        c.fn_smem(smem_bytes, BACKWARD_FILE, "key_grad_tiled", ck, cv)(
            _grid(c.planes, geo.height, geo.width, block), block,
            common + (lse, delta, bias, *rel, dk, dv) + scalars + (np.int32(halo_h), np.int32(halo_w)),
            shared_mem=smem_bytes)
        return
    per_user = (2 if mode == MODE_ATTENTION else 1) * c.acc.itemsize   # weight and/or logit grad

    def smem(block):
        return _users(geo) * block[0] * block[1] * per_user

    block, smem_bytes, scratch_bytes = _work_arrays_plan(geo.height, geo.width, smem)
    # kAV does not depend on the similarity: its one instantiation per dtype is the default's.
    kernel = c.fn_sim(BACKWARD_FILE, "key_grad", mode) if mode != MODE_AV else \
        c.fn(BACKWARD_FILE, "key_grad", mode)
    _launch_work(c, kernel, geo.height, geo.width, block,
                 common + (attn, lse, delta, bias, *rel, _or(key_bias, q), dk, dv, _or(dkey_bias, dk))
                 + scalars, smem_bytes, scratch_bytes)


def _users(geo: Geometry) -> int:
    """Most (output, slot) pairs that look at one input pixel: row users x column users."""
    return geo.rows.users[0].shape[1] * geo.cols.users[0].shape[1]


def _tiled_key_config(geo: Geometry, c: _Call):
    """(block, plan) of key_grad_tiled: weights and logit gradients [U][tile], per-tile users
    tables.

    The halo is the rectangle of outputs using the tile's keys (spanned by the users tables);
    with stride 1 their queries sit at the same positions, so one rectangle serves both.
    """
    (rows_users, _), (cols_users, _) = geo.rows.users, geo.cols.users
    return _first_fitting_block(lambda block: _tiled_plan(
        geo, c, "key_grad_tiled", block, "users", c.acc.itemsize * 2 * _users(geo) * block[0] * block[1],
        c.acc.itemsize * _split_rel_head_floats(geo, c)
        + _tile_tables((rows_users.shape[1], cols_users.shape[1]), block)))


def _key_bias_grad(t: Target, geo: Geometry, key_bias):
    """The ``key_bias`` gradient buffer (every pixel written by key_grad), or ``None``."""
    return None if key_bias is None else t.xp.empty(key_bias.shape, geo.dtype)


def qk_backward(t: Target, geo: Geometry, grad_logits, q, k, bias, rel, key_bias=None):
    grad_logits, q, k, bias, rel, key_bias = map(t.contiguous, (grad_logits, q, k, bias, rel, key_bias))
    c = _Call(t, geo, bias, rel, key_bias)
    dq = c.query_grad_buffer(q.shape)       # only window centres have a query (stride > 1)
    dk = t.xp.empty(k.shape, geo.dtype)     # every key pixel is written
    dkey_bias = _key_bias_grad(t, geo, key_bias)
    dbias, drel = _query_grad(c, MODE_QK, grad_logits, q, k, None, None, bias, rel, dq, None,
                              key_bias)
    if geo.dqk or key_bias is not None:
        _key_grad(c, MODE_QK, grad_logits, q, k, q, q, c.acc_dummy, c.acc_dummy, _or(bias, q),
                  _rel_args(rel, q), dk, q, key_bias, dkey_bias)
    return dq, dk, dbias, drel, dkey_bias


def av_backward(t: Target, geo: Geometry, grad_out, attn, v):
    grad_out, attn, v = map(t.contiguous, (grad_out, attn, v))
    c = _Call(t, geo)
    dattn = t.xp.empty(attn.shape, geo.dtype)
    dv = t.xp.empty(v.shape, geo.dtype)
    block = _plane_block(geo.out_h, geo.out_w)
    c.fn(BACKWARD_FILE, "av_dattn")(
        _grid(c.planes, geo.out_h, geo.out_w, block), block, (c.win, grad_out, v, dattn, c.dv))
    if geo.dv:
        _key_grad(c, MODE_AV, grad_out, v, v, v, attn, c.acc_dummy, c.acc_dummy, v, (v, v), v, dv)
    return dattn, dv


def attention_backward(t: Target, geo: Geometry, grad_out, q, k, v, out, lse, bias, rel,
                       key_bias=None, *, allow_tiled=True):
    # `out` is not read: delta = sum_t p_t dp_t comes from the recomputed weights (as in the
    # reference), not from grad_out . out with `out` rounded to the input dtype.
    grad_out, q, k, v, lse, bias, rel, key_bias = map(
        t.contiguous, (grad_out, q, k, v, lse, bias, rel, key_bias))
    c = _Call(t, geo, bias, rel, key_bias)
    dq = c.query_grad_buffer(q.shape)
    dk, dv = t.xp.empty(k.shape, geo.dtype), t.xp.empty(v.shape, geo.dtype)
    dkey_bias = _key_bias_grad(t, geo, key_bias)
    delta = t.xp.empty(geo.lse_shape, c.acc)   # sum_t p_t dp_t per query (lse-sized)
    dbias, drel = _query_grad(c, MODE_ATTENTION, grad_out, q, k, v, lse, bias, rel, dq, delta,
                              key_bias, allow_tiled=allow_tiled)
    if geo.dqk or geo.dv or key_bias is not None:
        _key_grad(c, MODE_ATTENTION, grad_out, q, k, v, q, lse, delta, _or(bias, q), _rel_args(rel, q), dk, dv,
                  key_bias, dkey_bias, allow_tiled=allow_tiled)
    return dq, dk, dv, dbias, drel, dkey_bias
