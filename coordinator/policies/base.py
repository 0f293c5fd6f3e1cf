"""The scheduling policy interface."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from coordinator.ledger import Microtask
    from coordinator.registry import AgentRecord


@dataclass(frozen=True, slots=True)
class Placement:
    """What a policy may consult besides the candidates themselves."""

    # Microtasks an agent can still take now (in-flight limit minus in flight).
    credit: Callable[[AgentRecord], int]
    # Bytes of the microtask's inputs on the wire.
    payload_bytes: int
    # Estimated time (ms) for the fleet to finish the work pending and in flight for this
    # model: a slower device is worth using for a task it finishes within this horizon.
    backlog_ms: float


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


def estimate_finish_ms(agent: AgentRecord, task: Microtask, payload_bytes: int) -> float:
    """Queue wait + transfer + execution of ``task`` on ``agent``, in ms from now."""
    model = task.job.spec.model
    cost = agent.costs[model]
    wait = agent.wait_ms(time.monotonic())
    if agent.deploy_ms:  # the agent lacks the model: it runs once the model is installed
        wait = max(wait, agent.deploy_ms.get(model, 0.0))
    return wait + agent.transfer_ms(payload_bytes) + cost.estimate(task.samples)
