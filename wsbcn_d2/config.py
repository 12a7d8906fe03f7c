"""Config keys of wsbcn_d2."""
from detectron2.config import CfgNode as CN

from .layers import DEFAULT_UPDATE_RATE

__all__ = ["add_wsbcn_config"]


def add_wsbcn_config(cfg: CN) -> None:
    """Add the plugin's keys (values are checked when the model is built).

    - ``MODEL.WS.ENABLED`` (True): the plugin's backbones and heads standardize
      every conv that carries a norm (the official code's placement).
    - ``MODEL.WS.EPS`` (1e-5): added to each filter's std, outside the root,
      as in the official code.
    - ``MODEL.GN.NUM_GROUPS`` (32): groups of the norm named "GN".
    - ``MODEL.BCN.NUM_GROUPS`` (32), ``MODEL.BCN.EPS`` (1e-5): BCN's channel
      step, as in the paper.
    - ``MODEL.BCN.UPDATE_RATE`` (0.1): rate of micro-batch BCN's estimate
      updates; 0 keeps loaded statistics fixed, as the released code does
      (see :data:`wsbcn_d2.layers.DEFAULT_UPDATE_RATE`).
    """
    cfg.MODEL.WS = CN()
    cfg.MODEL.WS.ENABLED = True
    cfg.MODEL.WS.EPS = 1e-5
    cfg.MODEL.GN = CN()
    cfg.MODEL.GN.NUM_GROUPS = 32
    cfg.MODEL.BCN = CN()
    cfg.MODEL.BCN.NUM_GROUPS = 32
    cfg.MODEL.BCN.EPS = 1e-5
    cfg.MODEL.BCN.UPDATE_RATE = DEFAULT_UPDATE_RATE
