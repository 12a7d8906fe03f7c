"""WSBCNCheckpointer: atomic saves, one-line errors for unreadable files, and weights that leave the backbone
partly unloaded are refused unless allowed."""
import pickle
import re

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone, build_model
from torch import nn

from helpers import load_config
from wsbcn_d2.checkpoint import CheckpointError, WSBCNCheckpointer, check_weights


def _resnet(depth: int) -> nn.Module:
    cfg = load_config(
        "Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml",
        "MODEL.BACKBONE.NAME", "build_ws_resnet_backbone", "MODEL.RESNETS.DEPTH", depth,
        "MODEL.RESNETS.RES2_OUT_CHANNELS", 64 if depth < 50 else 256, "MODEL.RESNETS.NORM", "GN",
    )
    return build_backbone(cfg, ShapeSpec(channels=3))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    checkpointer = WSBCNCheckpointer(model, str(tmp_path), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    checkpointer.save("model_final", iteration=1)
    saved, saved_weight = (tmp_path / "model_final.pth").read_bytes(), model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)

    def write_half_then_fail(obj, f, *args, **kwargs):
        f.write(saved[: len(saved) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_final", iteration=2)
    monkeypatch.undo()
    assert (tmp_path / "model_final.pth").read_bytes() == saved
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_final.pth"]  # no temporary file
    fresh = nn.Linear(3, 2)
    assert WSBCNCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)["iteration"] == 1
    torch.testing.assert_close(fresh.weight, saved_weight, rtol=0, atol=0)


def test_empty_last_checkpoint_is_named(tmp_path):
    (tmp_path / "last_checkpoint").write_text("")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'last_checkpoint'} is empty: write the name of a"):
        WSBCNCheckpointer(nn.Linear(3, 2), str(tmp_path)).resume_or_load("", resume=True)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("weights.pkl", b"a text file, renamed\n", "not a checkpoint"),
        ("weights.pth", b"", "the file is empty (0 bytes)"),
        ("weights.pth", "half", "truncated, damaged or not a checkpoint"),  # a torch zip file cut in the middle
        ("weights.pkl", "half", "(UnpicklingError: pickle data was truncated)"),
    ],
    ids=["text_as_pkl", "empty_pth", "truncated_pth", "truncated_pkl"],
)
def test_unreadable_weights_are_named(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "half":
        model_state = {"model": {"weight": torch.ones(64, 64)}}
        if name.endswith(".pkl"):
            path.write_bytes(pickle.dumps(model_state))
        else:
            torch.save(model_state, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        WSBCNCheckpointer(nn.Linear(64, 64)).resume_or_load(str(path), resume=False)
    assert str(err.value).startswith(f"MODEL.WEIGHTS {path}: ")
    assert message in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(CheckpointError, match=f"^MODEL.WEIGHTS {tmp_path / 'nope.pkl'}: no such file$"):
        WSBCNCheckpointer(nn.Linear(64, 64)).resume_or_load(str(tmp_path / "nope.pkl"), resume=False)


def test_weights_for_another_backbone_are_refused_unless_allowed(tmp_path):
    """An R-18 checkpoint loads into an R-50 only partly: refused with counts and names."""
    r18, r50 = _resnet(18).state_dict(), _resnet(50).state_dict()
    path = tmp_path / "R-18.pth"
    torch.save({"model": r18}, path)
    total = [k for k in r50 if not k.endswith("num_batches_tracked")]
    missing = [k for k in total if k not in r18]
    mismatched = [k for k in total if k in r18 and r18[k].shape != r50[k].shape]
    assert missing and mismatched
    with pytest.raises(CheckpointError) as err:
        WSBCNCheckpointer(_resnet(50)).resume_or_load(str(path), resume=False)
    text = str(err.value)
    assert text.startswith(f"MODEL.WEIGHTS {path}: only {len(total) - len(missing) - len(mismatched)} of {len(total)} ")
    assert f"{len(missing)} missing ({', '.join(missing[:3])}, ...)" in text
    first = mismatched[0]
    shapes = ["x".join(map(str, state[first].shape)) for state in (r18, r50)]
    assert f"{len(mismatched)} of another shape ({first} {shapes[0]} (model: {shapes[1]}), " in text
    assert "MODEL.WEIGHTS_ALLOW_PARTIAL True" in text
    backbone = _resnet(50)
    WSBCNCheckpointer(backbone, allow_partial_backbone=True).resume_or_load(str(path), resume=False)
    torch.testing.assert_close(backbone.stem.conv1.weight, r18["stem.conv1.weight"], rtol=0, atol=0)


def test_only_the_bottom_up_network_must_load(tmp_path):
    """ImageNet weights fill a detector's bottom-up ResNet; its FPN and heads start from scratch."""
    cfg = load_config("Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml", "OUTPUT_DIR", str(tmp_path))
    bottom_up = {f"backbone.bottom_up.{k}": v for k, v in build_model(cfg).backbone.bottom_up.state_dict().items()}
    path = tmp_path / "imagenet.pth"
    torch.save({"model": bottom_up}, path)
    cfg.MODEL.WEIGHTS = str(path)
    check_weights(cfg)  # loads: FPN, RPN and heads missing is expected
    missing = "backbone.bottom_up.res4.1.conv2.norm.batch_norm.running_var"
    del bottom_up[missing]
    torch.save({"model": bottom_up}, path)
    with pytest.raises(CheckpointError, match=rf"1 missing \({re.escape(missing)}\)"):
        check_weights(cfg)
    cfg.MODEL.WEIGHTS_ALLOW_PARTIAL = True
    check_weights(cfg)
