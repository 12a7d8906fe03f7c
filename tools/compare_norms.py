#!/usr/bin/env python
"""The paper's claim at small scale: GN vs GN+WS vs BCN+WS, from scratch at 1 image per batch.

Trains the demo Mask R-CNN with ``tools/train_net.py`` once per setting and seed
(same seeds, iterations and schedule; only the norm layers and WS differ) and
writes into ``docs/``:

- default mode: ``norm_comparison.md`` (box / mask AP table and the command)
  and ``norm_comparison.png`` (total-loss curves);
- ``--update-rates R ...``: BCN+WS once per BCN estimate update rate,
  ``bcn_update_rate.md`` and ``bcn_update_rate.png``.

The demo config is read, not copied: its schedule is rescaled to ``--iters``
iterations at 1 image per batch (learning rate scaled linearly with the batch,
steps and warm-up in proportion). Runs go under ``--work-dir`` (their logs,
metrics.json, checkpoints); ``--reuse`` keeps a finished run whose full config is unchanged.

    nice -n 10 .venv/bin/python tools/compare_norms.py --seeds 0 1 --jobs 2
    nice -n 10 .venv/bin/python tools/compare_norms.py --update-rates 0 0.01 0.05 0.1 0.3 --jobs 2
"""
import _startup  # noqa: F401  (first: quiets detectron2's import, see tools/_startup.py)
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from statistics import fmean as mean
from typing import Dict, List, Optional, Sequence, Tuple

from detectron2.config import CfgNode

from benchmark import VARIANTS  # tools/ is on sys.path when run as a script
from wsbcn_d2.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO, "configs", "Demo", "mask_rcnn_R_18_FPN_shapes_bcn_ws.yaml")
SETTINGS = ("GN", "GN+WS", "BCN+WS")
METRICS = ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50")


def schedule_opts(cfg: CfgNode, iters: int) -> List[str]:
    """Overrides for ``iters`` iterations at 1 image per batch, the config's schedule rescaled."""
    solver = cfg.SOLVER
    scale = iters / solver.MAX_ITER
    steps = tuple(sorted({min(max(1, round(s * scale)), iters - 1) for s in solver.STEPS}))
    return [
        "SOLVER.IMS_PER_BATCH", "1",
        "SOLVER.BASE_LR", repr(solver.BASE_LR / solver.IMS_PER_BATCH),  # linear scaling rule
        "SOLVER.MAX_ITER", str(iters),
        "SOLVER.STEPS", str(steps),
        "SOLVER.WARMUP_ITERS", str(round(solver.WARMUP_ITERS * scale)),
        "TEST.EVAL_PERIOD", "0",  # evaluate once, after the last iteration
    ]  # fmt: skip


def resolved_config(config_file: str, opts: Sequence[str]) -> str:
    """The full config a run trains with (YAML), so a finished run is reused only if nothing changed."""
    return load_config(config_file, opts).dump()


def read_metrics(output_dir: str, config: str) -> Optional[Dict]:
    """``{"loss": [(iteration, total_loss)], "ap": {metric: value}}`` of a finished run of ``config``, else None."""
    path = os.path.join(output_dir, "metrics.json")
    config_file = os.path.join(output_dir, "requested_config.yaml")
    if not (os.path.isfile(path) and os.path.isfile(config_file)):
        return None
    with open(config_file) as f:
        if f.read() != config:
            return None
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    loss = [(r["iteration"], r["total_loss"]) for r in records if "total_loss" in r]
    ap = next((r for r in reversed(records) if "bbox/AP" in r), None)
    if ap is None:
        return None
    # a model without predictions gets NaN box AP and no mask AP
    return {"loss": loss, "ap": {k: ap.get(k, float("nan")) for k in METRICS}}


def train(name: str, opts: Sequence[str], config_file: str, output_dir: str, reuse: bool, threads: int) -> Dict:
    """Run tools/train_net.py (under ``nice``, ``threads`` threads) unless ``reuse`` and a finished run is there."""
    config = resolved_config(config_file, opts)
    if reuse and (metrics := read_metrics(output_dir, config)) is not None:
        print(f"[{name}] reusing {output_dir}", flush=True)
        return metrics
    os.makedirs(output_dir, exist_ok=True)
    for stale in ("metrics.json", "last_checkpoint"):
        if os.path.exists(os.path.join(output_dir, stale)):
            os.remove(os.path.join(output_dir, stale))
    with open(os.path.join(output_dir, "requested_config.yaml"), "w") as f:
        f.write(config)
    cmd = ["nice", "-n", "10", sys.executable, os.path.join(REPO, "tools", "train_net.py")]
    cmd += ["--config-file", config_file, *opts, "OUTPUT_DIR", output_dir]
    print(f"[{name}] {shlex.join(cmd)}", flush=True)
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(os.path.join(output_dir, "stdout.log"), "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, check=True)
    metrics = read_metrics(output_dir, config)
    if metrics is None:
        raise RuntimeError(f"[{name}] finished without evaluation results in {output_dir}/metrics.json")
    minutes = (time.time() - start) / 60
    print(f"[{name}] {minutes:.1f} min, " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["ap"].items()), flush=True)
    return metrics


