"""Seeded 100 Hz machine-vibration signals with labelled anomalies (pure numpy).

A :class:`SensorStream` is one accelerometer-style velocity sensor (mm/s) on a rotating
machine: the 1x rotation component and its 2x/3x harmonics, whose amplitude and speed
follow a slow load drift; a structural resonance excited by ambient broadband energy; and
sensor noise. Every sensor draws its own speed, harmonic amplitudes, resonance and noise
level from its seed and name, so a fleet of sensors looks like a fleet of different
machines. Anomalies are physical fault signatures injected over labelled time spans:

* ``imbalance``: the 1x component grows (mass imbalance is a once-per-turn force).
* ``misalignment``: a strong 2x (and some 3x) component appears.
* ``looseness``: many harmonics and half-order sub-harmonics, and a waveform truncated on
  one side where a loose part hits its stop.
* ``bearing_fault``: impacts at the bearing's ball-pass frequency, each ringing the
  structure's resonance.
* ``cavitation``: bursts of broadband high-frequency noise (a pump starved at its inlet).
* ``sensor_stuck``: the output freezes at its last value (a failed sensor or cable).

The signal is a pure function of the sample index and of noise drawn sequentially, so
``read(50)`` followed by ``read(50)`` returns exactly what ``read(100)`` would.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ANOMALY_KINDS",
    "HOP",
    "RATE_HZ",
    "WINDOW",
    "Anomaly",
    "SensorStream",
    "anomalous_windows",
    "anomaly_overlap",
    "normal_windows",
    "schedule_anomalies",
]

# The monitoring job's defaults: 1.28 s windows every 0.64 s of a 100 Hz stream.
RATE_HZ = 100.0
WINDOW = 128
HOP = 64

ANOMALY_KINDS: tuple[str, ...] = (
    "imbalance",
    "misalignment",
    "looseness",
    "bearing_fault",
    "cavitation",
    "sensor_stuck",
)

MIN_NORMAL_GAP_S = 5.0  # normal signal kept between two anomalies of one sensor
FADE_S = 0.1  # raised-cosine onset and release of additive faults (no step discontinuity)
_RESONANCE_TAPS = 48
_CAVITATION_TAPS = 15

Array = np.ndarray[Any, np.dtype[np.float64]]


@dataclass(frozen=True)
class Anomaly:
    """A labelled fault on one sensor, in seconds of that sensor's time (0 = first sample)."""

    sensor: str
    kind: str
    start: float
    end: float

    def __post_init__(self) -> None:
        if self.kind not in ANOMALY_KINDS:
            raise ValueError(f"unknown anomaly kind {self.kind!r}; one of {ANOMALY_KINDS}")
        if not (0.0 <= self.start < self.end) or not math.isfinite(self.end):
            raise ValueError(f"anomaly span must satisfy 0 <= start < end: {self}")

    def overlap(self, start: float, end: float) -> float:
        """Seconds of ``[start, end)`` that lie inside this anomaly."""
        return max(0.0, min(end, self.end) - max(start, self.start))


def _name_key(sensor: str) -> int:
    return zlib.crc32(sensor.encode("utf-8"))


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, *keys]))


def _damped_resonance(freq_hz: float, decay_s: float, rate_hz: float, taps: int) -> Array:
    """Unit-energy impulse response of a lightly damped structural mode (an FIR kernel)."""
    k = np.arange(taps) / rate_hz
    h = np.exp(-k / decay_s) * np.sin(2 * np.pi * freq_hz * k)
    out: Array = h / float(np.sqrt(np.sum(h * h)))
    return out


def _bandpass(low_hz: float, high_hz: float, rate_hz: float, taps: int) -> Array:
    """Unit-energy windowed-sinc band-pass FIR kernel."""
    n = np.arange(taps) - (taps - 1) / 2
    lo, hi = low_hz / rate_hz, min(high_hz / rate_hz, 0.5)
    h = 2 * hi * np.sinc(2 * hi * n) - 2 * lo * np.sinc(2 * lo * n)
    h *= np.hanning(taps + 2)[1:-1]
    out: Array = h / float(np.sqrt(np.sum(h * h)))
    return out


def _envelope(idx: np.ndarray[Any, Any], s0: int, s1: int, fade: int) -> Array:
    """1 inside [s0, s1), raised-cosine ramps of ``fade`` samples inside both ends."""
    env = np.ones(len(idx))
    if fade > 0:
        up = (idx - s0 + 0.5) / fade
        down = (s1 - idx - 0.5) / fade
        ramp = np.clip(np.minimum(up, down), 0.0, 1.0)
        env = 0.5 - 0.5 * np.cos(np.pi * ramp)
    env[(idx < s0) | (idx >= s1)] = 0.0
    return env


