"""The exception tree shared by every edge-offload component."""

from __future__ import annotations

from typing import Literal

# Machine-readable reasons carried on the wire (ErrorInfo.code) and in metrics.
ErrorCode = Literal[
    "malformed",  # not JSON / not the expected structure
    "bad_request",  # structurally valid but semantically wrong (ids, options)
    "too_large",  # payload over the configured limit
    "unknown_model",  # no such model on the agent / in the fleet
    "bad_input",  # tensor names, shapes or dtypes do not match the model
    "no_capacity",  # no live agent can run the model
    "execution_failed",  # onnxruntime raised while running a microtask
    "exhausted",  # microtask failed on every allowed attempt
    "no_majority",  # redundant results never agreed (redundancy=k)
    "draining",  # the receiver is shutting down
    "forbidden",  # sender is not allowed to do this
    "rate_limited",  # sender exceeded its message rate
    "cancelled",  # stopped by its submitter
    "corrupt",  # a model transfer's chunk or file failed its sha256 or size check
    "no_room",  # the model does not fit the agent's model cache budget
    "result_expired",  # a finished job was submitted again after its result was let go
    "internal",
]


class OffloadError(Exception):
    """Root of every error edge-offload raises on purpose."""

    code: ErrorCode = "internal"

    def __init__(self, message: str, *, code: ErrorCode | None = None, **context: object) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.context = context

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class ProtocolError(OffloadError):
    """An inbound message violates the contract."""

    code: ErrorCode = "malformed"


class ModelError(OffloadError):
    """A model is unknown, unloadable, or its inputs do not match."""

    code: ErrorCode = "bad_input"


class TaskError(OffloadError):
    """A microtask could not be executed."""

    code: ErrorCode = "execution_failed"


class JobError(OffloadError):
    """A job was refused or failed; ``job_id`` says which."""

    def __init__(
        self, message: str, *, job_id: str | None = None, code: ErrorCode | None = None
    ) -> None:
        super().__init__(message, code=code, job_id=job_id)
        self.job_id = job_id
