"""Monitoring jobs end to end: simulated sensors -> Mosquitto -> coordinator -> agents -> alerts."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from coordinator import Coordinator, OffloadClient
from coordinator.sensors import (
    SensorSimulator,
    SimulationReport,
    SimulatorConfig,
    evaluate,
    expected_windows,
    monitor_spec,
)
from protocol import (
    AgentState,
    Alert,
    BrokerAddress,
    Capabilities,
    Heartbeat,
    JobError,
    MonitorJob,
    PlacementRule,
    Topics,
)
from tests.agent.test_agent import raw_client
from tests.conftest import MODELS, cli, wait_until

MODEL = "vibration-anomaly"
THRESHOLD = next(
    m["verdict"]["threshold"]
    for m in json.loads((MODELS / "manifest.json").read_text())["models"]
    if m["id"] == MODEL
)
# The false-alert rate this test holds the model and the debounce to.
MAX_FALSE_PER_SENSOR_HOUR = 2.0


@contextlib.asynccontextmanager
async def collecting(
    client: OffloadClient, job_id: str | None = None
) -> AsyncIterator[list[Alert]]:
    alerts: list[Alert] = []

    async def collect() -> None:
        async for a in client.alerts(job_id):
            alerts.append(a)

    task = asyncio.create_task(collect())
    await asyncio.sleep(0.2)  # subscribed
    try:
        yield alerts
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def check_every_window(report: SimulationReport, stats: Any) -> None:
    """No window lost: every window the published values make was judged."""
    expected = sum(expected_windows(n) for n in report.values.values())
    assert stats.windows == expected
    assert stats.processed == expected
    assert stats.failed == 0 and stats.shed == 0


async def settle(client: OffloadClient, job_id: str, windows: int) -> Any:
    """The job's status once every window it cut has a verdict."""
    deadline = time.monotonic() + 30
    while True:
        status = await client.monitor_status(job_id)
        s = status.stats
        if s.windows >= windows and s.processed + s.failed + s.shed >= s.windows:
            return status
        assert time.monotonic() < deadline, f"windows still undecided: {s}"
        await asyncio.sleep(0.3)


async def test_alerts_fire_for_labelled_anomalies_and_bad_readings_are_skipped(
    mosquitto_address: BrokerAddress,
    coordinator_factory: Any,
    agent_factory: Any,
    client_factory: Any,
    root: str,
) -> None:
    """20 sensors at 100 Hz, 3 minutes of signal (published 6x faster than real time), one
    malformed message per 50: alerts for >= 95 % of the injected anomalies, few false ones,
    every window judged on an agent of the sensor's own site, bad messages counted."""
    coord: Coordinator = await coordinator_factory(mosquitto_address)
    await agent_factory(mosquitto_address, "a-site-a", labels={"site": "site-a"})
    await agent_factory(mosquitto_address, "a-site-b", labels={"site": "site-b"})
    await coord.wait_for_agents(2)
    client: OffloadClient = await client_factory(mosquitto_address)
    sim = SimulatorConfig(
        sensors=20, duration_s=180, speed=6, prefix=f"plant-{root[-6:]}", malformed_every=50
    )
    spec = monitor_spec(
        "vib",
        sim,
        threshold=THRESHOLD,
        placement=PlacementRule(require={"site": "{1}"}),
    )
    status = await client.start_monitor(spec)
    assert status.state == "running" and status.alert_topic == Topics(root).alerts("vib")
    async with collecting(client, "vib") as alerts:
        report = await SensorSimulator(mosquitto_address, sim).run()
        expected = sum(expected_windows(n) for n in report.values.values())
        status = await settle(client, "vib", expected)
        await asyncio.sleep(0.5)  # the last alerts' messages
    stats = status.stats
    check_every_window(report, stats)
    ev = evaluate(report.labels(), alerts, sensors=sim.sensors, duration_s=sim.duration_s)
    print(
        f"anomalies {ev.anomalies}, detected {ev.detected} (recall {ev.recall:.3f}), "
        f"alerts {ev.alerts}, false {ev.false_alerts} ({ev.false_per_sensor_hour:.2f}/sensor-h); "
        f"windows {stats.windows}, missed {stats.missed}, latency p50 {stats.latency_ms_p50} "
        f"p99 {stats.latency_ms_p99} ms"
    )
    assert ev.anomalies >= 60, "the simulator should inject enough anomalies to judge recall"
    assert ev.recall >= 0.95, f"missed: {ev.missed}"
    assert ev.false_per_sensor_hour <= MAX_FALSE_PER_SENSOR_HOUR
    # Each alert names the agent that ran its window: one of the sensor's own site.
    topics = report.topics
    for a in alerts:
        assert a.kind in ("anomaly", "cleared") and a.job_id == "vib"
        assert a.window_start is not None and a.window_end is not None
        assert a.window_end > a.window_start and a.latency_ms is not None
        site = topics[a.sensor or ""].split("/")[1]
        assert a.agent_id == f"a-{site}"
    assert set(stats.per_agent) == {"a-site-a", "a-site-b"}
    # Bad messages: counted by reason, skipped, and the signal around them intact (above).
    assert stats.malformed == dict(report.malformed)
    assert status.last_error is not None
    assert stats.messages == report.messages + report.malformed.total()


