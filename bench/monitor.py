"""Monitoring benchmark: simulated sensors in real time through real processes.

A fleet of real processes (Mosquitto, a coordinator with a journal, agent processes) runs
a monitoring job over ``--sensors`` simulated vibration sensors at 100 Hz, published in
real time by :class:`coordinator.sensors.SensorSimulator` with labelled anomalies, in
three phases of the same length:

1. **alone**: the monitoring job by itself;
2. **with batch**: the same while batch inference jobs (digits-mlp) keep every agent busy,
   to show windows overtaking queued batch work (earliest deadline first);
3. **agent kill**: the agent that ran the most windows is killed (-9) a third of the way
   in and restarted at two thirds.

It prints, per phase: recall of the labelled anomalies, false alerts per sensor-hour,
windows cut / judged / failed / shed, deadline misses, window->verdict latency (every
window) and window->alert latency (each alert), p50 and p99. Usage::

    python bench/monitor.py                    # 3 x 180 s of signal (about 10 minutes)
    python bench/monitor.py --quick            # 3 x 30 s
    python bench/monitor.py --duration 300 --phase alone
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.chaos import Fleet, Profile  # noqa: E402
from coordinator.cli_monitor import manifest_verdict  # noqa: E402
from coordinator.sensors import (  # noqa: E402
    SensorSimulator,
    SimulatorConfig,
    evaluate,
    expected_windows,
    monitor_spec,
)
from protocol import Alert, JobError, MonitorStatus  # noqa: E402

PHASES = ("alone", "with_batch", "agent_kill")


@dataclass
class PhaseResult:
    phase: str
    anomalies: int
    recall: float
    false_per_sensor_hour: float
    expected_windows: int
    status: MonitorStatus
    alert_latencies: list[float]
    batch_samples: int = 0
    note: str = ""


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


async def _batch_load(fleet: Fleet, stop: asyncio.Event) -> int:
    """Batch jobs, one after another, until ``stop``: returns samples done."""
    with np.load(REPO / "models" / "digits_samples.npz") as data:
        x = np.tile(data["x"].astype(np.float32), (20, 1))  # 35,940 samples a job
    done = 0
    while not stop.is_set():
        with contextlib.suppress(JobError):
            out = await fleet.client.run("digits-mlp", {"input": x}, timeout=600)
            done += out.result.samples
    return done


async def run_phase(fleet: Fleet, phase: str, args: argparse.Namespace, n: int) -> PhaseResult:
    sim = SimulatorConfig(
        sensors=args.sensors, duration_s=args.duration, prefix=f"plant{n}", seed=n + 1
    )
    threshold = (manifest_verdict("vibration-anomaly") or {}).get("threshold", 1.0)
    job_id = f"vib-{phase.replace('_', '-')}"
    spec = monitor_spec(job_id, sim, threshold=threshold, deadline_ms=args.deadline_ms)
    await fleet.client.start_monitor(spec)
    alerts: list[Alert] = []

    async def collect() -> None:
        async for a in fleet.client.alerts(job_id):
            alerts.append(a)

    collector = asyncio.create_task(collect())
    stop_batch = asyncio.Event()
    batch = asyncio.create_task(_batch_load(fleet, stop_batch)) if phase == "with_batch" else None
    note = ""
    sim_task = asyncio.create_task(SensorSimulator(fleet.address, sim).run())
    if phase == "agent_kill":
        await asyncio.sleep(args.duration / 3)
        status = await fleet.client.monitor_status(job_id)
        victim = max(status.stats.per_agent, key=lambda a: status.stats.per_agent[a])
        fleet.agents[victim].kill()
        await asyncio.sleep(args.duration / 3)
        fleet.start_agent(victim)
        third = args.duration / 3
        note = f"killed {victim} at {third:.0f} s, restarted at {2 * third:.0f} s"
    report = await sim_task
    expected = sum(expected_windows(v) for v in report.values.values())
    deadline = time.monotonic() + 60
    while True:
        status = await fleet.client.monitor_status(job_id)
        s = status.stats
        if s.windows >= expected and s.processed + s.failed + s.shed >= s.windows:
            break
        if time.monotonic() > deadline:
            note += " (windows still undecided after 60 s)"
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(0.5)
    collector.cancel()
    batch_samples = 0
    if batch is not None:
        stop_batch.set()
        batch_samples = await batch
    await fleet.client.stop(job_id)
    ev = evaluate(report.labels(), alerts, sensors=sim.sensors, duration_s=sim.duration_s)
    return PhaseResult(
        phase=phase,
        anomalies=ev.anomalies,
        recall=ev.recall,
        false_per_sensor_hour=ev.false_per_sensor_hour,
        expected_windows=expected,
        status=status,
        alert_latencies=[a.latency_ms for a in alerts if a.latency_ms is not None],
        batch_samples=batch_samples,
        note=note,
    )


def format_table(results: list[PhaseResult], args: argparse.Namespace) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    lines = [
        f"{args.sensors} sensors x 100 Hz, {args.duration:g} s of signal per phase in real "
        f"time, windows of 128 every 64 values, deadline {args.deadline_ms:g} ms, "
        f"{args.agents} agents x {args.slots} slots",
        "",
        "| phase | anomalies | recall | false alerts / sensor-h | windows (expected) | judged "
        "| failed | shed | missed deadline | window->verdict p50 / p99 ms "
        "| window->alert p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.status.stats
        lines.append(
            f"| {r.phase} | {r.anomalies} | {r.recall:.3f} | {r.false_per_sensor_hour:.2f} "
            f"| {s.windows} ({r.expected_windows}) | {s.processed} | {s.failed} | {s.shed} "
            f"| {s.missed} | {ms(s.latency_ms_p50)} / {ms(s.latency_ms_p99)} "
            f"| {ms(_pct(r.alert_latencies, 50))} / {ms(_pct(r.alert_latencies, 99))} |"
        )
    for r in results:
        extra = []
        if r.batch_samples:
            extra.append(f"batch inference alongside: {r.batch_samples} samples")
        if r.note:
            extra.append(r.note)
        if r.status.stats.per_agent:
            extra.append(
                "windows per agent: "
                + ", ".join(f"{a} {n}" for a, n in sorted(r.status.stats.per_agent.items()))
            )
        lines.append(f"- {r.phase}: " + "; ".join(extra))
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    profile = Profile("monitor", tasks=0, slowdown=1.0, agents=args.agents, slots=args.slots)
    results = []
    with tempfile.TemporaryDirectory(prefix="edge-offload-monitor-") as tmp:
        async with Fleet(Path(tmp), profile) as fleet:
            for n, phase in enumerate(args.phase or PHASES):
                print(f"phase {phase}: {args.duration:g} s ...", file=sys.stderr, flush=True)
                results.append(await run_phase(fleet, phase, args, n))
    print(format_table(results, args))
    worst = min(r.recall for r in results)
    print(
        f"\nlowest recall {worst:.3f}; mean window->verdict p50 "
        f"{statistics.mean(r.status.stats.latency_ms_p50 or 0 for r in results):.1f} ms"
    )
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=180.0, help="seconds of signal per phase")
    p.add_argument("--quick", action="store_true", help="30 s per phase")
    p.add_argument("--sensors", type=int, default=20)
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--slots", type=int, default=1)
    p.add_argument("--deadline-ms", type=float, default=500.0)
    p.add_argument("--phase", action="append", choices=PHASES)
    args = p.parse_args()
    if args.quick:
        args.duration = 30.0

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # clean up the fleet on SIGTERM too
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
