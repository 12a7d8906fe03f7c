"""tools/train_net.py with several processes (GLOO on CPU) and exact resume, end to end.

Each run goes through tools/train_net.py (tests/engine/train_net_with_dumps.py adds a hook
that saves every process's model state, BCN estimates per step and logged losses).
"""
import os
import subprocess
import sys

import pytest
import torch

from helpers import CONFIG_DIR, REPO
from wsbcn_d2.data import generate_shapes_dataset

CONFIG = os.path.join(CONFIG_DIR, "Demo", "mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml")
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_net_with_dumps.py")
TINY = [
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH", "2",
    "SOLVER.WARMUP_ITERS", "1", "DATASETS.TEST", "()", "SEED", "7",
]
# the ROI heads take every proposal (at most 50 + ground truth per image, fewer than the
# 128 positives and 384 negatives allowed): which RoIs a process sees does not depend on
# its random draws, so one process over both batches sees the RoIs the two processes see
ALL_ROIS = ["MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "512"]
ESTIMATES = ("batch_norm.running_mean", "batch_norm.running_var")


@pytest.fixture(scope="module")
def dataset_opts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    json_file = generate_shapes_dataset(str(root), num_images=8, image_size=64, seed=3)
    return ["--register-coco", "tiny", json_file, str(root / "images"), "DATASETS.TRAIN", '("tiny",)']


def train(num_processes: int, out, dataset_opts, *opts, resume: bool = False) -> dict:
    """Runs tools/train_net.py; returns {rank: what that process dumped}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")  # GLOO, no oversubscription
    # a free port: detectron2's default one is fixed per user, shared by concurrent runs
    cmd = [sys.executable, SCRIPT, "--config-file", CONFIG, "--num-gpus", str(num_processes), "--dist-url", "auto"]
    cmd += ["--resume"] * resume + dataset_opts + TINY + ["OUTPUT_DIR", str(out), *opts]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return {r: torch.load(out / f"rank{r}.pth") for r in range(num_processes)}


def preempt_after(out, iteration: int) -> None:
    """Leaves ``out`` as a run killed right after saving its checkpoint of ``iteration`` would."""
    name = f"model_{iteration - 1:07d}.pth"  # detectron2 names a checkpoint by its last iteration
    assert (out / name).is_file()
    for later in out.glob("model_*.pth"):
        if later.name > name:  # model_final.pth sorts after model_0*.pth
            later.unlink()
    (out / "last_checkpoint").write_text(name)


def estimates(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.endswith(ESTIMATES)}


def losses_from(dump: dict, first_iteration: int) -> dict:
    return {
        name: [(value, it) for value, it in values if it >= first_iteration]
        for name, values in dump["losses"].items()
    }


def test_two_processes_hold_identical_estimates_and_resume(dataset_opts, tmp_path):
    out = tmp_path / "run"
    opts = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"]
    full = train(2, out, dataset_opts, *opts)
    assert (out / "model_0000001.pth").is_file() and (out / "model_final.pth").is_file()
    assert len(estimates(full[0]["state"])) > 50  # micro-batch BCN everywhere
    for step in range(4):  # after every step, not only at the end
        for key, value in full[0]["estimates"][step].items():
            assert torch.equal(full[1]["estimates"][step][key], value), (step, key)
    for key, value in full[0]["state"].items():  # weights too: DDP's reduced gradients
        assert torch.equal(full[1]["state"][key], value), key
    some_estimate = next(iter(full[0]["estimates"][0]))
    assert not torch.equal(full[0]["estimates"][0][some_estimate], full[0]["estimates"][3][some_estimate])

    # pre-empted after the checkpoint of iteration 2, then resumed from it in its own folder
    preempt_after(out, 2)
    resumed = train(2, out, dataset_opts, *opts, resume=True)
    for key, value in full[0]["state"].items():
        torch.testing.assert_close(resumed[0]["state"][key], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(resumed[1]["state"][key], resumed[0]["state"][key]), key
    assert losses_from(resumed[0], 0).keys() == losses_from(full[0], 2).keys()
    for name, values in losses_from(full[0], 2).items():
        assert [it for _, it in resumed[0]["losses"][name]] == [2, 3]
        torch.testing.assert_close(resumed[0]["losses"][name], values, rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
def test_two_processes_estimate_as_one_process_over_both_batches(dataset_opts, tmp_path):
    # with the weights held (LR 0) the estimates depend on the images alone: process r of 2
    # gets the stream's elements r, r + 2, ..., one process at 2 images per batch gets both
    # (with the same augmentation, seeded by the element's position in the stream)
    opts = ["SOLVER.MAX_ITER", "3", "SOLVER.BASE_LR", "0.0", *ALL_ROIS]
    two = train(2, tmp_path / "two", dataset_opts, *opts)
    one = train(1, tmp_path / "one", dataset_opts, *opts)
    for step in range(3):
        for key, value in one[0]["estimates"][step].items():
            # float32 rounding: convolutions over batches of 1 and 2 images sum in other orders
            scale = value.abs().max().item()
            torch.testing.assert_close(two[0]["estimates"][step][key], value, rtol=0, atol=1e-4 * scale)
            assert torch.equal(two[1]["estimates"][step][key], two[0]["estimates"][step][key])


def test_resume_continues_the_uninterrupted_run(dataset_opts, tmp_path):
    out = tmp_path / "run"
    opts = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3"]
    full = train(1, out, dataset_opts, *opts)[0]
    preempt_after(out, 3)
    # resumed with 2 data-loading workers: each image's augmentation is seeded by its place in
    # the stream, so which process maps it does not matter
    resumed = train(1, out, dataset_opts, *opts, "DATALOADER.NUM_WORKERS", "2", resume=True)[0]
    expected = losses_from(full, 3)
    assert resumed["losses"].keys() == expected.keys() and len(expected["total_loss"]) == 3
    for name, values in expected.items():
        torch.testing.assert_close(resumed["losses"][name], values, rtol=1e-6, atol=1e-7)
    assert estimates(full["state"]).keys() and full["state"].keys() == resumed["state"].keys()
    for key, value in full["state"].items():  # weights and BCN estimates
        torch.testing.assert_close(resumed["state"][key], value, rtol=1e-6, atol=1e-7)
