"""The checkpointer of the plugin's tools: atomic saves and loads that fail loudly and clearly."""

import logging
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import Backbone, build_model
from detectron2.modeling.backbone import ResNet
from torch import nn

from ..layers import WSConv2d
from ..modeling.norm_slots import cfg_value
from ..modeling.resnetv2 import ResNetV2
from .convert import _KEY_RE, NORM_FAMILIES, ConversionError, _state_dict
from .io import AtomicWritePathManager, CheckpointError, read_failure

__all__ = ["WSBCNCheckpointer", "check_weights"]

_SHOWN = 3  # tensor names quoted per kind of problem
_COUNTER = "num_batches_tracked"  # a BatchNorm step counter, not a weight
logger = logging.getLogger(__name__)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _bottom_up(model: nn.Module) -> Tuple[str, nn.Module]:
    """The part pretrained weights fill, the backbone's bottom-up network, and its state-dict prefix."""
    prefix, backbone = ("", model) if isinstance(model, Backbone) else ("backbone.", getattr(model, "backbone", model))
    if hasattr(backbone, "bottom_up"):
        return prefix + "bottom_up.", backbone.bottom_up
    return prefix, backbone


def _pretrained_prefix(model: nn.Module) -> str:
    return _bottom_up(model)[0]


_FAMILIES = {ResNetV2: "MODEL.RESNETV2.", ResNet: "MODEL.RESNETS."}
"""Backbone class -> the prefix of its config keys."""
_ARCH_KEYS = {
    "MODEL.RESNETV2.": ("DEPTH", "WIDTH_FACTOR"),
    "MODEL.RESNETS.": ("DEPTH", "NUM_GROUPS", "WIDTH_PER_GROUP", "RES2_OUT_CHANNELS"),
}
"""Family -> the keys that set its tensor shapes (converted files record them)."""
_COUNTERPART = {
    "build_resnet_backbone": "build_ws_resnetv2_backbone",
    "build_ws_resnet_backbone": "build_ws_resnetv2_backbone",
    "build_resnet_fpn_backbone": "build_ws_resnetv2_fpn_backbone",
    "build_ws_resnet_fpn_backbone": "build_ws_resnetv2_fpn_backbone",
    "build_retinanet_resnet_fpn_backbone": "build_ws_retinanet_resnetv2_fpn_backbone",
    "build_ws_retinanet_resnet_fpn_backbone": "build_ws_retinanet_resnetv2_fpn_backbone",
    "build_ws_resnetv2_backbone": "build_ws_resnet_backbone",
    "build_ws_resnetv2_fpn_backbone": "build_ws_resnet_fpn_backbone",
    "build_ws_retinanet_resnetv2_fpn_backbone": "build_ws_retinanet_resnet_fpn_backbone",
}
"""MODEL.BACKBONE.NAME -> the builder of the same detector on the other backbone family."""


def _family(model: nn.Module) -> Optional[str]:
    """``MODEL.RESNETV2.`` or ``MODEL.RESNETS.``: the config keys of the model's bottom-up network; None: another."""
    bottom_up = _bottom_up(model)[1]
    return next((keys for cls, keys in _FAMILIES.items() if isinstance(bottom_up, cls)), None)


def _arch_name(family: str, values: Mapping[str, Any]) -> str:
    """e.g. "ResNetV2-50x1", "ResNet-50", "ResNeXt-50 32x4d", from a family's config ``values``."""
    depth = values[family + "DEPTH"]
    if family == "MODEL.RESNETV2.":
        return f"ResNetV2-{depth}x{values[family + 'WIDTH_FACTOR']:g}"
    groups, width = values.get(family + "NUM_GROUPS", 1), values.get(family + "WIDTH_PER_GROUP", 64)
    return f"ResNeXt-{depth} {groups}x{width}d" if (groups, width) != (1, 64) else f"ResNet-{depth}"


