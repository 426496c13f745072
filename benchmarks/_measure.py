"""Timing and peak-memory helpers shared by the benchmark scripts.

CPU memory, two methods:

- ``traced_peak``: ``tracemalloc`` peak minus the traced size at the start. Sees NumPy's
  buffers (NumPy reports them to tracemalloc), not torch's CPU allocations.
- ``rss_peak``: peak resident set growth. The kernel's high-water mark ``VmHWM`` is reset
  through ``/proc/self/clear_refs`` (``5``), freed heap is handed back first
  (``malloc_trim``), and glibc's mmap threshold is pinned at 64 KiB (``mallopt``) so that
  large buffers are mapped and unmapped rather than recycled inside the heap. Sees every
  allocation that is touched (NumPy's and torch's alike); counts pages, so small
  allocations round up to 4 KiB.
"""
from __future__ import annotations

import ctypes
import gc
import platform
import statistics
import time
import tracemalloc

_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    return _LIBC


def pin_malloc() -> bool:
    """Fix glibc's mmap threshold at 64 KiB (no dynamic raise); True if it took."""
    libc = _libc()
    if not libc:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
    return bool(ok)


def set_malloc_mode(mode: str) -> bool:
    """``"memory"``: mmap threshold 64 KiB and the free heap trimmed (peaks are visible in
    RSS); ``"time"``: threshold 32 MiB, about where glibc's dynamic threshold settles, so
    that timed calls do not page-fault every temporary. True if glibc took it."""
    libc = _libc()
    if not libc:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if mode == "memory":
        ok = libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 128 * 1024)
        libc.malloc_trim(0)
    else:
        ok = libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    return bool(ok)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def rss_peak(fn) -> tuple[int, object]:
    """``(peak resident growth in bytes, fn())``."""
    gc.collect()
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM")
    return max(0, peak - base) * 1024, result


def traced_peak(fn) -> tuple[int, object]:
    """``(tracemalloc peak minus the traced size at the start, fn())``."""
    gc.collect()
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return max(0, peak - base), result


def wall_times(fn, *, warmup: int = 1, repeats: int = 3, sync=None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return times


def median(xs):
    return statistics.median(xs) if xs else None


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_time(s) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for the device line of a result table."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
