"""The agent daemon against a real broker: birth and death, duplicates, bad input, slots, drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiomqtt
import numpy as np

from agent import probe, usable_providers
from protocol import (
    AgentState,
    BrokerAddress,
    RunTask,
    TaskResult,
    Topics,
    connect_options,
    encode_arrays,
)
from tests.conftest import MODELS, wait_until


def run_task(
    task_id: str,
    x: np.ndarray[Any, Any],
    *,
    attempt: int = 1,
    model: str = "digits-mlp",
    inputs: dict[str, Any] | None = None,
) -> bytes:
    return RunTask(
        task_id=task_id,
        job_id=task_id.rpartition(".")[0] or task_id,
        attempt=attempt,
        model=model,
        inputs=inputs if inputs is not None else encode_arrays({"input": x}),
        lease_until=time.time() + 60,
        sent_at=time.time(),
    ).to_json()


class RawClient(aiomqtt.Client):
    """A plain MQTT client, as any non-Python integration would use."""

    filters: tuple[str, ...] = ()


@contextlib.asynccontextmanager
async def raw_client(address: BrokerAddress, *topics: str) -> AsyncIterator[RawClient]:
    ident = f"t-{uuid.uuid4().hex[:8]}"
    async with RawClient(**connect_options(address, identifier=ident)) as c:
        c.filters = topics
        for t in topics:
            await c.subscribe(t, qos=1)
        yield c


async def collect(client: RawClient, n: int, timeout: float) -> list[aiomqtt.Message]:
    """Up to ``n`` messages on the client's own subscriptions within ``timeout`` seconds.

    Others are skipped: amqtt 0.12 replays other clients' retained messages on connect.
    """
    out: list[aiomqtt.Message] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            async for m in client.messages:
                if any(m.topic.matches(f) for f in client.filters):
                    out.append(m)
                if len(out) >= n:
                    break
    return out


def test_cpu_provider_passes_the_probe_and_a_bogus_one_does_not() -> None:
    assert probe("CPUExecutionProvider") is None
    assert probe("NoSuchExecutionProvider") is not None
    assert usable_providers()[-1] == "CPUExecutionProvider"


async def test_birth_is_retained_and_the_last_will_carries_the_same_seq(
    address: BrokerAddress, root: str, agent_processes: Any
) -> None:
    topics = Topics(root)
    proc = agent_processes(address, "will-1", "--slots", "2", "--label", "site=s1")
    async with raw_client(address, topics.state("will-1")) as c:
        (birth_msg,) = await collect(c, 1, timeout=30)
        birth = AgentState.from_json(birth_msg.payload)  # type: ignore[arg-type]
        assert birth.online and birth.capabilities is not None
        caps = birth.capabilities
        assert caps.slots == 2 and caps.labels == {"site": "s1"}
        assert "CPUExecutionProvider" in caps.providers
        manifest = json.loads((MODELS / "manifest.json").read_text())
        assert sorted(m.id for m in caps.models) == sorted(e["id"] for e in manifest["models"])
        for m in caps.models:
            assert len(m.sha256) == 64 and (m.ms_per_sample() or 0) > 0
        proc.kill()  # SIGKILL: the broker publishes the Last Will
        (death_msg,) = await collect(c, 1, timeout=30)
        death = AgentState.from_json(death_msg.payload)  # type: ignore[arg-type]
        assert not death.online and death.seq == birth.seq
    # the death is retained: a late subscriber learns the agent is offline
    async with raw_client(address, topics.state("will-1")) as c2:
        (late,) = await collect(c2, 1, timeout=10)
        assert late.retain and not AgentState.from_json(late.payload).online  # type: ignore[arg-type]


async def test_redelivered_task_is_answered_once_and_garbage_is_counted(
    address: BrokerAddress, root: str, agent_factory: Any, digits: Any
) -> None:
    topics = Topics(root)
    agent = await agent_factory(address, "dup-1")
    x = digits[0][:4]
    async with raw_client(address, topics.results("dup-1")) as c:
        await c.publish(topics.tasks("dup-1"), b"\x00not json", qos=1)
        await c.publish(topics.tasks("dup-1"), b'{"type":"run","task_id":"x"}', qos=1)
        payload = run_task("d.0", x)
        await c.publish(topics.tasks("dup-1"), payload, qos=1)
        await c.publish(topics.tasks("dup-1"), payload, qos=1)  # as a QoS 1 redelivery would
        await c.publish(topics.tasks("dup-1"), run_task("d.1", x, model="nope"), qos=1)
        bad = encode_arrays({"input": x[:, :10]})
        await c.publish(topics.tasks("dup-1"), run_task("d.2", x, inputs=bad), qos=1)
        msgs = await collect(c, 3, timeout=10)
        msgs += await collect(c, 1, timeout=0.5)  # a second answer to d.0 would show here
    results = [TaskResult.from_json(m.payload) for m in msgs]  # type: ignore[arg-type]
    by_id = {r.task_id: r for r in results}
    assert sorted(r.task_id for r in results) == ["d.0", "d.1", "d.2"], "d.0 answered once"
    assert by_id["d.0"].ok and by_id["d.0"].outputs["label"].to_array().shape == (4,)
    assert by_id["d.1"].error is not None and by_id["d.1"].error.code == "unknown_model"
    assert by_id["d.2"].error is not None and by_id["d.2"].error.code == "bad_input"
    assert "expected shape ['N', 64], got [4, 10]" in by_id["d.2"].error.message
    assert agent.stats.duplicates == 1 and agent.stats.rejected == 2


async def test_never_more_microtasks_at_once_than_slots(
    address: BrokerAddress, root: str, agent_factory: Any, digits: Any
) -> None:
    topics = Topics(root)
    agent = await agent_factory(address, "slots-2", slots=2, slowdown=50.0)
    x = digits[0][:200]
    async with raw_client(address, topics.results("slots-2")) as c:
        for i in range(8):
            await c.publish(topics.tasks("slots-2"), run_task(f"s.{i}", x), qos=1)
        msgs = await collect(c, 8, timeout=30)
    assert len(msgs) == 8
    assert all(TaskResult.from_json(m.payload).ok for m in msgs)  # type: ignore[arg-type]
    assert agent.stats.peak_running == 2


async def test_sigterm_drains_running_work_then_goes_offline(
    address: BrokerAddress, root: str, agent_processes: Any, digits: Any
) -> None:
    topics = Topics(root)
    proc = agent_processes(address, "drain-1", "--slots", "1", "--slowdown", "400")
    x = digits[0][:500]
    async with raw_client(address, topics.results("drain-1"), topics.state("drain-1")) as c:
        await wait_until(lambda: "connected" in proc.output(), timeout=30, what="agent up")
        await c.publish(topics.tasks("drain-1"), run_task("g.0", x), qos=1)
        await asyncio.sleep(0.3)  # the task is running (about 0.6 s with this slowdown)
        proc.proc.send_signal(15)
        msgs = await collect(c, 3, timeout=30)
    kinds = []
    for m in msgs:
        if m.topic.matches(topics.results("drain-1")):
            r = TaskResult.from_json(m.payload)  # type: ignore[arg-type]
            kinds.append(("result", r.task_id, r.ok))
        else:
            s = AgentState.from_json(m.payload)  # type: ignore[arg-type]
            kinds.append(("state", s.online, s.reason))
    assert ("result", "g.0", True) in kinds, kinds
    assert kinds[-1] == ("state", False, "drained"), kinds
    assert kinds.index(("result", "g.0", True)) < len(kinds) - 1
    assert proc.proc.wait(20) == 0
