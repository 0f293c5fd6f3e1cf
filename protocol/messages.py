"""Pydantic models of every message exchanged over MQTT."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from protocol._base import Message, summarize
from protocol.errors import ErrorCode, JobError, ModelError, ProtocolError
from protocol.tensors import DType, Tensor

Id = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
# A benchmark point: batch size, and milliseconds per call (under three hours).
Batch = Annotated[int, Field(ge=1, le=2**31)]
CallMs = Annotated[float, Field(ge=0, le=1e7, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]


class Envelope(Message):
    """A top-level message: carries the schema version ``v``."""

    v: Literal[1] = 1


class ErrorInfo(Message):
    """Why something was refused or failed."""

    code: ErrorCode
    message: Annotated[str, Field(max_length=2000)]

    @staticmethod
    def job_error(error: ErrorInfo | None, job_id: str) -> JobError:
        """The exception a submitter gets for a failed job."""
        if error is None:
            return JobError("job failed", job_id=job_id, code="internal")
        return JobError(error.message, job_id=job_id, code=error.code)


# -- agent -> all ----------------------------------------------------------------------------


class TensorSpec(Message):
    """One model input or output: ``None`` in ``shape`` is a dynamic axis."""

    name: str
    dtype: DType
    shape: list[int | None]


class ModelInfo(Message):
    """A model installed on an agent, with its measured cost."""

    id: Id
    version: str = "1"
    sha256: Sha256
    size: Count
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batch_axis: int | None = 0
    # Self-benchmark at start-up: [(batch, milliseconds per call), ...], so the scheduler
    # can fit a fixed per-call overhead plus a per-sample cost.
    cost: Annotated[list[tuple[Batch, CallMs]], Field(max_length=64)] = []

    def check_inputs(self, inputs: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
        """Raise :class:`ModelError` naming the first input whose name, dtype or shape is wrong.

        ``inputs`` maps input name to ``(dtype, shape)``; ``None`` in a spec's shape matches any.
        """
        expected = {s.name: s for s in self.inputs}
        missing = sorted(expected.keys() - inputs.keys())
        extra = sorted(inputs.keys() - expected.keys())
        if missing or extra:
            raise ModelError(
                f"model {self.id} takes inputs {sorted(expected)}; "
                f"missing {missing}, unexpected {extra}",
                code="bad_input",
            )
        for name, (dtype, shape) in inputs.items():
            spec = expected[name]
            if dtype != spec.dtype:
                raise ModelError(
                    f"model {self.id} input {name!r}: expected dtype {spec.dtype}, got {dtype}",
                    code="bad_input",
                )
            if len(shape) != len(spec.shape) or any(
                e is not None and e != d for e, d in zip(spec.shape, shape, strict=True)
            ):
                want = ["N" if e is None else e for e in spec.shape]
                raise ModelError(
                    f"model {self.id} input {name!r}: expected shape {want}, got {list(shape)}",
                    code="bad_input",
                )

    def ms_per_sample(self) -> float | None:
        """Marginal cost per sample from the largest benchmarked batch."""
        if not self.cost:
            return None
        batch, ms = max(self.cost)
        return ms / batch


class Capabilities(Message):
    """What a device can do, advertised in its birth."""

    hostname: str
    arch: str
    platform: str
    cpu_count: Annotated[int, Field(ge=1)]
    cpu_freq_mhz: NonNeg | None = None
    memory_total: Count
    memory_available: Count
    onnxruntime: str
    providers: list[str]
    slots: Annotated[int, Field(ge=1, le=1024)]
    labels: dict[str, str] = {}
    power: Literal["mains", "battery", "unknown"] = "unknown"
    models: list[ModelInfo] = []
    # Service-time multiplier used only to emulate slower devices in tests/benchmarks.
    slowdown: Annotated[float, Field(ge=1, le=1e6, allow_inf_nan=False)] = 1.0
    # Wire encodings the agent reads on its tasks topic (see protocol.codec).
    encodings: list[Literal["json", "binary"]] = ["json"]


class AgentState(Envelope):
    """Birth (online) or death (offline, usually the Last Will); retained on ``state``.

    ``seq`` increases with every connection of the agent; a death whose ``seq`` is older than
    the newest birth is stale and must be ignored.
    """

    type: Literal["state"] = "state"
    agent_id: Id
    online: bool
    seq: Count
    ts: NonNeg
    reason: str | None = None
    capabilities: Capabilities | None = None
    # In a birth: the (task_id, attempt) pairs this agent still holds from before this
    # connection (running, queued, or finished with the result not yet delivered). The
    # coordinator keeps those leases instead of re-dispatching the work, and the results
    # follow the birth.
    held: Annotated[list[tuple[Id, Annotated[int, Field(ge=1)]]], Field(max_length=65536)] = []


class Heartbeat(Envelope):
    """Live load, every few seconds."""

    type: Literal["heartbeat"] = "heartbeat"
    agent_id: Id
    seq: Count
    ts: NonNeg
    cpu_percent: NonNeg
    memory_available: Count
    running: Count
    queued: Count
    slots: Annotated[int, Field(ge=1)]
    completed: Count
    draining: bool = False
    # Every (task_id, attempt) the agent holds, running or queued: the coordinator renews
    # their leases, so a long microtask on a live agent is never run twice.
    active: Annotated[list[tuple[Id, Annotated[int, Field(ge=1)]]], Field(max_length=4096)] = []
    # Observed milliseconds per sample, per model id (exponentially weighted).
    model_ms: dict[str, NonNeg] = {}
    temperature_c: float | None = None
    battery_percent: NonNeg | None = None


# -- coordinator -> agent ----------------------------------------------------------------------


class RunTask(Envelope):
    """Run one microtask: a model over a slice of a job's inputs."""

    type: Literal["run"] = "run"
    task_id: Id
    job_id: Id
    attempt: Annotated[int, Field(ge=1)]
    model: Id
    inputs: dict[str, Tensor]
    # Wall-clock (epoch seconds) after which the coordinator may run the task elsewhere.
    lease_until: NonNeg
    sent_at: NonNeg


