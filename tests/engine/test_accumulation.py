"""SOLVER.ACCUMULATION_STEPS k: micro-step j of process r trains what process r * k + j of a run with k times
as many processes trains (tools/train_net.py end to end, GLOO on CPU), and the parts of the step one by one."""
import re

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from dumped_runs import estimates, losses_from, preempt_after, train
from torch import nn

from helpers import DEMO_CONFIG, assert_as_accurate, assert_train_net_fails_cleanly, load_config, relative_error
from wsbcn_d2.config import amp_dtype, check_batch_split
from wsbcn_d2.data import generate_shapes_dataset, register_coco_dataset
from wsbcn_d2.engine import AccumulatingTrainer, Trainer, warn_batch_statistics
from wsbcn_d2.layers import BatchChannelNorm2d
from wsbcn_d2.layers.bcn import channel_moments

GN_WS = ["MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN", "MODEL.ROI_BOX_HEAD.NORM", "GN", "MODEL.ROI_MASK_HEAD.NORM", "GN"]
STEPS = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"]
# Runs that differ only in how per-image gradients are associated before the update ((a + b) / 2 against
# a / 2 + b / 2; DDP's all-reduce against sums over micro-steps) may differ by a few float32 roundings:
# error_bound()'s floor, 4 x 8 units of rounding.
REORDERING = 4 * 8 * torch.finfo(torch.float32).eps / 2


def differences(got: dict, expected: dict) -> dict:
    """Worst norm-wise relative difference of the weights (and estimates), momentum buffers and logged losses."""
    weights = [relative_error(got["state"][k], v) for k, v in expected["state"].items() if v.is_floating_point()]
    got_optim, expected_optim = got["optimizer"]["state"], expected["optimizer"]["state"]
    assert got_optim.keys() == expected_optim.keys() and expected_optim
    momenta = [relative_error(got_optim[i]["momentum_buffer"], s["momentum_buffer"]) for i, s in expected_optim.items()]
    assert got["losses"].keys() == expected["losses"].keys()
    losses = []
    for name, values in expected["losses"].items():
        assert [it for _, it in got["losses"][name]] == [it for _, it in values], name
        losses += [abs(a - b) / max(abs(b), 1e-30) for (a, _), (b, _) in zip(got["losses"][name], values)]
    return {"weights": max(weights), "momentum": max(momenta), "losses": max(losses)}


@pytest.fixture(scope="module")
def gn_ws_runs(dataset_opts, tmp_path_factory):
    root = tmp_path_factory.mktemp("gn_ws")
    accumulated = root / "accumulated"
    return {
        "two processes": train(2, root / "wide", dataset_opts, *GN_WS, *STEPS),
        "accumulated": train(1, accumulated, dataset_opts, *GN_WS, *STEPS, "SOLVER.ACCUMULATION_STEPS", "2"),
        "one process": train(1, root / "control", dataset_opts, *GN_WS, *STEPS),
        "accumulated folder": accumulated,
    }


def test_accumulated_steps_train_what_twice_the_processes_train(gn_ws_runs):
    wide = gn_ws_runs["two processes"][0]
    for name, difference in differences(gn_ws_runs["accumulated"][0], wide).items():
        assert difference <= REORDERING, (name, difference)
    # the control: one process over both images in one forward (one seed for both images' sampling)
    control = differences(gn_ws_runs["one process"][0], wide)
    assert control["weights"] > 1000 * REORDERING and control["losses"] > 1000 * REORDERING, control
    assert wide["allreduce"][0] == 4  # DDP's gradient all-reduce: one pass per step


def test_resumed_accumulating_run_continues_the_uninterrupted_run(gn_ws_runs, dataset_opts):
    out, full = gn_ws_runs["accumulated folder"], gn_ws_runs["accumulated"][0]
    preempt_after(out, 2)
    resumed = train(1, out, dataset_opts, *GN_WS, *STEPS, "SOLVER.ACCUMULATION_STEPS", "2", resume=True)[0]
    expected = losses_from(full, 2)
    assert resumed["losses"].keys() == expected.keys() and len(expected["total_loss"]) == 2
    for name, values in expected.items():
        assert resumed["losses"][name] == values, name  # the same code on the same machine: bitwise
    for key, value in full["state"].items():
        assert torch.equal(resumed["state"][key], value), key


def test_two_processes_accumulating_as_four(dataset_opts, tmp_path):
    # one step: later steps diverge by more than rounding wherever a proposal's top-k or matching flips
    opts = ["SOLVER.MAX_ITER", "1", "SOLVER.IMS_PER_BATCH", "4", *GN_WS]
    two = train(2, tmp_path / "two", dataset_opts, *opts, "SOLVER.ACCUMULATION_STEPS", "2")
    one = train(1, tmp_path / "one", dataset_opts, *opts, "SOLVER.ACCUMULATION_STEPS", "4")
    for name, difference in differences(one[0], two[0]).items():
        assert difference <= REORDERING, (name, difference)
    assert two[0]["allreduce"][0] == two[1]["allreduce"][0] == 1  # not one per micro-step


