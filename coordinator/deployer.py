"""Model transfers from the coordinator's catalog to agents, over the MQTT link.

A transfer is an offer, then the file in chunks of ``chunk_bytes`` on the agent's
``models`` topic, with at most ``window`` chunks unacknowledged (go-back-N): the agent
acknowledges each chunk it wrote, refuses one whose sha256 does not match (it is sent
again), and verifies the whole file before it loads it. A transfer that stalls, or whose
file the agent refuses, is offered again from the start; after ``max_attempts`` it is
given up, and the agent is not chosen for that file again until it is reborn.

The deployer also estimates when a model would be ready on an agent, which placement adds
to the finish-time estimate of a microtask on an agent that lacks the model.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from coordinator.catalog import Catalog, CatalogEntry
from coordinator.registry import AgentRecord
from protocol import (
    ModelAbort,
    ModelAck,
    ModelChunk,
    ModelOffer,
    Tensor,
    Topics,
    encode,
)

logger = logging.getLogger(__name__)

CHUNK_BYTES = 512 * 1024
WINDOW = 8
# Loading a model and benchmarking it, on top of the transfer (rough; refined per agent).
INSTALL_MS = 200.0
INSTALL_BYTES_PER_MS = 100_000.0
# Test hook: "3" or "0,5" corrupts those chunk indices (data flipped after the chunk's
# digest was computed, as a faulty link would) on their first send of each transfer.
CORRUPT_ENV = "EDGE_OFFLOAD_TEST_CORRUPT_CHUNK"


def _corrupt_indices() -> frozenset[int]:
    text = os.environ.get(CORRUPT_ENV, "")
    return frozenset(int(p) for p in text.split(",") if p.strip().isdigit())


@dataclass(eq=False)
class Transfer:
    """One model file on its way to one agent."""

    transfer_id: str
    agent_id: str
    entry: CatalogEntry
    chunk_bytes: int
    started: float = field(default_factory=time.monotonic)
    # Chunks [0, acked) are written on the agent; [acked, sent) are on their way.
    acked: int = 0
    sent: int = 0
    last_progress: float = field(default_factory=time.monotonic)
    attempts: int = 1
    resent: int = 0
    corrupted: set[int] = field(default_factory=set)

    @property
    def chunks(self) -> int:
        return max(1, -(-self.entry.size // self.chunk_bytes))

    @property
    def done_sending(self) -> bool:
        return self.acked >= self.chunks

    def rate_bytes_per_ms(self, now: float) -> float | None:
        """Measured from acknowledgements, once there are some."""
        elapsed_ms = (now - self.started) * 1000
        if self.acked == 0 or elapsed_ms <= 0:
            return None
        return min(self.acked * self.chunk_bytes, self.entry.size) / elapsed_ms


class Deployer:
    """Transfers in progress, keyed by (agent id, sha256)."""

    def __init__(
        self,
        catalog: Catalog,
        topics: Topics,
        publish: Callable[[str, bytes], bool],
        *,
        chunk_bytes: int = CHUNK_BYTES,
        window: int = WINDOW,
        stall_s: float = 10.0,
        max_attempts: int = 3,
        on_done: Callable[[Transfer, bool, str], None] | None = None,
    ) -> None:
        self.catalog = catalog
        self.topics = topics
        self._publish = publish
        self.chunk_bytes = chunk_bytes
        self.window = window
        self.stall_s = stall_s
        self.max_attempts = max_attempts
        self.on_done = on_done
        self.transfers: dict[tuple[str, str], Transfer] = {}
        self._by_id: dict[str, Transfer] = {}
        # (agent id, sha256) -> why the agent cannot take that file (until it is reborn).
        self.refused: dict[tuple[str, str], str] = {}
        self.counts: Counter[str] = Counter()
        # Seconds from offer to installed, per completed transfer, with its size.
        self.durations: list[tuple[str, str, int, float]] = []
        self._corrupt = _corrupt_indices()
        self._seq = 0

    # -- placement ------------------------------------------------------------------------------
    def deployable(self, agent: AgentRecord, entry: CatalogEntry) -> bool:
        cache = agent.capabilities.model_cache
        return (
            cache is not None
            and entry.size <= cache.budget_bytes
            and (agent.agent_id, entry.sha256) not in self.refused
        )

    def ready_in_ms(self, agent: AgentRecord, entry: CatalogEntry, now: float) -> float | None:
        """Estimated ms until ``entry`` is installed on ``agent``; None if it cannot be."""
        if not self.deployable(agent, entry):
            return None
        install = INSTALL_MS + entry.size / INSTALL_BYTES_PER_MS
        t = self.transfers.get((agent.agent_id, entry.sha256))
        if t is None:
            return agent.latency_ms + entry.size / agent.bytes_per_ms + install
        rate = t.rate_bytes_per_ms(now) or agent.bytes_per_ms
        left = max(entry.size - t.acked * t.chunk_bytes, 0)
        return left / rate + install

    # -- transfers ------------------------------------------------------------------------------
    def ensure(self, agent: AgentRecord, entry: CatalogEntry) -> Transfer:
        """The transfer of ``entry`` to ``agent``, started if it is not under way."""
        key = (agent.agent_id, entry.sha256)
        t = self.transfers.get(key)
        if t is None:
            self._seq += 1
            t = Transfer(
                transfer_id=f"{entry.sha256[:16]}-{self._seq}",
                agent_id=agent.agent_id,
                entry=entry,
                chunk_bytes=self.chunk_bytes,
            )
            self.transfers[key] = t
            self._by_id[t.transfer_id] = t
            self.counts["started"] += 1
            logger.info(
                "deploying %s (%d bytes, %d chunks) to %s",
                entry.ref,
                entry.size,
                t.chunks,
                agent.agent_id,
            )
            self._offer(t)
        return t

    def _offer(self, t: Transfer) -> None:
        """(Re)start the transfer: chunks follow the agent's "receiving" answer."""
        t.acked = t.sent = 0
        offer = ModelOffer(
            transfer_id=t.transfer_id,
            model=t.entry.info(),
            chunk_size=t.chunk_bytes,
            chunks=t.chunks,
            source=t.entry.source,
            licence=t.entry.licence,
            ts=time.time(),
        )
        self._publish(self.topics.models(t.agent_id), offer.to_json())
        t.last_progress = time.monotonic()

    def _pump(self, t: Transfer) -> None:
        """Send chunks up to the window."""
        path = self.catalog.blob(t.entry.sha256)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below; one open per burst
        except OSError as e:
            self._give_up(t, f"catalog file unreadable: {e}")
            return
        with f:
            while t.sent < min(t.acked + self.window, t.chunks):
                i = t.sent
                f.seek(i * t.chunk_bytes)
                data = f.read(t.chunk_bytes)
                digest = _sha256(data)
                if i in self._corrupt and i not in t.corrupted:
                    t.corrupted.add(i)
                    data = bytes([data[0] ^ 0xFF]) + data[1:]
                    self.counts["corrupted_by_test_hook"] += 1
                chunk = ModelChunk(
                    transfer_id=t.transfer_id,
                    index=i,
                    sha256=digest,
                    data=Tensor.from_array(np.frombuffer(data, dtype=np.uint8)),
                )
                if not self._publish(self.topics.models(t.agent_id), encode(chunk, "binary")):
                    return  # no connection: the stall timer resumes it
                self.counts["chunks_sent"] += 1
                self.counts["bytes_sent"] += len(data)
                t.sent += 1

    def on_ack(self, ack: ModelAck) -> None:
        t = self._by_id.get(ack.transfer_id)
        if t is None or t.agent_id != ack.agent_id or t.entry.sha256 != ack.sha256:
            self.counts["stale_acks"] += 1
            return
        t.last_progress = time.monotonic()
        if ack.state == "installed":
            self._finish(t, ok=True, why="installed")
        elif ack.state == "refused":
            why = ack.error.message if ack.error else "refused"
            code = ack.error.code if ack.error else "internal"
            self.counts[f"refused_{code}"] += 1
            if code == "corrupt" and t.attempts < self.max_attempts:
                # The file did not verify on the agent: send it all again.
                t.attempts += 1
                logger.warning(
                    "%s refused %s (%s); transfer attempt %d",
                    t.agent_id,
                    t.entry.ref,
                    why,
                    t.attempts,
                )
                self._offer(t)
            else:
                self.refused[(t.agent_id, t.entry.sha256)] = f"{code}: {why}"
                self._finish(t, ok=False, why=f"{code}: {why}")
        else:
            if ack.error is not None:  # a chunk refused (corrupt): go back to it
                self.counts["chunks_refused"] += 1
                logger.warning(
                    "%s refused chunk %d of %s: %s",
                    t.agent_id,
                    ack.next_chunk,
                    t.entry.ref,
                    ack.error.message,
                )
                t.acked = min(ack.next_chunk, t.chunks)
                resend = t.sent - t.acked
                self.counts["chunks_resent"] += resend
                t.resent += resend
                t.sent = t.acked
            elif ack.next_chunk > t.acked:
                t.acked = min(ack.next_chunk, t.chunks)
            elif ack.next_chunk < t.acked:  # the agent restarted the transfer (new offer)
                t.acked = t.sent = ack.next_chunk
            if t.sent < t.acked:
                t.sent = t.acked
            self._pump(t)

    def tick(self, now: float) -> None:
        """Offer stalled transfers again (the agent starts over), or give up."""
        for t in list(self.transfers.values()):
            if now - t.last_progress < self.stall_s:
                continue
            if t.attempts >= self.max_attempts:
                self._give_up(t, f"no progress for {self.stall_s:.0f} s, {t.attempts} times")
                continue
            t.attempts += 1
            self.counts["stalls"] += 1
            logger.warning(
                "transfer of %s to %s stalled at chunk %d of %d; resuming (attempt %d)",
                t.entry.ref,
                t.agent_id,
                t.acked,
                t.chunks,
                t.attempts,
            )
            self._offer(t)

    def _give_up(self, t: Transfer, why: str) -> None:
        self._publish(
            self.topics.models(t.agent_id),
            ModelAbort(transfer_id=t.transfer_id, reason=why[:2000]).to_json(),
        )
        self.refused[(t.agent_id, t.entry.sha256)] = why
        self.counts["given_up"] += 1
        self._finish(t, ok=False, why=why)

    def _finish(self, t: Transfer, *, ok: bool, why: str) -> None:
        self.transfers.pop((t.agent_id, t.entry.sha256), None)
        self._by_id.pop(t.transfer_id, None)
        elapsed = time.monotonic() - t.started
        if ok:
            self.counts["installed"] += 1
            self.durations.append((t.agent_id, t.entry.ref, t.entry.size, elapsed))
            del self.durations[:-1000]
            logger.info(
                "%s installed %s: %d bytes in %.2f s (%.1f MB/s), %d chunks resent",
                t.agent_id,
                t.entry.ref,
                t.entry.size,
                elapsed,
                t.entry.size / max(elapsed, 1e-6) / 1e6,
                t.resent,
            )
        else:
            self.counts["failed"] += 1
            logger.error("deployment of %s to %s failed: %s", t.entry.ref, t.agent_id, why)
        if self.on_done is not None:
            self.on_done(t, ok, why)

    def forget_agent(self, agent_id: str, *, reborn: bool) -> None:
        """The agent died or started a new session: its partial files are gone."""
        for (aid, _), t in list(self.transfers.items()):
            if aid == agent_id:
                self.transfers.pop((aid, t.entry.sha256), None)
                self._by_id.pop(t.transfer_id, None)
                self.counts["lost_with_agent"] += 1
        if reborn:  # a new session may have room again, or a repaired disk
            for key in [k for k in self.refused if k[0] == agent_id]:
                del self.refused[key]

    def installing(self, agent_id: str, sha256: str) -> bool:
        return (agent_id, sha256) in self.transfers


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
