"""WS-ResNet, WS-ResNet-FPN and WS-RetinaNet-ResNet-FPN backbones.

They are detectron2's own builders, given a copy of the config whose norm
slots hold constructors resolved from the plugin's norm names (detectron2's
blocks accept a callable wherever they accept a norm name), then standardized
by the one WS rule of :mod:`wsbcn_d2.modeling.wsbcn` and put on the CUDA fast
path (:func:`wsbcn_d2.cuda.enable_fast_path`).
"""
from typing import Callable

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone, build_retinanet_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from ..cuda import enable_fast_path
from .wsbcn import resolve_cfg_norm, standardize_from_cfg, with_resolved_norms

__all__ = ["build_ws_resnet_backbone", "build_ws_resnet_fpn_backbone", "build_ws_retinanet_resnet_fpn_backbone"]

_NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM")


def _build(d2_builder: Callable[[CfgNode, ShapeSpec], Backbone], cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """``d2_builder`` with the plugin's norms in RESNETS.NORM and FPN.NORM, then WS and the fast path."""
    backbone = d2_builder(with_resolved_norms(cfg, {k: resolve_cfg_norm(cfg, k) for k in _NORM_KEYS}), input_shape)
    return enable_fast_path(standardize_from_cfg(backbone, cfg))


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
