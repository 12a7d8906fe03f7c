"""No silent half-conversion: a model with WS enabled whose normed convs are not all WS, or that has
none, is reported (issue 11 item 10, issue 12); the plugin's norms in a slot detectron2 reads are an error."""
import logging

import pytest
from detectron2 import model_zoo
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, ROI_HEADS_REGISTRY, build_model
from detectron2.modeling.meta_arch.semantic_seg import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.roi_heads import ROI_BOX_HEAD_REGISTRY, ROI_MASK_HEAD_REGISTRY

from helpers import load_config
from wsbcn_d2.modeling import NORM_SLOTS, validate_wsbcn_config
from wsbcn_d2.layers import WSConv2d
from wsbcn_d2.modeling import check_ws_coverage

RETINANET = "COCO-Detection/retinanet_R_50_FPN_1x_gn_ws.yaml"
DEMO = "Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml"
REGISTRIES = {
    "MODEL.BACKBONE.NAME": BACKBONE_REGISTRY, "MODEL.ROI_HEADS.NAME": ROI_HEADS_REGISTRY,
    "MODEL.ROI_BOX_HEAD.NAME": ROI_BOX_HEAD_REGISTRY, "MODEL.ROI_MASK_HEAD.NAME": ROI_MASK_HEAD_REGISTRY,
    "MODEL.SEM_SEG_HEAD.NAME": SEM_SEG_HEADS_REGISTRY, "MODEL.META_ARCHITECTURE": META_ARCH_REGISTRY,
}


@pytest.fixture
def warnings_of_plugin(caplog):
    """Warnings logged under "wsbcn_d2" (whose logger may not propagate to the root)."""
    logger = logging.getLogger("wsbcn_d2")
    propagate, logger.propagate = logger.propagate, True
    yield lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("wsbcn_d2")]
    logger.propagate = propagate


def test_norm_slot_table_names_registered_components():
    for slot in NORM_SLOTS:
        for d2_name, plugin_name in slot.plugin_readers.items():
            assert d2_name in REGISTRIES[slot.reader_key] and plugin_name in REGISTRIES[slot.reader_key], slot


def test_half_converted_model_is_reported(warnings_of_plugin):
    # the plugin's WS backbone under detectron2's own RetinaNet: the head's 8 normed convs stay plain
    cfg = load_config(RETINANET, "MODEL.META_ARCHITECTURE", "RetinaNet")
    model = build_model(cfg)
    plain = [f"head.{tower}.{3 * k}" for tower in ("cls_subnet", "bbox_subnet") for k in range(4)]
    assert not any(isinstance(model.get_submodule(n), WSConv2d) for n in plain)
    assert isinstance(model.backbone.fpn_lateral3, WSConv2d)
    check_ws_coverage(model, cfg)
    (message,) = warnings_of_plugin()
    assert "8 convs carry a norm without WS" in message and "head.cls_subnet.0" in message
    assert "MODEL.RETINANET.NORM" in message and "'WSRetinaNet'" in message


def test_fully_converted_model_is_not_reported(warnings_of_plugin):
    cfg = load_config(RETINANET)
    check_ws_coverage(build_model(cfg), cfg)
    assert warnings_of_plugin() == []


def test_ws_without_any_norm_is_reported(warnings_of_plugin):  # issue 11 item 10
    empty = ["MODEL.RESNETS.NORM", "", "MODEL.FPN.NORM", "", "MODEL.ROI_BOX_HEAD.NORM", "", "MODEL.ROI_MASK_HEAD.NORM", ""]
    cfg = load_config(DEMO, *empty)
    model = build_model(cfg)
    assert not any(isinstance(m, WSConv2d) for m in model.modules())
    check_ws_coverage(model, cfg)
    (message,) = warnings_of_plugin()
    assert "MODEL.WS.ENABLED" in message and "MODEL.ROI_MASK_HEAD.NORM" in message
    cfg.MODEL.WS.ENABLED = False
    check_ws_coverage(model, cfg)
    assert len(warnings_of_plugin()) == 1


@pytest.mark.parametrize(
    "config, opts, key, fix",
    [
        (RETINANET, ["MODEL.META_ARCHITECTURE", "RetinaNet", "MODEL.RETINANET.NORM", "BCN"],
         "MODEL.RETINANET.NORM", "MODEL.META_ARCHITECTURE 'WSRetinaNet'"),
        (model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"),
         ["MODEL.BACKBONE.NAME", "build_ws_resnet_backbone", "MODEL.RESNETS.NORM", "BCN"],
         "MODEL.RESNETS.NORM", "MODEL.ROI_HEADS.NAME 'WSRes5ROIHeads'"),
        (model_zoo.get_config_file("COCO-PanopticSegmentation/panoptic_fpn_R_50_1x.yaml"),
         ["MODEL.BACKBONE.NAME", "build_ws_resnet_fpn_backbone", "MODEL.SEM_SEG_HEAD.NORM", "SyncBCN"],
         "MODEL.SEM_SEG_HEAD.NORM", "MODEL.SEM_SEG_HEAD.NAME 'WSSemSegFPNHead'"),
    ],
)
def test_plugin_norm_in_a_detectron2_slot_is_an_error(config, opts, key, fix):
    cfg = load_config(config, *opts)
    for check in (validate_wsbcn_config, build_model):  # before any work, and at build (not a KeyError)
        with pytest.raises(ValueError) as e:
            check(cfg)
        assert key in str(e.value) and fix in str(e.value) and "\n" not in str(e.value)


def test_unused_slots_are_not_checked():
    # RetinaNet has no RoI heads: their norm slots may hold anything
    validate_wsbcn_config(load_config(RETINANET, "MODEL.ROI_MASK_HEAD.NORM", "nonsense", "MODEL.RESNETS.DEPTH", 18,
                                      "MODEL.RESNETS.RES2_OUT_CHANNELS", 64))
