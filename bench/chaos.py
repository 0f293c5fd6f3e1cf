"""Chaos suite: real processes, a real Mosquitto, one job of at least 10,000 microtasks per
scenario, checked against the submitted set.

Every scenario starts its own fleet: Mosquitto (``broker_config/mosquitto-dev.conf``), a
coordinator process with a journal, four agent processes (two slots each, slowed down to
emulate small devices so the job lasts long enough to be hurt) and this process as the
client (``OffloadClient``), which submits the job with ``batch_size=1`` and waits for its
result. While the job runs, the scenario injects its faults. Then it checks:

* **lost** microtasks (submitted, without an accepted result) and **duplicates** (more
  than one accepted result for a microtask), from the job's per-agent counts, and that
  the output has exactly one row per sample;
* **identical**: the outputs equal onnxruntime run directly on the same one-sample
  batches, bit for bit (a fault-free run through the system gives exactly those);
* recovery figures, from the coordinator's JSON log, the job's status stream and a tap
  on the agents' result topics.

``tests/chaos/test_chaos.py`` runs the quick profile in CI and asserts; this script runs
either profile and prints a table. Usage::

    python bench/chaos.py                 # long profile, every scenario (~10 minutes)
    python bench/chaos.py --quick         # the CI profile
    python bench/chaos.py --scenario coordinator_kill --scenario network_cut
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make ``bench.netfault`` importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from bench.netfault import DelayRelay, NetNamespace, RelayThread, netns_available  # noqa: E402
from coordinator import OffloadClient  # noqa: E402
from coordinator.broker import LocalBroker  # noqa: E402
from coordinator.handles import JobOutput  # noqa: E402
from coordinator.journal import CRASH_ENV  # noqa: E402
from protocol import BrokerAddress, JobStatus, Topics  # noqa: E402
from protocol.transport import Link, cancel_and_wait  # noqa: E402

MODELS = REPO / "models"
MODEL_FILE = MODELS / "digits_mlp.onnx"  # served as "digits-mlp" (file name's stem)
MODEL = "digits-mlp"


@dataclass(frozen=True)
class Profile:
    name: str
    tasks: int  # microtasks per job: one sample each
    slowdown: float  # service-time multiplier of every agent (an emulated small device)
    agents: int = 4
    slots: int = 2
    kill_every_s: float = 2.0  # agent_kills: a kill -9 this often ...
    restart_after_s: float = 1.0  # ... and the agent back this long after
    broker_outage_s: float = 1.0
    cuts_s: tuple[float, ...] = (5.0,)
    timeout_s: float = 240.0


QUICK = Profile("quick", tasks=10_000, slowdown=20.0)
LONG = Profile(
    "long",
    tasks=20_000,
    slowdown=40.0,
    kill_every_s=3.0,
    restart_after_s=2.0,
    broker_outage_s=3.0,
    cuts_s=(5.0, 60.0),
    timeout_s=600.0,
)

# Shorter leases than the default 10 s, so work lost with a stalled agent comes back
# sooner; suspect/dead thresholds stay at their defaults (6 s / 15 s).
COORDINATOR_TOML = """\
[coordinator]
lease_min_s = 3.0
status_interval_s = 0.2
resume_grace_s = 2.0
"""

ScenarioFn = Callable[["Fleet", "Progress", "Report"], Coroutine[Any, Any, None]]


# -- measurements ---------------------------------------------------------------------------------


@dataclass
class Report:
    scenario: str
    tasks: int
    makespan_s: float = 0.0
    accepted: int = 0
    lost: int = 0
    duplicates: int = 0
    identical: bool = False
    retries: int = 0
    longest_stall_s: float = 0.0
    results_published: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    # (what, seconds): detection and recovery times of each injected fault
    events: list[tuple[str, float | None]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def event(self, what: str, seconds: float | None) -> None:
        self.events.append((what, seconds))

    @property
    def exact(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.identical


class Progress:
    """The job's status stream: (monotonic time, microtasks done)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.points: list[tuple[float, int]] = []
        self.done = 0
        self.finished = False

    def on_status(self, status: JobStatus) -> None:
        self.points.append((time.monotonic(), status.tasks_done))
        self.done = max(self.done, status.tasks_done)

    async def reach(self, fraction: float, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.done < fraction * self.total and not self.finished:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the job did not reach {fraction:.0%} in {timeout:.0f}s")
            await asyncio.sleep(0.02)

    def first_progress_after(self, t: float) -> float | None:
        """Seconds from ``t`` (monotonic) to the first status showing more work done."""
        before = max((d for ts, d in self.points if ts <= t), default=0)
        for ts, d in self.points:
            if ts > t and d > before:
                return ts - t
        return None

    def longest_stall(self) -> float:
        stall, last_t, last_d = 0.0, None, -1
        for ts, d in self.points:
            if d > last_d:
                if last_t is not None:
                    stall = max(stall, ts - last_t)
                last_t, last_d = ts, d
        return stall


class ResultTap:
    """Every result any agent publishes (accepted or not): time and agent, from a separate
    MQTT session that reconnects like the services do."""

    def __init__(self, address: BrokerAddress, root: str) -> None:
        self.topics = Topics(root)
        self.per_agent: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}
        self._link = Link(
            address=address,
            client_id=f"chaos-tap-{uuid.uuid4().hex[:8]}",
            subscriptions=[(self.topics.all_agents("results"), 1)],
            on_message=self._on_message,
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._link.run())
        await asyncio.wait_for(self._link.connected.wait(), 10)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    def _on_message(self, topic: str, payload: bytes) -> None:
        agent_id, _ = self.topics.parse_agent(topic)
        now = time.monotonic()
        self.per_agent[agent_id] += 1
        self.times.setdefault(agent_id, []).append(now)

    async def wait_busy(self, agent_id: str, timeout: float = 30.0) -> bool:
        """Wait until ``agent_id`` publishes a result (it has work in hand); False on timeout."""
        start = time.monotonic()
        while self.first_result_after(agent_id, start) is None:
            if time.monotonic() - start > timeout:
                return False
            await asyncio.sleep(0.005)
        return True

    def first_result_after(self, agent_id: str, t: float) -> float | None:
        times = self.times.get(agent_id, [])  # in arrival order
        i = bisect.bisect_right(times, t)
        return times[i] - t if i < len(times) else None


