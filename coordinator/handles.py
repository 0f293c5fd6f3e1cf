"""What a submitter holds: a handle to await, and the finished job's outputs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from protocol import JobResult


@dataclass(frozen=True)
class JobOutput:
    """A finished job: outputs in input order, plus the coordinator's summary.

    For a model without a batch axis, ``parts`` holds each item's outputs in input order
    and ``outputs`` is empty.
    """

    job_id: str
    outputs: dict[str, np.ndarray[Any, Any]]
    result: JobResult
    parts: list[dict[str, np.ndarray[Any, Any]]] = field(default_factory=list)

    def __getitem__(self, name: str) -> np.ndarray[Any, Any]:
        return self.outputs[name]


class JobHandle:
    """A submitted job; ``await handle.result()`` returns its :class:`JobOutput` or raises
    :class:`protocol.JobError` (with a ``code``) if it was refused or failed."""

    def __init__(self, job_id: str, future: asyncio.Future[JobOutput]) -> None:
        self.job_id = job_id
        self._future = future

    async def result(self, timeout: float | None = None) -> JobOutput:
        return await asyncio.wait_for(asyncio.shield(self._future), timeout)

    def done(self) -> bool:
        return self._future.done()
