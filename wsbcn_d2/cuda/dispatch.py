"""The fast path's switch: which tensors go to the Triton kernels.

``WSBCN_TRITON=0`` (or a torch build without triton) turns the fast path off:
:func:`wsbcn_d2.cuda.enable_fast_path` then leaves models as they are, and
everything runs the layers' torch code.
"""
import os

import torch

try:
    import triton
except ImportError:  # CPU-only torch builds ship without triton
    triton = None

__all__ = ["ENABLED", "KERNEL_DTYPES", "use_kernels"]

ENABLED = triton is not None and os.environ.get("WSBCN_TRITON", "1") != "0"
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_kernels(x: torch.Tensor) -> bool:
    """Whether work on ``x`` goes through the kernels: CUDA tensors in float32, float16 or bfloat16."""
    return ENABLED and x.is_cuda and x.dtype in KERNEL_DTYPES