@dataclass(frozen=True)
class _Machine:
    """Per-sensor randomised machine: what makes one sensor's normal signal its own."""

    f0: float  # rotation frequency, Hz
    phase0: float
    a1: float  # 1x peak velocity, mm/s
    harmonics: tuple[tuple[float, float], ...]  # (amplitude, phase) for 2x, 3x
    noise: float  # sensor noise sd, mm/s
    ambient: float  # sd of the resonance's response to ambient excitation, mm/s
    res_hz: float  # structural resonance
    res_decay_s: float
    slip: float  # fractional speed drop per unit of load increase
    drift: tuple[tuple[float, float, float], ...]  # (amplitude, freq Hz, phase) of load

    @classmethod
    def draw(cls, rng: np.random.Generator) -> _Machine:
        """A random healthy machine."""

        def u(lo: float, hi: float) -> float:
            return float(rng.uniform(lo, hi))

        def phase() -> float:
            return float(rng.uniform(0, 2 * np.pi))

        f0 = u(4.0, 8.0)
        a1 = u(0.8, 1.5)
        harmonics = ((a1 * u(0.10, 0.30), phase()), (a1 * u(0.03, 0.12), phase()))
        drift_total = u(0.05, 0.15)
        weights = rng.dirichlet(np.ones(3))
        drift = tuple((drift_total * float(w), u(1 / 120, 1 / 15), phase()) for w in weights)
        return cls(
            f0=f0,
            phase0=phase(),
            a1=a1,
            harmonics=harmonics,
            noise=a1 * u(0.03, 0.07),
            ambient=a1 * u(0.03, 0.07),
            res_hz=u(24.0, 40.0),
            res_decay_s=u(0.04, 0.08),
            slip=u(0.05, 0.15),
            drift=drift,
        )

    def load(self, t: Array) -> Array:
        """Relative load, 1 +- drift: scales the rotation components."""
        out = np.ones_like(t)
        for amp, freq, ph in self.drift:
            out += amp * np.sin(2 * np.pi * freq * t + ph)
        return out

    def phase(self, t: Array) -> Array:
        """Rotation angle (rad): the integral of a speed that drops slightly under load."""
        cycles = self.f0 * t
        for amp, freq, ph in self.drift:
            # integral of -slip * amp * sin(2 pi freq tau + ph) over [0, t]
            w = 2 * np.pi * freq
            cycles += self.f0 * self.slip * amp * (np.cos(w * t + ph) - np.cos(ph)) / w
        return 2 * np.pi * cycles + self.phase0


