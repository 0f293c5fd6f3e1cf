"""The vibration simulator: deterministic, continuous, and its faults look like faults."""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest

from coordinator.signals import (
    ANOMALY_KINDS,
    HOP,
    RATE_HZ,
    WINDOW,
    Anomaly,
    SensorStream,
    anomalous_windows,
    anomaly_overlap,
    normal_windows,
    schedule_anomalies,
)

Array = np.ndarray[Any, Any]


def test_defaults_are_the_monitoring_jobs() -> None:
    assert (WINDOW, HOP, RATE_HZ) == (128, 64, 100.0)
    assert len(ANOMALY_KINDS) >= 4 and len(set(ANOMALY_KINDS)) == len(ANOMALY_KINDS)


def test_same_seed_and_name_same_signal() -> None:
    a = SensorStream("pump-1", seed=5).read(2000)
    assert a.dtype == np.float32 and a.shape == (2000,)
    np.testing.assert_array_equal(a, SensorStream("pump-1", seed=5).read(2000))
    assert not np.allclose(a, SensorStream("pump-1", seed=6).read(2000))
    assert not np.allclose(a, SensorStream("pump-2", seed=5).read(2000))


def test_sensors_differ_in_speed_and_level() -> None:
    """Each sensor is its own machine: dominant frequency and RMS vary across the fleet."""
    peaks, levels = [], []
    for i in range(30):
        x = SensorStream(f"m{i}", seed=1).read(4096).astype(np.float64)
        spectrum = np.abs(np.fft.rfft(x - x.mean()))
        peaks.append(np.fft.rfftfreq(len(x), 1 / RATE_HZ)[np.argmax(spectrum)])
        levels.append(x.std())
    assert min(peaks) > 3.5 and max(peaks) < 8.5 and max(peaks) - min(peaks) > 2.0
    assert max(levels) / min(levels) > 1.4


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_reads_are_continuous_across_calls(kind: str) -> None:
    """read(50) + read(50) == read(100), also where an anomaly starts or ends mid-read."""
    anomalies = [Anomaly("s", kind, 0.37, 1.71), Anomaly("s", kind, 2.5, 3.0)]
    whole = SensorStream("s", seed=3, anomalies=anomalies).read(400)
    stream = SensorStream("s", seed=3, anomalies=anomalies)
    parts = []
    for n in itertools.cycle((50, 1, 13, 64, 0, 7)):
        if stream.samples_read >= 400:
            break
        parts.append(stream.read(min(n, 400 - stream.samples_read)))
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert stream.t == pytest.approx(4.0)


def test_no_phase_jumps_between_reads() -> None:
    stream = SensorStream("fan", seed=11)
    x = np.concatenate([stream.read(50) for _ in range(40)]).astype(np.float64)
    steps = np.abs(np.diff(x))
    boundaries = steps[49::50]
    # a sample-to-sample step at a read boundary is like any other step of the signal
    assert boundaries.max() <= steps.max()
    assert boundaries.mean() < 2 * steps.mean()


def test_time_and_labels() -> None:
    a = Anomaly("s", "imbalance", 1.0, 2.5)
    other = Anomaly("t", "cavitation", 0.0, 9.0)
    stream = SensorStream("s", seed=0, anomalies=[other, a])
    assert stream.anomalies == (a,)  # other sensors' anomalies are ignored
    assert stream.t == 0.0
    stream.read(150)
    assert stream.t == pytest.approx(1.5)
    assert stream.anomaly_at(0.99) is None
    assert stream.anomaly_at(1.0) == a and stream.labels_at(2.49) == a
    assert stream.anomaly_at(2.5) is None
    assert stream.window_label(0.5, 1.5) == (a, pytest.approx(0.5))
    assert anomaly_overlap([other, a], "s", 3.0, 4.0) == (None, 0.0)
    assert anomaly_overlap([other, a], "t", 3.0, 4.0) == (other, 1.0)


