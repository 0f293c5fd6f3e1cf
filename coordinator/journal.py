"""The durable journal: jobs, microtask states and results in SQLite, for restarts."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from protocol import InferenceJob, MonitorJob, decode_tensors, encode, encode_arrays
from protocol.codec import unframe
from protocol.messages import JobResult

if TYPE_CHECKING:
    from coordinator.ledger import Job, Microtask

logger = logging.getLogger(__name__)

# Fault injection for the chaos suite: "before:N" or "after:N" makes the process SIGKILL
# itself just before or just after its Nth journal commit, points a kill from outside
# hits only by luck.
CRASH_ENV = "EDGE_OFFLOAD_TEST_CRASH_AT_COMMIT"


def _crash_point() -> tuple[str, int] | None:
    value = os.environ.get(CRASH_ENV, "")
    when, _, n = value.partition(":")
    if when not in ("before", "after") or not n.isdigit():
        return None
    return when, int(n)


SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    spec BLOB NOT NULL,          -- the InferenceJob as a binary frame, inputs included
    batch_size INTEGER NOT NULL,
    policy TEXT NOT NULL,
    submitted REAL NOT NULL,     -- wall clock
    finished INTEGER NOT NULL DEFAULT 0,
    batch_axis INTEGER DEFAULT 0 -- the model's; NULL: none (one item per microtask)
);
CREATE TABLE IF NOT EXISTS tasks (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    attempt INTEGER NOT NULL,    -- the highest attempt number used or reserved
    charged INTEGER NOT NULL,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS monitors (
    job_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,          -- the MonitorJob as JSON
    started REAL NOT NULL,       -- wall clock
    stopped INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,        -- the unit of work (tasks.idx is the copy)
    agent_id TEXT NOT NULL,
    outputs BLOB NOT NULL,       -- a JobResult frame carrying this microtask's outputs
    PRIMARY KEY (job_id, idx)
);
"""


@dataclass
class Recovered:
    """An unfinished job as the journal last saw it."""

    spec: InferenceJob
    arrays: dict[str, np.ndarray[Any, Any]]
    batch_size: int
    policy: str
    attempts: dict[int, tuple[int, int]]  # index -> (attempt, charged)
    results: dict[int, tuple[str, dict[str, np.ndarray[Any, Any]]]]  # unit -> (agent, outputs)
    # How the job was split: the model's batch axis when it was submitted (the agents
    # that report the model may not be back yet when the job is resumed).
    batch_axis: int | None = 0


