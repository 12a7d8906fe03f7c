import pytest
from detectron2.layers import get_norm
from torch import nn

from wsbcn_d2.layers import BatchChannelNorm2d, NormOptions, resolve_norm
from wsbcn_d2.layers.bcn import EstimatedBatchNorm2d


@pytest.mark.parametrize("name", ["BN", "SyncBN", "FrozenBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN"])
def test_detectron2_names_build_what_detectron2_builds(name):
    assert type(resolve_norm(name)(64)) is type(get_norm(name, 64))


def test_gn_group_count_follows_options():
    norm = resolve_norm("GN", NormOptions(gn_num_groups=8))(64)
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 8


def test_bcn_variants():
    options = NormOptions(bcn_num_groups=16, bcn_eps=1e-3, bcn_update_rate=0.25)
    micro = resolve_norm("BCN", options)(64)
    large = resolve_norm("SyncBCN", options)(64)
    assert isinstance(micro, BatchChannelNorm2d) and micro.num_groups == 16 and micro.eps == 1e-3
    assert isinstance(micro.batch_norm, EstimatedBatchNorm2d) and micro.batch_norm.update_rate == 0.25
    assert isinstance(large.batch_norm, nn.BatchNorm2d) and not isinstance(large.batch_norm, EstimatedBatchNorm2d)


def test_passthrough_and_unknown_name():
    fn = lambda c: nn.Identity()  # noqa: E731
    assert resolve_norm(fn) is fn and resolve_norm("") == ""
    with pytest.raises(ValueError, match=r"Unknown norm 'BNC'.*'GN'.*'BCN'.*'SyncBCN'"):
        resolve_norm("BNC")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"gn_num_groups": 0}, "gn_num_groups must be an integer >= 1, got 0"),
        ({"bcn_num_groups": 2.5}, "bcn_num_groups must be an integer >= 1, got 2.5"),
        ({"bcn_eps": 0.0}, "bcn_eps must be a finite number > 0, got 0.0"),
        ({"bcn_update_rate": float("nan")}, r"bcn_update_rate must be a finite number in \[0, 1\], got nan"),
    ],
)
def test_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NormOptions(**kwargs)
