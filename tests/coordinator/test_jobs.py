"""Inference jobs end to end through a real broker, agent processes and the client SDK."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiomqtt
import numpy as np
import onnxruntime as ort
import pytest

from coordinator import OffloadClient, service
from coordinator.report import build_report
from protocol import BrokerAddress, JobError, JobResult, Rejection, Topics
from tests.agent.test_agent import collect, raw_client
from tests.conftest import DIGITS_MODEL


def direct(x: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    session = ort.InferenceSession(str(DIGITS_MODEL), providers=["CPUExecutionProvider"])
    label, prob = session.run(["label", "probabilities"], {"input": x})
    return label, prob


async def test_job_through_two_agent_processes_equals_direct_onnxruntime(
    address: BrokerAddress,
    agent_processes: Any,
    coordinator_factory: Any,
    client_factory: Any,
    digits: Any,
) -> None:
    x, y = digits
    agent_processes(address, "p-1", "--slots", "1")
    agent_processes(address, "p-2", "--slots", "2")
    coord = await coordinator_factory(address)
    await coord.wait_for_agents(2, timeout=60)
    client: OffloadClient = await client_factory(address)
    batch = 50
    out = await client.run("digits-mlp", {"input": x}, batch_size=batch, timeout=60)

    r = out.result
    assert r.ok and r.samples == len(x) and r.tasks == -(-len(x) // batch)
    assert set(r.per_agent) == {"p-1", "p-2"}, "both agent processes took part"
    assert sum(s.samples for s in r.per_agent.values()) == len(x)
    # Bit-identical to running the same microtask batches directly...
    parts = [direct(x[i : i + batch]) for i in range(0, len(x), batch)]
    assert np.array_equal(out["label"], np.concatenate([p[0] for p in parts]))
    assert np.array_equal(out["probabilities"], np.concatenate([p[1] for p in parts]))
    # ...and within 1e-6 of one run over the whole array.
    label, prob = direct(x)
    assert np.array_equal(out["label"], label)
    assert np.abs(out["probabilities"] - prob).max() <= 1e-6
    assert np.mean(out["label"] == y) > 0.95


async def test_bad_jobs_get_clear_errors_and_the_service_keeps_serving(
    address: BrokerAddress,
    root: str,
    agent_factory: Any,
    coordinator_factory: Any,
    client_factory: Any,
    digits: Any,
) -> None:
    x = digits[0][:64]
    await agent_factory(address, "b-1")
    coord = await coordinator_factory(address, max_payload_bytes=200_000)
    await coord.wait_for_agents(1)
    client: OffloadClient = await client_factory(address)

    with pytest.raises(JobError) as e:
        await client.run("no-such-model", {"input": x}, timeout=10)
    assert e.value.code == "unknown_model"
    assert "no-such-model" in e.value.message and "digits-mlp" in e.value.message

    with pytest.raises(JobError) as e:
        await client.run("digits-mlp", {"input": x[:, :32]}, timeout=10)
    assert e.value.code == "bad_input"
    assert "'input': expected shape ['N', 64], got [64, 32]" in e.value.message

    with pytest.raises(JobError) as e:
        await client.run("digits-mlp", {"input": x.astype(np.float64)}, timeout=10)
    assert e.value.code == "bad_input" and "expected dtype float32, got float64" in e.value.message

    with pytest.raises(JobError) as e:
        await client.run("digits-mlp", {"pixels": x}, timeout=10)
    assert e.value.code == "bad_input" and "missing ['input']" in e.value.message

    big = np.zeros((1000, 64), np.float32)  # 256 KB raw, 341 KB in JSON: over the limit
    with pytest.raises(JobError) as e:
        await client.run("digits-mlp", {"input": big}, timeout=10)
    assert e.value.code == "too_large" and "200000" in e.value.message

    # Malformed JSON from a plain MQTT client: refused on jobs/rejected and, because a job
    # id can still be found in it, on that job's result topic.
    topics = Topics(root)
    async with raw_client(address, topics.rejected, topics.result("broken-1")) as c:
        await c.publish(topics.submit, b'{"job_id": "broken-1", "model": ', qos=1)
        await c.publish(topics.submit, b"\xff\xfe\x00", qos=1)
        msgs = await collect(c, 3, timeout=10)
    rejections = [
        Rejection.from_json(m.payload)
        for m in msgs  # type: ignore[arg-type]
        if m.topic.matches(topics.rejected)
    ]
    results = [
        JobResult.from_json(m.payload)
        for m in msgs  # type: ignore[arg-type]
        if m.topic.matches(topics.result("broken-1"))
    ]
    assert [r.error.code for r in rejections] == ["malformed", "malformed"]
    assert rejections[0].job_id == "broken-1" and rejections[1].job_id is None
    assert len(results) == 1 and not results[0].ok and results[0].error is not None
    assert results[0].error.code == "malformed"

    # Everything was counted, and the next job runs normally.
    assert coord.rejected["job_unknown_model"] == 1
    assert coord.rejected["job_bad_input"] == 3
    assert coord.rejected["job_too_large"] == 1
    assert coord.rejected["job_malformed"] == 2
    out = await client.run("digits-mlp", {"input": x}, timeout=10)
    assert out["label"].shape == (64,)


async def test_forged_and_malformed_agent_messages_are_counted_not_fatal(
    address: BrokerAddress,
    root: str,
    agent_factory: Any,
    coordinator_factory: Any,
    client_factory: Any,
    digits: Any,
) -> None:
    await agent_factory(address, "f-1")
    coord = await coordinator_factory(address)
    await coord.wait_for_agents(1)
    topics = Topics(root)
    async with raw_client(address) as c:
        await c.publish(topics.results("f-1"), b"garbage", qos=1)
        # a result claiming to come from another agent than the topic's
        forged = {"task_id": "j.0", "job_id": "j", "attempt": 1, "agent_id": "f-2", "ok": True}
        await c.publish(topics.results("f-1"), json.dumps(forged).encode(), qos=1)
        await c.publish(topics.heartbeat("f-1"), b"[1, 2, 3]", qos=0)
        await c.publish(topics.state("ghost"), b'{"online": "yes"}', qos=1)
    client: OffloadClient = await client_factory(address)
    out = await client.run("digits-mlp", {"input": digits[0][:10]}, timeout=10)
    assert out["label"].shape == (10,)
    assert coord.rejected["malformed_result"] == 1
    assert coord.rejected["forged_result"] == 1
    assert coord.rejected["malformed_heartbeat"] == 1
    assert coord.rejected["malformed_state"] == 1


@pytest.mark.parametrize("policy", ["earliest_finish", "round_robin"])
async def test_share_follows_measured_speed_under_earliest_finish_only(
    mosquitto_address: BrokerAddress,
    agent_processes: Any,
    coordinator_factory: Any,
    client_factory: Any,
    digits: Any,
    policy: str,
) -> None:
    address = mosquitto_address
    # Both devices are emulated (slowed 2x and 8x by sleeping), so that neither fights the
    # coordinator and the broker for this machine's two cores; nominally 4:1.
    agent_processes(address, "fast", "--slots", "1", "--slowdown", "2")
    agent_processes(address, "slow", "--slots", "1", "--slowdown", "8")
    coord = await coordinator_factory(address)
    await coord.wait_for_agents(2, timeout=60)
    fast, slow = coord.registry.agents["fast"], coord.registry.agents["slow"]
    measured = slow.costs["digits-mlp"].per_sample_ms / fast.costs["digits-mlp"].per_sample_ms
    assert 2.5 < measured < 6.0, f"slow agent measured {measured:.1f}x slower"

    x = np.tile(digits[0], (30, 1))  # 53,910 samples
    client: OffloadClient = await client_factory(address)
    out = await client.run("digits-mlp", {"input": x}, batch_size=500, policy=policy, timeout=120)
    shares = out.result.per_agent
    ratio = shares["fast"].samples / shares["slow"].samples
    trace = coord.ledger.jobs[out.job_id].trace
    assert trace is not None
    busy = {a.agent: a.busy_s for a in build_report(trace).agents}
    # How much faster the fast agent really ran in this job: the sleeps scale each process's
    # real execution times, which differ (4.6-5.5x in eight runs here, not the nominal 4x;
    # a share ratio bound alone failed at 7.3 once in CI).
    speed = (shares["fast"].samples / busy["fast"]) / (shares["slow"].samples / busy["slow"])
    detail = f"{policy}: fast/slow = {ratio:.2f}, speed {speed:.2f}x, busy {busy} ({shares})"
    if policy == "earliest_finish":
        # Work in proportion to speed: both kept busy alike, so the shares follow the speed.
        assert ratio >= 2.8, detail
        assert 0.8 <= busy["fast"] / busy["slow"] <= 1.25, detail
    else:
        # Equal shares whatever the speed: the slow agent is the bottleneck.
        assert 0.9 <= ratio <= 1.1, detail
        assert busy["fast"] / busy["slow"] < 0.5, detail


@pytest.mark.parametrize("wire", ["auto", "json"])
async def test_many_jobs_at_once_each_get_their_own_result(
    address: BrokerAddress,
    agent_factory: Any,
    coordinator_factory: Any,
    client_factory: Any,
    digits: Any,
    wire: str,
) -> None:
    x = digits[0]
    await agent_factory(address, "m-1", slots=2)
    coord = await coordinator_factory(address, wire_encoding=wire)
    await coord.wait_for_agents(1)
    client: OffloadClient = await client_factory(address)
    slices = [x[i * 37 : i * 37 + 20 + i] for i in range(20)]
    handles = [await client.submit("digits-mlp", {"input": s}, batch_size=7) for s in slices]
    outs = await asyncio.gather(*(h.result(30) for h in handles))
    for s, out in zip(slices, outs, strict=True):
        assert np.array_equal(out["label"], direct(s)[0])


async def test_sdk_reports_a_lost_broker_instead_of_hanging(root: str) -> None:
    from coordinator.broker import free_port

    with pytest.raises(aiomqtt.MqttError):
        async with OffloadClient(BrokerAddress(port=free_port()), root=root):
            pass


async def test_dispatch_rounds_cut_into_slices_still_place_every_microtask(
    mosquitto_address: BrokerAddress,
    agent_factory: Any,
    coordinator_factory: Any,
    digits: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round stops after DISPATCH_SLICE_S and goes on at the next loop iteration (so a
    huge fleet never starves I/O); with a zero slice every placement is its own round."""
    monkeypatch.setattr(service, "DISPATCH_SLICE_S", 0.0)
    x = digits[0]
    await agent_factory(mosquitto_address, "s-1", slots=2)
    await agent_factory(mosquitto_address, "s-2", slots=1)
    coord = await coordinator_factory(mosquitto_address)
    await coord.wait_for_agents(2)
    rounds = 0
    dispatch = coord._dispatch

    def counting() -> None:
        nonlocal rounds
        rounds += 1
        dispatch()

    monkeypatch.setattr(coord, "_dispatch", counting)
    jobs = [coord.submit_arrays("digits-mlp", {"input": x[i::3]}, batch_size=9) for i in range(3)]
    outs = await asyncio.gather(*(j.result(60) for j in jobs))
    for i, out in enumerate(outs):
        assert np.array_equal(out["label"], direct(x[i::3])[0])
    assert rounds >= sum(o.result.tasks for o in outs) // 2, "rounds were cut short"
