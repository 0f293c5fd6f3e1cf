"""Fleet-scale simulation: 1,000 and 10,000 simulated agents against the real coordinator.

What runs, per fleet size: a Mosquitto broker, the coordinator as a separate process
(``edge-offload coordinator``, its defaults), this process as the client, and a **swarm**:
one process holding ONE MQTT connection that speaks for every simulated agent. It
publishes each agent's retained birth (capabilities and a digits-mlp cost advertisement,
the agents being of speed 1x, 2x or 4x), a heartbeat for each agent at the chosen rate
(listing the microtasks the agent holds, as a real agent does), subscribes to
``agents/+/tasks`` and answers each microtask, one at a time per agent, after the
agent's emulated service time with a result of the model's output names, dtypes and
shapes. The coordinator cannot tell it from a fleet: same topics, same messages.

Measured, with psutil on the coordinator's process (CPU % of one core, RSS):

* **registration**: time from the first birth to the coordinator counting every agent
  online (its retained state, published once a second);
* **heartbeats** at the agents' default rate (every 2 s) and at a stress rate (every
  0.2 s), 10 s each: offered = heartbeats the swarm sent per second; **absorbed** =
  heartbeats sent / time until the coordinator had processed the last of them. That
  moment is found with a barrier: right after the phase's last heartbeat the swarm
  submits a one-sample job on the same connection, and the coordinator can dispatch it
  only after reading everything before it, so the barrier's microtask reaching the swarm
  marks the end (the lag is shown). Every 100th heartbeat comes from an id that never
  registered, which the coordinator counts as rejected: that count, against the number
  sent, shows none were dropped on the way;
* **scheduling decisions per second**: one job of single-sample microtasks
  (``batch_size=1``, the default policy) over the whole fleet, so that every microtask is
  one placement decision: microtasks / the coordinator's ``elapsed_s``. The swarm's
  agents could absorb far more (each takes a microtask in 2-8 ms), so this is the
  coordinator's rate: 20,000 microtasks at every fleet size (5,000 with ``--quick``). If
  the job does not finish within a time budget, the rate is what the swarm received
  within it.

Usage: python bench/fleet_scale.py [--quick] [--agents N ...] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from coordinator import OffloadClient  # noqa: E402
from coordinator.broker import LocalBroker  # noqa: E402
from protocol import (  # noqa: E402
    AgentState,
    BrokerAddress,
    CancelTask,
    Capabilities,
    Encoding,
    Heartbeat,
    InferenceJob,
    JobError,
    ModelInfo,
    ProtocolError,
    RunTask,
    TaskResult,
    Topics,
    decode,
    encode,
    encode_arrays,
    is_binary,
    new_seq,
    parse_task,
)
from protocol.transport import Link, cancel_and_wait  # noqa: E402

MODEL = "digits-mlp"
MANIFEST = REPO / "models" / "manifest.json"
SCALES = (1_000, 10_000)
REALISTIC_HEARTBEAT_S = 2.0  # the agent's default heartbeat_s
STRESS_HEARTBEAT_S = 0.2
MARKER_EVERY = 100  # every 100th heartbeat is a marker from an unregistered id
GHOSTS = 16
TICK_S = 0.01
SPEEDS = (4, 2, 1)


@dataclass(frozen=True)
class ScaleSetup:
    agents: int
    phase_s: float = 10.0
    stress_heartbeat_s: float = STRESS_HEARTBEAT_S
    microtasks: int = 20_000
    # An agent of speed 4x answers a one-sample microtask in this long; 2x in twice it...
    service_ms: float = 2.0
    dispatch_budget_s: float = 180.0
    timeout_s: float = 120.0


@dataclass
class HeartbeatPhase:
    interval_s: float
    seconds: float = 0.0  # the phase, from its first heartbeat to its last
    sent: int = 0
    drained_s: float = 0.0  # last heartbeat written -> the barrier dispatched
    swarm_behind_s: float = 0.0  # the swarm's own backlog when the phase ended
    markers_sent: int = 0
    markers_counted: int = 0
    coordinator_cpu: float = 0.0
    coordinator_drain_cpu: float = 0.0  # while it caught up, after the last heartbeat
    coordinator_rss: int = 0
    swarm_cpu: float = 0.0
    broker_cpu: float = 0.0

    @property
    def offered(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else math.nan

    @property
    def absorbed(self) -> float:
        total = self.seconds + self.drained_s
        return self.sent / total if total > 0 else math.nan


@dataclass
class ScaleRun:
    agents: int
    registered: int = 0
    register_s: float = math.nan
    rss_idle: int = 0
    phases: list[HeartbeatPhase] = field(default_factory=list)
    microtasks: int = 0
    finished: bool = False
    dispatch_s: float = 0.0
    received: int = 0  # microtasks of the job the swarm received (first attempts and retries)
    results_sent: int = 0
    error: str = ""  # why the job failed, if it did
    accepted: int = 0  # results the job kept, from its per-agent counts
    retries: int = 0
    agents_used: int = 0
    dispatch_cpu: float = 0.0
    dispatch_rss: int = 0
    dispatch_swarm_cpu: float = 0.0
    dispatch_broker_cpu: float = 0.0
    # With --profile: what the coordinator was busy with, per phase (py-spy).
    profiles: dict[str, list[tuple[float, str]]] = field(default_factory=dict)

    @property
    def decisions_per_s(self) -> float:
        if self.dispatch_s <= 0:
            return math.nan
        return (self.microtasks if self.finished else self.received) / self.dispatch_s


# -- the swarm (its own process) ---------------------------------------------------------------


def _model_info(cost: list[tuple[int, float]]) -> ModelInfo:
    entry = next(m for m in json.loads(MANIFEST.read_text())["models"] if m["id"] == MODEL)
    keys = ("id", "version", "sha256", "size", "inputs", "outputs", "batch_axis")
    return ModelInfo.model_validate({**{k: entry[k] for k in keys}, "cost": cost})


@dataclass(eq=False, slots=True)
class SimAgent:
    agent_id: str
    seq: int
    hb_topic: str
    overhead_ms: float
    per_sample_ms: float
    queue: deque[tuple[RunTask, Encoding, float]] = field(default_factory=deque)
    running: RunTask | None = None
    held: dict[tuple[str, int], None] = field(default_factory=dict)
    completed: int = 0

    def service_ms(self, samples: int) -> float:
        return self.overhead_ms + self.per_sample_ms * samples


# A heartbeat, rendered without pydantic so one process can offer tens of thousands a
# second; the swarm checks once at start-up that the coordinator's model accepts it.
HEARTBEAT = (
    '{"v":1,"type":"heartbeat","agent_id":"%s","seq":%d,"ts":%.3f,"cpu_percent":%.1f,'
    '"memory_available":2000000000,"running":%d,"queued":%d,"slots":1,"completed":%d,'
    '"active":%s}'
)


class Swarm:
    """Many simulated agents behind one MQTT connection; driven through a pipe."""

    def __init__(self, address: BrokerAddress, root: str, setup: ScaleSetup) -> None:
        self.topics = Topics(root)
        self.setup = setup
        self.agents: dict[str, SimAgent] = {}
        self.capabilities: dict[int, Capabilities] = {}
        for speed in SPEEDS:
            one = setup.service_ms * max(SPEEDS) / speed  # ms for a one-sample microtask
            per = one / 16
            cost = [(1, one), (256, one - per + 256 * per)]
            self.capabilities[speed] = Capabilities(
                hostname="swarm",
                arch="x86_64",
                platform="simulated",
                cpu_count=4,
                memory_total=4 * 2**30,
                memory_available=2 * 2**30,
                onnxruntime="simulated",
                providers=["CPUExecutionProvider"],
                slots=1,
                labels={"speed": f"{speed}x"},
                models=[_model_info(cost)],
                encodings=["json", "binary"],
            )
        for i in range(setup.agents):
            speed = SPEEDS[i % len(SPEEDS)]
            (_, one), (_, big) = self.capabilities[speed].models[0].cost
            per = (big - one) / 255
            agent_id = f"sim{i:05d}"
            hb_topic = self.topics.heartbeat(agent_id)
            self.agents[agent_id] = SimAgent(agent_id, new_seq(), hb_topic, one - per, per)
        self.speed = {a: SPEEDS[i % len(SPEEDS)] for i, a in enumerate(self.agents)}
        self.order = list(self.agents.values())
        self.link = Link(
            address=address,
            client_id=f"swarm-{uuid.uuid4().hex[:8]}",
            subscriptions=[(self.topics.all_agents("tasks"), 1)],
            on_message=self._on_message,
        )
        self.interval_s = REALISTIC_HEARTBEAT_S
        self.markers = False
        self.sent = 0
        self.markers_sent = 0
        self.received: Counter[str] = Counter()  # microtasks received, by job
        self.results_sent = 0
        self.cancels = 0
        self.malformed = 0
        self.last_error = ""
        self._outputs: dict[tuple[int, Encoding], dict[str, Any]] = {}
        self._barrier: tuple[str, asyncio.Future[float]] | None = None
        self._loop = asyncio.get_running_loop()

    # -- births and heartbeats -------------------------------------------------------------------
    def publish_births(self) -> None:
        now = time.time()
        for a in self.order:
            birth = AgentState(
                agent_id=a.agent_id,
                online=True,
                seq=a.seq,
                ts=now,
                capabilities=self.capabilities[self.speed[a.agent_id]],
            )
            self.link.publish_nowait(
                self.topics.state(a.agent_id), birth.to_json(), qos=1, retain=True
            )

    def heartbeat(self, a: SimAgent, agent_id: str | None = None) -> bytes:
        active = json.dumps([list(k) for k in a.held], separators=(",", ":")) if a.held else "[]"
        running = int(a.running is not None)
        return (
            HEARTBEAT
            % (
                agent_id or a.agent_id,
                a.seq,
                time.time(),
                10.0 + 80.0 * running,
                running,
                len(a.queue),
                a.completed,
                active,
            )
        ).encode()

    async def heartbeats(self) -> None:
        """Every agent's heartbeat once per ``interval_s``, spread evenly over ticks."""
        n = len(self.order)
        i = 0
        carry = 0.0
        last = time.monotonic()
        ghost = SimAgent("ghost", 1, "", 0.0, 0.0)
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            carry = min(carry + n * (now - last) / self.interval_s, float(n))
            last = now
            if not self.link.connected.is_set():
                continue
            for _ in range(int(carry)):
                a = self.order[i % n]
                self.link.publish_nowait(a.hb_topic, self.heartbeat(a), qos=0)
                i += 1
                self.sent += 1
                if self.markers and self.sent % MARKER_EVERY == 0:
                    gid = f"ghost{self.markers_sent % GHOSTS}"
                    self.link.publish_nowait(
                        self.topics.heartbeat(gid), self.heartbeat(ghost, gid), qos=0
                    )
                    self.markers_sent += 1
            carry -= int(carry)

    async def phase(
        self, interval_s: float, seconds: float, on_sent: Callable[[], None]
    ) -> dict[str, float]:
        """Heartbeats every ``interval_s`` for ``seconds`` (with markers), then a barrier.

        The phase ends when the last heartbeat has left this process (paho's queue is
        empty), so "sent" is what really went out; ``on_sent`` is called then."""
        sent0 = self.sent
        self.markers_sent = 0
        self.interval_s, self.markers = interval_s, True
        t0 = time.monotonic()
        await asyncio.sleep(seconds)
        self.interval_s, self.markers = REALISTIC_HEARTBEAT_S, False
        sent, markers = self.sent - sent0, self.markers_sent
        t_queued = time.monotonic()
        await self.written(timeout=60.0)
        t_written = time.monotonic()
        on_sent()
        seen = await self.barrier()
        return {
            "seconds": t_written - t0,
            "sent": sent,
            "markers_sent": markers,
            "swarm_behind_s": t_written - t_queued,
            "drained_s": seen - t_written,
        }

    async def written(self, timeout: float) -> None:
        """Wait until paho has handed every queued message to the socket."""
        paho = self.link.client._client  # aiomqtt's paho client, as protocol.transport uses it
        deadline = time.monotonic() + timeout
        while paho.want_write():
            if time.monotonic() > deadline:
                raise TimeoutError(f"messages still queued after {timeout:.0f} s")
            await asyncio.sleep(0.001)

    async def barrier(self, timeout: float = 300.0) -> float:
        """Submit a one-sample job on this connection; when its microtask reaches an agent
        here, the coordinator has read every message sent before it."""
        job_id = f"barrier-{uuid.uuid4().hex[:8]}"
        fut: asyncio.Future[float] = self._loop.create_future()
        self._barrier = (job_id, fut)
        spec = InferenceJob(
            job_id=job_id,
            model=MODEL,
            inputs=encode_arrays({"input": np.zeros((1, 64), np.float32)}),
            batch_size=1,
        )
        self.link.publish_nowait(self.topics.submit, spec.to_json(), qos=1)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._barrier = None

    # -- microtasks -------------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            agent_id, _ = self.topics.parse_agent(topic)
            msg = parse_task(payload)
        except ProtocolError as e:
            self.malformed += 1
            self.last_error = str(e)
            return
        a = self.agents.get(agent_id)
        if a is None:
            return
        if isinstance(msg, CancelTask):
            self.cancels += 1
            a.held.pop((msg.task_id, msg.attempt), None)
            a.queue = deque(e for e in a.queue if e[0].task_id != msg.task_id)
            return
        self.received[msg.job_id] += 1
        if self._barrier is not None and msg.job_id == self._barrier[0]:
            fut = self._barrier[1]
            if not fut.done():
                fut.set_result(time.monotonic())
        a.held[(msg.task_id, msg.attempt)] = None
        a.queue.append((msg, "binary" if is_binary(payload) else "json", time.monotonic()))
        if a.running is None:
            self._start(a)

    def _start(self, a: SimAgent) -> None:
        while a.queue:
            task, encoding, received = a.queue.popleft()
            if (task.task_id, task.attempt) not in a.held:
                continue  # cancelled while queued
            a.running = task
            samples = next(iter(task.inputs.values())).shape[0]
            ms = a.service_ms(samples)
            queued_ms = (time.monotonic() - received) * 1000
            self._loop.call_later(
                ms / 1000, self._finish, a, task, encoding, (samples, ms, queued_ms)
            )
            return

    def _finish(
        self, a: SimAgent, task: RunTask, encoding: Encoding, timing: tuple[int, float, float]
    ) -> None:
        samples, ms, queued_ms = timing
        a.running = None
        key = (task.task_id, task.attempt)
        if key in a.held:  # not cancelled meanwhile
            del a.held[key]
            outputs = self._outputs.get((samples, encoding))
            if outputs is None:
                outputs = encode_arrays(
                    {
                        "label": np.zeros(samples, np.int64),
                        "probabilities": np.full((samples, 10), 0.1, np.float32),
                    }
                )
                self._outputs[(samples, encoding)] = outputs
            result = TaskResult.model_construct(
                task_id=task.task_id,
                job_id=task.job_id,
                attempt=task.attempt,
                agent_id=a.agent_id,
                ok=True,
                outputs=outputs,
                queued_ms=queued_ms,
                exec_ms=ms,
            )
            self.link.publish_nowait(
                self.topics.results(a.agent_id), encode(result, encoding), qos=1
            )
            self.results_sent += 1
            a.completed += 1
        self._start(a)

    def stats(self) -> dict[str, Any]:
        return {
            "received": dict(self.received),
            "results_sent": self.results_sent,
            "cancels": self.cancels,
            "malformed": self.malformed,
            "last_error": self.last_error,
        }


