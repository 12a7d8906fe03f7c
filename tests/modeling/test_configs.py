"""Every config builds; WS sits exactly on the convs that carry a norm (official placement)."""
import glob
import os
import re

import pytest
from detectron2.layers import Conv2d
from detectron2.modeling import build_model

from helpers import CONFIG_DIR, load_config
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d

CONFIGS = sorted(  # the R-CNN FPN family; the other meta-architectures: test_meta_archs.py
    os.path.relpath(p, CONFIG_DIR)
    for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
    if re.match(r"(mask|faster)_rcnn_R_\d+_FPN", os.path.basename(p))
)
BLOCKS = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}


def expected_ws_names(depth: int, mask_on: bool) -> set:
    """The official code's WS convs, in detectron2 module names."""
    convs_per_block = 2 if depth < 50 else 3
    names = {"backbone.bottom_up.stem.conv1"}
    for stage, n_blocks in enumerate(BLOCKS[depth], start=2):
        for b in range(n_blocks):
            names |= {f"backbone.bottom_up.res{stage}.{b}.conv{k}" for k in range(1, convs_per_block + 1)}
        if not (depth < 50 and stage == 2):  # R-18/34 res2 keeps 64 channels: no shortcut
            names.add(f"backbone.bottom_up.res{stage}.0.shortcut")
    names |= {f"backbone.fpn_{kind}{level}" for kind in ("lateral", "output") for level in range(2, 6)}
    names |= {f"roi_heads.box_head.conv{k}" for k in range(1, 5)}
    if mask_on:
        names |= {f"roi_heads.mask_head.mask_fcn{k}" for k in range(1, 5)}
    return names


def test_all_paper_configs_exist():
    for task, sched in (("COCO-InstanceSegmentation/mask", "2x"), ("COCO-Detection/faster", "1x")):
        for depth in (50, 101):
            for variant in ("gn", "gn_ws", "bcn_ws"):
                assert f"{task}_rcnn_R_{depth}_FPN_{sched}_{variant}.yaml" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_config_builds_with_official_ws_placement(config):
    cfg = load_config(config)
    model = build_model(cfg)
    ws = {name for name, m in model.named_modules() if isinstance(m, WSConv2d)}
    normed = {name for name, m in model.named_modules() if isinstance(m, Conv2d) and m.norm is not None}
    bcn = [m for m in model.modules() if isinstance(m, BatchChannelNorm2d)]
    depth = cfg.MODEL.RESNETS.DEPTH
    expected = expected_ws_names(depth, cfg.MODEL.MASK_ON)
    assert normed == expected  # a norm in every conv tower, nowhere else

    if config.endswith("_gn.yaml"):
        assert not ws and not bcn
        return
    assert ws == expected
    if cfg.MODEL.MASK_ON and depth in (50, 101):
        assert len(ws) == {50: 69, 101: 120}[depth]
    assert not isinstance(model.proposal_generator.rpn_head.conv, WSConv2d)
    if re.search(r"bcn_ws", config):
        assert len(bcn) == len(expected)
        assert all(isinstance(model.get_submodule(n).norm, BatchChannelNorm2d) for n in ws)
