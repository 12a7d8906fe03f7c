"""A converted checkpoint's WS form: refused where the model standardizes otherwise, and BCN+WS
fine-tuning from converted ImageNet weights (the loaded estimates move by the paper's rule)."""
import logging
from pathlib import Path

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

import helpers
from helpers import assert_as_accurate
from sources import official_file
from test_convert import ROOT, plugin_cfg
from wsbcn_d2.checkpoint import CheckpointError, WSBCNCheckpointer, check_weights, convert_checkpoint, save_checkpoint
from wsbcn_d2.data import generate_shapes_dataset
from wsbcn_d2.layers import BatchChannelNorm2d


def converted(kind: str, directory: Path):
    """``kind`` converted and saved as ``directory / kind.pkl``: (path, conversion result)."""
    result = convert_checkpoint(torch.load(official_file(kind, directory)))
    path = directory / f"{kind}.pkl"
    save_checkpoint(result, str(path))
    return path, result


def backbone_for(overrides: dict, update_rate: float = 0.0):
    cfg = plugin_cfg(overrides)
    cfg.MODEL.BCN.UPDATE_RATE = update_rate
    cfg.MODEL.BACKBONE.NAME = "build_ws_resnet_backbone"
    return cfg, build_backbone(cfg, ShapeSpec(channels=3))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"MODEL.WS.FORM": "std+eps"}, "but the model's backbone has form 'std+eps' eps 1e-05"),
        ({"MODEL.WS.EPS": 1e-6}, "but the model's backbone has form 'var+eps' eps 1e-06"),
        ({"MODEL.WS.ENABLED": False}, "but the model's backbone has no WS"),
    ],
    ids=["form", "eps", "no WS"],
)
def test_another_form_is_refused_with_the_keys_to_set(tmp_path, change, message):
    path, result = converted("bcn-R18", tmp_path)
    cfg, backbone = backbone_for({**result.config_overrides(), **change})
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        WSBCNCheckpointer.from_cfg(cfg, backbone).load(str(path))
    text = str(error.value)
    assert f"{path} was trained with WS form 'var+eps' eps 1e-05, {message}" in text
    assert "MODEL.WS.FORM var+eps MODEL.WS.EPS 1e-05" in text and "MODEL.WEIGHTS_ALLOW_WS_MISMATCH True" in text
    assert ("MODEL.WS.ENABLED True" in text) == (change == {"MODEL.WS.ENABLED": False})
    assert "\n" not in text
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())  # nothing loaded

    cfg.MODEL.WEIGHTS_ALLOW_WS_MISMATCH = True  # the expert's override loads it
    WSBCNCheckpointer.from_cfg(cfg, backbone).load(str(path))
    torch.testing.assert_close(backbone.res5[1].conv2.weight, torch.as_tensor(result.model["res5.1.conv2.weight"]))


def test_matching_form_and_unrecorded_checkpoints_load(tmp_path, caplog):
    path, result = converted("bcn-R18", tmp_path)
    cfg, backbone = backbone_for(result.config_overrides())
    WSBCNCheckpointer.from_cfg(cfg, backbone).load(str(path))
    torch.testing.assert_close(backbone.stem.conv1.weight, torch.as_tensor(result.model["stem.conv1.weight"]))
    # a checkpoint without the record (detectron2's, the trainer's own) loads whatever the form
    unrecorded = tmp_path / "unrecorded.pth"
    torch.save({"model": backbone.state_dict()}, unrecorded)
    cfg, other = backbone_for({**result.config_overrides(), "MODEL.WS.FORM": "biased_var+eps"})
    WSBCNCheckpointer.from_cfg(cfg, other).load(str(unrecorded))
    # weights trained without WS, loaded under WS: allowed, with a warning
    path, result = converted("torchvision-R18", tmp_path)
    cfg, backbone = backbone_for({**result.config_overrides(), "MODEL.WS.ENABLED": True})
    with caplog.at_level(logging.WARNING):
        WSBCNCheckpointer.from_cfg(cfg, backbone).load(str(path))
    assert "trained without WS, loaded into a backbone with WS" in caplog.text


