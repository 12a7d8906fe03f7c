"""The norm slots of detectron2's meta-architectures, which component reads each, and the validation of a
config's plugin values and slots before any work (:func:`validate_wsbcn_config`)."""
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.layers import get_norm
from detectron2.modeling import META_ARCH_REGISTRY

from ..layers import check_eps, check_num_groups, check_update_rate, check_ws_form, norm_names

__all__ = [
    "NORM_SLOTS",
    "NUM_GROUPS_KEYS",
    "NormSlot",
    "cfg_value",
    "check_norm_slots",
    "check_precise_bn",
    "unreached_norm_slots",
    "used_norm_slots",
    "validate_wsbcn_config",
]


@dataclass(frozen=True)
class NormSlot:
    """A config key holding a norm name, and the component that reads it.

    ``reader_key`` names the component (a registered builder, head or
    meta-architecture); ``plugin_readers`` maps each detectron2 component that
    reads ``key`` to the plugin's variant, which accepts the plugin's norm names
    and puts WS on the convs they normalize.
    """

    key: str
    reader_key: str
    plugin_readers: Dict[str, str]
    used: Callable[[CN], bool] = lambda cfg: True

    def value(self, cfg: CN) -> Any:
        return cfg_value(cfg, self.key)

    def reader(self, cfg: CN) -> str:
        return cfg_value(cfg, self.reader_key)

    def reached(self, cfg: CN) -> Optional[bool]:
        """Whether the plugin builds the slot's component: True, False (detectron2's), None (other)."""
        reader = self.reader(cfg)
        if reader in self.plugin_readers.values():
            return True
        return False if reader in self.plugin_readers else None


def _meta_arch_in(*names: str) -> Callable[[CN], bool]:
    return lambda cfg: cfg.MODEL.META_ARCHITECTURE in names


_RCNN = ("GeneralizedRCNN", "PanopticFPN")
_RES5_ROI_HEADS = ("Res5ROIHeads", "WSRes5ROIHeads")
_RESNETV2_BUILDERS = (
    "build_ws_resnetv2_backbone",
    "build_ws_resnetv2_fpn_backbone",
    "build_ws_retinanet_resnetv2_fpn_backbone",
)

NORM_SLOTS: Tuple[NormSlot, ...] = (
    NormSlot(
        "MODEL.RESNETS.NORM",
        "MODEL.BACKBONE.NAME",
        {
            "build_resnet_backbone": "build_ws_resnet_backbone",
            "build_resnet_fpn_backbone": "build_ws_resnet_fpn_backbone",
            "build_retinanet_resnet_fpn_backbone": "build_ws_retinanet_resnet_fpn_backbone",
        },
    ),
    NormSlot(
        "MODEL.RESNETS.NORM",  # res5 of the C4 models is built by their RoI heads
        "MODEL.ROI_HEADS.NAME",
        {"Res5ROIHeads": "WSRes5ROIHeads"},
        _meta_arch_in(*_RCNN),
    ),
    NormSlot(
        "MODEL.RESNETV2.NORM",  # the plugin's own backbones: no detectron2 counterpart
        "MODEL.BACKBONE.NAME",
        {name: name for name in _RESNETV2_BUILDERS},
    ),
    NormSlot(
        "MODEL.FPN.NORM",
        "MODEL.BACKBONE.NAME",
        {
            "build_resnet_fpn_backbone": "build_ws_resnet_fpn_backbone",
            "build_retinanet_resnet_fpn_backbone": "build_ws_retinanet_resnet_fpn_backbone",
            **{name: name for name in _RESNETV2_BUILDERS[1:]},
        },
    ),
    NormSlot(
        "MODEL.ROI_BOX_HEAD.NORM",
        "MODEL.ROI_BOX_HEAD.NAME",
        {"FastRCNNConvFCHead": "WSFastRCNNConvFCHead"},
        lambda cfg: cfg.MODEL.META_ARCHITECTURE in _RCNN and cfg.MODEL.ROI_HEADS.NAME not in _RES5_ROI_HEADS,
    ),
    NormSlot(
        "MODEL.ROI_MASK_HEAD.NORM",
        "MODEL.ROI_MASK_HEAD.NAME",
        {"MaskRCNNConvUpsampleHead": "WSMaskRCNNConvUpsampleHead"},
        lambda cfg: cfg.MODEL.META_ARCHITECTURE in _RCNN and cfg.MODEL.MASK_ON,
    ),
    NormSlot(
        "MODEL.SEM_SEG_HEAD.NORM",
        "MODEL.SEM_SEG_HEAD.NAME",
        {"SemSegFPNHead": "WSSemSegFPNHead"},
        _meta_arch_in("SemanticSegmentor", "PanopticFPN"),
    ),
    NormSlot("MODEL.RETINANET.NORM", "MODEL.META_ARCHITECTURE", {"RetinaNet": "WSRetinaNet"}),
)
"""Every norm slot of detectron2's meta-architectures, with the component that reads it.

A slot counts where ``used(cfg)`` holds and its reader is one of the listed
components (a custom component's slots are left to it).
"""

