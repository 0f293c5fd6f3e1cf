"""Rebuild the ONNX model zoo in models/ and its manifest.json, reproducibly."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import build_cnn  # models/ is on sys.path: this file runs as a script
import build_vibration
import numpy as np
import onnx
import onnxruntime as ort
import sklearn
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType, Int64TensorType
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler
from threadpoolctl import threadpool_limits
from zoo_common import (
    DIGITS_CLASSES,
    DIGITS_DATA,
    DIGITS_LICENCE,
    DIGITS_OUTPUTS,
    HOLDOUT_FRACTION,
    RANDOM_STATE,
    digits_split,
    load_digits_xy,
    model_entry,
    pin_metadata,
    session,
    sha256_file,
    toolchain,
)

MODELS_DIR = Path(__file__).resolve().parent
MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA = 1

MODEL_ID = "digits-mlp"
MODEL_VERSION = "1"
MODEL_FILE = "digits_mlp.onnx"
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
N_FEATURES = 64
N_CLASSES = DIGITS_CLASSES
PIXEL_MAX = 16.0  # load_digits pixels are integer intensities 0..16

# Chosen with `python models/build.py --bench` (onnxruntime CPU, 1 intra/inter-op thread,
# batch of 256). Rule: (256, 128) unless it costs under ~3 us/sample, else (512, 256), so
# that compute is not negligible next to shipping 256 bytes/sample over MQTT. Measured on
# the reference build host: (64,) 0.21 us, (256, 128) 1.08 us, (512, 256) 3.2 us per sample.
# Fixed here rather than picked at build time so that the build stays reproducible.
HIDDEN_LAYER_SIZES: tuple[int, ...] = (512, 256)
BENCH_CANDIDATES: tuple[tuple[int, ...], ...] = ((64,), (256, 128), (512, 256))
BENCH_BATCH = 256

DESCRIPTION = (
    "Handwritten digit classifier. Input: batch of 8x8 grayscale images flattened row-major "
    "to 64 float32 pixel intensities in 0..16 (the load_digits encoding; scaled to 0..1 "
    "inside the model). Outputs: predicted digit 'label' (int64) and per-class "
    "'probabilities' (float32, classes 0..9). Scaler + MLP "
    f"{'x'.join(map(str, HIDDEN_LAYER_SIZES))} ReLU, softmax output."
)
SOURCE = f"{DIGITS_DATA}, trained by models/build.py"
LICENCE = DIGITS_LICENCE

PROB_ATOL = 1e-5


def train(x: np.ndarray, y: np.ndarray, hidden_layer_sizes: tuple[int, ...]) -> Pipeline:
    """Fit scaler (fixed 0..16 -> 0..1 range) + MLP deterministically."""
    # The scaler maps the nominal pixel range, not the per-feature range seen in training,
    # so any 0..16 image is scaled the same way (scale_ = 1/16 is exact in float32).
    bounds = np.array([[0.0] * N_FEATURES, [PIXEL_MAX] * N_FEATURES], dtype=np.float32)
    scaler = MinMaxScaler().fit(bounds)
    clf = MLPClassifier(
        hidden_layer_sizes=hidden_layer_sizes, max_iter=500, random_state=RANDOM_STATE
    )
    # One BLAS thread: multi-threaded reductions may change float summation order.
    with threadpool_limits(limits=1), warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. ConvergenceWarning must not pass silently
        clf.fit(scaler.transform(x), y)
    return Pipeline([("scale", scaler), ("mlp", clf)])


def export(pipe: Pipeline) -> onnx.ModelProto:
    model = to_onnx(
        pipe,
        initial_types=[("input", FloatTensorType([None, N_FEATURES]))],
        final_types=[
            ("label", Int64TensorType([None])),
            ("probabilities", FloatTensorType([None, N_CLASSES])),
        ],
        options={MLPClassifier: {"zipmap": False}},
        target_opset=TARGET_OPSET,
        name="digits_mlp",
    )
    return pin_metadata(
        model,
        graph_name="digits_mlp",
        model_id=MODEL_ID,
        version=MODEL_VERSION,
        description=DESCRIPTION,
        source=SOURCE,
        licence=LICENCE,
        props=(("scikit-learn", sklearn.__version__),),
    )


def verify(model_bytes: bytes, pipe: Pipeline, x: np.ndarray) -> None:
    """ONNX must agree with sklearn: identical labels, probabilities within PROB_ATOL."""
    sess = session(model_bytes)
    names = [o.name for o in sess.get_outputs()]
    if [i.name for i in sess.get_inputs()] != ["input"] or names != ["label", "probabilities"]:
        raise SystemExit(f"unexpected ONNX signature: inputs/outputs {names}")
    label, proba = sess.run(None, {"input": x})
    if label.dtype != np.int64 or proba.dtype != np.float32:
        raise SystemExit(f"unexpected output dtypes {label.dtype}, {proba.dtype}")
    sk_label = pipe.predict(x)
    sk_proba = pipe.predict_proba(x)
    if not np.array_equal(label, sk_label):
        n = int((label != sk_label).sum())
        raise SystemExit(f"ONNX labels differ from sklearn on {n} samples")
    err = float(np.max(np.abs(proba - sk_proba)))
    if err > PROB_ATOL:
        raise SystemExit(f"ONNX probabilities differ from sklearn by {err:.3g} > {PROB_ATOL}")
    print(f"  verified vs sklearn on {len(x)} samples: labels identical, max |dp| = {err:.2g}")


def build_digits_mlp(out_dir: Path) -> dict[str, Any]:
    x, y = load_digits_xy()
    x_train, x_test, y_train, y_test = digits_split(x, y)
    pipe = train(x_train, y_train, HIDDEN_LAYER_SIZES)
    model_bytes = export(pipe).SerializeToString(deterministic=True)
    path = out_dir / MODEL_FILE
    path.write_bytes(model_bytes)
    verify(model_bytes, pipe, x)

    label, _ = session(model_bytes).run(None, {"input": x})
    holdout_acc = float(pipe.score(x_test, y_test))
    full_acc = float(np.mean(label == y))
    print(f"  {MODEL_FILE}: holdout accuracy {holdout_acc:.4f}, all {len(y)}: {full_acc:.4f}")
    return model_entry(
        path,
        model_id=MODEL_ID,
        version=MODEL_VERSION,
        inputs=[{"name": "input", "dtype": "float32", "shape": [None, N_FEATURES]}],
        outputs=DIGITS_OUTPUTS,
        task="classification",
        description=DESCRIPTION,
        source=SOURCE,
        licence=LICENCE,
        build={
            **toolchain(TARGET_OPSET),
            "random_state": RANDOM_STATE,
            "hidden_layer_sizes": list(HIDDEN_LAYER_SIZES),
            "holdout_fraction": HOLDOUT_FRACTION,
            "holdout_accuracy": round(holdout_acc, 6),
            "full_accuracy": round(full_acc, 6),
        },
    )


DATASET_ID = "digits"
DATASET_FILE = "digits_samples.npz"


def build_digits_samples(out_dir: Path) -> dict[str, Any]:
    """All 1,797 load_digits samples, so the demo and benchmarks need no scikit-learn."""
    x, y = load_digits_xy()
    path = out_dir / DATASET_FILE
    # uint8 keeps the file small; the pixel values are the integers 0..16.
    np.savez_compressed(path, x=x.astype(np.uint8), y=y.astype(np.int64))
    return {
        "id": DATASET_ID,
        "file": DATASET_FILE,
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "arrays": {
            "x": "uint8 [1797, 64]: pixel intensities 0..16 (cast to float32 for digits-mlp/cnn)",
            "y": "int64 [1797]: the digit",
        },
        "source": SOURCE,
        "licence": LICENCE,
    }


BUILDERS = (build_digits_mlp, build_cnn.build_digits_cnn, build_vibration.build_vibration_anomaly)
DATASET_BUILDERS = (build_digits_samples,)


def build_all(out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "models": [b(out_dir) for b in BUILDERS],
        "datasets": [b(out_dir) for b in DATASET_BUILDERS],
    }
    text = json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (out_dir / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return manifest


def check() -> int:
    """Rebuild into a temp dir; non-zero if any artefact's sha256 differs from the manifest."""
    committed = json.loads((MODELS_DIR / MANIFEST_NAME).read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        rebuilt = build_all(Path(tmp))
    want = {m["id"]: m for m in committed["models"] + committed.get("datasets", [])}
    got = {m["id"]: m for m in rebuilt["models"] + rebuilt["datasets"]}
    failures = 0
    for model_id in sorted(want.keys() | got.keys()):
        old, new = want.get(model_id), got.get(model_id)
        if old is None or new is None:
            print(f"MISMATCH {model_id}: only in {'rebuild' if old is None else 'manifest'}")
            failures += 1
        elif old["sha256"] != new["sha256"]:
            print(f"MISMATCH {model_id}: manifest {old['sha256']} rebuilt {new['sha256']}")
            versions = {
                k: (old.get("build", {}).get(k), v)
                for k, v in new.get("build", {}).items()
                if k in ("scikit-learn", "skl2onnx", "onnx", "numpy", "blas")
                and old.get("build", {}).get(k) != v
            }
            if versions:
                print(f"  library versions differ (manifest, local): {versions}")
            failures += 1
        else:
            print(f"OK {model_id} {new['sha256']}")
    return 1 if failures else 0


def bench() -> int:
    """Time onnxruntime CPU per-sample cost of the MLP and CNN candidates, the committed
    digits models and vibration-anomaly."""
    x, y = load_digits_xy()
    x_train, _, y_train, _ = digits_split(x, y)
    batch = np.ascontiguousarray(x[:BENCH_BATCH])
    print(f"onnxruntime {ort.__version__}, 1 thread, batch {BENCH_BATCH}")
    print(f"{'hidden_layer_sizes':<20} {'us/sample (best)':>17} {'median':>8} {'bytes':>8}")
    for hls in BENCH_CANDIDATES:
        model_bytes = export(train(x_train, y_train, hls)).SerializeToString()
        sess = session(model_bytes)
        for _ in range(50):
            sess.run(None, {"input": batch})
        rounds = []
        for _ in range(7):
            n = 200
            t0 = time.perf_counter()
            for _ in range(n):
                sess.run(None, {"input": batch})
            rounds.append((time.perf_counter() - t0) / (n * BENCH_BATCH) * 1e6)
        rounds.sort()
        print(f"{hls!s:<20} {rounds[0]:>17.3f} {rounds[3]:>8.3f} {len(model_bytes):>8}")
    build_cnn.bench()
    build_vibration.bench()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a temp dir and fail if any sha256 differs from the manifest",
    )
    mode.add_argument(
        "--bench",
        action="store_true",
        help="time candidate MLP and CNN sizes (how HIDDEN_LAYER_SIZES and CHANNELS were "
        "chosen), the committed digits models and vibration-anomaly",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    if args.bench:
        return bench()
    manifest = build_all(MODELS_DIR)
    for m in manifest["models"] + manifest["datasets"]:
        print(f"wrote {m['file']} ({m['size']} bytes, sha256 {m['sha256']})")
    print(f"wrote {MANIFEST_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
