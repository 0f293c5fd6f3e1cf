"""Network faults for chaos tests: a per-agent network namespace and a userspace delay line.

``NetNamespace`` puts one process on its own little network: a fresh network namespace joined
to this host by a veth pair (host side ``10.200.S.(4k+1)/30``, namespace side ``.2``). A process
started with ``ns.prefix() + argv`` can reach the host only through that veth, so iptables rules
on the host-side veth act on that process alone:

* ``cut()`` / ``heal()``: DROP every IPv4 packet in both directions. Sockets stay open in both
  processes; packets simply vanish until ``heal()`` (TCP then retransmits on its own backoff).
* ``lossy(p)`` / ``clear_loss()``: DROP each packet with probability ``p``, in each direction.

The kernel here has no ``sch_netem``, so delay is emulated by ``DelayRelay``, a TCP relay that
holds every chunk for ``delay_s`` in each direction, preserving order, and optionally limits
each direction's bandwidth (``rate_bytes_per_s``; needs no namespace, e.g. on loopback for
``bench/deploy.py``). Topology for one slow, lossy agent::

    agent (in ns) --veth: cut()/lossy()--> relay on ns.host_ip --lo--> broker on 127.0.0.1:P
        connects to mqtt://{ns.host_ip}:{relay.port}

Everything is stdlib; the namespace helpers need root (CAP_NET_ADMIN + CAP_SYS_ADMIN), ``ip``
(iproute2) and ``iptables`` (any backend with the ``comment`` and ``statistic`` matches).
``netns_available()`` says whether this machine can do it, and why not.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import ipaddress
import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Self

__all__ = [
    "DelayRelay",
    "NetFaultError",
    "NetNamespace",
    "RelayThread",
    "netns_available",
]

log = logging.getLogger(__name__)

TAG_PREFIX = "edge-offload-"
DEFAULT_POOL = "10.200.0.0/16"
_CMD_TIMEOUT_S = 30.0
_SBIN = "/usr/sbin:/sbin:/usr/local/sbin"


class NetFaultError(RuntimeError):
    """A namespace, veth or iptables operation failed."""


@functools.cache
def _tool(name: str) -> str:
    """Absolute path of a system tool; root's sbin directories are searched even if not on PATH."""
    path = shutil.which(name) or shutil.which(name, path=_SBIN)
    if path is None:
        raise NetFaultError(f"{name} not found (apt-get install iproute2 iptables)")
    return path


def _run(argv: Sequence[str], *, stdin: str | None = None) -> str:
    cmd = [_tool(argv[0]), *argv[1:]]
    try:
        proc = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, timeout=_CMD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise NetFaultError(f"{shlex.join(argv)}: {e}") from e
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise NetFaultError(f"{shlex.join(argv)} failed ({proc.returncode}): {detail}")
    return proc.stdout


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    """Serialise subnet choice between concurrent test processes on this host."""
    path = os.path.join(tempfile.gettempdir(), "edge-offload-netns.lock")
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _used_networks() -> list[ipaddress.IPv4Network]:
    """IPv4 networks of this host's addresses and main-table routes (the default route aside)."""
    nets: list[ipaddress.IPv4Network] = []
    for line in _run(["ip", "-4", "-o", "addr", "show"]).splitlines():
        words = line.split()
        if "inet" in words:
            nets.append(ipaddress.IPv4Interface(words[words.index("inet") + 1]).network)
    for line in _run(["ip", "-4", "route", "show"]).splitlines():
        first = line.split(maxsplit=1)[0] if line.strip() else "default"
        if first != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(first, strict=False))
    return nets


def _iptables_apply(lines: Sequence[str]) -> None:
    """Apply ``-I``/``-D`` lines to the filter table atomically (one iptables-restore commit)."""
    if lines:
        _run(
            ["iptables-restore", "-w", "--noflush"],
            stdin="\n".join(["*filter", *lines, "COMMIT", ""]),
        )


