"""The chaos suite's quick profile (``bench/chaos.py --quick``), with assertions.

Each scenario runs a job of 10,000 microtasks through real processes and a real
Mosquitto while faults are injected, and must end with no microtask lost, no duplicate
result kept, and outputs identical to onnxruntime's on the same batches.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from bench.chaos import (
    NETNS_SCENARIOS,
    QUICK,
    SCENARIOS,
    format_report,
    make_inputs,
    reference,
    run_scenario,
)
from bench.netfault import netns_available
from tests.conftest import require_mosquitto

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto, pytest.mark.timeout(300)]

Arrays = dict[str, np.ndarray[Any, Any]]


def require_netns() -> None:
    """Skip without network namespaces locally; fail under CI, which runs as root."""
    reason = netns_available()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"network namespaces are required under CI: {reason}")
    pytest.skip(f"network namespaces unavailable: {reason}")


@pytest.fixture(scope="module")
def job() -> tuple[np.ndarray[Any, Any], Arrays]:
    x = make_inputs(QUICK.tasks)
    return x, reference(x)


def events(report: Any) -> dict[str, float | None]:
    return dict(report.events)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_nothing_lost_or_duplicated(
    scenario: str, job: tuple[np.ndarray[Any, Any], Arrays], tmp_path: Any
) -> None:
    require_mosquitto()
    if scenario in NETNS_SCENARIOS:
        require_netns()
    x, expected = job
    report = await run_scenario(scenario, QUICK, tmp_path, expected, x)
    print(format_report(report))
    assert report.tasks >= 10_000
    assert report.lost == 0, f"{report.lost} microtasks lost"
    assert report.duplicates == 0, f"{report.duplicates} duplicate results kept"
    assert report.identical, "outputs differ from onnxruntime's on the same batches"
    ev = events(report)
    if scenario == "baseline":
        assert report.retries == 0
    elif scenario == "agent_kills":
        assert report.facts["agents killed"] >= 2
        assert report.retries >= 1, "the killed agents' microtasks ran again elsewhere"
    elif scenario == "sigstop":
        assert ev["SIGSTOP -> lease expired"] is not None
        assert report.retries >= 1
    elif scenario == "broker_kill":
        assert ev["broker back -> coordinator reconnected"] is not None
        assert ev["broker back -> job progressing again"] is not None
    elif scenario == "coordinator_kill":
        assert report.facts["coordinator deaths"] == 3
        for i in (1, 2, 3):
            assert ev[f"death {i}: restart -> job resumed"] is not None
        assert report.facts["microtasks taken over after restarts"] > 0
    elif scenario == "network_cut":
        assert ev["cut 5s: cut -> a0 suspect"] is not None, "the cut agent got no new work"
    elif scenario == "lossy_link":
        assert report.facts["a0 false deaths"] == 0
    elif scenario == "redundancy":
        assert "a3" in report.facts["disagreed with the majority"], "the liar was reported"
        assert "a3" not in report.facts["per agent"], "no output of the liar was kept"
