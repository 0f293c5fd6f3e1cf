"""Results an agent finished while the broker was unreachable, kept until they can be sent."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# A spooled result file: this header (magic, topic length, task id length, attempt, payload
# length), then the topic and the task id in UTF-8, then the payload.
_HEADER = struct.Struct("<4sHHIQ")
_MAGIC = b"EOR1"
# "<16-digit arrival counter>-<task id, sanitized>-<attempt>.result": sorts in arrival order.
_NAME = re.compile(r"^(\d{16})-[A-Za-z0-9_.-]*-\d+\.result$")
_TMP_SUFFIX = ".tmp"
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")  # ':' is a valid id character but not portable


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One kept result: publish ``payload`` on ``topic``; ``key`` is (task_id, attempt)."""

    topic: str
    payload: bytes
    key: tuple[str, int]
    name: str


class ResultSpool:
    """A bounded FIFO of results on disk, one file each, that survives an agent restart.

    Each file is written under a temporary name and renamed into place, so a crash leaves
    either the whole result or a temporary file that the next start deletes. There is no
    fsync: the spool rides out broker outages and agent restarts, not power loss, and an
    fsync per result would cost a device's flash more than the results of a power cut are
    worth (their leases expire and the coordinator runs them again). Only an index (key and
    size per file) is kept in memory. Use it from one thread; an exclusive lock on the
    directory keeps a second process (an agent with the same id) out of it.
    """

    def __init__(self, directory: Path, max_items: int, max_bytes: int) -> None:
        self.directory = directory
        self.max_items = max_items
        self.max_bytes = max_bytes
        # Corrupt or unfinished files found (and deleted) since this spool was opened.
        self.corrupt = 0
        self._index: dict[str, tuple[tuple[str, int], int]] = {}  # name -> (key, size)
        self._bytes = 0
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_directory(directory, "result spool")
        self._next = self._load()

    def __len__(self) -> int:
        return len(self._index)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, topic: str, payload: bytes, key: tuple[str, int]) -> bool:
        """Store one result; False when the spool is full (by count or bytes) or unwritable."""
        task_id, attempt = key
        t, k = topic.encode(), task_id.encode()
        size = _HEADER.size + len(t) + len(k) + len(payload)
        if len(self._index) >= self.max_items or self._bytes + size > self.max_bytes:
            return False
        n, self._next = self._next, self._next + 1
        name = f"{n:016d}-{_UNSAFE.sub('_', task_id)[:64]}-{attempt}.result"
        tmp = self.directory / f"{n:016d}{_TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as f:
                f.write(_HEADER.pack(_MAGIC, len(t), len(k), attempt, len(payload)))
                f.write(t + k)
                f.write(payload)
            os.replace(tmp, self.directory / name)
        except OSError as e:  # disk full, read-only, ...: the caller counts a dropped result
            logger.error("cannot write result %s/%d to %s: %s", task_id, attempt, tmp, e)
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False
        self._index[name] = (key, size)
        self._bytes += size
        return True

    def items(self) -> Iterator[SpoolEntry]:
        """The stored results, oldest first, read from disk one at a time."""
        for name in list(self._index):  # a copy: the caller removes entries as it goes
            entry = _read(self.directory / name, with_payload=True)
            if entry is None:  # changed on disk since it was indexed
                self._discard(name, "unreadable")
                continue
            topic, key, payload, _ = entry
            yield SpoolEntry(topic, payload, key, name)

    def remove(self, entry: SpoolEntry) -> None:
        if (meta := self._index.pop(entry.name, None)) is None:
            return
        self._bytes -= meta[1]
        try:
            (self.directory / entry.name).unlink(missing_ok=True)
        except OSError as e:  # sent already: at worst it is sent again, and answered once
            logger.warning("cannot delete spooled result %s: %s", entry.name, e)

    def keys(self) -> list[tuple[str, int]]:
        """The (task_id, attempt) of every stored result, oldest first."""
        return [key for key, _ in self._index.values()]

    def close(self) -> None:
        """Release the directory lock; the files stay for the next process."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load(self) -> int:
        """Index what a previous process left; return the next arrival counter."""
        found: list[tuple[int, str]] = []
        for path in self.directory.iterdir():
            if path.name.endswith(_TMP_SUFFIX):
                self._discard(path.name, "unfinished")
            elif m := _NAME.match(path.name):
                found.append((int(m[1]), path.name))
        for _, name in sorted(found):
            entry = _read(self.directory / name, with_payload=False)
            if entry is None:
                self._discard(name, "corrupt")
                continue
            _, key, _, size = entry
            self._index[name] = (key, size)
            self._bytes += size
        if self._index:
            logger.info(
                "%d results (%d bytes) left by a previous run in %s",
                len(self._index),
                self._bytes,
                self.directory,
            )
        return max(n for n, _ in found) + 1 if found else 0

    def _discard(self, name: str, why: str) -> None:
        self.corrupt += 1
        if (meta := self._index.pop(name, None)) is not None:
            self._bytes -= meta[1]
        logger.warning("deleting %s spooled result %s", why, self.directory / name)
        with contextlib.suppress(OSError):
            (self.directory / name).unlink()


class MemorySpool:
    """The same bounded FIFO in memory, for an agent without a spool directory.

    Its results are lost when the agent stops; their leases expire and the coordinator runs
    them again.
    """

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items = max_items
        self.max_bytes = max_bytes
        self._entries: dict[str, SpoolEntry] = {}
        self._bytes = 0
        self._next = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def put(self, topic: str, payload: bytes, key: tuple[str, int]) -> bool:
        if len(self._entries) >= self.max_items or self._bytes + len(payload) > self.max_bytes:
            return False
        name, self._next = str(self._next), self._next + 1
        self._entries[name] = SpoolEntry(topic, payload, key, name)
        self._bytes += len(payload)
        return True

    def items(self) -> Iterator[SpoolEntry]:
        yield from list(self._entries.values())

    def remove(self, entry: SpoolEntry) -> None:
        if self._entries.pop(entry.name, None) is not None:
            self._bytes -= len(entry.payload)

    def keys(self) -> list[tuple[str, int]]:
        return [e.key for e in self._entries.values()]

    def close(self) -> None:
        pass


def _read(path: Path, *, with_payload: bool) -> tuple[str, tuple[str, int], bytes, int] | None:
    """(topic, key, payload or b"", file size) of a whole spool file; None for anything else."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_HEADER.size)
            if len(head) != _HEADER.size:
                return None
            magic, topic_len, id_len, attempt, payload_len = _HEADER.unpack(head)
            if (
                magic != _MAGIC
                or attempt < 1
                or size != _HEADER.size + topic_len + id_len + payload_len
            ):
                return None
            topic = f.read(topic_len).decode()
            task_id = f.read(id_len).decode()
            payload = f.read(payload_len) if with_payload else b""
    except (OSError, UnicodeDecodeError):
        return None
    if with_payload and len(payload) != payload_len:
        return None
    return topic, (task_id, attempt), payload, size


def lock_directory(directory: Path, what: str) -> int | None:
    """Hold an exclusive lock on ``directory`` for as long as the returned descriptor is open.

    ``what`` names the directory's use in the error raised when another process holds it.
    """
    if sys.platform == "win32":  # no flock; one agent per directory is up to the operator
        return None
    import fcntl

    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise RuntimeError(
            f"{what} {directory} is in use by another process (an agent with the same id?)"
        ) from None
    return fd
