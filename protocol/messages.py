"""Pydantic models of every message exchanged over MQTT."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    TypeAdapter,
    ValidationError,
    model_serializer,
)

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
ProviderName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,64}$")]


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


def _fits(spec: Sequence[int | None], shape: tuple[int, ...]) -> bool:
    """``shape`` has the spec's rank and its fixed dims (``None`` matches any size)."""
    return len(shape) == len(spec) and all(
        e is None or e == d for e, d in zip(spec, shape, strict=True)
    )


def _show(spec: Sequence[int | None]) -> list[int | str]:
    """A spec's shape for people: "?" for a dynamic axis."""
    return ["?" if e is None else e for e in spec]


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

    @model_serializer(mode="wrap")
    def _keep_no_batch_axis(self, handler: SerializerFunctionWrapHandler) -> Any:
        # Messages go out with exclude_none, which would drop ``batch_axis: null`` and let
        # the receiver read the default, 0: a model without a batch axis would be split.
        data = handler(self)
        if self.batch_axis is None and isinstance(data, dict):
            data["batch_axis"] = None
        return data

    def check_inputs(self, inputs: Mapping[str, tuple[str, tuple[int, ...]]]) -> None:
        """Raise :class:`ModelError` naming the first input whose name, dtype or shape is wrong.

        ``inputs`` maps input name to ``(dtype, shape)``; ``None`` in a spec's shape matches any.
        """
        expected = {s.name: s for s in self.inputs}
        self._check_names(inputs)
        for name, (dtype, shape) in inputs.items():
            spec = expected[name]
            self._check_dtype(spec, dtype)
            if not _fits(spec.shape, shape):
                want = ["N" if e is None else e for e in spec.shape]
                raise ModelError(
                    f"model {self.id} input {name!r}: expected shape {want}, got {list(shape)}",
                    code="bad_input",
                )

    def check_job(
        self,
        inputs: Mapping[str, tuple[str, tuple[int, ...]]],
        whole: Collection[str] = (),
    ) -> int:
        """Check a whole job's inputs against the signature; return its samples (or items).

        ``inputs`` maps input name to ``(dtype, shape)``. Inputs named in ``whole`` go
        unchanged with every microtask and must match their spec as it is (0-d included).
        The others are split: with a batch axis k they hold N samples along k; without
        one (``batch_axis`` None) they hold one extra leading axis of N items, one item
        per microtask. A job whose inputs are all whole is one microtask (1 is returned).
        Raises :class:`ModelError` (``bad_input``) naming the input and what was expected.
        """
        expected = {s.name: s for s in self.inputs}
        whole = frozenset(whole)
        unknown = sorted(whole - expected.keys())
        if unknown:
            raise ModelError(
                f"model {self.id}: whole inputs {unknown} are not inputs of the model, "
                f"which takes {sorted(expected)}",
                code="bad_input",
            )
        self._check_names(inputs)
        axis = self.batch_axis
        unit = "items" if axis is None else "samples"
        counts: dict[str, int] = {}
        for spec in self.inputs:  # in the model's order, so errors are reproducible
            name = spec.name
            dtype, shape = inputs[name]
            self._check_dtype(spec, dtype)
            if name in whole:
                if not _fits(spec.shape, shape):
                    raise self._shape_error(
                        name, _show(spec.shape), shape, "passed whole to every microtask"
                    )
            elif axis is None:
                if not shape or not _fits(spec.shape, shape[1:]):
                    want = ["N", *_show(spec.shape)]
                    raise self._shape_error(name, want, shape, "N items, one per microtask")
                counts[name] = shape[0]
            elif len(spec.shape) <= axis:
                raise ModelError(
                    f"model {self.id} input {name!r} has shape {_show(spec.shape)}, without "
                    f"the batch axis {axis} to split it along: pass it whole",
                    code="bad_input",
                )
            else:
                batchless = [*spec.shape[:axis], None, *spec.shape[axis + 1 :]]
                if not _fits(batchless, shape):
                    want = _show(spec.shape)
                    want[axis] = "N"
                    raise self._shape_error(name, want, shape, f"N samples along axis {axis}")
                counts[name] = shape[axis]
        if not counts:
            return 1
        first, n = next(iter(counts.items()))
        for name, got in counts.items():
            if got != n:
                where = "along the leading axis" if axis is None else f"along axis {axis}"
                raise ModelError(
                    f"model {self.id} input {name!r}: expected {n} {unit} {where}, as input "
                    f"{first!r} has, got {got}",
                    code="bad_input",
                )
        if n == 0:
            raise ModelError(
                f"model {self.id} input {first!r}: expected at least one {unit[:-1]}, got 0",
                code="bad_input",
            )
        fixed = self.fixed_batch(whole)
        if fixed is not None and n % fixed:
            raise ModelError(
                f"model {self.id} input {first!r}: the model takes exactly {fixed} samples "
                f"per call along axis {axis}, so the job's {n} samples must be a multiple "
                f"of {fixed}",
                code="bad_input",
            )
        return n

    def fixed_batch(self, whole: Collection[str] = ()) -> int | None:
        """The batch size the model was exported with (a fixed dim at the batch axis of a
        split input), which every microtask must then carry; None when it is dynamic."""
        axis = self.batch_axis
        if axis is None:
            return None
        dims = {
            d
            for s in self.inputs
            if s.name not in whole and len(s.shape) > axis and (d := s.shape[axis]) is not None
        }
        if len(dims) > 1:
            raise ModelError(
                f"model {self.id}: split inputs declare different batch sizes {sorted(dims)} "
                f"at axis {axis}",
                code="bad_input",
            )
        return dims.pop() if dims else None

    def _check_names(self, inputs: Mapping[str, object]) -> None:
        expected = {s.name for s in self.inputs}
        missing = sorted(expected - inputs.keys())
        extra = sorted(inputs.keys() - expected)
        if missing or extra:
            raise ModelError(
                f"model {self.id} takes inputs {sorted(expected)}; "
                f"missing {missing}, unexpected {extra}",
                code="bad_input",
            )

    def _check_dtype(self, spec: TensorSpec, dtype: str) -> None:
        if dtype != spec.dtype:
            raise ModelError(
                f"model {self.id} input {spec.name!r}: expected dtype {spec.dtype}, got {dtype}",
                code="bad_input",
            )

    def _shape_error(
        self, name: str, want: list[int | str], got: tuple[int, ...], note: str
    ) -> ModelError:
        return ModelError(
            f"model {self.id} input {name!r}: expected shape {want}, got {list(got)} ({note})",
            code="bad_input",
        )

    def ms_per_sample(self) -> float | None:
        """Marginal cost per sample from the largest benchmarked batch."""
        if not self.cost:
            return None
        batch, ms = max(self.cost)
        return ms / batch


