"""The papers' networks: ResNet bottlenecks with local relation or SASA layers.

- ``lrnet26/38/50``: LR-Net (Hu et al. 2019). Every 3x3 conv of the bottlenecks becomes a
  7x7 :class:`~.layers.LocalRelation2d` (m = 8, stride in the op, as the official op);
  the bottleneck width is scaled by ``width_factor`` (LR-Net widens the bottleneck to
  keep the FLOPs of ResNet; default 1.875, see :data:`LRNET_WIDTH_FACTOR`). The stem is
  ``stem="relation"`` (a 1x1 conv to 64 channels, then a 7x7 local relation layer with
  stride 2, as LR-Net replaces the 7x7 conv too) or ``stem="conv"``.
- ``sasa_resnet26/38/50``: SASA (Ramachandran et al. 2019). Every 3x3 conv becomes a 7x7
  :class:`~.layers.SASA2d` with 8 heads; stride 2 is attention then a 2x2 average pool.
  q/k/v are dense 1x1 projections by default (``projection="dense"``: the parameter counts
  of the paper's table, docs/papers.md); ``projection="grouped"`` gives the block-diagonal
  projections of the paper's text.
  ``stem="conv"`` (the 7x7 conv stem) or ``stem="attention"``
  (:class:`~.layers.AttentionStem`, BN and a 4x4 max pool).

SASA's ResNet-26/38/50 use [1,2,4,1] / [2,3,5,2] / [3,4,6,3] bottlenecks per stage, LR-Net's
[2,2,2,2] / [2,3,5,2] / [3,4,6,3] (:data:`LRNET_DEPTHS`), with 64/128/256/512 planes and
expansion 4. ``small_input=True`` is the variant for 32x32
images (CIFAR style): the stem keeps stride 1 and has no max pool (conv stem: one 3x3
conv). ``base_width`` scales every stage (64 by default) for small experiments.

``python -m cupy_localrel.adapters.torch.models`` prints the parameter/FLOP table (see
:func:`model_table`).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from functools import partial

import torch
from torch import nn

from .layers import AttentionStem, LocalRelation2d, SASA2d

__all__ = [
    "Bottleneck", "LocalResNet",
    "lrnet26", "lrnet38", "lrnet50", "sasa_resnet26", "sasa_resnet38", "sasa_resnet50",
    "conv_resnet26", "conv_resnet38", "conv_resnet50",
    "count_parameters", "count_flops", "model_table",
]

#: Bottlenecks per stage: SASA's ResNet-26/38/50 (docs/papers.md).
DEPTHS = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}
#: LR-Net's ResNet-26 has 2 bottlenecks in every stage (LR-Net paper; not in its
#: summary in docs/papers.md, but the conv network at this depth has the 16.0M parameters of that paper's
#: ResNet-26 baseline, and LR-Net-26 then lands on its 14.7M). LR-Net reports no 38-layer
#: network: lrnet38 takes the usual 12-block layout.
LRNET_DEPTHS = {26: (2, 2, 2, 2), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}

#: Bottleneck width of LR-Net relative to ResNet's (64/128/256/512 planes).
LRNET_WIDTH_FACTOR = 1.875
# LR-Net's paper (docs/papers.md) does not list its per-stage widths. 1.875 (120/240/480/960 instead of
# 64/128/256/512) is calibrated so that LR-Net-50 lands on the paper's 23.3M parameters and
# 4.3 G multiply-adds within a few percent; LR-Net-26 then lands on its 14.7M too (see
# benchmarks/model_table.md).


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)


class Bottleneck(nn.Module):
    """``1x1 -> spatial -> 1x1`` residual block; ``spatial(width, stride)`` builds the middle."""

    def __init__(self, in_channels, width, out_channels, stride, spatial):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.spatial = spatial(width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.spatial(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.shortcut is None else self.shortcut(x)))


def _conv3x3(width, stride):
    return nn.Conv2d(width, width, 3, stride, 1, bias=False)


class LocalResNet(nn.Module):
    """A bottleneck ResNet whose spatial layers come from ``spatial(width, stride)``.

    Args:
        depths: bottlenecks per stage. spatial: factory of the middle layer.
        stem: ``"conv"``, ``"relation"`` (LR-Net) or ``"attention"`` (SASA).
        num_classes, in_channels: classifier outputs and image channels.
        small_input: 32x32 variant (stride-1 stem, no max pool).
        base_width: planes of the first stage (64); stages double it.
        width_factor: bottleneck width = ``planes * width_factor`` rounded to a multiple
            of ``width_multiple`` (8; LR-Net: a multiple of ``m`` too).
        expansion: output channels = ``planes * expansion`` (4).
        stem_options: extra keyword arguments for the stem's attention layer.
    """

    def __init__(self, depths, spatial, *, stem="conv", num_classes=1000, in_channels=3,
                 small_input=False, base_width=64, width_factor=1.0, expansion=4,
                 stem_options=None, width_multiple=8):
        super().__init__()
        stem_options = dict(stem_options or {})
        self.stem = self._stem(stem, in_channels, base_width, small_input, stem_options)
        stages, channels = [], base_width
        for i, depth in enumerate(depths):
            planes = base_width * 2 ** i
            width = _round_to(planes * width_factor, width_multiple)
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(Bottleneck(channels, width, planes * expansion, stride, spatial))
                channels = planes * expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for mod in self.modules():
            if isinstance(mod, Bottleneck):
                nn.init.zeros_(mod.bn3.weight)  # each residual branch starts as identity

    @staticmethod
    def _stem(kind, in_channels, width, small_input, options):
        bn_relu = [nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        if kind == "conv":
            if small_input:
                return nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), *bn_relu)
            return nn.Sequential(nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), *bn_relu,
                                 nn.MaxPool2d(3, 2, 1))
        if kind == "relation":
            stride = 1 if small_input else 2
            layers = [nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width),
                      nn.ReLU(inplace=True),
                      LocalRelation2d(width, options.pop("kernel_size", 7), stride=stride,
                                      **options), *bn_relu]
            if not small_input:
                layers.append(nn.MaxPool2d(3, 2, 1))
            return nn.Sequential(*layers)
        if kind == "attention":
            # SASA: the attention stem is followed by BatchNorm and the max pool (no ReLU).
            layers = [AttentionStem(in_channels, width, **options), nn.BatchNorm2d(width)]
            if not small_input:
                layers.append(nn.MaxPool2d(4, 4))
            return nn.Sequential(*layers)
        raise ValueError(f"stem must be 'conv', 'relation' or 'attention', got {kind!r}")

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


# ---------------------------------------------------------------------------------------
# The named models
# ---------------------------------------------------------------------------------------

def _lr_spatial(kernel_size, m, border, **layer_options):
    """Builder of the bottlenecks' LocalRelation2d; ``layer_options``: its keyword-only
    options (``similarity``, ``key_saliency``, ...)."""
    def build(width, stride):
        return LocalRelation2d(width, kernel_size, m=m, stride=stride, border=border,
                               **layer_options)
    return build


def _sasa_spatial(kernel_size, heads, border, downsample, projection):
    def build(width, stride):
        return SASA2d(width, width, kernel_size, heads=heads, stride=stride, border=border,
                      downsample=downsample, projection=projection)
    return build


def _lrnet(depth, *, num_classes=1000, kernel_size=7, m=8, border="mask", stem="relation",
           width_factor=LRNET_WIDTH_FACTOR, **kwargs):
    stem_options = {"border": border, "m": m, **(kwargs.pop("stem_options", None) or {})}
    return LocalResNet(LRNET_DEPTHS[depth], _lr_spatial(kernel_size, m, border), stem=stem,
                       num_classes=num_classes, width_factor=width_factor,
                       stem_options=stem_options if stem == "relation" else None,
                       width_multiple=math.lcm(8, m), **kwargs)


def _sasa(depth, *, num_classes=1000, kernel_size=7, heads=8, border="mask", stem="conv",
          downsample="pool", projection="dense", **kwargs):
    stem_options = {"border": border, **(kwargs.pop("stem_options", None) or {})}
    return LocalResNet(DEPTHS[depth],
                       _sasa_spatial(kernel_size, heads, border, downsample, projection),
                       stem=stem, num_classes=num_classes,
                       stem_options=stem_options if stem == "attention" else None, **kwargs)


def _conv(depth, *, num_classes=1000, depths=None, **kwargs):
    return LocalResNet(depths or DEPTHS[depth], _conv3x3, stem="conv", num_classes=num_classes,
                       **kwargs)


def lrnet26(**kwargs):
    """LR-Net-26 (paper: 14.7M parameters, 2.6 GFLOPs, 75.7% top-1)."""
    return _lrnet(26, **kwargs)


def lrnet38(**kwargs):
    """LR-Net-38."""
    return _lrnet(38, **kwargs)


def lrnet50(**kwargs):
    """LR-Net-50 (paper: 23.3M parameters, 4.3 G multiply-adds, 77.3% top-1)."""
    return _lrnet(50, **kwargs)


def sasa_resnet26(**kwargs):
    """SASA ResNet-26 (``stem="conv"`` or ``"attention"``; paper, conv stem: 10.3M
    parameters, 4.5 GFLOPs, 75.8% top-1; dense q/k/v by default, see the module doc)."""
    return _sasa(26, **kwargs)


def sasa_resnet38(**kwargs):
    """SASA ResNet-38 (paper, conv stem: 14.1M parameters, 5.7 GFLOPs, 77.1% top-1)."""
    return _sasa(38, **kwargs)


def sasa_resnet50(**kwargs):
    """SASA ResNet-50 (paper, conv stem: 18.0M parameters, 7.0 GFLOPs, 77.4% top-1)."""
    return _sasa(50, **kwargs)


def conv_resnet26(**kwargs):
    """The convolutional baseline (for the table)."""
    return _conv(26, **kwargs)


def conv_resnet38(**kwargs):
    return _conv(38, **kwargs)


def conv_resnet50(**kwargs):
    return _conv(50, **kwargs)


# ---------------------------------------------------------------------------------------
# Parameters and FLOPs
# ---------------------------------------------------------------------------------------

def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, size=224, batch=1, in_channels=3) -> int:
    """Forward FLOPs (a multiply-add counts 2) of one ``size x size`` image.

    Runs on a meta-device copy (no data, no arithmetic; ``model`` itself is left as it
    was): the custom ops' fake kernels give the shapes and their registered FLOP formulas
    the counts.
    """
    from torch.utils.flop_counter import FlopCounterMode
    on_meta = all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    model = (model if on_meta else copy.deepcopy(model)).to("meta")
    training = model.training
    model.eval()
    x = torch.empty(batch, in_channels, size, size, device="meta")
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(training)
    return counter.get_total_flops() // batch


#: Numbers the papers report at 224x224 (params M, FLOPs G with multiply-add = 2).
PAPER = {
    "conv_resnet26": (13.7, 4.7), "conv_resnet38": (19.6, 6.5), "conv_resnet50": (25.6, 8.2),
    "conv_resnet26 (2-2-2-2, LR-Net's)": (None, None),
    "sasa_resnet26 (conv stem)": (10.3, 4.5), "sasa_resnet38 (conv stem)": (14.1, 5.7),
    "sasa_resnet50 (conv stem)": (18.0, 7.0),
    "sasa_resnet26 (conv stem, grouped q/k/v)": (10.3, 4.5),
    "sasa_resnet38 (conv stem, grouped q/k/v)": (14.1, 5.7),
    "sasa_resnet50 (conv stem, grouped q/k/v)": (18.0, 7.0),
    "sasa_resnet26 (attention stem)": (10.3, 4.7), "sasa_resnet38 (attention stem)": (14.1, 6.0),
    "sasa_resnet50 (attention stem)": (18.0, 7.2),
    # LR-Net reports GFLOPs as multiply-adds: 2.6 and 4.3 G madds -> 5.2 and 8.6 G FLOPs.
    "lrnet26": (14.7, 5.2), "lrnet38": (None, None), "lrnet50": (23.3, 8.6),
}

_TABLE_MODELS = {
    "conv_resnet26": partial(conv_resnet26), "conv_resnet38": partial(conv_resnet38),
    "conv_resnet50": partial(conv_resnet50),
    "conv_resnet26 (2-2-2-2, LR-Net's)": partial(conv_resnet26, depths=LRNET_DEPTHS[26]),
    "sasa_resnet26 (conv stem)": partial(sasa_resnet26, stem="conv"),
    "sasa_resnet38 (conv stem)": partial(sasa_resnet38, stem="conv"),
    "sasa_resnet50 (conv stem)": partial(sasa_resnet50, stem="conv"),
    "sasa_resnet26 (conv stem, grouped q/k/v)": partial(sasa_resnet26, projection="grouped"),
    "sasa_resnet38 (conv stem, grouped q/k/v)": partial(sasa_resnet38, projection="grouped"),
    "sasa_resnet50 (conv stem, grouped q/k/v)": partial(sasa_resnet50, projection="grouped"),
    "sasa_resnet26 (attention stem)": partial(sasa_resnet26, stem="attention"),
    "sasa_resnet38 (attention stem)": partial(sasa_resnet38, stem="attention"),
    "sasa_resnet50 (attention stem)": partial(sasa_resnet50, stem="attention"),
    "lrnet26": partial(lrnet26), "lrnet38": partial(lrnet38), "lrnet50": partial(lrnet50),
}


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def model_table(size=224, num_classes=1000) -> str:
    """Markdown table: our parameters and FLOPs next to the papers' numbers."""
    lines = [
        f"Parameters and forward FLOPs at {size}x{size}, {num_classes} classes. FLOPs count a "
        "multiply-add as 2 (SASA's convention; torch's FlopCounterMode with the ops' "
        "registered formulas, `2*B*heads*K*Ho*Wo*(Dqk+Dv)` per attention layer; softmax, "
        "BN, ReLU, pooling and additions are not counted). LR-Net's paper reports "
        "multiply-adds (2.6 G, 4.3 G): they are doubled in the paper column and our "
        "multiply-adds (FLOPs / 2) are shown too.",
        "",
        "| model | params (M) | paper params (M) | GFLOPs | paper GFLOPs | G multiply-adds |",
        "|---|---|---|---|---|---|",
    ]
    for name, build in _TABLE_MODELS.items():
        with torch.device("meta"):
            model = build(num_classes=num_classes)
        params = count_parameters(model) / 1e6
        flops = count_flops(model, size) / 1e9
        p_params, p_flops = PAPER[name]
        lines.append(f"| {name} | {params:.1f} | {_fmt(p_params)} | {flops:.2f} | "
                     f"{_fmt(p_flops)} | {flops / 2:.2f} |")
    lines += [
        "",
        "Notes:",
        "- Paper columns: SASA, Ramachandran et al. 2019, ImageNet table (conv-stem and "
        "full-attention rows, conv baselines); LR-Net, Hu et al. 2019, ImageNet results "
        "(LR-Net-26 and -50). Summarised with sources in [docs/papers.md](../docs/papers.md).",
        "- The convolutional baselines match the SASA paper, which checks the counting. "
        "LR-Net's ResNet-26 has 2 bottlenecks per stage (the LR-Net paper): at that depth "
        "the conv network has 16.0M parameters, the count of that paper's ResNet-26 "
        "baseline.",
        "- SASA's default here is the paper's table: dense 1x1 q/k/v projections, whose "
        "parameter counts match it. The paper's text describes block-diagonal (grouped) "
        "projections (`projection=\"grouped\"`), shown for comparison: fewer parameters "
        "than the table.",
        "- The attention stem is a simplification (5x5 centred window instead of 4x4, "
        "4 heads, 4 value mixtures, dense projections), so its FLOPs differ from the paper.",
        f"- LR-Net widens the bottleneck by {LRNET_WIDTH_FACTOR} (calibrated on LR-Net-50; "
        "the paper gives no per-stage widths); its stem is a 1x1 conv and a 7x7 local "
        "relation layer with stride 2. LR-Net reports no 38-layer network: lrnet38 takes "
        "the 2-3-5-2 layout of SASA's ResNet-38.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--output", "-o", help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    table = model_table(args.size)
    sys.stdout.write(table)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
