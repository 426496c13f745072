"""The ``sim`` backend: the package's CUDA kernels executed on the CPU (NumPy arrays).

The same ``.cu`` sources as the ``cupy`` backend, built with g++ against the CPU engine
(:mod:`cupy_localrel._sim`): every CUDA thread runs, barriers and shared memory included, so
this backend tests the kernels themselves on machines without a GPU. Slow; for tests and
debugging. Thread order: env ``CUPY_LOCALREL_SIM_SEED`` (see the engine).
"""
from __future__ import annotations

from functools import partial

from .. import _loader
from . import _kernel_ops as _k

TARGET = _k.Target("sim")


def available():
    """g++ (>= 12) on Linux is all the CPU engine needs."""
    return _loader.sim_available()


attention_forward = partial(_k.attention_forward, TARGET)
attention_backward = partial(_k.attention_backward, TARGET)
qk_forward = partial(_k.qk_forward, TARGET)
qk_backward = partial(_k.qk_backward, TARGET)
av_forward = partial(_k.av_forward, TARGET)
av_backward = partial(_k.av_backward, TARGET)
