"""BiT ResNetV2 checkpoints (timm state dicts and BiT's .npz) converted by tools/convert_pretrained.py
against timm's own ResNetV2: the detectron2 backbone reproduces timm's features."""
import copy
import pickle
from functools import partial
import runpy
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import timm
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from safetensors.torch import save_file
from timm.layers import StdConv2d
from timm.models.resnetv2 import ResNetV2

import helpers
from test_convert import plugin_cfg
from wsbcn_d2.checkpoint import ConversionError, WSBCNCheckpointer, convert_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CLI = runpy.run_path(str(ROOT / "tools" / "convert_pretrained.py"))["main"]
STAGES = ["res2", "res3", "res4", "res5"]


def timm_bit(depth: int, width: int, seed: int = 0) -> torch.nn.Module:
    """timm's BiT ResNetV2 (random weights: WS filters of trained sizes, GN gains in [0.2, 0.6)), in eval.

    A width BiT did not publish (e.g. 50x2) is timm's ResNetV2 with the settings of its BiT models.
    """
    name = f"resnetv2_{depth}x{width}_bit"
    if timm.is_model(name):
        model = timm.create_model(name, pretrained=False)
    else:
        layers = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3]}[depth]
        model = ResNetV2(layers, width_factor=width, stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, StdConv2d):
                helpers.trained_ws_filters_(m.weight, generator)
            elif isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 0.4 + 0.2)
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator) * 0.2)
    return model.eval()


def bit_npz_arrays(state: Dict[str, torch.Tensor]) -> Dict[str, np.ndarray]:
    """A timm BiT state dict in BiT's original .npz layout: TF names, conv kernels as (H, W, in, out)."""
    arrays = {}
    for key, value in state.items():
        parts = key.split(".")
        array = value.numpy()
        if array.ndim == 4:
            array = array.transpose(2, 3, 1, 0)
        if key == "stem.conv.weight":
            name = "root_block/standardized_conv2d/kernel"
        elif parts[0] == "norm":
            name = "group_norm/" + {"weight": "gamma", "bias": "beta"}[parts[1]]
        elif parts[0] == "head":
            name = "head/conv2d/" + {"weight": "kernel", "bias": "bias"}[parts[2]]
        else:  # stages.{i}.blocks.{j}.{layer}...
            unit = f"block{int(parts[1]) + 1}/unit{int(parts[3]) + 1:02d}/"
            layer = parts[4]
            if layer == "downsample":
                name = unit + "a/proj/standardized_conv2d/kernel"
            elif layer.startswith("conv"):
                name = unit + "abc"[int(layer[-1]) - 1] + "/standardized_conv2d/kernel"
            else:
                name = unit + "abc"[int(layer[-1]) - 1] + "/group_norm/" + {"weight": "gamma", "bias": "beta"}[parts[5]]
        arrays["resnet/" + name] = array
    return arrays


def save_source(model: torch.nn.Module, path: Path) -> None:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".npz":
        np.savez(path, **bit_npz_arrays(state))
    elif path.suffix == ".safetensors":
        save_file(state, str(path))
    else:  # .pth, .bin
        torch.save(state, path)


def timm_features(model: torch.nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """res2-res4 as timm's intermediates, res5 after the final norm (timm's ``forward_features``)."""
    with torch.no_grad():
        features = model.forward_intermediates(x, indices=[1, 2, 3, 4], norm=True, intermediates_only=True)
        torch.testing.assert_close(features[3], model.forward_features(x), rtol=0, atol=0)
    return dict(zip(STAGES, features))


CASES = [(50, 1, "pth", "timm"), (50, 1, "npz", "bit"), (50, 2, "safetensors", "timm"), (101, 1, "bin", "timm")]


@pytest.mark.parametrize("depth, width, suffix, layout", CASES, ids=[f"{d}x{w}-{s}" for d, w, s, _ in CASES])
def test_converted_bit_backbone_reproduces_timm(tmp_path, capsys, depth, width, suffix, layout):
    source = timm_bit(depth, width, seed=depth + width)
    path, dest = tmp_path / f"bit.{suffix}", tmp_path / "pretrained" / "bit.pkl"
    save_source(source, path)
    assert CLI([str(path), str(dest), "--depth", str(depth)]) == 0
    printed = capsys.readouterr().out
    assert f"layout {layout}: ResNetV2-{depth}x{width}, GN norms, trained with WS form 'biased_var+eps', eps 1e-08" in printed
    assert "could not map" not in printed
    (unused,) = [line for line in printed.splitlines() if line.startswith("not used: ")]
    heads = ("resnet/head/conv2d/kernel", "resnet/head/conv2d/bias") if layout == "bit" else ("head.fc.weight", "head.fc.bias")
    assert unused.startswith("not used: 2 key(s), ImageNet classifier: ") and all(h in unused for h in heads)
    assert "MODEL.WS.FORM biased_var+eps MODEL.WS.EPS 1e-08" in printed
    assert "MODEL.PIXEL_MEAN '[127.5,127.5,127.5]'" in printed and "INPUT.FORMAT RGB" in printed
    assert f"MODEL.RESNETV2.DEPTH {depth} MODEL.RESNETV2.WIDTH_FACTOR {float(width)}" in printed

    with open(dest, "rb") as f:
        checkpoint = pickle.load(f)
    assert (checkpoint["ws_form"], checkpoint["ws_eps"]) == ("biased_var+eps", 1e-8)
    cfg = plugin_cfg(checkpoint["config_overrides"])
    cfg.MODEL.BACKBONE.NAME = "build_ws_resnetv2_backbone"
    backbone = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    incompatible = WSBCNCheckpointer.from_cfg(cfg, backbone)._load_model(checkpoint)  # form checked, all loaded
    assert not incompatible.missing_keys and not incompatible.unexpected_keys and not incompatible.incorrect_shapes

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        expected = timm_features(copy.deepcopy(source).to(dtype), x.to(dtype))
        with torch.no_grad():
            actual = copy.deepcopy(backbone).to(dtype)(x.to(dtype))
        for name in STAGES:
            err = ((actual[name] - expected[name]).abs().max() / expected[name].abs().max()).item()
            assert err < bound, f"{dtype} {name}: relative error {err:.2e}"


def test_bad_resnetv2_checkpoints_are_described():
    state = timm_bit(50, 1).state_dict()
    with pytest.raises(ConversionError, match="depth mismatch: the checkpoint is a ResNetV2-50, but depth 101"):
        convert_checkpoint(state, expect_depth=101)
    with pytest.raises(ConversionError, match="BiT's ResNetV2 weights hold GN norms, but BCN was asked"):
        convert_checkpoint(state, expect_norm="BCN")
    with pytest.raises(ConversionError, match="layout 'bit' was asked, but the checkpoint has timm ResNetV2 names"):
        convert_checkpoint(state, layout="bit")
    bn_model = timm.create_model("resnetv2_50", pretrained=False)  # timm's BatchNorm ResNetV2, no WS
    with pytest.raises(ConversionError, match="running statistics .* BiT's ResNetV2s .* use GroupNorm [+] WS"):
        convert_checkpoint(bn_model.state_dict())
    del state["stages.2.blocks.5.conv2.weight"]
    with pytest.raises(ConversionError, match=r"does not fit detectron2's ResNetV2-50x1 .* missing: res4.5.conv2.weight"):
        convert_checkpoint(state)
