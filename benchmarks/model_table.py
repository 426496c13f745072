"""Parameters and FLOPs of the papers' models at 224x224, next to the papers' numbers.

Runs on the meta device (the custom ops' fake kernels and FLOP formulas), so it takes
seconds and needs no GPU. Writes ``benchmarks/model_table.md``.

    python benchmarks/model_table.py [--size 224] [-o benchmarks/model_table.md]
"""
import os
import sys

from cupy_localrel.adapters.torch.models import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "-o" not in argv and "--output" not in argv:
        argv += ["-o", os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_table.md")]
    sys.exit(main(argv))
