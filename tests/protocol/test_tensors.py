"""Tensor wire encoding: every dtype round-trips; malformed tensors are refused with a reason."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from protocol import DTYPES, ProtocolError, Tensor
from protocol.messages import RunTask


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_round_trips_through_json(dtype: str) -> None:
    rng = np.random.default_rng(1)
    arr = (rng.random((3, 5, 2)) * 100).astype(dtype)
    wire = Tensor.from_array(arr).model_dump_json()
    back = Tensor.model_validate_json(wire).to_array()
    assert back.dtype == arr.dtype
    assert back.shape == arr.shape
    assert np.array_equal(back, arr)


def test_big_endian_and_strided_arrays_are_sent_little_endian_contiguous() -> None:
    arr = np.arange(24, dtype=">f4").reshape(4, 6)[:, ::2]
    t = Tensor.from_array(arr)
    assert t.data == np.ascontiguousarray(arr, dtype="<f4").tobytes()
    assert np.array_equal(t.to_array(), arr)


def test_data_is_base64_of_raw_bytes_not_a_json_list() -> None:
    arr = np.array([[1.5, -2.0]], dtype=np.float32)
    doc = json.loads(Tensor.from_array(arr).model_dump_json())
    assert doc == {
        "dtype": "float32",
        "shape": [1, 2],
        "data": base64.b64encode(arr.tobytes()).decode(),
    }


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ({"dtype": "float32", "shape": [2], "data": "AAAA"}, "need 8"),
        ({"dtype": "complex64", "shape": [1], "data": "AAAAAAAAAAA="}, "dtype"),
        ({"dtype": "float32", "shape": [-1], "data": ""}, "shape"),
        ({"dtype": "float32", "shape": [1], "data": "not base64!"}, "base64"),
        ({"dtype": "float32", "shape": [1], "data": "AAAAAA==", "extra": 1}, "extra"),
        ({"dtype": "float32", "shape": [1] * 9, "data": "AAAAAA=="}, "shape"),
        ({"dtype": "float32", "shape": ["1"], "data": "AAAAAA=="}, "shape"),
    ],
)
def test_malformed_tensors_are_refused_with_the_reason(doc: dict[str, object], reason: str) -> None:
    payload = json.dumps(
        {
            "task_id": "t.0",
            "job_id": "t",
            "attempt": 1,
            "model": "m",
            "lease_until": 1.0,
            "sent_at": 1.0,
            "inputs": {"x": doc},
        }
    )
    with pytest.raises(ProtocolError) as e:
        RunTask.from_json(payload)
    assert reason in str(e.value)
    assert e.value.code == "malformed"
