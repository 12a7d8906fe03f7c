"""Training runs through tools/train_net.py with every process's state dumped (train_net_with_dumps.py),
for the tests that compare runs: several processes (GLOO on CPU), resumed runs, accumulated steps."""
import os
import subprocess
import sys

import torch

from helpers import CONFIG_DIR, REPO

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
