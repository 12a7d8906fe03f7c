"""A user's own COCO-format dataset, end to end with the tools: train, evaluate, draw predictions, export to
ONNX, run the export on an empty image and on one with objects."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from helpers import DEMO_CONFIG, REPO, TINY
from wsbcn_d2.checkpoint import WSBCNCheckpointer
from wsbcn_d2.config import load_config
from wsbcn_d2.data import generate_shapes_dataset
from wsbcn_d2.export import load_exported, tracing_adapter


def tool(name: str, *args) -> subprocess.CompletedProcess:
    run = subprocess.run(
        [sys.executable, f"{REPO}/tools/{name}.py", *args], capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def test_own_dataset_from_training_to_the_exported_model(tmp_path):
    json_file = generate_shapes_dataset(str(tmp_path / "mine"), num_images=6, image_size=64, seed=5)
    data = ["--register-coco", "mine", json_file, str(tmp_path / "mine" / "images")]
    out = tmp_path / "run"
    # TINY without its score threshold of 0: the defaults users meet
    opts = [*TINY[: TINY.index("MODEL.ROI_HEADS.SCORE_THRESH_TEST")], "DATASETS.TRAIN", '("mine",)',
            "DATASETS.TEST", '("mine",)', "SOLVER.MAX_ITER", "3", "OUTPUT_DIR", str(out)]  # fmt: skip
    tool("train_net", "--config-file", DEMO_CONFIG, *data, *opts)
    weights = ["MODEL.WEIGHTS", str(out / "model_final.pth")]
    assert (out / "model_final.pth").is_file()

    evaluated = tool("train_net", "--eval-only", "--config-file", DEMO_CONFIG, *data, *opts, *weights)
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in evaluated.stdout  # COCO evaluation of the test set

    drawn = tool("visualize_predictions", "--config-file", DEMO_CONFIG, "--output", str(tmp_path / "pictures"),
                 "--num-images", "2", *data, *opts, *weights)  # fmt: skip
    pictures = sorted((tmp_path / "pictures").glob("*.png"))
    assert len(pictures) == 2 and drawn.stdout.count("predictions (left: ground truth") == 2
    assert Image.open(pictures[0]).size[0] > 2 * 64  # ground truth | prediction, enlarged

    exported = tool("export_model", "--config-file", DEMO_CONFIG, "--output", str(tmp_path / "export"),
                    "--num-samples", "2", *data, *opts, *weights)  # fmt: skip
    assert "custom ops: none" in exported.stdout
    # the exported file on an empty image and on one with objects: PyTorch's detections, at the config's threshold
    cfg = load_config(DEMO_CONFIG, [*opts, *weights])
    model = build_model(cfg).eval()
    WSBCNCheckpointer(model).load(str(out / "model_final.pth"))
    with open(json_file) as f:
        first = json.load(f)["images"][0]["file_name"]
    scene = np.asarray(Image.open(tmp_path / "mine" / "images" / first).convert("RGB"))[:, :, ::-1]  # BGR
    scene = torch.as_tensor(scene.astype(np.float32).transpose(2, 0, 1).copy())
    adapter, onnx_model = tracing_adapter(model, scene, fold=False), load_exported(str(tmp_path / "export" / "model.onnx"))
    with torch.no_grad():
        for image in (torch.zeros(3, 64, 64), scene):
            got, expected = (adapter.outputs_schema(list(o))[0]["instances"] for o in (onnx_model(image), adapter(image)))
            assert len(got) == len(expected) and (got.scores >= cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST).all()
            assert got.pred_masks.shape[1:] == (1, 28, 28)
