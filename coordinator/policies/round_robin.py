"""Strict round robin: each capable agent in turn, whatever its speed."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.ledger import Job, Microtask
from coordinator.policies.base import Credit, Placement
from coordinator.registry import AgentRecord


class RoundRobin:
    """Agents take turns; if it is the turn of an agent with no credit, the task waits.

    Splits a job evenly across devices, which is what it is for: a baseline, and fair
    sharing when devices are alike.
    """

    name = "round_robin"

    def __init__(self) -> None:
        self._turn = 0

    def choose(
        self, task: Microtask, candidates: Sequence[AgentRecord], ctx: Placement
    ) -> AgentRecord | None:
        agent = candidates[self._turn % len(candidates)]
        if ctx.credit(agent) > 0:
            self._turn += 1
        return agent

    def index(self, job: Job, candidates: Sequence[AgentRecord], credit: Credit) -> None:
        return None
