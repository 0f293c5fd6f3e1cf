"""Recent final results, kept so that a result lost on its way to a client can be sent again.

A job's result travels coordinator -> broker -> client with QoS 1 on each hop, but both
hops use clean MQTT sessions: a client whose connection is down when its result is
published never gets it, and a result still in the coordinator's socket when its own
connection dies never reaches the broker. The coordinator therefore keeps each final
result (the encoded payload, as published) for a while: a client that reconnects submits
the jobs it still waits for again, and the coordinator answers a resubmitted finished job
from here; after its own reconnection it publishes again what it finished just before the
connection was lost.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class HeldResult:
    """One job's final result as published."""

    job_id: str
    # The job's owner (None: an anonymous job, whose result topic anyone may read).
    client_id: str | None
    payload: bytes
    # Where it was published: the job's result topic, and its owner's replies topic.
    topics: tuple[str, ...]
    # When it was first published (time.monotonic()): its age.
    finished: float
    # When it was last handed to a connection (monotonic); None while it waits for one.
    sent: float | None


class ResultCache:
    """Final results by job id, oldest first, bounded by total payload bytes and by age.

    The oldest results are dropped first when the bytes would exceed ``max_bytes``; a
    result larger than ``max_bytes`` alone is not kept. ``max_bytes=0`` or ``keep_s=0``
    keeps nothing.
    """

    def __init__(self, max_bytes: int, keep_s: float) -> None:
        self.max_bytes = max_bytes
        self.keep_s = keep_s
        self._held: OrderedDict[str, HeldResult] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._held

    def add(self, held: HeldResult) -> bool:
        """Keep ``held`` (replacing an older result of the same job); False if too large."""
        self.discard(held.job_id)
        size = len(held.payload)
        if size > self.max_bytes or self.keep_s <= 0:
            return False
        while self._held and self.nbytes + size > self.max_bytes:
            self._drop_oldest()
        self._held[held.job_id] = held
        self.nbytes += size
        return True

    def get(self, job_id: str, now: float) -> HeldResult | None:
        """The result of ``job_id`` if it is still held (not older than ``keep_s``)."""
        self.expire(now)
        return self._held.get(job_id)

    def discard(self, job_id: str) -> None:
        old = self._held.pop(job_id, None)
        if old is not None:
            self.nbytes -= len(old.payload)

    def expire(self, now: float) -> None:
        """Drop results older than ``keep_s``."""
        limit = now - self.keep_s
        while self._held and next(iter(self._held.values())).finished < limit:
            self._drop_oldest()

    def all(self) -> list[HeldResult]:
        """Every result held, oldest first."""
        return list(self._held.values())

    def _drop_oldest(self) -> None:
        _, held = self._held.popitem(last=False)
        self.nbytes -= len(held.payload)