def _check_messages(swarm: Swarm) -> None:
    """The hand-rendered heartbeat is what the coordinator's model accepts."""
    a = swarm.order[0]
    a.held[("job.1", 1)] = None
    hb = decode(Heartbeat, swarm.heartbeat(a))
    assert hb.agent_id == a.agent_id and hb.active == [("job.1", 1)], hb
    a.held.clear()


async def _swarm_main(conn: Connection, url: str, root: str, setup: ScaleSetup) -> None:
    swarm = Swarm(BrokerAddress.parse(url), root, setup)
    _check_messages(swarm)
    link = asyncio.create_task(swarm.link.run())
    await asyncio.wait_for(swarm.link.connected.wait(), 30)
    t_births = time.monotonic()
    swarm.publish_births()
    beats = asyncio.create_task(swarm.heartbeats())
    conn.send(("ready", {"births_at": t_births}))
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop.add_reader(conn.fileno(), lambda: commands.put_nowait(conn.recv()))
    try:
        while True:
            cmd = await commands.get()
            if cmd[0] == "phase":
                result = await swarm.phase(cmd[1], cmd[2], lambda: conn.send(("sent", {})))
                conn.send(("phase", result))
            elif cmd[0] == "stats":
                conn.send(("stats", swarm.stats()))
            else:
                break
    finally:
        loop.remove_reader(conn.fileno())
        await cancel_and_wait([beats, link])


