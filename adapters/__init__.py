"""Framework bridges, installed as ``cupy_localrel.adapters``.

- :mod:`cupy_localrel.adapters.torch`: PyTorch custom ops with autograd, layers, models.
- :mod:`cupy_localrel.adapters.dlpack`: the ops on any array with ``__dlpack__``.
"""