class ModelCache(Message):
    """An agent's cache of models deployed to it over MQTT (absent: it accepts none)."""

    # Disk the cache may use, and what the models in it use now; the least recently used
    # model not in use is evicted to make room for a new one.
    budget_bytes: Count
    used_bytes: Count = 0


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
    # Accepts models over MQTT into a cache of this size (None: only its installed models).
    model_cache: ModelCache | None = None


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
    # Work with a deadline (windows of a monitoring job) runs before batch work an agent
    # has queued: earliest deadline first (epoch seconds), then higher priority, then FIFO.
    deadline: NonNeg | None = None
    priority: int = 0
    # The exact model file to run (its sha256). An agent receiving that file right now
    # holds the microtask until it is installed; one with another version of ``model``
    # refuses it (unknown_model). None: whatever version of ``model`` the agent has.
    model_sha256: Sha256 | None = None


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


# -- model deployment: coordinator -> agent on ``models``, agent -> coordinator on ``deploys`` --


class ModelOffer(Envelope):
    """The start of a model transfer: what is coming, and in how many chunks.

    The agent answers with a :class:`ModelAck`: ``receiving`` (next_chunk 0) if it has
    room, ``refused`` otherwise. Chunks follow in order; the file is written to a
    temporary name, its size and sha256 verified, and renamed into the cache before it is
    loaded. A new offer for the same sha256 replaces an unfinished transfer.
    """

    type: Literal["model_offer"] = "model_offer"
    transfer_id: Id
    model: ModelInfo
    chunk_size: Annotated[int, Field(ge=1, le=64 * 2**20)]
    chunks: Annotated[int, Field(ge=1, le=2**20)]
    source: str = ""
    licence: str = ""
    ts: NonNeg