class CancelTask(Envelope):
    """Stop (or never start) a microtask attempt."""

    type: Literal["cancel"] = "cancel"
    task_id: Id
    attempt: Annotated[int, Field(ge=1)]


TaskMessage = Annotated[RunTask | CancelTask, Field(discriminator="type")]


# -- agent -> coordinator ----------------------------------------------------------------------


class TaskResult(Envelope):
    """The outcome of one microtask attempt, with timings."""

    type: Literal["result"] = "result"
    task_id: Id
    job_id: Id
    attempt: Annotated[int, Field(ge=1)]
    agent_id: Id
    ok: bool
    outputs: dict[str, Tensor] = {}
    error: ErrorInfo | None = None
    queued_ms: NonNeg = 0.0
    exec_ms: NonNeg = 0.0


# -- clients <-> coordinator -------------------------------------------------------------------


class InferenceJob(Envelope):
    """Run ``model`` over N samples; inputs are split along axis 0 into microtasks."""

    type: Literal["inference"] = "inference"
    job_id: Id
    model: Id
    inputs: dict[str, Tensor]
    # Samples per microtask; chosen from the fleet's measured speed when omitted.
    batch_size: Annotated[int, Field(ge=1)] | None = None
    policy: Literal["earliest_finish", "least_loaded", "round_robin"] | None = None
    priority: int = 0
    # When set, the result is also sent to ``{root}/clients/{client_id}/replies``, so a
    # client subscribes once instead of once per job.
    client_id: Id | None = None
    # Encoding of the job_result message (protocol.codec); JSON unless asked.
    result_encoding: Literal["json", "binary"] = "json"
    # For untrusted fleets: run every microtask on this many distinct agents and keep the
    # output a majority of them agree on; float outputs agree within ``tolerance``
    # (relative and absolute, as numpy.allclose), integers and booleans exactly.
    redundancy: Annotated[int, Field(ge=1, le=9)] = 1
    tolerance: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0


JobState = Literal["accepted", "running", "done", "failed"]


class JobStatus(Envelope):
    """Progress of a job, published on ``jobs/{id}/status``."""

    type: Literal["status"] = "status"
    job_id: Id
    state: JobState
    tasks_total: Count = 0
    tasks_done: Count = 0
    samples_total: Count = 0
    samples_done: Count = 0
    error: ErrorInfo | None = None
    ts: NonNeg


class AgentShare(Message):
    samples: Count
    tasks: Count


class JobResult(Envelope):
    """Final outcome of a job on ``jobs/{id}/result``: outputs in input order, or the error."""

    type: Literal["job_result"] = "job_result"
    job_id: Id
    ok: bool
    model: str | None = None
    outputs: dict[str, Tensor] = {}
    error: ErrorInfo | None = None
    samples: Count = 0
    tasks: Count = 0
    batch_size: Count = 0
    elapsed_s: NonNeg = 0.0
    retries: Count = 0
    per_agent: dict[str, AgentShare] = {}
    # With redundancy: agents whose outputs disagreed with the majority, and how often.
    disagreements: dict[str, Count] = {}


class Rejection(Envelope):
    """Answer on ``jobs/rejected`` to a submission that names no usable job id."""

    type: Literal["rejected"] = "rejected"
    error: ErrorInfo
    payload_bytes: Count
    job_id: str | None = None
    ts: NonNeg


# -- parsing helpers -----------------------------------------------------------------------------

_task_adapter: TypeAdapter[RunTask | CancelTask] = TypeAdapter(TaskMessage)


def parse_task(payload: bytes) -> RunTask | CancelTask:
    """Parse a message from an agent's ``tasks`` topic (JSON or a binary frame)."""
    from protocol.codec import is_binary, unframe

    try:
        if is_binary(payload):
            return _task_adapter.validate_python(unframe(payload), strict=True)
        return _task_adapter.validate_json(payload)
    except ValidationError as e:
        raise ProtocolError(f"invalid task message: {summarize(e)}", code="malformed") from None


class JobSummary(Message):
    job_id: str
    state: JobState
    model: str
    policy: str
    samples: Count
    tasks_total: Count
    tasks_done: Count
    retries: Count
    elapsed_s: NonNeg
    error: ErrorInfo | None = None


class CoordinatorState(Envelope):
    """Retained on ``{root}/coordinator/state``: the coordinator is up, and its recent jobs."""

    type: Literal["coordinator"] = "coordinator"
    online: bool
    ts: NonNeg
    agents_online: Count = 0
    jobs: list[JobSummary] = []
    # Since start: microtasks dispatched, completed, retried, adopted (taken over after a
    # restart), renewed leases, and rejected messages by reason (``rejected_<reason>``).
    counts: dict[str, Count] = {}


ALL_MESSAGES: tuple[type[Envelope], ...] = (
    AgentState,
    Heartbeat,
    RunTask,
    CancelTask,
    TaskResult,
    InferenceJob,
    JobStatus,
    JobResult,
    Rejection,
    CoordinatorState,
)


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every message, keyed by message type, for non-Python integrations."""
    return {
        m.model_fields["type"].default: m.model_json_schema(mode="validation") for m in ALL_MESSAGES
    }
