"""Registered builders: WS backbones, heads and meta-architectures, the LazyConfig builder, and the norm slots
they read (with the validation of a config's slots)."""
from .backbone import build_ws_resnet_backbone, build_ws_resnet_fpn_backbone, build_ws_retinanet_resnet_fpn_backbone
from .fold import fold_for_inference
from .lazy import build_ws_model
from .norm_slots import (
    NORM_SLOTS,
    NormSlot,
    check_norm_slots,
    check_precise_bn,
    unreached_norm_slots,
    used_norm_slots,
    validate_wsbcn_config,
)
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
