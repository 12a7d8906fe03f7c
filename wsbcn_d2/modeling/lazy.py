"""WS models from detectron2's LazyConfig (Python configs).

Norms: any ``norm=`` / ``conv_norm=`` field takes the plugin's names through
:func:`wsbcn_d2.layers.resolve_norm`, e.g. ``L(resolve_norm)(norm="BCN")`` (with
``options=L(NormOptions)(...)`` for group counts, eps, update rate).

WS: make :func:`build_ws_model` the model's ``_target_`` and move the
meta-architecture to its ``meta_arch`` argument; every other field keeps its
path::

    model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    model.meta_arch, model._target_ = model._target_, build_ws_model
"""
from typing import Any, Callable, Union

from detectron2.utils.registry import locate
from torch import nn

from ..layers import check_ws_form
from ..cuda import enable_fast_path
from .wsbcn import check_ws_coverage, standardize_normed_convs

__all__ = ["build_ws_model"]


def build_ws_model(
    meta_arch: Union[str, Callable[..., nn.Module]], ws_eps: float = 1e-5, ws_form: str = "std+eps", **kwargs: Any
) -> nn.Module:
    """``meta_arch(**kwargs)`` with WS on every conv that carries a norm (the plugin's WS rule), on the
    CUDA fast path (:func:`wsbcn_d2.cuda.enable_fast_path`) as the YAML configs' models.

    Args:
        meta_arch: the model class (or its dotted name), e.g. ``GeneralizedRCNN``.
        ws_eps: WS eps (``MODEL.WS.EPS`` of the YAML configs).
        ws_form: WS form (``MODEL.WS.FORM``, :data:`~wsbcn_d2.layers.WS_FORMS`): pretrained weights need
            their own (``"var+eps"`` for the official BCN+WS backbones).
        kwargs: the meta-architecture's arguments, already instantiated.

    Logs a warning when the model has normed convs WS cannot convert, or none at all.
    """
    check_ws_form(ws_form, ws_eps)
    model = (locate(meta_arch) if isinstance(meta_arch, str) else meta_arch)(**kwargs)
    standardize_normed_convs(model, ws_eps, ws_form)
    enable_fast_path(model)
    check_ws_coverage(model)
    return model