def test_invalid_anomalies_are_rejected() -> None:
    with pytest.raises(ValueError, match="kind"):
        Anomaly("s", "gremlins", 1.0, 2.0)
    with pytest.raises(ValueError, match="start"):
        Anomaly("s", "imbalance", 2.0, 1.0)
    with pytest.raises(ValueError, match="overlapping"):
        SensorStream(
            "s",
            seed=0,
            anomalies=[Anomaly("s", "imbalance", 1, 3), Anomaly("s", "looseness", 2, 4)],
        )


def test_schedule_is_deterministic_non_overlapping_and_inside_the_run() -> None:
    sensors = [f"s{i}" for i in range(40)]
    duration = 600.0
    schedule = schedule_anomalies(sensors, duration, seed=21)
    assert schedule == schedule_anomalies(sensors, duration, seed=21)
    assert schedule != schedule_anomalies(sensors, duration, seed=22)
    assert {a.kind for a in schedule} == set(ANOMALY_KINDS)
    assert [(a.start, a.sensor) for a in schedule] == sorted((a.start, a.sensor) for a in schedule)
    for sensor in sensors:
        mine = [a for a in schedule if a.sensor == sensor]
        assert mine, sensor
        for a in mine:
            assert a.start >= 5.0 and a.end <= duration
            assert 2.0 - 0.01 <= a.end - a.start <= 5.0 + 0.01
        for a, b in itertools.pairwise(mine):
            assert b.start - a.end >= 5.0 - 1e-9  # normal signal between two faults
    gaps = [
        b.start - a.end
        for s in sensors
        for a, b in itertools.pairwise([x for x in schedule if x.sensor == s])
    ]
    assert 20.0 < float(np.mean(gaps)) < 40.0  # mean_gap_s defaults to 30
    # one sensor's schedule does not depend on which other sensors are scheduled with it
    alone = schedule_anomalies(["s7"], duration, seed=21)
    assert alone == [a for a in schedule if a.sensor == "s7"]


def test_schedule_options() -> None:
    schedule = schedule_anomalies(
        ["a", "b"], 100.0, seed=1, mean_gap_s=8.0, min_len_s=1.0, max_len_s=1.5, warmup_s=20.0
    )
    assert schedule and all(a.start >= 20.0 and a.end - a.start <= 1.51 for a in schedule)
    only = schedule_anomalies(["a"], 300.0, seed=1, kinds=["sensor_stuck"])
    assert only and {a.kind for a in only} == {"sensor_stuck"}
    assert schedule_anomalies(["a"], 6.0, seed=1) == []


def test_window_helpers() -> None:
    normal = normal_windows(50, seed=4)
    assert normal.shape == (50, WINDOW) and normal.dtype == np.float32
    np.testing.assert_array_equal(normal, normal_windows(50, seed=4))
    windows, kinds = anomalous_windows(12, seed=4)
    assert windows.shape == (12, WINDOW) and windows.dtype == np.float32
    assert kinds == [ANOMALY_KINDS[i % len(ANOMALY_KINDS)] for i in range(12)]
    np.testing.assert_array_equal(windows, anomalous_windows(12, seed=4)[0])
    wide = normal_windows(64, 256, seed=4, per_sensor=3)
    assert wide.shape == (64, 256)


# --- the faults carry their physical signatures ----------------------------------------


def _spectrum(x: Array) -> tuple[Array, Array]:
    x = x.astype(np.float64) - x.mean()
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    return np.fft.rfftfreq(len(x), 1 / RATE_HZ), power


def _line(freqs: Array, power: Array, f: float) -> float:
    return float(power[np.abs(freqs - f) <= 0.6].sum())


def _kurtosis(x: Array) -> float:
    x = x.astype(np.float64) - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def _envelope_periodicity(x: Array) -> float:
    """Peak autocorrelation (lags 40..250 ms) of the envelope of the >= 18 Hz band."""
    spec = np.fft.fft(x.astype(np.float64) - x.mean())
    spec[np.fft.fftfreq(len(x), 1 / RATE_HZ) < 18.0] = 0.0  # analytic, high-passed
    envelope = np.abs(np.fft.ifft(2 * spec))
    e = envelope - envelope.mean()
    ac = np.correlate(e, e, "full")[len(e) - 1 :]
    return float(ac[4:25].max() / ac[0])