class ModelChunk(Envelope):
    """Chunk ``index`` of a transfer: ``data`` is a uint8 tensor (raw in a binary frame)
    whose sha256 is ``sha256``; a chunk that does not match is refused and sent again."""

    type: Literal["model_chunk"] = "model_chunk"
    transfer_id: Id
    index: Annotated[int, Field(ge=0, le=2**20)]
    sha256: Sha256
    data: Tensor


class ModelAbort(Envelope):
    """The coordinator gives up a transfer: the agent drops the partial file and answers
    the microtasks it held for the model with ``unknown_model``."""

    type: Literal["model_abort"] = "model_abort"
    transfer_id: Id
    reason: Annotated[str, Field(max_length=2000)] = ""


ModelMessage = Annotated[ModelOffer | ModelChunk | ModelAbort, Field(discriminator="type")]

TransferState = Literal["receiving", "installed", "refused"]


class ModelAck(Envelope):
    """An agent's answer to a transfer, on its ``deploys`` topic.

    ``receiving``: chunks ``0 .. next_chunk - 1`` are written; with ``error`` (code
    ``corrupt``) chunk ``next_chunk`` was refused and must be sent again. ``installed``:
    verified, renamed and loaded (a new birth follows with the model in it). ``refused``:
    the transfer is over without the model (``no_room``, ``corrupt`` file, unloadable).
    """

    type: Literal["model_ack"] = "model_ack"
    agent_id: Id
    transfer_id: Id
    sha256: Sha256
    state: TransferState
    next_chunk: Count = 0
    error: ErrorInfo | None = None
    ts: NonNeg


# -- clients <-> coordinator -------------------------------------------------------------------


class InferenceJob(Envelope):
    """Run ``model`` over N samples, split into microtasks.

    Inputs are split along the model's batch axis (``ModelInfo.batch_axis``, usually 0),
    except those named in ``whole``, which go unchanged with every microtask (state
    tensors, sample rates, lookup tables). For a model without a batch axis, every split
    input holds one extra leading axis of N items, and each microtask runs one item.
    """

    type: Literal["inference"] = "inference"
    # Submission is idempotent per job id: a known one never runs again. While the job
    # runs, a copy is ignored; once it has finished, its owner (the same ``client_id``)
    # gets its result again while the coordinator keeps it, and a ``result_expired``
    # error after that.
    job_id: Id
    model: Id
    inputs: dict[str, Tensor]
    whole: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=512)]], Field(max_length=1024)
    ] = []
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
    # Execution providers (onnxruntime names, e.g. "CUDAExecutionProvider"): only agents
    # whose probed providers include one of ``require_providers`` run the job; agents
    # with one of ``prefer_providers`` are chosen when any is available.
    require_providers: Annotated[list[ProviderName], Field(max_length=16)] = []
    prefer_providers: Annotated[list[ProviderName], Field(max_length=16)] = []


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
    """Final outcome of a job on ``jobs/{id}/result``: outputs in input order (or ``parts``),
    or the error."""

    type: Literal["job_result"] = "job_result"
    job_id: Id
    ok: bool
    model: str | None = None
    outputs: dict[str, Tensor] = {}
    # For a model without a batch axis: each item's outputs, in input order (their shapes
    # may differ from item to item, so they are not concatenated into ``outputs``).
    parts: list[dict[str, Tensor]] = []
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


# -- monitoring jobs -----------------------------------------------------------------------------

# A JSON path into a sensor's payload: dot-separated object keys and list indices
# ("value", "data.samples", "channels.0").
JsonPath = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^.]+(\.[^.]+)*$")]
# A topic filter of the sensors a monitoring job reads (MQTT wildcards allowed).
TopicFilter = Annotated[str, Field(min_length=1, max_length=512)]
Threshold = Annotated[float, Field(allow_inf_nan=False)]


class ReadingFormat(Message):
    """How readings are read from a sensor's MQTT message.

    ``json``: the number, or array of numbers, at ``field`` (the whole payload when
    ``field`` is None); ``text``: the payload is one number in ASCII; ``float32le``,
    ``float64le``, ``int16le``: the payload is a packed little-endian array.
    """

    encoding: Literal["json", "text", "float32le", "float64le", "int16le"] = "json"
    field: JsonPath | None = "value"
    # Timestamp (seconds) of the message's first value; arrival time at the coordinator
    # when None or absent. Later values of an array are 1/rate_hz apart.
    ts_field: JsonPath | None = None
    rate_hz: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] | None = None
    # Which sensor a message belongs to: a JSON field, else a topic level (negative
    # counts from the end: -1 is the last level).
    sensor_field: JsonPath | None = None
    sensor_level: Annotated[int, Field(ge=-64, le=63)] = -1
    # Values per message: exactly this many when set, at most ``max_values`` otherwise.
    length: Annotated[int, Field(ge=1, le=65536)] | None = None
    max_values: Annotated[int, Field(ge=1, le=65536)] = 4096


