"""Training: detectron2's DefaultTrainer, multi-process on CPU too, and resumable exactly.

A run stopped after a checkpoint and resumed with ``resume_or_load(resume=True)``
continues as the uninterrupted run would (with ``SEED >= 0``): the checkpoint holds
the weights, BCN estimates, optimizer, LR scheduler and iteration; everything else a
step draws is a function of the seed and the iteration, so nothing more is saved:

* :class:`ResumableBatchSampler`: the data stream starts at the resumed iteration;
* :class:`SeededMapDataset`: each image's augmentation is seeded by its place in the stream;
* :class:`AccumulatingTrainer`: the model's own sampling (RPN, ROI heads) is seeded per iteration.

With ``SOLVER.ACCUMULATION_STEPS k``, micro-step ``j`` of process ``r`` computes what process
``r * k + j`` of a run with ``k`` times as many processes computes: the same images and
augmentations (:class:`ResumableBatchSampler`), the same random draws and, averaged over the
micro-steps, the same gradient (:class:`AccumulatingTrainer`).
"""
import itertools
import logging
import os
import random
import time
import weakref
import contextlib
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.utils.data as torchdata
from detectron2.config import CfgNode
from detectron2.data import DatasetFromList, build_detection_train_loader
from detectron2.data.build import trivial_batch_collator, worker_init_reset_seed
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer, TrainerBase
from detectron2.engine import create_ddp_model as d2_create_ddp_model
from detectron2.engine import launch as d2_launch
from detectron2.engine.hooks import PeriodicWriter
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter
from detectron2.utils.logger import setup_logger

from .checkpoint import WSBCNCheckpointer
from .config import amp_dtype, check_batch_split
from .layers import BATCH_STATISTICS_NORMS, accumulate_estimates
from .modeling import check_precise_bn, check_ws_coverage, used_norm_slots

