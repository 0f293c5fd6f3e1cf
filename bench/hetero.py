"""Heterogeneous fleet: eight real agents emulating devices of speed 4x, 2x and 1x, one of
them slowing down mid-job, and the same job under each scheduling policy.

What runs: a Mosquitto broker, a coordinator process (defaults: no journal, default leases
and prefetch), eight ``edge-offload agent`` processes with one slot each, a tap on the
agents' result topics, and this process as the client (``OffloadClient``). An emulated
device's speed comes from the agent's ``--slowdown``: the 4x devices multiply their
onnxruntime time by ``slowdown_4x``, the 2x ones by twice that and the 1x ones by four
times that (the agent sleeps in the slot for the extra time), so the eight devices need only
a small part of this machine's two cores.

Once the job is 30 % done, agent ``a0`` (a 4x device) slows down: it is paused (SIGSTOP)
for 0.2 s of every 0.4 s until the job ends, as a device whose CPU is taken away
periodically. See :class:`Throttle` for why a pause never lands inside onnxruntime.

Measured per policy, on the same inputs, each with a fresh coordinator (nothing learned
from the previous run):

* **makespan**: the coordinator's own ``elapsed_s`` (from accepting the job to accepting
  its last result; the upload of the inputs and the download of the outputs are shown
  apart as end to end);
* **lower bound** = total measured work / total fleet capacity: the ``exec_ms`` each agent
  reports in the result it publishes (onnxruntime plus the emulated extra, and any pause
  that fell inside it), summed over the accepted result of every microtask, divided by
  the number of slots. The tap records every result; a unit of work counts once, with its
  first successful result (the one the coordinator accepts: it gets the results in the
  same order from the same broker), and a straggler copy counts for the microtask it
  overtakes (mapped from the coordinator's log). Work that another policy would have put
  on a faster device is counted where it ran, so the bound is per run;
* **ratio** = makespan / lower bound (1.0 = no slot ever idle); throughput = samples /
  makespan; each speed class's share of the samples (capacity shares 47/35/18 %).

Usage: python bench/hetero.py [--quick] [--policy NAME ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make ``bench.chaos`` importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from bench.chaos import (  # noqa: E402
    MODEL,
    MODELS,
    Fleet,
    Proc,
    Profile,
    Progress,
    ResultTap,
    make_inputs,
)
from protocol import BrokerAddress, JobStatus, ProtocolError, TaskResult, decode  # noqa: E402
from protocol.transport import cancel_and_wait  # noqa: E402

SPEEDS = (4, 4, 2, 2, 2, 1, 1, 1)
POLICIES = ("earliest_finish", "least_loaded", "round_robin")
# The coordinator's defaults, but for a status every 0.2 s (when to start the slowdown).
COORDINATOR_TOML = "[coordinator]\nstatus_interval_s = 0.2\n"
COPY_RE = re.compile(r"microtask (\S+) running .* started a copy")


@dataclass(frozen=True)
class Setup:
    speeds: tuple[int, ...] = SPEEDS
    # Service-time multiplier of the 4x devices; a 2x device has twice it, a 1x four times.
    slowdown_4x: float = 48.0
    samples: int = 100_000
    policies: tuple[str, ...] = POLICIES
    # The device that slows down, from which fraction of the job, and how.
    throttle_agent: str = "a0"
    throttle_from: float = 0.3
    pause_s: float = 0.2
    period_s: float = 0.4
    timeout_s: float = 300.0

    def slowdown(self, speed: int) -> float:
        return self.slowdown_4x * max(self.speeds) / speed


FULL = Setup()
QUICK = Setup(samples=30_000)


@dataclass
class PolicyRun:
    policy: str
    samples: int
    tasks: int = 0
    batch_size: int = 0
    slots: int = 0
    makespan_s: float = 0.0
    end_to_end_s: float = 0.0
    work_ms: float = 0.0
    accepted: int = 0  # microtasks with an accepted result, from the job's per-agent counts
    units_measured: int = 0  # microtasks whose accepted result the tap saw
    surplus_results: int = 0  # results beyond one per microtask (overtaken copies)
    correct: bool = False
    retries: int = 0
    pauses: int = 0
    share_by_speed: dict[int, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def lost(self) -> int:
        return self.tasks - self.accepted

    @property
    def lower_bound_s(self) -> float:
        return self.work_ms / 1000 / self.slots if self.slots else math.nan

    @property
    def ratio(self) -> float:
        return self.makespan_s / self.lower_bound_s if self.lower_bound_s > 0 else math.nan

    @property
    def throughput(self) -> float:
        return self.samples / self.makespan_s if self.makespan_s > 0 else math.nan


# -- slowing a device down from outside --------------------------------------------------------


def _threads(pid: int) -> list[Path]:
    try:
        return list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []


def _state(thread: Path) -> str:
    """The thread's scheduler state letter (R, S, D, T, ...)."""
    try:
        stat = (thread / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return "X"
    return stat.rpartition(")")[2].split()[0]  # the name in parentheses may hold spaces


def _in_user_code(thread: Path) -> bool:
    """A stopped thread was stopped while running user code (not inside a system call)."""
    try:
        where = (thread / "syscall").read_text().split()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return bool(where) and where[0] in ("-1", "running")


class Throttle:
    """Pauses a process for ``pause_s`` of every ``period_s`` (SIGSTOP, then SIGCONT): a
    device whose CPU is taken away periodically (thermal throttling, a CPU quota, a noisy
    neighbour) does a correspondingly smaller share of the work.

    An emulated device's service time is its onnxruntime time multiplied by its slowdown,
    so a pause landing inside onnxruntime would be multiplied too (0.2 s x 48 = 10 s). A
    pause therefore starts only while every thread of the process is waiting in a system
    call: checked before the SIGSTOP (no thread runnable) and after it (no stopped thread
    was in user code); otherwise the process is resumed at once and the pause tried again
    2 ms later (a period with no such moment in 100 tries goes without a pause). A
    microtask sleeping out its emulated extra time when the pause comes finishes when the
    pause ends.
    """

    def __init__(self, pid: int, *, pause_s: float, period_s: float) -> None:
        self.pid = pid
        self.pause_s = pause_s
        self.period_s = period_s
        self.pauses = 0
        self.aborted = 0  # SIGSTOPs undone at once because a thread was computing

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.period_s - self.pause_s)
                for _ in range(100):  # the process is idle most of the time: a few tries
                    if self._pause_while_idle():
                        self.pauses += 1
                        await asyncio.sleep(self.pause_s)
                        self._resume()
                        break
                    await asyncio.sleep(0.002)
        finally:
            self._resume()

    def _resume(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)

    def _pause_while_idle(self) -> bool:
        threads = _threads(self.pid)
        if not threads:
            raise ProcessLookupError(self.pid)
        if any(_state(t) == "R" for t in threads):
            return False
        os.kill(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 0.05
        while any(_state(t) not in ("T", "t", "X") for t in threads):
            if time.monotonic() > deadline:
                break
            time.sleep(0.0002)
        if any(_in_user_code(t) for t in threads):
            self._resume()
            self.aborted += 1
            return False
        return True


# -- the fleet -----------------------------------------------------------------------------------


class WorkTap(ResultTap):
    """Every result any agent publishes: (job, microtask, ok, exec_ms), in arrival order."""

    def __init__(self, address: BrokerAddress, root: str) -> None:
        super().__init__(address, root)
        self.results: list[tuple[str, str, bool, float]] = []

    def _on_message(self, topic: str, payload: bytes) -> None:
        super()._on_message(topic, payload)
        try:
            r = decode(TaskResult, payload)
        except ProtocolError:
            return
        self.results.append((r.job_id, r.task_id, r.ok, r.exec_ms))


class HeteroFleet(Fleet):
    """``chaos.Fleet`` with a coordinator as deployed by default (no journal, default
    leases), a tap that keeps the reported execution times, and coordinator restarts."""

    tap: WorkTap

    def __init__(self, workdir: Path, profile: Profile, **options: Any) -> None:
        super().__init__(workdir, profile, **options)
        self.config.write_text(COORDINATOR_TOML)

    async def __aenter__(self) -> HeteroFleet:
        await super().__aenter__()
        await self.tap.stop()
        self.tap = WorkTap(self.address, self.root)
        await self.tap.start()
        return self

    def start_coordinator(self, crash_at: str | None = None) -> Proc:
        argv = ["coordinator", "--broker", self.address.url, "--root", self.root]
        proc = self._spawn("coordinator", [*argv, "--config", str(self.config)])
        self.coordinators.append(proc)
        return proc

    async def restart_coordinator(self) -> None:
        """A fresh coordinator: no cost model learned from an earlier run."""
        old = self.coordinator
        old.signal(signal.SIGTERM)
        await asyncio.to_thread(old.proc.wait, 30)
        self.start_coordinator()
        await self.wait_for_agents(self.profile.agents)

    def copies(self, job_id: str, tasks: int) -> dict[str, str]:
        """Straggler copy -> the microtask it overtakes, from the coordinator's log: the
        k-th copy of a job is microtask ``{job}.{tasks + k}x1``."""
        prefix = f"{job_id}."
        found = [
            m.group(1)
            for _, msg in self.log_lines()
            if (m := COPY_RE.search(msg)) and m.group(1).startswith(prefix)
        ]
        return {f"{job_id}.{tasks + k}x1": original for k, original in enumerate(found)}


# -- one run -------------------------------------------------------------------------------------


def reference(x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """onnxruntime directly on the inputs, in batches of 1,024."""
    sess = ort.InferenceSession(str(MODELS / "digits_mlp.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    parts = [sess.run(names, {"input": x[i : i + 1024]}) for i in range(0, len(x), 1024)]
    return {name: np.concatenate([p[k] for p in parts]) for k, name in enumerate(names)}


def accepted_work(
    results: list[tuple[str, str, bool, float]], job_id: str, copies: dict[str, str]
) -> tuple[float, int, int]:
    """(exec_ms summed over the first successful result of each unit of work, units seen,
    further results of units already counted)."""
    seen: set[str] = set()
    work, surplus = 0.0, 0
    for job, task_id, ok, exec_ms in results:
        if job != job_id or not ok:
            continue
        unit = copies.get(task_id, task_id)
        if unit in seen:
            surplus += 1
            continue
        seen.add(unit)
        work += exec_ms
    return work, len(seen), surplus


async def run_policy(
    fleet: HeteroFleet,
    setup: Setup,
    policy: str,
    x: np.ndarray[Any, Any],
    expected: dict[str, np.ndarray[Any, Any]],
) -> PolicyRun:
    run = PolicyRun(policy=policy, samples=len(x), slots=setup_slots(fleet))
    progress = Progress(total=1)

    def on_status(status: JobStatus) -> None:
        progress.total = max(status.tasks_total, 1)
        progress.on_status(status)

    throttle = Throttle(
        fleet.agents[setup.throttle_agent].proc.pid, pause_s=setup.pause_s, period_s=setup.period_s
    )

    async def slow_down() -> None:
        await progress.reach(setup.throttle_from, timeout=setup.timeout_s)
        if not progress.finished:
            await throttle.run()

    t0 = time.monotonic()
    handle = await fleet.client.submit(MODEL, x, policy=policy, on_status=on_status)
    slowing = asyncio.create_task(slow_down())
    try:
        out = await handle.result(timeout=setup.timeout_s)
    finally:
        progress.finished = True
        await cancel_and_wait([slowing])
    run.end_to_end_s = time.monotonic() - t0
    res = out.result
    run.makespan_s = res.elapsed_s
    run.tasks, run.batch_size, run.retries = res.tasks, res.batch_size, res.retries
    run.accepted = sum(s.tasks for s in res.per_agent.values())
    run.pauses = throttle.pauses
    run.correct = bool(
        np.array_equal(out["label"], expected["label"])
        and np.allclose(out["probabilities"], expected["probabilities"], atol=1e-5)
    )
    speed_of = {f"a{i}": s for i, s in enumerate(setup.speeds)}
    by_speed: Counter[int] = Counter()
    for agent_id, share in res.per_agent.items():
        by_speed[speed_of.get(agent_id, 0)] += share.samples
    run.share_by_speed = {s: by_speed[s] / run.samples for s in sorted(set(setup.speeds))}
    await asyncio.sleep(1.2)  # the last results reach the tap; the coordinator's counters
    copies = fleet.copies(res.job_id, res.tasks)
    run.work_ms, run.units_measured, run.surplus_results = accepted_work(
        fleet.tap.results, res.job_id, copies
    )
    with contextlib.suppress(Exception):
        counts = (await fleet.client.coordinator_state(timeout=3)).counts
        run.counts = {k: counts.get(k, 0) for k in ("speculated", "retried", "cancelled")}
    return run


def setup_slots(fleet: Fleet) -> int:
    return fleet.profile.agents * fleet.profile.slots


async def run_hetero(setup: Setup, workdir: Path) -> list[PolicyRun]:
    """Start the fleet once and run the job under each policy, a fresh coordinator each time."""
    x = make_inputs(setup.samples)
    expected = reference(x)
    profile = Profile(
        "hetero",
        tasks=setup.samples,
        slowdown=setup.slowdown(max(setup.speeds)),
        agents=len(setup.speeds),
        slots=1,
        timeout_s=setup.timeout_s,
    )
    agent_args = {
        f"a{i}": ["--slowdown", f"{setup.slowdown(s):g}", "--label", f"speed={s}x"]
        for i, s in enumerate(setup.speeds)
    }
    runs = []
    async with HeteroFleet(workdir, profile, agent_args=agent_args) as fleet:
        for i, policy in enumerate(setup.policies):
            if i:
                await fleet.restart_coordinator()
            runs.append(await run_policy(fleet, setup, policy, x, expected))
    return runs


# -- the table -----------------------------------------------------------------------------------


def describe(setup: Setup) -> str:
    mix = Counter(setup.speeds)
    fleet = ", ".join(
        f"{n} x {s}x (slowdown {setup.slowdown(s):g})" for s, n in sorted(mix.items())
    )
    return (
        f"{len(setup.speeds)} agents, 1 slot each: {fleet}; {setup.throttle_agent} paused "
        f"{setup.pause_s:g} s of every {setup.period_s:g} s from {setup.throttle_from:.0%} "
        f"of the job; {setup.samples:,} digits"
    )


def rows(runs: list[PolicyRun]) -> list[tuple[str, str]]:
    """(measurement, figure) rows for the suite's table."""
    out = []
    for r in runs:
        shares = "/".join(f"{v:.0%}" for _, v in sorted(r.share_by_speed.items(), reverse=True))
        out.append(
            (
                f"hetero `{r.policy}`: makespan / lower bound",
                f"{r.makespan_s:.2f} s / {r.lower_bound_s:.2f} s = **{r.ratio:.3f}**, "
                f"{r.throughput:,.0f} samples/s; share 4x/2x/1x {shares}",
            )
        )
    return out


def format_runs(setup: Setup, runs: list[PolicyRun]) -> str:
    lines = [
        f"heterogeneous fleet: {describe(setup)}; {os.cpu_count()} cores, Mosquitto",
        "",
        "| policy | makespan | lower bound | ratio | throughput | end to end "
        "| share 4x/2x/1x | microtasks | copies | lost | correct |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        shares = " / ".join(f"{v:.0%}" for _, v in sorted(r.share_by_speed.items(), reverse=True))
        lines.append(
            f"| `{r.policy}` | {r.makespan_s:.2f} s | {r.lower_bound_s:.2f} s | {r.ratio:.3f} "
            f"| {r.throughput:,.0f}/s | {r.end_to_end_s:.2f} s | {shares} "
            f"| {r.tasks:,} of {r.batch_size} | {r.counts.get('speculated', 0)} "
            f"| {r.lost} | {'yes' if r.correct else 'NO'} |"
        )
    lines.append(
        "\nlower bound = sum of the exec_ms agents reported for the accepted result of each "
        f"microtask / {runs[0].slots if runs else 0} slots; {runs[0].pauses if runs else 0} "
        "pauses of the slowed device in the first run"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.samples:,} samples")
    parser.add_argument("--samples", type=int, help="digits in the job")
    parser.add_argument("--policy", action="append", choices=POLICIES)
    parser.add_argument("--slowdown-4x", type=float, help="slowdown of the 4x devices")
    parser.add_argument("--keep", type=Path, help="keep every process's log in this directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    setup = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {
        "samples": args.samples,
        "policies": tuple(args.policy) if args.policy else None,
        "slowdown_4x": args.slowdown_4x,
    }
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    with tempfile.TemporaryDirectory(prefix="hetero-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        runs = asyncio.run(run_hetero(setup, workdir))
    print(format_runs(setup, runs))
    return 0 if all(r.correct and r.lost == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
