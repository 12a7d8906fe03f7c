"""ONNX / TorchScript export of GN+WS and BCN+WS detectors: onnxruntime gives PyTorch's detections."""
import copy
import math
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
from wsbcn_d2.export import ExportError, ExportGroupNorm, export, load_exported, onnx_op_types, pair_detections
from wsbcn_d2.export import tracing_adapter

EXPORT_MODEL = f"{REPO}/tools/export_model.py"
GN = ["MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN"]
CASES = {
    "mask_rcnn_gn_ws": ("Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml", [*GN, "MODEL.ROI_BOX_HEAD.NORM", "GN", "MODEL.ROI_MASK_HEAD.NORM", "GN"]),
    "mask_rcnn_bcn_ws": ("Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml", []),
    "retinanet_gn_ws": ("COCO-Detection/retinanet_R_50_FPN_1x_gn_ws.yaml", SMALL),
    "retinanet_bcn_ws": ("COCO-Detection/retinanet_R_50_FPN_1x_bcn_ws.yaml", SMALL),
}  # fmt: skip
FASTER_RCNN = {
    "faster_rcnn_gn_ws": ("COCO-Detection/faster_rcnn_R_50_FPN_1x_gn_ws.yaml", SMALL),
    "faster_rcnn_bcn_ws": ("COCO-Detection/faster_rcnn_R_50_FPN_1x_bcn_ws.yaml", SMALL),
}
DEFAULT_THRESHOLDS = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.05, "MODEL.RETINANET.SCORE_THRESH_TEST", 0.05]  # detectron2's
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

    Near-equal scores order (and cut at the detection limit) differently in another runtime or in float64: each
    detection pairs with the other's of the same class whose box is nearest (within a hundredth of a pixel); all
    of ``got``'s pair, most of the float64 ones. On those, each float32 result misses float64 by at most
    ``assert_as_accurate``'s bound, so the exported and PyTorch results differ by at most the sum of their bounds.
    """
    got, expected, reference = (detections(adapter, o) for o in (got, expected, reference))
    assert len(got["scores"]) == len(expected["scores"]) > 0
    paired, order = pair_detections(expected, got)
    assert paired.all()
    got = {k: v[order] for k, v in got.items()}  # in expected's order
    paired, pair = pair_detections(expected, reference)
    assert paired.float().mean() > 0.8
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
    # group norms as ExportGroupNorm: no Reshape(N, G, -1) + InstanceNormalization, which fails on a batch of 0
    assert {"ReduceMean", "MatMul", "Conv"} <= ops[""] and "InstanceNormalization" not in ops[""]
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


def classify_by_content(model, nothing: torch.Tensor, objects: torch.Tensor, margin: float = 8.0) -> None:
    """Set the classifier so that, at the config's score threshold, ``nothing`` has no detection and ``objects``
    has some (an untrained model scores every image alike).

    Class 0's logit (relative to the threshold's) becomes ``margin * (d . f - m) / (high - low)`` for the
    classifier's input features ``f`` (per RoI, or per position for RetinaNet's 3x3 conv: its centre tap), ``d``
    the unit direction from the mean feature of ``nothing`` to the farthest feature of ``objects``, ``low`` and
    ``high`` the two images' largest projections and ``m`` halfway between: each image's best detection lies
    ``margin / 2`` logits either side of the threshold, unsaturated. The other classes are switched off.
    """
    rcnn = hasattr(model, "roi_heads")
    layer = model.roi_heads.box_predictor.cls_score if rcnn else model.head.cls_score
    threshold = model.roi_heads.box_predictor.test_score_thresh if rcnn else model.test_score_thresh
    features = []
    hook = layer.register_forward_pre_hook(lambda m, args: features.append(args[0].detach()))
    per_image = []
    for image in (nothing, objects):
        features.clear()
        with torch.no_grad():
            model.inference([{"image": image}], do_postprocess=False) if rcnn else model([{"image": image}])
        per_image.append(torch.cat([f.flatten(2).transpose(1, 2).flatten(0, 1) if f.dim() == 4 else f for f in features]))
    hook.remove()
    blank, crowded = per_image
    farthest = crowded[(crowded - blank.mean(0)).norm(dim=1).argmax()]
    direction = (farthest - blank.mean(0)) / (farthest - blank.mean(0)).norm()
    low, high = (blank @ direction).max().item(), (crowded @ direction).max().item()
    assert high > low, (low, high)
    scale = margin / (high - low)
    logit = math.log(threshold / (1 - threshold))  # score = threshold where class 0's logit = this (+ background's)
    with torch.no_grad():
        layer.weight.zero_(), layer.bias.fill_(-30.0)  # every class off
        num_classes = model.roi_heads.num_classes if rcnn else model.num_classes
        rows = [0] if rcnn else list(range(0, layer.weight.shape[0], num_classes))  # class 0 (of each anchor)
        for anchor, row in enumerate(rows):
            factor = scale * (1 + anchor / len(rows))  # RetinaNet: no ties between a position's anchors
            if rcnn:
                layer.weight[row] = factor * direction
            else:
                layer.weight[row, :, 1, 1] = factor * direction
            layer.bias[row] = -factor * (low + high) / 2 + (0 if rcnn else logit)
        if rcnn:  # the background's logit: 0 - logit, so that class 0 scores the threshold at the midpoint
            layer.bias[-1] = -logit


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize("case", [*CASES, "faster_rcnn_gn_ws", "faster_rcnn_bcn_ws"])
def test_export_at_the_default_threshold_takes_empty_and_crowded_images(case, fmt, tmp_path, monkeypatch):
    # traced on an image with detections, run on one without (the mask head's batch of 0 RoIs) and back
    config, opts = {**CASES, **FASTER_RCNN}[case]
    torch.manual_seed(0)
    model = randomize_norms_(build_model(load_config(config, *opts, *DEFAULT_THRESHOLDS)).eval())
    nothing, objects = torch.zeros(3, 96, 128), synthetic_batch(96, 128)[0]["image"]
    classify_by_content(model, nothing, objects)
    adapter = tracing_adapter(model, objects)
    exported = load_exported(export(adapter, objects, fmt, str(tmp_path)))
    unfolded, reference = tracing_adapter(model, objects, fold=False), float64_adapter(model, objects, monkeypatch)
    with torch.no_grad():
        assert not detections(adapter, exported(nothing))["scores"].numel()
        assert not detections(adapter, unfolded(nothing))["scores"].numel()
        assert_same_detections(adapter, exported(objects), unfolded(objects), reference(objects))
        if "mask_rcnn" in case:
            assert detections(adapter, exported(nothing))["pred_masks"].shape == (0, 1, 28, 28)


def test_export_group_norm_is_group_norm():
    torch.manual_seed(0)
    norm = torch.nn.GroupNorm(4, 12).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 12, 5, 7, dtype=torch.float64) * 2 + 1
    expected64 = norm(x)
    baseline = copy.deepcopy(norm).float()(x.float())
    norm.float().__class__ = ExportGroupNorm
    assert_as_accurate(norm(x.float()), baseline, expected64)
    assert norm(torch.zeros(0, 12, 5, 7)).shape == (0, 12, 5, 7)


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
    for row in rows:  # detections a / b, max |box|, max |score|, unpaired, max |mask|
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
