"""WS-ResNet backbones at every depth and ResNeXt, and config validation at build time."""
import pytest
import torch
from detectron2.modeling import build_backbone, build_model

from helpers import load_config
from wsbcn_d2.layers import WSConv2d

BASE = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_bcn_ws.yaml"


@pytest.mark.parametrize(
    "depth, extra, n_ws",
    [
        (18, ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64], 1 + 8 * 2 + 3),
        (34, ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64], 1 + 16 * 2 + 3),
        (50, ["MODEL.RESNETS.NUM_GROUPS", 32, "MODEL.RESNETS.WIDTH_PER_GROUP", 4], 1 + 16 * 3 + 4),
        (152, [], 1 + 50 * 3 + 4),
    ],
)
def test_ws_resnet_depths(depth, extra, n_ws):
    cfg = load_config(
        BASE, "MODEL.BACKBONE.NAME", "build_ws_resnet_backbone", "MODEL.RESNETS.DEPTH", depth, *extra
    )
    backbone = build_backbone(cfg)
    ws = [m for m in backbone.modules() if isinstance(m, WSConv2d)]
    assert len(ws) == n_ws
    if "MODEL.RESNETS.NUM_GROUPS" in extra:
        assert backbone.res2[0].conv2.groups == 32
    out = backbone(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape[-2:] == (2, 2) and torch.isfinite(out["res5"]).all()


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.WS.EPS", 0.0], "MODEL.WS.EPS"),
        (["MODEL.BCN.UPDATE_RATE", 1.5], "update rate"),
        (["MODEL.BCN.EPS", -1.0], "eps"),
        (["MODEL.BCN.NUM_GROUPS", 0], "group"),
        (["MODEL.GN.NUM_GROUPS", 0], "group"),
        (["MODEL.RESNETS.NORM", "BNC"], "Unknown norm 'BNC'"),
        (["MODEL.ROI_MASK_HEAD.NORM", "GroupNorm"], "valid names"),
    ],
)
def test_invalid_values_rejected_at_build(opts, match):
    with pytest.raises(ValueError, match=match):
        build_model(load_config(BASE, *opts))


def test_gn_group_count_and_ws_switch_follow_config():
    cfg = load_config(
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_gn_ws.yaml",
        "MODEL.BACKBONE.NAME", "build_ws_resnet_backbone",
        "MODEL.GN.NUM_GROUPS", 16, "MODEL.WS.ENABLED", False,
    )
    backbone = build_backbone(cfg)
    assert backbone.stem.conv1.norm.num_groups == 16
    assert not any(isinstance(m, WSConv2d) for m in backbone.modules())
