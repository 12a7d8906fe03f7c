"""BCN in its kernels, as an autograd function, with a ResNet block's addition and ReLU fused."""
import functools
import math
from typing import Callable, Optional

import torch
from detectron2.utils import comm

from ..layers.bcn import BatchChannelNorm2d, EstimatedBatchNorm2d, group_norm_output_dtype
from . import dispatch
from .bcn_kernels import bcn_backward, bcn_forward

__all__ = ["on_kernels", "runs_on_kernels"]


def _bcn_backward(ctx, dy: torch.Tensor) -> tuple:
    """:class:`_BCNKernels`' backward: the gradients of its inputs, in their dtypes."""
    x, workspace, bn_weight, bn_bias, weight, relu_output = ctx.saved_tensors
    dx, d_residual, *grads = bcn_backward(
        dy, (x, workspace), bn_weight, bn_bias, weight, relu_output, ctx.residual_gradient
    )
    d_bn_weight, d_bn_bias, d_weight, d_bias, d_residual = (
        g if g is None or g.dtype == dtype else g.to(dtype) for g, dtype in zip((*grads, d_residual), ctx.dtypes)
    )
    return dx, d_residual, d_bn_weight, d_bn_bias, None, None, d_weight, d_bias, None


class _BCNKernels(torch.autograd.Function):
    """``relu(BCN(x) + residual)`` (each optional) in :func:`~wsbcn_d2.cuda.bcn_kernels.bcn_forward`.

    Differentiable in ``x``, ``residual`` and the four affine parameters; the estimate update and the
    whole per-(N, C) algebra run inside the kernels. With the ReLU fused it keeps its output for the
    backward (which the next conv keeps anyway, as its input).
    """

    @staticmethod
    def forward(ctx, x, residual, bn_weight, bn_bias, running_mean, running_var, weight, bias, settings: tuple):
        # settings: bcn_forward's non-tensor arguments, one argument of Function.apply (each costs host time)
        bn_eps, gn_eps, update_rate, update, out_dtype, relu = settings
        tensors = (x, residual, bn_weight, bn_bias, running_mean, running_var, weight, bias)
        y, saved = bcn_forward(*tensors, bn_eps, gn_eps, update_rate, update, out_dtype, relu)
        ctx.save_for_backward(*saved, bn_weight, bn_bias, weight, y if relu else None)
        ctx.residual_gradient = ctx.needs_input_grad[1]
        residual_dtype = None if residual is None else residual.dtype
        ctx.dtypes = (bn_weight.dtype, bn_bias.dtype, weight.dtype, bias.dtype, residual_dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        # once differentiable, as the layer's torch code; once_differentiable's wrapper costs host time on
        # every call, so it only serves backward passes that build a graph (create_graph=True)
        if torch.is_grad_enabled():
            return torch.autograd.function.once_differentiable(_bcn_backward)(ctx, dy)
        return _bcn_backward(ctx, dy)


def runs_on_kernels(bcn: BatchChannelNorm2d, x: torch.Tensor) -> bool:
    """Whether the kernels compute ``bcn`` of ``x``: a CUDA input (of the kernels' dtypes, not empty, not
    traced) and a batch step with fixed statistics."""
    return dispatch.use_kernels(x) and x.numel() > 0 and bcn.fixed_statistics() and not torch.jit.is_tracing()


def on_kernels(
    bcn: BatchChannelNorm2d, x: torch.Tensor, residual: Optional[torch.Tensor] = None, relu: bool = False
) -> torch.Tensor:
    """``relu(BCN(x) + residual)`` (each optional) in the kernels, where :func:`runs_on_kernels` (not checked
    again): the addition and the ReLU in their output pass and their gradients in theirs, so that a ResNet
    block's end costs no kernels or autograd nodes of its own (a GPU step at 1-2 images is bound by the host
    issuing them)."""
    bn = bcn.batch_norm
    update = isinstance(bn, EstimatedBatchNorm2d) and bn.training and bn.update_rate > 0
    # across processes or micro-steps the estimates follow pooled statistics (torch), else the kernel updates them
    sync: Optional[Callable] = None
    if update and (comm.get_world_size() > 1 or bn.accumulating):
        sync = functools.partial(bn.update_estimates, spatial_size=math.prod(x.shape[2:]))
    settings = (bn.eps, bcn.eps, bn.update_rate if update else 0.0, sync, group_norm_output_dtype(x), relu)
    tensors = (x, residual, bn.weight, bn.bias, bn.running_mean, bn.running_var, bcn.weight, bcn.bias)
    if torch.is_grad_enabled() and any([t is not None and t.requires_grad for t in tensors]):
        return _BCNKernels.apply(*tensors, settings)
    # inference, frozen stages: no autograd function and its host overhead
    return bcn_forward(*tensors, *settings)[0]
