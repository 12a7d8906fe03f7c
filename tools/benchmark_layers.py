#!/usr/bin/env python
"""Cost of one BCN layer against one GroupNorm per call, training and inference: host and wall time.

On a GPU a detection step with 1-2 images per GPU is bound by the host issuing
kernels, so what a norm layer costs is mostly host time. For R-50-FPN shapes
at 800 px, this times ``calls`` calls of each layer in a loop, forward +
backward (training) and forward under ``no_grad`` (inference): the host time
(until the loop returns, without waiting for the GPU) and the wall time
(waiting for it), per call, in interleaved repetitions (the order rotates),
and reports the median ratio to GN of the same repetition. On CPU host and
wall time are the same computation.

    .venv/bin/python tools/benchmark_layers.py --device cuda
"""
import argparse
import statistics
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from wsbcn_d2.layers import BatchChannelNorm2d, triton_kernels

SHAPES: Dict[str, Tuple[int, int, int, int]] = {
    "tiny 2x256x8x8": (2, 256, 8, 8),
    "res4 2x1024x50x68": (2, 1024, 50, 68),
    "FPN P2 2x256x200x272": (2, 256, 200, 272),
    "box head 1024x256x7x7": (1024, 256, 7, 7),
}
"""Input shapes (N, C, H, W): a host-bound one, then R-50-FPN layers at 800 px with 2 images."""


def build_layer(variant: str, channels: int, device: str) -> nn.Module:
    if variant == "GN":
        return nn.GroupNorm(32, channels).to(device)
    return BatchChannelNorm2d(channels, 32).to(device)  # micro-batch BCN, training mode


def time_calls(layer: nn.Module, x: torch.Tensor, grad: Optional[torch.Tensor], calls: int) -> Tuple[float, float]:
    """(host, wall) seconds per forward + backward call, or per forward under no_grad without ``grad``."""
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
    host = time.perf_counter() - start
    sync()
    return host / calls, (time.perf_counter() - start) / calls


TIMES = ("train host", "train wall", "infer host", "infer wall")


def measure(shape: Tuple[int, ...], device: str, reps: int, calls: int) -> Dict[str, Dict[str, List[float]]]:
    """Per variant and time of :data:`TIMES`, per repetition: seconds per call."""
    x = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    layers = {v: build_layer(v, shape[1], device) for v in ("GN", "BCN")}
    results = {v: {kind: [] for kind in TIMES} for v in layers}
    for rep in range(reps + 1):  # the first repetition warms up (compilation, allocator)
        order = list(layers)[rep % 2 :] + list(layers)[: rep % 2]
        for v in order:
            train = time_calls(layers[v], x, grad, calls)
            infer = time_calls(layers[v].eval(), x, None, calls)
            layers[v].train()
            if rep:
                for kind, seconds in zip(TIMES, train + infer):
                    results[v][kind].append(seconds)
    return results


def format_table(all_results: Dict[str, Dict[str, Dict[str, List[float]]]]) -> str:
    lines = [
        "| input | variant | " + " | ".join(f"{kind} per call" for kind in TIMES) + " |",
        "|---|---|" + "---|" * len(TIMES),
    ]
    for name, results in all_results.items():
        gn = results["GN"]
        for variant, times in results.items():
            cells = []
            for kind in TIMES:
                median_us = statistics.median(times[kind]) * 1e6
                if variant == "GN":
                    cells.append(f"{median_us:.0f} us")
                else:
                    ratio = statistics.median(t / g for t, g in zip(times[kind], gn[kind]))
                    cells.append(f"{median_us:.0f} us ({ratio:.2f}x)")
            lines.append(f"| {name} | {variant} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per layer")
    parser.add_argument("--calls", type=int, default=50, help="forward + backward calls per repetition")
    args = parser.parse_args(argv)
    kernels = "triton" if triton_kernels.use_triton(torch.zeros(1, device=args.device)) else "torch"
    print(f"{args.device}, torch {torch.__version__}, BCN through the {kernels} code", flush=True)
    table = format_table({name: measure(SHAPES[name], args.device, args.reps, args.calls) for name in args.shapes})
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