def test_bcn_at_update_rate_0_accumulates_exactly(dataset_opts, tmp_path):
    opts = ["SOLVER.MAX_ITER", "3", "MODEL.BCN.UPDATE_RATE", "0.0"]
    wide = train(2, tmp_path / "wide", dataset_opts, *opts)[0]
    accumulated = train(1, tmp_path / "accumulated", dataset_opts, *opts, "SOLVER.ACCUMULATION_STEPS", "2")[0]
    assert len(estimates(wide["state"])) > 50  # micro-batch BCN in every slot
    for name, difference in differences(accumulated, wide).items():
        assert difference <= REORDERING, (name, difference)


def pooled_estimates(moments: list, start: tuple, rate: float) -> list:
    """The estimates after each update of a step, from each update's (N, C) moments and H * W: the step's
    batches so far pooled around the starting mean, ``estimate = (1 - r) * start + r * pooled``."""
    start_mean, start_var = start
    sums, after = torch.zeros(3, start_mean.numel(), dtype=start_mean.dtype), []
    for mean, var, hw in moments:
        sums += torch.stack([mean.sum(0) * hw, (var + (mean - start_mean).square()).sum(0) * hw,
                             torch.full_like(start_mean, mean.shape[0] * hw)])  # fmt: skip
        step_rate = rate if sums[2, 0] > 0 else 0.0
        total = sums[2].clamp(min=1)
        after.append((start_mean.lerp(sums[0] / total, step_rate), start_var.lerp(sums[1] / total, step_rate)))
    return after


def per_update_estimates(moments: list, start: tuple, rate: float) -> list:
    """The other rule, for the control: each update on its own, as without accumulation."""
    mean_estimate, var_estimate = start
    after = []
    for mean, var, _ in moments:
        if mean.shape[0]:
            previous = mean_estimate
            mean_estimate = previous.lerp(mean.mean(0), rate)
            var_estimate = var_estimate.lerp((var + (mean - previous).square()).mean(0), rate)
        after.append((mean_estimate, var_estimate))
    return after


@pytest.mark.numerics
def test_bcn_estimates_pool_the_micro_batches_of_a_step(tmp_path):
    """Layer by layer, from each micro-batch's statistics captured at the layer's input: the estimates after
    each update of the step follow :func:`pooled_estimates` (float64 reference, float32 baseline)."""
    json_file = generate_shapes_dataset(str(tmp_path), num_images=4, image_size=64, seed=5)
    register_coco_dataset("accumulation_rule", json_file, str(tmp_path / "images"))
    cfg = load_config(
        DEMO_CONFIG, "SOLVER.ACCUMULATION_STEPS", 2, "SOLVER.MAX_ITER", 1, "SOLVER.IMS_PER_BATCH", 2,
        "DATASETS.TRAIN", ("accumulation_rule",), "DATASETS.TEST", (), "INPUT.MIN_SIZE_TRAIN", (64,),
        "INPUT.MAX_SIZE_TRAIN", 64, "INPUT.MASK_FORMAT", "bitmask", "OUTPUT_DIR", str(tmp_path / "out"), "SEED", 3,
    )  # fmt: skip
    calls = {}  # per layer, per update: the input x and the estimates after

    def pre_hook(module, args):
        calls.setdefault(module, []).append([args[0].detach().clone()])

    def post_hook(module, args, output):
        calls[module][-1].append((module.batch_norm.running_mean.clone(), module.batch_norm.running_var.clone()))

    try:
        trainer = Trainer(cfg)
        layers = [m for m in trainer.model.modules() if isinstance(m, BatchChannelNorm2d)]
        for layer in layers:
            layer.register_forward_pre_hook(pre_hook)
            layer.register_forward_hook(post_hook)
        start = {m: (m.batch_norm.running_mean.clone(), m.batch_norm.running_var.clone()) for m in layers}
        trainer.train()
    finally:
        DatasetCatalog.remove("accumulation_rule")
        MetadataCatalog.remove("accumulation_rule")
    rate, control = cfg.MODEL.BCN.UPDATE_RATE, []
    assert len(calls) == len(layers) > 30  # R-18-FPN: BCN in every slot
    for layer, layer_calls in calls.items():
        assert len(layer_calls) >= 2  # an update per micro-step at least
        moments = {
            dtype: [(*channel_moments(x.to(dtype)), x[0, 0].numel()) for x, _ in layer_calls]
            for dtype in (torch.float32, torch.float64)
        }
        starts = {dtype: tuple(t.to(dtype) for t in start[layer]) for dtype in moments}
        reference = pooled_estimates(moments[torch.float64], starts[torch.float64], rate)
        baseline = pooled_estimates(moments[torch.float32], starts[torch.float32], rate)
        others = per_update_estimates(moments[torch.float64], starts[torch.float64], rate)
        for (_, got), expected, torch_code, other in zip(layer_calls, reference, baseline, others):
            for got_t, expected_t, torch_code_t, other_t in zip(got, expected, torch_code, other):
                assert_as_accurate(got_t, torch_code_t, expected_t)
                control.append(relative_error(got_t, other_t))
    assert max(control) > 1e3 * REORDERING  # the rule is seen: one update per forward would differ