def swarm_process(conn: Connection, url: str, root: str, setup: ScaleSetup) -> None:
    """Entry point of the swarm's process."""
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_swarm_main(conn, url, root, setup))


class SwarmHandle:
    """The swarm's process, seen from the orchestrator."""

    def __init__(self, address: BrokerAddress, root: str, setup: ScaleSetup) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=swarm_process, args=(child, address.url, root, setup), daemon=True
        )
        self.proc.start()
        self.ps = psutil.Process(self.proc.pid)

    async def call(self, *cmd: Any, timeout: float = 600.0) -> Any:
        if cmd:
            self.conn.send(cmd)
        ready = await asyncio.to_thread(self.conn.poll, timeout)
        if not ready:
            raise TimeoutError(f"the swarm did not answer {cmd or 'start-up'}")
        _, reply = self.conn.recv()
        return reply

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(("stop",))
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


# -- the orchestrator --------------------------------------------------------------------------


class CpuMeter:
    """CPU % of one core used by processes over a window (psutil)."""

    def __init__(self, *procs: psutil.Process | None) -> None:
        self.procs = procs
        self.t0 = time.monotonic()
        self.c0 = [self._cpu(p) for p in procs]

    @staticmethod
    def _cpu(p: psutil.Process | None) -> float:
        if p is None:
            return 0.0
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            return float(t.user + t.system)
        return 0.0

    def percent(self) -> list[float]:
        wall = time.monotonic() - self.t0
        return [100.0 * (self._cpu(p) - c) / wall for p, c in zip(self.procs, self.c0, strict=True)]


