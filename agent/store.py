"""Installed models: discovery, sha256 verification, cached onnxruntime sessions, self-benchmark."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from protocol import ORT_TYPES, ModelError, ModelInfo, TensorSpec

logger = logging.getLogger(__name__)

BENCH_BATCHES = (1, 256)
BENCH_BUDGET_MS = 150.0

GRAPH_LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_specs(args: list[Any]) -> list[TensorSpec]:
    """onnxruntime's input or output descriptions as wire specs (dynamic axes None)."""
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
    # Deployed over MQTT into the model cache (counts against its budget, may be evicted),
    # as opposed to found in a models directory (never evicted).
    deployed: bool = False
    # time.time() of the last microtask that asked for it (or of its installation): the
    # cache evicts the least recently used deployed model first.
    last_used: float = field(default_factory=time.time)

    def check_inputs(self, arrays: dict[str, np.ndarray[Any, Any]]) -> None:
        self.info.check_inputs({n: (a.dtype.name, a.shape) for n, a in arrays.items()})


class ModelStore:
    """Models found in directories (``manifest.json`` plus loose ``*.onnx`` files).

    Files are verified against the manifest's sha256 before a session is created; a mismatch
    is logged and the model is not installed. Models deployed over MQTT join them through
    :meth:`install` (their files verified by the caller) and leave through :meth:`remove`.
    """

    def __init__(
        self,
        dirs: tuple[Path, ...],
        *,
        providers: list[str],
        threads_per_slot: int = 1,
        graph_optimization: str = "all",
    ) -> None:
        if graph_optimization not in GRAPH_LEVELS:
            raise ValueError(f"unknown graph optimization level {graph_optimization!r}")
        self._dirs = dirs
        self._providers = providers
        self._threads = threads_per_slot
        self._graph_level = GRAPH_LEVELS[graph_optimization]
        self._models: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()

    def session_options(self) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = self._threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = self._graph_level
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
            self._add(self._load(path, {**entry, "sha256": digest}, deployed=False))
        except Exception as e:  # one bad file must not stop the agent
            logger.error("model %s not installed: %s", path, e)

    def install(
        self,
        path: Path,
        entry: Mapping[str, Any],
        *,
        benchmark: bool = False,
        slowdown: float = 1.0,
    ) -> LoadedModel:
        """Install a deployed model from a cache file whose sha256 the caller verified.

        ``entry`` holds ``id``, ``sha256`` and optionally ``version``, ``batch_axis`` and
        ``last_used``. Blocking (creates the session, then self-benchmarks it when asked):
        call it in a thread. A model of the same id is replaced, whatever its version.
        Raises :class:`ModelError` (``bad_input``) when onnxruntime cannot load the file.
        """
        try:
            model = self._load(path, entry, deployed=True)
        except ModelError:
            raise
        except Exception as e:
            raise ModelError(f"onnxruntime cannot load {path.name}: {e}", code="bad_input") from e
        if benchmark:
            self._benchmark_one(model, slowdown)
        old = self._add(model)
        if old is not None and old.info.sha256 != model.info.sha256:
            logger.info(
                "model %s: sha256 %s replaces %s",
                model.info.id,
                model.info.sha256[:12],
                old.info.sha256[:12],
            )
        return model

    def _load(self, path: Path, entry: Mapping[str, Any], *, deployed: bool) -> LoadedModel:
        session = ort.InferenceSession(
            str(path), sess_options=self.session_options(), providers=self._providers
        )
        info = ModelInfo(
            id=entry["id"],
            version=str(entry.get("version", "1")),
            sha256=entry["sha256"],
            size=path.stat().st_size,
            inputs=tensor_specs(session.get_inputs()),
            outputs=tensor_specs(session.get_outputs()),
            batch_axis=entry.get("batch_axis", 0),
        )
        model = LoadedModel(
            info=info,
            path=path,
            session=session,
            output_names=[o.name for o in info.outputs],
            deployed=deployed,
        )
        if entry.get("last_used"):  # the cache's index remembers it across restarts
            model.last_used = float(entry["last_used"])
        return model

    def _add(self, model: LoadedModel) -> LoadedModel | None:
        with self._lock:
            old = self._models.get(model.info.id)
            self._models[model.info.id] = model
        info = model.info
        logger.info(
            "installed model %s (%s, sha256 %s)", info.id, model.path.name, info.sha256[:12]
        )
        return old

    def remove(self, model_id: str) -> LoadedModel | None:
        """Uninstall a model (its file stays: that is the cache's business); microtasks
        already running on it finish, later ones get ``unknown_model``."""
        with self._lock:
            model = self._models.pop(model_id, None)
        if model is not None:
            logger.info("removed model %s (sha256 %s)", model_id, model.info.sha256[:12])
        return model

    def get(self, model_id: str) -> LoadedModel:
        try:
            model = self._models[model_id]
        except KeyError:
            raise ModelError(
                f"model {model_id!r} is not installed on this agent", code="unknown_model"
            ) from None
        model.last_used = time.time()
        return model

    def find(self, model_id: str) -> LoadedModel | None:
        """The model installed under ``model_id``, without counting it as a use."""
        return self._models.get(model_id)

    def models(self) -> list[LoadedModel]:
        with self._lock:
            return list(self._models.values())

    def infos(self) -> list[ModelInfo]:
        return [m.info for m in self.models()]

    def benchmark(self, slowdown: float = 1.0) -> None:
        """Self-benchmark every installed model (see :meth:`_benchmark_one`)."""
        for m in self.models():
            self._benchmark_one(m, slowdown)

    def _benchmark_one(self, m: LoadedModel, slowdown: float, repeats: int = 15) -> None:
        """Measure ms per call at a small and a larger batch on random inputs.

        The fastest of several runs is kept: other processes can only make a run slower,
        and the scheduler refines the figure from observed results anyway.
        """
        if m.info.batch_axis is None:
            return
        cost: list[tuple[int, float]] = []
        try:
            for batch in BENCH_BATCHES:
                feeds = {s.name: _random_input(s, batch) for s in m.info.inputs}
                m.session.run(m.output_names, feeds)  # warm-up
                times: list[float] = []
                # At least 3 runs, then stop once ~150 ms are spent: a heavy model (the
                # CNN: ~100 ms a call at batch 256) must not hold up the agent's start.
                while len(times) < repeats and (len(times) < 3 or sum(times) < BENCH_BUDGET_MS):
                    t0 = time.perf_counter()
                    m.session.run(m.output_names, feeds)
                    times.append((time.perf_counter() - t0) * 1000)
                cost.append((batch, min(times) * slowdown))
        except Exception as e:
            logger.warning("self-benchmark of %s failed: %s", m.info.id, e)
            return
        m.info = m.info.model_copy(update={"cost": cost})
        logger.info("model %s: %s", m.info.id, ", ".join(f"b{b}={ms:.3f}ms" for b, ms in cost))


def _random_input(spec: TensorSpec, batch: int) -> np.ndarray[Any, Any]:
    shape = [batch if i == 0 else (d or 1) for i, d in enumerate(spec.shape)]
    rng = np.random.default_rng(0)
    if spec.dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if spec.dtype.startswith(("int", "uint")):
        return rng.integers(0, 2, size=shape).astype(spec.dtype)
    return rng.random(size=shape).astype(spec.dtype)