# -- the fleet -------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.proc.wait(10)


class Fleet:
    """Mosquitto, a coordinator and ``profile.agents`` agents, all real processes.

    With ``netns=True`` agent ``a0`` runs in its own network namespace and reaches the
    broker through a relay on the namespace's veth (``relay_delay_s`` each way), so its
    link alone can be cut or made lossy.
    """

    def __init__(
        self,
        workdir: Path,
        profile: Profile,
        *,
        netns: bool = False,
        relay_delay_s: float = 0.0,
        crash_at: str | None = None,
        agent_args: dict[str, list[str]] | None = None,
        only_model: bool = False,
    ) -> None:
        self.workdir = workdir
        self.only_model = only_model
        self.profile = profile
        self.root = f"chaos/{uuid.uuid4().hex[:8]}"
        self.topics = Topics(self.root)
        self.netns = netns
        self.relay_delay_s = relay_delay_s
        self.crash_at = crash_at
        self.agent_args = agent_args or {}
        self.broker = LocalBroker(kind="mosquitto")
        self.ns: NetNamespace | None = None
        self.relay: RelayThread | None = None
        self.coordinators: list[Proc] = []
        self.agents: dict[str, Proc] = {}
        self._starts: Counter[str] = Counter()
        self._stack = contextlib.AsyncExitStack()
        self.client: OffloadClient
        self.tap: ResultTap
        self.config = workdir / "coordinator.toml"
        self.config.write_text(COORDINATOR_TOML)

    @property
    def address(self) -> BrokerAddress:
        return BrokerAddress(host=self.broker.info.host, port=self.broker.info.port)

    async def __aenter__(self) -> Fleet:
        try:
            await asyncio.to_thread(self.broker.start)
            if self.netns:
                self.ns = NetNamespace()
                self.ns.__enter__()
                self.relay = DelayRelay.start_in_thread(
                    listen_host=self.ns.host_ip,
                    target_host=self.broker.info.host,
                    target_port=self.broker.info.port,
                    delay_s=self.relay_delay_s,
                )
            self.start_coordinator(crash_at=self.crash_at)
            for i in range(self.profile.agents):
                self.start_agent(f"a{i}")
            self.client = await self._stack.enter_async_context(
                OffloadClient(self.address, root=self.root)
            )
            self.tap = ResultTap(self.address, self.root)
            await self.tap.start()
            await self.wait_for_agents(self.profile.agents)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if hasattr(self, "tap"):
            await self.tap.stop()
        await self._stack.aclose()
        procs = [*self.agents.values(), *self.coordinators]
        for p in procs:
            p.signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            p.signal(signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.to_thread(p.proc.wait, 20)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.relay is not None:
            self.relay.stop()
        if self.ns is not None:
            self.ns.__exit__(None, None, None)
        await asyncio.to_thread(self.broker.close)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        self._starts[name] += 1
        log = self.workdir / f"{name}-{self._starts[name]}.log"
        cmd = [sys.executable, "-m", "coordinator.cli", "--log-level", "INFO", "--log-json", *argv]
        if name == "a0" and self.ns is not None:
            cmd = [*self.ns.prefix(), *cmd]
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **(env or {})}
            )
        return Proc(name, proc, log)

    def start_coordinator(self, crash_at: str | None = None) -> Proc:
        env = {CRASH_ENV: crash_at} if crash_at else {}
        argv = ["coordinator", "--broker", self.address.url, "--root", self.root]
        argv += ["--journal", str(self.workdir / "journal.sqlite"), "--config", str(self.config)]
        proc = self._spawn("coordinator", argv, env)
        self.coordinators.append(proc)
        return proc

    @property
    def coordinator(self) -> Proc:
        return self.coordinators[-1]

    def _models_dir(self) -> Path:
        """Only the model the scenarios run: four agents self-benchmarking the whole zoo
        (digits-cnn costs ~0.5 s of CPU each) at once on two cores skew their first cost
        estimates, and the fault should hit a fleet that shares the work evenly."""
        d = self.workdir / "models"
        if not (d / MODEL_FILE.name).exists():
            d.mkdir(exist_ok=True)
            shutil.copyfile(MODEL_FILE, d / MODEL_FILE.name)
        return d

    def start_agent(self, agent_id: str) -> Proc:
        url = self.address.url
        if agent_id == "a0" and self.ns is not None and self.relay is not None:
            url = f"mqtt://{self.ns.host_ip}:{self.relay.port}"
        argv = ["agent", "--broker", url, "--root", self.root, "--id", agent_id]
        models = self._models_dir() if self.only_model else MODELS
        argv += ["--models-dir", str(models), "--heartbeat", "0.5"]
        argv += ["--slots", str(self.profile.slots), "--slowdown", str(self.profile.slowdown)]
        argv += self.agent_args.get(agent_id, [])
        # Results finished while cut off are kept on disk, one directory per agent.
        env = {"EDGE_OFFLOAD_AGENT_SPOOL_DIR": str(self.workdir / f"{agent_id}-spool")}
        proc = self._spawn(agent_id, argv, env)
        self.agents[agent_id] = proc
        return proc

    async def wait_for_agents(self, n: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(Exception):
                state = await self.client.coordinator_state(timeout=1.0)
                if state.online and state.agents_online >= n:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {n} agents joined within {timeout:.0f}s")
            for p in [*self.agents.values(), self.coordinator]:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited: {p.log.read_text()[-2000:]}")
            await asyncio.sleep(0.2)

    # -- the coordinator's log ------------------------------------------------------------------
    def log_lines(self) -> list[tuple[float, str]]:
        """(wall-clock time, message) of every coordinator log line, all incarnations."""
        lines = []
        for p in self.coordinators:
            for raw in p.log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError, KeyError):
                    rec = json.loads(raw)
                    lines.append((float(rec["ts"]), str(rec["msg"])))
        return sorted(lines)

    def first_log_after(self, t_wall: float, pattern: str) -> float | None:
        """Seconds from ``t_wall`` to the first coordinator log line matching ``pattern``."""
        rx = re.compile(pattern)
        return next(
            (ts - t_wall for ts, msg in self.log_lines() if ts >= t_wall and rx.search(msg)), None
        )

    def count_log(self, pattern: str) -> int:
        rx = re.compile(pattern)
        return sum(1 for _, msg in self.log_lines() if rx.search(msg))

    async def wait_log(self, t_wall: float, pattern: str, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while (found := self.first_log_after(t_wall, pattern)) is None:
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.1)
        return found


