"""tools/benchmark.py on the small demo model at 64 px, one repetition (no timing thresholds)."""
import json
import math
import os

import pytest
import torch

from helpers import CONFIG_DIR, load_tool

CONFIG = os.path.join(CONFIG_DIR, "Demo", "mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml")


@pytest.fixture(scope="module")
def benchmark():
    return load_tool("benchmark")


def test_measure_compares_variants_on_equal_work(benchmark):
    cfgs = {v: benchmark.load_variant_config(CONFIG, v, ["MODEL.DEVICE", "cpu"]) for v in ("GN", "GN+WS", "BCN+WS")}
    cfgs["GN again"] = cfgs["GN"].clone()
    results = benchmark.measure(cfgs, short_side=64, reps=1, warmup=0)

    assert set(results) == set(cfgs)
    for res in results.values():
        assert {"train_s", "infer_s"} <= set(res) and res["train_s"]["ratio_min"] > 0
    assert results["GN"]["train_s"]["ratio"] == 1.0 and results["GN"]["saved_bytes_ratio"] == 1.0
    assert results["GN again"]["saved_bytes"] == results["GN"]["saved_bytes"]  # deterministic
    # zeroed RPN predictors: every variant trains its heads on the same RoIs
    assert len({res["num_fg"] for res in results.values()}) == 1
    assert results["GN+WS"]["ws_cache_reused"] is True and results["GN"]["ws_cache_reused"] is None
    # WS keeps the standardized weight instead of the raw one; BCN keeps what GN keeps
    assert results["GN+WS"]["saved_bytes_ratio"] == pytest.approx(1.0, abs=0.01)
    assert results["BCN+WS"]["saved_bytes_ratio"] == pytest.approx(1.0, abs=0.02)


def test_command_line_writes_json_table(benchmark, tmp_path):
    out = tmp_path / "bench.json"
    args = ["--config-file", CONFIG, "--sizes", "64", "--reps", "1", "--warmup", "0", "--json", str(out)]
    benchmark.main([*args, "--device", "cpu", "--variants", "GN", "FrozenBN"])
    report = json.loads(out.read_text())
    assert set(report["results"]["64"]) == {"GN", "FrozenBN"}
    assert "| 64 | FrozenBN |" in report["table"]


def test_images_per_step_and_bfloat16_autocast(benchmark):
    cfg = {"GN": benchmark.load_variant_config(CONFIG, "GN", ["MODEL.DEVICE", "cpu"])}
    one = benchmark.measure(cfg, short_side=64, reps=1, warmup=0)["GN"]
    two = benchmark.measure(cfg, short_side=64, reps=1, warmup=0, images=2)["GN"]
    assert 1.8 < two["saved_activation_bytes"] / one["saved_activation_bytes"] < 2.2  # twice the activations

    dtypes = []
    for amp in (False, True):
        runner = benchmark._Runner(cfg["GN"], seed=0, amp=amp)
        runner.model.backbone.bottom_up.stem.conv1.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        sample = benchmark.synthetic_input(64)
        runner.train_step([sample])
        runner.infer([{"image": sample["image"]}])
    assert dtypes == [torch.float32] * 2 + [torch.bfloat16] * 2  # training and inference under autocast


@pytest.mark.parametrize("n", [6, 12, 30])
def test_median_interval_covers_the_median_at_its_level(benchmark, n):
    generator = torch.Generator().manual_seed(n)
    trials = 4000
    samples = torch.rand(trials, n, generator=generator, dtype=torch.float64).exp()  # skewed; median e^0.5
    intervals = [benchmark.median_interval(row.tolist()) for row in samples]
    median = math.exp(0.5)
    covered = sum(low <= median <= high for low, high in intervals) / trials
    # at least 95% (the chosen order statistics cover 96.9%, 96.1%, 95.7% for these n), and not the next
    # wider pair's coverage (99.4% for n = 12, 98.4% for n = 30): the narrowest interval at that level
    assert 0.94 < covered < 0.98
    for row, (low, high) in zip(samples.tolist(), intervals):
        assert min(row) <= low < high <= max(row) and (n == 6 or (low, high) != (min(row), max(row)))


def test_median_interval_needs_six_values_at_95_percent(benchmark):
    assert benchmark.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    assert benchmark.median_interval([3.0, 1.0, 2.0, 6.0, 5.0, 4.0]) == (1.0, 6.0)
    summary = {"ratio": 1.1, "ratio_interval": None, "ratio_min": 0.9, "ratio_max": 1.3}
    assert benchmark._ratio_cell(summary) == "1.100 (0.90-1.30)"
    assert benchmark._ratio_cell({**summary, "ratio_interval": (1.05, 1.15)}) == "1.100 [1.050-1.150] (0.90-1.30)"


def test_accumulation_halves_a_forwards_saved_tensors(benchmark, tmp_path):
    # GN: at 64 px, WS's standardized weights (saved once per forward) would outweigh the activations
    cfg = benchmark.load_variant_config(CONFIG, "GN", ["MODEL.DEVICE", "cpu"])
    results = benchmark.measure_accumulation(cfg, short_side=64, steps=2, reps=1, warmup=0, images=2)
    one, two = results["1"], results["2"]
    # one image per forward: half the activations of two (the same images, one at a time)
    assert 0.45 < two["saved_activation_bytes"] / one["saved_activation_bytes"] < 0.55
    assert two["saved_bytes_ratio"] < 1 and one["train_s"]["ratio"] == 1.0 and two["train_s"]["ratio_min"] > 0

    out = tmp_path / "bench.json"
    args = ["--config-file", CONFIG, "--sizes", "64", "--reps", "1", "--warmup", "0", "--json", str(out)]
    benchmark.main([*args, "--device", "cpu", "--variants", "BCN+WS", "--images", "2", "--accumulation-steps", "2"])
    report = json.loads(out.read_text())
    assert report["accumulation_steps"] == 2 and set(report["results"]["64"]["BCN+WS"]) == {"1", "2"}
    assert "| 64 | BCN+WS | 2 x 1 |" in report["table"] and "| 64 | BCN+WS | 1 x 2 |" in report["table"]
    with pytest.raises(SystemExit):
        benchmark.main([*args, "--images", "3", "--accumulation-steps", "2"])
