"""Agents that die, drain or stall mid-job: the job still completes, exactly once per microtask."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator import Coordinator, OffloadClient
from coordinator.broker import LocalBroker
from coordinator.cli import JsonFormatter
from protocol import (
    AgentState,
    BrokerAddress,
    JobError,
    RunTask,
    TaskResult,
    Topics,
    encode_arrays,
    parse_task,
)
from tests.agent.test_agent import raw_client
from tests.conftest import REPO, require_mosquitto, wait_until
from tests.coordinator.test_jobs import direct

# Emulated slow devices so that the job is still running when the fault is injected.
SLOW = ("--slots", "1", "--slowdown", "30")


async def start_job(
    coord: Coordinator, digits: Any, reps: int = 3, batch: int = 100
) -> tuple[np.ndarray[Any, Any], Any]:
    x = np.tile(digits[0], (reps, 1))
    return x, coord.submit_arrays("digits-mlp", {"input": x}, batch_size=batch)


async def slow_fleet_with_a_job(
    address: BrokerAddress,
    agent_processes: Any,
    coordinator_factory: Any,
    digits: Any,
    agent_ids: tuple[str, str],
    **coordinator_options: Any,
) -> tuple[Any, Coordinator, np.ndarray[Any, Any], Any]:
    """Two slowed agent processes, a coordinator, and a job under way on them.

    Returns the first agent's process (the one a test does something to), the
    coordinator, the job's inputs and its handle.
    """
    target = agent_processes(address, agent_ids[0], *SLOW)
    agent_processes(address, agent_ids[1], *SLOW)
    coord = await coordinator_factory(address, **coordinator_options)
    await coord.wait_for_agents(2, timeout=60)
    x, handle = await start_job(coord, digits)
    return target, coord, x, handle


def assert_exact(out: Any, x: np.ndarray[Any, Any], batch: int = 100) -> None:
    parts = [direct(x[i : i + batch]) for i in range(0, len(x), batch)]
    assert np.array_equal(out["label"], np.concatenate([p[0] for p in parts]))
    assert np.array_equal(out["probabilities"], np.concatenate([p[1] for p in parts]))
    assert sum(s.samples for s in out.result.per_agent.values()) == len(x)


async def test_agent_killed_mid_job_its_microtasks_run_elsewhere(
    mosquitto_address: BrokerAddress,
    agent_processes: Any,
    coordinator_factory: Any,
    digits: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    victim, coord, x, handle = await slow_fleet_with_a_job(
        mosquitto_address, agent_processes, coordinator_factory, digits, ("k-victim", "k-survivor")
    )
    rec = coord.registry.agents["k-victim"]
    await wait_until(lambda: rec.completed >= 2, what="the victim to have done some work")
    running = set(rec.in_flight)
    caplog.set_level(logging.WARNING, logger="coordinator.service")
    victim.kill()  # SIGKILL: no drain; the broker publishes its Last Will
    out = await handle.result(timeout=120)
    assert_exact(out, x)
    assert out.result.retries >= 1, "the victim's in-flight microtasks were re-dispatched"
    assert not rec.online
    # The log names the microtasks the dead agent was running, as fields of the line.
    (line,) = [r for r in caplog.records if "re-dispatching" in r.getMessage()]
    fields = json.loads(JsonFormatter().format(line))
    assert fields["agent_id"] == "k-victim"
    assert fields["tasks"] and all(t in fields["msg"] for t in fields["tasks"])
    assert all(t.startswith(f"{handle.job_id}.") for t in fields["tasks"])
    assert set(fields["tasks"]) & running, "what it was running when it was killed"


async def test_agent_drained_mid_job_hands_back_without_losing_work(
    mosquitto_address: BrokerAddress, agent_processes: Any, coordinator_factory: Any, digits: Any
) -> None:
    leaving, coord, x, handle = await slow_fleet_with_a_job(
        mosquitto_address, agent_processes, coordinator_factory, digits, ("d-leaving", "d-staying")
    )
    rec = coord.registry.agents["d-leaving"]
    await wait_until(lambda: rec.completed >= 1, what="the leaving agent to have done work")
    leaving.proc.send_signal(signal.SIGTERM)
    out = await handle.result(timeout=120)
    assert_exact(out, x)
    assert await asyncio.to_thread(leaving.proc.wait, 30) == 0
    assert "drained" in leaving.output() or not rec.online


async def test_stalled_agent_loses_its_lease_and_its_late_results_are_dropped(
    mosquitto_address: BrokerAddress, agent_processes: Any, coordinator_factory: Any, digits: Any
) -> None:
    # Short leases, and a death timeout long enough that only the lease can act (no
    # straggler copies either: this is about leases).
    stalled, coord, x, handle = await slow_fleet_with_a_job(
        mosquitto_address,
        agent_processes,
        coordinator_factory,
        digits,
        ("s-stalled", "s-healthy"),
        lease_min_s=1.0,
        lease_factor=1.0,
        dead_after_s=60.0,
        speculate=False,
    )
    rec = coord.registry.agents["s-stalled"]
    await wait_until(lambda: len(rec.in_flight) > 0, what="work on the agent to stall")
    stalled.proc.send_signal(signal.SIGSTOP)
    try:
        out = await handle.result(timeout=120)
    finally:
        stalled.proc.send_signal(signal.SIGCONT)
    assert_exact(out, x)
    assert out.result.retries >= 1
    expired = [t for t in coord.ledger.jobs[handle.job_id].tasks if t.attempt > 1]
    assert expired and all(f[0] == "s-stalled" for t in expired for f in t.failures)
    assert all(t.agent_id != "s-stalled" for t in expired), "retries went to the healthy agent"
    # Resumed, the stalled agent obeys the cancels it was sent (or its results are late):
    # either way exactly one result per microtask was kept.
    await asyncio.sleep(1.0)
    assert coord.ledger.counts["completed"] == out.result.tasks
    # A result for the superseded first attempt, as a late agent would send it, is dropped.
    late = TaskResult(
        task_id=expired[0].task_id,
        job_id=handle.job_id,
        attempt=1,
        agent_id="s-stalled",
        ok=True,
        outputs=encode_arrays({"label": np.zeros(100, np.int64)}),
    )
    before = coord.rejected["stale_result"]
    async with raw_client(mosquitto_address) as c:
        await c.publish(Topics(coord.config.root).results("s-stalled"), late.to_json(), qos=1)
    await wait_until(lambda: coord.rejected["stale_result"] > before, what="the late result")
    assert coord.ledger.counts["completed"] == out.result.tasks


async def test_wrong_outputs_from_a_lying_agent_are_rejected_and_rerun(
    mosquitto_address: BrokerAddress, agent_factory: Any, coordinator_factory: Any, digits: Any
) -> None:
    honest = await agent_factory(mosquitto_address, "honest")
    coord = await coordinator_factory(mosquitto_address)
    await coord.wait_for_agents(1)
    topics = Topics(coord.config.root)
    # The liar advertises the honest agent's capabilities and answers every microtask with
    # one row too few.
    birth = AgentState(
        agent_id="liar", online=True, seq=1, ts=time.time(), capabilities=honest.capabilities
    )
    async with raw_client(mosquitto_address, topics.tasks("liar")) as liar:
        await liar.publish(topics.state("liar"), birth.to_json(), qos=1, retain=True)
        await wait_until(lambda: "liar" in coord.registry.agents, what="the liar's birth")

        async def lie() -> None:
            async for m in liar.messages:
                task = parse_task(m.payload)  # type: ignore[arg-type]
                if isinstance(task, RunTask):
                    n = task.inputs["input"].shape[0] - 1
                    bad = TaskResult(
                        task_id=task.task_id,
                        job_id=task.job_id,
                        attempt=task.attempt,
                        agent_id="liar",
                        ok=True,
                        outputs=encode_arrays(
                            {
                                "label": np.zeros(n, np.int64),
                                "probabilities": np.zeros((n, 10), np.float32),
                            }
                        ),
                    )
                    await liar.publish(topics.results("liar"), bad.to_json(), qos=1)

        liar_task = asyncio.create_task(lie())
        try:
            x = digits[0][:600]
            out = await coord.run("digits-mlp", {"input": x}, batch_size=100, timeout=60)
        finally:
            liar_task.cancel()
            await liar.publish(topics.state("liar"), b"", qos=1, retain=True)
    assert_exact(out, x)
    assert set(out.result.per_agent) == {"honest"}
    assert coord.rejected["bad_result"] >= 1
    assert coord.rejected["bad_result"] == out.result.retries


@pytest.fixture
def own_mosquitto() -> Any:
    """A broker for this test alone (it gets killed); requested first, so stopped last."""
    require_mosquitto()
    with LocalBroker(kind="mosquitto") as broker:
        yield broker


async def test_broker_restarted_mid_job_the_job_still_completes(
    own_mosquitto: LocalBroker, agent_processes: Any, coordinator_factory: Any, digits: Any
) -> None:
    broker = own_mosquitto
    address = BrokerAddress(host=broker.info.host, port=broker.info.port)
    # Leases short enough that microtasks lost with the broker come back quickly.
    _, coord, x, handle = await slow_fleet_with_a_job(
        address,
        agent_processes,
        coordinator_factory,
        digits,
        ("r-1", "r-2"),
        lease_min_s=2.0,
        lease_factor=2.0,
    )
    await wait_until(lambda: coord.ledger.counts["completed"] >= 2, what="some progress")
    await asyncio.to_thread(broker.kill)  # SIGKILL: nothing is flushed or saved
    await asyncio.sleep(0.5)
    await asyncio.to_thread(broker.start)  # same port, empty: no sessions, no retained
    out = await handle.result(timeout=120)
    assert_exact(out, x)
    assert coord.ledger.counts["completed"] == out.result.tasks
    # Both agents came back: each republished its birth on reconnecting.
    await wait_until(
        lambda: all(coord.registry.agents[a].available for a in ("r-1", "r-2")),
        what="both agents back",
    )


async def test_a_live_agent_renews_its_leases_so_long_work_is_not_run_twice(
    address: BrokerAddress, agent_factory: Any, coordinator_factory: Any, digits: Any
) -> None:
    # Each microtask takes about 2 s (a 400x slowed device) against a 1 s lease: only the
    # heartbeats' renewals keep the coordinator from running it a second time.
    agent = await agent_factory(
        address, "long-1", slots=1, slowdown=400.0, heartbeat_s=0.2, benchmark=True
    )
    coord = await coordinator_factory(address, lease_min_s=1.0, lease_factor=0.1)
    await coord.wait_for_agents(1)
    x = np.tile(digits[0], (2, 1))[:3000]
    out = await coord.run("digits-mlp", {"input": x}, batch_size=1500, timeout=60)
    assert_exact(out, x, batch=1500)
    assert out.result.retries == 0
    assert coord.ledger.counts["renewed"] >= 2
    assert agent.stats.received == 2 and agent.stats.completed == 2


@pytest.mark.parametrize("stop", ["sigkill", "sigterm"])
async def test_coordinator_stopped_mid_job_resumes_from_its_journal(
    stop: str,
    mosquitto_address: BrokerAddress,
    root: str,
    agent_processes: Any,
    client_factory: Any,
    digits: Any,
    tmp_path: Path,
) -> None:
    journal = tmp_path / "journal.sqlite"
    logs: list[Path] = []

    def start_coordinator() -> subprocess.Popen[bytes]:
        logs.append(tmp_path / f"coordinator-{len(logs)}.log")
        with open(logs[-1], "wb") as log:
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "coordinator.cli",
                    "--log-level",
                    "INFO",
                    "coordinator",
                    "--broker",
                    mosquitto_address.url,
                    "--root",
                    root,
                    "--journal",
                    str(journal),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    agents = [
        agent_processes(mosquitto_address, a, "--slots", "1", "--slowdown", "300")
        for a in ("j-1", "j-2")
    ]
    first = start_coordinator()
    second: subprocess.Popen[bytes] | None = None
    try:
        client: OffloadClient = await client_factory(mosquitto_address)
        state = None
        for _ in range(300):  # until the coordinator knows both agents
            with contextlib.suppress(JobError):
                state = await client.coordinator_state(timeout=0.5)
                if state.agents_online == 2:
                    break
            await asyncio.sleep(0.1)
        assert state is not None and state.agents_online == 2
        x = np.tile(digits[0], (3, 1))
        handle = await client.submit("digits-mlp", x, batch_size=100)
        for _ in range(300):  # until some microtasks are done (and journaled)
            state = await client.coordinator_state(timeout=2)
            if state.jobs and state.jobs[-1].tasks_done >= 6:
                break
            await asyncio.sleep(0.1)
        if stop == "sigkill":
            first.kill()  # no drain, no flush
            assert await asyncio.to_thread(first.wait, 10) == -signal.SIGKILL
        else:
            first.terminate()  # stops taking work and flushes its journal
            assert await asyncio.to_thread(first.wait, 15) == 0
        # Submitted while no coordinator runs: its session on the broker queues the job.
        x2 = digits[0][:500]
        handle2 = await client.submit("digits-mlp", x2, batch_size=100)
        await asyncio.sleep(1.0)
        second = start_coordinator()
        out = await handle.result(timeout=120)  # the client never resubmits
        assert_exact(out, x)
        assert_exact(await handle2.result(timeout=60), x2)
        resumed = logs[1].read_text()
        assert f"resumed job {handle.job_id} from the journal" in resumed, resumed
        done_before = int(resumed.split("journal: ")[1].split(" of ")[0])
        assert 6 <= done_before < out.result.tasks, "resumed mid-job, with the work kept"
        if stop == "sigterm":
            # Every result the first coordinator accepted was flushed before it exited.
            stopped = logs[0].read_text()
            assert f"dispatched, {done_before} completed" in stopped, stopped
        # What the agents held across the restart was taken over, not run a second time.
        # Only a result accepted in the last 100 ms before a kill (not yet committed)
        # runs again: with microtasks of ~200 ms, at most one per agent.
        assert "taken over from before the restart" in resumed, resumed
        executed = 0
        for agent in agents:
            assert await asyncio.to_thread(agent.terminate) == 0
            executed += int(agent.output().split(" received, ")[1].split(" completed")[0])
        assert out.result.tasks + 5 <= executed <= out.result.tasks + 5 + len(agents)
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 15)
