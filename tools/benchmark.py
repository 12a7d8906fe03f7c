#!/usr/bin/env python
"""Cost of WS and BCN against GN: training step, memory and inference, side by side.

Builds the same Mask R-CNN (by default the paper's R-50-FPN config) with GN,
GN+WS, BCN+WS and detectron2's frozen-BN default, feeds each the same synthetic
image with box + mask instances at each requested short side, and measures, in
one process with warm-up and interleaved repetitions (the order rotates every
repetition):

- training step: forward, backward and an SGD step (learning rate 0, so every
  repetition does the same work);
- memory: on CPU, the bytes of the tensors autograd saves for backward (unique
  storages, deterministic); on GPU also CUDA's peak allocated bytes of a step;
- inference: ``model.eval()`` then the model under ``torch.no_grad``, every
  call (a common serving loop; WS's cached weights must survive it).

``--images`` sets the images per training step and inference call (the paper
trains with 1-2 per GPU); ``--amp`` runs both under bfloat16 autocast, as
``SOLVER.AMP.ENABLED`` does for training.

``--accumulation-steps K`` measures, instead, each variant's training step over
``--images`` images in one forward against the same images in K forwards of
``images / K`` (``SOLVER.ACCUMULATION_STEPS K``): the bytes saved for backward by
one forward, the step time (the same images: the ratio is that of the time per
image) and, on GPU, CUDA's peak, as ratios to the one-forward step.

Each variant's figures are reported as ratios to GN: the median over
repetitions of the ratio measured in the same repetition, with a 95%
confidence interval of that median (from 6 repetitions on) and its min-max.
The RPN's two predictors are zeroed so that every variant gets the same
proposals, hence the same RoIs in its heads; inference keeps 100 detections
(score threshold 0) so the mask head always runs on the same number of boxes.
On a machine shared with other jobs, ``--threads 1 --timer cpu`` (this
process's CPU time) gives much steadier ratios than wall-clock time.

    nice -n 10 .venv/bin/python tools/benchmark.py --sizes 320 640 800 --reps 3 --threads 1 --timer cpu \
        --json docs/benchmark.json --markdown docs/benchmark.md

On a GPU, ``make gpu-check`` runs it at 800 and 1333 px with 2 images per step,
in float32 and bfloat16 (tools/gpu_check.sh).
"""
import _startup  # noqa: F401  (first: quiets detectron2's import, see tools/_startup.py)
import argparse
import contextlib
import functools
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from wsbcn_d2 import add_wsbcn_config, fold_for_inference
from wsbcn_d2.cuda import dispatch
from wsbcn_d2.layers import BatchChannelNorm2d, WSConv2d, accumulate_estimates

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "COCO-InstanceSegmentation", "mask_rcnn_R_50_FPN_2x_gn_ws.yaml")
NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.FPN.NORM", "MODEL.ROI_BOX_HEAD.NORM", "MODEL.ROI_MASK_HEAD.NORM")


def _norm_opts(backbone: str, rest: str, ws: bool) -> List[str]:
    norms = (backbone, rest, rest, rest)
    return [x for key, norm in zip(NORM_KEYS, norms) for x in (key, norm)] + ["MODEL.WS.ENABLED", str(ws)]


VARIANTS: Dict[str, List[str]] = {
    "GN": _norm_opts("GN", "GN", ws=False),
    "GN+WS": _norm_opts("GN", "GN", ws=True),
    "BCN+WS": _norm_opts("BCN", "BCN", ws=True),
    "FrozenBN": _norm_opts("FrozenBN", "", ws=False),  # detectron2's default: no norm outside the backbone
}
"""Config overrides of each variant: the four norm slots and WS; everything else is the base config's."""
BASELINE = "GN"


def load_variant_config(config_file: str, variant: str, opts: Sequence[str] = ()) -> CfgNode:
    """``config_file`` with ``variant``'s norm overrides, no pretrained weights, then ``opts``."""
    cfg = get_cfg()
    add_wsbcn_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(["MODEL.WEIGHTS", "", *VARIANTS[variant], *opts])
    return cfg