async def test_killing_the_agent_running_windows_loses_none(
    mosquitto_address: BrokerAddress,
    coordinator_factory: Any,
    agent_processes: Any,
    client_factory: Any,
    root: str,
) -> None:
    coord: Coordinator = await coordinator_factory(mosquitto_address)
    procs = {
        name: agent_processes(mosquitto_address, name, "--no-benchmark", "--slots", "1")
        for name in ("k0", "k1")
    }
    await coord.wait_for_agents(2, timeout=60)
    client: OffloadClient = await client_factory(mosquitto_address)
    sim = SimulatorConfig(sensors=20, duration_s=60, speed=3, prefix=f"kill-{root[-6:]}")
    await client.start_monitor(monitor_spec("vib", sim, threshold=THRESHOLD))
    run = asyncio.create_task(SensorSimulator(mosquitto_address, sim).run())
    mon = coord.monitors["vib"]
    await wait_until(lambda: mon.counts["processed"] > 400, timeout=30, what="windows processed")
    # Kill the agent that has run the most windows, while windows are in flight.
    victim = max(procs, key=lambda a: mon.per_agent[a])
    survivor = next(a for a in procs if a != victim)
    before = mon.per_agent[survivor]
    procs[victim].kill()
    await wait_until(lambda: not coord.registry.agents[victim].online, what="death seen")
    report = await run
    expected = sum(expected_windows(n) for n in report.values.values())
    status = await settle(client, "vib", expected)
    check_every_window(report, status.stats)
    assert mon.per_agent[survivor] > before, "the survivor took over the stream"
    print(
        f"windows {status.stats.windows}, missed deadlines {status.stats.missed}, "
        f"per agent {status.stats.per_agent}"
    )
    fleet = [s for s in coord.health.flags.get(victim, frozenset())]
    assert fleet == ["dead"]


