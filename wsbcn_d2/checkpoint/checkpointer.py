"""The checkpointer of the plugin's tools: atomic saves and loads that fail loudly and clearly."""

import logging
import os
from typing import Any, Dict, List, Optional, Sequence

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import Backbone, build_model
from torch import nn

from ..layers import WSConv2d
from .convert import _KEY_RE, ConversionError, _state_dict
from .io import AtomicWritePathManager, CheckpointError, read_failure

__all__ = ["WSBCNCheckpointer", "check_weights"]

_SHOWN = 3  # tensor names quoted per kind of problem
_COUNTER = "num_batches_tracked"  # a BatchNorm step counter, not a weight
logger = logging.getLogger(__name__)


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _pretrained_prefix(model: nn.Module) -> str:
    """State-dict prefix of the part pretrained weights fill: the backbone's bottom-up network."""
    prefix, backbone = ("", model) if isinstance(model, Backbone) else ("backbone.", getattr(model, "backbone", model))
    return prefix + "bottom_up." if hasattr(backbone, "bottom_up") else prefix


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
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        allow_partial_backbone: bool = False,
        allow_ws_mismatch: bool = False,
        **kwargs: Any,
    ):
        super().__init__(model, save_dir, **kwargs)
        self.allow_partial_backbone = allow_partial_backbone
        self.allow_ws_mismatch = allow_ws_mismatch
        self.path_manager = AtomicWritePathManager(self.path_manager)
        self._loading: Optional[str] = None

    @classmethod
    def from_cfg(cls, cfg: CfgNode, model: nn.Module, **kwargs: Any) -> "WSBCNCheckpointer":
        """A checkpointer saving to ``OUTPUT_DIR`` with ``MODEL.WEIGHTS_ALLOW_PARTIAL`` and
        ``MODEL.WEIGHTS_ALLOW_WS_MISMATCH`` applied; ``kwargs`` as detectron2's (checkpointables ...)."""
        return cls(
            model,
            cfg.OUTPUT_DIR,
            allow_partial_backbone=cfg.MODEL.WEIGHTS_ALLOW_PARTIAL,
            allow_ws_mismatch=cfg.MODEL.WEIGHTS_ALLOW_WS_MISMATCH,
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
        if "ws_form" in checkpoint:
            self._check_ws_form(checkpoint["ws_form"], checkpoint.get("ws_eps"))
        incompatible = super()._load_model(checkpoint)
        if not self.allow_partial_backbone:
            self._check_backbone_loaded(incompatible)
        return incompatible

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
        raise CheckpointError(
            f"{self._loading}: only {loaded} of {len(expected)} backbone tensors loaded; {'; '.join(problems)}. "
            "The weights do not fit this backbone (check MODEL.RESNETS.DEPTH / NORM, convert official files with "
            "tools/convert_pretrained.py), or set MODEL.WEIGHTS_ALLOW_PARTIAL True to train with them anyway"
        )


def check_weights(cfg: CfgNode, resume: bool = False) -> None:
    """Load what training on ``cfg`` would load into its model built on CPU, writing nothing.

    That is ``MODEL.WEIGHTS``, or with ``resume`` the checkpoint OUTPUT_DIR's
    ``last_checkpoint`` names, so that a file that is missing, unreadable or does not fit
    fails in seconds, before anything is written. Nothing to load: returns at once.

    Raises:
        CheckpointError, ConversionError: as :class:`WSBCNCheckpointer` does.
    """
    resumes = resume and os.path.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))
    if not cfg.MODEL.WEIGHTS and not resumes:
        return
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = "cpu"
    checkpointer = WSBCNCheckpointer.from_cfg(cfg, build_model(cfg), save_to_disk=False)
    checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=resume)
