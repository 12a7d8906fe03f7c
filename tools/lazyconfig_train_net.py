#!/usr/bin/env python
"""Train or evaluate a model described by a LazyConfig (a Python config), with wsbcn_d2 loaded.

Flags as detectron2's lazyconfig_train_net.py: ``--config-file``, ``--num-gpus``,
``--num-machines``, ``--machine-rank``, ``--dist-url``, ``--resume``, ``--eval-only``
and trailing ``path.to.key=value`` overrides. ``train.accumulation_steps`` (default 1)
forwards per optimizer step, ``dataloader.train.total_batch_size`` images per optimizer step
over all processes, ``train.amp.precision`` ("float16" or "bfloat16") autocast's dtype under
``train.amp.enabled`` (:class:`wsbcn_d2.engine.AccumulatingTrainer`). WS models name
:func:`wsbcn_d2.modeling.build_ws_model` as the model's ``_target_``, e.g.
configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_bcn_ws.py.
"""
import _startup  # noqa: F401  (first: quiets detectron2's import, see tools/_startup.py)
import logging

from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, default_writers, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from omegaconf import DictConfig
from torch import nn

from wsbcn_d2.checkpoint import WSBCNCheckpointer
from wsbcn_d2.config import amp_dtype, check_batch_split
from wsbcn_d2.engine import AccumulatingTrainer, ProgressWriter, create_ddp_model, launch

logger = logging.getLogger("detectron2")


def evaluate(cfg: DictConfig, model: nn.Module) -> dict:
    """Run ``cfg.dataloader.evaluator`` on ``cfg.dataloader.test``; {} when the config has no evaluator."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator))
    print_csv_format(results)
    return results


def train(cfg: DictConfig, resume: bool) -> None:
    steps = cfg.train.get("accumulation_steps", 1)
    keys = ("dataloader.train.total_batch_size", "train.accumulation_steps")
    check_batch_split(cfg.dataloader.train.total_batch_size, comm.get_world_size(), steps, keys)
    precision = amp_dtype(cfg.train.amp.get("precision", "float16"), "train.amp.precision")
    model = instantiate(cfg.model).to(cfg.train.device)
    logger.info(f"Model:\n{model}")
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)
    model = create_ddp_model(model, **cfg.train.ddp)
    cfg.dataloader.train.total_batch_size //= steps  # images per forward, over all processes
    trainer = AccumulatingTrainer(
        model,
        instantiate(cfg.dataloader.train),
        optimizer,
        accumulation_steps=steps,
        precision=precision if cfg.train.amp.enabled else None,
    )
    checkpointer = WSBCNCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    main_process_hooks = [
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer),
        ProgressWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter), period=cfg.train.log_period),
    ]
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            hooks.EvalHook(cfg.train.eval_period, lambda: evaluate(cfg, model)),
            *(main_process_hooks if comm.is_main_process() else []),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    start_iter = trainer.iter + 1 if resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)


def main(args) -> dict:
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    default_setup(cfg, args)
    if args.eval_only:
        model = create_ddp_model(instantiate(cfg.model).to(cfg.train.device))
        WSBCNCheckpointer(model).load(cfg.train.init_checkpoint)
        return evaluate(cfg, model)
    train(cfg, args.resume)
    return {}


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
