"""Shared test helpers: SPEC tolerances, input factories, comparisons."""
from types import SimpleNamespace

import numpy as np

# SPEC.md "Numbers": max abs error relative to max(1, max|reference|).
ATOL = {"float64": 1e-10, "float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}


def assert_close(got, want, tol, name=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    err = float(np.max(np.abs(got - want), initial=0.0)) / scale
    assert err <= tol, f"{name}: relative max error {err:.3g} > {tol:.3g}"


def table_shape(kernel, border):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    return (2 * kh - 1, 2 * kw - 1) if border == "shift" else (kh, kw)


def make_inputs(B, heads, dqk, dv, H, W, kernel, border, bias, rel, seed, dtype=np.float64):
    """Random q, k, v (and bias/rel when asked) in float64 by default."""
    rng = np.random.default_rng(seed)
    shape = table_shape(kernel, border)
    x = SimpleNamespace(
        q=rng.standard_normal((B, heads * dqk, H, W)),
        k=rng.standard_normal((B, heads * dqk, H, W)),
        v=rng.standard_normal((B, heads * dv, H, W)),
        bias=rng.standard_normal((heads, *shape)) if bias else None,
        rel=rng.standard_normal((heads, dqk, *shape)) if rel else None,
    )
    for name, value in vars(x).items():
        if value is not None:
            setattr(x, name, value.astype(dtype))
    return x


def central_difference(f, x, eps=1e-6, entries=None):
    """d f(x) / dx for a scalar function f (reading ``x`` in place), by central differences;
    at the flat ``entries`` of ``x`` only when given (0 elsewhere), else at every entry."""
    grad = np.zeros_like(x)
    flat, g = x.reshape(-1), grad.reshape(-1)
    for n in range(flat.size) if entries is None else entries:
        keep = flat[n]
        flat[n] = keep + eps
        up = f()
        flat[n] = keep - eps
        down = f()
        flat[n] = keep
        g[n] = (up - down) / (2 * eps)
    return grad
