"""The real R-50-FPN BCN+WS Mask R-CNN config: a training step, freezing, eval, weight decay."""
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import Instances
from detectron2.utils.events import EventStorage

from helpers import load_config, synthetic_batch
from wsbcn_d2.layers import BatchChannelNorm2d

CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_bcn_ws.yaml"


def snapshot(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def stepped():
    """The model (FREEZE_AT 2 as in the config) before and after one SGD step."""
    torch.manual_seed(0)
    cfg = load_config(CONFIG, "SOLVER.BASE_LR", 0.01)
    model = build_model(cfg).train()
    before = snapshot(model)
    optimizer = build_optimizer(cfg, model)
    with EventStorage(0):
        losses = model(synthetic_batch())
        sum(losses.values()).backward()
    grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    return cfg, model, before, losses, grads_finite


def test_losses_and_gradients_are_finite(stepped):
    _, _, _, losses, grads_finite = stepped
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values()) and grads_finite


def test_frozen_stages_keep_parameters_and_estimates(stepped):
    cfg, model, before, _, _ = stepped
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 2
    after = snapshot(model)
    frozen = [k for k in after if k.startswith(("backbone.bottom_up.stem.", "backbone.bottom_up.res2."))]
    trained = [k for k in after if k.startswith("backbone.bottom_up.res3.")]
    assert any("batch_norm.running_mean" in k for k in frozen)
    for k in frozen:
        assert torch.equal(before[k], after[k]), k
    # the same step moved the unfrozen stage's weights and BCN estimates
    for suffix in ("conv1.weight", "conv1.norm.weight", "conv1.norm.batch_norm.running_mean"):
        key = f"backbone.bottom_up.res3.0.{suffix}"
        assert not torch.equal(before[key], after[key]), key
    stem_norm = model.backbone.bottom_up.stem.conv1.norm
    assert isinstance(stem_norm, BatchChannelNorm2d) and not stem_norm.weight.requires_grad


def test_eval_produces_instances(stepped):
    _, model, _, _, _ = stepped
    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": synthetic_batch()[0]["image"], "height": 64, "width": 80}])
    instances = result["instances"]
    assert isinstance(instances, Instances) and instances.image_size == (64, 80)
    assert {"pred_boxes", "scores", "pred_classes", "pred_masks"} <= set(instances.get_fields())


def test_bcn_affine_gets_weight_decay_norm_like_group_norm():
    opts = ["SOLVER.WEIGHT_DECAY", 0.5, "SOLVER.WEIGHT_DECAY_NORM", 0.25, "SOLVER.WEIGHT_DECAY_BIAS", 0.125]

    def decay_of(config: str) -> dict:
        cfg = load_config(config, *opts)
        model = build_model(cfg)
        by_param = {id(p): g["weight_decay"] for g in build_optimizer(cfg, model).param_groups for p in g["params"]}
        return {name: by_param[id(p)] for name, p in model.named_parameters() if p.requires_grad}

    bcn = decay_of(CONFIG)
    gn = decay_of("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_gn_ws.yaml")
    name = "backbone.fpn_lateral2.norm"
    assert gn[f"{name}.weight"] == 0.25 and gn[f"{name}.bias"] == 0.125
    assert bcn[f"{name}.weight"] == gn[f"{name}.weight"] and bcn[f"{name}.bias"] == gn[f"{name}.bias"]
    assert bcn[f"{name}.batch_norm.weight"] == 0.25 and bcn[f"{name}.batch_norm.bias"] == 0.125
    assert bcn["backbone.fpn_lateral2.weight"] == 0.5
