"""The edge-offload command line as separate processes: coordinator, agent, submit, demo..."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from protocol import BrokerAddress
from tests.conftest import REPO


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture
def coordinator_process(mosquitto_address: BrokerAddress, root: str) -> Any:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "coordinator.cli",
            "coordinator",
            "--broker",
            mosquitto_address.url,
            "--root",
            root,
        ],
        cwd=REPO,
    )
    yield proc
    proc.terminate()
    assert proc.wait(15) == 0


def test_submit_writes_outputs_and_agents_and_jobs_list_them(
    mosquitto_address: BrokerAddress,
    root: str,
    coordinator_process: Any,
    agent_processes: Any,
    digits: Any,
    tmp_path: Path,
) -> None:
    url = mosquitto_address.url
    agent_processes(mosquitto_address, "cli-1", "--slots", "2", "--label", "site=lab")
    x, y = digits
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out.npz"
    for _ in range(100):  # until the agent has started and published its birth
        listed = cli("agents", "--broker", url, "--root", root, "--json")
        if "cli-1" in listed.stdout:
            break
    done = cli(
        "submit",
        "digits-mlp",
        str(tmp_path / "x.npy"),
        "-o",
        str(out),
        "--broker",
        url,
        "--root",
        root,
        "--job-id",
        "cli-job-1",
        "--timeout",
        "30",
    )
    assert done.returncode == 0, done.stderr
    assert "1797 samples" in done.stdout and "cli-1: 1797 samples" in done.stdout
    with np.load(out) as data:
        assert sorted(data.files) == ["label", "probabilities"]
        assert np.mean(data["label"] == y) > 0.95

    agents = cli("agents", "--broker", url, "--root", root, "--json")
    assert agents.returncode == 0, agents.stderr
    (state,) = json.loads(agents.stdout)
    assert state["agent_id"] == "cli-1" and state["capabilities"]["labels"] == {"site": "lab"}
    table = cli("agents", "--broker", url, "--root", root)
    assert "cli-1" in table.stdout and "digits-mlp" in table.stdout

    jobs = cli("jobs", "--broker", url, "--root", root, "--json")
    assert jobs.returncode == 0, jobs.stderr
    listed = {j["job_id"]: j for j in json.loads(jobs.stdout)["jobs"]}
    assert any(j["state"] == "done" and j["samples"] == 1797 for j in listed.values())


def test_submit_reports_a_refused_job_and_bad_files(
    mosquitto_address: BrokerAddress,
    root: str,
    coordinator_process: Any,
    agent_processes: Any,
    tmp_path: Path,
) -> None:
    url = mosquitto_address.url
    np.save(tmp_path / "bad.npy", np.zeros((3, 8), np.float32))
    missing = cli("submit", "digits-mlp", str(tmp_path / "nope.npy"), "--broker", url)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    refused = cli(
        "submit",
        "digits-mlp",
        str(tmp_path / "bad.npy"),
        "--broker",
        url,
        "--root",
        root,
        "--timeout",
        "20",
    )
    assert refused.returncode == 1
    assert "unknown_model" in refused.stderr or "expected shape" in refused.stderr


def test_unreachable_broker_is_an_error_message_and_exit_code_3(tmp_path: Path) -> None:
    from coordinator.broker import free_port

    np.save(tmp_path / "x.npy", np.zeros((2, 64), np.float32))
    url = f"mqtt://127.0.0.1:{free_port()}"
    for command in (["agents"], ["jobs"], ["submit", "digits-mlp", str(tmp_path / "x.npy")]):
        done = cli(*command, "--broker", url)
        assert done.returncode == 3, done.stderr
        assert "cannot reach the broker" in done.stderr and "Traceback" not in done.stderr


def test_schema_prints_every_message() -> None:
    done = cli("schema")
    assert done.returncode == 0
    schemas = json.loads(done.stdout)
    assert {"inference", "result", "state", "heartbeat", "job_result", "run"} <= set(schemas)


def test_demo_runs_end_to_end(mosquitto_address: BrokerAddress, root: str) -> None:
    done = cli("demo", "--broker", mosquitto_address.url, "--root", root, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "accuracy: 0.99" in done.stdout
    shares = [line for line in done.stdout.splitlines() if "samples" in line and "demo-" in line]
    assert len(shares) == 3, done.stdout
