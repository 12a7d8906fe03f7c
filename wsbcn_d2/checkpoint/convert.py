"""Convert ImageNet-pretrained WS / BCN / torchvision ResNets and BiT ResNetV2s into detectron2 checkpoints.

The ResNet sources use torchvision's ResNet / ResNeXt names (``conv1``, ``bn1``,
``layer{1-4}.{i}.conv{k}`` / ``bn{k}``, ``layer{1-4}.0.downsample.{0,1}``, ``fc``),
optionally under a DataParallel ``module.`` prefix and/or inside a training
checkpoint's ``state_dict`` entry. The layouts differ in their norms and in the
WS form the weights were trained with (:data:`~wsbcn_d2.layers.WS_FORMS`):

- ``ws``: the official WS checkpoints (``R-50-GN-WS.pth.tar`` ...) and mmdetection's
  copies of them (``open-mmlab://jhu/resnet50_gn_ws`` ...): GroupNorm, WS form
  ``"std+eps"``, eps 1e-5.
- ``bcn``: the official BCN checkpoints (``rn50_bcn_ws.pth`` ...): each norm holds
  a per-group affine of shape (1, G, 1) and an inner BatchNorm2d under ``pbn.``;
  WS form ``"var+eps"``, eps 1e-5 (``imagenet/models/layers.py`` of the BCN code).
- ``torchvision``: any other torchvision-layout ResNet (BatchNorm or GroupNorm), no WS.
- ``timm`` / ``bit``: BiT's ResNetV2 (GN, WS form ``"biased_var+eps"``, eps 1e-8,
  inputs scaled by 0.5 / 0.5) as a timm state dict or BiT's ``.npz`` (:mod:`.resnetv2`).

ResNet norms may also be named ``gn{k}`` (mmcv's ResNet, which mmdetection's
copies use), treated like ``bn{k}``. Names map onto detectron2's ResNet
(``stem.conv1``, ``res{N+1}.{i}.conv{k}[.norm]``, ``shortcut[.norm]``; a BCN's
``pbn.*`` becomes ``norm.batch_norm.*``) or the plugin's ResNetV2. The result is
checked against the plugin's own backbone built with the detected architecture
and norm, so a converted file always loads completely. The converted checkpoint
records the WS form and eps (``ws_form``, ``ws_eps``; None without WS): the
plugin's checkpointer refuses to load it into a backbone that standardizes otherwise.

The Caffe2/Detectron-named ``.pkl`` copies (``conv1_w``, ``res2_0_branch2a_gn_s``
...) need no conversion: detectron2's checkpointer renames GN blobs itself.
"""

import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Set, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY

from .. import modeling  # noqa: F401  (registers the backbones)
from ..config import add_wsbcn_config
from .io import CheckpointError, atomic_write, read_failure
from .resnetv2 import bit_to_timm_names, detect_resnetv2_layout, timm_to_backbone_names

__all__ = [
    "ConversionError",
    "ConversionResult",
    "INPUT_FORMAT",
    "LAYOUTS",
    "NORM_FAMILIES",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "Layout",
    "check_destination",
    "convert_checkpoint",
    "load_source",
    "save_checkpoint",
]

# All supported sources were trained on RGB input; the ResNets normalized with torchvision's
# mean and std, BiT with 0.5 / 0.5 (on [0, 1]), given here on the 0-255 scale detectron2 uses.
INPUT_FORMAT = "RGB"
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
BIT_PIXEL_MEAN = BIT_PIXEL_STD = (127.5, 127.5, 127.5)


class Layout(NamedTuple):
    """What a source layout implies."""

    norms: Tuple[str, ...]
    """The norm families ("GN", "BN", "BCN") the layout may hold."""
    ws_form: Optional[str]
    """The WS form the weights were trained with (:data:`~wsbcn_d2.layers.WS_FORMS`); None: no WS."""
    ws_eps: Optional[float] = None
    """That form's eps."""
    pixel_mean: Tuple[float, ...] = PIXEL_MEAN
    pixel_std: Tuple[float, ...] = PIXEL_STD
    """The input normalization the weights were trained with (0-255 scale, RGB)."""


