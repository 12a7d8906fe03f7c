"""Config keys of wsbcn_d2, the norm slots of detectron2's models, and config validation."""
import difflib
import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg
from detectron2.layers import get_norm
from detectron2.modeling import META_ARCH_REGISTRY

from .layers import DEFAULT_UPDATE_RATE, WS_FORMS, norm_names

__all__ = [
    "AMP_PRECISIONS",
    "NORM_SLOTS",
    "amp_dtype",
    "NormSlot",
    "add_wsbcn_config",
    "cfg_value",
    "check_batch_split",
    "check_device",
    "check_frozen_stages",
    "check_norm_slots",
    "check_precise_bn",
    "load_config",
    "unreached_norm_slots",
    "used_norm_slots",
    "validate_wsbcn_config",
]


def add_wsbcn_config(cfg: CN) -> None:
    """Add the plugin's keys (checked by :func:`validate_wsbcn_config` and at build).

    - ``MODEL.WS.ENABLED`` (True): the plugin's backbones and heads standardize
      every conv that carries a norm (the official code's placement).
    - ``MODEL.WS.FORM`` ("std+eps") and ``MODEL.WS.EPS`` (1e-5): how each filter is
      standardized (:data:`wsbcn_d2.layers.WS_FORMS`): ``"std+eps"`` divides by
      std + eps as the official WS code; ``"var+eps"`` by sqrt(var + eps) as the
      official BCN ImageNet models; ``"biased_var+eps"`` as timm. Pretrained WS
      weights compute their trained function only under their own form and eps,
      which converted checkpoints record (see ``MODEL.WEIGHTS_ALLOW_WS_MISMATCH``).
    - ``MODEL.RESNETV2.DEPTH`` (50; 101, 152), ``WIDTH_FACTOR`` (1.0; BiT: 1-4),
      ``NORM`` ("GN"), ``OUT_FEATURES`` (res2-res5): the BiT ResNetV2 backbones
      (:mod:`wsbcn_d2.modeling.resnetv2`).
    - ``MODEL.GN.NUM_GROUPS`` (32): groups of the norm named "GN".
    - ``MODEL.BCN.NUM_GROUPS`` (32), ``MODEL.BCN.EPS`` (1e-5): BCN's channel
      step, as in the paper.
    - ``MODEL.BCN.UPDATE_RATE`` (0.1): rate of micro-batch BCN's estimate
      updates; 0 keeps loaded statistics fixed, as the released code does
      (see :data:`wsbcn_d2.layers.DEFAULT_UPDATE_RATE`).
    - ``MODEL.WEIGHTS_ALLOW_PARTIAL`` (False): let ``MODEL.WEIGHTS`` leave backbone
      (bottom-up) tensors unloaded or skip them for their shape; by default the
      plugin's checkpointer stops with a report instead.
    - ``MODEL.WEIGHTS_ALLOW_WS_MISMATCH`` (False): load a converted backbone whose
      recorded WS form or eps differs from the model's (the backbone then computes
      another function than it was trained to); by default loading stops.
    - ``SOLVER.ACCUMULATION_STEPS`` (1): forwards per optimizer step; each takes
      ``SOLVER.IMS_PER_BATCH / (processes x ACCUMULATION_STEPS)`` images, and the step
      trains what ``ACCUMULATION_STEPS`` times as many processes would
      (:class:`wsbcn_d2.engine.AccumulatingTrainer`).
    - ``SOLVER.AMP.PRECISION`` ("float16"; "bfloat16"): autocast's dtype under
      ``SOLVER.AMP.ENABLED``; float16 losses are scaled (a gradient scaler), bfloat16 ones not.
    """
    cfg.MODEL.WEIGHTS_ALLOW_PARTIAL = False
    cfg.MODEL.WEIGHTS_ALLOW_WS_MISMATCH = False
    cfg.MODEL.WS = CN()
    cfg.MODEL.WS.ENABLED = True
    cfg.MODEL.WS.FORM = "std+eps"
    cfg.MODEL.WS.EPS = 1e-5
    cfg.MODEL.GN = CN()
    cfg.MODEL.GN.NUM_GROUPS = 32
    cfg.MODEL.RESNETV2 = CN()
    cfg.MODEL.RESNETV2.DEPTH = 50
    cfg.MODEL.RESNETV2.WIDTH_FACTOR = 1.0
    cfg.MODEL.RESNETV2.NORM = "GN"
    cfg.MODEL.RESNETV2.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BCN = CN()
    cfg.MODEL.BCN.NUM_GROUPS = 32
    cfg.MODEL.BCN.EPS = 1e-5
    cfg.MODEL.BCN.UPDATE_RATE = DEFAULT_UPDATE_RATE
    cfg.SOLVER.ACCUMULATION_STEPS = 1
    cfg.SOLVER.AMP.PRECISION = "float16"


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


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _require(ok: bool, key: str, what: str, requirement: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{key} ({what}) must be {requirement}, got {value!r}")


def check_norm_slots(cfg: CN) -> None:
    """Check the plugin's values and every used norm slot of ``cfg``, without building anything.

    Raises a one-line ``ValueError`` naming the key: an unknown WS form, a WS / BCN
    eps that is not finite and > 0, an update rate outside [0, 1], a group count < 1, an
    unknown norm name, or one of the plugin's norms in a slot read by a
    detectron2 component (which cannot build it; the message names the
    plugin's variant to select instead).
    """
    form = cfg.MODEL.WS.FORM
    _require(form in WS_FORMS, "MODEL.WS.FORM", "WS form", f"one of {', '.join(map(repr, WS_FORMS))}", form)
    for key, what in (("MODEL.WS.EPS", "WS eps"), ("MODEL.BCN.EPS", "BCN eps")):
        eps = cfg_value(cfg, key)
        _require(_is_finite_number(eps) and eps > 0, key, what, "a finite number > 0", eps)
    rate = cfg.MODEL.BCN.UPDATE_RATE
    _require(_is_finite_number(rate) and 0 <= rate <= 1, "MODEL.BCN.UPDATE_RATE", "BCN update rate", "in [0, 1]", rate)
    for key in sorted(set(NUM_GROUPS_KEYS.values())):
        groups = cfg_value(cfg, key)
        _require(isinstance(groups, int) and groups >= 1, key, "norm group count", "an integer >= 1", groups)
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


def _keys(node: CN, prefix: str = "") -> Iterator[str]:
    for name, value in node.items():
        if isinstance(value, CN):
            yield from _keys(value, f"{prefix}{name}.")
        else:
            yield prefix + name


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """detectron2's config with the plugin's keys, ``config_file`` and the ``KEY VALUE`` pairs ``opts`` merged,
    validated (:func:`validate_wsbcn_config`), not frozen.

    Raises:
        ValueError: one line naming the problem: a missing file, an option that is a flag (argparse gives
            everything after the first ``KEY VALUE`` pair to the pairs), a key the config does not have (with
            the close matches), a value the key does not take.
    """
    if not os.path.isfile(config_file):
        raise ValueError(f"--config-file {config_file}: no such file")
    flags = [o for o in opts if isinstance(o, str) and o.startswith("--")]
    if flags:
        raise ValueError(f"{flags[0]} comes after the KEY VALUE options, which take all that follows: put it before them")
    if len(opts) % 2:
        raise ValueError(f"KEY VALUE options must come in pairs; {opts[-1]!r} has no value")
    cfg = get_cfg()
    add_wsbcn_config(cfg)
    cfg.merge_from_file(config_file)
    keys = set(_keys(cfg))
    for key in opts[::2]:
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"{key} is not a config key{hint}")
    try:
        cfg.merge_from_list(list(opts))
    except (AssertionError, KeyError, TypeError, ValueError) as e:  # yacs: a value of another type
        raise ValueError(f"KEY VALUE options: {e}") from None
    validate_wsbcn_config(cfg)
    return cfg


