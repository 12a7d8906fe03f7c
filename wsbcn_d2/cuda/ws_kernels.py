"""Triton kernels of Weight Standardization: the rows of a flat buffer, one row per output channel.

Every weight of a :class:`~wsbcn_d2.cuda.WSConvGroup` is flattened into one
buffer and standardized by one forward and one backward launch, whatever the
number of convs. The formulas are those of :mod:`wsbcn_d2.layers.ws_conv`
(its torch code is the reference the kernels are tested against), with the
WS form as two compile-time flags:

    r = sqrt(sum((W - mean)^2) / d + eps_in)     d = n - 1 (UNBIASED) or n
    s = r + eps_out                              eps in the root (EPS_IN_ROOT) or outside it
    W_hat = (W - mean) / s
    dW = (g - mean(g)) / s - W_hat * sum(g * W_hat) / (d * r)
"""
from typing import Tuple

import torch

from .launcher import launch, launch_key

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without triton
    triton = None

__all__ = ["ws_rows_forward", "ws_rows_backward"]

_BLOCK = 512

if triton is not None:

    @triton.jit
    def _ws_forward_kernel(
        w_ptr,  # (total,) the flat weights, any float dtype
        out_ptr,  # (total,) float32: W_hat
        root_ptr,  # (rows,) float32: r per row, for the backward
        row_start_ptr,  # (rows,) int64: where each row starts in the flat buffer
        row_len_ptr,  # (rows,) int32: n, the row's length (a filter's fan-in)
        eps,
        UNBIASED: tl.constexpr,
        EPS_IN_ROOT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # one program per row: two passes for mean and variance, one to write W_hat
        row = tl.program_id(0)
        start = tl.load(row_start_ptr + row)
        n = tl.load(row_len_ptr + row)
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n, BLOCK):
            acc += tl.load(w_ptr + start + i + offs, mask=i + offs < n, other=0.0).to(tl.float32)
        mean = tl.sum(acc, axis=0) / n
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n, BLOCK):
            m = i + offs < n
            d = tl.where(m, tl.load(w_ptr + start + i + offs, mask=m, other=0.0).to(tl.float32) - mean, 0.0)
            acc += d * d
        var = tl.sum(acc, axis=0) / (n - 1 if UNBIASED else n)
        if EPS_IN_ROOT:
            root = tl.sqrt(var + eps)
            inv_s = 1.0 / root
        else:
            root = tl.maximum(tl.sqrt(var), 1.1754943508222875e-38)  # float32's tiny: constant filters
            inv_s = 1.0 / (root + eps)
        for i in range(0, n, BLOCK):
            m = i + offs < n
            w = tl.load(w_ptr + start + i + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(out_ptr + start + i + offs, (w - mean) * inv_s, mask=m)
        tl.store(root_ptr + row, root)

    @triton.jit
    def _ws_backward_kernel(
        g_ptr,  # (total,) the gradient of W_hat, any float dtype
        w_hat_ptr,  # (total,) float32: the forward's W_hat
        root_ptr,  # (rows,) float32: the forward's r
        grad_ptr,  # (total,) float32: dW
        row_start_ptr,  # (rows,) int64
        row_len_ptr,  # (rows,) int32
        eps,
        UNBIASED: tl.constexpr,
        EPS_IN_ROOT: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        start = tl.load(row_start_ptr + row)
        n = tl.load(row_len_ptr + row)
        offs = tl.arange(0, BLOCK)
        sum_g = tl.zeros([BLOCK], dtype=tl.float32)
        sum_gw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(0, n, BLOCK):
            m = i + offs < n
            g = tl.load(g_ptr + start + i + offs, mask=m, other=0.0).to(tl.float32)
            sum_g += g
            sum_gw += g * tl.load(w_hat_ptr + start + i + offs, mask=m, other=0.0)
        root = tl.load(root_ptr + row)
        g_mean = tl.sum(sum_g, axis=0) / n
        inv_s = 1.0 / root if EPS_IN_ROOT else 1.0 / (root + eps)
        c = tl.sum(sum_gw, axis=0) / ((n - 1 if UNBIASED else n) * root)
        for i in range(0, n, BLOCK):
            m = i + offs < n
            g = tl.load(g_ptr + start + i + offs, mask=m, other=0.0).to(tl.float32)
            w_hat = tl.load(w_hat_ptr + start + i + offs, mask=m, other=0.0)
            tl.store(grad_ptr + start + i + offs, (g - g_mean) * inv_s - w_hat * c, mask=m)


def ws_rows_forward(
    flat: torch.Tensor, row_start: torch.Tensor, row_len: torch.Tensor, eps: float, unbiased: bool, eps_in_root: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Standardize the rows of ``flat``: ``(W_hat float32, r per row float32)``.

    Row ``i`` is ``flat[row_start[i] : row_start[i] + row_len[i]]`` (int64 / int32 tensors);
    ``unbiased`` and ``eps_in_root`` are the WS form (:class:`~wsbcn_d2.layers.WSForm`).
    """
    w_hat = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    root = torch.empty(row_start.shape, dtype=torch.float32, device=flat.device)
    if row_start.numel():
        meta = dict(UNBIASED=unbiased, EPS_IN_ROOT=eps_in_root, BLOCK=_BLOCK)
        args = (flat, w_hat, root, row_start, row_len, float(eps))
        launch(_ws_forward_kernel, (row_start.numel(),), args, meta, launch_key(flat, row_start, row_len))
    return w_hat, root


def ws_rows_backward(
    grad: torch.Tensor,
    w_hat: torch.Tensor,
    root: torch.Tensor,
    row_start: torch.Tensor,
    row_len: torch.Tensor,
    eps: float,
    unbiased: bool,
    eps_in_root: bool,
) -> torch.Tensor:
    """The gradient of :func:`ws_rows_forward` (same form) with respect to ``flat``, in float32."""
    out = torch.empty_like(w_hat)
    if row_start.numel():
        grad = grad.contiguous()
        meta = dict(UNBIASED=unbiased, EPS_IN_ROOT=eps_in_root, BLOCK=_BLOCK)
        args = (grad, w_hat, root, out, row_start, row_len, float(eps))
        launch(_ws_backward_kernel, (row_start.numel(),), args, meta, launch_key(grad, w_hat, row_start, row_len))
    return out