_RESNETV2_LAYOUTS = ("timm", "bit")  # BiT's ResNetV2 as timm's state dict, or BiT's .npz
LAYOUTS: Dict[str, Layout] = {
    "ws": Layout(norms=("GN", "BN"), ws_form="std+eps", ws_eps=1e-5),
    "bcn": Layout(norms=("BCN",), ws_form="var+eps", ws_eps=1e-5),
    "torchvision": Layout(norms=("GN", "BN"), ws_form=None),
    **{
        name: Layout(
            norms=("GN",), ws_form="biased_var+eps", ws_eps=1e-8, pixel_mean=BIT_PIXEL_MEAN, pixel_std=BIT_PIXEL_STD
        )
        for name in _RESNETV2_LAYOUTS
    },
}
_AUTO_LAYOUT = {"GN": "ws", "BCN": "bcn", "BN": "torchvision"}
"""The layout auto-detection picks for each norm family."""

NORM_FAMILIES: Dict[str, str] = {
    "GN": "GN",
    "BCN": "BCN",
    "SyncBCN": "BCN",
    "BN": "BN",
    "FrozenBN": "BN",
    "SyncBN": "BN",
    "nnSyncBN": "BN",
    "naiveSyncBN": "BN",
    "naiveSyncBN_N": "BN",
}
"""Plugin norm name (``MODEL.RESNETS.NORM``) -> the checkpoint norm family it loads."""
_DEFAULT_NORM = {"GN": "GN", "BCN": "BCN", "BN": "FrozenBN"}

_NORM_PARAMS = {
    "GN": {"weight", "bias"},
    "BN": {"weight", "bias", "running_mean", "running_var"},
    "BCN": {"weight", "bias", "pbn.weight", "pbn.bias", "pbn.running_mean", "pbn.running_var"},
}
_NORM_EVIDENCE = {
    "GN": "weight and bias only",
    "BN": "weight, bias and running statistics",
    "BCN": "a (1, G, 1) group affine plus an inner BatchNorm under pbn.*",
}
_COUNTER = "num_batches_tracked"  # kept where the target backbone has this buffer (FrozenBN has none)
_UPDATE_RATE = "estbn_moving_speed"  # the official EstBN's update rate buffer

_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}

# a torchvision ResNet module name, then the parameter path inside it
_KEY_RE = re.compile(
    r"(?P<module>conv1|[bg]n1|layer(?P<stage>[1-4])\.(?P<block>\d+)\.(?P<layer>conv[1-3]|[bg]n[1-3]|downsample\.[01]))"
    r"\.(?P<param>.+)"
)
_CAFFE2_KEY_RE = re.compile(r"^(conv1|res\d_\d+_branch\w+)_(w|[bg]n_[sb])$")


