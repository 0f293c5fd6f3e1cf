"""The placement index answers what a scan of the fleet would, as work comes and goes."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from coordinator.ledger import Job, Ledger, Microtask
from coordinator.placement import FinishIndex, start_and_run_ms
from coordinator.registry import AgentRecord, Registry
from protocol import AgentState, InferenceJob, encode_arrays
from tests.coordinator.test_ledger import model
from tests.coordinator.test_registry import caps


def fleet(rng: random.Random, n: int) -> tuple[Registry, list[AgentRecord]]:
    registry = Registry()
    for i in range(n):
        # a few speed classes, so that equal estimates (ties) occur too
        per_sample = rng.choice([0.01, 0.02, 0.04, rng.uniform(0.005, 0.05)])
        registry.apply_state(
            AgentState(
                agent_id=f"a{i:03d}",
                online=True,
                seq=1,
                ts=1.0,
                capabilities=caps(slots=rng.choice([1, 2, 4]), models=[model(per_sample)]),
            )
        )
    agents = sorted(registry.agents.values(), key=lambda a: a.agent_id)
    for a in agents:
        a.latency_ms = rng.choice([0.3, 0.3, rng.uniform(0.1, 20.0)])
        a.bytes_per_ms = rng.choice([50_000.0, rng.uniform(100.0, 50_000.0)])
    return registry, agents


def big_job(samples: int, batch: int) -> Job:
    x = np.zeros((samples, 2), np.float32)
    spec = InferenceJob(job_id="j", model="m", inputs=encode_arrays({"x": x}))
    job = Job(spec=spec, arrays={"x": x}, batch_size=batch, policy="earliest_finish")
    job.split()
    return job


def scan(
    agents: list[AgentRecord],
    credit: dict[AgentRecord, int],
    payload: int,
    samples: int,
    now: float,
) -> tuple[float, float]:
    """(best ms over all, best ms over those with credit), the way a scan finds them."""
    ms = {a: sum(start_and_run_ms(a, "m", samples, payload, now)) for a in agents}
    return min(ms.values()), min((v for a, v in ms.items() if credit[a] > 0), default=np.inf)


@pytest.mark.parametrize("seed", range(6))
def test_the_index_finds_the_same_earliest_finish_as_a_scan(seed: int) -> None:
    rng = random.Random(seed)
    registry, agents = fleet(rng, rng.choice([1, 7, 60]))
    ledger = Ledger(max_attempts=100)
    job = big_job(samples=4_000, batch=4)
    ledger.add(job)
    limit = {a: a.slots * 2 for a in agents}

    def credit(a: AgentRecord) -> int:
        return limit[a] - len(a.in_flight)

    payload = job.batch_size * job.bytes_per_sample + job.whole_bytes
    index = FinishIndex(agents, model="m", samples=4, payload_bytes=payload, credit=credit)
    registry.watchers.append(index.changes)
    running: list[tuple[Microtask, AgentRecord]] = []
    clock = time.monotonic()
    checked = 0
    for _ in range(600):
        clock += rng.choice([0.0, 0.0, 0.0005, 0.003, 0.05])  # time passes, unevenly
        event = rng.random()
        if event < 0.5 and job.pending:  # place a microtask where the index says
            best, ready = index.best(clock)
            want_best, want_ready = scan(agents, {a: credit(a) for a in agents}, payload, 4, clock)
            assert best is not None and best[0] == pytest.approx(want_best, abs=1e-6)
            if want_ready == np.inf:
                assert ready is None
                continue
            assert ready is not None and ready[0] == pytest.approx(want_ready, abs=1e-6)
            checked += 1
            task = job.pending.popleft()
            ledger.dispatch(task, ready[1], lease_s=60, est_ms=rng.uniform(0.05, 5.0))
            running.append((task, ready[1]))
        elif event < 0.85 and running:  # a result comes back, refining the agent's costs
            task, agent = running.pop(rng.randrange(len(running)))
            agent.costs["m"].observe(task.samples, rng.uniform(0.01, 1.0))
            agent.latency_ms = rng.uniform(0.1, 5.0)
            # (the release of the task marks the agent changed, costs and all)
            ledger.complete(task, agent, {"y": np.zeros((4, 2), np.float32)}, registry.agents)
        elif running:  # the lease of one runs out and it goes back to the queue
            task, agent = running.pop(rng.randrange(len(running)))
            ledger.retry(task, agent, "lease_expired", "late")
    assert checked > 100
    # every re-key leaves a stale entry behind; compaction keeps the heaps bounded
    assert len(index._all) + len(index._ready) + len(index._timers) <= 6 * len(agents) + 64 + 3


def test_an_agent_still_downloading_the_model_is_keyed_by_when_it_can_start() -> None:
    rng = random.Random(7)
    registry, agents = fleet(rng, 3)
    for a in agents:
        a.latency_ms, a.bytes_per_ms = 0.3, 50_000.0
        a.costs["m"].overhead_ms, a.costs["m"].per_sample_ms = 0.0, 0.01
    agents[0].deploy_ms["m"] = 500.0  # installed in 0.5 s
    agents[0].costs["m"].per_sample_ms = 0.001  # ... but then ten times as fast
    now = time.monotonic()
    index = FinishIndex(
        agents, model="m", samples=100, payload_bytes=800, credit=lambda a: 1, now=now
    )
    registry.watchers.append(index.changes)
    best, _ = index.best(now)
    assert best is not None and best[1] is agents[1] and best[0] == pytest.approx(1.316)
    # the others are kept busy for a second; the downloader is now the earliest finish
    for a in agents[1:]:
        a.deploy_ms["m"] = 1_000.0
        a.changed()
    best, _ = index.best(now)
    assert best is not None and best[1] is agents[0]
    assert best[0] == pytest.approx(500.0 + 0.316 + 0.1)


def test_an_agent_late_with_its_work_looks_later_the_longer_it_is_late() -> None:
    registry = Registry()
    for name in ("stalled", "other"):
        caps_ = caps(slots=1, models=[model(0.01)])
        registry.apply_state(
            AgentState(agent_id=name, online=True, seq=1, ts=1.0, capabilities=caps_)
        )
    stalled, other = registry.agents["stalled"], registry.agents["other"]
    for a in (stalled, other):
        a.latency_ms, a.bytes_per_ms = 0.3, 50_000.0
        a.costs["m"].overhead_ms = 0.0
    stalled.costs["m"].per_sample_ms = 0.001  # believed ten times as fast
    # naive placement prices a missing model at 0 ms: that must not make it look free
    stalled.deploy_ms["m"] = 0.0
    ledger = Ledger(max_attempts=3)
    job = big_job(samples=400, batch=100)
    ledger.add(job)
    ledger.dispatch(job.pending.popleft(), stalled, lease_s=60, est_ms=0.5)
    now = stalled.progress_mark  # its work in flight should be done 0.5 ms after this
    index = FinishIndex(
        [other, stalled], model="m", samples=100, payload_bytes=800, credit=lambda a: 1, now=now
    )
    run_stalled, run_other = 0.3 + 0.016 + 0.1, 0.3 + 0.016 + 1.0
    for after_ms, want_agent in [
        (0.0, stalled),  # busy for 0.5 ms more
        (0.5, stalled),  # due now
        (0.9, stalled),  # overdue, by less than the work's own estimate: finishing
        (1.5, stalled),  # late (overdue by 1 ms) by 0.5 ms: 0.5 ms more
        (2.5, other),  # late by 1.5 ms: the other agent finishes first
    ]:
        at = now + after_ms / 1000
        # until it is due; then nothing until it is late; then as long again as it is late
        wait = max(0.5 - after_ms, 0.0) if after_ms < 1.0 else after_ms - 1.0
        want = run_other if want_agent is other else wait + run_stalled
        assert sum(start_and_run_ms(stalled, "m", 100, 800, at)) == pytest.approx(
            wait + run_stalled
        )
        best, _ = index.best(at)
        assert best is not None and (best[1], best[0]) == (want_agent, pytest.approx(want))


def test_a_change_of_fitness_for_work_makes_cached_candidate_lists_stale() -> None:
    registry, (a,) = fleet(random.Random(1), 1)
    epoch = AgentRecord.epoch
    a.suspect = True
    assert (AgentRecord.epoch, a.available) == (epoch + 1, False)
    a.suspect = True  # no change: the cached lists stay
    a.heard_from()  # heard from again: no longer suspect
    assert (AgentRecord.epoch, a.available) == (epoch + 2, True)
    a.draining = True
    assert AgentRecord.epoch == epoch + 3
    registry.apply_state(AgentState(agent_id=a.agent_id, online=False, seq=2, ts=2.0))
    assert AgentRecord.epoch > epoch + 3 and not a.online
