"""Source networks of pretrained weights, restated independently of wsbcn_d2's layers.

Each is a torchvision ResNet whose convs compute their source's own WS line
(``helpers.WS_SOURCE_LINES``) and whose norms are the source's (GroupNorm,
the official BCNorm, BatchNorm), with random norm statistics and WS filters
of trained sizes, saved in the source's own file layout.
"""
import copy
import functools
import re
from pathlib import Path
from typing import Callable, Dict, Tuple

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import helpers

STAGES = ["res2", "res3", "res4", "res5"]


class SourceWSConv2d(nn.Conv2d):
    """A conv of a WS source network: the source's own WS line (``helpers.WS_SOURCE_LINES``), eps 1e-5."""

    form = "std+eps"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = helpers.WS_SOURCE_LINES[self.form](self.weight, 1e-5)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


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


def _with_ws(model: nn.Module, form: str) -> nn.Module:
    """Every conv of a torchvision ResNet (each is followed by a norm) standardized by ``form``."""
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = SourceWSConv2d
            m.form = form
    return model


def _randomized(model: nn.Module, seed: int) -> nn.Module:
    """Random norm affines and statistics, WS filters of trained sizes, in eval mode.

    Gains are drawn from [0.2, 0.6), as in trained ResNets: with gains around 1 a
    random 50-layer net is chaotic enough to amplify rounding errors by res5. WS
    filters get per-filter stds in [1e-3, 5e-2] (``helpers.trained_ws_filters_``),
    where the WS forms differ most.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SourceWSConv2d):
                helpers.trained_ws_filters_(m.weight, gen)
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, OfficialBCNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) * 0.4 + 0.2)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(1234)
    return model.eval()


def _gn(c: int) -> nn.Module:
    return nn.GroupNorm(32, c)


def _data_parallel(state: Dict) -> Dict:
    return {"module." + k: v for k, v in state.items()}


def _mmcv_names(state: Dict) -> Dict:
    """mmcv's ResNet names its GroupNorms gn1 (stem), gn1-gn3 (blocks); mmdetection's files wrap the state."""
    renamed = {re.sub(r"(^|\.)bn([1-3])\.", r"\1gn\2.", k): v for k, v in state.items()}
    return {"meta": {"mmcv_version": "0.2.10"}, "state_dict": renamed}


def _with_update_rate(state: Dict) -> Dict:
    """The official EstBN's update-rate buffer beside each pbn (zero, as released)."""
    rates = {k.replace("running_mean", "estbn_moving_speed"): torch.zeros(1) for k in state if k.endswith("pbn.running_mean")}
    return {**state, **rates}


# kind -> (builder of the source model, how the source's file stores its state_dict)
SOURCES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[Dict], Dict]]] = {
    # official WS (R-50-GN-WS.pth.tar): DataParallel names, GroupNorm(32), the WS repository's line
    "ws-R50": (lambda: _with_ws(torchvision.models.resnet50(norm_layer=_gn), "std+eps"), _data_parallel),
    # the same as a training checkpoint, for ResNeXt
    "ws-X50": (
        lambda: _with_ws(torchvision.models.resnext50_32x4d(norm_layer=_gn), "std+eps"),
        lambda sd: {"epoch": 100, "arch": "resnext50_32x4d", "state_dict": _data_parallel(sd)},
    ),
    # mmdetection's copies (open-mmlab://jhu/resnet50_gn_ws): mmcv's ResNet names, mmcv's ConvWS line
    "mmdet-R50": (lambda: _with_ws(torchvision.models.resnet50(norm_layer=_gn), "std+eps"), _mmcv_names),
    # official BCN (rn50_bcn_ws.pth ...): group affine + pbn.*, the BCN repository's WS line
    "bcn-R50": (
        lambda: _with_ws(torchvision.models.resnet50(norm_layer=OfficialBCNorm), "var+eps"),
        lambda sd: _data_parallel(_with_update_rate(sd)),
    ),
    "bcn-X50": (lambda: _with_ws(torchvision.models.resnext50_32x4d(norm_layer=OfficialBCNorm), "var+eps"), dict),
    "bcn-R18": (lambda: _with_ws(torchvision.models.resnet18(norm_layer=OfficialBCNorm), "var+eps"), dict),
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


def relative_errors(backbone: nn.Module, kind: str, dtype: torch.dtype) -> Dict[str, float]:
    """Per stage, max |backbone - source| / max |source| on one input, both computed in ``dtype``."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        expected = stage_outputs(copy.deepcopy(source_model(kind)).to(dtype), x.to(dtype))
        actual = copy.deepcopy(backbone).to(dtype)(x.to(dtype))
    return {
        name: ((actual[name].double() - expected[name].double()).abs().max() / expected[name].abs().max()).item()
        for name in STAGES
    }
