"""The plugin's two modeling decisions, each made in one place.

- Which norm: :func:`resolve_cfg_norm` turns a norm name from the config into
  what detectron2's layers accept (see :mod:`wsbcn_d2.layers.norm`).
- Where WS goes: :func:`standardize_normed_convs` replaces every
  ``detectron2.layers.Conv2d`` that carries a norm by a :class:`WSConv2d`.
  In the official COCO code that is the stem, every bottleneck and shortcut
  conv, FPN lateral and output convs and the conv towers of the box and mask
  heads; never the RPN conv, fc layers, the mask deconv or predictors, which
  carry no norm.
"""
from typing import Callable, Optional, Union

from detectron2.config import CfgNode
from detectron2.layers import Conv2d
from torch import nn

from ..layers import NormOptions, WSConv2d, resolve_norm

__all__ = ["resolve_cfg_norm", "standardize_normed_convs", "ws_eps_from_cfg"]


def resolve_cfg_norm(cfg: CfgNode, norm: str) -> Union[str, Callable[[int], nn.Module]]:
    """Resolve a norm name with the group counts, eps and update rate of ``cfg``."""
    options = NormOptions(
        gn_num_groups=cfg.MODEL.GN.NUM_GROUPS,
        bcn_num_groups=cfg.MODEL.BCN.NUM_GROUPS,
        bcn_eps=cfg.MODEL.BCN.EPS,
        bcn_update_rate=cfg.MODEL.BCN.UPDATE_RATE,
    )
    return resolve_norm(norm, options)


def ws_eps_from_cfg(cfg: CfgNode) -> Optional[float]:
    """``MODEL.WS.EPS`` if WS is enabled, else None."""
    if not cfg.MODEL.WS.ENABLED:
        return None
    if cfg.MODEL.WS.EPS <= 0:
        raise ValueError(f"MODEL.WS.EPS must be > 0, got {cfg.MODEL.WS.EPS}")
    return cfg.MODEL.WS.EPS


def standardize_normed_convs(module: nn.Module, eps: float) -> int:
    """Turn, in place, every ``Conv2d`` of ``module`` that carries a norm into a WSConv2d.

    Returns the number of convs converted.
    """
    convs = [m for m in module.modules() if type(m) is Conv2d and m.norm is not None]
    for conv in convs:
        WSConv2d.convert_(conv, eps)
    return len(convs)
