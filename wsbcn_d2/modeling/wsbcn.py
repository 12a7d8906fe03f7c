"""The plugin's two modeling decisions, each made in one place, and the check of the result.

- Which norm: :func:`resolve_cfg_norm` turns the norm name of a config key into
  what detectron2's layers accept (see :mod:`wsbcn_d2.layers.norm`);
  :func:`with_resolved_norms` hands detectron2's own builders a config whose
  norm slots hold those.
- Where WS goes: :func:`standardize_normed_convs` turns every conv that carries
  a norm (:func:`normed_convs`) into a :class:`WSConv2d`. In the official COCO
  code that is the stem, every bottleneck and shortcut conv, FPN lateral and
  output convs and the conv towers of the box and mask heads; never the RPN
  conv, fc layers, the mask deconv or predictors, which carry no norm.
- :func:`check_ws_coverage` warns when a built model with WS enabled has
  normed convs without WS, or no normed conv at all.
"""
import logging
from typing import Any, Callable, Dict, Optional, Union

from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, CycleBatchNormList, FrozenBatchNorm2d, ShapeSpec
from detectron2.layers.batch_norm import LayerNorm
from torch import nn

from ..cuda import enable_fast_path
from ..layers import NormOptions, WSConv2d, check_num_groups, resolve_norm
from .norm_slots import NUM_GROUPS_KEYS, cfg_value, check_norm_slots, unreached_norm_slots, used_norm_slots

__all__ = [
    "WSHeadMixin",
    "check_ws_coverage",
    "normed_convs",
    "resolve_cfg_norm",
    "standardize_from_cfg",
    "standardize_normed_convs",
    "with_resolved_norms",
    "ws_from_cfg",
]

logger = logging.getLogger(__name__)

Norm = Union[str, Callable[[int], nn.Module]]
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, FrozenBatchNorm2d, LayerNorm, CycleBatchNormList)


def resolve_cfg_norm(cfg: CfgNode, key: str) -> Norm:
    """The norm named by config key ``key`` (e.g. ``"MODEL.FPN.NORM"``), as detectron2's ``get_norm`` accepts it.

    Uses the group counts, eps and update rate of ``cfg``. Bad values raise a
    one-line ``ValueError`` naming the key (:func:`check_norm_slots`); so does a
    group count that does not divide a layer's channels, when the layer is built.
    """
    check_norm_slots(cfg)
    name = cfg_value(cfg, key)
    if callable(name) or name == "":
        return name
    options = NormOptions(
        gn_num_groups=cfg.MODEL.GN.NUM_GROUPS,
        bcn_num_groups=cfg.MODEL.BCN.NUM_GROUPS,
        bcn_eps=cfg.MODEL.BCN.EPS,
        bcn_update_rate=cfg.MODEL.BCN.UPDATE_RATE,
    )
    norm = resolve_norm(name, options)
    groups_key = NUM_GROUPS_KEYS.get(name)
    if groups_key is None:
        return norm
    groups = cfg_value(cfg, groups_key)

    def build(channels: int) -> nn.Module:
        check_num_groups(groups, f"{key} {name!r}: {groups_key}", channels)
        return norm(channels)

    return build


def with_resolved_norms(cfg: CfgNode, norms: Dict[str, Norm]) -> CfgNode:
    """A copy of ``cfg`` whose keys ``norms`` (e.g. ``{"MODEL.FPN.NORM": ...}``) hold those norms.

    yacs only stores plain values, so callables are put in with
    ``dict.__setitem__``, which skips its type check; the copy is only handed to
    detectron2's builders and dropped.
    """
    cfg = cfg.clone()
    for key, norm in norms.items():
        node_key, _, leaf = key.rpartition(".")
        dict.__setitem__(cfg_value(cfg, node_key), leaf, norm)
    return cfg


def standardize_from_cfg(module: nn.Module, cfg: CfgNode) -> nn.Module:
    """:func:`standardize_normed_convs` on ``module`` with ``MODEL.WS.EPS`` and ``MODEL.WS.FORM``, if WS is
    enabled; returns ``module``."""
    ws = ws_from_cfg(cfg)
    if ws is not None:
        standardize_normed_convs(module, **ws)
    return module


def ws_from_cfg(cfg: CfgNode) -> Optional[Dict[str, Any]]:
    """``{"eps": MODEL.WS.EPS, "form": MODEL.WS.FORM}`` (:func:`standardize_normed_convs`'s WS arguments)
    if WS is enabled, else None."""
    check_norm_slots(cfg)
    return {"eps": cfg.MODEL.WS.EPS, "form": cfg.MODEL.WS.FORM} if cfg.MODEL.WS.ENABLED else None


