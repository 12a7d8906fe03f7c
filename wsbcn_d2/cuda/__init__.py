"""The CUDA fast path of WS and BCN: Triton kernels for what a GPU step at 1-2 images per GPU is bound by.

On a GPU such a step is bound by the host issuing kernels: standardizing 69
conv weights one by one, or normalizing with dozens of tiny (N, C) torch ops
per BCN layer, costs more than the convolutions' extra arithmetic. The fast
path computes the layers' function (:mod:`wsbcn_d2.layers`, whose torch code is
the CPU path and the kernels' reference) in a few kernels:

- :mod:`.ws_kernels`, :mod:`.ws_group`: all WS weights of a model in one flat
  buffer, one kernel forward and one backward;
- :mod:`.bcn_kernels`, :mod:`.bcn_function`: BCN with a fixed-statistics batch
  step in two kernels each way, estimate update, a ResNet block's shortcut
  addition and ReLU included;
- :mod:`.launcher`: launches compiled kernels without Triton's per-call binding;
- :mod:`.fast_path`: :func:`enable_fast_path` puts a model on it, which the
  plugin's builders do; :mod:`.dispatch`: the switch, ``WSBCN_TRITON=0`` off.

Where the kernels do not apply (CPU tensors, float64, tracing) the layers' torch
code runs; the kernels run on CPU tensors through Triton's interpreter in tests.
"""
from .fast_path import batch_channel_norm, disable_fast_path, enable_fast_path
from .ws_group import WSConvGroup

__all__ = ["WSConvGroup", "batch_channel_norm", "disable_fast_path", "enable_fast_path"]
