"""The LazyConfig Mask R-CNN BCN+WS: the model it builds, and one training step through
tools/lazyconfig_train_net.py."""
import json
import math
import os
import subprocess
import sys

from detectron2.config import LazyConfig, instantiate
from detectron2.layers import Conv2d

from helpers import CONFIG_DIR, REPO
from wsbcn_d2.cuda import dispatch
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d

CONFIG = os.path.join(CONFIG_DIR, "COCO-InstanceSegmentation", "mask_rcnn_R_50_FPN_2x_bcn_ws.py")
TINY = f"""\
# the LazyConfig at 64 px on CPU, on the embedded shapes dataset, without evaluation
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L, LazyConfig

_cfg = LazyConfig.load({CONFIG!r})
model, dataloader, optimizer, train, lr_multiplier = (
    _cfg.model, _cfg.dataloader, _cfg.optimizer, _cfg.train, _cfg.lr_multiplier
)
dataloader.train.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=64)]
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.train.dataset.names = "wsbcn_shapes_val"
del dataloader.evaluator
"""


def test_lazyconfig_builds_bcn_ws_model():
    cfg = LazyConfig.load(CONFIG)
    model = instantiate(cfg.model)
    ws = {n for n, m in model.named_modules() if isinstance(m, WSConv2d)}
    normed = {n for n, m in model.named_modules() if isinstance(m, Conv2d) and m.norm is not None}
    assert ws == normed and len(ws) == 53 + 8 + 4 + 4  # R-50, FPN, 4conv1fc box head, mask head
    assert all(isinstance(model.get_submodule(n).norm, BatchChannelNorm2d) for n in ws)
    convs = [model.get_submodule(n) for n in ws]
    assert {(c.form, c.eps) for c in convs} == {("var+eps", 1e-5)}  # the official BCN+WS backbones' WS
    assert not dispatch.ENABLED or len({id(c.ws_group) for c in convs}) == 1  # one WS group for the whole model
    assert not model.backbone.bottom_up.stem.conv1.weight.requires_grad  # freeze_at 2
    assert not isinstance(model.proposal_generator.rpn_head.conv, WSConv2d)
    # on the fast path as the YAML configs' models
    assert type(model.backbone.bottom_up.res3[0]).__name__ == "_BottleneckBlock" or not dispatch.ENABLED


def test_lazyconfig_train_net_trains_a_step(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(TINY)
    out = tmp_path / "out"
    overrides = [
        f"train.output_dir={out}", "train.device=cpu", "train.init_checkpoint=", "train.max_iter=1",
        # one image per forward, two forwards per step
        "dataloader.train.total_batch_size=2", "train.accumulation_steps=2", "dataloader.train.num_workers=0",
    ]
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "lazyconfig_train_net.py"), "--config-file", str(config), *overrides],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "WSConv2d" in run.stderr + run.stdout  # the logged model
    (metrics,) = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert metrics["iteration"] == 0 and math.isfinite(metrics["total_loss"]) and metrics["total_loss"] > 0
    assert (out / "model_final.pth").is_file()
    saved = LazyConfig.load(str(out / "config.yaml"))
    assert saved.dataloader.train.total_batch_size == 2 and saved.train.accumulation_steps == 2
    assert saved.model._target_.endswith("build_ws_model") and saved.model.meta_arch.endswith("GeneralizedRCNN")
