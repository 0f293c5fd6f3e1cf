"""Per-job traces: where and when each microtask ran, for reports and Gantt charts.

The coordinator records one row per accepted microtask result and one entry per failed
attempt while a job runs, and writes the trace as compact columnar JSON when the job ends
(``{trace_dir}/{job_id}.json``). Recording is a handful of list appends per result.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol import OffloadError

if TYPE_CHECKING:
    from coordinator.ledger import Job, Microtask
    from coordinator.registry import AgentRecord

logger = logging.getLogger(__name__)

TRACE_VERSION = 1
# Bounds on what one job's trace holds; rows and failures beyond them are only counted.
MAX_ROWS = 1_000_000
MAX_FAILURES = 10_000
REASON_CHARS = 200

# The per-result columns of a trace file; times are microseconds since "submitted",
# durations microseconds. (In memory: epoch seconds and milliseconds.)
COLUMNS = (
    "task",  # microtask id
    "unit",  # unit of work (copies of one unit share it)
    "attempt",
    "agent",
    "samples",
    "dispatched_us",  # sent by the coordinator
    "received_us",  # its result received by the coordinator
    "queued_us",  # waiting for a slot on the agent (the agent's measure)
    "exec_us",  # running on the agent (the agent's measure)
    "est_us",  # the coordinator's estimate of the execution time when it dispatched
    "retried",  # earlier failed attempts of this microtask
    "speculative",  # a copy started to overtake a straggler
)
# The attributes holding the per-result columns, in COLUMNS order.
_ATTRIBUTES = (
    "task",
    "unit",
    "attempt",
    "agent",
    "samples",
    "dispatched",
    "received",
    "queued_ms",
    "exec_ms",
    "est_ms",
    "retried",
    "speculative",
)
FAILURE_COLUMNS = (
    "task",
    "unit",
    "attempt",
    "agent",
    "dispatched_us",
    "failed_us",
    "code",
    "reason",
)


class TraceError(OffloadError):
    """A trace file is missing, unreadable or not a trace."""

    code = "malformed"


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed or handed-back attempt."""

    task: str
    unit: int
    attempt: int
    agent: str
    dispatched: float
    failed: float
    code: str
    reason: str


