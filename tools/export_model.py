#!/usr/bin/env python
"""Export a trained WS / BCN detector to ONNX or TorchScript, and check the export against PyTorch.

    python tools/export_model.py --config-file CONFIG --format onnx --output DIR \
        [--register-coco NAME JSON_FILE IMAGE_ROOT] [--sample-image IMAGE | --num-samples N] [--time RUNS] \
        MODEL.WEIGHTS model_final.pth [KEY VALUE ...]

As detectron2's tools/deploy/export_model.py (tracing): the model is folded
(wsbcn_d2.fold_for_inference: WS and BCN's batch step baked into plain convs and
group norms), wrapped in detectron2's TracingAdapter, traced on the first sample
and written to DIR/model.onnx (opset 17, standard ONNX ops only) or DIR/model.ts.
The exported file is then run (onnxruntime, or torch.jit.load) on every sample and
its detections compared with the folded and the unfolded PyTorch model's. Samples:
--sample-image, else the first --num-samples images of the config's first test
set, resized as detectron2's DefaultPredictor does. The exported graph takes images
of any size.
"""
import _startup  # noqa: F401  (first: quiets detectron2's import, see tools/_startup.py)
import argparse
import statistics
import sys
import time
from typing import List, Optional, Sequence

import onnx
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.utils.logger import setup_logger

from wsbcn_d2.checkpoint import CheckpointError, WSBCNCheckpointer
from wsbcn_d2.config import load_config
from wsbcn_d2.data import add_register_coco_argument, check_dataset_names, register_coco_dataset
from wsbcn_d2.export import (
    EXPORT_FORMATS,
    ONNX_OPSET,
    ExportError,
    compare_detections,
    export,
    inference_function,
    load_exported,
    onnx_op_types,
    tracing_adapter,
)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE")
    parser.add_argument("--format", choices=list(EXPORT_FORMATS), default="onnx")
    parser.add_argument("--export-method", choices=["tracing"], default="tracing", help="only tracing is supported")
    parser.add_argument("--output", required=True, help="folder for model.onnx / model.ts")
    parser.add_argument("--sample-image", help="image to trace and check on (default: the test set's images)")
    parser.add_argument("--num-samples", type=int, default=1, help="test-set images to check on (default 1)")
    parser.add_argument("--time", type=int, default=0, metavar="RUNS", help="time RUNS inferences of each model")
    add_register_coco_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    return parser.parse_args(argv)


def export_config(args: argparse.Namespace) -> CfgNode:
    """The config of ``args`` on CPU (the export runs there), its datasets registered."""
    for name, json_file, image_root in args.register_coco:
        register_coco_dataset(name, json_file, image_root)
    cfg = load_config(args.config_file, args.opts)
    cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def network_inputs(cfg: CfgNode, args: argparse.Namespace) -> List[torch.Tensor]:
    """The samples as (3, H, W) network inputs, read and resized as DefaultPredictor does."""
    if args.sample_image:
        paths = [args.sample_image]
    else:
        if not cfg.DATASETS.TEST:
            raise ExportError("DATASETS.TEST is empty: give --sample-image")
        check_dataset_names(cfg.DATASETS.TEST[:1], "DATASETS.TEST")
        paths = [record["file_name"] for record in DatasetCatalog.get(cfg.DATASETS.TEST[0])[: args.num_samples]]
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    images = []
    for path in paths:
        image = read_image(path, format=cfg.INPUT.FORMAT)
        image = resize.get_transform(image).apply_image(image)
        images.append(torch.as_tensor(image.astype("float32").transpose(2, 0, 1)))
    return images


def median_ms(fn, image: torch.Tensor, runs: int) -> float:
    times = []
    for _ in range(runs + 1):  # the first run warms up
        start = time.perf_counter()
        fn(image)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1000


def report(rows: Sequence) -> None:
    # detections paired by class and box (runtimes order near-equal scores differently); differences over the pairs
    print(f"{'':34} {'detections':>10} {'max |box|':>10} {'max |score|':>11} {'unpaired':>8} {'max |mask|':>10}")
    for label, diff in rows:
        print(
            f"{label:34} {diff.counts[0]:>4} / {diff.counts[1]:<3} {diff.boxes:>10.2e} {diff.scores:>11.2e} "
            f"{diff.unpaired:>8} {diff.masks:>10.2e}"
        )


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    setup_logger(name="wsbcn_d2")
    try:
        cfg = export_config(args)
        images = network_inputs(cfg, args)
        model = build_model(cfg).eval()
        inference_function(model)  # an architecture without an export path fails before any loading
        if cfg.MODEL.WEIGHTS:
            WSBCNCheckpointer.from_cfg(cfg, model, evaluation=True).load(cfg.MODEL.WEIGHTS)
        else:
            print("warning: MODEL.WEIGHTS is empty: exporting randomly initialized weights", file=sys.stderr)
        adapter = tracing_adapter(model, images[0])
        unfolded = tracing_adapter(model, images[0], fold=False)
        try:
            path = export(adapter, images[0], args.format, args.output)
        except Exception as e:  # the tracer and exporter fail in many ways; keep their first line
            raise ExportError(f"{args.format} export failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        exported = load_exported(path)
    except (ExportError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    if args.format == "onnx":
        ops = onnx_op_types(onnx.load(path))
        custom = {domain: sorted(types) for domain, types in ops.items() if domain not in ("", "ai.onnx")}
        standard = sorted(ops.get("", ()))
        print(f"ONNX opset {ONNX_OPSET}, {len(standard)} standard op types: {', '.join(standard)}")
        print(f"custom ops: {custom or 'none'}")
    runtime = "onnxruntime" if args.format == "onnx" else "TorchScript"
    rows = []
    with torch.no_grad():
        for i, image in enumerate(images):
            folded_out = adapter(image)
            rows.append((f"sample {i}: {runtime} vs folded", compare_detections(adapter, exported(image), folded_out)))
            rows.append((f"sample {i}: folded vs unfolded", compare_detections(adapter, folded_out, unfolded(image))))
    report(rows)
    if args.time > 0:
        with torch.no_grad():
            exported_ms = median_ms(exported, images[0], args.time)
            folded_ms = median_ms(adapter, images[0], args.time)
        print(
            f"inference on {tuple(images[0].shape[1:])}, median of {args.time} runs, "
            f"{torch.get_num_threads()} threads: "
            f"{runtime} {exported_ms:.1f} ms, PyTorch folded {folded_ms:.1f} ms, ratio {exported_ms / folded_ms:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
