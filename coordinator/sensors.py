"""A sensor simulator for demos, tests and benchmarks: vibration sensors on MQTT.

``edge-offload sensors`` publishes N sensors of :mod:`coordinator.signals` (100 Hz
machine vibration with labelled faults) as JSON chunks::

    {prefix}/{site}/{sensor}   {"ts": 1766400000.12, "values": [0.8132, ...]}

``ts`` is the time of the first value (epoch seconds; with ``speed`` > 1 the sensors'
clock runs ahead of the wall clock by that factor); the values are ``rate_hz`` apart. The
labelled anomalies (sensor, kind, start, end on the same clock) are returned, and written
to a JSON file by the CLI, so that alerts can be scored against them (:func:`evaluate`).
Malformed messages can be injected between the regular ones to exercise the
monitoring job's input checks without disturbing the signal.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from coordinator.signals import HOP, RATE_HZ, WINDOW, Anomaly, SensorStream, schedule_anomalies
from protocol import Alert, BrokerAddress, MonitorJob, ReadingFormat, Verdict
from protocol.transport import Link, cancel_and_wait

logger = logging.getLogger(__name__)

# Injected in turn when ``malformed_every`` is set, with the reason a monitoring job
# should count each under.
MALFORMED: tuple[tuple[str, bytes], ...] = (
    ("not_json", b"\x00\xffgarbage"),
    ("not_a_number", b'{"ts": 1.0, "values": ["high", 1.0]}'),
    ("wrong_type", b'{"ts": 1.0, "values": {"x": 1.0}}'),
    ("no_field", b'{"ts": 1.0, "reading": [1.0, 2.0]}'),
    ("wrong_length", b'{"ts": 1.0, "values": []}'),
)


@dataclass(frozen=True)
class SimulatorConfig:
    sensors: int = 20
    rate_hz: float = RATE_HZ
    chunk: int = 10  # values per message
    duration_s: float = 60.0  # of sensor time
    speed: float = 1.0  # sensor seconds per wall-clock second
    prefix: str = "plant"
    sites: int = 2
    seed: int = 1
    mean_gap_s: float = 30.0  # between one sensor's anomalies, on average
    malformed_every: int = 0  # one malformed message after every N regular ones (0: none)
    qos: int = 0

    def names(self) -> list[str]:
        return [f"vib-{i:02d}" for i in range(1, self.sensors + 1)]

    def site(self, index: int) -> str:
        k = index % self.sites
        return f"site-{chr(ord('a') + k)}" if self.sites <= 26 else f"site-{k}"

    def topic(self, index: int, name: str) -> str:
        return f"{self.prefix}/{self.site(index)}/{name}"


@dataclass
class SimulationReport:
    """What a run published: its anomalies on the sensors' clock, and counts."""

    start: float  # epoch seconds of sensor time 0
    anomalies: list[Anomaly]
    messages: int = 0
    values: dict[str, int] = field(default_factory=dict)  # per sensor
    malformed: Counter[str] = field(default_factory=Counter)
    topics: dict[str, str] = field(default_factory=dict)  # sensor -> topic

    def labels(self) -> list[dict[str, Any]]:
        """Anomalies with absolute times (the clock of the published ``ts``)."""
        return [
            {**asdict(a), "start": self.start + a.start, "end": self.start + a.end}
            for a in self.anomalies
        ]


def monitor_spec(
    job_id: str,
    config: SimulatorConfig,
    *,
    model: str = "vibration-anomaly",
    threshold: float,
    raise_after: int = 2,
    clear_after: int = 2,
    deadline_ms: float = 1000.0,
    **options: Any,
) -> MonitorJob:
    """A monitoring job over the simulator's sensors (windows of 128 every 64 values)."""
    return MonitorJob(
        job_id=job_id,
        sources=[f"{config.prefix}/+/+"],
        reading=ReadingFormat(field="values", ts_field="ts", rate_hz=config.rate_hz),
        window=WINDOW,
        hop=HOP,
        model=model,
        verdict=Verdict(
            output="score", threshold=threshold, raise_after=raise_after, clear_after=clear_after
        ),
        deadline_ms=deadline_ms,
        **options,
    )