def synthetic_input(short_side: int, num_objects: int = 16, seed: int = 0) -> Dict:
    """A landscape 3:4 image with a grid of ``num_objects`` rectangular box + mask instances."""
    height, width = short_side, round(short_side * 4 / 3)
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, height, width, generator=g) * 255
    cols = max(1, round((num_objects * width / height) ** 0.5))
    rows = -(-num_objects // cols)
    boxes = []
    for i in range(num_objects):
        r, c = divmod(i, cols)
        cell_w, cell_h = width / cols, height / rows
        boxes.append([(c + 0.15) * cell_w, (r + 0.15) * cell_h, (c + 0.85) * cell_w, (r + 0.85) * cell_h])
    boxes_t = torch.tensor(boxes)
    masks = torch.zeros(num_objects, height, width, dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes_t.round().int().tolist()):
        mask[y0:y1, x0:x1] = True
        image[:, y0:y1, x0:x1] = image[:, y0:y1, x0:x1] * 0.3 + 120
    instances = Instances((height, width))
    instances.gt_boxes = Boxes(boxes_t)
    instances.gt_classes = torch.arange(num_objects) % 3
    instances.gt_masks = BitMasks(masks)
    return {"image": image, "instances": instances}


def build_benchmark_model(cfg: CfgNode, seed: int = 0) -> nn.Module:
    """The model of ``cfg`` with the RPN's predictors zeroed (proposals = anchors, equal for all variants)."""
    torch.manual_seed(seed)
    model = build_model(cfg)
    head = model.proposal_generator.rpn_head
    with torch.no_grad():
        for layer in (head.objectness_logits, head.anchor_deltas):
            layer.weight.zero_()
            layer.bias.zero_()
    return model


def saved_tensor_bytes(model: nn.Module, batch: List[Dict]) -> Dict[str, int]:
    """Bytes autograd saves for backward in one training forward (unique storages).

    ``saved_bytes`` counts everything, ``saved_activation_bytes`` leaves out
    parameters' storages (a standardized weight is not a parameter).
    """
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    model.train()
    with EventStorage(0), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = model(batch)
    del losses
    return {
        "saved_bytes": sum(storages.values()),
        "saved_activation_bytes": sum(n for ptr, n in storages.items() if ptr not in params),
    }


class _Clock:
    """Wall and process-CPU seconds of a ``with`` block (waiting for CUDA work)."""

    def __init__(self, device: torch.device):
        self.device = device

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> "_Clock":
        self._sync()
        self.wall, self.cpu = -time.perf_counter(), -time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.wall += time.perf_counter()
        self.cpu += time.process_time()

    def times(self, name: str) -> Dict[str, float]:
        return {f"{name}_s": self.wall, f"{name}_cpu_s": self.cpu}


class _Runner:
    """One variant's model, optimizer and timed steps (under bfloat16 autocast with ``amp``)."""

    def __init__(self, cfg: CfgNode, seed: int, amp: bool = False, accumulation_steps: int = 1):
        # learning rate 0: weights stay put (same work every repetition) but are still written in place
        cfg = cfg.clone()
        cfg.merge_from_list(["SOLVER.BASE_LR", 0.0, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
        self.model = build_benchmark_model(cfg, seed)
        self.optimizer = build_optimizer(cfg, self.model)
        self.device = torch.device(cfg.MODEL.DEVICE)
        self.amp = amp
        self.accumulation_steps = accumulation_steps
        self.folded: Optional[nn.Module] = None
        self.num_fg = float("nan")

    def train_step(self, batch: List[Dict]) -> Dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        k = self.accumulation_steps
        with EventStorage(0) as storage, _Clock(self.device) as clock:
            self.optimizer.zero_grad(set_to_none=True)
            with accumulate_estimates(self.model) if k > 1 else contextlib.nullcontext():
                for micro_batch in _split(batch, k):
                    with self._autocast():
                        loss = sum(self.model(micro_batch).values()) / k
                    loss.backward()
            self.optimizer.step()
        self.num_fg = storage.history("roi_head/num_fg_samples").latest()
        out = clock.times("train")
        if self.device.type == "cuda":
            out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        return out

    def _autocast(self):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def fold(self) -> None:
        """Also time :func:`fold_for_inference` of the model, if it has anything to fold."""
        if any(isinstance(m, (WSConv2d, BatchChannelNorm2d)) for m in self.model.modules()):
            self.folded = fold_for_inference(self.model)

    def infer(self, images: List[Dict]) -> Dict[str, float]:
        out = {}
        for name, model in (("infer", self.model), ("infer_folded", self.folded)):
            if model is not None:
                with torch.no_grad(), self._autocast(), _Clock(self.device) as clock:
                    model.eval()
                    model(images)
                out.update(clock.times(name))
        return out


def _split(batch: List[Dict], parts: int) -> List[List[Dict]]:
    """``batch`` in ``parts`` consecutive micro-batches of equal size."""
    size = len(batch) // parts
    return [batch[i * size : (i + 1) * size] for i in range(parts)]


def _interleaved(
    runners: Dict[str, _Runner], step: Callable[[_Runner], Dict], training: bool, reps: int, warmup: int
) -> Dict[str, Dict[str, List[float]]]:
    """``step`` on every runner, ``warmup`` untimed rounds then ``reps`` rounds in rotating order.

    The mode is set once here; inference steps also call ``eval()`` themselves.
    """
    names = list(runners)
    for runner in runners.values():
        runner.model.train(training)
    for _ in range(warmup):
        for name in names:
            step(runners[name])
    results: Dict[str, Dict[str, List[float]]] = {name: {} for name in names}
    for rep in range(reps):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            for key, value in step(runners[name]).items():
                results[name].setdefault(key, []).append(value)
    return results


def median_interval(values: Sequence[float], level: float = 0.95) -> Optional[Tuple[float, float]]:
    """A distribution-free confidence interval of the median of ``values``, or None (too few values).

    The order statistics ``(x_(k), x_(n+1-k))`` of the sorted values, with the largest
    ``k`` for which ``P(Binomial(n, 1/2) < k) <= (1 - level) / 2``: the interval holds the
    true median with probability at least ``level`` whatever the distribution of
    independent repetitions (at 95%: from 6 values on; 30 give the 10th and 21st).
    """
    n = len(values)
    tail, k = 0.0, 0
    while k < n and tail + math.comb(n, k) / 2**n <= (1 - level) / 2:
        tail += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return None
    ordered = sorted(values)
    return ordered[k - 1], ordered[n - k]


def _ratio_summary(values: Dict[str, List[float]], base: Dict[str, List[float]]) -> Dict[str, Dict]:
    """Median of each series, and median / 95% interval of the median / min / max of its
    per-repetition ratio to the baseline's.

    Folded inference is compared with the baseline's inference.
    """
    out = {}
    for key, vals in values.items():
        ratios = [v / b for v, b in zip(vals, base[key.replace("_folded", "")])]
        out[key] = {
            "median": statistics.median(vals),
            "ratio": statistics.median(ratios),
            "ratio_interval": median_interval(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
        }
    return out


def _ws_cache_reused(model: nn.Module, images: List[Dict]) -> Optional[bool]:
    """Whether an eval call after ``train()`` / ``eval()`` reuses every WS conv's cached weight (None: no WS)."""
    convs = [m for m in model.modules() if isinstance(m, WSConv2d)]
    if not convs:
        return None
    with torch.no_grad():
        model.eval()(images)
        cached = [m._cached_weight for m in convs]
        model.train().eval()(images)
    return all(c is not None and m._cached_weight is c for m, c in zip(convs, cached))


def measure(
    cfgs: Dict[str, CfgNode],
    short_side: int,
    reps: int = 3,
    warmup: int = 1,
    seed: int = 0,
    images: int = 1,
    amp: bool = False,
) -> Dict[str, Dict]:
    """Measure every variant of ``cfgs`` (``BASELINE`` among them) at one input size.

    ``images`` synthetic images make a training batch and an inference call;
    ``amp`` runs both under bfloat16 autocast.

    Returns, per variant: ``saved_bytes`` / ``saved_activation_bytes`` (and their
    ratios to the baseline); wall and process-CPU seconds ``train_s``,
    ``train_cpu_s``, ``infer_s``, ``infer_cpu_s`` and, for models with WS or
    BCN, ``infer_folded_s`` / ``infer_folded_cpu_s`` (after
    :func:`fold_for_inference`), plus ``cuda_peak_bytes`` on GPU, each as the
    median value and the median, min and max of the per-repetition ratio to the
    baseline; ``num_fg`` (foreground RoIs per training step, equal for all
    variants) and ``ws_cache_reused`` (None without WS).
    """
    if BASELINE not in cfgs:
        raise ValueError(f"the variants must include the baseline {BASELINE!r}")
    runners = {name: _Runner(cfg, seed, amp) for name, cfg in cfgs.items()}
    device = runners[BASELINE].device
    samples = [synthetic_input(short_side, seed=seed + i) for i in range(images)]
    batch = [{k: v.to(device) for k, v in sample.items()} for sample in samples]
    inputs = [{"image": sample["image"]} for sample in batch]

    with runners[BASELINE]._autocast():
        results = {name: saved_tensor_bytes(r.model, batch) for name, r in runners.items()}
    print(f"[{short_side} px] timing training steps", file=sys.stderr, flush=True)
    train = _interleaved(runners, lambda r: r.train_step(batch), True, reps, warmup)
    print(f"[{short_side} px] timing inference", file=sys.stderr, flush=True)
    for runner in runners.values():
        runner.fold()
    infer = _interleaved(runners, lambda r: r.infer(inputs), False, reps, warmup)
    base = {**train[BASELINE], **infer[BASELINE]}
    for name, runner in runners.items():
        res = results[name]
        res.update(_ratio_summary({**train[name], **infer[name]}, base))
        res["num_fg"] = runner.num_fg
        res["ws_cache_reused"] = _ws_cache_reused(runner.model, inputs)
    for res in results.values():
        for key in ("saved_bytes", "saved_activation_bytes"):
            res[f"{key}_ratio"] = res[key] / results[BASELINE][key]
    return results


def measure_accumulation(
    cfg: CfgNode, short_side: int, steps: int, reps: int = 3, warmup: int = 1, seed: int = 0, images: int = 2,
    amp: bool = False,
) -> Dict[str, Dict]:
    """One variant's training step over ``images`` images in one forward (``"1"``) against ``steps`` forwards of
    ``images / steps`` images (``str(steps)``), the same model and images.

    Returns, per way: ``saved_bytes`` / ``saved_activation_bytes`` of one forward, and ``train_s``,
    ``train_cpu_s`` (and ``cuda_peak_bytes`` on GPU) as the median and the per-repetition ratio to the
    one-forward step (see :func:`measure`).
    """
    if images % steps:
        raise ValueError(f"--images {images} does not split into --accumulation-steps {steps} forwards")
    runners = {str(k): _Runner(cfg, seed, amp, accumulation_steps=k) for k in (1, steps)}
    device = runners["1"].device
    batch = [{k: v.to(device) for k, v in synthetic_input(short_side, seed=seed + i).items()} for i in range(images)]
    with runners["1"]._autocast():
        results = {way: saved_tensor_bytes(r.model, _split(batch, r.accumulation_steps)[0]) for way, r in runners.items()}
    print(f"[{short_side} px] timing {images} images in 1 and in {steps} forwards", file=sys.stderr, flush=True)
    train = _interleaved(runners, lambda r: r.train_step(batch), True, reps, warmup)
    for way, res in results.items():
        res.update(_ratio_summary(train[way], train["1"]))
        for key in ("saved_bytes", "saved_activation_bytes"):
            res[f"{key}_ratio"] = res[key] / results["1"][key]
    return results


def format_accumulation_table(all_results: Dict[int, Dict[str, Dict[str, Dict]]], images: int, timer: str) -> str:
    """A markdown table of :func:`measure_accumulation`'s results, per (size, variant, forwards per step)."""
    suffix = "_s" if timer == "wall" else "_cpu_s"
    cuda = any("cuda_peak_bytes" in r for by_variant in all_results.values() for ways in by_variant.values()
               for r in ways.values())  # fmt: skip
    header = ["short side", "variant", "forwards x images", "step time", "saved for backward, one forward"]
    header += ["CUDA peak"] if cuda else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size, by_variant in all_results.items():
        for variant, ways in by_variant.items():
            for way, res in ways.items():
                row = [f"{way} x {images // int(way)}"]
                if way == "1":
                    row.append(f"{res[f'train{suffix}']['median']:.2f} s")
                    row.append(f"{res['saved_bytes'] / 2**20:.0f} MiB")
                    row += [f"{res['cuda_peak_bytes']['median'] / 2**20:.0f} MiB"] if cuda else []
                else:
                    row.append(_ratio_cell(res[f"train{suffix}"]))
                    row.append(f"{res['saved_bytes_ratio']:.3f} ({res['saved_bytes'] / 2**20:.0f} MiB)")
                    row += [_ratio_cell(res["cuda_peak_bytes"])] if cuda else []
                lines.append(f"| {size} | {variant} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_table(all_results: Dict[int, Dict[str, Dict]], timer: str = "wall") -> str:
    """A markdown table of ratios to the baseline, one row per (size, variant).

    ``timer`` picks wall-clock (``"wall"``) or process-CPU (``"cpu"``) times.
    Ratios are medians over repetitions, with the median's 95% confidence
    interval in square brackets (6 repetitions or more) and the ratios' min-max
    in parentheses; the baseline's row holds its absolute figures.
    """
    suffix = "_s" if timer == "wall" else "_cpu_s"
    time_keys = [f"train{suffix}", f"infer{suffix}", f"infer_folded{suffix}"]
    cuda = any("cuda_peak_bytes" in res for results in all_results.values() for res in results.values())
    header = ["short side", "variant", "train step", "inference", "inference, folded", "saved for backward"]
    header += ["CUDA peak"] if cuda else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size, results in all_results.items():
        for name, res in results.items():
            if name == BASELINE:
                row = [f"{res[k]['median']:.2f} s" if k in res else "" for k in time_keys]
                row.append(f"{res['saved_bytes'] / 2**20:.0f} MiB")
                row += [f"{res['cuda_peak_bytes']['median'] / 2**20:.0f} MiB"] if cuda else []
            else:
                keys = time_keys + (["cuda_peak_bytes"] if cuda else [])
                row = [_ratio_cell(res[k]) if k in res else "" for k in keys]
                row.insert(3, f"{res['saved_bytes_ratio']:.3f}")
            lines.append(f"| {size} | {name} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _ratio_cell(summary: Dict) -> str:
    """``median [interval of the median] (min-max)`` of a ratio (without the interval where it has none)."""
    interval = summary.get("ratio_interval")
    interval = f" [{interval[0]:.3f}-{interval[1]:.3f}]" if interval else ""
    return f"{summary['ratio']:.3f}{interval} ({summary['ratio_min']:.2f}-{summary['ratio_max']:.2f})"


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} CPUs"


def main(argv: Sequence[str] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, help="base config; variants override its norms")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[320, 640, 800], help="input short sides")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions per variant")
    parser.add_argument("--images", type=int, default=1, help="images per training step and inference call")
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (as SOLVER.AMP.ENABLED)")
    parser.add_argument(
        "--accumulation-steps", type=int, default=1,
        help="K > 1: each variant's step over --images images in one forward against K forwards",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default="wall",
        help="times in the printed table: wall clock, or this process's CPU time (steadier on a shared "
        "machine with --threads 1); the JSON holds both",
    )
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--markdown", help="also write the table, machine and command to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides for every variant")
    args = parser.parse_args(argv)
    accumulation = args.accumulation_steps > 1
    if BASELINE not in args.variants and not accumulation:
        parser.error(f"--variants must include {BASELINE}")
    if accumulation and args.images % args.accumulation_steps:
        parser.error(f"--images {args.images} does not split into --accumulation-steps {args.accumulation_steps}")
    if args.threads:
        torch.set_num_threads(args.threads)

    cfgs = {v: load_variant_config(args.config_file, v, ["MODEL.DEVICE", args.device, *args.opts]) for v in args.variants}
    all_results = {}
    if accumulation:
        table = functools.partial(format_accumulation_table, images=args.images, timer=args.timer)
    else:
        table = functools.partial(format_table, timer=args.timer)
    for size in args.sizes:
        if accumulation:
            all_results[size] = {
                variant: measure_accumulation(
                    cfg, size, args.accumulation_steps, args.reps, args.warmup, images=args.images, amp=args.amp
                )
                for variant, cfg in cfgs.items()
            }
        else:
            all_results[size] = measure(
                cfgs, size, reps=args.reps, warmup=args.warmup, images=args.images, amp=args.amp
            )
        print(table({size: all_results[size]}), flush=True)
    report = {
        "machine": {
            "device": _machine(args.device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
        "config_file": os.path.relpath(args.config_file, REPO),
        "opts": args.opts,
        "images": args.images,
        "accumulation_steps": args.accumulation_steps,
        "precision": "bfloat16 autocast" if args.amp else "float32",
        "kernels": "triton" if dispatch.use_kernels(torch.zeros(1, device=args.device)) else "torch",
        "reps": args.reps,
        "warmup": args.warmup,
        "timer": args.timer,
        "results": all_results,
        "table": table(all_results),
    }
    print(report["table"])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(_markdown(report, argv if argv is not None else sys.argv[1:]))
    return report


def _command_line(argv: Sequence[str]) -> str:
    """This run's command, with the WSBCN_* environment variables that choose the code path."""
    env = [f"{name}={shlex.quote(value)}" for name, value in sorted(os.environ.items()) if name.startswith("WSBCN_")]
    return " ".join(env + [shlex.join(["python", "tools/benchmark.py", *argv])])


def _markdown(report: Dict, argv: Sequence[str]) -> str:
    machine = report["machine"]
    timer = "process CPU time" if report["timer"] == "cpu" else "wall-clock time"
    accumulation = report["accumulation_steps"] > 1
    title = "Gradient accumulation, ratio to one forward" if accumulation else "Cost of WS and BCN, ratio to GN"
    return "\n".join(
        [
            f"# {title}",
            "",
            f"{machine['date']}, {machine['device']}, {machine['threads']} torch thread(s), torch {machine['torch']};",
            f"`{report['config_file']}` {' '.join(report['opts'])}; {report['images']} image(s) per step, "
            f"{report['precision']}, WS/BCN through the {report['kernels']} code; {report['warmup']} warm-up and "
            f"{report['reps']} interleaved repetitions per variant; times are {timer}. Ratios to "
            f"{'one forward' if accumulation else 'GN'}: median over",
            "repetitions [its 95% confidence interval, given from 6 repetitions on] (min-max).",
            "",
            f"    {_command_line(argv)}",
            "",
            report["table"],
            "",
        ]
    )


if __name__ == "__main__":
    main(sys.argv[1:])
