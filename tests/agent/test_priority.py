"""Work with a deadline overtakes the batch work an agent has queued."""

from __future__ import annotations

import time
from typing import Any

from protocol import BrokerAddress, RunTask, TaskResult, Topics, encode_arrays
from tests.agent.test_agent import collect, raw_client


def task(task_id: str, x: Any, *, deadline: float | None = None, priority: int = 0) -> bytes:
    return RunTask(
        task_id=task_id,
        job_id=task_id.rpartition(".")[0],
        attempt=1,
        model="digits-mlp",
        inputs=encode_arrays({"input": x}),
        lease_until=time.time() + 60,
        sent_at=time.time(),
        deadline=deadline,
        priority=priority,
    ).to_json()


async def test_deadline_then_priority_then_arrival_order(
    mosquitto_address: BrokerAddress, root: str, agent_factory: Any, digits: Any
) -> None:
    topics = Topics(root)
    await agent_factory(mosquitto_address, "one-slot", slots=1, slowdown=200.0)
    x = digits[0][:100]
    now = time.time()
    sent = [
        task("batch.0", x),  # starts at once: the only slot is free
        task("batch.1", x),
        task("batch.2", x),
        task("urgent.0", x, priority=5),
        task("late.0", x, deadline=now + 60),
        task("soon.0", x, deadline=now + 1),
    ]
    async with raw_client(mosquitto_address, topics.results("one-slot")) as c:
        for payload in sent:
            await c.publish(topics.tasks("one-slot"), payload, qos=1)
        msgs = await collect(c, len(sent), timeout=60)
    order = [TaskResult.from_json(m.payload).task_id for m in msgs]  # type: ignore[arg-type]
    assert order == ["batch.0", "soon.0", "late.0", "urgent.0", "batch.1", "batch.2"]
