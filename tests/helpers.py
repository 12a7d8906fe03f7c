"""Shared test helpers: configs from the repository, a tiny synthetic training input, the
scripts of tools/ as modules, a check that tools/train_net.py fails cleanly on bad input,
each source's own WS line with filters as small as trained ones, and the float64 yardstick of
float32 comparisons."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import BitMasks, Boxes, Instances
from torch.nn import functional as F

from wsbcn_d2 import add_wsbcn_config
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
DEMO_CONFIG = os.path.join(CONFIG_DIR, "Demo", "mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml")
TINY = [  # tools/train_net.py overrides for a seconds-long run of DEMO_CONFIG on 64 px images
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64",
    "DATALOADER.NUM_WORKERS", "0", "SOLVER.WARMUP_ITERS", "1",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",  # an untrained model still predicts something
]

HIDDEN_WARNINGS = (  # known harmless warnings a tool run must not print (tools/_startup.py, tools/train_net.py)
    "`torch.jit.script` is deprecated", "torch.meshgrid: in an upcoming release", "TracerWarning",
    "The given NumPy array is not writable", "This DataLoader will create",
    "SOLVER.STEPS contains values larger than SOLVER.MAX_ITER",
)  # fmt: skip


def load_tool(name: str):
    """``tools/<name>.py`` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(relpath: str, *opts) -> CfgNode:
    """A repository config on CPU, without pretrained weights, with ``opts`` merged."""
    cfg = get_cfg()
    add_wsbcn_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_DIR, relpath))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", *opts])
    return cfg


