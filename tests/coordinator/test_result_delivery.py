"""A job's result reaches its client even when a connection drops at the worst moment.

Both ends of a result use clean MQTT sessions: a client away when its result is published
never gets it, and a result still in the coordinator's socket when its connection dies
never reaches the broker. The coordinator keeps recent results, a client that reconnects
submits again what it waits for, and a coordinator that reconnects publishes again what
it finished just before. Connections are cut for real, by a TCP relay between one party
and Mosquitto.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import numpy as np

from bench.netfault import DelayRelay
from coordinator import Coordinator, OffloadClient
from protocol import BrokerAddress, InferenceJob, JobError, encode_arrays
from tests.conftest import wait_until
from tests.coordinator.test_jobs import direct
from tests.test_metrics import scrape


def gate(target: BrokerAddress) -> DelayRelay:
    """A relay between MQTT clients and the broker that the tests hold, cut and refuse
    (``bench.netfault.DelayRelay`` without a delay): holding is what makes a message
    certain to be lost by the cut that follows."""
    return DelayRelay(
        listen_host="127.0.0.1", target_host=target.host, target_port=target.port, delay_s=0
    )


def through(relay: DelayRelay, target: BrokerAddress) -> BrokerAddress:
    return replace(target, host="127.0.0.1", port=relay.port)


def job_spec(job_id: str, x: np.ndarray[Any, Any], client_id: str) -> InferenceJob:
    return InferenceJob.model_validate(
        {
            "job_id": job_id,
            "model": "digits-mlp",
            "inputs": encode_arrays({"input": x}),
            "batch_size": len(x),
            "client_id": client_id,
        }
    )


def assert_direct(out: Any, x: np.ndarray[Any, Any]) -> None:
    """Equal to onnxruntime run directly on the same batch (the job is one microtask)."""
    label, prob = direct(x)
    assert out.result.ok and out.result.tasks == 1
    assert np.array_equal(out["label"], label)
    assert np.array_equal(out["probabilities"], prob)


async def one_agent_fleet(
    agent_address: BrokerAddress,
    coordinator_address: BrokerAddress,
    agent_factory: Any,
    coordinator_factory: Any,
    **coordinator_options: Any,
) -> tuple[Any, Coordinator]:
    """One one-slot agent and a coordinator that has seen it (each through its address)."""
    agent = await agent_factory(agent_address, "rd-worker", slots=1)
    coord: Coordinator = await coordinator_factory(coordinator_address, **coordinator_options)
    await coord.wait_for_agents(1)
    return agent, coord


async def finish_while_the_client_is_away(
    address: BrokerAddress,
    root: str,
    agent_factory: Any,
    coordinator_factory: Any,
    x: np.ndarray[Any, Any],
    **coordinator_options: Any,
) -> tuple[Coordinator, Any]:
    """The client submits, its link is cut, the job finishes, the link comes back.

    Returns the coordinator and the outcome of ``handle.result()`` (the outputs or the
    JobError)."""
    async with gate(address) as agent_gate, gate(address) as client_gate:
        _, coord = await one_agent_fleet(
            through(agent_gate, address),
            address,
            agent_factory,
            coordinator_factory,
            **coordinator_options,
        )
        async with OffloadClient(
            through(client_gate, address), root=root, client_id="rd-client"
        ) as client:
            agent_gate.hold()  # the agent's result waits at the gate...
            handle = await client.submit("digits-mlp", x, batch_size=len(x))
            await wait_until(lambda: handle.job_id in coord.ledger.jobs, what="the job")
            client_gate.cut(refuse=True)  # ...until the client is away
            agent_gate.release()
            job = coord.ledger.jobs[handle.job_id]
            await wait_until(lambda: job.terminal, what="the job to finish")
            assert job.finished_ok
            assert not handle.done(), "the client cannot have its result: it is away"
            client_gate.restore()
            try:
                return coord, await handle.result(timeout=60)
            except JobError as e:
                return coord, e


async def test_result_published_while_the_client_was_away_arrives_after_it_reconnects(
    mosquitto_address: BrokerAddress,
    root: str,
    agent_factory: Any,
    coordinator_factory: Any,
    digits: Any,
) -> None:
    x = digits[0][:40]
    coord, out = await finish_while_the_client_is_away(
        mosquitto_address, root, agent_factory, coordinator_factory, x, metrics_port=0
    )
    assert not isinstance(out, JobError), out
    assert_direct(out, x)
    assert coord.resent == {"resubmitted": 1}
    assert coord.rejected["duplicate_job"] == 1, "the resubmission did not run the job again"
    metrics = await scrape(coord.metrics.port)
    assert metrics['edge_offload_results_resent_total{reason="resubmitted"}'] == 1
    assert metrics["edge_offload_results_held_bytes"] > 0


async def test_a_result_no_longer_held_is_a_clear_error_not_a_hang(
    mosquitto_address: BrokerAddress,
    root: str,
    agent_factory: Any,
    coordinator_factory: Any,
    digits: Any,
) -> None:
    x = digits[0][:40]
    # Smaller than any result: none is kept.
    coord, out = await finish_while_the_client_is_away(
        mosquitto_address, root, agent_factory, coordinator_factory, x, result_cache_bytes=64
    )
    assert isinstance(out, JobError)
    assert out.code == "result_expired"
    assert "no longer holds its result" in out.message and "new job id" in out.message
    assert coord.resent == {"expired": 1}
    assert coord._results.nbytes == 0


async def test_a_submission_lost_with_the_clients_link_is_submitted_again(
    mosquitto_address: BrokerAddress,
    root: str,
    agent_factory: Any,
    coordinator_factory: Any,
    digits: Any,
) -> None:
    x = digits[0][:40]
    _, coord = await one_agent_fleet(
        mosquitto_address, mosquitto_address, agent_factory, coordinator_factory
    )
    async with (
        gate(mosquitto_address) as relay,
        OffloadClient(
            through(relay, mosquitto_address), root=root, client_id="rd-client"
        ) as client,
    ):
        relay.hold()
        handle = await client.submit("digits-mlp", x, batch_size=len(x))
        relay.cut()  # the submission is lost with the connection; the client reconnects
        assert handle.job_id not in coord.ledger.jobs
        out = await handle.result(timeout=60)
    assert_direct(out, x)
    assert not coord.resent, "it ran once: nothing to send again"
    assert coord.ledger.counts["dispatched"] == 1


async def test_only_the_jobs_owner_gets_its_result_again(
    mosquitto_address: BrokerAddress,
    root: str,
    agent_factory: Any,
    coordinator_factory: Any,
    digits: Any,
) -> None:
    x = digits[0][:40]
    _, coord = await one_agent_fleet(
        mosquitto_address, mosquitto_address, agent_factory, coordinator_factory
    )
    async with (
        OffloadClient(mosquitto_address, root=root, client_id="owner") as owner,
        OffloadClient(mosquitto_address, root=root, client_id="intruder") as intruder,
    ):
        first = await owner.run("digits-mlp", x, batch_size=len(x), timeout=60)
        job_id = first.job_id
        # Another identity submits the owner's job id under its own name (jobs/submit/
        # intruder; claiming the owner's client id from there is refused as forbidden, see
        # tests/test_security.py).
        stolen = await intruder.submit_spec(job_spec(job_id, x, "intruder"))
        # Its submissions and its replies each keep their order: had the coordinator
        # answered that resubmission, the answer would be in before this job's result.
        await intruder.run("digits-mlp", x[:5], batch_size=5, timeout=60)
        assert not stolen.done(), "another identity got the owner's result"
        assert coord.resent == {}
        # The owner asking again gets it, the same.
        again = await owner.submit_spec(job_spec(job_id, x, "owner"))
        out = await again.result(timeout=60)
    assert_direct(out, x)
    assert out.result == first.result
    assert coord.resent == {"resubmitted": 1}
    assert coord.ledger.counts["dispatched"] == 2, "the owner's job and the intruder's own"


async def test_a_result_lost_with_the_coordinators_link_is_published_again(
    mosquitto_address: BrokerAddress,
    root: str,
    agent_factory: Any,
    coordinator_factory: Any,
    digits: Any,
) -> None:
    x = digits[0][:40]
    async with gate(mosquitto_address) as agent_gate, gate(mosquitto_address) as coord_gate:
        # Results handed to the connection in the last keepalive before it was last known
        # good are published again; a long keepalive keeps the second cut below inside it
        # however slow the machine.
        agent, coord = await one_agent_fleet(
            through(agent_gate, mosquitto_address),
            replace(through(coord_gate, mosquitto_address), keepalive=600),
            agent_factory,
            coordinator_factory,
        )
        async with OffloadClient(mosquitto_address, root=root, client_id="rd-client") as client:
            agent_gate.hold()
            handle = await client.submit("digits-mlp", x, batch_size=len(x))
            # The microtask reached the agent: the coordinator's dispatch went through.
            await wait_until(lambda: agent.stats.received == 1, what="the microtask")
            coord_gate.hold()  # what the coordinator writes from now on stays at the gate
            agent_gate.release()  # the agent's result reaches it, the job finishes...
            job = coord.ledger.jobs[handle.job_id]
            await wait_until(lambda: job.terminal, what="the job to finish")
            assert not handle.done(), "its result is held at the gate"
            coord_gate.cut()  # ...and the result is lost with the connection
            out = await handle.result(timeout=60)
            assert_direct(out, x)
            assert coord.resent == {"reconnected": 1}
            # Cut again: the result goes out once more; the client, done with the job,
            # ignores it, and goes on working.
            coord_gate.cut()
            await wait_until(lambda: coord.resent["reconnected"] == 2, what="another copy")
            await wait_until(lambda: coord._link.connected.is_set(), what="the coordinator")
            second = await client.run("digits-mlp", x[:5], batch_size=5, timeout=60)
            assert second["label"].shape == (5,)
            assert handle.done() and (await handle.result()).result == out.result


async def test_more_waiting_jobs_than_the_coordinators_burst_are_all_submitted_again(
    mosquitto_address: BrokerAddress,
    root: str,
    agent_factory: Any,
    coordinator_factory: Any,
    digits: Any,
) -> None:
    # The coordinator drops, without an answer, what an identity submits beyond its burst:
    # the client's resubmissions after a reconnection must be paced under it.
    n, burst = 400, 150
    x = digits[0][:n]
    async with gate(mosquitto_address) as agent_gate, gate(mosquitto_address) as client_gate:
        _, coord = await one_agent_fleet(
            through(agent_gate, mosquitto_address),
            mosquitto_address,
            agent_factory,
            coordinator_factory,
            client_burst=float(burst),
        )
        async with OffloadClient(
            through(client_gate, mosquitto_address), root=root, client_id="rd-many"
        ) as client:
            agent_gate.hold()  # no job finishes until the client is away
            handles = []
            for i in range(n):
                if i and i % 100 == 0:
                    await asyncio.sleep(0.25)  # the first submissions, paced by hand
                handles.append(await client.submit("digits-mlp", x[i : i + 1], batch_size=1))
            await wait_until(
                lambda: all(h.job_id in coord.ledger.jobs for h in handles), what="the jobs"
            )
            jobs = [coord.ledger.jobs[h.job_id] for h in handles]
            client_gate.cut(refuse=True)
            agent_gate.release()
            await wait_until(lambda: all(j.terminal for j in jobs), what="the jobs to finish")
            assert not any(h.done() for h in handles)
            client_gate.restore()
            outs = await asyncio.gather(*(h.result(timeout=30) for h in handles))
    label, _ = direct(x)
    assert np.array_equal(np.concatenate([o["label"] for o in outs]), label)
    assert coord.resent == {"resubmitted": n}
    assert coord.rejected["job_rate_limited"] == 0
