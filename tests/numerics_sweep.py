"""Run the numerically sensitive tests (``pytest -m numerics``) under each CPU capability torch can use here.

torch picks its CPU kernels by the machine's vector width (``ATEN_CPU_CAPABILITY``: default, avx2, avx512),
and the thread count splits its sums: both change float32 rounding. Each run logs every
``helpers.assert_as_accurate`` check; the table gives each run's result, time and tightest check (error
against float64 as a fraction of its bound: 1.0 fails).

    python tests/numerics_sweep.py                          # every capability of this CPU, 1 and 2 threads
    python tests/numerics_sweep.py --capabilities default --threads 2 -- -x   # after --: pytest arguments
    python tests/numerics_sweep.py --log checks     # every check kept in checks.<capability>.<threads>

Exits non-zero when a run fails or runs no test.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

TESTS = os.path.dirname(os.path.abspath(__file__))


def supported_capabilities() -> list:
    """The ``ATEN_CPU_CAPABILITY`` values this CPU can run (torch reports a requested one even if it cannot)."""
    supported = ["default"]
    if getattr(torch.cpu, "_is_avx2_supported", lambda: False)():
        supported.append("avx2")
    if getattr(torch.cpu, "_is_avx512_supported", lambda: False)():
        supported.append("avx512")
    return supported


def run(capability: str, threads: int, pytest_args: list, keep: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        log = keep or os.path.join(tmp, "checks.jsonl")
        if os.path.exists(log):
            os.remove(log)
        env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, OMP_NUM_THREADS=str(threads), WSBCN_ERROR_LOG=log)
        start = time.time()
        done = subprocess.run(
            [sys.executable, "-m", "pytest", TESTS, "-q", "-m", "numerics", "-p", "no:cacheprovider", *pytest_args],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        checks = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    tightest = max(checks, key=lambda c: c["error"] / c["bound"], default=None)
    return dict(capability=capability, threads=threads, returncode=done.returncode, summary=summary,
                seconds=time.time() - start, checks=len(checks), tightest=tightest, output=done.stdout + done.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capabilities", nargs="+", default=supported_capabilities(),
                        help="ATEN_CPU_CAPABILITY values (default: those this CPU supports)")
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch intra-op thread counts")
    parser.add_argument("--log", default="", help="keep every check as JSON lines in LOG.<capability>.<threads>")
    args, pytest_args = parser.parse_known_args()
    pytest_args = [a for a in pytest_args if a != "--"]
    unsupported = set(args.capabilities) - set(supported_capabilities())
    if unsupported:
        parser.error(f"this CPU cannot run {sorted(unsupported)}: it supports {supported_capabilities()}")
    failed = False
    print(f"{'capability':<11}{'threads':>8}{'seconds':>9}{'checks':>8}  tightest check  result")
    for capability in args.capabilities:
        for threads in args.threads:
            r = run(capability, threads, pytest_args, args.log and f"{args.log}.{capability}.{threads}")
            t = r["tightest"]
            tight = f"{t['error'] / t['bound']:.2f} ({t['test'].split('::')[-1]}: {t['msg']})" if t else "-"
            print(f"{capability:<11}{threads:>8}{r['seconds']:>9.0f}{r['checks']:>8}  {tight}  {r['summary']}", flush=True)
            if r["returncode"] != 0:  # pytest's 5 (no test ran) included
                failed = True
                print(r["output"][-5000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
