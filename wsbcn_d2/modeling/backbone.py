"""WS-ResNet, WS-ResNet-FPN and WS-RetinaNet-ResNet-FPN backbones.

They are detectron2's own builders, given a copy of the config whose norm
slots hold constructors resolved from the plugin's norm names (detectron2's
blocks accept a callable wherever they accept a norm name), then standardized
by the one WS rule of :mod:`wsbcn_d2.modeling.wsbcn`, and with the ReLUs that
follow a BCN conv inside a block applied by that conv (:func:`relus_into_convs`).
"""
from typing import Callable

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone, build_retinanet_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, build_resnet_backbone
from torch import nn
from torch.nn import functional as F

from ..layers import norm_fuses_relu
from .wsbcn import resolve_cfg_norm, standardize_from_cfg, with_resolved_norms

__all__ = [
    "build_ws_resnet_backbone",
    "build_ws_resnet_fpn_backbone",
    "build_ws_retinanet_resnet_fpn_backbone",
    "relus_into_convs",
]

_NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM")


class ConvReLUBasicStem(BasicStem):
    """detectron2's ``BasicStem``, its ReLU applied by ``conv1`` (as its activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


class ConvReLUBasicBlock(BasicBlock):
    """detectron2's ``BasicBlock``, the ReLU after ``conv1`` applied by it (as its activation)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


class ConvReLUBottleneckBlock(BottleneckBlock):
    """detectron2's ``BottleneckBlock``, the ReLUs after ``conv1`` and ``conv2`` applied by them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        out += x if self.shortcut is None else self.shortcut(x)
        return F.relu_(out)


_CONV_RELU_CLASSES = {
    BasicStem: (ConvReLUBasicStem, ("conv1",)),
    BasicBlock: (ConvReLUBasicBlock, ("conv1",)),
    BottleneckBlock: (ConvReLUBottleneckBlock, ("conv1", "conv2")),
}


def relus_into_convs(module: nn.Module) -> nn.Module:
    """Let the convs of detectron2's ResNet stems and blocks in ``module`` apply the ReLUs that follow
    them, where the convs' norms can run them (BCN: ``fuses_relu``).

    In place (the module's class changes, as for :meth:`WSConv2d.convert_`): each
    such conv gets an in-place ``nn.ReLU`` as its ``activation`` and the block's ``forward``
    no longer applies it; the function, parameters and state dict stay the same.
    A :class:`WSConv2d` whose norm is a BCN then runs the ReLU inside BCN's
    kernels: on a GPU, one ReLU kernel and one autograd node less per conv and
    step. Blocks with other norms (where the module call would only add host
    time) and of other classes (e.g. deformable) are left as they are.
    Returns ``module``.
    """
    for block in module.modules():
        cls, conv_names = _CONV_RELU_CLASSES.get(type(block), (None, ()))
        convs = [getattr(block, name) for name in conv_names]
        if cls is None or not all(c.activation is None and norm_fuses_relu(c.norm) for c in convs):
            continue
        block.__class__ = cls
        for conv in convs:
            conv.activation = nn.ReLU(inplace=True)
    return module


def _build(d2_builder: Callable[[CfgNode, ShapeSpec], Backbone], cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """``d2_builder`` with the plugin's norms in RESNETS.NORM and FPN.NORM, then WS and the ReLUs in the convs."""
    backbone = d2_builder(with_resolved_norms(cfg, {k: resolve_cfg_norm(cfg, k) for k in _NORM_KEYS}), input_shape)
    return relus_into_convs(standardize_from_cfg(backbone, cfg))


@BACKBONE_REGISTRY.register()
def build_ws_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """detectron2's ResNet (any depth, ResNeXt) with the plugin's norms and WS."""
    return _build(build_resnet_backbone, cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_ws_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """detectron2's ResNet-FPN with the plugin's norms and WS (FPN convs included)."""
    return _build(build_resnet_fpn_backbone, cfg, input_shape)


@BACKBONE_REGISTRY.register()
def build_ws_retinanet_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """detectron2's RetinaNet ResNet-FPN (P3-P7, ``LastLevelP6P7``) with the plugin's norms and WS.

    P6 and P7 carry no norm in detectron2, so they stay plain convs.
    """
    return _build(build_retinanet_resnet_fpn_backbone, cfg, input_shape)
