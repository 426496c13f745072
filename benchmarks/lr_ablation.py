"""LR-Net's key/query composition, ablated: the digits LR-Net once per similarity function.

    python -m benchmarks.lr_ablation [--epochs 12] [--seed 0] [--out benchmarks/results/lr-ablation]

Trains the small LR-Net of the main job (:mod:`cupy_localrel.adapters.torch.train`: two
local relation bottlenecks, 5x5 windows, m = 4, on scikit-learn's 8x8 digits) once per
similarity of docs/contract.md, with the same seed, data split, schedule and epochs, plus
the dot product with LR-Net's key saliency (``key_saliency=True``). Writes a table of test
accuracies and training times as markdown and JSON into ``--out``, with the device, date
and commit. Times are wall clock on whatever machine runs it (on a CPU: the NumPy
reference); accuracies on 450 test images move by a few images between similarities, so
read them as "all compositions train", not as a ranking.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

from benchmarks import _measure as M

from cupy_localrel._geometry import SIMILARITIES
from cupy_localrel.adapters.torch import train

#: (row name, LocalRelation2d options): every similarity, then the dot product with saliency.
VARIANTS = [(s, dict(similarity=s)) for s in SIMILARITIES] + \
    [("dot + key saliency", dict(similarity="dot", key_saliency=True))]


def _device_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CuPy kernels)"
    return (f"CPU, {os.cpu_count()} cores, {M.cpu_model() or 'unknown CPU'} "
            f"(NumPy reference, {torch.get_num_threads()} torch thread(s))")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def markdown(rows, meta) -> str:
    lines = [f"Digits LR-Net, one run per key/query composition: {meta['epochs']} epochs, seed {meta['seed']}, "
             f"{meta['train']} train / {meta['test']} test images; {meta['device']}; commit `{meta['commit']}`, "
             f"{meta['date']}.", "",
             "| composition | similarity | key saliency | test accuracy | train time | parameters |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | `{r['similarity']}` | {'yes' if r['key_saliency'] else 'no'} | "
                     f"{100 * r['accuracy']:.2f}% | {r['seconds']:.1f} s | {r['params'] / 1e3:.1f}k |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if usable)")
    parser.add_argument("--variants", default=None,
                        help="comma-separated row names to run (default: all)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results", "lr-ablation"))
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if train._cuda_usable() else "cpu"))
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    wanted = None if args.variants is None else {v.strip() for v in args.variants.split(",")}
    data = train.load_digits_split(args.seed)
    meta = dict(epochs=args.epochs, seed=args.seed, train=len(data[0]), test=len(data[2]),
                device=_device_text(device), commit=_commit(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
                torch=torch.__version__)
    rows = []
    for name, options in VARIANTS:
        if wanted is not None and name not in wanted:
            continue
        acc, seconds, params = train.train_one("lrnet", data, device, epochs=args.epochs,
                                               batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                               progress=False, layer_options=options)
        rows.append(dict(name=name, similarity=options["similarity"],
                         key_saliency=bool(options.get("key_saliency")), accuracy=acc,
                         seconds=seconds, params=params))
        print(f"{name:24s} test accuracy {100 * acc:6.2f}%  train time {seconds:6.1f} s", flush=True)
    os.makedirs(args.out, exist_ok=True)
    text = markdown(rows, meta)
    with open(os.path.join(args.out, "lr_ablation.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "lr_ablation.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
