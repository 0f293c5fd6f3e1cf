"""Per-job traces and reports, and the live views, against real brokers, agents and jobs."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator import CoordinatorConfig, OffloadClient
from coordinator.report import build_report, format_report, plot, to_json
from coordinator.trace import TRACE_VERSION, JobTrace, TraceError
from protocol import BrokerAddress
from tests.conftest import REPO, cli, wait_until


def check_png(path: Path) -> tuple[int, int]:
    """Width and height of a PNG that matplotlib can read back."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    height, width = pixels.shape[:2]
    assert pixels.std() > 0.05, "the chart is not blank"
    return width, height


async def test_a_real_job_leaves_a_trace_that_the_report_and_the_cli_read(
    address: BrokerAddress,
    agent_factory: Any,
    coordinator_factory: Any,
    client_factory: Any,
    digits: Any,
    tmp_path: Path,
) -> None:
    x, _ = digits
    traces = tmp_path / "traces"
    await agent_factory(address, "r-a", slots=1)
    await agent_factory(address, "r-b", slots=2)
    await agent_factory(address, "r-slow", slots=1, slowdown=4.0)
    coord = await coordinator_factory(address, trace_dir=traces)
    await coord.wait_for_agents(3)
    client: OffloadClient = await client_factory(address)
    out = await client.run("digits-mlp", {"input": x}, batch_size=60, job_id="traced-1", timeout=60)
    r = out.result

    trace = JobTrace.load(traces / "traced-1.json")
    assert (trace.job_id, trace.model, trace.ok, trace.retries) == (
        "traced-1",
        "digits-mlp",
        True,
        r.retries,
    )
    assert (trace.batch_size, trace.units, trace.samples_total) == (60, r.tasks, len(x))
    # One row per microtask, each with its own unit and the JobResult's per-agent split.
    assert len(trace) == r.tasks == -(-len(x) // 60)
    assert sorted(trace.unit) == list(range(r.tasks))
    assert set(trace.task) == {f"traced-1.{i}" for i in range(r.tasks)}
    assert sum(trace.samples) == len(x)
    for agent_id, share in r.per_agent.items():
        mine = [s for a, s in zip(trace.agent, trace.samples, strict=True) if a == agent_id]
        assert (sum(mine), len(mine)) == (share.samples, share.tasks)
    assert trace.slots == {a: {"r-a": 1, "r-b": 2, "r-slow": 1}[a] for a in r.per_agent}
    assert all(
        trace.submitted <= d < rc <= (trace.finished or 0)
        for d, rc in zip(trace.dispatched, trace.received, strict=True)
    )
    assert all(e > 0 for e in trace.exec_ms) and all(q >= 0 for q in trace.queued_ms)
    assert all(e > 0 for e in trace.est_ms)

    report = build_report(trace)
    assert report.tasks == r.tasks and report.samples == len(x)
    assert sum(a.samples for a in report.agents) == len(x)
    assert sum(a.share for a in report.agents) == pytest.approx(1.0)
    assert report.capacity_slots == sum(trace.slots.values())
    assert report.work_s == pytest.approx(sum(trace.exec_ms) / 1000)
    assert report.lower_bound_s == pytest.approx(report.work_s / report.capacity_slots)
    assert 0 < report.lower_bound_s <= report.makespan_s
    assert report.ratio is not None and report.ratio >= 1.0
    assert report.end_to_end_s is not None and report.makespan_s <= report.end_to_end_s
    assert report.samples_per_s == pytest.approx(len(x) / report.makespan_s)
    for a in report.agents:
        assert 0.0 < a.utilisation <= 1.0, a
        assert a.utilisation == pytest.approx(a.busy_s / (a.slots * report.makespan_s))
    assert report.queued_ms_p50 <= report.queued_ms_p95 <= report.queued_ms_max
    table = format_report(report)
    assert "traced-1" in table and "lower bound" in table
    assert all(a in table for a in r.per_agent)
    data = json.loads(to_json(report))
    assert data["job_id"] == "traced-1" and "lower_bound" in data["definitions"]
    assert len(data["agents"]) == len(r.per_agent)

    width, height = check_png(plot(trace, tmp_path / "chart.png"))
    assert width >= 1000 and 400 <= height <= 2500

    code, stdout, stderr = await cli(
        "report",
        "traced-1",
        "--trace-dir",
        str(traces),
        "--json",
        str(tmp_path / "report.json"),
        "--png",
        str(tmp_path / "cli.png"),
    )
    assert code == 0, stderr
    assert "makespan" in stdout and "traced-1" in stdout and "r-a" in stdout
    assert json.loads((tmp_path / "report.json").read_text())["tasks"] == r.tasks
    check_png(tmp_path / "cli.png")
    code, stdout, _ = await cli("report", "--trace", str(traces / "traced-1.json"), "--json", "-")
    assert code == 0 and json.loads(stdout)["samples"] == len(x)
    code, _, stderr = await cli("report", "nope", "--trace-dir", str(traces))
    assert code == 1 and "no such trace file" in stderr


async def test_a_killed_agent_shows_as_failed_attempts_and_retried_microtasks(
    mosquitto_address: BrokerAddress,
    agent_processes: Any,
    coordinator_factory: Any,
    digits: Any,
    tmp_path: Path,
) -> None:
    x, _ = digits
    traces = tmp_path / "traces"
    agent_processes(mosquitto_address, "k-fast", "--slots", "2")
    doomed = agent_processes(mosquitto_address, "k-doomed", "--slots", "1", "--slowdown", "200")
    coord = await coordinator_factory(mosquitto_address, trace_dir=traces)
    await coord.wait_for_agents(2, timeout=60)
    # Round robin: the slow agent surely gets its turn.
    handle = coord.submit_arrays(
        "digits-mlp", {"input": x}, batch_size=30, job_id="killed-1", policy="round_robin"
    )
    doomed_record = coord.registry.agents["k-doomed"]
    await wait_until(lambda: bool(doomed_record.in_flight), what="work on k-doomed")
    doomed.kill()  # the broker publishes its Last Will: its microtasks run elsewhere
    out = await handle.result(60)

    trace = JobTrace.load(traces / "killed-1.json")
    assert trace.ok and trace.retries == out.result.retries >= 1
    lost = [f for f in trace.failures if f.agent == "k-doomed"]
    assert lost and all(f.code == "agent_lost" and f.dispatched < f.failed for f in lost)
    # Every lost microtask was accepted later, from its next attempt on the other agent.
    rows = dict(
        zip(trace.task, zip(trace.agent, trace.attempt, trace.retried, strict=True), strict=True)
    )
    for f in lost:
        agent_id, attempt, retried = rows[f.task]
        assert agent_id == "k-fast" and attempt > f.attempt and retried >= 1
    assert len(trace) == out.result.tasks and sum(trace.samples) == len(x)
    report = build_report(trace)
    assert report.retries == trace.retries
    assert report.failures_by_code["agent_lost"] == len(
        [f for f in trace.failures if f.code == "agent_lost"]
    )
    assert "agent_lost" in format_report(report)
    check_png(plot(trace, tmp_path / "failures.png", report))


async def test_watching_a_job_and_the_fleet_live(
    mosquitto_address: BrokerAddress,
    agent_factory: Any,
    coordinator_factory: Any,
    client_factory: Any,
    digits: Any,
    root: str,
    tmp_path: Path,
) -> None:
    x, _ = digits
    url = mosquitto_address.url
    where = ("--broker", url, "--root", root)
    # A slowed agent makes the job last a few seconds, long enough to watch.
    await agent_factory(mosquitto_address, "v-1", slots=2, slowdown=1000.0)
    coord = await coordinator_factory(mosquitto_address, status_interval_s=0.1)
    await coord.wait_for_agents(1)

    code, stdout, stderr = await cli(
        "agents", "--watch", "--count", "2", "--interval", "0.3", *where
    )
    assert code == 0, stderr
    frames = stdout.split("AGENT ")
    assert len(frames) == 3, stdout  # two frames, each a summary line and a header
    row = next(line for line in frames[-1].splitlines() if line.startswith("v-1"))
    assert "online" in row and "/2" in row and "digits-mlp" in row
    assert "1 agents online" in stdout

    client: OffloadClient = await client_factory(mosquitto_address)
    handle = await client.submit("digits-mlp", {"input": x[:600]}, batch_size=20, job_id="w-1")
    code, stdout, stderr = await cli("jobs", "watch", "w-1", *where)
    assert code == 0, stderr
    bars = [line for line in stderr.splitlines() if line.startswith("w-1 [")]
    assert bars and "600/600 samples" in bars[-1], stderr
    assert "job w-1 done: 600 samples" in stdout
    await handle.result(30)
    # The watch below picks the newest unfinished job from the coordinator's retained
    # state, refreshed once a second: wait until that state has w-1 finished.
    for _ in range(50):
        state = await client.coordinator_state()
        if all(j.state in ("done", "failed") for j in state.jobs if j.job_id == "w-1"):
            break
        await asyncio.sleep(0.1)

    # Without a job id: the newest unfinished job (the submit below), once it appears.
    np.save(tmp_path / "x.npy", x[:400])
    watch = asyncio.create_task(cli("jobs", "watch", *where))
    code, stdout, stderr = await cli(
        "submit", "digits-mlp", str(tmp_path / "x.npy"), "--batch-size", "20", "--watch", *where
    )
    assert code == 0, stderr
    assert any("400/400 samples" in line for line in stderr.splitlines()), stderr
    code, w_stdout, w_stderr = await watch
    assert code == 0, w_stderr
    assert "done: 400 samples" in w_stdout

    code, _, stderr = await cli("jobs", "watch", "never-submitted", *where)
    assert code == 1 and "not among the coordinator's recent jobs" in stderr


async def test_ctrl_c_ends_a_fleet_watch_cleanly(
    mosquitto_address: BrokerAddress, agent_factory: Any, root: str
) -> None:
    await agent_factory(mosquitto_address, "c-1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator.cli",
        "agents",
        "--watch",
        "--interval",
        "0.2",
        "--broker",
        mosquitto_address.url,
        "--root",
        root,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    assert proc.stdout is not None and proc.stderr is not None
    seen = ""
    while "c-1" not in seen:
        seen += (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    proc.send_signal(signal.SIGINT)
    await asyncio.wait_for(proc.wait(), 15)
    stderr = (await proc.stderr.read()).decode()
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr


async def test_watching_an_unreachable_broker_is_exit_code_3() -> None:
    from coordinator.broker import free_port

    url = f"mqtt://127.0.0.1:{free_port()}"
    for command in (["agents", "--watch"], ["jobs", "watch", "j-1"]):
        code, _, stderr = await cli(*command, "--broker", url)
        assert code == 3 and "cannot reach the broker" in stderr, stderr


def test_trace_files_round_trip_and_bad_ones_are_refused(tmp_path: Path) -> None:
    trace = JobTrace(
        job_id="rt-1", model="m", policy="round_robin", batch_size=4, samples=0, units=0
    )
    path = trace.save(tmp_path / "deep" / "rt-1.json")
    again = JobTrace.load(path)
    assert again.to_dict() == trace.to_dict()
    assert json.loads(path.read_text())["version"] == TRACE_VERSION
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    report = build_report(again)  # no results at all: zeros, not a crash
    assert report.makespan_s == 0 and report.ratio is None and report.agents == []
    assert "rt-1" in format_report(report)

    (tmp_path / "v0.json").write_text(json.dumps({**trace.to_dict(), "version": 0}))
    (tmp_path / "short.json").write_text(
        json.dumps({**trace.to_dict(), "rows": {**trace.to_dict()["rows"], "task": ["x"]}})
    )
    (tmp_path / "junk.json").write_text("{not json")
    for name in ("v0.json", "short.json", "junk.json", "missing.json"):
        with pytest.raises(TraceError):
            JobTrace.load(tmp_path / name)
    assert trace.write_to(path / "under-a-file") is None  # logged, not raised


def test_trace_dir_defaults_beside_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "state" / "journal.sqlite"
    assert CoordinatorConfig().trace_dir is None
    assert CoordinatorConfig(journal=journal).trace_dir == tmp_path / "state" / "traces"
    assert CoordinatorConfig(journal=journal, trace_dir=None).trace_dir is None
    moved = CoordinatorConfig(journal=journal).with_(journal=tmp_path / "j2.sqlite")
    assert moved.trace_dir == tmp_path / "traces"
    assert CoordinatorConfig.load(None, journal=str(journal), trace_dir="none").trace_dir is None
    monkeypatch.setenv("EDGE_OFFLOAD_COORDINATOR_TRACE_DIR", str(tmp_path / "t"))
    assert CoordinatorConfig.load(None).trace_dir == tmp_path / "t"
    toml = tmp_path / "c.toml"
    toml.write_text(f'[coordinator]\njournal = "{journal}"\n')
    monkeypatch.delenv("EDGE_OFFLOAD_COORDINATOR_TRACE_DIR")
    assert CoordinatorConfig.load(toml).trace_dir == tmp_path / "state" / "traces"