AMP_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}
"""``SOLVER.AMP.PRECISION`` values and their dtypes."""


def check_batch_split(
    total: int, processes: int, steps: Any, keys: Tuple[str, str] = ("SOLVER.IMS_PER_BATCH", "SOLVER.ACCUMULATION_STEPS")
) -> None:
    """Raise a one-line ValueError naming ``keys`` (images per optimizer step, forwards per step) where
    ``total`` images do not split into ``processes x steps`` equal forwards."""
    total_key, steps_key = keys
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"{steps_key} must be an integer >= 1, got {steps!r}")
    if total % (processes * steps):
        raise ValueError(
            f"{total_key} {total} does not divide among {processes} processes (--num-gpus x --num-machines) x "
            f"{steps_key} {steps}: set a multiple of {processes * steps}"
        )


def amp_dtype(precision: str, key: str = "SOLVER.AMP.PRECISION") -> torch.dtype:
    """The autocast dtype named ``precision``; a one-line ValueError naming ``key`` for another value."""
    if precision not in AMP_PRECISIONS:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, AMP_PRECISIONS))}, got {precision!r}")
    return AMP_PRECISIONS[precision]


def check_device(cfg: CN) -> None:
    """Raise a one-line ValueError where ``MODEL.DEVICE`` names CUDA on a machine without it."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE}, but no CUDA device is available: add MODEL.DEVICE cpu")


def check_frozen_stages(cfg: CN) -> None:
    """Raise a one-line ValueError where training would start from no weights with frozen stages: a random
    stem (and res2 ...) that never trains."""
    if not cfg.MODEL.WEIGHTS and cfg.MODEL.BACKBONE.FREEZE_AT > 0:
        raise ValueError(
            f"MODEL.WEIGHTS is empty (training from scratch) and MODEL.BACKBONE.FREEZE_AT is "
            f"{cfg.MODEL.BACKBONE.FREEZE_AT}: the first stages would stay random; set MODEL.BACKBONE.FREEZE_AT 0, "
            "or give pretrained MODEL.WEIGHTS"
        )
