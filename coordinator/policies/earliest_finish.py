"""Earliest estimated finish time: queue wait + transfer + measured execution cost."""

from __future__ import annotations

import time
from collections.abc import Sequence

from coordinator.ledger import Job, Microtask
from coordinator.placement import FinishIndex
from coordinator.policies.base import Credit, Placement, estimate_finish_ms
from coordinator.registry import AgentRecord


class EarliestFinish:
    """The default: run each microtask where it is estimated to finish first.

    The agent that would finish first may have no credit left; then an agent that does
    have credit still gets the task if it finishes it within the fleet's backlog horizon
    (the job would not end sooner by waiting), otherwise the task waits for the better
    agent. This gives a device a share proportional to its speed without letting a slow
    device hold the last microtask of a job.
    """

    name = "earliest_finish"

    def choose(
        self, task: Microtask, candidates: Sequence[AgentRecord], ctx: Placement
    ) -> AgentRecord | None:
        if ctx.index is not None:
            return self._choose_indexed(ctx.index, ctx.backlog_ms)
        best: AgentRecord | None = None
        best_ms = float("inf")
        ready: AgentRecord | None = None
        ready_ms = float("inf")
        for agent in candidates:
            ms = estimate_finish_ms(agent, task, ctx.payload_bytes)
            if ms < best_ms:
                best, best_ms = agent, ms
            if ms < ready_ms and ctx.credit(agent) > 0:
                ready, ready_ms = agent, ms
        if ready is not None and (ready is best or ready_ms <= max(ctx.backlog_ms, best_ms)):
            return ready
        return best

    def index(self, job: Job, candidates: Sequence[AgentRecord], credit: Credit) -> FinishIndex:
        """The candidates by estimated finish of a microtask of the job's batch size."""
        return FinishIndex(
            candidates,
            model=job.spec.model,
            samples=job.batch_size,
            payload_bytes=job.batch_size * job.bytes_per_sample + job.whole_bytes,
            credit=credit,
        )

    @staticmethod
    def _choose_indexed(index: FinishIndex, backlog_ms: float) -> AgentRecord | None:
        """The same rule, in O(log N) (coordinator.placement)."""
        best, ready = index.best(time.monotonic())
        if ready is not None and (
            best is None or ready[1] is best[1] or ready[0] <= max(backlog_ms, best[0])
        ):
            return ready[1]
        return best[1] if best is not None else None
