"""The committed model zoo (models/) matches its manifest and still works."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"
MANIFEST = json.loads((MODELS_DIR / "manifest.json").read_text(encoding="utf-8"))
ENTRIES: list[dict[str, Any]] = MANIFEST["models"]
IDS = [m["id"] for m in ENTRIES]

# onnxruntime NodeArg.type -> manifest dtype
ORT_DTYPES = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(double)": "float64"}


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


def test_digits_mlp_runs_on_synthetic_batch() -> None:
    """Needs no sklearn: output shapes/dtypes and label == argmax(probabilities)."""
    sess = _session(_by_id("digits-mlp"))
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