class JobTrace:
    """What happened to one job, microtask by microtask.

    Columns are plain lists (one entry per accepted result, see :data:`COLUMNS`); times are
    epoch seconds, converted from the coordinator's monotonic clock with one offset taken
    when the trace starts, so intervals stay monotonic-exact.
    """

    def __init__(
        self,
        *,
        job_id: str,
        model: str,
        policy: str,
        batch_size: int,
        samples: int,
        units: int,
        redundancy: int = 1,
        submitted: float | None = None,
        max_rows: int = MAX_ROWS,
    ) -> None:
        self.job_id = job_id
        self.model = model
        self.policy = policy
        self.batch_size = batch_size
        self.samples_total = samples
        self.units = units
        self.redundancy = redundancy
        self.submitted = time.time() if submitted is None else submitted
        self.finished: float | None = None
        self.ok: bool | None = None
        self.error: str | None = None
        self.retries = 0
        # Slots of each agent that took part, as the registry had them.
        self.slots: dict[str, int] = {}
        self.failures: list[Failure] = []
        self.dropped_rows = 0
        self.dropped_failures = 0
        self.max_rows = max_rows
        self._offset = time.time() - time.monotonic()
        self.task: list[str] = []
        self.unit: list[int] = []
        self.attempt: list[int] = []
        self.agent: list[str] = []
        self.samples: list[int] = []
        self.dispatched: list[float] = []
        self.received: list[float] = []
        self.queued_ms: list[float] = []
        self.exec_ms: list[float] = []
        self.est_ms: list[float] = []
        self.retried: list[int] = []
        self.speculative: list[bool] = []

    @classmethod
    def for_job(cls, job: Job) -> JobTrace:
        """A trace for ``job`` (split already), submitted now."""
        return cls(
            job_id=job.job_id,
            model=job.spec.model,
            policy=job.policy,
            batch_size=job.batch_size,
            samples=job.samples,
            units=len(job.units),
            redundancy=job.redundancy,
        )

    def __len__(self) -> int:
        return len(self.task)

    # -- recording (on the coordinator's event loop) -----------------------------------------
    def result(self, task: Microtask, agent: AgentRecord, queued_ms: float, exec_ms: float) -> None:
        """An accepted result of ``task`` (still holding its dispatch time) from ``agent``."""
        if len(self.task) >= self.max_rows:
            self.dropped_rows += 1
            return
        offset = self._offset
        agent_id = agent.agent_id
        if agent_id not in self.slots:
            self.slots[agent_id] = agent.slots
        self.task.append(task.task_id)
        self.unit.append(task.unit)
        self.attempt.append(task.attempt)
        self.agent.append(agent_id)
        self.samples.append(task.stop - task.start)
        self.dispatched.append(task.dispatched_at + offset)
        self.received.append(time.monotonic() + offset)
        self.queued_ms.append(queued_ms)
        self.exec_ms.append(exec_ms)
        self.est_ms.append(task.est_ms)
        self.retried.append(len(task.failures))
        self.speculative.append(task.speculative)

    def failure(self, task: Microtask, agent: AgentRecord | None, code: str, reason: str) -> None:
        """A running attempt of ``task`` failed, was lost or was handed back."""
        if len(self.failures) >= MAX_FAILURES:
            self.dropped_failures += 1
            return
        agent_id = task.agent_id or (agent.agent_id if agent is not None else "?")
        if agent is not None and agent_id not in self.slots:
            self.slots[agent_id] = agent.slots
        self.failures.append(
            Failure(
                task=task.task_id,
                unit=task.unit,
                attempt=task.attempt,
                agent=agent_id,
                dispatched=task.dispatched_at + self._offset,
                failed=time.monotonic() + self._offset,
                code=code,
                reason=reason[:REASON_CHARS],
            )
        )

    def finish(self, job: Job) -> None:
        """The job ended (done or failed)."""
        finished = job.finished if job.finished is not None else time.monotonic()
        self.finished = finished + self._offset
        self.ok = job.finished_ok
        self.error = job.error.message[:REASON_CHARS] if job.error is not None else None
        self.retries = job.retries

    # -- files -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The trace as plain data, columns as lists; times and durations as whole
        microseconds (times since ``submitted``), which encode several times faster and
        smaller than floats."""
        base = self.submitted
        return {
            "version": TRACE_VERSION,
            "job_id": self.job_id,
            "model": self.model,
            "policy": self.policy,
            "batch_size": self.batch_size,
            "samples": self.samples_total,
            "units": self.units,
            "redundancy": self.redundancy,
            "submitted": round(self.submitted, 6),
            "finished": None if self.finished is None else round(self.finished, 6),
            "ok": self.ok,
            "error": self.error,
            "retries": self.retries,
            "slots": dict(self.slots),
            "dropped_rows": self.dropped_rows,
            "dropped_failures": self.dropped_failures,
            "rows": {
                "task": list(self.task),
                "unit": list(self.unit),
                "attempt": list(self.attempt),
                "agent": list(self.agent),
                "samples": list(self.samples),
                "dispatched_us": _to_us(self.dispatched, base, 1e6),
                "received_us": _to_us(self.received, base, 1e6),
                "queued_us": _to_us(self.queued_ms, 0.0, 1e3),
                "exec_us": _to_us(self.exec_ms, 0.0, 1e3),
                "est_us": _to_us(self.est_ms, 0.0, 1e3),
                "retried": list(self.retried),
                "speculative": [int(v) for v in self.speculative],
            },
            "failures": {
                "task": [f.task for f in self.failures],
                "unit": [f.unit for f in self.failures],
                "attempt": [f.attempt for f in self.failures],
                "agent": [f.agent for f in self.failures],
                "dispatched_us": _to_us([f.dispatched for f in self.failures], base, 1e6),
                "failed_us": _to_us([f.failed for f in self.failures], base, 1e6),
                "code": [f.code for f in self.failures],
                "reason": [f.reason for f in self.failures],
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobTrace:
        """The inverse of :meth:`to_dict`. Raises :class:`TraceError` on anything else."""
        if not isinstance(data, dict) or data.get("version") != TRACE_VERSION:
            version = data.get("version") if isinstance(data, dict) else None
            raise TraceError(f"not an edge-offload trace of version {TRACE_VERSION} ({version=})")
        try:
            trace = cls(
                job_id=str(data["job_id"]),
                model=str(data["model"]),
                policy=str(data["policy"]),
                batch_size=int(data["batch_size"]),
                samples=int(data["samples"]),
                units=int(data["units"]),
                redundancy=int(data.get("redundancy", 1)),
                submitted=float(data["submitted"]),
            )
            base = trace.submitted
            finished = data.get("finished")
            trace.finished = None if finished is None else float(finished)
            trace.ok = data.get("ok")
            trace.error = data.get("error")
            trace.retries = int(data.get("retries", 0))
            trace.slots = {str(k): int(v) for k, v in data["slots"].items()}
            trace.dropped_rows = int(data.get("dropped_rows", 0))
            trace.dropped_failures = int(data.get("dropped_failures", 0))
            rows = data["rows"]
            trace.task = list(map(str, rows["task"]))
            trace.unit = list(map(int, rows["unit"]))
            trace.attempt = list(map(int, rows["attempt"]))
            trace.agent = list(map(str, rows["agent"]))
            trace.samples = list(map(int, rows["samples"]))
            trace.dispatched = _from_us(rows["dispatched_us"], base, 1e6)
            trace.received = _from_us(rows["received_us"], base, 1e6)
            trace.queued_ms = _from_us(rows["queued_us"], 0.0, 1e3)
            trace.exec_ms = _from_us(rows["exec_us"], 0.0, 1e3)
            trace.est_ms = _from_us(rows["est_us"], 0.0, 1e3)
            trace.retried = list(map(int, rows["retried"]))
            trace.speculative = list(map(bool, rows["speculative"]))
            f = data["failures"]
            failed: list[list[Any]] = [
                list(map(str, f["task"])),
                list(map(int, f["unit"])),
                list(map(int, f["attempt"])),
                list(map(str, f["agent"])),
                _from_us(f["dispatched_us"], base, 1e6),
                _from_us(f["failed_us"], base, 1e6),
                list(map(str, f["code"])),
                list(map(str, f["reason"])),
            ]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise TraceError(f"malformed trace: {e!r}") from e
        columns: list[list[Any]] = [getattr(trace, name) for name in _ATTRIBUTES]
        if len({len(c) for c in columns}) > 1 or len({len(c) for c in failed}) > 1:
            raise TraceError("malformed trace: columns of different lengths")
        trace.failures = [Failure(*values) for values in zip(*failed, strict=True)]
        return trace

    def save(self, path: Path) -> Path:
        """Write the trace to ``path`` atomically (a temporary file, then a rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps(self.to_dict(), separators=(",", ":"))
        # A unique name in the same directory (so the rename is atomic), created with the
        # process's usual permissions.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "x") as f:
                f.write(payload)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return path

    def write_to(self, directory: Path) -> Path | None:
        """Save as ``{directory}/{job_id}.json``; a failure is logged, not raised (a trace
        must never fail the job it describes)."""
        try:
            return self.save(trace_path(directory, self.job_id))
        except (OSError, ValueError) as e:
            logger.warning("job %s: cannot write its trace to %s: %s", self.job_id, directory, e)
            return None

    @classmethod
    def load(cls, path: Path) -> JobTrace:
        """Read a trace written by :meth:`save`. Raises :class:`TraceError`."""
        try:
            data = json.loads(Path(path).read_bytes())
        except FileNotFoundError:
            raise TraceError(f"{path}: no such trace file") from None
        except (OSError, ValueError) as e:
            raise TraceError(f"{path}: cannot read the trace: {e}") from e
        return cls.from_dict(data)


def _to_us(values: list[float], base: float, scale: float) -> list[int]:
    """``(value - base) x scale`` as whole numbers (microseconds)."""
    a = (np.asarray(values, dtype=np.float64) - base) * scale
    clipped = np.clip(np.nan_to_num(a, posinf=2**62, neginf=-(2**62)), -(2**62), 2**62)
    out: list[int] = np.rint(clipped).astype(np.int64).tolist()
    return out


def _from_us(values: list[int], base: float, scale: float) -> list[float]:
    out: list[float] = (np.asarray(values, dtype=np.float64) / scale + base).tolist()
    return out


def trace_path(directory: Path, job_id: str) -> Path:
    """Where the trace of ``job_id`` lives in ``directory``."""
    if not job_id or "/" in job_id or "\\" in job_id or job_id.startswith("."):
        raise ValueError(f"job id {job_id!r} cannot name a trace file")
    return Path(directory) / f"{job_id}.json"
