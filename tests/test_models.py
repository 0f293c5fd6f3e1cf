"""The committed model zoo (models/) matches its manifest and still works."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from coordinator.signals import (
    ANOMALY_KINDS,
    HOP,
    RATE_HZ,
    WINDOW,
    SensorStream,
    anomalous_windows,
    anomaly_overlap,
    normal_windows,
    schedule_anomalies,
)

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
MANIFEST = json.loads((MODELS_DIR / "manifest.json").read_text(encoding="utf-8"))
ENTRIES: list[dict[str, Any]] = MANIFEST["models"]
IDS = [m["id"] for m in ENTRIES]

# onnxruntime NodeArg.type -> manifest dtype
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(int64)": "int64",
    "tensor(double)": "float64",
    "tensor(bool)": "bool",
}


def _session(entry: dict[str, Any]) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(
        str(MODELS_DIR / entry["file"]), opts, providers=["CPUExecutionProvider"]
    )


def _by_id(model_id: str) -> dict[str, Any]:
    return next(m for m in ENTRIES if m["id"] == model_id)


def test_manifest_layout() -> None:
    assert MANIFEST["schema"] == 1
    assert len(set(IDS)) == len(IDS)
    listed = {m["file"] for m in ENTRIES}
    on_disk = {p.name for p in MODELS_DIR.glob("*.onnx")}
    assert listed == on_disk
    for m in ENTRIES:
        assert m["batch_axis"] == 0
        for io in (*m["inputs"], *m["outputs"]):
            assert io["shape"][m["batch_axis"]] is None


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_file_matches_manifest(entry: dict[str, Any]) -> None:
    data = (MODELS_DIR / entry["file"]).read_bytes()
    assert len(data) == entry["size"]
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]


@pytest.mark.parametrize("entry", ENTRIES, ids=IDS)
def test_signature_matches_manifest(entry: dict[str, Any]) -> None:
    sess = _session(entry)
    for actual, declared in (
        (sess.get_inputs(), entry["inputs"]),
        (sess.get_outputs(), entry["outputs"]),
    ):
        assert [a.name for a in actual] == [d["name"] for d in declared]
        for a, d in zip(actual, declared, strict=True):
            assert ORT_DTYPES[a.type] == d["dtype"], a.name
            assert len(a.shape) == len(d["shape"]), a.name
            # symbolic / unknown dims are null in the manifest, fixed dims must agree
            shape = [dim if isinstance(dim, int) else None for dim in a.shape]
            assert shape == d["shape"], a.name


DIGITS_MODELS = ["digits-mlp", "digits-cnn"]  # same input: 8x8 images, 0..16, as [N, 64]


@pytest.mark.parametrize("model_id", DIGITS_MODELS)
def test_digits_model_runs_on_synthetic_batch(model_id: str) -> None:
    """Needs no sklearn: output shapes/dtypes and label == argmax(probabilities)."""
    sess = _session(_by_id(model_id))
    x = np.random.default_rng(0).integers(0, 17, size=(5, 64)).astype(np.float32)
    label, proba = sess.run(["label", "probabilities"], {"input": x})
    assert label.dtype == np.int64 and label.shape == (5,)
    assert proba.dtype == np.float32 and proba.shape == (5, 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(label, proba.argmax(axis=1))


def test_digits_mlp_accuracy() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    sess = _session(_by_id("digits-mlp"))
    (label,) = sess.run(["label"], {"input": x.astype(np.float32)})
    accuracy = float(np.mean(label == y))
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(_by_id("digits-mlp")["build"]["full_accuracy"], abs=1e-6)


def _digits_samples() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The committed load_digits copy (models/digits_samples.npz): no sklearn needed."""
    with np.load(MODELS_DIR / "digits_samples.npz") as data:
        return data["x"].astype(np.float32), data["y"]


def test_digits_cnn_accuracy_on_committed_samples() -> None:
    entry = _by_id("digits-cnn")
    x, y = _digits_samples()
    label, proba = _session(entry).run(["label", "probabilities"], {"input": x})
    np.testing.assert_array_equal(label, proba.argmax(axis=1))
    accuracy = float(np.mean(label == y))
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(entry["build"]["full_accuracy"], abs=1e-6)
    assert entry["build"]["holdout_accuracy"] >= 0.97


def test_digits_cnn_holdout_accuracy() -> None:
    """On the build's hold-out split (the 20 % digits-cnn never trained on)."""
    selection = pytest.importorskip("sklearn.model_selection")
    entry = _by_id("digits-cnn")
    x, y = _digits_samples()
    _, x_test, _, y_test = selection.train_test_split(
        x,
        y,
        test_size=entry["build"]["holdout_fraction"],
        stratify=y,
        random_state=entry["build"]["random_state"],
    )
    (label,) = _session(entry).run(["label"], {"input": x_test})
    accuracy = float(np.mean(label == y_test))
    assert accuracy >= 0.97
    assert accuracy == pytest.approx(entry["build"]["holdout_accuracy"], abs=1e-6)


