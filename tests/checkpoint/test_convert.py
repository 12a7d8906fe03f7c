"""tools/convert_pretrained.py and wsbcn_d2.checkpoint against independent torchvision-layout models.

Each source model (``sources.py``) is saved in its own file layout. After conversion, the
plugin's detectron2 backbone must load it completely and reproduce the source's stage outputs.
"""

import pickle
import re
import runpy
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from torch import nn

from sources import STAGES, official_file, relative_errors, source_model
from wsbcn_d2 import add_wsbcn_config
from wsbcn_d2.checkpoint import ConversionError, WSBCNCheckpointer, convert_checkpoint, load_source, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CLI = runpy.run_path(str(ROOT / "tools" / "convert_pretrained.py"))["main"]


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


LAYOUT_CASES = [
    ("ws-R50", 50, "GN", "ws", "std+eps"),
    ("ws-X50", 50, "GN", "ws", "std+eps"),
    ("mmdet-R50", 50, "GN", "ws", "std+eps"),
    ("bcn-R50", 50, "BCN", "bcn", "var+eps"),
    ("bcn-X50", 50, "BCN", "bcn", "var+eps"),
    ("torchvision-R50", 50, "BN", "torchvision", None),
    ("torchvision-R18", 18, None, "torchvision", None),  # default norm for BN weights: FrozenBN
]


def converted_backbone(dest: Path, overrides: Dict) -> nn.Module:
    """The plugin's ResNet built from a converted file's config values, with the file loaded (all keys)."""
    cfg = plugin_cfg(overrides)
    cfg.MODEL.BACKBONE.NAME = "build_ws_resnet_backbone"
    backbone = build_backbone(cfg, ShapeSpec(channels=3)).eval()
    checkpointer = RecordingCheckpointer(backbone)
    checkpointer.load(str(dest))
    assert checkpointer.incompatible.missing_keys == []
    assert checkpointer.incompatible.unexpected_keys == []
    assert checkpointer.incompatible.incorrect_shapes == []
    return backbone


