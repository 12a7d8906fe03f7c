"""ONNX / TorchScript export of GN+WS and BCN+WS detectors: onnxruntime gives PyTorch's detections."""
import copy
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from detectron2.modeling import build_model
from PIL import Image

from helpers import DEMO_CONFIG, HIDDEN_WARNINGS, REPO, SMALL, allow_float64_models, assert_as_accurate, error_bound, load_config
from helpers import randomize_norms_, relative_error, synthetic_batch
from wsbcn_d2.export import ExportError, export, load_exported, onnx_op_types, tracing_adapter

EXPORT_MODEL = f"{REPO}/tools/export_model.py"
GN = ["MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN"]
CASES = {
    "mask_rcnn_gn_ws": ("Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml", [*GN, "MODEL.ROI_BOX_HEAD.NORM", "GN", "MODEL.ROI_MASK_HEAD.NORM", "GN"]),
    "mask_rcnn_bcn_ws": ("Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml", []),
    "retinanet_gn_ws": ("COCO-Detection/retinanet_R_50_FPN_1x_gn_ws.yaml", SMALL),
    "retinanet_bcn_ws": ("COCO-Detection/retinanet_R_50_FPN_1x_bcn_ws.yaml", SMALL),
}  # fmt: skip
# the tool's printed check (two float32 runtimes): scores and mask probabilities in [0, 1] within 1e-5, about
# 170 units of float32 rounding (u = 6e-8); boxes within 1e-5 of the image side (measured: below 1e-6)
TOLERANCE = {"boxes": 1e-5, "scores": 1e-5, "masks": 1e-5}


def model_and_image(case: str):
    config, opts = CASES[case]
    torch.manual_seed(0)
    cfg = load_config(config, *opts, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0)
    model = randomize_norms_(build_model(cfg).eval())
    return model, synthetic_batch(96, 128)[0]["image"]  # two objects on noise


def detections(adapter, outputs) -> dict:
    instances = adapter.outputs_schema(list(outputs))[0]["instances"]
    return {k: v.tensor if k == "pred_boxes" else v for k, v in instances.get_fields().items()}


def assert_same_detections(adapter, got, expected, reference) -> None:
    """The detections ``got`` (flattened outputs of ``adapter``) are PyTorch's ``expected`` ones, and as close to
    the float64 ``reference`` as those are.

    Near-equal scores of an untrained model order (and cut at the detection limit) differently in float64: the
    float64 detection of the same class whose box is nearest pairs with each float32 one (most pair, within a
    hundredth of a pixel); on the pairs, each float32 result misses float64 by at most ``assert_as_accurate``'s
    bound, so the exported and PyTorch results differ by at most the sum of their bounds on all detections.
    """
    got, expected, reference = (detections(adapter, o) for o in (got, expected, reference))
    assert len(got["scores"]) == len(expected["scores"]) > 0
    assert torch.equal(got["pred_classes"], expected["pred_classes"])
    distance = (expected["pred_boxes"][:, None].double() - reference["pred_boxes"][None]).abs().amax(dim=2)
    distance[expected["pred_classes"][:, None] != reference["pred_classes"][None]] = float("inf")
    nearest, pair = distance.min(dim=1)
    paired = nearest < 1e-2
    assert paired.float().mean() > 0.8 and len(set(pair[paired].tolist())) == int(paired.sum())
    for key in got.keys() - {"pred_classes"}:
        triple = got[key][paired], expected[key][paired], reference[key][pair[paired]]
        assert_as_accurate(*triple, msg=key)
        bound = error_bound(*triple[1:]) + relative_error(*triple[1:])
        assert relative_error(got[key], expected[key]) <= bound, key


def float64_adapter(model, image: torch.Tensor, monkeypatch):
    """The unfolded model in float64, as a :func:`tracing_adapter` that takes float32 images."""
    allow_float64_models(monkeypatch)
    adapter = tracing_adapter(copy.deepcopy(model).double(), image.double(), fold=False)
    return lambda x: adapter(x.double())


