"""The checkpointer names the real problem: the converted backbone's architecture and norms before its WS form,
a correct ResNetV2 load without warnings, and head shapes that do not fit the config (refused when evaluating,
one warning when training starts from them)."""

import functools
import logging

import pytest
import timm
import torch
from detectron2.modeling import build_model

import helpers
from helpers import BIT_NARROW, SMALL, load_config
from test_ws_form import converted
from wsbcn_d2.checkpoint import CheckpointError, WSBCNCheckpointer, check_weights, convert_checkpoint, save_checkpoint

BIT_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_BiT_R50x1_FPN_2x_gn_ws.yaml"
R50_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_gn_ws.yaml"


@pytest.fixture(scope="module")
def bit_file(tmp_path_factory):
    """A converted BiT ResNetV2-50 at a quarter width with 8-group GN (fits BIT_NARROW): (path, result)."""
    source = timm.models.resnetv2.ResNetV2(
        [3, 4, 6, 3], width_factor=0.25, stem_type="fixed",
        conv_layer=functools.partial(timm.layers.StdConv2d, eps=1e-8),
        norm_layer=functools.partial(timm.layers.GroupNormAct, num_groups=8),
    )  # fmt: skip
    result = convert_checkpoint(source.state_dict())
    path = tmp_path_factory.mktemp("bit") / "bit.pkl"
    save_checkpoint(result, str(path))
    return path, result


def refusal(cfg) -> str:
    with pytest.raises(CheckpointError) as error:
        check_weights(cfg)
    text = str(error.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    "ws", [[], ["MODEL.WS.FORM", "biased_var+eps", "MODEL.WS.EPS", 1e-8]], ids=["R50 form", "BiT form"]
)
def test_resnetv2_file_in_a_resnet_backbone_names_the_architecture(bit_file, ws):
    """Whatever the WS form, the family is what is wrong: the message names it, and the BiT keys to set."""
    path, result = bit_file
    text = refusal(load_config(R50_CONFIG, *ws, "MODEL.WEIGHTS", str(path)))
    overrides = result.config_overrides()
    width = overrides["MODEL.RESNETV2.WIDTH_FACTOR"]
    assert text.startswith(
        f"MODEL.WEIGHTS {path} holds a ResNetV2-50x{width:g} backbone, but the model's is a ResNet-50"
    )
    assert (
        f"set MODEL.BACKBONE.NAME build_ws_resnetv2_fpn_backbone MODEL.RESNETV2.DEPTH 50 MODEL.RESNETV2.WIDTH_FACTOR "
        f"{width}, with the other values tools/convert_pretrained.py printed" in text
    )
    assert "WS form" not in text


def test_resnet_file_in_a_resnetv2_backbone_names_the_architecture(tmp_path):
    path, result = converted("bcn-R18", tmp_path)
    text = refusal(load_config(BIT_CONFIG, *BIT_NARROW, "MODEL.WEIGHTS", str(path)))
    assert f"{path} holds a ResNet-18 backbone, but the model's is a ResNetV2-50x0.25: " in text
    keys = ("MODEL.RESNETS.DEPTH", "MODEL.RESNETS.NUM_GROUPS", "MODEL.RESNETS.WIDTH_PER_GROUP",
            "MODEL.RESNETS.RES2_OUT_CHANNELS")  # fmt: skip
    fix = " ".join(f"{k} {result.config_overrides()[k]}" for k in keys)
    assert f"set MODEL.BACKBONE.NAME build_ws_resnet_fpn_backbone {fix}," in text


@pytest.mark.parametrize(
    "change, fix",
    [
        (["MODEL.RESNETV2.DEPTH", 101], "MODEL.RESNETV2.DEPTH 50"),
        (["MODEL.RESNETV2.WIDTH_FACTOR", 0.5], "MODEL.RESNETV2.WIDTH_FACTOR 0.25"),
    ],
    ids=["depth", "width"],
)
def test_another_depth_or_width_is_named_before_the_ws_form(bit_file, change, fix):
    path, _ = bit_file
    cfg = load_config(BIT_CONFIG, *BIT_NARROW, *change, "MODEL.WS.FORM", "std+eps", "MODEL.WEIGHTS", str(path))
    text = refusal(cfg)
    assert text.startswith(f"MODEL.WEIGHTS {path} holds a ResNetV2-50x0.25 backbone, but the model's is a ResNetV2-")
    assert text.endswith(f": set {fix}")


def test_another_norm_names_the_resnetv2_key(bit_file, caplog):
    """GN weights in a BCN ResNetV2: refused before loading (no per-tensor warnings), naming MODEL.RESNETV2.NORM;
    MODEL.WEIGHTS_ALLOW_PARTIAL loads what fits."""
    path, _ = bit_file
    cfg = load_config(BIT_CONFIG, *BIT_NARROW, "MODEL.RESNETV2.NORM", "BCN", "MODEL.WEIGHTS", str(path))
    with caplog.at_level(logging.WARNING):
        text = refusal(cfg)
    assert text == (
        f"MODEL.WEIGHTS {path} holds GN norms, which do not load into MODEL.RESNETV2.NORM BCN: set "
        "MODEL.RESNETV2.NORM GN (or MODEL.WEIGHTS_ALLOW_PARTIAL True to load the rest anyway)"
    )
    assert "will not be loaded" not in caplog.text
    cfg.MODEL.WEIGHTS_ALLOW_PARTIAL = True
    check_weights(cfg)


