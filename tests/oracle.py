"""An independent scalar-loop oracle, written from docs/contract.md alone.

It shares no code with the package (not even the geometry), loops over every pixel and
slot in float64, and is only meant for tiny shapes. Backward passes are derived by hand
from the same loops, so they are independent of the vectorised reference too.
"""
import math

import numpy as np


def slot_position(c, t, length, k, d, border):
    """docs/contract.md "Geometry": (input position or None if invalid, table index)."""
    if border in ("mask", "zeros"):
        n = c + (t - k // 2) * d
        return (n if 0 <= n < length else None), t
    r = c % d
    lr = math.ceil((length - r) / d)
    ic = c // d
    start = min(max(ic - k // 2, 0), lr - k)
    return r + d * (start + t), start + t - ic + (k - 1)


def _window(H, W, kh, kw, dh, dw, sh, sw, border, i, j):
    """List of (t, ny, nx, ay, ax, valid) for output (i, j)."""
    cy, cx = i * sh, j * sw
    slots = []
    for ty in range(kh):
        ny, ay = slot_position(cy, ty, H, kh, dh, border)
        for tx in range(kw):
            nx, ax = slot_position(cx, tx, W, kw, dw, border)
            valid = ny is not None and nx is not None
            slots.append((ty * kw + tx, ny, nx, ay, ax, valid))
    return slots


def _pairs(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _setup(q, heads, kernel_size, dilation, stride):
    B, C, H, W = q.shape
    kh, kw = _pairs(kernel_size)
    dh, dw = _pairs(dilation)
    sh, sw = _pairs(stride)
    Ho, Wo = -(-H // sh), -(-W // sw)
    return B, C // heads, H, W, kh, kw, dh, dw, sh, sw, Ho, Wo


def _sign(x):
    return (x > 0) - (x < 0)      # sign(0) = 0: the subgradient of |x| at 0


# The table: phi(q, k) and its partial derivatives (dphi/dq, dphi/dk), one scalar each.
SIMILARITY = {
    "dot": (lambda q, k: q * k, lambda q, k: k, lambda q, k: q),
    "key": (lambda q, k: k, lambda q, k: 0.0, lambda q, k: 1.0),
    "neg_abs": (lambda q, k: -abs(q - k), lambda q, k: -_sign(q - k), lambda q, k: _sign(q - k)),
    "neg_abs_normalized": (
        lambda q, k: -abs(q - k) / (abs(q) + abs(k) + 1),
        lambda q, k: (-_sign(q - k) * (abs(q) + abs(k) + 1) + abs(q - k) * _sign(q))
        / (abs(q) + abs(k) + 1) ** 2,
        lambda q, k: (_sign(q - k) * (abs(q) + abs(k) + 1) + abs(q - k) * _sign(k))
        / (abs(q) + abs(k) + 1) ** 2),
    "neg_square_normalized": (
        lambda q, k: -(q - k) ** 2 / (abs(q * k) + 1),
        lambda q, k: (-2 * (q - k) * (abs(q * k) + 1) + (q - k) ** 2 * _sign(q * k) * k)
        / (abs(q * k) + 1) ** 2,
        lambda q, k: (2 * (q - k) * (abs(q * k) + 1) + (q - k) ** 2 * _sign(q * k) * q)
        / (abs(q * k) + 1) ** 2),
    "neg_square": (lambda q, k: -(q - k) ** 2, lambda q, k: -2 * (q - k), lambda q, k: 2 * (q - k)),
}


def _key_bias_at(key_bias, b, h, ny, nx, valid):
    """docs/contract.md: a valid slot adds key_bias at its key; an invalid one (zeros) adds 0."""
    return float(key_bias[b, h, ny, nx]) if key_bias is not None and valid else 0.0


def _removed(key_bias, b, h, ny, nx, valid):
    """docs/contract.md "Per-key logit": a slot whose key has key_bias -inf takes no part, like
    an invalid slot under border="mask": nothing at its key (k, v) is read."""
    return _key_bias_at(key_bias, b, h, ny, nx, valid) == -np.inf


def qk(q, k, heads, kernel_size, bias=None, rel=None, scale=None, dilation=1, stride=1,
       border="mask", similarity="dot", key_bias=None):
    """Logits (B, heads, K, Ho, Wo), -inf at masked slots and at removed keys."""
    phi = SIMILARITY[similarity][0]
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, Dqk, H, W, kh, kw, dh, dw, sh, sw, Ho, Wo = _setup(q, heads, kernel_size, dilation, stride)
    scale = 1 / math.sqrt(Dqk) if scale is None else scale
    logits = np.zeros((B, heads, kh * kw, Ho, Wo))
    for b in range(B):
        for h in range(heads):
            ch = slice(h * Dqk, (h + 1) * Dqk)
            for i in range(Ho):
                for j in range(Wo):
                    qc = q[b, ch, i * sh, j * sw]
                    for t, ny, nx, ay, ax, valid in _window(H, W, kh, kw, dh, dw, sh, sw, border, i, j):
                        if (not valid and border == "mask") or _removed(key_bias, b, h, ny, nx, valid):
                            logits[b, h, t, i, j] = -np.inf
                            continue
                        kn = k[b, ch, ny, nx] if valid else np.zeros(Dqk)
                        relt = rel[h, :, ay, ax] if rel is not None else 0.0
                        val = scale * sum(phi(float(a), float(c)) for a, c in zip(qc, kn + relt))
                        if bias is not None:
                            val += bias[h, ay, ax]
                        val += _key_bias_at(key_bias, b, h, ny, nx, valid)
                        logits[b, h, t, i, j] = val
    return logits


def av(attn, v, kernel_size, dilation=1, stride=1, border="mask", key_bias=None):
    """out (B, heads*Dv, Ho, Wo); invalid slots and removed keys (key_bias -inf) add nothing."""
    attn, v = np.asarray(attn, np.float64), np.asarray(v, np.float64)
    B, heads = attn.shape[:2]
    _, Dv, H, W, kh, kw, dh, dw, sh, sw, Ho, Wo = _setup(v, heads, kernel_size, dilation, stride)
    out = np.zeros((B, heads * Dv, Ho, Wo))
    for b in range(B):
        for h in range(heads):
            ch = slice(h * Dv, (h + 1) * Dv)
            for i in range(Ho):
                for j in range(Wo):
                    for t, ny, nx, _, _, valid in _window(H, W, kh, kw, dh, dw, sh, sw, border, i, j):
                        if valid and not _removed(key_bias, b, h, ny, nx, valid):
                            out[b, ch, i, j] += attn[b, h, t, i, j] * v[b, ch, ny, nx]
    return out


def softmax(logits):
    """Weights and lse over axis 2, window by window; a window whose logits are all -inf
    has weights 0 and lse -inf (docs/contract.md "Empty windows")."""
    p = np.zeros(logits.shape)
    lse = np.full(logits.shape[:2] + logits.shape[3:], -np.inf)
    B, heads, K, Ho, Wo = logits.shape
    for b in range(B):
        for h in range(heads):
            for i in range(Ho):
                for j in range(Wo):
                    x = logits[b, h, :, i, j]
                    if np.all(x == -np.inf):
                        continue
                    top = x.max()
                    e = np.exp(x - top)
                    p[b, h, :, i, j] = e / e.sum()
                    lse[b, h, i, j] = top + math.log(e.sum())
    return p, lse


def attention(q, k, v, heads, kernel_size, bias=None, rel=None, scale=None, dilation=1,
              stride=1, border="mask", similarity="dot", key_bias=None):
    """(out, lse)."""
    logits = qk(q, k, heads, kernel_size, bias, rel, scale, dilation, stride, border,
                similarity, key_bias)
    p, lse = softmax(logits)
    return av(p, v, kernel_size, dilation, stride, border, key_bias), lse


def av_backward(grad_out, attn, v, kernel_size, dilation=1, stride=1, border="mask", key_bias=None):
    """(dattn, dv); 0 at invalid slots and removed keys (key_bias -inf)."""
    grad_out, attn, v = (np.asarray(a, np.float64) for a in (grad_out, attn, v))
    B, heads = attn.shape[:2]
    _, Dv, H, W, kh, kw, dh, dw, sh, sw, Ho, Wo = _setup(v, heads, kernel_size, dilation, stride)
    dattn, dv = np.zeros(attn.shape), np.zeros(v.shape)
    for b in range(B):
        for h in range(heads):
            ch = slice(h * Dv, (h + 1) * Dv)
            for i in range(Ho):
                for j in range(Wo):
                    for t, ny, nx, _, _, valid in _window(H, W, kh, kw, dh, dw, sh, sw, border, i, j):
                        if valid and not _removed(key_bias, b, h, ny, nx, valid):
                            dattn[b, h, t, i, j] = np.dot(grad_out[b, ch, i, j], v[b, ch, ny, nx])
                            dv[b, ch, ny, nx] += attn[b, h, t, i, j] * grad_out[b, ch, i, j]
    return dattn, dv


def qk_backward(grad_logits, q, k, heads, kernel_size, bias=None, rel=None, scale=None,
                dilation=1, stride=1, border="mask", similarity="dot", key_bias=None):
    """(dq, dk, dbias, drel, dkey_bias); gradients at masked slots, and at slots whose key
    has key_bias -inf (removed), ignored."""
    _, by_q, by_k = SIMILARITY[similarity]
    grad_logits, q, k = (np.asarray(a, np.float64) for a in (grad_logits, q, k))
    B, Dqk, H, W, kh, kw, dh, dw, sh, sw, Ho, Wo = _setup(q, heads, kernel_size, dilation, stride)
    scale = 1 / math.sqrt(Dqk) if scale is None else scale
    dq, dk = np.zeros(q.shape), np.zeros(k.shape)
    dbias = None if bias is None else np.zeros(np.shape(bias))
    drel = None if rel is None else np.zeros(np.shape(rel))
    dkey_bias = None if key_bias is None else np.zeros(np.shape(key_bias))
    for b in range(B):
        for h in range(heads):
            ch = slice(h * Dqk, (h + 1) * Dqk)
            for i in range(Ho):
                for j in range(Wo):
                    qc = q[b, ch, i * sh, j * sw]
                    for t, ny, nx, ay, ax, valid in _window(H, W, kh, kw, dh, dw, sh, sw, border, i, j):
                        if not valid and border == "mask":
                            continue
                        if _removed(key_bias, b, h, ny, nx, valid):
                            continue
                        g = grad_logits[b, h, t, i, j]
                        kn = k[b, ch, ny, nx] if valid else np.zeros(Dqk)
                        relt = rel[h, :, ay, ax] if rel is not None else 0.0
                        kr = kn + relt
                        dq[b, ch, i * sh, j * sw] += scale * g * np.array(
                            [by_q(float(a), float(c)) for a, c in zip(qc, kr)])
                        if valid:
                            dk[b, ch, ny, nx] += scale * g * np.array(
                                [by_k(float(a), float(c)) for a, c in zip(qc, kr)])
                            if dkey_bias is not None:
                                dkey_bias[b, h, ny, nx] += g
                        if dbias is not None:
                            dbias[h, ay, ax] += g
                        if drel is not None:
                            drel[h, :, ay, ax] += scale * g * qc
    return dq, dk, dbias, drel, dkey_bias


def attention_backward(grad_out, q, k, v, heads, kernel_size, bias=None, rel=None, scale=None,
                       dilation=1, stride=1, border="mask", similarity="dot", key_bias=None):
    """(dq, dk, dv, dbias, drel, dkey_bias) by the chain rule through qk, softmax and av."""
    logits = qk(q, k, heads, kernel_size, bias, rel, scale, dilation, stride, border,
                similarity, key_bias)
    p, _ = softmax(logits)
    dp, dv = av_backward(grad_out, p, v, kernel_size, dilation, stride, border, key_bias)
    dlogits = p * (dp - (p * dp).sum(axis=2, keepdims=True))
    dq, dk, dbias, drel, dkey_bias = qk_backward(dlogits, q, k, heads, kernel_size, bias, rel,
                                                 scale, dilation, stride, border, similarity,
                                                 key_bias)
    return dq, dk, dv, dbias, drel, dkey_bias
