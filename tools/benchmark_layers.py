#!/usr/bin/env python
"""Cost of one BCN layer against one GroupNorm per call (alone, with a ReLU after, and with a shortcut added
before the ReLU), training and inference: host and wall time.

On a GPU a detection step with 1-2 images per GPU is bound by the host issuing
kernels, so what a norm layer costs is mostly host time. For R-50-FPN shapes
at 800 px, this times ``calls`` calls of each layer in a loop, forward +
backward (training) and forward under ``no_grad`` (inference): the host time
(until the loop returns, without waiting for the GPU) and the wall time
(waiting for it), per call, in interleaved repetitions (the order rotates),
and reports the median ratio to GN of the same repetition; the same for a norm
followed by a ReLU (GN then ``F.relu_``, against BCN with its fused ReLU) and
for the end of a ResNet block, ``relu(norm(x) + x)`` (GN then ``+=`` and
``F.relu_``, against BCN with the addition and ReLU fused). On CPU host and
wall time are the same computation.

``--profile`` adds, for the first shape, the torch profiler's table of each
layer's training calls (host time per op and autograd node, by self time): where
a layer's host time goes.

``--stub-kernels`` measures the host side without a GPU: on CPU tensors, BCN
goes through the CUDA code (wrappers, launch keys, direct launches, autograd
function) with every Triton kernel launch a no-op, so its output is garbage and
its time is the Python and allocations around the kernels; GroupNorm runs as
usual, arithmetic included.

    .venv/bin/python tools/benchmark_layers.py --device cuda
    .venv/bin/python tools/benchmark_layers.py --stub-kernels --shapes "tiny 2x256x8x8"
"""
import _startup  # noqa: F401  (first: quiets detectron2's import, see tools/_startup.py)
import argparse
import contextlib
import statistics
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple
from unittest import mock

import torch
from torch import nn
from torch.nn import functional as F

from wsbcn_d2.cuda import batch_channel_norm, bcn_kernels, dispatch, enable_fast_path, launcher
from wsbcn_d2.layers import BatchChannelNorm2d

SHAPES: Dict[str, Tuple[int, int, int, int]] = {
    "tiny 2x256x8x8": (2, 256, 8, 8),
    "res4 2x1024x50x68": (2, 1024, 50, 68),
    "FPN P2 2x256x200x272": (2, 256, 200, 272),
    "box head 1024x256x7x7": (1024, 256, 7, 7),
}
"""Input shapes (N, C, H, W): a host-bound one, then R-50-FPN layers at 800 px with 2 images."""

VARIANTS = {
    "GN": "GN", "BCN": "GN",
    "GN+ReLU": "GN+ReLU", "BCN+ReLU": "GN+ReLU",
    "GN+shortcut+ReLU": "GN+shortcut+ReLU", "BCN+shortcut+ReLU": "GN+shortcut+ReLU",
}  # fmt: skip
"""Each layer and the layer its ratios are taken against: a norm, a norm and the ReLU after it
(detectron2's ``F.relu_`` after group norm; BCN's fused ReLU), or a block's end ``relu(norm(x) + x)``
(detectron2's ``out += shortcut``, ``F.relu_``; BCN's fused addition and ReLU: ``wsbcn_d2.cuda.batch_channel_norm``)."""


class _NormThen(nn.Module):
    """A norm with the ReLU (``relu``) after it and the input added before (``shortcut``): detectron2's ops
    after a group norm, :func:`~wsbcn_d2.cuda.batch_channel_norm` for BCN."""

    def __init__(self, norm: nn.Module, relu: bool, shortcut: bool):
        super().__init__()
        self.norm, self.relu, self.shortcut = norm, relu, shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm, BatchChannelNorm2d):
            return batch_channel_norm(self.norm, x, x if self.shortcut else None, self.relu)
        out = self.norm(x)
        if self.shortcut:
            out += x
        return F.relu_(out) if self.relu else out


def build_layer(variant: str, channels: int, device: str) -> nn.Module:
    norm = nn.GroupNorm(32, channels) if variant.startswith("GN") else enable_fast_path(BatchChannelNorm2d(channels, 32))
    if "+" in variant:
        norm = _NormThen(norm, relu=variant.endswith("ReLU"), shortcut="shortcut" in variant)
    return norm.to(device)  # BCN: micro-batch, training mode


def time_calls(layer: nn.Module, x: torch.Tensor, grad: Optional[torch.Tensor], calls: int) -> Tuple[float, float]:
    """(host, wall) seconds per forward + backward call, or per forward under no_grad without ``grad``.

    Gradients are set to None after each call, as a training step's ``zero_grad`` does, so that
    the backward's gradients are stored rather than added to the previous ones.
    """
    leaves = [x, *layer.parameters()]
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    if grad is None:
        with torch.no_grad():
            for _ in range(calls):
                layer(x)
    else:
        for _ in range(calls):
            layer(x).backward(grad)
            for leaf in leaves:
                leaf.grad = None
    host = time.perf_counter() - start
    sync()
    return host / calls, (time.perf_counter() - start) / calls


