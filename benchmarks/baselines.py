"""Baselines the benchmarks compare against, written from the seed's description.

Every baseline is a plain PyTorch function (autograd gives its backward) and has an
*equivalent call of ours*: :func:`canonical` maps a case's inputs onto one
``local_attention2d(q, k, v, heads, kernel_size, bias=, rel=, scale=, border=)`` call, so
that each baseline can be checked against our reference on the same inputs before it is
timed (the benchmarks compare equal work).

- :func:`lrnet_unfold`: the seed's ``LocalRelationalLayer`` aggregation, fixed so that it
  runs: ``nn.Unfold`` output viewed as ``(B, heads, K, H, W)``, padding ``k//2`` (the contract's
  ``border="zeros"``), the geometry prior a ``(heads, kh, kw)`` logit table, scale 1, the
  unfolded values weighted and summed (the ``k*k``-times-larger tensors are kept: that is
  the memory complaint).
- :func:`sasa_seed_unfold`: the seed's SASA ``AttentionConv`` after its 1x1 convs: pad,
  ``Tensor.unfold`` twice, ``rel_h``/``rel_w`` added to the first/second half of *all*
  channels, element-wise ``q*k`` and a softmax per channel. Equals ours with
  ``heads=C, Dqk=Dv=1, border="zeros", scale=1``.
- :func:`sasa_paper_unfold`: SASA as the paper states it (dot product over the channels
  of each head, ``rel_h``/``rel_w`` over the halves of each head's channels), with unfold.
  Equals ``sasa2d(..., border="zeros", scale=1)``.
- :func:`flex_neighbourhood`: FlexAttention over flattened tokens with a 2-D
  neighbourhood ``mask_mod`` + block mask, bias/rel through ``score_mod``. Out-of-image
  keys do not exist there, so it equals ours with ``border="mask"``. CUDA only (torch >= 2.5);
  :func:`flex_status` says why it is skipped otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------------------
# Unfold baselines
# ---------------------------------------------------------------------------------------


def _windows(x: torch.Tensor, k: int, stride: int = 1) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, k*k, Ho, Wo)`` zero-padded windows (``F.unfold``)."""
    B, C, H, W = x.shape
    cols = F.unfold(x, k, padding=k // 2, stride=stride)  # (B, C*k*k, Ho*Wo), channel-major
    ho, wo = -(-H // stride), -(-W // stride)
    return cols.view(B, C, k * k, ho, wo)


def lrnet_unfold(x, key, query, geometry, kernel_size: int, stride: int = 1):
    """LR-Net aggregation with ``nn.Unfold`` (the seed's layer, fixed).

    x ``(B, C, H, W)`` values; key/query ``(B, heads, H, W)`` (one channel per head, the
    seed's ``KeyQueryMap`` output); geometry ``(heads, k, k)``. Channels ``h*C/heads ...``
    share head ``h``'s weights. Returns ``(B, C, Ho, Wo)``.
    """
    k = kernel_size
    B, C, H, W = x.shape
    heads = key.shape[1]
    kw = _windows(key, k, stride)                                   # (B, heads, K, Ho, Wo)
    qc = query[:, :, ::stride, ::stride].unsqueeze(2)                # (B, heads, 1, Ho, Wo)
    logits = qc * kw + geometry.reshape(1, heads, k * k, 1, 1)       # appearance + geometry
    p = torch.softmax(logits, dim=2)
    xw = _windows(x, k, stride)                                      # (B, C, K, Ho, Wo)
    xw = xw.view(B, heads, C // heads, k * k, *xw.shape[-2:])
    out = (p.unsqueeze(2) * xw).sum(dim=3)                           # (B, heads, C/heads, Ho, Wo)
    return out.reshape(B, C, *out.shape[-2:])


def sasa_seed_unfold(q, k, v, rel_h, rel_w, kernel_size: int):
    """The seed's ``AttentionConv.forward`` after its 1x1 convs (stride 1, groups ignored).

    q, k, v ``(B, C, H, W)`` (C even); rel_h, rel_w ``(C/2, k)``: the row embedding is added
    to the keys of the first C/2 channels, the column embedding to the last C/2.
    """
    ks = kernel_size
    B, C, H, W = q.shape
    p = ks // 2
    k_out = F.pad(k, [p, p, p, p]).unfold(2, ks, 1).unfold(3, ks, 1)  # (B, C, H, W, ks, ks)
    v_out = F.pad(v, [p, p, p, p]).unfold(2, ks, 1).unfold(3, ks, 1)
    k_h, k_w = k_out.split(C // 2, dim=1)
    k_out = torch.cat((k_h + rel_h.reshape(C // 2, 1, 1, ks, 1),
                       k_w + rel_w.reshape(C // 2, 1, 1, 1, ks)), dim=1)
    k_out = k_out.contiguous().view(B, C, H, W, -1)
    v_out = v_out.contiguous().view(B, C, H, W, -1)
    out = torch.softmax(q.unsqueeze(-1) * k_out, dim=-1)
    return torch.einsum("bchwk,bchwk->bchw", out, v_out)


def _sasa_rel(rel_h, rel_w):
    """``(heads, d/2, kh)``, ``(heads, d/2, kw)`` -> ``rel`` ``(heads, d, kh, kw)``."""
    heads, half, kh = rel_h.shape
    kw = rel_w.shape[2]
    rows = rel_h[:, :, :, None].expand(heads, half, kh, kw)
    cols = rel_w[:, :, None, :].expand(heads, half, kh, kw)
    return torch.cat([rows, cols], dim=1)


def sasa_paper_unfold(q, k, v, rel_h, rel_w, heads: int, kernel_size: int, stride: int = 1):
    """SASA as in the paper: per-head dot product, row/column embeddings, unfold windows.

    q, k ``(B, heads*d, H, W)``; v ``(B, heads*dv, H, W)``; rel_h ``(heads, d/2, k)``,
    rel_w ``(heads, d/2, k)``. No ``1/sqrt(d)``.
    """
    ks = kernel_size
    B, Cq, H, W = q.shape
    d, dv = Cq // heads, v.shape[1] // heads
    kw = _windows(k, ks, stride)                                     # (B, Cq, K, Ho, Wo)
    ho, wo = kw.shape[-2:]
    kw = kw.view(B, heads, d, ks * ks, ho, wo)
    rel = _sasa_rel(rel_h, rel_w).reshape(1, heads, d, ks * ks, 1, 1)
    qc = q[:, :, ::stride, ::stride].reshape(B, heads, d, 1, ho, wo)
    logits = (qc * (kw + rel)).sum(dim=2)                            # (B, heads, K, Ho, Wo)
    p = torch.softmax(logits, dim=2)
    vw = _windows(v, ks, stride).view(B, heads, dv, ks * ks, ho, wo)
    out = (p.unsqueeze(2) * vw).sum(dim=3)
    return out.reshape(B, heads * dv, ho, wo)


# ---------------------------------------------------------------------------------------
# FlexAttention (CUDA)
# ---------------------------------------------------------------------------------------

def flex_status(device) -> tuple[bool, str]:
    """``(usable, why not)`` for the FlexAttention baseline on ``device``."""
    try:
        from torch.nn.attention import flex_attention as _fa  # noqa: F401
    except Exception as exc:  # torch < 2.5
        return False, f"torch {torch.__version__} has no FlexAttention ({exc})"
    if torch.device(device).type != "cuda":
        return False, "FlexAttention baseline runs on CUDA only (CPU run: skipped)"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


_FLEX_CACHE: dict = {}


def _flex_fn():
    if "fn" not in _FLEX_CACHE:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX_CACHE["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX_CACHE["fn"]


def flex_block_mask(H: int, W: int, kernel_size: int, device):
    """Block mask of the 2-D ``kernel_size`` neighbourhood over row-major tokens (cached)."""
    from torch.nn.attention.flex_attention import create_block_mask
    key = (H, W, kernel_size, str(device))
    if key not in _FLEX_CACHE:
        r = kernel_size // 2

        def mask_mod(b, h, q_idx, kv_idx):
            dy = kv_idx // W - q_idx // W
            dx = kv_idx % W - q_idx % W
            return (dy.abs() <= r) & (dx.abs() <= r)

        _FLEX_CACHE[key] = create_block_mask(mask_mod, B=None, H=None, Q_LEN=H * W,
                                             KV_LEN=H * W, device=str(device))
    return _FLEX_CACHE[key]


def flex_neighbourhood(q, k, v, heads: int, kernel_size: int, *, bias=None, rel=None,
                       scale: float = 1.0, compiled: bool = True):
    """Neighbourhood attention (``border="mask"``) with FlexAttention.

    q, k ``(B, heads*d, H, W)``, v ``(B, heads*dv, H, W)``; bias ``(heads, k, k)``;
    rel ``(heads, d, k, k)`` with SASA's structure (rows in the first half of ``d``, columns
    in the second) or ``None``. Head dims are zero-padded to ``max(16, pow2)`` (FlexAttention
    does not take ``d = 1``); zero channels change no dot product.
    """
    from torch.nn.attention.flex_attention import flex_attention
    ks = kernel_size
    r = ks // 2
    B, Cq, H, W = q.shape
    d, dv = Cq // heads, v.shape[1] // heads
    n = H * W
    D = max(16, 1 << (max(d, dv) - 1).bit_length())

    def tokens(x, per):
        t = x.reshape(B, heads, per, n).transpose(2, 3)              # (B, heads, N, per)
        return F.pad(t, (0, D - per))

    qt, kt, vt = tokens(q, d), tokens(k, d), tokens(v, dv)
    bias_t = bias
    qr_h = qr_w = None
    if rel is not None:
        # q . rel[:, :, ty, tx] = q[:d/2] . rel_rows[ty] + q[d/2:] . rel_cols[tx]: two small
        # per-query tables instead of one of K entries.
        half = d // 2
        rows, cols = rel[:, :half, :, 0], rel[:, half:, 0, :]        # (heads, d/2, k)
        qf = q.reshape(B, heads, d, n)
        qr_h = scale * torch.einsum("bhdn,hdt->bhnt", qf[:, :, :half], rows)
        qr_w = scale * torch.einsum("bhdn,hdt->bhnt", qf[:, :, half:], cols)

    def score_mod(score, b, h, q_idx, kv_idx):
        ty = kv_idx // W - q_idx // W + r
        tx = kv_idx % W - q_idx % W + r
        # Clamp: score_mod is also evaluated at masked pairs.
        ty = ty.clamp(0, ks - 1)
        tx = tx.clamp(0, ks - 1)
        if bias_t is not None:
            score = score + bias_t[h, ty, tx]
        if qr_h is not None:
            score = score + qr_h[b, h, q_idx, ty] + qr_w[b, h, q_idx, tx]
        return score

    mask = flex_block_mask(H, W, ks, q.device)
    fn = _flex_fn() if compiled else flex_attention
    mod = score_mod if (bias is not None or rel is not None) else None
    out = fn(qt, kt, vt, score_mod=mod, block_mask=mask, scale=scale)  # (B, heads, N, D)
    out = out[..., :dv].transpose(2, 3).reshape(B, heads * dv, H, W)
    return out


# ---------------------------------------------------------------------------------------
# Cases: inputs of one baseline and the equivalent call of ours
# ---------------------------------------------------------------------------------------

BASELINES = ("lrnet-unfold", "lrnet-flex", "sasa-seed-unfold", "sasa-unfold", "sasa-flex")

# Which op shape each baseline belongs to (the "family" of the headline table).
FAMILY = {"lrnet-unfold": "lrnet", "lrnet-flex": "lrnet", "sasa-seed-unfold": "sasa",
          "sasa-unfold": "sasa", "sasa-flex": "sasa"}


def shape_of(baseline: str, C: int) -> tuple[int, int, int]:
    """``(heads, Dqk, Dv)`` of a baseline at ``C`` value channels.

    LR-Net: heads=C/8, Dqk=1, Dv=8. SASA: heads=8, Dqk=Dv=C/8, except the seed's SASA,
    which is per-channel (heads=C, Dqk=Dv=1).
    """
    if FAMILY[baseline] == "lrnet":
        return C // 8, 1, 8
    if baseline == "sasa-seed-unfold":
        return C, 1, 1
    return 8, C // 8, C // 8


@dataclass
class Case:
    baseline: str
    B: int
    C: int
    H: int
    W: int
    k: int
    dtype: torch.dtype
    device: str
    inputs: dict = field(default_factory=dict)   # the baseline's own arguments (leaves)

    @property
    def heads_dqk_dv(self):
        return shape_of(self.baseline, self.C)

    @property
    def border(self) -> str:
        return "mask" if self.baseline.endswith("flex") else "zeros"

    def label(self) -> str:
        h, dq, dv = self.heads_dqk_dv
        return (f"B={self.B} C={self.C} {self.H}x{self.W} k={self.k} heads={h} Dqk={dq} "
                f"Dv={dv}")

    # -- the baseline --------------------------------------------------------------------
    def run_baseline(self, inputs=None):
        a = self.inputs if inputs is None else inputs
        heads, _, _ = self.heads_dqk_dv
        if self.baseline == "lrnet-unfold":
            return lrnet_unfold(a["x"], a["key"], a["query"], a["geometry"], self.k)
        if self.baseline == "sasa-seed-unfold":
            return sasa_seed_unfold(a["q"], a["k"], a["v"], a["rel_h"], a["rel_w"], self.k)
        if self.baseline == "sasa-unfold":
            return sasa_paper_unfold(a["q"], a["k"], a["v"], a["rel_h"], a["rel_w"], heads,
                                     self.k)
        c = self.canonical(a)
        return flex_neighbourhood(c["q"], c["k"], c["v"], c["heads"], self.k, bias=c["bias"],
                                  rel=c["rel"], scale=c["scale"])

    # -- ours ----------------------------------------------------------------------------
    def canonical(self, inputs=None) -> dict:
        """The equivalent ``local_attention2d`` arguments (torch tensors, differentiable)."""
        a = self.inputs if inputs is None else inputs
        heads, dqk, _ = self.heads_dqk_dv
        base = dict(heads=heads, kernel_size=self.k, scale=1.0, border=self.border,
                    bias=None, rel=None)
        if FAMILY[self.baseline] == "lrnet":
            return dict(base, q=a["query"], k=a["key"], v=a["x"], bias=a["geometry"])
        if self.baseline == "sasa-seed-unfold":
            C, k = self.C, self.k
            rows = a["rel_h"].reshape(C // 2, 1, k, 1).expand(C // 2, 1, k, k)
            cols = a["rel_w"].reshape(C // 2, 1, 1, k).expand(C // 2, 1, k, k)
            return dict(base, q=a["q"], k=a["k"], v=a["v"], rel=torch.cat([rows, cols], 0))
        return dict(base, q=a["q"], k=a["k"], v=a["v"], rel=_sasa_rel(a["rel_h"], a["rel_w"]))


def make_case(baseline: str, B: int, C: int, H: int, W: int, k: int, *,
              dtype=torch.float32, device="cpu", seed: int = 0) -> Case:
    """Random inputs (std 1 features, small tables) for one baseline."""
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    g = torch.Generator().manual_seed(seed)
    heads, dqk, dv = shape_of(baseline, C)

    def rnd(*shape, std=1.0):
        return (std * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)

    if FAMILY[baseline] == "lrnet":
        inputs = dict(x=rnd(B, heads * dv, H, W), key=rnd(B, heads, H, W),
                      query=rnd(B, heads, H, W), geometry=rnd(heads, k, k, std=0.5))
    elif baseline == "sasa-seed-unfold":
        inputs = dict(q=rnd(B, C, H, W), k=rnd(B, C, H, W), v=rnd(B, C, H, W),
                      rel_h=rnd(C // 2, k, std=0.5), rel_w=rnd(C // 2, k, std=0.5))
    else:
        s = 1.0 / math.sqrt(dqk)  # keep logits O(1) whatever Dqk
        inputs = dict(q=rnd(B, heads * dqk, H, W, std=s), k=rnd(B, heads * dqk, H, W),
                      v=rnd(B, heads * dv, H, W), rel_h=rnd(heads, dqk // 2, k, std=0.5),
                      rel_w=rnd(heads, dqk // 2, k, std=0.5))
    return Case(baseline, B, C, H, W, k, dtype, device, inputs)


# ---------------------------------------------------------------------------------------
# Ours, on the canonical arguments
# ---------------------------------------------------------------------------------------

def _to_array(t, xp):
    if t is None:
        return None
    t = t.detach().contiguous()
    if xp is np:
        if t.dtype == torch.bfloat16:
            raise TypeError("bfloat16 has no NumPy dtype")
        return t.cpu().numpy()
    return xp.from_dlpack(t)


def ours_arrays(case: Case, xp=np) -> dict:
    """The canonical arguments as NumPy (or CuPy) arrays, ready for ``local_attention2d``."""
    c = case.canonical()
    return {name: (_to_array(val, xp) if isinstance(val, torch.Tensor) else val)
            for name, val in c.items()}


def ours_forward(a: dict, *, return_lse=False, backend=None):
    from cupy_localrel import local_attention2d
    return local_attention2d(a["q"], a["k"], a["v"], a["heads"], a["kernel_size"],
                             bias=a["bias"], rel=a["rel"], scale=a["scale"],
                             border=a["border"], return_lse=return_lse, backend=backend)


def ours_forward_backward(a: dict, grad_out, *, backend=None):
    """Forward (with lse) then backward; returns ``(out, grads)``."""
    from cupy_localrel import local_attention2d_backward
    out, lse = ours_forward(a, return_lse=True, backend=backend)
    grads = local_attention2d_backward(grad_out, a["q"], a["k"], a["v"], out, lse, a["heads"],
                                       a["kernel_size"], bias=a["bias"], rel=a["rel"],
                                       scale=a["scale"], border=a["border"], backend=backend)
    return out, grads


def torch_adapter():
    """``cupy_localrel.adapters.torch`` if importable with a ``local_attention2d``, else None."""
    try:
        from cupy_localrel.adapters import torch as adapter
    except Exception:
        return None
    return adapter if hasattr(adapter, "local_attention2d") else None


def ours_torch(case: Case, inputs=None):
    """Ours through the torch adapter (autograd), on the canonical arguments."""
    adapter = torch_adapter()
    if adapter is None:
        raise RuntimeError("cupy_localrel.adapters.torch.local_attention2d is not available")
    c = case.canonical(inputs)
    return adapter.local_attention2d(c["q"], c["k"], c["v"], c["heads"], c["kernel_size"],
                                     bias=c["bias"], rel=c["rel"], scale=c["scale"],
                                     border=c["border"])


# ---------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 5e-3,
             torch.bfloat16: 3e-2}


def rel_error(a, b) -> float:
    """max |a - b| / max(1, max |b|), in float64."""
    a = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).double().cpu()
    b = torch.as_tensor(np.asarray(b) if not isinstance(b, torch.Tensor) else b).double().cpu()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


def check_forward(case: Case, ours_out=None, tol: float | None = None) -> float:
    """Max relative error of the baseline's output against ours; raises if over ``tol``.

    ``ours_out``: our output if already computed (NumPy/CuPy/torch), else our NumPy
    reference is run on the same inputs (float32 for half dtypes on the CPU).
    """
    with torch.no_grad():
        got = case.run_baseline()
    return check_output(case, got, case.baseline, ours_out, tol)


def check_output(case: Case, got: torch.Tensor, what: str, ours_out=None,
                 tol: float | None = None) -> float:
    """Max relative error of ``got`` (``what``'s output on ``case``) against our reference;
    raises if over ``tol`` (default twice the contract's tolerance of the dtype). ``ours_out`` as
    in :func:`check_forward`."""
    if ours_out is None:
        a = ours_arrays(Case(**{**case.__dict__, "inputs": {
            n: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
            for n, t in case.inputs.items()}}))
        ours_out = ours_forward(a)
    if not isinstance(ours_out, (np.ndarray, torch.Tensor)):
        ours_out = torch.from_dlpack(ours_out)
    err = rel_error(got.float() if got.dtype != torch.float64 else got, ours_out)
    limit = 2 * TOLERANCE[case.dtype] if tol is None else tol
    if not err <= limit:
        raise AssertionError(f"{what} ({case.label()}, {case.dtype}) differs from "
                             f"ours: max rel error {err:.3g} > {limit:.3g}")
    return err
