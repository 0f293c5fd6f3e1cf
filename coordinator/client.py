"""The Python client SDK: submit jobs over MQTT and await their results."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import aiomqtt
import numpy as np

from coordinator.handles import JobHandle, JobOutput
from protocol import (
    DEFAULT_ROOT,
    AgentState,
    BrokerAddress,
    CoordinatorState,
    Encoding,
    ErrorInfo,
    InferenceJob,
    JobError,
    JobResult,
    JobStatus,
    ProtocolError,
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

StatusCallback = Callable[[JobStatus], None]


class OffloadClient:
    """Submit jobs to the coordinator through the broker.

    ``async with OffloadClient("mqtt://127.0.0.1:1883") as client:
         out = await client.run("digits-mlp", {"input": x})``

    The client subscribes once to its own reply topic, so a job costs one publish out
    and one message back. It reconnects (capped, jittered backoff) when the broker goes
    away; a job keeps waiting, and its result arrives if the broker is back by then.
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
        self._link = Link(
            address=self.address,
            client_id=self.client_id,
            subscriptions=[(self.topics.replies(self.client_id), 1)],
            on_message=self._on_message,
        )
        self._runner: asyncio.Task[None] | None = None
        self._waiting: dict[str, asyncio.Future[JobOutput]] = {}
        self._watchers: dict[str, StatusCallback] = {}
        self._agents: dict[str, AgentState] | None = None
        self._coordinator: asyncio.Future[CoordinatorState] | None = None
        self._counter = 0

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
        for fut in self._waiting.values():
            if not fut.done():
                fut.cancel()

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
    ) -> JobHandle:
        """Submit an inference job; ``inputs`` is one array (for single-input models) or
        a mapping of input name to array, split along axis 0. ``redundancy=k`` runs every
        microtask on k distinct agents and keeps the majority's outputs."""
        if isinstance(inputs, np.ndarray):
            inputs = {"input": inputs}
        self._counter += 1
        job_id = job_id or f"{self.client_id}-{self._counter}"
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
        if not self._link.publish_nowait(topic, encode(spec, encoding), qos=1):
            raise JobError("not connected to the broker", job_id=spec.job_id, code="internal")
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
        # Match topics exactly: a broker may deliver what this client never subscribed to
        # (amqtt 0.12 replays other clients' retained messages on connect).
        if topic == self.topics.replies(self.client_id):
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
        future = self._waiting.pop(result.job_id, None)
        self._watchers.pop(result.job_id, None)
        self._unfollow(result.job_id)
        if future is None or future.done():
            return
        if result.ok:
            outputs = decode_tensors(result.outputs)
            future.set_result(JobOutput(job_id=result.job_id, outputs=outputs, result=result))
        else:
            future.set_exception(ErrorInfo.job_error(result.error, result.job_id))
