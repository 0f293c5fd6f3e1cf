"""Monitoring jobs without a broker: reading readings, cutting windows, debounced verdicts."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from coordinator.monitor import (
    BadReading,
    Monitor,
    Outcome,
    ReadingParser,
    SensorStream,
    SensorVerdicts,
)
from protocol import MonitorJob, ReadingFormat, TensorSpec, Verdict, parse_submission


def spec(**changes: object) -> MonitorJob:
    base: dict[str, object] = {
        "job_id": "m1",
        "sources": ["plant/+/+"],
        "reading": ReadingFormat(field="values", ts_field="ts", rate_hz=100.0),
        "window": 8,
        "hop": 4,
        "model": "toy",
        "verdict": Verdict(threshold=0.5, raise_after=2, clear_after=2),
    }
    base.update(changes)
    return MonitorJob.model_validate(base)


# -- readings -----------------------------------------------------------------------------------


def test_json_chunk_with_timestamps_and_topic_sensor() -> None:
    p = ReadingParser(ReadingFormat(field="values", ts_field="ts", rate_hz=100.0))
    r = p.parse("plant/site-a/vib-01", b'{"ts": 10.0, "values": [1, 2.5, -3]}', arrival=99.0)
    assert r.sensor == "vib-01"
    assert r.values.dtype == np.float32
    np.testing.assert_array_equal(r.values, [1.0, 2.5, -3.0])
    np.testing.assert_allclose(r.ts, [10.0, 10.01, 10.02])


def test_single_number_nested_field_sensor_field_and_arrival_time() -> None:
    fmt = ReadingFormat(field="data.temp", sensor_field="meta.id")
    r = ReadingParser(fmt).parse("x/y", b'{"data": {"temp": 21.5}, "meta": {"id": "t-7"}}', 5.0)
    assert (r.sensor, r.values.tolist(), r.ts.tolist()) == ("t-7", [21.5], [5.0])


def test_packed_and_text_encodings() -> None:
    r = ReadingParser(ReadingFormat(encoding="float32le", sensor_level=1)).parse(
        "s/acc-3/raw", struct.pack("<3f", 1.0, 2.0, 3.0), 1.0
    )
    assert (r.sensor, r.values.tolist()) == ("acc-3", [1.0, 2.0, 3.0])
    r = ReadingParser(ReadingFormat(encoding="int16le")).parse("s/a", struct.pack("<2h", -5, 7), 1)
    assert r.values.tolist() == [-5.0, 7.0]
    r = ReadingParser(ReadingFormat(encoding="text")).parse("s/t1", b" 42.25\n", 1.0)
    assert r.values.tolist() == [42.25]


@pytest.mark.parametrize(
    ("fmt", "topic", "payload", "reason"),
    [
        (ReadingFormat(field="values"), "p/s", b"{not json", "not_json"),
        (ReadingFormat(field="values"), "p/s", b'{"other": 1}', "no_field"),
        (ReadingFormat(field="values"), "p/s", b'{"values": "12"}', "not_a_number"),
        (ReadingFormat(field="values"), "p/s", b'{"values": [1, "2"]}', "not_a_number"),
        (ReadingFormat(field="values"), "p/s", b'{"values": [1, true]}', "not_a_number"),
        (ReadingFormat(field="values"), "p/s", b'{"values": [1, NaN]}', "not_a_number"),
        (ReadingFormat(field="values"), "p/s", b'{"values": {"a": 1}}', "wrong_type"),
        (ReadingFormat(field="values"), "p/s", b'{"values": [[1, 2]]}', "wrong_type"),
        (ReadingFormat(field="values"), "p/s", b'{"values": null}', "wrong_type"),
        (ReadingFormat(field="values"), "p/s", b'{"values": []}', "wrong_length"),
        (ReadingFormat(field="values", length=3), "p/s", b'{"values": [1, 2]}', "wrong_length"),
        (
            ReadingFormat(field="values", max_values=2),
            "p/s",
            b'{"values": [1,2,3]}',
            "wrong_length",
        ),
        (ReadingFormat(field="values", sensor_level=5), "p/s", b'{"values": [1]}', "bad_sensor"),
        (ReadingFormat(field="values"), "p/s+x", b'{"values": [1]}', "bad_sensor"),
        (ReadingFormat(field="v", ts_field="t"), "p/s", b'{"v": 1, "t": "now"}', "bad_timestamp"),
        (ReadingFormat(encoding="float32le"), "p/s", b"\x00\x00\x80", "wrong_length"),
        (ReadingFormat(encoding="float64le"), "p/s", b"\x00" * 7 + b"\x7f" * 8, "wrong_length"),
        (ReadingFormat(encoding="text"), "p/s", b"hot", "not_a_number"),
        (ReadingFormat(field="values"), "p/s", b"[" * 100_000, "not_json"),
    ],
)
def test_malformed_readings_name_their_reason(
    fmt: ReadingFormat, topic: str, payload: bytes, reason: str
) -> None:
    with pytest.raises(BadReading) as e:
        ReadingParser(fmt).parse(topic, payload, 1.0)
    assert e.value.reason == reason
    assert e.value.detail


# -- windows ------------------------------------------------------------------------------------


def test_windows_are_cut_every_hop_across_message_boundaries() -> None:
    stream = SensorStream(size=8, hop=4)
    values = np.arange(30, dtype=np.float32)
    out = []
    for chunk in np.array_split(values, 7):  # uneven chunks
        out += stream.push(chunk, chunk.astype(np.float64) / 100)
    assert [seq for seq, *_ in out] == list(range(6))  # (30 - 8) // 4 + 1
    for seq, win, t0, t1 in out:
        np.testing.assert_array_equal(win, values[seq * 4 : seq * 4 + 8])
        assert (t0, t1) == pytest.approx((seq * 4 / 100, (seq * 4 + 7) / 100))


def test_a_hop_longer_than_the_window_skips_values() -> None:
    stream = SensorStream(size=3, hop=5)
    values = np.arange(23, dtype=np.float32)
    out = []
    for chunk in np.array_split(values, 6):
        out += stream.push(chunk, chunk.astype(np.float64))
    assert [w.tolist() for _, w, _, _ in out] == [
        [0, 1, 2],
        [5, 6, 7],
        [10, 11, 12],
        [15, 16, 17],
        [20, 21, 22],
    ]


def test_a_long_stream_keeps_bounded_memory() -> None:
    stream = SensorStream(size=128, hop=64)
    n = 0
    for k in range(2000):
        chunk = np.full(10, k, dtype=np.float32)
        n += len(stream.push(chunk, np.zeros(10)))
    assert n == (20_000 - 128) // 64 + 1
    assert stream._values.size <= 2 * 128 + 1024


# -- verdicts -----------------------------------------------------------------------------------


def outcome(m: Monitor, seq: int, score: float | None) -> Outcome:
    from coordinator.monitor import Window

    w = Window("m1", "s1", seq, np.zeros(8, np.float32), seq, seq + 1, 0.0, 1e9)
    return Outcome(w, score, "a0", 1.0)


def test_debounce_and_hysteresis_in_window_order() -> None:
    v = SensorVerdicts(Verdict(threshold=0.5, clear_threshold=0.3, raise_after=2, clear_after=2))
    m = Monitor(spec=spec(), alert_topic="x")
    scores = [0.1, 0.9, 0.1, 0.9, 0.9, 0.4, 0.2, 0.45, 0.2, 0.1]
    #          -    +    reset +   + RAISE  held(>0.3) clear1 held  clear1 CLEAR
    events = []
    # Deliver out of order: every odd window before the even one preceding it.
    order = []
    for i in range(0, len(scores), 2):
        order += [i + 1, i] if i + 1 < len(scores) else [i]
    for i in order:
        events += [(k, o.window.seq) for k, o in v.add(outcome(m, i, scores[i]))]
    assert events == [("anomaly", 4), ("cleared", 9)]
    assert v.since == 3  # the streak began at window 3 (t_start == seq here)
    assert not v.alarming


def test_a_failed_window_neither_raises_nor_clears_but_lets_later_ones_through() -> None:
    v = SensorVerdicts(Verdict(threshold=0.5, raise_after=2))
    m = Monitor(spec=spec(), alert_topic="x")
    assert v.add(outcome(m, 1, 0.9)) == []  # waits for window 0
    assert [k for k, _ in v.add(outcome(m, 0, None))] == []
    assert [k for k, _ in v.add(outcome(m, 2, 0.9))] == ["anomaly"]


def test_monitor_counts_missed_failed_and_alerts() -> None:
    m = Monitor(spec=spec(), alert_topic="alerts/m1")
    m.bind_model(
        [TensorSpec(name="window", dtype="float32", shape=[None, 8])],
        [TensorSpec(name="score", dtype="float32", shape=[None, 1])],
    )
    windows = []
    for k in range(3):
        payload = json.dumps({"ts": k * 0.04, "values": list(range(k * 4, k * 4 + 4))}).encode()
        windows += m.on_reading("plant/a/s1", payload, now=10.0, wall=1000.0)
    assert [w.seq for w in windows] == [0, 1]  # values 0-7 and 4-11
    windows += m.on_reading("plant/a/s1", b'{"ts": 0.12, "values": [1, 2, 3, 4]}', 10.0, 1000.0)
    assert m.on_reading("plant/a/s1", b'{"values": "x"}', 10.0, 1000.0) == []
    assert [w.seq for w in windows] == [0, 1, 2]
    late = windows[1].deadline + 0.5
    alerts = m.on_outcomes(
        [Outcome(windows[0], 0.9, "a0", 10.1), Outcome(windows[1], 0.8, "a1", late)], 1000.0
    )
    assert [a.kind for a in alerts] == ["anomaly"]
    assert alerts[0].sensor == "s1" and alerts[0].agent_id == "a1" and alerts[0].late
    st = m.stats()
    assert (st.windows, st.processed, st.missed, st.alerts, st.alarming) == (3, 2, 1, 1, 1)
    assert st.malformed == {"not_a_number": 1}
    assert st.readings == 16 and st.per_agent == {"a0": 1, "a1": 1}
    huge = b'{"values": [' + b"1.0," * 100_000 + b"1.0]}"  # over 64 B x max_values + 64 KiB
    assert m.on_reading("plant/a/s1", huge, 10.0, 1000.0) == []
    assert m.malformed["too_large"] == 1


def test_model_binding_checks_input_and_output() -> None:
    m = Monitor(spec=spec(window=128), alert_topic="x")
    out = [TensorSpec(name="score", dtype="float32", shape=[None, 1])]
    m.bind_model([TensorSpec(name="w", dtype="float32", shape=[None, 1, 128])], out)
    assert m.input_shape == (1, 128)
    m.bind_model([TensorSpec(name="w", dtype="float32", shape=[None, None])], out)
    assert m.input_shape == (128,)
    with pytest.raises(ValueError, match="does not fit"):
        m.bind_model([TensorSpec(name="w", dtype="float32", shape=[None, 64])], out)
    with pytest.raises(ValueError, match="not a float"):
        m.bind_model([TensorSpec(name="w", dtype="int64", shape=[None, 128])], out)
    with pytest.raises(ValueError, match="no output 'score'"):
        m.bind_model(
            [TensorSpec(name="w", dtype="float32", shape=[None, 128])],
            [TensorSpec(name="label", dtype="int64", shape=[None])],
        )
    with pytest.raises(ValueError, match="say which one"):
        m.bind_model(
            [
                TensorSpec(name="a", dtype="float32", shape=[None, 128]),
                TensorSpec(name="b", dtype="float32", shape=[None, 128]),
            ],
            out,
        )


def test_submissions_parse_by_type_and_refuse_bad_monitor_specs() -> None:
    ok = spec().model_dump_json().encode()
    assert parse_submission(ok).type == "monitor"
    assert parse_submission(b'{"type": "stop", "job_id": "m1"}').type == "stop"
    for bad in [
        {"window": 0},
        {"hop": 0},
        {"sources": []},
        {"verdict": {"threshold": float("nan")}},
        {"verdict": {"threshold": 1, "op": "=="}},
        {"deadline_ms": 0},
        {"reading": {"encoding": "csv"}},
        {"reading": {"field": "a..b"}},
        {"job_id": "a/b"},
    ]:
        doc = json.loads(ok)
        doc.update(bad)
        with pytest.raises(Exception, match="invalid job"):
            parse_submission(json.dumps(doc).encode())