__all__ = [
    "Trainer",
    "AccumulatingTrainer",
    "ResumableBatchSampler",
    "SeededMapDataset",
    "ProgressWriter",
    "warn_batch_statistics",
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


@contextlib.contextmanager
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

    With ``accumulation_steps k``, each iteration yields ``k`` batches: those of processes
    ``r * k, ..., r * k + k - 1`` of a run with ``k * W`` processes, in that order.

    Elements are ``(seed, index)`` pairs: a dataset index and a seed derived from the element's
    position in the shared stream, for :class:`SeededMapDataset`.
    """

    def __init__(
        self, group_ids: Sequence[int], batch_size: int, seed: Optional[int] = None, accumulation_steps: int = 1
    ):
        """
        Args:
            group_ids: each dataset element's group; a batch holds elements of one group.
            batch_size: images per batch (per forward).
            seed: the stream's seed, the same in all processes; None draws one shared by all processes.
            accumulation_steps: batches per iteration.
        """
        self._group_ids = list(group_ids)
        self._batch_size = batch_size
        self.seed = int(comm.shared_random_seed() if seed is None else seed)
        self.start_iter = 0
        self._accumulation_steps = accumulation_steps
        self._rank, self._world_size = comm.get_rank(), comm.get_world_size()

    def _batches(self, rank: int, world_size: int) -> Iterator[List[Tuple[int, int]]]:
        """Batches of process ``rank`` of ``world_size``, as (position in the shared stream, dataset index),
        from iteration 0 on."""
        generator = torch.Generator().manual_seed(self.seed)
        size = len(self._group_ids)
        stream = itertools.chain.from_iterable(
            torch.randperm(size, generator=generator).tolist() for _ in itertools.count()
        )
        buckets = {}
        for position, index in itertools.islice(enumerate(stream), rank, None, world_size):
            group = self._group_ids[index]
            buckets.setdefault(group, []).append((position, index))
            if len(buckets[group]) == self._batch_size:
                yield buckets.pop(group)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        k = self._accumulation_steps
        virtual = [self._batches(self._rank * k + j, self._world_size * k) for j in range(k)]
        for batches in itertools.islice(zip(*virtual), self.start_iter, None):
            for batch in batches:
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


class AccumulatingTrainer(SimpleTrainer):
    """detectron2's SimpleTrainer and AMPTrainer step, as ``accumulation_steps`` forwards per optimizer step.

    Micro-step ``j`` of process ``r`` (of ``W``) computes what process ``r * k + j`` of a run with ``k * W``
    processes and one forward per step computes:

    * its batch: the data loader yields the step's ``k`` batches in order (:class:`ResumableBatchSampler`);
    * its random draws (the RPN's and ROI heads' sampling): with ``seed``, Python, NumPy and torch are seeded
      from ``(seed, r * k + j, iteration)`` before the forward, so a resumed run also draws what the
      uninterrupted run drew;
    * its share of the gradient: each loss is divided by ``k`` and the gradients add up, then DDP averages
      over the ``W`` processes, all-reducing once per step (the other micro-steps run under ``no_sync``);
    * micro-batch BCN's estimates pool the step's micro-batches (:func:`~wsbcn_d2.layers.accumulate_estimates`).

    The optimizer (momentum, weight decay, gradient clipping), the LR schedule and hooks act once per step.
    With ``precision`` the forwards run under autocast; float16 losses are scaled by ``grad_scaler``, which
    unscales, skips a step with an inf or NaN gradient from any micro-step and updates its scale once per
    step. The logged losses are the micro-steps' means and ``data_time`` the longest fetch, as the wider run
    logs them (detectron2 averages losses over processes and takes their longest ``data_time``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        accumulation_steps: int = 1,
        seed: Optional[int] = None,
        precision: Optional[torch.dtype] = None,
        grad_scaler: Optional[torch.amp.GradScaler] = None,
    ):
        """
        Args:
            model, data_loader, optimizer: as for detectron2's SimpleTrainer.
            accumulation_steps: forwards (micro-steps) per optimizer step.
            seed: seeds each micro-step's random draws; None leaves the generators alone.
            precision: autocast's dtype (torch.float16 or torch.bfloat16); None runs without autocast.
            grad_scaler: scales float16 losses; by default a new GradScaler on the model's device type.
        """
        super().__init__(model, data_loader, optimizer)
        self.accumulation_steps = accumulation_steps
        self.seed = seed
        self.precision = precision
        self._device_type = next(model.parameters()).device.type
        if precision == torch.float16 and grad_scaler is None:
            grad_scaler = torch.amp.GradScaler(self._device_type)
        self.grad_scaler = grad_scaler

    def _micro_step(self, j: int) -> Tuple[dict, float]:
        """Forward and backward of micro-step ``j``; returns its detached losses and its data time."""
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.seed is not None:
            virtual_rank = comm.get_rank() * self.accumulation_steps + j
            seed_all_rng(derive_seed(self.seed, _ITERATION_KEY, virtual_rank, self.iter))
        with torch.autocast(self._device_type, dtype=self.precision, enabled=self.precision is not None):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        losses = sum(loss_dict.values()) / self.accumulation_steps
        (losses if self.grad_scaler is None else self.grad_scaler.scale(losses)).backward()
        return {name: value.detach() for name, value in loss_dict.items()}, data_time

    def run_step(self) -> None:
        assert self.model.training, "[AccumulatingTrainer] model was changed to eval mode!"
        k = self.accumulation_steps
        self.optimizer.zero_grad()
        loss_dicts, data_times = [], []
        with accumulate_estimates(self.model) if k > 1 else contextlib.nullcontext():
            for j in range(k):
                last = j == k - 1
                with contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
                    loss_dict, data_time = self._micro_step(j)
                loss_dicts.append(loss_dict)
                data_times.append(data_time)
        self.after_backward()
        mean_losses = {name: sum(d[name] for d in loss_dicts) / k for name in loss_dicts[0]}
        self._write_metrics(mean_losses, max(data_times))
        if self.grad_scaler is None:
            self.optimizer.step()
        else:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.grad_scaler is not None:
            state["grad_scaler"] = self.grad_scaler.state_dict()  # AMPTrainer's key
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.grad_scaler is not None and "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])


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


def warn_batch_statistics(cfg: CfgNode) -> None:
    """With ``SOLVER.ACCUMULATION_STEPS > 1``, warn in one line about each used norm slot whose norm normalizes
    with the statistics of the batch it sees: each micro-batch's own, not those of the wider run's batch."""
    steps = cfg.SOLVER.ACCUMULATION_STEPS
    slots = {f"{s.key} {s.value(cfg)!r}": None for s in used_norm_slots(cfg) if s.value(cfg) in BATCH_STATISTICS_NORMS}
    if steps > 1 and slots:
        logger.warning(
            f"SOLVER.ACCUMULATION_STEPS {steps}: {', '.join(slots)} normalize each micro-batch with its own batch "
            f"statistics, so training is not that of {steps} times as many processes (GN, FrozenBN, BCN are)."
        )


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer with:

    * DDP for CPU models too (``MODEL.DEVICE cpu``, GLOO): ``device_ids`` are passed only for CUDA models;
    * :class:`WSBCNCheckpointer`, which refuses unconverted official ``.pth`` backbones;
    * a training loader that resumes where it stopped (:class:`ResumableBatchSampler`,
      :class:`SeededMapDataset`) and, with ``SEED >= 0``, random draws seeded per iteration;
    * ``SOLVER.ACCUMULATION_STEPS`` forwards per optimizer step, and ``SOLVER.AMP.PRECISION``
      (:class:`AccumulatingTrainer`, also on CPU);
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
        self._trainer = AccumulatingTrainer(
            model,
            data_loader,
            optimizer,
            accumulation_steps=cfg.SOLVER.ACCUMULATION_STEPS,
            seed=cfg.SEED if cfg.SEED >= 0 else None,
            precision=amp_dtype(cfg.SOLVER.AMP.PRECISION) if cfg.SOLVER.AMP.ENABLED else None,
        )
        warn_batch_statistics(cfg)
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
        return [
            ProgressWriter(h._writers, h._period) if type(h) is PeriodicWriter else h for h in super().build_hooks()
        ]

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
        world_size, steps = comm.get_world_size(), cfg.SOLVER.ACCUMULATION_STEPS
        check_batch_split(args["total_batch_size"], world_size, steps)
        args["total_batch_size"] //= steps  # images per forward, over all processes
        if type(args["sampler"]) is not TrainingSampler:
            logger.warning(f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN}: a resumed run restarts its data.")
            return build_detection_train_loader(**args)
        dicts = args["dataset"]
        grouping = args["aspect_ratio_grouping"]
        sampler = ResumableBatchSampler(
            [int(d["width"] > d["height"]) if grouping else 0 for d in dicts],
            args["total_batch_size"] // world_size,
            seed=cfg.SEED if cfg.SEED >= 0 else None,
            accumulation_steps=steps,
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
