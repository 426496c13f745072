"""The papers' layers as ``nn.Module``s on top of the custom ops.

- :class:`LocalRelation2d`: the local relation layer of LR-Net (Hu et al., ICCV 2019).
- :class:`SASA2d`: the stand-alone self-attention layer (Ramachandran et al., NeurIPS 2019).
- :class:`AttentionStem`: SASA's attention stem with spatially-aware values.

Both main layers take ``(B, C, H, W)`` and drop into a ResNet bottleneck in place of its
3x3 conv (:mod:`.models`). The attention itself always runs in the core through the
custom ops; the layers hold the parameters (projections, geometry prior, embeddings).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cupy_localrel import _geometry as G

from ._convert import check_tensors
from ._ops import local_av2d, local_qk2d, local_relation2d, sasa2d

__all__ = ["LocalRelation2d", "SASA2d", "AttentionStem", "relative_offsets", "padding_key_bias"]


def padding_key_bias(valid: torch.Tensor, heads: int, dtype=torch.float32) -> torch.Tensor:
    """A padding mask as ``key_bias``: ``valid`` ``(B, H, W)`` (true on real pixels) ->
    ``(B, heads, H, W)``, 0 on real pixels and ``-inf`` on padding, so that no window
    attends a padded key (docs/contract.md, "Per-key logit")."""
    if valid.dim() != 3:
        raise ValueError(f"valid must be a (B, H, W) mask, got shape {tuple(valid.shape)}")
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    bias = bias.masked_fill(~valid.bool(), float("-inf"))
    return bias[:, None].expand(-1, G.check_heads(heads), -1, -1).contiguous()


def relative_offsets(kernel_size, border: str = "mask") -> torch.Tensor:
    """The true relative offsets ``(dy, dx)`` of each window slot, scaled to ``[-1, 1]``.

    Shape ``(1, 2, Th, Tw)`` (channel 0: row offset, channel 1: column offset), indexed
    like the ``bias`` table of docs/contract.md: ``(kh, kw)`` slots for centred borders (slot ``t``
    has offset ``t - k//2``), ``(2kh-1, 2kw-1)`` relative offsets ``-(k-1) .. k-1`` for
    ``border="shift"``. Dilation scales every offset alike, so it does not change them.
    """
    kh, kw = G.to_pair(kernel_size, "kernel_size")

    def axis(k):
        steps = torch.from_numpy(G.table_offsets(k, G.check_border(border))).to(torch.float32)
        return steps / max(float(steps.abs().max()), 1.0)

    dy, dx = torch.meshgrid(axis(kh), axis(kw), indexing="ij")
    return torch.stack([dy, dx])[None]


class LocalRelation2d(nn.Module):
    """Local relation layer (LR-Net): ``(B, C, H, W) -> (B, C, ceil(H/s), ceil(W/s))``.

    Aggregation weights ``softmax_p(scale * q(p') k(p) + f_g(p - p'))`` over a ``k x k``
    window, one weight map per ``m`` channels (``heads = C / m``), applied to the input
    itself (values = ``x``). Key and query maps are 1x1 convs to ``C/m`` channels, one per
    head (``Dqk = 1``, the dot-product composability of the official op). The geometry
    prior ``f_g`` is a small MLP (1x1 conv -> ReLU -> 1x1 conv) over the true relative
    offsets of the window slots (a buffer, :func:`relative_offsets`), giving one logit per
    (head, slot).

    The layer returns the aggregated features; LR-Net's bottleneck follows it with BN,
    ReLU and its 1x1 conv (:mod:`.models`). ``final_conv=True`` adds the seed's own 1x1
    conv inside the layer; ``border="zeros"`` reproduces the seed's zero padding (out-of-
    image neighbours take softmax weight with a zero key and value).

    LR-Net's other compositions: ``similarity=`` picks ``phi(q, k)`` of the logit (the
    official op's six, docs/contract.md), and ``key_saliency=True`` adds the key-saliency
    term: one more 1x1-conv channel per head (``self.saliency``) whose output is the
    ``key_bias`` of every window slot that looks at that key. ``forward(x, key_bias=...)``
    also takes a ``(B, heads, H, W)`` key_bias, e.g. a padding mask
    (:func:`padding_key_bias`), added to the saliency.

    Args:
        channels: ``C``, divisible by ``m``.
        kernel_size: window size (odd for ``"mask"``/``"zeros"``), default 7.
        m: channels sharing one weight map, default 8.
        stride: output ``(i, j)`` is centred on input ``(i*s, j*s)``. dilation: window dilation.
        border: ``"mask"`` (the official op: out-of-image neighbours are left out),
            ``"zeros"`` (the seed), ``"shift"`` (NATTEN-style windows).
        geometry_hidden: hidden width of the geometry MLP; default ``max(8, heads // 2)``
            (the seed's multiplier 0.5, with a floor so narrow layers keep a usable prior).
        scale: appearance-composability scale (default 1, as the paper).
        final_conv: add the seed's trailing 1x1 conv.
        similarity: ``"dot"`` (default), ``"key"``, ``"neg_abs"``, ``"neg_abs_normalized"``,
            ``"neg_square_normalized"`` or ``"neg_square"``.
        key_saliency: add the key-saliency conv (one channel per head).
    """

    def __init__(self, channels, kernel_size=7, m=8, stride=1, dilation=1, border="mask",
                 *, geometry_hidden=None, scale=1.0, final_conv=False, similarity="dot",
                 key_saliency=False):
        super().__init__()
        # Everything a forward would reject for any input is rejected here, by name.
        G.check_heads(channels, "channels"), G.check_heads(m, "m")
        if channels % m:
            raise ValueError(f"m={m} must divide channels={channels}")
        if geometry_hidden is not None:
            G.check_heads(geometry_hidden, "geometry_hidden")
        G.check_border(border)
        self.channels, self.m, self.heads = channels, m, channels // m
        self.kernel_size = G.to_pair(kernel_size, "kernel_size")
        G.check_kernel_for_border(self.kernel_size, border)
        self.stride, self.dilation = G.to_pair(stride, "stride"), G.to_pair(dilation, "dilation")
        self.border, self.scale = border, G.check_papers_scale(scale)
        self.key = nn.Conv2d(channels, self.heads, 1)
        self.query = nn.Conv2d(channels, self.heads, 1)
        hidden = geometry_hidden or max(8, self.heads // 2)
        self.geometry_prior = nn.Sequential(nn.Conv2d(2, hidden, 1), nn.ReLU(inplace=True),
                                            nn.Conv2d(hidden, self.heads, 1))
        self.register_buffer("offsets", relative_offsets(self.kernel_size, border))
        self.final = nn.Conv2d(channels, channels, 1) if final_conv else None
        self.similarity = G.check_similarity(similarity)
        self.saliency = nn.Conv2d(channels, self.heads, 1) if key_saliency else None

    def geometry(self) -> torch.Tensor:
        """The geometry-prior logits ``(heads, Th, Tw)`` (the ``bias`` of docs/contract.md)."""
        return self.geometry_prior(self.offsets)[0]

    def forward(self, x, key_bias=None):
        """``x`` ``(B, C, H, W)``; ``key_bias`` ``(B, heads, H, W)`` or ``None`` (e.g. a
        padding mask, added to the key saliency when the layer has one)."""
        if self.saliency is not None:
            saliency = self.saliency(x)
            if key_bias is not None:   # checked before the sum, which would promote a
                # bool or lower-precision mask and broadcast a wrong shape
                check_tensors("LocalRelation2d", dict(x=x, key_bias=key_bias))
                G.check_shape(key_bias, "key_bias", tuple(saliency.shape))
            key_bias = saliency if key_bias is None else saliency + key_bias
        out = local_relation2d(x, self.key(x), self.query(x), self.geometry(), self.kernel_size,
                               scale=self.scale, dilation=self.dilation, stride=self.stride,
                               border=self.border, similarity=self.similarity, key_bias=key_bias)
        return out if self.final is None else self.final(out)

    def extra_repr(self):
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, m={self.m}, "
                f"stride={self.stride}, dilation={self.dilation}, border={self.border!r}, "
                f"similarity={self.similarity!r}, key_saliency={self.saliency is not None}")


class SASA2d(nn.Module):
    """Stand-alone self-attention: ``(B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s))``.

    ``softmax_ab(q_ij . k_ab + q_ij . r_{a-i, b-j}) v_ab`` over a ``k x k`` window per head,
    no ``1/sqrt(d)`` (``scale=1``). The q/k/v projections are block-diagonal (grouped 1x1
    convs with ``groups=heads``); ``r`` is the concatenation of a row embedding
    ``rel_h (heads, Dqk/2, k)`` and a column embedding ``rel_w (heads, Dqk/2, k)``.

    Stride 2 as in the paper: attention at stride 1, then a 2x2 average pool (stride 2;
    ``ceil_mode`` so odd sizes give ``ceil(H/2)`` like a strided conv).
    ``downsample="subsample"`` uses the op's own stride instead (queries on every other
    pixel, cheaper). ``border="zeros"`` reproduces the seed's zero padding.

    Args:
        in_channels, out_channels: both divisible by ``heads``; ``out_channels / heads``
            (``Dqk = Dv``) even.
        kernel_size: odd window size, default 7. heads: default 8.
        rel_std: standard deviation of the embeddings' initialisation (the seed's 1).
        projection: ``"grouped"`` (block-diagonal, the paper's text) or ``"dense"``
            (full 1x1 projections; the paper's parameter counts match this one).
    """

    def __init__(self, in_channels, out_channels, kernel_size=7, heads=8, stride=1,
                 border="mask", downsample="pool", *, dilation=1, scale=1.0, bias=False,
                 rel_std=1.0, projection="grouped"):
        super().__init__()
        G.check_heads(heads)
        G.check_heads(in_channels, "in_channels"), G.check_heads(out_channels, "out_channels")
        if in_channels % heads or out_channels % heads:
            raise ValueError(f"heads={heads} must divide in_channels={in_channels} and "
                             f"out_channels={out_channels}")
        if (out_channels // heads) % 2:
            raise ValueError(f"out_channels/heads must be even (half rows, half columns), "
                             f"got {out_channels}/{heads}")
        if border not in G.CENTRED_BORDERS:
            raise ValueError(f"SASA2d needs border 'mask' or 'zeros', got {border!r}")
        if downsample not in ("pool", "subsample"):
            raise ValueError(f"downsample must be 'pool' or 'subsample', got {downsample!r}")
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.kernel_size = G.to_pair(kernel_size, "kernel_size")
        G.check_kernel_for_border(self.kernel_size, border)
        self.stride, self.dilation = G.to_pair(stride, "stride"), G.to_pair(dilation, "dilation")
        if projection not in ("grouped", "dense"):
            raise ValueError(f"projection must be 'grouped' or 'dense', got {projection!r}")
        self.border, self.downsample = border, downsample
        self.scale = G.check_papers_scale(scale)
        groups = heads if projection == "grouped" else 1
        self.query = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=bias)
        self.key = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=bias)
        self.value = nn.Conv2d(in_channels, out_channels, 1, groups=groups, bias=bias)
        half = out_channels // heads // 2
        self.rel_h = nn.Parameter(torch.randn(heads, half, self.kernel_size[0]) * rel_std)
        self.rel_w = nn.Parameter(torch.randn(heads, half, self.kernel_size[1]) * rel_std)
        pooled = downsample == "pool" and self.stride != (1, 1)
        self.pool = nn.AvgPool2d(self.stride, self.stride, ceil_mode=True) if pooled else None
        for conv in (self.query, self.key, self.value):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x, key_bias=None):
        """``x`` ``(B, C_in, H, W)``; ``key_bias`` ``(B, heads, H, W)`` or ``None``: a per-key
        logit, e.g. a padding mask (:func:`padding_key_bias`: ``-inf`` on padded pixels)."""
        op_stride = (1, 1) if self.pool is not None else self.stride
        out = sasa2d(self.query(x), self.key(x), self.value(x), self.rel_h, self.rel_w,
                     self.heads, self.kernel_size, scale=self.scale, dilation=self.dilation,
                     stride=op_stride, border=self.border, key_bias=key_bias)
        return out if self.pool is None else self.pool(out)

    def extra_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"heads={self.heads}, stride={self.stride}, border={self.border!r}, "
                f"downsample={self.downsample!r}")


class AttentionStem(nn.Module):
    """SASA's attention stem with spatially-aware values (a documented simplification).

    The paper's stem: attention over a small spatial extent (4x4) whose values depend on
    where they sit in the window, ``v_ab = sum_m p(a, b, m) W_V^m x_ab`` with
    ``p(a, b, m) = softmax_m(emb_row[m, a] + emb_col[m, b])``, then BatchNorm and a 4x4 max
    pool (added by :mod:`.models`). Since ``sum_t w_t sum_m p_tm V^m x_t
    = sum_m sum_t (w_t p_tm) V^m x_t``, it runs as one :func:`local_qk2d` (logits with the
    SASA row/column embeddings), a softmax over the window, and one :func:`local_av2d` over
    ``mixtures * heads`` weight maps. Simplification: centred windows need an odd size, so
    the default window is 5x5 (the paper's 4x4 extent is even); q/k/v are dense 1x1
    projections (3 input channels cannot be split into 4 groups).
    """

    def __init__(self, in_channels, out_channels, kernel_size=5, heads=4, mixtures=4,
                 border="mask", stride=1):
        super().__init__()
        G.check_heads(heads), G.check_heads(mixtures, "mixtures")
        if out_channels % heads or (out_channels // heads) % 2:
            raise ValueError(f"out_channels/heads must be an even integer, got "
                             f"{out_channels}/{heads}")
        self.heads, self.mixtures, self.out_channels = heads, mixtures, out_channels
        self.kernel_size = G.to_pair(kernel_size, "kernel_size")
        G.check_kernel_for_border(self.kernel_size, G.check_border(border))
        self.border, self.stride = border, G.to_pair(stride, "stride")
        kh, kw = self.kernel_size
        half = out_channels // heads // 2
        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.value = nn.Conv2d(in_channels, mixtures * out_channels, 1, bias=False)
        self.rel_h = nn.Parameter(torch.randn(heads, half, kh))
        self.rel_w = nn.Parameter(torch.randn(heads, half, kw))
        self.mix_row = nn.Parameter(torch.randn(mixtures, kh) * 0.1)
        self.mix_col = nn.Parameter(torch.randn(mixtures, kw) * 0.1)

    def forward(self, x):
        kh, kw = self.kernel_size
        heads, mixtures = self.heads, self.mixtures
        half = self.rel_h.shape[1]
        # rel[h, :half, a, b] = rel_h[h, :, a]; rel[h, half:, a, b] = rel_w[h, :, b] (docs/contract.md).
        rel = torch.cat([self.rel_h[:, :, :, None].expand(heads, half, kh, kw),
                         self.rel_w[:, :, None, :].expand(heads, half, kh, kw)], dim=1)
        logits = local_qk2d(self.query(x), self.key(x), heads, self.kernel_size,
                            rel=rel.contiguous(), scale=1.0, stride=self.stride,
                            border=self.border)
        weights = torch.softmax(logits, dim=2)                          # (B, heads, K, Ho, Wo)
        mix = torch.softmax(self.mix_row[:, :, None] + self.mix_col[:, None, :], dim=0)
        mix = mix.reshape(mixtures, 1, kh * kw, 1, 1).to(weights.dtype)  # (M, 1, K, 1, 1)
        b, _, k, ho, wo = weights.shape
        weights = (weights[:, None] * mix[None]).reshape(b, mixtures * heads, k, ho, wo)
        out = local_av2d(weights, self.value(x), self.kernel_size, stride=self.stride,
                         border=self.border)
        return out.reshape(b, mixtures, self.out_channels, ho, wo).sum(dim=1)