class _LinearLoss(nn.Module):
    """A linear model whose loss is float32 (finite) even where float16 gradients overflow."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, batch):
        out = self.linear(torch.stack([d["x"] for d in batch]))
        return {"loss": out.float().square().mean()}


def _fp16_step(second_batch_scale: float):
    torch.manual_seed(0)
    model = _LinearLoss()
    before = [p.detach().clone() for p in model.parameters()]
    batches = [[{"x": torch.randn(4)}], [{"x": torch.randn(4) * second_batch_scale}]]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = AccumulatingTrainer(model, batches, optimizer, accumulation_steps=2, precision=torch.float16)
    scale = trainer.grad_scaler.get_scale()
    trainer.train(0, 1)
    changed = any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    return changed, scale, trainer.grad_scaler.get_scale()


def test_float16_overflow_in_one_micro_step_skips_the_whole_step():
    changed, scale, after = _fp16_step(second_batch_scale=1.0)
    assert changed and after == scale  # finite: the step is taken, the scale kept
    # the second micro-batch's loss gradient (2 x 1e3 x 65536) overflows float16 in the linear's backward
    changed, scale, after = _fp16_step(second_batch_scale=1e3)
    assert not changed and after == scale * 0.5  # skipped, the scale backed off once


def test_bad_accumulation_values_stop_in_one_line(tmp_path):
    for total, processes, steps, expected in (
        (2, 1, 0, "SOLVER.ACCUMULATION_STEPS must be an integer >= 1, got 0"),
        (2, 1, 3, "SOLVER.IMS_PER_BATCH 2 does not divide among 1 processes (--num-gpus x --num-machines) x "
                  "SOLVER.ACCUMULATION_STEPS 3: set a multiple of 3"),
        (6, 2, 2, "set a multiple of 4"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(expected)):
            check_batch_split(total, processes, steps)
    check_batch_split(8, 2, 2)
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION must be one of 'float16', 'bfloat16', got 'float8'"):
        amp_dtype("float8")
    args = ["--config-file", DEMO_CONFIG, "SOLVER.ACCUMULATION_STEPS", "3"]
    assert_train_net_fails_cleanly(tmp_path, args, ["SOLVER.ACCUMULATION_STEPS 3", "set a multiple of 3"])
    args = ["--config-file", DEMO_CONFIG, "SOLVER.AMP.PRECISION", "half"]
    assert_train_net_fails_cleanly(tmp_path, args, ["SOLVER.AMP.PRECISION must be one of"])


def test_bfloat16_micro_steps_run_under_autocast_without_a_scaler():
    torch.manual_seed(0)
    model, dtypes = _LinearLoss(), []
    model.linear.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    batches = [[{"x": torch.randn(4)}], [{"x": torch.randn(4)}]]
    trainer = AccumulatingTrainer(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), 2, precision=torch.bfloat16)
    before = model.linear.weight.detach().clone()
    trainer.train(0, 1)
    assert trainer.grad_scaler is None and dtypes == [torch.bfloat16] * 2
    assert not torch.equal(model.linear.weight, before)


def test_norms_of_batch_statistics_warn_once(caplog):
    cfg = load_config(DEMO_CONFIG, "MODEL.FPN.NORM", "SyncBN", "MODEL.ROI_BOX_HEAD.NORM", "GN")
    for steps, expected in ((1, []), (2, ["MODEL.FPN.NORM 'SyncBN'"])):
        cfg.SOLVER.ACCUMULATION_STEPS = steps
        caplog.clear()
        with caplog.at_level("WARNING", logger="wsbcn_d2.engine"):
            warn_batch_statistics(cfg)
        assert len(caplog.records) == len(expected)
        for record in caplog.records:
            assert "SOLVER.ACCUMULATION_STEPS 2: MODEL.FPN.NORM 'SyncBN' normalize" in record.getMessage()
            assert "BCN" not in record.getMessage().split("normalize")[0]  # the BCN slots are not named