# Head tensors whose shape a config key sets: (model key pattern, dim, key, (the file's size, model state) -> value)
_HEAD_SHAPES: Tuple[Tuple[str, int, str, Callable[[int, Mapping[str, Any]], int]], ...] = (
    (r"box_predictor(\.\d+)?\.cls_score\.weight", 0, "MODEL.ROI_HEADS.NUM_CLASSES", lambda n, _: n - 1),
    (r"box_predictor(\.\d+)?\.bbox_pred\.weight", 0, "MODEL.ROI_HEADS.NUM_CLASSES", lambda n, _: n // 4),
    (r"mask_head\.predictor\.weight", 0, "MODEL.ROI_HEADS.NUM_CLASSES", lambda n, _: n),
    (  # RetinaNet: one score per anchor and class, 4 box deltas per anchor
        r"head\.cls_score\.weight",
        0,
        "MODEL.RETINANET.NUM_CLASSES",
        lambda n, state: n // (state["head.bbox_pred.weight"].shape[0] // 4),
    ),
    (r"box_head(\.\d+)?\.conv\d+\.weight", 0, "MODEL.ROI_BOX_HEAD.CONV_DIM", lambda n, _: n),
    (r"box_head(\.\d+)?\.fc\d+\.weight", 0, "MODEL.ROI_BOX_HEAD.FC_DIM", lambda n, _: n),
    (r"mask_head\.mask_fcn\d+\.weight", 0, "MODEL.ROI_MASK_HEAD.CONV_DIM", lambda n, _: n),
)


class WSBCNCheckpointer(DetectionCheckpointer):
    """detectron2's DetectionCheckpointer, made safe for the plugin's tools.

    - Saves are atomic: a checkpoint and ``last_checkpoint`` are written to a temporary
      file and renamed into place (see :func:`~wsbcn_d2.checkpoint.atomic_write`), so a
      kill never leaves a truncated file that ``last_checkpoint`` names.
    - A missing, empty, truncated or non-checkpoint file raises a one-line
      :class:`CheckpointError` naming it (and, with ``--resume``, ``last_checkpoint``).
    - Weights that leave backbone (bottom-up) tensors unloaded or of another shape raise a
      :class:`CheckpointError` with counts and names, unless ``allow_partial_backbone``
      (``MODEL.WEIGHTS_ALLOW_PARTIAL``); detectron2 only logs them and trains anyway.
    - An unconverted torchvision-layout ResNet file (an official WS/BCN ``.pth``) raises a
      :class:`ConversionError` pointing to ``tools/convert_pretrained.py``.
    - A converted checkpoint records the WS form and eps its backbone was trained with
      (``ws_form``, ``ws_eps``); loading it into a model whose backbone standardizes
      otherwise, or not at all, raises a one-line :class:`CheckpointError` naming both
      and the keys to set, unless ``allow_ws_mismatch`` (``MODEL.WEIGHTS_ALLOW_WS_MISMATCH``).
      Checkpoints without the record (detectron2's, the trainer's own) load as before.
    - A converted checkpoint also records its backbone (``config_overrides``): one of another
      family (a ResNetV2 file in a ResNet backbone or back), depth or width is refused first,
      naming the keys to set. Its keys are placed under the bottom-up prefix, so that
      detectron2's suffix matching cannot try a ResNetV2's final ``norm.*`` on every ``*.norm.*``.
    - Head tensors of another shape than the model's (``NUM_CLASSES``, box / mask head dims)
      raise a :class:`CheckpointError` naming the key to set with ``evaluation`` (weights
      evaluated or exported as they are); otherwise (fine-tuning) one warning names it.
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        allow_partial_backbone: bool = False,
        allow_ws_mismatch: bool = False,
        evaluation: bool = False,
        cfg: Optional[CfgNode] = None,
        **kwargs: Any,
    ):
        """
        Args:
            evaluation: refuse head tensors of another shape than the model's instead of warning.
            cfg: the model's config, to check converted backbones against; None: not checked.
        """
        super().__init__(model, save_dir, **kwargs)
        self.allow_partial_backbone = allow_partial_backbone
        self.allow_ws_mismatch = allow_ws_mismatch
        self.evaluation = evaluation
        self.cfg = cfg
        self.path_manager = AtomicWritePathManager(self.path_manager)
        self._loading: Optional[str] = None

    @classmethod
    def from_cfg(cls, cfg: CfgNode, model: nn.Module, **kwargs: Any) -> "WSBCNCheckpointer":
        """A checkpointer saving to ``OUTPUT_DIR`` with ``MODEL.WEIGHTS_ALLOW_PARTIAL`` and
        ``MODEL.WEIGHTS_ALLOW_WS_MISMATCH`` applied; ``kwargs``: ``evaluation``, and detectron2's
        (checkpointables ...)."""
        return cls(
            model,
            cfg.OUTPUT_DIR,
            allow_partial_backbone=cfg.MODEL.WEIGHTS_ALLOW_PARTIAL,
            allow_ws_mismatch=cfg.MODEL.WEIGHTS_ALLOW_WS_MISMATCH,
            cfg=cfg,
            **kwargs,
        )

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """detectron2's ``resume_or_load``; errors say which of MODEL.WEIGHTS or ``last_checkpoint`` named the file."""
        tag = os.path.join(self.save_dir, "last_checkpoint")
        if not (resume and self.has_checkpoint()):
            try:
                return self.load(path, checkpointables=[])
            except CheckpointError as e:
                raise CheckpointError(f"MODEL.WEIGHTS {e}") from e
        last = self.get_checkpoint_file()
        if not os.path.basename(last):
            raise CheckpointError(
                f"{tag} is empty: write the name of a checkpoint in {self.save_dir} into it, or delete it"
            )
        try:
            return self.load(last)
        except CheckpointError as e:
            raise CheckpointError(
                f"{e}. --resume loads it because {tag} names it: write the name of an earlier checkpoint into "
                "last_checkpoint, or delete last_checkpoint to start from MODEL.WEIGHTS"
            ) from e

    def load(self, path: str, checkpointables: Optional[List[str]] = None) -> Dict[str, Any]:
        """detectron2's ``load``; a missing local ``path`` raises a :class:`CheckpointError`."""
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file")
        self._loading = path
        try:
            return super().load(path, checkpointables)
        finally:
            self._loading = None

    def _load_file(self, filename: str) -> Dict[str, Any]:
        try:
            return super()._load_file(filename)
        except AssertionError:  # detectron2's checks of its own use and of .pyth files name the problem
            raise
        except Exception as e:  # an unreadable file fails in many ways, see read_failure
            raise read_failure(filename, e) from e

    def _load_model(self, checkpoint: Dict[str, Any]):
        if not checkpoint.get("matching_heuristics", False):
            model_keys = set(self.model.state_dict())
            foreign = [k for k in _state_dict(checkpoint["model"]) if _KEY_RE.fullmatch(k) and k not in model_keys]
            if any(k.startswith("layer") for k in foreign):
                raise ConversionError(
                    f"{self._loading} has torchvision ResNet names ({', '.join(foreign[:3])}, ...) that detectron2 "
                    "cannot load: convert it first with  python tools/convert_pretrained.py SOURCE DEST.pkl  "
                    "and use DEST.pkl as MODEL.WEIGHTS"
                )
        recorded = checkpoint.get("config_overrides", {})
        self._check_architecture(recorded)
        if "ws_form" in checkpoint:
            self._check_ws_form(checkpoint["ws_form"], checkpoint.get("ws_eps"))
        if checkpoint.get("matching_heuristics", False) and checkpoint.get("__author__") != "Caffe2":
            prefix, model_keys = _pretrained_prefix(self.model), set(self.model.state_dict())
            checkpoint["model"] = {
                prefix + k if prefix + k in model_keys else k: v for k, v in checkpoint["model"].items()
            }
        incompatible = super()._load_model(checkpoint)
        if not self.allow_partial_backbone:
            self._check_backbone_loaded(incompatible)
        self._check_heads(incompatible)
        return incompatible

    def _check_architecture(self, recorded: Mapping[str, Any]) -> None:
        """Raise unless the bottom-up network has the family, depth, width and norms a converted file records."""
        family = next((f for f in _ARCH_KEYS if f + "DEPTH" in recorded), None)
        model_family = _family(self.model)
        if self.cfg is None or family is None or model_family is None:
            return
        keys = [family + k for k in _ARCH_KEYS[family] if family + k in recorded]
        model_values = {model_family + k: cfg_value(self.cfg, model_family + k) for k in _ARCH_KEYS[model_family]}
        others = ""
        if family == model_family:
            fix = {k: recorded[k] for k in keys if model_values[k] != recorded[k]}
            if not fix:
                self._check_norm(recorded, family)
                return
        else:
            name = _COUNTERPART.get(self.cfg.MODEL.BACKBONE.NAME)
            fix = {**({"MODEL.BACKBONE.NAME": name} if name else {}), **{k: recorded[k] for k in keys}}
            others = ", with the other values tools/convert_pretrained.py printed for it"
        raise CheckpointError(
            f"{self._loading} holds a {_arch_name(family, recorded)} backbone, but the model's is a "
            f"{_arch_name(model_family, model_values)}: set {' '.join(f'{k} {v}' for k, v in fix.items())}{others}"
        )

    def _check_norm(self, recorded: Mapping[str, Any], family: str) -> None:
        """Raise unless the backbone's norms load the norm family a converted file records, or partial loads are
        allowed."""
        norm, model_norm = recorded.get(family + "NORM"), cfg_value(self.cfg, family + "NORM")
        if norm is None or self.allow_partial_backbone or NORM_FAMILIES.get(model_norm) == NORM_FAMILIES[norm]:
            return
        raise CheckpointError(
            f"{self._loading} holds {NORM_FAMILIES[norm]} norms, which do not load into {family}NORM {model_norm}: "
            f"set {family}NORM {norm} (or MODEL.WEIGHTS_ALLOW_PARTIAL True to load the rest anyway)"
        )

    def _check_ws_form(self, form: Optional[str], eps: Optional[float]) -> None:
        """Raise unless the backbone's WS convs standardize with the checkpoint's ``form`` and ``eps``."""
        prefix = _pretrained_prefix(self.model)
        model_forms = {
            (m.form, m.eps)
            for name, m in self.model.named_modules()
            if isinstance(m, WSConv2d) and f"{name}.".startswith(prefix)
        }
        if form is None:
            if model_forms:
                logger.warning(
                    f"{self._loading} holds weights trained without WS, loaded into a backbone with WS: WS is known "
                    "to help detection only from WS-pretrained weights (convert WS ImageNet weights instead)"
                )
            return
        if model_forms == {(form, eps)} or self.allow_ws_mismatch:
            return
        fix = f"set MODEL.WS.FORM {form} MODEL.WS.EPS {eps:g}"
        if not model_forms:
            found, fix = "no WS", f"set MODEL.WS.ENABLED True MODEL.WS.FORM {form} MODEL.WS.EPS {eps:g}"
        else:
            found = " and ".join(f"form {f!r} eps {e:g}" for f, e in sorted(model_forms))
        raise CheckpointError(
            f"{self._loading} was trained with WS form {form!r} eps {eps:g}, but the model's backbone has {found}, "
            f"under which it computes another function: {fix} (or MODEL.WEIGHTS_ALLOW_WS_MISMATCH True to load "
            "it anyway)"
        )

    def _check_backbone_loaded(self, incompatible) -> None:
        """Raise unless every backbone (bottom-up) tensor was loaded with its shape."""
        prefix = _pretrained_prefix(self.model)
        expected = [k for k in self.model.state_dict() if k.startswith(prefix) and not k.endswith(_COUNTER)]
        shapes = {k: (file_shape, model_shape) for k, file_shape, model_shape in incompatible.incorrect_shapes}
        # fvcore drops tensors of another shape before loading, so they are also among the missing keys
        missing = [k for k in incompatible.missing_keys if k in expected and k not in shapes]
        mismatched = [
            f"{k} {_shape(file_shape)} (model: {_shape(model_shape)})"
            for k, (file_shape, model_shape) in shapes.items()
            if k in expected
        ]
        if not missing and not mismatched:
            return
        problems = [
            f"{len(keys)} {label} ({', '.join(keys[:_SHOWN])}{', ...' if len(keys) > _SHOWN else ''})"
            for label, keys in (("missing", missing), ("of another shape", mismatched))
            if keys
        ]
        loaded = len(expected) - len(missing) - len(mismatched)
        family = _family(self.model) or "MODEL.RESNETS."
        raise CheckpointError(
            f"{self._loading}: only {loaded} of {len(expected)} backbone tensors loaded; {'; '.join(problems)}. "
            f"The weights do not fit this backbone (check {family}DEPTH / NORM, convert official files with "
            "tools/convert_pretrained.py), or set MODEL.WEIGHTS_ALLOW_PARTIAL True to train with them anyway"
        )

    def _check_heads(self, incompatible) -> None:
        """Refuse (``evaluation``) or warn about head tensors of another shape, naming the config keys to set."""
        shapes = {
            k: (f, m) for k, f, m in incompatible.incorrect_shapes if not k.startswith(_pretrained_prefix(self.model))
        }
        if not shapes:
            return
        state, fix, named = self.model.state_dict(), {}, []
        for pattern, dim, key, value in _HEAD_SHAPES:
            for name, (file_shape, model_shape) in shapes.items():
                if key not in fix and re.search(rf"(^|\.){pattern}$", name) and file_shape[dim] != model_shape[dim]:
                    fix[key] = value(file_shape[dim], state)
                    named.append(name)
        first = named[0] if named else next(iter(shapes))
        file_shape, model_shape = shapes[first]
        more = f" and {len(shapes) - 1} more" if len(shapes) > 1 else ""
        found = f"{first} is {_shape(file_shape)} in the file, {_shape(model_shape)} in the model{more}"
        keys = " ".join(f"{k} {v}" for k, v in fix.items())
        if self.evaluation:
            fix_text = f"set {keys}" if fix else "use the config the weights were trained with"
            raise CheckpointError(
                f"{self._loading}: the heads do not fit the config ({found}), evaluated they would be random: "
                + fix_text
            )
        logger.warning(
            f"{self._loading}: heads of another shape ({found}) start from scratch"
            + (f"; set {keys} to load them" if fix else "")
        )


def check_weights(cfg: CfgNode, resume: bool = False, evaluation: bool = False) -> None:
    """Load what training on ``cfg`` would load into its model built on CPU, writing nothing.

    That is ``MODEL.WEIGHTS``, or with ``resume`` the checkpoint OUTPUT_DIR's
    ``last_checkpoint`` names, so that a file that is missing, unreadable or does not fit
    fails in seconds, before anything is written. Nothing to load: returns at once.
    ``evaluation``: the weights are evaluated or exported as they are (heads that do not fit the
    config are refused, see :class:`WSBCNCheckpointer`).

    Raises:
        CheckpointError, ConversionError: as :class:`WSBCNCheckpointer` does.
    """
    resumes = resume and os.path.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not cfg.MODEL.WEIGHTS and not resumes:
        return
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    checkpointer = WSBCNCheckpointer.from_cfg(cfg, build_model(cfg), evaluation=evaluation, save_to_disk=False)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
