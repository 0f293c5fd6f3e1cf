"""Microtask state transitions: exactly one result per microtask, bounded attempts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from coordinator.journal import Journal
from coordinator.ledger import Job, Ledger, TaskState
from coordinator.policies import EarliestFinish, Placement, RoundRobin
from coordinator.registry import AgentRecord
from protocol import InferenceJob, ModelInfo, TensorSpec, encode_arrays
from tests.coordinator.test_registry import caps


def model(cost_per_sample_ms: float) -> ModelInfo:
    return ModelInfo(
        id="m",
        sha256="0" * 64,
        size=1,
        inputs=[TensorSpec(name="x", dtype="float32", shape=[None, 2])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[None, 2])],
        cost=[(1, cost_per_sample_ms), (100, 100 * cost_per_sample_ms)],
    )


def agent(agent_id: str, per_sample_ms: float, slots: int = 1) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id, seq=1, capabilities=caps(slots=slots, models=[model(per_sample_ms)])
    )


def job(n: int = 10, batch: int = 2) -> Job:
    x = np.arange(2 * n, dtype=np.float32).reshape(n, 2)
    spec = InferenceJob(job_id="j", model="m", inputs=encode_arrays({"x": x}))
    j = Job(spec=spec, arrays={"x": x}, batch_size=batch, policy="earliest_finish")
    j.split()
    return j


def test_split_covers_every_sample_once_in_order() -> None:
    j = job(n=11, batch=3)
    assert [(t.start, t.stop) for t in j.tasks] == [(0, 3), (3, 6), (6, 9), (9, 11)]
    assert np.array_equal(j.inputs_for(j.tasks[3])["x"].to_array(), j.arrays["x"][9:11])


def test_only_the_current_attempt_on_the_leaseholder_counts() -> None:
    ledger = Ledger(max_attempts=3)
    j = job()
    ledger.add(j)
    a, b = agent("a", 0.01), agent("b", 0.01)
    t = j.pending.popleft()
    msg = ledger.dispatch(t, a, lease_s=0.0, est_ms=1.0)
    assert (msg.attempt, t.state, list(a.in_flight)) == (1, TaskState.RUNNING, [t.task_id])
    # the lease runs out: the task goes back with its next attempt elsewhere
    assert ledger.expired(now=t.lease_until + 1) == [t]
    assert ledger.retry(t, a, "lease_expired", "late")
    assert a.in_flight == {} and j.pending[0] is t
    j.pending.popleft()
    assert ledger.dispatch(t, b, lease_s=10, est_ms=1.0).attempt == 2
    assert not ledger.is_current(t, 1, "a"), "the superseded attempt's late result is dropped"
    assert not ledger.is_current(t, 2, "a"), "only the leaseholder may answer"
    assert ledger.is_current(t, 2, "b")
    ledger.complete(t, b, {"y": np.zeros((2, 2), np.float32)}, {"b": b})
    assert not ledger.is_current(t, 2, "b"), "a duplicate of the accepted result is dropped"
    assert j.done == 1 and j.per_agent == {"b": 2}


def test_attempts_are_bounded_and_the_failure_names_task_agents_and_reasons() -> None:
    ledger = Ledger(max_attempts=2)
    j = job()
    t = j.pending.popleft()
    a = agent("a", 0.01)
    ledger.dispatch(t, a, lease_s=10, est_ms=1)
    # a hand-back from a draining agent does not use up an attempt
    assert ledger.retry(t, a, "draining", "bye", count_attempt=False)
    for _ in range(2):
        j.pending.popleft()
        ledger.dispatch(t, a, lease_s=10, est_ms=1)
        requeued = ledger.retry(t, a, "execution_failed", "boom")
    assert not requeued and t.state is TaskState.FAILED
    assert j.error is not None and j.error.code == "exhausted"
    assert "j.0" in j.error.message and "attempt on a: [execution_failed] boom" in j.error.message


def test_earliest_finish_prefers_the_fast_agent_and_uses_the_slow_one_only_within_backlog() -> None:
    fast, slow = agent("fast", 0.01), agent("slow", 0.04)
    j = job(n=100, batch=10)
    t = j.tasks[0]
    credit = {fast: 1, slow: 1}
    ctx = Placement(credit=lambda a: credit[a], payload_bytes=80, backlog_ms=0.0)
    policy = EarliestFinish()
    assert policy.choose(t, [fast, slow], ctx) is fast
    credit[fast] = 0
    fast.queued_ms = 0.2  # two tasks queued on the fast agent
    # near the end of the job the slow agent would only delay it: wait for the fast one
    assert policy.choose(t, [fast, slow], ctx) is fast
    # plenty of work left: the slow agent finishes this one within the horizon
    busy = Placement(credit=lambda a: credit[a], payload_bytes=80, backlog_ms=50.0)
    assert policy.choose(t, [fast, slow], busy) is slow


def test_round_robin_takes_turns_even_when_an_agent_is_faster() -> None:
    fast, slow = agent("fast", 0.01), agent("slow", 0.04)
    ctx = Placement(credit=lambda a: 1, payload_bytes=0, backlog_ms=0.0)
    rr = RoundRobin()
    t = job().tasks[0]
    assert [rr.choose(t, [fast, slow], ctx).agent_id for _ in range(4)] == [  # type: ignore[union-attr]
        "fast",
        "slow",
        "fast",
        "slow",
    ]


def redundant_job(redundancy: int, tolerance: float = 0.0) -> Job:
    x = np.arange(8, dtype=np.float32).reshape(4, 2)
    spec = InferenceJob(
        job_id="r",
        model="m",
        inputs=encode_arrays({"x": x}),
        redundancy=redundancy,
        tolerance=tolerance,
    )
    j = Job(spec=spec, arrays={"x": x}, batch_size=2, policy="earliest_finish")
    j.split()
    return j


def y(value: float) -> dict[str, np.ndarray]:  # type: ignore[type-arg]
    return {"y": np.full((2, 2), value, np.float32)}


def test_redundant_copies_keep_the_majority_and_report_the_dissenter() -> None:
    ledger = Ledger(max_attempts=3)
    j = redundant_job(3)
    ledger.add(j)
    assert len(j.units) == 2 and len(j.tasks) == 6 and j.quorum == 2
    agents = {n: agent(n, 0.01) for n in ("a", "liar", "c")}
    copies = j.units[0]
    for t, name in zip(copies, ("a", "liar", "c"), strict=True):
        ledger.dispatch(t, agents[name], lease_s=10, est_ms=1)
    assert ledger.complete(copies[1], agents["liar"], y(666.0), agents) == []
    assert ledger.complete(copies[0], agents["a"], y(1.0), agents) == []
    assert j.done == 0, "one against one: no majority yet"
    assert ledger.complete(copies[2], agents["c"], y(1.0), agents) == []
    assert j.done == 1 and np.array_equal(j.outputs[0]["y"], y(1.0)["y"])  # type: ignore[index]
    assert j.disagreements == {"liar": 1} and j.excluded == {"liar"}
    assert j.per_agent == {"a": 2}, "the unit counts once, for the first agreeing copy"


def test_a_quorum_cancels_the_copies_still_running() -> None:
    ledger = Ledger(max_attempts=3)
    j = redundant_job(3)
    agents = {n: agent(n, 0.01) for n in ("a", "b", "c")}
    copies = j.units[1]
    for t, name in zip(copies, "abc", strict=True):
        ledger.dispatch(t, agents[name], lease_s=10, est_ms=1)
    ledger.complete(copies[0], agents["a"], y(2.0), agents)
    cancelled = ledger.complete(copies[1], agents["b"], y(2.0), agents)
    assert cancelled == [copies[2]] and copies[2].state is TaskState.CANCELLED
    assert agents["c"].in_flight == {}
    assert not ledger.is_current(copies[2], 1, "c"), "the cancelled copy's result is dropped"
    assert j.disagreements == {}


def test_results_that_never_agree_get_more_copies_then_fail_the_job() -> None:
    ledger = Ledger(max_attempts=1)
    j = redundant_job(3)
    agents = {n: agent(n, 0.01) for n in "abcd"}
    copies = list(j.units[0])
    for t, name in zip(copies, "abc", strict=True):
        ledger.dispatch(t, agents[name], lease_s=10, est_ms=1)
    for i, (t, name) in enumerate(zip(copies, "abc", strict=True)):
        ledger.complete(t, agents[name], y(float(i)), agents)
    # three different answers: one more copy could still make a majority of two
    extra = [t for t in j.units[0] if t.state is TaskState.PENDING]
    assert len(extra) == 1 and j.pending[0] is extra[0] and j.error is None
    ledger.dispatch(j.pending.popleft(), agents["d"], lease_s=10, est_ms=1)
    ledger.complete(extra[0], agents["d"], y(9.0), agents)
    assert j.error is not None and j.error.code == "no_majority"
    assert "no 2 of 4 results agree" in j.error.message


def test_float_outputs_agree_within_the_tolerance() -> None:
    ledger = Ledger(max_attempts=3)
    j = redundant_job(3, tolerance=1e-3)
    agents = {n: agent(n, 0.01) for n in "abc"}
    copies = j.units[0]
    for t, name in zip(copies, "abc", strict=True):
        ledger.dispatch(t, agents[name], lease_s=10, est_ms=1)
    ledger.complete(copies[0], agents["a"], y(1.0), agents)
    cancelled = ledger.complete(copies[1], agents["b"], y(1.0005), agents)
    assert j.done == 1 and cancelled == [copies[2]]


def test_a_speculative_copy_that_finishes_first_wins_and_the_straggler_is_cancelled() -> None:
    ledger = Ledger(max_attempts=3)
    j = job(n=4, batch=2)
    slow, fast = agent("slow", 0.01), agent("fast", 0.01)
    straggler = j.pending.popleft()
    ledger.dispatch(straggler, slow, lease_s=60, est_ms=1)
    copy = j.add_copy(straggler.unit, speculative=True)
    assert j.pending[0] is copy and copy.task_id != straggler.task_id
    ledger.dispatch(j.pending.popleft(), fast, lease_s=60, est_ms=1)
    assert ledger.complete(copy, fast, y(3.0), {"slow": slow, "fast": fast}) == [straggler]
    assert straggler.state is TaskState.CANCELLED and slow.in_flight == {}
    assert j.done == 1 and j.per_agent == {"fast": 2}
    assert j.samples == 4  # the copy of unit 0, last in the task list, does not hide unit 1


def test_copies_added_after_a_restart_never_reuse_an_earlier_copy_id(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    first = Ledger(max_attempts=3, journal=Journal(path))
    j = job(n=4, batch=2)
    first.add(j)
    before = j.add_copy(0, speculative=True)
    first.journal.commit()  # type: ignore[union-attr]
    [rec] = Journal(path).unfinished()  # a second coordinator opens the journal
    second = Ledger(max_attempts=3, journal=Journal(path))
    again = Job(spec=rec.spec, arrays=rec.arrays, batch_size=rec.batch_size, policy=rec.policy)
    again.split()
    second.restore(again, rec)
    after = again.add_copy(0, speculative=True)
    assert before.index == after.index and before.task_id != after.task_id
    # what a restarted coordinator may take over: attempts of the re-created copies only
    held = again.tasks[0]
    assert held.from_before_restart(1) and not after.from_before_restart(1)
    a = agent("a", 0.01)
    second.adopt(held, a, 1, lease_s=10, est_ms=1)
    assert second.retry(held, a, "lease_expired", "late")
    assert not held.from_before_restart(1), "a superseded attempt is not taken over twice"
    # a failed job's copies are cancelled: nothing of it can be taken over any more
    second.cancel_job(again, {})
    assert all(t.state is not TaskState.PENDING for t in again.tasks)