async def test_monitor_lifecycle_refusals_and_restart(
    mosquitto_address: BrokerAddress,
    coordinator_factory: Any,
    agent_factory: Any,
    client_factory: Any,
    root: str,
    tmp_path: Path,
) -> None:
    journal = tmp_path / "journal.sqlite"
    coord: Coordinator = await coordinator_factory(mosquitto_address, journal=journal)
    await agent_factory(mosquitto_address, "a0")
    await coord.wait_for_agents(1)
    owner: OffloadClient = await client_factory(mosquitto_address)
    other: OffloadClient = await client_factory(mosquitto_address)
    sim = SimulatorConfig(sensors=2, duration_s=5, speed=5, prefix=f"life-{root[-6:]}")
    good = monitor_spec("m1", sim, threshold=THRESHOLD)

    async def refused(spec: MonitorJob, code: str, text: str) -> None:
        with pytest.raises(JobError) as e:
            await owner.start_monitor(spec, timeout=5)
        assert e.value.code == code and text in e.value.message

    await refused(good.model_copy(update={"job_id": "fleet"}), "bad_request", "reserved")
    await refused(
        good.model_copy(update={"job_id": "m2", "model": "nope"}), "unknown_model", "nope"
    )
    await refused(
        good.model_copy(update={"job_id": "m3", "sources": [f"{root}/agents/+/results"]}),
        "bad_request",
        "overlaps",
    )
    await refused(
        good.model_copy(update={"job_id": "m4", "sources": ["#"]}), "bad_request", "wildcard"
    )
    await refused(
        good.model_copy(update={"job_id": "m5", "window": 100}), "bad_input", "does not fit"
    )
    await refused(
        good.model_copy(update={"job_id": "m6", "alert_topic": "alerts/+"}), "bad_request", "plain"
    )
    status = await owner.start_monitor(good)
    assert status.state == "running"
    listed: list[str] = []
    for _ in range(30):  # the coordinator's retained state is refreshed every second
        listed = [m.job_id for m in await other.monitors()]
        if listed:
            break
        await asyncio.sleep(0.2)
    assert listed == ["m1"]
    # Only its submitter may stop it.
    with pytest.raises(JobError) as e:
        await other.stop("m1", timeout=5)
    assert e.value.code == "forbidden"
    with pytest.raises(JobError) as e:
        await other.stop("nothing-here", timeout=5)
    assert e.value.code == "bad_request"

    # The journal brings it back after a restart, and windows flow again.
    await coord.close()
    coord2: Coordinator = await coordinator_factory(mosquitto_address, journal=journal)
    await coord2.wait_for_agents(1)
    assert coord2.monitors["m1"].state == "running"
    report = await SensorSimulator(mosquitto_address, sim).run()
    status = await settle(owner, "m1", sum(expected_windows(n) for n in report.values.values()))
    check_every_window(report, status.stats)
    await owner.stop("m1")
    assert (await other.monitor_status("m1")).state == "stopped"
    assert coord2.monitors["m1"].state == "stopped"
    # Stopped: its sensors are no longer read.
    seen = coord2.monitors["m1"].counts["messages"]
    await SensorSimulator(mosquitto_address, sim).run()
    assert coord2.monitors["m1"].counts["messages"] == seen
    # ... and a third coordinator does not resume it.
    await coord2.close()
    coord3: Coordinator = await coordinator_factory(mosquitto_address, journal=journal)
    assert "m1" not in coord3.monitors


async def test_fleet_health_alerts(
    mosquitto_address: BrokerAddress,
    coordinator_factory: Any,
    client_factory: Any,
    root: str,
) -> None:
    """Temperature and foreign CPU load cannot be caused here for real: an MQTT client plays
    a device's birth and heartbeats; the coordinator's handling is the real one."""
    coord: Coordinator = await coordinator_factory(
        mosquitto_address, suspect_after_s=1.0, dead_after_s=2.5
    )
    client: OffloadClient = await client_factory(mosquitto_address)
    topics = Topics(root)
    caps = Capabilities(
        hostname="dev",
        arch="aarch64",
        platform="linux",
        cpu_count=4,
        memory_total=2**30,
        memory_available=2**29,
        onnxruntime="1",
        providers=["CPUExecutionProvider"],
        slots=2,
    )

    def heartbeat(seq: int, **load: Any) -> bytes:
        base: dict[str, Any] = {
            "cpu_percent": 20.0,
            "memory_available": 2**29,
            "running": 0,
            "queued": 0,
            "completed": 0,
        }
        base.update(load)
        return Heartbeat(agent_id="dev", seq=seq, ts=time.time(), slots=2, **base).to_json()

    async with (
        collecting(client) as alerts,
        raw_client(mosquitto_address) as dev,
    ):
        birth = AgentState(agent_id="dev", online=True, seq=7, ts=time.time(), capabilities=caps)
        await dev.publish(topics.state("dev"), birth.to_json(), qos=1)

        def kinds() -> list[str]:
            return [a.kind for a in alerts if a.agent_id == "dev"]

        await wait_until(lambda: "dev" in coord.registry.agents, what="birth")
        await dev.publish(topics.heartbeat("dev"), heartbeat(7, temperature_c=91.0))
        await wait_until(lambda: kinds() == ["agent_hot"], what="hot alert")
        # 83 C is inside the hysteresis band: still hot, no new alert.
        await dev.publish(topics.heartbeat("dev"), heartbeat(7, temperature_c=83.0))
        for _ in range(3):  # saturated for three heartbeats in a row
            busy = heartbeat(7, temperature_c=60.0, cpu_percent=99.0)
            await dev.publish(topics.heartbeat("dev"), busy)
        await wait_until(lambda: "agent_overloaded" in kinds(), what="overloaded alert")
        # Hot clears as overloaded begins: a "recovered" in between if a health check ran
        # between those heartbeats.
        assert kinds() in (
            ["agent_hot", "agent_overloaded"],
            ["agent_hot", "agent_recovered", "agent_overloaded"],
        )
        await dev.publish(topics.heartbeat("dev"), heartbeat(7, temperature_c=60.0))
        await wait_until(lambda: kinds()[-1:] == ["agent_recovered"], what="recovered")
        # Silence: suspect, then dead.
        await wait_until(lambda: "agent_dead" in kinds(), timeout=10, what="dead alert")
        assert kinds()[-2:] == ["agent_suspect", "agent_dead"]
    fleet = [a for a in alerts if a.agent_id == "dev"]
    assert all(a.job_id is None and a.message.startswith("agent dev") for a in fleet)
    assert coord.alert_counts["agent_hot"] == 1


