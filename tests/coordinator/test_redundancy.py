"""Untrusted and uneven fleets: majority votes over redundant copies, and straggler copies."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from protocol import BrokerAddress, JobError
from tests.conftest import wait_until
from tests.coordinator.test_failures import assert_exact


async def test_redundancy_outvotes_an_agent_that_returns_wrong_outputs(
    address: BrokerAddress, agent_factory: Any, coordinator_factory: Any, digits: Any
) -> None:
    for name in ("h1", "h2", "h3"):
        await agent_factory(address, name, slots=1)
    # Right names, shapes and dtypes, wrong values: only a vote can tell.
    await agent_factory(address, "liar", slots=1, corrupt_outputs=1.0)
    coord = await coordinator_factory(address)
    await coord.wait_for_agents(4)
    x = digits[0][:1200]
    handle = coord.submit_arrays("digits-mlp", {"input": x}, batch_size=50, redundancy=3)
    out = await handle.result(timeout=60)
    assert_exact(out, x, batch=50)
    assert out.result.tasks == 24, "tasks count units of work, not copies"
    job = coord.ledger.jobs[handle.job_id]
    assert "liar" in out.result.disagreements, "the liar was given work and caught"
    assert job.excluded == {"liar"} and "liar" not in out.result.per_agent
    assert coord.ledger.counts["disagreements"] == sum(out.result.disagreements.values())


async def test_redundancy_beyond_the_fleet_is_refused_with_the_reason(
    address: BrokerAddress, agent_factory: Any, coordinator_factory: Any, digits: Any
) -> None:
    await agent_factory(address, "only", slots=1)
    coord = await coordinator_factory(address)
    await coord.wait_for_agents(1)
    with pytest.raises(JobError) as e:
        coord.submit_arrays("digits-mlp", digits[0][:10], redundancy=2)
    assert e.value.code == "no_capacity"
    assert "redundancy 2 needs 2 distinct agents" in str(e.value)


async def test_a_straggler_is_overtaken_by_a_copy_on_an_idle_agent(
    mosquitto_address: BrokerAddress, agent_factory: Any, coordinator_factory: Any, digits: Any
) -> None:
    # The device that stalls is the one the coordinator knows as the fastest: its estimates
    # still say it finishes first, and they must not hold the job's tail for it.
    steady = await agent_factory(mosquitto_address, "steady", slots=1, benchmark=True, slowdown=3.0)
    slow = await agent_factory(mosquitto_address, "slowing", slots=1, benchmark=True)
    # Leases far longer than the job: only a straggler copy can finish it early.
    coord = await coordinator_factory(mosquitto_address, lease_min_s=300.0)
    await coord.wait_for_agents(2)
    model = "digits-mlp"
    registry = coord.registry.agents
    assert registry["slowing"].costs[model].estimate(1000) < registry["steady"].costs[
        model
    ].estimate(1000), "the agent about to stall is believed the faster one"
    x = np.tile(digits[0], (20, 1))
    # Microtasks of 1,000: few in flight on each agent, so the fleet's backlog is short
    # and the dispatcher would rather wait for the faster agent than use the slower one.
    handle = coord.submit_arrays(model, {"input": x}, batch_size=1000)
    job = coord.ledger.jobs[handle.job_id]
    await wait_until(lambda: job.done >= 10, what="the job under way")
    # The device slows down 20,000-fold mid-job (thermal throttling, a noisy neighbour).
    slow.config = slow.config.with_(slowdown=20_000.0)
    out = await handle.result(timeout=60)
    assert_exact(out, x, batch=1000)
    assert coord.ledger.counts["speculated"] >= 1
    overtaken = [t for t in job.tasks if t.speculative and t.agent_id == "steady"]
    assert overtaken, "copies of the straggler's microtasks ran on the steady agent"
    assert all(
        any(c.agent_id == "slowing" and c.state.value == "cancelled" for c in job.units[t.unit])
        for t in overtaken
    ), "and the straggling originals were cancelled"
    await asyncio.sleep(0.5)
    assert steady.stats.completed + slow.stats.completed >= out.result.tasks


async def test_when_no_majority_is_possible_the_job_fails_instead_of_waiting_forever(
    address: BrokerAddress, agent_factory: Any, coordinator_factory: Any, digits: Any
) -> None:
    # Two agents, two copies each, one of them lying: the copies never agree and no third
    # agent exists to break the tie.
    await agent_factory(address, "honest", slots=1)
    await agent_factory(address, "liar", slots=1, corrupt_outputs=1.0)
    coord = await coordinator_factory(address, dead_after_s=1.0)
    await coord.wait_for_agents(2)
    handle = coord.submit_arrays("digits-mlp", digits[0][:100], batch_size=50, redundancy=2)
    with pytest.raises(JobError) as e:
        await handle.result(timeout=60)
    assert e.value.code == "no_majority"
    assert "one more distinct agent" in str(e.value) and "honest, liar" in str(e.value)
