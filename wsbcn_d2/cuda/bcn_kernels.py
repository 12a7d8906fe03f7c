"""Triton kernels of Batch-Channel Normalization with a fixed-statistics batch step.

The function is that of :class:`wsbcn_d2.layers.BatchChannelNorm2d` when its
batch step normalizes with fixed statistics (micro-batch BCN, a frozen step,
large-batch BCN in eval), whose torch code is the reference the kernels are
tested against: with the per-(sample, channel) moments of ``x`` the output is
``y = x * S + T`` with (N, C) coefficients, optionally ``relu(x * S + T + z)``
(a ResNet block's end), and the gradient ``dx = A * dy + B * x + D``.

- forward: per-(sample, channel) moments, then per (group, block of HW) the
  group's estimate update and per-(N, C) algebra (a few dozen numbers for 1-2
  images, redone by each program) and the output: two launches.
- backward: two per-(sample, channel) sums, then the same for ``dx`` and the
  parameter gradients: two launches.
- many samples (RoI heads): the per-group work runs once, in a kernel of its
  own between the two (three launches each way).

Statistics are float32 whatever the input dtype. Scratch memory is one float32
workspace per pass, its buffers named once (``_forward_buffers``,
``_backward_buffers``).
"""
import functools
import math
from typing import Callable, Optional, Tuple

import torch

from .launcher import launch, launch_key

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds ship without triton
    triton = None

__all__ = ["bcn_forward", "bcn_backward"]

