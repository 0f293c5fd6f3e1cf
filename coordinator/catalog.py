"""The model registry on the coordinator: content-addressed ONNX files and what they are.

A model is registered once (``edge-offload models add FILE``) and reaches the agents that
need it over MQTT (coordinator.deployer). The store is a directory::

    {root}/catalog.json            id, version, sha256, signature, source, licence, ...
    {root}/blobs/{sha256}.onnx     the files, named by content

Writers (the CLI, or an in-process coordinator) take an exclusive lock on ``{root}/.lock``
and replace ``catalog.json`` atomically; a running coordinator re-reads it when its
modification time changes, so a model added from the shell is usable at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from protocol import Message, ModelError, ModelInfo, TensorSpec, check_id

logger = logging.getLogger(__name__)


def default_catalog_dir() -> Path:
    """``$XDG_DATA_HOME/edge-offload/models`` (``~/.local/share`` when unset)."""
    data = os.environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(data):
        data = str(Path.home() / ".local" / "share")
    return Path(data) / "edge-offload" / "models"


class CatalogEntry(Message):
    """One registered model version."""

    id: str
    version: str
    sha256: str
    size: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batch_axis: int | None = 0
    source: Annotated[str, Field(max_length=500)] = ""
    licence: Annotated[str, Field(max_length=200)] = ""
    description: Annotated[str, Field(max_length=2000)] = ""
    # Epoch seconds; among versions of an id the newest registration is the default.
    added: float = 0.0

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"

    def info(self) -> ModelInfo:
        """What an agent advertises once it has the file (without measured costs)."""
        return ModelInfo(
            id=self.id,
            version=self.version,
            sha256=self.sha256,
            size=self.size,
            inputs=self.inputs,
            outputs=self.outputs,
            batch_axis=self.batch_axis,
        )


class _Index(Message):
    models: list[CatalogEntry] = []


def inspect_model(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The input and output signature of an ONNX file, as onnxruntime loads it.

    Raises :class:`ModelError` (bad_input) if onnxruntime cannot load the file or a tensor
    type is not one the wire format carries.
    """
    import onnxruntime as ort

    from agent.store import tensor_specs

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(
            str(path), sess_options=so, providers=["CPUExecutionProvider"]
        )
    except Exception as e:
        raise ModelError(f"{path}: onnxruntime cannot load it: {e}", code="bad_input") from None

    try:
        return tensor_specs(session.get_inputs()), tensor_specs(session.get_outputs())
    except ModelError as e:
        raise ModelError(f"{path}: {e.message}", code="bad_input") from None


def guess_batch_axis(inputs: list[TensorSpec], outputs: list[TensorSpec]) -> int | None:
    """Axis 0 is a batch axis when every output and at least one input leads with a
    dynamic (or size-1) dimension; otherwise the model is run one item per microtask."""

    def leads(s: TensorSpec) -> bool:
        return bool(s.shape) and s.shape[0] in (None, 1)

    if outputs and all(leads(o) for o in outputs) and any(leads(i) for i in inputs):
        return 0
    return None