class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked (layout, depth, norm or content)."""


@dataclass
class ConversionResult:
    """A converted checkpoint and what was detected and left out on the way."""

    model: Dict[str, np.ndarray]
    """detectron2 backbone names (``stem.conv1.weight``, ``res2.0.conv1.norm.batch_norm.running_mean`` ...)."""
    layout: str
    arch: str
    """e.g. "ResNet-50", "ResNeXt-50 32x4d", "ResNetV2-50x1"."""
    norm_family: str
    """The checkpoint's norms: GN, BN or BCN."""
    backbone_config: Dict[str, Any]
    """The config values of the backbone the weights fit (``MODEL.RESNETS.*`` ...)."""
    unused: Dict[str, str] = field(default_factory=dict)
    """Source key -> why it was left out (classifier, step counters ...)."""
    unmapped: List[str] = field(default_factory=list)
    """Source keys that are not part of the source architecture."""

    @property
    def ws(self) -> bool:
        """Whether the weights were trained with Weight Standardization."""
        return self.ws_form is not None

    @property
    def ws_form(self) -> Optional[str]:
        """The WS form the weights were trained with; None without WS."""
        return LAYOUTS[self.layout].ws_form

    @property
    def ws_eps(self) -> Optional[float]:
        return LAYOUTS[self.layout].ws_eps

    def config_overrides(self) -> Dict[str, Any]:
        """The config values the plugin's backbones need for these weights."""
        layout = LAYOUTS[self.layout]
        overrides = {**self.backbone_config, "MODEL.WS.ENABLED": self.ws}
        if self.ws:
            overrides.update({"MODEL.WS.FORM": self.ws_form, "MODEL.WS.EPS": self.ws_eps})
        overrides["MODEL.PIXEL_MEAN"], overrides["MODEL.PIXEL_STD"] = list(layout.pixel_mean), list(layout.pixel_std)
        overrides["INPUT.FORMAT"] = INPUT_FORMAT
        return overrides

    def checkpoint(self) -> Dict[str, Any]:
        """The detectron2 checkpoint (loaded with matching heuristics), input format and WS form included."""
        layout = LAYOUTS[self.layout]
        return {
            "model": self.model,
            "__author__": f"wsbcn_d2 convert_pretrained (from {self.layout} layout, {self.arch} {self.norm_family})",
            "matching_heuristics": True,
            "input_format": INPUT_FORMAT,
            "pixel_mean": list(layout.pixel_mean),
            "pixel_std": list(layout.pixel_std),
            "config_overrides": self.config_overrides(),
            "ws_form": self.ws_form,
            "ws_eps": self.ws_eps,
        }

    def summary(self) -> str:
        """A human-readable report: what was detected, converted and left out."""
        bcn_groups = self.backbone_config.get("MODEL.BCN.NUM_GROUPS")
        lines = [
            f"layout {self.layout}: {self.arch}, {self.norm_family} norms"
            + (f" ({bcn_groups} groups)" if bcn_groups else "")
            + (f", trained with WS form {self.ws_form!r}, eps {self.ws_eps:g}" if self.ws else ", no WS"),
            f"converted {len(self.model)} tensors",
        ]
        for reason, count in Counter(self.unused.values()).items():
            examples = [k for k, r in self.unused.items() if r == reason][:3]
            lines.append(f"not used: {count} key(s), {reason}: {', '.join(examples)}{' ...' if count > 3 else ''}")
        if self.unmapped:
            lines.append(f"could not map {len(self.unmapped)} key(s): {', '.join(self.unmapped)}")
        return "\n".join(lines)


def load_source(path: str, allow_pickle: bool = False) -> Mapping[str, Any]:
    """Load a checkpoint on CPU: ``torch.load`` (with ``weights_only`` unless ``allow_pickle``); a ``.npz``
    (BiT's) or ``.safetensors`` file as a dict of tensors.

    Raises:
        CheckpointError: naming ``path``: it is empty, truncated, not a checkpoint, holds Python
            objects (and ``allow_pickle`` is off), or needs the ``safetensors`` package.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise CheckpointError(f"{path}: reading .safetensors files needs the safetensors package") from None
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as arrays:
                return {key: torch.from_numpy(arrays[key]) for key in arrays.files}
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise read_failure(path, e) from e
        raise CheckpointError(
            f"{path} is not a plain-tensor torch checkpoint ({str(e).splitlines()[0]}). A Caffe2/Detectron "
            "'.pkl' needs no conversion: use it directly as MODEL.WEIGHTS. If this is a torch checkpoint "
            "holding other Python objects and you trust it, re-run with --allow-pickle."
        ) from e
    except Exception as e:  # an unreadable file fails in many ways, see read_failure
        raise read_failure(path, e) from e


def _state_dict(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """The state_dict of a raw, training (``state_dict``) or detectron2 (``model``) checkpoint, without ``module.``."""
    for wrapper in ("state_dict", "model"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            checkpoint = checkpoint[wrapper]
            break
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in checkpoint.items()}


def _d2_module(match: "re.Match[str]") -> str:
    """detectron2 name of the torchvision module matched by ``_KEY_RE``."""
    module, layer = match["module"], match["layer"]
    if layer is None:
        return "stem.conv1" if module == "conv1" else "stem.conv1.norm"
    prefix = f"res{int(match['stage']) + 1}.{match['block']}."
    if layer.startswith("downsample"):
        return prefix + ("shortcut" if layer.endswith("0") else "shortcut.norm")
    return prefix + (layer if layer.startswith("conv") else f"conv{layer[2]}.norm")


def _classify_norm(module: str, params: Mapping[str, torch.Tensor]) -> str:
    names = {name for name in params if not name.endswith(_COUNTER)}
    for family, expected in _NORM_PARAMS.items():
        if names == expected:
            return family
    raise ConversionError(
        f"norm layer {module} holds {sorted(names)}: not GroupNorm {sorted(_NORM_PARAMS['GN'])}, "
        f"BatchNorm {sorted(_NORM_PARAMS['BN'])} or BCN {sorted(_NORM_PARAMS['BCN'])}"
    )


def _depth(modules: Mapping[str, Any], blocks: Mapping[int, Set[int]]) -> Tuple[int, str, List[int]]:
    """(depth, block kind, blocks per stage) from the block indices seen in each stage."""
    counts = [len(blocks[s]) for s in range(1, 5)]
    for stage, ids in blocks.items():
        if ids != set(range(len(ids))):
            raise ConversionError(f"layer{stage} has blocks {sorted(ids)}: expected 0..n-1")
    kind = "bottleneck" if "layer1.0.conv3" in modules else "basic"
    if (kind, tuple(counts)) not in _DEPTHS:
        known = ", ".join(f"{d}: {list(c)} {k}" for (k, c), d in _DEPTHS.items())
        raise ConversionError(f"{kind} blocks per stage {counts} match no ResNet depth (known: {known})")
    return _DEPTHS[kind, tuple(counts)], kind, counts


def _groups(modules: Mapping[str, Dict[str, torch.Tensor]], kind: str) -> Tuple[int, int]:
    """(cardinality, width per group) from the first bottleneck's 3x3 conv."""
    if kind == "basic":
        return 1, 64
    conv1, conv2 = (modules.get(f"layer1.0.conv{k}", {}).get("weight") for k in (1, 2))
    if conv1 is None or conv2 is None:
        raise ConversionError("layer1.0.conv1.weight or layer1.0.conv2.weight is missing")
    groups = conv1.shape[0] // conv2.shape[1]
    return groups, conv1.shape[0] // groups


