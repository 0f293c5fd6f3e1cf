"""Core benchmarks: round trip, trivial microtask throughput, and a large job against raw onnxruntime.

Everything runs as real processes on this machine: Mosquitto, one coordinator process,
two agent processes (one slot each) and this process as the SDK client. Prints a table;
asserts nothing. Usage: python bench/bench_core.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from coordinator import OffloadClient
from coordinator.broker import LocalBroker
from protocol import BrokerAddress

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "digits_mlp.onnx"


def digits() -> np.ndarray[Any, Any]:
    with np.load(REPO / "models" / "digits_samples.npz") as data:
        return data["x"].astype(np.float32)


@contextlib.contextmanager
def fleet(address: BrokerAddress, n_agents: int = 2, *coord_args: str) -> Iterator[None]:
    py = [sys.executable, "-m", "coordinator.cli", "--log-level", "WARNING"]
    procs = [subprocess.Popen([*py, "coordinator", "--broker", address.url, *coord_args])]
    for i in range(n_agents):
        procs.append(
            subprocess.Popen(
                [*py, "agent", "--broker", address.url, "--id", f"bench-{i}", "--slots", "1"]
            )
        )
    try:
        yield
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()


async def wait_fleet(client: OffloadClient, x: np.ndarray[Any, Any], n: int) -> None:
    """Until a job runs and both agents are known (births are retained)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        agents = await client.agents(wait=0.2)
        if sum(1 for a in agents.values() if a.online) >= n:
            with contextlib.suppress(Exception):
                await client.run("digits-mlp", {"input": x[:4]}, timeout=5)
                return
        await asyncio.sleep(0.2)
    raise TimeoutError("fleet did not come up")


async def round_trip(
    client: OffloadClient, x: np.ndarray[Any, Any], n: int
) -> np.ndarray[Any, Any]:
    one = {"input": x[:1]}
    for _ in range(200):  # warm-up
        await client.run("digits-mlp", one, timeout=10)
    lat = np.empty(n)
    for i in range(n):
        t0 = time.perf_counter()
        await client.run("digits-mlp", one, timeout=10)
        lat[i] = time.perf_counter() - t0
    return lat * 1000


async def trivial_throughput(
    client: OffloadClient, x: np.ndarray[Any, Any], n: int
) -> tuple[float, Any]:
    xs = np.resize(x, (n, 64))
    t0 = time.perf_counter()
    out = await client.run("digits-mlp", {"input": xs}, batch_size=1, timeout=300)
    return n / (time.perf_counter() - t0), out.result


async def large_job(client: OffloadClient, xs: np.ndarray[Any, Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = await client.run("digits-mlp", {"input": xs}, timeout=300)
    return len(xs) / (time.perf_counter() - t0), out.result


def _raw_worker(xs: np.ndarray[Any, Any], batch: int, q: Any) -> None:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    s = ort.InferenceSession(str(MODEL), sess_options=so, providers=["CPUExecutionProvider"])
    s.run(None, {"input": xs[:batch]})
    q.put("ready")
    q.get() if False else None
    t0 = time.perf_counter()
    for i in range(0, len(xs), batch):
        s.run(None, {"input": xs[i : i + batch]})
    q.put(time.perf_counter() - t0)


def raw_two_processes(xs: np.ndarray[Any, Any], batch: int) -> float:
    """Samples/s of onnxruntime alone in two processes, each on half the inputs."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    halves = np.array_split(xs, 2)
    procs = [ctx.Process(target=_raw_worker, args=(h, batch, q)) for h in halves]
    for p in procs:
        p.start()
    results = [q.get() for _ in range(4)]
    for p in procs:
        p.join()
    times = [r for r in results if not isinstance(r, str)]
    return len(xs) / max(times)


async def main_async(args: argparse.Namespace, address: BrokerAddress) -> list[tuple[str, str]]:
    x = digits()
    rows: list[tuple[str, str]] = []
    async with OffloadClient(address) as client:
        await wait_fleet(client, x, 2)
        lat = await round_trip(client, x, args.rt_n)
        rows.append(
            (
                "round trip p50 (SDK -> coordinator -> agent -> SDK, 1 sample)",
                f"{np.percentile(lat, 50):.3f} ms  (target <= 0.9)",
            )
        )
        rows.append(("round trip p99", f"{np.percentile(lat, 99):.3f} ms  (target <= 1.5)"))
        tput, res = await trivial_throughput(client, x, args.trivial_n)
        rows.append(
            (
                f"trivial microtasks/s ({args.trivial_n:,} at once, QoS 1, 2 agents)",
                f"{tput:,.0f}/s  (target >= 3,000)  shares "
                + ", ".join(f"{a}={s.tasks}" for a, s in res.per_agent.items()),
            )
        )
        xs = np.tile(x, (args.large_reps, 1))
        ours, res = await large_job(client, xs)
        raw = raw_two_processes(xs, res.batch_size)
        rows.append(
            (
                f"large job samples/s ({len(xs):,} digits, {res.tasks} microtasks of "
                f"{res.batch_size})",
                f"{ours:,.0f}/s",
            )
        )
        rows.append(("raw onnxruntime, 2 processes, same batches", f"{raw:,.0f}/s"))
        rows.append(("large job / raw", f"{ours / raw:.1%}  (target >= 50%)"))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="smaller runs")
    args = ap.parse_args()
    args.rt_n = 500 if args.quick else 3000
    args.trivial_n = 10_000
    args.large_reps = 50 if args.quick else 200
    with LocalBroker(kind="mosquitto") as broker:
        address = BrokerAddress(host=broker.info.host, port=broker.info.port)
        with fleet(address):
            rows = asyncio.run(main_async(args, address))
    width = max(len(r[0]) for r in rows)
    print(
        f"edge-offload core benchmark  ({os.cpu_count()} cores, Mosquitto, "
        f"1 coordinator + 2 agent processes)"
    )
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
