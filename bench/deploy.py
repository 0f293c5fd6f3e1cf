"""Model deployment: how long sending a 10 MB and a 50 MB model to an agent takes through
Mosquitto, and what counting that time in placement does to a job's makespan.

Everything is real: Mosquitto on 127.0.0.1, ``edge-offload agent`` processes, the
coordinator in this process (``Coordinator``, its model catalog in a temporary
directory), and ONNX models built here with ``onnx.helper``: ``x`` float32 [N, 256] ->
MatMul [256, H] -> Relu -> MatMul [H, 256], the pair repeated to reach the size, and the
whole stack run several times over (same weights) so that every model costs about the same
per sample, whatever its size. Weights are random normal floats (numpy seed 0): nothing
for a compressor to find but the exponent bits.

1. **Deployment time.** One agent (1 slot, an empty model cache) and, per model size, a
   few new versions of the model registered one after the other (the same weights, a
   different ``doc_string``: a different file that moves whole). A one-microtask job on
   each version makes the coordinator send it: measured are offer -> file on the agent's
   disk (complete, verified and renamed into its cache directory, which this process
   watches), offer -> installed (then loaded and self-benchmarked: ``Deployer.durations``)
   and job submitted -> result. Baseline, same run, same broker: the same bytes as ONE
   MQTT message (QoS 1) from one aiomqtt client to another (TCP_NODELAY), publish ->
   receipt.
2. **Makespan with and without download-aware placement.** Three agents of one slot: a1
   and a2 have the large model in their models directory; a3 lacks it and reaches
   Mosquitto through a relay limited to the rate at which the model takes ``download_s``
   to arrive (``bench/netfault.DelayRelay``). A warm-up job (digits, inputs of 128 KiB per
   microtask, round robin so that every link carries some) lets the coordinator measure
   each agent's link; then a job on the large model of ``job_compute_s`` of a1 + a2's
   self-benchmarked compute. Run with ``download_aware=True`` and with
   ``download_aware=False``, each time with a fresh coordinator and a3 restarted with an
   empty cache, ``rounds`` times (alternating which goes first).

Usage: python bench/deploy.py [--quick] [--part time|makespan] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(REPO))

import aiomqtt  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from bench import bench_core  # noqa: E402
from bench.netfault import DelayRelay, RelayThread  # noqa: E402
from coordinator import Coordinator, CoordinatorConfig  # noqa: E402
from coordinator.broker import LocalBroker  # noqa: E402
from coordinator.catalog import Catalog  # noqa: E402
from coordinator.deployer import Deployer, Transfer  # noqa: E402
from protocol import BrokerAddress  # noqa: E402
from protocol.transport import connect_options  # noqa: E402

MB = 1_000_000
WIDTH = 256  # the models' input and output width
ZOO = REPO / "models"
DIGITS_MODEL = "digits-mlp"
# Work per sample of every model: its layer stack is run over in as many passes as it takes,
# so the 10 MB and the 50 MB model cost about the same per sample (~0.5 ms on this
# machine's cores). A 10 MB model run once would take 1 KiB of input per 0.05 ms of
# compute: a job long enough to measure would be mostly input to move.
MFLOP_PER_SAMPLE = 50.0
# The warm-up microtasks carry 512 digits (128 KiB of inputs): the coordinator learns a
# link's bandwidth only from microtasks moving >= 64 KiB (coordinator.service).
WARMUP_BATCH = 512


@dataclass(frozen=True)
class Setup:
    sizes_mb: tuple[int, ...] = (10, 50)
    reps: int = 5  # versions deployed per size
    makespan_mb: int = 50  # the model of the makespan part
    download_s: float = 20.0  # a3's link rate: the makespan model arrives in this long
    # The makespan job's work: this long on a1 + a2 at the speed they self-benchmarked
    # alone. They share two cores with the coordinator, Mosquitto and the relay, so the
    # job takes 1.2-2.2 times as long (6-8 s here).
    job_compute_s: float = 3.5
    rounds: int = 3  # each round runs the job download-aware and naive
    warmup_tasks_per_agent: int = 20
    timeout_s: float = 300.0

    @property
    def rate_bytes_per_s(self) -> float:
        return self.makespan_mb * MB / self.download_s


FULL = Setup()
QUICK = Setup(reps=3, makespan_mb=10, download_s=8.0, job_compute_s=2.0, rounds=1)


# -- models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DenseModel:
    """A generated model: ``pairs`` (MatMul, Relu, MatMul) of hidden width ``hidden``,
    the stack run ``passes`` times."""

    path: Path
    size: int
    pairs: int
    hidden: int
    passes: int

    @property
    def model_id(self) -> str:
        return self.path.stem.replace("_", "-")

    def describe(self) -> str:
        return (
            f"{self.size / MB:.0f} MB: {self.pairs} x (MatMul {WIDTH}x{self.hidden}, Relu, "
            f"MatMul {self.hidden}x{WIDTH}), {self.passes} pass(es)"
        )


def build_model(size_mb: int, directory: Path, *, seed: int = 0) -> tuple[DenseModel, Any]:
    """Write ``dense_{size_mb}mb.onnx`` of about ``size_mb`` MB; returns it and its proto."""
    target = size_mb * MB
    pair_bytes = 2 * WIDTH * 4  # per unit of hidden width: two float32 matrices
    # Pairs of about 8 MB (hidden width ~4,096): a 50 MB model is a stack of layers, as real
    # ones are, not one very wide layer.
    pairs = max(1, round(target / (pair_bytes * 4096)))
    hidden = max(1, round(target / (pair_bytes * pairs)))
    params = pairs * 2 * WIDTH * hidden
    passes = max(1, round(MFLOP_PER_SAMPLE * 1e6 / (2 * params)))
    rng = np.random.default_rng(seed)
    weights, nodes = [], []
    for i in range(pairs):
        # He-style scales keep the activations' variance ~1 through any number of layers.
        w1 = rng.standard_normal((WIDTH, hidden), dtype=np.float32) * np.float32(WIDTH**-0.5)
        w2 = rng.standard_normal((hidden, WIDTH), dtype=np.float32) * np.float32(
            (2 / hidden) ** 0.5
        )
        weights += [numpy_helper.from_array(w1, f"w{i}a"), numpy_helper.from_array(w2, f"w{i}b")]
    current, layers = "x", passes * pairs
    for k in range(layers):
        i, out = k % pairs, ("y" if k == layers - 1 else f"z{k}")
        nodes += [
            helper.make_node("MatMul", [current, f"w{i}a"], [f"h{k}"]),
            helper.make_node("Relu", [f"h{k}"], [f"r{k}"]),
            helper.make_node("MatMul", [f"r{k}", f"w{i}b"], [out]),
        ]
        current = out
    graph = helper.make_graph(
        nodes,
        f"dense-{size_mb}mb",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", WIDTH])],
        weights,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(proto)
    path = directory / f"dense_{size_mb}mb.onnx"
    onnx.save(proto, str(path))
    return DenseModel(path, path.stat().st_size, pairs, hidden, passes), proto


def write_version(proto: Any, path: Path, version: int) -> Path:
    """The same model as another file: only its ``doc_string`` differs."""
    proto.doc_string = f"bench/deploy.py version {version}"
    onnx.save(proto, str(path))
    return path


def direct(path: Path, x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y: np.ndarray[Any, Any] = session.run(["y"], {"x": x})[0]
    return y


def inputs(n: int, seed: int = 1) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((n, WIDTH), dtype=np.float32)


# -- processes -------------------------------------------------------------------------------


class Agents:
    """``edge-offload agent`` processes of this benchmark, one slot each, logs in
    ``workdir``; every one is stopped (SIGTERM, SIGKILL after 20 s) by :meth:`stop`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}
        self._starts = 0

    def start(
        self, agent_id: str, url: str, *, cache: Path, models_dirs: tuple[Path, ...] = (ZOO,)
    ) -> None:
        self._starts += 1
        log = self.workdir / f"{agent_id}-{self._starts}.log"
        argv = [sys.executable, "-m", "coordinator.cli", "--log-level", "INFO", "agent"]
        argv += ["--broker", url, "--id", agent_id, "--slots", "1"]
        for d in models_dirs:
            argv += ["--models-dir", str(d)]
        argv += ["--model-cache-dir", str(cache)]
        argv += ["--spool-dir", str(self.workdir / f"{agent_id}-spool")]
        with open(log, "wb") as f:
            self.procs[agent_id] = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, cwd=REPO
            )
        self.logs[agent_id] = log

    def check(self) -> None:
        """Raise if an agent exited, with the end of its log."""
        for agent_id, p in self.procs.items():
            if p.poll() is not None:
                tail = self.logs[agent_id].read_text(errors="replace")[-2000:]
                raise RuntimeError(f"agent {agent_id} exited ({p.returncode}):\n{tail}")

    def stop(self, *agent_ids: str) -> None:
        procs = [(a, self.procs.pop(a)) for a in (agent_ids or list(self.procs))]
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for _, p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