def _tagged_rules(tag: str) -> list[str]:
    """``-A ...`` lines of the filter table whose comment is exactly ``tag``."""
    found = []
    for line in _run(["iptables-save", "-t", "filter"]).splitlines():
        if not line.startswith("-A "):
            continue
        words = shlex.split(line)
        comments = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--comment"]
        if tag in comments:
            found.append(line)
    return found


class NetNamespace:
    """A network namespace joined to the host by a veth pair, with fault switches.

    ``with NetNamespace() as ns:`` creates it; leaving the block (also on error) removes the
    iptables rules tagged ``edge-offload-<name>``, the veth pair and the namespace. Processes
    still running inside are not killed: stop what you started before the block ends (a
    process left inside keeps an anonymous namespace alive, detached from the host).

    Methods run short ``ip``/``iptables`` commands synchronously (a few ms each).
    """

    def __init__(self, *, pool: str = DEFAULT_POOL, attempts: int = 32) -> None:
        self._pool = ipaddress.IPv4Network(pool)
        if self._pool.prefixlen > 30:
            raise ValueError(f"pool {pool} is smaller than a /30")
        self._attempts = attempts
        self._name = ""
        self._subnet: ipaddress.IPv4Network | None = None
        self._cut_rules: list[tuple[str, str]] = []
        self._loss_rules: list[tuple[str, str]] = []
        self._loss = 0.0
        self._created = False

    # -- identity -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Namespace name, e.g. ``eo1a2b3c4d`` (``ip netns list``)."""
        self._require()
        return self._name

    @property
    def host_if(self) -> str:
        """Host-side veth interface (≤ 15 characters)."""
        return self.name + "h"

    @property
    def ns_if(self) -> str:
        """Namespace-side veth interface."""
        return self.name + "n"

    @property
    def tag(self) -> str:
        """The iptables comment on every rule this namespace adds."""
        return TAG_PREFIX + self.name

    @property
    def host_ip(self) -> str:
        """The host's address on the veth: what a process inside the namespace connects to."""
        self._require()
        assert self._subnet is not None
        return str(self._subnet.network_address + 1)

    @property
    def ns_ip(self) -> str:
        """The namespace's address on the veth."""
        self._require()
        assert self._subnet is not None
        return str(self._subnet.network_address + 2)

    def prefix(self) -> list[str]:
        """Argv prefix that runs a command inside the namespace: ``[ip, netns, exec, name]``."""
        return [_tool("ip"), "netns", "exec", self.name]

    def pids(self) -> list[int]:
        """Processes currently running inside the namespace."""
        return [int(p) for p in _run(["ip", "netns", "pids", self.name]).split()]

    @property
    def is_cut(self) -> bool:
        return bool(self._cut_rules)

    @property
    def loss(self) -> float:
        """Current per-direction drop probability from ``lossy()`` (0.0 when none)."""
        return self._loss

    # -- lifecycle ------------------------------------------------------------------------------

    def create(self) -> None:
        if self._created:
            raise NetFaultError("namespace already created")
        if os.geteuid() != 0:
            raise NetFaultError("network namespaces need root")
        last: Exception | None = None
        with _allocation_lock():
            used = [n for n in _used_networks() if n.prefixlen >= self._pool.prefixlen]
            for _ in range(self._attempts):
                subnet = self._random_subnet()
                if any(subnet.overlaps(n) for n in used):
                    continue
                name = "eo" + secrets.token_hex(4)
                try:
                    _run(["ip", "netns", "add", name])
                except NetFaultError as e:  # name taken (vanishingly unlikely): try another
                    last = e
                    continue
                self._name, self._subnet, self._created = name, subnet, True
                try:
                    self._wire()
                except BaseException:
                    self._teardown()
                    raise
                log.debug("netns %s: host %s <-> ns %s", name, self.host_ip, self.ns_ip)
                return
        raise NetFaultError(f"no free /30 or namespace name after {self._attempts} tries: {last}")

    def _random_subnet(self) -> ipaddress.IPv4Network:
        count = 1 << (30 - self._pool.prefixlen)
        base = int(self._pool.network_address) + 4 * secrets.randbelow(count)
        return ipaddress.IPv4Network((base, 30))

    def _wire(self) -> None:
        assert self._subnet is not None
        n = self._name
        _run(f"ip link add {self.host_if} type veth peer name {self.ns_if} netns {n}".split())
        _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
        _run(["ip", "link", "set", self.host_if, "up"])
        _run(["ip", "-n", n, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if])
        _run(["ip", "-n", n, "link", "set", "lo", "up"])
        _run(["ip", "-n", n, "link", "set", self.ns_if, "up"])

    def close(self) -> None:
        """Remove this namespace's iptables rules, veth pair and namespace (idempotent)."""
        if self._created:
            self._teardown()

    def _teardown(self) -> None:
        errors: list[str] = []
        self._cut_rules, self._loss_rules, self._loss = [], [], 0.0
        try:  # every rule with our tag, also ones whose bookkeeping was lost
            _iptables_apply(["-D" + line[2:] for line in _tagged_rules(self.tag)])
        except NetFaultError as e:
            errors.append(str(e))
        # Deleting the host end removes the pair at once; namespace destruction is asynchronous.
        if self._link_exists():
            try:
                _run(["ip", "link", "del", self.host_if])
            except NetFaultError as e:
                errors.append(str(e))
        if self._name in self._netns_names():
            try:
                _run(["ip", "netns", "del", self._name])
            except NetFaultError as e:
                errors.append(str(e))
        self._created = False
        if errors:
            raise NetFaultError(f"teardown of netns {self._name} incomplete: " + "; ".join(errors))

    def _link_exists(self) -> bool:
        try:
            _run(["ip", "link", "show", "dev", self.host_if])
        except NetFaultError:
            return False
        return True

    @staticmethod
    def _netns_names() -> set[str]:
        return {line.split()[0] for line in _run(["ip", "netns", "list"]).splitlines() if line}

    def _require(self) -> None:
        if not self._created:
            raise NetFaultError("namespace not created (use `with NetNamespace() as ns:`)")

    def __enter__(self) -> Self:
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults ---------------------------------------------------------------------------------

    def _rules(self, match: str) -> list[tuple[str, str]]:
        """(chain, rule) pairs that DROP packets on the host-side veth, both directions."""
        c = f"-m comment --comment {self.tag} -j DROP"
        h = self.host_if
        return [
            ("INPUT", f"-i {h} {match}{c}"),
            ("OUTPUT", f"-o {h} {match}{c}"),
            ("FORWARD", f"-i {h} {match}{c}"),
            ("FORWARD", f"-o {h} {match}{c}"),
        ]

    @staticmethod
    def _insert(rules: list[tuple[str, str]]) -> None:
        # At the top of each chain, so that an earlier "ESTABLISHED -j ACCEPT" rule of the
        # host's own firewall cannot let established connections through.
        _iptables_apply([f"-I {chain} 1 {rule}" for chain, rule in rules])

    @staticmethod
    def _delete(rules: list[tuple[str, str]]) -> None:
        _iptables_apply([f"-D {chain} {rule}" for chain, rule in rules])

    def cut(self) -> None:
        """Drop every packet to and from the namespace (both directions, atomically)."""
        self._require()
        if not self._cut_rules:
            rules = self._rules("")
            self._insert(rules)
            self._cut_rules = rules

    def heal(self) -> None:
        """Undo ``cut()``; loss set by ``lossy()`` stays."""
        self._require()
        if self._cut_rules:
            self._delete(self._cut_rules)
            self._cut_rules = []

    def lossy(self, probability: float) -> None:
        """Drop each packet with ``probability``, independently in each direction.

        Replaces an earlier ``lossy()`` setting. A round trip survives with ``(1 - p) ** 2``.
        """
        self._require()
        if not 0.0 < probability <= 1.0:
            raise ValueError(f"probability must be in (0, 1], not {probability}")
        self.clear_loss()
        rules = self._rules(f"-m statistic --mode random --probability {probability:.6f} ")
        self._insert(rules)
        self._loss_rules, self._loss = rules, probability

    def clear_loss(self) -> None:
        """Undo ``lossy()``; a ``cut()`` stays."""
        self._require()
        if self._loss_rules:
            self._delete(self._loss_rules)
            self._loss_rules, self._loss = [], 0.0