@pytest.mark.numerics
@pytest.mark.parametrize("case", CASES)
def test_onnxruntime_detections_equal_pytorch(case, tmp_path, monkeypatch):
    model, image = model_and_image(case)
    adapter = tracing_adapter(model, image)
    path = export(adapter, image, "onnx", str(tmp_path))
    ops = onnx_op_types(onnx.load(path))
    assert set(ops) == {""}, ops  # the standard ONNX domain only: no custom op
    assert "InstanceNormalization" in ops[""] and "Conv" in ops[""]  # GroupNorm's ONNX pattern
    exported, unfolded = load_exported(path), tracing_adapter(model, image, fold=False)
    reference = float64_adapter(model, image, monkeypatch)
    other_size = synthetic_batch(90, 140, seed=1)[0]["image"]  # not the traced size, nor a multiple of 32
    with torch.no_grad():
        for x in (image, other_size):
            folded, expected = adapter(x), unfolded(x)
            assert_same_detections(adapter, exported(x), expected, reference(x))
            # and the folded model's detections are the trained (unfolded) model's
            assert_same_detections(adapter, folded, expected, reference(x))
    if "mask_rcnn" in case:
        instances = adapter.outputs_schema(list(folded))[0]["instances"]
        assert instances.pred_masks.shape[1:] == (1, 28, 28)


@pytest.mark.numerics
@pytest.mark.parametrize("case", ["mask_rcnn_bcn_ws", "retinanet_bcn_ws"])
def test_torchscript_detections_equal_pytorch_at_other_sizes(case, tmp_path, monkeypatch):
    model, image = model_and_image(case)
    adapter = tracing_adapter(model, image)
    exported = load_exported(export(adapter, image, "torchscript", str(tmp_path)))
    reference = float64_adapter(model, image, monkeypatch)
    with torch.no_grad():
        for x in (image, synthetic_batch(90, 140, seed=1)[0]["image"]):
            assert_same_detections(adapter, exported(x), adapter(x), reference(x))


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, EXPORT_MODEL, *args], capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.mark.parametrize("fmt, runtime", [("onnx", "onnxruntime"), ("torchscript", "TorchScript")])
def test_tool_exports_and_checks_a_sample_image(tmp_path, fmt, runtime):
    sample = tmp_path / "sample.png"
    Image.fromarray(synthetic_batch(96, 128)[0]["image"].permute(1, 2, 0).byte().numpy()).save(sample)
    out = tmp_path / "export"
    run = run_tool(
        "--config-file", DEMO_CONFIG, "--format", fmt, "--output", str(out), "--sample-image", str(sample),
        "--time", "2", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert not [w for w in HIDDEN_WARNINGS if w in run.stderr], run.stderr[-3000:]
    assert (out / {"onnx": "model.onnx", "torchscript": "model.ts"}[fmt]).is_file()
    rows = [line.split() for line in run.stdout.splitlines() if line.startswith("sample 0:")]
    assert [r[2] for r in rows] == [runtime, "folded"]
    for row in rows:  # detections a / b, max |box|, max |score|, classes, max |mask|
        assert row[-7] == row[-5] and int(row[-2]) == 0
        assert float(row[-4]) < TOLERANCE["boxes"] * 128 and float(row[-3]) < TOLERANCE["scores"]
        assert float(row[-1]) < TOLERANCE["masks"]
    assert "custom ops: none" in run.stdout or fmt == "torchscript"
    assert f"{runtime} " in run.stdout and "ratio" in run.stdout


def test_tool_refuses_what_it_cannot_export(tmp_path):
    # a meta-architecture without an export path
    run = run_tool(
        "--config-file", f"{REPO}/configs/COCO-PanopticSegmentation/panoptic_fpn_R_50_2x_bcn_ws.yaml",
        "--output", str(tmp_path), "--sample-image", str(tmp_path / "none.png"), *map(str, SMALL),
    )  # fmt: skip
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "none.png" in lines[-1]  # the missing sample is found first
    sample = tmp_path / "sample.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(sample)
    run = run_tool(
        "--config-file", f"{REPO}/configs/COCO-PanopticSegmentation/panoptic_fpn_R_50_2x_bcn_ws.yaml",
        "--output", str(tmp_path), "--sample-image", str(sample), *map(str, SMALL),
    )  # fmt: skip
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "error: PanopticFPN cannot be exported: the export supports GeneralizedRCNN and RetinaNet models "
        "(and their subclasses: Cascade R-CNN, WSRetinaNet)"
    )
    # weights that are not there
    run = run_tool("--config-file", DEMO_CONFIG, "--output", str(tmp_path), "--sample-image", str(sample),
                   "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"))  # fmt: skip
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].endswith("model_final.pth: no such file")
    assert not (tmp_path / "model.onnx").exists()


def test_bcn_without_statistics_does_not_fold():
    model, image = model_and_image("mask_rcnn_bcn_ws")
    bcn = model.roi_heads.box_head.conv1.norm
    bcn.batch_norm = torch.nn.BatchNorm2d(bcn.num_channels, track_running_stats=False)  # batch statistics only
    with pytest.raises(ExportError, match=r"1 WS / BCN layers did not fold .*roi_heads.box_head.conv1.norm"):
        tracing_adapter(model, image)
