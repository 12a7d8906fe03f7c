"""A short training run of the demo config on the demo dataset lowers the total loss and trains the backbone."""
import itertools

import torch
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import load_config


def test_short_demo_training_lowers_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("WSBCN_DATASETS", str(tmp_path))
    torch.manual_seed(0)
    cfg = load_config("Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml", "INPUT.MASK_FORMAT", "bitmask", "SEED", 0)
    model = build_model(cfg).train()
    # plain SGD without weight decay: a parameter moves only if gradients reach it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    backbone = {name: p.detach().clone() for name, p in model.backbone.named_parameters() if p.requires_grad}
    assert "bottom_up.stem.conv1.weight" in backbone  # the demo trains its whole backbone from scratch
    losses = []
    with EventStorage(0):
        for batch in itertools.islice(build_detection_train_loader(cfg), 40):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    unmoved = [name for name, p in model.backbone.named_parameters() if torch.equal(p, backbone.get(name, p))]
    assert not unmoved, f"no gradient reached {len(unmoved)} of {len(backbone)} backbone parameters: {unmoved[:5]}"
