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
import torch
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.utils import comm
from torch import distributed as dist
from torch import nn
from torch.nn import functional as F

__all__ = ["BatchChannelNorm2d", "EstimatedBatchNorm2d", "DEFAULT_UPDATE_RATE"]

DEFAULT_UPDATE_RATE = 0.1
"""Default estimate update rate ``r`` for training from scratch.

The released code stores ``r`` (``estbn_moving_speed``) as 0 and never sets it,
which only suits fine-tuning from loaded statistics. 0.1 is the rate torch's
BatchNorm uses for its running statistics: an exponential average over about
ten steps (10-20 images at 1-2 images per GPU), fast enough to follow the
weights while they change from scratch, slow enough to smooth the per-image
noise. ``r = 0`` reproduces the released code exactly.
"""


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
        if not 0.0 <= update_rate <= 1.0:
            raise ValueError(f"update_rate must be in [0, 1], got {update_rate}")
        super().__init__(num_features, eps=eps)
        self.update_rate = update_rate

    @torch.no_grad()
    def _update_estimates(self, x: torch.Tensor) -> None:
        count = x.numel() // self.num_features
        stats = x.new_zeros(2 * self.num_features + 1, dtype=torch.float32)
        if count > 0:
            # sums around the previous estimate: exact, and cheaper on CPU than torch.var_mean
            centered = x.float() - self.running_mean.view(1, -1, 1, 1)
            mean_sum = self.running_mean * count + centered.sum(dim=(0, 2, 3))
            dist_sum = torch.linalg.vector_norm(centered, dim=(0, 2, 3)).square()
            stats = torch.cat([mean_sum, dist_sum, stats.new_full((1,), count)])
        if comm.get_world_size() > 1:
            dist.all_reduce(stats)  # every rank joins, even with an empty batch
        elif count == 0:
            return
        mean_sum, dist_sum, total = stats.split([self.num_features, self.num_features, 1])
        rate = self.update_rate * (total > 0)  # no update when no process saw a sample
        total = total.clamp(min=1)
        self.running_mean.lerp_(mean_sum / total, rate)
        self.running_var.lerp_(dist_sum / total, rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.update_rate > 0:
            self._update_estimates(x)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, update_rate={self.update_rate}"


class BatchChannelNorm2d(nn.GroupNorm):
    """Batch-Channel Normalization: a batch step, then group norm with a per-group affine.

    A subclass of ``nn.GroupNorm`` (its channel step) so that detectron2 and
    torch treat it as a norm layer, e.g. for ``SOLVER.WEIGHT_DECAY_NORM``.
    ``weight`` and ``bias`` hold one value per group (the official code's
    (1, G, 1) tensors, flattened); the batch step lives in ``batch_norm``.
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
        if num_groups < 1 or num_channels % num_groups != 0:
            raise ValueError(f"BCN num_groups={num_groups} must be >= 1 and divide num_channels={num_channels}")
        if eps <= 0:
            raise ValueError(f"BCN eps must be > 0, got {eps}")
        super().__init__(num_groups, num_channels, eps=eps, affine=False)
        self.weight = nn.Parameter(torch.ones(num_groups))
        self.bias = nn.Parameter(torch.zeros(num_groups))
        if estimate:
            self.batch_norm = EstimatedBatchNorm2d(num_channels, eps=eps, update_rate=update_rate)
        else:
            # stats_mode "N" weights each process by its batch size and accepts empty batches
            self.batch_norm = NaiveSyncBatchNorm(num_channels, eps=eps, stats_mode="N")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_per_group = self.num_channels // self.num_groups
        return F.group_norm(
            self.batch_norm(x),
            self.num_groups,
            self.weight.repeat_interleave(channels_per_group),
            self.bias.repeat_interleave(channels_per_group),
            self.eps,
        )

    def extra_repr(self) -> str:
        return f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}"
