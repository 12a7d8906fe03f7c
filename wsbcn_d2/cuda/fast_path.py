"""The model's fast path on / off: :func:`enable_fast_path` and :func:`disable_fast_path`.

Entering it changes classes in place (as :meth:`WSConv2d.convert_ <wsbcn_d2.layers.WSConv2d.convert_>`
does), never parameters, buffers or the state dict:

- every :class:`WSConv2d` joins one :class:`WSConvGroup` (a :class:`GroupedWSConv2d`);
- every :class:`BatchChannelNorm2d` becomes a :class:`KernelBatchChannelNorm2d`;
- detectron2's ResNet stems and blocks whose convs carry BCNs let those convs
  apply the ReLUs that follow them, and the block's last conv the shortcut
  addition before its ReLU; so do WS convs with a BCN and a ReLU activation (the
  box and mask heads' conv towers) (:class:`WSConvBCNReLU`). BCN runs both inside
  its kernels: per conv and step, one ReLU kernel and autograd node less, and an
  addition less per block.

Each of them runs the layers' torch code where the kernels do not apply (CPU
tensors, float64, tracing), so the model computes the same function either way.
"""
from typing import Callable, Dict, Optional

import torch
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from torch import nn
from torch.nn import functional as F

from ..layers.bcn import BatchChannelNorm2d
from ..layers.ws_conv import WSConv2d
from . import dispatch
from .bcn_function import on_kernels, runs_on_kernels
from .ws_group import GroupedWSConv2d, WSConvGroup

__all__ = [
    "KernelBatchChannelNorm2d",
    "WSConvBCNReLU",
    "batch_channel_norm",
    "disable_fast_path",
    "enable_fast_path",
]


class KernelBatchChannelNorm2d(BatchChannelNorm2d):
    """A :class:`BatchChannelNorm2d` computed in its kernels where they apply
    (:func:`~wsbcn_d2.cuda.bcn_function.runs_on_kernels`), estimate update included, which can also
    add a residual and apply a ReLU (:func:`batch_channel_norm`)."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
        if residual is not None and residual.shape != x.shape:
            shapes = f"{tuple(x.shape)}, got {tuple(residual.shape)}"
            raise ValueError(f"BCN's residual must have the input's shape {shapes}")
        if runs_on_kernels(self, x):
            return on_kernels(self, x, residual, relu)
        return _add_relu_(super().forward(x), residual, relu)


def batch_channel_norm(
    bcn: BatchChannelNorm2d, x: torch.Tensor, residual: Optional[torch.Tensor] = None, relu: bool = False
) -> torch.Tensor:
    """``bcn(x)``, plus ``residual`` (x's shape) if given, then a ReLU if ``relu``: detectron2's
    ``out += shortcut; F.relu_(out)`` after a BCN, inside BCN's kernels on the fast path."""
    if isinstance(bcn, KernelBatchChannelNorm2d):
        return bcn(x, residual, relu)
    return _add_relu_(bcn(x), residual, relu)


def _add_relu_(y: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    if residual is not None:
        y += residual
    return F.relu_(y) if relu else y


class WSConvBCNReLU(GroupedWSConv2d):
    """A WS conv with a BCN, followed by a ReLU (its ``activation``, or the ReLU after it in a ResNet block):
    ``relu(BCN(conv(x)) + residual)``, ``residual`` optional, the addition and the ReLU inside BCN's kernels
    (:func:`batch_channel_norm`)."""

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        # the norm is a KernelBatchChannelNorm2d (enable_fast_path converts every BCN), which also refuses tracing
        return self.norm(self._conv_forward(x, self.standardized_weight(), self.bias), residual, True)


class _BasicStem(BasicStem):
    """detectron2's ``BasicStem``, its ReLU applied by ``conv1``."""

    relu_convs = ("conv1",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)


class _BasicBlock(BasicBlock):
    """detectron2's ``BasicBlock``, its ReLUs applied by its convs, ``conv2`` adding the shortcut first."""

    relu_convs = ("conv1", "conv2")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x), x if self.shortcut is None else self.shortcut(x))


class _BottleneckBlock(BottleneckBlock):
    """detectron2's ``BottleneckBlock``, its ReLUs applied by its convs, ``conv3`` adding the shortcut first."""

    relu_convs = ("conv1", "conv2", "conv3")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)), x if self.shortcut is None else self.shortcut(x))


_FUSED_BLOCKS: Dict[type, type] = {cls.__bases__[0]: cls for cls in (_BasicStem, _BasicBlock, _BottleneckBlock)}
"""detectron2's stem and block classes -> their subclasses whose ``relu_convs`` apply the ReLUs."""

_LAYER_CLASSES: Dict[type, type] = {
    GroupedWSConv2d: WSConv2d,
    WSConvBCNReLU: WSConv2d,
    KernelBatchChannelNorm2d: BatchChannelNorm2d,
    **{fused: block for block, fused in _FUSED_BLOCKS.items()},
}
"""Each fast-path class -> the class it replaced."""


def enable_fast_path(module: nn.Module) -> nn.Module:
    """Put ``module`` on the CUDA fast path (module docstring), in place; returns ``module``.

    Does nothing with ``WSBCN_TRITON=0`` or without triton. Entering again regroups every WSConv2d
    of ``module`` into one group (e.g. a backbone's and its FPN's). Every WSConv2d must share one WS form
    and eps.
    """
    if not dispatch.ENABLED:
        return module
    convs = [m for m in module.modules() if isinstance(m, WSConv2d)]
    if convs:
        WSConvGroup(convs)
    for m in module.modules():  # a block before its convs, a conv before its norm
        if type(m) is BatchChannelNorm2d:
            m.__class__ = KernelBatchChannelNorm2d
        elif type(m) in _FUSED_BLOCKS:
            fused_block = _FUSED_BLOCKS[type(m)]
            block_convs = [getattr(m, name) for name in fused_block.relu_convs]
            if all(_carries_bcn(conv) and conv.activation is None for conv in block_convs):
                m.__class__ = fused_block
                for conv in block_convs:
                    conv.__class__ = WSConvBCNReLU
        elif _carries_bcn(m) and _is_relu(m.activation):
            m.__class__ = WSConvBCNReLU
    return module


def _carries_bcn(conv: nn.Module) -> bool:
    """A grouped WS conv (not yet fused) with a BCN."""
    return type(conv) is GroupedWSConv2d and isinstance(conv.norm, BatchChannelNorm2d)


def _is_relu(activation: Optional[Callable]) -> bool:
    return activation is F.relu_ or activation is F.relu or isinstance(activation, nn.ReLU)


def disable_fast_path(module: nn.Module) -> nn.Module:
    """Undo :func:`enable_fast_path` in ``module``, in place: the layers' and detectron2's classes, no WS
    groups. Returns ``module``."""
    for m in module.modules():
        layer_class = _LAYER_CLASSES.get(type(m))
        if layer_class is not None:
            m.__class__ = layer_class
        if isinstance(m, WSConv2d):
            m.__dict__.pop("ws_group", None)
    return module
