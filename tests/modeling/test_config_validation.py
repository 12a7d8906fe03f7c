"""Bad plugin values stop tools/train_net.py with one line naming the key, before anything is written
(issue 11 items 4 and 6); validate_wsbcn_config names the key for every bad value."""
import types

import pytest

from helpers import CONFIG_DIR, assert_train_net_fails_cleanly, load_config
from wsbcn_d2.modeling import validate_wsbcn_config
from wsbcn_d2.engine import Trainer

DEMO = f"{CONFIG_DIR}/Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml"
GN_WS = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_gn_ws.yaml"


def test_train_net_rejects_non_finite_eps_in_yaml(tmp_path):  # item 4 (.inf and MODEL.BCN.EPS: below)
    config = tmp_path / "bad.yaml"
    config.write_text(f'_BASE_: "{DEMO}"\nMODEL:\n  WS:\n    EPS: .nan\n')
    last = assert_train_net_fails_cleanly(tmp_path, ["--config-file", str(config)], ["MODEL.WS.EPS", "nan"])
    assert "finite" in last


def test_train_net_names_key_and_value_of_unknown_norm(tmp_path):  # item 6
    assert_train_net_fails_cleanly(
        tmp_path, ["--config-file", DEMO, "MODEL.ROI_MASK_HEAD.NORM", "GroupNorm"],
        ["MODEL.ROI_MASK_HEAD.NORM", "'GroupNorm'", "valid names"],
    )


def test_train_net_names_key_and_channels_of_bad_group_count(tmp_path):  # item 6
    assert_train_net_fails_cleanly(
        tmp_path, ["--config-file", DEMO, "MODEL.BCN.NUM_GROUPS", "48"],
        ["MODEL.RESNETS.NORM", "MODEL.BCN.NUM_GROUPS 48", "64 channels"],  # R-18's stem: 64 channels
    )


@pytest.mark.parametrize(
    "opts, expected",
    [
        (["MODEL.WS.EPS", float("inf")], ["MODEL.WS.EPS", "inf"]),
        (["MODEL.WS.EPS", 0.0], ["MODEL.WS.EPS", "> 0"]),
        (["MODEL.BCN.EPS", float("nan")], ["MODEL.BCN.EPS", "nan"]),
        (["MODEL.BCN.EPS", float("inf")], ["MODEL.BCN.EPS", "inf"]),
        (["MODEL.BCN.UPDATE_RATE", 1.5], ["MODEL.BCN.UPDATE_RATE", "[0, 1]", "1.5"]),
        (["MODEL.BCN.UPDATE_RATE", float("nan")], ["MODEL.BCN.UPDATE_RATE", "nan"]),
        (["MODEL.GN.NUM_GROUPS", 0], ["MODEL.GN.NUM_GROUPS", ">= 1", "0"]),
        (["MODEL.GN.NUM_GROUPS", 24], ["MODEL.RESNETS.NORM 'GN'", "MODEL.GN.NUM_GROUPS 24", "64 channels"]),
        (["MODEL.FPN.NORM", "BNC"], ["MODEL.FPN.NORM", "'BNC'"]),
        (["MODEL.ROI_BOX_HEAD.CONV_DIM", 48], ["MODEL.ROI_BOX_HEAD.NORM 'GN'", "48 channels"]),
    ],
)
def test_every_bad_value_is_named(opts, expected):
    with pytest.raises(ValueError) as e:
        validate_wsbcn_config(load_config(GN_WS, *opts))
    message = str(e.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, message


def test_precise_bn_is_refused_with_micro_batch_bcn():
    # fvcore's precise BN averages running stats under momentum 1; BCN's estimates update by their own rate
    validate_wsbcn_config(load_config(GN_WS, "TEST.PRECISE_BN.ENABLED", True))  # no batch norm: nothing to refuse
    bcn_ws = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_bcn_ws.yaml"
    validate_wsbcn_config(load_config(bcn_ws))
    bad = load_config(bcn_ws, "TEST.PRECISE_BN.ENABLED", True)
    with pytest.raises(ValueError, match=r"TEST.PRECISE_BN.ENABLED False.*") as e:
        validate_wsbcn_config(bad)
    assert "MODEL.RESNETS.NORM 'BCN'" in str(e.value)
    # a Trainer built without validate_wsbcn_config refuses it before detectron2 adds the PreciseBN hook
    with pytest.raises(ValueError, match=r"TEST.PRECISE_BN.ENABLED False"):
        Trainer.build_hooks(types.SimpleNamespace(cfg=bad))
