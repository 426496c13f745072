"""The main job: train a small LR-Net and a small SASA network on scikit-learn's digits.

    python -m cupy_localrel.adapters.torch.train [--epochs N] [--models lrnet,sasa]

The 8x8 digits (1797 images, bundled with scikit-learn, nothing is downloaded) are split
75/25 into train and test sets. Each model is a two-stage bottleneck ResNet built from
this package's layers (a conv stem, then local relation or SASA bottlenecks with 5x5
windows), trained with AdamW and a one-cycle schedule. The attention runs on CUDA
through the CuPy kernels when a GPU is present, else on the CPU through the NumPy
reference. Prints each model's test accuracy, its training time and the backend.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from torch import nn

from .models import LocalResNet, _lr_spatial, _sasa_spatial

MODELS = ("lrnet", "sasa")


def build_model(name: str, num_classes: int = 10, **layer_options) -> nn.Module:
    """The small networks of the demo (8x8 inputs, one channel). ``layer_options`` go to
    the LR-Net's LocalRelation2d layers (``similarity=``, ``key_saliency=``)."""
    common = dict(num_classes=num_classes, in_channels=1, small_input=True, base_width=16)
    if name == "lrnet":
        # heads = width / m: 16/4 = 4 and 32/4 = 8 weight maps.
        return LocalResNet((1, 1), _lr_spatial(5, 4, "mask", **layer_options), stem="conv",
                           width_factor=1.0, **common)
    if layer_options:
        raise ValueError(f"layer options {sorted(layer_options)} are for the lrnet model only")
    if name == "sasa":
        return LocalResNet((1, 1), _sasa_spatial(5, 4, "mask", "pool", "grouped"), stem="conv",
                           **common)
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


def load_digits_split(seed: int = 0):
    """``(x_train, y_train, x_test, y_test)`` as tensors; images scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    x = data.images.astype(np.float32)[:, None] / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, data.target, test_size=0.25,
                                              random_state=seed, stratify=data.target)
    mean, std = x_tr.mean(), x_tr.std()
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return (to_t((x_tr - mean) / std), to_t(y_tr).long(), to_t((x_te - mean) / std),
            to_t(y_te).long())


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (zero filled)."""
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


@torch.no_grad()
def evaluate(model, x, y, device, batch_size=256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == y[i:i + batch_size]).sum().item()
    return correct / len(x)


def train_one(name, data, device, *, epochs, batch_size, lr, seed, progress=True,
              layer_options=None):
    from tqdm import tqdm
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = data
    model = build_model(name, **(layer_options or {})).to(device)
    per_epoch = len(x_tr) // batch_size  # the last partial batch is dropped
    steps = epochs * per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps,
                                                pct_start=0.25)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=f"{name:5s}", unit="step", disable=not progress,
               dynamic_ncols=True, file=sys.stderr)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, per_epoch * batch_size, batch_size):
            idx = order[i:i + batch_size]
            xb = _augment(x_tr[idx], gen).to(device)
            loss = loss_fn(model(xb), y_tr[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    accuracy = evaluate(model, x_te, y_te, device)
    params = sum(p.numel() for p in model.parameters())
    return accuracy, seconds, params


def _cuda_usable() -> bool:
    """A GPU torch can use and the CuPy backend that runs the ops on it."""
    if not torch.cuda.is_available():
        return False
    from cupy_localrel._backends import backend_status
    ok, reason = backend_status("cupy")
    if not ok:
        print(f"CUDA is present but the CuPy backend is not ({reason}); training on the CPU",
              flush=True)
    return ok


def backend_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)}) via the CuPy kernels"
    return "CPU via the NumPy reference"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Train small LR-Net and SASA networks on "
                                                 "scikit-learn's 8x8 digits.")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: the layers' tensors are tiny, more threads "
                             "only add overhead)")
    parser.add_argument("--no-progress", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # passed through by ``python -m cupy_localrel demo -- ...``
        argv = argv[1:]
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if _cuda_usable() else "cpu"))
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    data = load_digits_split(args.seed)
    print(f"digits: {len(data[0])} train / {len(data[2])} test images (8x8); "
          f"backend: {backend_name(device)}", flush=True)
    results = []
    for name in names:
        acc, seconds, params = train_one(name, data, device, epochs=args.epochs,
                                         batch_size=args.batch_size, lr=args.lr,
                                         seed=args.seed, progress=not args.no_progress)
        results.append((name, acc, seconds, params))
        print(f"{name}: test accuracy {100 * acc:.2f}%  train time {seconds:.1f} s  "
              f"({params / 1e3:.1f}k parameters, {args.epochs} epochs, "
              f"backend: {backend_name(device)})", flush=True)
    return 0 if all(acc >= 0.95 for _, acc, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