TIMES = ("train host", "train wall", "infer host", "infer wall")


class _NoOpCompiledKernel:
    """A compiled Triton kernel whose launches do nothing but count; Triton's launch-metadata code is real."""

    name, function, packed_metadata, src = "no-op", None, None, None
    triton_launches = direct_launches = 0  # through kernel[grid](...), through the compiled kernel's launcher
    if launcher.triton is not None:
        launch_metadata = launcher.triton.compiler.CompiledKernel.launch_metadata

    def _init_handles(self) -> None:
        pass

    def run(self, *args) -> None:
        self.direct_launches += 1


@contextlib.contextmanager
def stubbed_kernels() -> Iterator[_NoOpCompiledKernel]:
    """BCN's CUDA code on CPU tensors, with no-op kernel launches; yields the kernel counting them."""
    jit_function = launcher.triton.runtime.jit.JITFunction
    if not isinstance(bcn_kernels._bcn_moments_kernel, jit_function):
        raise RuntimeError("stubbed kernels need Triton's compiled-kernel launches: unset TRITON_INTERPRET")
    compiled = _NoOpCompiledKernel()

    def launch_through_triton(*args, **kwargs) -> _NoOpCompiledKernel:
        compiled.triton_launches += 1
        return compiled

    with contextlib.ExitStack() as stack:
        for target, name, value in (
            (jit_function, "run", launch_through_triton),
            (dispatch, "use_kernels", lambda x: x.dtype in dispatch.KERNEL_DTYPES),
            (launcher, "_stream_getter", lambda: lambda device: 0),
            (launcher, "_COMPILED", {}),
        ):
            stack.enter_context(mock.patch.object(target, name, value))
        yield compiled


def measure(shape: Tuple[int, ...], device: str, reps: int, calls: int) -> Dict[str, Dict[str, List[float]]]:
    """Per variant and time of :data:`TIMES`, per repetition: seconds per call."""
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    layers = {v: build_layer(v, shape[1], device) for v in VARIANTS}
    results = {v: {kind: [] for kind in TIMES} for v in layers}
    for rep in range(reps + 1):  # the first repetition warms up (compilation, allocator)
        k = rep % len(layers)
        order = list(layers)[k:] + list(layers)[:k]
        for v in order:
            train = time_calls(layers[v], x, grad, calls)
            infer = time_calls(layers[v].eval(), x, None, calls)
            layers[v].train()
            if rep:
                for kind, seconds in zip(TIMES, train + infer):
                    results[v][kind].append(seconds)
    return results


def profile_calls(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, calls: int, rows: int = 15) -> str:
    """The torch profiler's table of ``calls`` forward + backward calls (after one unprofiled), by self CPU time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    time_calls(layer, x, grad, 1)
    with torch.profiler.profile(activities=activities) as profiler:
        time_calls(layer, x, grad, calls)
    return profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def format_table(all_results: Dict[str, Dict[str, Dict[str, List[float]]]]) -> str:
    lines = [
        "| input | variant | " + " | ".join(f"{kind} per call" for kind in TIMES) + " |",
        "|---|---|" + "---|" * len(TIMES),
    ]
    for name, results in all_results.items():
        for variant, times in results.items():
            base = results[VARIANTS[variant]]
            cells = []
            for kind in TIMES:
                median_us = statistics.median(times[kind]) * 1e6
                if VARIANTS[variant] == variant:
                    cells.append(f"{median_us:.0f} us")
                else:
                    ratio = statistics.median(t / g for t, g in zip(times[kind], base[kind]))
                    cells.append(f"{median_us:.0f} us ({ratio:.2f}x)")
            lines.append(f"| {name} | {variant} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per layer")
    parser.add_argument("--calls", type=int, default=50, help="forward + backward calls per repetition")
    parser.add_argument(
        "--stub-kernels", action="store_true", help="on CPU: BCN's CUDA code with no-op kernel launches (host time)"
    )
    parser.add_argument("--profile", action="store_true", help="also the torch profiler's table per layer")
    args = parser.parse_args(argv)
    if args.stub_kernels and (args.device != "cpu" or launcher.triton is None):
        parser.error("--stub-kernels runs on CPU (--device cpu) and needs triton installed")
    with stubbed_kernels() if args.stub_kernels else contextlib.nullcontext():
        kernels = "triton" if dispatch.use_kernels(torch.zeros(1, device=args.device)) else "torch"
        stub = ", kernel launches stubbed" if args.stub_kernels else ""
        print(f"{args.device}, torch {torch.__version__}, BCN through the {kernels} code{stub}", flush=True)
        results = {name: measure(SHAPES[name], args.device, args.reps, args.calls) for name in args.shapes}
        table = format_table(results)
        print(table)
        if args.profile:
            shape = SHAPES[args.shapes[0]]
            x = torch.randn(shape, device=args.device, requires_grad=True)
            for variant in ("GN", "BCN"):
                layer = build_layer(variant, shape[1], args.device)
                print(f"\n{variant}, {args.shapes[0]}, {args.calls} training calls:")
                print(profile_calls(layer, x, torch.randn_like(x), args.calls))
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
