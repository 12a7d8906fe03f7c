"""Norm names -> norm-layer constructors.

detectron2's ``get_norm`` knows a fixed table of names but accepts any callable
``C -> nn.Module`` in their place, and its ResNet blocks, FPN and conv heads
pass such a callable through. :func:`resolve_norm` turns a name into that
callable, so the plugin's builders reach BCN (and a GN with a configurable
group count) without patching detectron2.
"""
from dataclasses import dataclass
from typing import Callable, Dict, Union

from detectron2.layers import get_norm as d2_get_norm
from torch import nn

from .bcn import DEFAULT_UPDATE_RATE, BatchChannelNorm2d
from .checks import check_eps, check_num_groups, check_update_rate

__all__ = ["BATCH_STATISTICS_NORMS", "NormOptions", "register_norm", "resolve_norm", "norm_names"]


@dataclass(frozen=True)
class NormOptions:
    """Hyper-parameters of the norms that take any (filled from the config)."""

    gn_num_groups: int = 32
    bcn_num_groups: int = 32
    bcn_eps: float = 1e-5
    bcn_update_rate: float = DEFAULT_UPDATE_RATE

    def __post_init__(self):
        check_num_groups(self.gn_num_groups, "NormOptions gn_num_groups")
        check_num_groups(self.bcn_num_groups, "NormOptions bcn_num_groups")
        check_eps(self.bcn_eps, "NormOptions bcn_eps")
        check_update_rate(self.bcn_update_rate, "NormOptions bcn_update_rate")


NormBuilder = Callable[[int, NormOptions], nn.Module]
_NORMS: Dict[str, NormBuilder] = {}


def register_norm(name: str, builder: NormBuilder) -> None:
    """Make ``name`` usable wherever the plugin accepts a norm name."""
    if name in _NORMS:
        raise ValueError(f"norm {name!r} is already registered")
    _NORMS[name] = builder


def norm_names() -> list:
    """All registered norm names ("" means no norm)."""
    return ["", *_NORMS]


def resolve_norm(
    norm: Union[str, Callable[[int], nn.Module]], options: NormOptions = NormOptions()
) -> Union[str, Callable[[int], nn.Module]]:
    """Return what detectron2's ``get_norm`` accepts: ``""`` (no norm) or ``C -> nn.Module``.

    Callables are returned unchanged. Unknown names raise a ``ValueError``
    listing the valid ones.
    """
    if callable(norm) or norm == "":
        return norm
    if norm not in _NORMS:
        raise ValueError(f"Unknown norm {norm!r}; valid names: {', '.join(repr(n) for n in norm_names())}")
    builder = _NORMS[norm]
    return lambda num_channels: builder(num_channels, options)


def _d2_builder(name: str) -> NormBuilder:
    return lambda num_channels, options: d2_get_norm(name, num_channels)


for _name in ("BN", "SyncBN", "FrozenBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN"):
    register_norm(_name, _d2_builder(_name))
register_norm("GN", lambda c, o: nn.GroupNorm(o.gn_num_groups, c))
register_norm(
    "BCN",  # micro-batch BCN: estimated statistics
    lambda c, o: BatchChannelNorm2d(c, o.bcn_num_groups, o.bcn_eps, estimate=True, update_rate=o.bcn_update_rate),
)
register_norm(
    "SyncBCN",  # large-batch BCN: batch statistics synchronized across processes
    lambda c, o: BatchChannelNorm2d(c, o.bcn_num_groups, o.bcn_eps, estimate=False),
)
del _name

BATCH_STATISTICS_NORMS = frozenset({"BN", "SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "SyncBCN"})
"""Norms that normalize (in training) with the statistics of the batch they see."""
