"""WS-ResNet, WS-ResNet-FPN and WS-RetinaNet-ResNet-FPN backbones.

They are detectron2's own builders, given a copy of the config whose norm
slots hold constructors resolved from the plugin's norm names (detectron2's
blocks accept a callable wherever they accept a norm name), then standardized
by the one WS rule of :mod:`wsbcn_d2.modeling.wsbcn`, and with the ReLUs that
follow a BCN conv inside a block (and the shortcut addition before the last)
applied by that conv (:func:`relus_into_convs`).
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

from ..layers import WSConv2d, norm_fuses_relu
from .wsbcn import resolve_cfg_norm, standardize_from_cfg, with_resolved_norms

__all__ = [
    "build_ws_resnet_backbone",
    "build_ws_resnet_fpn_backbone",
    "build_ws_retinanet_resnet_fpn_backbone",
    "relus_into_convs",
    "relus_out_of_convs",
]

_NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM")


class ConvReLUBasicStem(BasicStem):
    """detectron2's ``BasicStem``, its ReLU applied by ``conv1`` (as its activation)."""

    relu_convs = ("conv1",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


class ConvReLUBasicBlock(BasicBlock):
    """detectron2's ``BasicBlock``, its ReLUs applied by its convs, ``conv2`` adding the shortcut first."""

    relu_convs = ("conv1", "conv2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        return self.conv2(out, residual=x if self.shortcut is None else self.shortcut(x))


class ConvReLUBottleneckBlock(BottleneckBlock):
    """detectron2's ``BottleneckBlock``, its ReLUs applied by its convs, ``conv3`` adding the shortcut first."""

    relu_convs = ("conv1", "conv2", "conv3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return self.conv3(out, residual=x if self.shortcut is None else self.shortcut(x))


_CONV_RELU_CLASSES = {
    cls.__bases__[0]: cls for cls in (ConvReLUBasicStem, ConvReLUBasicBlock, ConvReLUBottleneckBlock)
}
"""detectron2's stem and block classes -> their subclasses, whose ``relu_convs`` apply the ReLUs (in a
block, the last one after adding the shortcut)."""


def relus_into_convs(module: nn.Module) -> nn.Module:
    """Let the convs of detectron2's ResNet stems and blocks in ``module`` apply the ReLUs that follow
    them, and the block's last conv the shortcut addition before its ReLU, where the convs are
    :class:`WSConv2d` whose norms can run both (BCN: ``fuses_relu``).

    In place (the module's class changes, as for :meth:`WSConv2d.convert_`): each
    such conv gets an in-place ``nn.ReLU`` as its ``activation`` and the block's
    ``forward`` passes the shortcut to its last conv (``residual``) instead of
    adding it and applying the ReLU itself; the function, parameters and state
    dict stay the same. BCN then runs the addition and the ReLUs inside its
    kernels: on a GPU, per block and step, one ReLU kernel and autograd node less
    per conv and an addition less. Blocks with other norms (where the module call
    would only add host time), plain convs and other classes (e.g. deformable) are
    left as they are; :func:`relus_out_of_convs` undoes it. Returns ``module``.
    """
    for block in module.modules():
        cls = _CONV_RELU_CLASSES.get(type(block))
        if cls is None:
            continue
        convs = [getattr(block, name) for name in cls.relu_convs]
        if all(isinstance(c, WSConv2d) and c.activation is None and norm_fuses_relu(c.norm) for c in convs):
            block.__class__ = cls
            for conv in convs:
                conv.activation = nn.ReLU(inplace=True)
    return module


def relus_out_of_convs(module: nn.Module) -> nn.Module:
    """Undo :func:`relus_into_convs` in ``module``, in place: detectron2's block classes, convs without
    activations. Returns ``module``."""
    for block in module.modules():
        if type(block) in _CONV_RELU_CLASSES.values():
            for name in type(block).relu_convs:
                getattr(block, name).activation = None
            block.__class__ = type(block).__bases__[0]
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
