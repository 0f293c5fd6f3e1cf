"""The binary tensor frame: same messages as JSON, strict, and malformed frames refused."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from protocol import (
    AgentShare,
    ErrorInfo,
    InferenceJob,
    JobResult,
    ProtocolError,
    RunTask,
    TaskResult,
    decode,
    encode,
    encode_arrays,
    is_binary,
    parse_task,
)
from protocol.codec import MAGIC


def run_task() -> RunTask:
    x = np.random.default_rng(0).random((300, 64)).astype(np.float32)
    flags = np.array([[True], [False]] * 150)
    return RunTask(
        task_id="j.1",
        job_id="j",
        attempt=2,
        model="m",
        lease_until=10.5,
        sent_at=9,
        inputs=encode_arrays({"input": x, "flags": flags}),
    )


@pytest.mark.parametrize(
    "msg",
    [
        run_task(),
        TaskResult(
            task_id="j.1",
            job_id="j",
            attempt=1,
            agent_id="a",
            ok=True,
            exec_ms=1.0,
            outputs=encode_arrays({"l": np.arange(5), "p": np.ones((5, 2), np.float16)}),
        ),
        InferenceJob(
            job_id="j", model="m", inputs=encode_arrays({"x": np.zeros((0, 3), np.uint8)})
        ),
        JobResult(
            job_id="j",
            ok=False,
            error=ErrorInfo(code="malformed", message="x"),
            per_agent={"a": AgentShare(samples=1, tasks=1)},
        ),
    ],
)
def test_binary_and_json_decode_to_the_same_message(msg: object) -> None:
    cls = type(msg)
    binary, text = encode(msg, "binary"), encode(msg, "json")  # type: ignore[arg-type]
    assert is_binary(binary) and not is_binary(text)
    assert decode(cls, binary) == decode(cls, text) == msg  # type: ignore[arg-type]


def test_binary_frame_is_smaller_and_parse_task_reads_it() -> None:
    msg = run_task()
    binary = encode(msg, "binary")
    assert len(binary) < 0.8 * len(encode(msg, "json"))
    assert parse_task(binary) == msg


def frame(header: object, *buffers: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<4sI", MAGIC, len(head)) + head + b"".join(buffers)


GOOD_HEADER = {
    "task_id": "j.1",
    "job_id": "j",
    "attempt": 1,
    "agent_id": "a",
    "ok": True,
    "outputs": {"y": {"dtype": "float32", "shape": [2], "data": 0}},
    "$buffers": [8],
}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (MAGIC + b"\x01", "shorter than its header"),
        (struct.pack("<4sI", MAGIC, 1000) + b"{}", "truncated"),
        (struct.pack("<4sI", MAGIC, 3) + b"{{{", "not JSON"),
        (frame({"a": 1}), "$buffers"),
        (frame({**GOOD_HEADER}, b"\x00" * 7), "header says 8"),
        (frame({**GOOD_HEADER, "$buffers": [-1]}), "$buffers"),
        (
            frame(
                {**GOOD_HEADER, "outputs": {"y": {"dtype": "float32", "shape": [2], "data": 5}}},
                b"\x00" * 8,
            ),
            "refers to no buffer",
        ),
        (
            frame(
                {**GOOD_HEADER, "outputs": {"y": {"dtype": "float32", "shape": [3], "data": 0}}},
                b"\x00" * 8,
            ),
            "need 12",
        ),
        (frame({**GOOD_HEADER, "attempt": "1"}, b"\x00" * 8), "attempt"),
        (frame([1, 2], b""), "$buffers"),
    ],
)
def test_malformed_frames_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as e:
        decode(TaskResult, payload)
    assert reason in str(e.value)
    assert decode(TaskResult, frame(GOOD_HEADER, b"\x00" * 8)).ok
