"""Profile mode of the CPU engine: memory-traffic counters per launch and per source line.

A module built with ``engine.build(..., profile=True)`` (or ``CUPY_LOCALREL_SIM_PROFILE=1``)
counts every load and store its kernels make (profile_rt.cc); each launch appends a
:class:`LaunchCounters` to ``module.launches``. Counts are per warp-level request:

- global memory (addresses inside the launch's array arguments): requests, 32-byte sectors
  touched, ideal sectors ``ceil(distinct bytes / 32)``, bytes requested; per launch also the
  distinct bytes and sectors of each buffer (a DRAM-traffic proxy; all sectors are L2 traffic);
- shared memory: requests, bank wavefronts (the most distinct 4-byte words that fall into one
  of the 32 banks; a broadcast costs 1), ideal wavefronts ``max(1, ceil(distinct bytes / 128))``
  (the fewest any layout allows: 1 for a 4-byte request, 4 for a 16-byte one of 32 lanes), bytes;
- atomics (read-modify-write) separately; block-wide barriers per source line.

Loads, stores and atomics are kept apart everywhere. Lanes are grouped into one request by
(site, kind, warp, n-th execution of the site by the lane): exact for convergent code; see
profile_rt.cc and kernels/PROFILING.md for divergent code.

``blocks=`` on a launch runs only some blocks (:func:`sample_blocks`); :meth:`LaunchCounters.scale`
is then ``blocks_total / blocks_profiled`` and the ``totals`` are scaled to the whole grid.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HEADER_DIR = Path(__file__).resolve().parent
KINDS = ("load", "store", "atomic")
SPACES = {"G": "global", "S": "shared"}


@dataclass
class SiteCounters:
    """Counters of one source line (`location` = ``file:line``), one kind, one memory space,
    over the profiled blocks (not scaled)."""
    location: str
    kind: str             # "load", "store" or "atomic"
    space: str            # "global" or "shared"
    requests: int = 0     # warp-level requests
    lanes: int = 0        # thread-level accesses
    bytes: int = 0        # bytes requested by the lanes
    sectors: int = 0      # global: 32-byte sectors touched, summed over requests
    ideal_sectors: int = 0   # global: ceil(distinct bytes / 32), summed over requests
    wavefronts: int = 0   # shared: bank wavefronts, summed over requests
    ideal_wavefronts: int = 0   # shared: max(1, ceil(distinct bytes / 128)), summed over requests

    @property
    def words(self) -> int:
        """Requests in 4-byte units of width per lane (a site is one instruction of one width:
        bytes / lanes), at least 1 each: the issue proxy's unit (see _profile.py)."""
        return self.requests * max(1, self.bytes // max(1, 4 * self.lanes))

    def add(self, other: "SiteCounters") -> None:
        for f in ("requests", "lanes", "bytes", "sectors", "ideal_sectors", "wavefronts", "ideal_wavefronts"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


@dataclass
class BufferCounters:
    """One global buffer (merged pointer arguments): its size and what the profiled blocks
    touched of it."""
    nbytes: int
    unique_bytes: int
    unique_sectors: int


@dataclass
class LaunchCounters:
    kernel: str
    source: str
    grid: tuple
    block: tuple
    shared_bytes: int
    blocks_total: int
    blocks_profiled: int
    sites: list = field(default_factory=list)        # [SiteCounters]
    barriers: dict = field(default_factory=dict)     # {location: block-wide barriers}
    buffers: list = field(default_factory=list)      # [BufferCounters]

    @property
    def scale(self) -> float:
        """Factor from the profiled blocks to the whole grid."""
        return self.blocks_total / max(1, self.blocks_profiled)

    def merged(self, kind: str, space: str) -> SiteCounters:
        """Sum over source lines of one kind and space (profiled blocks, not scaled)."""
        out = SiteCounters("*", kind, space)
        for s in self.sites:
            if s.kind == kind and s.space == space:
                out.add(s)
        return out

    def totals(self) -> dict:
        """Whole-grid estimates (scaled from the sample): the issue's per-launch schema."""
        k = self.scale

        def glob(kind):
            s = self.merged(kind, "global")
            return {"requests": round(s.requests * k), "sectors": round(s.sectors * k),
                    "ideal_sectors": round(s.ideal_sectors * k), "bytes": round(s.bytes * k)}

        def shared(kind):
            s = self.merged(kind, "shared")
            return {"requests": round(s.requests * k), "wavefronts": round(s.wavefronts * k),
                    "ideal_wavefronts": round(s.ideal_wavefronts * k), "bytes": round(s.bytes * k)}

        atomics = self.merged("atomic", "global")
        atomics.add(self.merged("atomic", "shared"))
        words = sum(s.words for s in self.sites)   # SiteCounters.words: the issue proxy's unit
        return {
            "global_load": glob("load"), "global_store": glob("store"),
            "shared_load": shared("load"), "shared_store": shared("store"),
            "atomics": round(atomics.requests * k),
            "word_requests": round(words * k),
            "barriers": round(sum(self.barriers.values()) * k),
            "unique_global_bytes": self.unique_global_bytes(),
            "unique_global_sectors": self.unique_global_sectors(),
        }

    def unique_global_bytes(self) -> int:
        """Distinct global bytes of the launch. With sampling, each buffer's distinct bytes are
        scaled and capped at its size (a table every block reads is counted once)."""
        return sum(min(b.nbytes, round(b.unique_bytes * self.scale)) for b in self.buffers)

    def unique_global_sectors(self) -> int:
        return sum(min(-(-b.nbytes // 32) + 1, round(b.unique_sectors * self.scale)) for b in self.buffers)


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------
def sample_blocks(total: int, period: int = 1, runs: int = 3) -> np.ndarray | None:
    """Deterministic sample of a 1-D grid's blocks: ``runs`` whole periods (e.g. every tile of
    one (batch, head) plane: interior and border tiles) spread evenly from the first to the
    last, so the first and last plane are always in. None when that would be every block.

    Whole periods keep neighbouring tiles together, so the halo they share is counted once
    per plane as on the GPU, and per-plane buffers scale exactly with the number of planes.
    """
    period = max(1, int(period))
    if total % period:
        period = 1
    planes = total // period
    if planes <= runs:
        return None
    picks = np.unique(np.round(np.linspace(0, planes - 1, runs)).astype(np.int64))
    return (picks[:, None] * period + np.arange(period)[None, :]).ravel().astype(np.uint32)


# ---------------------------------------------------------------------------------------
# Running one launch with the counters (called by engine.SimKernel.__call__)
# ---------------------------------------------------------------------------------------
def _buffer_ranges(args) -> list[tuple[int, int]]:
    """[lo, hi) of the array arguments, overlapping ones merged (an array passed twice)."""
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in args
                   if isinstance(a, np.ndarray) and a.nbytes)
    merged: list[list[int]] = []
    for lo, hi in spans:
        if merged and lo < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def _functions(lib):
    fns = getattr(lib, "_cupy_localrel_prof", None)
    if fns is None:
        begin, dump = lib.cudasim_prof_begin, lib.cudasim_prof_dump
        begin.restype, dump.restype = ctypes.c_int, ctypes.c_int
        begin.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_uint]
        dump.argtypes = [ctypes.c_char_p]
        fns = lib._cupy_localrel_prof = (begin, dump)
    return fns


def run_counted(kernel, launch, args, go):
    """Run ``go()`` (the launch) with counting on; returns (its return code, LaunchCounters)."""
    (grid, block, shared_mem, chosen) = launch
    lib = kernel.module._lib
    begin, dump = _functions(lib)
    ranges = _buffer_ranges(args)
    flat = (ctypes.c_uint64 * max(1, 2 * len(ranges)))(*[v for r in ranges for v in r])
    if begin(flat, len(ranges)):
        raise RuntimeError("profile: overlapping buffers")
    rc = go()
    fd, path = tempfile.mkstemp(prefix="cupy_localrel_prof_", suffix=".txt")
    os.close(fd)
    try:
        if dump(path.encode()):
            raise RuntimeError(f"profile: cannot write {path}")
        text = Path(path).read_text()
    finally:
        os.unlink(path)
    total = grid[0] * grid[1] * grid[2]
    counters = parse_dump(text, kernel.module.library, ranges)
    counters.kernel, counters.source = kernel.name, kernel.module.source
    counters.grid, counters.block, counters.shared_bytes = tuple(grid), tuple(block), int(shared_mem)
    counters.blocks_total = total
    counters.blocks_profiled = total if chosen is None else int(chosen.size)
    return rc, counters


def parse_dump(text: str, library: str, ranges) -> LaunchCounters:
    """LaunchCounters from profile_rt.cc's text report; sites mapped to ``file:line``."""
    c = LaunchCounters("", "", (), (), 0, 0, 0)
    sizes = {lo: hi - lo for lo, hi in ranges}
    raw_sites = []
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0] == "buffer":
            lo, ub, us = map(int, parts[1:4])
            c.buffers.append(BufferCounters(sizes.get(lo, ub), ub, us))
        elif parts[0] == "site":
            raw_sites.append((int(parts[1], 16), int(parts[2]), parts[3], list(map(int, parts[4:10]))))
        elif parts[0] == "barrier":
            loc = f"{Path(parts[3]).name}:{parts[2]}"
            c.barriers[loc] = c.barriers.get(loc, 0) + int(parts[1])
    where = source_lines(library, tuple(sorted({s[0] for s in raw_sites})))
    by_key: dict = {}
    for off, rw, space, vals in raw_sites:
        key = (where.get(off, f"{Path(library).name}+{off:#x}"), KINDS[rw], SPACES[space])
        site = by_key.setdefault(key, SiteCounters(*key))
        requests, lanes, nbytes, sectors, ideal, wavefronts = vals   # IDEAL: sectors (G) or wavefronts (S)
        shared = space == "S"
        site.add(SiteCounters(*key, requests, lanes, nbytes, sectors, 0 if shared else ideal, wavefronts,
                              ideal if shared else 0))
    c.sites = sorted(by_key.values(), key=lambda s: (s.location, s.kind, s.space))
    return c


_LINE_RE = re.compile(r"^(.*):(\d+)(?: \(discriminator \d+\))?$")


@functools.lru_cache(maxsize=64)
def _addr2line_cached(library: str, mtime: float, offsets: tuple) -> dict:
    tool = shutil.which("addr2line")
    if tool is None or not offsets:
        return {}
    # A return address follows its call: look one byte back to land on the call itself.
    r = subprocess.run([tool, "-a", "-i", "-e", library, *[hex(o - 1) for o in offsets]],
                       capture_output=True, text=True)
    out, current, frames = {}, None, []

    def close():
        if current is not None:
            out[current + 1] = _kernel_frame(frames)

    for line in r.stdout.splitlines():
        if line.startswith("0x"):
            close()
            current, frames = int(line, 16), []
        else:
            frames.append(line.strip())
    close()
    return out


# A kernel helper whose accesses belong to its caller's line (a wide-load wrapper used by
# several loops) carries this marker on the line of the access; the profile skips it.
CALLER_LINE_MARK = "profile: caller's line"


@functools.lru_cache(maxsize=256)
def _marked_lines(path: str) -> frozenset:
    try:
        text = Path(path).read_text()
    except OSError:
        return frozenset()
    return frozenset(no for no, line in enumerate(text.split("\n"), start=1) if CALLER_LINE_MARK in line)


# The engine's own headers stand in for CUDA's under the same names (cuda_fp16.h, ...): a
# frame in either is the toolkit's, not the kernel's.
_TOOLKIT_HEADERS = frozenset(p.name for p in HEADER_DIR.glob("*.h"))


def kernel_line(chain, extra_marked: frozenset = frozenset()) -> str | None:
    """Where an access counts: the innermost frame of an inline ``chain`` ((path, line) pairs,
    innermost first) outside the toolkit's headers (the engine's stand-ins for CUDA's, the
    C++ library's under /usr or /opt) and not on a line marked CALLER_LINE_MARK, as
    ``file:line``; None if there is none. The one rule for the engine's accesses
    (addr2line's chain) and for NVRTC's SASS (``nvdisasm -gi``'s chain, _nvrtc_check): a path
    that does not exist (NVRTC names the main file as given) is read from the kernel folder.
    ``extra_marked``: ``file:line`` also treated as marked."""
    from .._loader import KERNEL_DIR
    for path, line in chain:
        path = Path(path)
        if path.name in _TOOLKIT_HEADERS or str(path).startswith(("/usr/", "/opt/")):
            continue
        source = path if path.exists() else KERNEL_DIR / path.name
        if int(line) in _marked_lines(str(source)) or f"{path.name}:{line}" in extra_marked:
            continue
        return f"{path.name}:{line}"
    return None


def _kernel_frame(frames: list[str]) -> str:
    """kernel_line of addr2line's frames (``path:line``, innermost first)."""
    chain = [(m.group(1), m.group(2)) for f in frames if (m := _LINE_RE.match(f)) and m.group(1) != "??"]
    return kernel_line(chain) or (frames[0] if frames else "?")


def source_lines(library: str, offsets: tuple) -> dict:
    """{offset in the library: ``file:line``} through addr2line (binutils)."""
    return _addr2line_cached(library, os.path.getmtime(library), offsets)
