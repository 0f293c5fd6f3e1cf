"""Placement at fleet scale: an index of a job's candidate agents by estimated finish.

``earliest_finish`` asks, for every microtask, which agent would finish it first, and
which of those with credit would. Scanning the fleet for that costs O(N) a decision
(about 3 µs an agent: 30 ms at 10,000 agents). The index answers in O(log N): it keeps
the candidates in heaps whose keys do not age, and re-keys an agent only when something
its estimate reads has changed (``AgentRecord.changed``: work dispatched or returned, a
result refining its costs or link).

An estimate is ``wait + move + run``: ``move + run`` the transfer and execution of a
microtask of the job's usual size, ``wait`` the time before the agent could begin it: until
``start``, the moment its work in flight should be done by its estimates (or its copy of
the model installed). An agent a little past that moment is taken to be finishing (the
estimates are noisy); one that has overrun it by as long again as the work was estimated
to take is *late*, and from then on assumed to need as long again as it has been late: a
device that stalls soon stops looking like the best one. (Taking an overdue agent as
free, as an estimate that only counts down would, made a stalled device the favourite:
the dispatcher held a job's last microtasks for it while the rest of the fleet sat idle.)

So the keys do not age: an agent that could start now is keyed by ``move + run``, one busy
until a known moment by ``start + move + run`` in absolute time, and a late one by
``move + run - late_from``, to which the present moment is added (every late agent ages
alike). A busy agent moves to the idle heap when its ``start`` has passed, and is keyed
again when it turns late (a timer per agent). Every key is exact or a lower bound of the
truth, so checking the top of each heap is enough: the minimum is exact.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coordinator.registry import AgentRecord


def start_at(agent: AgentRecord, model: str, now: float) -> tuple[float, float | None]:
    """(the moment ``agent`` could start a new microtask of ``model``, monotonic s; the
    moment it is late with its work in flight if that is not done by then, or None)."""
    drains = agent.drains_at()
    if drains is None:
        start, late_from = now, None
    else:  # late once overdue by as long again as the work was estimated to take
        start, late_from = drains, 2 * drains - agent.progress_mark
    # Lacking the model, it runs once the model is installed (priced when the candidates
    # are listed, and listed again every CANDIDATES_DOWNLOAD_TTL_S while that lasts).
    install_ms = agent.deploy_ms.get(model, 0.0) if agent.deploy_ms else 0.0
    if install_ms > wait_ms(start, late_from, now):
        return now + install_ms / 1000, None
    return start, late_from


def wait_ms(start: float, late_from: float | None, now: float) -> float:
    """ms from ``now`` until a start at ``start``; from ``late_from`` on, as long again as
    it has been late."""
    if late_from is not None and now >= late_from:
        return (now - late_from) * 1000
    return max(start - now, 0.0) * 1000


def run_ms(agent: AgentRecord, model: str, samples: int, payload_bytes: int) -> float:
    """ms to move ``payload_bytes`` to ``agent`` and run ``samples`` samples there."""
    return agent.transfer_ms(payload_bytes) + agent.costs[model].estimate(samples)


def start_and_run_ms(
    agent: AgentRecord, model: str, samples: int, payload_bytes: int, now: float
) -> tuple[float, float]:
    """(ms from ``now`` until ``agent`` could start a new microtask of ``model``, ms to
    move ``payload_bytes`` there and run ``samples`` samples)."""
    return wait_ms(*start_at(agent, model, now), now), run_ms(agent, model, samples, payload_bytes)


# (key, candidate order, version, agent, move + run ms, start: monotonic s)
_Entry = tuple[float, int, int, "AgentRecord", float, float]


class _Heaps:
    """Agents by estimated finish: ``idle`` keyed by move + run, ``busy`` by the absolute
    finish, ``late`` by move + run - late_from (add the present). An entry whose version is
    not its agent's current one is stale."""

    def __init__(self, versions: dict[AgentRecord, int]) -> None:
        self.idle: list[_Entry] = []
        self.busy: list[_Entry] = []
        self.late: list[_Entry] = []
        self._versions = versions

    def push(
        self,
        order: int,
        version: int,
        agent: AgentRecord,
        run_ms: float,
        start: float,
        late_from: float | None,
        now: float,
    ) -> None:
        if late_from is not None and now >= late_from:
            entry = (run_ms - late_from * 1000, order, version, agent, run_ms, start)
            heapq.heappush(self.late, entry)
        elif start > now:
            heapq.heappush(self.busy, (start * 1000 + run_ms, order, version, agent, run_ms, start))
        else:
            heapq.heappush(self.idle, (run_ms, order, version, agent, run_ms, start))

    def best(self, now: float) -> tuple[float, AgentRecord] | None:
        """The agent that would finish first, and in how many ms."""
        versions, busy = self._versions, self.busy
        while busy:
            _, order, version, agent, run_ms, start = busy[0]
            if versions.get(agent) != version:
                heapq.heappop(busy)
            elif start <= now:  # its work should be done: it could start at once
                heapq.heappop(busy)
                heapq.heappush(self.idle, (run_ms, order, version, agent, run_ms, start))
            else:
                break
        found: tuple[float, int, AgentRecord] | None = None
        for heap, shift in ((self.idle, 0.0), (busy, -now * 1000), (self.late, now * 1000)):
            while heap and versions.get(heap[0][3]) != heap[0][2]:
                heapq.heappop(heap)
            if heap and (found is None or (heap[0][0] + shift, heap[0][1]) < found[:2]):
                found = (heap[0][0] + shift, heap[0][1], heap[0][3])
        return None if found is None else (found[0], found[2])

    def __len__(self) -> int:
        return len(self.idle) + len(self.busy) + len(self.late)


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
        # (late_from, order, version, agent): when an agent with work in flight turns late
        # if no result has come by then (it is keyed again).
        self._timers: list[tuple[float, int, int, AgentRecord]] = []
        self.changes: set[AgentRecord] = set()
        now = time.monotonic() if now is None else now
        for agent in candidates:
            self._key(agent, now)

    def _key(self, agent: AgentRecord, now: float) -> None:
        version = self._versions.get(agent, 0) + 1
        self._versions[agent] = version
        if self.model not in agent.costs:  # reborn without it: out until the list is rebuilt
            return
        start, late_from = start_at(agent, self.model, now)
        order = self._order[agent]
        key = (order, version, agent, run_ms(agent, self.model, self.samples, self.payload_bytes))
        self._all.push(*key, start, late_from, now)
        if self._credit(agent) > 0:
            self._ready.push(*key, start, late_from, now)
        if late_from is not None and now < late_from:
            heapq.heappush(self._timers, (late_from, order, version, agent))

    def sync(self, now: float) -> None:
        """Re-key the agents that changed since the last answer, or turned late."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            _, _, version, agent = heapq.heappop(timers)
            if self._versions.get(agent) == version:
                self.changes.add(agent)
        if self.changes:
            changes = list(self.changes)
            self.changes.clear()  # the same set: the registry holds it
            for agent in changes:
                if agent in self._order:
                    self._key(agent, now)
        if len(self._all) + len(self._ready) + len(timers) > 6 * len(self._order) + 64:
            self._compact(now)

    def _compact(self, now: float) -> None:
        """Drop the stale entries (every re-key leaves one behind)."""
        self._all = _Heaps(self._versions)
        self._ready = _Heaps(self._versions)
        self._timers = []
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
