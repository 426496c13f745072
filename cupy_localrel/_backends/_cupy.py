"""The ``cupy`` backend: the package's CUDA kernels on the GPU through CuPy.

Every launch goes on CuPy's current stream, on the device that holds the inputs (all
inputs of a call must share one device; ValueError otherwise, before any work).
"""
from __future__ import annotations

import functools

from .. import _loader
from .._geometry import SplitRel
from . import _kernel_ops as _k

TARGET = _k.Target("cupy")


def available():
    """CuPy importable and a CUDA device visible; the reason names the missing piece.
    Every dispatch asks: the devices are queried once per process (see the loader)."""
    return _loader.cupy_available()


def _on_inputs_device(op):
    """Run ``op`` with the inputs' device current; reject inputs spread over devices."""

    @functools.wraps(op)
    def run(geo, *arrays):
        import cupy
        flat = [x for a in arrays for x in (a if isinstance(a, SplitRel) else (a,))]   # sasa2d's rel: two arrays
        devices = {int(a.device.id) for a in flat if a is not None}
        if len(devices) > 1:
            raise ValueError(f"all arrays of one call must be on one device, got devices {sorted(devices)}")
        device = devices.pop() if devices else cupy.cuda.Device().id
        with cupy.cuda.Device(device):
            return op(TARGET, geo, *arrays)

    return run


attention_forward = _on_inputs_device(_k.attention_forward)
attention_backward = _on_inputs_device(_k.attention_backward)
qk_forward = _on_inputs_device(_k.qk_forward)
qk_backward = _on_inputs_device(_k.qk_backward)
av_forward = _on_inputs_device(_k.av_forward)
av_backward = _on_inputs_device(_k.av_backward)
