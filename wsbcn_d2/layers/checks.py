"""The checks of WS and norm hyper-parameters, each written once.

``name`` is what the user set: a config key where the value came from a config
(``"MODEL.BCN.EPS"``), the constructor argument otherwise (``"BCN eps"``). Each
raises a one-line ``ValueError`` naming it and the value.
"""
import math
from typing import Any, Optional

__all__ = ["check_eps", "check_num_groups", "check_update_rate"]


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_eps(eps: Any, name: str) -> None:
    """An eps added to a variance or std: a finite number > 0."""
    if not (_is_finite_number(eps) and eps > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {eps!r}")


def check_update_rate(rate: Any, name: str) -> None:
    """Micro-batch BCN's estimate update rate: a finite number in [0, 1]."""
    if not (_is_finite_number(rate) and 0 <= rate <= 1):
        raise ValueError(f"{name} must be a finite number in [0, 1], got {rate!r}")


def check_num_groups(groups: Any, name: str, channels: Optional[int] = None) -> None:
    """A group count: an integer >= 1 that divides ``channels``, where given."""
    if not (isinstance(groups, int) and not isinstance(groups, bool) and groups >= 1):
        raise ValueError(f"{name} must be an integer >= 1, got {groups!r}")
    if channels is not None and channels % groups:
        raise ValueError(f"{name} {groups} does not divide a layer's {channels} channels")
