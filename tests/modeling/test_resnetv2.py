"""The BiT ResNetV2 backbones: configs, a training step of a narrow Mask R-CNN, norms, freezing."""
import copy

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage
from torch import nn

from helpers import BIT_NARROW as NARROW
from helpers import assert_as_accurate, load_config, synthetic_batch
from wsbcn_d2.modeling import validate_wsbcn_config
from wsbcn_d2.cuda import dispatch, launcher
from wsbcn_d2.cuda.fast_path import KernelBatchChannelNorm2d
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d

MASK_RCNN = "COCO-InstanceSegmentation/mask_rcnn_BiT_R50x1_FPN_2x_gn_ws.yaml"


@pytest.mark.parametrize(
    "config, backbone_norm, strides",
    [
        (MASK_RCNN, nn.GroupNorm, [4, 8, 16, 32, 64]),
        ("COCO-InstanceSegmentation/mask_rcnn_BiT_R50x1_FPN_2x_bcn_ws.yaml", nn.GroupNorm, [4, 8, 16, 32, 64]),
        ("COCO-Detection/retinanet_BiT_R50x1_FPN_1x_gn_ws.yaml", nn.GroupNorm, [8, 16, 32, 64, 128]),
    ],
)
def test_bit_configs_build_the_real_r50x1(config, backbone_norm, strides):
    cfg = load_config(config)
    validate_wsbcn_config(cfg)
    model = build_model(cfg)
    bottom_up = model.backbone.bottom_up
    assert sum(p.numel() for p in bottom_up.parameters()) == 23_500_352  # timm's resnetv2_50x1_bit without head
    assert [s.stride for s in model.backbone.output_shape().values()] == strides
    assert all(type(m.norm1) is backbone_norm for m in bottom_up.modules() if hasattr(m, "norm1"))
    convs = [m for m in model.backbone.modules() if isinstance(m, WSConv2d)]
    assert {(c.form, c.eps) for c in convs} == {("biased_var+eps", 1e-8)}
    assert not dispatch.ENABLED or len({id(c.ws_group) for c in convs}) == 1  # bottom-up and FPN: one WS group, a few kernels per step
    assert len([c for c in convs if c in set(bottom_up.modules())]) == 53  # stem, 3 per block, 4 shortcuts


@pytest.mark.parametrize("norm", ["GN", "BCN"])
def test_narrow_mask_rcnn_training_step_reaches_every_ws_conv(norm):
    torch.manual_seed(0)
    cfg = load_config(MASK_RCNN, *NARROW, "MODEL.RESNETV2.NORM", norm)
    model = build_model(cfg).train()
    bcn_class = KernelBatchChannelNorm2d if dispatch.ENABLED else BatchChannelNorm2d  # on the fast path
    norm_class = {"GN": nn.GroupNorm, "BCN": bcn_class}[norm]
    assert type(model.backbone.bottom_up.norm) is norm_class
    with EventStorage(0):
        losses = model(synthetic_batch())
        sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    convs = {name: m for name, m in model.named_modules() if isinstance(m, WSConv2d)}
    assert len(convs) == 53 + 8 + 4 + 4  # bottom-up, FPN, box head, mask head
    for name, conv in convs.items():
        grad = conv.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name


def test_freeze_at_freezes_stem_stages_and_final_norm():
    def frozen(freeze_at):
        cfg = load_config(MASK_RCNN, *NARROW, "MODEL.RESNETV2.NORM", "BCN", "MODEL.BACKBONE.FREEZE_AT", freeze_at)
        bottom_up = build_backbone(cfg, ShapeSpec(channels=3)).bottom_up
        parts = {"stem": bottom_up.stem, **{f"res{i}": getattr(bottom_up, f"res{i}") for i in range(2, 6)}}
        parts["norm"] = bottom_up.norm
        return {name: not any(p.requires_grad for p in part.parameters()) for name, part in parts.items()}, bottom_up

    state, bottom_up = frozen(2)
    assert state == {"stem": True, "res2": True, "res3": False, "res4": False, "res5": False, "norm": False}
    assert isinstance(bottom_up.res2[0].norm1.batch_norm, FrozenBatchNorm2d)  # BCN's estimates stop moving
    assert not isinstance(bottom_up.res3[0].norm1.batch_norm, FrozenBatchNorm2d)
    state, bottom_up = frozen(5)
    assert all(state.values()) and isinstance(bottom_up.norm.batch_norm, FrozenBatchNorm2d)


