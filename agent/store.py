"""Installed models: discovery, sha256 verification, cached onnxruntime sessions, self-benchmark."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from protocol import ORT_TYPES, ModelError, ModelInfo, TensorSpec

logger = logging.getLogger(__name__)

BENCH_BATCHES = (1, 256)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _specs(args: list[Any]) -> list[TensorSpec]:
    specs = []
    for a in args:
        if a.type not in ORT_TYPES:
            raise ModelError(f"{a.name}: tensor type {a.type} is not supported", code="bad_input")
        shape = [d if isinstance(d, int) and d >= 0 else None for d in (a.shape or [])]
        specs.append(TensorSpec(name=a.name, dtype=ORT_TYPES[a.type], shape=shape))  # type: ignore[arg-type]
    return specs


@dataclass
class LoadedModel:
    """An installed model and its shared session (``InferenceSession.run`` is thread-safe)."""

    info: ModelInfo
    path: Path
    session: ort.InferenceSession
    output_names: list[str]

    def check_inputs(self, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
        self.info.check_inputs({n: (a.dtype.name, a.shape) for n, a in arrays.items()})


class ModelStore:
    """Models found in directories (``manifest.json`` plus loose ``*.onnx`` files).

    Files are verified against the manifest's sha256 before a session is created; a mismatch
    is logged and the model is not installed.
    """

    def __init__(
        self,
        dirs: tuple[Path, ...],
        *,
        providers: list[str],
        threads_per_slot: int = 1,
    ) -> None:
        self._dirs = dirs
        self._providers = providers
        self._threads = threads_per_slot
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self._threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        return so

    def load_all(self) -> None:
        for d in self._dirs:
            self._load_dir(d)

    def _load_dir(self, d: Path) -> None:
        manifest_path = d / "manifest.json"
        listed: set[str] = set()
        if manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            for entry in manifest.get("models", []):
                listed.add(entry["file"])
                self._install(d / entry["file"], entry)
        for path in sorted(d.glob("*.onnx")):
            if path.name not in listed:
                self._install(path, {"id": path.stem.replace("_", "-")})

    def _install(self, path: Path, entry: dict[str, Any]) -> None:
        try:
            digest = sha256_file(path)
            if "sha256" in entry and entry["sha256"] != digest:
                raise ModelError(
                    f"{path}: sha256 {digest} does not match manifest {entry['sha256']}",
                    code="unknown_model",
                )
            session = ort.InferenceSession(
                str(path), sess_options=self.session_options(), providers=self._providers
            )
            info = ModelInfo(
                id=entry["id"],
                version=str(entry.get("version", "1")),
                sha256=digest,
                size=path.stat().st_size,
                inputs=_specs(session.get_inputs()),
                outputs=_specs(session.get_outputs()),
                batch_axis=entry.get("batch_axis", 0),
            )
        except Exception as e:  # one bad file must not stop the agent
            logger.error("model %s not installed: %s", path, e)
            return
        with self._lock:
            self._models[info.id] = LoadedModel(
                info=info, path=path, session=session, output_names=[o.name for o in info.outputs]
            )
        logger.info("installed model %s (%s, sha256 %s)", info.id, path.name, digest[:12])

    def get(self, model_id: str) -> LoadedModel:
        try:
            return self._models[model_id]
        except KeyError:
            raise ModelError(
                f"model {model_id!r} is not installed on this agent", code="unknown_model"
            ) from None

    def infos(self) -> list[ModelInfo]:
        return [m.info for m in self._models.values()]

    def benchmark(self, slowdown: float = 1.0, repeats: int = 15) -> None:
        """Measure ms per call at a small and a larger batch on random inputs.

        The fastest of several runs is kept: other processes can only make a run slower,
        and the scheduler refines the figure from observed results anyway.
        """
        for model_id, m in list(self._models.items()):
            if m.info.batch_axis is None:
                continue
            cost: list[tuple[int, float]] = []
            try:
                for batch in BENCH_BATCHES:
                    feeds = {s.name: _random_input(s, batch) for s in m.info.inputs}
                    m.session.run(m.output_names, feeds)  # warm-up
                    times = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        m.session.run(m.output_names, feeds)
                        times.append((time.perf_counter() - t0) * 1000)
                    cost.append((batch, min(times) * slowdown))
            except Exception as e:
                logger.warning("self-benchmark of %s failed: %s", model_id, e)
                continue
            m.info = m.info.model_copy(update={"cost": cost})
            logger.info("model %s: %s", model_id, ", ".join(f"b{b}={ms:.3f}ms" for b, ms in cost))


def _random_input(spec: TensorSpec, batch: int) -> np.ndarray[Any, Any]:
    shape = [batch if i == 0 else (d or 1) for i, d in enumerate(spec.shape)]
    rng = np.random.default_rng(0)
    if spec.dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if spec.dtype.startswith(("int", "uint")):
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    return rng.random(size=shape).astype(spec.dtype)
