"""Births and deaths are ordered by sequence number; a late death never overrides a newer birth."""

from __future__ import annotations

from coordinator.registry import CostModel, Registry
from protocol import AgentState, Capabilities, Heartbeat, ModelInfo, TensorSpec


def caps(**kw: object) -> Capabilities:
    base: dict[str, object] = dict(
        hostname="h",
        arch="x86_64",
        platform="Linux",
        cpu_count=2,
        memory_total=1,
        memory_available=1,
        onnxruntime="1",
        providers=["CPUExecutionProvider"],
        slots=1,
    )
    base.update(kw)
    return Capabilities(**base)  # type: ignore[arg-type]


def state(seq: int, online: bool) -> AgentState:
    return AgentState(
        agent_id="a", online=online, seq=seq, ts=1.0, capabilities=caps() if online else None
    )


def test_stale_death_after_newer_birth_is_ignored() -> None:
    reg = Registry()
    assert reg.apply_state(state(5, True))[1] == "born"
    assert reg.apply_state(state(6, True))[1] == "reborn"  # restarted: new session
    assert reg.apply_state(state(5, False))[1] == "stale"  # the old session's Last Will
    assert reg.agents["a"].online
    assert reg.stale_states == 1
    assert reg.apply_state(state(6, False))[1] == "died"
    assert not reg.agents["a"].online
    assert reg.apply_state(state(7, True))[1] == "reborn"


def test_heartbeats_of_an_older_session_are_ignored() -> None:
    reg = Registry()
    reg.apply_state(state(5, True))
    hb = dict(
        agent_id="a",
        ts=1.0,
        cpu_percent=1.0,
        memory_available=1,
        running=0,
        queued=0,
        slots=1,
        completed=0,
    )
    assert reg.apply_heartbeat(Heartbeat(seq=4, **hb)) is None  # type: ignore[arg-type]
    assert reg.apply_heartbeat(Heartbeat(seq=5, draining=True, **hb)) is not None  # type: ignore[arg-type]
    assert reg.agents["a"].draining and not reg.agents["a"].available


def test_cost_model_starts_from_the_benchmark_and_follows_observations() -> None:
    info = ModelInfo(
        id="m",
        sha256="0" * 64,
        size=1,
        outputs=[],
        inputs=[TensorSpec(name="x", dtype="float32", shape=[None])],
        cost=[(1, 0.05), (64, 0.68)],
    )
    cost = CostModel.from_info(info)
    assert abs(cost.per_sample_ms - 0.01) < 1e-9
    assert abs(cost.estimate(100) - 1.04) < 1e-9
    # Many batch-1 tasks that take 0.2 ms (cold caches): the overhead absorbs it...
    for _ in range(50):
        cost.observe(1, 0.2)
    assert abs(cost.estimate(1) - 0.2) < 0.01
    assert cost.per_sample_ms < 0.015, "...not the per-sample cost of large batches"
    # The device slows down 4x: large microtasks move the per-sample cost.
    for _ in range(50):
        cost.observe(1000, 0.2 + 1000 * 0.04)
    assert abs(cost.per_sample_ms - 0.04) < 0.002
    assert abs(cost.estimate(1000) - 40.2) < 1.0
