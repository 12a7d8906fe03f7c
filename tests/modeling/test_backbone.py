"""WS-ResNet backbones at every depth and ResNeXt, their blocks on the CUDA fast path, and config
validation at build time."""
import collections
import copy

import pytest
import torch
from detectron2.modeling import build_backbone, build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock
from torch import nn

import helpers
from helpers import load_config
from wsbcn_d2.cuda import WSConvGroup, bcn_function, dispatch, ws_group
from wsbcn_d2.cuda import disable_fast_path, enable_fast_path
from wsbcn_d2.cuda.fast_path import KernelBatchChannelNorm2d, WSConvBCNReLU
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d, standardize_weight
from wsbcn_d2.modeling import standardize_normed_convs

needs_fast_path = pytest.mark.skipif(not dispatch.ENABLED, reason="triton is not installed")

BASE = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_bcn_ws.yaml"


@pytest.mark.parametrize(
    "depth, extra, n_ws",
    [
        (18, ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64], 1 + 8 * 2 + 3),
        (34, ["MODEL.RESNETS.RES2_OUT_CHANNELS", 64], 1 + 16 * 2 + 3),
        (50, ["MODEL.RESNETS.NUM_GROUPS", 32, "MODEL.RESNETS.WIDTH_PER_GROUP", 4], 1 + 16 * 3 + 4),
        (152, [], 1 + 50 * 3 + 4),
    ],
)
def test_ws_resnet_depths(depth, extra, n_ws):
    cfg = load_config(
        BASE, "MODEL.BACKBONE.NAME", "build_ws_resnet_backbone", "MODEL.RESNETS.DEPTH", depth, *extra
    )
    backbone = build_backbone(cfg)
    ws = [m for m in backbone.modules() if isinstance(m, WSConv2d)]
    assert len(ws) == n_ws
    if "MODEL.RESNETS.NUM_GROUPS" in extra:
        assert backbone.res2[0].conv2.groups == 32
    out = backbone(torch.randn(1, 3, 64, 64))
    assert out["res5"].shape[-2:] == (2, 2) and torch.isfinite(out["res5"]).all()


@pytest.mark.parametrize(
    "opts, match",
    [
        (["MODEL.WS.EPS", 0.0], "MODEL.WS.EPS"),
        (["MODEL.BCN.UPDATE_RATE", 1.5], r"MODEL.BCN.UPDATE_RATE must be a finite number in \[0, 1\], got 1.5"),
        (["MODEL.BCN.EPS", -1.0], "MODEL.BCN.EPS must be a finite number > 0, got -1.0"),
        (["MODEL.BCN.NUM_GROUPS", 0], "MODEL.BCN.NUM_GROUPS must be an integer >= 1, got 0"),
        (["MODEL.GN.NUM_GROUPS", 0], "MODEL.GN.NUM_GROUPS must be an integer >= 1, got 0"),
        (["MODEL.RESNETS.NORM", "BNC"], "Unknown norm 'BNC'"),
        (["MODEL.ROI_MASK_HEAD.NORM", "GroupNorm"], "valid names"),
    ],
)
def test_invalid_values_rejected_at_build(opts, match):
    with pytest.raises(ValueError, match=match):
        build_model(load_config(BASE, *opts))


def test_gn_group_count_and_ws_switch_follow_config():
    cfg = load_config(
        "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_gn_ws.yaml",
        "MODEL.BACKBONE.NAME", "build_ws_resnet_backbone",
        "MODEL.GN.NUM_GROUPS", 16, "MODEL.WS.ENABLED", False,
    )
    backbone = build_backbone(cfg)
    assert backbone.stem.conv1.norm.num_groups == 16
    assert not any(isinstance(m, WSConv2d) for m in backbone.modules())


BLOCKS = {  # detectron2's block classes, and the convs whose output a ReLU follows (the block's last: after the shortcut)
    "stem": (lambda norm: BasicStem(3, 16, norm=norm), ["conv1"]),
    "basic": (lambda norm: BasicBlock(16, 32, stride=2, norm=norm), ["conv1", "conv2"]),
    "basic, identity shortcut": (lambda norm: BasicBlock(16, 16, norm=norm), ["conv1", "conv2"]),
    "bottleneck": (
        lambda norm: BottleneckBlock(16, 32, bottleneck_channels=8, stride=2, norm=norm), ["conv1", "conv2", "conv3"]
    ),
    "bottleneck, identity shortcut": (
        lambda norm: BottleneckBlock(16, 16, bottleneck_channels=8, norm=norm), ["conv1", "conv2", "conv3"]
    ),
}