MARKER_KEY = "rejected_heartbeat_unknown_agent"  # how the coordinator counts a marker


async def _markers(client: OffloadClient, expected: int | None = None) -> int:
    """The coordinator's count of marker heartbeats, from its retained state (published
    at most once a second): the first reading, or once it reaches ``expected`` (at most
    5 s)."""
    deadline = time.monotonic() + 5.0
    while True:
        with contextlib.suppress(JobError):
            count = (await client.coordinator_state(timeout=2)).counts.get(MARKER_KEY, 0)
            if expected is None or count >= expected or time.monotonic() > deadline:
                return count
        await asyncio.sleep(0.25)


async def _wait_registered(
    client: OffloadClient, coordinator: subprocess.Popen[bytes], log: Path, n: int, timeout: float
) -> float:
    """When (monotonic) the coordinator counted ``n`` agents online."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if coordinator.poll() is not None:
            tail = (await asyncio.to_thread(log.read_text))[-2000:]
            raise RuntimeError(f"the coordinator exited: {tail}")
        with contextlib.suppress(JobError):
            state = await client.coordinator_state(timeout=2)
            if state.online and state.agents_online >= n:
                return time.monotonic()
        await asyncio.sleep(0.2)
    raise TimeoutError(f"the coordinator did not count {n} agents online in {timeout:.0f} s")


# Frames on (nearly) every stack of the coordinator: the event loop and the entry point.
GENERIC_FRAMES = ("<frozen runpy>", "asyncio/", "selectors.py", "coordinator/cli.py", "aiomqtt/")


class Profiler:
    """py-spy sampling the coordinator while the job runs (``--profile DIR``)."""

    @classmethod
    def maybe(
        cls, directory: Path | None, pid: int, label: str, setup: ScaleSetup
    ) -> Profiler | None:
        if directory is None:
            return None
        name = f"coordinator-{setup.agents}-{label.replace(' ', '-')}.txt"
        seconds = setup.dispatch_budget_s if label == "dispatch" else setup.phase_s
        return cls(pid, directory / name, seconds)

    def __init__(self, pid: int, out: Path, seconds: float) -> None:
        self.out = out
        exe = shutil.which("py-spy")
        self.proc = None
        if exe is None:
            print("py-spy is not installed (pip install py-spy): no profile", file=sys.stderr)
            return
        cmd = [exe, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200", "--nonblocking"]
        self.proc = subprocess.Popen(
            [*cmd, "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    def top(self, n: int = 12) -> list[tuple[float, str]]:
        """The functions most often on the stack, as a share of the samples in which the
        coordinator was busy (py-spy leaves out the idle ones)."""
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the phase is over: py-spy writes out
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(30)
        if not self.out.exists():
            return []
        inclusive: Counter[str] = Counter()
        total = 0
        for line in self.out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            total += int(count)
            for frame in set(stack.split(";")):
                if not any(f in frame for f in GENERIC_FRAMES):
                    inclusive[frame] += int(count)
        return [(c / total, f) for f, c in inclusive.most_common(n)] if total else []


def start_coordinator(address: BrokerAddress, root: str, log: Path) -> subprocess.Popen[bytes]:
    """``edge-offload coordinator`` with its defaults, logging warnings to ``log``."""
    cmd = [sys.executable, "-m", "coordinator.cli", "--log-level", "WARNING", "coordinator"]
    with open(log, "wb") as f:
        return subprocess.Popen(
            [*cmd, "--broker", address.url, "--root", root],
            stdout=f,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )


async def run_scale(
    setup: ScaleSetup, broker: LocalBroker, workdir: Path, profile: Path | None = None
) -> ScaleRun:
    address = BrokerAddress(host=broker.info.host, port=broker.info.port)
    root = f"scale/{uuid.uuid4().hex[:8]}"
    run = ScaleRun(agents=setup.agents)
    log = workdir / f"coordinator-{setup.agents}.log"
    coordinator = await asyncio.to_thread(start_coordinator, address, root, log)
    cps = psutil.Process(coordinator.pid)
    bps = psutil.Process(broker.pid) if broker.pid else None
    swarm: SwarmHandle | None = None
    try:
        async with OffloadClient(address, root=root) as client:
            await _wait_registered(client, coordinator, log, 0, 60)
            swarm = SwarmHandle(address, root, setup)
            births_at = (await swarm.call(timeout=120))["births_at"]
            registered = await _wait_registered(client, coordinator, log, setup.agents, 300)
            run.register_s = registered - births_at
            run.registered = (await client.coordinator_state(timeout=5)).agents_online
            run.rss_idle = cps.memory_info().rss
            for interval in (REALISTIC_HEARTBEAT_S, setup.stress_heartbeat_s):
                before = await _markers(client)
                label = f"heartbeats every {interval:g} s"
                profiler = Profiler.maybe(profile, cps.pid, label, setup)
                meter = CpuMeter(cps, swarm.ps, bps)
                await swarm.call("phase", interval, setup.phase_s)  # the last one is out
                cpu = meter.percent()
                drain = CpuMeter(cps)
                phase = HeartbeatPhase(interval_s=interval, **(await swarm.call()))
                phase.coordinator_cpu, phase.swarm_cpu, phase.broker_cpu = cpu
                (phase.coordinator_drain_cpu,) = drain.percent()
                phase.coordinator_rss = cps.memory_info().rss
                counted = await _markers(client, before + phase.markers_sent)
                phase.markers_counted = counted - before
                run.phases.append(phase)
                if profiler is not None:
                    run.profiles[label] = profiler.top()
            await dispatch(run, setup, client, swarm, cps, bps, profile)
    finally:
        coordinator.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            coordinator.wait(20)
        if coordinator.poll() is None:
            coordinator.kill()
            coordinator.wait(5)
        if swarm is not None:
            swarm.stop()
    return run


async def dispatch(
    run: ScaleRun,
    setup: ScaleSetup,
    client: OffloadClient,
    swarm: SwarmHandle,
    cps: psutil.Process,
    bps: psutil.Process | None,
    profile: Path | None,
) -> None:
    """One job of single-sample microtasks over the whole fleet."""
    run.microtasks = setup.microtasks
    x = np.zeros((setup.microtasks, 64), np.float32)
    before = (await swarm.call("stats"))["received"]
    profiler = Profiler.maybe(profile, cps.pid, "dispatch", setup)
    meter = CpuMeter(cps, swarm.ps, bps)
    t0 = time.monotonic()
    handle = await client.submit(MODEL, x, batch_size=1)
    try:
        out = await handle.result(timeout=setup.dispatch_budget_s)
    except TimeoutError:
        run.dispatch_s = time.monotonic() - t0
    except JobError as e:  # reported in the table, not raised: the other rows still count
        run.dispatch_s = time.monotonic() - t0
        run.error = str(e)
    else:
        run.finished = True
        run.dispatch_s = out.result.elapsed_s
        run.accepted = sum(s.tasks for s in out.result.per_agent.values())
        run.agents_used = len(out.result.per_agent)
        run.retries = out.result.retries
    run.dispatch_cpu, run.dispatch_swarm_cpu, run.dispatch_broker_cpu = meter.percent()
    run.dispatch_rss = cps.memory_info().rss
    stats = await swarm.call("stats")
    run.received = stats["received"].get(handle.job_id, 0) - before.get(handle.job_id, 0)
    run.results_sent = stats["results_sent"]
    if profiler is not None:
        run.profiles["dispatch"] = profiler.top()


# -- the table ----------------------------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _catching_up(p: HeartbeatPhase) -> str:
    # psutil's CPU times tick every 10 ms: a shorter window says nothing
    return f"{p.coordinator_drain_cpu:.0f} %" if p.drained_s >= 0.5 else "-"


def rows(runs: list[ScaleRun]) -> list[tuple[str, str]]:
    """(measurement, figure) rows for the suite's table."""
    out = []
    for r in runs:
        n = f"{r.agents:,} agents"
        out.append(
            (
                f"scale {n}: scheduling decisions/s",
                f"**{r.decisions_per_s:,.0f}/s** ({r.microtasks:,} single-sample microtasks"
                f"{'' if r.finished else ', failed' if r.error else ', unfinished in the budget'}"
                "), coordinator CPU "
                f"{r.dispatch_cpu:.0f} %, RSS {_mib(r.dispatch_rss)}",
            )
        )
        for p in r.phases:
            out.append(
                (
                    f"scale {n}: heartbeats every {p.interval_s:g} s",
                    f"offered {p.offered:,.0f}/s, absorbed **{p.absorbed:,.0f}/s** (lag "
                    f"{p.drained_s:.2f} s, markers {p.markers_counted}/{p.markers_sent}), "
                    f"coordinator CPU {p.coordinator_cpu:.0f} %, RSS {_mib(p.coordinator_rss)}",
                )
            )
    return out


