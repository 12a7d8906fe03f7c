"""WS-ResNetV2: Big Transfer's (BiT, Kolesnikov et al. 2020) pre-activation ResNet as a detectron2 backbone.

BiT's GN+WS ImageNet-1k / 21k weights (``resnetv2_50x1_bit.goog_in21k`` ... in timm,
and the original ``.npz`` files) are the most available WS-pretrained backbones;
``tools/convert_pretrained.py`` converts them. The network is timm's ``ResNetV2``
with BiT's settings:

- stem: a 7x7 stride-2 WS conv, then BiT's "fixed" padding: zero-pad 1 and a 3x3
  stride-2 max pool without padding (stride 4);
- stages res2-res5 (strides 4-32) of pre-activation bottlenecks:
  ``x + conv3(a(n3(conv2(a(n2(conv1(a(n1(x)))))))))`` with ``a = ReLU``, the stride on
  the 3x3 conv and, in each stage's first block, a 1x1 projection shortcut from the
  pre-activated input ``a(n1(x))``; widths ``256 * w`` ... ``2048 * w``, bottlenecks of a quarter;
- every conv standardized (``MODEL.WS.FORM``; BiT's weights need timm's
  ``"biased_var+eps"``, eps 1e-8), norms from ``MODEL.RESNETV2.NORM`` (GN by default,
  BCN or any other norm name as in the ResNet backbones).

Outputs: res2-res4 are the residual stream after each stage, as timm's feature
maps; res5 also passes the network's final pre-activation norm and ReLU, as timm's
``forward_features`` (its weights are pretrained, and it gives FPN's top level a
normalized input). ``MODEL.BACKBONE.FREEZE_AT`` freezes the stem (1) and stages
(2-5) as in detectron2's ResNet; the final norm counts with res5.
"""
from typing import Callable, Dict, List, Optional, Union

import torch
from detectron2.config import CfgNode
from detectron2.layers import CNNBlockBase, Conv2d, FrozenBatchNorm2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool, LastLevelP6P7
from torch import nn
from torch.nn import functional as F

from ..cuda import batch_channel_norm, enable_fast_path
from ..layers import BatchChannelNorm2d, WSConv2d
from .wsbcn import resolve_cfg_norm, standardize_from_cfg, ws_from_cfg

__all__ = [
    "BiTStem",
    "PreActBottleneck",
    "ResNetV2",
    "build_ws_resnetv2_backbone",
    "build_ws_resnetv2_fpn_backbone",
    "build_ws_retinanet_resnetv2_fpn_backbone",
]

Norm = Union[str, Callable[[int], nn.Module]]
ConvFactory = Callable[..., nn.Module]

RESNETV2_DEPTHS: Dict[int, List[int]] = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}
"""Depth -> bottleneck blocks per stage (BiT's R50, R101, R152)."""


