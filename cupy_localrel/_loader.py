"""The one loader of the package's CUDA kernel sources, for the GPU (CuPy) and the CPU engine.

    mod = load_module("local_attn.cu", ["attn_fwd<float,32>"], target="cupy")   # or "sim"
    kern = mod.get_function("attn_fwd<float,32>")
    kern(grid, block, args, shared_mem=0)          # cupy.RawKernel's call shape

`filename` names a file in `KERNEL_DIR` (an absolute path also works, for test kernels).
Quoted includes (``#include "common.cuh"``) resolve against the file's folder and
`KERNEL_DIR` on both targets; ``<cuda_fp16.h>``/``<cuda_bf16.h>`` come from the CUDA
headers on the GPU and from the engine's stand-ins on the CPU.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from collections.abc import Sequence
from pathlib import Path

from ._sim import engine as _engine

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
_INSTANTIATIONS_FILE = KERNEL_DIR / "instantiations.json"
TARGETS = ("cupy", "sim")


def _load_instantiations() -> dict[str, list[str]]:
    """{file name: [name expression, ...]} from kernels/instantiations.json (if present)."""
    try:
        data = json.loads(_INSTANTIATIONS_FILE.read_text())
    except FileNotFoundError:
        return {}
    return {str(k): [str(n) for n in v] for k, v in data.items()}


#: Each .cu file in KERNEL_DIR mapped to the name expressions (template instantiations) it
#: must provide; extern "C" kernels need no entry.
INSTANTIATIONS: dict[str, list[str]] = _load_instantiations()

_cache: dict[tuple, object] = {}
_lock = threading.Lock()


def kernel_path(filename: str | os.PathLike) -> Path:
    p = Path(filename)
    if not p.is_absolute():
        p = KERNEL_DIR / p
    if not p.is_file():
        raise FileNotFoundError(f"kernel source {str(filename)!r} not found (looked at {p})")
    return p.resolve()


def include_dirs_for(path: Path) -> list[Path]:
    dirs = [path.parent]
    if KERNEL_DIR != path.parent:
        dirs.append(KERNEL_DIR)
    return dirs


def load_module(filename: str, name_expressions: Sequence[str] = (), *, target: str,
                options: Sequence[str] = (), sanitize: bool | str | None = None):
    """Compile (cached) and return the module of one kernel source file.

    target "cupy": a ``cupy.RawModule``, cached per (device, file, names, options).
    target "sim": a CPU ``SimModule`` (g++ build cached on disk by content hash; a fresh
    module object per call, so its `seed`/`workers` settings are the caller's own).
    `sanitize` (sim only): True/"address" (AddressSanitizer) or "thread" (ThreadSanitizer race
    check); default from CUPY_LOCALREL_SIM_ASAN / CUPY_LOCALREL_SIM_TSAN.
    """
    names = tuple(str(n) for n in name_expressions)
    options = tuple(str(o) for o in options)
    if target == "sim":
        return _load_sim(kernel_path(filename), names, options, sanitize)
    if target == "cupy":
        return _load_cupy(kernel_path(filename), names, options)
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


# ---------------------------------------------------------------------------------------
# CPU engine
# ---------------------------------------------------------------------------------------
def sim_available() -> tuple[bool, str]:
    """(ok, reason) for the CPU engine: needs Linux and g++ >= 12."""
    return _engine.available()


def _load_sim(path: Path, names: tuple, options: tuple, sanitize: bool | str | None):
    ok, why = sim_available()
    if not ok:
        raise RuntimeError(f"sim backend unavailable: {why}")
    mod = _engine.build(path, names, options=options, include_dirs=include_dirs_for(path), sanitize=sanitize)
    return mod


# ---------------------------------------------------------------------------------------
# GPU via CuPy
# ---------------------------------------------------------------------------------------
def _import_cupy():
    try:
        import cupy
    except Exception as e:  # ImportError, or a broken CUDA install raising at import
        raise RuntimeError(f"cupy backend unavailable: cannot import cupy ({e}); "
                           "install cupy-cuda12x on a machine with an NVIDIA GPU") from e
    return cupy


# (cupy module, status) of the last successful check: a device does not come or go in a
# process, so the ops (every call goes through it) pay the device query once. Keyed by the
# module object, so a stand-in CuPy (tests) is checked afresh; failures are not kept.
_cupy_status: tuple[object, tuple[bool, str]] | None = None


def cupy_available() -> tuple[bool, str]:
    """(ok, reason) for the GPU backend: CuPy importable and a CUDA device usable.

    Queries the devices once per process (per CuPy module); a failed check is repeated.
    """
    global _cupy_status
    try:
        cupy = _import_cupy()
        known = _cupy_status
        if known is not None and known[0] is cupy:
            return known[1]
        n = cupy.cuda.runtime.getDeviceCount()
        if n < 1:
            return False, "CuPy is installed but no CUDA device is visible"
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        status = True, f"CuPy {cupy.__version__}, {n} device(s), current: {name}"
    except Exception as e:
        return False, _no_gpu_reason(e)
    _cupy_status = (cupy, status)
    return status


def _driver_library_present() -> bool:
    """The NVIDIA driver's user-space library (libcuda) loads: a driver is installed."""
    import ctypes
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _no_gpu_reason(exc: Exception) -> str:
    """Why CuPy cannot use a GPU, in plain words. Without any driver, the CUDA runtime
    reports "driver version is insufficient", which reads as "upgrade your driver": say
    instead that there is no GPU or driver."""
    text = f"{type(exc).__name__}: {exc}"
    if not _driver_library_present():
        return ("no NVIDIA GPU or driver found on this machine (the driver library libcuda "
                "is missing); backends 'numpy' and 'sim' run on the CPU")
    if "NoDevice" in text or "no CUDA-capable device" in text:
        return "no NVIDIA GPU found (a driver is installed but sees no device)"
    if "InsufficientDriver" in text:
        return (f"the NVIDIA driver is older than the CUDA runtime of this CuPy ({text}): "
                "update the driver, or install a CuPy built for an older CUDA")
    return f"no usable GPU through CuPy: {text}"


def cuda_include_dir(major: int | None = None) -> Path | None:
    """A folder with the CUDA headers (cuda_fp16.h), for NVRTC; None if none is found.

    Looked for in $CUDA_PATH/$CUDA_HOME, the nvidia CUDA runtime wheels, /usr/local/cuda and
    next to nvcc. ``major``: the NVRTC's CUDA major version, whose wheel comes first (CUDA 12
    wheels keep their headers in ``nvidia/cuda_runtime``, CUDA 13 wheels in ``nvidia/cu13``),
    so that mixed wheels do not hand one version's NVRTC the other's headers.
    """
    cands = []
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            cands.append(Path(os.environ[var]) / "include")
    try:
        import nvidia
        for base in getattr(nvidia, "__path__", []):
            wheels = [Path(base) / "cuda_runtime" / "include", Path(base) / "cu12" / "include",
                      Path(base) / "cu13" / "include"]
            cands += wheels[::-1] if major is not None and major >= 13 else wheels
    except ImportError:
        pass
    cands.append(Path("/usr/local/cuda/include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent / "include")
    for c in cands:
        if (c / "cuda_fp16.h").is_file():
            return c
    return None


def _cupy_finds_cuda_headers(cupy) -> bool:
    """True when CuPy compiles against a CUDA toolkit of its own: then its headers are the
    ones to use, and adding another CUDA version's include folder could shadow them."""
    try:
        root = cupy.cuda.get_cuda_path()
    except Exception:
        return False
    return bool(root) and (Path(root) / "include" / "cuda_fp16.h").is_file()


def _nvrtc_major(cupy) -> int | None:
    try:
        return int(cupy.cuda.nvrtc.getVersion()[0])
    except Exception:
        return None


def _deps_hash(path: Path) -> str:
    """Hash of the file and the local headers it includes: CuPy's own kernel cache keys on the
    code text only, so an edited common.cuh must change the code text too."""
    h = hashlib.sha256()
    for p in _engine.include_closure(path, include_dirs_for(path)):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _load_cupy(path: Path, names: tuple, options: tuple):
    cupy = _import_cupy()
    try:
        dev = cupy.cuda.Device().id
        cupy.cuda.runtime.getDeviceProperties(dev)
    except Exception as e:
        raise RuntimeError(f"cupy backend unavailable: no usable CUDA device ({type(e).__name__}: {e})") from e
    key = (dev, str(path), names, options)
    with _lock:
        mod = _cache.get(key)
        if mod is not None:
            return mod
    code = path.read_text() + f"\n// cupy_localrel deps {_deps_hash(path)}\n"
    opts = list(options) + [f"-I{d}" for d in include_dirs_for(path)]
    if not _cupy_finds_cuda_headers(cupy):
        # e.g. the nvidia CUDA runtime wheel's, for <cuda_fp16.h>
        inc = cuda_include_dir(_nvrtc_major(cupy))
        if inc is not None:
            opts.append(f"-I{inc}")
    mod = cupy.RawModule(code=code, options=tuple(opts), name_expressions=names or None)
    try:
        # RawModule compiles lazily, at the first get_function: compile now, so that a broken
        # NVRTC or missing headers give the contract's clear RuntimeError rather than a bare
        # CompileException in the middle of an op.
        mod.compile()
    except Exception as e:
        raise RuntimeError(f"cupy backend unavailable: NVRTC could not compile {path.name} "
                           f"({type(e).__name__}: {e})") from e
    with _lock:
        _cache.setdefault(key, mod)
        return _cache[key]