class Verdict(Message):
    """Turns the model's output for a window into normal / anomalous, per sensor.

    A window is positive when ``outputs[output][index] <op> threshold``. An alert is
    raised after ``raise_after`` consecutive positive windows (debounce) and cleared after
    ``clear_after`` consecutive windows that are not positive against ``clear_threshold``
    (hysteresis; the threshold itself when None).
    """

    output: Annotated[str, Field(min_length=1, max_length=128)] = "score"
    index: Annotated[int, Field(ge=0, le=2**20)] = 0
    op: Literal[">", ">=", "<", "<="] = ">"
    threshold: Threshold
    clear_threshold: Threshold | None = None
    raise_after: Annotated[int, Field(ge=1, le=1000)] = 1
    clear_after: Annotated[int, Field(ge=1, le=1000)] = 1


class PlacementRule(Message):
    """Where a monitoring job's windows may run. Values may use ``{sensor}`` and ``{N}``
    (level N of the reading's topic, negative from the end), so that, for example,
    ``{"site": "{1}"}`` keeps each sensor's windows on agents of the sensor's own site."""

    require: Annotated[dict[str, str], Field(max_length=32)] = {}
    # Agents matching these are chosen when any is available; others otherwise.
    prefer: Annotated[dict[str, str], Field(max_length=32)] = {}


class MonitorJob(Envelope):
    """A standing job: analyse every window of sensor streams, publish alerts."""

    type: Literal["monitor"] = "monitor"
    job_id: Id
    sources: Annotated[list[TopicFilter], Field(min_length=1, max_length=64)]
    reading: ReadingFormat = ReadingFormat()
    window: Annotated[int, Field(ge=1, le=65536)]
    hop: Annotated[int, Field(ge=1, le=2**20)]
    model: Id
    # The model input that receives the window (its only input when None); the window is
    # reshaped to the input's non-batch shape.
    input: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    verdict: Verdict
    # Where alerts go; ``{root}/alerts/{job_id}`` when None.
    alert_topic: TopicFilter | None = None
    # From the arrival of a window's last reading to its verdict.
    deadline_ms: Annotated[float, Field(gt=0, le=3.6e6, allow_inf_nan=False)] = 1000.0
    placement: PlacementRule = PlacementRule()
    policy: Literal["earliest_finish", "least_loaded", "round_robin"] | None = None
    client_id: Id | None = None
    max_sensors: Annotated[int, Field(ge=1, le=100_000)] = 10_000


class StopJob(Envelope):
    """Stop a monitoring job, or cancel an inference job (only its submitter may)."""

    type: Literal["stop"] = "stop"
    job_id: Id
    client_id: Id | None = None


class MonitorStats(Message):
    """What a monitoring job has done since it started (in this coordinator's life)."""

    sensors: Count = 0
    readings: Count = 0  # values taken from sensor messages
    messages: Count = 0
    malformed: dict[str, Count] = {}  # messages skipped, by reason
    windows: Count = 0  # windows cut
    processed: Count = 0  # windows with a verdict
    missed: Count = 0  # windows whose verdict came after their deadline (still processed)
    failed: Count = 0  # windows no agent could run (every attempt failed)
    shed: Count = 0  # windows refused because the backlog was full
    positive: Count = 0
    alerts: Count = 0
    cleared: Count = 0
    alarming: Count = 0  # sensors in the alert state now
    per_agent: dict[str, Count] = {}
    latency_ms_p50: NonNeg | None = None  # window complete -> verdict, recent windows
    latency_ms_p99: NonNeg | None = None
    alert_latency_ms_p50: NonNeg | None = None  # window complete -> alert published
    alert_latency_ms_p99: NonNeg | None = None


MonitorState = Literal["running", "stopped", "failed"]


