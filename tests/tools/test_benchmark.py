"""tools/benchmark.py on the small demo model at 64 px, one repetition (no timing thresholds)."""
import json
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
