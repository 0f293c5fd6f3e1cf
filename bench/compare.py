"""Edge-offload against Celery+Redis and Dask: same machine, same run, same workloads.

Each system gets two worker processes with one slot each, running digits-mlp with
onnxruntime (one thread) from a session each worker process loads once
(``bench/compare_workers.py`` for Celery and Dask):

* edge-offload: Mosquitto, a coordinator process, two ``edge-offload agent`` processes
  (``--slots 1``), and ``OffloadClient`` here: client -> coordinator -> agent -> client;
* Celery 5 with Redis as broker and result backend (``redis-server``, no persistence), two
  ``celery worker --pool solo`` processes, pickled numpy arrays; client -> Redis -> worker
  -> Redis -> client;
* Dask distributed: a ``LocalCluster`` of two single-threaded worker processes (the
  scheduler runs in this process, as ``LocalCluster`` does), ``Client.submit``/``map``.

Workloads, the same inputs everywhere:

* **round trip**: one single-sample inference at a time (after 300 warm-ups); p50;
* **trivial tasks**: 10,000 single-sample inferences submitted at once; the inference
  itself takes about 30 us, so this measures each system's per-task overhead; tasks/s;
* **inference**: the 1,797 digits tiled (100 times; 25 with ``--quick``) in tasks of
  2,048 samples; samples/s, best of three; the labels are checked against onnxruntime
  run directly.

The figure printed for each other system is the speed ratio edge-offload / other (above 1:
edge-offload is faster; for the round trip, the other's latency over edge-offload's).
Celery needs ``redis-server`` (``apt-get install redis-server``); ``pip install -e
'.[bench]'`` installs Celery and Dask. A system that is not installed is skipped.

Usage: python bench/compare.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.bench_core import digits, latencies, processes  # noqa: E402
from bench.compare_workers import celery_app, infer  # noqa: E402
from coordinator import OffloadClient  # noqa: E402
from coordinator.broker import LocalBroker, free_port  # noqa: E402
from protocol import BrokerAddress, JobError  # noqa: E402

MODEL = "digits-mlp"
Arrays = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True)
class CompareSetup:
    round_trips: int = 2_000
    trivial: int = 10_000
    tiles: int = 100
    batch: int = 2_048
    timeout_s: float = 600.0


def setup(*, quick: bool) -> CompareSetup:
    return CompareSetup(round_trips=500, tiles=25) if quick else CompareSetup()


@dataclass
class SystemResult:
    name: str
    rt_p50_ms: float = math.nan
    trivial_per_s: float = math.nan
    samples_per_s: float = 0.0
    correct: bool = False
    skipped: str | None = None


@dataclass(frozen=True)
class Workload:
    one: np.ndarray[Any, Any]
    trivial: list[np.ndarray[Any, Any]]
    chunks: list[np.ndarray[Any, Any]]
    labels: np.ndarray[Any, Any]

    @classmethod
    def make(cls, cfg: CompareSetup) -> Workload:
        x = digits()
        big = np.tile(x, (cfg.tiles, 1))
        singles = np.resize(x, (cfg.trivial, x.shape[1]))
        return cls(
            one=x[:1],
            trivial=[singles[i : i + 1] for i in range(cfg.trivial)],
            chunks=[big[i : i + cfg.batch] for i in range(0, len(big), cfg.batch)],
            labels=infer(big)["label"],
        )

    @property
    def samples(self) -> int:
        return sum(len(c) for c in self.chunks)


async def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    if asyncio.iscoroutine(out):
        out = await out
    return time.perf_counter() - t0, out


async def _fill(result: SystemResult, w: Workload, cfg: CompareSetup, api: Any) -> None:
    """The three workloads through ``api`` (one, many, chunks), blocking or async."""
    lat = await latencies(lambda: _await(api.one(w.one)), cfg.round_trips)
    result.rt_p50_ms = float(np.percentile(lat, 50))
    secs, _ = await _timed(lambda: api.many(w.trivial))
    result.trivial_per_s = len(w.trivial) / secs
    for _ in range(3):  # best of three, for every system alike: this machine's speed varies
        secs, labels = await _timed(lambda: api.chunks(w.chunks))
        result.samples_per_s = max(result.samples_per_s, w.samples / secs)
    result.correct = bool(np.array_equal(labels, w.labels))


async def _await(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


# -- edge-offload ---------------------------------------------------------------------------------


class EdgeApi:
    def __init__(self, client: OffloadClient, cfg: CompareSetup) -> None:
        self.client = client
        self.cfg = cfg

    async def one(self, x: np.ndarray[Any, Any]) -> Any:
        return await self.client.run(MODEL, {"input": x}, timeout=10)

    async def many(self, xs: list[np.ndarray[Any, Any]]) -> Any:
        return await self.client.run(
            MODEL, {"input": np.concatenate(xs)}, batch_size=1, timeout=self.cfg.timeout_s
        )

    async def chunks(self, xs: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        out = await self.client.run(
            MODEL,
            {"input": np.concatenate(xs)},
            batch_size=len(xs[0]),
            timeout=self.cfg.timeout_s,
        )
        return out["label"]


async def edge_offload(cfg: CompareSetup, w: Workload) -> SystemResult:
    result = SystemResult("edge-offload")
    with LocalBroker(kind="mosquitto") as broker:
        address = BrokerAddress(host=broker.info.host, port=broker.info.port)
        with processes(address, agents=2, coordinator=True):
            async with OffloadClient(address) as client:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # until the coordinator knows both agents
                    with contextlib.suppress(JobError, TimeoutError):
                        # (a submission sent before the coordinator subscribed is lost)
                        x = {"input": w.chunks[0][:8]}
                        out = await client.run(MODEL, x, batch_size=4, timeout=5)
                        if len(out.result.per_agent) == 2:
                            break
                    await asyncio.sleep(0.2)
                await _fill(result, w, cfg, EdgeApi(client, cfg))
    return result


# -- Celery + Redis -------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    cmd = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def celery_workers(url: str, n: int) -> Iterator[None]:
    # Celery refuses pickle as root unless told: this Redis listens on loopback only.
    env = {**os.environ, "COMPARE_REDIS_URL": url, "C_FORCE_ROOT": "1"}
    cmd = [sys.executable, "-m", "celery", "-A", "bench.compare_workers", "worker"]
    cmd += ["--pool", "solo", "--loglevel", "WARNING", "--without-gossip", "--without-mingle"]
    procs = [
        subprocess.Popen(
            [*cmd, "-n", f"w{i}@%h"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(n)
    ]
    try:
        yield
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


class CeleryApi:
    def __init__(self, app: Any, cfg: CompareSetup) -> None:
        self.app = app
        self.cfg = cfg

    def one(self, x: np.ndarray[Any, Any]) -> Any:
        return self.app.send_task("infer", args=(x,)).get(timeout=10)

    def _group(self, xs: list[np.ndarray[Any, Any]]) -> list[Arrays]:
        from celery import group  # type: ignore[import-untyped, import-not-found, unused-ignore]

        job = group(self.app.signature("infer", args=(x,)) for x in xs)
        # Celery polls Redis for a group's results every 0.5 s unless told otherwise.
        out: list[Arrays] = job.apply_async().get(timeout=self.cfg.timeout_s, interval=0.005)
        return out

    def many(self, xs: list[np.ndarray[Any, Any]]) -> Any:
        return self._group(xs)

    def chunks(self, xs: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        return np.concatenate([r["label"] for r in self._group(xs)])


async def celery(cfg: CompareSetup, w: Workload) -> SystemResult:
    result = SystemResult("Celery+Redis")
    with redis_server() as url, celery_workers(url, 2):
        app = await asyncio.to_thread(_celery_ready, url)
        await _fill(result, w, cfg, CeleryApi(app, cfg))
    return result


def _celery_ready(url: str) -> Any:
    app = celery_app(url)
    deadline = time.monotonic() + 60
    while len(app.control.ping(timeout=0.5) or []) < 2:
        if time.monotonic() > deadline:
            raise TimeoutError("the Celery workers did not come up")
    return app


# -- Dask -----------------------------------------------------------------------------------------


class DaskApi:
    def __init__(self, client: Any) -> None:
        self.client = client

    def one(self, x: np.ndarray[Any, Any]) -> Any:
        return self.client.submit(infer, x, pure=False).result()

    def many(self, xs: list[np.ndarray[Any, Any]]) -> Any:
        return self.client.gather(self.client.map(infer, xs, pure=False))

    def chunks(self, xs: list[np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
        return np.concatenate([r["label"] for r in self.many(xs)])


async def dask(cfg: CompareSetup, w: Workload) -> SystemResult:
    # Dask's synchronous client runs its own event loop in a thread: keep it off this one.
    return await asyncio.to_thread(_dask_sync, cfg, w)


def _dask_sync(cfg: CompareSetup, w: Workload) -> SystemResult:
    from distributed import Client, LocalCluster  # type: ignore[import-not-found, unused-ignore]

    logging.getLogger("distributed").setLevel(logging.ERROR)  # it sets INFO on import
    result = SystemResult("Dask")
    cluster_options: dict[str, Any] = {"threads_per_worker": 1, "dashboard_address": None}
    with (
        LocalCluster(
            n_workers=2, processes=True, silence_logs=logging.ERROR, **cluster_options
        ) as cluster,  # type: ignore[no-untyped-call, unused-ignore]
        Client(cluster) as client,  # type: ignore[no-untyped-call, unused-ignore]
    ):
        asyncio.run(_fill(result, w, cfg, DaskApi(client)))
    return result


# -- the table -------------------------------------------------------------------------------------

SYSTEMS = {"edge-offload": edge_offload, "Celery+Redis": celery, "Dask": dask}


async def run_compare(cfg: CompareSetup) -> list[SystemResult]:
    w = Workload.make(cfg)
    results = []
    for name, fn in SYSTEMS.items():
        try:
            results.append(await fn(cfg, w))
        except (ImportError, FileNotFoundError) as e:
            results.append(SystemResult(name, skipped=str(e)))
    return results


def rows(results: list[SystemResult]) -> list[tuple[str, str]]:
    ours, others = results[0], results[1:]
    spec: list[tuple[str, str, Callable[[SystemResult], float], bool]] = [
        ("round trip p50, 1 sample", "ms", lambda r: r.rt_p50_ms, False),
        ("10,000 trivial tasks", "tasks/s", lambda r: r.trivial_per_s, True),
        ("inference, tasks of 2,048 digits", "samples/s", lambda r: r.samples_per_s, True),
    ]
    out = []
    for what, unit, get, higher_better in spec:
        parts = [f"edge-offload {get(ours):,.{3 if unit == 'ms' else 0}f} {unit}"]
        for r in others:
            if r.skipped:
                parts.append(f"{r.name} skipped")
                continue
            ratio = get(ours) / get(r) if higher_better else get(r) / get(ours)
            parts.append(
                f"{r.name} {get(r):,.{3 if unit == 'ms' else 0}f} {unit} (**{ratio:.2f}x**)"
            )
        out.append((f"compare: {what}", "; ".join(parts)))
    wrong = [r.name for r in results if not r.skipped and not r.correct]
    if wrong:
        out.append(("compare: labels differ from onnxruntime", ", ".join(wrong)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 round trips, 44,925 digits")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("mqtt").setLevel(logging.CRITICAL)
    results = asyncio.run(run_compare(setup(quick=args.quick)))
    print(
        f"edge-offload vs Celery+Redis vs Dask: {os.cpu_count()} cores, 2 worker processes "
        "x 1 slot each; (Nx) = speed ratio edge-offload / other"
    )
    for what, figure in rows(results):
        print(f"  {what:<45} {figure}")
    for r in results:
        if r.skipped:
            print(f"  {r.name} skipped: {r.skipped}")
    return 0 if all(r.correct for r in results if not r.skipped) else 1


if __name__ == "__main__":
    sys.exit(main())