class SensorSimulator:
    """Publishes ``config.sensors`` simulated sensors until ``duration_s`` of sensor time."""

    def __init__(self, broker: BrokerAddress, config: SimulatorConfig) -> None:
        self.config = config
        self.address = broker
        names = config.names()
        self.anomalies = schedule_anomalies(
            names, config.duration_s, seed=config.seed, mean_gap_s=config.mean_gap_s
        )
        self.streams = [
            SensorStream(n, rate_hz=config.rate_hz, seed=config.seed, anomalies=self.anomalies)
            for n in names
        ]
        self.report = SimulationReport(
            start=0.0,
            anomalies=self.anomalies,
            topics={n: config.topic(i, n) for i, n in enumerate(names)},
        )
        self._link = Link(
            address=broker,
            client_id=f"sensors-{config.prefix}-{config.seed}",
            subscriptions=[],
            on_message=lambda topic, payload: None,
        )

    async def run(self) -> SimulationReport:
        cfg = self.config
        runner = asyncio.create_task(self._link.run(raise_first=True))
        try:
            await asyncio.wait_for(self._link.connected.wait(), 30)
            period = cfg.chunk / cfg.rate_hz  # sensor seconds per message
            chunks = int(cfg.duration_s / period)
            start_wall = time.time()
            self.report.start = start_wall
            started = time.monotonic()
            values = self.report.values
            for k in range(chunks):
                # Publish chunk k once the sensors have "measured" it.
                due = started + (k + 1) * period / cfg.speed
                if (delay := due - time.monotonic()) > 0:
                    await asyncio.sleep(delay)
                ts = start_wall + k * period
                for stream in self.streams:
                    samples = stream.read(cfg.chunk)
                    payload = json.dumps(
                        {"ts": round(ts, 4), "values": [round(float(v), 4) for v in samples]},
                        separators=(",", ":"),
                    ).encode()
                    self._publish(self.report.topics[stream.sensor], payload)
                    values[stream.sensor] = values.get(stream.sensor, 0) + cfg.chunk
                    self.report.messages += 1
                    if cfg.malformed_every and self.report.messages % cfg.malformed_every == 0:
                        reason, bad = MALFORMED[self.report.malformed.total() % len(MALFORMED)]
                        self._publish(self.report.topics[stream.sensor], bad)
                        self.report.malformed[reason] += 1
            # Let the last publishes leave before disconnecting.
            await asyncio.sleep(0.2)
        finally:
            await cancel_and_wait([runner])
        return self.report

    def _publish(self, topic: str, payload: bytes) -> None:
        if not self._link.publish_nowait(topic, payload, qos=self.config.qos):
            logger.warning("sensor message on %s not sent: not connected", topic)


@dataclass
class Evaluation:
    anomalies: int
    detected: int
    alerts: int
    false_alerts: int
    sensor_hours: float
    missed: list[dict[str, Any]]

    @property
    def recall(self) -> float:
        return self.detected / self.anomalies if self.anomalies else 1.0

    @property
    def false_per_sensor_hour(self) -> float:
        return self.false_alerts / self.sensor_hours if self.sensor_hours else 0.0


def evaluate(
    labels: Sequence[dict[str, Any]],
    alerts: Iterable[Alert],
    *,
    sensors: int,
    duration_s: float,
    tail_s: float = WINDOW / RATE_HZ,
) -> Evaluation:
    """Score anomaly alerts against labels (both on the sensors' clock).

    A labelled anomaly is detected when an ``anomaly`` alert of its sensor has a window
    overlapping ``[start, end + tail_s]`` (a window still holds faulty samples up to a
    window length after the fault ends). An anomaly alert overlapping no label is false.
    """
    by_sensor: dict[str, list[dict[str, Any]]] = {}
    for label in labels:
        by_sensor.setdefault(label["sensor"], []).append(label)
    hit: set[int] = set()
    n_alerts = false = 0
    for alert in alerts:
        if alert.kind != "anomaly" or alert.sensor is None:
            continue
        n_alerts += 1
        t0 = alert.window_start if alert.window_start is not None else alert.ts
        t1 = alert.window_end if alert.window_end is not None else alert.ts
        matched = False
        for label in by_sensor.get(alert.sensor, []):
            if t0 <= label["end"] + tail_s and t1 >= label["start"]:
                hit.add(id(label))
                matched = True
        false += not matched
    missed = [label for label in labels if id(label) not in hit]
    return Evaluation(
        anomalies=len(labels),
        detected=len(labels) - len(missed),
        alerts=n_alerts,
        false_alerts=false,
        sensor_hours=sensors * duration_s / 3600,
        missed=missed,
    )


def expected_windows(values: int, window: int = WINDOW, hop: int = HOP) -> int:
    """Windows a stream of ``values`` values yields."""
    return 0 if values < window else (values - window) // hop + 1
