"""Scheduling policies, selectable by name."""

from __future__ import annotations

from coordinator.policies.base import Placement, Policy, estimate_finish_ms
from coordinator.policies.earliest_finish import EarliestFinish
from coordinator.policies.least_loaded import LeastLoaded
from coordinator.policies.round_robin import RoundRobin

POLICIES: dict[str, type[Policy]] = {
    "earliest_finish": EarliestFinish,
    "least_loaded": LeastLoaded,
    "round_robin": RoundRobin,
}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}") from None


__all__ = [
    "POLICIES",
    "EarliestFinish",
    "LeastLoaded",
    "Placement",
    "Policy",
    "RoundRobin",
    "estimate_finish_ms",
    "make_policy",
]