# -- scenarios ------------------------------------------------------------------------------------


async def baseline(fleet: Fleet, progress: Progress, report: Report) -> None:
    """No fault: the reference makespan."""


async def agent_kills(fleet: Fleet, progress: Progress, report: Report) -> None:
    """kill -9 a random agent every few seconds; it comes back after a pause."""
    p = fleet.profile
    rng = random.Random(1)
    kills = []
    while progress.done < 0.85 * progress.total and not progress.finished:
        await asyncio.sleep(p.kill_every_s - p.restart_after_s)
        victim = rng.choice(sorted(fleet.agents))
        t_kill = time.time()
        fleet.agents[victim].kill()
        await asyncio.sleep(p.restart_after_s)
        t_back = time.time()
        fleet.start_agent(victim)
        kills.append((victim, t_kill, t_back))
    await asyncio.sleep(0.5)
    detect = [fleet.first_log_after(t, rf"agent {v} offline") for v, t, _ in kills]
    rejoin = [fleet.first_log_after(t, rf"agent {v} online") for v, _, t in kills]
    report.facts["agents killed"] = len(kills)
    report.event("kill -9 -> death seen (median)", _median(detect))
    report.event("kill -9 -> death seen (max)", _max(detect))
    report.event("restart -> agent back online (median)", _median(rejoin))