class Catalog:
    """The registered models in ``root``; reads are cheap and re-read on change."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._index_path = root / "catalog.json"
        self._blobs = root / "blobs"
        self._stamp: tuple[int, int] | None = None
        self._entries: list[CatalogEntry] = []
        self.refresh()

    # -- reading ---------------------------------------------------------------------------
    def refresh(self) -> bool:
        """Re-read the index if it changed on disk; True if it did."""
        try:
            st = self._index_path.stat()
        except FileNotFoundError:
            changed = self._stamp is not None
            self._stamp, self._entries = None, []
            return changed
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return False
        try:
            self._entries = _Index.from_json(self._index_path.read_bytes()).models
        except Exception as e:  # a hand-edited index must not take the coordinator down
            logger.error("model catalog %s unreadable, keeping the previous one: %s", self.root, e)
            return False
        self._stamp = stamp
        return True

    def entries(self) -> list[CatalogEntry]:
        return sorted(self._entries, key=lambda e: (e.id, e.added))

    def get(self, model_id: str, version: str | None = None) -> CatalogEntry | None:
        """The given version of ``model_id``, or its newest registration."""
        found = [e for e in self._entries if e.id == model_id]
        if version is not None:
            found = [e for e in found if e.version == version]
        return max(found, key=lambda e: e.added) if found else None

    def blob(self, sha256: str) -> Path:
        return self._blobs / f"{sha256}.onnx"

    def ids(self) -> list[str]:
        return sorted({e.id for e in self._entries})

    # -- writing ---------------------------------------------------------------------------
    def add(
        self,
        path: Path,
        *,
        model_id: str | None = None,
        version: str | None = None,
        source: str = "",
        licence: str = "",
        description: str = "",
        batch_axis: int | Literal["auto"] | None = "auto",
    ) -> CatalogEntry:
        """Register ``path`` (copied into the store). Raises :class:`ModelError`."""
        from agent.store import sha256_file  # the agent's: it verifies the same files

        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: no such file", code="bad_request")
        model_id = check_id(model_id or path.stem.replace("_", "-"), "model id")
        inputs, outputs = inspect_model(path)
        axis = guess_batch_axis(inputs, outputs) if batch_axis == "auto" else batch_axis
        if axis is not None and any(len(s.shape) <= axis for s in outputs):
            raise ModelError(
                f"{path}: batch axis {axis} is beyond the rank of an output", code="bad_request"
            )
        with self._locked():
            self.refresh()
            versions = [e for e in self._entries if e.id == model_id]
            version = version or str(
                1 + max((int(e.version) for e in versions if e.version.isdigit()), default=0)
            )
            if any(e.version == version for e in versions):
                raise ModelError(
                    f"model {model_id} version {version} is already registered; remove it "
                    "first or give another --version",
                    code="bad_request",
                )
            self._blobs.mkdir(parents=True, exist_ok=True)
            # Copy, then hash the copy: what is registered is what is stored.
            fd, tmp = tempfile.mkstemp(dir=self._blobs, prefix=".adding-")
            try:
                with os.fdopen(fd, "wb") as out, open(path, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                    out.flush()
                    os.fsync(out.fileno())
                digest = sha256_file(Path(tmp))
                os.replace(tmp, self.blob(digest))
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
            entry = CatalogEntry(
                id=model_id,
                version=version,
                sha256=digest,
                size=self.blob(digest).stat().st_size,
                inputs=inputs,
                outputs=outputs,
                batch_axis=axis,
                source=source,
                licence=licence,
                description=description,
                added=time.time(),
            )
            self._write([*self._entries, entry])
        logger.info("registered model %s (sha256 %s, %d bytes)", entry.ref, digest[:12], entry.size)
        return entry

    def remove(self, model_id: str, version: str | None = None) -> list[CatalogEntry]:
        """Unregister every version of ``model_id`` (or one); files no entry uses go too."""
        with self._locked():
            self.refresh()
            gone = [
                e
                for e in self._entries
                if e.id == model_id and (version is None or e.version == version)
            ]
            if not gone:
                what = f"{model_id}@{version}" if version else model_id
                raise ModelError(f"model {what} is not registered", code="unknown_model")
            kept = [e for e in self._entries if e not in gone]
            self._write(kept)
            used = {e.sha256 for e in kept}
            for e in gone:
                if e.sha256 not in used:
                    with contextlib.suppress(FileNotFoundError):
                        self.blob(e.sha256).unlink()
        return gone

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _write(self, entries: list[CatalogEntry]) -> None:
        # model_dump_json keeps nulls: batch_axis None (no batch axis) must survive.
        data = json.dumps(
            json.loads(_Index(models=entries).model_dump_json()), indent=2, sort_keys=True
        ).encode()
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".catalog-")
        with os.fdopen(fd, "wb") as f:
            f.write(data + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._index_path)
        self._stamp = None
        self.refresh()
