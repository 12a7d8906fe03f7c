"""Registered builders: WS-ResNet(-FPN) backbones and WS conv heads."""
from .backbone import build_ws_resnet_backbone, build_ws_resnet_fpn_backbone
from .fold import fold_for_inference
from .roi_heads import WSFastRCNNConvFCHead, WSMaskRCNNConvUpsampleHead
from .wsbcn import resolve_cfg_norm, standardize_normed_convs, ws_eps_from_cfg

__all__ = [k for k in globals().keys() if not k.startswith("_")]
