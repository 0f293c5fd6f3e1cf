"""Prometheus metrics of the coordinator and the agent move while a job runs."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from typing import Any

from protocol import BrokerAddress


async def scrape(port: int) -> dict[str, float]:
    def get() -> str:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            body: bytes = response.read()
        return body.decode()

    text = await asyncio.to_thread(get)
    samples = {}
    for line in text.splitlines():
        if m := re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line):
            samples[m.group(1)] = float(m.group(2))
    return samples


async def test_metrics_move_while_a_job_runs(
    mosquitto_address: BrokerAddress, agent_factory: Any, coordinator_factory: Any, digits: Any
) -> None:
    agent = await agent_factory(mosquitto_address, "m-1", slots=1, metrics_port=0)
    coord = await coordinator_factory(mosquitto_address, metrics_port=0)
    await coord.wait_for_agents(1)
    before_c, before_a = await scrape(coord.metrics.port), await scrape(agent.metrics.port)
    assert before_c.get('edge_offload_microtasks_total{event="completed"}', 0) == 0
    assert before_c['edge_offload_agents{state="available"}'] == 1
    out = await coord.run("digits-mlp", {"input": digits[0][:1000]}, batch_size=100, timeout=60)
    assert out.result.tasks == 10
    after_c, after_a = await scrape(coord.metrics.port), await scrape(agent.metrics.port)
    assert after_c['edge_offload_microtasks_total{event="completed"}'] == 10
    assert after_c['edge_offload_microtasks_total{event="dispatched"}'] == 10
    assert after_c["edge_offload_microtask_latency_seconds_count"] == 10
    assert after_c['edge_offload_jobs{state="done"}'] == 1
    assert after_c['edge_offload_agent_completed_total{agent="m-1"}'] == 10
    assert after_c["edge_offload_queue_depth"] == 0
    assert after_a['edge_offload_agent_microtasks_total{event="completed"}'] == 10
    assert after_a['edge_offload_agent_exec_seconds_count{model="digits-mlp"}'] == 10
    assert after_a["edge_offload_agent_connected"] == 1
    assert before_a.get('edge_offload_agent_microtasks_total{event="completed"}', 0) == 0
