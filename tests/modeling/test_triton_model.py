"""A CUDA training step of the paper's BCN+WS Mask R-CNN R-50-FPN: Triton kernels vs the torch code."""
import copy

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from helpers import load_config, synthetic_batch
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d, triton_kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")
CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_bcn_ws.yaml"


def train_step(model, batch):
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    return {k: v.detach() for k, v in losses.items()}


def test_training_step_matches_torch_code(monkeypatch):
    cfg = load_config(CONFIG, "MODEL.DEVICE", "cuda", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 128)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    reference = copy.deepcopy(model)
    assert sum(isinstance(m, WSConv2d) for m in model.modules()) == 69
    batch = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in d.items()} for d in synthetic_batch(256, 320) * 2]

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
    assert grads.keys() == ref_grads.keys() and len(grads) > 100
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max().clamp_min(1e-8)
        assert (grad - ref_grads[name]).abs().max() / scale < 1e-2, name
    for mod, ref in zip(model.modules(), reference.modules()):
        if isinstance(mod, BatchChannelNorm2d):
            torch.testing.assert_close(mod.batch_norm.running_var, ref.batch_norm.running_var, rtol=1e-4, atol=1e-5)
