"""tools/convert_pretrained.py and wsbcn_d2.checkpoint against independent torchvision-layout models.

Each source model is a torchvision ResNet with test-local re-statements of the
official WS conv and BCN norm, random weights and random norm statistics,
saved in the official file layout. After conversion, the plugin's detectron2
backbone must load it completely and reproduce the source's stage outputs.
"""

import copy
import functools
import pickle
import re
import runpy
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from torch import nn
from torch.nn import functional as F

from wsbcn_d2 import add_wsbcn_config
from wsbcn_d2.checkpoint import ConversionError, WSBCNCheckpointer, convert_checkpoint, load_source, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CLI = runpy.run_path(str(ROOT / "tools" / "convert_pretrained.py"))["main"]
STAGES = ["res2", "res3", "res4", "res5"]


class OfficialWSConv2d(nn.Conv2d):
    """The official WS conv: per output channel (W - mean) / (unbiased std + 1e-5)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.flatten(1)
        mean = flat.mean(dim=1).view(-1, 1, 1, 1)
        std = flat.std(dim=1).view(-1, 1, 1, 1) + 1e-5
        return F.conv2d(x, (self.weight - mean) / std, self.bias, self.stride, self.padding, self.dilation, self.groups)


class OfficialBCNorm(nn.Module):
    """The official large-batch BCNorm: inner BatchNorm2d ``pbn``, then group norm with a (1, G, 1) affine."""

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.weight = nn.Parameter(torch.ones(1, num_groups, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_groups, 1))
        self.pbn = nn.BatchNorm2d(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.size(0)
        out = self.pbn(x).view(1, n * self.num_groups, -1)
        out = F.batch_norm(out, None, None, None, None, True, 0.0, self.eps)
        return (self.weight * out.view(n, self.num_groups, -1) + self.bias).view_as(x)


def _with_ws(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if type(m) is nn.Conv2d:  # every conv of a torchvision ResNet is followed by a norm
            m.__class__ = OfficialWSConv2d
    return model


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    """Random norm affines and statistics, in eval mode.

    Gains are drawn from [0.2, 0.6), as in trained ResNets: with gains around 1 a
    random 50-layer net is chaotic enough to amplify rounding errors by res5.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, OfficialBCNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.4 + 0.2)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(1234)
    return model.eval()


# kind -> (builder of the source model, how the official file stores its state_dict)
SOURCES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[Dict], Dict]]] = {
    # official WS: DataParallel names, GroupNorm(32)
    "ws-R50": (
        lambda: _with_ws(torchvision.models.resnet50(norm_layer=lambda c: nn.GroupNorm(32, c))),
        lambda sd: {"module." + k: v for k, v in sd.items()},
    ),
    # the same as a training checkpoint, for ResNeXt
    "ws-X50": (
        lambda: _with_ws(torchvision.models.resnext50_32x4d(norm_layer=lambda c: nn.GroupNorm(32, c))),
        lambda sd: {"epoch": 100, "arch": "resnext50_32x4d", "state_dict": {"module." + k: v for k, v in sd.items()}},
    ),
    # official BCN: torchvision names, group affine + pbn.*, plus EstBN's update-rate buffer
    "bcn-R50": (
        lambda: _with_ws(torchvision.models.resnet50(norm_layer=OfficialBCNorm)),
        lambda sd: {
            **sd,
            **{
                k.replace("running_mean", "estbn_moving_speed"): torch.zeros(1)
                for k in sd
                if k.endswith("pbn.running_mean")
            },
        },
    ),
    "torchvision-R50": (torchvision.models.resnet50, dict),
    "torchvision-R18": (torchvision.models.resnet18, dict),
}


@functools.lru_cache(maxsize=None)
def source_model(kind: str) -> nn.Module:
    return _randomized(SOURCES[kind][0](), seed=len(kind))


def official_file(kind: str, directory: Path) -> Path:
    path = directory / f"{kind}.pth.tar"
    torch.save(SOURCES[kind][1](source_model(kind).state_dict()), path)
    return path