@contextlib.contextmanager
def agent_processes(workdir: Path) -> Iterator[Agents]:
    agents = Agents(workdir)
    try:
        yield agents
    finally:
        agents.stop()


async def wait_for(coord: Coordinator, agents: Agents, ids: tuple[str, ...]) -> None:
    """Until the coordinator knows every agent of ``ids`` online, with its models."""
    deadline = time.monotonic() + 90
    while True:
        known = coord.registry.agents
        if all(a in known and known[a].available and known[a].has_model(DIGITS_MODEL) for a in ids):
            return
        agents.check()
        if time.monotonic() > deadline:
            raise TimeoutError(f"agents {', '.join(ids)} not all online after 90 s")
        await asyncio.sleep(0.05)


def job_id(label: str) -> str:
    """A job id no earlier coordinator of this run used. The in-process SDK numbers jobs
    coordinator-1, -2, ... afresh in every Coordinator, and an agent that outlives one
    drops a microtask id it has already seen (as a QoS 1 duplicate) without an answer: the
    fresh coordinator's microtasks would then wait for their leases to run out."""
    return f"{label}-{uuid.uuid4().hex[:12]}"


def coordinator_config(address: BrokerAddress, catalog: Path, **changes: Any) -> CoordinatorConfig:
    # No persistent session: each run's coordinator starts from nothing on the broker.
    return CoordinatorConfig(
        broker=address, catalog_dir=catalog, persistent_session=False, **changes
    )


