"""Training: detectron2's DefaultTrainer, multi-process on CPU too, and resumable exactly.

A run stopped after a checkpoint and resumed with ``resume_or_load(resume=True)``
continues as the uninterrupted run would (with ``SEED >= 0``): the checkpoint holds
the weights, BCN estimates, optimizer, LR scheduler and iteration; everything else a
step draws is a function of the seed and the iteration, so nothing more is saved:

* :class:`ResumableBatchSampler`: the data stream starts at the resumed iteration;
* :class:`SeededMapDataset`: each image's augmentation is seeded by its place in the stream;
* :class:`IterationSeed`: the model's own sampling (RPN, ROI heads) is seeded per iteration.
"""
import itertools
import logging
import os
import random
import time
import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.data as torchdata
from detectron2.config import CfgNode
from detectron2.data import DatasetFromList, build_detection_train_loader
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import AMPTrainer, DefaultTrainer, HookBase, SimpleTrainer, TrainerBase
from detectron2.engine import create_ddp_model as d2_create_ddp_model
from detectron2.engine import launch as d2_launch
from detectron2.engine.hooks import PeriodicWriter
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter
from detectron2.utils.logger import setup_logger

from .checkpoint import WSBCNCheckpointer
from .config import check_precise_bn
from .modeling import check_ws_coverage

__all__ = [
    "Trainer",
    "ResumableBatchSampler",
    "SeededMapDataset",
    "IterationSeed",
    "ProgressWriter",
    "available_cpus",
    "create_ddp_model",
    "derive_seed",
    "launch",
]

logger = logging.getLogger(__name__)

# first key of derived seeds, so that data and iteration seeds never share a key
_DATA_KEY, _ITERATION_KEY = 0, 1


def derive_seed(*keys: int) -> int:
    """A 32-bit seed mixed from non-negative integer keys (NumPy's SeedSequence): nearby keys
    give unrelated streams."""
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