def stage_outputs(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outputs = {}
    for name, layer in zip(STAGES, (model.layer1, model.layer2, model.layer3, model.layer4)):
        outputs[name] = x = layer(x)
    return outputs


class RecordingCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer (what MODEL.WEIGHTS goes through), keeping the missing/unexpected keys it logs."""

    def _log_incompatible_keys(self, incompatible) -> None:
        self.incompatible = incompatible
        super()._log_incompatible_keys(incompatible)


def plugin_cfg(overrides: Dict) -> CfgNode:
    cfg = get_cfg()
    add_wsbcn_config(cfg)
    cfg.merge_from_list([x for item in overrides.items() for x in item])
    cfg.MODEL.META_ARCHITECTURE = "ProposalNetwork"  # the backbone alone: no head reads its norm
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.BCN.UPDATE_RATE = 0.0
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = STAGES
    return cfg


@pytest.mark.parametrize(
    "kind, depth, norm, layout",
    [
        ("ws-R50", 50, "GN", "ws"),
        ("ws-X50", 50, "GN", "ws"),
        ("bcn-R50", 50, "BCN", "bcn"),
        ("torchvision-R50", 50, "BN", "torchvision"),
        ("torchvision-R18", 18, None, "torchvision"),  # default norm for BN weights: FrozenBN
    ],
)
def test_converted_backbone_reproduces_source(tmp_path, capsys, kind, depth, norm, layout):
    dest = tmp_path / "pretrained" / f"{kind}.pkl"
    argv = [str(official_file(kind, tmp_path)), str(dest), "--depth", str(depth)] + (["--norm", norm] if norm else [])
    assert CLI(argv) == 0
    printed = capsys.readouterr().out
    assert f"layout {layout}" in printed and "ImageNet classifier: fc.weight, fc.bias" in printed
    assert ("BatchNorm step counter (FrozenBN has none)" in printed) == (norm is None)
    assert "could not map" not in printed
    assert "MODEL.PIXEL_MEAN '[123.675,116.28,103.53]'" in printed and "INPUT.FORMAT RGB" in printed

    with open(dest, "rb") as f:
        ckpt = pickle.load(f)
    assert ckpt["matching_heuristics"] and ckpt["input_format"] == "RGB"
    assert ckpt["pixel_std"] == [58.395, 57.12, 57.375]
    overrides = ckpt["config_overrides"]
    assert overrides["MODEL.WS.ENABLED"] == (layout != "torchvision")
    assert overrides["MODEL.RESNETS.NORM"] == (norm or "FrozenBN")
    if kind == "ws-X50":
        assert (overrides["MODEL.RESNETS.NUM_GROUPS"], overrides["MODEL.RESNETS.WIDTH_PER_GROUP"]) == (32, 4)

    cfg = plugin_cfg(overrides)
    cfg.MODEL.BACKBONE.NAME = "build_ws_resnet_backbone"
    backbone = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    checkpointer = RecordingCheckpointer(backbone)
    checkpointer.load(str(dest))
    assert checkpointer.incompatible.missing_keys == []
    assert checkpointer.incompatible.unexpected_keys == []
    assert checkpointer.incompatible.incorrect_shapes == []

    # float64 end to end: only rounding may separate the two (measured <= 3e-14 relative); a float32
    # step anywhere (a float32 standardization, statistics or norm) would exceed 1e-12 by orders of magnitude
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        expected = stage_outputs(copy.deepcopy(source_model(kind)).double(), x)
        actual = backbone.double()(x)
    for name in STAGES:
        rel_err = (actual[name] - expected[name]).abs().max() / expected[name].abs().max()
        assert rel_err < 1e-12, f"{name}: relative error {rel_err:.2e}"


@pytest.mark.parametrize(
    "meta_arch, prefix",
    [("GeneralizedRCNN", "backbone.bottom_up."), ("ProposalNetwork", "backbone.")],
    ids=["mask_rcnn_fpn", "proposal_network"],
)
def test_full_model_loads_every_bcn_tensor_in_place(tmp_path, meta_arch, prefix):
    """Name matching must not confuse norm.weight (G,) with norm.batch_norm.weight (C,) or stage/head names."""
    result = convert_checkpoint(torch.load(official_file("bcn-R50", tmp_path)), expect_norm="BCN")
    not_fc = {k for k in result.unused if not k.startswith("fc.")}
    assert not_fc and all(k.endswith(".pbn.estbn_moving_speed") for k in not_fc)
    path = tmp_path / "bcn.pkl"
    with open(path, "wb") as f:
        pickle.dump(result.checkpoint(), f)

    cfg = plugin_cfg(result.config_overrides())
    cfg.merge_from_file(str(ROOT / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_2x_bcn_ws.yaml"))
    if meta_arch == "ProposalNetwork":  # the plain (non-FPN) backbone
        cfg.MODEL.META_ARCHITECTURE = meta_arch
        cfg.MODEL.BACKBONE.NAME = "build_ws_resnet_backbone"
        cfg.MODEL.RPN.IN_FEATURES = ["res4"]
        cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128, 256, 512]]
    model = build_model(cfg)
    checkpointer = RecordingCheckpointer(model)
    checkpointer.load(str(path))

    state = model.state_dict()
    for key, value in result.model.items():
        np.testing.assert_array_equal(state[prefix + key].numpy(), value, err_msg=key)
    assert checkpointer.incompatible.unexpected_keys == []
    assert [k for k in checkpointer.incompatible.missing_keys if k.startswith(prefix)] == []
    backbone_keys = {k[len(prefix) :] for k in state if re.match(re.escape(prefix) + r"(stem|res\d)\.", k)}
    assert backbone_keys == set(result.model)


def _caffe2_name(d2_name: str) -> str:
    """res2.0.conv1.norm.weight -> res2_0_branch2a_gn_s (Detectron's GN blob names)."""
    name = d2_name.replace("stem.", "").replace("shortcut", "branch1")
    name = re.sub(r"(res\d\.\d+\.)conv([1-3])", lambda m: f"{m[1]}branch2{'abc'[int(m[2]) - 1]}", name)
    name = name.replace(".norm.weight", "_gn_s").replace(".norm.bias", "_gn_b").replace(".weight", "_w")
    return name.replace(".", "_")


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "blobs"])
def test_caffe2_named_gn_pkl_loads_directly(tmp_path, wrapped):
    """detectron2 maps Detectron GN blobs (conv1_gn_s, res2_0_branch2a_gn_b, ...) itself: no conversion needed."""
    cfg = plugin_cfg({})
    cfg.merge_from_file(str(ROOT / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_2x_gn_ws.yaml"))
    model = build_model(cfg)
    prefix = "backbone.bottom_up."
    rng = np.random.default_rng(0)
    blobs = {
        _caffe2_name(k[len(prefix) :]): rng.standard_normal(tuple(v.shape)).astype(np.float32)
        for k, v in model.state_dict().items()
        if k.startswith(prefix)
    }
    assert {"conv1_w", "conv1_gn_s", "res2_0_branch2a_gn_b", "res2_0_branch1_w", "res5_2_branch2c_gn_s"} <= set(blobs)
    blobs.update(pred_w=np.zeros((1000, 2048), np.float32), pred_b=np.zeros(1000, np.float32))
    path = tmp_path / "R-50-GN-WS.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs} if wrapped else blobs, f, protocol=2)  # as Detectron (Python 2) wrote them

    checkpointer = RecordingCheckpointer(model)
    checkpointer.load(str(path))
    state = model.state_dict()
    for key in (k for k in state if k.startswith(prefix)):
        np.testing.assert_array_equal(state[key].numpy(), blobs[_caffe2_name(key[len(prefix) :])], err_msg=key)
    assert [k for k in checkpointer.incompatible.missing_keys if k.startswith(prefix)] == []
    assert sorted(checkpointer.incompatible.unexpected_keys) == ["linear.bias", "linear.weight"]


def _gn_state(depth: int) -> Dict[str, torch.Tensor]:
    model = getattr(torchvision.models, f"resnet{depth}")(norm_layer=lambda c: nn.GroupNorm(32, c))
    return {"module." + k: v for k, v in model.state_dict().items()}


def test_mismatched_depth_is_refused():
    with pytest.raises(
        ConversionError,
        match=r"depth mismatch: the checkpoint is a ResNet-50 \(bottleneck blocks per "
        r"stage \[3, 4, 6, 3\]\), but depth 101 was asked",
    ):
        convert_checkpoint(_gn_state(50), expect_depth=101)


@pytest.mark.parametrize(
    "state, expect_norm, message",
    [
        (lambda: _gn_state(18), "BCN", r"the checkpoint's norms are GN \(weight and bias only\), but BCN was asked"),
        (lambda: _gn_state(18), "FrozenBN", r"norms are GN .*, but FrozenBN was asked, which loads BN weights"),
        (lambda: torchvision.models.resnet18().state_dict(), "GN", r"norms are BN \(weight, bias and running stat"),
    ],
)
def test_mismatched_norm_is_refused(state, expect_norm, message):
    with pytest.raises(ConversionError, match="^norm mismatch: .*" + message):
        convert_checkpoint(state(), expect_norm=expect_norm)


def test_forced_layout_must_fit_the_norms():
    with pytest.raises(ConversionError, match=r"layout 'bcn' holds BCN norms, but this checkpoint's norms are GN"):
        convert_checkpoint(_gn_state(18), layout="bcn")
    bn_ws = convert_checkpoint(torchvision.models.resnet18().state_dict(), layout="ws")
    assert bn_ws.config_overrides()["MODEL.WS.ENABLED"] is True
    gn_plain = convert_checkpoint(_gn_state(18), layout="torchvision")
    assert gn_plain.config_overrides()["MODEL.WS.ENABLED"] is False


def test_unknown_layouts_are_described():
    with pytest.raises(
        ConversionError, match=r"not a torchvision-layout ResNet .* saw 2 keys, e.g. head.weight, head.bias\.$"
    ):
        convert_checkpoint({"head.weight": torch.zeros(1), "head.bias": torch.zeros(1)})
    with pytest.raises(ConversionError, match="Caffe2/Detectron names: detectron2 loads such a .pkl directly"):
        convert_checkpoint({"conv1_w": torch.zeros(1), "conv1_gn_s": torch.zeros(1)})


def test_incomplete_or_foreign_keys_are_reported():
    state = _gn_state(18)
    del state["module.layer3.1.conv2.weight"]
    with pytest.raises(
        ConversionError, match=r"does not fit detectron2's ResNet-18 with GN norms; missing: res4.1.conv2.weight$"
    ):
        convert_checkpoint(state)
    result = convert_checkpoint({**_gn_state(18), "module.aux_head.weight": torch.zeros(3)})
    assert result.unmapped == ["aux_head.weight"]
    assert "could not map 1 key(s): aux_head.weight" in result.summary()


def test_cli_reports_errors(tmp_path, capsys):
    source = tmp_path / "R-18-GN-WS.pth.tar"
    torch.save(_gn_state(18), source)
    assert CLI([str(source), str(tmp_path / "out.pkl"), "--depth", "34"]) == 1
    assert "depth mismatch: the checkpoint is a ResNet-18" in capsys.readouterr().err
    assert not (tmp_path / "out.pkl").exists()
    assert CLI([str(source), str(tmp_path / "out.pth")]) == 1
    assert "the output must be a .pkl file" in capsys.readouterr().err
    c2 = tmp_path / "R-50-GN.pkl"
    with open(c2, "wb") as f:
        pickle.dump({"conv1_w": np.zeros(1)}, f, protocol=2)  # as Detectron (Python 2) wrote them
    assert CLI([str(c2), str(tmp_path / "out.pkl")]) == 1
    assert "use it directly as MODEL.WEIGHTS" in capsys.readouterr().err


def test_checkpointer_refuses_unconverted_official_file(tmp_path):
    cfg = plugin_cfg({"MODEL.RESNETS.DEPTH": 18, "MODEL.RESNETS.RES2_OUT_CHANNELS": 64, "MODEL.RESNETS.NORM": "GN"})
    cfg.MODEL.BACKBONE.NAME = "build_ws_resnet_backbone"
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    source, state = tmp_path / "R-18-GN-WS.pth.tar", _gn_state(18)
    torch.save({"state_dict": state}, source)
    with pytest.raises(ConversionError, match=r"torchvision ResNet names .* python tools/convert_pretrained.py"):
        WSBCNCheckpointer(backbone).load(str(source))
    converted = tmp_path / "R-18-GN-WS.pkl"
    save_checkpoint(convert_checkpoint(load_source(str(source))), str(converted))
    WSBCNCheckpointer(backbone).load(str(converted))  # converted files pass
    torch.testing.assert_close(backbone.res5[1].conv2.weight, state["module.layer4.1.conv2.weight"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda good: b"R-50-GN-WS weights: see the README\n", "not a checkpoint"),
        (lambda good: b"", "the file is empty (0 bytes)"),
        (lambda good: good[: len(good) // 2], "truncated, damaged or not a checkpoint"),
    ],
    ids=["text", "empty", "truncated"],
)
def test_cli_names_an_unreadable_source(tmp_path, capsys, content, message):
    good = tmp_path / "good.pth"
    torch.save(_gn_state(18), good)
    source, dest = tmp_path / "R-18-GN-WS.pth.tar", tmp_path / "out.pkl"
    source.write_bytes(content(good.read_bytes()))
    assert CLI([str(source), str(dest)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {source}: ") and message in lines[0]
    assert not dest.exists()


def test_cli_checks_dest_before_loading(tmp_path, capsys, monkeypatch):
    source = tmp_path / "R-18-GN-WS.pth.tar"
    torch.save(_gn_state(18), source)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("SOURCE was loaded before DEST was checked"))
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where DEST's folder should be")
    for dest, message in ((tmp_path / "out.pth", "the output must be a .pkl file"), (blocker / "out.pkl", "blocker")):
        assert CLI([str(source), str(dest)]) == 1
        assert message in capsys.readouterr().err


def test_cli_writes_dest_atomically(tmp_path, monkeypatch):
    """A failure while DEST is written leaves an existing DEST as it was, and no temporary file."""
    source, dest = tmp_path / "R-18-GN-WS.pth.tar", tmp_path / "R-18-GN-WS.pkl"
    torch.save(_gn_state(18), source)
    dest.write_bytes(b"previous conversion")

    def dump_half(obj, f, *args, **kwargs):
        f.write(b"\x80\x04 half a pickle")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pickle, "dump", dump_half)
    assert CLI([str(source), str(dest)]) == 1
    assert dest.read_bytes() == b"previous conversion"
    assert {p.name for p in tmp_path.iterdir()} == {source.name, dest.name}
