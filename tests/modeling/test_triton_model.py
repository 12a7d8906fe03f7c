"""A training step of a BCN+WS Mask R-CNN through the Triton kernels against the torch code.

On a GPU: the paper's R-50-FPN config, compiled kernels. On CPU: the demo's R-18-FPN on small
images with the kernels run by Triton's interpreter (tests/conftest.py): a frozen backbone, an
FPN on BCN's fused kernels and a box head with enough RoIs for its per-group kernels.
"""
import copy
import statistics

import pytest
import torch
from detectron2.layers import batched_nms
from detectron2.modeling.proposal_generator import proposal_utils
from detectron2.utils.events import EventStorage

from helpers import DEMO_CONFIG, load_config, load_tool, synthetic_batch
from wsbcn_d2.cuda import dispatch, launcher
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d

pytestmark = pytest.mark.skipif(launcher.triton is None, reason="triton is not installed")
CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_bcn_ws.yaml"


def train_step(model, batch):
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}


def gradient_errors(model, reference) -> dict:
    """Per parameter: ``|grad - reference grad| / |reference grad|`` (Frobenius norms, float64)."""
    ref = {n: p.grad.double() for n, p in reference.named_parameters() if p.grad is not None}
    return {
        n: float((p.grad.double() - ref[n]).norm() / ref[n].norm().clamp_min(1e-30))
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def check_step_against_torch_code(monkeypatch, cfg, batch, num_ws_convs: int, min_grads: int) -> None:
    """Losses, parameter gradients and estimates of one step: Triton kernels vs the torch code.

    Gradients are compared with a float64 step of the torch code, against which the float32
    torch code sets the bar: at initialization the backbone's gradients are ill-conditioned
    (on an H200, R-50-FPN at 256x320, both float32 codes were 1-3% off float64 in norm).
    """
    # zeroed RPN predictors: proposals = anchors in all runs, whatever the features' last bits (otherwise
    # rounding differences reorder near-equal objectness scores, and the heads see other RoIs)
    model = load_tool("benchmark").build_benchmark_model(cfg, seed=0).train()
    reference, reference64 = copy.deepcopy(model), copy.deepcopy(model).double()
    assert sum(isinstance(m, WSConv2d) for m in model.modules()) == num_ws_convs

    torch.manual_seed(1)  # same RoI sampling
    losses = train_step(model, batch)
    with monkeypatch.context() as m:
        m.setattr(dispatch, "use_kernels", lambda x: False)
        torch.manual_seed(1)
        expected = train_step(reference, batch)
    with monkeypatch.context() as m:
        # detectron2 decodes boxes in float32: torchvision's CPU nms then wants float32 scores too (the
        # zeroed RPN scores all 0, which the cast keeps)
        m.setattr(proposal_utils, "batched_nms", lambda boxes, scores, *args: batched_nms(boxes, scores.float(), *args))
        torch.manual_seed(1)
        train_step(reference64, batch)  # float64: the torch code on any device
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key], rtol=1e-3, atol=1e-4, msg=key)
    errors, bar = gradient_errors(model, reference64), gradient_errors(reference, reference64)
    assert errors.keys() == bar.keys() and len(errors) > min_grads
    for name, error in errors.items():  # H200: at most 1.9x the torch code's error
        assert error <= 3 * bar[name] + 1e-4, (name, error, bar[name])
    assert statistics.median(errors.values()) <= 2 * statistics.median(bar.values()) + 1e-6
    for mod, ref in zip(model.modules(), reference.modules()):
        if isinstance(mod, BatchChannelNorm2d):
            torch.testing.assert_close(mod.batch_norm.running_var, ref.batch_norm.running_var, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")
def test_training_step_matches_torch_code(monkeypatch):
    # full float32 convolutions: TF32 rounds conv inputs to 10 mantissa bits, which turns the last-bit
    # differences between the two BCN codes into 1e-3 differences at the next conv
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = load_config(CONFIG, "MODEL.DEVICE", "cuda", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 128)
    batch = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in d.items()} for d in synthetic_batch(256, 320) * 2]
    check_step_against_torch_code(monkeypatch, cfg, batch, num_ws_convs=69, min_grads=100)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreted kernels run on CPU tensors")
def test_interpreted_training_step_matches_torch_code(monkeypatch):
    monkeypatch.setattr(dispatch, "use_kernels", lambda x: x.dtype in dispatch.KERNEL_DTYPES)
    # frozen backbone (BCN without the autograd function), FPN trained through the fused kernels, and
    # 2 x 48 RoIs of 64 channels in 32 groups (192 > 128): the box head's BCN takes the per-group kernels;
    # a 64-channel FPN, for the interpreter's sake (about a minute)
    cfg = load_config(
        DEMO_CONFIG, "MODEL.BACKBONE.FREEZE_AT", 5, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 48,
        "MODEL.FPN.OUT_CHANNELS", 64,
        "INPUT.MIN_SIZE_TRAIN", (64,), "INPUT.MAX_SIZE_TRAIN", 96,
    )  # fmt: skip
    # stem 1 + 8 blocks x 2 + 3 shortcuts + FPN 8 + box head 4 + mask head 4
    check_step_against_torch_code(monkeypatch, cfg, synthetic_batch(64, 96) * 2, num_ws_convs=36, min_grads=90)
