"""Config keys of wsbcn_d2, and loading and checking a config (the norm slots: :mod:`wsbcn_d2.modeling.norm_slots`)."""
import difflib
import os
from typing import Any, Iterator, Sequence, Tuple

import torch
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .layers import DEFAULT_UPDATE_RATE
from .modeling.norm_slots import validate_wsbcn_config

__all__ = [
    "AMP_PRECISIONS",
    "add_wsbcn_config",
    "amp_dtype",
    "check_batch_split",
    "check_device",
    "check_frozen_stages",
    "load_config",
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


def _keys(node: CN, prefix: str = "") -> Iterator[str]:
    for name, value in node.items():
        if isinstance(value, CN):
            yield from _keys(value, f"{prefix}{name}.")
        else:
            yield prefix + name


def load_config(config_file: str, opts: Sequence[str] = ()) -> CN:
    """detectron2's config with the plugin's keys, ``config_file`` and the ``KEY VALUE`` pairs ``opts`` merged,
    validated (:func:`~wsbcn_d2.modeling.validate_wsbcn_config`), not frozen.

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
