"""WS RoI heads: detectron2's box, mask and C4 res5 heads with the plugin's norms and WS.

With ``ROI_BOX_HEAD.NUM_CONV 4``, ``NUM_FC 1`` the box head is the paper's
"4conv1fc" head; the mask head is detectron2's 4-conv + deconv head. Only their
conv towers carry a norm, so only those get WS; fc layers, the deconv and the
predictors stay plain. The C4 models' res5 stage is built by their RoI heads
from ``MODEL.RESNETS.NORM``: :class:`WSRes5ROIHeads` treats it as the backbone's.
"""
from typing import Dict

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    FastRCNNConvFCHead,
    MaskRCNNConvUpsampleHead,
    Res5ROIHeads,
)

from ..cuda import enable_fast_path
from .wsbcn import WSHeadMixin, resolve_cfg_norm, standardize_from_cfg, with_resolved_norms

__all__ = ["WSFastRCNNConvFCHead", "WSMaskRCNNConvUpsampleHead", "WSRes5ROIHeads"]


@ROI_BOX_HEAD_REGISTRY.register()
class WSFastRCNNConvFCHead(WSHeadMixin, FastRCNNConvFCHead):
    """:class:`FastRCNNConvFCHead` with WS convs (``MODEL.ROI_BOX_HEAD.NORM``); the fc layers stay plain."""

    norm_key = "MODEL.ROI_BOX_HEAD.NORM"


@ROI_MASK_HEAD_REGISTRY.register()
class WSMaskRCNNConvUpsampleHead(WSHeadMixin, MaskRCNNConvUpsampleHead):
    """:class:`MaskRCNNConvUpsampleHead` with WS convs (``MODEL.ROI_MASK_HEAD.NORM``); deconv and predictor stay plain."""

    norm_key = "MODEL.ROI_MASK_HEAD.NORM"


@ROI_HEADS_REGISTRY.register()
class WSRes5ROIHeads(Res5ROIHeads):
    """:class:`Res5ROIHeads` whose res5 stage takes the plugin's norms (``MODEL.RESNETS.NORM``) and WS,
    on the CUDA fast path as the backbones (:func:`wsbcn_d2.cuda.enable_fast_path`).

    The box predictor carries no norm; the mask head is built from
    ``MODEL.ROI_MASK_HEAD.NAME`` as usual (name the plugin's to get WS there too).
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> dict:
        norm = {"MODEL.RESNETS.NORM": resolve_cfg_norm(cfg, "MODEL.RESNETS.NORM")}
        ret = super().from_config(with_resolved_norms(cfg, norm), input_shape)
        enable_fast_path(standardize_from_cfg(ret["res5"], cfg))
        return ret