def _signature(kind: str, before: Array, during: Array) -> bool:
    """Whether ``during`` shows ``kind``'s textbook signature compared with ``before``."""
    fb, pb = _spectrum(before)
    f1 = float(fb[np.argmax(pb * (fb > 2.5))])  # running speed: strongest line above 2.5 Hz
    fd, pd = _spectrum(during)

    def high(f: Array, p: Array) -> float:
        return float(p[f >= 18.0].sum())

    if kind == "imbalance":  # 1x grows
        return _line(fd, pd, f1) > 2.5 * _line(fb, pb, f1)
    if kind == "misalignment":  # 2x grows relative to 1x
        return _line(fd, pd, 2 * f1) / _line(fd, pd, f1) > 4 * _line(fb, pb, 2 * f1) / _line(
            fb, pb, f1
        )
    if kind == "looseness":  # half-order sub-harmonics and a comb of many orders
        orders = [k / 2 for k in range(1, 9) if k != 2]

        def lines(f: Array, p: Array) -> int:
            return sum(_line(f, p, o * f1) > 1e-2 * _line(f, p, f1) for o in orders)

        return _line(fd, pd, 0.5 * f1) > 10 * _line(fb, pb, 0.5 * f1) and lines(fd, pd) > lines(
            fb, pb
        )
    if kind == "bearing_fault":  # impacts ring the resonance, repeating at the ball pass
        periodic = _envelope_periodicity(during) > _envelope_periodicity(before)
        return high(fd, pd) > 4 * high(fb, pb) and periodic
    if kind == "cavitation":  # broadband high-frequency noise
        return (
            high(fd, pd) > 4 * high(fb, pb)
            and float(np.mean(pd[fd >= 18.0] > pb[fb >= 18.0])) > 0.8
        )
    if kind == "sensor_stuck":
        return float(np.ptp(during)) == 0.0
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_each_fault_shows_its_signature(kind: str) -> None:
    """On 40 machines (90 % must show it), 384 samples inside the fault versus 384 before."""
    n = 384
    shown = 0
    for i in range(40):
        start = 6.0 + 0.37 * i
        a = Anomaly(f"m{i}", kind, start, start + 4.0)
        x = SensorStream(a.sensor, seed=8, anomalies=[a]).read(int((start + 5) * RATE_HZ))
        s0 = math.ceil(start * RATE_HZ)
        before, during = x[s0 - n - 10 : s0 - 10], x[s0 + 10 : s0 + 10 + n]
        shown += _signature(kind, before, during)
    assert shown >= 36


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_anomalous_windows_differ_statistically_from_normal_ones(kind: str) -> None:
    """Kolmogorov-Smirnov distance of a kind-relevant statistic, over 200 windows each."""
    normal = normal_windows(200, seed=31).astype(np.float64)
    faulty = anomalous_windows(200, seed=31, kinds=[kind], min_inside=1.0)[0].astype(np.float64)

    def stat(w: Array) -> Array:
        wc = w - w.mean(axis=1, keepdims=True)
        freqs = np.fft.rfftfreq(w.shape[1], 1 / RATE_HZ)
        power = np.abs(np.fft.rfft(wc * np.hanning(w.shape[1]), axis=1)) ** 2
        total = power.sum(axis=1) + 1e-12
        if kind in ("imbalance", "sensor_stuck"):
            return np.asarray(np.log(wc.std(axis=1) + 1e-6))  # level
        if kind in ("bearing_fault", "cavitation"):
            return np.asarray(np.log(power[:, freqs >= 18.0].sum(axis=1) / total + 1e-12))
        # misalignment, looseness: energy outside the strongest line (1x) and its neighbours
        peak = np.argmax(power, axis=1)
        near = np.abs(np.arange(power.shape[1])[None, :] - peak[:, None]) <= 2
        return np.asarray(np.log((power * ~near).sum(axis=1) / total + 1e-12))

    a, b = np.sort(stat(normal)), np.sort(stat(faulty))
    grid = np.concatenate([a, b])
    ks = np.max(
        np.abs(
            np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)
        )
    )
    assert ks > 0.5  # the distributions barely overlap (p << 1e-10 at 200 vs 200)
