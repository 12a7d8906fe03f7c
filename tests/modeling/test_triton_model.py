"""A training step of a BCN+WS Mask R-CNN through the Triton kernels against the torch code.

On a GPU: the paper's R-50-FPN config, compiled kernels. On CPU: the demo's R-18-FPN on small
images with the kernels run by Triton's interpreter (tests/conftest.py): a frozen backbone, an
FPN on BCN's fused kernels and a box head with enough RoIs for its per-group kernels.
"""
import copy

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import DEMO_CONFIG, load_config, synthetic_batch
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d, triton_kernels

pytestmark = pytest.mark.skipif(triton_kernels.triton is None, reason="triton is not installed")
CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_bcn_ws.yaml"


def train_step(model, batch):
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}


def check_step_against_torch_code(monkeypatch, cfg, batch, num_ws_convs: int, min_grads: int) -> None:
    """Losses, parameter gradients and estimates of one step: Triton kernels vs the torch code."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    # zeroed RPN predictors: proposals = anchors in both runs, whatever the features' last bits (otherwise
    # rounding differences reorder near-equal objectness scores, and the heads see other RoIs)
    head = model.proposal_generator.rpn_head
    with torch.no_grad():
        for layer in (head.objectness_logits, head.anchor_deltas):
            layer.weight.zero_()
            layer.bias.zero_()
    reference = copy.deepcopy(model)
    assert sum(isinstance(m, WSConv2d) for m in model.modules()) == num_ws_convs

    torch.manual_seed(1)  # same RoI sampling
    losses = train_step(model, batch)
    with monkeypatch.context() as m:
        m.setattr(triton_kernels, "use_triton", lambda x: False)
        torch.manual_seed(1)
        expected = train_step(reference, batch)
    for key in expected:
        torch.testing.assert_close(losses[key], expected[key], rtol=1e-3, atol=1e-4, msg=key)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys() and len(grads) > min_grads
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-8)
        assert (grad - ref_grads[name]).abs().max() / scale < 1e-2, name
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
    monkeypatch.setattr(triton_kernels, "use_triton", lambda x: x.dtype in triton_kernels._KERNEL_DTYPES)
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
