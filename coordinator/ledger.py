"""Jobs and microtasks, and the one place where a microtask changes state."""

from __future__ import annotations

import asyncio
import enum
import heapq
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.handles import JobOutput
from coordinator.journal import Journal, Recovered
from coordinator.registry import AgentRecord
from protocol import ErrorInfo, InferenceJob, JobState, RunTask, Tensor, TensorSpec

if TYPE_CHECKING:
    from coordinator.trace import JobTrace

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
    # Not needed any more: another copy of the same unit of work was accepted.
    CANCELLED = "cancelled"


def outputs_agree(
    a: dict[str, np.ndarray[Any, Any]], b: dict[str, np.ndarray[Any, Any]], tolerance: float
) -> bool:
    """Equal outputs: floats within ``tolerance`` (relative and absolute), others exactly."""
    if a.keys() != b.keys():
        return False
    for name, x in a.items():
        y = b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if np.issubdtype(x.dtype, np.floating) and tolerance > 0:
            if not np.allclose(x, y, rtol=tolerance, atol=tolerance, equal_nan=True):
                return False
        elif not np.array_equal(x, y, equal_nan=np.issubdtype(x.dtype, np.inexact)):
            return False
    return True


@dataclass(eq=False, slots=True)
class Microtask:
    """One copy of unit ``unit`` of a job: samples ``[start, stop)``.

    A unit has one copy, or ``redundancy`` copies that must agree, plus any copy started
    to overtake a straggler; the first outputs that reach the unit's quorum are kept and
    the other copies are cancelled.
    """

    job: Job
    index: int
    start: int
    stop: int
    task_id: str
    unit: int = 0
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
    # A copy's outputs while its unit waits for the others to agree.
    outputs: dict[str, np.ndarray[Any, Any]] | None = None
    speculative: bool = False
    # Re-created from the journal and not dispatched since: an agent may hold an attempt
    # of it from before the restart, which can be taken over.
    restored: bool = False
    # When the dispatcher first found no agent allowed to run it (monotonic), or 0.
    unplaceable_since: float = 0.0

    @property
    def samples(self) -> int:
        return self.stop - self.start

    @property
    def attempts_used(self) -> int:
        """The highest attempt number used or reserved (what the journal records)."""
        return max(self.attempt, self.attempt_floor)

    def from_before_restart(self, attempt: int) -> bool:
        """``attempt`` may have been dispatched by a coordinator before this one's restart,
        and this one has not dispatched the microtask since."""
        return (
            self.restored and self.state is TaskState.PENDING and 0 < attempt <= self.attempt_floor
        )


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
    # The copies of each unit of work, by unit index.
    units: list[list[Microtask]] = field(default_factory=list)
    pending: deque[Microtask] = field(default_factory=deque)
    # Accepted outputs, by unit.
    outputs: list[dict[str, np.ndarray[Any, Any]] | None] = field(default_factory=list)
    done: int = 0  # units with accepted outputs
    retries: int = 0
    error: ErrorInfo | None = None
    per_agent: Counter[str] = field(default_factory=Counter)
    per_agent_tasks: Counter[str] = field(default_factory=Counter)
    # Agents whose outputs disagreed with the majority (redundancy > 1), and how often;
    # with ``exclude`` they get no more of this job's work.
    disagreements: Counter[str] = field(default_factory=Counter)
    excluded: set[str] = field(default_factory=set)
    # The model's batch axis (ModelInfo.batch_axis): split inputs are sliced along it and
    # outputs concatenated along it. None: split inputs lead with an item axis, each
    # microtask runs one item, and outputs are kept per item (:meth:`per_item`).
    batch_axis: int | None = 0
    # Payload of a microtask: bytes per sample of the split inputs, plus the inputs sent
    # whole (``spec.whole``), encoded once for the whole job.
    bytes_per_sample: int = 0
    whole_inputs: dict[str, Tensor] = field(default_factory=dict)
    whole_bytes: int = 0
    # False when every input is whole: one microtask, whose outputs have no known rows.
    has_split: bool = True
    # In-process submitters wait on this; MQTT submitters get the result topic instead.
    future: asyncio.Future[JobOutput] | None = None
    publish_result: bool = True
    # The model's outputs (name -> spec), to check every result against.
    output_specs: dict[str, TensorSpec] = field(default_factory=dict)
    # The exact model file (sha256) when the model is in the coordinator's catalog: only
    # agents with that file run the job, and agents lacking it may be sent it first.
    model_sha256: str | None = None
    # Recorded in the journal, to be resumed by a restarted coordinator (jobs submitted
    # over MQTT; an in-process submitter does not outlive its coordinator).
    journaled: bool = False
    # A resumed job waits until then (monotonic) before dispatching, so the agents can
    # first report the work they still hold from before the restart.
    hold_until: float = 0.0
    # Which coordinator (journal incarnation) runs the job: copies added beyond the
    # split carry it in their task id, so they never collide with copies an earlier
    # incarnation added (those are not re-created by a restart).
    incarnation: int = 1
    # Windows of a monitoring job: due by then (monotonic), dispatched before any work
    # without a deadline (earliest deadline first), only to agents whose labels match
    # ``require`` (and to those matching ``prefer`` when one is available).
    deadline: float | None = None
    require: tuple[tuple[str, str], ...] = ()
    prefer: tuple[tuple[str, str], ...] = ()
    # Internal jobs (monitoring windows) report here instead of to a submitter; they are
    # not journaled, listed or kept once finished.
    on_finish: Callable[[Job], None] | None = None
    # Where and when each microtask ran (coordinator.trace), for per-job reports.
    trace: JobTrace | None = None

    @property
    def job_id(self) -> str:
        return self.spec.job_id

    @property
    def samples(self) -> int:
        # The last unit's end: copies added later (stragglers, redundancy) sit at the end
        # of ``tasks`` but may cover any unit.
        return self.units[-1][0].stop if self.units else 0

    @property
    def redundancy(self) -> int:
        return self.spec.redundancy

    @property
    def quorum(self) -> int:
        return self.spec.redundancy // 2 + 1

    @property
    def complete(self) -> bool:
        return self.done == len(self.units)

    @property
    def finished_ok(self) -> bool:
        return self.complete and self.error is None

    @property
    def terminal(self) -> bool:
        return self.finished is not None

    @property
    def state(self) -> JobState:
        if self.terminal:
            return "done" if self.finished_ok else "failed"
        return "running" if len(self.pending) < len(self.tasks) else "accepted"

    @property
    def split_axis(self) -> int:
        """The axis split inputs are sliced along: the batch axis, or the item axis."""
        return 0 if self.batch_axis is None else self.batch_axis

    def split(self) -> None:
        whole = set(self.spec.whole)
        split = [a for name, a in self.arrays.items() if name not in whole]
        self.whole_inputs = {
            name: Tensor.from_array(a) for name, a in self.arrays.items() if name in whole
        }
        self.whole_bytes = sum(t.nbytes for t in self.whole_inputs.values())
        self.has_split = bool(split)
        n = split[0].shape[self.split_axis] if split else 1
        self.bytes_per_sample = sum(a.nbytes for a in split) // max(n, 1)
        for unit, start in enumerate(range(0, n, self.batch_size)):
            self.units.append([])
            for _ in range(self.redundancy):
                self.pending.append(self._copy(unit, start, min(start + self.batch_size, n)))
        self.outputs = [None] * len(self.units)

    def _copy(self, unit: int, start: int, stop: int) -> Microtask:
        index = len(self.tasks)
        t = Microtask(
            job=self, index=index, start=start, stop=stop, task_id=f"{self.job_id}.{index}"
        )
        t.unit = unit
        self.tasks.append(t)
        self.units[unit].append(t)
        return t

    def add_copy(self, unit: int, *, speculative: bool = False) -> Microtask:
        """One more copy of ``unit``, first in line for dispatch."""
        first = self.units[unit][0]
        t = self._copy(unit, first.start, first.stop)
        t.task_id = f"{t.task_id}x{self.incarnation}"
        t.speculative = speculative
        self.pending.appendleft(t)
        return t

    def live_copies(self, unit: int) -> list[Microtask]:
        return [t for t in self.units[unit] if t.state in (TaskState.PENDING, TaskState.RUNNING)]

    def payload_bytes(self, task: Microtask) -> int:
        """Input bytes a microtask carries: its slice of the split inputs, and the whole ones."""
        return task.samples * self.bytes_per_sample + self.whole_bytes

    def inputs_for(self, task: Microtask) -> dict[str, Tensor]:
        if self.batch_axis is None:
            # One item per microtask (batch_size is 1): the item axis goes.
            index: tuple[int | slice, ...] = (task.start,)
        else:
            index = (*[slice(None)] * self.batch_axis, slice(task.start, task.stop))
        sliced = {
            name: Tensor.from_array(a[index])
            for name, a in self.arrays.items()
            if name not in self.whole_inputs
        }
        return sliced | self.whole_inputs

    def _accepted(self) -> list[dict[str, np.ndarray[Any, Any]]]:
        parts = [p for p in self.outputs if p is not None]
        if len(parts) != len(self.units):
            raise RuntimeError(f"job {self.job_id}: {len(self.units) - len(parts)} parts missing")
        return parts

    def assemble(self) -> dict[str, np.ndarray[Any, Any]]:
        """Outputs of all microtasks concatenated along the batch axis, in input order
        (none for a model without a batch axis: see :meth:`per_item`)."""
        if self.batch_axis is None:
            return {}
        parts = self._accepted()
        if len(parts) == 1:  # nothing to join (and a job of whole inputs may give 0-d outputs)
            return dict(parts[0])
        names = list(parts[0]) if parts else []
        return {
            name: np.concatenate([p[name] for p in parts], axis=self.batch_axis) for name in names
        }

    def per_item(self) -> list[dict[str, np.ndarray[Any, Any]]]:
        """Each item's outputs in input order, for a model without a batch axis (else none)."""
        return self._accepted() if self.batch_axis is None else []


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
        # Samples in flight by model, over every agent (the dispatcher's backlog horizon).
        self.in_flight_samples: Counter[str] = Counter()

    def _journal(self, job: Job) -> Journal | None:
        return self.journal if job.journaled else None

    def add(self, job: Job, *, recovered: bool = False) -> None:
        job.incarnation = self.journal.incarnation if self.journal is not None else 1
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
            t.restored = True
        for unit, copies in enumerate(job.units):
            if unit in recovered.results:
                agent_id, outputs = recovered.results[unit]
                for t in copies:
                    t.state = TaskState.DONE
                job.outputs[unit] = outputs
                job.done += 1
                job.per_agent[agent_id] += copies[0].samples
                job.per_agent_tasks[agent_id] += 1
            else:
                job.pending.extend(copies)
        self.add(job, recovered=True)

    def finished(self, job: Job) -> float:
        """Mark ``job`` finished (done or failed); returns when."""
        job.finished = time.monotonic()
        self.active.pop(job.job_id, None)
        job.whole_inputs = {}  # nothing is dispatched any more
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
            deadline=(
                None
                if task.job.deadline is None
                else now + max(task.job.deadline - task.dispatched_at, 0.0)
            ),
            priority=task.job.spec.priority,
            model_sha256=task.job.model_sha256,
        )

    def _run(
        self, task: Microtask, agent: AgentRecord, attempt: int, *, lease_s: float, est_ms: float
    ) -> None:
        task.state = TaskState.RUNNING
        task.restored = False
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
        agent.changed()
        self.in_flight_samples[task.job.spec.model] += task.samples
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
            agent.changed()
            self.in_flight_samples[task.job.spec.model] -= task.samples

    def is_current(self, task: Microtask, attempt: int, agent_id: str) -> bool:
        return (
            task.state is TaskState.RUNNING
            and task.attempt == attempt
            and task.agent_id == agent_id
        )

    def complete(
        self,
        task: Microtask,
        agent: AgentRecord,
        outputs: dict[str, np.ndarray[Any, Any]],
        agents: Mapping[str, AgentRecord],
        *,
        exclude_disagreeing: bool = True,
    ) -> list[Microtask]:
        """RUNNING -> DONE with these outputs (caller checked :meth:`is_current`).

        The unit's outputs are accepted once ``quorum`` copies agree (one, without
        redundancy); the unit's other copies are then cancelled, and the running ones
        are returned so their agents can be told. Copies that disagreed are counted
        against their agents. If the copies can no longer reach a quorum, more are
        queued, up to a bound after which the job fails.
        """
        self._release(task, agent)
        task.state = TaskState.DONE
        self.counts["completed"] += 1
        job = task.job
        if job.outputs[task.unit] is not None:
            return []  # decided already
        task.outputs = outputs
        copies = job.units[task.unit]
        groups: list[list[Microtask]] = []
        for t in copies:
            if t.state is TaskState.DONE and t.outputs is not None:
                for g in groups:
                    if outputs_agree(g[0].outputs or {}, t.outputs, job.spec.tolerance):
                        g.append(t)
                        break
                else:
                    groups.append([t])
        best = max(groups, key=len)
        if len(best) >= job.quorum:
            return self._accept(job, best, agents, exclude_disagreeing=exclude_disagreeing)
        missing = job.quorum - len(best) - len(job.live_copies(task.unit))
        if missing > 0:
            # More copies than redundancy + max_attempts for one unit: the results will
            # not agree, and the job fails rather than run the unit forever.
            if len(copies) + missing > job.redundancy + self.max_attempts:
                job.error = ErrorInfo(
                    code="no_majority",
                    message=f"unit {task.unit} (samples {task.start}-{task.stop - 1}): "
                    f"no {job.quorum} of {len(copies)} results agree; agents by agreeing "
                    "group: " + "; ".join(",".join(t.agent_id or "?" for t in g) for g in groups),
                )
                return []
            for _ in range(missing):
                job.add_copy(task.unit)
        return []

    def _accept(
        self,
        job: Job,
        group: list[Microtask],
        agents: Mapping[str, AgentRecord],
        *,
        exclude_disagreeing: bool,
    ) -> list[Microtask]:
        first = group[0]
        unit = first.unit
        assert first.outputs is not None and first.agent_id is not None
        job.outputs[unit] = first.outputs
        job.done += 1
        job.per_agent[first.agent_id] += first.samples
        job.per_agent_tasks[first.agent_id] += 1
        agreed = {id(t) for t in group}
        cancelled = []
        for t in job.units[unit]:
            if t.state is TaskState.DONE and id(t) not in agreed and t.agent_id is not None:
                job.disagreements[t.agent_id] += 1
                self.counts["disagreements"] += 1
                if exclude_disagreeing:
                    job.excluded.add(t.agent_id)
                logger.warning(
                    "job %s unit %d: %s disagreed with the majority (%s)",
                    job.job_id,
                    unit,
                    t.agent_id,
                    ", ".join(g.agent_id or "?" for g in group),
                )
            elif t.state is TaskState.RUNNING:
                self._release(t, agents.get(t.agent_id or ""))
                cancelled.append(t)
                t.state = TaskState.CANCELLED
            elif t.state is TaskState.PENDING:
                t.state = TaskState.CANCELLED  # the dispatcher skips it in the queue
            t.outputs = None
        self.counts["cancelled"] += len(cancelled)
        if (journal := self._journal(job)) is not None:
            journal.task_done(first, first.agent_id, job.outputs[unit] or {})
        return cancelled

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
                released.append(task)
            if task.state in (TaskState.RUNNING, TaskState.PENDING):
                task.state = TaskState.CANCELLED
        job.pending.clear()
        return released