def synthetic_batch(height: int = 128, width: int = 160, seed: int = 0) -> list:
    """One image with two box+mask instances, as a detectron2 model input."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=g) * 255
    boxes = torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 40.0, 150.0, 120.0]])
    masks = torch.zeros(2, height, width, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
        mask[y0:y1, x0:x1] = True
        image[:, y0:y1, x0:x1] = image[:, y0:y1, x0:x1] * 0.2 + 150
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(boxes)
    instances.gt_classes = torch.tensor([0, 1])
    instances.gt_masks = BitMasks(masks)
    return [{"image": image, "instances": instances, "height": height, "width": width}]


SMALL = [  # overrides for small, untrained R-18 variants of the configs (any meta-architecture)
    "MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64, "MODEL.BACKBONE.FREEZE_AT", 0,
    "MODEL.FPN.OUT_CHANNELS", 64, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 64, "MODEL.RPN.POST_NMS_TOPK_TEST", 32,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "MODEL.ROI_BOX_HEAD.CONV_DIM", 32, "MODEL.ROI_BOX_HEAD.FC_DIM", 64,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 32, "MODEL.SEM_SEG_HEAD.CONVS_DIM", 32, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3,
    "MODEL.ROI_HEADS.NUM_CLASSES", 2, "MODEL.RETINANET.NUM_CLASSES", 2, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    "MODEL.RETINANET.SCORE_THRESH_TEST", 0.0,
]  # fmt: skip

BIT_NARROW = [  # a BiT ResNetV2-50 at a quarter of its width (stem 16, res2-res5 64-512), small heads
    "MODEL.RESNETV2.WIDTH_FACTOR", 0.25, "MODEL.GN.NUM_GROUPS", 8, "MODEL.BCN.NUM_GROUPS", 8,
    "MODEL.FPN.OUT_CHANNELS", 64, "MODEL.ROI_BOX_HEAD.CONV_DIM", 64, "MODEL.ROI_BOX_HEAD.FC_DIM", 128,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 64, "MODEL.BACKBONE.FREEZE_AT", 0,
]  # fmt: skip


def randomize_norms_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BCN estimates and affines, and WS filters off-centre (which WS removes), in place, so that
    folding and export have something to fold; returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BatchChannelNorm2d):
                bn = m.batch_norm
                for t in (m.weight, bn.weight):
                    t.copy_(torch.rand(t.shape, generator=generator) + 0.5)
                for t in (m.bias, bn.bias, bn.running_mean):
                    t.copy_(torch.rand(t.shape, generator=generator) - 0.5)
                bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=generator) * 1.5 + 0.5)
            if isinstance(m, WSConv2d):
                m.weight.add_(0.1 * torch.randn(m.weight.shape[0], 1, 1, 1, generator=generator))
    return model


TRAIN_NET = os.path.join(REPO, "tools", "train_net.py")
SENTINELS = {
    "config.yaml": b"# sentinel: config of a previous run\n",
    "metrics.json": b'{"iteration": 0, "sentinel": 1}\n',
}


def assert_train_net_fails_cleanly(tmp_path, args, expected_substrings) -> str:
    """Run tools/train_net.py on bad input and check that it fails cleanly; return the error line.

    OUTPUT_DIR is ``tmp_path / "output"`` (created if needed, so a test may put files there
    first), pre-populated with a sentinel config.yaml and metrics.json; ``OUTPUT_DIR`` and
    ``MODEL.DEVICE cpu`` are appended to ``args`` (so put flags before KEY VALUE overrides).
    Asserts: nonzero exit, no traceback, the last non-empty stderr line contains every
    expected substring, and both sentinel files are byte-identical afterwards.
    """
    out = tmp_path / "output"
    out.mkdir(exist_ok=True)
    for name, content in SENTINELS.items():
        (out / name).write_bytes(content)
    run = subprocess.run(
        [sys.executable, TRAIN_NET, *args, "OUTPUT_DIR", str(out), "MODEL.DEVICE", "cpu"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    assert run.returncode != 0, f"train_net.py succeeded on bad input:\n{run.stderr[-3000:]}"
    assert "Traceback" not in run.stderr, run.stderr[-5000:]
    for expected in expected_substrings:
        assert expected in last, f"{expected!r} not in the last stderr line {last!r}"
    for name, content in SENTINELS.items():
        assert (out / name).read_bytes() == content, f"{name} of the previous run was changed"
    return last


def randomized_bcn(channels: int, groups: int, estimate: bool = True, rate: float = 0.3) -> BatchChannelNorm2d:
    """A BCN with random affine parameters and estimates (seeded)."""
    torch.manual_seed(0)
    module = BatchChannelNorm2d(channels, num_groups=groups, estimate=estimate, update_rate=rate)
    with torch.no_grad():
        for t in (module.weight, module.bias, module.batch_norm.weight, module.batch_norm.bias):
            t.uniform_(-1.5, 1.5)
        module.batch_norm.running_mean.uniform_(-1, 1)
        module.batch_norm.running_var.uniform_(0.5, 2)
    return module


# Each source's own WS line, restated in torch (the sources of pretrained WS weights disagree on it).
def _ws_repository_line(weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the WS repository's Conv2d (and mmcv's conv_ws_2d): std over the flattened filter, then + eps
    weight = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
    std = weight.view(weight.size(0), -1).std(dim=1).view(-1, 1, 1, 1) + eps
    return weight / std.expand_as(weight)


def _bcn_repository_line(weight: torch.Tensor, eps: float) -> torch.Tensor:
    # the BCN repository's imagenet/models/layers.py Conv2d: torch.pow(var + eps, 0.5)
    weight = weight - weight.mean(dim=1, keepdim=True).mean(dim=2, keepdim=True).mean(dim=3, keepdim=True)
    std = torch.pow(weight.view(weight.size(0), -1).var(dim=1) + eps, 0.5).view(-1, 1, 1, 1)
    return weight / std.expand_as(weight)


def _timm_line(weight: torch.Tensor, eps: float) -> torch.Tensor:
    # timm's StdConv2d: a batch norm over a (1, O, -1) view, in training mode (biased variance)
    return F.batch_norm(
        weight.reshape(1, weight.shape[0], -1), None, None, training=True, momentum=0.0, eps=eps
    ).reshape_as(weight)


WS_SOURCE_LINES = {"std+eps": _ws_repository_line, "var+eps": _bcn_repository_line, "biased_var+eps": _timm_line}
"""WS form name -> the source's own standardization ``(weight (O, I, kh, kw), eps) -> W_hat``."""