async def sigstop(fleet: Fleet, progress: Progress, report: Report) -> None:
    """SIGSTOP an agent holding work past its lease, then SIGCONT it."""
    await progress.reach(0.2)
    # The busiest agent of the last second: the scheduler may leave one of four alike
    # agents nearly idle, and stopping an idle agent would test nothing.
    recent = time.monotonic() - 1.0
    name = max(fleet.agents, key=lambda a: sum(t > recent for t in fleet.tap.times.get(a, [])))
    await fleet.tap.wait_busy(name)  # a result just now: it holds its next microtask
    victim = fleet.agents[name]
    t0 = time.time()
    victim.signal(signal.SIGSTOP)
    expired = await fleet.wait_log(t0, rf"lease expired on {name}", timeout=60)
    await asyncio.sleep(1.0)  # well past the lease
    stopped = time.time() - t0
    victim.signal(signal.SIGCONT)
    t_cont = time.monotonic()
    report.facts["stopped"] = name
    report.facts["stopped for (s)"] = round(stopped, 1)
    report.event("SIGSTOP -> lease expired", expired)
    await asyncio.sleep(2.0)  # let its late results arrive
    report.event("SIGCONT -> its next result", fleet.tap.first_result_after(name, t_cont))


async def broker_kill(fleet: Fleet, progress: Progress, report: Report) -> None:
    """kill -9 Mosquitto mid-job, restart it (empty: no sessions, no retained messages)."""
    await progress.reach(0.3)
    t_kill = time.monotonic()
    await asyncio.to_thread(fleet.broker.kill)
    await asyncio.sleep(fleet.profile.broker_outage_s)
    t_wall = time.time()
    await asyncio.to_thread(fleet.broker.start)
    t_back = time.monotonic()
    reconnected = await fleet.wait_log(t_wall, r"connected to", timeout=60)
    report.facts["outage (s)"] = round(t_back - t_kill, 2)
    report.event("broker back -> coordinator reconnected", reconnected)
    await progress.reach(0.99, timeout=120)
    report.event("broker back -> job progressing again", progress.first_progress_after(t_back))


async def coordinator_kill(fleet: Fleet, progress: Progress, report: Report) -> None:
    """Three coordinator deaths, each followed by a new coordinator on the same journal:
    SIGKILL just before its 15th journal commit (set when the fleet started), just after
    its 12th, and from outside at a random moment."""
    restarts: list[tuple[float, float]] = []  # (wall, monotonic) of each restart

    async def restart(crash_at: str | None) -> None:
        await _wait_exit(fleet.coordinator)
        await asyncio.sleep(0.5)
        restarts.append((time.time(), time.monotonic()))
        fleet.start_coordinator(crash_at=crash_at)

    await restart("after:12")  # death 1 was "before:15"; death 2 comes after a commit
    await restart(None)
    await progress.reach(0.7)
    await asyncio.sleep(random.Random(3).uniform(0.0, 0.1))  # anywhere within a tick
    fleet.coordinator.kill()  # death 3, from outside
    await restart(None)
    await progress.reach(0.99, timeout=fleet.profile.timeout_s)
    for i, (wall, mono) in enumerate(restarts, 1):
        resumed = await fleet.wait_log(wall, r"resumed job", timeout=30)
        report.event(f"death {i}: restart -> job resumed", resumed)
        report.event(f"death {i}: restart -> progress again", progress.first_progress_after(mono))
    report.facts["coordinator deaths"] = len(restarts)
    report.facts["microtasks taken over after restarts"] = fleet.count_log(
        r"taken over from before the restart"
    )


async def _wait_exit(proc: Proc, timeout: float = 120.0) -> float:
    deadline = time.monotonic() + timeout
    while proc.alive():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.name} did not exit")
        await asyncio.sleep(0.02)
    return time.time()