@functools.cache
def netns_available() -> str | None:
    """None when namespaces, veth pairs and tagged iptables rules work here; else why not.

    Really creates (and removes) a namespace, a cut and a loss rule; cached per process.
    """
    if sys.platform != "linux":
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    for tool in ("ip", "iptables", "iptables-save", "iptables-restore"):
        try:
            _tool(tool)
        except NetFaultError as e:
            return str(e)
    try:
        with NetNamespace() as ns:
            inside = _run(["ip", "netns", "exec", ns.name, _tool("ip"), "-4", "-o", "addr"])
            if ns.ns_ip not in inside:
                return f"`ip netns exec` does not see the namespace's address: {inside!r}"
            ns.cut()
            ns.lossy(0.05)
            ns.clear_loss()
            ns.heal()
    except (NetFaultError, OSError) as e:
        return f"cannot set up a network namespace with iptables rules here: {e}"
    return None


# -- delay line ---------------------------------------------------------------------------------

_CHUNK = 64 * 1024
_Item = tuple[float, bytes]  # (due time on the loop clock, data; b"" = EOF)


class DelayRelay:
    """TCP relay that delays every chunk by ``delay_s`` in each direction, keeping order.

    Each accepted connection is forwarded to ``(target_host, target_port)``. Per direction a
    reader timestamps each chunk when it arrives and queues it; a writer sleeps until the
    chunk is due, writes it and drains. The queue holds at most ``max_chunks`` chunks (of up to
    64 KiB), so a slow receiver stops the reader and TCP flow control pushes back on the sender.
    An EOF travels the same delay line; when it is delivered, or when either side errors, both
    connections are closed (a reset is mirrored at once, with ``abort()``).

    Round trip through the relay = ``delay_s + return_delay_s`` on top of the real path. To mimic
    ``netem delay 200ms`` on one link (one-way), use ``delay_s=0.1`` (symmetric) or
    ``delay_s=0.2, return_delay_s=0``. The TCP handshake with the relay itself is not delayed.

    ``rate_bytes_per_s`` (and ``return_rate_bytes_per_s``, the same by default) makes each
    direction a link of that bandwidth, like ``netem rate``: a chunk is delivered once the
    link has clocked it out, ``len / rate`` after the link was free (and the chunk due), so
    chunks queue behind each other and a transfer of N bytes takes at least ``N / rate``.
    Unset (None), the link is as fast as the host.

    Faults on demand (call them from the relay's event loop): ``hold()`` keeps what clients
    write towards the target (it is read and queued here, the target's side still flows)
    until ``release()``; ``cut()`` aborts every relayed connection, dropping what is held,
    as a link that dies with data in flight does, and with ``refuse=True`` turns new
    connections away until ``restore()``.
    """

    def __init__(
        self,
        *,
        listen_host: str,
        target_host: str,
        target_port: int,
        delay_s: float,
        listen_port: int = 0,
        return_delay_s: float | None = None,
        max_chunks: int = 64,
        connect_timeout_s: float = 5.0,
        rate_bytes_per_s: float | None = None,
        return_rate_bytes_per_s: float | None = None,
    ) -> None:
        if delay_s < 0 or (return_delay_s is not None and return_delay_s < 0):
            raise ValueError("delays must be >= 0")
        for rate in (rate_bytes_per_s, return_rate_bytes_per_s):
            if rate is not None and not rate > 0:
                raise ValueError("rates must be > 0 (None: unlimited)")
        self.listen_host = listen_host
        self.target_host = target_host
        self.target_port = target_port
        self.delay_s = delay_s
        self.return_delay_s = delay_s if return_delay_s is None else return_delay_s
        self.rate_bytes_per_s = rate_bytes_per_s
        self.return_rate_bytes_per_s = (
            rate_bytes_per_s if return_rate_bytes_per_s is None else return_rate_bytes_per_s
        )
        self._listen_port = listen_port
        self._max_chunks = max_chunks
        self._connect_timeout_s = connect_timeout_s
        self._server: asyncio.Server | None = None
        self._port = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False
        self.accepted = 0
        # Client -> target delivery of the current connections waits on this (hold()).
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The port the relay listens (or listened) on: the ephemeral one if ``listen_port=0``."""
        if not self._port:
            raise RuntimeError("relay not started")
        return self._port

    @property
    def connections(self) -> int:
        """Connections currently being relayed."""
        return len(self._handlers)

    def hold(self) -> None:
        """Keep what clients write towards the target from now on (see the class)."""
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def cut(self, *, refuse: bool = False) -> None:
        """Abort every relayed connection now, dropping what is held; ``refuse``: and turn
        new connections away until :meth:`restore`. New connections are not held."""
        self._refusing = refuse
        self._flowing = asyncio.Event()  # the cut connections' deliveries wait on the old one
        self._flowing.set()
        for w in self._open:
            w.transport.abort()
        for task in self._handlers:
            task.cancel()

    def restore(self) -> None:
        self._refusing = False

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("relay already started")
        self._closing = False
        self._server = await asyncio.start_server(self._handle, self.listen_host, self._listen_port)
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.debug(
            "relay %s:%d -> %s:%d delay %.3f/%.3f s, rate %s/%s B/s",
            self.listen_host,
            self._port,
            self.target_host,
            self.target_port,
            self.delay_s,
            self.return_delay_s,
            self.rate_bytes_per_s,
            self.return_rate_bytes_per_s,
        )

    async def close(self) -> None:
        """Stop listening and abort every relayed connection."""
        server, self._server = self._server, None
        if server is None:
            return
        self._closing = True
        server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @classmethod
    def start_in_thread(
        cls,
        *,
        listen_host: str,
        target_host: str,
        target_port: int,
        delay_s: float,
        listen_port: int = 0,
        return_delay_s: float | None = None,
        max_chunks: int = 64,
        connect_timeout_s: float = 5.0,
        rate_bytes_per_s: float | None = None,
        return_rate_bytes_per_s: float | None = None,
    ) -> RelayThread:
        """Run a relay on its own event loop in a daemon thread, for synchronous callers."""
        relay = cls(
            listen_host=listen_host,
            target_host=target_host,
            target_port=target_port,
            delay_s=delay_s,
            listen_port=listen_port,
            return_delay_s=return_delay_s,
            max_chunks=max_chunks,
            connect_timeout_s=connect_timeout_s,
            rate_bytes_per_s=rate_bytes_per_s,
            return_rate_bytes_per_s=return_rate_bytes_per_s,
        )
        return RelayThread(relay)

    # -- per connection -------------------------------------------------------------------------

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # asyncio.start_server's own task for this callback must not end cancelled (Python 3.11
        # logs an error then), so the relaying runs in a task of ours that close() may cancel.
        if self._closing or self._refusing:
            client_w.transport.abort()
            return
        self.accepted += 1
        task = asyncio.create_task(self._relay(client_r, client_w))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        await asyncio.wait([task])
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("relay connection failed: %r", exc)

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        graceful = False
        upstream_w: asyncio.StreamWriter | None = None
        flowing = self._flowing
        self._open.add(client_w)
        try:
            try:
                async with asyncio.timeout(self._connect_timeout_s):
                    upstream_r, upstream_w = await asyncio.open_connection(
                        self.target_host, self.target_port
                    )
            except (OSError, TimeoutError) as e:
                log.debug("relay: cannot reach %s:%d: %r", self.target_host, self.target_port, e)
                return
            self._open.add(upstream_w)
            if flowing is not self._flowing:  # cut while connecting
                return
            graceful = await self._splice(client_r, client_w, upstream_r, upstream_w, flowing)
        finally:
            streams = [w for w in (client_w, upstream_w) if w is not None]
            self._open.difference_update(streams)
            if not graceful:  # mirror a failure (or our own close()) at once, like a reset
                for w in streams:
                    w.transport.abort()
            for w in streams:
                await _close_writer(w, graceful)

    async def _splice(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        upstream_r: asyncio.StreamReader,
        upstream_w: asyncio.StreamWriter,
        flowing: asyncio.Event,
    ) -> bool:
        """Relay both ways until an EOF is delivered (True) or something fails (False);
        towards the target only while ``flowing`` is set."""
        up: asyncio.Queue[_Item] = asyncio.Queue(self._max_chunks)
        down: asyncio.Queue[_Item] = asyncio.Queue(self._max_chunks)
        writers = {
            asyncio.create_task(_deliver(up, upstream_w, self.rate_bytes_per_s, flowing)),
            asyncio.create_task(_deliver(down, client_w, self.return_rate_bytes_per_s)),
        }
        readers = {
            asyncio.create_task(_timestamp(client_r, up, self.delay_s)),
            asyncio.create_task(_timestamp(upstream_r, down, self.return_delay_s)),
        }
        pending = writers | readers
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = [t for t in done if t.cancelled() or t.exception() is not None]
                for t in failed:
                    if not t.cancelled():
                        log.debug("relay connection ends: %r", t.exception())
                if failed:
                    return False
                if done & writers:
                    return True
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def _timestamp(src: asyncio.StreamReader, queue: asyncio.Queue[_Item], delay: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        data = await src.read(_CHUNK)
        await queue.put((loop.time() + delay, data))
        if not data:
            return


async def _deliver(
    queue: asyncio.Queue[_Item],
    dst: asyncio.StreamWriter,
    rate: float | None = None,
    flowing: asyncio.Event | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    free_at = 0.0  # when the emulated link has clocked out everything delivered so far
    while True:
        due, data = await queue.get()
        if rate is not None and data:
            # A link of finite rate: the chunk goes onto it once it is due and the link is
            # free, and arrives when its last byte is through. Pacing here, after the queue,
            # lets the bounded queue push back on the sender as a full link buffer would.
            # Sleep overshoot is not added to free_at, so it does not lower the rate; the
            # price is a catch-up burst after a receiver held the writer back in drain().
            due = max(due, free_at) + len(data) / rate
            free_at = due
        wait = due - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        if flowing is not None:
            await flowing.wait()  # held: the chunk stays here
        if not data:
            return
        dst.write(data)
        await dst.drain()


async def _close_writer(w: asyncio.StreamWriter, graceful: bool) -> None:
    """Close a stream: flush for up to 1 s when ``graceful``; abort if that fails or stalls."""
    if graceful and not w.is_closing():
        w.close()
        try:
            async with asyncio.timeout(1.0):
                await w.wait_closed()
            return
        except (OSError, TimeoutError):
            pass
        except asyncio.CancelledError:
            w.transport.abort()
            raise
    w.transport.abort()
    with contextlib.suppress(OSError):
        await w.wait_closed()


class RelayThread:
    """A ``DelayRelay`` running on its own event loop in a background thread.

    Created by ``DelayRelay.start_in_thread``; the constructor returns once the relay listens
    (or raises what ``start()`` raised). ``stop()`` closes the relay and joins the thread.
    """

    def __init__(self, relay: DelayRelay, *, start_timeout_s: float = 10.0) -> None:
        self.relay = relay
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="delay-relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout_s):
            raise NetFaultError("relay thread did not start")
        if self._error is not None:
            self._thread.join()
            raise self._error

    @property
    def port(self) -> int:
        return self.relay.port

    @property
    def connections(self) -> int:
        return self.relay.connections

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            await self.relay.start()
        except BaseException as e:
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.relay.close()

    def stop(self, timeout: float = 10.0) -> None:
        """Close the relay (aborting its connections) and wait for the thread to end."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise NetFaultError("relay thread did not stop")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
