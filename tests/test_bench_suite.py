"""The benchmark suite's smallest configurations, run for their correctness facts.

``bench/hetero.py`` (real agent processes of different speeds, one slowed down mid-job),
``bench/fleet_scale.py`` (simulated agents against the real coordinator process) and
``bench/deploy.py`` (models sent to agents, a job with and without download-aware
placement) are run small; what is asserted is that the work was all done and counted,
never how fast.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.deploy import Setup as DeploySetup
from bench.deploy import format_bench, run_deploy
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


async def test_deploy_bench_sends_models_and_runs_both_placements(tmp_path: Path) -> None:
    require_mosquitto()
    setup = DeploySetup(
        sizes_mb=(2,),
        reps=2,
        makespan_mb=2,
        download_s=4.0,
        job_compute_s=0.5,
        rounds=1,
        warmup_tasks_per_agent=10,
    )
    bench = await run_deploy(setup, tmp_path)
    print(format_bench(bench))
    assert bench.time is not None
    (size,) = bench.time.sizes
    assert size.correct, "outputs of a deployed model differ from onnxruntime's"
    # Every version was sent and installed once (deploy_version raises otherwise).
    assert len(size.installed_s) == len(size.stored_s) == len(size.first_result_s) == 2
    assert len(size.raw_s) >= 2
    for stored, installed in zip(size.stored_s, size.installed_s, strict=True):
        assert 0 < stored <= installed and math.isfinite(installed)
    assert all(math.isfinite(t) and t > 0 for t in size.raw_s)

    assert sorted(m.label for m in bench.makespan) == ["download-aware", "naive"]
    for m in bench.makespan:
        assert m.correct, f"{m.label}: outputs differ from onnxruntime's"
        assert m.tasks > 0 and sum(m.per_agent.values()) == m.tasks
        assert m.samples > 0 and math.isfinite(m.makespan_s) and m.makespan_s > 0
        assert set(m.link_mb_s) == {"a1", "a2", "a3"}  # the warm-up reached every agent
    (naive,) = [m for m in bench.makespan if m.label == "naive"]
    # Naive placement counts a3 as ready: it gets work, and the model is sent to it.
    assert naive.a3_transfers, "naive placement never sent a3 the model"