def test_digits_cnn_is_batch_independent() -> None:
    """A job may be cut into microtasks of any size: one sample at a time gives the same."""
    sess = _session(_by_id("digits-cnn"))
    x, _ = _digits_samples()
    x = x[:16]
    label, proba = sess.run(["label", "probabilities"], {"input": x})
    for i in range(len(x)):
        one_label, one_proba = sess.run(["label", "probabilities"], {"input": x[i : i + 1]})
        assert one_label[0] == label[i]
        np.testing.assert_allclose(one_proba[0], proba[i], rtol=1e-5, atol=1e-6)


# vibration-anomaly: the quality targets, checked on simulator seeds the build never used.
MIN_RECALL = 0.95  # of windows lying at least half inside an anomaly
MAX_FALSE_POSITIVE_RATE = 0.005  # of windows with no anomaly in them
DEBOUNCE = 2  # consecutive flagged windows that raise an alert


def _vibration() -> tuple[ort.InferenceSession, dict[str, Any]]:
    entry = _by_id("vibration-anomaly")
    return _session(entry), entry


def _flags(windows: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    sess, entry = _vibration()
    verdict = entry["verdict"]
    assert verdict["op"] == ">"
    (score,) = sess.run([verdict["output"]], {"window": windows})
    return np.asarray(score[:, 0] > verdict["threshold"])


def test_vibration_anomaly_outputs_agree_with_the_manifest_verdict() -> None:
    sess, entry = _vibration()
    assert entry["window"] == {"size": WINDOW, "hop": HOP, "rate_hz": RATE_HZ, "unit": "mm/s"}
    x = np.concatenate(
        [normal_windows(40, seed=7), anomalous_windows(60, seed=7)[0], np.zeros((2, WINDOW))]
    ).astype(np.float32)
    score, flag = sess.run(["score", "is_anomaly"], {"window": x})
    assert score.shape == (len(x), 1) and flag.shape == (len(x), 1)
    assert np.all(np.isfinite(score))
    np.testing.assert_array_equal(flag[:, 0], score[:, 0] > entry["verdict"]["threshold"])
    # a flat (dead) signal is as abnormal as it gets
    assert flag[-2:].all()
    # batch-independent: one window at a time gives the same scores
    single = np.concatenate([sess.run(["score"], {"window": x[i : i + 1]})[0] for i in range(8)])
    np.testing.assert_allclose(single, score[:8], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ANOMALY_KINDS)
def test_vibration_anomaly_recall_per_kind(kind: str) -> None:
    windows, kinds = anomalous_windows(120, seed=9100, kinds=[kind])
    assert set(kinds) == {kind}
    assert _flags(windows).mean() >= MIN_RECALL


def test_vibration_anomaly_false_positive_rate() -> None:
    assert _flags(normal_windows(4000, seed=9200)).mean() <= MAX_FALSE_POSITIVE_RATE


def test_vibration_anomaly_on_fresh_streams() -> None:
    """20 sensors x 120 s with scheduled anomalies, cut like a monitoring job (128 / 64)."""
    seed, duration = 9300, 120.0
    sensors = [f"press-{i:02d}" for i in range(20)]
    schedule = schedule_anomalies(sensors, duration, seed=seed)
    assert {a.kind for a in schedule} == set(ANOMALY_KINDS)
    n = int(duration * RATE_HZ)
    starts = range(0, n - WINDOW + 1, HOP)
    inside: list[float] = []
    windows = []
    for sensor in sensors:
        signal = SensorStream(sensor, seed=seed, anomalies=schedule).read(n)
        for w in starts:
            windows.append(signal[w : w + WINDOW])
            _, frac = anomaly_overlap(schedule, sensor, w / RATE_HZ, (w + WINDOW) / RATE_HZ)
            inside.append(frac)
    flags = _flags(np.stack(windows)).reshape(len(sensors), len(starts))
    frac = np.array(inside).reshape(flags.shape)
    assert flags[frac >= 0.5].mean() >= MIN_RECALL
    assert flags[frac == 0].mean() <= MAX_FALSE_POSITIVE_RATE
    # events: alerted when DEBOUNCE consecutive windows touching the anomaly are flagged
    alerted = 0
    for a in schedule:
        row = sensors.index(a.sensor)
        hit = [
            bool(flags[row, j]) and a.overlap(w / RATE_HZ, (w + WINDOW) / RATE_HZ) > 0
            for j, w in enumerate(starts)
        ]
        alerted += any(all(hit[j : j + DEBOUNCE]) for j in range(len(hit) - DEBOUNCE + 1))
    assert alerted >= 0.95 * len(schedule)


def test_vibration_anomaly_build_figures_meet_the_targets() -> None:
    build = _by_id("vibration-anomaly")["build"]
    assert build["eval"]["false_positive_rate"] <= MAX_FALSE_POSITIVE_RATE
    assert set(build["eval"]["recall_by_kind"]) == set(ANOMALY_KINDS)
    assert min(build["eval"]["recall_by_kind"].values()) >= MIN_RECALL
    assert build["stream_eval"]["event_recall"] >= 0.95
