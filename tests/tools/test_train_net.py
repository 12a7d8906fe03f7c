"""tools/train_net.py end to end on a tiny generated COCO-format dataset, then --eval-only."""
import functools
import glob
import json
import math
import os
import re
import subprocess
import sys

import pytest

from helpers import DEMO_CONFIG as CONFIG
from helpers import BIT_NARROW, HIDDEN_WARNINGS, REPO, TINY
from wsbcn_d2.data import generate_shapes_dataset
from wsbcn_d2.engine import available_cpus


def train_net(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py"), *args],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    json_file = generate_shapes_dataset(str(root), num_images=6, image_size=64, seed=3)
    return json_file, str(root / "images")


def test_train_then_eval_only(tiny_dataset, tmp_path):
    json_file, image_root = tiny_dataset
    out = tmp_path / "out"
    data = ["--register-coco", "tiny", json_file, image_root]
    opts = [*TINY, "DATASETS.TRAIN", '("tiny",)', "DATASETS.TEST", '("tiny",)', "OUTPUT_DIR", str(out)]

    run = train_net("--config-file", CONFIG, *data, *opts, "SOLVER.MAX_ITER", "3")
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "MASK_FORMAT set to 'bitmask'" in log  # the shapes data holds RLE masks
    assert (out / "model_final.pth").is_file()
    assert glob.glob(str(out / "events.out.tfevents.*"))
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("total_loss" in m for m in metrics)
    assert any("segm/AP" in m and "bbox/AP" in m for m in metrics)  # evaluated after training

    run = train_net(
        "--config-file", CONFIG, "--eval-only", *data, *opts, "MODEL.WEIGHTS", str(out / "model_final.pth")
    )
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    assert "Evaluation results for bbox" in log and "Evaluation results for segm" in log
    assert (out / "inference" / "tiny" / "coco_instances_results.json").is_file()


def test_short_run_shows_progress_at_once_without_known_warnings(tiny_dataset, tmp_path):
    """Progress lines after the first two iterations (the second with detectron2's ETA) although the writers' period
    (20) is past the run's end, metrics.json at the period only, none of the known harmless warnings, NUM_WORKERS
    above the CPU count lowered and SOLVER.STEPS past MAX_ITER said in one line."""
    json_file, image_root = tiny_dataset
    out, workers = tmp_path / "out", available_cpus() + 1
    run = train_net(
        "--config-file", CONFIG, "--register-coco", "tiny", json_file, image_root, *TINY,
        "DATALOADER.NUM_WORKERS", str(workers), "DATASETS.TRAIN", '("tiny",)', "DATASETS.TEST", "()",
        "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    progress = re.findall(r"d2\.utils\.events\]:\s+(eta: \S+\s+)?iter: (\d+) ", run.stdout)
    assert [(bool(eta), int(i)) for eta, i in progress] == [(False, 0), (True, 1), (True, 2)], run.stdout[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert [m["iteration"] for m in metrics] == [2]
    log = run.stdout + run.stderr
    assert not [w for w in HIDDEN_WARNINGS if w in log], run.stderr[-3000:]
    assert f"DATALOADER.NUM_WORKERS {workers} lowered to {workers - 1}" in log
    assert "SOLVER.STEPS (1100, 1300) past SOLVER.MAX_ITER 3 are not used" in log


def test_missing_annotation_file_is_named(tmp_path):
    missing = tmp_path / "nope.json"
    run = train_net("--config-file", CONFIG, "--register-coco", "x", str(missing), str(tmp_path))
    assert run.returncode != 0
    assert str(missing) in run.stderr and "Traceback" not in run.stderr


def test_bit_backbone_converted_from_timm_trains(tiny_dataset, tmp_path):
    """The BiT workflow: timm weights (a quarter-width ResNetV2-50 with 8-group GN) -> convert_pretrained.py
    -> tools/train_net.py on the BiT Mask R-CNN config, the backbone loaded whole."""
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    source = timm.models.resnetv2.ResNetV2(
        [3, 4, 6, 3], width_factor=0.25, stem_type="fixed",
        conv_layer=functools.partial(timm.layers.StdConv2d, eps=1e-8),
        norm_layer=functools.partial(timm.layers.GroupNormAct, num_groups=8),
    )  # fmt: skip
    weights, converted = tmp_path / "model.safetensors", tmp_path / "pretrained" / "bit.pkl"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "convert_pretrained.py"), str(weights), str(converted)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert run.returncode == 0 and "ResNetV2-50x0.25" in run.stdout, run.stdout + run.stderr
    json_file, image_root = tiny_dataset
    out = tmp_path / "out"
    run = train_net(
        "--config-file", os.path.join(REPO, "configs", "COCO-InstanceSegmentation", "mask_rcnn_BiT_R50x1_FPN_2x_gn_ws.yaml"),
        "--register-coco", "tiny", json_file, image_root, *TINY, *map(str, BIT_NARROW), "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", str(converted), "DATASETS.TRAIN", '("tiny",)', "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2",
        "OUTPUT_DIR", str(out),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert metrics[-1]["iteration"] == 1 and all(math.isfinite(m["total_loss"]) for m in metrics)
