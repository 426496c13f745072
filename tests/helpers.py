"""Shared test helpers: the contract's tolerances, input factories, comparisons."""
from types import SimpleNamespace

import numpy as np

# docs/contract.md "Numbers": max abs error relative to max(1, max|reference|).
ATOL = {"float64": 1e-10, "float32": 2e-5, "float16": 5e-3, "bfloat16": 3e-2}


def assert_close(got, want, tol, name="", summands=None):
    """``max |got - want| <= tol * max(1, max|want|)``; for a gradient with ``summands``
    (the per-entry sum of the magnitudes of the terms it adds up, docs/contract.md
    "Numbers"), each entry's bound is ``tol * max(1, max|want|, summands)``."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    if summands is not None:
        scale = np.maximum(scale, np.asarray(summands, np.float64))
    err = float(np.max(np.abs(got - want) / scale, initial=0.0))
    assert err <= tol, f"{name}: relative max error {err:.3g} > {tol:.3g}"


def attention_summands(grad_out, q, k, v, heads, kernel_size, *, bias=None, rel=None,
                       scale=None, key_bias=None, **window):
    """Per-entry sums of |terms| of each gradient of ``local_attention2d``, in float64.

    The backward chain (dp = grad_out . v, ds = p (dp - sum p dp), dq = scale ds (k + rel),
    dk = scale ds q, dv = p grad_out, dbias = ds, drel = scale ds q) run on the magnitudes
    of every factor: ``|dp|`` for ``dp`` and ``p (|dp| + sum p |dp|)`` for ``ds``
    (``key_bias`` as given: only its ``-inf`` entries matter there). Returns a dict of
    ``q``, ``k``, ``v``, ``bias``, ``rel``, ``key_bias`` (``None`` where not given).
    """
    import cupy_localrel as cl
    f64 = (lambda a: None if a is None else np.asarray(a, np.float64))
    mag = (lambda a: None if a is None else np.abs(np.asarray(a, np.float64)))
    logits = cl.local_qk2d(f64(q), f64(k), heads, kernel_size, bias=f64(bias), rel=f64(rel),
                           scale=scale, key_bias=f64(key_bias), backend="numpy", **window)
    top = np.max(logits, axis=2, keepdims=True)
    top = np.where(np.isfinite(top), top, 0)
    p = np.exp(logits - top)
    p /= p.sum(axis=2, keepdims=True)
    dp = cl.local_av2d_backward(mag(grad_out), p, mag(v), kernel_size, backend="numpy",
                                **window)
    ds = p * (dp.attn + (p * dp.attn).sum(axis=2, keepdims=True))
    dqk = cl.local_qk2d_backward(ds, mag(q), mag(k), heads, kernel_size, bias=mag(bias),
                                 rel=mag(rel), scale=None if scale is None else abs(scale),
                                 key_bias=f64(key_bias), backend="numpy", **window)
    return dict(q=dqk.q, k=dqk.k, v=dp.v, bias=dqk.bias, rel=dqk.rel, key_bias=dqk.key_bias)


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