async def network_cut(fleet: Fleet, progress: Progress, report: Report) -> None:
    """Cut agent a0 off the network (its packets dropped both ways) and heal it."""
    assert fleet.ns is not None
    for seconds in fleet.profile.cuts_s:
        await progress.reach(0.15)
        # Cut it while it holds work (with microtasks this short, a fleet limited by the
        # coordinator's dispatch rate can leave one agent idle for a while).
        report.facts[f"cut {seconds:.0f}s while a0 busy"] = await fleet.tap.wait_busy("a0")
        t_cut = time.time()
        fleet.ns.cut()
        await asyncio.sleep(seconds)
        fleet.ns.heal()
        t_heal, mono_heal = time.time(), time.monotonic()
        label = f"cut {seconds:.0f}s"
        report.event(
            f"{label}: cut -> a0 suspect", fleet.first_log_after(t_cut, r"agent a0 suspect")
        )
        dead = fleet.first_log_after(t_cut, r"agent a0 (offline|silent)")
        report.event(
            f"{label}: cut -> a0 dead", dead if dead is not None and dead < seconds else None
        )
        await asyncio.sleep(3.0)
        report.event(
            f"{label}: heal -> a0 back online", fleet.first_log_after(t_heal, r"agent a0 online")
        )
        report.event(
            f"{label}: heal -> a0's next result", fleet.tap.first_result_after("a0", mono_heal)
        )


async def lossy_link(fleet: Fleet, progress: Progress, report: Report) -> None:
    """Agent a0 behind 200 ms of delay each way and 5 % packet loss, for the whole job."""
    await progress.reach(0.99, timeout=fleet.profile.timeout_s)
    report.facts["a0 false deaths"] = fleet.count_log(r"agent a0 (offline|silent)")
    report.facts["a0 suspect episodes"] = fleet.count_log(r"agent a0 suspect")
    report.facts["a0 results"] = fleet.tap.per_agent["a0"]


async def redundancy(fleet: Fleet, progress: Progress, report: Report) -> None:
    """Every unit of work on three distinct agents; agent a3 answers everything wrongly."""
    await progress.reach(0.99, timeout=fleet.profile.timeout_s)
    report.facts["copies published (3 per unit, plus re-runs)"] = sum(fleet.tap.per_agent.values())
    report.facts["a3's answers (all wrong)"] = fleet.tap.per_agent["a3"]


SCENARIOS: dict[str, ScenarioFn] = {
    "baseline": baseline,
    "agent_kills": agent_kills,
    "sigstop": sigstop,
    "broker_kill": broker_kill,
    "coordinator_kill": coordinator_kill,
    "network_cut": network_cut,
    "lossy_link": lossy_link,
    "redundancy": redundancy,
}
NETNS_SCENARIOS = {"network_cut", "lossy_link"}


# -- running one scenario -----------------------------------------------------------------------


def make_inputs(n: int) -> np.ndarray[Any, Any]:
    """``n`` distinct digit-like samples (the 1,797 digits, tiled and jittered)."""
    with np.load(MODELS / "digits_samples.npz") as data:
        x = data["x"].astype(np.float32)
    rng = np.random.default_rng(0)
    tiled = np.resize(x, (n, x.shape[1]))
    return (tiled + rng.normal(0.0, 0.5, tiled.shape)).clip(0, 16).astype(np.float32)


