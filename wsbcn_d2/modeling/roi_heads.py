"""WS conv heads: detectron2's box and mask heads with the plugin's norms and WS.

With ``ROI_BOX_HEAD.NUM_CONV 4``, ``NUM_FC 1`` the box head is the paper's
"4conv1fc" head; the mask head is detectron2's 4-conv + deconv head. Only their
conv towers carry a norm, so only those get WS; fc layers, the deconv and the
predictors stay plain.
"""
from typing import Optional

from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads import (
    ROI_BOX_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    FastRCNNConvFCHead,
    MaskRCNNConvUpsampleHead,
)

from .wsbcn import resolve_cfg_norm, standardize_normed_convs, ws_eps_from_cfg

__all__ = ["WSFastRCNNConvFCHead", "WSMaskRCNNConvUpsampleHead"]


class _WSConvHeadMixin:
    """Resolves ``conv_norm`` with the plugin's names and standardizes the normed convs."""

    @configurable
    def __init__(self, input_shape: ShapeSpec, *, ws_eps: Optional[float], **kwargs):
        """
        Args:
            ws_eps: WS eps for the convs that carry a norm; None disables WS.
            input_shape, kwargs: as the detectron2 head this is mixed into.
        """
        super().__init__(input_shape, **kwargs)
        if ws_eps is not None:
            standardize_normed_convs(self, ws_eps)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: ShapeSpec) -> dict:
        ret = super().from_config(cfg, input_shape)
        ret["conv_norm"] = resolve_cfg_norm(cfg, ret["conv_norm"])
        ret["ws_eps"] = ws_eps_from_cfg(cfg)
        return ret


@ROI_BOX_HEAD_REGISTRY.register()
class WSFastRCNNConvFCHead(_WSConvHeadMixin, FastRCNNConvFCHead):
    """:class:`FastRCNNConvFCHead` with WS convs; the fc layers stay plain."""


@ROI_MASK_HEAD_REGISTRY.register()
class WSMaskRCNNConvUpsampleHead(_WSConvHeadMixin, MaskRCNNConvUpsampleHead):
    """:class:`MaskRCNNConvUpsampleHead` with WS convs; deconv and predictor stay plain."""
