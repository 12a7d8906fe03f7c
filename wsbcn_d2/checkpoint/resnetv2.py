"""timm and BiT ResNetV2 checkpoints -> the names of :class:`wsbcn_d2.modeling.resnetv2.ResNetV2`.

- ``timm``: a state dict of timm's ``resnetv2_*_bit`` models (``.pth``, ``.bin``,
  ``.safetensors``): ``stem.conv``, ``stages.{i}.blocks.{j}.{norm1,conv1,...,conv3}``,
  ``stages.{i}.blocks.0.downsample.conv``, ``norm``, ``head.fc``.
- ``bit``: BiT's original ``.npz`` (``resnet/root_block/standardized_conv2d/kernel``,
  ``resnet/block{i}/unit{jj}/{a,b,c}/...``, ``a/proj/...``, ``resnet/group_norm``,
  ``resnet/head/conv2d``), conv kernels in TF's (H, W, in, out) order: renamed to
  timm's names and transposed to (out, in, H, W), as BiT's own PyTorch loader does.

timm's names map onto the backbone's with ``stages.{i}.blocks.{j}`` -> ``res{i+2}.{j}``
and ``downsample.conv`` -> ``shortcut``; the classifier head is left out.
"""
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..modeling.resnetv2 import RESNETV2_DEPTHS

__all__ = ["bit_to_timm_names", "detect_resnetv2_layout", "timm_to_backbone_names"]

_BIT_PREFIX = "resnet/"
_BIT_UNIT = re.compile(r"block(\d)/unit(\d+)/([abc])/(proj/)?(standardized_conv2d/kernel|group_norm/(gamma|beta))")
_TIMM_BLOCK = re.compile(r"stages\.(\d)\.blocks\.(\d+)\.(norm[1-3]\.\w+|conv[1-3]\.weight|downsample\.conv\.weight)")
_NORM_PARAM = {"gamma": "weight", "beta": "bias"}


def detect_resnetv2_layout(state: Mapping[str, Any]) -> Optional[str]:
    """``"bit"`` for BiT's ``.npz`` names, ``"timm"`` for timm's ResNetV2 names, else None."""
    if any(k.startswith(_BIT_PREFIX + "root_block/") for k in state):
        return "bit"
    if "stem.conv.weight" in state and any(k.startswith("stages.") for k in state):
        return "timm"
    return None


def bit_to_timm_names(
    state: Mapping[str, torch.Tensor]
) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], List[str]]:
    """BiT ``.npz`` arrays under timm's names, conv kernels transposed to (out, in, H, W); the keys left
    out (-> why: the classifier head); and the keys that are not part of BiT's ResNetV2."""
    renamed, unused, unmapped = {}, {}, []
    for key, value in state.items():
        name = key[len(_BIT_PREFIX) :] if key.startswith(_BIT_PREFIX) else key
        unit = _BIT_UNIT.fullmatch(name)
        if name == "root_block/standardized_conv2d/kernel":
            timm_name = "stem.conv.weight"
        elif name in ("group_norm/gamma", "group_norm/beta"):
            timm_name = f"norm.{_NORM_PARAM[name.rsplit('/', 1)[1]]}"
        elif name.startswith("head/"):
            unused[key] = "ImageNet classifier"
            continue
        elif unit is not None:
            stage, block, letter, proj, _, norm_param = unit.groups()
            prefix = f"stages.{int(stage) - 1}.blocks.{int(block) - 1}."
            index = "abc".index(letter) + 1
            if proj:
                timm_name = prefix + "downsample.conv.weight"
            elif norm_param:
                timm_name = prefix + f"norm{index}.{_NORM_PARAM[norm_param]}"
            else:
                timm_name = prefix + f"conv{index}.weight"
        else:
            unmapped.append(key)
            continue
        renamed[timm_name] = value.permute(3, 2, 0, 1).contiguous() if value.dim() == 4 else value
    return renamed, unused, unmapped


def timm_to_backbone_names(
    state: Mapping[str, torch.Tensor]
) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], List[str], int, float]:
    """Map a timm ResNetV2 state dict onto the backbone's names.

    Returns:
        the mapped tensors, unused keys (-> why), unmapped keys, the depth (from the blocks per
        stage) and the width factor (the stem's width / 64).

    Raises:
        ValueError: the blocks per stage match no ResNetV2 depth, or the norms keep running
            statistics (timm's BatchNorm ResNetV2s, not BiT's GN+WS ones).
    """
    model, unused, unmapped = {}, {}, []
    blocks: Dict[int, set] = {stage: set() for stage in range(4)}
    for key, value in state.items():
        block = _TIMM_BLOCK.fullmatch(key)
        if key.startswith("head."):
            unused[key] = "ImageNet classifier"
        elif key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            raise ValueError(
                f"{key}: these ResNetV2 norms keep running statistics (a BatchNorm model such as timm's resnetv2_50); "
                "BiT's ResNetV2s (resnetv2_*_bit) use GroupNorm + WS"
            )
        elif key in ("stem.conv.weight", "norm.weight", "norm.bias"):
            model[key] = value
        elif block is not None:
            stage, index, param = int(block[1]), int(block[2]), block[3]
            blocks[stage].add(index)
            model[f"res{stage + 2}.{index}.{param.replace('downsample.conv', 'shortcut')}"] = value
        else:
            unmapped.append(key)
    counts = [len(blocks[stage]) for stage in range(4)]
    depths = {tuple(v): k for k, v in RESNETV2_DEPTHS.items()}
    if tuple(counts) not in depths:
        known = ", ".join(f"{d}: {c}" for d, c in RESNETV2_DEPTHS.items())
        raise ValueError(f"blocks per stage {counts} match no ResNetV2 depth (known: {known})")
    stem = state.get("stem.conv.weight")
    if stem is None:
        raise ValueError("stem.conv.weight is missing")
    return model, unused, unmapped, depths[tuple(counts)], stem.shape[0] / 64
