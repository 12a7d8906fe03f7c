"""The resumable training stream: ResumableBatchSampler and SeededMapDataset, in one process."""
import itertools
import random

import numpy as np
import pytest
import torch
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm

from wsbcn_d2.engine import ResumableBatchSampler, SeededMapDataset


@pytest.fixture
def as_process(monkeypatch):
    """Makes detectron2 report the given rank and world size, as in a multi-process run."""

    def set_process(rank: int, world_size: int) -> None:
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        monkeypatch.setattr(comm, "get_world_size", lambda: world_size)

    return set_process


def first_batches(sampler, count: int) -> list:
    return list(itertools.islice(sampler, count))


def test_each_process_gets_detectron2s_share_of_one_stream(as_process):
    size, seed, world_size, batch_size = 10, 5, 3, 2
    shares = {}
    for rank in range(world_size):
        as_process(rank, world_size)
        batches = first_batches(ResumableBatchSampler([0] * size, batch_size, seed=seed), 4)
        expected = list(itertools.islice(TrainingSampler(size, seed=seed), 4 * batch_size))
        assert [index for batch in batches for _, index in batch] == expected
        shares[rank] = batches
    # one process with the whole batch sees, at every iteration, what all processes see then:
    # the same images with the same augmentation seeds (derived from the place in the stream)
    as_process(0, 1)
    whole = first_batches(ResumableBatchSampler([0] * size, world_size * batch_size, seed=seed), 4)
    for k in range(4):
        assert sorted(whole[k]) == sorted(e for rank in range(world_size) for e in shares[rank][k])
    assert len({s for batch in whole for s, _ in batch}) == 4 * world_size * batch_size  # one seed each


def test_start_iter_continues_the_grouped_stream(as_process):
    as_process(1, 2)
    groups = np.random.default_rng(0).integers(0, 2, 25).tolist()
    sampler = ResumableBatchSampler(groups, 3, seed=11)
    full = first_batches(sampler, 12)
    assert all(len({groups[i] for _, i in batch}) == 1 for batch in full)  # one aspect-ratio group each
    assert {groups[i] for batch in full for _, i in batch} == {0, 1}
    sampler.start_iter = 5
    assert first_batches(sampler, 7) == full[5:]


def draws(record: dict) -> tuple:
    return record["id"], np.random.rand(), random.random(), torch.rand(1).item()


def test_mapping_depends_on_the_key_alone_and_leaves_the_caller_generators():
    dataset = SeededMapDataset([{"id": i} for i in range(4)], draws)
    first = dataset[(123, 2)]
    np_state, py_state, torch_state = np.random.get_state(), random.getstate(), torch.get_rng_state()
    dataset[(7, 1)]
    assert dataset[(123, 2)] == first
    assert dataset[(124, 2)][1:] != first[1:]
    assert dataset[(123, 3)][1:] == first[1:] and dataset[(123, 3)][0] == 3
    # the caller's generators are where they were
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and random.getstate() == py_state
    assert torch.equal(torch.get_rng_state(), torch_state)
