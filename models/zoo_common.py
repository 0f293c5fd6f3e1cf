"""What every model of the zoo's build does alike (imported by build.py and its parts)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import skl2onnx
import sklearn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

# The digits models (digits-mlp, digits-cnn) train on the same stratified split, so their
# hold-out accuracies are comparable.
RANDOM_STATE = 0
HOLDOUT_FRACTION = 0.2
DIGITS_DATA = "scikit-learn load_digits (UCI optical recognition of handwritten digits)"
DIGITS_LICENCE = "BSD-3-Clause (scikit-learn bundled dataset)"

Array = np.ndarray[Any, Any]

# What a digits classifier of the zoo returns, for its manifest entry.
DIGITS_CLASSES = 10
DIGITS_OUTPUTS = [
    {"name": "label", "dtype": "int64", "shape": [None]},
    {"name": "probabilities", "dtype": "float32", "shape": [None, DIGITS_CLASSES]},
]


def load_digits_xy() -> tuple[Array, Array]:
    """All 1,797 load_digits images as float32 [N, 64] (0..16) and int64 labels."""
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y.astype(np.int64)


def digits_split(x: Array, y: Array) -> tuple[Array, Array, Array, Array]:
    """``x_train, x_test, y_train, y_test``: the zoo's stratified hold-out split."""
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=HOLDOUT_FRACTION, stratify=y, random_state=RANDOM_STATE
    )
    return x_train, x_test, y_train, y_test


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def session(model_bytes: bytes, threads: int = 1) -> ort.InferenceSession:
    """A CPU onnxruntime session with ``threads`` intra- and inter-op threads."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = threads
    return ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])


def pin_metadata(
    model: onnx.ModelProto,
    *,
    graph_name: str,
    model_id: str,
    version: str,
    description: str,
    source: str,
    licence: str,
    props: Iterable[tuple[str, str]] = (),
    producer_version: str | None = None,
) -> onnx.ModelProto:
    """Name the batch axis ``N``, pin every free-form metadata field (so that a rebuild is
    byte-identical), set the metadata (id, version, source, licence, then ``props``), and
    check the model.

    ``producer_version`` defaults to the skl2onnx that converted the model."""
    for value_info in [*model.graph.input, *model.graph.output]:
        value_info.type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.name = graph_name
    model.graph.doc_string = description
    model.doc_string = description
    model.producer_name = "edge-offload models/build.py"
    model.producer_version = producer_version or f"skl2onnx-{skl2onnx.__version__}"
    model.domain = "org.edge-offload"
    model.model_version = int(version)
    del model.metadata_props[:]
    common = (("id", model_id), ("version", version), ("source", source), ("licence", licence))
    for key, value in (*common, *props):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model, full_check=True)
    return model


def model_entry(
    path: Path,
    *,
    model_id: str,
    version: str,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    task: str,
    description: str,
    source: str,
    licence: str,
    build: dict[str, Any],
    **extra: Any,
) -> dict[str, Any]:
    """A model's manifest entry for the file at ``path`` (``extra``: task-specific fields,
    after ``task``)."""
    return {
        "id": model_id,
        "version": version,
        "file": path.name,
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "inputs": inputs,
        "outputs": outputs,
        "batch_axis": 0,
        "task": task,
        **extra,
        "description": description,
        "source": source,
        "licence": licence,
        "build": build,
    }


def toolchain(target_opset: Mapping[str, int]) -> dict[str, Any]:
    """The versions a model was built with, for its manifest entry's ``build``."""
    return {
        "scikit-learn": sklearn.__version__,
        "skl2onnx": skl2onnx.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "target_opset": dict(target_opset),
    }