def reference(x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    """onnxruntime directly, on the same one-sample batches as the job's microtasks."""
    sess = ort.InferenceSession(str(MODEL_FILE), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    rows = [sess.run(names, {"input": x[i : i + 1]}) for i in range(len(x))]
    return {name: np.concatenate([r[k] for r in rows]) for k, name in enumerate(names)}


async def run_scenario(
    name: str,
    profile: Profile,
    workdir: Path,
    expected: dict[str, np.ndarray[Any, Any]],
    x: np.ndarray[Any, Any],
) -> Report:
    scenario = SCENARIOS[name]
    report = Report(scenario=name, tasks=len(x))
    fleet_options: dict[str, Any] = {}
    if name == "coordinator_kill":
        # Idle, the coordinator commits nothing: its 15th commit comes mid-job.
        fleet_options["crash_at"] = "before:15"
    if name == "redundancy":
        fleet_options["agent_args"] = {"a3": ["--corrupt-outputs", "1.0"]}
    if name in NETNS_SCENARIOS:
        fleet_options["netns"] = True
        fleet_options["relay_delay_s"] = 0.2 if name == "lossy_link" else 0.0
    async with Fleet(workdir, profile, only_model=True, **fleet_options) as fleet:
        if name == "lossy_link":
            assert fleet.ns is not None
            fleet.ns.lossy(0.05)
        progress = Progress(len(x))
        t0 = time.monotonic()
        handle = await fleet.client.submit(
            MODEL,
            x,
            batch_size=1,
            on_status=progress.on_status,
            redundancy=3 if name == "redundancy" else 1,
        )
        faults = asyncio.create_task(scenario(fleet, progress, report))
        try:
            out: JobOutput = await handle.result(timeout=profile.timeout_s)
        finally:
            progress.finished = True
        report.makespan_s = time.monotonic() - t0
        await faults
        _check(report, out, expected)
        report.longest_stall_s = progress.longest_stall()
        report.results_published = sum(fleet.tap.per_agent.values())
        await asyncio.sleep(1.2)  # the coordinator publishes its counters once a second
        with contextlib.suppress(Exception):
            report.counts = dict((await fleet.client.coordinator_state(timeout=3)).counts)
    return report


def _check(report: Report, out: JobOutput, expected: dict[str, np.ndarray[Any, Any]]) -> None:
    res = out.result
    report.accepted = sum(share.tasks for share in res.per_agent.values())
    report.lost = max(report.tasks - report.accepted, 0)
    report.duplicates = max(report.accepted - report.tasks, 0)
    report.retries = res.retries
    report.identical = out.outputs.keys() == expected.keys() and all(
        out.outputs[k].shape == v.shape and np.array_equal(out.outputs[k], v)
        for k, v in expected.items()
    )
    report.facts["per agent"] = {a: s.tasks for a, s in sorted(res.per_agent.items())}
    if res.disagreements:
        report.facts["disagreed with the majority"] = dict(res.disagreements)


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def _max(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return max(got) if got else None


# -- the table -------------------------------------------------------------------------------------


def format_report(r: Report, baseline_s: float | None = None) -> str:
    slower = f" ({r.makespan_s / baseline_s:.2f}x fault-free)" if baseline_s else ""
    lines = [
        f"{r.scenario}: {r.tasks:,} microtasks in {r.makespan_s:.1f}s{slower}; "
        f"lost {r.lost}, duplicates {r.duplicates}, "
        f"identical outputs {'yes' if r.identical else 'NO'}; "
        f"retries {r.retries}, results published {r.results_published:,}, "
        f"longest stall {r.longest_stall_s:.1f}s"
    ]
    for what, secs in r.events:
        lines.append(f"    {what:<46} {'-' if secs is None else f'{secs:.2f}s'}")
    for k, v in r.facts.items():
        lines.append(f"    {k:<46} {v}")
    keep = ("retried", "adopted", "renewed", "rejected_stale_result", "rejected_forged_result")
    counted = {k: r.counts[k] for k in keep if r.counts.get(k)}
    if counted:
        lines.append(f"    {'coordinator counters (last incarnation)':<46} {counted}")
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    profile = QUICK if args.quick else LONG
    names = args.scenario or list(SCENARIOS)
    if (reason := netns_available()) is not None and NETNS_SCENARIOS & set(names):
        print(f"skipping {sorted(NETNS_SCENARIOS & set(names))}: {reason}")
        names = [n for n in names if n not in NETNS_SCENARIOS]
    x = make_inputs(args.tasks or profile.tasks)
    expected = reference(x)
    print(
        f"edge-offload chaos suite, {profile.name} profile: {len(x):,} microtasks per job, "
        f"{profile.agents} agents x {profile.slots} slots (slowdown {profile.slowdown:g}x), "
        f"Mosquitto, {os.cpu_count()} cores"
    )
    failures = 0
    baseline_s = None
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as tmp:
            workdir = Path(tmp)
            if args.keep:
                workdir = args.keep / name
                workdir.mkdir(parents=True, exist_ok=True)
            report = await run_scenario(name, profile, workdir, expected, x)
        if name == "baseline":
            baseline_s = report.makespan_s
        print(format_report(report, baseline_s if name != "baseline" else None), flush=True)
        failures += not report.exact
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the CI profile")
    parser.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    parser.add_argument("--tasks", type=int, help="microtasks per job (default: the profile's)")
    parser.add_argument("--keep", type=Path, help="keep every process's log in this directory")
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("mqtt").setLevel(logging.CRITICAL)  # paho: "connection reset" noise

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so every process and namespace started is cleaned up

    signal.signal(signal.SIGTERM, interrupt)
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
