"""fold_for_inference: same outputs as the original in eval, only plain layers, traceable."""
import copy

import pytest
import torch
from detectron2.export import TracingAdapter
from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem
from torch import nn

from helpers import allow_float64_models, assert_as_accurate, load_config, randomize_norms_, relative_error
from wsbcn_d2 import fold_for_inference
from wsbcn_d2.cuda import dispatch
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d

CONFIG = "Demo/mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml"
SIZE = 96


def randomized_model(*opts) -> nn.Module:
    """The demo model with random BCN estimates and affines, and WS weights off-centre."""
    torch.manual_seed(0)
    return randomize_norms_(build_model(load_config(CONFIG, *opts)).eval())


def image() -> torch.Tensor:
    return torch.rand(3, SIZE, SIZE + 32, generator=torch.Generator().manual_seed(1)) * 255


def raw_outputs(model: nn.Module, inputs: list) -> dict:
    """Detections (boxes, scores, RoI mask probabilities), without post-processing."""
    with torch.no_grad():
        (inst,) = model.inference(inputs, do_postprocess=False)
    return {"boxes": inst.pred_boxes.tensor, "scores": inst.scores, "masks": inst.pred_masks}


@pytest.mark.numerics
@pytest.mark.parametrize("freeze_at", [0, 2])  # 2: the stem's and res2's batch steps are FrozenBatchNorm2d
def test_folded_model_matches_original(monkeypatch, freeze_at):
    model = randomized_model("MODEL.BACKBONE.FREEZE_AT", freeze_at, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == (freeze_at > 0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_for_inference(model)

    assert not any(isinstance(m, (WSConv2d, BatchChannelNorm2d)) for m in folded.modules())
    convs = [m for m in folded.modules() if type(m) is Conv2d and m.norm is not None]
    assert convs and all(type(m.norm) is nn.GroupNorm for m in convs)
    # detectron2's blocks again (the model's are on the CUDA fast path)
    blocks = [m for m in folded.modules() if isinstance(m, (BasicStem, BasicBlock))]
    assert len(blocks) == 1 + 8 and all(type(m) in (BasicStem, BasicBlock) for m in blocks)
    # the original is untouched
    assert isinstance(model.backbone.bottom_up.stem.conv1, WSConv2d) and not folded.training
    assert type(model.backbone.bottom_up.res2[0]).__name__ == "_BasicBlock" or not dispatch.ENABLED
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    inputs = [{"image": image()}]
    model64 = copy.deepcopy(model).double()
    allow_float64_models(monkeypatch)
    expected, actual = raw_outputs(model, inputs), raw_outputs(folded, inputs)
    reference = raw_outputs(model64, [{"image": inputs[0]["image"].double()}])
    assert expected["scores"].numel() > 0
    for key, value in expected.items():  # float32: rounding only
        assert_as_accurate(actual[key], value, reference[key], msg=key)

    # in float64 the folded backbone is exact: the fold is an identity, not an approximation
    x = inputs[0]["image"][None].double() / 255
    with torch.no_grad():
        expected, actual = model64.backbone(x), fold_for_inference(model64).backbone(x)
    for key, value in expected.items():
        assert relative_error(actual[key], value) < 1e-10, key


@pytest.mark.numerics
def test_gn_ws_model_folds_to_plain_convs():
    gn = ("MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN", "MODEL.ROI_BOX_HEAD.NORM", "GN")
    model = randomized_model(*gn, "MODEL.ROI_MASK_HEAD.NORM", "GN")
    folded = fold_for_inference(model)
    assert not any(isinstance(m, WSConv2d) for m in folded.modules())
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        expected, actual = model.backbone(x), folded.backbone(x)
        reference = copy.deepcopy(model).double().backbone(x.double())
    for key, value in expected.items():
        assert_as_accurate(actual[key], value, reference[key], msg=key)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # detectron2's data-dependent branches
def test_folded_model_traces_with_detectron2_tracing_adapter():
    folded = fold_for_inference(randomized_model("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0))
    inputs = [{"image": image()}]

    def inference(model, inputs):
        (inst,) = model.inference(inputs, do_postprocess=False)
        return [{"instances": inst}]

    adapter = TracingAdapter(folded, inputs, inference)
    with torch.no_grad():
        traced = torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)
        expected = adapter(*adapter.flattened_inputs)
        # a different image of the same size goes through the traced graph
        other = (adapter.flattened_inputs[0].flip(-1),)
        pairs = [(traced(*adapter.flattened_inputs), expected), (traced(*other), adapter(*other))]
    for actual, reference in pairs:
        assert len(actual) == len(reference) > 0
        for a, e in zip(actual, reference):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