class MonitorStatus(Envelope):
    """Retained on ``jobs/{id}/status`` of a monitoring job, refreshed while it runs."""

    type: Literal["monitor_status"] = "monitor_status"
    job_id: Id
    state: MonitorState
    model: str
    sources: list[str]
    alert_topic: str
    started: NonNeg  # epoch seconds
    ts: NonNeg
    stats: MonitorStats = MonitorStats()
    # The most recent bad reading or window failure, so the owner can see what is wrong.
    last_error: Annotated[str, Field(max_length=2000)] | None = None
    error: ErrorInfo | None = None


AlertKind = Literal[
    "anomaly",  # a monitoring job's verdict turned positive for a sensor
    "cleared",  # ... and back to normal
    "agent_suspect",  # fleet health (on {root}/alerts/fleet)
    "agent_dead",
    "agent_left",  # drained and said goodbye
    "agent_hot",
    "agent_overloaded",
    "agent_recovered",
]


class Alert(Envelope):
    """On a monitoring job's alert topic, and fleet health on ``{root}/alerts/fleet``."""

    type: Literal["alert"] = "alert"
    kind: AlertKind
    job_id: str | None = None
    sensor: str | None = None
    # The agent that ran the window (anomaly), or the agent the alert is about (health).
    agent_id: str | None = None
    # The window: timestamps of its first and last reading (the readings' own clock when
    # the payload carries one, else the coordinator's arrival time).
    window_start: float | None = None
    window_end: float | None = None
    # When the anomaly started: the first window of the positive streak.
    since: float | None = None
    score: float | None = None
    threshold: float | None = None
    # From the arrival of the window's last reading to this alert's publication.
    latency_ms: NonNeg | None = None
    late: bool = False
    message: Annotated[str, Field(max_length=2000)] = ""
    ts: NonNeg


class MonitorSummary(Message):
    job_id: str
    state: MonitorState
    model: str
    sources: list[str]
    sensors: Count
    windows: Count
    processed: Count
    missed: Count
    alerts: Count
    alarming: Count
    client_id: str | None = None


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


_model_adapter: TypeAdapter[ModelOffer | ModelChunk | ModelAbort] = TypeAdapter(ModelMessage)


def parse_model_message(payload: bytes) -> ModelOffer | ModelChunk | ModelAbort:
    """Parse a message from an agent's ``models`` topic (JSON or a binary frame)."""
    from protocol.codec import is_binary, unframe

    try:
        if is_binary(payload):
            return _model_adapter.validate_python(unframe(payload), strict=True)
        return _model_adapter.validate_json(payload)
    except ValidationError as e:
        raise ProtocolError(f"invalid model message: {summarize(e)}", code="malformed") from None


def _submission_type(value: Any) -> str:
    """A job message without ``type`` is an inference job (as before monitoring existed)."""
    if isinstance(value, dict):
        kind = value.get("type", "inference")
        return kind if isinstance(kind, str) else ""
    return str(getattr(value, "type", ""))


# What a client publishes on ``jobs/submit[/<identity>]``.
Submission = Annotated[
    Annotated[InferenceJob, Tag("inference")]
    | Annotated[MonitorJob, Tag("monitor")]
    | Annotated[StopJob, Tag("stop")],
    Discriminator(
        _submission_type,
        custom_error_type="unknown_type",
        custom_error_message="type must be 'inference', 'monitor' or 'stop'",
    ),
]
_submission_adapter: TypeAdapter[InferenceJob | MonitorJob | StopJob] = TypeAdapter(Submission)


def parse_submission(payload: bytes) -> InferenceJob | MonitorJob | StopJob:
    """Parse a message from a submit topic (JSON or a binary frame)."""
    from protocol.codec import is_binary, unframe

    try:
        if is_binary(payload):
            return _submission_adapter.validate_python(unframe(payload), strict=True)
        return _submission_adapter.validate_json(payload, strict=True)
    except ValidationError as e:
        raise ProtocolError(f"invalid job: {summarize(e)}", code="malformed") from None
    except RecursionError:
        raise ProtocolError("job message nests too deeply", code="malformed") from None


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
    monitors: list[MonitorSummary] = []


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
    MonitorJob,
    StopJob,
    MonitorStatus,
    Alert,
    ModelOffer,
    ModelChunk,
    ModelAbort,
    ModelAck,
)


def json_schemas() -> dict[str, Any]:
    """JSON Schema of every message, keyed by message type, for non-Python integrations."""
    return {
        m.model_fields["type"].default: m.model_json_schema(mode="validation") for m in ALL_MESSAGES
    }