def test_out_features_build_only_what_they_need():
    cfg = load_config(MASK_RCNN, *NARROW, "MODEL.RESNETV2.OUT_FEATURES", ["res3", "res4"])
    cfg.MODEL.BACKBONE.NAME = "build_ws_resnetv2_backbone"
    backbone = build_backbone(cfg, ShapeSpec(channels=3))
    assert backbone.stage_names == ["res2", "res3", "res4"] and backbone.norm is None
    outputs = backbone(torch.randn(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {"res3": (1, 128, 8, 12), "res4": (1, 256, 4, 6)}
    assert {k: (s.channels, s.stride) for k, s in backbone.output_shape().items()} == {"res3": (128, 8), "res4": (256, 16)}


@pytest.mark.parametrize(
    "opts, message",
    [
        (["MODEL.RESNETV2.DEPTH", 34], "MODEL.RESNETV2.DEPTH must be one of [50, 101, 152], got 34"),
        (["MODEL.RESNETV2.WIDTH_FACTOR", -1.0], "MODEL.RESNETV2.WIDTH_FACTOR must be a number > 0"),
        (["MODEL.RESNETV2.NORM", "XN"], "Unknown norm 'XN' in MODEL.RESNETV2.NORM"),
        (["MODEL.GN.NUM_GROUPS", 48], "MODEL.RESNETV2.NORM 'GN': MODEL.GN.NUM_GROUPS 48 does not divide"),
    ],
)
def test_bad_resnetv2_values_name_their_key(opts, message):
    with pytest.raises(ValueError) as error:
        validate_wsbcn_config(load_config(MASK_RCNN, *opts))
    assert message in str(error.value)


@pytest.mark.numerics
@pytest.mark.skipif(launcher.triton is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreted kernels run on CPU tensors")
def test_bcn_resnetv2_through_the_kernels_matches_torch_code(monkeypatch):
    """The CUDA fast path where it applies (the WS group, BCN's kernels with the pre-activation ReLUs
    fused), run by Triton's interpreter: as close to a float64 step of the torch code as the float32
    torch code is (measured: at most 1.7x its relative error, about 3e-5), estimates included."""
    cfg = load_config(MASK_RCNN, *NARROW, "MODEL.RESNETV2.NORM", "BCN", "MODEL.RESNETV2.OUT_FEATURES", ["res2", "res3"])
    cfg.MODEL.BACKBONE.NAME = "build_ws_resnetv2_backbone"
    torch.manual_seed(0)
    backbone = build_backbone(cfg, ShapeSpec(channels=3)).train()
    reference, reference64 = copy.deepcopy(backbone), copy.deepcopy(backbone).double()
    x = torch.randn(2, 3, 32, 48)

    def step(model, x):
        outputs = model(x)
        sum((o * torch.cos(o)).sum() for o in outputs.values()).backward()
        return {**outputs, **{n: p.grad for n, p in model.named_parameters()}}

    with monkeypatch.context() as m:
        m.setattr(dispatch, "use_kernels", lambda t: t.dtype in dispatch.KERNEL_DTYPES)
        got = step(backbone, x)
    expected, expected64 = step(reference, x), step(reference64, x.double())

    assert len(expected64) == 2 + sum(1 for _ in backbone.parameters())
    for name in expected64:
        assert_as_accurate(got[name], expected[name], expected64[name], factor=3, msg=name)
    modules = zip(backbone.modules(), reference.modules(), reference64.modules())
    bcns = [m for m in modules if isinstance(m[0], BatchChannelNorm2d)]
    assert len(bcns) > 10
    for mod, ref, ref64 in bcns:
        for key in ("running_mean", "running_var"):
            estimates = [getattr(m.batch_norm, key) for m in (mod, ref, ref64)]
            assert_as_accurate(*estimates, factor=3, msg=key)
