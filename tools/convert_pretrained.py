#!/usr/bin/env python
"""Convert an ImageNet-pretrained WS / BCN / torchvision ResNet or BiT ResNetV2 into a detectron2 checkpoint.

    python tools/convert_pretrained.py R-50-GN-WS.pth.tar pretrained/R-50-GN-WS.pkl --depth 50 --norm GN
    python tools/convert_pretrained.py rn50_bcn_ws.pth pretrained/rn50_bcn_ws.pkl --depth 50 --norm BCN
    python tools/convert_pretrained.py model.safetensors pretrained/bit_r50x1.pkl --depth 50   # timm BiT
    python tools/convert_pretrained.py BiT-M-R50x1.npz pretrained/bit_r50x1.pkl --depth 50     # BiT .npz

The layout (official WS, official BCN, plain torchvision, timm or BiT ResNetV2) is
detected from the names and norm layers unless --layout forces it. The output .pkl
is meant for MODEL.WEIGHTS with the plugin's backbones; it records the input
format and WS form the weights expect, and the config values they need are printed.
"""

import _startup  # noqa: F401  (first: quiets detectron2's import, see tools/_startup.py)
import argparse
import shlex
import sys
from typing import List, Optional

from wsbcn_d2.checkpoint import (
    LAYOUTS,
    NORM_FAMILIES,
    CheckpointError,
    ConversionError,
    check_destination,
    convert_checkpoint,
    load_source,
    save_checkpoint,
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "source", metavar="SOURCE", help="checkpoint to convert (.pth, .pth.tar, .bin, .safetensors, BiT's .npz)"
    )
    parser.add_argument("dest", metavar="DEST", help="detectron2 checkpoint to write (.pkl)")
    parser.add_argument(
        "--layout",
        choices=["auto", *LAYOUTS],
        default="auto",
        help="source layout; auto: timm or bit for ResNetV2 names, else bcn if the norms hold pbn.*, ws if they "
        "are GroupNorms, else torchvision (use --layout torchvision for GroupNorm weights trained without WS, "
        "--layout ws for BN+WS)",
    )
    parser.add_argument(
        "--depth", type=int, choices=[18, 34, 50, 101, 152], help="refuse a checkpoint of another depth"
    )
    parser.add_argument(
        "--norm",
        choices=list(NORM_FAMILIES),
        help="the MODEL.RESNETS.NORM you will train with; refuse a checkpoint whose norms cannot load into it",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load SOURCE with torch.load(weights_only=False): only for files you trust",
    )
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        check_destination(args.dest)
        result = convert_checkpoint(
            load_source(args.source, allow_pickle=args.allow_pickle),
            layout=None if args.layout == "auto" else args.layout,
            expect_depth=args.depth,
            expect_norm=args.norm,
        )
        save_checkpoint(result, args.dest)
    except ConversionError as e:  # about SOURCE's content
        print(f"error: {args.source}: {e}", file=sys.stderr)
        return 1
    except (CheckpointError, OSError) as e:  # these name their file
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(result.summary())
    print(f"wrote {args.dest}")
    opts = " ".join(
        f"{key} {shlex.quote(str(value).replace(' ', ''))}" for key, value in result.config_overrides().items()
    )
    print(
        "Config values these weights need (configs/COCO-* set them for R-50/R-101; otherwise append them to "
        f"tools/train_net.py's command line):\n  MODEL.WEIGHTS {shlex.quote(args.dest)} {opts}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
