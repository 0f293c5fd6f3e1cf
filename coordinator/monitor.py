"""Monitoring jobs: sensor readings in, windows out, verdicts and alerts back.

Everything here is synchronous and runs on the coordinator's event loop; the service turns
the windows into microtasks (coordinator/service.py) and hands their outputs back.

    reading (MQTT) -> ReadingParser -> SensorStream (per sensor: ring buffer, cuts windows)
        -> Window -> microtask on an agent -> score
        -> SensorVerdicts (per sensor, in window order: debounce, hysteresis) -> Alert
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol import (
    Alert,
    MonitorJob,
    MonitorStats,
    MonitorStatus,
    MonitorSummary,
    ReadingFormat,
    TensorSpec,
    Verdict,
)
from protocol.messages import MonitorState

logger = logging.getLogger(__name__)

_SENSOR_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")
_TEMPLATE_RE = re.compile(r"\{(sensor|-?\d+)\}")
_PACKED = {"float32le": "<f4", "float64le": "<f8", "int16le": "<i2"}
# Latencies kept for the percentiles in the job's status.
LATENCY_WINDOW = 10_000


class BadReading(Exception):
    """A sensor message that cannot be used; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _lookup(doc: Any, path: str) -> Any:
    """The value at a dotted JSON path (object keys, list indices); KeyError if absent."""
    for part in path.split("."):
        if isinstance(doc, dict):
            doc = doc[part]
        elif isinstance(doc, list) and part.lstrip("-").isdigit():
            try:
                doc = doc[int(part)]
            except IndexError:
                raise KeyError(part) from None
        else:
            raise KeyError(part)
    return doc


def _is_number(x: Any) -> bool:
    return type(x) in (int, float)  # not bool, not a numeric string


@dataclass(slots=True)
class Reading:
    sensor: str
    values: np.ndarray[Any, np.dtype[np.float32]]
    ts: np.ndarray[Any, np.dtype[np.float64]]  # one timestamp per value


class ReadingParser:
    """Reads a sensor key, values and timestamps out of one MQTT message."""

    def __init__(self, fmt: ReadingFormat) -> None:
        self.fmt = fmt

    def parse(self, topic: str, payload: bytes, arrival: float) -> Reading:
        fmt = self.fmt
        doc: Any = None
        if fmt.encoding == "json" or fmt.sensor_field or fmt.ts_field:
            if fmt.encoding in _PACKED or fmt.encoding == "text":
                doc = None  # fields only exist in JSON payloads
            else:
                try:
                    doc = json.loads(payload)
                except (ValueError, UnicodeDecodeError) as e:
                    raise BadReading("not_json", f"payload is not JSON: {e}") from None
                except RecursionError:
                    raise BadReading("not_json", "payload nests too deeply") from None
        sensor = self._sensor(topic, doc)
        values = self._values(payload, doc)
        if fmt.length is not None and values.size != fmt.length:
            raise BadReading(
                "wrong_length", f"expected {fmt.length} values per message, got {values.size}"
            )
        if values.size > fmt.max_values:
            raise BadReading(
                "wrong_length", f"{values.size} values in one message (limit {fmt.max_values})"
            )
        if not np.isfinite(values).all():
            raise BadReading("not_a_number", "a value is NaN or infinite")
        ts0 = arrival
        if fmt.ts_field is not None and doc is not None:
            try:
                raw = _lookup(doc, fmt.ts_field)
            except (KeyError, TypeError):
                raw = None
            if raw is not None:
                if not _is_number(raw) or not math.isfinite(raw) or raw < 0:
                    raise BadReading("bad_timestamp", f"{fmt.ts_field} is not a time: {raw!r}")
                ts0 = float(raw)
        if fmt.rate_hz:
            ts = ts0 + np.arange(values.size, dtype=np.float64) / fmt.rate_hz
        else:
            ts = np.full(values.size, ts0, dtype=np.float64)
        return Reading(sensor=sensor, values=values.astype(np.float32, copy=False), ts=ts)

    def _sensor(self, topic: str, doc: Any) -> str:
        fmt = self.fmt
        if fmt.sensor_field is not None:
            try:
                sensor = _lookup(doc, fmt.sensor_field)
            except (KeyError, TypeError):
                raise BadReading("bad_sensor", f"no {fmt.sensor_field!r} in the payload") from None
        else:
            levels = topic.split("/")
            try:
                sensor = levels[fmt.sensor_level]
            except IndexError:
                raise BadReading(
                    "bad_sensor", f"topic {topic!r} has no level {fmt.sensor_level}"
                ) from None
        if not isinstance(sensor, str) or not _SENSOR_RE.match(sensor):
            raise BadReading(
                "bad_sensor", f"sensor key {str(sensor)[:80]!r} is not 1-128 of [A-Za-z0-9_.:-]"
            )
        return sensor

    def _values(self, payload: bytes, doc: Any) -> np.ndarray[Any, Any]:
        fmt = self.fmt
        if fmt.encoding in _PACKED:
            dtype = np.dtype(_PACKED[fmt.encoding])
            if len(payload) == 0 or len(payload) % dtype.itemsize:
                raise BadReading(
                    "wrong_length",
                    f"{len(payload)} bytes is not a whole number of {fmt.encoding} values",
                )
            if len(payload) > fmt.max_values * dtype.itemsize:
                raise BadReading("wrong_length", f"{len(payload)} bytes in one message")
            return np.frombuffer(payload, dtype=dtype).astype(np.float64)
        if fmt.encoding == "text":
            try:
                value = float(payload.decode("ascii").strip())
            except (ValueError, UnicodeDecodeError):
                raise BadReading(
                    "not_a_number", f"payload is not a number: {payload[:40]!r}"
                ) from None
            return np.array([value])
        value = doc
        if fmt.field is not None:
            try:
                value = _lookup(doc, fmt.field)
            except (KeyError, TypeError):
                raise BadReading("no_field", f"no {fmt.field!r} in the payload") from None
        if _is_number(value):
            return np.array([value], dtype=np.float64)
        if isinstance(value, list):
            if len(value) > fmt.max_values:
                raise BadReading("wrong_length", f"{len(value)} values in one message")
            if not value:
                raise BadReading("wrong_length", "an empty array of values")
            if not all(_is_number(x) for x in value):
                bad = next(x for x in value if not _is_number(x))
                reason = "wrong_type" if isinstance(bad, list | dict) else "not_a_number"
                raise BadReading(reason, f"array holds {type(bad).__name__} {str(bad)[:40]!r}")
            return np.array(value, dtype=np.float64)
        if isinstance(value, dict | None):
            raise BadReading("wrong_type", f"value is {type(value).__name__}, not a number")
        raise BadReading("not_a_number", f"value is {type(value).__name__} {str(value)[:40]!r}")


