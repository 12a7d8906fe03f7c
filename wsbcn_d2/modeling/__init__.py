"""Registered builders: WS backbones, heads and meta-architectures, and the LazyConfig builder."""
from .backbone import build_ws_resnet_backbone, build_ws_resnet_fpn_backbone, build_ws_retinanet_resnet_fpn_backbone
from .fold import fold_for_inference
from .lazy import build_ws_model
from .resnetv2 import (
    ResNetV2,
    build_ws_resnetv2_backbone,
    build_ws_resnetv2_fpn_backbone,
    build_ws_retinanet_resnetv2_fpn_backbone,
)
from .retinanet import WSRetinaNet
from .roi_heads import WSFastRCNNConvFCHead, WSMaskRCNNConvUpsampleHead, WSRes5ROIHeads
from .semantic_seg import WSSemSegFPNHead
from .wsbcn import (
    check_ws_coverage,
    normed_convs,
    resolve_cfg_norm,
    standardize_from_cfg,
    standardize_normed_convs,
    with_resolved_norms,
    ws_from_cfg,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]