NUM_GROUPS_KEYS: Dict[str, str] = {
    "GN": "MODEL.GN.NUM_GROUPS",
    "BCN": "MODEL.BCN.NUM_GROUPS",
    "SyncBCN": "MODEL.BCN.NUM_GROUPS",
}
"""The config key of each grouped norm's group count."""


def cfg_value(cfg: CN, key: str) -> Any:
    """The value of a dotted config key, e.g. ``cfg_value(cfg, "MODEL.FPN.NORM")``."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def used_norm_slots(cfg: CN) -> List[NormSlot]:
    """The slots of :data:`NORM_SLOTS` that the model ``cfg`` describes reads."""
    return [s for s in NORM_SLOTS if s.used(cfg) and s.reached(cfg) is not None]


def unreached_norm_slots(cfg: CN) -> List[NormSlot]:
    """Used slots holding a norm whose component is detectron2's own (no WS, no plugin norms)."""
    return [s for s in used_norm_slots(cfg) if s.value(cfg) and not callable(s.value(cfg)) and not s.reached(cfg)]


def check_norm_slots(cfg: CN) -> None:
    """Check the plugin's values and every used norm slot of ``cfg``, without building anything.

    Raises a one-line ``ValueError`` naming the key: an unknown WS form, a WS / BCN
    eps that is not finite and > 0, an update rate outside [0, 1], a group count < 1, an
    unknown norm name, or one of the plugin's norms in a slot read by a
    detectron2 component (which cannot build it; the message names the
    plugin's variant to select instead).
    """
    check_ws_form(cfg.MODEL.WS.FORM, cfg.MODEL.WS.EPS, "MODEL.WS.FORM", "MODEL.WS.EPS")
    check_eps(cfg.MODEL.BCN.EPS, "MODEL.BCN.EPS")
    check_update_rate(cfg.MODEL.BCN.UPDATE_RATE, "MODEL.BCN.UPDATE_RATE")
    for key in sorted(set(NUM_GROUPS_KEYS.values())):
        check_num_groups(cfg_value(cfg, key), key)
    for slot in used_norm_slots(cfg):
        name = slot.value(cfg)
        if callable(name) or name == "":
            continue
        if name not in norm_names():
            valid = ", ".join(repr(n) for n in norm_names())
            raise ValueError(f"Unknown norm {name!r} in {slot.key}; valid names: {valid}")
        reader = slot.reader(cfg)
        if not slot.reached(cfg) and not _detectron2_builds(name):
            raise ValueError(
                f"{slot.key} {name!r} is read by detectron2's {reader}, which cannot build the plugin's "
                f"norms: set {slot.reader_key} {slot.plugin_readers[reader]!r}"
            )


def check_precise_bn(cfg: CN) -> None:
    """Refuse ``TEST.PRECISE_BN.ENABLED`` with micro-batch BCN.

    fvcore's ``update_bn_stats`` sets momentum 1 and averages the running
    statistics after each batch; :class:`~wsbcn_d2.layers.EstimatedBatchNorm2d` updates its
    estimates by its own rate, so the "precise" statistics would silently be wrong.
    """
    bcn_keys = [slot.key for slot in used_norm_slots(cfg) if slot.value(cfg) == "BCN"]
    if cfg.TEST.PRECISE_BN.ENABLED and bcn_keys:
        raise ValueError(
            f"TEST.PRECISE_BN.ENABLED recomputes batch-norm statistics assuming torch's momentum update, "
            f"which micro-batch BCN's estimates ({bcn_keys[0]} 'BCN') do not follow: set TEST.PRECISE_BN.ENABLED False"
        )


def validate_wsbcn_config(cfg: CN) -> None:
    """Check ``cfg`` before any work: :func:`check_norm_slots`, :func:`check_precise_bn`, then a
    build on the meta device.

    The build allocates nothing; it finds what depends on channel counts (a group
    count that does not divide a layer's channels) and raises it as a one-line
    ``ValueError`` naming the key. Run it before writing anything to OUTPUT_DIR.
    """
    check_norm_slots(cfg)
    check_precise_bn(cfg)
    with torch.device("meta"):
        META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)


@functools.lru_cache(maxsize=None)
def _detectron2_builds(norm: str) -> bool:
    """Whether detectron2's own ``get_norm`` knows ``norm``."""
    try:
        with torch.device("meta"):
            get_norm(norm, 32)
    except KeyError:
        return False
    return True
