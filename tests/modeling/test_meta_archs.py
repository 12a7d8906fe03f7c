"""Every detectron2 meta-architecture with a ResNet backbone gets the plugin's norms and WS from YAML.

For each one (small R-18 variants of the configs, 64x80 images): the WS convs are
exactly the convs that carry a norm, and their number is what the architecture
implies (counted from the config, independently of the plugin's rule); BCN is
where the config asks for it; one training step gives finite losses and finite,
nonzero gradients in every WS conv; inference returns the meta-architecture's outputs.
"""
import math

import pytest
import torch
from detectron2 import model_zoo
from detectron2.layers import Conv2d, CycleBatchNormList
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage
from torch import nn

from helpers import SMALL, load_config, synthetic_batch
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d

C4 = [  # detectron2's own C4 config with the plugin's names: res5 (in the RoI heads) too
    "MODEL.BACKBONE.NAME", "build_ws_resnet_backbone", "MODEL.ROI_HEADS.NAME", "WSRes5ROIHeads",
    "MODEL.RESNETS.NORM", "BCN", "MODEL.RESNETS.WIDTH_PER_GROUP", 16, "MODEL.RESNETS.STRIDE_IN_1X1", False,
]
SEMANTIC = [  # detectron2's semantic FPN config with the plugin's names
    "MODEL.BACKBONE.NAME", "build_ws_resnet_fpn_backbone", "MODEL.SEM_SEG_HEAD.NAME", "WSSemSegFPNHead",
    "MODEL.RESNETS.NORM", "BCN", "MODEL.FPN.NORM", "BCN", "MODEL.SEM_SEG_HEAD.NORM", "BCN",
]
CASES = {
    "retinanet_gn_ws": ("COCO-Detection/retinanet_R_50_FPN_1x_gn_ws.yaml", []),
    "retinanet_bcn_ws": ("COCO-Detection/retinanet_R_50_FPN_1x_bcn_ws.yaml", []),
    "mask_rcnn_bcn_ws": ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_bcn_ws.yaml", []),
    "cascade_mask_rcnn_bcn_ws": ("Misc/cascade_mask_rcnn_R_50_FPN_2x_bcn_ws.yaml", []),
    "panoptic_fpn_bcn_ws": ("COCO-PanopticSegmentation/panoptic_fpn_R_50_2x_bcn_ws.yaml", []),
    "faster_rcnn_c4_bcn_ws": (model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"), C4),
    "semantic_fpn_bcn_ws": (model_zoo.get_config_file("Misc/semantic_R_50_FPN_1x.yaml"), SEMANTIC),
}
OUTPUTS = {
    "RetinaNet": {"instances"}, "WSRetinaNet": {"instances"}, "GeneralizedRCNN": {"instances"},
    "SemanticSegmentor": {"sem_seg"}, "PanopticFPN": {"instances", "sem_seg", "panoptic_seg"},
}


def expected_normed_convs(cfg) -> int:
    """Convs with a norm implied by the config: ResNet + FPN + the heads' conv towers."""
    m = cfg.MODEL
    n = 0
    if m.RESNETS.NORM:
        blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}[m.RESNETS.DEPTH]
        per_block = 2 if m.RESNETS.DEPTH < 50 else 3
        c4 = "Res5ROIHeads" in m.ROI_HEADS.NAME and m.META_ARCHITECTURE == "GeneralizedRCNN"
        stages = blocks[:3] if c4 else blocks
        n += 1 + per_block * sum(stages) + len(stages) - (m.RESNETS.DEPTH < 50)  # stem, blocks, shortcuts
        n += 3 * 3 + 1 if c4 else 0  # the bottleneck res5 built by the RoI heads
    if "fpn" in m.BACKBONE.NAME and m.FPN.NORM:
        n += 2 * len(m.FPN.IN_FEATURES)
    if m.META_ARCHITECTURE in ("GeneralizedRCNN", "PanopticFPN") and "Res5" not in m.ROI_HEADS.NAME:
        n += m.ROI_BOX_HEAD.NUM_CONV * (3 if m.ROI_HEADS.NAME == "CascadeROIHeads" else 1) * bool(m.ROI_BOX_HEAD.NORM)
        n += m.ROI_MASK_HEAD.NUM_CONV * (m.MASK_ON and bool(m.ROI_MASK_HEAD.NORM))
    if m.META_ARCHITECTURE in ("SemanticSegmentor", "PanopticFPN") and m.SEM_SEG_HEAD.NORM:
        strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
        n += sum(max(1, int(math.log2(strides[f] / m.SEM_SEG_HEAD.COMMON_STRIDE))) for f in m.SEM_SEG_HEAD.IN_FEATURES)
    if "RetinaNet" in m.META_ARCHITECTURE and m.RETINANET.NORM:
        n += 2 * m.RETINANET.NUM_CONVS
    return n


def norm_after(model: nn.Module, name: str) -> nn.Module:
    """The norm a conv carries: ``conv.norm``, or the next module of its nn.Sequential."""
    conv = model.get_submodule(name)
    if isinstance(conv, Conv2d) and conv.norm is not None:
        return conv.norm
    parent_name, _, index = name.rpartition(".")
    return model.get_submodule(parent_name)[int(index) + 1]


