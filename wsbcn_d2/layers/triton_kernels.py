"""Triton kernels for WS and BCN on CUDA tensors.

On a GPU a detection step is bound by kernel launches: standardizing 69 conv
weights one by one, or normalizing with dozens of tiny (N, C) torch ops per BCN
layer, costs more than the convolutions' extra arithmetic. These kernels do the
same computations as the torch code of :mod:`.ws_conv` and :mod:`.bcn`, which
stays the path for CPU tensors and the reference the kernels are tested
against (on CPU tensors, through Triton's interpreter, ``TRITON_INTERPRET=1``):

- WS: every weight of a group of convs, flattened into one buffer, standardized
  row by row (one row = one output channel) by one kernel forward and one
  backward, whatever the number of convs.
- BCN with fixed batch-step statistics (micro-batch BCN, a frozen step, or
  large-batch BCN in eval): forward, per-(sample, channel) moments, then one
  kernel over (group, block of HW) whose programs each redo their group's
  estimate update and per-(N, C) algebra (a few dozen numbers for 1-2 images)
  and write ``y = x * S + T`` (optionally ``relu(x * S + T + z)``, a ResNet block's
  end); backward, two per-(sample, channel) sums, then
  the same for ``dx = A * dy + B * x + D`` and the parameter gradients: the
  passes of a group norm, two launches each. For many samples (RoI heads) the
  per-group work runs once, in a kernel of its own between the two (three
  launches each).

Statistics are computed in float32 whatever the input dtype. After the first
launch for a given shape, the kernels are launched through their compiled
launcher, without Triton's per-call argument binding (:func:`_launch`). Set
``WSBCN_TRITON=0`` to use the torch code on CUDA too, ``WSBCN_TRITON_DIRECT=0``
to launch every kernel through Triton (for comparisons).
"""
import functools
import logging
import math
import os
from typing import Callable, Dict, Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without triton
    triton = None

__all__ = ["use_triton", "ws_rows_forward", "ws_rows_backward", "bcn_forward", "bcn_backward"]

_ENABLED = triton is not None and os.environ.get("WSBCN_TRITON", "1") != "0"
_DIRECT_LAUNCH = os.environ.get("WSBCN_TRITON_DIRECT", "1") != "0"  # 0: every launch through kernel[grid]
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def use_triton(x: torch.Tensor) -> bool:
    """Whether work on ``x`` goes through these kernels: CUDA tensors in float32/16, bfloat16."""
    return _ENABLED and x.is_cuda and x.dtype in _KERNEL_DTYPES


