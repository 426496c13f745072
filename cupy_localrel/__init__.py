"""cupy-localrel: local (neighbourhood) attention kernels for vision models.

The public surface is the functions below; semantics are in docs/contract.md. Every function takes
NumPy or CuPy arrays and a ``backend`` (``None``: by array type, ``"numpy"``, ``"cupy"``
or ``"sim"``). Torch tensors and other DLPack arrays go through
:mod:`cupy_localrel.adapters`.
"""
from ._backends._numpy import get_memory_budget as get_numpy_memory_budget
from ._backends._numpy import set_memory_budget as set_numpy_memory_budget
from ._geometry import BACKENDS, BORDERS
from ._ops import (
    AttentionGrads,
    AVGrads,
    LocalRelationGrads,
    QKGrads,
    SASAGrads,
    local_attention2d,
    local_attention2d_backward,
    local_av2d,
    local_av2d_backward,
    local_qk2d,
    local_qk2d_backward,
    local_relation2d,
    local_relation2d_backward,
    sasa2d,
    sasa2d_backward,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BORDERS",
    "local_attention2d", "local_attention2d_backward",
    "local_qk2d", "local_qk2d_backward",
    "local_av2d", "local_av2d_backward",
    "local_relation2d", "local_relation2d_backward",
    "sasa2d", "sasa2d_backward",
    "AttentionGrads", "QKGrads", "AVGrads", "LocalRelationGrads", "SASAGrads",
    "get_numpy_memory_budget", "set_numpy_memory_budget",
]
