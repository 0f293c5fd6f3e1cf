"""Messages are strict, versioned, and documented by JSON Schema."""

from __future__ import annotations

import json

import pytest

from protocol import (
    AgentState,
    ModelError,
    ModelInfo,
    ProtocolError,
    TensorSpec,
    Topics,
    check_id,
    json_schemas,
    parse_task,
)
from protocol.messages import ALL_MESSAGES, CancelTask, RunTask


def test_every_message_has_a_json_schema_with_version_and_type() -> None:
    schemas = json_schemas()
    assert set(schemas) == {m.model_fields["type"].default for m in ALL_MESSAGES}
    for name, schema in schemas.items():
        assert "v" in schema["properties"], name
        assert schema.get("additionalProperties") is False, name


def test_unknown_fields_wrong_types_and_wrong_version_are_refused() -> None:
    base = {"agent_id": "a1", "online": False, "seq": 3, "ts": 1.0}
    assert AgentState.from_json(json.dumps(base)).seq == 3
    for bad in (
        {**base, "surprise": 1},
        {**base, "seq": "3"},
        {**base, "v": 2},
        {**base, "seq": -1},
    ):
        with pytest.raises(ProtocolError):
            AgentState.from_json(json.dumps(bad))
    with pytest.raises(ProtocolError):
        AgentState.from_json(b"\xff\xfe not json")


def test_task_topic_carries_run_or_cancel() -> None:
    cancel = CancelTask(task_id="j.1", attempt=2)
    assert parse_task(cancel.to_json()) == cancel
    with pytest.raises(ProtocolError, match="type"):
        parse_task(b'{"type": "explode", "task_id": "j.1"}')
    assert isinstance(
        parse_task(
            RunTask(
                task_id="j.0", job_id="j", attempt=1, model="m", inputs={}, lease_until=1, sent_at=1
            ).to_json()
        ),
        RunTask,
    )


def test_topics_are_built_and_parsed_in_one_place() -> None:
    t = Topics("site/v1")
    assert t.tasks("a-1") == "site/v1/agents/a-1/tasks"
    assert t.parse_agent(t.results("a-1")) == ("a-1", "results")
    assert t.all_agents("state") == "site/v1/agents/+/state"
    for bad in ("site/v1/agents/a-1/other", "site/v1/agents//results", "elsewhere/a/results"):
        with pytest.raises(ProtocolError):
            t.parse_agent(bad)
    for bad_id in ("+", "#", "a/b", "", "x" * 200, "-leading"):
        with pytest.raises(ProtocolError):
            check_id(bad_id)
    with pytest.raises(ProtocolError):
        Topics("root/#")


def test_input_check_names_the_input_and_what_was_expected() -> None:
    info = ModelInfo(
        id="m",
        sha256="0" * 64,
        size=1,
        inputs=[TensorSpec(name="input", dtype="float32", shape=[None, 64])],
        outputs=[],
    )
    info.check_inputs({"input": ("float32", (5, 64))})
    with pytest.raises(ModelError, match=r"'input': expected shape \['N', 64\], got \[5, 32\]"):
        info.check_inputs({"input": ("float32", (5, 32))})
    with pytest.raises(ModelError, match="expected dtype float32, got float64"):
        info.check_inputs({"input": ("float64", (5, 64))})
    with pytest.raises(ModelError, match=r"missing \['input'\], unexpected \['x'\]"):
        info.check_inputs({"x": ("float32", (5, 64))})
