"""Models deployed over MQTT: the on-disk model cache and the receiver of chunked transfers.

The coordinator sends a :class:`~protocol.ModelOffer`, then :class:`~protocol.ModelChunk`
messages in order, keeping a window of them in flight (go-back-N); the agent answers every
step with a :class:`~protocol.ModelAck` on its ``deploys`` topic. Chunks are written to
``{cache}/.partial-{sha256}``; after the last one the file is fsynced, its size and sha256
checked by reading it back, renamed to ``{cache}/{sha256}.onnx``, loaded and recorded in
``{cache}/index.json``. Nothing unverified is ever loaded.

Protocol decisions are made on the event loop; everything that touches the disk or hashes
runs in one dedicated thread, in submission order, so chunks are written in the order
they arrived and the loop never waits for the disk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.spool import lock_directory
from agent.store import LoadedModel, ModelStore, sha256_file
from protocol import ErrorCode, ErrorInfo, ModelAbort, ModelAck, ModelChunk, ModelError, ModelOffer

logger = logging.getLogger(__name__)

INDEX = "index.json"
PARTIAL_PREFIX = ".partial-"
_INDEX_TMP = ".index.json.tmp"
_INDEX_SCHEMA = 1
# Unknown transfer ids whose chunks were logged; more are only counted (a coordinator
# that keeps sending after a restart of the agent would otherwise flood the log).
_LOGGED_UNKNOWN = 64


@dataclass
class DeployStats:
    """Model deployment counters since the agent started (part of ``AgentStats``)."""

    offers: int = 0
    installed: int = 0
    # Transfers that ended without the model, by ErrorInfo code (no_room, corrupt, ...).
    refused: dict[str, int] = field(default_factory=dict)
    aborted: int = 0
    timed_out: int = 0
    chunks: int = 0  # written
    chunks_refused: int = 0  # their data did not match their sha256: asked again
    chunks_duplicate: int = 0
    chunks_out_of_order: int = 0
    chunks_ignored: int = 0  # of no transfer in progress
    bytes_received: int = 0  # chunk data of transfers in progress, written or not
    evictions: int = 0
    # Messages on the models topic refused before any transfer saw them: malformed,
    # oversized.
    rejected: int = 0


@dataclass
class CacheEntry:
    """One deployed model in ``index.json``. Several ids may share one file (sha256)."""

    id: str
    version: str
    sha256: str
    size: int
    batch_axis: int | None = 0
    source: str = ""
    licence: str = ""
    last_used: float = 0.0

    @classmethod
    def from_json(cls, data: Any) -> CacheEntry:
        """Raise ValueError (or KeyError, TypeError) for anything but a sound entry."""
        entry = cls(
            id=str(data["id"]),
            version=str(data.get("version", "1")),
            sha256=str(data["sha256"]),
            size=int(data["size"]),
            batch_axis=None if data.get("batch_axis") is None else int(data["batch_axis"]),
            source=str(data.get("source", "")),
            licence=str(data.get("licence", "")),
            last_used=float(data.get("last_used", 0.0)),
        )
        if not _is_sha256(entry.sha256) or entry.size < 0:
            raise ValueError(f"bad cache entry {data!r}")
        return entry


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


class ModelCacheDir:
    """The directory of deployed models: ``{sha256}.onnx`` files and ``index.json``.

    Opening it cleans up after a previous process: unfinished transfers and index
    temporaries are deleted, and so are model files the index does not list (a crash
    between renaming a file into place and recording it). :meth:`load_into` verifies every
    listed file before it is loaded. Its bookkeeping is thread-safe; its file-system
    methods block and belong in a worker thread. An exclusive lock on the directory keeps
    a second agent process out of it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = lock_directory(directory, "model cache")
        self._lock = threading.Lock()
        self._entries: dict[str, CacheEntry] = {}  # model id -> entry
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    # -- bookkeeping (any thread) ---------------------------------------------------------------
    def path(self, sha256: str) -> Path:
        return self.directory / f"{sha256}.onnx"

    def partial_path(self, sha256: str) -> Path:
        return self.directory / f"{PARTIAL_PREFIX}{sha256}"

    def entries(self) -> list[CacheEntry]:
        with self._lock:
            return list(self._entries.values())

    def entry(self, model_id: str) -> CacheEntry | None:
        return self._entries.get(model_id)

    def has_file(self, sha256: str) -> bool:
        with self._lock:
            return any(e.sha256 == sha256 for e in self._entries.values())

    @property
    def used_bytes(self) -> int:
        """Disk the cached model files take (a file shared by several ids counts once)."""
        with self._lock:
            return sum({e.sha256: e.size for e in self._entries.values()}.values())

    def add(self, entry: CacheEntry) -> str | None:
        """Record ``entry``; return the sha256 of a file no id uses any more (the version
        it replaced), for the caller to delete."""
        with self._lock:
            old = self._entries.get(entry.id)
            self._entries[entry.id] = entry
            return self._orphan(old.sha256) if old and old.sha256 != entry.sha256 else None

    def remove(self, model_id: str) -> str | None:
        """Forget ``model_id``; return the sha256 of its file if no other id uses it."""
        with self._lock:
            old = self._entries.pop(model_id, None)
            return self._orphan(old.sha256) if old else None

    def _orphan(self, sha256: str) -> str | None:
        return None if any(e.sha256 == sha256 for e in self._entries.values()) else sha256

    # -- file system (blocking) -----------------------------------------------------------------
    def delete_file(self, sha256: str) -> None:
        try:
            self.path(sha256).unlink(missing_ok=True)
        except OSError as e:  # the index no longer lists it: the next start deletes it
            logger.warning("cannot delete cached model %s: %s", self.path(sha256), e)

    def write_index(self, last_used: Mapping[str, float] | None = None) -> None:
        """Write ``index.json`` atomically (temporary file, fsync, rename, fsync the
        directory), with last-use times refreshed from ``last_used`` (model id -> time)."""
        with self._lock:
            for model_id, t in (last_used or {}).items():
                if (e := self._entries.get(model_id)) is not None:
                    e.last_used = t
            doc = {
                "schema": _INDEX_SCHEMA,
                "models": [asdict(e) for e in sorted(self._entries.values(), key=lambda e: e.id)],
            }
        tmp = self.directory / _INDEX_TMP
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / INDEX)
        fsync_dir(self.directory)

    def load_into(self, store: ModelStore, budget_bytes: int) -> None:
        """Install every listed model whose file is whole, into ``store`` (start-up).

        A file whose size or sha256 is not the recorded one, or that onnxruntime cannot
        load, is deleted and forgotten: it is never loaded, and the coordinator can deploy
        it again. Then, if the cache is over ``budget_bytes`` (a smaller budget than last
        time), the least recently used models are evicted.
        """
        changed = False
        verified: dict[str, bool] = {}
        for e in self.entries():
            path = self.path(e.sha256)
            if e.sha256 not in verified:
                verified[e.sha256] = _verify(path, e.size, e.sha256)
            try:
                if not verified[e.sha256]:
                    raise ModelError("its size or sha256 does not match the index")
                store.install(path, install_entry(e))
            except Exception as err:  # one bad file must not stop the agent
                logger.error("cached model %s (%s) deleted: %s", e.id, path.name, err)
                verified[e.sha256] = False
                changed = True
        for model_id in [e.id for e in self.entries() if not verified[e.sha256]]:
            self.remove(model_id)
            if (m := store.find(model_id)) is not None and m.deployed:
                store.remove(model_id)
        for sha256, ok in verified.items():
            if not ok:
                self.delete_file(sha256)
        for e in sorted(self.entries(), key=lambda e: e.last_used):
            if self.used_bytes <= budget_bytes:
                break
            logger.info("evicting %s: the cache is over its budget of %d bytes", e.id, budget_bytes)
            store.remove(e.id)
            if (freed := self.remove(e.id)) is not None:
                self.delete_file(freed)
            changed = True
        if changed:
            self.write_index()
        if self._entries:
            logger.info(
                "%d deployed models (%d bytes) loaded from %s",
                len(self._entries),
                self.used_bytes,
                self.directory,
            )

    def close(self) -> None:
        """Release the directory lock; the files stay for the next process."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open(self) -> None:
        for path in self.directory.iterdir():
            if path.name.startswith(PARTIAL_PREFIX) or path.name == _INDEX_TMP:
                logger.info("deleting %s left by an unfinished transfer or write", path)
                with contextlib.suppress(OSError):
                    path.unlink()
        entries = self._read_index()
        if entries is None:
            self.write_index()  # empty: the next start must not trip over it again
        self._entries = entries or {}
        listed = {e.sha256 for e in self._entries.values()}
        for path in self.directory.glob("*.onnx"):
            if path.stem not in listed:
                logger.warning("deleting %s: the cache index does not list it", path)
                with contextlib.suppress(OSError):
                    path.unlink()

    def _read_index(self) -> dict[str, CacheEntry] | None:
        """The recorded entries; None when the index is unreadable."""
        path = self.directory / INDEX
        if not path.exists():
            return {}
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            return {e.id: e for e in (CacheEntry.from_json(d) for d in doc["models"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            # Written atomically, so this is damage from outside: start with an empty cache
            # (its files are then unlisted and deleted); the coordinator deploys again.
            logger.error("model cache index %s is unreadable (%s); starting empty", path, e)
            return None


def install_entry(e: CacheEntry) -> dict[str, Any]:
    """What :meth:`ModelStore.install` needs of a cache entry."""
    return {
        "id": e.id,
        "version": e.version,
        "sha256": e.sha256,
        "batch_axis": e.batch_axis,
        "last_used": e.last_used,
    }


def _verify(path: Path, size: int, sha256: str) -> bool:
    try:
        return path.stat().st_size == size and sha256_file(path) == sha256
    except OSError:
        return False


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


ChunkVerdict = Literal["written", "duplicate", "ahead", "corrupt"]


class PartialFile:
    """The file of one transfer being received; used from the disk thread only.

    The go-back-N rule lives in :meth:`accept`: only chunk ``next_chunk`` is written; an
    earlier one is a duplicate, a later one means chunks were lost (the sender goes back
    to ``next_chunk``), and one whose data does not match its sha256 is refused so that
    the sender sends it again.
    """

    def __init__(self, path: Path, size: int, chunk_size: int, chunks: int) -> None:
        self.path = path
        self.size = size
        self.chunk_size = chunk_size
        self.chunks = chunks
        self.next_chunk = 0
        self.written = 0
        self._file = open(path, "wb")  # noqa: SIM115 -- open across many chunks

    @property
    def complete(self) -> bool:
        return self.next_chunk >= self.chunks

    def accept(self, index: int, sha256: str, data: bytes) -> ChunkVerdict:
        if index < self.next_chunk:
            return "duplicate"
        if index > self.next_chunk:
            return "ahead"
        if hashlib.sha256(data).hexdigest() != sha256:
            return "corrupt"
        self._file.write(data)
        self.written += len(data)
        self.next_chunk += 1
        return "written"

    def finish(self, sha256: str) -> str | None:
        """Make the file durable and check it as it is on disk: None if its size and sha256
        are the declared ones, else why not (and the file is deleted)."""
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        on_disk = self.path.stat().st_size
        if on_disk != self.size:
            problem = f"the file has {on_disk} bytes, the offer declared {self.size}"
        elif (digest := sha256_file(self.path)) != sha256:
            problem = f"the file's sha256 is {digest[:12]}, the offer declared {sha256[:12]}"
        else:
            return None
        self.discard()
        return problem

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


def check_offer(offer: ModelOffer) -> str | None:
    """Why an offer is inconsistent, or None."""
    size, chunk_size, chunks = offer.model.size, offer.chunk_size, offer.chunks
    if size < 1:
        return "the model is empty"
    if chunks * chunk_size < size:
        return f"{chunks} chunks of {chunk_size} bytes cannot hold {size} bytes"
    if (chunks - 1) * chunk_size >= size:
        return f"{size} bytes need {-(-size // chunk_size)} chunks of {chunk_size}, not {chunks}"
    return None


@dataclass(eq=False)
class _Transfer:
    """One transfer, keyed by sha256 on the loop; ``partial`` belongs to the disk thread."""

    offer: ModelOffer
    # Transfer ids to answer: a re-offer while the file is being installed adds its own.
    ids: list[str]
    last_seen: float
    # Installing a file the cache holds already under another id: there are no chunks.
    from_cache: bool = False
    partial: PartialFile | None = None
    # Set on the loop when the transfer is given up; the disk thread then skips its work.
    dropped: bool = False
    # Last chunks handed to the disk thread and not answered yet: the install may take a
    # while (session, self-benchmark), which is no reason to time the transfer out.
    finishing: int = 0
    timer: asyncio.TimerHandle | None = None

    @property
    def sha256(self) -> str:
        return self.offer.model.sha256

    @property
    def size(self) -> int:
        return self.offer.model.size

    def chunk_length(self, index: int) -> int:
        return min(self.offer.chunk_size, self.size - index * self.offer.chunk_size)


@dataclass
class _Outcome:
    """What the disk thread made of a piece of work, for the loop to answer."""

    kind: Literal["written", "duplicate", "ahead", "corrupt", "ignored", "installed", "refused"]
    next_chunk: int = 0
    error: ErrorInfo | None = None
    model: LoadedModel | None = None


def make_ack(
    agent_id: str,
    transfer_id: str,
    sha256: str,
    state: Literal["receiving", "installed", "refused"],
    *,
    next_chunk: int = 0,
    code: ErrorCode | None = None,
    message: str = "",
) -> ModelAck:
    return ModelAck(
        agent_id=agent_id,
        transfer_id=transfer_id,
        sha256=sha256,
        state=state,
        next_chunk=next_chunk,
        error=None if code is None else ErrorInfo(code=code, message=message[:2000]),
        ts=time.time(),
    )


class ModelReceiver:
    """Receives model transfers into a :class:`ModelCacheDir` and installs them.

    Runs on the agent's event loop (``handle`` is called for every parsed message of the
    agent's ``models`` topic); disk work and hashing go to one thread of its own. The agent
    learns the outcome through callbacks: ``send_ack(ack)`` publishes an answer,
    ``on_finished(sha256, error)`` ends a transfer (error None: installed), and
    ``on_models_changed()`` after any install or eviction (the agent publishes a new
    birth). ``in_use()`` names the models microtasks are queued or running for: those are
    never evicted.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        cache: ModelCacheDir,
        store: ModelStore,
        budget_bytes: int,
        idle_timeout_s: float,
        stats: DeployStats,
        send_ack: Callable[[ModelAck], None],
        on_finished: Callable[[str, ErrorInfo | None], None],
        on_models_changed: Callable[[], None],
        in_use: Callable[[], set[str]],
        benchmark: bool = False,
        slowdown: float = 1.0,
    ) -> None:
        self.agent_id = agent_id
        self.cache = cache
        self.budget_bytes = budget_bytes
        self.idle_timeout_s = idle_timeout_s
        self.stats = stats
        self._store = store
        self._send_ack = send_ack
        self._on_finished = on_finished
        self._on_models_changed = on_models_changed
        self._in_use = in_use
        self._benchmark = benchmark
        self._slowdown = slowdown
        self._transfers: dict[str, _Transfer] = {}  # sha256 -> transfer in progress
        self._by_id: dict[str, _Transfer] = {}  # transfer id -> transfer in progress
        self._unknown_logged: set[str] = set()
        self._loop = asyncio.get_running_loop()
        self._disk = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"agent-{agent_id}-deploy"
        )
        self._closed = False

    # -- queries ----------------------------------------------------------------------------------
    def receiving(self, sha256: str, model_id: str | None = None) -> bool:
        """True while a transfer of this file (as ``model_id``, when given) is in progress:
        microtasks for it wait."""
        t = self._transfers.get(sha256)
        return t is not None and model_id in (None, t.offer.model.id)

    @property
    def reserved_bytes(self) -> int:
        """Disk promised to the transfers in progress."""
        return sum(t.size for t in self._transfers.values() if not t.from_cache)

    # -- messages -------------------------------------------------------------------------------
    def handle(self, msg: ModelOffer | ModelChunk | ModelAbort) -> None:
        if self._closed:
            return
        if isinstance(msg, ModelOffer):
            self._offer(msg)
        elif isinstance(msg, ModelChunk):
            self._chunk(msg)
        else:
            self._abort(msg)

    def _offer(self, offer: ModelOffer) -> None:
        self.stats.offers += 1
        info, tid = offer.model, offer.transfer_id
        sha = info.sha256
        if (problem := check_offer(offer)) is not None:
            self._refuse(offer, "bad_request", problem)
            return
        current = self._transfers.get(sha)
        if current is not None and (current.finishing or current.from_cache):
            # Its file is complete and being installed: a repeated offer (an ack lost on
            # the way) is answered when that ends.
            if tid not in current.ids:
                current.ids.append(tid)
                self._by_id[tid] = current
            return
        previous = self._by_id.get(tid)
        if previous is not None and previous is not current:
            # The same transfer id now names another file: the old one is over.
            self._drop(previous, "superseded by another offer with the same transfer id")
        if current is not None:
            # Restart from chunk 0 (the coordinator lost track); microtasks held for the
            # file stay held.
            logger.info("transfer %s of %s restarts as %s", current.ids[0], info.id, tid)
            self._drop(current, None)
        installed = self._store.find(info.id)
        if installed is not None and installed.info.sha256 == sha:
            self._send(tid, sha, "installed")
            self._on_finished(sha, None)
            return
        if self.cache.has_file(sha):
            t = self._register(offer, from_cache=True)
            self._submit(self._install_cached, t, then=lambda out: self._finished(t, out))
            return
        victims = self._make_room(info.size)
        if victims is None:
            in_use = self.reserved_bytes
            self._refuse(
                offer,
                "no_room",
                f"model {info.id} needs {info.size} bytes; the cache holds {self.cache.used_bytes} "
                f"of {self.budget_bytes} bytes, {in_use} more are promised to transfers in "
                "progress, and the models that could make room are in use",
            )
            return
        doomed = []
        for model_id in victims:
            logger.info("evicting model %s to make room for %s", model_id, info.id)
            self._store.remove(model_id)
            if (freed := self.cache.remove(model_id)) is not None:
                doomed.append(freed)
            self.stats.evictions += 1
        t = self._register(offer)
        self._submit(self._open, t, doomed, bool(victims), then=lambda out: self._opened(t, out))
        if victims:
            self._on_models_changed()

    def _chunk(self, msg: ModelChunk) -> None:
        t = self._by_id.get(msg.transfer_id)
        if t is None or t.from_cache:
            self.stats.chunks_ignored += 1
            tid = msg.transfer_id
            if tid not in self._unknown_logged and len(self._unknown_logged) < _LOGGED_UNKNOWN:
                self._unknown_logged.add(tid)
                logger.info("chunk %d of unknown transfer %s ignored", msg.index, tid)
            return
        data = msg.data.data
        self.stats.bytes_received += len(data)
        problem = None
        if msg.index >= t.offer.chunks or msg.data.dtype != "uint8":
            problem = f"chunk {msg.index} is not a uint8 chunk of 0..{t.offer.chunks - 1}"
        elif len(data) != t.chunk_length(msg.index):
            problem = f"chunk {msg.index} has {len(data)} bytes, not {t.chunk_length(msg.index)}"
        if problem is not None:
            # The sender does not follow its own offer: sending the chunk again cannot help.
            self._drop(t, None)
            for tid in t.ids:
                self._send(tid, t.sha256, "refused", code="bad_request", message=problem)
            self._count_refused("bad_request")
            self._on_finished(t.sha256, ErrorInfo(code="bad_request", message=problem))
            return
        t.last_seen = time.monotonic()
        index = msg.index
        if index == t.offer.chunks - 1:
            t.finishing += 1
        self._submit(
            self._write,
            t,
            index,
            msg.sha256,
            data,
            then=lambda out: self._written(t, index, out),
        )

    def _abort(self, msg: ModelAbort) -> None:
        t = self._by_id.get(msg.transfer_id)
        if t is None:
            return
        self.stats.aborted += 1
        logger.info("transfer %s of %s aborted: %s", msg.transfer_id, t.offer.model.id, msg.reason)
        self._drop(t, f"the transfer was aborted: {msg.reason}"[:500])

    # -- answers from the disk thread (on the loop) ---------------------------------------------
    def _opened(self, t: _Transfer, out: _Outcome) -> None:
        if out.kind == "refused":
            self._finished(t, out)
        elif not t.dropped:
            self._send_all(t, "receiving", next_chunk=0)

    def _written(self, t: _Transfer, index: int, out: _Outcome) -> None:
        if index == t.offer.chunks - 1:
            t.finishing -= 1
        if out.kind in ("installed", "refused"):
            self.stats.chunks += 1  # the last one, written before the file was checked
            self._finished(t, out)
            return
        if t.dropped:
            return
        if out.kind == "written":
            self.stats.chunks += 1
            self._send_all(t, "receiving", next_chunk=out.next_chunk)
        elif out.kind == "ahead":
            self.stats.chunks_out_of_order += 1
            self._send_all(t, "receiving", next_chunk=out.next_chunk)
        elif out.kind == "corrupt":
            self.stats.chunks_refused += 1
            logger.warning("chunk %d of transfer %s refused: sha256 mismatch", index, t.ids[0])
            self._send_all(
                t,
                "receiving",
                next_chunk=index,
                code="corrupt",
                message=f"chunk {index}: its data does not match its sha256",
            )
        elif out.kind == "duplicate":
            self.stats.chunks_duplicate += 1

    def _finished(self, t: _Transfer, out: _Outcome) -> None:
        """The transfer is over: installed or refused."""
        self._forget(t)
        if out.kind == "installed":
            self.stats.installed += 1
            self._send_all(t, "installed")
            self._on_finished(t.sha256, None)
            self._on_models_changed()
            return
        error = out.error or ErrorInfo(code="internal", message="transfer failed")
        if t.dropped:  # aborted meanwhile: its microtasks were answered then
            return
        self._count_refused(error.code)
        logger.warning("model %s refused: [%s] %s", t.offer.model.id, error.code, error.message)
        self._send_all(t, "refused", code=error.code, message=error.message)
        self._on_finished(t.sha256, error)

    # -- transfers ------------------------------------------------------------------------------
    def _register(self, offer: ModelOffer, *, from_cache: bool = False) -> _Transfer:
        t = _Transfer(
            offer=offer, ids=[offer.transfer_id], last_seen=time.monotonic(), from_cache=from_cache
        )
        self._transfers[t.sha256] = t
        self._by_id[offer.transfer_id] = t
        t.timer = self._loop.call_later(self.idle_timeout_s, self._check_idle, t)
        return t

    def _forget(self, t: _Transfer) -> None:
        if self._transfers.get(t.sha256) is t:
            del self._transfers[t.sha256]
        for tid in t.ids:
            if self._by_id.get(tid) is t:
                del self._by_id[tid]
        if t.timer is not None:
            t.timer.cancel()
            t.timer = None

    def _drop(self, t: _Transfer, reason: str | None) -> None:
        """Give a transfer up; with a ``reason``, answer the microtasks held for its file."""
        t.dropped = True
        self._forget(t)
        self._submit(self._discard, t, then=None)
        if reason is not None:
            self._on_finished(t.sha256, ErrorInfo(code="cancelled", message=reason))

    def _check_idle(self, t: _Transfer) -> None:
        t.timer = None
        if t.dropped or self._transfers.get(t.sha256) is not t:
            return
        idle = time.monotonic() - t.last_seen
        if t.finishing or t.from_cache or idle < self.idle_timeout_s:
            wait = self.idle_timeout_s - idle if idle < self.idle_timeout_s else self.idle_timeout_s
            t.timer = self._loop.call_later(wait, self._check_idle, t)
            return
        self.stats.timed_out += 1
        reason = f"no chunk for {self.idle_timeout_s:g} s: transfer dropped"
        logger.warning("transfer %s of %s: %s", t.ids[0], t.offer.model.id, reason)
        self._send_all(t, "refused", next_chunk=0, code="cancelled", message=reason)
        self._drop(t, reason)

    def _make_room(self, size: int) -> list[str] | None:
        """Model ids to evict, least recently used first, so that ``size`` bytes fit; None
        if they cannot be found among the deployed models no microtask needs."""
        if size > self.budget_bytes:
            return None
        free = self.budget_bytes - self.cache.used_bytes - self.reserved_bytes
        if free >= size:
            return []
        busy, receiving = self._in_use(), set(self._transfers)
        entries = self.cache.entries()
        refs: dict[str, int] = {}
        for e in entries:
            refs[e.sha256] = refs.get(e.sha256, 0) + 1

        def last_used(e: CacheEntry) -> float:
            m = self._store.find(e.id)
            return m.last_used if m is not None and m.deployed else e.last_used

        victims: list[str] = []
        for e in sorted(entries, key=last_used):
            if e.id in busy or e.sha256 in receiving:
                continue
            victims.append(e.id)
            refs[e.sha256] -= 1
            if refs[e.sha256] == 0:
                free += e.size
            if free >= size:
                return victims
        return None

    # -- the disk thread ------------------------------------------------------------------------
    def _open(self, t: _Transfer, doomed: list[str], rewrite_index: bool) -> _Outcome:
        for sha in doomed:
            self.cache.delete_file(sha)
        if rewrite_index:
            self.cache.write_index(self._last_used())
        if t.dropped:
            return _Outcome("ignored")
        path = self.cache.partial_path(t.sha256)
        t.partial = PartialFile(path, t.size, t.offer.chunk_size, t.offer.chunks)
        return _Outcome("written")

    def _write(self, t: _Transfer, index: int, sha256: str, data: bytes) -> _Outcome:
        partial = t.partial
        if t.dropped or partial is None:
            return _Outcome("ignored")
        verdict = partial.accept(index, sha256, data)
        if verdict != "written" or not partial.complete:
            return _Outcome(verdict, next_chunk=partial.next_chunk)
        t.partial = None
        problem = partial.finish(t.sha256)
        if problem is not None:
            return _refused("corrupt", f"model {t.offer.model.id} refused: {problem}")
        path = self.cache.path(t.sha256)
        try:
            os.replace(partial.path, path)
        except OSError:
            partial.discard()
            raise
        fsync_dir(self.cache.directory)
        return self._install(t, path)

    def _install_cached(self, t: _Transfer) -> _Outcome:
        return self._install(t, self.cache.path(t.sha256))

    def _install(self, t: _Transfer, path: Path) -> _Outcome:
        info = t.offer.model
        entry = CacheEntry(
            id=info.id,
            version=info.version,
            sha256=info.sha256,
            size=info.size,
            batch_axis=info.batch_axis,
            source=t.offer.source,
            licence=t.offer.licence,
            last_used=time.time(),
        )
        try:
            model = self._store.install(
                path, install_entry(entry), benchmark=self._benchmark, slowdown=self._slowdown
            )
        except ModelError as e:
            if not self.cache.has_file(info.sha256):
                with contextlib.suppress(OSError):
                    path.unlink()
            return _refused("bad_input", f"model {info.id} cannot be loaded: {e.message}")
        if (replaced := self.cache.add(entry)) is not None:
            self.cache.delete_file(replaced)
        self.cache.write_index(self._last_used())
        return _Outcome("installed", model=model)

    def _discard(self, t: _Transfer) -> _Outcome:
        if t.partial is not None:
            t.partial.discard()
            t.partial = None
        return _Outcome("ignored")

    def _last_used(self) -> dict[str, float]:
        return {m.info.id: m.last_used for m in self._store.models() if m.deployed}

    def _submit(
        self,
        fn: Callable[..., _Outcome],
        *args: Any,
        then: Callable[[_Outcome], None] | None,
    ) -> None:
        def run() -> _Outcome:
            try:
                return fn(*args)
            except Exception as e:  # disk full, permissions...: refuse, never crash the agent
                logger.exception("model transfer work failed")
                for a in args:
                    if isinstance(a, _Transfer) and a.partial is not None:
                        a.partial.discard()
                        a.partial = None
                return _refused("internal", f"{type(e).__name__}: {e}")

        future = self._disk.submit(run)
        if then is not None:
            future.add_done_callback(lambda f: self._from_disk(f, then))

    def _from_disk(
        self, future: concurrent.futures.Future[_Outcome], then: Callable[[_Outcome], None]
    ) -> None:
        """In the disk thread: hand the outcome over to the loop."""
        if future.cancelled():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed during shutdown
            self._loop.call_soon_threadsafe(self._deliver, then, future.result())

    def _deliver(self, then: Callable[[_Outcome], None], out: _Outcome) -> None:
        if not self._closed:
            then(out)

    # -- answers --------------------------------------------------------------------------------
    def _refuse(self, offer: ModelOffer, code: ErrorCode, message: str) -> None:
        self._count_refused(code)
        logger.warning(
            "model offer %s of %s refused: %s", offer.transfer_id, offer.model.id, message
        )
        self._send(offer.transfer_id, offer.model.sha256, "refused", code=code, message=message)
        if offer.model.sha256 not in self._transfers:
            self._on_finished(offer.model.sha256, ErrorInfo(code=code, message=message[:2000]))

    def _count_refused(self, code: str) -> None:
        self.stats.refused[code] = self.stats.refused.get(code, 0) + 1

    def _send_all(
        self,
        t: _Transfer,
        state: Literal["receiving", "installed", "refused"],
        *,
        next_chunk: int = 0,
        code: ErrorCode | None = None,
        message: str = "",
    ) -> None:
        for tid in t.ids:
            self._send(tid, t.sha256, state, next_chunk=next_chunk, code=code, message=message)

    def _send(
        self,
        transfer_id: str,
        sha256: str,
        state: Literal["receiving", "installed", "refused"],
        *,
        next_chunk: int = 0,
        code: ErrorCode | None = None,
        message: str = "",
    ) -> None:
        ack = make_ack(
            self.agent_id,
            transfer_id,
            sha256,
            state,
            next_chunk=next_chunk,
            code=code,
            message=message,
        )
        self._send_ack(ack)

    # -- shutdown -------------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop receiving; drop unfinished transfers; record last-use times; unlock."""
        if self._closed:
            return
        self._closed = True
        transfers = list({id(t): t for t in self._by_id.values()}.values())
        for t in transfers:
            t.dropped = True
            self._forget(t)

        def final() -> _Outcome:
            for t in transfers:
                self._discard(t)
            with contextlib.suppress(OSError):
                self.cache.write_index(self._last_used())
            return _Outcome("ignored")

        self._disk.submit(final)
        await asyncio.to_thread(self._disk.shutdown, wait=True)
        self.cache.close()


def _refused(code: ErrorCode, message: str) -> _Outcome:
    return _Outcome("refused", error=ErrorInfo(code=code, message=message[:2000]))