@dataclass(slots=True, eq=False)
class Window:
    """One window of one sensor, on its way to a verdict."""

    job_id: str
    sensor: str
    seq: int  # per sensor, from 0
    values: np.ndarray[Any, np.dtype[np.float32]]
    t_start: float
    t_end: float
    completed: float  # monotonic: arrival of its last reading
    deadline: float  # monotonic
    require: tuple[tuple[str, str], ...] = ()
    prefer: tuple[tuple[str, str], ...] = ()


class SensorStream:
    """A sensor's recent values; cuts a window of ``size`` every ``hop`` values."""

    def __init__(self, size: int, hop: int) -> None:
        self.size = size
        self.hop = hop
        self._values = np.empty(2 * size + 1024, dtype=np.float32)
        self._ts = np.empty_like(self._values, dtype=np.float64)
        self._base = 0  # absolute index of _values[0]
        self._n = 0  # values held
        self._next = 0  # absolute index where the next window starts
        self.seq = 0

    def push(
        self, values: np.ndarray[Any, Any], ts: np.ndarray[Any, Any]
    ) -> list[tuple[int, np.ndarray[Any, Any], float, float]]:
        """Add values; returns the windows completed: (seq, values, t_first, t_last)."""
        # Drop what no future window needs, then make room.
        drop = min(self._next - self._base, self._n)
        if drop > 0:
            self._values[: self._n - drop] = self._values[drop : self._n]
            self._ts[: self._n - drop] = self._ts[drop : self._n]
            self._n -= drop
            self._base += drop
        skip = self._next - self._base - self._n  # a hop beyond the window skips values
        if skip > 0:
            cut = min(skip, values.size)
            values, ts = values[cut:], ts[cut:]
            self._base += cut
        need = self._n + values.size
        if need > self._values.size:
            grown = max(need, 2 * self._values.size)
            self._values = np.resize(self._values, grown)
            self._ts = np.resize(self._ts, grown)
        self._values[self._n : need] = values
        self._ts[self._n : need] = ts
        self._n = need
        out = []
        while self._next + self.size <= self._base + self._n:
            i = self._next - self._base
            out.append(
                (
                    self.seq,
                    self._values[i : i + self.size].copy(),
                    float(self._ts[i]),
                    float(self._ts[i + self.size - 1]),
                )
            )
            self.seq += 1
            self._next += self.hop
        return out