def trained_ws_filters_(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Give each filter of ``weight`` a mean and a std drawn log-uniformly from [1e-3, 5e-2], in place.

    Trained WS filters have small stds (weight decay shrinks scale-invariant weights), where the WS
    forms differ most; returns ``weight``.
    """
    with torch.no_grad():
        shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
        log_std = torch.empty(shape, dtype=torch.float64).uniform_(math.log(1e-3), math.log(5e-2), generator=generator)
        noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
        mean = torch.randn(shape, generator=generator, dtype=torch.float64) * 1e-2
        weight.copy_(noise * log_std.exp() + mean)
    return weight


# ------------------------------------------------------------------- comparisons of rounded results
def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Norm-wise relative error ``|value - reference| / |reference|`` (Frobenius norms, float64)."""
    reference = reference.detach().double()
    difference = (value.detach().double() - reference).norm()
    return float(difference / reference.norm()) if reference.norm() > 0 else float(difference)


def error_bound(baseline: torch.Tensor, reference: torch.Tensor, factor: float = 4.0) -> float:
    """What another code path of ``baseline``'s computation may miss ``reference`` by.

    ``baseline`` is the torch code's result in a rounding dtype, ``reference`` the same computation in
    float64. The bound is ``factor`` times the torch code's own norm-wise error, and never less than
    ``factor * 8`` units of rounding ``u = eps / 2`` of that dtype: a handful of correctly rounded
    operations, which summing in another order (another CPU vector width, a kernel's blocks, another
    process count) may cost where the torch code happens to be exact.
    """
    unit = torch.finfo(baseline.dtype).eps / 2
    return factor * max(relative_error(baseline, reference), 8 * unit)


def assert_as_accurate(got: torch.Tensor, baseline: torch.Tensor, reference: torch.Tensor, factor: float = 4.0,
                       msg: str = "") -> None:
    """``got`` misses the float64 ``reference`` by at most :func:`error_bound` of the torch code's ``baseline``.

    Two float32 codes never agree to a constant: which CPU kernels torch picks (``ATEN_CPU_CAPABILITY``
    default / avx2 / avx512), the thread count, a kernel's block sizes and the interpreter's numpy all
    change the order of sums. Their distances from float64 are comparable on every machine; a constant
    tolerance between the two holds only where it was fitted. Integer tensors (counters) must be equal.
    """
    assert got.shape == reference.shape, (msg, got.shape, reference.shape)
    if not baseline.is_floating_point():  # counters: exact
        assert torch.equal(got, baseline) and torch.equal(got, reference.to(got.dtype)), msg
        return
    error, bound = relative_error(got, reference), error_bound(baseline, reference, factor)
    if os.environ.get("WSBCN_ERROR_LOG"):  # tests/numerics_sweep.py: the margins under each CPU capability
        with open(os.environ["WSBCN_ERROR_LOG"], "a") as log:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
            print(json.dumps(dict(test=test, msg=msg, error=error, baseline=relative_error(baseline, reference),
                                  bound=bound)), file=log)
    assert error <= bound, f"{msg}: error {error:.3g} against float64, above {bound:.3g} " \
        f"({factor:g} x the torch code's {relative_error(baseline, reference):.3g})"


def allow_float64_models(monkeypatch) -> None:
    """Let a float64 copy of a detectron2 model run: detectron2 decodes boxes in float32, and torchvision's
    CPU nms then wants float32 scores too (a cast that keeps the order of all but float32-equal scores)."""
    from detectron2.layers import batched_nms
    from detectron2.modeling.meta_arch import retinanet
    from detectron2.modeling.proposal_generator import proposal_utils
    from detectron2.modeling.roi_heads import fast_rcnn

    def nms(boxes, scores, *args):
        return batched_nms(boxes.float(), scores.float(), *args)

    for module in (proposal_utils, fast_rcnn, retinanet):
        monkeypatch.setattr(module, "batched_nms", nms)
