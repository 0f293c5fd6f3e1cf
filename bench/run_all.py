"""The benchmark suite in one command: runs every benchmark and prints one markdown table.

1. core: round trip and microtask throughput (``bench_core.py``);
2. heterogeneous fleet: makespan / lower bound per scheduling policy (``hetero.py``);
3. fleet scale: 1,000 and 10,000 simulated agents against the coordinator
   (``fleet_scale.py``);
4. comparison with Celery+Redis and Dask on the same workloads (``compare.py``), when
   they are installed (``pip install -e '.[bench]'`` and ``apt-get install redis-server``);
5. model deployment: sending a 10 MB and a 50 MB model to an agent, and the makespan of a
   job with and without download-aware placement (``deploy.py``).

Usage: python bench/run_all.py [--quick] [--only core|hetero|scale|compare|deploy ...]
Needs Mosquitto. ``--quick`` takes about 8 minutes on two cores, the full suite about 12.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: make ``bench`` importable
    sys.path.insert(0, str(REPO))

import onnxruntime as ort  # noqa: E402

from bench import bench_core, compare, deploy, fleet_scale, hetero  # noqa: E402
from coordinator.broker import find_mosquitto  # noqa: E402

Rows = list[tuple[str, str]]
SECTIONS = ("core", "hetero", "scale", "compare", "deploy")


def core(quick: bool, workdir: Path) -> Rows:
    return bench_core.measure(argparse.Namespace(quick=quick, target_ms=None))


def heterogeneous(quick: bool, workdir: Path) -> Rows:
    setup = hetero.QUICK if quick else hetero.FULL
    (workdir / "hetero").mkdir(exist_ok=True)
    runs = asyncio.run(hetero.run_hetero(setup, workdir / "hetero"))
    return [("hetero fleet", hetero.describe(setup)), *hetero.rows(runs)]


def scale(quick: bool, workdir: Path) -> Rows:
    setups = fleet_scale.setups(list(fleet_scale.SCALES), quick=quick)
    runs = asyncio.run(fleet_scale.run_all_scales(setups, workdir))
    return fleet_scale.rows(runs)


def comparison(quick: bool, workdir: Path) -> Rows:
    return compare.rows(asyncio.run(compare.run_compare(compare.setup(quick=quick))))


def deployment(quick: bool, workdir: Path) -> Rows:
    (workdir / "deploy").mkdir(exist_ok=True)
    setup = deploy.QUICK if quick else deploy.FULL
    return deploy.rows(asyncio.run(deploy.run_deploy(setup, workdir / "deploy")))


RUNNERS: dict[str, Callable[[bool, Path], Rows]] = {
    "core": core,
    "hetero": heterogeneous,
    "scale": scale,
    "compare": comparison,
    "deploy": deployment,
}


def machine() -> str:
    mosquitto = find_mosquitto()
    version = ""
    if mosquitto is not None:
        out = subprocess.run([mosquitto, "-h"], capture_output=True, text=True, check=False)
        version = next((w for w in out.stdout.split() if w[:1].isdigit()), "")
    return (
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, onnxruntime {ort.__version__}, Mosquitto {version or '?'}"
    )


def table(sections: list[tuple[str, Rows]]) -> str:
    lines = ["| # | benchmark | measurement | figure |", "|---|---|---|---|"]
    for i, (name, rows) in enumerate(sections, 1):
        for measurement, figure in rows:
            lines.append(f"| {i} | {name} | {measurement} | {figure} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs of everything")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("mqtt").setLevel(logging.CRITICAL)
    if find_mosquitto() is None:
        print("the suite needs Mosquitto (apt-get install mosquitto)", file=sys.stderr)
        return 2
    done: list[tuple[str, Rows]] = []
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
        for name in args.only or SECTIONS:
            t0 = time.monotonic()
            print(f"running {name} ...", file=sys.stderr, flush=True)
            done.append((name, RUNNERS[name](args.quick, Path(tmp))))
            print(f"  {name}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    mode = "quick" if args.quick else "full"
    took = time.monotonic() - started
    print(f"edge-offload benchmark suite ({mode}): {machine()}; ran {took:.0f} s\n")
    print(table(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