@dataclass(slots=True)
class Outcome:
    """A window's verdict input: its score, or None when no agent could run it."""

    window: Window
    score: float | None
    agent_id: str | None
    decided: float  # monotonic
    # Why there is no score: "failed" (no agent could run it) or "shed" (backlog full).
    why: str = "failed"


def _compare(op: str, x: float, threshold: float) -> bool:
    if op == ">":
        return x > threshold
    if op == ">=":
        return x >= threshold
    if op == "<":
        return x < threshold
    return x <= threshold


class SensorVerdicts:
    """Debounce and hysteresis for one sensor, applied in window order.

    Windows of a sensor may finish out of order (they run on different agents); their
    outcomes wait here until every earlier window has one.
    """

    def __init__(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self.next_seq = 0
        self.waiting: dict[int, Outcome] = {}
        self.alarming = False
        self.streak = 0
        self.clear_streak = 0
        self.since: float | None = None

    def add(self, outcome: Outcome) -> list[tuple[str, Outcome]]:
        """Returns ("anomaly" | "cleared", outcome) transitions, in window order."""
        self.waiting[outcome.window.seq] = outcome
        out: list[tuple[str, Outcome]] = []
        while (o := self.waiting.pop(self.next_seq, None)) is not None:
            self.next_seq += 1
            if o.score is None:
                continue  # a window that could not be judged neither raises nor clears
            v = self.verdict
            if not self.alarming:
                if _compare(v.op, o.score, v.threshold):
                    if self.streak == 0:
                        self.since = o.window.t_start
                    self.streak += 1
                    if self.streak >= v.raise_after:
                        self.alarming, self.streak, self.clear_streak = True, 0, 0
                        out.append(("anomaly", o))
                else:
                    self.streak = 0
            else:
                clear_at = v.threshold if v.clear_threshold is None else v.clear_threshold
                if _compare(v.op, o.score, clear_at):
                    self.clear_streak = 0
                else:
                    self.clear_streak += 1
                    if self.clear_streak >= v.clear_after:
                        self.alarming, self.clear_streak = False, 0
                        out.append(("cleared", o))
        return out


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.fromiter(values, float), q)) if values else None


@dataclass(eq=False)
class Sensor:
    stream: SensorStream
    verdicts: SensorVerdicts
    require: tuple[tuple[str, str], ...]
    prefer: tuple[tuple[str, str], ...]