# -- watching transfers ----------------------------------------------------------------------


@dataclass
class Seen:
    """One transfer as the coordinator ran it (monotonic times)."""

    agent_id: str
    ref: str
    sha256: str
    size: int
    started: float  # the offer
    # The file complete and verified on the agent: renamed to {cache}/{sha256}.onnx, before
    # it is loaded and self-benchmarked (known for agents whose cache the watch looks at).
    stored_at: float | None = None
    ended_at: float | None = None
    installed_s: float | None = None  # offer -> installed, from Deployer.durations


class TransferWatch:
    """Follows a deployer's transfers, and the model caches of ``caches`` (agent id ->
    directory), every few milliseconds. The deployer records only offer -> installed; the
    agent answers the last chunk only once the model is installed, so when the bytes were
    all there is seen on the agent's disk."""

    def __init__(self, deployer: Deployer, caches: dict[str, Path] | None = None) -> None:
        self.deployer = deployer
        self.caches = caches or {}
        self.seen: dict[int, tuple[Transfer, Seen]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.look(time.monotonic())

    async def _poll(self) -> None:
        while True:
            self.look(time.monotonic())
            await asyncio.sleep(0.002)

    def look(self, now: float) -> None:
        live = {id(t) for t in self.deployer.transfers.values()}
        for t in self.deployer.transfers.values():
            if id(t) not in self.seen:
                e = t.entry
                self.seen[id(t)] = (t, Seen(t.agent_id, e.ref, e.sha256, e.size, t.started))
        for key, (_, s) in self.seen.items():
            cache = self.caches.get(s.agent_id)
            if s.stored_at is None and cache and (cache / f"{s.sha256}.onnx").exists():
                s.stored_at = now
            if s.ended_at is None and key not in live:
                s.ended_at = now
                s.installed_s = next(
                    (
                        d
                        for a, ref, _, d in reversed(self.deployer.durations)
                        if a == s.agent_id and ref == s.ref
                    ),
                    None,
                )

    def transfers(self, agent_id: str | None = None) -> list[Seen]:
        found = [s for _, s in self.seen.values()]
        return [s for s in found if agent_id is None or s.agent_id == agent_id]

    async def idle(self, timeout: float) -> bool:
        """Wait until no transfer is under way; False if one still is after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.deployer.transfers:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True


# -- part 1: deployment time -----------------------------------------------------------------


@dataclass
class SizeRun:
    size_mb: int
    model: DenseModel
    raw_s: list[float] = field(default_factory=list)
    stored_s: list[float] = field(default_factory=list)
    installed_s: list[float] = field(default_factory=list)
    first_result_s: list[float] = field(default_factory=list)
    correct: bool = True

    @staticmethod
    def median(values: list[float]) -> float:
        return statistics.median(values) if values else math.nan

    def rate(self, values: list[float]) -> float:
        """MB/s over the median time."""
        return self.model.size / MB / self.median(values)


@dataclass
class TimeRun:
    chunk_bytes: int
    window: int
    sizes: list[SizeRun] = field(default_factory=list)


async def raw_publish_times(address: BrokerAddress, payload: bytes, reps: int) -> list[float]:
    """Publish -> receipt of ``payload`` as one QoS 1 message between two aiomqtt clients
    (connect_options sets TCP_NODELAY, as every client of the project)."""
    topic = "bench/deploy/raw"
    times = []
    sub_opts = connect_options(address, identifier=f"deploy-raw-sub-{os.getpid()}", timeout=120)
    pub_opts = connect_options(address, identifier=f"deploy-raw-pub-{os.getpid()}", timeout=120)
    async with aiomqtt.Client(**sub_opts) as sub, aiomqtt.Client(**pub_opts) as pub:
        await sub.subscribe(topic, qos=1)
        received = aiter(sub.messages)
        for _ in range(reps):
            t0 = time.perf_counter()
            publishing = asyncio.create_task(pub.publish(topic, payload, qos=1))
            message = await asyncio.wait_for(anext(received), 120)
            times.append(time.perf_counter() - t0)
            await publishing
            if not isinstance(message.payload, bytes) or len(message.payload) != len(payload):
                raise RuntimeError("the raw message arrived incomplete")
    return times


async def deploy_version(
    coord: Coordinator, watch: TransferWatch, r: SizeRun, path: Path, version: int
) -> None:
    """Register ``path`` as a new version of ``r``'s model and run a one-microtask job on it
    (the agent lacks that file: the coordinator sends it first); record the times."""
    assert coord.catalog is not None
    entry = coord.catalog.add(path, model_id=r.model.model_id, version=str(version))
    x = inputs(8)
    t0 = time.monotonic()
    out = await coord.run(
        r.model.model_id, {"x": x}, batch_size=len(x), timeout=300, job_id=job_id("deploy")
    )
    r.first_result_s.append(time.monotonic() - t0)
    r.correct &= bool(np.allclose(out["y"], direct(path, x), rtol=1e-4, atol=1e-4))
    await watch.idle(30)  # the "installed" answer and the result travel together
    watch.look(time.monotonic())
    done = [s for s in watch.transfers() if s.ref == entry.ref]
    if len(done) != 1 or done[0].installed_s is None or done[0].stored_at is None:
        raise RuntimeError(f"{entry.ref} was not deployed exactly once: {done}")
    r.installed_s.append(done[0].installed_s)
    r.stored_s.append(done[0].stored_at - done[0].started)


async def deployment_times(
    setup: Setup, address: BrokerAddress, workdir: Path, models: dict[int, tuple[DenseModel, Any]]
) -> TimeRun:
    catalog = workdir / "catalog-time"
    config = coordinator_config(address, catalog)
    run = TimeRun(chunk_bytes=config.deploy_chunk_bytes, window=config.deploy_window)
    for size_mb in setup.sizes_mb:
        model, _ = models[size_mb]
        r = SizeRun(size_mb, model)
        r.raw_s = await raw_publish_times(address, model.path.read_bytes(), max(setup.reps, 3))
        run.sizes.append(r)
    with agent_processes(workdir) as agents:
        cache = workdir / "d1-cache"
        agents.start("d1", address.url, cache=cache)
        async with Coordinator(config) as coord:
            assert coord.deployer is not None
            await wait_for(coord, agents, ("d1",))
            watch = TransferWatch(coord.deployer, {"d1": cache})
            watch.start()
            for r in run.sizes:
                _, proto = models[r.size_mb]
                for version in range(1, setup.reps + 1):
                    path = write_version(proto, workdir / f"{r.model.path.stem}-v.onnx", version)
                    await deploy_version(coord, watch, r, path, version)
            await watch.stop()
    return run


# -- part 2: makespan ------------------------------------------------------------------------


@dataclass
class MakespanRun:
    download_aware: bool
    round: int = 1
    samples: int = 0
    tasks: int = 0
    batch_size: int = 0
    makespan_s: float = 0.0
    end_to_end_s: float = 0.0
    per_agent: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    copies: int = 0  # straggler copies (speculated)
    link_mb_s: dict[str, float] = field(default_factory=dict)  # what the coordinator learned
    a3_transfers: list[Seen] = field(default_factory=list)
    # Of a transfer to a3 still under way when the job ended: the part written on a3.
    a3_sent_at_end: float | None = None
    submitted_at: float = 0.0
    correct: bool = False

    @property
    def label(self) -> str:
        return "download-aware" if self.download_aware else "naive"

    def a3_model(self) -> str:
        """Whether and when a3 got the model, relative to the job's submission."""
        if not self.a3_transfers:
            return "never sent"
        parts = []
        for s in self.a3_transfers:
            start = s.started - self.submitted_at
            if s.installed_s is not None:
                parts.append(
                    f"sent from +{start:.1f} s, installed at +{start + s.installed_s:.1f} s"
                )
            elif self.a3_sent_at_end is not None:
                parts.append(
                    f"sent from +{start:.1f} s, {self.a3_sent_at_end:.0%} there when the job ended"
                )
            else:
                parts.append(f"sent from +{start:.1f} s, not installed")
        return "; ".join(parts)


def digits(n: int) -> np.ndarray[Any, Any]:
    x = bench_core.digits()
    return np.resize(x, (n, x.shape[1]))


async def one_makespan(
    setup: Setup,
    address: BrokerAddress,
    workdir: Path,
    agents: Agents,
    relay: RelayThread,
    model: DenseModel,
    catalog: Path,
    *,
    aware: bool,
    round_: int,
) -> MakespanRun:
    run = MakespanRun(download_aware=aware, round=round_)
    tag = f"{'aware' if aware else 'naive'}-{round_}"
    # a3 afresh: an empty model cache, so it lacks the model whatever the previous run did.
    agents.start("a3", f"mqtt://127.0.0.1:{relay.port}", cache=workdir / f"a3-cache-{tag}")
    config = coordinator_config(address, catalog, download_aware=aware)
    try:
        async with Coordinator(config) as coord:
            assert coord.deployer is not None
            await wait_for(coord, agents, ("a1", "a2", "a3"))
            a3 = coord.registry.agents["a3"]
            if a3.has_model(model.model_id):
                raise RuntimeError("a3 has the model before the run")
            # Warm-up: round robin, so that every link carries enough to be measured.
            n = 3 * setup.warmup_tasks_per_agent * WARMUP_BATCH
            await coord.run(
                DIGITS_MODEL,
                {"input": digits(n)},
                batch_size=WARMUP_BATCH,
                policy="round_robin",
                job_id=job_id("warm-up"),
                timeout=setup.timeout_s,
            )
            for a in ("a1", "a2", "a3"):
                run.link_mb_s[a] = coord.registry.agents[a].bytes_per_ms * 1000 / MB
            # The job: job_compute_s on a1 + a2 at the speed they benchmarked.
            rate = sum(
                1 / coord.registry.agents[a].costs[model.model_id].per_sample_ms
                for a in ("a1", "a2")
            )
            run.samples = max(64, round(setup.job_compute_s * 1000 * rate))
            x = inputs(run.samples, seed=2)
            counts_before = dict(coord.ledger.counts)
            watch = TransferWatch(coord.deployer)
            watch.start()
            run.submitted_at = t0 = time.monotonic()
            out = await coord.run(
                model.model_id, {"x": x}, timeout=setup.timeout_s, job_id=job_id("job")
            )
            run.end_to_end_s = time.monotonic() - t0
            res = out.result
            run.makespan_s, run.tasks, run.batch_size = res.elapsed_s, res.tasks, res.batch_size
            run.retries = res.retries
            run.per_agent = {a: s.tasks for a, s in sorted(res.per_agent.items())}
            run.copies = coord.ledger.counts["speculated"] - counts_before.get("speculated", 0)
            check = slice(0, len(x), max(1, len(x) // 256))
            run.correct = bool(
                np.allclose(out["y"][check], direct(model.path, x[check]), rtol=1e-4, atol=1e-4)
            )
            # A download still under way is not waited for: it no longer matters to the job.
            await watch.stop()
            run.a3_transfers = watch.transfers("a3")
            ongoing = [t for t in coord.deployer.transfers.values() if t.agent_id == "a3"]
            if ongoing:
                run.a3_sent_at_end = ongoing[0].acked / ongoing[0].chunks
    finally:
        await asyncio.to_thread(agents.stop, "a3")
    return run


async def makespans(
    setup: Setup, address: BrokerAddress, workdir: Path, model: DenseModel
) -> list[MakespanRun]:
    local = workdir / "local-models"
    local.mkdir(exist_ok=True)
    shutil.copy(model.path, local / model.path.name)
    catalog = workdir / "catalog-makespan"
    Catalog(catalog).add(model.path, model_id=model.model_id)
    runs = []
    with (
        DelayRelay.start_in_thread(
            listen_host="127.0.0.1",
            target_host=address.host,
            target_port=address.port,
            delay_s=0.0,
            rate_bytes_per_s=setup.rate_bytes_per_s,
        ) as relay,
        agent_processes(workdir) as agents,
    ):
        for a in ("a1", "a2"):
            agents.start(a, address.url, cache=workdir / f"{a}-cache", models_dirs=(ZOO, local))
        for i in range(setup.rounds):
            # Alternate which goes first: this machine's speed drifts over minutes.
            for aware in (True, False) if i % 2 == 0 else (False, True):
                runs.append(
                    await one_makespan(
                        setup,
                        address,
                        workdir,
                        agents,
                        relay,
                        model,
                        catalog,
                        aware=aware,
                        round_=i + 1,
                    )
                )
    return runs


# -- the whole benchmark ---------------------------------------------------------------------


@dataclass
class DeployBench:
    setup: Setup
    models: list[DenseModel]
    time: TimeRun | None = None
    makespan: list[MakespanRun] = field(default_factory=list)
    took_s: float = 0.0


async def run_deploy(
    setup: Setup, workdir: Path, parts: tuple[str, ...] = ("time", "makespan")
) -> DeployBench:
    started = time.monotonic()
    sizes = sorted({*setup.sizes_mb, setup.makespan_mb})
    built = {mb: build_model(mb, workdir) for mb in sizes}
    bench = DeployBench(setup, [built[mb][0] for mb in sizes])
    with LocalBroker(kind="mosquitto") as broker:
        address = BrokerAddress(host=broker.info.host, port=broker.info.port)
        if "time" in parts:
            bench.time = await deployment_times(setup, address, workdir, built)
        if "makespan" in parts:
            model = built[setup.makespan_mb][0]
            bench.makespan = await makespans(setup, address, workdir, model)
    bench.took_s = time.monotonic() - started
    return bench


# -- the tables ------------------------------------------------------------------------------


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s"


def describe(setup: Setup) -> str:
    return (
        f"a1, a2 have the {setup.makespan_mb} MB model; a3 lacks it behind a "
        f"{setup.rate_bytes_per_s / MB:.2f} MB/s link (download ~{setup.download_s:.0f} s); "
        f"job of {setup.job_compute_s:g} s of a1 + a2's benchmarked compute; "
        f"{setup.rounds} run(s) of each placement"
    )


def medians(runs: list[MakespanRun]) -> dict[str, float]:
    """Median makespan per placement."""
    out: dict[str, list[float]] = {}
    for m in runs:
        out.setdefault(m.label, []).append(m.makespan_s)
    return {label: statistics.median(v) for label, v in out.items()}


def _a3_ran(m: MakespanRun) -> str:
    return f"a3 ran {m.per_agent.get('a3', 0)} of {m.tasks} microtasks"


def rows(bench: DeployBench) -> list[tuple[str, str]]:
    """(measurement, figure) rows for the suite's table."""
    out = []
    if bench.time is not None:
        t = bench.time
        for r in t.sizes:
            raw = SizeRun.median(r.raw_s)
            stored, inst = SizeRun.median(r.stored_s), SizeRun.median(r.installed_s)
            out.append(
                (
                    f"deploy {r.size_mb} MB model to an agent (chunks of {t.chunk_bytes // 1024} "
                    f"KiB, window {t.window}; median of {len(r.installed_s)})",
                    f"on the agent's disk {_s(stored)} ({r.rate(r.stored_s):.0f} MB/s), "
                    f"installed {_s(inst)}; one raw QoS 1 message {_s(raw)} "
                    f"({r.rate(r.raw_s):.0f} MB/s) -> deploy/raw **{stored / raw:.1f}x** "
                    f"(installed/raw {inst / raw:.1f}x)",
                )
            )
    if bench.makespan:
        out.append(("deploy: makespan setup", describe(bench.setup)))
        med = medians(bench.makespan)
        for label in ("download-aware", "naive"):
            mine = [m for m in bench.makespan if m.label == label]
            if not mine:
                continue
            each = "; ".join(
                f"{_s(m.makespan_s)}: {_a3_ran(m)}, {m.copies} copies, its model {m.a3_model()}"
                for m in mine
            )
            out.append(
                (
                    f"deploy: makespan, {label} placement",
                    f"median {_s(med[label])} ({each})",
                )
            )
        if {"download-aware", "naive"} <= med.keys():
            ratio = med["naive"] / med["download-aware"]
            out.append(("deploy: makespan naive / download-aware (medians)", f"**{ratio:.2f}**"))
    return out


def format_time(t: TimeRun) -> str:
    lines = [
        f"deployment time: 1 agent process (1 slot), chunks of {t.chunk_bytes // 1024} KiB, "
        f"window {t.window}; median (min-max) over {len(t.sizes[0].installed_s) if t.sizes else 0} "
        "new versions of each model, MB/s over the median",
        "",
        "| model | raw: 1 QoS 1 message | offer -> file on agent's disk | offer -> installed "
        "| submit -> result | deploy / raw: disk, installed | outputs |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(r: SizeRun, values: list[float]) -> str:
        return (
            f"{_s(SizeRun.median(values))} ({min(values):.2f}-{max(values):.2f}), "
            f"{r.rate(values):.0f} MB/s"
        )

    for r in t.sizes:
        raw = SizeRun.median(r.raw_s)
        stored, inst = SizeRun.median(r.stored_s), SizeRun.median(r.installed_s)
        lines.append(
            f"| {r.model.size / MB:.1f} MB | {cell(r, r.raw_s)} | {cell(r, r.stored_s)} "
            f"| {cell(r, r.installed_s)} | {cell(r, r.first_result_s)} "
            f"| {stored / raw:.1f}x, {inst / raw:.1f}x | {'match' if r.correct else 'DIFFER'} |"
        )
    lines.append(
        "\nfile on agent's disk: complete, fsynced, sha256 verified and renamed into the "
        "cache; installed: then loaded and self-benchmarked by the agent (Deployer.durations)"
    )
    return "\n".join(lines)


def format_makespan(setup: Setup, runs: list[MakespanRun]) -> str:
    lines = [
        f"makespan: {describe(setup)}",
        "",
        "| round | placement | makespan | end to end | samples | microtasks per agent "
        "| retries | copies | a3's model (from job submission) | links learned (MB/s) | outputs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in runs:
        shares = ", ".join(f"{a} {n}" for a, n in m.per_agent.items())
        links = ", ".join(f"{a} {v:.1f}" for a, v in m.link_mb_s.items())
        lines.append(
            f"| {m.round} | {m.label} | {_s(m.makespan_s)} | {_s(m.end_to_end_s)} "
            f"| {m.samples:,} ({m.tasks} of {m.batch_size}) | {shares} | {m.retries} "
            f"| {m.copies} | {m.a3_model()} | {links} | {'match' if m.correct else 'DIFFER'} |"
        )
    med = medians(runs)
    if {"download-aware", "naive"} <= med.keys():
        aware, naive = med["download-aware"], med["naive"]
        lines.append(
            f"\nmedian makespan: download-aware {_s(aware)}, naive {_s(naive)}; "
            f"naive / download-aware = **{naive / aware:.2f}**"
        )
    lines.append(
        f"links learned: the coordinator's bandwidth estimate of each agent's link after the "
        f"warm-up (a3's relay: {setup.rate_bytes_per_s / MB:.2f} MB/s)"
    )
    return "\n".join(lines)


def format_bench(bench: DeployBench) -> str:
    parts = [
        f"edge-offload deployment benchmark: {os.cpu_count()} cores, Mosquitto; models "
        + "; ".join(m.describe() for m in bench.models)
    ]
    if bench.time is not None:
        parts.append(format_time(bench.time))
    if bench.makespan:
        parts.append(format_makespan(bench.setup, bench.makespan))
    parts.append(f"ran {bench.took_s:.0f} s")
    return "\n\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and job (< 60 s)")
    parser.add_argument("--part", action="append", choices=("time", "makespan"))
    parser.add_argument("--reps", type=int, help="versions deployed per model size")
    parser.add_argument("--download-s", type=float, help="a3's download time of the model")
    parser.add_argument("--job-compute-s", type=float, help="the makespan job's work on a1 + a2")
    parser.add_argument("--rounds", type=int, help="makespan runs of each placement")
    parser.add_argument("--keep", type=Path, help="keep models and logs under this directory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("mqtt").setLevel(logging.CRITICAL)
    setup = QUICK if args.quick else FULL
    overrides = {
        "reps": args.reps,
        "rounds": args.rounds,
        "download_s": args.download_s,
        "job_compute_s": args.job_compute_s,
    }
    setup = replace(setup, **{k: v for k, v in overrides.items() if v is not None})
    parts = tuple(args.part or ("time", "makespan"))
    with tempfile.TemporaryDirectory(prefix="deploy-bench-") as tmp:
        # A new directory per run under --keep: catalogs and caches must start empty.
        workdir = args.keep / time.strftime("run-%Y%m%d-%H%M%S") if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        bench = asyncio.run(run_deploy(setup, workdir, parts))
    print(format_bench(bench))
    ok = all(r.correct for r in bench.time.sizes) if bench.time else True
    return 0 if ok and all(m.correct for m in bench.makespan) else 1


if __name__ == "__main__":
    sys.exit(main())
