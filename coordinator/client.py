"""The Python client SDK: submit jobs over MQTT and await their results."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Any

import aiomqtt
import numpy as np

from coordinator.handles import JobHandle, JobOutput
from protocol import (
    DEFAULT_ROOT,
    AgentState,
    Alert,
    BrokerAddress,
    CoordinatorState,
    Encoding,
    ErrorInfo,
    InferenceJob,
    JobError,
    JobResult,
    JobStatus,
    MonitorJob,
    MonitorStatus,
    MonitorSummary,
    ProtocolError,
    Rejection,
    StopJob,
    Topics,
    decode,
    decode_tensors,
    encode,
    encode_arrays,
)
from protocol.codec import BINARY_MIN_BYTES
from protocol.transport import Link, cancel_and_wait


def _matches(topic: str, pattern: str) -> bool:
    return aiomqtt.Topic(topic).matches(pattern)


logger = logging.getLogger(__name__)

# Waiting jobs submitted again after a reconnection go in bursts of this many, at this
# rate: under the coordinator's default per-identity limits (client_burst 2,000,
# client_rate_per_s 1,000), which drop what exceeds them without an answer.
RESUBMIT_BURST = 100
RESUBMIT_PER_S = 400.0

StatusCallback = Callable[[JobStatus], None]


class OffloadClient:
    """Submit jobs to the coordinator through the broker.

    ``async with OffloadClient("mqtt://127.0.0.1:1883") as client:
         out = await client.run("digits-mlp", {"input": x})``

    The client subscribes once to its own reply topic, so a job costs one publish out
    and one message back. It reconnects (capped, jittered backoff) when the broker goes
    away, and after every reconnection submits again each job it still waits for: a
    submission the broker never got runs then, and the coordinator answers a job that
    finished meanwhile (its result, published while this client was away, is lost to a
    clean session) by sending its kept result again (see ``result_keep_s`` and
    ``result_cache_bytes`` of the coordinator; once it is no longer kept, the job fails
    with code ``result_expired``). A running job is not run twice.

    Memory: to submit again, the client keeps each waiting job's encoded submission (its
    inputs, about their size in bytes, or 4/3 of it in JSON with base64) until the job's
    result or error arrives, or the client closes; a handle whose ``result(timeout)``
    timed out still holds it.
    """

    def __init__(
        self,
        broker: BrokerAddress | str = "mqtt://127.0.0.1:1883",
        *,
        root: str = DEFAULT_ROOT,
        client_id: str | None = None,
    ) -> None:
        self.address = BrokerAddress.parse(broker) if isinstance(broker, str) else broker
        self.topics = Topics(root)
        # With a broker login, the client id is the user name (brokers that confine
        # topics by user, e.g. Mosquitto's use_username_as_clientid, expect it).
        self.client_id = client_id or self.address.username or f"sdk-{uuid.uuid4().hex[:12]}"
        # The identity above owns jobs (and is the login's name on brokers that confine
        # topics by user); the MQTT connection gets a suffix of its own, so that two
        # processes of one identity (two CLI commands) do not take over each other's
        # connection. Brokers with use_username_as_clientid replace it anyway.
        mqtt_id = (
            self.client_id
            if client_id is None and self.address.username is None
            else f"{self.client_id}-{uuid.uuid4().hex[:6]}"
        )
        self._link = Link(
            address=self.address,
            client_id=mqtt_id,
            subscriptions=[(self.topics.replies(self.client_id), 1)],
            on_message=self._on_message,
            on_connect=self._on_connect,
        )
        self._runner: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[JobOutput]] = {}
        # Job id -> (submit topic, encoded submission) of the jobs waited for: submitted
        # again after every reconnection.
        self._submissions: dict[str, tuple[str, bytes]] = {}
        self._resubmitting: asyncio.Task[None] | None = None
        self._watchers: dict[str, StatusCallback] = {}
        self._agents: dict[str, AgentState] | None = None
        self._coordinator: asyncio.Future[CoordinatorState] | None = None
        self._counter = 0
        self._session = uuid.uuid4().hex[:8]
        # Topic filter -> queues of the callers listening to it (monitoring jobs, alerts).
        self._listeners: dict[str, list[asyncio.Queue[tuple[str, bytes]]]] = {}

    async def __aenter__(self) -> OffloadClient:
        # The first connection must succeed (an unreachable broker is an error to the
        # caller); later ones are retried by the link.
        self._runner = asyncio.create_task(
            self._link.run(raise_first=True), name="offload-client-link"
        )
        connected = asyncio.ensure_future(self._link.connected.wait())
        await asyncio.wait([self._runner, connected], return_when=asyncio.FIRST_COMPLETED)
        if self._runner.done():
            connected.cancel()
            self._runner.result()  # raises the connection error
            raise aiomqtt.MqttError("the connection ended before it was established")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await cancel_and_wait([self._runner])
        if self._resubmitting is not None:
            await cancel_and_wait([self._resubmitting])
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()
        self._submissions.clear()

    async def _on_connect(self, link: Link) -> None:
        """After a reconnection (subscriptions are back): submit again what we wait for.

        Our clean session lost whatever was published to us while we were away, and a
        submission still in our socket when the connection died never reached the broker.
        Submission is idempotent per job id, so this is safe whichever it was."""
        if link.connections == 1 or not self._submissions:
            return
        if self._resubmitting is not None:
            self._resubmitting.cancel()  # a newer connection starts over
        self._resubmitting = asyncio.create_task(
            self._submit_again(link, link.connections), name="offload-client-resubmit"
        )

    async def _submit_again(self, link: Link, connection: int) -> None:
        """Submit the waiting jobs again, paced (RESUBMIT_BURST, RESUBMIT_PER_S)."""
        again = list(self._submissions)
        for i, job_id in enumerate(again):
            if i and i % RESUBMIT_BURST == 0:
                await asyncio.sleep(RESUBMIT_BURST / RESUBMIT_PER_S)
            submission = self._submissions.get(job_id)
            if submission is None:
                continue  # answered meanwhile
            if link.connections != connection or not link.publish_nowait(*submission, qos=1):
                return  # lost again already: the next connection tries once more
        logger.info(
            "reconnected: submitted %d waiting jobs again (%s)",
            len(again),
            ", ".join(again[:10]) + (", ..." if len(again) > 10 else ""),
        )

    @property
    def mqtt(self) -> aiomqtt.Client:
        """The current connection (raises :class:`aiomqtt.MqttError` while there is none)."""
        if self._runner is None:
            raise RuntimeError("use 'async with OffloadClient(...)'")
        return self._link.client

    async def _follow(self, topic: str, qos: int) -> None:
        """Subscribe now and after every reconnection, until :meth:`_unfollow`."""
        self._link.subscriptions.append((topic, qos))
        await self.mqtt.subscribe(topic, qos=qos)

    def _unfollow(self, job_id: str) -> None:
        mine = (self.topics.status(job_id), self.topics.result(job_id))
        self._link.subscriptions = [s for s in self._link.subscriptions if s[0] not in mine]

    # -- jobs -----------------------------------------------------------------------------------
    async def submit(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]] | np.ndarray[Any, Any],
        *,
        batch_size: int | None = None,
        policy: str | None = None,
        priority: int = 0,
        job_id: str | None = None,
        on_status: StatusCallback | None = None,
        redundancy: int = 1,
        tolerance: float = 0.0,
        whole: Collection[str] = (),
        require_providers: Collection[str] = (),
        prefer_providers: Collection[str] = (),
    ) -> JobHandle:
        """Submit an inference job; ``inputs`` is one array (for single-input models) or
        a mapping of input name to array, split along the model's batch axis, except the
        inputs named in ``whole``, which go unchanged with every microtask (for a model
        without a batch axis, split inputs lead with an item axis: one item per microtask,
        outputs per item in ``JobOutput.parts``). ``redundancy=k`` runs every microtask on
        k distinct agents and keeps the majority's outputs. ``require_providers`` (any of
        them) and ``prefer_providers`` choose agents by their probed execution providers."""
        if isinstance(inputs, np.ndarray):
            inputs = {"input": inputs}
        self._counter += 1
        # The session token keeps ids unique across runs of a client with a stable id (a
        # user name): coordinators and agents treat a known id as a redelivery.
        job_id = job_id or f"{self.client_id[:100]}-{self._session}-{self._counter}"
        # Binary frames (no base64 pass) pay from about 2 KiB of tensors; see protocol.codec.
        big = sum(np.asarray(a).nbytes for a in inputs.values()) >= BINARY_MIN_BYTES
        spec = InferenceJob.model_validate(
            {
                "job_id": job_id,
                "model": model,
                "inputs": encode_arrays(dict(inputs)),
                "batch_size": batch_size,
                "policy": policy,
                "priority": priority,
                "redundancy": redundancy,
                "tolerance": tolerance,
                "whole": list(whole),
                "require_providers": list(require_providers),
                "prefer_providers": list(prefer_providers),
                "client_id": self.client_id,
                "result_encoding": "binary" if big else "json",
            }
        )
        return await self.submit_spec(spec, on_status=on_status)

    async def submit_spec(
        self, spec: InferenceJob, *, on_status: StatusCallback | None = None
    ) -> JobHandle:
        future: asyncio.Future[JobOutput] = asyncio.get_running_loop().create_future()
        self._waiting[spec.job_id] = future
        if on_status is not None:
            self._watchers[spec.job_id] = on_status
            await self._follow(self.topics.status(spec.job_id), qos=0)
        if spec.client_id is None:
            await self._follow(self.topics.result(spec.job_id), qos=1)
        # Not awaiting the broker's PUBACK saves a round trip per job; the job's result
        # (or a timeout in result()) is the acknowledgement that matters.
        encoding: Encoding = spec.result_encoding  # the same size rule chose it
        # Submitted under this client's identity: a broker ACL can tie the topic to the
        # authenticated user, and the coordinator can then check an allow-list.
        topic = self.topics.submit_as(self.client_id)
        payload = encode(spec, encoding)
        if not self._link.publish_nowait(topic, payload, qos=1):
            self._waiting.pop(spec.job_id, None)
            self._watchers.pop(spec.job_id, None)
            self._unfollow(spec.job_id)
            raise JobError("not connected to the broker", job_id=spec.job_id, code="internal")
        self._submissions[spec.job_id] = (topic, payload)  # until its result arrives
        return JobHandle(spec.job_id, future)

    async def run(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray[Any, Any]] | np.ndarray[Any, Any],
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> JobOutput:
        """Submit and wait for the result."""
        handle = await self.submit(model, inputs, **options)
        return await handle.result(timeout)

    # -- monitoring jobs ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _listen(self, *filters: str) -> AsyncIterator[asyncio.Queue[tuple[str, bytes]]]:
        """Messages on ``filters`` while the block runs (subscribed for its duration)."""
        queue: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        for f in filters:
            first = f not in self._listeners
            self._listeners.setdefault(f, []).append(queue)
            if first and f != self.topics.replies(self.client_id):
                await self._follow(f, 1)
        try:
            yield queue
        finally:
            for f in filters:
                queues = self._listeners.get(f, [])
                if queue in queues:
                    queues.remove(queue)
                if queues:
                    continue
                self._listeners.pop(f, None)
                if f != self.topics.replies(self.client_id):
                    self._link.subscriptions = [s for s in self._link.subscriptions if s[0] != f]
                    with contextlib.suppress(aiomqtt.MqttError):
                        await self.mqtt.unsubscribe(f)

    def _send(self, msg: MonitorJob | StopJob) -> None:
        if not self._link.publish_nowait(
            self.topics.submit_as(self.client_id), msg.to_json(), qos=1
        ):
            raise JobError("not connected to the broker", job_id=msg.job_id, code="internal")

    async def start_monitor(self, spec: MonitorJob, *, timeout: float = 10.0) -> MonitorStatus:
        """Start a monitoring job; returns its first status, or raises :class:`JobError`
        with the coordinator's reason if it is refused."""
        if spec.client_id is None:
            spec = spec.model_copy(update={"client_id": self.client_id})
        async with self._listen(self.topics.status(spec.job_id)) as queue:
            self._send(spec)
            async with asyncio.timeout(timeout):
                while True:
                    _, payload = await queue.get()
                    status = _status(payload)
                    if isinstance(status, MonitorStatus):
                        if status.state == "running":
                            return status
                        raise JobError(
                            f"job id {spec.job_id!r} belongs to a monitoring job that has "
                            f"{status.state}",
                            job_id=spec.job_id,
                            code="bad_request",
                        )
                    if status is not None and status.state == "failed":
                        raise ErrorInfo.job_error(status.error, spec.job_id)

    async def stop(self, job_id: str, *, timeout: float = 10.0) -> None:
        """Stop a monitoring job, or cancel an inference job, that this client submitted."""
        replies = self.topics.replies(self.client_id)
        async with self._listen(self.topics.status(job_id), replies) as queue:
            self._send(StopJob(job_id=job_id, client_id=self.client_id))
            async with asyncio.timeout(timeout):
                while True:
                    topic, payload = await queue.get()
                    if topic == replies:
                        if _kind(payload) == "rejected":
                            refused = Rejection.from_json(payload)
                            if refused.job_id == job_id:
                                raise ErrorInfo.job_error(refused.error, job_id)
                        continue
                    status = _status(payload)
                    if isinstance(status, MonitorStatus) and status.state != "running":
                        return
                    if isinstance(status, JobStatus) and status.state in ("done", "failed"):
                        return

    async def monitor_status(self, job_id: str, *, timeout: float = 2.0) -> MonitorStatus:
        """The retained status of a monitoring job (running or stopped)."""
        async with self._listen(self.topics.status(job_id)) as queue:
            try:
                async with asyncio.timeout(timeout):
                    while True:
                        status = _status((await queue.get())[1])
                        if isinstance(status, MonitorStatus):
                            return status
            except TimeoutError:
                raise JobError(
                    f"no monitoring job {job_id!r} on the broker", job_id=job_id, code="bad_request"
                ) from None

    async def monitors(self, timeout: float = 2.0) -> list[MonitorSummary]:
        return (await self.coordinator_state(timeout)).monitors

    async def alerts(
        self, job_id: str | None = None, *, topic: str | None = None
    ) -> AsyncIterator[Alert]:
        """Alerts as they come: of one job, on a given topic, or all of them
        (``{root}/alerts/#``, fleet health included)."""
        topic = topic or (self.topics.alerts(job_id) if job_id else self.topics.all_alerts)
        async with self._listen(topic) as queue:
            while True:
                _, payload = await queue.get()
                try:
                    yield Alert.from_json(payload)
                except ProtocolError as e:
                    logger.warning("ignored a malformed alert: %s", e)

    # -- fleet ----------------------------------------------------------------------------------
    async def agents(self, wait: float = 0.5) -> dict[str, AgentState]:
        """The agents' retained births/deaths, collected for ``wait`` seconds."""
        self._agents = {}
        topic = self.topics.all_agents("state")
        await self.mqtt.subscribe(topic, qos=1)
        await asyncio.sleep(wait)
        await self.mqtt.unsubscribe(topic)
        found, self._agents = self._agents, None
        return found

    async def coordinator_state(self, timeout: float = 2.0) -> CoordinatorState:
        """The coordinator's retained state with its recent jobs."""
        self._coordinator = asyncio.get_running_loop().create_future()
        await self.mqtt.subscribe(self.topics.coordinator, qos=1)
        try:
            return await asyncio.wait_for(self._coordinator, timeout)
        except TimeoutError:
            raise JobError(
                "no coordinator state on the broker (is a coordinator running?)", code="no_capacity"
            ) from None
        finally:
            await self.mqtt.unsubscribe(self.topics.coordinator)
            self._coordinator = None

    # -- inbound --------------------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            self._handle(topic, payload)
        except ProtocolError as e:
            logger.warning("ignored message on %s: %s", topic, e)

    def _handle(self, topic: str, payload: bytes) -> None:
        for pattern, queues in self._listeners.items():
            if topic == pattern or _matches(topic, pattern):
                for queue in queues:
                    queue.put_nowait((topic, payload))
        # Match topics exactly: a broker may deliver what this client never subscribed to
        # (amqtt 0.12 replays other clients' retained messages on connect).
        if topic == self.topics.replies(self.client_id):
            if _kind(payload) != "rejected":  # a refused stop: for its listener above
                self._resolve(decode(JobResult, payload))
        elif topic == self.topics.coordinator:
            if self._coordinator is not None and not self._coordinator.done():
                self._coordinator.set_result(CoordinatorState.from_json(payload))
        elif self._agents is not None and _matches(topic, self.topics.all_agents("state")):
            state = AgentState.from_json(payload)
            self._agents[state.agent_id] = state
        else:
            # A job's own topics speak only for that job, whatever the payload claims.
            for job_id in list(self._watchers):
                if topic == self.topics.status(job_id):
                    status = JobStatus.from_json(payload)
                    if status.job_id == job_id:
                        self._watchers[job_id](status)
                    return
            for job_id in list(self._waiting):
                if topic == self.topics.result(job_id):
                    result = decode(JobResult, payload)
                    if result.job_id == job_id:
                        self._resolve(result)
                    return

    def _resolve(self, result: JobResult) -> None:
        # A result may come twice (the coordinator publishes it again when it cannot tell
        # whether we got it): the first settles the job, later ones find nothing to do.
        self._submissions.pop(result.job_id, None)
        future = self._waiting.pop(result.job_id, None)
        self._watchers.pop(result.job_id, None)
        self._unfollow(result.job_id)
        if future is None or future.done():
            return
        if result.ok:
            outputs = decode_tensors(result.outputs)
            parts = [decode_tensors(p) for p in result.parts]
            future.set_result(
                JobOutput(job_id=result.job_id, outputs=outputs, result=result, parts=parts)
            )
        else:
            future.set_exception(ErrorInfo.job_error(result.error, result.job_id))


def _kind(payload: bytes) -> str | None:
    """The ``type`` of a JSON message, without validating the rest."""
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    kind = doc.get("type") if isinstance(doc, dict) else None
    return kind if isinstance(kind, str) else None


def _status(payload: bytes) -> MonitorStatus | JobStatus | None:
    """A job status topic carries JobStatus (inference) or MonitorStatus (monitoring)."""
    if not payload:
        return None
    try:
        if _kind(payload) == "monitor_status":
            return MonitorStatus.from_json(payload)
        return JobStatus.from_json(payload)
    except ProtocolError as e:
        logger.warning("ignored a malformed status: %s", e)
        return None
