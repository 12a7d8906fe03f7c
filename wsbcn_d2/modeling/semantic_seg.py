"""WS semantic-segmentation FPN head (semantic FPN, Panoptic FPN)."""
from detectron2.modeling.meta_arch.semantic_seg import SEM_SEG_HEADS_REGISTRY, SemSegFPNHead

from .wsbcn import WSHeadMixin

__all__ = ["WSSemSegFPNHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class WSSemSegFPNHead(WSHeadMixin, SemSegFPNHead):
    """:class:`SemSegFPNHead` with the plugin's norms (``MODEL.SEM_SEG_HEAD.NORM``) and WS on its
    scale-head convs; the 1x1 predictor carries no norm and stays plain."""

    norm_key = "MODEL.SEM_SEG_HEAD.NORM"
    norm_arg = "norm"
