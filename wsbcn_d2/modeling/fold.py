"""Deploy without WS / BCN overhead: fold them into plain convs and group norms.

At inference WS's standardized weight is a constant, and so is BCN's batch
step (a per-channel affine given by its estimates, or by its running statistics
for large-batch BCN). :func:`fold_for_inference` bakes both into the model:

- every :class:`WSConv2d` becomes a plain ``detectron2.layers.Conv2d`` holding
  the standardized weight;
- every BCN carried by a conv (``conv.norm``) has its batch step
  ``x * a + b`` folded into that conv (``W[o] *= a[o]``, bias ``a * bias + b``)
  and becomes an ``nn.GroupNorm(G, C)`` whose per-channel affine repeats the
  BCN's per-group affine; any other BCN (RetinaNet's per-level head norms, whose
  conv is shared across levels) becomes its batch step as a ``FrozenBatchNorm2d``
  followed by that ``nn.GroupNorm``;
- the CUDA fast path's classes become the layers' and detectron2's again
  (:func:`wsbcn_d2.cuda.disable_fast_path`).

The result holds only detectron2 / torch layers, so it exports like any
detectron2 model (e.g. ``detectron2.export.TracingAdapter`` + ``torch.jit.trace``).
"""
import copy

import torch
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from torch import nn

from ..cuda import disable_fast_path
from ..layers import BatchChannelNorm2d, WSConv2d

__all__ = ["fold_for_inference"]


def _plain_conv_(conv: WSConv2d) -> None:
    """Turn a WSConv2d into a Conv2d holding its standardized weight, in place."""
    weight = conv.standardized_weight().detach().clone()
    conv.__class__ = Conv2d  # in place: detectron2's FPN and heads keep plain lists of their convs
    for name in ("eps", "form", "_cached_weight", "_cache_key"):
        delattr(conv, name)
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)


def _channel_step(bcn: BatchChannelNorm2d) -> nn.GroupNorm:
    """BCN's channel step as an ``nn.GroupNorm`` whose per-channel affine repeats the per-group one."""
    group_norm = nn.GroupNorm(bcn.num_groups, bcn.num_channels, eps=bcn.eps).to(bcn.weight)
    channels_per_group = bcn.num_channels // bcn.num_groups
    group_norm.weight.copy_(bcn.weight.repeat_interleave(channels_per_group))
    group_norm.bias.copy_(bcn.bias.repeat_interleave(channels_per_group))
    return group_norm.requires_grad_(bcn.weight.requires_grad)


def _fold_bcn_(conv: Conv2d) -> None:
    """Fold the batch step of ``conv.norm`` (a BCN) into ``conv``; the rest becomes a GroupNorm."""
    bcn: BatchChannelNorm2d = conv.norm
    affine = bcn.batch_step_affine()
    if affine is None:  # a batch step without running statistics: nothing constant to fold
        return
    scale, shift = affine
    weight = conv.weight * scale.view(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype)
    bias = shift if conv.bias is None else torch.addcmul(shift, scale, conv.bias)
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=conv.weight.requires_grad)
    conv.norm = _channel_step(bcn)


def _plain_bcn(bcn: BatchChannelNorm2d) -> nn.Module:
    """A BCN that no conv carries, as plain layers: its batch step frozen, then its channel step."""
    if bcn.batch_step_affine() is None:
        return bcn
    batch_step = FrozenBatchNorm2d.convert_frozen_batchnorm(copy.deepcopy(bcn.batch_norm))
    return nn.Sequential(batch_step, _channel_step(bcn))


@torch.no_grad()
def fold_for_inference(model: nn.Module) -> nn.Module:
    """Return an eval-mode copy of ``model`` with WS and BCN folded away (``model`` is untouched).

    In eval the copy computes what ``model`` computes in eval, up to float
    rounding. A BCN without running statistics (nothing constant to fold) stays a BCN.
    """
    folded = disable_fast_path(copy.deepcopy(model).eval())
    for module in list(folded.modules()):
        if isinstance(module, WSConv2d):
            _plain_conv_(module)
        if isinstance(module, Conv2d) and isinstance(module.norm, BatchChannelNorm2d):
            _fold_bcn_(module)
    for parent in list(folded.modules()):
        for name, child in parent.named_children():
            if isinstance(child, BatchChannelNorm2d):
                setattr(parent, name, _plain_bcn(child))
    return folded
