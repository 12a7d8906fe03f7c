#!/usr/bin/env python
"""detectron2's standard training script with wsbcn_d2 loaded.

Same flags as detectron2's tools/train_net.py, plus ``--register-coco NAME
JSON_FILE IMAGE_ROOT`` (repeatable) to use any COCO-format dataset by name.
Datasets with RLE masks switch INPUT.MASK_FORMAT to "bitmask" automatically.
"""
import _startup  # noqa: F401  (first: quiets detectron2's import, see tools/_startup.py)
import logging
import os

import detectron2.utils.comm as comm
from detectron2.config import CfgNode
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils.logger import setup_logger

from wsbcn_d2.checkpoint import check_weights
from wsbcn_d2.config import amp_dtype, check_batch_split, check_device, check_frozen_stages, load_config
from wsbcn_d2.data import add_register_coco_argument, check_dataset_names, infer_mask_format, register_coco_dataset
from wsbcn_d2.engine import Trainer, available_cpus, launch

logger = logging.getLogger("wsbcn_d2")


def argument_parser():
    parser = default_argument_parser()
    add_register_coco_argument(parser)
    return parser


def setup(args) -> CfgNode:
    for name, json_file, image_root in args.register_coco:
        register_coco_dataset(name, json_file, image_root)
    cfg = load_config(args.config_file, args.opts)
    # detectron2's default "polygon" fails on RLE masks; "bitmask" reads both
    to_bitmask = (
        cfg.MODEL.MASK_ON
        and cfg.INPUT.MASK_FORMAT == "polygon"
        and not args.eval_only
        and infer_mask_format(cfg.DATASETS.TRAIN, require_masks=True) == "bitmask"
    )
    if to_bitmask:
        cfg.INPUT.MASK_FORMAT = "bitmask"
    workers, cpus = cfg.DATALOADER.NUM_WORKERS, available_cpus()
    cfg.DATALOADER.NUM_WORKERS = min(workers, cpus)  # more only slow the training process down
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="wsbcn_d2")
    if to_bitmask:
        logger.info(f"INPUT.MASK_FORMAT set to 'bitmask': {cfg.DATASETS.TRAIN} hold RLE masks.")
    if workers > cpus:
        logger.info(f"DATALOADER.NUM_WORKERS {workers} lowered to {cpus}, the CPUs this process may use.")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        Trainer.build_checkpointer(cfg, model, evaluation=True).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def check_inputs(args) -> None:
    """Check the datasets, config and weights that setup() and training read, writing nothing.

    Run in the launching process: bad input fails in one line (an OSError or ValueError
    naming its key or file) before any worker starts or OUTPUT_DIR is touched.
    """
    for name, json_file, image_root in args.register_coco:
        register_coco_dataset(name, json_file, image_root)
    cfg = load_config(args.config_file, args.opts)
    check_device(cfg)
    check_batch_split(cfg.SOLVER.IMS_PER_BATCH, args.num_gpus * args.num_machines, cfg.SOLVER.ACCUMULATION_STEPS)
    amp_dtype(cfg.SOLVER.AMP.PRECISION)
    check_dataset_names(cfg.DATASETS.TEST, "DATASETS.TEST")
    if not args.eval_only:
        check_dataset_names(cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
        if not (args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
            check_frozen_stages(cfg)
        if cfg.MODEL.MASK_ON:
            infer_mask_format(cfg.DATASETS.TRAIN, require_masks=True)
    check_weights(cfg, resume=args.resume, evaluation=args.eval_only)


def invoke_main() -> None:
    parser = argument_parser()
    args = parser.parse_args()
    print("Command Line Args:", args)
    try:  # fail early and plainly on bad input; workers check again in setup() and when loading weights
        check_inputs(args)
    except (OSError, ValueError) as e:
        parser.error(str(e))
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