class _Fault:
    """One anomaly on one stream: its sample span and its precomputed contribution."""

    def __init__(
        self, anomaly: Anomaly, machine: _Machine, rate_hz: float, rng: np.random.Generator
    ) -> None:
        self.anomaly = anomaly
        self.kind = anomaly.kind
        self.s0 = math.ceil(anomaly.start * rate_hz - 1e-9)
        self.s1 = max(self.s0 + 1, math.ceil(anomaly.end * rate_hz - 1e-9))
        self.clip_level = 0.0
        self.clip_softness = 0.0
        # Additive part over [s0, s0 + len(add)); a ring-down may outlast s1.
        self.add: Array = np.zeros(0)
        idx = np.arange(self.s0, self.s1)
        t = idx / rate_hz
        env = _envelope(idx, self.s0, self.s1, round(FADE_S * rate_hz))
        m = machine
        load = m.load(t)
        phase = m.phase(t)
        if self.kind == "imbalance":
            # 1x grows to a severity no healthy machine of the fleet reaches
            gain = float(rng.uniform(2.8, 4.5)) / m.a1
            self.add = env * (gain - 1) * m.a1 * load * np.sin(phase)
        elif self.kind == "misalignment":
            a2 = m.a1 * float(rng.uniform(0.7, 1.2))
            a3 = m.a1 * float(rng.uniform(0.2, 0.45))
            p2, p3 = rng.uniform(0, 2 * np.pi, size=2)
            self.add = env * load * (a2 * np.sin(2 * phase + p2) + a3 * np.sin(3 * phase + p3))
        elif self.kind == "looseness":
            level = float(rng.uniform(0.2, 0.35))
            wave = np.zeros_like(t)
            # orders 0.5, 1.5, 2, 2.5, 3, ... below 45 Hz, decaying with order
            for half in range(1, int(2 * 45.0 / m.f0) + 1):
                order = half / 2
                if order == 1:
                    continue
                amp = m.a1 * level * order**-0.5 * (0.6 if half % 2 else 1.0)
                wave += amp * np.sin(order * phase + float(rng.uniform(0, 2 * np.pi)))
            self.add = env * load * wave
            # the loose part hits its stop: one side of the waveform is truncated
            self.clip_level = m.a1 * float(rng.uniform(0.3, 0.55))
            self.clip_softness = 0.15
        elif self.kind == "bearing_fault":
            self.add = self._bearing(anomaly, m, rate_hz, rng, env)
        elif self.kind == "cavitation":
            taps = _CAVITATION_TAPS
            white = rng.standard_normal(len(idx) + taps - 1)
            band = np.convolve(white, _bandpass(18.0, 48.0, rate_hz, taps), mode="valid")
            # bursts: a slowly fluctuating, always-present intensity
            n_knots = max(2, int((t[-1] - t[0]) * 6) + 2)
            knots = rng.uniform(0.5, 1.5, size=n_knots)
            burst = np.interp(np.linspace(0, n_knots - 1, len(idx)), np.arange(n_knots), knots)
            level = m.a1 * float(rng.uniform(0.3, 0.55))
            self.add = env * level * burst * band
        elif self.kind != "sensor_stuck":  # pragma: no cover - Anomaly validates kinds
            raise ValueError(self.kind)

    @staticmethod
    def _bearing(
        anomaly: Anomaly,
        m: _Machine,
        rate_hz: float,
        rng: np.random.Generator,
        env: Array,
    ) -> Array:
        """Outer-race defect: one impact per ball pass, each ringing the resonance."""
        # ball-pass frequency: a non-integer order, kept where 100 Hz still resolves impacts
        order = float(rng.uniform(2.6, 4.4))
        fbp = min(order * m.f0, 20.0)
        order = fbp / m.f0
        peak = m.a1 * float(rng.uniform(0.7, 1.1))
        decay = m.res_decay_s * float(rng.uniform(0.6, 1.0))
        tail = round(6 * decay * rate_hz)
        s0 = math.ceil(anomaly.start * rate_hz - 1e-9)
        n = len(env)
        idx = np.arange(s0, s0 + n + tail)
        t = idx / rate_hz
        # impact k happens when the rotation has turned k / order times
        cycles = (m.phase(t) - m.phase0) / (2 * np.pi) * order
        c0, c1 = math.ceil(cycles[0]), math.floor(cycles[n - 1])
        out = np.zeros(n + tail)
        env_full = np.concatenate([env, np.zeros(tail)])
        for k in range(c0, c1 + 1):
            j = int(np.searchsorted(cycles, k))
            # sub-sample impact time from the phase, plus slip jitter of a few percent
            frac = (k - cycles[j - 1]) / (cycles[j] - cycles[j - 1]) if j > 0 else 0.0
            when = (j - 1 + frac if j > 0 else 0.0) / rate_hz
            when += float(rng.normal(0, 0.02)) / fbp
            amp = peak * env_full[min(j, n - 1)] * float(rng.uniform(0.7, 1.3))
            tau = np.arange(n + tail) / rate_hz - when
            ring = np.where(tau >= 0, np.exp(-np.maximum(tau, 0) / decay), 0.0)
            out += amp * ring * np.sin(2 * np.pi * m.res_hz * np.maximum(tau, 0))
        return out


