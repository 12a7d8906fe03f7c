"""Batch-Channel Normalization (Qiao et al., arXiv 1903.10520, Sec. 4).

BCN is a batch-normalization step followed by a channel (group) normalization
step whose affine transform is per *group*, as in the official code
(github.com/joe-siyuan-qiao/Batch-Channel-Normalization)::

    x1 = BatchStep(x)                                    # per channel
    x2 = (x1 - mean_g(x1)) / sqrt(var_g(x1) + eps)       # per sample and group, biased var
    y  = gamma[g] * x2 + beta[g]                         # G affine pairs, not C

Two batch steps exist:

* micro-batch BCN (``estimate=True``, the paper's method for 1-2 images per GPU):
  :class:`EstimatedBatchNorm2d`, which normalizes with estimated population
  statistics instead of the tiny batch's own statistics;
* large-batch BCN (``estimate=False``): an ordinary batch norm, synchronized
  across processes in distributed training.
"""
import functools
import math
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from detectron2.layers import FrozenBatchNorm2d, NaiveSyncBatchNorm
from detectron2.utils import comm
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

from .checks import check_eps, check_num_groups, check_update_rate
from .ws_conv import export_error

__all__ = [
    "BatchChannelNorm2d",
    "EstimatedBatchNorm2d",
    "accumulate_estimates",
    "DEFAULT_UPDATE_RATE",
    "channel_moments",
    "group_norm_output_dtype",
]

DEFAULT_UPDATE_RATE = 0.1
"""Default estimate update rate ``r`` for training from scratch.

The released code stores ``r`` (``estbn_moving_speed``) as 0 and never sets it,
which only suits fine-tuning from loaded statistics. 0.1 is the rate torch's
BatchNorm uses for its running statistics: an exponential average over about
ten steps (10-20 images at 1-2 images per GPU), fast enough to follow the
weights while they change from scratch, slow enough to smooth the per-image
noise. ``r = 0`` reproduces the released code exactly.
"""


@torch.no_grad()
def channel_moments(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, C) mean and biased variance of each sample's channel over the spatial dims.

    Computed in float32 or wider from the sums of ``x`` and ``x ** 2``: two
    vectorized passes, where ``torch.var_mean``'s Welford loop is an order of
    magnitude slower on CPU. The variance's relative rounding error is about
    1e-7 * (1 + mean ** 2 / var), negligible for conv outputs, whose spatial
    mean per channel is of the order of their spread (WS filters have zero
    mean, so a WS conv does not respond to a constant input).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    flat = x.flatten(2)
    count = max(flat.shape[2], 1)
    mean = flat.sum(dim=2, dtype=dtype) / count
    mean_sq = torch.linalg.vector_norm(flat, dim=2, dtype=dtype).square_() / count
    return mean, (mean_sq - mean.square()).clamp_min_(0)