class Journal:
    """Write-behind journal of the ledger's transitions.

    The ledger marks what changed; :meth:`commit` writes it in one transaction (the
    coordinator commits every 100 ms, and before it reports a job done). WAL mode with
    ``synchronous=NORMAL``: a committed transaction survives the coordinator process being
    killed; a power cut may lose the last ones, whose microtasks then simply run again.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "batch_axis" not in columns:  # a journal from before models without axis 0
            self._db.execute("ALTER TABLE jobs ADD COLUMN batch_axis INTEGER DEFAULT 0")
        # How many coordinators have opened this journal, this one included; committed at
        # once, so every incarnation numbers its attempts in a range of its own.
        row = self._db.execute("SELECT value FROM meta WHERE key = 'incarnation'").fetchone()
        self.incarnation = (row[0] if row else 0) + 1
        self._db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('incarnation', ?)",
            (self.incarnation,),
        )
        self._jobs: list[tuple[Any, ...]] = []
        self._tasks: dict[tuple[str, int], tuple[int, int]] = {}
        self._results: list[tuple[str, int, str, bytes]] = []
        self._finished: list[str] = []
        self._monitors: list[tuple[str, str | None, float]] = []
        self.commits = 0
        self._crash = _crash_point()

    # -- marks (hot path: no I/O) ---------------------------------------------------------------
    def job_added(self, job: Job) -> None:
        spec = job.spec
        if not spec.inputs:
            spec = spec.model_copy(update={"inputs": encode_arrays(job.arrays)})
        self._jobs.append(
            (
                job.job_id,
                encode(spec, "binary"),
                job.batch_size,
                job.policy,
                time.time(),
                job.batch_axis,
            )
        )
        for t in job.tasks:
            self._tasks[(job.job_id, t.index)] = (t.attempt, t.charged)

    def task_changed(self, task: Microtask) -> None:
        self._tasks[(task.job.job_id, task.index)] = (task.attempts_used, task.charged)

    def task_done(self, task: Microtask, agent_id: str, outputs: dict[str, Any]) -> None:
        frame = encode(
            JobResult(job_id=task.job.job_id, ok=True, outputs=encode_arrays(outputs)), "binary"
        )
        # Keyed by unit of work: what the job keeps, whichever copy produced it.
        self._results.append((task.job.job_id, task.unit, agent_id, frame))

    def job_finished(self, job: Job) -> None:
        self._finished.append(job.job_id)

    def monitor_started(self, spec: MonitorJob, started: float) -> None:
        self._monitors.append((spec.job_id, spec.model_dump_json(), started))

    def monitor_stopped(self, job_id: str) -> None:
        self._monitors.append((job_id, None, 0.0))

    @property
    def dirty(self) -> bool:
        return bool(self._jobs or self._tasks or self._results or self._finished or self._monitors)

    # -- I/O ------------------------------------------------------------------------------------
    def commit(self) -> None:
        """Write everything marked since the last commit, atomically."""
        if not self.dirty:
            return
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany(
                "INSERT OR REPLACE INTO jobs (job_id, spec, batch_size, policy, submitted, "
                "batch_axis) VALUES (?, ?, ?, ?, ?, ?)",
                self._jobs,
            )
            db.executemany(
                "INSERT OR REPLACE INTO tasks (job_id, idx, attempt, charged) VALUES (?,?,?,?)",
                [(j, i, a, c) for (j, i), (a, c) in self._tasks.items()],
            )
            db.executemany(
                "INSERT OR REPLACE INTO results (job_id, idx, agent_id, outputs) VALUES (?,?,?,?)",
                self._results,
            )
            for job_id in self._finished:
                # A finished job's inputs and outputs have been delivered: keep only its row.
                db.execute("UPDATE jobs SET finished = 1, spec = x'' WHERE job_id = ?", (job_id,))
                db.execute("DELETE FROM tasks WHERE job_id = ?", (job_id,))
                db.execute("DELETE FROM results WHERE job_id = ?", (job_id,))
            for job_id, spec, started in self._monitors:
                if spec is None:
                    db.execute("UPDATE monitors SET stopped = 1 WHERE job_id = ?", (job_id,))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO monitors (job_id, spec, started) VALUES (?,?,?)",
                        (job_id, spec, started),
                    )
            self._maybe_crash("before")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._jobs, self._tasks, self._results, self._finished = [], {}, [], []
        self._monitors = []
        self.commits += 1
        self._maybe_crash("after")

    def _maybe_crash(self, when: str) -> None:
        if self._crash is not None and self._crash == (when, self.commits + (when == "before")):
            logger.warning("%s=%s:%d: killing this process", CRASH_ENV, *self._crash)
            os.kill(os.getpid(), signal.SIGKILL)

    def known(self, job_id: str) -> bool:
        """A job or monitoring job with this id was ever started."""
        row = self._db.execute(
            "SELECT 1 FROM jobs WHERE job_id = ? UNION SELECT 1 FROM monitors WHERE job_id = ?",
            (job_id, job_id),
        ).fetchone()
        return row is not None or any(m[0] == job_id for m in self._monitors)

    def running_monitors(self) -> list[tuple[MonitorJob, float]]:
        """Monitoring jobs not stopped, with their start time (wall clock)."""
        out = []
        for spec, started in self._db.execute(
            "SELECT spec, started FROM monitors WHERE stopped = 0 ORDER BY started"
        ):
            try:
                out.append((MonitorJob.model_validate_json(spec), started))
            except ValidationError as e:  # written by another version: skip, say so
                logger.error("journal: cannot resume a monitoring job: %s", e)
        return out

    def unfinished(self) -> list[Recovered]:
        """Every job not finished when the journal was last committed, in submission order."""
        out = []
        rows = self._db.execute(
            "SELECT job_id, spec, batch_size, policy, batch_axis FROM jobs WHERE finished = 0 "
            "ORDER BY submitted"
        ).fetchall()
        for job_id, spec_frame, batch_size, policy, batch_axis in rows:
            spec = InferenceJob.model_validate(unframe(spec_frame), strict=True)
            attempts = {
                idx: (attempt, charged)
                for idx, attempt, charged in self._db.execute(
                    "SELECT idx, attempt, charged FROM tasks WHERE job_id = ?", (job_id,)
                )
            }
            results = {}
            for idx, agent_id, frame in self._db.execute(
                "SELECT idx, agent_id, outputs FROM results WHERE job_id = ?", (job_id,)
            ):
                res = JobResult.model_validate(unframe(frame), strict=True)
                results[idx] = (agent_id, decode_tensors(res.outputs))
            out.append(
                Recovered(
                    spec=spec.model_copy(update={"inputs": {}}),
                    arrays=decode_tensors(spec.inputs),
                    batch_size=batch_size,
                    policy=policy,
                    attempts=attempts,
                    results=results,
                    batch_axis=batch_axis,
                )
            )
        return out

    def close(self) -> None:
        self.commit()
        self._db.close()
