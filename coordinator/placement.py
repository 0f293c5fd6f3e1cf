"""Placement at fleet scale: an index of a job's candidate agents by estimated finish.

``earliest_finish`` asks, for every microtask, which agent would finish it first, and
which of those with credit would. Scanning the fleet for that costs O(N) a decision
(about 3 µs an agent: 30 ms at 10,000 agents). The index answers in O(log N): it keeps
the candidates in heaps whose keys do not age, and re-keys an agent only when something
its estimate reads has changed (``AgentRecord.changed``: work dispatched or returned, a
result refining its costs or link).

An estimate is ``start + move + run``: ``start`` the moment the agent could begin a new
microtask (its queue drained, or its copy of the model installed), ``move + run`` the
transfer and execution of a microtask of the job's usual size. So an agent that could
start now is keyed by ``move + run`` (the same at every moment), and one busy until a
known moment by ``start + move + run`` in absolute time (the same at every moment until
``start`` has passed, when it moves to the first kind). Both keys are exact or a lower
bound of the truth, so checking the top of a heap is enough: the minimum is exact.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coordinator.registry import AgentRecord


def start_and_run_ms(
    agent: AgentRecord, model: str, samples: int, payload_bytes: int, now: float
) -> tuple[float, float]:
    """(ms from ``now`` until ``agent`` could start a new microtask of ``model``, ms to
    move ``payload_bytes`` there and run ``samples`` samples)."""
    wait = agent.wait_ms(now)
    if agent.deploy_ms:  # the agent lacks the model: it runs once the model is installed
        wait = max(wait, agent.deploy_ms.get(model, 0.0))
    return wait, agent.transfer_ms(payload_bytes) + agent.costs[model].estimate(samples)


# (key ms, candidate order, version, agent, move + run ms, start: monotonic s)
_Entry = tuple[float, int, int, "AgentRecord", float, float]


class _Heaps:
    """Agents by estimated finish: ``idle`` keyed by move + run, ``busy`` by the absolute
    finish. An entry whose version is not its agent's current one is stale."""

    def __init__(self, versions: dict[AgentRecord, int]) -> None:
        self.idle: list[_Entry] = []
        self.busy: list[_Entry] = []
        self._versions = versions

    def push(
        self, order: int, version: int, agent: AgentRecord, run_ms: float, start: float, now: float
    ) -> None:
        if start <= now:
            heapq.heappush(self.idle, (run_ms, order, version, agent, run_ms, start))
        else:
            heapq.heappush(self.busy, (start * 1000 + run_ms, order, version, agent, run_ms, start))

    def best(self, now: float) -> tuple[float, AgentRecord] | None:
        """The agent that would finish first, and in how many ms."""
        versions, idle, busy = self._versions, self.idle, self.busy
        while busy:
            _, order, version, agent, run_ms, start = busy[0]
            if versions.get(agent) != version:
                heapq.heappop(busy)
            elif start <= now:  # its queue has drained: it could start at once
                heapq.heappop(busy)
                heapq.heappush(idle, (run_ms, order, version, agent, run_ms, start))
            else:
                break
        while idle and versions.get(idle[0][3]) != idle[0][2]:
            heapq.heappop(idle)
        if idle and (not busy or idle[0][0] <= busy[0][0] - now * 1000):
            return idle[0][0], idle[0][3]
        if busy:
            return busy[0][0] - now * 1000, busy[0][3]
        return None

    def __len__(self) -> int:
        return len(self.idle) + len(self.busy)


class FinishIndex:
    """A job's candidates by estimated finish of a microtask of ``samples`` samples moving
    ``payload_bytes``: all of them, and those with credit (the dispatcher's rule, in
    ``EarliestFinish``, needs both). ``changes`` is registered with the registry and
    collects the agents to re-key before the next answer."""

    def __init__(
        self,
        candidates: Sequence[AgentRecord],
        *,
        model: str,
        samples: int,
        payload_bytes: int,
        credit: Callable[[AgentRecord], int],
        now: float | None = None,
    ) -> None:
        self.model = model
        self.samples = samples
        self.payload_bytes = payload_bytes
        self._credit = credit
        self._order = {a: i for i, a in enumerate(candidates)}
        self._versions: dict[AgentRecord, int] = {}
        self._all = _Heaps(self._versions)
        self._ready = _Heaps(self._versions)
        self.changes: set[AgentRecord] = set()
        now = time.monotonic() if now is None else now
        for agent in candidates:
            self._key(agent, now)

    def _key(self, agent: AgentRecord, now: float) -> None:
        version = self._versions.get(agent, 0) + 1
        self._versions[agent] = version
        if self.model not in agent.costs:  # reborn without it: out until the list is rebuilt
            return
        wait_ms, run_ms = start_and_run_ms(agent, self.model, self.samples, self.payload_bytes, now)
        key = (self._order[agent], version, agent, run_ms, now + wait_ms / 1000, now)
        self._all.push(*key)
        if self._credit(agent) > 0:
            self._ready.push(*key)

    def sync(self, now: float) -> None:
        """Re-key the agents that changed since the last answer."""
        if self.changes:
            changes = list(self.changes)
            self.changes.clear()  # the same set: the registry holds it
            for agent in changes:
                if agent in self._order:
                    self._key(agent, now)
        if len(self._all) + len(self._ready) > 4 * len(self._order) + 64:
            self._compact(now)

    def _compact(self, now: float) -> None:
        """Drop the stale entries (every re-key leaves one behind)."""
        self._all = _Heaps(self._versions)
        self._ready = _Heaps(self._versions)
        for agent in self._order:
            self._key(agent, now)

    def best(
        self, now: float
    ) -> tuple[tuple[float, AgentRecord] | None, tuple[float, AgentRecord] | None]:
        """((ms, agent) finishing first, (ms, agent) with credit finishing first)."""
        self.sync(now)
        return self._all.best(now), self._ready.best(now)


@dataclass(eq=False)
class Candidates:
    """A job's candidate agents, as the dispatcher caches them between rounds."""

    candidates: list[AgentRecord]
    epoch: int  # AgentRecord.epoch when they were listed
    expires: float  # monotonic s
    rate: float  # samples per ms they get through together (the backlog horizon)
    index: FinishIndex | None = None  # the job's policy's index of them (Policy.index)