def plot_losses(runs: Dict[str, List[Dict]], path: str, title: str) -> None:
    """One colour per setting, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, seed_runs), colour in zip(runs.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        for i, metrics in enumerate(seed_runs):
            iterations, losses = zip(*metrics["loss"])
            ax.plot(iterations, losses, color=colour, label=None if i else name, linewidth=1.0, alpha=0.85)
    ax.set_xlabel("iteration (1 image each)")
    ax.set_ylabel("total loss (median of 20 iterations)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ap_table(runs: Dict[str, List[Dict]], first_column: str) -> str:
    """Mean over seeds per setting; with several seeds, each seed's value follows in brackets."""
    lines = [f"| {first_column} | " + " | ".join(METRICS) + " | final loss |", "|" + "---|" * (len(METRICS) + 2)]
    for name, seed_runs in runs.items():
        cells = []
        for k in METRICS:
            values = [m["ap"][k] for m in seed_runs]
            per_seed = f" ({' / '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else ""
            cells.append(f"{mean(values):.1f}{per_seed}")
        final_loss = mean([mean([v for _, v in m["loss"][-5:]]) for m in seed_runs])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {final_loss:.3f} |")
    return "\n".join(lines)


def ordering_verdict(runs: Dict[str, List[Dict]]) -> str:
    """Whether BCN+WS >= GN+WS >= GN holds for mean box and mask AP (and in how many seeds), with the margins."""
    lines = []
    for metric in ("bbox/AP", "segm/AP"):
        per_seed = list(zip(*([m["ap"][metric] for m in runs[s]] for s in SETTINGS)))
        gn, gn_ws, bcn_ws = (mean(values) for values in zip(*per_seed))
        holds = bcn_ws >= gn_ws >= gn
        seeds = sum(b >= w >= g for g, w, b in per_seed)
        lines.append(
            f"- {metric}: BCN+WS >= GN+WS >= GN {'holds' if holds else 'does not hold'} "
            f"(GN+WS - GN = {gn_ws - gn:+.1f}, BCN+WS - GN+WS = {bcn_ws - gn_ws:+.1f} AP"
            + (f"; holds in {seeds} of {len(per_seed)} seeds)" if len(per_seed) > 1 else ")")
        )
    return "\n".join(lines)


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default=DEMO_CONFIG)
    parser.add_argument("--iters", type=int, help="training iterations (default: as many images as the config)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="train every setting once per SEED (default: the config's, else 0)"
    )
    parser.add_argument("--update-rates", type=float, nargs="+", help="sweep BCN's update rate instead")
    parser.add_argument("--work-dir", default=os.path.join(REPO, "output", "compare_norms"))
    parser.add_argument("--docs-dir", default=os.path.join(REPO, "docs"))
    parser.add_argument("--reuse", action="store_true", help="keep finished runs found in --work-dir")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time, each with (CPUs / jobs) threads: on a busy machine one thread per run "
        "wastes far less time in thread synchronization than two",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = parser.parse_args(argv)

    cfg = load_config(args.config_file)
    iters = args.iters or cfg.SOLVER.MAX_ITER * cfg.SOLVER.IMS_PER_BATCH
    seeds = args.seeds or [max(cfg.SEED, 0)]
    common = [*schedule_opts(cfg, iters), *args.opts]

    def bcn_ws(rate: float) -> Tuple[str, List[str]]:
        # named by the rate, so that both modes share the BCN+WS run at the same rate
        return f"BCN_WS_r{rate:g}", [*VARIANTS["BCN+WS"], "MODEL.BCN.UPDATE_RATE", repr(rate)]

    # setting name -> (run folder, overrides)
    if args.update_rates is None:
        settings = {
            "GN": ("GN", VARIANTS["GN"]),
            "GN+WS": ("GN_WS", VARIANTS["GN+WS"]),
            "BCN+WS": bcn_ws(cfg.MODEL.BCN.UPDATE_RATE),
        }
        stem, first_column = "norm_comparison", "norms"
        title = f"Mask R-CNN R-18-FPN from scratch, 1 image/batch, {iters} iterations"
    else:
        settings = {f"r = {r:g}": bcn_ws(r) for r in args.update_rates}
        stem, first_column = "bcn_update_rate", "BCN+WS, update rate"
        title = f"BCN+WS update rate, 1 image/batch, {iters} iterations"

    def run(job: Tuple[str, int]) -> Dict:
        name, seed = job
        folder, opts = settings[name]
        out = os.path.join(args.work_dir, f"{iters}it_seed{seed}", folder)
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        opts = [*common, *opts, "SEED", str(seed)]
        return train(f"{name}, seed {seed}", opts, args.config_file, out, args.reuse, threads)

    jobs = [(name, seed) for seed in seeds for name in settings]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(run, jobs)))
    runs = {name: [results[name, seed] for seed in seeds] for name in settings}

    os.makedirs(args.docs_dir, exist_ok=True)
    png = os.path.join(args.docs_dir, f"{stem}.png")
    plot_losses(runs, png, title)
    command = shlex.join(["nice", "-n", "10", ".venv/bin/python", "tools/compare_norms.py", *(argv or sys.argv[1:])])
    doc = [
        f"# {title}",
        "",
        f"Generated {time.strftime('%Y-%m-%d')} by `{command}`",
        f"(config `{os.path.relpath(args.config_file, REPO)}`, overrides: `{' '.join(common)}`, "
        f"seeds {', '.join(map(str, seeds))}).",
        "Same schedule and seeds for every row; AP on the demo's validation split after the last iteration"
        + (", mean over seeds (each seed's value in brackets)." if len(seeds) > 1 else "."),
        "",
        ap_table(runs, first_column),
        "",
        *([ordering_verdict(runs), ""] if args.update_rates is None else []),
        f"![total loss]({os.path.basename(png)})",
    ]
    with open(os.path.join(args.docs_dir, f"{stem}.md"), "w") as f:
        f.write("\n".join(doc) + "\n")
    print("\n".join(doc))


if __name__ == "__main__":
    main()