def scaled_width(channels: int, width_factor: float) -> int:
    """``channels * width_factor`` rounded to a multiple of 8 (exact for BiT's integer factors)."""
    return max(8, int(channels * width_factor + 4) // 8 * 8)


def norm_relu(norm: Optional[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """``relu(norm(x))``; with a BCN, the ReLU inside its CUDA kernels where they run."""
    if isinstance(norm, BatchChannelNorm2d):
        return batch_channel_norm(norm, x, relu=True)
    return F.relu_(x if norm is None else norm(x))


class BiTStem(CNNBlockBase):
    """A 7x7 stride-2 conv, zero-padding 1 and a 3x3 stride-2 max pool (BiT's "fixed" stem); stride 4."""

    def __init__(self, in_channels: int, out_channels: int, *, conv: ConvFactory):
        super().__init__(in_channels, out_channels, 4)
        self.conv = conv(in_channels, out_channels, kernel_size=7, stride=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.pad(self.conv(x), (1, 1, 1, 1)), kernel_size=3, stride=2)


class PreActBottleneck(CNNBlockBase):
    """BiT's pre-activation bottleneck (see the module docstring)."""

    def __init__(
        self, in_channels: int, out_channels: int, *, stride: int, projection: bool, norm: Norm, conv: ConvFactory
    ):
        """
        Args:
            stride: of the 3x3 conv and the projection.
            projection: a 1x1 conv shortcut from the pre-activated input (a stage's first block).
            norm: a norm name or ``C -> nn.Module`` (detectron2's ``get_norm``).
            conv: ``(in, out, kernel_size, stride=, padding=) -> conv``, without bias.
        """
        super().__init__(in_channels, out_channels, stride)
        mid = out_channels // 4
        self.norm1 = get_norm(norm, in_channels)
        self.shortcut = conv(in_channels, out_channels, kernel_size=1, stride=stride) if projection else None
        self.conv1 = conv(in_channels, mid, kernel_size=1)
        self.norm2 = get_norm(norm, mid)
        self.conv2 = conv(mid, mid, kernel_size=3, stride=stride, padding=1)
        self.norm3 = get_norm(norm, mid)
        self.conv3 = conv(mid, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = norm_relu(self.norm1, x)
        shortcut = x if self.shortcut is None else self.shortcut(x_preact)
        out = self.conv2(norm_relu(self.norm2, self.conv1(x_preact)))
        return self.conv3(norm_relu(self.norm3, out)) + shortcut


class ResNetV2(Backbone):
    """A pre-activation ResNet: stem, stages res2.., and with res5 the final norm (see the module docstring)."""

    def __init__(
        self,
        stem: CNNBlockBase,
        stages: List[List[CNNBlockBase]],
        final_norm: Optional[nn.Module],
        out_features: List[str],
        freeze_at: int = 0,
    ):
        """
        Args:
            stages: blocks of res2, res3, ... up to the last stage in ``out_features``.
            final_norm: the norm before res5's output (None: no norm); used when res5 is an output.
            freeze_at: freeze the stem (1) and the first ``freeze_at - 1`` stages.
        """
        super().__init__()
        self.stem = stem
        self.stage_names = [f"res{i + 2}" for i in range(len(stages))]
        for name, blocks in zip(self.stage_names, stages):
            self.add_module(name, nn.Sequential(*blocks))
        self.norm = final_norm if "res5" in out_features else None
        self._out_features = list(out_features)
        stride = stem.stride
        self._out_feature_strides, self._out_feature_channels = {}, {}
        for name, blocks in zip(self.stage_names, stages):
            stride *= blocks[0].stride
            self._out_feature_strides[name], self._out_feature_channels[name] = stride, blocks[-1].out_channels
        unknown = set(out_features) - set(self.stage_names)
        if unknown:
            raise ValueError(f"MODEL.RESNETV2.OUT_FEATURES: {sorted(unknown)} are not stages of res2..res5")
        self.freeze(freeze_at)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = norm_relu(self.norm, x) if name == "res5" else x
        return outputs

    def freeze(self, freeze_at: int = 0) -> "ResNetV2":
        """Freeze the stem (``freeze_at >= 1``) and stages res2.. up to res``freeze_at`` (detectron2's rule)."""
        if freeze_at >= 1:
            self.stem.freeze()
        for i, name in enumerate(self.stage_names, start=2):
            if freeze_at >= i:
                for block in getattr(self, name):
                    block.freeze()
                if name == "res5" and self.norm is not None:  # as CNNBlockBase.freeze does
                    self.norm = FrozenBatchNorm2d.convert_frozen_batchnorm(self.norm.requires_grad_(False))
        return self


def _conv_factory(cfg: CfgNode) -> ConvFactory:
    ws = ws_from_cfg(cfg)
    if ws is None:
        return lambda *args, **kwargs: Conv2d(*args, bias=False, **kwargs)
    return lambda *args, **kwargs: WSConv2d(*args, bias=False, **ws, **kwargs)


@BACKBONE_REGISTRY.register()
def build_ws_resnetv2_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> ResNetV2:
    """BiT's ResNetV2 from ``MODEL.RESNETV2.*`` (depth, width factor, norm, outputs), ``MODEL.WS.*`` and
    ``MODEL.BACKBONE.FREEZE_AT``."""
    depth, width = cfg.MODEL.RESNETV2.DEPTH, cfg.MODEL.RESNETV2.WIDTH_FACTOR
    if depth not in RESNETV2_DEPTHS:
        raise ValueError(f"MODEL.RESNETV2.DEPTH must be one of {sorted(RESNETV2_DEPTHS)}, got {depth!r}")
    if not (isinstance(width, (int, float)) and not isinstance(width, bool) and width > 0):
        raise ValueError(f"MODEL.RESNETV2.WIDTH_FACTOR must be a number > 0 (BiT: 1 to 4), got {width!r}")
    norm = resolve_cfg_norm(cfg, "MODEL.RESNETV2.NORM")
    conv = _conv_factory(cfg)
    out_features = cfg.MODEL.RESNETV2.OUT_FEATURES
    num_stages = max((int(f[3:]) - 1 for f in out_features if f in ("res2", "res3", "res4", "res5")), default=0)
    stem = BiTStem(input_shape.channels, scaled_width(64, width), conv=conv)
    stages, in_channels = [], stem.out_channels
    for i, num_blocks in enumerate(RESNETV2_DEPTHS[depth][:num_stages]):
        out_channels = scaled_width(256 * 2**i, width)
        blocks = [
            PreActBottleneck(
                in_channels if b == 0 else out_channels,
                out_channels,
                stride=2 if b == 0 and i > 0 else 1,
                projection=b == 0,
                norm=norm,
                conv=conv,
            )
            for b in range(num_blocks)
        ]
        stages.append(blocks)
        in_channels = out_channels
    final_norm = get_norm(norm, in_channels) if num_stages == 4 else None
    backbone = ResNetV2(stem, stages, final_norm, out_features, cfg.MODEL.BACKBONE.FREEZE_AT)
    return enable_fast_path(backbone)


def _fpn(cfg: CfgNode, bottom_up: Backbone, top_block: nn.Module) -> Backbone:
    """detectron2's FPN on ``bottom_up``, with the plugin's norm names and WS on its normed convs."""
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=resolve_cfg_norm(cfg, "MODEL.FPN.NORM"),
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    return enable_fast_path(standardize_from_cfg(fpn, cfg))


@BACKBONE_REGISTRY.register()
def build_ws_resnetv2_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """ResNetV2-FPN (P2-P6), as detectron2's ResNet-FPN."""
    return _fpn(cfg, build_ws_resnetv2_backbone(cfg, input_shape), LastLevelMaxPool())


@BACKBONE_REGISTRY.register()
def build_ws_retinanet_resnetv2_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """ResNetV2-FPN for RetinaNet (P3-P7, P6 from res5), as detectron2's RetinaNet ResNet-FPN."""
    bottom_up = build_ws_resnetv2_backbone(cfg, input_shape)
    top_block = LastLevelP6P7(bottom_up.output_shape()["res5"].channels, cfg.MODEL.FPN.OUT_CHANNELS)
    return _fpn(cfg, bottom_up, top_block)
