"""Jobs and microtasks, and the one place where a microtask changes state."""

from __future__ import annotations

import asyncio
import enum
import heapq
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coordinator.handles import JobOutput
from coordinator.journal import Journal, Recovered
from coordinator.registry import AgentRecord
from protocol import ErrorInfo, InferenceJob, JobState, RunTask, Tensor

logger = logging.getLogger(__name__)

# The Nth coordinator to open a journal numbers the new attempts of a resumed microtask
# from N x this: attempts dispatched by earlier ones after their last commit (never
# journaled) are below it, so a new attempt never reuses a number an agent already holds,
# and a result or heartbeat naming an attempt below it comes from before the restart.
RESTART_ATTEMPT_GAP = 1000


class TaskState(enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(eq=False, slots=True)
class Microtask:
    """Samples ``[start, stop)`` of one job."""

    job: Job
    index: int
    start: int
    stop: int
    task_id: str
    state: TaskState = TaskState.PENDING
    attempt: int = 0
    # Attempt numbers up to this one may be held by agents from before a restart.
    attempt_floor: int = 0
    agent_id: str | None = None
    lease_until: float = 0.0
    lease_s: float = 0.0
    dispatched_at: float = 0.0
    est_ms: float = 0.0
    # Attempts that count against max_attempts (hand-backs do not).
    charged: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def samples(self) -> int:
        return self.stop - self.start

    @property
    def attempts_used(self) -> int:
        """The highest attempt number used or reserved (what the journal records)."""
        return max(self.attempt, self.attempt_floor)

    def from_before_restart(self, attempt: int) -> bool:
        """``attempt`` may have been dispatched by a coordinator before this one's restart."""
        return self.state is TaskState.PENDING and 0 < attempt <= self.attempt_floor


@dataclass(eq=False)
class Job:
    """An inference job split into microtasks; outputs are kept per microtask until done."""

    spec: InferenceJob
    arrays: dict[str, np.ndarray[Any, Any]]
    batch_size: int
    policy: str
    client_id: str | None = None
    submitted: float = field(default_factory=time.monotonic)
    finished: float | None = None
    tasks: list[Microtask] = field(default_factory=list)
    pending: deque[Microtask] = field(default_factory=deque)
    outputs: list[dict[str, np.ndarray[Any, Any]] | None] = field(default_factory=list)
    done: int = 0
    retries: int = 0
    error: ErrorInfo | None = None
    per_agent: Counter[str] = field(default_factory=Counter)
    per_agent_tasks: Counter[str] = field(default_factory=Counter)
    bytes_per_sample: int = 0
    # In-process submitters wait on this; MQTT submitters get the result topic instead.
    future: asyncio.Future[JobOutput] | None = None
    publish_result: bool = True
    output_names: frozenset[str] = frozenset()
    # Recorded in the journal, to be resumed by a restarted coordinator (jobs submitted
    # over MQTT; an in-process submitter does not outlive its coordinator).
    journaled: bool = False
    # A resumed job waits until then (monotonic) before dispatching, so the agents can
    # first report the work they still hold from before the restart.
    hold_until: float = 0.0

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def samples(self) -> int:
        return self.tasks[-1].stop if self.tasks else 0

    @property
    def finished_ok(self) -> bool:
        return self.done == len(self.tasks) and self.error is None

    @property
    def terminal(self) -> bool:
        return self.finished is not None

    @property
    def state(self) -> JobState:
        if self.terminal:
            return "done" if self.finished_ok else "failed"
        return "running" if len(self.pending) < len(self.tasks) else "accepted"

    def split(self) -> None:
        n = next(iter(self.arrays.values())).shape[0]
        self.bytes_per_sample = sum(a[:1].nbytes for a in self.arrays.values())
        for i, start in enumerate(range(0, n, self.batch_size)):
            t = Microtask(
                job=self,
                index=i,
                start=start,
                stop=min(start + self.batch_size, n),
                task_id=f"{self.job_id}.{i}",
            )
            self.tasks.append(t)
            self.pending.append(t)
        self.outputs = [None] * len(self.tasks)

    def inputs_for(self, task: Microtask) -> dict[str, Tensor]:
        return {
            name: Tensor.from_array(a[task.start : task.stop]) for name, a in self.arrays.items()
        }

    def assemble(self) -> dict[str, np.ndarray[Any, Any]]:
        """Outputs of all microtasks concatenated along the batch axis, in input order."""
        parts = [p for p in self.outputs if p is not None]
        if len(parts) != len(self.tasks):
            raise RuntimeError(f"job {self.job_id}: {len(self.tasks) - len(parts)} parts missing")
        names = list(parts[0]) if parts else []
        return {name: np.concatenate([p[name] for p in parts], axis=0) for name in names}


class Ledger:
    """Every microtask state transition happens here, so it can be journaled in one place.

    PENDING -> RUNNING (dispatch) -> DONE (accepted result)
                       -> PENDING (lease expired, agent dead, handed back, failed attempt)
                       -> FAILED (attempts exhausted)
    Exactly one result per microtask is kept: a result counts only if it answers the
    current attempt on the agent that holds the lease.
    """

    def __init__(self, *, max_attempts: int, journal: Journal | None = None) -> None:
        self.max_attempts = max_attempts
        self.journal = journal
        self.jobs: dict[str, Job] = {}
        # Jobs not finished yet, in submission order: what the dispatcher looks at.
        self.active: dict[str, Job] = {}
        # heap of (lease_until, attempt, task_id, task)
        self._leases: list[tuple[float, int, str, Microtask]] = []
        self.counts: Counter[str] = Counter()

    def _journal(self, job: Job) -> Journal | None:
        return self.journal if job.journaled else None

    def add(self, job: Job, *, recovered: bool = False) -> None:
        self.jobs[job.job_id] = job
        self.active[job.job_id] = job
        if self.journal is not None and job.publish_result:
            job.journaled = True
            if not recovered:
                self.journal.job_added(job)

    def restore(self, job: Job, recovered: Recovered) -> None:
        """Re-create a journaled job as the journal last saw it: microtasks with a result
        keep it, the others wait to run again with their attempt numbers carried on, so a
        late result of an attempt from before the restart is recognised as stale."""
        job.pending.clear()
        incarnation = self.journal.incarnation if self.journal is not None else 1
        for t in job.tasks:
            t.attempt, t.charged = recovered.attempts.get(t.index, (0, 0))
            t.attempt_floor = max(t.attempt, incarnation * RESTART_ATTEMPT_GAP)
            if t.index in recovered.results:
                agent_id, outputs = recovered.results[t.index]
                t.state = TaskState.DONE
                job.outputs[t.index] = outputs
                job.done += 1
                job.per_agent[agent_id] += t.samples
                job.per_agent_tasks[agent_id] += 1
            else:
                job.pending.append(t)
        self.add(job, recovered=True)

    def finished(self, job: Job) -> float:
        """Mark ``job`` finished (done or failed); returns when."""
        job.finished = time.monotonic()
        self.active.pop(job.job_id, None)
        if (journal := self._journal(job)) is not None:
            journal.job_finished(job)
        return job.finished

    def dispatch(
        self, task: Microtask, agent: AgentRecord, *, lease_s: float, est_ms: float
    ) -> RunTask:
        assert task.state is TaskState.PENDING, task.state
        now = time.time()
        self._run(task, agent, task.attempts_used + 1, lease_s=lease_s, est_ms=est_ms)
        self.counts["dispatched"] += 1
        # Built from trusted parts: skip validation on the dispatch hot path.
        return RunTask.model_construct(
            task_id=task.task_id,
            job_id=task.job.job_id,
            attempt=task.attempt,
            model=task.job.spec.model,
            inputs=task.job.inputs_for(task),
            lease_until=now + lease_s,
            sent_at=now,
        )

    def _run(
        self, task: Microtask, agent: AgentRecord, attempt: int, *, lease_s: float, est_ms: float
    ) -> None:
        task.state = TaskState.RUNNING
        task.attempt = attempt
        task.agent_id = agent.agent_id
        task.dispatched_at = time.monotonic()
        task.lease_s = lease_s
        task.lease_until = task.dispatched_at + lease_s
        task.est_ms = est_ms
        if not agent.in_flight:
            agent.progress_mark = task.dispatched_at
        agent.in_flight[task.task_id] = task
        agent.queued_ms += est_ms
        heapq.heappush(self._leases, (task.lease_until, task.attempt, task.task_id, task))
        if (journal := self._journal(task.job)) is not None:
            journal.task_changed(task)

    def adopt(
        self, task: Microtask, agent: AgentRecord, attempt: int, *, lease_s: float, est_ms: float
    ) -> None:
        """PENDING -> RUNNING for an attempt dispatched before a restart that ``agent`` reports
        holding: its lease is taken over instead of running the microtask again.

        The task may still sit in its job's pending queue; the dispatcher skips it there.
        """
        assert task.from_before_restart(attempt), (task.state, attempt, task.attempt_floor)
        self._run(task, agent, attempt, lease_s=lease_s, est_ms=est_ms)
        self.counts["adopted"] += 1

    def _release(self, task: Microtask, agent: AgentRecord | None) -> None:
        if agent is not None and agent.in_flight.pop(task.task_id, None) is not None:
            agent.queued_ms = max(agent.queued_ms - task.est_ms, 0.0)
            agent.progress_mark = time.monotonic()

    def is_current(self, task: Microtask, attempt: int, agent_id: str) -> bool:
        return (
            task.state is TaskState.RUNNING
            and task.attempt == attempt
            and task.agent_id == agent_id
        )

    def complete(
        self, task: Microtask, agent: AgentRecord, outputs: dict[str, np.ndarray[Any, Any]]
    ) -> None:
        """RUNNING -> DONE with the accepted outputs (caller checked :meth:`is_current`)."""
        self._release(task, agent)
        task.state = TaskState.DONE
        job = task.job
        job.outputs[task.index] = outputs
        job.done += 1
        job.per_agent[agent.agent_id] += task.samples
        job.per_agent_tasks[agent.agent_id] += 1
        self.counts["completed"] += 1
        if (journal := self._journal(job)) is not None:
            journal.task_done(task, agent.agent_id, outputs)

    def retry(
        self,
        task: Microtask,
        agent: AgentRecord | None,
        code: str,
        message: str,
        *,
        count_attempt: bool = True,
    ) -> bool:
        """RUNNING -> PENDING (or FAILED once attempts are exhausted). Returns True if requeued.

        ``count_attempt=False`` is for hand-backs that are not the task's fault (an agent
        draining, or dying with the task queued), which must not use up its attempts.
        """
        if task.state is not TaskState.RUNNING:
            return False
        self._release(task, agent)
        task.failures.append((task.agent_id or "?", code, message))
        job = task.job
        job.retries += 1
        self.counts["retried"] += 1
        if count_attempt:
            task.charged += 1
        if (journal := self._journal(job)) is not None:
            journal.task_changed(task)
        if task.charged >= self.max_attempts:
            task.state = TaskState.FAILED
            self.counts["failed"] += 1
            where = "; ".join(f"attempt on {a}: [{c}] {m}" for a, c, m in task.failures)
            job.error = ErrorInfo(
                code="exhausted" if code != "bad_input" else "bad_input",
                message=f"microtask {task.task_id} (samples {task.start}-{task.stop - 1}) "
                f"failed {len(task.failures)} times: {where}"[:2000],
            )
            return False
        task.state = TaskState.PENDING
        task.agent_id = None
        job.pending.appendleft(task)  # retried work goes first: it is holding the job up
        return True

    def renew(self, task: Microtask, now: float) -> None:
        """Extend a running microtask's lease by its original length, from ``now``."""
        if task.lease_until - now < task.lease_s / 2:  # renew at most every half lease
            task.lease_until = now + task.lease_s
            heapq.heappush(self._leases, (task.lease_until, task.attempt, task.task_id, task))
            self.counts["renewed"] += 1

    def expired(self, now: float) -> list[Microtask]:
        """Running microtasks whose lease has passed (each attempt reported once)."""
        out = []
        while self._leases and self._leases[0][0] <= now:
            _, attempt, _, task = heapq.heappop(self._leases)
            # Entries left behind by a renewal or a finished attempt are skipped.
            current = task.state is TaskState.RUNNING and task.attempt == attempt
            if current and task.lease_until <= now:
                out.append(task)
        return out

    def cancel_job(self, job: Job, agents: dict[str, AgentRecord]) -> list[Microtask]:
        """Release every running microtask of a finished/failed job; return those released."""
        released = []
        for task in job.tasks:
            if task.state is TaskState.RUNNING:
                self._release(task, agents.get(task.agent_id or ""))
                task.state = TaskState.FAILED
                released.append(task)
        job.pending.clear()
        return released
