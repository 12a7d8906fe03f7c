"""tools/train_net.py on bad input: one clear line before any work, nothing of a previous run lost.

Also: a kill while a checkpoint is written leaves the previous one loadable and ``--resume`` working.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from helpers import DEMO_CONFIG, REPO, TINY, TRAIN_NET, assert_train_net_fails_cleanly
from wsbcn_d2.data import generate_shapes_dataset

# SIGKILLs the process in the middle of writing its first checkpoint
KILLED_WHILE_SAVING = f"""
import os, runpy, signal, sys, torch

def save_half_then_die(obj, f, *args, **kwargs):
    f.write(b"PK half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = save_half_then_die
sys.path.insert(0, os.path.dirname({TRAIN_NET!r}))  # as running the script puts its folder first
runpy.run_path({TRAIN_NET!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``--register-coco`` arguments and overrides for a seconds-long demo-config run on 6 generated images."""
    root = tmp_path_factory.mktemp("tiny")
    json_file = generate_shapes_dataset(str(root), num_images=6, image_size=64, seed=3)
    data = ["--register-coco", "tiny", json_file, str(root / "images")]
    return data, [*TINY, "DATASETS.TRAIN", '("tiny",)', "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "1"]


def _train(out, *args, prefix=(TRAIN_NET,)) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *prefix, "--config-file", DEMO_CONFIG, *args, "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )


def test_kill_while_saving_keeps_the_last_checkpoint(tiny, tmp_path):
    data, opts = tiny
    out = tmp_path / "output"
    run = _train(out, *data, *opts)
    assert run.returncode == 0, run.stderr[-3000:]
    final = (out / "model_final.pth").read_bytes()

    # resume for one more iteration, killed while model_final.pth is rewritten
    run = _train(out, "--resume", *data, *opts, "SOLVER.MAX_ITER", "2", prefix=("-c", KILLED_WHILE_SAVING))
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert (out / "model_final.pth").read_bytes() == final

    run = _train(out, "--resume", *data, *opts, "SOLVER.MAX_ITER", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 1  # resumed after iteration 0


def test_resume_names_an_empty_last_checkpoint(tiny, tmp_path):
    data, opts = tiny
    (tmp_path / "output").mkdir()
    (tmp_path / "output" / "model_final.pth").write_bytes(b"")
    (tmp_path / "output" / "last_checkpoint").write_text("model_final.pth")
    last = assert_train_net_fails_cleanly(
        tmp_path, ["--config-file", DEMO_CONFIG, "--resume", *data, *opts], ["model_final.pth", "is empty (0 bytes)"]
    )
    assert "last_checkpoint" in last


def test_weights_that_leave_the_backbone_unloaded_stop_the_run(tiny, tmp_path):
    data, opts = tiny
    weights = tmp_path / "random.pth"
    torch.save({"model": {"conv.weight": torch.zeros(3)}}, weights)
    args = ["--config-file", DEMO_CONFIG, *data, *opts, "MODEL.WEIGHTS", str(weights)]
    last = assert_train_net_fails_cleanly(tmp_path, args, [f"MODEL.WEIGHTS {weights}", "MODEL.WEIGHTS_ALLOW_PARTIAL"])
    assert "only 0 of " in last and " backbone tensors loaded" in last

    run = _train(tmp_path / "allowed", *args, "MODEL.WEIGHTS_ALLOW_PARTIAL", "True")
    assert run.returncode == 0, run.stderr[-3000:]


def test_unreadable_weights_are_named(tiny, tmp_path):
    data, opts = tiny
    weights = tmp_path / "R-50-GN-WS.pkl"
    weights.write_text("not a pickle: the download page, saved under the weights' name\n")
    args = ["--config-file", DEMO_CONFIG, *data, *opts, "MODEL.WEIGHTS", str(weights)]
    assert_train_net_fails_cleanly(tmp_path, args, [f"MODEL.WEIGHTS {weights}", "not a checkpoint"])


def test_annotation_without_mask_stops_mask_training(tiny, tmp_path):
    data, opts = tiny
    coco = json.loads(open(data[2]).read())
    coco["annotations"][0]["segmentation"] = []
    json_file = tmp_path / "no_mask.json"
    json_file.write_text(json.dumps(coco))
    args = ["--config-file", DEMO_CONFIG, "--register-coco", "tiny", str(json_file), data[3], *opts]
    assert_train_net_fails_cleanly(tmp_path, args, ["tiny", f"annotation id {coco['annotations'][0]['id']}", "MASK_ON"])


def test_truncated_annotation_file_is_named(tiny, tmp_path):
    data, opts = tiny
    json_file = tmp_path / "truncated.json"
    json_file.write_text(open(data[2]).read()[:1000])
    args = ["--config-file", DEMO_CONFIG, "--register-coco", "tiny", str(json_file), data[3], *opts]
    assert_train_net_fails_cleanly(tmp_path, args, [str(json_file), "not valid JSON"])


def _one_line_error(tmp_path, args, *, device: str = "cpu") -> str:
    """Run tools/train_net.py expecting it to refuse ``args`` in one line before it writes anything."""
    out = tmp_path / "never_written"
    run = subprocess.run(
        [sys.executable, TRAIN_NET, *args, "OUTPUT_DIR", str(out), "MODEL.DEVICE", device],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    lines = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith("usage:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len([line for line in lines if line.startswith("train_net.py: error:")]) == 1, run.stderr[-3000:]
    assert not out.exists()
    return lines[-1]


@pytest.mark.parametrize(
    "flags, pairs, expected",
    [
        ([], ["DATASETS.TRAIN", '("tinny",)'], ["DATASETS.TRAIN", "'tinny'", "did you mean tiny?"]),
        ([], ["SOLVER.MAX_ITERS", "1"], ["SOLVER.MAX_ITERS is not a config key", "SOLVER.MAX_ITER"]),
        ([], ["SOLVER.MAX_ITER", "1", "--resume"], ["--resume comes after the KEY VALUE options"]),
        (["--num-gpus", "2"], ["SOLVER.IMS_PER_BATCH", "3"], ["SOLVER.IMS_PER_BATCH 3", "among 2 processes"]),
        ([], ["MODEL.BACKBONE.FREEZE_AT", "2"], ["FREEZE_AT is 2", "set MODEL.BACKBONE.FREEZE_AT 0"]),
    ],
    ids=["dataset name", "config key", "flag after the options", "batch among processes", "frozen from scratch"],
)
def test_mistakes_stop_in_one_line_before_any_output(tiny, tmp_path, flags, pairs, expected):
    data, opts = tiny
    last = _one_line_error(tmp_path, ["--config-file", DEMO_CONFIG, *flags, *data, *opts, *pairs])
    for text in expected:
        assert text in last, (text, last)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_names_the_fix(tiny, tmp_path):
    data, opts = tiny
    last = _one_line_error(tmp_path, ["--config-file", DEMO_CONFIG, *data, *opts], device="cuda")
    assert "MODEL.DEVICE is cuda, but no CUDA device is available: add MODEL.DEVICE cpu" in last