def format_runs(runs: list[ScaleRun]) -> str:
    lines = [
        f"fleet-scale simulation: the real coordinator process, simulated agents in one swarm "
        f"process, Mosquitto; {os.cpu_count()} cores (CPU % is of one core)",
        "",
        "| agents | registered | in | idle RSS | heartbeats every | offered | absorbed | lag "
        "| markers counted | coordinator CPU (catching up) | RSS | swarm CPU (behind) "
        "| broker CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for p in r.phases:
            lines.append(
                f"| {r.agents:,} | {r.registered:,} | {r.register_s:.1f} s | {_mib(r.rss_idle)} "
                f"| {p.interval_s:g} s | {p.offered:,.0f}/s | {p.absorbed:,.0f}/s "
                f"| {p.drained_s:.2f} s | {p.markers_counted}/{p.markers_sent} "
                f"| {p.coordinator_cpu:.0f} % ({_catching_up(p)}) "
                f"| {_mib(p.coordinator_rss)} | {p.swarm_cpu:.0f} % ({p.swarm_behind_s:.2f} s) "
                f"| {p.broker_cpu:.0f} % |"
            )
    lines += [
        "",
        "| agents | microtasks | finished | time | decisions/s | received | accepted "
        "| agents used | retries | coordinator CPU | RSS | swarm CPU | broker CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r.agents:,} | {r.microtasks:,} "
            f"| {'yes' if r.finished else 'failed' if r.error else 'no'} "
            f"| {r.dispatch_s:.1f} s | {r.decisions_per_s:,.0f} | {r.received:,} "
            f"| {r.accepted:,} | {r.agents_used:,} | {r.retries} | {r.dispatch_cpu:.0f} % "
            f"| {_mib(r.dispatch_rss)} | {r.dispatch_swarm_cpu:.0f} % "
            f"| {r.dispatch_broker_cpu:.0f} % |"
        )
    lines += [f"\n{r.agents:,} agents: the job failed: {r.error}" for r in runs if r.error]
    for r in runs:
        for label, top in r.profiles.items():
            lines.append(
                f"\ncoordinator profile, {r.agents:,} agents, {label} "
                "(share of the busy samples with the function on the stack):"
            )
            lines += [f"  {share:6.1%}  {frame}" for share, frame in top]
    return "\n".join(lines)


async def run_all_scales(
    setups: list[ScaleSetup], workdir: Path, profile: Path | None = None
) -> list[ScaleRun]:
    runs = []
    with LocalBroker(kind="mosquitto") as broker:
        for setup in setups:
            runs.append(await run_scale(setup, broker, workdir, profile))
    return runs


def setups(agents: list[int], *, quick: bool) -> list[ScaleSetup]:
    """One per fleet size: the same job at every size (a placement decision costs
    O(log N) in the fleet's size, coordinator.placement)."""
    out = []
    for n in agents:
        s = ScaleSetup(agents=n)
        if quick:
            s = replace(s, phase_s=4.0, microtasks=s.microtasks // 4, dispatch_budget_s=60.0)
        out.append(s)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 s phases, 5,000 microtasks")
    parser.add_argument("--agents", type=int, action="append", help="fleet size (repeatable)")
    parser.add_argument("--profile", type=Path, help="py-spy the coordinator into this directory")
    parser.add_argument("--keep", type=Path, help="keep the coordinators' logs here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("mqtt").setLevel(logging.CRITICAL)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fleet-scale-") as tmp:
        workdir = args.keep or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        todo = setups(args.agents or list(SCALES), quick=args.quick)
        runs = asyncio.run(run_all_scales(todo, workdir, args.profile))
    print(format_runs(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
