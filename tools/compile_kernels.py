#!/usr/bin/env python
"""Compile the Triton kernels for a CUDA GPU, without one, exactly as the launchers call them.

CI runs the kernels through Triton's interpreter, which accepts some programs
that Triton's compiler refuses. This runs the host functions of
``wsbcn_d2/cuda/ws_kernels.py`` and ``bcn_kernels.py`` (WS rows, BCN forward and backward) on
small CPU tensors with every kernel launch recorded instead of run, then
compiles each distinct recorded launch (argument types, constexprs, num_warps)
ahead of time for the target architectures with Triton's compiler and ptxas,
down to a cubin: unspecialized, and with the divisibility by 16 that Triton's
JIT would assume for its pointers and integers. Run it without ``TRITON_INTERPRET``.

    .venv/bin/python tools/compile_kernels.py --arch 90 80
"""
import _startup  # noqa: F401  (first: quiets detectron2's import, see tools/_startup.py)
import argparse
import os
import sys
import time
from typing import Dict, List, Sequence, Tuple

import torch

from wsbcn_d2.cuda import bcn_kernels, launcher, ws_kernels
from wsbcn_d2.layers.ws_conv import WS_FORMS

KERNEL_MODULES = (ws_kernels, bcn_kernels)

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
                  torch.int32: "*i32"}  # fmt: skip

Launch = Tuple[str, Tuple[Tuple[str, str], ...], Tuple[Tuple[str, object], ...], Tuple[Tuple[str, object], ...],
               Tuple[int, ...]]  # fmt: skip
"""(kernel name, ((argument, type), ...), ((constexpr, value), ...), ((option, value), ...), indices of the
arguments divisible by 16: pointers aligned to 16 bytes and integers, as Triton's JIT specializes them)."""


def _arg_type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return _POINTER_TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _divisible(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def record_launches(x_dtypes: Sequence[torch.dtype]) -> List[Launch]:
    """The distinct kernel launches of the launchers over ResNet-like shapes and ``x_dtypes``."""
    import triton

    launches: Dict[Launch, None] = {}
    kernels = {
        name: (module, kernel)
        for module in KERNEL_MODULES
        for name, kernel in vars(module).items()
        if name.endswith("_kernel") and isinstance(kernel, triton.runtime.jit.JITFunction)
    }

    class Recorder:
        def __init__(self, name: str):
            self.name, self.kernel = name, kernels[name][1]
            self.fn = self.kernel.fn  # what launcher.launch keys compiled kernels by

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                bound = dict(zip(self.kernel.arg_names, args), **kwargs)
                params = {p.name: p for p in self.kernel.params}
                signature = tuple(
                    (n, "constexpr" if params[n].is_constexpr else _arg_type(v)) for n, v in bound.items() if n in params
                )
                constexprs = tuple((n, v) for n, v in bound.items() if n in params and params[n].is_constexpr)
                options = tuple((n, v) for n, v in kwargs.items() if n not in params)
                divisible = tuple(i for i, (n, t) in enumerate(signature) if t != "constexpr" and _divisible(bound[n]))
                launches[(self.name, signature, constexprs, options, divisible)] = None

            return record

    fused_group_tile = bcn_kernels._FUSED_GROUP_TILE
    try:
        for name, (module, _) in kernels.items():
            setattr(module, name, Recorder(name))
        for fused_tile in (fused_group_tile, 0):  # BCN's fused kernels where they serve, then its per-group kernels
            bcn_kernels._FUSED_GROUP_TILE = fused_tile
            for dtype in x_dtypes:
                _run_launchers(dtype)
    finally:
        for name, (module, kernel) in kernels.items():
            setattr(module, name, kernel)
        bcn_kernels._FUSED_GROUP_TILE = fused_group_tile
    return list(launches)


def _run_launchers(dtype: torch.dtype) -> None:
    # WS, every form: rows shorter and longer than a block; the gradient in the convs' dtype (autocast)
    flat = torch.randn(3 * 700 + 8 * 9).to(dtype)
    row_start = torch.tensor([0, 700, 1400] + [2100 + 9 * i for i in range(8)], dtype=torch.int64)
    row_len = torch.tensor([700] * 3 + [9] * 8, dtype=torch.int32)
    for form in WS_FORMS.values():  # each form is a compile-time choice
        w_hat, root = ws_kernels.ws_rows_forward(flat, row_start, row_len, 1e-5, *form)
        ws_kernels.ws_rows_backward(w_hat.to(dtype), w_hat, root, row_start, row_len, 1e-5, *form)
    # BCN, 32 groups: 1 to 128 channels per group (and 3), maps from 1x1 to more than a block, RoI heads
    shapes = [(2, 32, 1, 1), (2, 64, 50, 68), (2, 96, 5, 5), (2, 128, 25, 34), (2, 256, 13, 17), (2, 512, 7, 7),
              (2, 1024, 4, 4), (2, 2048, 2, 2), (2, 4096, 3, 3), (300, 256, 14, 14)]  # fmt: skip
    for n, c, h, w in shapes:
        groups = 32
        x = torch.randn(n, c, h, w).to(dtype)
        params = [torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c), torch.ones(groups), torch.zeros(groups)]
        bn_weight, bn_bias, running_mean, running_var, gamma, beta = params
        # training, eval (statistics in float32 out under autocast), training with the fused ReLU, and with
        # a residual added before it (a ResNet block's last conv)
        for update_rate, out_dtype, residual, relu in [
            (0.1, dtype, None, False), (0.0, torch.float32, None, False), (0.1, dtype, None, True),
            (0.1, dtype, x, True),
        ]:  # fmt: skip
            y, saved = bcn_kernels.bcn_forward(
                x, residual, bn_weight, bn_bias, running_mean, running_var, gamma, beta, 1e-5, 1e-5, update_rate,
                None, out_dtype, relu,
            )  # fmt: skip
            bcn_kernels.bcn_backward(
                y.to(dtype), saved, bn_weight, bn_bias, gamma, y if relu else None, residual is not None
            )


def compile_launch(launch: Launch, arch: int):
    """Compile one launch for ``sm_<arch>``, assuming divisibility by 16 where it lists it; returns
    Triton's CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name, signature, constexprs, options, divisible = launch
    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    source = ASTSource(
        fn=next(getattr(m, name) for m in KERNEL_MODULES if hasattr(m, name)), signature=dict(signature), constexprs=dict(constexprs), attrs=attrs
    )
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=dict(options))


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", type=int, default=[90], help="compute capabilities, e.g. 90 80")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"], help="input dtypes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    if launcher.triton is None:
        parser.error("triton is not installed")
    launches = record_launches([getattr(torch, d) for d in args.dtypes])
    # each launch with the JIT's divisibility assumptions, and each signature once without any
    variants = list(dict.fromkeys([(*launch[:4], ()) for launch in launches] + [l for l in launches if l[4]]))
    print(f"{len(variants)} distinct launches, compiling for sm_{', sm_'.join(map(str, args.arch))}", flush=True)
    for arch in args.arch:
        for launch in variants:
            start = time.perf_counter()
            kernel = compile_launch(launch, arch)
            types = ",".join(t for _, t in launch[1] if t != "constexpr")
            divisible = ",".join(launch[1][i][0] for i in launch[4]) or "nothing"
            print(f"sm_{arch} {launch[0]}({types}) {dict(launch[2])}, divisible by 16: {divisible}: "
                  f"cubin {len(kernel.asm['cubin'])} bytes, {time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
