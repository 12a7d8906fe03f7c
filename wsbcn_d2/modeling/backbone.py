"""WS-ResNet and WS-ResNet-FPN backbones.

They are detectron2's own ResNet / ResNet-FPN builders, given a copy of the
config whose norm slots hold constructors resolved from the plugin's norm names
(detectron2's blocks accept a callable wherever they accept a norm name), then
standardized by the one WS rule of :mod:`wsbcn_d2.modeling.wsbcn`.
"""
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from .wsbcn import resolve_cfg_norm, standardize_normed_convs, ws_eps_from_cfg

__all__ = ["build_ws_resnet_backbone", "build_ws_resnet_fpn_backbone"]


def _with_resolved_norms(cfg: CfgNode) -> CfgNode:
    """A copy of ``cfg`` whose RESNETS.NORM and FPN.NORM hold resolved norm constructors.

    yacs only stores plain values, so the callables are put in with
    ``dict.__setitem__``, which skips its type check; the copy is only handed
    to detectron2's builders and dropped.
    """
    cfg = cfg.clone()
    for node in (cfg.MODEL.RESNETS, cfg.MODEL.FPN):
        dict.__setitem__(node, "NORM", resolve_cfg_norm(cfg, node.NORM))
    return cfg


def _standardized(cfg: CfgNode, backbone: Backbone) -> Backbone:
    eps = ws_eps_from_cfg(cfg)
    if eps is not None:
        standardize_normed_convs(backbone, eps)
    return backbone


@BACKBONE_REGISTRY.register()
def build_ws_resnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """detectron2's ResNet (any depth, ResNeXt) with the plugin's norms and WS."""
    return _standardized(cfg, build_resnet_backbone(_with_resolved_norms(cfg), input_shape))


@BACKBONE_REGISTRY.register()
def build_ws_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """detectron2's ResNet-FPN with the plugin's norms and WS (FPN convs included)."""
    return _standardized(cfg, build_resnet_fpn_backbone(_with_resolved_norms(cfg), input_shape))
