"""The model registry: content-addressed storage, versions, signatures, and its CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from coordinator.catalog import Catalog, guess_batch_axis
from protocol import ModelError, TensorSpec
from tests.conftest import DIGITS_MODEL, MODELS, cli

VIBRATION_MODEL = MODELS / "vibration_anomaly.onnx"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_add_stores_by_content_and_reads_the_signature(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "reg")
    entry = catalog.add(DIGITS_MODEL, source="models/build.py", licence="BSD-3-Clause")
    assert (entry.id, entry.version) == ("digits-mlp", "1")
    assert entry.sha256 == sha256(DIGITS_MODEL)
    assert entry.size == DIGITS_MODEL.stat().st_size
    stored = catalog.blob(entry.sha256)
    assert stored == tmp_path / "reg" / "blobs" / f"{entry.sha256}.onnx"
    assert stored.read_bytes() == DIGITS_MODEL.read_bytes()
    assert [(s.name, s.dtype, s.shape) for s in entry.inputs] == [("input", "float32", [None, 64])]
    assert [(s.name, s.dtype) for s in entry.outputs] == [
        ("label", "int64"),
        ("probabilities", "float32"),
    ]
    assert entry.batch_axis == 0
    assert (entry.source, entry.licence) == ("models/build.py", "BSD-3-Clause")
    info = entry.info()
    assert (info.id, info.sha256, info.size) == (entry.id, entry.sha256, entry.size)


def test_versions_the_newest_is_the_default_and_files_are_shared(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path)
    v1 = catalog.add(DIGITS_MODEL, model_id="m")
    v2 = catalog.add(VIBRATION_MODEL, model_id="m")
    same = catalog.add(DIGITS_MODEL, model_id="copy", version="7")
    assert (v1.version, v2.version, same.version) == ("1", "2", "7")
    assert catalog.get("m") == v2
    assert catalog.get("m", "1") == v1
    assert catalog.get("nope") is None
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == sorted(
        {f"{v1.sha256}.onnx", f"{v2.sha256}.onnx"}
    )  # one file for two entries with the same content
    with pytest.raises(ModelError, match="already registered"):
        catalog.add(DIGITS_MODEL, model_id="m", version="1")

    # Removing an entry keeps a file another entry still uses.
    assert [e.ref for e in catalog.remove("m", "1")] == ["m@1"]
    assert catalog.blob(v1.sha256).exists()
    catalog.remove("copy")
    assert not catalog.blob(v1.sha256).exists()
    assert catalog.blob(v2.sha256).exists()
    with pytest.raises(ModelError, match="not registered"):
        catalog.remove("copy")


def test_a_second_reader_sees_changes(tmp_path: Path) -> None:
    """A running coordinator re-reads the index that `models add` (another process) wrote."""
    writer, reader = Catalog(tmp_path), Catalog(tmp_path)
    assert reader.ids() == []
    writer.add(DIGITS_MODEL)
    assert reader.refresh() is True
    assert reader.ids() == ["digits-mlp"]
    assert reader.refresh() is False  # unchanged: nothing re-read
    writer.remove("digits-mlp")
    assert reader.refresh() is True
    assert reader.ids() == []


def test_no_batch_axis_survives_a_reread(tmp_path: Path) -> None:
    Catalog(tmp_path).add(DIGITS_MODEL, model_id="items", batch_axis=None)
    assert Catalog(tmp_path).get("items").batch_axis is None  # type: ignore[union-attr]


def test_refuses_what_it_cannot_carry(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "reg")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="onnxruntime cannot load it"):
        catalog.add(junk)
    with pytest.raises(ModelError, match="no such file"):
        catalog.add(tmp_path / "missing.onnx")
    with pytest.raises(Exception, match="invalid model id"):
        catalog.add(DIGITS_MODEL, model_id="a/b")
    assert catalog.entries() == []
    assert not list((tmp_path / "reg").glob("blobs/.adding-*"))  # no temporary file left


def test_guess_batch_axis() -> None:
    def spec(*shape: int | None) -> TensorSpec:
        return TensorSpec(name="t", dtype="float32", shape=list(shape))

    assert guess_batch_axis([spec(None, 64)], [spec(None), spec(None, 10)]) == 0
    assert guess_batch_axis([spec(1, 3, 224, 224)], [spec(1, 1000)]) == 0  # exported batch 1
    assert guess_batch_axis([spec(128)], [spec(1)]) is None  # no leading batch axis
    assert guess_batch_axis([spec(None, 8)], [spec(2, None, 8)]) is None


async def test_cli_add_list_remove(tmp_path: Path) -> None:
    reg = str(tmp_path / "reg")
    model = tmp_path / "my_model.onnx"
    shutil.copy(DIGITS_MODEL, model)
    code, out, err = await cli(
        "models", "add", str(model), "--catalog", reg, "--version", "2024.1",
        "--source", "models/build.py", "--licence", "BSD-3-Clause",
    )  # fmt: skip
    assert code == 0, err
    assert "my-model@2024.1" in out and sha256(model) in out
    assert "input float32[N,64]" in out

    code, out, err = await cli("models", "list", "--catalog", reg, "--json")
    assert code == 0, err
    listed = json.loads(out)
    assert [(e["id"], e["version"], e["sha256"]) for e in listed] == [
        ("my-model", "2024.1", sha256(model))
    ]

    code, out, err = await cli("models", "add", str(tmp_path / "nope.onnx"), "--catalog", reg)
    assert code == 1 and "no such file" in err

    code, out, err = await cli("models", "remove", "my-model", "--catalog", reg)
    assert code == 0 and "removed my-model@2024.1" in out
    code, out, err = await cli("models", "list", "--catalog", reg)
    assert code == 0 and "no models registered" in out