class SensorStream:
    """One simulated vibration sensor: call :meth:`read` for its next samples.

    Args:
        sensor: the sensor's name; with ``seed`` it determines the simulated machine.
        rate_hz: sampling rate.
        seed: any integer; the same (seed, sensor, anomalies) give the same samples.
        anomalies: labelled faults to inject; entries for other sensors are ignored, so a
            whole :func:`schedule_anomalies` list can be passed to every stream.
    """

    def __init__(
        self,
        sensor: str,
        *,
        rate_hz: float = RATE_HZ,
        seed: int,
        anomalies: Sequence[Anomaly] = (),
    ) -> None:
        if rate_hz <= 0:
            raise ValueError("rate_hz must be positive")
        self.sensor = sensor
        self.rate_hz = float(rate_hz)
        key = _name_key(sensor)
        machine_ss, noise_ss, ambient_ss = np.random.SeedSequence(
            [seed & 0xFFFFFFFFFFFFFFFF, key]
        ).spawn(3)
        self._machine = _Machine.draw(np.random.default_rng(machine_ss))
        self._noise = np.random.default_rng(noise_ss)
        self._ambient = np.random.default_rng(ambient_ss)
        m = self._machine
        self._res_kernel = _damped_resonance(m.res_hz, m.res_decay_s, self.rate_hz, _RESONANCE_TAPS)
        self._ambient_hist = self._ambient.standard_normal(_RESONANCE_TAPS - 1)
        mine = sorted((a for a in anomalies if a.sensor == sensor), key=lambda a: a.start)
        for a, b in itertools.pairwise(mine):
            if b.start < a.end:
                raise ValueError(f"overlapping anomalies on {sensor!r}: {a} and {b}")
        self.anomalies: tuple[Anomaly, ...] = tuple(mine)
        self._faults = [
            _Fault(a, m, self.rate_hz, _rng(seed, key, round(a.start * 1e6), _name_key(a.kind)))
            for a in mine
        ]
        self._i = 0  # index of the next sample
        self._last = 0.0  # last emitted value (what a stuck sensor keeps repeating)

    @property
    def t(self) -> float:
        """Sensor time (s) of the next sample :meth:`read` returns."""
        return self._i / self.rate_hz

    @property
    def samples_read(self) -> int:
        return self._i

    def read(self, n: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        """The next ``n`` samples as float32 (mm/s)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        if n == 0:
            return np.zeros(0, dtype=np.float32)
        m = self._machine
        i0, i1 = self._i, self._i + n
        idx = np.arange(i0, i1)
        t = idx / self.rate_hz
        load = m.load(t)
        phase = m.phase(t)
        x = m.a1 * load * np.sin(phase)
        for order, (amp, ph) in enumerate(m.harmonics, start=2):
            x += amp * load * np.sin(order * phase + ph)
        white = self._ambient.standard_normal(n)
        hist = np.concatenate([self._ambient_hist, white])
        x += m.ambient * np.convolve(hist, self._res_kernel, mode="valid")
        self._ambient_hist = hist[-(_RESONANCE_TAPS - 1) :]
        x += m.noise * self._noise.standard_normal(n)
        stuck: list[_Fault] = []
        for f in self._faults:
            lo, hi = max(i0, f.s0), min(i1, f.s0 + max(len(f.add), f.s1 - f.s0))
            if lo >= hi:
                continue
            if f.kind == "sensor_stuck":
                stuck.append(f)
                continue
            if len(f.add):
                x[lo - i0 : hi - i0] += f.add[lo - f.s0 : hi - f.s0]
            if f.clip_level > 0:
                seg = slice(max(i0, f.s0) - i0, min(i1, f.s1) - i0)
                env = _envelope(idx[seg], f.s0, f.s1, round(FADE_S * self.rate_hz))
                v = x[seg]
                over = np.maximum(v - f.clip_level, 0.0)
                x[seg] = v - env * over * (1 - f.clip_softness)
        for f in stuck:
            lo, hi = max(i0, f.s0), min(i1, f.s1)
            held = float(x[lo - i0 - 1]) if lo > i0 else self._last
            x[lo - i0 : hi - i0] = held
        out = x.astype(np.float32)
        self._last = float(out[-1])
        self._i = i1
        return out

    def anomaly_at(self, t: float) -> Anomaly | None:
        """The anomaly this sensor is in at sensor time ``t``, if any."""
        for a in self.anomalies:
            if a.start <= t < a.end:
                return a
        return None

    labels_at = anomaly_at

    def window_label(self, start: float, end: float) -> tuple[Anomaly | None, float]:
        """The anomaly covering most of ``[start, end)`` and the fraction it covers."""
        return anomaly_overlap(self.anomalies, self.sensor, start, end)


def anomaly_overlap(
    anomalies: Sequence[Anomaly], sensor: str, start: float, end: float
) -> tuple[Anomaly | None, float]:
    """Of ``sensor``'s anomalies, the one covering most of ``[start, end)`` and that fraction."""
    best: Anomaly | None = None
    best_s = 0.0
    for a in anomalies:
        if a.sensor == sensor:
            s = a.overlap(start, end)
            if s > best_s:
                best, best_s = a, s
    return best, (best_s / (end - start) if end > start else 0.0)


def schedule_anomalies(
    sensors: Sequence[str],
    duration_s: float,
    *,
    seed: int,
    mean_gap_s: float = 30.0,
    min_len_s: float = 2.0,
    max_len_s: float = 5.0,
    warmup_s: float = 5.0,
    kinds: Sequence[str] = ANOMALY_KINDS,
) -> list[Anomaly]:
    """Random, non-overlapping anomalies for each sensor within ``[warmup_s, duration_s]``.

    Gaps between one sensor's anomalies are at least 5 s of normal signal and
    ``mean_gap_s`` on average; kinds are drawn uniformly from ``kinds``. Each sensor's
    schedule depends only on ``seed`` and its name. Sorted by start time, then sensor.
    """
    if not (0 < min_len_s <= max_len_s):
        raise ValueError("need 0 < min_len_s <= max_len_s")
    for k in kinds:
        if k not in ANOMALY_KINDS:
            raise ValueError(f"unknown anomaly kind {k!r}")
    spread = max(mean_gap_s - MIN_NORMAL_GAP_S, 0.0)
    out: list[Anomaly] = []
    for sensor in sensors:
        rng = _rng(seed, _name_key(sensor), 0x5CED)
        t = warmup_s + float(rng.uniform(0, mean_gap_s))
        while True:
            length = float(rng.uniform(min_len_s, max_len_s))
            if t + length > duration_s:
                break
            start, end = round(t, 2), round(t + length, 2)
            out.append(Anomaly(sensor, str(kinds[int(rng.integers(len(kinds)))]), start, end))
            t = end + MIN_NORMAL_GAP_S + (float(rng.exponential(spread)) if spread else 0.0)
    out.sort(key=lambda a: (a.start, a.sensor))
    return out


def _windows_of(stream: SensorStream, starts: Sequence[int], size: int) -> np.ndarray[Any, Any]:
    """Windows of ``size`` samples starting at the given (increasing) sample indices."""
    out = np.empty((len(starts), size), dtype=np.float32)
    for j, s in enumerate(starts):
        if s > stream.samples_read:
            stream.read(s - stream.samples_read)
        out[j] = stream.read(size)
    return out


def normal_windows(
    n: int, size: int = WINDOW, *, seed: int, per_sensor: int = 8
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """``n`` windows of normal signal, ``per_sensor`` each from distinct simulated sensors.

    Window starts are random (after 2 s of warm-up), so windows sample every phase of the
    load drift and of the rotation.
    """
    rng = _rng(seed, 0x40E1)
    out = np.empty((n, size), dtype=np.float32)
    done = 0
    sensor = 0
    while done < n:
        k = min(per_sensor, n - done)
        stream = SensorStream(f"normal-{seed}-{sensor}", seed=seed)
        gaps = rng.integers(0, round(4 * RATE_HZ), size=k)
        starts = np.cumsum(gaps + size) - size + round(2 * RATE_HZ)
        out[done : done + k] = _windows_of(stream, [int(s) for s in starts], size)
        done += k
        sensor += 1
    return out


def anomalous_windows(
    n: int,
    size: int = WINDOW,
    *,
    seed: int,
    kinds: Sequence[str] = ANOMALY_KINDS,
    min_inside: float = 0.5,
    length_s: tuple[float, float] = (2.0, 5.0),
) -> tuple[np.ndarray[Any, np.dtype[np.float32]], list[str]]:
    """``n`` windows lying at least ``min_inside`` (fraction) inside an anomaly, and its kind.

    Each window comes from its own simulated sensor with one anomaly of a kind cycling
    through ``kinds``; the window's position relative to the anomaly is random.
    """
    if not 0 < min_inside <= 1:
        raise ValueError("min_inside must be in (0, 1]")
    rng = _rng(seed, 0xA0A1)
    out = np.empty((n, size), dtype=np.float32)
    labels: list[str] = []
    for j in range(n):
        kind = kinds[j % len(kinds)]
        name = f"anomalous-{seed}-{j}"
        start = round(float(rng.uniform(2.0, 6.0)), 2)
        length = float(rng.uniform(*length_s))
        a = Anomaly(name, kind, start, round(start + length, 2))
        s0 = math.ceil(a.start * RATE_HZ)
        s1 = math.ceil(a.end * RATE_HZ)
        need = math.ceil(min_inside * size)
        # window [w, w + size) overlaps [s0, s1) by >= need samples
        lo = s0 + need - size
        hi = s1 - need
        w = int(rng.integers(lo, hi + 1))
        stream = SensorStream(name, seed=seed, anomalies=[a])
        out[j] = _windows_of(stream, [w], size)[0]
        labels.append(kind)
    return out, labels