@contextmanager
def _seeded_generators(seed: int) -> Iterator[None]:
    """Python's, NumPy's and torch's CPU generators seeded with ``seed``; their states are restored on exit."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            np.random.seed(seed)
            torch.default_generator.manual_seed(seed)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


class ResumableBatchSampler:
    """This process's training batches, as a function of the seed and the iteration alone.

    As in detectron2's default training loader, all processes share one shuffled, endlessly
    repeated stream of the dataset (:class:`TrainingSampler`'s stream for the same seed);
    process ``r`` of ``W`` takes its elements ``r, r + W, r + 2W, ...`` and batches images of
    one aspect-ratio group (:class:`AspectRatioGroupedDataset`'s rule). The grouping is done
    on indices, before loading, so batch ``k`` does not depend on what was loaded before: with
    ``start_iter = k`` the sampler replays the first ``k`` batches' indices (no image is read:
    0.5 s for the 2.9 million images of a 4-process run at iteration 360k) and yields batch
    ``k`` onwards.

    Elements are ``(seed, index)`` pairs: a dataset index and a seed derived from the element's
    position in the shared stream, for :class:`SeededMapDataset`.
    """

    def __init__(self, group_ids: Sequence[int], batch_size: int, seed: Optional[int] = None):
        """
        Args:
            group_ids: each dataset element's group; a batch holds elements of one group.
            batch_size: this process's images per batch.
            seed: the stream's seed, the same in all processes; None draws one shared by all processes.
        """
        self._group_ids = list(group_ids)
        self._batch_size = batch_size
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.start_iter = 0
        self._rank, self._world_size = comm.get_rank(), comm.get_world_size()

    def _batches(self) -> Iterator[List[Tuple[int, int]]]:
        """Batches of (position in the shared stream, dataset index), from iteration 0 on."""
        generator = torch.Generator().manual_seed(self.seed)
        size = len(self._group_ids)
        stream = itertools.chain.from_iterable(
            torch.randperm(size, generator=generator).tolist() for _ in itertools.count()
        )
        buckets = {}
        for position, index in itertools.islice(enumerate(stream), self._rank, None, self._world_size):
            group = self._group_ids[index]
            buckets.setdefault(group, []).append((position, index))
            if len(buckets[group]) == self._batch_size:
                yield buckets.pop(group)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for batch in itertools.islice(self._batches(), self.start_iter, None):
            yield [(derive_seed(self.seed, _DATA_KEY, position), index) for position, index in batch]


class SeededMapDataset(torchdata.Dataset):
    """``mapper(dataset[index])`` for a key ``(seed, index)``, with Python's, NumPy's and torch's
    CPU generators seeded by ``seed`` during the call and restored after it.

    detectron2's augmentations draw from NumPy's global generator; seeded per element, an
    image's augmentation depends on its key alone, not on the process or DataLoader worker
    that maps it nor on what it mapped before. Restoring the generators leaves the caller's
    randomness alone when mapping in the training process (``DATALOADER.NUM_WORKERS 0``).
    """

    def __init__(self, dataset: List[dict], mapper: Callable[[dict], dict]):
        self._dataset = DatasetFromList(dataset, copy=False)  # serialized: no copy-on-read growth in workers
        self._mapper = mapper

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, key: Tuple[int, int]) -> dict:
        seed, index = key
        with _seeded_generators(seed):
            return self._mapper(self._dataset[index])


class IterationSeed(HookBase):
    """Seeds Python, NumPy and torch (all devices) before every iteration from (seed, rank, iteration).

    A step's own random draws (the RPN's and ROI heads' sampling, anything a hook or an
    evaluation drew before it) then depend only on the iteration, so a resumed run draws
    what the uninterrupted run drew.
    """

    def __init__(self, seed: int):
        self._seed = seed

    def before_step(self) -> None:
        seed_all_rng(derive_seed(self._seed, _ITERATION_KEY, comm.get_rank(), self.trainer.iter))


class ProgressWriter(PeriodicWriter):
    """detectron2's PeriodicWriter (all writers every ``period`` iterations and after the last one) that also
    prints progress early and regularly on slow runs.

    Between periods, the terminal printers (:class:`CommonMetricPrinter`) alone also write after the first
    ``first`` iterations of a run and whenever ``interval`` seconds have passed since the last progress line.
    The ETA is detectron2's: none on a run's first line, then, until IterationTimer's warm-up is over, the time
    per iteration since the previous line. metrics.json and TensorBoard keep one entry per ``period`` iterations,
    the same whatever the speed of the machine.
    """

    def __init__(self, writers: List, period: int = 20, first: int = 2, interval: float = 60.0):
        super().__init__(writers, period)
        self._printers = [w for w in writers if isinstance(w, CommonMetricPrinter)]
        self._first = first
        self._interval = interval
        self._last_line = time.perf_counter()

    def before_train(self) -> None:
        self._last_line = time.perf_counter()

    def after_step(self) -> None:
        iteration, now = self.trainer.iter, time.perf_counter()
        if (iteration + 1) % self._period == 0 or iteration == self.trainer.max_iter - 1:
            super().after_step()
        elif iteration < self.trainer.start_iter + self._first or now >= self._last_line + self._interval:
            for printer in self._printers:
                printer.write()
        else:
            return
        self._last_line = time.perf_counter()


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity where the OS tells it), as torch's DataLoader counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """detectron2's ``create_ddp_model``, also for CPU models (GLOO): ``device_ids`` only for CUDA models."""
    if next(model.parameters()).device.type == "cpu":
        kwargs.setdefault("device_ids", None)
    return d2_create_ddp_model(model, **kwargs)


def launch(main_func: Callable, num_gpus_per_machine: int, *, args: tuple = (), **kwargs) -> None:
    """detectron2's ``launch`` (same arguments: ``num_machines``, ``machine_rank``, ``dist_url``,
    ``timeout``), with every worker leaving its process group once ``main_func`` returns.

    A worker that exits with its gloo process group alive can abort on the way out
    ("terminate called without an active exception", pytorch/pytorch#190489), so that a
    finished run reports failure; each worker here waits for the others, then destroys the group.
    """
    d2_launch(_run_then_leave_process_group, num_gpus_per_machine, args=(main_func, *args), **kwargs)