def block_results(model: nn.Module, x: torch.Tensor) -> list:
    """Output, input gradient, parameter gradients and buffers after one forward + backward."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return [out, x.grad, *(p.grad for p in model.parameters()), *model.buffers()]


@needs_fast_path
@pytest.mark.numerics
@pytest.mark.parametrize("code", ["torch", "kernels"])
@pytest.mark.parametrize("norm", ["GN", "BCN", "BCN without WS"])
@pytest.mark.parametrize("block", list(BLOCKS))
def test_fast_path_keeps_each_blocks_function(monkeypatch, block, norm, code):
    if code == "kernels":
        monkeypatch.setattr(dispatch, "use_kernels", lambda x: x.dtype in dispatch.KERNEL_DTYPES)
    build, relu_convs = BLOCKS[block]
    torch.manual_seed(0)
    original = build((lambda c: nn.GroupNorm(4, c)) if norm == "GN" else (lambda c: helpers.randomized_bcn(c, 4)))
    if norm != "BCN without WS":
        standardize_normed_convs(original, eps=1e-5)
    layers_only = copy.deepcopy(original)
    layer_types = [type(m) for m in original.modules()]
    converted = enable_fast_path(copy.deepcopy(original))
    # the same layer code on both sides, the layers' fast-path classes, which leave the blocks alone
    if norm != "BCN without WS":
        WSConvGroup([m for m in original.modules() if isinstance(m, WSConv2d)])
    for m in original.modules():
        if type(m) is BatchChannelNorm2d:
            m.__class__ = KernelBatchChannelNorm2d
    # only where a WS conv's norm runs the ReLU itself (BCN); elsewhere the module call would only cost time
    fused = norm == "BCN"
    assert (type(converted) is not type(original)) == fused and isinstance(converted, type(original))
    assert all(isinstance(getattr(converted, name), WSConvBCNReLU) == fused for name in relu_convs)
    calls = []  # a BCN carried by a WS conv applies the ReLU (and the shortcut): its (residual, relu) arguments
    for name in relu_convs:
        getattr(converted, name).norm.register_forward_pre_hook(
            lambda m, args: calls.append((args[2], args[1] is not None)) if len(args) == 3 else None
        )

    x = torch.randn(2, 3 if block == "stem" else 16, 12, 10)
    reference = block_results(copy.deepcopy(layers_only).double(), x.double())  # the torch code in float64
    expected = block_results(original, x)
    assert converted.state_dict().keys() == original.state_dict().keys()
    for i, (a, b, r) in enumerate(zip(block_results(converted, x), expected, reference)):
        helpers.assert_as_accurate(a, b, r, msg=f"output, gradient or buffer {i}")
    shortcut_added = [block != "stem" and name == relu_convs[-1] for name in relu_convs]
    assert calls == ([(True, s) for s in shortcut_added] if fused else [])

    # and back: detectron2's block and the layers' classes, the same function
    restored = disable_fast_path(converted)
    assert [type(m) for m in restored.modules()] == layer_types
    assert not any(hasattr(m, "ws_group") for m in restored.modules())
    layers_only.load_state_dict(restored.state_dict())  # the estimates as updated by the kernels
    for a, b in zip(block_results(restored, x), block_results(layers_only, x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_fast_path
def test_ws_backbone_is_on_the_fast_path():
    backbone = build_backbone(load_config(BASE))
    blocks = [backbone.bottom_up.stem, *(block for stage in backbone.bottom_up.stages for block in stage)]
    assert {type(b).__name__ for b in blocks} == {"_BasicStem", "_BottleneckBlock"}
    fused = [b.conv1 for b in blocks] + [conv for b in blocks[1:] for conv in (b.conv2, b.conv3)]
    assert len(fused) == 1 + 16 * 3 and all(type(c) is WSConvBCNReLU for c in fused)
    convs = [m for m in backbone.modules() if isinstance(m, WSConv2d)]
    assert len(convs) == 1 + 16 * 3 + 4 + 8 and len({id(c.ws_group) for c in convs}) == 1  # bottom-up and FPN
    norms = [m for m in backbone.modules() if isinstance(m, BatchChannelNorm2d)]
    assert len(norms) == len(convs) and all(type(m) is KernelBatchChannelNorm2d for m in norms)


def autograd_nodes(outputs) -> collections.Counter:
    """The autograd graph behind ``outputs``: its nodes by type name."""
    seen, stack = set(), [t.grad_fn for t in outputs]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return collections.Counter(type(node).__name__ for node in seen)


@needs_fast_path
def test_bcn_ws_backbone_graph_on_cuda_code_has_no_relu_or_shortcut_nodes(monkeypatch):
    # the CUDA code's autograd graph of one training forward of the R-50-FPN backbones (FREEZE_AT 2), the
    # kernels' results replaced by zeros: the graph does not depend on their values
    monkeypatch.setattr(dispatch, "use_kernels", lambda x: x.dtype == torch.float32)
    monkeypatch.setattr(bcn_function, "bcn_forward", lambda x, *args: (torch.zeros(x.shape), (x, torch.zeros(1))))
    monkeypatch.setattr(
        ws_group, "ws_rows_forward", lambda flat, row_start, *args: (flat.float(), torch.ones(len(row_start)))
    )
    nodes = {}
    for norm in ("gn", "bcn_ws"):
        backbone = build_backbone(load_config(f"COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_{norm}.yaml")).train()
        nodes[norm] = autograd_nodes(backbone(torch.randn(2, 3, 64, 64)).values())
    gn, bcn = nodes["gn"], nodes["bcn_ws"]
    trained_blocks, trained_norms = 4 + 6 + 3, (4 + 6 + 3) * 3 + 3 + 8  # res3-res5 (shortcut convs: 3), FPN
    assert gn["ReluBackward0"] == trained_blocks * 3 and gn["NativeGroupNormBackward0"] == trained_norms
    # BCN+WS: one node per norm, the ReLUs and the blocks' additions inside them, one node for all of WS
    assert bcn["ReluBackward0"] == 0 and bcn["NativeGroupNormBackward0"] == 0
    assert bcn["_BCNKernelsBackward"] == trained_norms and bcn["_StandardizeGroupBackward"] == 1
    assert gn["AddBackward0"] - bcn["AddBackward0"] == trained_blocks
    # BCN's 4 parameters per layer against group norm's 2 (the paper's batch-step and group affines)
    assert bcn["AccumulateGrad"] - gn["AccumulateGrad"] == 2 * trained_norms
    # in all: 4 nodes less per block (3 ReLUs and the addition), 1 for WS, 2 per norm for its parameters
    assert sum(bcn.values()) == sum(gn.values()) - 4 * trained_blocks + 1 + 2 * trained_norms


@needs_fast_path
@pytest.mark.numerics
@pytest.mark.parametrize("norm", ["BCN", "large-batch BCN"])
def test_block_conv_adds_the_residual_before_its_relu(norm):
    # WSConvBCNReLU (a fused block's conv): relu(BCN(conv(x)) + residual), gradients included; the torch code
    torch.manual_seed(0)
    bcn = helpers.randomized_bcn(8, 4).eval() if norm == "BCN" else helpers.randomized_bcn(8, 4, estimate=False)
    conv = enable_fast_path(WSConv2d(4, 8, 3, padding=1, bias=False, norm=copy.deepcopy(bcn), activation=nn.ReLU()))
    assert type(conv) is WSConvBCNReLU
    x, z = torch.randn(2, 4, 6, 6), torch.randn(2, 8, 6, 6, requires_grad=True)
    def formula(dtype):  # the torch code: WS, conv, BCN, + residual, ReLU
        weight = standardize_weight(conv.weight.detach().to(dtype))
        return torch.relu(copy.deepcopy(bcn).to(dtype)(nn.functional.conv2d(x.to(dtype), weight, padding=1)) + z.to(dtype))

    got, expected, expected64 = conv(x, z), formula(torch.float32), formula(torch.float64)
    helpers.assert_as_accurate(got, expected, expected64, msg="output")
    assert 0 < (got == 0).float().mean() < 1  # the ReLU clips a part of the output
    d_residuals = [torch.autograd.grad(y.square().sum(), z)[0] for y in (got, expected, expected64)]
    helpers.assert_as_accurate(*d_residuals, msg="residual gradient")


@needs_fast_path
def test_bcn_head_convs_apply_their_relu_in_bcn():
    # the box and mask heads' conv towers: a BCN, then their ReLU activation, inside BCN's kernels
    model = build_model(load_config(BASE))
    towers = [*model.roi_heads.box_head.conv_norm_relus, *model.roi_heads.mask_head.conv_norm_relus]
    assert len(towers) == 8 and all(type(c) is WSConvBCNReLU and isinstance(c.activation, nn.ReLU) for c in towers)
    restored = disable_fast_path(model)
    assert all(type(c) is WSConv2d and isinstance(c.activation, nn.ReLU) for c in towers)
    assert not any(type(m).__module__.startswith("wsbcn_d2.cuda") for m in restored.modules())