def inputs(meta_arch: str, seed: int = 0) -> list:
    batch = synthetic_batch(64, 80, seed=seed)
    if meta_arch in ("SemanticSegmentor", "PanopticFPN"):
        sem_seg = torch.zeros(64, 80, dtype=torch.long)
        sem_seg[:, 40:] = 2
        batch[0]["sem_seg"] = sem_seg
    return batch


@pytest.fixture(scope="module", params=sorted(CASES))
def built(request):
    config, opts = CASES[request.param]
    cfg = load_config(config, *SMALL, *opts, "INPUT.FORMAT", "RGB")
    torch.manual_seed(0)
    return request.param, cfg, build_model(cfg)


def test_ws_exactly_on_normed_convs(built):
    name, cfg, model = built
    ws = {n for n, m in model.named_modules() if isinstance(m, WSConv2d)}
    others = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n not in ws}
    assert len(ws) == expected_normed_convs(cfg) > 0
    for n in others:  # every other conv carries no norm: predictors, RPN, P6/P7, mask deconv
        conv = model.get_submodule(n)
        assert not (isinstance(conv, Conv2d) and conv.norm is not None), n
    bcn_asked = "bcn" in name
    for n in ws:
        norm = norm_after(model, n)
        if isinstance(norm, CycleBatchNormList):  # RetinaNet's head: one norm per level, as detectron2's BN
            assert len(norm) == len(cfg.MODEL.RETINANET.IN_FEATURES)
            norm = norm[0]
        assert isinstance(norm, BatchChannelNorm2d) == bcn_asked, (n, type(norm))
        if not bcn_asked:
            assert isinstance(norm, nn.GroupNorm) and norm.num_groups == cfg.MODEL.GN.NUM_GROUPS
    # with BCN, each ReLU after a conv in a ResNet block is that conv's activation (BCN fuses it), C4's res5
    # included; other norms keep detectron2's blocks
    blocks = [m for m in model.modules() if isinstance(m, (BasicStem, BasicBlock, BottleneckBlock))]
    assert blocks and all((type(m) in (BasicStem, BasicBlock, BottleneckBlock)) != bcn_asked for m in blocks)


def test_training_step_and_inference(built):
    name, cfg, model = built
    model.train()
    with EventStorage(0):
        losses = model(inputs(cfg.MODEL.META_ARCHITECTURE))
        sum(losses.values()).backward()
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    ws = {n: m for n, m in model.named_modules() if isinstance(m, WSConv2d)}
    for n, conv in ws.items():
        assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all(), n
    # every component's WS convs learn: backbone, FPN and each head with a norm
    moved = {n.split(".")[0] + "." + n.split(".")[1] for n, c in ws.items() if c.weight.grad.abs().sum() > 0}
    expected = {n.split(".")[0] + "." + n.split(".")[1] for n in ws}
    assert moved == expected

    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": inputs(cfg.MODEL.META_ARCHITECTURE)[0]["image"], "height": 32, "width": 40}])
    assert set(out) == OUTPUTS[cfg.MODEL.META_ARCHITECTURE]
    if "instances" in out:
        assert isinstance(out["instances"], Instances) and out["instances"].image_size == (32, 40)
        assert len(out["instances"]) > 0  # score threshold 0: an untrained model still predicts
    if "sem_seg" in out:
        assert out["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 32, 40)
        assert torch.isfinite(out["sem_seg"]).all()
    if "panoptic_seg" in out:
        assert out["panoptic_seg"][0].shape == (32, 40)


@pytest.mark.parametrize(
    "config, n_ws, n_bcn",
    [  # stem 1 + 16 blocks x 3 + 4 shortcuts = 53 backbone convs
        ("COCO-Detection/retinanet_R_50_FPN_1x_gn_ws.yaml", 53 + 6 + 8, 0),
        ("COCO-Detection/retinanet_R_50_FPN_1x_bcn_ws.yaml", 53 + 6 + 8, 53 + 6 + 8 * 5),  # head: BCN per level
        ("Misc/cascade_mask_rcnn_R_50_FPN_2x_bcn_ws.yaml", 53 + 8 + 3 * 4 + 4, 53 + 8 + 3 * 4 + 4),
        ("COCO-PanopticSegmentation/panoptic_fpn_R_50_2x_bcn_ws.yaml", 53 + 8 + 4 + 4 + 7, 53 + 8 + 4 + 4 + 7),
    ],
)
def test_real_configs(config, n_ws, n_bcn):
    cfg = load_config(config)
    model = build_model(cfg)
    assert sum(isinstance(m, WSConv2d) for m in model.modules()) == n_ws == expected_normed_convs(cfg)
    assert sum(isinstance(m, BatchChannelNorm2d) for m in model.modules()) == n_bcn
    assert not any(p.requires_grad for p in model.backbone.bottom_up.res2.parameters())  # FREEZE_AT 2
