"""One launch of 64 blocks x 128 threads with barriers and warp shuffles on the CPU engine.

Prints one line: the median wall time of a launch, in ms (target: <= 20 ms on 2 cores).
    python benchmarks/bench_sim_engine.py [--repeats N] [--workers W] [--seed S]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cupy_localrel import _loader  # noqa: E402
from cupy_localrel._sim import engine  # noqa: E402

KERNEL = Path(__file__).resolve().parent / "sim_engine_bench.cu"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--workers", type=int, default=None, help="default: usable cores")
    ap.add_argument("--seed", type=int, default=0, help="thread order: 0 forward, 1 reversed, else shuffled")
    args = ap.parse_args(argv)
    ok, why = _loader.sim_available()
    if not ok:
        print(f"sim engine unavailable: {why}")
        return 1
    k = _loader.load_module(str(KERNEL), target="sim").get_function("bench_reduce")
    k.workers, k.seed = args.workers, args.seed
    blocks, threads = 64, 128
    x = np.random.default_rng(0).standard_normal(blocks * threads).astype(np.float32)
    out = np.zeros(blocks, np.float32)
    k((blocks,), (threads,), (x, out, np.int32(x.size)))   # warm-up: stacks, page faults
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        k((blocks,), (threads,), (x, out, np.int32(x.size)))
        times.append(time.perf_counter() - t0)
    workers = args.workers or engine.default_workers()
    print(f"sim engine: 64 blocks x 128 threads (4 barriers, 10 shuffles per thread), seed {args.seed}, "
          f"{workers} workers: {statistics.median(times) * 1e3:.2f} ms per launch (median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
