"""Tensors in, arrays out and back: the zero-copy bridge between torch and the core.

CPU tensors become NumPy arrays (``Tensor.numpy()`` on a detached contiguous tensor) and
run on the NumPy reference (or ``backend="sim"``); CUDA tensors become CuPy arrays through
DLPack and run with ``backend="cupy"`` on torch's current stream of the tensor's device.
Results come back without copies (``torch.from_numpy``, ``torch.from_dlpack``).

bfloat16: NumPy has no bfloat16, so on the CPU the bytes are viewed as ``ml_dtypes``'
bfloat16 when that package is installed. On CUDA, CuPy >= 14 holds bfloat16 arrays itself
(as ``ml_dtypes.bfloat16``) and they cross DLPack as they are. Otherwise (no ``ml_dtypes``,
or CuPy 13 on CUDA) the tensors are cast to float32 for the call and the results cast back
to bfloat16: the core accumulates in float32 for bfloat16 anyway, so only the rounding of
the result differs (one bfloat16 rounding, as the native path), at the cost of the casts'
memory traffic. :func:`native_bfloat16` makes that decision, in one place.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

try:  # optional: NumPy's bfloat16
    import ml_dtypes as _ml_dtypes
    _NP_BF16 = np.dtype(_ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - exercised where ml_dtypes is missing
    _ml_dtypes = None
    _NP_BF16 = None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: The first CuPy with bfloat16 arrays (ml_dtypes.bfloat16; its upgrade guide: "Minimal
#: support for bfloat16", needing NumPy >= 2.1.2).
CUPY_BFLOAT16_MAJOR = 14
_NUMPY_TAKES_CUPY_BFLOAT16 = np.lib.NumpyVersion(np.__version__) >= "2.1.2"


def native_bfloat16(cuda: bool, cupy_version: str | None = None) -> bool:
    """bfloat16 tensors reach the core as bfloat16 arrays (no float32 round trip).

    CPU: when ``ml_dtypes`` is installed. CUDA: also CuPy >= 14 (``cupy_version``, default
    the installed CuPy's) on NumPy >= 2.1.2; CuPy 13 has no bfloat16.
    """
    if _NP_BF16 is None:
        return False
    if not cuda:
        return True
    if cupy_version is None:
        import cupy
        cupy_version = cupy.__version__
    try:
        major = int(str(cupy_version).split(".")[0])
    except ValueError:
        return False
    return major >= CUPY_BFLOAT16_MAJOR and _NUMPY_TAKES_CUPY_BFLOAT16


def _autocasting(t: torch.Tensor) -> bool:
    """Autocast is on for this tensor's device (the op's autocast rule casts its inputs)."""
    if not hasattr(torch.library, "register_autocast") or t.device.type not in ("cpu", "cuda"):
        return False
    try:
        return torch.is_autocast_enabled(t.device.type)
    except TypeError:  # older spellings
        if t.device.type == "cuda":
            return torch.is_autocast_enabled()
        return torch.is_autocast_cpu_enabled()


def check_tensors(op: str, tensors: dict) -> torch.Tensor:
    """One device and one floating dtype for all given tensors; returns the first.

    Raises ``TypeError`` naming the offending arguments (docs/contract.md, "Bad input": mixed
    array kinds and mixed dtypes are type errors; mixed devices are the torch analogue).
    Under autocast mixed dtypes are allowed here: the ops' autocast rules cast them all to
    one dtype before the op runs (and the op checks again).
    """
    given = {n: t for n, t in tensors.items() if t is not None}
    for name, t in given.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must have a floating dtype "
                            f"(float16, bfloat16, float32, float64), got {t.dtype}")
    devices = {n: t.device for n, t in given.items()}
    if len(set(devices.values())) > 1:
        raise TypeError(f"{op}: all tensors must be on one device, got " +
                        ", ".join(f"{n}: {d}" for n, d in devices.items()))
    dtypes = {n: t.dtype for n, t in given.items()}
    if len(set(dtypes.values())) > 1 and not _autocasting(next(iter(given.values()))):
        raise TypeError(f"{op}: all floating inputs must share one dtype, got " +
                        ", ".join(f"{n}: {d}" for n, d in dtypes.items()))
    return next(iter(given.values()))


class Bridge:
    """Converts the tensors of one call to core arrays and the results back."""

    def __init__(self, ref: torch.Tensor, backend: str | None):
        self.device = ref.device
        self.dtype = ref.dtype
        self.cuda = ref.device.type == "cuda"
        if ref.device.type not in ("cpu", "cuda"):
            raise TypeError(f"tensors on {ref.device} are not supported (CPU or CUDA only)")
        if self.cuda and backend not in (None, "cupy"):
            raise ValueError(f"CUDA tensors run with backend='cupy', got backend={backend!r}")
        if not self.cuda and backend == "cupy":
            raise TypeError("backend='cupy' takes CUDA tensors, got CPU tensors")
        if self.cuda and torch.cuda.is_current_stream_capturing():
            # CuPy allocates from its own pool and may synchronize (first use of a geometry):
            # neither is legal while torch records a CUDA graph.
            raise RuntimeError("localrel ops cannot be captured in a CUDA graph "
                               "(torch.cuda.graph, torch.compile mode='reduce-overhead'); "
                               "run them outside the capture")
        self.backend = "cupy" if self.cuda else backend
        # bfloat16 runs through float32 where the array library lacks the dtype.
        self.via_f32 = ref.dtype == torch.bfloat16 and not native_bfloat16(self.cuda)

    @contextlib.contextmanager
    def context(self):
        """CuPy's current device and stream = the tensor's device and torch's stream."""
        if not self.cuda:
            yield
            return
        import cupy
        stream = torch.cuda.current_stream(self.device)
        with cupy.cuda.Device(self.device.index), \
                cupy.cuda.ExternalStream(stream.cuda_stream, self.device.index):
            yield

    def array(self, t: torch.Tensor | None):
        if t is None:
            return None
        t = t.detach()
        if self.via_f32:
            t = t.float()
        t = t.contiguous()
        if self.cuda:
            import cupy
            return cupy.from_dlpack(t)
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(_NP_BF16)
        return t.numpy()

    def tensor(self, a, *, keep_dtype: bool = False) -> torch.Tensor | None:
        """A core result as a tensor (no copy); ``keep_dtype`` for ``lse`` (float32)."""
        if a is None:
            return None
        if self.cuda:
            t = torch.from_dlpack(a)
        else:
            a = np.ascontiguousarray(a)
            if _NP_BF16 is not None and a.dtype == _NP_BF16:
                t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            else:
                t = torch.from_numpy(a)
        if self.via_f32 and not keep_dtype and t.dtype == torch.float32:
            t = t.to(torch.bfloat16)
        return t.contiguous()