def normed_convs(module: nn.Module) -> Dict[str, nn.Conv2d]:
    """The convs of ``module`` that carry a norm, by qualified name.

    A conv carries a norm when it is a ``detectron2.layers.Conv2d`` whose
    ``norm`` is set (detectron2's backbones and heads), or when the next module
    of an ``nn.Sequential`` after it is a norm layer (RetinaNet's head).
    """
    found = {}
    for name, m in module.named_modules():
        if isinstance(m, Conv2d) and m.norm is not None:
            found[name] = m
        if isinstance(m, nn.Sequential):
            children = list(m.named_children())
            for (child_name, conv), (_, nxt) in zip(children, children[1:]):
                if isinstance(conv, nn.Conv2d) and isinstance(nxt, _NORM_TYPES):
                    found[f"{name}.{child_name}" if name else child_name] = conv
    return found


def standardize_normed_convs(module: nn.Module, eps: float = 1e-5, form: str = "std+eps") -> int:
    """The WS rule: turn, in place, every conv of ``module`` that carries a norm into a WSConv2d
    standardizing by ``form`` with ``eps`` (:data:`~wsbcn_d2.layers.WS_FORMS`).

    Plain ``nn.Conv2d`` and ``detectron2.layers.Conv2d`` are converted (in
    place, so references to them stay valid); other conv classes are left as
    they are (:func:`check_ws_coverage` reports them). Returns the number of
    convs converted.
    """
    converted = []
    for conv in normed_convs(module).values():
        if type(conv) is nn.Conv2d:  # as a detectron2 Conv2d without norm / activation it computes the same
            conv.__class__ = Conv2d
            conv.norm = conv.activation = None
        if type(conv) is Conv2d:
            converted.append(WSConv2d.convert_(conv, eps, form))
    return len(converted)


def check_ws_coverage(model: nn.Module, cfg: Optional[CfgNode] = None, max_names: int = 8) -> None:
    """Warn when ``model``, built with WS enabled, is half converted or has nothing to standardize.

    Logs a warning naming the convs that carry a norm without WS (and, given
    ``cfg``, the norm slots read by detectron2's own components, with the
    plugin's variant to select), or one naming the empty norm slots when no conv
    carries a norm. Does nothing when ``cfg`` disables WS.
    """
    if cfg is not None and not cfg.MODEL.WS.ENABLED:
        return
    convs = normed_convs(model)
    missing = [name for name, conv in convs.items() if not isinstance(conv, WSConv2d)]
    if missing:
        shown = ", ".join(missing[:max_names]) + (f" and {len(missing) - max_names} more" if len(missing) > max_names else "")
        hints = "".join(
            f"; {s.key} is read by detectron2's {s.reader(cfg)}: set {s.reader_key} {s.plugin_readers[s.reader(cfg)]!r}"
            for s in (unreached_norm_slots(cfg) if cfg is not None else ())
        )
        logger.warning(f"WS is enabled but {len(missing)} convs carry a norm without WS: {shown}{hints}")
    elif not convs and not any(isinstance(m, WSConv2d) for m in model.modules()):
        slots = ", ".join(dict.fromkeys(s.key for s in used_norm_slots(cfg))) if cfg is not None else "every norm slot"
        logger.warning(
            f"MODEL.WS.ENABLED is True but no conv carries a norm ({slots} empty): nothing is standardized; "
            "WS is meant for convs followed by a norm"
        )


class WSHeadMixin:
    """For a detectron2 conv head: resolves its norm from ``norm_key``, standardizes its normed convs and
    puts the head on the CUDA fast path (:func:`wsbcn_d2.cuda.enable_fast_path`).

    Subclasses set ``norm_key`` (the config key of the head's norm) and, if the
    head names its norm argument otherwise, ``norm_arg``.
    """

    norm_key: str
    norm_arg: str = "conv_norm"

    @configurable
    def __init__(
        self, input_shape: Union[ShapeSpec, Dict[str, ShapeSpec]], *, ws: Optional[Dict[str, Any]], **kwargs
    ):
        """
        Args:
            ws: WS arguments (``eps``, ``form``) of :func:`standardize_normed_convs` for the convs that
                carry a norm; None disables WS.
            input_shape, kwargs: as the detectron2 head this is mixed into.
        """
        super().__init__(input_shape, **kwargs)
        if ws is not None:
            standardize_normed_convs(self, **ws)
        enable_fast_path(self)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Union[ShapeSpec, Dict[str, ShapeSpec]]) -> dict:
        ret = super().from_config(cfg, input_shape)
        ret[cls.norm_arg] = resolve_cfg_norm(cfg, cls.norm_key)
        ret["ws"] = ws_from_cfg(cfg)
        return ret
