"""tools/benchmark_layers.py on a small input, on CPU (no timing thresholds)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO, load_tool

from wsbcn_d2.cuda import launcher


def test_layer_benchmark_times_both_layers_and_rates_them_against_gn():
    tool = load_tool("benchmark_layers")
    results = tool.measure((2, 64, 5, 7), "cpu", reps=2, calls=3)
    assert set(results) == {"GN", "BCN", "GN+ReLU", "BCN+ReLU", "GN+shortcut+ReLU", "BCN+shortcut+ReLU"}
    for times in results.values():
        assert all(len(times[kind]) == 2 for kind in tool.TIMES)
        for mode in ("train", "infer"):
            assert all(0 < host <= wall for host, wall in zip(times[f"{mode} host"], times[f"{mode} wall"]))
    table = tool.format_table({"small": results}).splitlines()
    rows = {line.split(" | ")[1]: line for line in table[2:]}
    assert len(rows) == 6 and all(("x)" in rows[v]) == v.startswith("BCN") for v in rows)  # ratios: BCN's rows


def test_relu_variants_compute_the_norm_then_a_relu():
    tool = load_tool("benchmark_layers")
    x = torch.randn(2, 64, 5, 7)
    for norm in ("GN", "BCN"):
        plain = tool.build_layer(norm, 64, "cpu").eval()
        with_relu = tool.build_layer(f"{norm}+ReLU", 64, "cpu").eval()
        block_end = tool.build_layer(f"{norm}+shortcut+ReLU", 64, "cpu").eval()
        with torch.no_grad():
            torch.testing.assert_close(with_relu(x), torch.relu(plain(x)))
            torch.testing.assert_close(block_end(x), torch.relu(plain(x) + x))


def test_layer_profile_shows_each_layers_forward_and_backward():
    tool = load_tool("benchmark_layers")
    x = torch.randn(2, 64, 5, 7, requires_grad=True)
    for variant, backward_node in (("GN", "NativeGroupNormBackward"), ("BCN", "_AffineGroupNormBackward")):
        table = tool.profile_calls(tool.build_layer(variant, 64, "cpu"), x, torch.randn_like(x), calls=3)
        assert backward_node in table


STUBBED_RUN = """
import json, sys, torch
sys.path.insert(0, "tools")
import benchmark_layers
layer = benchmark_layers.build_layer("BCN", 64, "cpu")
x = torch.randn(2, 64, 5, 7, requires_grad=True)
estimates = layer.batch_norm.running_mean.clone()
with benchmark_layers.stubbed_kernels() as kernel:
    for _ in range(3):
        layer(x).backward(torch.ones_like(x))
print(json.dumps(dict(
    triton=kernel.triton_launches, direct=kernel.direct_launches,
    estimates_kept=torch.equal(layer.batch_norm.running_mean, estimates),
    restored=not benchmark_layers.dispatch.use_kernels(x),
)))
"""


def test_stubbed_kernels_run_bcn_through_the_cuda_code_without_launching():
    if launcher.triton is None:
        pytest.skip("triton is not installed")
    # compiled kernels' launch path: without the interpreter the tests' process runs under
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", STUBBED_RUN], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    counts = json.loads(run.stdout.splitlines()[-1])
    # first call: each of the 4 kernels (moments + fused forward, sums + fused backward) through Triton,
    # then directly; nothing computed (the kernels would have updated the estimates)
    assert counts == dict(triton=4, direct=8, estimates_kept=True, restored=True)


def test_stubbed_kernels_refuse_the_interpreter():
    if launcher.triton is None:
        pytest.skip("triton is not installed")
    tool = load_tool("benchmark_layers")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the tests run without Triton's interpreter")
    with pytest.raises(RuntimeError, match="unset TRITON_INTERPRET"):
        with tool.stubbed_kernels():
            pass
