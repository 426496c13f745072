"""Benchmarks: ours against unfold-based baselines and FlexAttention.

Entry point: ``python -m benchmarks.run`` (``--quick``, ``--gpu``, ``--out DIR``); the
reference's memory claim of issue 2: ``python -m benchmarks.reference_memory``.
"""
