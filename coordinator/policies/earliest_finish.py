"""Earliest estimated finish time: queue wait + transfer + measured execution cost."""

from __future__ import annotations

import time
from collections.abc import Sequence

from coordinator.ledger import Job, Microtask
from coordinator.placement import FinishIndex
from coordinator.policies.base import Credit, Placement, estimate_finish_ms
from coordinator.registry import AgentRecord

INF = float("inf")


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
        if ctx.index is not None:  # the same answer in O(log N) (coordinator.placement)
            best, ready = ctx.index.best(time.monotonic())
        else:
            best = ready = None  # (ms, agent); an infinite estimate is never chosen
            for agent in candidates:
                ms = estimate_finish_ms(agent, task, ctx.payload_bytes)
                if ms < (best[0] if best else INF):
                    best = (ms, agent)
                if ms < (ready[0] if ready else INF) and ctx.credit(agent) > 0:
                    ready = (ms, agent)
        if ready is not None and (
            best is None or ready[1] is best[1] or ready[0] <= max(ctx.backlog_ms, best[0])
        ):
            return ready[1]
        return best[1] if best is not None else None

    def index(self, job: Job, candidates: Sequence[AgentRecord], credit: Credit) -> FinishIndex:
        """The candidates by estimated finish of a microtask of the job's batch size."""
        return FinishIndex(
            candidates,
            model=job.spec.model,
            samples=job.batch_size,
            payload_bytes=job.batch_size * job.bytes_per_sample + job.whole_bytes,
            credit=credit,
        )
