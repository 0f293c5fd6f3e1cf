"""The benchmark suite's smallest configurations, run for their correctness facts.

``bench/hetero.py`` (real agent processes of different speeds, one slowed down mid-job)
and ``bench/fleet_scale.py`` (simulated agents against the real coordinator process) are
run small; what is asserted is that the work was all done and counted, never how fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.fleet_scale import ScaleSetup, format_runs, run_scale
from bench.hetero import Setup, run_hetero
from bench.hetero import format_runs as format_hetero
from coordinator.broker import LocalBroker
from tests.conftest import require_mosquitto

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.timeout(180)]


async def test_hetero_fleet_does_all_the_work(tmp_path: Path) -> None:
    require_mosquitto()
    setup = Setup(speeds=(4, 2, 1, 1), samples=6_000, policies=("earliest_finish",))
    (run,) = await run_hetero(setup, tmp_path)
    print(format_hetero(setup, [run]))
    assert run.correct, "outputs differ from onnxruntime's"
    assert run.tasks > 0 and run.accepted == run.tasks and run.lost == 0
    # The tap saw the accepted result of every microtask: the work sum covers the whole job.
    assert run.units_measured == run.tasks
    assert sum(run.share_by_speed.values()) == pytest.approx(1.0)
    assert run.pauses >= 1, "the slowed agent was never paused"
    assert run.slots == 4
    for figure in (run.makespan_s, run.lower_bound_s, run.ratio, run.throughput):
        assert math.isfinite(figure) and figure > 0


async def test_fleet_scale_registers_every_agent(mosquitto: LocalBroker, tmp_path: Path) -> None:
    setup = ScaleSetup(
        agents=100, phase_s=1.0, stress_heartbeat_s=0.05, microtasks=500, dispatch_budget_s=60
    )
    run = await run_scale(setup, mosquitto, tmp_path)
    print(format_runs([run]))
    assert run.registered == 100
    assert run.finished and run.accepted == run.microtasks
    assert run.received >= run.microtasks and run.results_sent >= run.accepted
    assert [p.interval_s for p in run.phases] == [2.0, 0.05]
    for p in run.phases:
        assert p.sent > 0
        # every marker heartbeat reached the coordinator and was counted there
        assert p.markers_counted == p.markers_sent
        assert math.isfinite(p.absorbed) and math.isfinite(p.offered)
        assert p.coordinator_rss > 0
    assert run.phases[1].markers_sent > 0
    assert math.isfinite(run.decisions_per_s) and run.decisions_per_s > 0