@pytest.mark.parametrize("kind, depth, norm, layout, form", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_converted_backbone_reproduces_source(tmp_path, capsys, kind, depth, norm, layout, form):
    dest = tmp_path / "pretrained" / f"{kind}.pkl"
    argv = [str(official_file(kind, tmp_path)), str(dest), "--depth", str(depth)] + (["--norm", norm] if norm else [])
    assert CLI(argv) == 0
    printed = capsys.readouterr().out
    assert f"layout {layout}" in printed and "ImageNet classifier: fc.weight, fc.bias" in printed
    assert ("BatchNorm step counter (FrozenBN has none)" in printed) == (norm is None)
    assert "could not map" not in printed
    assert "MODEL.PIXEL_MEAN '[123.675,116.28,103.53]'" in printed and "INPUT.FORMAT RGB" in printed
    assert (f"MODEL.WS.FORM {form} MODEL.WS.EPS 1e-05" in printed) == (form is not None)

    with open(dest, "rb") as f:
        ckpt = pickle.load(f)
    assert ckpt["matching_heuristics"] and ckpt["input_format"] == "RGB"
    assert ckpt["pixel_std"] == [58.395, 57.12, 57.375]
    assert (ckpt["ws_form"], ckpt["ws_eps"]) == ((form, 1e-5) if form else (None, None))
    overrides = ckpt["config_overrides"]
    assert overrides["MODEL.WS.ENABLED"] == (form is not None)
    assert overrides["MODEL.RESNETS.NORM"] == (norm or "FrozenBN")
    if kind.endswith("X50"):
        assert (overrides["MODEL.RESNETS.NUM_GROUPS"], overrides["MODEL.RESNETS.WIDTH_PER_GROUP"]) == (32, 4)

    backbone = converted_backbone(dest, overrides)
    # float64 end to end: only rounding may separate the two (measured <= 3e-14 relative); a float32
    # step anywhere (a float32 standardization, statistics or norm) would exceed 1e-12 by orders of magnitude
    for name, err in relative_errors(backbone, kind, torch.float64).items():
        assert err < 1e-12, f"float64 {name}: relative error {err:.2e}"
    # float32 on both sides, as a user runs them
    for name, err in relative_errors(backbone, kind, torch.float32).items():
        assert err < 1e-4, f"float32 {name}: relative error {err:.2e}"


@pytest.mark.parametrize("kind, wrong_form", [("bcn-R50", "std+eps"), ("ws-R50", "var+eps")])
def test_another_form_computes_another_function(tmp_path, kind, wrong_form):
    """The control: the same converted weights under another WS form are far from the source network."""
    result = convert_checkpoint(torch.load(official_file(kind, tmp_path)))
    path = tmp_path / "converted.pkl"
    save_checkpoint(result, str(path))
    overrides = {**result.config_overrides(), "MODEL.WS.FORM": wrong_form}
    errors = relative_errors(converted_backbone(path, overrides), kind, torch.float64)
    assert min(errors.values()) > 0.1, errors


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


def _detectron_name(key: str) -> str:
    """A torchvision ResNet key as the detection fork's Detectron .pkl names it.

    conv1.weight -> conv1_w, bn1.bias -> conv1_gn_b, layer1.0.conv2.weight -> res2_0_branch2b_w,
    layer1.0.bn3.weight -> res2_0_branch2c_gn_s, layer1.0.downsample.1.weight -> res2_0_branch1_gn_s.
    """
    if key.startswith("fc."):
        return "pred_" + key[3]
    module, param = key.rsplit(".", 1)
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(?:(conv|bn)([1-3])|downsample\.([01]))", module)
    if m is None:
        blob, is_norm = "conv1", module == "bn1"
    else:
        branch = "branch1" if m[5] else "branch2" + "abc"[int(m[4]) - 1]
        blob, is_norm = f"res{int(m[1]) + 1}_{m[2]}_{branch}", m[3] == "bn" or m[5] == "1"
    return blob + ({"weight": "_gn_s", "bias": "_gn_b"}[param] if is_norm else "_w")


@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "blobs"])
def test_detectron_named_gn_ws_pkl_loads_directly_and_reproduces_source(tmp_path, wrapped):
    """The detection fork's Caffe2/Detectron-named GN+WS .pkl (conv1_gn_s, res2_0_branch2a_w, ...) loads as
    MODEL.WEIGHTS of the GN+WS paper config without conversion (detectron2 maps the names) and, under
    the default WS form (the fork's: std + eps), computes the source network."""
    blobs = {_detectron_name(k): v.numpy() for k, v in source_model("ws-R50").state_dict().items()}
    assert {"conv1_w", "conv1_gn_s", "res2_0_branch2a_gn_b", "res2_0_branch1_w", "res5_2_branch2c_gn_s"} <= set(blobs)
    path = tmp_path / "R-50-GN-WS.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": blobs} if wrapped else blobs, f, protocol=2)  # as Detectron (Python 2) wrote them

    cfg = plugin_cfg({})
    cfg.merge_from_file(str(ROOT / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_2x_gn_ws.yaml"))
    model = build_model(cfg).eval()
    checkpointer = RecordingCheckpointer(model)
    checkpointer.load(str(path))
    prefix = "backbone.bottom_up."
    assert [k for k in checkpointer.incompatible.missing_keys if k.startswith(prefix)] == []
    assert sorted(checkpointer.incompatible.unexpected_keys) == ["linear.bias", "linear.weight"]
    bottom_up = model.backbone.bottom_up
    bottom_up._out_features = STAGES
    for dtype, bound in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        for name, err in relative_errors(bottom_up, "ws-R50", dtype).items():
            assert err < bound, f"{dtype} {name}: relative error {err:.2e}"


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