@functools.lru_cache(maxsize=None)
def _autocast_group_norm_dtype(device_type: str, autocast_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    with torch.autocast(device_type, dtype=autocast_dtype):
        return F.group_norm(torch.ones(1, 1, 2, dtype=dtype, device=device_type), 1).dtype


def group_norm_output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.group_norm(x)`` returns: ``x``'s, unless autocast runs group norm in float32 (CUDA)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x.dtype
    return _autocast_group_norm_dtype(device_type, torch.get_autocast_dtype(device_type), x.dtype)


class _AffineGroupNorm(torch.autograd.Function):
    """``group_norm(x * scale + shift)`` with a per-group affine, in one pass over ``x``.

    ``scale`` and ``shift`` are per channel (BCN's batch step with fixed
    statistics). The group statistics of ``x1 = x * scale + shift`` follow from
    the per-(sample, channel) moments of ``x``, so ``x1`` is never materialized:
    the forward is ``y = x * S + T`` with (N, C) coefficients, only ``x`` and
    (N, C) statistics are kept for the backward, which is ``dx = A * dy + B * x + D``
    after two per-(sample, channel) reductions. The output has ``out_dtype``.
    """

    @staticmethod
    def forward(ctx, x, scale, shift, weight, bias, num_groups: int, eps: float, mean, var, out_dtype):
        n, c = x.shape[:2]
        grouped = (n, num_groups, c // num_groups)
        a, b = scale.to(mean.dtype), shift.to(mean.dtype)
        x1_mean = (mean * a + b).view(grouped)  # per (n, c) mean of x1
        mu = x1_mean.mean(dim=2, keepdim=True)
        group_var = ((var * a.square()).view(grouped) + (x1_mean - mu).square()).mean(dim=2, keepdim=True)
        rstd = (group_var + eps).rsqrt()  # (n, G, 1)
        gamma = weight.to(mean.dtype).view(1, -1, 1)
        s = a.view(1, num_groups, -1) * rstd * gamma
        t = (b.view(1, num_groups, -1) - mu) * rstd * gamma + bias.to(mean.dtype).view(1, -1, 1)
        ctx.save_for_backward(x, a, b, mean, var, mu, rstd, gamma)
        ctx.num_groups = num_groups
        ctx.dtypes = (scale.dtype, shift.dtype, weight.dtype, bias.dtype)
        coef_shape = (n, c) + (1,) * (x.dim() - 2)
        # x * S + T as mul then add_: twice as fast on CPU as a broadcasting addcmul
        return (x * s.reshape(coef_shape)).add_(t.reshape(coef_shape)).to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, a, b, mean, var, mu, rstd, gamma = ctx.saved_tensors
        n, c = x.shape[:2]
        grouped = (n, ctx.num_groups, c // ctx.num_groups)
        dy_flat, x_flat = dy.flatten(2), x.flatten(2).to(dy.dtype)
        hw = x_flat.shape[2]
        # per (n, c): sums of dy and of dy * (x - mean)
        sum_dy = dy_flat.sum(dim=2, dtype=mean.dtype).view(grouped)
        sum_dy_x = torch.einsum("ncl,ncl->nc", dy_flat, x_flat).to(mean.dtype).view(grouped)
        sum_dy_xc = sum_dy_x - mean.view(grouped) * sum_dy
        av, bv = a.view(1, *grouped[1:]), b.view(1, *grouped[1:])
        x1c = mean.view(grouped) * av + bv - mu  # per (n, c) mean of x1, centered on its group's
        sum_dy_xhat = rstd * (av * sum_dy_xc + x1c * sum_dy)
        k = grouped[2] * hw
        m1 = gamma * sum_dy.sum(dim=2, keepdim=True) / k  # group means of gamma * dy
        m2 = gamma * sum_dy_xhat.sum(dim=2, keepdim=True) / k  # and of gamma * dy * x_hat
        # dx1 = rstd * (gamma * dy - m1 - x_hat * m2) with x_hat = rstd * (x1 - mu); dx = a * dx1
        coef_shape = (n, c) + (1,) * (x.dim() - 2)
        coef_dy = (av * rstd * gamma).reshape(coef_shape)
        coef_x = (-av.square() * rstd.square() * m2).reshape(coef_shape)
        const = (-av * rstd * (m1 + rstd * m2 * (bv - mu))).reshape(coef_shape)
        dx = (x * coef_x).add_(const).addcmul_(dy, coef_dy)
        # scale and shift: sums of dx1 * x and of dx1 over (n, hw)
        sum_dx1 = rstd * (gamma * sum_dy - hw * m1 - hw * rstd * m2 * x1c)
        sum_dx1_xc = rstd * (gamma * sum_dy_xc - hw * rstd * m2 * av * var.view(grouped))
        d_scale = (sum_dx1_xc + mean.view(grouped) * sum_dx1).sum(dim=0).flatten()
        d_shift = sum_dx1.sum(dim=0).flatten()
        d_weight = sum_dy_xhat.sum(dim=(0, 2))
        d_bias = sum_dy.sum(dim=(0, 2))
        grads = (g.to(dtype) for g, dtype in zip((d_scale, d_shift, d_weight, d_bias), ctx.dtypes))
        return (dx.to(x.dtype), *grads, None, None, None, None, None)


class EstimatedBatchNorm2d(nn.BatchNorm2d):
    """The batch step of micro-batch BCN: normalize with *estimated* statistics.

    In training, without gradient, the estimates move towards the current
    batch's per-channel statistics (reduced over all processes)::

        m = mean(x)                          over (N, H, W)
        v = mean((x - running_mean) ** 2)    around the *previous* estimate
        running_mean <- (1 - r) * running_mean + r * m
        running_var  <- (1 - r) * running_var  + r * v

    then, in training and eval alike, with the just-updated estimates::

        y = weight * (x - running_mean) / sqrt(running_var + eps) + bias

    This equals the official ``EstBN`` numerically. ``r`` is a plain attribute,
    not a buffer, so a loaded checkpoint cannot silently change it (the
    official checkpoints store ``estbn_moving_speed = 0``). A subclass of
    ``nn.BatchNorm2d``: detectron2's freezing turns it into a
    ``FrozenBatchNorm2d`` computing the same function with fixed estimates,
    and ``SOLVER.WEIGHT_DECAY_NORM`` applies to its affine parameters.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, update_rate: float = DEFAULT_UPDATE_RATE):
        check_update_rate(update_rate, "BCN update_rate")
        super().__init__(num_features, eps=eps)
        self.update_rate = update_rate
        # set by accumulate_estimates(), with the step's starting estimates and pooled statistics so far
        self._accumulating = False
        self._step_start: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self._step_stats: Optional[torch.Tensor] = None

    @property
    def accumulating(self) -> bool:
        """Whether the estimates pool the batches of one optimizer step (:func:`accumulate_estimates`)."""
        return self._accumulating

    @torch.no_grad()
    def update_estimates(self, mean: torch.Tensor, var: torch.Tensor, spatial_size: int) -> None:
        """Move the estimates towards a batch given its per-(sample, channel) moments.

        Within :func:`accumulate_estimates`, the batches of one optimizer step are pooled: the
        estimates become ``(1 - r) * start + r * pooled`` with ``start`` the step's starting
        estimates and ``pooled`` the statistics of the step's batches so far (variance around
        ``start``'s mean), which after the step's last batch is the update a run seeing all of
        them in one batch makes.

        Args:
            mean, var: (N, C) mean and biased variance of each sample's channel over (H, W),
                as :func:`channel_moments` returns them.
            spatial_size: H * W.
        """
        accumulating = self._accumulating
        if accumulating and self._step_start is None:  # the step's first batch
            self._step_start = (self.running_mean.clone(), self.running_var.clone())
        start_mean, start_var = self._step_start if accumulating else (self.running_mean, self.running_var)
        count = mean.shape[0] * spatial_size
        stats = mean.new_zeros(2 * self.num_features + 1)
        if count > 0:
            # sum of x and of (x - start_mean)^2 per channel, from each sample's centered moments
            mean_sum = mean.sum(dim=0) * spatial_size
            dist_sum = (var + (mean - start_mean).square()).sum(dim=0) * spatial_size
            stats = torch.cat([mean_sum, dist_sum, stats.new_full((1,), count)])
        if comm.get_world_size() > 1:
            dist.all_reduce(stats)  # every rank joins, even with an empty batch
        elif count == 0 and not accumulating:
            return
        if accumulating:
            self._step_stats = stats if self._step_stats is None else self._step_stats + stats
            stats = self._step_stats
        mean_sum, dist_sum, total = stats.split([self.num_features, self.num_features, 1])
        dtype = self.running_mean.dtype  # the estimates keep their own dtype
        rate = (total > 0).to(dtype) * self.update_rate  # no update when no process saw a sample
        total = total.clamp(min=1)
        self.running_mean.copy_(start_mean.lerp((mean_sum / total).to(dtype), rate))
        self.running_var.copy_(start_var.lerp((dist_sum / total).to(dtype), rate))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.update_rate > 0:
            self.update_estimates(*channel_moments(x), math.prod(x.shape[2:]))
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, update_rate={self.update_rate}"


@contextmanager
def accumulate_estimates(model: nn.Module) -> Iterator[None]:
    """The forwards of ``model`` within form one optimizer step of gradient accumulation.

    Every :class:`EstimatedBatchNorm2d` of ``model`` pools the statistics of the batches it sees
    within (all processes) and updates its estimates once per batch from the pooled statistics
    and the step's starting estimates: micro-batch ``j`` normalizes with estimates that have seen
    batches ``0..j``, and after the last one they are the estimates of a run that saw all the
    step's batches in one batch (or in as many processes). Without it, each forward is a step.
    """
    layers = [m for m in model.modules() if isinstance(m, EstimatedBatchNorm2d)]
    for layer in layers:
        layer._accumulating = True
    try:
        yield
    finally:
        for layer in layers:
            layer._accumulating, layer._step_start, layer._step_stats = False, None, None


class BatchChannelNorm2d(nn.GroupNorm):
    """Batch-Channel Normalization: a batch step, then group norm with a per-group affine.

    A subclass of ``nn.GroupNorm`` (its channel step) so that detectron2 and
    torch treat it as a norm layer, e.g. for ``SOLVER.WEIGHT_DECAY_NORM``.
    ``weight`` and ``bias`` hold one value per group (the official code's
    (1, G, 1) tensors, flattened); the batch step lives in ``batch_norm``.

    Whenever the batch step normalizes with fixed statistics (micro-batch BCN,
    a frozen step, large-batch BCN in eval) it is a per-channel affine, and
    the two steps run fused (:class:`_AffineGroupNorm`): the same function,
    computed in about the passes of a group norm and keeping only the input
    for the backward, as a group norm does. The output has the dtype a group
    norm would return (:func:`group_norm_output_dtype`); statistics are float32
    or wider, the estimates keep their own dtype. This torch code is the CPU
    path and the reference of the CUDA fast path (:mod:`wsbcn_d2.cuda`).
    """

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        estimate: bool = True,
        update_rate: float = DEFAULT_UPDATE_RATE,
    ):
        """
        Args:
            num_channels: C, the number of input channels.
            num_groups: G, the channel step's groups; must divide C.
            eps: added to variances in both steps.
            estimate: True for micro-batch BCN (:class:`EstimatedBatchNorm2d`),
                False for large-batch BCN (batch norm synchronized across processes).
            update_rate: the estimates' update rate r (``estimate=True`` only).
        """
        check_num_groups(num_groups, "BCN num_groups", num_channels)
        check_eps(eps, "BCN eps")
        super().__init__(num_groups, num_channels, eps=eps, affine=False)
        self.weight = nn.Parameter(torch.ones(num_groups))
        self.bias = nn.Parameter(torch.zeros(num_groups))
        if estimate:
            self.batch_norm = EstimatedBatchNorm2d(num_channels, eps=eps, update_rate=update_rate)
        else:
            # stats_mode "N" weights each process by its batch size and accepts empty batches
            self.batch_norm = NaiveSyncBatchNorm(num_channels, eps=eps, stats_mode="N")

    def fixed_statistics(self) -> bool:
        """Whether the batch step normalizes with fixed statistics: micro-batch BCN's always does (with
        estimates updated before, not during, the normalization), so do a frozen step and a large-batch
        step in eval."""
        bn = self.batch_norm
        return isinstance(bn, (EstimatedBatchNorm2d, FrozenBatchNorm2d)) or not (bn.training or bn.running_var is None)

    def batch_step_affine(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """The batch step as per-channel ``(scale, shift)``: ``x * scale + shift``.

        None when the step uses batch statistics (large-batch BCN in training).
        Differentiable in the step's affine parameters.
        """
        if not self.fixed_statistics():
            return None
        bn = self.batch_norm
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        return scale, bn.bias - bn.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BCN of ``x`` (N, C, H, W)."""
        if torch.jit.is_tracing():
            raise export_error(type(self).__name__)
        bn = self.batch_norm
        if not self.fixed_statistics():
            channels_per_group = self.num_channels // self.num_groups
            return F.group_norm(
                bn(x),
                self.num_groups,
                self.weight.repeat_interleave(channels_per_group),
                self.bias.repeat_interleave(channels_per_group),
                self.eps,
            )
        mean, var = channel_moments(x)
        if isinstance(bn, EstimatedBatchNorm2d) and bn.training and bn.update_rate > 0:
            bn.update_estimates(mean, var, math.prod(x.shape[2:]))
        scale, shift = self.batch_step_affine()
        return _AffineGroupNorm.apply(
            x, scale, shift, self.weight, self.bias, self.num_groups, self.eps, mean, var, group_norm_output_dtype(x)
        )

    def __prepare_scriptable__(self):
        raise export_error(type(self).__name__)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}"
