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

from agent.config import AgentConfig, default_spool_dir
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


class Agent:
    """One device's daemon. Use as ``async with Agent(config) as agent: await agent.wait()``.

    Entering the context probes execution providers, loads and benchmarks the installed
    models (off the event loop), then connects and publishes the birth. Microtasks run in a
    thread pool of ``config.slots`` workers; onnxruntime releases the GIL while it computes.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.topics = Topics(config.root)
        self._tasks_topic = self.topics.tasks(config.agent_id)
        self.stats = AgentStats()
        self._store: ModelStore | None = None
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
            subscriptions=[(self._tasks_topic, 1)],
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
            cfg.models_dirs, providers=providers, threads_per_slot=cfg.threads_per_slot
        )
        self._store.load_all()
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
        )
        psutil.cpu_percent(interval=None)  # prime: the first call always returns 0.0
        if cfg.spool_dir is not None:
            # Opened last, so a failure above leaves no directory lock behind.
            try:
                self._spool = ResultSpool(cfg.spool_dir, cfg.spool_max_items, cfg.spool_max_bytes)
            except OSError as e:
                if cfg.spool_dir != default_spool_dir(cfg.agent_id):
                    raise  # a directory the operator chose must work
                # The default may be unwritable (read-only home on a device): run as before.
                logger.warning("results wait in memory: cannot use %s: %s", cfg.spool_dir, e)
            kept = self._spool.keys()
            for key in kept:
                self._remember(key)  # answered already: a redelivery must not run it again

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
        # retained messages on connect): only the agent's own tasks topic is obeyed.
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
        active = _Active(task=task, received=received, encoding=encoding)
        self._active[key] = active
        self._idle.clear()
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