def _run_then_leave_process_group(main_func: Callable, *args) -> None:
    main_func(*args)
    if dist.is_initialized():
        comm.synchronize()
        dist.destroy_process_group()


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with:

    * DDP for CPU models too (``MODEL.DEVICE cpu``, GLOO): ``device_ids`` are passed only for CUDA models;
    * :class:`WSBCNCheckpointer`, which refuses unconverted official ``.pth`` backbones;
    * a training loader that resumes where it stopped (:class:`ResumableBatchSampler`,
      :class:`SeededMapDataset`) and, with ``SEED >= 0``, :class:`IterationSeed`;
    * progress lines from the first iterations on and at least every minute (:class:`ProgressWriter`);
    * COCO evaluation.
    """

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__ restated: it calls detectron2's create_ddp_model (CUDA device_ids) and builds
        # the DetectionCheckpointer its hooks capture, neither through a method a subclass could override
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        """detectron2's model, with a warning where WS is enabled but some normed conv lacks it."""
        model = super().build_model(cfg)
        check_ws_coverage(model, cfg)
        return model

    @staticmethod
    def build_checkpointer(cfg: CfgNode, model: torch.nn.Module, **checkpointables) -> WSBCNCheckpointer:
        """The checkpointer of training and evaluation (:meth:`WSBCNCheckpointer.from_cfg`)."""
        return WSBCNCheckpointer.from_cfg(cfg, model, **checkpointables)

    def build_hooks(self) -> List[Optional[HookBase]]:
        check_precise_bn(self.cfg)  # before detectron2 adds its PreciseBN hook
        # detectron2's PeriodicWriter, built inside build_hooks, becomes a ProgressWriter of the same writers
        # (not new ones: a second JSONWriter would append to metrics.json too)
        hooks = [
            ProgressWriter(h._writers, h._period) if type(h) is PeriodicWriter else h for h in super().build_hooks()
        ]
        if self.cfg.SEED >= 0:
            hooks.insert(0, IterationSeed(self.cfg.SEED))
        return hooks

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """detectron2's scheduler; SOLVER.STEPS past SOLVER.MAX_ITER (a short run) are dropped, as detectron2
        drops them, with one line saying where the learning rate still decays."""
        kept = tuple(step for step in cfg.SOLVER.STEPS if step <= cfg.SOLVER.MAX_ITER)
        past = tuple(step for step in cfg.SOLVER.STEPS if step > cfg.SOLVER.MAX_ITER)
        if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and past:
            logger.info(
                f"SOLVER.STEPS {past} past SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER} are not used: the learning rate "
                + (f"decays at {kept} only." if kept else "does not decay in this run.")
            )
            cfg = cfg.clone()
            cfg.defrost()
            cfg.SOLVER.STEPS = kept
        return super().build_lr_scheduler(cfg, optimizer)

    def train(self):
        sampler = getattr(self.data_loader, "batch_sampler", None)
        if isinstance(sampler, ResumableBatchSampler):
            sampler.start_iter = self.start_iter
            if self.start_iter > 0:
                logger.info(f"Training data resumes at iteration {self.start_iter} (stream seed {sampler.seed}).")
        return super().train()

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> Iterator[List[dict]]:
        """detectron2's training loader as a :class:`ResumableBatchSampler` over a :class:`SeededMapDataset`.

        With ``DATALOADER.SAMPLER_TRAIN`` other than ``TrainingSampler`` it is detectron2's
        own loader, whose stream restarts on resume.
        """
        args = build_detection_train_loader.from_config(cfg)
        if type(args["sampler"]) is not TrainingSampler:
            logger.warning(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN}: a resumed run restarts its data.")
            return build_detection_train_loader(**args)
        total, world_size = args["total_batch_size"], comm.get_world_size()
        if total % world_size != 0:
            raise ValueError(f"SOLVER.IMS_PER_BATCH {total} must divide among {world_size} processes.")
        dicts = args["dataset"]
        grouping = args["aspect_ratio_grouping"]
        sampler = ResumableBatchSampler(
            [int(d["width"] > d["height"]) if grouping else 0 for d in dicts],
            total // world_size,
            seed=cfg.SEED if cfg.SEED >= 0 else None,
        )
        return torchdata.DataLoader(
            SeededMapDataset(dicts, args["mapper"]),
            batch_sampler=sampler,
            num_workers=args["num_workers"],
            collate_fn=trivial_batch_collator,
            worker_init_fn=worker_init_reset_seed,
            # a new iterator draws its workers' base seed: from this generator, not the step's global one
            generator=torch.Generator().manual_seed(sampler.seed),
        )

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return COCOEvaluator(dataset_name, output_dir=output_folder)