def test_correct_bit_load_warns_of_nothing_and_loads_the_final_norm(bit_file, caplog):
    """detectron2's suffix matching alone tries the file's final norm.* on every *.norm.* of the model."""
    path, result = bit_file
    cfg = load_config(BIT_CONFIG, *BIT_NARROW, "MODEL.WEIGHTS", str(path))
    model = build_model(cfg)
    with caplog.at_level(logging.WARNING):
        WSBCNCheckpointer.from_cfg(cfg, model).load(str(path))
    assert "will not be loaded" not in caplog.text and "Ambiguity" not in caplog.text
    state = model.state_dict()
    assert {"norm.weight", "norm.bias"} <= set(result.model)
    for key, value in result.model.items():  # every backbone tensor in its place, the final norm included
        torch.testing.assert_close(state[f"backbone.bottom_up.{key}"], torch.as_tensor(value), rtol=0, atol=0)


DEMO = "Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml"
RETINANET = "COCO-Detection/retinanet_R_50_FPN_1x_gn_ws.yaml"
HEAD_CASES = [  # config, the key, the value the weights were trained with, another value, the tensor named first
    (DEMO, "MODEL.ROI_HEADS.NUM_CLASSES", 3, 80, "roi_heads.box_predictor.cls_score.weight"),
    (DEMO, "MODEL.ROI_BOX_HEAD.CONV_DIM", 64, 32, "roi_heads.box_head.conv1.weight"),
    (DEMO, "MODEL.ROI_BOX_HEAD.FC_DIM", 48, 64, "roi_heads.box_head.fc1.weight"),
    (DEMO, "MODEL.ROI_MASK_HEAD.CONV_DIM", 64, 32, "roi_heads.mask_head.mask_fcn1.weight"),
    (RETINANET, "MODEL.RETINANET.NUM_CLASSES", 3, 80, "head.cls_score.weight"),
]


def trained_detector(tmp_path, config: str, key: str, value: int):
    """A small detector of ``config`` with ``key`` = ``value``, saved as the trainer saves it: (path, state)."""
    model = build_model(load_config(config, *SMALL, key, value))
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict(), "iteration": 9}, path)
    return path, model.state_dict()


@pytest.mark.parametrize("config, key, trained, other, tensor", HEAD_CASES, ids=[c[1] for c in HEAD_CASES])
def test_heads_of_another_shape_are_refused_at_evaluation_and_warned_about_in_training(
    tmp_path, caplog, config, key, trained, other, tensor
):
    path, state = trained_detector(tmp_path, config, key, trained)
    cfg = load_config(config, *SMALL, key, other, "MODEL.WEIGHTS", str(path))
    model_shape = build_model(cfg).state_dict()[tensor].shape
    found = f"{tensor} is {'x'.join(map(str, state[tensor].shape))} in the file, {'x'.join(map(str, model_shape))}"
    with pytest.raises(CheckpointError) as error:
        check_weights(cfg, evaluation=True)
    text = str(error.value)
    assert text.startswith(f"MODEL.WEIGHTS {path}: the heads do not fit the config ({found} in the model")
    assert text.endswith(f"evaluated they would be random: set {key} {trained}") and "\n" not in text

    with caplog.at_level(logging.WARNING, logger="wsbcn_d2"):
        check_weights(cfg)  # fine-tuning from them: a warning naming the key
    (warning,) = [r.getMessage() for r in caplog.records if r.name.startswith("wsbcn_d2")]
    assert warning.startswith(f"{path}: heads of another shape ({found} in the model")
    assert warning.endswith(f"start from scratch; set {key} {trained} to load them")


def test_fitting_heads_load_for_evaluation(tmp_path):
    path, state = trained_detector(tmp_path, DEMO, "MODEL.ROI_HEADS.NUM_CLASSES", 3)
    cfg = load_config(DEMO, *SMALL, "MODEL.ROI_HEADS.NUM_CLASSES", 3, "MODEL.WEIGHTS", str(path))
    model = build_model(cfg)
    WSBCNCheckpointer.from_cfg(cfg, model, evaluation=True).resume_or_load(str(path), resume=False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_train_net_eval_only_refuses_heads_of_another_shape(tmp_path):
    path, _ = trained_detector(tmp_path, DEMO, "MODEL.ROI_HEADS.NUM_CLASSES", 3)
    args = ["--config-file", helpers.DEMO_CONFIG, "--eval-only", *helpers.TINY, *map(str, SMALL),
            "MODEL.ROI_HEADS.NUM_CLASSES", "80", "MODEL.WEIGHTS", str(path)]  # fmt: skip
    last = helpers.assert_train_net_fails_cleanly(
        tmp_path, args, [f"MODEL.WEIGHTS {path}: the heads do not fit the config", "set MODEL.ROI_HEADS.NUM_CLASSES 3"]
    )
    assert "roi_heads.box_predictor.cls_score.weight is 4x64 in the file, 81x64 in the model" in last
