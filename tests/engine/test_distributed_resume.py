"""tools/train_net.py with several processes (GLOO on CPU) and exact resume, end to end.

Each run goes through tools/train_net.py (tests/engine/train_net_with_dumps.py adds a hook
that saves every process's model state, BCN estimates per step and logged losses).
"""
import pytest
import torch
from dumped_runs import ALL_ROIS, estimates, losses_from, preempt_after, train


def test_two_processes_hold_identical_estimates_and_resume(dataset_opts, tmp_path):
    out = tmp_path / "run"
    opts = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2"]
    full = train(2, out, dataset_opts, *opts)
    assert (out / "model_0000001.pth").is_file() and (out / "model_final.pth").is_file()
    assert len(estimates(full[0]["state"])) > 50  # micro-batch BCN everywhere
    for step in range(4):  # after every step, not only at the end
        for key, value in full[0]["estimates"][step].items():
            assert torch.equal(full[1]["estimates"][step][key], value), (step, key)
    for key, value in full[0]["state"].items():  # weights too: DDP's reduced gradients
        assert torch.equal(full[1]["state"][key], value), key
    some_estimate = next(iter(full[0]["estimates"][0]))
    assert not torch.equal(full[0]["estimates"][0][some_estimate], full[0]["estimates"][3][some_estimate])

    # pre-empted after the checkpoint of iteration 2, then resumed from it in its own folder
    preempt_after(out, 2)
    resumed = train(2, out, dataset_opts, *opts, resume=True)
    for key, value in full[0]["state"].items():
        torch.testing.assert_close(resumed[0]["state"][key], value, rtol=1e-5, atol=1e-6)
        assert torch.equal(resumed[1]["state"][key], resumed[0]["state"][key]), key
    assert losses_from(resumed[0], 0).keys() == losses_from(full[0], 2).keys()
    for name, values in losses_from(full[0], 2).items():
        assert [it for _, it in resumed[0]["losses"][name]] == [2, 3]
        torch.testing.assert_close(resumed[0]["losses"][name], values, rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
def test_two_processes_estimate_as_one_process_over_both_batches(dataset_opts, tmp_path):
    # with the weights held (LR 0) the estimates depend on the images alone: process r of 2
    # gets the stream's elements r, r + 2, ..., one process at 2 images per batch gets both
    # (with the same augmentation, seeded by the element's position in the stream)
    opts = ["SOLVER.MAX_ITER", "3", "SOLVER.BASE_LR", "0.0", *ALL_ROIS]
    two = train(2, tmp_path / "two", dataset_opts, *opts)
    one = train(1, tmp_path / "one", dataset_opts, *opts)
    for step in range(3):
        for key, value in one[0]["estimates"][step].items():
            # float32 rounding: convolutions over batches of 1 and 2 images sum in other orders
            scale = value.abs().max().item()
            torch.testing.assert_close(two[0]["estimates"][step][key], value, rtol=0, atol=1e-4 * scale)
            assert torch.equal(two[1]["estimates"][step][key], two[0]["estimates"][step][key])


def test_resume_continues_the_uninterrupted_run(dataset_opts, tmp_path):
    out = tmp_path / "run"
    opts = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3"]
    full = train(1, out, dataset_opts, *opts)[0]
    preempt_after(out, 3)
    # resumed with 2 data-loading workers: each image's augmentation is seeded by its place in
    # the stream, so which process maps it does not matter
    resumed = train(1, out, dataset_opts, *opts, "DATALOADER.NUM_WORKERS", "2", resume=True)[0]
    expected = losses_from(full, 3)
    assert resumed["losses"].keys() == expected.keys() and len(expected["total_loss"]) == 3
    for name, values in expected.items():
        torch.testing.assert_close(resumed["losses"][name], values, rtol=1e-6, atol=1e-7)
    assert estimates(full["state"]).keys() and full["state"].keys() == resumed["state"].keys()
    for key, value in full["state"].items():  # weights and BCN estimates
        torch.testing.assert_close(resumed["state"][key], value, rtol=1e-6, atol=1e-7)