def test_bcn_ws_paper_config_takes_the_converted_official_backbone(tmp_path):
    """The paper's BCN+WS config sets the official BCN models' form: their converted file loads into it,
    and into the GN+WS config with BCN norms (the WS repository's form) it does not."""
    path, _ = converted("bcn-R50", tmp_path)
    config = ROOT / "configs" / "COCO-InstanceSegmentation"
    cfg = helpers.load_config(str(config / "mask_rcnn_R_50_FPN_2x_bcn_ws.yaml"), "MODEL.WEIGHTS", str(path))
    check_weights(cfg)
    cfg = helpers.load_config(str(config / "mask_rcnn_R_50_FPN_2x_gn_ws.yaml"), "MODEL.WEIGHTS", str(path))
    cfg.merge_from_list(["MODEL.RESNETS.NORM", "BCN"])
    with pytest.raises(CheckpointError, match="MODEL.WEIGHTS .* was trained with WS form 'var[+]eps'"):
        check_weights(cfg)


def test_train_net_stops_before_training_on_another_form(tmp_path):
    path, _ = converted("bcn-R18", tmp_path)  # the demo config is R-18 BCN+WS with the default form
    json_file = generate_shapes_dataset(str(tmp_path / "tiny"), num_images=4, image_size=64, seed=3)
    args = [
        "--config-file", helpers.DEMO_CONFIG, "--register-coco", "tiny", json_file, str(tmp_path / "tiny" / "images"),
        *helpers.TINY, "DATASETS.TRAIN", '("tiny",)', "DATASETS.TEST", "()", "MODEL.WEIGHTS", str(path),
    ]  # fmt: skip
    last = helpers.assert_train_net_fails_cleanly(tmp_path, args, [f"MODEL.WEIGHTS {path}", "MODEL.WS.FORM var+eps"])
    assert "MODEL.WEIGHTS_ALLOW_WS_MISMATCH" in last


DTYPES = (torch.float32, torch.float64)


def estimate_update(mean: torch.Tensor, var: torch.Tensor, x: torch.Tensor, rate: float, dtype) -> tuple:
    """The paper's estimate update from a layer's input ``x``, in ``dtype``."""
    mean, var, x = mean.to(dtype), var.to(dtype), x.to(dtype)
    batch_mean = x.mean(dim=(0, 2, 3))
    batch_var = (x - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3))
    return (1 - rate) * mean + rate * batch_mean, (1 - rate) * var + rate * batch_var


@pytest.mark.numerics
@pytest.mark.parametrize("rate", [0.1, 0.0])
def test_fine_tuning_moves_the_loaded_estimates_by_the_paper_rule(tmp_path, rate):
    """Converted ``pbn`` statistics are micro-batch BCN's estimates; each training step moves them by
    running <- (1 - r) running + r batch (variance around the previous estimate); r = 0 keeps them."""
    path, result = converted("bcn-R18", tmp_path)
    cfg, backbone = backbone_for(result.config_overrides(), update_rate=rate)
    WSBCNCheckpointer.from_cfg(cfg, backbone).load(str(path))
    bcns = {name: m for name, m in backbone.named_modules() if isinstance(m, BatchChannelNorm2d)}
    assert len(bcns) == 1 + 8 * 2 + 3  # stem, two per basic block, three shortcuts
    loaded = {name: (m.batch_norm.running_mean.clone(), m.batch_norm.running_var.clone()) for name, m in bcns.items()}
    for name, (mean, var) in loaded.items():
        torch.testing.assert_close(mean, torch.as_tensor(result.model[f"{name}.batch_norm.running_mean"]))
        torch.testing.assert_close(var, torch.as_tensor(result.model[f"{name}.batch_norm.running_var"]))

    inputs = {}
    for name, m in bcns.items():
        m.register_forward_pre_hook(lambda module, args, name=name: inputs.update({name: args[0].detach().clone()}))
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.01)
    backbone.train()
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        before = {n: (m.batch_norm.running_mean.clone(), m.batch_norm.running_var.clone()) for n, m in bcns.items()}
        outputs = backbone(torch.randn(2, 3, 64, 64, generator=generator))
        sum(o.square().mean() for o in outputs.values()).backward()
        optimizer.step()
        optimizer.zero_grad()
        for name, m in bcns.items():
            # the update from the layer's input, in float32 (the yardstick of the layer's rounding) and float64
            expected32, expected = (estimate_update(*before[name], inputs[name], rate, dtype) for dtype in DTYPES)
            for got, e32, e64 in zip((m.batch_norm.running_mean, m.batch_norm.running_var), expected32, expected):
                assert_as_accurate(got, e32, e64, msg=name)
    for name, m in bcns.items():
        moved = not torch.equal(m.batch_norm.running_mean, loaded[name][0])
        assert moved == (rate > 0), name
        if rate == 0:  # the released code's behaviour: bit for bit the loaded statistics
            assert torch.equal(m.batch_norm.running_var, loaded[name][1])
