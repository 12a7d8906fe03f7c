"""Shared test helpers: configs from the repository and a tiny synthetic training input."""
import os

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import BitMasks, Boxes, Instances

from wsbcn_d2 import add_wsbcn_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")


def load_config(relpath: str, *opts) -> CfgNode:
    """A repository config on CPU, without pretrained weights, with ``opts`` merged."""
    cfg = get_cfg()
    add_wsbcn_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, relpath))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    return cfg


def synthetic_batch(height: int = 128, width: int = 160, seed: int = 0) -> list:
    """One image with two box+mask instances, as a detectron2 model input."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=g) * 255
    boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 40.0, 150.0, 120.0]])
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = True
        image[:, y0:y1, x0:x1] = image[:, y0:y1, x0:x1] * 0.2 + 150
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.tensor([0, 1])
    instances.gt_masks = BitMasks(masks)
    return [{"image": image, "instances": instances, "height": height, "width": width}]