if triton is not None:

    @triton.jit
    def _relu(y):
        # as torch.relu: negatives to 0, NaN kept
        return tl.where(y < 0, 0.0, y)

    @triton.jit
    def _relu_gradient(dy, y_ptrs, m):
        # the gradient through y = relu(...), from y as stored: 0 where y <= 0 (NaN passes), as torch's
        return tl.where(tl.load(y_ptrs, mask=m, other=0.0).to(tl.float32) <= 0, 0.0, dy)

    # ------------------------------------------------------------------------------------ workspaces
    # One float32 allocation per pass (sizes: _forward_workspace_size, _backward_workspace_split), its
    # buffers named here once. One pointer per launch instead of a view per buffer: views cost a
    # split_with_sizes of host time (2-3 us) per call, and a step at 1-2 images is host-bound.
    @triton.jit
    def _forward_buffers(workspace_ptr, N, C, G):
        moments = workspace_ptr  # (2, N, C): mean, biased variance of each row of x over HW
        snapshot = moments + 2 * N * C  # (2, C): the estimates before the update (fused path, UPDATE)
        estimates = snapshot + 2 * C  # (2, C): the estimates used, mean and 1 / sqrt(var + eps)
        group_stats = estimates + 2 * C  # (2, N, G): group mean and 1 / std of the batch step's output
        coefficients = group_stats + 2 * N * G  # (2, N, C): S, T of y = x * S + T (per-group path)
        return moments, snapshot, estimates, group_stats, coefficients

    @triton.jit
    def _backward_buffers(workspace_ptr, N, C, G):
        sums = workspace_ptr  # (2, N, C): sum of dy and of dy * x over HW
        grads = sums + 2 * N * C  # (2C + 2G): d_bn_weight, d_bn_bias, d_gamma, d_beta
        coefficients = grads + 2 * C + 2 * G  # (3, N, C): A, D, B of dx = A * dy + B * x + D (per-group path)
        return sums, grads, coefficients

    # ------------------------------------------------------------------------------------- forward
    # Per-(sample, channel) kernels work on tiles of ROWS rows x BLOCK positions, so that both a
    # 200x272 backbone map and the 7x7 maps of 1000 RoIs fill the GPU.
    @triton.jit
    def _bcn_moments_kernel(
        x_ptr,  # (N, C, HW)
        workspace_ptr,  # forward: moments out, snapshot out with SNAPSHOT
        rm_ptr,  # (C,) running mean (the estimates)
        rv_ptr,  # (C,) running variance
        N,
        C,
        G,
        HW,
        SNAPSHOT: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # per-lane Welford, then Chan's combination; the snapshot lets the fused kernel's programs read the
        # estimates before the update while one program per group writes the updated ones
        moments_ptr, snapshot_ptr, _, _, _ = _forward_buffers(workspace_ptr, N, C, G)
        NC = N * C
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
        tl.store(moments_ptr + rows, row_mean, mask=row_ok)
        tl.store(moments_ptr + NC + rows, row_var, mask=row_ok)
        if SNAPSHOT:
            first = row_ok & (rows < C)  # the rows of sample 0: one per channel
            tl.store(snapshot_ptr + rows, tl.load(rm_ptr + rows, mask=first).to(tl.float32), mask=first)
            tl.store(snapshot_ptr + C + rows, tl.load(rv_ptr + rows, mask=first).to(tl.float32), mask=first)

    @triton.jit
    def _bcn_group_affine(
        moments_ptr,
        estimates_ptr,
        est_mean_ptr,
        est_var_ptr,
        rm_ptr,
        rv_ptr,
        bnw_ptr,
        bnb_ptr,
        g,
        N,
        C,
        rate,
        bn_eps,
        store,
        CG: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        UPDATE: tl.constexpr,
    ):
        # group g's channels: the estimate update (from the estimates at est_mean_ptr / est_var_ptr),
        # stored in rm / rv when `store`, and the batch step as (scale, shift); the estimates used go to
        # `estimates` for the backward
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
                mean = tl.load(moments_ptr + n * C + ch[None, :], mask=ok, other=0.0)
                var = tl.load(moments_ptr + N * C + n * C + ch[None, :], mask=ok, other=0.0)
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
        tl.store(estimates_ptr + ch, rm, mask=c_ok & store)
        tl.store(estimates_ptr + C + ch, inv_std, mask=c_ok & store)
        return ch, c_ok, scale, shift

    @triton.jit
    def _bcn_chunk(ch, c_ok, n0, N, C, BLOCK_N: tl.constexpr):
        # samples n0 .. n0 + BLOCK_N x a group's channels: sample indices, mask, (n, c) indices
        nl = n0 + tl.arange(0, BLOCK_N)
        ok = (nl[:, None] < N) & c_ok[None, :]
        return nl, ok, nl[:, None] * C + ch[None, :]

    @triton.jit
    def _bcn_group_coefficients(
        moments_ptr,
        coefficients_ptr,
        group_stats_ptr,
        gamma_ptr,
        beta_ptr,
        ch,
        c_ok,
        scale,
        shift,
        g,
        n0,
        N,
        C,
        G,
        gn_eps,
        store,
        CG: tl.constexpr,
        BLOCK_N: tl.constexpr,
        STORE_COEFFICIENTS: tl.constexpr,
    ):
        # samples n0 .. n0 + BLOCK_N of group g: group statistics of x1 = x * scale + shift (stored
        # for the backward when `store`) and the (n, c) coefficients of y = x * S + T
        nl, ok, idx = _bcn_chunk(ch, c_ok, n0, N, C, BLOCK_N)
        mean = tl.load(moments_ptr + idx, mask=ok, other=0.0)
        var = tl.load(moments_ptr + N * C + idx, mask=ok, other=0.0)
        x1_mean = mean * scale[None, :] + shift[None, :]
        mu = tl.sum(tl.where(ok, x1_mean, 0.0), axis=1) / CG
        d = tl.where(ok, x1_mean - mu[:, None], 0.0)
        group_var = tl.sum(var * (scale * scale)[None, :] + d * d, axis=1) / CG
        rstd = 1.0 / tl.sqrt(group_var + gn_eps)
        gamma = tl.load(gamma_ptr + g).to(tl.float32)
        s = scale[None, :] * (rstd * gamma)[:, None]
        t = (shift[None, :] - mu[:, None]) * (rstd * gamma)[:, None] + tl.load(beta_ptr + g).to(tl.float32)
        if STORE_COEFFICIENTS:
            tl.store(coefficients_ptr + idx, s, mask=ok)
            tl.store(coefficients_ptr + N * C + idx, t, mask=ok)
        tl.store(group_stats_ptr + nl * G + g, mu, mask=(nl < N) & store)
        tl.store(group_stats_ptr + N * G + nl * G + g, rstd, mask=(nl < N) & store)
        return s, t, ok, idx

    @triton.jit
    def _bcn_forward_finalize_kernel(
        workspace_ptr,  # forward: moments in; coefficients, estimates, group statistics out
        rm_ptr,  # (C,) running mean, updated in place with UPDATE
        rv_ptr,  # (C,) running variance
        bnw_ptr,  # (C,) the batch step's weight
        bnb_ptr,  # (C,) and bias
        gamma_ptr,  # (G,) the channel step's weight
        beta_ptr,  # (G,) and bias
        N,
        C,
        G,
        rate,
        bn_eps,
        gn_eps,
        CG: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        UPDATE: tl.constexpr,
    ):
        # one program per group, any N: estimate update, batch step, group statistics and the
        # coefficients of y = x * S + T, for _bcn_apply_kernel
        moments_ptr, _, estimates_ptr, group_stats_ptr, coefficients_ptr = _forward_buffers(workspace_ptr, N, C, G)
        g = tl.program_id(0)
        ch, c_ok, scale, shift = _bcn_group_affine(
            moments_ptr, estimates_ptr, rm_ptr, rv_ptr, rm_ptr, rv_ptr, bnw_ptr, bnb_ptr, g, N, C, rate, bn_eps, True,
            CG, BLOCK_N, BLOCK_C, UPDATE
        )
        for n0 in range(0, N, BLOCK_N):
            _bcn_group_coefficients(
                moments_ptr, coefficients_ptr, group_stats_ptr, gamma_ptr, beta_ptr, ch, c_ok, scale, shift, g, n0,
                N, C, G, gn_eps, True, CG, BLOCK_N, True
            )

    @triton.jit
    def _bcn_block(ok, idx, HW, BLOCK_HW: tl.constexpr):
        # a fused program's block of HW for its (n, c) rows: element offsets and mask, (n, c, hw)
        hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        return idx.to(tl.int64)[:, :, None] * HW + hw[None, None, :], ok[:, :, None] & (hw < HW)[None, None, :]

    @triton.jit
    def _bcn_forward_fused_kernel(
        x_ptr,  # (N, C, HW)
        z_ptr,  # (N, C, HW): the residual, read with RESIDUAL
        out_ptr,  # (N, C, HW) out
        workspace_ptr,  # forward: moments and snapshot in; estimates, group statistics out
        rm_ptr,  # (C,) running mean, updated in place with UPDATE
        rv_ptr,  # (C,) running variance
        bnw_ptr,  # (C,) the batch step's weight
        bnb_ptr,  # (C,) and bias
        gamma_ptr,  # (G,) the channel step's weight
        beta_ptr,  # (G,) and bias
        N,
        C,
        G,
        HW,
        rate,
        bn_eps,
        gn_eps,
        CG: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        UPDATE: tl.constexpr,
        RESIDUAL: tl.constexpr,
        RELU: tl.constexpr,
    ):
        # micro-batches (N <= BLOCK_N): one program per (group, block of HW) computes its group's
        # estimates and coefficients (the programs of block 0 store what the backward needs and the
        # updated estimates) and writes y = x * S + T (RESIDUAL: + z; RELU: relu of it) over its block
        moments_ptr, snapshot_ptr, estimates_ptr, group_stats_ptr, _ = _forward_buffers(workspace_ptr, N, C, G)
        g = tl.program_id(0)
        store = tl.program_id(1) == 0
        if UPDATE:  # from the estimates before the update, which one program of the group overwrites
            est_mean_ptr = snapshot_ptr
            est_var_ptr = snapshot_ptr + C
        else:
            est_mean_ptr = rm_ptr
            est_var_ptr = rv_ptr
        ch, c_ok, scale, shift = _bcn_group_affine(
            moments_ptr, estimates_ptr, est_mean_ptr, est_var_ptr, rm_ptr, rv_ptr, bnw_ptr, bnb_ptr, g, N, C, rate,
            bn_eps, store, CG, BLOCK_N, BLOCK_C, UPDATE
        )
        s, t, ok, idx = _bcn_group_coefficients(  # coefficients kept in registers, not stored
            moments_ptr, moments_ptr, group_stats_ptr, gamma_ptr, beta_ptr, ch, c_ok, scale, shift, g, 0, N, C, G,
            gn_eps, store, CG, BLOCK_N, False
        )
        offs, m = _bcn_block(ok, idx, HW, BLOCK_HW)
        y = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) * s[:, :, None] + t[:, :, None]
        if RESIDUAL:
            y += tl.load(z_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if RELU:
            y = _relu(y)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _bcn_apply_kernel(
        x_ptr,  # (N, C, HW): x forward, dy backward
        z_ptr,  # (N, C, HW): the residual forward (RESIDUAL), x backward (TWO_INPUTS)
        y_ptr,  # (N, C, HW): the forward's output, read backward with RELU
        out_ptr,  # (N, C, HW) out: y forward, dx backward
        workspace_ptr,  # forward: coefficients S, T; backward (TWO_INPUTS): coefficients A, D, B
        N,
        C,
        G,
        HW,
        TWO_INPUTS: tl.constexpr,
        RESIDUAL: tl.constexpr,
        RELU: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # forward: y = x * S + T (RESIDUAL: + z; RELU: relu of it); backward: dx = dy * A + D + x * B,
        # with RELU dy = 0 where the forward's output is <= 0
        if TWO_INPUTS:
            _, _, coefficients_ptr = _backward_buffers(workspace_ptr, N, C, G)
        else:
            _, _, _, _, coefficients_ptr = _forward_buffers(workspace_ptr, N, C, G)
        NC = N * C
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < NC
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)[None, :]
        m = row_ok[:, None] & (offs < HW)
        idx = rows.to(tl.int64)[:, None] * HW + offs
        a = tl.load(coefficients_ptr + rows, mask=row_ok, other=0.0)[:, None]
        b = tl.load(coefficients_ptr + NC + rows, mask=row_ok, other=0.0)[:, None]
        x = tl.load(x_ptr + idx, mask=m, other=0.0).to(tl.float32)
        if TWO_INPUTS and RELU:
            x = _relu_gradient(x, y_ptr + idx, m)
        out = x * a + b
        if TWO_INPUTS:
            c = tl.load(coefficients_ptr + 2 * NC + rows, mask=row_ok, other=0.0)[:, None]
            out += tl.load(z_ptr + idx, mask=m, other=0.0).to(tl.float32) * c
        else:
            if RESIDUAL:
                out += tl.load(z_ptr + idx, mask=m, other=0.0).to(tl.float32)
            if RELU:
                out = _relu(out)
        tl.store(out_ptr + idx, out.to(out_ptr.dtype.element_ty), mask=m)

    # ------------------------------------------------------------------------------------ backward
    @triton.jit
    def _bcn_backward_sums_kernel(
        dy_ptr,  # (N, C, HW)
        x_ptr,  # (N, C, HW)
        y_ptr,  # (N, C, HW): the forward's output, read with RELU
        dz_ptr,  # (N, C, HW) out with STORE_GRADIENT: the gradient through the ReLU (the residual's)
        workspace_ptr,  # backward: sums out
        N,
        C,
        G,
        HW,
        RELU: tl.constexpr,
        STORE_GRADIENT: tl.constexpr,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # with RELU, dy is the gradient through the ReLU: dy where the forward's output is > 0
        sums_ptr, _, _ = _backward_buffers(workspace_ptr, N, C, G)
        NC = N * C
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
    def _bcn_group_batch_step(estimates_ptr, bnw_ptr, bnb_ptr, g, C, CG: tl.constexpr, BLOCK_C: tl.constexpr):
        # group g's channels and the forward's batch step x1 = x * a + b, from the estimates it used
        cl = tl.arange(0, BLOCK_C)
        c_ok = cl < CG
        ch = g * CG + cl
        rm = tl.load(estimates_ptr + ch, mask=c_ok, other=0.0)
        inv_std = tl.load(estimates_ptr + C + ch, mask=c_ok, other=0.0)
        a = tl.load(bnw_ptr + ch, mask=c_ok, other=0.0).to(tl.float32) * inv_std
        b = tl.load(bnb_ptr + ch, mask=c_ok, other=0.0).to(tl.float32) - rm * a
        return ch, c_ok, rm, inv_std, a, b

    @triton.jit
    def _bcn_backward_chunk(
        sums_ptr,
        moments_ptr,
        group_stats_ptr,
        gamma_ptr,
        ch,
        c_ok,
        a,
        b,
        g,
        n0,
        N,
        C,
        G,
        HW,
        BLOCK_N: tl.constexpr,
        CG: tl.constexpr,
    ):
        # samples n0 .. n0 + BLOCK_N of group g: ((n, c) coefficients A, B, D of dx = A * dy + B * x + D,
        # mask, indices), and the chunk's parts of the parameter gradients (d_scale, d_shift per channel,
        # d_gamma, d_beta)
        nl, ok, idx = _bcn_chunk(ch, c_ok, n0, N, C, BLOCK_N)
        a = a[None, :]
        b = b[None, :]
        s_dy = tl.load(sums_ptr + idx, mask=ok, other=0.0)
        s_dyx = tl.load(sums_ptr + N * C + idx, mask=ok, other=0.0)
        mean = tl.load(moments_ptr + idx, mask=ok, other=0.0)
        var = tl.load(moments_ptr + N * C + idx, mask=ok, other=0.0)
        mu = tl.load(group_stats_ptr + nl * G + g, mask=nl < N, other=0.0)[:, None]
        rstd = tl.load(group_stats_ptr + N * G + nl * G + g, mask=nl < N, other=0.0)[:, None]
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
        gradients = (
            tl.sum(s_dx1_xc + mean * s_dx1, axis=0),
            tl.sum(s_dx1, axis=0),
            tl.sum(tl.sum(s_dy_xhat, axis=1), axis=0),
            tl.sum(tl.sum(s_dy, axis=1), axis=0),
        )
        return (coef_dy, coef_x, coef_const, ok, idx), gradients

    @triton.jit
    def _bcn_store_parameter_gradients(grads_ptr, ch, c_ok, rm, inv_std, gradients, g, C, G, store):
        # from d_scale, d_shift (scale = w * inv_std, shift = b - rm * scale; the estimates are
        # constants), d_gamma, d_beta into grads (2C + 2G): d_bn_weight, d_bn_bias, d_gamma, d_beta
        d_scale, d_shift, d_gamma, d_beta = gradients
        tl.store(grads_ptr + ch, inv_std * (d_scale - rm * d_shift), mask=c_ok & store)
        tl.store(grads_ptr + C + ch, d_shift, mask=c_ok & store)
        tl.store(grads_ptr + 2 * C + g, d_gamma, mask=store)
        tl.store(grads_ptr + 2 * C + G + g, d_beta, mask=store)

    @triton.jit
    def _bcn_backward_finalize_kernel(
        workspace_ptr,  # backward: sums in; parameter gradients, coefficients out
        forward_ptr,  # the forward's workspace: moments, estimates, group statistics
        bnw_ptr,  # (C,) the batch step's weight
        bnb_ptr,  # (C,) and bias
        gamma_ptr,  # (G,) the channel step's weight
        N,
        C,
        G,
        HW,
        CG: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        # one program per group, any N: the coefficients, for _bcn_apply_kernel, and the parameter gradients
        sums_ptr, grads_ptr, coefficients_ptr = _backward_buffers(workspace_ptr, N, C, G)
        moments_ptr, _, estimates_ptr, group_stats_ptr, _ = _forward_buffers(forward_ptr, N, C, G)
        g = tl.program_id(0)
        ch, c_ok, rm, inv_std, a, b = _bcn_group_batch_step(estimates_ptr, bnw_ptr, bnb_ptr, g, C, CG, BLOCK_C)
        d_scale = tl.zeros([BLOCK_C], dtype=tl.float32)
        d_shift = tl.zeros([BLOCK_C], dtype=tl.float32)
        d_gamma = 0.0
        d_beta = 0.0
        for n0 in range(0, N, BLOCK_N):
            (coef_dy, coef_x, coef_const, ok, idx), gradients = _bcn_backward_chunk(
                sums_ptr, moments_ptr, group_stats_ptr, gamma_ptr, ch, c_ok, a, b, g, n0, N, C, G, HW, BLOCK_N, CG
            )
            tl.store(coefficients_ptr + idx, coef_dy, mask=ok)
            tl.store(coefficients_ptr + N * C + idx, coef_const, mask=ok)
            tl.store(coefficients_ptr + 2 * N * C + idx, coef_x, mask=ok)
            d_scale += gradients[0]
            d_shift += gradients[1]
            d_gamma += gradients[2]
            d_beta += gradients[3]
        gradients = (d_scale, d_shift, d_gamma, d_beta)
        _bcn_store_parameter_gradients(grads_ptr, ch, c_ok, rm, inv_std, gradients, g, C, G, True)

    @triton.jit
    def _bcn_backward_fused_kernel(
        dy_ptr,  # (N, C, HW)
        x_ptr,  # (N, C, HW)
        y_ptr,  # (N, C, HW): the forward's output, read with RELU
        dx_ptr,  # (N, C, HW) out
        workspace_ptr,  # backward: sums in; parameter gradients out
        forward_ptr,  # the forward's workspace: moments, estimates, group statistics
        bnw_ptr,  # (C,) the batch step's weight
        bnb_ptr,  # (C,) and bias
        gamma_ptr,  # (G,) the channel step's weight
        N,
        C,
        G,
        HW,
        CG: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_HW: tl.constexpr,
        RELU: tl.constexpr,
    ):
        # micro-batches (N <= BLOCK_N): one program per (group, block of HW) computes its group's
        # coefficients (the programs of block 0 store the parameter gradients) and writes
        # dx = A * dy + B * x + D over its block (RELU: dy through the ReLU)
        sums_ptr, grads_ptr, _ = _backward_buffers(workspace_ptr, N, C, G)
        moments_ptr, _, estimates_ptr, group_stats_ptr, _ = _forward_buffers(forward_ptr, N, C, G)
        g = tl.program_id(0)
        ch, c_ok, rm, inv_std, a, b = _bcn_group_batch_step(estimates_ptr, bnw_ptr, bnb_ptr, g, C, CG, BLOCK_C)
        (coef_dy, coef_x, coef_const, ok, idx), gradients = _bcn_backward_chunk(
            sums_ptr, moments_ptr, group_stats_ptr, gamma_ptr, ch, c_ok, a, b, g, 0, N, C, G, HW, BLOCK_N, CG
        )
        _bcn_store_parameter_gradients(grads_ptr, ch, c_ok, rm, inv_std, gradients, g, C, G, tl.program_id(1) == 0)
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


# ------------------------------------------------------------------------------------- launch configs
# Plain-int arithmetic, cached per shape: triton.cdiv and triton.next_power_of_2 are jit functions whose
# calls cost microseconds of host time each, and a detection step is host-bound on a GPU (about 130 BCN
# calls per step).
def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


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


def _forward_workspace_size(n: int, c: int, groups: int, coefficients: bool) -> int:
    """Floats of the forward's workspace (:func:`_forward_buffers`), with or without its coefficients."""
    return 4 * c + 2 * n * groups + (4 if coefficients else 2) * n * c


def _backward_workspace_split(n: int, c: int, groups: int, coefficients: bool) -> Tuple[int, ...]:
    """The backward's workspace (:func:`_backward_buffers`): sums, the four parameter gradients, coefficients."""
    return 2 * n * c, c, c, groups, groups, 3 * n * c if coefficients else 0


def bcn_forward(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    bn_eps: float,
    gn_eps: float,
    update_rate: float,
    update: Optional[Callable[[torch.Tensor, torch.Tensor], None]],
    out_dtype: torch.dtype,
    relu: bool,
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """``relu(BCN(x) + residual)`` (each optional) with a fixed-statistics batch step; returns ``(y, saved)``,
    ``saved = (x, workspace)`` for :func:`bcn_backward`.

    ``update_rate > 0`` updates ``running_mean`` / ``running_var`` in place from this batch first
    (single process); ``update``, if given, is called instead with the (N, C) float32 moments, e.g. to
    all-reduce them across processes. The sum and the ReLU are taken in float32 before rounding.
    """
    n, c = x.shape[:2]
    groups = gamma.numel()
    hw = math.prod(x.shape[2:])
    x = x.contiguous()
    z = x if residual is None else residual.contiguous()  # z: read only with RESIDUAL
    launch_rows, grid, grid_split = _rows_launch(n * c, hw)
    fused = _fused_launch(n, c // groups, hw, _FUSED_GROUP_TILE)
    workspace = torch.empty(_forward_workspace_size(n, c, groups, fused is None), dtype=torch.float32, device=x.device)
    kernel_update = update is None and update_rate > 0
    params = (running_mean, running_var, bn_weight, bn_bias, gamma, beta)
    key = (x.shape, groups, out_dtype, kernel_update, *launch_key(x, z, *params))
    shape = (n, c, groups, hw)
    args = (x, workspace, running_mean, running_var, *shape)
    launch(_bcn_moments_kernel, grid, args, dict(SNAPSHOT=kernel_update and fused is not None, **launch_rows), key)
    if update is not None:
        update(*workspace[: 2 * n * c].view(2, n, c))  # the moments
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    rate_and_eps = (float(update_rate), float(bn_eps), float(gn_eps))
    if fused is not None:
        fused_launch, hw_blocks = fused
        args = (x, z, y, workspace, *params, *shape, *rate_and_eps)
        meta = dict(UPDATE=kernel_update, RESIDUAL=residual is not None, RELU=relu, **fused_launch)
        launch(_bcn_forward_fused_kernel, (groups, hw_blocks), args, meta, key)
        return y, (x, workspace)
    args = (workspace, *params, n, c, groups, *rate_and_eps)
    launch(_bcn_forward_finalize_kernel, (groups,), args, dict(UPDATE=kernel_update, **_group_launch(c // groups)), key)
    meta = dict(TWO_INPUTS=False, RESIDUAL=residual is not None, RELU=relu, **launch_rows)
    launch(_bcn_apply_kernel, grid_split, (x, z, x, y, workspace, *shape), meta, key)
    return y, (x, workspace)


def bcn_backward(
    dy: torch.Tensor,
    saved: Tuple[torch.Tensor, torch.Tensor],
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    gamma: torch.Tensor,
    relu_output: Optional[torch.Tensor],
    residual_gradient: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`bcn_forward`: ``dx`` (x's dtype), the residual's gradient (dy's dtype) if
    ``residual_gradient`` else None, then float32 ``d_bn_weight``, ``d_bn_bias``, ``d_gamma``, ``d_beta``.
    After a forward with ``relu``, ``relu_output`` is its output (``dy`` passes where it is > 0)."""
    x, forward_workspace = saved
    n, c = x.shape[:2]
    groups = gamma.numel()
    hw = math.prod(x.shape[2:])
    shape = (n, c, groups, hw)
    dy = dy.contiguous()
    relu = relu_output is not None
    y = relu_output if relu else dy  # y: read only with RELU
    # the residual's gradient: dy, through the ReLU if any (written by the sums kernel, then BCN's dy)
    store_gradient = relu and residual_gradient
    dz = torch.empty_like(dy) if store_gradient else dy if residual_gradient else None
    launch_rows, grid, grid_split = _rows_launch(n * c, hw)
    fused = _fused_launch(n, c // groups, hw, _FUSED_GROUP_TILE)
    split = _backward_workspace_split(n, c, groups, fused is None)
    workspace = torch.empty(sum(split), dtype=torch.float32, device=x.device)
    key = (x.shape, groups, *launch_key(dy, x, y, bn_weight, bn_bias, gamma))
    args = (dy, x, y, dz if store_gradient else dy, workspace, *shape)
    launch(_bcn_backward_sums_kernel, grid, args, dict(RELU=relu, STORE_GRADIENT=store_gradient, **launch_rows), key)
    if store_gradient:  # from here on, the gradient through the ReLU is BCN's dy
        dy, relu = dz, False
        key = (x.shape, groups, *launch_key(dy, x, y, bn_weight, bn_bias, gamma))
    dx = torch.empty_like(x)
    forward = (forward_workspace, bn_weight, bn_bias, gamma, *shape)
    if fused is not None:
        fused_launch, hw_blocks = fused
        args = (dy, x, y, dx, workspace, *forward)
        launch(_bcn_backward_fused_kernel, (groups, hw_blocks), args, dict(RELU=relu, **fused_launch), key)
    else:
        launch(_bcn_backward_finalize_kernel, (groups,), (workspace, *forward), _group_launch(c // groups), key)
        args = (dy, x, y, dx, workspace, *shape)
        meta = dict(TWO_INPUTS=True, RESIDUAL=False, RELU=relu, **launch_rows)
        launch(_bcn_apply_kernel, grid_split, args, meta, key)
    # one split_with_sizes: not Tensor.split, whose symbolic-shape checks cost host time
    d_bn_weight, d_bn_bias, d_gamma, d_beta = workspace.split_with_sizes(split)[1:5]
    return dx, dz, d_bn_weight, d_bn_bias, d_gamma, d_beta
