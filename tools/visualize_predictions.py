#!/usr/bin/env python
"""Draw a trained model's predictions beside the ground truth, one PNG per image.

    python tools/visualize_predictions.py --config-file CONFIG --output DIR \
        [--register-coco NAME JSON_FILE IMAGE_ROOT] [--dataset NAME] [--num-images N] \
        [--score-threshold T] [KEY VALUE ...]

Uses the config's first test dataset unless --dataset is given; trailing
KEY VALUE pairs override the config (e.g. MODEL.WEIGHTS out/model_final.pth).
"""
import _startup  # noqa: F401  (first: quiets detectron2's import, see tools/_startup.py)
import argparse
import os

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import convert_image_to_rgb, read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.logger import setup_logger
from detectron2.utils.visualizer import Visualizer
from PIL import Image

from wsbcn_d2.checkpoint import check_weights
from wsbcn_d2.config import check_device, load_config
from wsbcn_d2.data import add_register_coco_argument, check_dataset_names, register_coco_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="folder for the PNG files")
    parser.add_argument("--dataset", help="registered dataset (default: the config's first test set)")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--score-threshold", type=float, default=0.5)
    parser.add_argument("--scale", type=float, default=3.0, help="drawing scale (small images read better enlarged)")
    add_register_coco_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE pairs")
    args = parser.parse_args()
    setup_logger(name="wsbcn_d2")

    try:  # bad input fails in one line before anything is written
        for name, json_file, image_root in args.register_coco:
            register_coco_dataset(name, json_file, image_root)
        cfg = load_config(args.config_file, args.opts)
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = args.score_threshold
        cfg.freeze()
        check_device(cfg)
        if not (args.dataset or cfg.DATASETS.TEST):
            raise ValueError("DATASETS.TEST is empty: give --dataset NAME")
        dataset = args.dataset or cfg.DATASETS.TEST[0]
        check_dataset_names([dataset], "--dataset" if args.dataset else "DATASETS.TEST")
        check_weights(cfg, evaluation=True)  # weights that do not fit the config, before DefaultPredictor loads them
    except (OSError, ValueError) as e:
        parser.error(str(e))
    metadata = MetadataCatalog.get(dataset)
    predictor = DefaultPredictor(cfg)

    os.makedirs(args.output, exist_ok=True)
    for record in DatasetCatalog.get(dataset)[: args.num_images]:
        image = read_image(record["file_name"], format=cfg.INPUT.FORMAT)
        rgb = convert_image_to_rgb(image, cfg.INPUT.FORMAT)
        instances = predictor(image)["instances"].to("cpu")
        truth = Visualizer(rgb, metadata, scale=args.scale).draw_dataset_dict(record).get_image()
        prediction = Visualizer(rgb, metadata, scale=args.scale).draw_instance_predictions(instances).get_image()
        gap = np.full((truth.shape[0], 8, 3), 255, dtype=np.uint8)
        name = os.path.splitext(os.path.basename(record["file_name"]))[0]
        path = os.path.join(args.output, f"{name}.png")
        Image.fromarray(np.concatenate([truth, gap, prediction], axis=1)).save(path)
        print(f"{path}: {len(instances)} predictions (left: ground truth, right: prediction)")


if __name__ == "__main__":
    main()
