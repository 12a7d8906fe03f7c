"""Layers of Weight Standardization and Batch-Channel Normalization (no config knowledge)."""
from .bcn import DEFAULT_UPDATE_RATE, BatchChannelNorm2d, EstimatedBatchNorm2d, accumulate_estimates
from .checks import check_eps, check_num_groups, check_update_rate
from .norm import BATCH_STATISTICS_NORMS, NormOptions, norm_names, register_norm, resolve_norm
from .ws_conv import WS_FORMS, WSConv2d, WSForm, check_ws_form, standardize_weight

__all__ = [k for k in globals().keys() if not k.startswith("_")]