if triton is not None:

    # ---------------------------------------------------------------- WS
    @triton.jit
    def _ws_forward_kernel(
        w_ptr, out_ptr, root_ptr, row_start_ptr, row_len_ptr, eps,
        UNBIASED: tl.constexpr, EPS_IN_ROOT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # one program per row (output channel): W_hat = (W - mean) / s, with the root
        # r = sqrt(sum((W - mean)^2) / d + eps_in) and s = r + eps_out (the WS form: ws_conv.WS_FORMS)
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
            root = tl.maximum(tl.sqrt(var), 1.1754943508222875e-38)
            inv_s = 1.0 / (root + eps)
        for i in range(0, n, BLOCK):
            m = i + offs < n
            w = tl.load(w_ptr + start + i + offs, mask=m, other=0.0).to(tl.float32)
            tl.store(out_ptr + start + i + offs, (w - mean) * inv_s, mask=m)
        tl.store(root_ptr + row, root)

    @triton.jit
    def _ws_backward_kernel(
        g_ptr, w_hat_ptr, root_ptr, grad_ptr, row_start_ptr, row_len_ptr, eps,
        UNBIASED: tl.constexpr, EPS_IN_ROOT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # dW = (g - mean(g)) / s - W_hat * sum(g * W_hat) / (d * r), r and s as in the forward
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

    # ---------------------------------------------------------------- BCN
    @triton.jit
    def _relu(y):
        # as torch.relu: negatives to 0, NaN kept
        return tl.where(y < 0, 0.0, y)

    @triton.jit
    def _relu_gradient(dy, y_ptrs, m):
        # the gradient through y = relu(...), from y as stored: 0 where y <= 0 (NaN passes), as torch's
        return tl.where(tl.load(y_ptrs, mask=m, other=0.0).to(tl.float32) <= 0, 0.0, dy)

    # Per-(sample, channel) kernels work on tiles of ROWS rows x BLOCK positions, so that both
    # a 200x272 backbone map and the 7x7 maps of 1000 RoIs fill the GPU.
    @triton.jit
    def _bcn_moments_kernel(
        x_ptr, ws_ptr, NC, HW, rm_ptr, rv_ptr, C, SNAPSHOT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr
    ):  # fmt: skip
        # mean and biased variance of each row over HW (per-lane Welford, then Chan's combination),
        # into the forward workspace: mean at [0, NC), variance at [NC, 2 NC); with SNAPSHOT, the
        # estimates before the update also, at [2 NC, 2 NC + C) and [3 NC, 3 NC + C), where the
        # per-group kernel would put its coefficients (the fused kernel keeps them in registers): the
        # fused kernel's programs read them there while one program per group writes the update
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < NC
        base = x_ptr + rows.to(tl.int64)[:, None] * HW
        offs = tl.arange(0, BLOCK)[None, :]
        count = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        mean = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        m2 = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for i in range(0, HW, BLOCK):
            m = row_ok[:, None] & (i + offs < HW)
            x = tl.load(base + i + offs, mask=m, other=0.0).to(tl.float32)
            count += m.to(tl.float32)
            delta = tl.where(m, x - mean, 0.0)
            mean += delta / tl.maximum(count, 1.0)
            m2 += delta * (x - mean)
        total = tl.maximum(tl.sum(count, axis=1), 1.0)
        row_mean = tl.sum(mean * count, axis=1) / total
        d = mean - row_mean[:, None]
        row_var = tl.sum(m2 + count * d * d, axis=1) / total
        tl.store(ws_ptr + rows, row_mean, mask=row_ok)
        tl.store(ws_ptr + NC + rows, row_var, mask=row_ok)
        if SNAPSHOT:
            first = row_ok & (rows < C)  # the rows of sample 0: one per channel
            tl.store(ws_ptr + 2 * NC + rows, tl.load(rm_ptr + rows, mask=first).to(tl.float32), mask=first)
            tl.store(ws_ptr + 3 * NC + rows, tl.load(rv_ptr + rows, mask=first).to(tl.float32), mask=first)

    @triton.jit
    def _bcn_group_affine(
        ws_ptr, est_mean_ptr, est_var_ptr, rm_ptr, rv_ptr, bnw_ptr, bnb_ptr, g, N, C, rate, bn_eps, store,
        CG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, UPDATE: tl.constexpr,
    ):  # fmt: skip
        # group g's channels: the estimate update (from the estimates at est_mean_ptr / est_var_ptr),
        # stored in rm / rv when `store`, and the batch step as (scale, shift); the estimates used
        # (mean, 1 / std) go to the workspace for the backward
        cl = tl.arange(0, BLOCK_C)
        c_ok = cl < CG
        ch = g * CG + cl
        rm = tl.load(est_mean_ptr + ch, mask=c_ok, other=0.0).to(tl.float32)
        rv = tl.load(est_var_ptr + ch, mask=c_ok, other=1.0).to(tl.float32)
        if UPDATE:
            # batch statistics around the previous estimate, as the official EstBN; then lerp by r
            sum_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
            sum_dist = tl.zeros([BLOCK_C], dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                n = n0 + tl.arange(0, BLOCK_N)[:, None]
                ok = (n < N) & c_ok[None, :]
                mean = tl.load(ws_ptr + n * C + ch[None, :], mask=ok, other=0.0)
                var = tl.load(ws_ptr + N * C + n * C + ch[None, :], mask=ok, other=0.0)
                d_old = tl.where(ok, mean - rm[None, :], 0.0)
                sum_mean += tl.sum(mean, axis=0)
                sum_dist += tl.sum(var + d_old * d_old, axis=0)
            rm = rm + rate * (sum_mean / N - rm)
            rv = rv + rate * (sum_dist / N - rv)
            # normalize with the estimates as stored (rounded to their dtype), kept in registers
            rm = rm.to(rm_ptr.dtype.element_ty).to(tl.float32)
            rv = rv.to(rv_ptr.dtype.element_ty).to(tl.float32)
            tl.store(rm_ptr + ch, rm.to(rm_ptr.dtype.element_ty), mask=c_ok & store)
            tl.store(rv_ptr + ch, rv.to(rv_ptr.dtype.element_ty), mask=c_ok & store)
        inv_std = 1.0 / tl.sqrt(rv + bn_eps)
        scale = tl.load(bnw_ptr + ch, mask=c_ok, other=0.0).to(tl.float32) * inv_std
        shift = tl.load(bnb_ptr + ch, mask=c_ok, other=0.0).to(tl.float32) - rm * scale
        stat_ptr = ws_ptr + 4 * N * C
        tl.store(stat_ptr + ch, rm, mask=c_ok & store)
        tl.store(stat_ptr + C + ch, inv_std, mask=c_ok & store)
        return ch, c_ok, scale, shift

    @triton.jit
    def _bcn_chunk(ws_ptr, ch, c_ok, n0, N, C, G, BLOCK_N: tl.constexpr):
        # samples n0 .. n0 + BLOCK_N x a group's channels: sample indices, mask, (n, c) indices, and
        # where the forward workspace keeps the (N, G) group mean and 1 / std
        mu_ptr = ws_ptr + 4 * N * C + 2 * C
        nl = n0 + tl.arange(0, BLOCK_N)
        ok = (nl[:, None] < N) & c_ok[None, :]
        return nl, ok, nl[:, None] * C + ch[None, :], mu_ptr, mu_ptr + N * G

    @triton.jit
    def _bcn_group_coefficients(
        ws_ptr, gamma_ptr, beta_ptr, ch, c_ok, scale, shift, g, n0, N, C, G, gn_eps, store,
        CG: tl.constexpr, BLOCK_N: tl.constexpr, STORE_COEFFICIENTS: tl.constexpr,
    ):  # fmt: skip
        # samples n0 .. n0 + BLOCK_N of group g: group statistics of x1 = x * scale + shift (stored
        # for the backward when `store`) and the (n, c) coefficients of y = x * S + T
        nl, ok, idx, mu_ptr, rstd_ptr = _bcn_chunk(ws_ptr, ch, c_ok, n0, N, C, G, BLOCK_N)
        mean = tl.load(ws_ptr + idx, mask=ok, other=0.0)
        var = tl.load(ws_ptr + N * C + idx, mask=ok, other=0.0)
        x1_mean = mean * scale[None, :] + shift[None, :]
        mu = tl.sum(tl.where(ok, x1_mean, 0.0), axis=1) / CG
        d = tl.where(ok, x1_mean - mu[:, None], 0.0)
        group_var = tl.sum(var * (scale * scale)[None, :] + d * d, axis=1) / CG
        rstd = 1.0 / tl.sqrt(group_var + gn_eps)
        gamma = tl.load(gamma_ptr + g).to(tl.float32)
        s = scale[None, :] * (rstd * gamma)[:, None]
        t = (shift[None, :] - mu[:, None]) * (rstd * gamma)[:, None] + tl.load(beta_ptr + g).to(tl.float32)
        if STORE_COEFFICIENTS:
            tl.store(ws_ptr + 2 * N * C + idx, s, mask=ok)
            tl.store(ws_ptr + 3 * N * C + idx, t, mask=ok)
        tl.store(mu_ptr + nl * G + g, mu, mask=(nl < N) & store)
        tl.store(rstd_ptr + nl * G + g, rstd, mask=(nl < N) & store)
        return s, t, ok, idx

    @triton.jit
    def _bcn_forward_finalize_kernel(
        ws_ptr, rm_ptr, rv_ptr, bnw_ptr, bnb_ptr, gamma_ptr, beta_ptr,
        N, C, G, rate, bn_eps, gn_eps,
        CG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, UPDATE: tl.constexpr,
    ):  # fmt: skip
        # one program per group, any N: estimate update, batch step, group statistics and the
        # (N, C) coefficients of y = x * S + T into the workspace, for _bcn_apply_kernel
        g = tl.program_id(0)
        ch, c_ok, scale, shift = _bcn_group_affine(
            ws_ptr, rm_ptr, rv_ptr, rm_ptr, rv_ptr, bnw_ptr, bnb_ptr, g, N, C, rate, bn_eps, True,
            CG, BLOCK_N, BLOCK_C, UPDATE,
        )  # fmt: skip
        for n0 in range(0, N, BLOCK_N):
            _bcn_group_coefficients(
                ws_ptr, gamma_ptr, beta_ptr, ch, c_ok, scale, shift, g, n0, N, C, G, gn_eps, True, CG, BLOCK_N, True
            )

    @triton.jit
    def _bcn_block(ok, idx, HW, BLOCK_HW: tl.constexpr):
        # a fused program's block of HW for its (n, c) rows: element offsets and mask, (n, c, hw)
        hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        return idx.to(tl.int64)[:, :, None] * HW + hw[None, None, :], ok[:, :, None] & (hw < HW)[None, None, :]

    @triton.jit
    def _bcn_forward_fused_kernel(
        x_ptr, z_ptr, out_ptr, ws_ptr, rm_ptr, rv_ptr, bnw_ptr, bnb_ptr, gamma_ptr, beta_ptr,
        N, C, G, HW, rate, bn_eps, gn_eps,
        CG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
        UPDATE: tl.constexpr, RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ):  # fmt: skip
        # micro-batches (N <= BLOCK_N): one program per (group, block of HW) computes its group's
        # estimates and coefficients (the programs of block 0 store what the backward needs and the
        # updated estimates) and writes y = x * S + T (RESIDUAL: + z; RELU: relu of it) over its block;
        # no per-group kernel
        g = tl.program_id(0)
        store = tl.program_id(1) == 0
        if UPDATE:  # from the estimates before the update, which one program of the group overwrites
            est_mean_ptr = ws_ptr + 2 * N * C
            est_var_ptr = ws_ptr + 3 * N * C
        else:
            est_mean_ptr = rm_ptr
            est_var_ptr = rv_ptr
        ch, c_ok, scale, shift = _bcn_group_affine(
            ws_ptr, est_mean_ptr, est_var_ptr, rm_ptr, rv_ptr, bnw_ptr, bnb_ptr, g, N, C, rate, bn_eps, store,
            CG, BLOCK_N, BLOCK_C, UPDATE,
        )  # fmt: skip
        s, t, ok, idx = _bcn_group_coefficients(
            ws_ptr, gamma_ptr, beta_ptr, ch, c_ok, scale, shift, g, 0, N, C, G, gn_eps, store, CG, BLOCK_N, False
        )
        offs, m = _bcn_block(ok, idx, HW, BLOCK_HW)
        y = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) * s[:, :, None] + t[:, :, None]
        if RESIDUAL:
            y += tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if RELU:
            y = _relu(y)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bcn_apply_kernel(x_ptr, z_ptr, y_ptr, out_ptr, ws_ptr, NC, HW, TWO_INPUTS: tl.constexpr,
                          RESIDUAL: tl.constexpr, RELU: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK: tl.constexpr):  # fmt: skip
        # out = x * A + B (+ z * C) with per-row coefficients at ws[2 NC:] in both workspaces:
        # y = x * S + T forward (RESIDUAL: + z), dx = dy * A + D + x * B backward; with RELU, the
        # forward's relu of it, and dy = 0 where the forward's output y (at y_ptr) is <= 0 backward
        coef_ptr = ws_ptr + 2 * NC
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < NC
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
        m = row_ok[:, None] & (offs < HW)
        idx = rows.to(tl.int64)[:, None] * HW + offs
        a = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)[:, None]
        b = tl.load(coef_ptr + NC + rows, mask=row_ok, other=0.0)[:, None]
        x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        if TWO_INPUTS and RELU:
            x = _relu_gradient(x, y_ptr + idx, m)
        out = x * a + b
        if TWO_INPUTS:
            c = tl.load(coef_ptr + 2 * NC + rows, mask=row_ok, other=0.0)[:, None]
            out += tl.load(z_ptr + idx, mask=m, other=0.0).to(tl.float32) * c
        else:
            if RESIDUAL:
                out += tl.load(z_ptr + idx, mask=m, other=0.0).to(tl.float32)
            if RELU:
                out = _relu(out)
        tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bcn_backward_sums_kernel(
        dy_ptr, x_ptr, y_ptr, dz_ptr, sums_ptr, NC, HW,
        RELU: tl.constexpr, STORE_GRADIENT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # sum(dy) and sum(dy * x) of each row over HW, at the start of the backward workspace (RELU:
        # of the gradient through the ReLU, dy where the forward's output y > 0, which STORE_GRADIENT
        # writes at dz_ptr: the residual's gradient)
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < NC
        base = rows.to(tl.int64)[:, None] * HW
        offs = tl.arange(0, BLOCK)[None, :]
        s_dy = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        s_dyx = tl.zeros([ROWS, BLOCK], dtype=tl.float32)
        for i in range(0, HW, BLOCK):
            m = row_ok[:, None] & (i + offs < HW)
            dy = tl.load(dy_ptr + base + i + offs, mask=m, other=0.0).to(tl.float32)
            if RELU:
                dy = _relu_gradient(dy, y_ptr + base + i + offs, m)
            if STORE_GRADIENT:
                tl.store(dz_ptr + base + i + offs, dy.to(dz_ptr.dtype.element_ty), mask=m)
            s_dy += dy
            s_dyx += dy * tl.load(x_ptr + base + i + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(sums_ptr + rows, tl.sum(s_dy, axis=1), mask=row_ok)
        tl.store(sums_ptr + NC + rows, tl.sum(s_dyx, axis=1), mask=row_ok)

    @triton.jit
    def _bcn_group_batch_step(ws_ptr, bnw_ptr, bnb_ptr, g, N, C, CG: tl.constexpr, BLOCK_C: tl.constexpr):
        # group g's channels and the forward's batch step x1 = x * a + b, from the estimates it used
        stat_ptr = ws_ptr + 4 * N * C
        cl = tl.arange(0, BLOCK_C)
        c_ok = cl < CG
        ch = g * CG + cl
        rm = tl.load(stat_ptr + ch, mask=c_ok, other=0.0)
        inv_std = tl.load(stat_ptr + C + ch, mask=c_ok, other=0.0)
        a = tl.load(bnw_ptr + ch, mask=c_ok, other=0.0).to(tl.float32) * inv_std
        b = tl.load(bnb_ptr + ch, mask=c_ok, other=0.0).to(tl.float32) - rm * a
        return ch, c_ok, rm, inv_std, a, b

    @triton.jit
    def _bcn_backward_chunk(
        sums_ptr, ws_ptr, gamma_ptr, ch, c_ok, a, b, g, n0, N, C, G, HW,
        BLOCK_N: tl.constexpr, CG: tl.constexpr,
    ):  # fmt: skip
        # samples n0 .. n0 + BLOCK_N of group g: the (n, c) coefficients of dx = A * dy + B * x + D and
        # the chunk's parts of the parameter gradients (d_scale, d_shift per channel; d_gamma, d_beta)
        nl, ok, idx, mu_ptr, rstd_ptr = _bcn_chunk(ws_ptr, ch, c_ok, n0, N, C, G, BLOCK_N)
        a = a[None, :]
        b = b[None, :]
        s_dy = tl.load(sums_ptr + idx, mask=ok, other=0.0)
        s_dyx = tl.load(sums_ptr + N * C + idx, mask=ok, other=0.0)
        mean = tl.load(ws_ptr + idx, mask=ok, other=0.0)
        var = tl.load(ws_ptr + N * C + idx, mask=ok, other=0.0)
        mu = tl.load(mu_ptr + nl * G + g, mask=nl < N, other=0.0)[:, None]
        rstd = tl.load(rstd_ptr + nl * G + g, mask=nl < N, other=0.0)[:, None]
        gamma = tl.load(gamma_ptr + g).to(tl.float32)
        k = CG * HW
        s_dy_xc = s_dyx - mean * s_dy  # sum of dy * (x - mean)
        x1c = tl.where(ok, mean * a + b - mu, 0.0)  # per-(n, c) mean of x1, centred on its group's
        s_dy_xhat = rstd * (a * s_dy_xc + x1c * s_dy)
        m1 = gamma * tl.sum(s_dy, axis=1)[:, None] / k
        m2 = gamma * tl.sum(s_dy_xhat, axis=1)[:, None] / k
        coef_dy = a * rstd * gamma
        coef_const = -a * rstd * (m1 + rstd * m2 * (b - mu))
        coef_x = -a * a * rstd * rstd * m2
        s_dx1 = tl.where(ok, rstd * (gamma * s_dy - HW * m1 - HW * rstd * m2 * x1c), 0.0)
        s_dx1_xc = tl.where(ok, rstd * (gamma * s_dy_xc - HW * rstd * m2 * a * var), 0.0)
        d_scale = tl.sum(s_dx1_xc + mean * s_dx1, axis=0)
        d_shift = tl.sum(s_dx1, axis=0)
        return coef_dy, coef_x, coef_const, ok, idx, d_scale, d_shift, tl.sum(s_dy_xhat, axis=1), tl.sum(s_dy, axis=1)

    @triton.jit
    def _bcn_store_parameter_gradients(
        sums_ptr, ch, c_ok, rm, inv_std, d_scale, d_shift, d_gamma, d_beta, g, N, C, G, store
    ):  # fmt: skip
        # scale = w * inv_std, shift = b - rm * scale (the estimates are constants); backward workspace:
        # sums, coefficients, then d_bn_weight, d_bn_bias, d_gamma, d_beta
        d_bnw_ptr = sums_ptr + 5 * N * C
        tl.store(d_bnw_ptr + ch, inv_std * (d_scale - rm * d_shift), mask=c_ok & store)
        tl.store(d_bnw_ptr + C + ch, d_shift, mask=c_ok & store)
        tl.store(d_bnw_ptr + 2 * C + g, d_gamma, mask=store)
        tl.store(d_bnw_ptr + 2 * C + G + g, d_beta, mask=store)

    @triton.jit
    def _bcn_backward_finalize_kernel(
        sums_ptr, ws_ptr, bnw_ptr, bnb_ptr, gamma_ptr,
        N, C, G, HW,
        CG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # one program per group, any N: the (N, C) coefficients into the backward workspace, for
        # _bcn_apply_kernel, and the parameter gradients
        g = tl.program_id(0)
        ch, c_ok, rm, inv_std, a, b = _bcn_group_batch_step(ws_ptr, bnw_ptr, bnb_ptr, g, N, C, CG, BLOCK_C)
        d_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
        d_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
        d_gamma = tl.zeros([BLOCK_N], dtype=tl.float32)
        d_beta = tl.zeros([BLOCK_N], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            coef_dy, coef_x, coef_const, ok, idx, p_scale, p_shift, p_gamma, p_beta = _bcn_backward_chunk(
                sums_ptr, ws_ptr, gamma_ptr, ch, c_ok, a, b, g, n0, N, C, G, HW, BLOCK_N, CG
            )
            tl.store(sums_ptr + 2 * N * C + idx, coef_dy, mask=ok)
            tl.store(sums_ptr + 3 * N * C + idx, coef_const, mask=ok)
            tl.store(sums_ptr + 4 * N * C + idx, coef_x, mask=ok)
            d_scale += p_scale
            d_shift += p_shift
            d_gamma += p_gamma
            d_beta += p_beta
        _bcn_store_parameter_gradients(
            sums_ptr, ch, c_ok, rm, inv_std, d_scale, d_shift, tl.sum(d_gamma, axis=0), tl.sum(d_beta, axis=0),
            g, N, C, G, True,
        )  # fmt: skip

    @triton.jit
    def _bcn_backward_fused_kernel(
        dy_ptr, x_ptr, y_ptr, dx_ptr, sums_ptr, ws_ptr, bnw_ptr, bnb_ptr, gamma_ptr,
        N, C, G, HW,
        CG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
        RELU: tl.constexpr,
    ):  # fmt: skip
        # micro-batches (N <= BLOCK_N): one program per (group, block of HW) computes its group's
        # coefficients (the programs of block 0 store the parameter gradients) and writes
        # dx = A * dy + B * x + D over its block (RELU: dy through the ReLU); no per-group kernel
        g = tl.program_id(0)
        ch, c_ok, rm, inv_std, a, b = _bcn_group_batch_step(ws_ptr, bnw_ptr, bnb_ptr, g, N, C, CG, BLOCK_C)
        coef_dy, coef_x, coef_const, ok, idx, d_scale, d_shift, d_gamma, d_beta = _bcn_backward_chunk(
            sums_ptr, ws_ptr, gamma_ptr, ch, c_ok, a, b, g, 0, N, C, G, HW, BLOCK_N, CG
        )
        _bcn_store_parameter_gradients(
            sums_ptr, ch, c_ok, rm, inv_std, d_scale, d_shift, tl.sum(d_gamma, axis=0), tl.sum(d_beta, axis=0),
            g, N, C, G, tl.program_id(1) == 0,
        )  # fmt: skip
        offs, m = _bcn_block(ok, idx, HW, BLOCK_HW)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if RELU:
            dy = _relu_gradient(dy, y_ptr + offs, m)
        dx = (
            dy * coef_dy[:, :, None]
            + tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) * coef_x[:, :, None]
            + coef_const[:, :, None]
        )
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


# ---------------------------------------------------------------- launchers
def ws_rows_forward(
    flat: torch.Tensor, row_start: torch.Tensor, row_len: torch.Tensor, eps: float, unbiased: bool = True,
    eps_in_root: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Standardize the rows of a flat buffer: ``(w_hat float32, root per row)``.

    Row ``r`` is ``flat[row_start[r] : row_start[r] + row_len[r]]`` (int64 / int32);
    ``unbiased`` and ``eps_in_root`` give the WS form (``ws_conv.WSForm``); the
    root is ``sqrt(var + eps)`` with eps in the root, else the std.
    """
    w_hat = torch.empty(flat.shape, dtype=torch.float32, device=flat.device)
    root = torch.empty(row_start.shape, dtype=torch.float32, device=flat.device)
    if row_start.numel():
        _launch(
            _ws_forward_kernel, (row_start.numel(),), (flat, w_hat, root, row_start, row_len, float(eps)),
            dict(UNBIASED=unbiased, EPS_IN_ROOT=eps_in_root, BLOCK=512), _launch_key(flat, row_start, row_len),
        )  # fmt: skip
    return w_hat, root


def ws_rows_backward(
    grad: torch.Tensor, w_hat: torch.Tensor, root: torch.Tensor, row_start: torch.Tensor, row_len: torch.Tensor,
    eps: float, unbiased: bool = True, eps_in_root: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Gradient of :func:`ws_rows_forward` (same form) with respect to ``flat``, in float32."""
    out = torch.empty_like(w_hat)
    if row_start.numel():
        grad = grad.contiguous()
        _launch(
            _ws_backward_kernel, (row_start.numel(),), (grad, w_hat, root, out, row_start, row_len, float(eps)),
            dict(UNBIASED=unbiased, EPS_IN_ROOT=eps_in_root, BLOCK=512), _launch_key(grad, w_hat, row_start, row_len),
        )  # fmt: skip
    return out


_COMPILED: Dict[tuple, tuple] = {}
"""By (kernel's Python function, launch key, meta values): ``(compiled kernel, constexpr values, stream
getter)``. Keys hold input shapes: a COCO training run meets some 10^4 (padded image sizes x layers, RoI
counts); past :data:`_MAX_COMPILED` the dict starts over, and launches go through Triton once more to
refill it."""
_MAX_COMPILED = 1 << 16


def _launch(kernel, grid: Tuple[int, ...], args: tuple, meta: dict, key: Optional[tuple] = None) -> None:
    """``kernel[grid](*args, **meta)``, but with ``key`` launched directly once compiled.

    Triton's ``kernel[grid](...)`` binds and specializes every argument on each call: 18-20 us
    of host time per launch on an H200 host, against 9 us through the compiled kernel's own
    launcher, and a detection step on a GPU is host-bound (there, direct launches cut a BCN
    layer's forward + backward by 280-380 us of host time). With ``key``, which with ``meta``
    must determine everything Triton specializes on (argument dtypes, integer values up to
    == 1 / % 16 == 0 / 32 bits, pointer alignment to 16 bytes, the device), the compiled kernel
    of the first call is reused, launched the way Triton itself launches it (launch metadata
    and hooks only when a profiler has set a hook: :func:`_launch_hooks`). Positional
    ``args`` are the kernel's non-constexpr parameters in order; ``meta`` holds its constexprs
    and options. Should a Triton version's launcher take other arguments, the launch goes
    through Triton and direct launches stop, with a warning.
    """
    if key is not None:
        key = (kernel.fn, key, *meta.values())  # the Python function: a JITFunction hashes in Python
    entry = _COMPILED.get(key) if key is not None else None
    if entry is None:
        compiled = kernel[grid](*args, **meta)
        params = getattr(kernel, "params", None)  # a JITFunction's; the interpreter returns no compiled kernel
        if key is not None and _DIRECT_LAUNCH and params and hasattr(compiled, "packed_metadata"):
            constexprs = tuple(meta[p.name] for p in params[len(args) :] if p.is_constexpr)
            if len(args) + len(constexprs) == len(params) and not any(p.is_constexpr for p in params[: len(args)]):
                if len(_COMPILED) >= _MAX_COMPILED:
                    _COMPILED.clear()
                _COMPILED[key] = (compiled, constexprs, _stream_getter())
        return
    compiled, constexprs, current_stream = entry
    grid3 = grid + (1,) * (3 - len(grid))
    all_args = args + constexprs
    try:
        stream = current_stream(args[0].get_device())
        enter_hook, exit_hook = _launch_hooks()
        # Triton builds the launch metadata whenever its hook chains exist, even empty; it is the hooks' input
        metadata = None if enter_hook is None else compiled.launch_metadata(grid3, stream, *all_args)
        compiled.run(
            *grid3, stream, compiled.function, compiled.packed_metadata, metadata, enter_hook, exit_hook, *all_args
        )
    except (AttributeError, TypeError) as e:  # a Triton whose launcher differs: raised before launching
        _stop_direct_launches(e)
        kernel[grid](*args, **meta)


def _stop_direct_launches(error: Exception) -> None:
    global _DIRECT_LAUNCH
    _DIRECT_LAUNCH = False
    _COMPILED.clear()
    logging.getLogger(__name__).warning(
        "Triton kernels: direct launches failed (%s: %s) with triton %s; launching through Triton from now on",
        type(error).__name__, error, triton.__version__,
    )  # fmt: skip


def _launch_hooks() -> Tuple[Optional[Callable], Optional[Callable]]:
    """Triton's launch enter and exit hooks (a profiler's), or ``(None, None)`` when none is set.

    Triton's launchers call a hook unless it is None; older Triton releases hold None or a plain
    callable, newer ones a chain (``HookChain``, with a ``calls`` list), never None but usually
    empty: so 3.6 and 3.8 (checked in their wheels).
    """
    hooks = triton.knobs.runtime
    enter_hook, exit_hook = hooks.launch_enter_hook, hooks.launch_exit_hook
    if getattr(enter_hook, "calls", enter_hook) or getattr(exit_hook, "calls", exit_hook):
        return enter_hook, exit_hook
    return None, None


def _stream_getter() -> Callable[[int], int]:
    """Triton's ``device index -> current CUDA stream`` (torch's current stream)."""
    return triton.runtime.driver.active.get_current_stream


def _launch_key(*tensors: torch.Tensor) -> tuple:
    """Dtypes, 16-byte alignment and device of ``tensors``: with the shapes, what Triton specializes on."""
    return (*[(t.dtype, t.data_ptr() % 16 == 0) for t in tensors], tensors[0].get_device())


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# Launch configurations are plain-int arithmetic, cached per shape: triton.cdiv and
# triton.next_power_of_2 are jit functions whose calls cost microseconds of host time each,
# and a detection step is host-bound on a GPU (about 130 BCN calls per step).
@functools.lru_cache(maxsize=None)
def _group_launch(channels_per_group: int) -> dict:
    # 4 warps: with 1 or 2, triton 3.8's compiler segfaults on the backward group kernel for 4 to 32
    # channels per group unless it may assume C % 16 == 0 and 16-byte aligned pointers (e.g. with
    # 56 or 152 channels; found by tools/compile_kernels.py)
    block_c = _next_power_of_2(channels_per_group)
    return dict(CG=channels_per_group, BLOCK_N=max(1, 256 // block_c), BLOCK_C=block_c, num_warps=4)


@functools.lru_cache(maxsize=4096)
def _rows_launch(num_rows: int, hw: int) -> Tuple[dict, Tuple[int], Tuple[int, int]]:
    """Tiles of ROWS x BLOCK elements (1024 at most) over (N * C, HW): ``(launch, grid, grid split over HW)``."""
    block = min(1024, _next_power_of_2(hw))
    launch = dict(ROWS=1024 // block, BLOCK=block, num_warps=4)
    rows = -(-num_rows // launch["ROWS"])
    return launch, (rows,), (rows, -(-hw // block))


_FUSED_GROUP_TILE = 128
"""Largest (samples x channels of a group) tile, powers of 2, for which the fused kernels serve:
micro-batches (2 images per GPU with up to 64 channels per group, the paper's 32 groups of up to
2048 channels); RoI heads take the per-group kernels. Larger tiles leave too few positions per
program for coalesced loads, or too many registers per thread."""


@functools.lru_cache(maxsize=4096)
def _fused_launch(n: int, channels_per_group: int, hw: int, max_tile: int) -> Optional[Tuple[dict, int]]:
    """``(launch, number of HW blocks)`` of the fused kernels over (group, block of HW), or None where they
    do not serve."""
    block_n, block_c = _next_power_of_2(n), _next_power_of_2(channels_per_group)
    # about 2048 elements per program over 8 warps: 8 per thread, as _bcn_apply_kernel; ptxas: 28-80
    # registers per thread, no spills (sm_90)
    block_hw = min(_next_power_of_2(hw), max(1, 2048 // (block_n * block_c)))
    hw_blocks = -(-hw // block_hw)
    if block_n * block_c > max_tile or hw_blocks >= 2**16:  # the grid's second dimension is 16 bits
        return None
    launch = dict(CG=channels_per_group, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=8)
    return launch, hw_blocks


def bcn_forward(
    x: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    residual: Optional[torch.Tensor],
    bn_eps: float,
    gn_eps: float,
    update_rate: float,
    update: Optional[Callable[[torch.Tensor, torch.Tensor], None]],
    out_dtype: torch.dtype,
    relu: bool = False,
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """BCN with a fixed-statistics batch step, forward; returns ``(y, saved)`` for :func:`bcn_backward`.

    ``update_rate > 0`` updates ``running_mean`` / ``running_var`` in place from
    this batch first (single process). ``update``, if given, is called instead
    with the (N, C) float32 moments, e.g. to all-reduce them across processes.
    ``residual`` (of x's shape) is added to the output and ``relu`` returns ``relu(y)``,
    both in the same pass: ``y = relu(BCN(x) + residual)``, in float32 before rounding.
    """
    n, c = x.shape[:2]
    groups = gamma.numel()
    hw = math.prod(x.shape[2:])
    x = x.contiguous()
    z = x if residual is None else residual.contiguous()  # z: read only with RESIDUAL
    # one float32 workspace: (N, C) mean and variance, (2, N, C) coefficients S and T (fused: the
    # estimates before the update instead), the (2, C) estimates used (mean, 1 / sqrt(var + eps)) and
    # the (N, G) group mean and 1 / std
    workspace = torch.empty(4 * n * c + 2 * c + 2 * n * groups, dtype=torch.float32, device=x.device)
    launch, grid, grid_split = _rows_launch(n * c, hw)
    fused = _fused_launch(n, c // groups, hw, _FUSED_GROUP_TILE)
    kernel_update = update is None and update_rate > 0
    params = (running_mean, running_var, bn_weight, bn_bias, gamma, beta)
    key = (x.shape, groups, out_dtype, kernel_update, *_launch_key(x, z, *params))
    _launch(
        _bcn_moments_kernel, grid, (x, workspace, n * c, hw, running_mean, running_var, c),
        dict(SNAPSHOT=kernel_update and fused is not None, **launch), key,
    )  # fmt: skip
    if update is not None:
        update(workspace[: n * c].view(n, c), workspace[n * c : 2 * n * c].view(n, c))
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rate_and_eps = (float(update_rate), float(bn_eps), float(gn_eps))
    if fused is not None:
        fused_launch, hw_blocks = fused
        _launch(
            _bcn_forward_fused_kernel, (groups, hw_blocks),
            (x, z, y, workspace, *params, n, c, groups, hw, *rate_and_eps),
            dict(UPDATE=kernel_update, RESIDUAL=residual is not None, RELU=relu, **fused_launch), key,
        )  # fmt: skip
        return y, (x, workspace)
    _launch(
        _bcn_forward_finalize_kernel, (groups,), (workspace, *params, n, c, groups, *rate_and_eps),
        dict(UPDATE=kernel_update, **_group_launch(c // groups)), key,
    )  # fmt: skip
    _launch(
        _bcn_apply_kernel, grid_split, (x, z, x, y, workspace, n * c, hw),
        dict(TWO_INPUTS=False, RESIDUAL=residual is not None, RELU=relu, **launch), key,
    )  # fmt: skip
    return y, (x, workspace)


def bcn_backward(
    dy: torch.Tensor,
    saved: Tuple[torch.Tensor, torch.Tensor],
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    gamma: torch.Tensor,
    relu_output: Optional[torch.Tensor] = None,
    residual_gradient: bool = False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`bcn_forward`: ``dx`` (x's dtype), the residual's gradient (dy's dtype) if
    ``residual_gradient`` else None, then float32 ``d_bn_weight``, ``d_bn_bias``, ``d_gamma``, ``d_beta``.
    After a forward with ``relu``, ``relu_output`` is its output (``dy`` passes where it is > 0)."""
    x, forward_workspace = saved
    n, c = x.shape[:2]
    groups = gamma.numel()
    hw = math.prod(x.shape[2:])
    dy = dy.contiguous()
    relu = relu_output is not None
    y = relu_output if relu else dy  # y: read only with RELU
    # the residual's gradient: dy, through the ReLU if any (written by the sums kernel, then BCN's dy)
    store_gradient = relu and residual_gradient
    dz = torch.empty_like(dy) if store_gradient else dy if residual_gradient else None
    launch, grid, grid_split = _rows_launch(n * c, hw)
    # one float32 workspace: (2, N, C) sums, (3, N, C) coefficients, then the parameter gradients
    workspace = torch.empty(5 * n * c + 2 * c + 2 * groups, dtype=torch.float32, device=x.device)
    key = (x.shape, groups, *_launch_key(dy, x, y, bn_weight, bn_bias, gamma))
    _launch(
        _bcn_backward_sums_kernel, grid, (dy, x, y, dz if store_gradient else dy, workspace, n * c, hw),
        dict(RELU=relu, STORE_GRADIENT=store_gradient, **launch), key,
    )  # fmt: skip
    if store_gradient:  # from here on, the gradient through the ReLU is BCN's dy
        dy, relu = dz, False
        key = (x.shape, groups, *_launch_key(dy, x, y, bn_weight, bn_bias, gamma))
    dx = torch.empty_like(x)
    args = (workspace, forward_workspace, bn_weight, bn_bias, gamma, n, c, groups, hw)
    fused = _fused_launch(n, c // groups, hw, _FUSED_GROUP_TILE)
    if fused is not None:
        fused_launch, hw_blocks = fused
        _launch(
            _bcn_backward_fused_kernel, (groups, hw_blocks), (dy, x, y, dx, *args), dict(RELU=relu, **fused_launch), key
        )
    else:
        _launch(_bcn_backward_finalize_kernel, (groups,), args, _group_launch(c // groups), key)
        _launch(
            _bcn_apply_kernel, grid_split, (dy, x, y, dx, workspace, n * c, hw),
            dict(TWO_INPUTS=True, RESIDUAL=False, RELU=relu, **launch), key,
        )  # fmt: skip
    # one split_with_sizes, no slice before it; not Tensor.split, whose symbolic-shape checks cost host time
    return (dx, dz, *workspace.split_with_sizes((5 * n * c, c, c, groups, groups))[1:])
