"""The agent daemon: birth/death, heartbeats, and microtask execution in a bounded pool."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import platform
import queue
import random
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import numpy as np
import onnxruntime as ort
import psutil
from prometheus_client.core import CounterMetricFamily

from agent.config import AgentConfig, default_model_cache_dir, default_spool_dir
from agent.deploy import DeployStats, ModelCacheDir, ModelReceiver, make_ack
from agent.providers import usable_providers
from agent.spool import MemorySpool, ResultSpool
from agent.store import ModelStore
from protocol import (
    ENCODINGS,
    AgentState,
    CancelTask,
    Capabilities,
    Encoding,
    ErrorInfo,
    Heartbeat,
    ModelAck,
    ModelCache,
    ModelChunk,
    ModelError,
    ModelOffer,
    OffloadError,
    ProtocolError,
    RunTask,
    TaskResult,
    Topics,
    decode_tensors,
    encode,
    encode_arrays,
    is_binary,
    new_seq,
    parse_model_message,
    parse_task,
)
from protocol.metrics import Metric, MetricsEndpoint, counter, gauge
from protocol.transport import Link, cancel_and_wait

logger = logging.getLogger(__name__)

# How many finished (task_id, attempt) keys are remembered to answer redeliveries once.
SEEN_LIMIT = 100_000
# Most (task_id, attempt) pairs a birth may list (AgentState.held's max_length).
HELD_LIMIT = 65536


@dataclass(eq=False)
class _Active:
    task: RunTask
    received: float
    # Answer in the encoding the task came in.
    encoding: Encoding = "json"
    run_options: ort.RunOptions = field(default_factory=ort.RunOptions)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[str, int]:
        return (self.task.task_id, self.task.attempt)


@dataclass
class AgentStats:
    received: int = 0
    completed: int = 0
    failed: int = 0
    duplicates: int = 0
    rejected: int = 0
    cancelled: int = 0
    # Delivered on a topic the agent never subscribed to (a broker routing fault).
    misrouted: int = 0
    # Most microtasks ever executing at once (never above the slots).
    peak_running: int = 0
    # Results kept (on disk, or in memory without a spool_dir) while the broker was
    # unreachable, and results dropped because that spool was full or unwritable.
    spooled: int = 0
    spool_dropped: int = 0
    # Models deployed over MQTT: transfers, chunks, evictions.
    deploy: DeployStats = field(default_factory=DeployStats)


class Agent:
    """One device's daemon. Use as ``async with Agent(config) as agent: await agent.wait()``.

    Entering the context probes execution providers, loads and benchmarks the installed
    models (off the event loop), then connects and publishes the birth. Microtasks run in a
    thread pool of ``config.slots`` workers; onnxruntime releases the GIL while it computes.
    With a ``config.model_cache_dir``, models deployed over MQTT are received on the
    ``models`` topic (see :mod:`agent.deploy`), kept there and loaded again at the next start.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topics = Topics(config.root)
        self._tasks_topic = self.topics.tasks(config.agent_id)
        self._models_topic = self.topics.models(config.agent_id)
        self.stats = AgentStats()
        self._store: ModelStore | None = None
        # Deployed models (None: this agent accepts none); the receiver needs the loop.
        self._cache: ModelCacheDir | None = None
        self._receiver: ModelReceiver | None = None
        # Microtasks waiting for the model file (by sha256) being received right now.
        self._held_for: dict[str, list[_Active]] = {}
        self._capabilities: Capabilities | None = None
        # Microtasks go to ``slots`` worker threads through a priority queue (work with a
        # deadline first, earliest first; then by priority; then in arrival order);
        # finished ones come back through a deque with one loop wake-up per batch.
        self._work: queue.PriorityQueue[tuple[float, float, int, _Active | None]] = (
            queue.PriorityQueue()
        )
        self._order = itertools.count()
        self._workers: list[threading.Thread] = []
        self._finished: deque[tuple[_Active, bytes]] = deque()
        self._wake_lock = threading.Lock()
        self._wake_pending = False
        self._active: dict[tuple[str, int], _Active] = {}
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        # Results waiting for the broker; on disk once _prepare opens config.spool_dir.
        self._spool: ResultSpool | MemorySpool = MemorySpool(
            config.spool_max_items, config.spool_max_bytes
        )
        self._seq = 0
        self._running = 0
        self._running_lock = threading.Lock()
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.metrics = MetricsEndpoint(self._collect_metrics)
        self._exec_children: dict[str, Any] = {}
        self._exec_seconds = self.metrics.histogram(
            "edge_offload_agent_exec_seconds", "onnxruntime time per microtask, by model", ["model"]
        )
        self._link = Link(
            address=config.broker,
            client_id=f"agent-{config.agent_id}",
            subscriptions=[(self._tasks_topic, 1), (self._models_topic, 1)],
            on_message=self._on_message,
            on_connect=self._on_connect,
            will=self._will,
        )

    # -- lifecycle ------------------------------------------------------------------------------
    async def __aenter__(self) -> Agent:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._prepare)
        self._workers = [
            threading.Thread(
                target=self._worker, name=f"agent-{self.config.agent_id}-slot{i}", daemon=True
            )
            for i in range(self.config.slots)
        ]
        for w in self._workers:
            w.start()
        if self._cache is not None:
            assert self._store is not None
            self._receiver = ModelReceiver(
                agent_id=self.config.agent_id,
                cache=self._cache,
                store=self._store,
                budget_bytes=self.config.model_cache_bytes,
                idle_timeout_s=self.config.deploy_idle_timeout_s,
                stats=self.stats.deploy,
                send_ack=self._send_ack,
                on_finished=self._transfer_finished,
                on_models_changed=self._models_changed,
                in_use=self._models_in_use,
                benchmark=self.config.benchmark,
                slowdown=self.config.slowdown,
            )
        if self.config.metrics_port is not None:
            self.metrics.start(self.config.metrics_host, self.config.metrics_port)
        self._tasks = [
            asyncio.create_task(self._link.run(), name="agent-link"),
            asyncio.create_task(self._heartbeat_loop(), name="agent-heartbeat"),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._stopped.is_set():
            return
        await cancel_and_wait(self._tasks)
        self._tasks = []
        self.metrics.stop()
        if self._receiver is not None:
            await self._receiver.close()  # also releases the cache directory
        elif self._cache is not None:
            self._cache.close()
        if self._workers:
            for a in self._active.values():
                a.cancelled.set()
                a.run_options.terminate = True
            for _ in self._workers:
                self._work.put((math.inf, math.inf, next(self._order), None))
            workers, self._workers = self._workers, []
            for w in workers:
                await asyncio.to_thread(w.join)
        if len(self._spool):
            where = self.config.spool_dir
            logger.warning(
                "agent %s stopped with %d results not sent; %s",
                self.config.agent_id,
                len(self._spool),
                f"they stay in {where} for the next start" if where else "they are lost",
            )
        self._spool.close()
        self._stopped.set()
        s = self.stats
        logger.info(
            "agent %s stopped: %d received, %d completed, %d failed, %d duplicates, "
            "%d rejected, %d spooled, %d dropped",
            self.config.agent_id,
            s.received,
            s.completed,
            s.failed,
            s.duplicates,
            s.rejected,
            s.spooled,
            s.spool_dropped,
        )

    async def wait_connected(self, timeout: float = 30.0) -> None:
        await asyncio.wait_for(self._link.connected.wait(), timeout)

    async def wait(self) -> None:
        """Wait until the agent is closed."""
        await self._stopped.wait()

    async def drain(self, timeout: float | None = None) -> None:
        """Stop intake, let running microtasks finish (up to ``timeout``), then go offline.

        Tasks still running at the timeout are abandoned; their leases expire on the
        coordinator, which runs them elsewhere.
        """
        timeout = self.config.drain_timeout_s if timeout is None else timeout
        self._draining = True
        # Microtasks waiting for a model transfer could wait past the drain: hand them back.
        for sha in list(self._held_for):
            self._release_held(sha, ("draining", "agent is draining; run this elsewhere"))
        logger.info("agent %s draining %d microtasks", self.config.agent_id, len(self._active))
        self._publish_heartbeat()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            logger.warning("drain timed out with %d microtasks running", len(self._active))
        with contextlib.suppress(aiomqtt.MqttError):
            await self._link.publish(
                self.topics.state(self.config.agent_id),
                self._state(online=False, reason="drained").to_json(),
                qos=1,
                retain=True,
            )
        await self.close()

    @property
    def capabilities(self) -> Capabilities:
        assert self._capabilities is not None, "agent not started"
        return self._capabilities

    # -- preparation (blocking, runs in a thread) -----------------------------------------------
    def _prepare(self) -> None:
        cfg = self.config
        providers = usable_providers(cfg.providers)
        self._store = ModelStore(
            cfg.models_dirs,
            providers=providers,
            threads_per_slot=cfg.threads_per_slot,
            graph_optimization=cfg.graph_optimization,
        )
        self._store.load_all()
        # Deployed models load after the zoo: a deployed version of a zoo model wins.
        self._cache = self._open_cache()
        if self._cache is not None:
            self._cache.load_into(self._store, cfg.model_cache_bytes)
        if cfg.benchmark:
            self._store.benchmark(slowdown=cfg.slowdown)
        freq = psutil.cpu_freq() if hasattr(psutil, "cpu_freq") else None
        vm = psutil.virtual_memory()
        self._capabilities = Capabilities(
            hostname=socket.gethostname(),
            arch=platform.machine(),
            platform=platform.platform(terse=True),
            cpu_count=os.cpu_count() or 1,
            cpu_freq_mhz=float(freq.max or freq.current) if freq else None,
            memory_total=vm.total,
            memory_available=vm.available,
            onnxruntime=ort.__version__,
            providers=providers,
            slots=cfg.slots,
            labels=cfg.labels,
            power=_power_source(),
            models=self._store.infos(),
            slowdown=cfg.slowdown,
            encodings=list(ENCODINGS),
            model_cache=self._model_cache_info(),
        )
        psutil.cpu_percent(interval=None)  # prime: the first call always returns 0.0
        if cfg.spool_dir is not None:
            # Opened last, so a failure above leaves no directory lock behind but the
            # cache's, released here.
            try:
                self._spool = ResultSpool(cfg.spool_dir, cfg.spool_max_items, cfg.spool_max_bytes)
            except OSError as e:
                if cfg.spool_dir != default_spool_dir(cfg.agent_id):
                    if self._cache is not None:
                        self._cache.close()
                    raise  # a directory the operator chose must work
                # The default may be unwritable (read-only home on a device): run as before.
                logger.warning("results wait in memory: cannot use %s: %s", cfg.spool_dir, e)
            except BaseException:
                if self._cache is not None:
                    self._cache.close()
                raise
            kept = self._spool.keys()
            for key in kept:
                self._remember(key)  # answered already: a redelivery must not run it again

    def _open_cache(self) -> ModelCacheDir | None:
        cfg = self.config
        if cfg.model_cache_dir is None:
            return None
        try:
            return ModelCacheDir(cfg.model_cache_dir)
        except OSError as e:
            if cfg.model_cache_dir != default_model_cache_dir(cfg.agent_id):
                raise  # a directory the operator chose must work
            # The default may be unwritable (read-only home on a device): run without.
            logger.warning(
                "accepting no model deployments: cannot use %s: %s", cfg.model_cache_dir, e
            )
            return None

    def _model_cache_info(self) -> ModelCache | None:
        if self._cache is None:
            return None
        return ModelCache(
            budget_bytes=self.config.model_cache_bytes, used_bytes=self._cache.used_bytes
        )

    # -- MQTT -----------------------------------------------------------------------------------
    def _state(self, *, online: bool, reason: str | None = None) -> AgentState:
        return AgentState(
            agent_id=self.config.agent_id,
            online=online,
            seq=self._seq,
            ts=time.time(),
            reason=reason,
            capabilities=self.capabilities if online else None,
            held=self._held() if online else [],
        )

    def _held(self) -> list[tuple[str, int]]:
        """What this agent still owes: microtasks running or queued, and results not yet sent."""
        held = list(dict.fromkeys([*self._active, *self._spool.keys()]))
        if len(held) > HELD_LIMIT:
            logger.warning("birth lists %d of %d held microtasks", HELD_LIMIT, len(held))
            del held[HELD_LIMIT:]
        return held

    def _will(self) -> aiomqtt.Will:
        # A fresh sequence number per connection: the birth published on connect and this
        # death carry the same one, so a death delayed past a newer birth is recognisably stale.
        self._seq = new_seq()
        return aiomqtt.Will(
            self.topics.state(self.config.agent_id),
            self._state(online=False, reason="connection lost").to_json(),
            qos=1,
            retain=True,
        )

    async def _on_connect(self, link: Link) -> None:
        await link.publish(
            self.topics.state(self.config.agent_id),
            self._state(online=True).to_json(),
            qos=1,
            retain=True,
        )
        # Kept results follow the birth that listed them, oldest first. The loop never
        # awaits, so no result finishing now can slip in between them.
        sent = 0
        for entry in self._spool.items():
            if not link.publish_nowait(entry.topic, entry.payload, qos=1):
                break  # disconnected again: the rest waits for the next connection
            self._spool.remove(entry)
            sent += 1
        if sent or len(self._spool):
            logger.info(
                "published %d results kept while disconnected; %d still kept",
                sent,
                len(self._spool),
            )

    def _on_message(self, topic: str, payload: bytes) -> None:
        # Brokers are not always right about routing (amqtt 0.12 replays other clients'
        # retained messages on connect): only the agent's own topics are obeyed.
        if topic == self._models_topic:
            self._on_model_message(payload)
            return
        if topic != self._tasks_topic:
            self.stats.misrouted += 1
            return
        received = time.monotonic()
        if len(payload) > self.config.max_payload_bytes:
            self.stats.rejected += 1
            logger.warning(
                "task message of %d bytes refused (limit %d)",
                len(payload),
                self.config.max_payload_bytes,
            )
            return
        try:
            msg = parse_task(payload)
        except ProtocolError as e:
            self.stats.rejected += 1
            logger.warning("malformed task message refused: %s", e)
            return
        if isinstance(msg, CancelTask):
            self._cancel(msg)
        else:
            self._accept(msg, received, "binary" if is_binary(payload) else "json")

    # -- model deployment -----------------------------------------------------------------------
    def _on_model_message(self, payload: bytes) -> None:
        stats = self.stats.deploy
        if len(payload) > self.config.max_payload_bytes:
            stats.rejected += 1
            logger.warning(
                "model message of %d bytes refused (limit %d)",
                len(payload),
                self.config.max_payload_bytes,
            )
            return
        try:
            msg = parse_model_message(payload)
        except ProtocolError as e:
            stats.rejected += 1
            logger.warning("malformed model message refused: %s", e)
            return
        if isinstance(msg, ModelOffer) and (self._receiver is None or self._draining):
            stats.offers += 1
            code: Any = "draining" if self._draining else "no_room"
            why = "agent is draining" if self._draining else "this agent accepts no deployments"
            stats.refused[code] = stats.refused.get(code, 0) + 1
            self._send_ack(
                make_ack(
                    self.config.agent_id,
                    msg.transfer_id,
                    msg.model.sha256,
                    "refused",
                    code=code,
                    message=why,
                )
            )
            return
        if self._receiver is None:
            stats.chunks_ignored += isinstance(msg, ModelChunk)
            return
        self._receiver.handle(msg)

    def _send_ack(self, ack: ModelAck) -> None:
        # Lost when disconnected: the coordinator's go-back-N resends, and the next ack
        # tells it where the transfer stands.
        self._link.publish_nowait(self.topics.deploys(self.config.agent_id), ack.to_json(), qos=1)

    def _models_in_use(self) -> set[str]:
        """Models of microtasks queued, running or held: never evicted."""
        return {a.task.model for a in self._active.values()}

    def _models_changed(self) -> None:
        """A model was installed or evicted: advertise the new set in a new birth."""
        assert self._store is not None
        self._capabilities = self.capabilities.model_copy(
            update={"models": self._store.infos(), "model_cache": self._model_cache_info()}
        )
        # Same seq as this connection's birth: the birth is replaced, the connection is not.
        self._link.publish_nowait(
            self.topics.state(self.config.agent_id),
            self._state(online=True).to_json(),
            qos=1,
            retain=True,
        )

    def _transfer_finished(self, sha256: str, error: ErrorInfo | None) -> None:
        """A transfer ended: run the microtasks held for its file, or answer them."""
        if error is None:
            self._release_held(sha256, None)
        else:
            why = f"model file {sha256[:12]} was not installed: {error.message}"
            self._release_held(sha256, ("unknown_model", why))

    def _release_held(self, sha256: str, refusal: tuple[Any, str] | None) -> None:
        for active in self._held_for.pop(sha256, []):
            if active.cancelled.is_set():
                self._active.pop(active.key, None)
            elif refusal is None:
                self._enqueue(active)  # the worker checks the installed sha256 again
            else:
                self._active.pop(active.key, None)
                self._reply_error(active.task, *refusal)
        if not self._active:
            self._idle.set()

    def _sha_mismatch(self, task: RunTask) -> str | None:
        """Why ``task`` cannot run on the installed version of its model, or None."""
        assert self._store is not None
        want = task.model_sha256
        model = self._store.find(task.model)
        have = model.info.sha256 if model is not None else None
        if want is None or want == have:
            return None
        return (
            f"model {task.model!r} with sha256 {want[:12]} is not installed "
            f"(installed: {have[:12] if have else 'none'})"
        )

    # -- execution ------------------------------------------------------------------------------
    def _accept(self, task: RunTask, received: float, encoding: Encoding = "json") -> None:
        key = (task.task_id, task.attempt)
        if key in self._active or key in self._seen:
            # QoS 1 may deliver a message twice; a task attempt is answered once.
            self.stats.duplicates += 1
            return
        self.stats.received += 1
        self._remember(key)
        if self._draining:
            self._reply_error(task, "draining", "agent is draining; run this elsewhere")
            return
        if len(self._active) >= self.config.slots + self.config.queue_limit:
            self._reply_error(task, "no_capacity", "agent queue is full")
            return
        waits_for = None  # the sha256 of a model on its way, to run the task once installed
        if (mismatch := self._sha_mismatch(task)) is not None:
            receiver = self._receiver
            waits_for = task.model_sha256
            if (
                waits_for is None
                or receiver is None
                or not receiver.receiving(waits_for, task.model)
            ):
                self._reply_error(task, "unknown_model", mismatch)
                return
        active = _Active(task=task, received=received, encoding=encoding)
        self._active[key] = active
        self._idle.clear()
        if waits_for is not None:
            self._held_for.setdefault(waits_for, []).append(active)
        else:
            self._enqueue(active)

    def _enqueue(self, active: _Active) -> None:
        task = active.task
        deadline = task.deadline if task.deadline is not None else math.inf
        self._work.put((deadline, -task.priority, next(self._order), active))

    def _remember(self, key: tuple[str, int]) -> None:
        self._seen[key] = None
        if len(self._seen) > SEEN_LIMIT:
            self._seen.popitem(last=False)

    def _cancel(self, msg: CancelTask) -> None:
        active = self._active.get((msg.task_id, msg.attempt))
        if active is None:
            self._remember((msg.task_id, msg.attempt))  # a late RunTask must not start
            return
        active.cancelled.set()  # a queued task is skipped by its worker
        active.run_options.terminate = True  # a running onnxruntime call stops
        self.stats.cancelled += 1
        sha = active.task.model_sha256
        if sha is not None and active in self._held_for.get(sha, ()):
            # No worker will see it: forget it now.
            self._held_for[sha].remove(active)
            self._active.pop(active.key, None)
            if not self._active:
                self._idle.set()

    def _execute(self, active: _Active) -> bytes:
        """Run one microtask in a worker thread; always returns an encoded TaskResult."""
        task = active.task
        started = time.monotonic()
        queued_ms = (started - active.received) * 1000
        exec_ms = 0.0
        with self._running_lock:
            self._running += 1
            self.stats.peak_running = max(self.stats.peak_running, self._running)
        try:
            if active.cancelled.is_set():
                raise OffloadError("cancelled", code="draining")
            assert self._store is not None
            model = self._store.get(task.model)
            if task.model_sha256 is not None and model.info.sha256 != task.model_sha256:
                # Replaced by another version since the microtask was accepted.
                raise ModelError(self._sha_mismatch(task) or "", code="unknown_model")
            feeds = decode_tensors(task.inputs)
            model.check_inputs(feeds)
            t0 = time.perf_counter()
            try:
                outs = model.session.run(model.output_names, feeds, active.run_options)
            except Exception as e:
                raise OffloadError(f"onnxruntime: {e}", code="execution_failed") from e
            if self.config.slowdown > 1.0:
                # Emulated slower device: hold the slot for the extra service time.
                active.cancelled.wait((time.perf_counter() - t0) * (self.config.slowdown - 1.0))
            exec_ms = (time.perf_counter() - t0) * 1000
            self._exec_histogram(task.model).observe(exec_ms / 1000)
            if self.config.corrupt_outputs and random.random() < self.config.corrupt_outputs:
                outs = [_corrupt(o) for o in outs]
            result = TaskResult(
                task_id=task.task_id,
                job_id=task.job_id,
                attempt=task.attempt,
                agent_id=self.config.agent_id,
                ok=True,
                outputs=encode_arrays(dict(zip(model.output_names, outs, strict=True))),
                queued_ms=queued_ms,
                exec_ms=exec_ms,
            )
        except OffloadError as e:
            result = self._error_result(task, e.code, e.message, queued_ms)
        except Exception as e:  # never lose a task to an unexpected error
            logger.exception("microtask %s failed", task.task_id)
            result = self._error_result(task, "execution_failed", repr(e), queued_ms)
        finally:
            with self._running_lock:
                self._running -= 1
        return encode(result, active.encoding)

    def _error_result(
        self, task: RunTask, code: Any, message: str, queued_ms: float = 0.0
    ) -> TaskResult:
        return TaskResult(
            task_id=task.task_id,
            job_id=task.job_id,
            attempt=task.attempt,
            agent_id=self.config.agent_id,
            ok=False,
            error=ErrorInfo(code=code, message=message[:2000]),
            queued_ms=queued_ms,
        )

    def _reply_error(self, task: RunTask, code: Any, message: str) -> None:
        self.stats.failed += 1
        payload = self._error_result(task, code, message).to_json()
        self._publish_result(payload, (task.task_id, task.attempt))

    def _worker(self) -> None:
        """One slot: take microtasks until told to stop; never runs on the event loop."""
        while (active := self._work.get()[3]) is not None:
            payload = b"" if active.cancelled.is_set() else self._execute(active)
            self._finished.append((active, payload))
            with self._wake_lock:
                wake, self._wake_pending = not self._wake_pending, True
            if wake:
                assert self._loop is not None
                with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                    self._loop.call_soon_threadsafe(self._collect)

    def _collect(self) -> None:
        """On the event loop: publish every finished microtask's result."""
        with self._wake_lock:
            self._wake_pending = False
        while self._finished:
            active, payload = self._finished.popleft()
            self._active.pop(active.key, None)
            if active.cancelled.is_set() or not payload:
                continue
            self.stats.completed += 1
            self._publish_result(payload, active.key)
        if not self._active:
            self._idle.set()

    def _publish_result(self, payload: bytes, key: tuple[str, int]) -> None:
        topic = self.topics.results(self.config.agent_id)
        if self._link.publish_nowait(topic, payload, qos=1):
            return
        # No broker: keep it for the next connection, whose birth lists it as held.
        if self._spool.put(topic, payload, key):
            self.stats.spooled += 1
            return
        self.stats.spool_dropped += 1
        logger.error(
            "result %s/%d dropped: %d results (%d bytes) already wait for the broker",
            key[0],
            key[1],
            len(self._spool),
            self._spool.nbytes,
        )

    def _exec_histogram(self, model: str) -> Any:
        """The per-model histogram child, cached: labels() takes a lock on every call."""
        child = self._exec_children.get(model)
        if child is None:
            child = self._exec_children[model] = self._exec_seconds.labels(model)
        return child

    def _collect_metrics(self) -> Iterator[Metric]:
        """Read at scrape time, on the metrics server's thread."""
        s = self.stats
        events = {
            "received": s.received,
            "completed": s.completed,
            "failed": s.failed,
            "duplicates": s.duplicates,
            "rejected": s.rejected,
            "cancelled": s.cancelled,
            "misrouted": s.misrouted,
            "spooled": s.spooled,
            "spool_dropped": s.spool_dropped,
        }
        yield counter(
            "edge_offload_agent_microtasks", "Microtask events on this agent", "event", events
        )
        running = self._running
        yield gauge("edge_offload_agent_running", "Microtasks running now", values=running)
        yield gauge(
            "edge_offload_agent_queued",
            "Microtasks accepted and waiting for a slot",
            values=max(len(self._active) - running, 0),
        )
        yield gauge("edge_offload_agent_slots", "Slots (worker threads)", values=self.config.slots)
        yield gauge(
            "edge_offload_agent_spool_results",
            "Results kept while the broker is unreachable",
            values=len(self._spool),
        )
        yield gauge(
            "edge_offload_agent_connected",
            "1 while connected to the broker",
            values=int(self._link.connected.is_set()),
        )
        yield from self._deploy_metrics()

    def _deploy_metrics(self) -> Iterator[Metric]:
        d = self.stats.deploy
        outcomes = {"installed": d.installed, "aborted": d.aborted, "timed_out": d.timed_out}
        outcomes.update({f"refused_{code}": n for code, n in dict(d.refused).items()})
        yield counter(
            "edge_offload_agent_model_deploys",
            "Model transfers to this agent that ended, by outcome",
            "outcome",
            outcomes,
        )
        yield counter(
            "edge_offload_agent_model_chunks",
            "Model transfer chunks received, by what became of them",
            "event",
            {
                "written": d.chunks,
                "refused_corrupt": d.chunks_refused,
                "duplicate": d.chunks_duplicate,
                "out_of_order": d.chunks_out_of_order,
                "ignored": d.chunks_ignored,
            },
        )
        for name, doc, value in (
            ("received_bytes", "Chunk data received for model transfers", d.bytes_received),
            ("evictions", "Deployed models evicted to make room for others", d.evictions),
            ("messages_rejected", "Malformed or oversized models-topic messages", d.rejected),
        ):
            yield CounterMetricFamily(f"edge_offload_agent_model_{name}", doc, value=value)
        if (cache := self._model_cache_info()) is not None:
            yield gauge(
                "edge_offload_agent_model_cache_bytes",
                "Disk of the deployed-model cache",
                ["kind"],
                {("used",): cache.used_bytes, ("budget",): cache.budget_bytes},
            )

    # -- heartbeats -----------------------------------------------------------------------------
    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            self._publish_heartbeat()

    def _publish_heartbeat(self) -> None:
        running = self._running
        hb = Heartbeat(
            agent_id=self.config.agent_id,
            seq=self._seq,
            ts=time.time(),
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_available=psutil.virtual_memory().available,
            running=running,
            queued=len(self._active) - running,
            slots=self.config.slots,
            completed=self.stats.completed,
            draining=self._draining,
            active=list(self._active),
            temperature_c=_temperature(),
            battery_percent=_battery(),
        )
        self._link.publish_nowait(self.topics.heartbeat(self.config.agent_id), hb.to_json(), qos=0)


def _corrupt(out: Any) -> Any:
    """A wrong output of the same name, shape and dtype (fault injection)."""
    arr = np.asarray(out)
    if arr.dtype == np.bool_:
        return ~arr
    return (arr + 1).astype(arr.dtype)


def _power_source() -> Any:
    battery = _sensor("sensors_battery")
    if battery is None:
        return "unknown"
    return "mains" if battery.power_plugged else "battery"


def _battery() -> float | None:
    battery = _sensor("sensors_battery")
    return float(battery.percent) if battery is not None else None


def _temperature() -> float | None:
    temps = _sensor("sensors_temperatures")
    if not temps:
        return None
    readings = [t.current for entries in temps.values() for t in entries if t.current]
    return float(max(readings)) if readings else None


def _sensor(name: str) -> Any:
    fn = getattr(psutil, name, None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception:  # sensors are optional and platform-specific
        return None
