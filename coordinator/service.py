"""The coordinator service: fleet registry, job intake, splitting, dispatch and result assembly."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import aiomqtt
import numpy as np
from paho.mqtt.client import topic_matches_sub
from pydantic import ValidationError

from coordinator.catalog import Catalog, CatalogEntry
from coordinator.config import CoordinatorConfig, PolicyName
from coordinator.deployer import Deployer, Transfer
from coordinator.handles import JobHandle, JobOutput
from coordinator.health import FleetHealth, HealthLimits
from coordinator.journal import Journal
from coordinator.ledger import Job, Ledger, Microtask, TaskState
from coordinator.limits import RateLimiter
from coordinator.monitor import Monitor, Outcome, Window
from coordinator.placement import Candidates
from coordinator.policies import Placement, Policy, make_policy
from coordinator.policies.base import estimate_finish_ms
from coordinator.registry import AgentRecord, CostModel, Registry
from coordinator.results import HeldResult, ResultCache
from coordinator.trace import JobTrace
from protocol import (
    AgentShare,
    AgentState,
    Alert,
    CancelTask,
    CoordinatorState,
    Encoding,
    ErrorCode,
    ErrorInfo,
    Heartbeat,
    InferenceJob,
    JobError,
    JobResult,
    JobStatus,
    JobSummary,
    ModelAck,
    ModelInfo,
    MonitorJob,
    OffloadError,
    ProtocolError,
    Rejection,
    StopJob,
    TaskResult,
    Topics,
    decode,
    decode_tensors,
    encode,
    encode_arrays,
    parse_submission,
)
from protocol._base import summarize
from protocol.codec import BINARY_MIN_BYTES
from protocol.metrics import Metric, MetricsEndpoint, counter, gauge
from protocol.transport import Link, cancel_and_wait

logger = logging.getLogger(__name__)

# The messages agents publish; each names its sender, which must match the topic.
FromAgent = TypeVar("FromAgent", AgentState, Heartbeat, TaskResult, ModelAck)

# Finds a job id in a payload too large or too broken to parse, so the error still reaches
# the job's own status topic.
_JOB_ID_RE = re.compile(rb'"job_id"\s*:\s*"([A-Za-z0-9][A-Za-z0-9_.:-]{0,127})"')
_CLIENT_ID_RE = re.compile(rb'"client_id"\s*:\s*"([A-Za-z0-9][A-Za-z0-9_.:-]{0,127})"')
# In-flight microtasks per slot are raised above ``prefetch_per_slot`` when the link's
# round trip is long compared with a microtask, but never above this.
MAX_PREFETCH_PER_SLOT = 32
HOUSEKEEPING_S = 0.1
MAX_LEASE_S = 86_400.0
JOBS_KEPT = 200
# Results from agents whose birth has not arrived yet (a restarted coordinator gets its
# queued session messages before the retained births) wait for it, this many at most.
EARLY_RESULTS_LIMIT = 10_000
EARLY_RESULTS_MAX_BYTES = 16 * 2**20
# Just after connecting, the retained births are still arriving (and a persistent
# session's queued submissions may come first): a job for a model no agent is known to
# have yet waits this long before it is judged.
BIRTHS_GRACE_S = 2.0
EARLY_SUBMITS_LIMIT = 1_000
UNSENT_LIMIT = 1_000
# Recently stopped monitoring jobs listed in the coordinator's state.
STOPPED_MONITORS_KEPT = 50
# Topic -> monitoring jobs reading it, cached; cleared when it grows past this.
ROUTE_CACHE_LIMIT = 100_000
HEALTH_INTERVAL_S = 0.5
# A dispatch round stops after this long and continues on the next loop iteration, so
# that placing work for a large fleet never keeps the loop from reading (heartbeats,
# results) and from writing the microtasks it placed.
DISPATCH_SLICE_S = 0.02
# How long a job's list of candidate agents is reused when no agent's fitness for work
# changed (AgentRecord.epoch), and while some candidate would first be sent the model.
CANDIDATES_TTL_S = 2.0
CANDIDATES_DOWNLOAD_TTL_S = 0.25
# A microtask moving at least this many bytes (inputs and outputs) measures an agent's
# link bandwidth; smaller ones its latency.
LINK_SAMPLE_BYTES = 64 * 1024


class Coordinator:
    """Use as ``async with Coordinator(config) as coord: ...``.

    All state lives on the event loop thread; message handlers are synchronous and short.
    """

    def __init__(self, config: CoordinatorConfig) -> None:
        self.config = config
        self.topics = Topics(config.root)
        self._submit_topic = self.topics.submit
        self.registry = Registry()
        self.journal = Journal(config.journal) if config.journal is not None else None
        self.ledger = Ledger(max_attempts=config.max_attempts, journal=self.journal)
        self.rejected: Counter[str] = Counter()
        self._policies: dict[str, Policy] = {}
        # Job id -> its candidate agents and placement index (coordinator.placement).
        self._placements: dict[str, Candidates] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._dispatch_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._state_dirty = True
        self._job_counter = 0
        self._session = uuid.uuid4().hex[:8]
        self._jobs_order: list[str] = []
        # agent id -> results that arrived before the agent's birth, with arrival times
        self._early_results: dict[str, list[tuple[float, TaskResult]]] = {}
        self._early_count = 0
        self._early_bytes = 0
        self._client_limit = RateLimiter(config.client_rate_per_s, config.client_burst)
        self._agent_limit = RateLimiter(config.agent_rate_per_s, config.agent_burst)
        self._connected_at = 0.0
        self._early_submits: list[tuple[bytes, str]] = []
        # Final results and statuses that could not be published (no connection), sent on
        # the next one.
        self._unsent: list[tuple[str, bytes]] = []
        # Final results as published, for clients that submit a finished job again and
        # for publishing again what the connection may have lost (coordinator.results).
        self._results = ResultCache(config.result_cache_bytes, config.result_keep_s)
        # Results published again, by reason (edge_offload_results_resent_total).
        self.resent: Counter[str] = Counter()
        # When the broker last sent us anything (monotonic): the connection worked then.
        self._last_heard = 0.0
        # When jobs were resumed from the journal (monotonic), while they are on hold.
        self._resumed_at: float | None = None
        # Monitoring jobs by id (running, and recently stopped), which of them read a
        # topic, and the windows cut in this loop iteration, dispatched together.
        self.monitors: dict[str, Monitor] = {}
        self._routes: dict[str, list[Monitor]] = {}
        self._windows: list[Window] = []
        self._windows_scheduled = False
        self._window_jobs = 0
        self.health = FleetHealth(
            HealthLimits(
                hot_c=config.hot_temperature_c,
                overload_cpu_percent=config.overload_cpu_percent,
            )
        )
        self.alert_counts: Counter[str] = Counter()
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._root_prefix = f"{self.topics.root}/"
        self.catalog = Catalog(config.catalog_dir) if config.catalog_dir is not None else None
        self._catalog_checked = 0.0
        self.deployer = (
            Deployer(
                self.catalog,
                self.topics,
                lambda topic, payload: self._link.publish_nowait(topic, payload, qos=1),
                chunk_bytes=config.deploy_chunk_bytes,
                window=config.deploy_window,
                stall_s=config.deploy_stall_s,
                max_attempts=config.max_attempts,
                on_done=self._deployed,
            )
            if self.catalog is not None
            else None
        )
        self.metrics = MetricsEndpoint(self._collect_metrics)
        self._latency = self.metrics.histogram(
            "edge_offload_microtask_latency_seconds",
            "Dispatch to accepted result, per microtask (transfer, queue and execution)",
        )
        self._link = Link(
            address=config.broker,
            client_id=config.mqtt_client_id,
            clean_session=not config.persistent_session,
            subscriptions=[
                (self.topics.all_agents("state"), 1),
                (self.topics.all_agents("heartbeat"), 0),
                (self.topics.all_agents("results"), 1),
                (self.topics.all_agents("deploys"), 1),
                (self.topics.submit, 1),
                (f"{self.topics.submit}/+", 1),
            ],
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=self._will,
        )

    # -- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Coordinator:
        self._loop = asyncio.get_running_loop()
        if self.journal is not None:
            self._resume()
        if self.config.metrics_port is not None:
            self.metrics.start(self.config.metrics_host, self.config.metrics_port)
        self._tasks = [
            asyncio.create_task(self._link.run(), name="coordinator-link"),
            asyncio.create_task(self._housekeeping(), name="coordinator-housekeeping"),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._link.connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError):
                await self._link.publish(
                    self.topics.coordinator,
                    self._state_message(online=False).to_json(),
                    qos=1,
                    retain=True,
                )
        await cancel_and_wait(self._tasks)
        self._tasks = []
        self.metrics.stop()
        if self.journal is not None:
            self.journal.close()  # flushes what the last tick did not commit
        c = self.ledger.counts
        logger.info(
            "coordinator stopped: %d jobs, %d microtasks dispatched, %d completed, %d retried, "
            "%d rejected messages",
            len(self.ledger.jobs),
            c["dispatched"],
            c["completed"],
            c["retried"],
            sum(self.rejected.values()),
        )

    def _resume(self) -> None:
        """Re-create the unfinished jobs of the journal (after a crash or a restart)."""
        assert self.journal is not None
        for rec in self.journal.unfinished():
            spec = rec.spec
            job = Job(
                spec=spec,
                arrays=rec.arrays,
                batch_size=rec.batch_size,
                policy=rec.policy,
                client_id=spec.client_id,
                batch_axis=rec.batch_axis,
            )
            job.split()
            self.ledger.restore(job, rec)
            job.hold_until = time.monotonic() + self.config.resume_grace_s
            self._resumed_at = time.monotonic()
            self._jobs_order.append(job.job_id)
            logger.warning(
                "resumed job %s from the journal: %d of %d microtasks already done",
                job.job_id,
                job.done,
                len(job.units),
                extra=_log_ids(job_id=job.job_id),
            )
        for monitor_spec, started in self.journal.running_monitors():
            try:
                self.start_monitor(monitor_spec, resumed=True, started=started)
            except OffloadError as e:
                logger.error("cannot resume monitoring job %s: %s", monitor_spec.job_id, e)

    async def wait_connected(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self._link.connected.wait(), timeout)

    async def wait_for_agents(self, n: int, timeout: float = 30.0) -> None:
        """Wait until at least ``n`` agents are online (for demos and tests)."""
        deadline = time.monotonic() + timeout
        while len([a for a in self.registry.online() if a.available]) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.registry.online())} of {n} agents online")
            await asyncio.sleep(0.05)

    def _will(self) -> aiomqtt.Will:
        return aiomqtt.Will(
            self.topics.coordinator, self._state_message(online=False).to_json(), qos=1, retain=True
        )

    async def _on_connect(self, link: Link) -> None:
        self._connected_at = time.monotonic()
        if self._resumed_at is not None:
            # Resumed jobs wait for the agents' reports from now, not from start-up.
            self._resumed_at = self._connected_at
            for job in self.ledger.active.values():
                if job.hold_until:
                    job.hold_until = self._connected_at + self.config.resume_grace_s
        unsent, self._unsent = self._unsent, []
        for topic, payload in unsent:
            self._publish(topic, payload)
        if link.connections > 1:
            self._publish_results_again()
        self._last_heard = self._connected_at
        self._state_dirty = True
        for job in list(self.ledger.active.values()):
            if job.complete:  # resumed with every result already in
                self._finish(job)
        # Work dispatched while the broker was away may never have arrived; leases recover
        # it. Dispatch what is pending now that messages can flow again.
        self._kick()

    # -- inbound --------------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        self._last_heard = time.monotonic()
        if not topic.startswith(self._root_prefix):
            self._on_sensor(topic, payload)
            return
        if topic.startswith(self._submit_topic):
            identity = self.topics.parse_submit(topic)
            if identity is None:
                self.rejected["bad_topic"] += 1
            else:
                self._on_submit(payload, identity)
            return
        try:
            agent_id, channel = self.topics.parse_agent(topic)
        except ProtocolError:
            self.rejected["bad_topic"] += 1
            return
        if not self._agent_limit.allow(agent_id):
            self.rejected["rate_limited_agent"] += 1
            return
        if len(payload) > self.config.max_payload_bytes:
            self.rejected["too_large"] += 1
            logger.warning(
                "dropped %d-byte %s message from %s",
                len(payload),
                channel,
                agent_id,
                extra=_log_ids(agent_id=agent_id),
            )
            return
        if channel == "results":
            if (result := self._parse(TaskResult, agent_id, payload, "result")) is not None:
                self._on_result(agent_id, result)
        elif channel == "heartbeat":
            if (hb := self._parse(Heartbeat, agent_id, payload, "heartbeat")) is not None:
                self._on_heartbeat(agent_id, hb)
        elif channel == "deploys":
            ack = self._parse(ModelAck, agent_id, payload, "model_ack")
            if ack is not None and self.deployer is not None:
                self.deployer.on_ack(ack)
        elif channel != "state":  # not subscribed: a broker delivered what it should not
            self.rejected["bad_topic"] += 1
        # state: an empty payload only clears a retained message
        elif payload and (state := self._parse(AgentState, agent_id, payload, "state")):
            self._on_state(agent_id, state)

    def _parse(
        self, cls: type[FromAgent], agent_id: str, payload: bytes, kind: str
    ) -> FromAgent | None:
        """Decode a message from an agent's topic; count and drop it if it is malformed or
        claims to come from another agent than the topic's."""
        try:
            msg = decode(cls, payload)
        except ProtocolError as e:
            self._count_reject(f"malformed_{kind}", agent_id, e)
            return None
        if msg.agent_id != agent_id:
            self._count_reject(f"forged_{kind}", agent_id, msg.agent_id)
            return None
        return msg

    def _on_state(self, agent_id: str, msg: AgentState) -> None:
        rec, what = self.registry.apply_state(msg)
        if what in ("stale", "unknown", "no_capabilities", "too_many"):
            # A death older than the newest birth, a second death, the death of an agent
            # never seen, or a birth that does not say what the agent can do.
            self.rejected[f"state_{what}"] += 1
            return
        if what in ("born", "reborn"):
            logger.info(
                "agent %s online (seq %d, %d slots, models %s)",
                agent_id,
                msg.seq,
                rec.slots if rec else 0,
                sorted(rec.models) if rec else [],
                extra=_log_ids(agent_id=agent_id),
            )
            if what == "reborn" and self.deployer is not None:
                self.deployer.forget_agent(agent_id, reborn=True)
            if what == "reborn" and rec is not None and rec.in_flight:
                # A new session: what the agent no longer holds is gone; what it holds
                # (still running, or finished while it was cut off) keeps its lease.
                self._requeue_agent(
                    rec, "agent reconnected without it", count_attempt=False, keep=set(msg.held)
                )
            if rec is not None and (early := self._early_results.pop(agent_id, None)):
                self._forget_early(early)
                for _, result in early:
                    self._on_result(agent_id, result)
            self._state_dirty = True
            self._kick()
        elif what == "died" and rec is not None:
            logger.warning(
                "agent %s offline (%s)",
                agent_id,
                msg.reason or "death message",
                extra=_log_ids(agent_id=agent_id),
            )
            self._requeue_agent(rec, f"agent offline: {msg.reason or 'death'}")
            if self.deployer is not None:
                self.deployer.forget_agent(agent_id, reborn=False)
            self._state_dirty = True

    def _on_heartbeat(self, agent_id: str, hb: Heartbeat) -> None:
        known = self.registry.agents.get(agent_id)
        was_available = known is not None and known.available
        rec = self.registry.apply_heartbeat(hb)
        if rec is None:
            # From an agent never born, one already dead, or an older session.
            if known is None:
                self.rejected["heartbeat_unknown_agent"] += 1
            elif not known.online:
                self.rejected["heartbeat_offline_agent"] += 1
            else:
                self.rejected["heartbeat_stale"] += 1
            return
        self.health.heartbeat(rec, hb)
        if hb.active:
            now = time.monotonic()
            for task_id, attempt in hb.active:
                task = rec.in_flight.get(task_id)
                if task is not None and task.attempt == attempt:
                    self.ledger.renew(task, now)
                elif task is None and rec.available:
                    # Work dispatched before this coordinator restarted: take it over.
                    held = self._find_task(task_id.rpartition(".")[0], task_id)
                    if held is not None and held.from_before_restart(attempt):
                        self._adopt(held, rec, attempt)
        if self._resumed_at is not None and all(
            a.heartbeat_at >= self._resumed_at for a in self.registry.online()
        ):
            self._release_resumed()
        if rec.available != was_available:
            self._kick()

    def _on_result(self, agent_id: str, msg: TaskResult) -> None:
        agent = self.registry.agents.get(agent_id)
        if agent is None:
            # No birth yet: nobody leased it anything, unless this coordinator restarted
            # and the birth is still on its way. Wait for it (bounded).
            size = _tensor_bytes(msg)
            if (
                self._early_count >= EARLY_RESULTS_LIMIT
                or self._early_bytes + size > EARLY_RESULTS_MAX_BYTES
            ):
                self._count_reject("result_from_unknown_agent", agent_id, msg.task_id)
            else:
                self._early_results.setdefault(agent_id, []).append((time.monotonic(), msg))
                self._early_count += 1
                self._early_bytes += size
            return
        agent.heard_from()
        task = self._find_task(msg.job_id, msg.task_id)
        if task is not None and task.from_before_restart(msg.attempt):
            self._adopt(task, agent, msg.attempt)  # finished while this coordinator was down
        if task is None or not self.ledger.is_current(task, msg.attempt, agent_id):
            # A superseded attempt, a duplicate, or a job that already ended.
            self.rejected["stale_result"] += 1
            return
        job = task.job
        if msg.ok:
            try:
                outputs = decode_tensors(msg.outputs)
                self._check_outputs(task, outputs)
            except OffloadError as e:
                self._count_reject("bad_result", agent_id, e)
                self._retry(task, agent, "bad_result", e.message)
            else:
                self._observe(agent, task, msg)
                if job.trace is not None:
                    job.trace.result(task, agent, msg.queued_ms, msg.exec_ms)
                self._latency.observe(time.monotonic() - task.dispatched_at)
                cancelled = self.ledger.complete(
                    task,
                    agent,
                    outputs,
                    self.registry.agents,
                    exclude_disagreeing=self.config.exclude_disagreeing,
                )
                agent.completed += 1
                self._send_cancels(cancelled)
                if job.complete or (job.error is not None and not job.terminal):
                    self._finish(job)
        else:
            err = msg.error or ErrorInfo(code="internal", message="no error given")
            handback = err.code in ("draining", "no_capacity")
            self._retry(task, agent, err.code, err.message, count_attempt=not handback)
        self._kick()

    def _check_outputs(self, task: Microtask, outputs: dict[str, np.ndarray[Any, Any]]) -> None:
        """Names, dtypes and shapes as the model declares them, one row per sample along the
        batch axis. Without a batch axis only names, dtypes and declared ranks: an item's
        outputs may take any size (a detector's boxes, a sequence)."""
        job = task.job
        if not job.output_specs and (info := self.registry.model_info(job.spec.model)):
            job.output_specs = {o.name: o for o in info.outputs}  # a resumed job
        specs = job.output_specs
        if specs and outputs.keys() != specs.keys():
            raise ProtocolError(
                f"outputs {sorted(outputs)} do not match the model's {sorted(specs)}",
                code="bad_input",
            )
        axis = job.batch_axis
        # A job of whole inputs only has no sample count to hold its rows to.
        rows = task.samples if job.has_split else None
        for name, arr in outputs.items():
            if axis is not None and rows is not None and arr.shape[axis : axis + 1] != (rows,):
                raise ProtocolError(
                    f"output {name!r} has shape {list(arr.shape)}, expected {rows} rows "
                    f"along axis {axis}",
                    code="bad_input",
                )
            spec = specs.get(name)
            if spec is None:
                continue
            if arr.dtype.name != spec.dtype:
                raise ProtocolError(
                    f"output {name!r} is {arr.dtype.name}, the model's is {spec.dtype}",
                    code="bad_input",
                )
            if axis is None:
                # onnxruntime reports an output of unknown rank with no dims, as a scalar.
                wrong = bool(spec.shape) and len(spec.shape) != arr.ndim
            else:
                wrong = len(spec.shape) != arr.ndim or any(
                    want is not None and want != got and i != axis
                    for i, (want, got) in enumerate(zip(spec.shape, arr.shape, strict=True))
                )
            if wrong:
                raise ProtocolError(
                    f"output {name!r} has shape {list(arr.shape)}, the model's is "
                    f"{['N' if d is None else d for d in spec.shape]}",
                    code="bad_input",
                )

    def _observe(self, agent: AgentRecord, task: Microtask, msg: TaskResult) -> None:
        """Refine the agent's cost model and link estimate from one result."""
        cost = agent.costs.get(task.job.spec.model)
        if cost is not None and msg.exec_ms > 0:
            cost.observe(task.samples, msg.exec_ms)
        rtt_ms = (time.monotonic() - task.dispatched_at) * 1000
        transfer = max(rtt_ms - msg.exec_ms - msg.queued_ms, 0.01)
        nbytes = task.job.payload_bytes(task) + _tensor_bytes(msg)
        if nbytes >= LINK_SAMPLE_BYTES:
            # Big enough that the bytes, not the round trip, dominate: a sample of the
            # link's bandwidth (what placement uses to price sending a model there).
            rate = nbytes / max(transfer - agent.latency_ms, 0.05)
            agent.bytes_per_ms += 0.2 * (rate - agent.bytes_per_ms)
        else:
            agent.latency_ms += 0.2 * (transfer - agent.latency_ms)
        agent.exec_ms_avg += 0.2 * (max(msg.exec_ms, 0.01) - agent.exec_ms_avg)
        # (placement indexes re-key the agent: the ledger's release of the task, which
        # follows, marks it changed)

    def _find_task(self, job_id: str, task_id: str) -> Microtask | None:
        """The microtask with this exact id (``{job}.{index}``, or ``{job}.{index}x{n}``
        for a copy added by incarnation n), if its job is known."""
        job = self.ledger.jobs.get(job_id)
        prefix, _, suffix = task_id.rpartition(".")
        index = suffix.partition("x")[0]
        if job is None or prefix != job_id or not index.isdigit():
            return None
        i = int(index)
        task = job.tasks[i] if i < len(job.tasks) else None
        return task if task is not None and task.task_id == task_id else None

    def _count_reject(self, reason: str, agent_id: str, detail: object) -> None:
        self.rejected[reason] += 1
        logger.warning(
            "rejected %s from %s: %s",
            reason.replace("_", " "),
            agent_id,
            detail,
            extra=_log_ids(agent_id=agent_id, reason=reason),
        )

    # -- job intake -----------------------------------------------------------------------------
    def _on_submit(self, payload: bytes, identity: str = "") -> None:
        """A job from ``identity`` (the submit topic's last segment; "" if anonymous)."""
        if not self._client_limit.allow(identity):
            self.rejected["job_rate_limited"] += 1
            return  # no answer: answering a flood would double it
        if self.config.allowed_clients and identity not in self.config.allowed_clients:
            who = f"identity {identity!r}" if identity else "an anonymous submission"
            self._reject(
                payload,
                "forbidden",
                f"{who} may not submit jobs to this coordinator",
                client_id=identity or None,
            )
            return
        if len(payload) > self.config.max_payload_bytes:
            self._reject(
                payload,
                "too_large",
                f"job payload of {len(payload)} bytes exceeds the limit of "
                f"{self.config.max_payload_bytes} bytes",
                client_id=identity or None,
            )
            return
        try:
            spec = parse_submission(payload)
        except ProtocolError as e:
            self._reject(payload, "malformed", e.message, client_id=identity or None)
            return
        if identity:
            if spec.client_id not in (None, identity):
                self._reject(
                    payload,
                    "forbidden",
                    f"client_id {spec.client_id!r} is not the submitting identity {identity!r}",
                    job_id=spec.job_id,
                    client_id=identity,
                )
                return
            if spec.client_id is None:
                spec = spec.model_copy(update={"client_id": identity})
        if isinstance(spec, StopJob):
            self._stop_job(spec, payload)
            return
        needed = spec.redundancy if isinstance(spec, InferenceJob) else 1
        able = [a for a in self.registry.online() if a.available and a.has_model(spec.model)]
        if (
            len(able) < needed
            and (
                not self._link.connected.is_set()  # still (re)connecting
                or time.monotonic() - self._connected_at < BIRTHS_GRACE_S
            )
            and len(self._early_submits) < EARLY_SUBMITS_LIMIT
        ):
            self._early_submits.append((payload, identity))  # judged once the births are in
            return
        if (
            spec.job_id in self.ledger.jobs
            or spec.job_id in self.monitors
            or spec.job_id in self._results
            or (self.journal is not None and self.journal.known(spec.job_id))
        ):
            # QoS 1 redelivery or a client retry: submission is idempotent per job id.
            self.rejected["duplicate_job"] += 1
            self._submitted_again(spec)
            return
        try:
            if isinstance(spec, MonitorJob):
                self.start_monitor(spec)
            else:
                self.submit(spec)
        except OffloadError as e:
            self._reject(payload, e.code, e.message, job_id=spec.job_id, client_id=spec.client_id)

    def _submitted_again(self, spec: InferenceJob | MonitorJob) -> None:
        """A known job id was submitted again: by a client that reconnected (it submits
        again what it still waits for) or a QoS 1 redelivery. A running job is left
        alone (its result comes when it is done); a finished one's kept result is sent
        again to its owner, or, if it is no longer kept, a ``result_expired`` error."""
        job_id = spec.job_id
        ids = _log_ids(job_id=job_id)
        job = self.ledger.jobs.get(job_id)
        if (
            isinstance(spec, MonitorJob)
            or job_id in self.monitors
            or (job is not None and not job.terminal)
        ):
            logger.info("job %s submitted again; ignored", job_id, extra=ids)
            return
        held = self._results.get(job_id, time.monotonic())
        # The owner: the same client id (which the submit topic's identity vouches for
        # when identities are used). Anyone may ask again for an anonymous job's result:
        # it went to the job's own result topic, which anyone may read. A job known only
        # to the journal (finished before a restart) has an owner we no longer know: the
        # answer is an error, which tells a stranger nothing.
        known = held is not None or job is not None
        owner = held.client_id if held is not None else job.client_id if job is not None else None
        if owner is not None and spec.client_id != owner:
            logger.warning(
                "job %s submitted again by client %s, not its owner; ignored",
                job_id,
                spec.client_id or "<anonymous>",
                extra=ids,
            )
            return
        topics = [self.topics.replies(spec.client_id)] if spec.client_id is not None else []
        if owner is None and (known or spec.client_id is None):
            topics.append(self.topics.result(job_id))
        if held is not None:
            payload, reason = held.payload, "resubmitted"
            logger.info(
                "job %s submitted again after it finished: its result was sent again",
                job_id,
                extra=ids,
            )
        else:
            error = ErrorInfo(
                code="result_expired",
                message=(
                    f"job {job_id!r} has finished and the coordinator no longer holds its "
                    f"result (results are kept {self.config.result_keep_s:g} s, up to "
                    f"{self.config.result_cache_bytes} bytes in all); submit it again under "
                    "a new job id"
                ),
            )
            payload = JobResult(job_id=job_id, ok=False, error=error).to_json()
            reason = "expired"
            logger.warning(
                "job %s submitted again after it finished, but its result is no longer held",
                job_id,
                extra=ids,
            )
        for topic in topics:
            self._publish(topic, payload)
        self.resent[reason] += 1

    def submit(
        self,
        spec: InferenceJob,
        arrays: Mapping[str, np.ndarray[Any, Any]] | None = None,
        *,
        publish_result: bool = True,
        future: asyncio.Future[JobOutput] | None = None,
    ) -> Job:
        """Validate, split and queue a job. Raises :class:`OffloadError` if it is refused.

        ``arrays`` replaces ``spec.inputs`` for in-process callers (no encoding needed).
        """
        info, sha256 = self._resolve_model(spec.model)
        if info is None:
            known = ", ".join(self._known_models()) or "none"
            raise OffloadError(
                f"no agent in the fleet has model {spec.model!r} and it is not registered "
                f"(available: {known})",
                code="unknown_model",
            )
        if arrays is None:
            arrays = decode_tensors(spec.inputs)
        else:  # numpy scalars (np.int64(16000)) are 0-d arrays to the model
            arrays = {
                k: np.asarray(a) if isinstance(a, np.generic) else a for k, a in arrays.items()
            }
        bad = sorted(k for k, a in arrays.items() if not isinstance(a, np.ndarray))
        if bad:
            raise OffloadError(f"inputs {bad} are not numpy arrays", code="bad_input")
        # Samples (items for a model without a batch axis); names the input that is wrong.
        n = info.check_job({k: (a.dtype.name, a.shape) for k, a in arrays.items()}, spec.whole)
        policy = spec.policy or self.config.policy
        job = Job(
            spec=spec,
            arrays=arrays,
            batch_size=1,
            policy=policy,
            client_id=spec.client_id,
            future=future,
            publish_result=publish_result,
            output_specs={o.name: o for o in info.outputs},
            batch_axis=info.batch_axis,
            model_sha256=sha256,
        )
        # Agents with the model, and those it could be sent to (registered models).
        able = self._candidates(job)
        if spec.require_providers and not able:
            offered = sorted({p for a in self.registry.online() for p in a.capabilities.providers})
            raise OffloadError(
                f"no available agent with model {spec.model!r} offers "
                f"{' or '.join(spec.require_providers)} (the fleet offers: "
                f"{', '.join(offered) or 'none'})",
                code="no_capacity",
            )
        if spec.redundancy > len(able):
            raise OffloadError(
                f"redundancy {spec.redundancy} needs {spec.redundancy} distinct agents with "
                f"model {spec.model!r}; {len(able)} available",
                code="no_capacity",
            )
        if info.batch_axis is None or arrays.keys() <= set(spec.whole):
            job.batch_size = 1  # one item per microtask; or all inputs whole: one microtask
        else:
            fixed = info.fixed_batch(spec.whole)
            job.batch_size = fixed or min(
                spec.batch_size or self._choose_batch(spec.model, able, n), n
            )
        job.split()
        job.trace = JobTrace.for_job(job)
        self.ledger.add(job)
        self._jobs_order.append(job.job_id)
        self._forget_old_jobs()
        logger.info(
            "job %s: %d samples of %s in %d microtasks of %d (%s%s)",
            job.job_id,
            n,
            spec.model,
            len(job.units),
            job.batch_size,
            policy,
            f", each on {spec.redundancy} agents" if spec.redundancy > 1 else "",
            extra=_log_ids(job_id=job.job_id),
        )
        if publish_result:
            self._publish_status(job)
        self._state_dirty = True
        self._dispatch()  # at once: a new job should not wait a loop iteration
        return job

    def _resolve_model(self, model_id: str) -> tuple[ModelInfo | None, str | None]:
        """What a job on ``model_id`` runs: the catalog's newest version (that exact file,
        sent to agents that lack it), else whatever version the fleet's agents have."""
        if self.catalog is not None and (entry := self.catalog.get(model_id)) is not None:
            return entry.info(), entry.sha256
        return self.registry.model_info(model_id), None

    def _known_models(self) -> list[str]:
        registered = self.catalog.ids() if self.catalog is not None else []
        return sorted({*self.registry.known_models(), *registered})

    # -- in-process SDK -------------------------------------------------------------------------
    def submit_arrays(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]] | np.ndarray[Any, Any],
        *,
        batch_size: int | None = None,
        policy: PolicyName | None = None,
        priority: int = 0,
        job_id: str | None = None,
        redundancy: int = 1,
        tolerance: float = 0.0,
        whole: Collection[str] = (),
        require_providers: Collection[str] = (),
        prefer_providers: Collection[str] = (),
    ) -> JobHandle:
        """Submit a job from this process (no broker hop to the coordinator).

        Inputs named in ``whole`` go unchanged with every microtask; the others are split
        along the model's batch axis (or one item per microtask without one).
        Raises :class:`protocol.JobError` at once if the job is refused.
        """
        if isinstance(inputs, np.ndarray):
            inputs = {"input": inputs}
        self._job_counter += 1
        # Unique per coordinator instance: agents that outlive one remember the microtask
        # ids it dispatched and would ignore a repeated one as a redelivery.
        job_id = job_id or f"coordinator-{self._session}-{self._job_counter}"
        if job_id in self.ledger.jobs:
            raise JobError(
                f"job id {job_id!r} is already in use", job_id=job_id, code="bad_request"
            )
        try:
            spec = InferenceJob(
                job_id=job_id,
                model=model,
                inputs={},
                batch_size=batch_size,
                policy=policy,
                priority=priority,
                redundancy=redundancy,
                tolerance=tolerance,
                whole=list(whole),
                require_providers=list(require_providers),
                prefer_providers=list(prefer_providers),
            )
            assert self._loop is not None, "use 'async with Coordinator(...)'"
            future: asyncio.Future[JobOutput] = self._loop.create_future()
            self.submit(spec, inputs, publish_result=False, future=future)
        except OffloadError as e:
            self.rejected[f"job_{e.code}"] += 1
            raise JobError(e.message, job_id=job_id, code=e.code) from None
        except ValidationError as e:
            raise JobError(summarize(e), job_id=job_id, code="bad_request") from None
        return JobHandle(job_id, future)

    async def run(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]] | np.ndarray[Any, Any],
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> JobOutput:
        """Submit from this process and wait for the outputs (``options`` as for
        :meth:`submit_arrays`: ``batch_size``, ``whole``, ...)."""
        return await self.submit_arrays(model, inputs, **options).result(timeout)

    def _choose_batch(self, model: str, agents: list[AgentRecord], n: int) -> int:
        """Samples per microtask so one takes ``target_task_ms`` on a typical capable agent,
        but at least ``min_tasks_per_slot`` microtasks per slot of the fleet.

        Uses the agents' advertised self-benchmarks: per-microtask observations are
        noisy at small batch sizes and would make a fleet that just ran many tiny tasks
        cut the next big job into slivers.
        """
        per_sample = sorted(
            ms
            for a in agents
            if model in a.models and (ms := a.models[model].ms_per_sample()) is not None and ms > 0
        )
        slots = sum(a.slots for a in agents) or 1
        median = per_sample[len(per_sample) // 2] if per_sample else None
        by_time = int(self.config.target_task_ms / median) if median else n
        by_balance = math.ceil(n / (slots * self.config.min_tasks_per_slot))
        return max(1, min(by_time, by_balance))

    def _reject(
        self,
        payload: bytes,
        code: ErrorCode,
        message: str,
        *,
        job_id: str | None = None,
        client_id: str | None = None,
    ) -> None:
        self.rejected[f"job_{code}"] += 1
        if job_id is None and (m := _JOB_ID_RE.search(payload)):
            job_id = m.group(1).decode()
        if client_id is None and (m := _CLIENT_ID_RE.search(payload)):
            client_id = m.group(1).decode()
        logger.warning(
            "job %s rejected: [%s] %s",
            job_id or "<no id>",
            code,
            message,
            extra=_log_ids(job_id=job_id, reason=code),
        )
        error = ErrorInfo(code=code, message=message[:2000])
        now = time.time()
        self._link.publish_nowait(
            self.topics.rejected,
            Rejection(error=error, payload_bytes=len(payload), job_id=job_id, ts=now).to_json(),
        )
        if job_id is not None and job_id not in self.ledger.jobs:
            result = JobResult(job_id=job_id, ok=False, error=error).to_json()
            self._link.publish_nowait(self.topics.result(job_id), result)
            if client_id is not None:
                self._link.publish_nowait(self.topics.replies(client_id), result)
            status = JobStatus(job_id=job_id, state="failed", error=error, ts=now)
            self._link.publish_nowait(self.topics.status(job_id), status.to_json())

    def _forget_old_jobs(self) -> None:
        while len(self._jobs_order) > JOBS_KEPT:
            job = self.ledger.jobs.get(self._jobs_order[0])
            if job is not None and not job.terminal:
                break
            self._jobs_order.pop(0)
            if job is not None:
                del self.ledger.jobs[job.job_id]

    # -- monitoring jobs ------------------------------------------------------------------------
    def start_monitor(
        self, spec: MonitorJob, *, resumed: bool = False, started: float | None = None
    ) -> Monitor:
        """Validate and start a monitoring job. Raises :class:`OffloadError` if refused."""
        if spec.job_id == "fleet":
            raise OffloadError(
                "job id 'fleet' is reserved: fleet health alerts use that topic",
                code="bad_request",
            )
        if spec.job_id in self.monitors or spec.job_id in self.ledger.jobs:
            raise OffloadError(f"job id {spec.job_id!r} is already in use", code="bad_request")
        for source in spec.sources:
            self._check_source(source)
        alert_topic = spec.alert_topic or self.topics.alerts(spec.job_id)
        if any(c in alert_topic for c in "+#") or alert_topic.startswith("$"):
            raise OffloadError(
                f"alert topic {alert_topic!r} must be a plain topic (no wildcards, no $)",
                code="bad_request",
            )
        if alert_topic.startswith(self._root_prefix) and alert_topic != self.topics.alerts(
            spec.job_id
        ):
            raise OffloadError(
                f"alert topic {alert_topic!r} is under {self.topics.root}/; only "
                f"{self.topics.alerts(spec.job_id)} is allowed there",
                code="bad_request",
            )
        monitor = Monitor(spec=spec, alert_topic=alert_topic)
        if started is not None:
            monitor.started = started
        info = self.registry.model_info(spec.model)
        if info is None and not resumed:
            known = ", ".join(self.registry.known_models()) or "none"
            raise OffloadError(
                f"no agent in the fleet has model {spec.model!r} (available: {known})",
                code="unknown_model",
            )
        if info is not None:
            try:
                monitor.bind_model(info.inputs, info.outputs)
            except ValueError as e:
                raise OffloadError(str(e), code="bad_input") from None
        self.monitors[spec.job_id] = monitor
        self._routes.clear()
        for source in spec.sources:
            self._background(self._link.subscribe(source, 1), f"subscribe {source}")
        if self.journal is not None and not resumed:
            self.journal.monitor_started(spec, monitor.started)
        self._publish_monitor_status(monitor)
        self._state_dirty = True
        logger.info(
            "monitor %s %s: %s, windows of %d every %d through %s, deadline %.0f ms, alerts on %s",
            spec.job_id,
            "resumed" if resumed else "started",
            ", ".join(spec.sources),
            spec.window,
            spec.hop,
            spec.model,
            spec.deadline_ms,
            alert_topic,
            extra=_log_ids(job_id=spec.job_id),
        )
        return monitor

    def stop_monitor(self, job_id: str, reason: str = "stopped") -> Monitor:
        """Stop a running monitoring job: no more windows; its status says why."""
        monitor = self.monitors.get(job_id)
        if monitor is None or monitor.state != "running":
            raise OffloadError(f"no running monitoring job {job_id!r}", code="bad_request")
        monitor.state = "stopped"
        monitor.last_error = monitor.last_error if reason == "stopped" else reason
        self._routes.clear()
        still = {s for m in self.monitors.values() if m.state == "running" for s in m.spec.sources}
        for source in set(monitor.spec.sources) - still:
            self._background(self._link.unsubscribe(source), f"unsubscribe {source}")
        if self.journal is not None:
            self.journal.monitor_stopped(job_id)
        self._publish_monitor_status(monitor)
        stopped = [m for m in self.monitors.values() if m.state != "running"]
        for old in stopped[: max(len(stopped) - STOPPED_MONITORS_KEPT, 0)]:
            del self.monitors[old.job_id]
        self._state_dirty = True
        logger.info("monitor %s stopped (%s)", job_id, reason, extra=_log_ids(job_id=job_id))
        return monitor

    def _check_source(self, source: str) -> None:
        """A source filter is a valid MQTT filter that cannot match this coordinator's own
        topics (or every topic on the broker)."""
        levels = source.split("/")
        bad = (
            source.startswith("$")
            or any(("+" in lv or "#" in lv) and lv not in ("+", "#") for lv in levels)
            or "#" in levels[:-1]
        )
        if bad:
            raise OffloadError(f"source {source!r} is not a valid topic filter", code="bad_request")
        if levels[0] in ("+", "#"):
            raise OffloadError(
                f"source {source!r} starts with a wildcard: name at least the first level",
                code="bad_request",
            )
        root = self.topics.root.split("/")
        for i, level in enumerate(root):
            if i >= len(levels):
                return
            if levels[i] == "#":
                break
            if levels[i] not in ("+", level):
                return
        raise OffloadError(
            f"source {source!r} overlaps this coordinator's topics under {self.topics.root}/",
            code="bad_request",
        )

    def _background(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        async def run() -> None:
            try:
                await coro
            except aiomqtt.MqttError as e:  # re-done on the next connection
                logger.warning("%s failed: %s", what, e)

        task = asyncio.get_running_loop().create_task(run())
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _stop_job(self, msg: StopJob, payload: bytes) -> None:
        """A stop request from a client (``msg.client_id`` is its identity when known)."""
        who = msg.client_id
        monitor = self.monitors.get(msg.job_id)
        job = self.ledger.jobs.get(msg.job_id)
        owner: str | None
        if monitor is not None and monitor.state == "running":
            owner = monitor.spec.client_id
        elif job is not None and not job.terminal and job.on_finish is None:
            owner = job.client_id
        else:
            self._refuse_stop(msg, "bad_request", f"no running job {msg.job_id!r} to stop")
            return
        if owner is not None and owner != who:
            self._refuse_stop(
                msg, "forbidden", f"job {msg.job_id!r} belongs to another client than {who!r}"
            )
            return
        by = f"stopped by {who}" if who else "stopped by an anonymous client"
        if monitor is not None and monitor.state == "running":
            self.stop_monitor(msg.job_id, by)
        elif job is not None:
            job.error = ErrorInfo(code="cancelled", message=f"job cancelled: {by}")
            self._finish(job)

    def _refuse_stop(self, msg: StopJob, code: ErrorCode, text: str) -> None:
        self.rejected[f"stop_{code}"] += 1
        logger.warning(
            "stop of %s refused: [%s] %s",
            msg.job_id,
            code,
            text,
            extra=_log_ids(job_id=msg.job_id, reason=code),
        )
        answer = Rejection(
            error=ErrorInfo(code=code, message=text),
            payload_bytes=0,
            job_id=msg.job_id,
            ts=time.time(),
        ).to_json()
        self._link.publish_nowait(self.topics.rejected, answer)
        if msg.client_id is not None:
            self._link.publish_nowait(self.topics.replies(msg.client_id), answer)

    def _on_sensor(self, topic: str, payload: bytes) -> None:
        """A message on a monitoring job's source topic."""
        monitors = self._routes.get(topic)
        if monitors is None:
            monitors = [
                m
                for m in self.monitors.values()
                if m.state == "running" and any(topic_matches_sub(f, topic) for f in m.spec.sources)
            ]
            if len(self._routes) >= ROUTE_CACHE_LIMIT:
                self._routes.clear()
            self._routes[topic] = monitors
        if not monitors:
            # A stopped job's subscription the broker still had, or routing gone wrong.
            self.rejected["sensor_unrouted"] += 1
            return
        if len(payload) > self.config.max_payload_bytes:
            self.rejected["sensor_too_large"] += 1
            return
        now, wall = time.monotonic(), time.time()
        for monitor in monitors:
            windows = monitor.on_reading(topic, payload, now, wall)
            if windows:
                self._windows.extend(windows)
                if not self._windows_scheduled and self._loop is not None:
                    # Windows cut in one loop iteration travel together.
                    self._windows_scheduled = True
                    self._loop.call_soon(self._flush_windows)

    def _flush_windows(self) -> None:
        self._windows_scheduled = False
        windows, self._windows = self._windows, []
        groups: dict[tuple[str, tuple[Any, ...], tuple[Any, ...]], list[Window]] = {}
        for w in windows:
            groups.setdefault((w.job_id, w.require, w.prefer), []).append(w)
        now = time.monotonic()
        for (job_id, require, prefer), group in groups.items():
            monitor = self.monitors.get(job_id)
            if monitor is None or monitor.state != "running":
                continue
            room = max(self.config.monitor_backlog - monitor.outstanding, 0)
            if room < len(group):
                shed = group[room:]
                group = group[:room]
                monitor.last_error = (
                    f"{len(shed)} windows shed: {monitor.outstanding} already waiting "
                    f"(monitor_backlog {self.config.monitor_backlog})"
                )
                logger.warning(
                    "monitor %s: %s", job_id, monitor.last_error, extra=_log_ids(job_id=job_id)
                )
                self._decide(monitor, [Outcome(w, None, None, now, why="shed") for w in shed])
            if not group:
                continue
            if monitor.input_name is None and not self._bind(monitor):
                self._decide(monitor, [Outcome(w, None, None, now) for w in group])
                continue
            self._submit_windows(monitor, group, require, prefer)
        self._dispatch()

    def _bind(self, monitor: Monitor) -> bool:
        """Check a resumed job's model once an agent that has it is known."""
        info = self.registry.model_info(monitor.spec.model)
        if info is None:
            monitor.last_error = f"no agent in the fleet has model {monitor.spec.model!r}"
            return False
        try:
            monitor.bind_model(info.inputs, info.outputs)
        except ValueError as e:
            monitor.last_error = str(e)
            logger.error("monitor %s: %s", monitor.job_id, e, extra=_log_ids(job_id=monitor.job_id))
            return False
        return True

    def _submit_windows(
        self,
        monitor: Monitor,
        windows: list[Window],
        require: tuple[tuple[str, str], ...],
        prefer: tuple[tuple[str, str], ...],
    ) -> None:
        """The windows as one internal job with a deadline, split over the agents able to
        run them now."""
        model = monitor.spec.model
        able = [
            a
            for a in self.registry.agents.values()
            if a.available and a.has_model(model) and _labels_match(a, require)
        ]
        slots = sum(a.slots for a in able) or 1
        batch = max(1, math.ceil(len(windows) / slots))
        self._window_jobs += 1
        spec = InferenceJob.model_construct(
            job_id=f"{monitor.job_id[:100]}.w{self._window_jobs}",
            model=model,
            inputs={},
            batch_size=batch,
            policy=monitor.spec.policy,
        )
        info = self.registry.model_info(model)
        job = Job(
            spec=spec,
            arrays={monitor.input_name or "": monitor.batch(windows)},
            batch_size=batch,
            policy=monitor.spec.policy or self.config.policy,
            publish_result=False,
            output_specs={o.name: o for o in info.outputs} if info else {},
            deadline=min(w.deadline for w in windows),
            require=require,
            prefer=prefer,
            on_finish=lambda job: self._windows_done(monitor, windows, job),
        )
        job.split()
        self.ledger.add(job)
        monitor.outstanding += len(windows)

    def _windows_done(self, monitor: Monitor, windows: list[Window], job: Job) -> None:
        now = time.monotonic()
        monitor.outstanding -= len(windows)
        if job.finished_ok:
            scores = monitor.scores(job.assemble(), len(windows))
            outcomes = []
            for i, (w, score) in enumerate(zip(windows, scores, strict=True)):
                ran = [
                    c.agent_id for c in job.units[i // job.batch_size] if c.state is TaskState.DONE
                ]
                outcomes.append(Outcome(w, score, ran[0] if ran else None, now))
        else:
            why = job.error.message if job.error else "failed"
            monitor.last_error = f"{len(windows)} windows failed: {why}"
            logger.warning(
                "monitor %s: %s",
                monitor.job_id,
                monitor.last_error,
                extra=_log_ids(job_id=monitor.job_id),
            )
            outcomes = [Outcome(w, None, None, now) for w in windows]
        self._decide(monitor, outcomes)

    def _decide(self, monitor: Monitor, outcomes: list[Outcome]) -> None:
        for alert in monitor.on_outcomes(outcomes, time.time()):
            if monitor.state == "running":
                self._raise(monitor.alert_topic, alert)

    def _raise(self, topic: str, alert: Alert) -> None:
        self.alert_counts[alert.kind] += 1
        self._publish(topic, alert.to_json())

    def _publish_monitor_status(self, monitor: Monitor) -> None:
        self._link.publish_nowait(
            self.topics.status(monitor.job_id), monitor.status().to_json(), retain=True
        )

    def _expire_windows(self, now: float) -> None:
        """Windows no agent ran long after their deadline fail, so verdicts move on."""
        limit = self.config.window_expire_s
        for job in [j for j in self.ledger.active.values() if j.on_finish is not None]:
            if job.deadline is not None and now > job.deadline + limit:
                job.error = ErrorInfo(
                    code="exhausted",
                    message=f"no agent ran it within {limit:g} s after its deadline",
                )
                self._finish(job)

    # -- dispatch -------------------------------------------------------------------------------
    def _kick(self) -> None:
        """Run a dispatch round soon; many events in one loop iteration share one round."""
        if not self._dispatch_scheduled and self._loop is not None:
            self._dispatch_scheduled = True
            self._loop.call_soon(self._dispatch)

    def credit(self, agent: AgentRecord) -> int:
        """Microtasks ``agent`` can take now: enough to cover its round trip, no more."""
        per_slot = self.config.prefetch_per_slot
        if agent.exec_ms_avg > 0:
            per_slot = max(per_slot, math.ceil(agent.latency_ms / agent.exec_ms_avg) + 1)
        return agent.slots * min(per_slot, MAX_PREFETCH_PER_SLOT) - len(agent.in_flight)

    def _urgent_credit(self, agent: AgentRecord) -> int:
        return self.credit(agent) + agent.slots

    def _credit_for(self, job: Job) -> Callable[[AgentRecord], int]:
        # Work with a deadline may also use one more microtask per slot than credit
        # allows: it overtakes queued batch work on the agent (RunTask.deadline).
        return self._urgent_credit if job.deadline is not None else self.credit

    def _dispatch(self) -> None:
        self._dispatch_scheduled = False
        if not self._link.connected.is_set():
            return
        now = time.monotonic()
        stop_at = now + DISPATCH_SLICE_S
        jobs = [j for j in self.ledger.active.values() if j.pending and j.hold_until <= now]
        if len(jobs) > 1:
            jobs.sort(key=_dispatch_order)  # stable: FIFO within a priority
        placed = 0
        for job in jobs:
            if placed and time.monotonic() > stop_at:
                self._kick()  # the rest on the next iteration, after I/O
                return
            placement = self._placement(job, now)
            candidates = placement.candidates
            if not candidates:
                continue
            credit = self._credit_for(job)
            policy = self._policy(job.policy)
            index = placement.index
            backlog = self._backlog_ms(job, placement)
            unplaceable: list[Microtask] = []
            while job.pending:
                task = job.pending[0]
                if task.state is not TaskState.PENDING:  # taken over, cancelled, or queued twice
                    job.pending.popleft()
                    continue
                eligible = self._candidates_for(task, candidates)
                if not eligible:  # every live agent already ran a copy of this unit
                    unplaceable.append(job.pending.popleft())
                    continue
                task.unplaceable_since = 0.0
                nbytes = job.payload_bytes(task)
                indexed = (
                    index is not None and eligible is candidates and task.samples == index.samples
                )
                ctx = Placement(
                    credit=credit,
                    payload_bytes=nbytes,
                    backlog_ms=backlog,
                    index=index if indexed else None,
                )
                agent = policy.choose(task, eligible, ctx)
                if agent is None or credit(agent) <= 0:
                    break
                job.pending.popleft()
                self._send(task, agent, nbytes)
                placed += 1  # at least one placement a round: always progress
                if time.monotonic() > stop_at:
                    self._kick()
                    break
            job.pending.extendleft(reversed(unplaceable))
            if self._give_up_unplaceable(job, unplaceable):
                self._finish(job)

    def _placement(self, job: Job, now: float) -> Candidates:
        """``job``'s candidates, cached until an agent's fitness for work changes (a birth,
        a death, a suspicion: AgentRecord.epoch) or for a short while (a catalog change,
        a download's progress)."""
        cached = self._placements.get(job.job_id)
        if cached is not None and cached.epoch == AgentRecord.epoch and now < cached.expires:
            return cached
        if len(self._placements) > 2 * len(self.ledger.active):
            for job_id in [j for j in self._placements if j not in self.ledger.active]:
                self._drop_placement(job_id)
        self._drop_placement(job.job_id)
        candidates = self._candidates(job)
        model, sha = job.spec.model, job.model_sha256
        downloads = any(not a.has_model(model, sha) for a in candidates)
        fresh = Candidates(
            candidates=candidates,
            epoch=AgentRecord.epoch,
            expires=now + (CANDIDATES_DOWNLOAD_TTL_S if downloads else CANDIDATES_TTL_S),
            rate=sum(a.slots / a.costs[model].per_sample_ms for a in candidates),
            index=self._policy(job.policy).index(job, candidates, self._credit_for(job)),
        )
        if fresh.index is not None:
            self.registry.watchers.append(fresh.index.changes)
        self._placements[job.job_id] = fresh
        return fresh

    def _drop_placement(self, job_id: str) -> None:
        old = self._placements.pop(job_id, None)
        if old is not None and old.index is not None:
            changes = old.index.changes
            self.registry.watchers[:] = [w for w in self.registry.watchers if w is not changes]

    def _candidates(self, job: Job) -> list[AgentRecord]:
        """Agents that may run ``job``'s microtasks now, by id: those with the model, and
        those that could be sent it from the catalog (with the time that takes)."""
        model, sha = job.spec.model, job.model_sha256
        entry = self._catalog_entry(job)
        need = job.spec.require_providers
        now = time.monotonic()
        out = []
        for a in self.registry.agents.values():
            if (
                not a.available
                or not _labels_match(a, job.require)
                or (need and not any(p in a.capabilities.providers for p in need))
            ):
                continue
            if a.has_model(model, sha):
                if a.deploy_ms:
                    a.deploy_ms.pop(model, None)
                out.append(a)
            elif entry is not None and self.deployer is not None:
                ready = self.deployer.ready_in_ms(a, entry, now)
                if ready is None:
                    continue
                a.deploy_ms[model] = ready if self.config.download_aware else 0.0
                if model not in a.costs:
                    a.costs[model] = self._borrowed_cost(model)
                    a.borrowed_costs.add(model)
                out.append(a)
        out.sort(key=lambda a: a.agent_id)
        if job.prefer:
            out = [a for a in out if _labels_match(a, job.prefer)] or out
        if job.spec.prefer_providers:
            want = job.spec.prefer_providers
            out = [a for a in out if any(p in a.capabilities.providers for p in want)] or out
        return out

    def _catalog_entry(self, job: Job) -> CatalogEntry | None:
        """The catalog's entry for the exact file ``job`` runs, if it is registered."""
        if self.catalog is None or job.model_sha256 is None:
            return None
        entry = self.catalog.get(job.spec.model)
        if entry is None or entry.sha256 != job.model_sha256:
            entry = next((e for e in self.catalog.entries() if e.sha256 == job.model_sha256), None)
        return entry

    def _borrowed_cost(self, model: str) -> CostModel:
        """Until an agent has a model and has measured it: the fleet's median cost of it
        (a device of unknown speed is assumed typical), or a guess when nobody has it."""
        costs = sorted(
            (c for a in self.registry.online() if model in a.models for c in [a.costs[model]]),
            key=lambda c: c.per_sample_ms,
        )
        if not costs:
            return CostModel(overhead_ms=1.0, per_sample_ms=0.05)
        median = costs[len(costs) // 2]
        return CostModel(overhead_ms=median.overhead_ms, per_sample_ms=median.per_sample_ms)

    def _deployed(self, transfer: Transfer, ok: bool, why: str) -> None:
        """A transfer ended; on failure the agent answers what it held with errors, and
        is no longer a candidate for that file (Deployer.refused)."""
        agent = self.registry.agents.get(transfer.agent_id)
        if agent is not None and not ok:
            agent.deploy_ms.clear()
        self._state_dirty = True
        self._kick()

    def _give_up_unplaceable(self, job: Job, tasks: list[Microtask]) -> bool:
        """A copy no live agent may run, with no other copy of its unit running, cannot
        complete its unit: after ``dead_after_s`` (agents may come back), the job fails."""
        now = time.monotonic()
        for task in tasks:
            if not task.unplaceable_since:
                task.unplaceable_since = now
            elif now - task.unplaceable_since > self.config.dead_after_s and not any(
                c.state is TaskState.RUNNING for c in job.units[task.unit]
            ):
                ran = sorted({c.agent_id or "?" for c in job.units[task.unit] if c.agent_id})
                job.error = ErrorInfo(
                    code="no_majority",
                    message=f"unit {task.unit} (samples {task.start}-{task.stop - 1}) needs "
                    f"a copy on one more distinct agent than are available; it ran on "
                    f"{', '.join(ran) or 'none'}"
                    + (f"; excluded: {', '.join(sorted(job.excluded))}" if job.excluded else ""),
                )
                return True
        return False

    @staticmethod
    def _candidates_for(task: Microtask, candidates: list[AgentRecord]) -> list[AgentRecord]:
        """Copies of one unit run on distinct agents; agents that disagreed with a majority
        get no more of the job; a retried microtask avoids the agents it already failed
        on, if it can."""
        job = task.job
        copies = job.units[task.unit]
        if len(copies) > 1 or job.excluded:
            busy = {
                t.agent_id
                for t in copies
                if t is not task and t.state in (TaskState.RUNNING, TaskState.DONE)
            }
            busy |= job.excluded
            candidates = [a for a in candidates if a.agent_id not in busy]
        if not task.failures:
            return candidates
        tried = {agent_id for agent_id, _, _ in task.failures}
        return [a for a in candidates if a.agent_id not in tried] or candidates

    def _send_cancels(self, tasks: list[Microtask]) -> None:
        for task in tasks:
            self._link.publish_nowait(
                self.topics.tasks(task.agent_id or ""),
                CancelTask(task_id=task.task_id, attempt=task.attempt).to_json(),
            )

    def _lease(self, task: Microtask, agent: AgentRecord, nbytes: int) -> tuple[float, float]:
        """(lease seconds, estimated execution ms) of ``task`` on ``agent``."""
        finish_ms = estimate_finish_ms(agent, task, nbytes)
        lease_s = max(self.config.lease_min_s, self.config.lease_factor * finish_ms / 1000)
        if not math.isfinite(lease_s) or lease_s > MAX_LEASE_S:
            lease_s = MAX_LEASE_S  # a device claiming absurd costs still gets a finite lease
        return lease_s, agent.costs[task.job.spec.model].estimate(task.samples)

    def _adopt(self, task: Microtask, agent: AgentRecord, attempt: int) -> None:
        job = task.job
        if job.terminal or not agent.online or not agent.has_model(job.spec.model):
            return
        if agent.agent_id in job.excluded or any(
            c is not task
            and c.agent_id == agent.agent_id
            and c.state in (TaskState.RUNNING, TaskState.DONE)
            for c in job.units[task.unit]
        ):
            return  # copies of a unit must come from distinct agents
        lease_s, est_ms = self._lease(task, agent, 0)
        self.ledger.adopt(task, agent, attempt, lease_s=lease_s, est_ms=est_ms)
        logger.info(
            "microtask %s attempt %d: taken over from before the restart, on %s",
            task.task_id,
            attempt,
            agent.agent_id,
            extra=_task_ids(task),
        )

    def _release_resumed(self) -> None:
        """Resumed jobs may dispatch: the agents have reported what they hold."""
        self._resumed_at = None
        for job in self.ledger.active.values():
            job.hold_until = 0.0
        self._kick()

    def _send(self, task: Microtask, agent: AgentRecord, nbytes: int) -> None:
        job = task.job
        if not agent.has_model(job.spec.model, job.model_sha256):
            # Chosen with the download counted: the file goes first, the microtask waits
            # for it on the agent (RunTask.model_sha256).
            entry = self._catalog_entry(job)
            assert entry is not None and self.deployer is not None
            self.deployer.ensure(agent, entry)
        lease_s, est_ms = self._lease(task, agent, nbytes)
        msg = self.ledger.dispatch(task, agent, lease_s=lease_s, est_ms=est_ms)
        # Binary frames pay from about 2 KiB of tensor data; below, pydantic's JSON is faster.
        encoding: Encoding = (
            "binary"
            if self.config.wire_encoding == "auto"
            and nbytes >= BINARY_MIN_BYTES
            and "binary" in agent.capabilities.encodings
            else "json"
        )
        self._link.publish_nowait(self.topics.tasks(agent.agent_id), encode(msg, encoding), qos=1)

    def _backlog_ms(self, job: Job, placement: Candidates) -> float:
        """Time for the candidates to get through this job's pending samples and the
        samples of its model in flight."""
        pending = len(job.pending) * job.batch_size  # the last microtask may be smaller
        in_flight = self.ledger.in_flight_samples[job.spec.model]
        return (pending + in_flight) / placement.rate if placement.rate > 0 else 0.0

    def _policy(self, name: str) -> Policy:
        if name not in self._policies:
            self._policies[name] = make_policy(name)
        return self._policies[name]

    def _retry(
        self,
        task: Microtask,
        agent: AgentRecord | None,
        code: str,
        message: str,
        *,
        count_attempt: bool = True,
    ) -> None:
        job = task.job
        if job.trace is not None and task.state is TaskState.RUNNING:
            job.trace.failure(task, agent, code, message)
        requeued = self.ledger.retry(task, agent, code, message, count_attempt=count_attempt)
        if not requeued and job.error is not None and not job.terminal:
            self._finish(job)

    def _requeue_agent(
        self,
        agent: AgentRecord,
        reason: str,
        *,
        count_attempt: bool = True,
        keep: set[tuple[str, int]] | None = None,
    ) -> None:
        tasks = [
            t for t in agent.in_flight.values() if not keep or (t.task_id, t.attempt) not in keep
        ]
        if tasks:
            logger.warning(
                "agent %s: re-dispatching %d microtasks (%s): %s",
                agent.agent_id,
                len(tasks),
                reason,
                ", ".join(t.task_id for t in tasks[:20]),
                extra=_log_ids(agent_id=agent.agent_id, tasks=[t.task_id for t in tasks]),
            )
        for task in tasks:
            self._retry(task, agent, "agent_lost", reason, count_attempt=count_attempt)
        self._kick()

    # -- completion -----------------------------------------------------------------------------
    def _finish(self, job: Job) -> None:
        self._drop_placement(job.job_id)
        if job.on_finish is not None:  # windows of a monitoring job
            self.ledger.finished(job)
            self.ledger.jobs.pop(job.job_id, None)
            if not job.finished_ok:
                self._send_cancels(self.ledger.cancel_job(job, self.registry.agents))
            job.on_finish(job)
            job.arrays, job.outputs = {}, []
            return
        if job.journaled and self.journal is not None:
            # Results are durable before the job is reported done. Marking it finished
            # is committed later: a crash in between only means the (same) result is
            # published once more after the restart.
            self.journal.commit()
        elapsed = self.ledger.finished(job) - job.submitted
        outputs: dict[str, np.ndarray[Any, Any]] = {}
        parts: list[dict[str, np.ndarray[Any, Any]]] = []  # per item, without a batch axis
        if job.finished_ok:
            try:
                outputs, parts = job.assemble(), job.per_item()
            except (ValueError, RuntimeError) as e:  # parts that do not fit together
                logger.exception(
                    "job %s: cannot assemble its outputs",
                    job.job_id,
                    extra=_log_ids(job_id=job.job_id),
                )
                job.error = ErrorInfo(code="internal", message=f"outputs do not assemble: {e}")
        if job.finished_ok:
            result = JobResult(
                job_id=job.job_id,
                ok=True,
                model=job.spec.model,
                samples=job.samples,
                tasks=len(job.units),
                batch_size=job.batch_size,
                elapsed_s=elapsed,
                retries=job.retries,
                per_agent={
                    a: AgentShare(samples=s, tasks=job.per_agent_tasks[a])
                    for a, s in sorted(job.per_agent.items())
                },
                disagreements=dict(job.disagreements),
            )
            logger.info(
                "job %s done: %d samples in %.3fs, %d retries",
                job.job_id,
                job.samples,
                elapsed,
                job.retries,
                extra=_log_ids(job_id=job.job_id),
            )
        else:
            self._send_cancels(self.ledger.cancel_job(job, self.registry.agents))
            result = JobResult(
                job_id=job.job_id,
                ok=False,
                model=job.spec.model,
                error=job.error,
                elapsed_s=elapsed,
                retries=job.retries,
                disagreements=dict(job.disagreements),
            )
            logger.error(
                "job %s failed: %s",
                job.job_id,
                job.error.message if job.error else "?",
                extra=_log_ids(job_id=job.job_id),
            )
        if job.future is not None and not job.future.done():
            if job.finished_ok:
                job.future.set_result(
                    JobOutput(job_id=job.job_id, outputs=outputs, result=result, parts=parts)
                )
            else:
                job.future.set_exception(ErrorInfo.job_error(result.error, job.job_id))
        if job.publish_result:
            if job.finished_ok:
                result = result.model_copy(
                    update={
                        "outputs": encode_arrays(outputs),
                        "parts": [encode_arrays(p) for p in parts],
                    }
                )
            payload = encode(result, job.spec.result_encoding)
            topics = [self.topics.result(job.job_id)]
            if job.client_id is not None:
                topics.append(self.topics.replies(job.client_id))
            sent = [self._publish(topic, payload) for topic in topics]
            now = time.monotonic()
            self._results.add(
                HeldResult(
                    job_id=job.job_id,
                    client_id=job.client_id,
                    payload=payload,
                    topics=tuple(topics),
                    finished=now,
                    sent=now if all(sent) else None,
                )
            )
            self._publish_status(job)
        if job.trace is not None:
            job.trace.finish(job)
            if self.config.trace_dir is not None:
                job.trace.write_to(self.config.trace_dir)
        # Inputs and per-microtask outputs are no longer needed; the summary stays.
        job.arrays = {}
        job.outputs = []
        self._state_dirty = True

    def _publish(self, topic: str, payload: bytes) -> bool:
        """Publish a message that must not be lost to a broker outage (final results).

        Returns whether it was handed to the connection; if not, it is kept for the next
        one (up to ``UNSENT_LIMIT`` messages)."""
        if self._link.publish_nowait(topic, payload):
            return True
        if len(self._unsent) < UNSENT_LIMIT:
            self._unsent.append((topic, payload))
        return False

    def _publish_results_again(self) -> None:
        """After a reconnection: publish again the results the lost connection may have
        swallowed.

        ``publish_nowait`` hands a result to paho and the socket; if the connection dies
        before the broker has read it, it is gone (the session is rebuilt, paho's queue
        with it), and nothing tells us which messages made it. A connection is known good
        up to the last message the broker sent us: it had read what we wrote up to about
        then. A dead connection is noticed at once (a reset) or after a keepalive of
        silence (paho's PINGREQ goes unanswered), so what we wrote more than a keepalive
        before that last message has had ample time to be read. Publishing again every
        result handed to the connection since ``last heard - keepalive`` is therefore
        enough; it costs one more copy of about a keepalive's worth of results (30 s by
        default), and clients drop results of jobs they no longer wait for. Results that
        never reached the connection went out with ``_unsent`` just before this.
        """
        now = time.monotonic()
        since = self._last_heard - self.config.broker.keepalive
        again: list[str] = []
        for held in self._results.all():
            if held.sent is None:  # waited in _unsent, published just now
                held.sent = now
            elif held.sent >= since:
                sent = [self._publish(topic, held.payload) for topic in held.topics]
                held.sent = now if all(sent) else None
                again.append(held.job_id)
        if again:
            self.resent["reconnected"] += len(again)
            logger.info(
                "published %d results again that the lost connection may not have delivered: %s",
                len(again),
                ", ".join(again[:20]) + (", ..." if len(again) > 20 else ""),
                extra=_log_ids(jobs=again[:100]),
            )

    def _publish_status(self, job: Job) -> None:
        status = JobStatus(
            job_id=job.job_id,
            state=job.state,
            tasks_total=len(job.units),
            tasks_done=job.done,
            samples_total=job.samples,
            samples_done=sum(job.per_agent.values()),
            error=job.error,
            ts=time.time(),
        )
        self._link.publish_nowait(self.topics.status(job.job_id), status.to_json())

    # -- housekeeping ---------------------------------------------------------------------------
    async def _housekeeping(self) -> None:
        last_status = last_state = last_health = 0.0
        last_counted = 0
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            if self.journal is not None:
                self.journal.commit()  # batched: one transaction per tick
            now = time.monotonic()
            resumed = self._resumed_at
            if resumed is not None and now - resumed >= self.config.resume_grace_s:
                self._release_resumed()
            self._expire_early_results(now)
            self._results.expire(now)
            if (
                self._early_submits
                and self._link.connected.is_set()
                and now - self._connected_at >= BIRTHS_GRACE_S
            ):
                early, self._early_submits = self._early_submits, []
                for payload, identity in early:
                    self._on_submit(payload, identity)
            for task in self.ledger.expired(now):
                old = self.registry.agents.get(task.agent_id or "")
                logger.warning(
                    "microtask %s attempt %d: lease expired on %s",
                    task.task_id,
                    task.attempt,
                    task.agent_id,
                    extra=_task_ids(task),
                )
                self._link.publish_nowait(
                    self.topics.tasks(task.agent_id or ""),
                    CancelTask(task_id=task.task_id, attempt=task.attempt).to_json(),
                )
                if old is not None and old.online and not old.suspect:
                    logger.warning(
                        "agent %s suspect: let a lease expire",
                        old.agent_id,
                        extra=_log_ids(agent_id=old.agent_id),
                    )
                    old.suspect = True
                self._retry(task, old, "lease_expired", "no result before the lease expired")
                self._kick()
            self._expire_windows(now)
            if self.deployer is not None:
                self.deployer.tick(now)
            if self.catalog is not None and now - self._catalog_checked >= 1.0:
                self._catalog_checked = now
                if self.catalog.refresh():  # `edge-offload models add/remove` meanwhile
                    logger.info("model catalog changed: %s", ", ".join(self.catalog.ids()))
            if self.config.speculate:
                self._speculate(now)
            if any(j.pending for j in self.ledger.active.values()):
                self._kick()  # held jobs whose hold ended, copies waiting for an agent
            for agent in self.registry.silent(self.config.suspect_after_s):
                if not agent.suspect:
                    logger.warning(
                        "agent %s suspect: silent for %.0fs",
                        agent.agent_id,
                        self.config.suspect_after_s,
                        extra=_log_ids(agent_id=agent.agent_id),
                    )
                    agent.suspect = True
            for agent in self.registry.silent(self.config.dead_after_s):
                logger.warning(
                    "agent %s silent for %.0fs: treated as dead",
                    agent.agent_id,
                    self.config.dead_after_s,
                    extra=_log_ids(agent_id=agent.agent_id),
                )
                agent.online = False
                agent.offline_reason = f"silent for {self.config.dead_after_s:.0f}s"
                self._requeue_agent(agent, "agent silent")
                self._state_dirty = True
            if now - last_health >= HEALTH_INTERVAL_S:
                last_health = now
                for alert in self.health.check(list(self.registry.agents.values()), time.time()):
                    logger.warning(
                        "fleet: %s",
                        alert.message,
                        extra=_log_ids(agent_id=alert.agent_id, reason=alert.kind),
                    )
                    self._raise(self.topics.fleet_alerts, alert)
            if now - last_status >= self.config.status_interval_s:
                last_status = now
                for job in self.ledger.active.values():
                    if job.done and job.on_finish is None:
                        self._publish_status(job)
                for monitor in self.monitors.values():
                    if monitor.state == "running":
                        self._publish_monitor_status(monitor)
            counted = self.ledger.counts.total() + self.rejected.total()
            if counted != last_counted:
                last_counted, self._state_dirty = counted, True
            if self._state_dirty and now - last_state >= 1.0 and self._link.connected.is_set():
                last_state = now
                self._state_dirty = False
                self._link.publish_nowait(
                    self.topics.coordinator,
                    self._state_message(online=True).to_json(),
                    retain=True,
                )

    def _speculate(self, now: float) -> None:
        """Overtake stragglers: when a job has nothing left to hand out and agents sit
        idle, a microtask running far beyond its estimate gets a copy on one of them."""
        for job in self.ledger.active.values():
            if any(t.state is TaskState.PENDING for t in job.pending):
                continue  # work still waiting: idle agents get that first
            model = job.spec.model
            idle = [
                a
                for a in self.registry.agents.values()
                if a.available and not a.in_flight and a.has_model(model)
            ]
            if not idle:
                continue
            late: list[tuple[float, Microtask]] = []
            for agent in self.registry.agents.values():
                for t in agent.in_flight.values():
                    if t.job is not job or any(c.speculative for c in job.units[t.unit]):
                        continue
                    elapsed_ms = (now - t.dispatched_at) * 1000
                    expected_ms = max(t.est_ms, agent.exec_ms_avg) + agent.latency_ms
                    limit = max(
                        self.config.speculate_factor * expected_ms, self.config.speculate_min_ms
                    )
                    if elapsed_ms > limit:
                        late.append((elapsed_ms, t))
            late.sort(key=lambda e: -e[0])
            for elapsed_ms, t in late[: len(idle)]:
                job.add_copy(t.unit, speculative=True)
                self.ledger.counts["speculated"] += 1
                logger.info(
                    "microtask %s running %.0f ms on %s (estimate %.0f ms): "
                    "started a copy on an idle agent",
                    t.task_id,
                    elapsed_ms,
                    t.agent_id,
                    t.est_ms,
                    extra=_task_ids(t),
                )
            if late:
                self._kick()

    def _collect_metrics(self) -> Iterator[Metric]:
        """Read at scrape time, on the metrics server's thread: snapshots only."""
        jobs = Counter(
            job.state for job in list(self.ledger.jobs.values()) if job.on_finish is None
        )
        yield gauge(
            "edge_offload_jobs",
            "Recent jobs by state",
            ["state"],
            {(s,): jobs.get(s, 0) for s in ("accepted", "running", "done", "failed")},
        )
        yield counter(
            "edge_offload_microtasks",
            "Microtask events: dispatched, completed, retried (re-dispatched), adopted after "
            "a restart, renewed leases, speculated straggler copies, cancelled copies, "
            "disagreements, failed",
            "event",
            dict(self.ledger.counts),
        )
        yield counter(
            "edge_offload_rejected_messages",
            "Messages refused or dropped, by reason",
            "reason",
            dict(self.rejected),
        )
        yield counter(
            "edge_offload_results_resent",
            "Final results published again, by reason: resubmitted (a finished job submitted "
            "again by its owner), reconnected (published shortly before the coordinator's "
            "connection was lost), expired (submitted again after its result was let go: "
            "answered with a result_expired error)",
            "reason",
            {r: self.resent[r] for r in ("resubmitted", "reconnected", "expired")},
        )
        yield gauge(
            "edge_offload_results_held_bytes",
            "Bytes of final results kept for clients that ask again (result_cache_bytes)",
            values=self._results.nbytes,
        )
        active = list(self.ledger.active.values())
        yield gauge(
            "edge_offload_queue_depth",
            "Microtasks waiting to be dispatched",
            values=sum(len(j.pending) for j in active),
        )
        agents = list(self.registry.agents.values())
        yield gauge(
            "edge_offload_agents",
            "Agents by state",
            ["state"],
            {
                ("available",): sum(a.available for a in agents),
                ("suspect",): sum(a.online and a.suspect for a in agents),
                ("offline",): sum(not a.online for a in agents),
            },
        )
        online = [a for a in agents if a.online]
        yield gauge(
            "edge_offload_agent_slots",
            "Slots per agent",
            ["agent"],
            {(a.agent_id,): a.slots for a in online},
        )
        yield gauge(
            "edge_offload_agent_in_flight",
            "Microtasks dispatched to an agent and not answered yet (running or queued there)",
            ["agent"],
            {(a.agent_id,): len(a.in_flight) for a in online},
        )
        yield gauge(
            "edge_offload_agent_busy_slots",
            "Slots running a microtask, from the agent's last heartbeat",
            ["agent"],
            {(a.agent_id,): a.heartbeat.running if a.heartbeat else 0 for a in online},
        )
        yield gauge(
            "edge_offload_agent_utilisation",
            "Busy slots over slots, from the agent's last heartbeat (0-1)",
            ["agent"],
            {
                (a.agent_id,): (a.heartbeat.running / a.slots if a.heartbeat else 0.0)
                for a in online
            },
        )
        monitors = list(self.monitors.values())
        yield counter(
            "edge_offload_monitor_windows",
            "Windows of monitoring jobs: cut, processed (verdict given), missed (verdict "
            "after the deadline), failed (no agent could run it), shed (backlog full)",
            ["job", "outcome"],
            {
                (m.job_id, k): m.counts[k]
                for m in monitors
                for k in ("windows", "processed", "missed", "failed", "shed")
            },
        )
        yield counter(
            "edge_offload_monitor_readings_rejected",
            "Sensor messages skipped as malformed, by job and reason",
            ["job", "reason"],
            {(m.job_id, r): n for m in monitors for r, n in list(m.malformed.items())},
        )
        yield counter(
            "edge_offload_alerts",
            "Alerts published, by kind (anomaly, cleared, and fleet health)",
            "kind",
            dict(self.alert_counts),
        )
        yield counter(
            "edge_offload_agent_completed",
            "Microtasks each agent completed (accepted results)",
            "agent",
            {a.agent_id: a.completed for a in agents},
        )
        if self.deployer is not None:
            d = self.deployer
            yield counter(
                "edge_offload_model_deployments",
                "Model transfers to agents, by event (started, installed, failed, given_up, "
                "refused_<code>, stalls, chunks_sent, chunks_refused, chunks_resent, bytes_sent)",
                "event",
                dict(d.counts),
            )
            yield gauge(
                "edge_offload_model_transfers_in_progress",
                "Model transfers under way",
                values=len(d.transfers),
            )

    def _forget_early(self, results: list[tuple[float, TaskResult]]) -> None:
        self._early_count -= len(results)
        self._early_bytes -= sum(_tensor_bytes(r) for _, r in results)

    def _expire_early_results(self, now: float) -> None:
        """Results whose agent never announced itself were not leased by anyone."""
        limit = now - self.config.dead_after_s
        for agent_id in [a for a, rs in self._early_results.items() if rs[0][0] < limit]:
            results = self._early_results.pop(agent_id)
            self._forget_early(results)
            self._count_reject("result_from_unknown_agent", agent_id, f"{len(results)} results")
            self.rejected["result_from_unknown_agent"] += len(results) - 1

    def _state_message(self, *, online: bool) -> CoordinatorState:
        now = time.monotonic()
        jobs = []
        listed = [j for j in list(self.ledger.jobs.values())[-100:] if j.on_finish is None]
        for job in listed[-50:]:
            jobs.append(
                JobSummary(
                    job_id=job.job_id,
                    state=job.state,
                    model=job.spec.model,
                    policy=job.policy,
                    samples=job.samples,
                    tasks_total=len(job.units),
                    tasks_done=job.done,
                    retries=job.retries,
                    elapsed_s=(job.finished or now) - job.submitted,
                    error=job.error,
                )
            )
        counts = dict(self.ledger.counts)
        counts.update((f"rejected_{k}", v) for k, v in self.rejected.items())
        counts.update((f"results_resent_{k}", v) for k, v in self.resent.items())
        return CoordinatorState(
            online=online,
            ts=time.time(),
            agents_online=len(self.registry.online()),
            jobs=jobs,
            counts=counts,
            monitors=[m.summary() for m in list(self.monitors.values())],
        )


def _tensor_bytes(msg: TaskResult) -> int:
    return sum(len(t.data) for t in msg.outputs.values())


def _labels_match(agent: AgentRecord, labels: tuple[tuple[str, str], ...]) -> bool:
    have = agent.capabilities.labels
    return all(have.get(k) == v for k, v in labels)


def _dispatch_order(job: Job) -> tuple[int, float, int]:
    """Work with a deadline first, earliest deadline first; then by priority, FIFO."""
    if job.deadline is not None:
        return (0, job.deadline, 0)
    return (1, 0.0, -job.spec.priority)


def _log_ids(**fields: object) -> dict[str, object]:
    """Ids of a log line as fields of their own (``--log-json``), beside the message."""
    return {k: v for k, v in fields.items() if v is not None}


def _task_ids(task: Microtask) -> dict[str, object]:
    return _log_ids(
        job_id=task.job.job_id, task_id=task.task_id, attempt=task.attempt, agent_id=task.agent_id
    )