@dataclass(eq=False)
class Monitor:
    """A running monitoring job."""

    spec: MonitorJob
    alert_topic: str
    started: float = field(default_factory=time.time)
    state: MonitorState = "running"
    sensors: dict[str, Sensor] = field(default_factory=dict)
    malformed: Counter[str] = field(default_factory=Counter)
    counts: Counter[str] = field(default_factory=Counter)
    per_agent: Counter[str] = field(default_factory=Counter)
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    alert_latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    last_error: str | None = None
    # The model input that takes the window, and its shape per window.
    input_name: str | None = None
    input_dtype: str = "float32"
    input_shape: tuple[int, ...] = ()
    # Windows handed to agents and not decided yet.
    outstanding: int = 0

    def __post_init__(self) -> None:
        self.parser = ReadingParser(self.spec.reading)
        self._deadline_s = self.spec.deadline_ms / 1000
        # A sensor message is parsed on the event loop: bound it by what it may hold
        # (a JSON number takes at most ~32 bytes), not by the coordinator's job limit.
        self.max_payload = 64 * self.spec.reading.max_values + 65536

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    # -- readings -> windows ----------------------------------------------------------------
    def on_reading(self, topic: str, payload: bytes, now: float, wall: float) -> list[Window]:
        """Cut the windows a sensor message completes; a bad message is counted and skipped."""
        self.counts["messages"] += 1
        try:
            if len(payload) > self.max_payload:
                raise BadReading(
                    "too_large",
                    f"{len(payload)} bytes for at most {self.spec.reading.max_values} values",
                )
            reading = self.parser.parse(topic, payload, wall)
            sensor = self.sensors.get(reading.sensor)
            if sensor is None:
                sensor = self._new_sensor(reading.sensor, topic)
        except BadReading as e:
            self.malformed[e.reason] += 1
            self.last_error = f"{topic}: {e.detail}"
            if self.malformed.total() <= 10 or self.malformed.total() % 1000 == 0:
                logger.warning(
                    "monitor %s: skipped a reading on %s (%s: %s); %d skipped so far",
                    self.job_id,
                    topic,
                    e.reason,
                    e.detail,
                    self.malformed.total(),
                )
            return []
        self.counts["readings"] += reading.values.size
        windows = []
        for seq, values, t0, t1 in sensor.stream.push(reading.values, reading.ts):
            windows.append(
                Window(
                    job_id=self.job_id,
                    sensor=reading.sensor,
                    seq=seq,
                    values=values,
                    t_start=t0,
                    t_end=t1,
                    completed=now,
                    deadline=now + self._deadline_s,
                    require=sensor.require,
                    prefer=sensor.prefer,
                )
            )
        self.counts["windows"] += len(windows)
        return windows

    def _new_sensor(self, name: str, topic: str) -> Sensor:
        if len(self.sensors) >= self.spec.max_sensors:
            raise BadReading(
                "too_many_sensors", f"sensor {name!r} beyond max_sensors={self.spec.max_sensors}"
            )
        levels = topic.split("/")

        def fill(template: str) -> str:
            def sub(m: re.Match[str]) -> str:
                key = m.group(1)
                if key == "sensor":
                    return name
                try:
                    return levels[int(key)]
                except IndexError:
                    raise BadReading(
                        "bad_sensor", f"placement uses level {key}; topic {topic!r} has none"
                    ) from None

            return _TEMPLATE_RE.sub(sub, template)

        rule = self.spec.placement
        sensor = Sensor(
            stream=SensorStream(self.spec.window, self.spec.hop),
            verdicts=SensorVerdicts(self.spec.verdict),
            require=tuple(sorted((k, fill(v)) for k, v in rule.require.items())),
            prefer=tuple(sorted((k, fill(v)) for k, v in rule.prefer.items())),
        )
        self.sensors[name] = sensor
        return sensor

    # -- model -------------------------------------------------------------------------------
    def bind_model(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        """Check the model fits the job: raises ValueError naming what does not."""
        spec = self.spec
        if spec.input is None:
            if len(inputs) != 1:
                raise ValueError(
                    f"model {spec.model} has inputs {[i.name for i in inputs]}; "
                    "say which one takes the window ('input')"
                )
            tensor = inputs[0]
        else:
            found = [i for i in inputs if i.name == spec.input]
            if not found:
                raise ValueError(
                    f"model {spec.model} has no input {spec.input!r} "
                    f"(inputs: {[i.name for i in inputs]})"
                )
            if len(inputs) != 1:
                raise ValueError(
                    f"model {spec.model} takes {len(inputs)} inputs; a monitoring job feeds one"
                )
            tensor = found[0]
        if not tensor.dtype.startswith("float"):
            raise ValueError(f"model input {tensor.name!r} is {tensor.dtype}, not a float type")
        rest = tensor.shape[1:]
        if any(d is None for d in rest[:-1]):
            raise ValueError(
                f"model input {tensor.name!r} has shape {tensor.shape}: only its last axis "
                "may be dynamic"
            )
        fixed = math.prod(d for d in rest if d is not None)
        if rest and rest[-1] is None:
            shape = (*[d for d in rest[:-1] if d is not None], spec.window // max(fixed, 1))
        else:
            shape = tuple(d for d in rest if d is not None)
        if math.prod(shape) != spec.window:
            raise ValueError(
                f"model input {tensor.name!r} takes {['N', *rest]} per batch; a window of "
                f"{spec.window} values does not fit"
            )
        names = [o.name for o in outputs]
        if spec.verdict.output not in names:
            raise ValueError(
                f"model {spec.model} has no output {spec.verdict.output!r} (outputs: {names})"
            )
        out = next(o for o in outputs if o.name == spec.verdict.output)
        per_window = math.prod(d for d in out.shape[1:] if d is not None)
        if all(d is not None for d in out.shape[1:]) and spec.verdict.index >= per_window:
            raise ValueError(
                f"output {out.name!r} has {per_window} values per window; index "
                f"{spec.verdict.index} is out of range"
            )
        self.input_name = tensor.name
        self.input_dtype = tensor.dtype
        self.input_shape = shape

    def batch(self, windows: Sequence[Window]) -> np.ndarray[Any, Any]:
        """The windows as one model input batch."""
        arr = np.stack([w.values for w in windows]).reshape(len(windows), *self.input_shape)
        return arr.astype(self.input_dtype, copy=False)

    def scores(self, outputs: dict[str, np.ndarray[Any, Any]], n: int) -> list[float | None]:
        """The verdict's value for each of ``n`` windows (None where it is not a number)."""
        arr = outputs.get(self.spec.verdict.output)
        if arr is None or arr.shape[0] != n:
            self.last_error = f"model output {self.spec.verdict.output!r} missing or short"
            return [None] * n
        flat = arr.reshape(n, -1)
        if self.spec.verdict.index >= flat.shape[1]:
            self.last_error = f"model output has no index {self.spec.verdict.index}"
            return [None] * n
        col = flat[:, self.spec.verdict.index].astype(np.float64)
        return [float(x) if math.isfinite(x) else None for x in col]

    # -- outcomes -> alerts ------------------------------------------------------------------
    def on_outcomes(self, outcomes: Sequence[Outcome], wall: float) -> list[Alert]:
        alerts = []
        for o in outcomes:
            w = o.window
            latency = (o.decided - w.completed) * 1000
            if o.score is None:
                self.counts[o.why] += 1
            else:
                self.counts["processed"] += 1
                self.latencies.append(latency)
                if o.agent_id is not None:
                    self.per_agent[o.agent_id] += 1
                if _compare(self.spec.verdict.op, o.score, self.spec.verdict.threshold):
                    self.counts["positive"] += 1
            if o.decided > w.deadline:
                self.counts["missed"] += 1
            sensor = self.sensors.get(w.sensor)
            if sensor is None:
                continue
            for kind, t in sensor.verdicts.add(o):
                alerts.append(self._alert(kind, t, sensor, wall))
        return alerts

    def _alert(self, kind: str, o: Outcome, sensor: Sensor, wall: float) -> Alert:
        w = o.window
        latency = max((time.monotonic() - w.completed) * 1000, 0.0)
        self.alert_latencies.append(latency)
        self.counts["alerts" if kind == "anomaly" else "cleared"] += 1
        v = self.spec.verdict
        text = (
            f"{w.sensor}: {v.output} {o.score:.4g} {v.op} {v.threshold:g} "
            f"for {v.raise_after} window(s)"
            if kind == "anomaly"
            else f"{w.sensor}: back to normal"
        )
        if kind == "anomaly":
            logger.info("monitor %s: ALERT %s (agent %s)", self.job_id, text, o.agent_id)
        return Alert(
            kind="anomaly" if kind == "anomaly" else "cleared",
            job_id=self.job_id,
            sensor=w.sensor,
            agent_id=o.agent_id,
            window_start=w.t_start,
            window_end=w.t_end,
            since=sensor.verdicts.since if kind == "anomaly" else None,
            score=o.score,
            threshold=v.threshold,
            latency_ms=latency,
            late=o.decided > w.deadline,
            message=text,
            ts=wall,
        )

    # -- reporting ---------------------------------------------------------------------------
    def stats(self) -> MonitorStats:
        c = self.counts
        return MonitorStats(
            sensors=len(self.sensors),
            readings=c["readings"],
            messages=c["messages"],
            malformed=dict(self.malformed),
            windows=c["windows"],
            processed=c["processed"],
            missed=c["missed"],
            failed=c["failed"],
            shed=c["shed"],
            positive=c["positive"],
            alerts=c["alerts"],
            cleared=c["cleared"],
            alarming=sum(s.verdicts.alarming for s in self.sensors.values()),
            per_agent=dict(self.per_agent),
            latency_ms_p50=_percentile(self.latencies, 50),
            latency_ms_p99=_percentile(self.latencies, 99),
            alert_latency_ms_p50=_percentile(self.alert_latencies, 50),
            alert_latency_ms_p99=_percentile(self.alert_latencies, 99),
        )

    def status(self) -> MonitorStatus:
        return MonitorStatus(
            job_id=self.job_id,
            state=self.state,
            model=self.spec.model,
            sources=list(self.spec.sources),
            alert_topic=self.alert_topic,
            started=self.started,
            ts=time.time(),
            stats=self.stats(),
            last_error=self.last_error[:2000] if self.last_error else None,
        )

    def summary(self) -> MonitorSummary:
        c = self.counts
        return MonitorSummary(
            job_id=self.job_id,
            state=self.state,
            model=self.spec.model,
            sources=list(self.spec.sources),
            sensors=len(self.sensors),
            windows=c["windows"],
            processed=c["processed"],
            missed=c["missed"],
            alerts=c["alerts"],
            alarming=sum(s.verdicts.alarming for s in self.sensors.values()),
            client_id=self.spec.client_id,
        )
