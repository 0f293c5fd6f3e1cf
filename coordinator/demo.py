"""``edge-offload demo``: a broker, a coordinator, three agent processes and a real digits job."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from coordinator.broker import BrokerInfo, resolve_broker
from coordinator.client import OffloadClient
from coordinator.config import CoordinatorConfig
from coordinator.service import Coordinator
from protocol import DEFAULT_ROOT, BrokerAddress, JobError

# (slots, labels) of the demo agents: different sizes and sites, as in a real fleet.
DEMO_AGENTS: list[tuple[int, dict[str, str]]] = [
    (1, {"site": "plant-1", "kind": "gateway"}),
    (2, {"site": "plant-1", "kind": "ipc"}),
    (1, {"site": "plant-2", "kind": "board"}),
]


def zoo_dir() -> Path:
    from agent.config import default_models_dirs  # the demo may compose both sides

    dirs = default_models_dirs()
    if not dirs:
        raise FileNotFoundError("model zoo not found (models/manifest.json)")
    return dirs[0]


def load_digits_samples() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The 1,797 load_digits images as float32 [N, 64] (0..16) and their labels."""
    with np.load(zoo_dir() / "digits_samples.npz") as data:
        return data["x"].astype(np.float32), data["y"]


@contextlib.contextmanager
def agent_processes(
    broker: BrokerInfo, n: int, *, root: str = DEFAULT_ROOT, prefix: str = "demo"
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``n`` agent daemons as real processes; SIGTERM (drain) them on exit."""
    procs = []
    try:
        for i in range(n):
            slots, labels = DEMO_AGENTS[i % len(DEMO_AGENTS)]
            cmd = [
                sys.executable,
                "-m",
                "coordinator.cli",
                "--log-level",
                "WARNING",
                "agent",
                "--broker",
                broker.url,
                "--root",
                root,
                "--id",
                f"{prefix}-{chr(97 + i)}",
                "--slots",
                str(slots),
                "--heartbeat",
                "1",
                # a demo leaves nothing behind in the user's state directory
                "--spool-dir",
                "none",
            ]
            for k, v in labels.items():
                cmd += ["--label", f"{k}={v}"]
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def run_demo(broker_url: str | None, *, n_agents: int = 3, root: str | None = None) -> int:
    root = root or DEFAULT_ROOT
    with resolve_broker(broker_url) as broker:
        print(f"broker: {broker.kind} at {broker.url}")
        with agent_processes(broker, n_agents, root=root) as procs:
            print(f"agents: {n_agents} processes (pids {', '.join(str(p.pid) for p in procs)})")
            return asyncio.run(_run(broker, n_agents, root))


async def _run(broker: BrokerInfo, n_agents: int, root: str) -> int:
    from coordinator.cli import Progress

    address = BrokerAddress(host=broker.host, port=broker.port)
    config = CoordinatorConfig(broker=address, root=root, status_interval_s=0.1)
    x, y = load_digits_samples()
    async with Coordinator(config) as coord, OffloadClient(address, root=root) as client:
        await coord.wait_for_agents(n_agents, timeout=60)
        print("fleet:")
        for a in sorted(coord.registry.online(), key=lambda a: a.agent_id):
            c = a.capabilities
            cost = a.costs["digits-mlp"].per_sample_ms * 1000
            labels = ",".join(f"{k}={v}" for k, v in c.labels.items())
            print(
                f"  {a.agent_id}: {c.slots} slot(s), {labels}, "
                f"digits-mlp {cost:.1f} us/sample measured, providers {c.providers}"
            )
        progress = Progress("digits job")
        t0 = time.perf_counter()
        handle = await client.submit("digits-mlp", {"input": x}, on_status=progress.update)
        try:
            out = await handle.result(timeout=120)
        except JobError as e:
            print(f"\njob failed: {e}")
            return 1
        elapsed = time.perf_counter() - t0
        progress.done = progress.total = len(x)
        progress.draw(final=True)
        r = out.result
        accuracy = float(np.mean(out["label"] == y))
        print(
            f"job {r.job_id}: {r.samples} samples in {r.tasks} microtasks of {r.batch_size} "
            f"({r.retries} retries)"
        )
        print(f"accuracy: {accuracy:.4f} ({int(np.sum(out['label'] == y))}/{len(y)} correct)")
        print(
            f"throughput: {r.samples / elapsed:,.0f} samples/s end to end "
            f"({elapsed * 1000:.1f} ms including transfer of {x.nbytes / 1024:.0f} KiB)"
        )
        print("share of samples per agent:")
        for agent_id, share in r.per_agent.items():
            pct = 100 * share.samples / r.samples
            print(
                f"  {agent_id:<10} {share.samples:>5} samples {pct:5.1f}%  "
                f"({share.tasks} microtasks) {'#' * round(pct / 2)}"
            )
        return await _monitoring(address, client)


async def _monitoring(address: BrokerAddress, client: OffloadClient) -> int:
    """A standing monitoring job over simulated vibration sensors, with its alerts."""
    from coordinator.cli_monitor import format_alert, manifest_verdict
    from coordinator.sensors import SensorSimulator, SimulatorConfig, evaluate, monitor_spec

    sim = SimulatorConfig(sensors=6, duration_s=48, speed=4, mean_gap_s=15, prefix="demo-plant")
    threshold = (manifest_verdict("vibration-anomaly") or {}).get("threshold", 1.0)
    spec = monitor_spec("demo-vibration", sim, threshold=threshold)
    print(
        f"\nmonitoring job {spec.job_id}: {sim.sensors} vibration sensors at "
        f"{sim.rate_hz:g} Hz on {spec.sources[0]} ({sim.duration_s:g} s of signal, "
        f"played {sim.speed:g}x faster), windows of {spec.window} every {spec.hop}, "
        f"model {spec.model}, alert after {spec.verdict.raise_after} windows over "
        f"{spec.verdict.threshold:g}"
    )
    try:
        await client.start_monitor(spec)
    except JobError as e:
        print(f"monitoring job refused: {e}")
        return 1
    alerts = []

    async def follow() -> None:
        async for alert in client.alerts(spec.job_id):
            alerts.append(alert)
            if alert.kind == "anomaly":  # each is cleared again a few seconds later
                print(f"  {format_alert(alert)}")

    follower = asyncio.create_task(follow())
    report = await SensorSimulator(address, sim).run()
    await asyncio.sleep(1.0)
    follower.cancel()
    status = await client.monitor_status(spec.job_id)
    await client.stop(spec.job_id)
    s = status.stats
    ev = evaluate(report.labels(), alerts, sensors=sim.sensors, duration_s=sim.duration_s)
    print(
        f"anomalies injected: {ev.anomalies}, alerted: {ev.detected} (recall {ev.recall:.2f}), "
        f"false alerts: {ev.false_alerts}, cleared: {s.cleared}"
    )
    print(
        f"windows: {s.windows} cut, {s.processed} judged, {s.missed} past the "
        f"{spec.deadline_ms:g} ms deadline; window->verdict p50 {s.latency_ms_p50 or 0:.1f} ms, "
        f"p99 {s.latency_ms_p99 or 0:.1f} ms"
    )
    print("windows per agent: " + ", ".join(f"{a} {n}" for a, n in sorted(s.per_agent.items())))
    return 0


if __name__ == "__main__":
    sys.exit(run_demo(os.environ.get("EDGE_OFFLOAD_BROKER"), n_agents=3))
