"""PyTorch bridge: differentiable custom ops, layers and models.

Functions (docs/contract.md's names and arguments, on tensors; CPU tensors run on the NumPy
reference, CUDA tensors on the CuPy kernels through DLPack on torch's current stream):
:func:`local_attention2d`, :func:`local_qk2d`, :func:`local_av2d`,
:func:`local_relation2d`, :func:`sasa2d`. They are ``torch.library`` custom ops in the
``localrel`` namespace (``torch.ops.localrel.*``) with fake kernels, autograd, FLOP
formulas and a CUDA autocast rule, so ``torch.compile(fullgraph=True)`` and
``FlopCounterMode`` see them.

Layers: :class:`LocalRelation2d` (LR-Net), :class:`SASA2d` (stand-alone self-attention);
:func:`padding_key_bias` turns a ``(B, H, W)`` valid-pixel mask into their ``key_bias``.
Models: :mod:`cupy_localrel.adapters.torch.models`.
"""
from ._ops import local_attention2d, local_av2d, local_qk2d, local_relation2d, sasa2d
from .layers import LocalRelation2d, SASA2d, padding_key_bias

__all__ = [
    "local_attention2d", "local_qk2d", "local_av2d", "local_relation2d", "sasa2d",
    "LocalRelation2d", "SASA2d", "padding_key_bias",
]