async def test_monitor_from_the_command_line(
    mosquitto_address: BrokerAddress,
    coordinator_factory: Any,
    agent_factory: Any,
    root: str,
    tmp_path: Path,
) -> None:
    """``sensors``, ``monitor start|list|show|stop`` and ``alerts`` as separate processes."""
    coord: Coordinator = await coordinator_factory(mosquitto_address, status_interval_s=0.2)
    await agent_factory(mosquitto_address, "a0")
    await coord.wait_for_agents(1)
    conn = ["--broker", mosquitto_address.url, "--root", root]

    prefix = f"cli-{root[-6:]}"
    rc, out, err = await cli(
        "monitor", "start", "vib", *conn, "--source", f"{prefix}/+/+", "--model", MODEL,
        "--field", "values", "--ts-field", "ts", "--rate-hz", "100", "--raise-after", "2",
    )  # fmt: skip
    assert rc == 0, err
    assert "monitor vib: RUNNING" in out and f"alerts on {root}/alerts/vib" in out
    assert coord.monitors["vib"].spec.verdict.threshold == THRESHOLD  # from the manifest
    rc, _, err = await cli("monitor", "start", "bad", *conn, "--source", "#", "--model", MODEL)
    assert rc == 1 and "wildcard" in err
    alerts = asyncio.create_task(cli("alerts", "vib", *conn, "--count", "1", "--json"))
    await asyncio.sleep(1.0)
    labels = tmp_path / "labels.json"
    rc, _, err = await cli(
        "sensors", *conn, "--sensors", "4", "--duration", "40", "--speed", "8",
        "--anomaly-gap", "10", "--prefix", prefix, "--labels", str(labels),
        "--malformed-every", "20",
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(labels.read_text()), "anomalies were injected"
    rc, out, err = await alerts
    assert rc == 0, err
    first = Alert.model_validate_json(out.splitlines()[0])
    assert first.kind == "anomaly" and first.job_id == "vib" and first.agent_id == "a0"
    await asyncio.sleep(1.0)
    rc, out, err = await cli("monitor", "show", "vib", *conn)
    assert rc == 0, err
    assert "sensors 4," in out and "malformed " in out and "windows per agent: a0" in out
    rc, out, err = await cli("monitor", "list", *conn, "--json")
    assert rc == 0, err
    listed = json.loads(out)
    assert [m["job_id"] for m in listed] == ["vib"] and listed[0]["sensors"] == 4
    rc, out, err = await cli("monitor", "stop", "vib", *conn)
    assert rc == 0 and "stopped vib" in out, err
    rc, out, err = await cli("monitor", "show", "vib", *conn, "--json")
    assert json.loads(out)["state"] == "stopped"
