"""WS RetinaNet: detectron2's RetinaNet whose head takes the plugin's norm names and WS.

RetinaNet builds its head inside the meta-architecture, from
``MODEL.RETINANET.NORM``, so the plugin registers a variant of the
meta-architecture rather than of the head.

The head's convs are shared across the feature levels P3-P7. detectron2 gives
it one BN per level (``CycleBatchNormList``: per-level statistics) for ``BN`` /
``SyncBN``, and one shared module for every other norm. The plugin keeps that
for detectron2's names and, for ``BCN`` / ``SyncBCN``, whose batch step also
keeps statistics, builds one BCN per level the same way: each level's
estimates follow that level's features (a shared estimate would be updated
five times per iteration by five different distributions, and end up tracking
whichever level comes last). Each level's BCN keeps its own per-group affine
(a few hundred parameters); the convs, where the parameters are, stay shared.
"""
from typing import Callable

from detectron2.config import CfgNode
from detectron2.layers import CycleBatchNormList
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from torch import nn

from ..cuda import enable_fast_path
from .wsbcn import Norm, resolve_cfg_norm, standardize_from_cfg, with_resolved_norms

__all__ = ["WSRetinaNet"]

_NORM_KEY = "MODEL.RETINANET.NORM"
_PER_LEVEL_NORMS = ("BCN", "SyncBCN")  # the plugin's norms with batch statistics


def _per_level(norm: Callable[[int], nn.Module], num_levels: int) -> Callable[[int], nn.Module]:
    """One ``norm`` module per feature level, used in turn, as detectron2's ``CycleBatchNormList``."""

    def build(channels: int) -> nn.Module:
        # affine=False: CycleBatchNormList adds no shared affine; each module keeps its own
        return CycleBatchNormList(
            length=num_levels, bn_class=lambda num_features, affine: norm(num_features), num_features=channels, affine=False
        )

    return build


def _head_norm(cfg: CfgNode) -> Norm:
    """``MODEL.RETINANET.NORM`` for detectron2's ``RetinaNetHead``: BN and SyncBN as detectron2 handles
    them (per level), BCN and SyncBCN per level, every other norm shared across levels."""
    name = cfg.MODEL.RETINANET.NORM
    if name in ("BN", "SyncBN"):
        return name  # detectron2's head builds a CycleBatchNormList itself
    norm = resolve_cfg_norm(cfg, _NORM_KEY)
    if name in _PER_LEVEL_NORMS:
        return _per_level(norm, len(cfg.MODEL.RETINANET.IN_FEATURES))
    return norm


@META_ARCH_REGISTRY.register()
class WSRetinaNet(RetinaNet):
    """:class:`RetinaNet` whose head takes the plugin's norms (``MODEL.RETINANET.NORM``) with WS on its normed convs.

    Pair it with ``build_ws_retinanet_resnet_fpn_backbone`` for WS in the
    backbone. The two predictors carry no norm and stay plain.
    """

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        ret = super().from_config(with_resolved_norms(cfg, {_NORM_KEY: _head_norm(cfg)}))
        enable_fast_path(standardize_from_cfg(ret["head"], cfg))
        return ret
