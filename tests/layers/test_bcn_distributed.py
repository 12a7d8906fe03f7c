"""BCN in multi-process training: statistics are reduced across processes (2 CPU workers, GLOO)."""
import os

import pytest
import torch
from detectron2.utils import comm

from helpers import assert_as_accurate
from wsbcn_d2.engine import launch
from wsbcn_d2.layers import BatchChannelNorm2d

pytestmark = pytest.mark.numerics
C, G = 8, 4
BATCHES = {0: 2, 1: 1}  # unequal per-process batches; a later step gives rank 1 an empty batch


def inputs(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + rank)
    n = 0 if (step == 1 and rank == 1) else BATCHES[rank]
    return torch.randn(n, C, 5, 5, generator=g) * (rank + 1) + rank


def run_steps(module: BatchChannelNorm2d, rank_inputs) -> list:
    outputs = []
    for step, x in enumerate(rank_inputs):
        outputs.append(module(x).detach())
    return outputs


def worker(out_dir: str) -> None:
    rank = comm.get_rank()
    results = {}
    for estimate in (True, False):
        torch.manual_seed(0)
        module = BatchChannelNorm2d(C, num_groups=G, estimate=estimate, update_rate=0.5)
        outs = run_steps(module, [inputs(rank, s) for s in range(3)])
        results[estimate] = (outs, module.state_dict())
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_statistics_are_reduced_across_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # CPU workers even where GPUs are visible (launch() wants 2 GPUs there)
    launch(worker, 2, dist_url="tcp://127.0.0.1:29517", args=(str(tmp_path),))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for estimate in (True, False):
        # one process over the whole batch, in float32 (the yardstick of rounding) and in float64
        singles, joint = [], []
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(0)
            singles.append(BatchChannelNorm2d(C, num_groups=G, estimate=estimate, update_rate=0.5).to(dtype))
            joint.append(run_steps(singles[-1], [torch.cat([inputs(0, s), inputs(1, s)]).to(dtype) for s in range(3)]))
        for r in (0, 1):
            outs, state = ranks[r][estimate]
            # every process ends with the estimates of one process that saw the whole batch
            # (SyncBCN's running variance is detectron2's NaiveSyncBatchNorm's: biased, unlike torch's)
            keys = ("batch_norm.running_mean", "batch_norm.running_var") if estimate else ("batch_norm.running_mean",)
            for key in keys:
                assert_as_accurate(state[key], *(single.state_dict()[key] for single in singles), msg=key)
            for step in range(3):
                offset = 0 if r == 0 else inputs(0, step).shape[0]
                expected = [outputs[step][offset : offset + outs[step].shape[0]] for outputs in joint]
                if outs[step].numel():
                    assert_as_accurate(outs[step], *expected, msg=f"rank {r}, step {step}")
                else:
                    assert expected[0].shape == outs[step].shape
