"""Least loaded: the agent with the fewest microtasks in flight per slot."""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.ledger import Job, Microtask
from coordinator.policies.base import Credit, Placement
from coordinator.registry import AgentRecord


class LeastLoaded:
    """Work-conserving: any agent with credit, the least loaded first (cpu % breaks ties)."""

    name = "least_loaded"

    def choose(
        self, task: Microtask, candidates: Sequence[AgentRecord], ctx: Placement
    ) -> AgentRecord | None:
        best: AgentRecord | None = None
        best_key = (0.0, 0.0)
        for agent in candidates:
            if ctx.credit(agent) <= 0:
                continue
            cpu = agent.heartbeat.cpu_percent if agent.heartbeat else 0.0
            key = (len(agent.in_flight) / agent.slots, cpu)
            if best is None or key < best_key:
                best, best_key = agent, key
        return best

    def index(self, job: Job, candidates: Sequence[AgentRecord], credit: Credit) -> None:
        return None