def _expected_shapes(overrides: Mapping[str, Any], backbone_name: str) -> Dict[str, Tuple[int, ...]]:
    """State shapes of the plugin's (unfrozen) backbone ``backbone_name`` for ``overrides``, built on the
    meta device with outputs res2-res5."""
    cfg: CfgNode = get_cfg()
    add_wsbcn_config(cfg)
    cfg.merge_from_list([x for item in overrides.items() for x in item])
    cfg.MODEL.META_ARCHITECTURE = "ProposalNetwork"  # the backbone alone: no head reads its norm
    cfg.MODEL.BACKBONE.NAME = backbone_name
    cfg.MODEL.RESNETS.OUT_FEATURES = cfg.MODEL.RESNETV2.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.GN.NUM_GROUPS = 1  # a GroupNorm's parameters are per channel whatever its groups (not in the file)
    try:
        with torch.device("meta"):
            backbone = BACKBONE_REGISTRY.get(backbone_name)(cfg, ShapeSpec(channels=3))
    except ValueError as e:
        raise ConversionError(f"the weights imply a backbone the plugin cannot build: {e}") from e
    return {k: tuple(v.shape) for k, v in backbone.state_dict().items()}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t).numpy()


def convert_checkpoint(
    checkpoint: Mapping[str, Any],
    *,
    layout: Optional[str] = None,
    expect_depth: Optional[int] = None,
    expect_norm: Optional[str] = None,
) -> ConversionResult:
    """Convert a torchvision-layout ResNet/ResNeXt, or a timm / BiT ResNetV2, checkpoint to detectron2 names.

    Args:
        checkpoint: a state_dict, possibly with a ``module.`` prefix or inside a
            ``state_dict`` / ``model`` entry (as ``torch.load`` returns it).
        layout: one of :data:`LAYOUTS`; None detects it from the names (ResNetV2) or norms.
        expect_depth: refuse a checkpoint of another depth.
        expect_norm: a plugin norm name (:data:`NORM_FAMILIES`); refuse a
            checkpoint whose norms cannot load into it. Also the norm named
            in the config overrides (default: GN, BCN or FrozenBN).

    Raises:
        ConversionError: unknown layout, mismatched depth/norm/layout, or
            weights missing for the detected architecture.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if expect_norm is not None and expect_norm not in NORM_FAMILIES:
        raise ConversionError(f"unknown norm {expect_norm!r}; choose from {', '.join(NORM_FAMILIES)}")
    state = _state_dict(checkpoint)
    resnetv2_layout = detect_resnetv2_layout(state)
    if resnetv2_layout is not None or layout in _RESNETV2_LAYOUTS:
        return _convert_resnetv2(state, resnetv2_layout, layout, expect_depth, expect_norm)
    modules: Dict[str, Dict[str, torch.Tensor]] = {}
    d2_names: Dict[str, str] = {}
    unused: Dict[str, str] = {}
    unmapped: List[str] = []
    blocks: Dict[int, Set[int]] = {stage: set() for stage in range(1, 5)}
    for key, value in state.items():
        m = _KEY_RE.fullmatch(key)
        if key.startswith("fc."):
            unused[key] = "ImageNet classifier"
        elif m is None:
            unmapped.append(key)
        elif key.endswith(_UPDATE_RATE):
            unused[key] = "BCN estimate update rate (MODEL.BCN.UPDATE_RATE sets it)"
        elif not isinstance(value, torch.Tensor):
            raise ConversionError(f"{key} holds a {type(value).__name__}, not a tensor")
        else:
            modules.setdefault(m["module"], {})[m["param"]] = value
            d2_names[m["module"]] = _d2_module(m)
            if m["stage"]:
                blocks[int(m["stage"])].add(int(m["block"]))
    if "conv1" not in modules or not any(d2_names[name].endswith(".norm") for name in modules):
        hint = (
            " These are Caffe2/Detectron names: detectron2 loads such a .pkl directly as MODEL.WEIGHTS."
            if any(_CAFFE2_KEY_RE.match(k) for k in state)
            else ""
        )
        raise ConversionError(
            f"not a torchvision-layout ResNet (expected conv1.weight, bn1.*, layer1-4.*); saw {len(state)} keys, "
            f"e.g. {', '.join(list(state)[:8])}.{hint}"
        )

    norm_modules = {name: params for name, params in modules.items() if d2_names[name].endswith(".norm")}
    families = {name: _classify_norm(name, params) for name, params in norm_modules.items()}
    if len(set(families.values())) > 1:
        raise ConversionError(f"mixed norm layers: {dict(Counter(families.values()))}")
    family = next(iter(families.values()))
    if layout is None:
        layout = _AUTO_LAYOUT[family]
    elif family not in LAYOUTS[layout].norms:
        raise ConversionError(
            f"layout {layout!r} holds {' or '.join(LAYOUTS[layout].norms)} norms, but this checkpoint's norms are "
            f"{family} ({_NORM_EVIDENCE[family]})"
        )
    if expect_norm is not None and NORM_FAMILIES[expect_norm] != family:
        raise ConversionError(
            f"norm mismatch: the checkpoint's norms are {family} ({_NORM_EVIDENCE[family]}), but {expect_norm} was "
            f"asked, which loads {NORM_FAMILIES[expect_norm]} weights ({_NORM_EVIDENCE[NORM_FAMILIES[expect_norm]]})"
        )
    depth, kind, counts = _depth(modules, blocks)
    if expect_depth is not None and expect_depth != depth:
        raise ConversionError(
            f"depth mismatch: the checkpoint is a ResNet-{depth} ({kind} blocks per stage {counts}), "
            f"but depth {expect_depth} was asked"
        )

    model: Dict[str, np.ndarray] = {}
    source_keys: Dict[str, str] = {}
    bcn_groups: Set[int] = set()
    for name, params in modules.items():
        for param, value in params.items():
            if family == "BCN" and name in norm_modules and param in ("weight", "bias"):
                if value.dim() != 3 or value.shape[0] != 1 or value.shape[2] != 1:
                    raise ConversionError(
                        f"BCN affine {name}.{param} has shape {tuple(value.shape)}, expected (1, G, 1)"
                    )
                bcn_groups.add(value.shape[1])
                value = value.reshape(-1)
            d2_key = f"{d2_names[name]}.{param.replace('pbn.', 'batch_norm.')}"
            model[d2_key], source_keys[d2_key] = _to_numpy(value), f"{name}.{param}"
    if len(bcn_groups) > 1:
        raise ConversionError(f"BCN layers use different group counts {sorted(bcn_groups)}")

    num_groups, width_per_group = _groups(modules, kind)
    norm = expect_norm or _DEFAULT_NORM[family]
    backbone_config = {
        "MODEL.RESNETS.DEPTH": depth,
        "MODEL.RESNETS.NORM": norm,
        "MODEL.RESNETS.STRIDE_IN_1X1": False,
        "MODEL.RESNETS.NUM_GROUPS": num_groups,
        "MODEL.RESNETS.WIDTH_PER_GROUP": width_per_group,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": 64 if depth < 50 else 256,
    }
    if bcn_groups:
        backbone_config["MODEL.BCN.NUM_GROUPS"] = bcn_groups.pop()
    resnext = (num_groups, width_per_group) != (1, 64)
    arch = f"ResNeXt-{depth} {num_groups}x{width_per_group}d" if resnext else f"ResNet-{depth}"
    result = ConversionResult(model, layout, arch, family, backbone_config, unused, unmapped)
    expected = _expected_shapes(result.config_overrides(), "build_ws_resnet_backbone")
    for key in [k for k in model if k.endswith(_COUNTER) and k not in expected]:
        del model[key]
        unused[source_keys[key]] = f"BatchNorm step counter ({norm} has none)"
    _check_complete(result, norm, expected)
    return result


def _convert_resnetv2(
    state: Dict[str, Any],
    detected: Optional[str],
    layout: Optional[str],
    expect_depth: Optional[int],
    expect_norm: Optional[str],
) -> ConversionResult:
    """:func:`convert_checkpoint` of a timm / BiT ResNetV2 (see :mod:`.resnetv2`)."""
    if layout is not None and layout != detected:
        found = f"{detected} ResNetV2 names" if detected else "no timm / BiT ResNetV2 names"
        raise ConversionError(f"layout {layout!r} was asked, but the checkpoint has {found}")
    if expect_norm is not None and NORM_FAMILIES[expect_norm] != "GN":
        raise ConversionError(f"norm mismatch: BiT's ResNetV2 weights hold GN norms, but {expect_norm} was asked")
    unused: Dict[str, str] = {}
    unmapped: List[str] = []
    if detected == "bit":
        state, unused, unmapped = bit_to_timm_names(state)
    try:
        model, more_unused, more_unmapped, depth, width = timm_to_backbone_names(state)
    except ValueError as e:
        raise ConversionError(str(e)) from e
    if expect_depth is not None and expect_depth != depth:
        raise ConversionError(
            f"depth mismatch: the checkpoint is a ResNetV2-{depth}, but depth {expect_depth} was asked"
        )
    backbone_config = {"MODEL.RESNETV2.DEPTH": depth, "MODEL.RESNETV2.WIDTH_FACTOR": width, "MODEL.RESNETV2.NORM": "GN"}
    result = ConversionResult(
        {k: _to_numpy(v) for k, v in model.items()},
        detected,
        f"ResNetV2-{depth}x{width:g}",
        "GN",
        backbone_config,
        {**unused, **more_unused},
        unmapped + more_unmapped,
    )
    _check_complete(result, "GN", _expected_shapes(result.config_overrides(), "build_ws_resnetv2_backbone"))
    return result


def _check_complete(result: ConversionResult, norm: str, expected: Mapping[str, Tuple[int, ...]]) -> None:
    """Raise unless ``result.model`` fills the backbone with ``norm`` norms whose state has ``expected`` shapes."""
    missing = sorted(k for k in set(expected) - set(result.model) if not k.endswith(_COUNTER))
    wrong = [
        f"{k} {tuple(v.shape)} (backbone: {expected[k]})"
        for k, v in result.model.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    extra = sorted(set(result.model) - set(expected))
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (("missing", missing), ("wrong shape", wrong), ("no place in the backbone", extra))
        if keys
    ]
    if problems:
        raise ConversionError(
            f"the checkpoint does not fit detectron2's {result.arch} with {norm} norms; " + "; ".join(problems)
        )


def check_destination(path: str) -> None:
    """Raise a :class:`CheckpointError` unless ``path`` is a ``.pkl`` file name in a writable directory.

    Creates the directory if needed; run it before the conversion work.
    """
    if not path.endswith(".pkl"):
        raise CheckpointError(f"{path}: the output must be a .pkl file (detectron2 loads .pkl with name matching)")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if not os.access(directory, os.W_OK):
        raise CheckpointError(f"{path}: cannot write into {directory}")


def save_checkpoint(result: ConversionResult, path: str) -> None:
    """Write ``result.checkpoint()`` atomically as a detectron2 ``.pkl`` (usable as MODEL.WEIGHTS)."""
    check_destination(path)
    with atomic_write(path, "wb") as f:
        pickle.dump(result.checkpoint(), f)
