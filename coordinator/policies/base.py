"""The scheduling policy interface."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from coordinator.placement import start_and_run_ms

if TYPE_CHECKING:
    from coordinator.ledger import Job, Microtask
    from coordinator.placement import FinishIndex
    from coordinator.registry import AgentRecord


Credit = Callable[["AgentRecord"], int]


@dataclass(frozen=True, slots=True)
class Placement:
    """What a policy may consult besides the candidates themselves."""

    # Microtasks an agent can still take now (in-flight limit minus in flight).
    credit: Credit
    # Bytes of the microtask's inputs on the wire.
    payload_bytes: int
    # Estimated time (ms) for the fleet to finish the work pending and in flight for this
    # model: a slower device is worth using for a task it finishes within this horizon.
    backlog_ms: float
    # The candidates by estimated finish (coordinator.placement), when the dispatcher keeps
    # one for this job and ``task`` is of the size it is keyed for; None: scan the candidates.
    index: FinishIndex | None = None


class Policy(Protocol):
    """Chooses where a microtask runs.

    ``candidates`` are live agents that have the model, never empty, ordered by id.
    Return the chosen agent — the dispatcher sends the microtask only if that agent has
    credit, otherwise it holds the microtask for a later round (late placement) — or None
    to hold it.
    """

    name: str

    def choose(
        self, task: Microtask, candidates: Sequence[AgentRecord], ctx: Placement
    ) -> AgentRecord | None: ...

    def index(
        self, job: Job, candidates: Sequence[AgentRecord], credit: Credit
    ) -> FinishIndex | None:
        """An index of ``candidates`` that ``choose`` answers from (``Placement.index``,
        kept by the dispatcher while the candidates stay the same), or None: it scans."""
        ...


def estimate_finish_ms(agent: AgentRecord, task: Microtask, payload_bytes: int) -> float:
    """Queue wait + transfer + execution of ``task`` on ``agent``, in ms from now."""
    wait, run = start_and_run_ms(
        agent, task.job.spec.model, task.samples, payload_bytes, time.monotonic()
    )
    return wait + run
