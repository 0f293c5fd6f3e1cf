"""bench/netfault.py: the delay relay (anywhere) and real network namespaces (root only).

The namespace tests skip locally when ``netns_available()`` gives a reason, and fail under CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import cast

import pytest

from bench.netfault import DelayRelay, NetNamespace, netns_available


def require_netns() -> None:
    """Skip when namespaces are unusable locally; fail under CI, where they must work."""
    reason = netns_available()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(
            f"network namespaces are required under CI (root, iproute2, iptables): {reason}"
        )
    pytest.skip(reason)


# -- helpers --------------------------------------------------------------------------------------


async def _shut(w: asyncio.StreamWriter) -> None:
    w.close()
    try:
        async with asyncio.timeout(1):
            await w.wait_closed()
    except (OSError, TimeoutError):
        w.transport.abort()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A TCP echo server on 127.0.0.1 (this test's event loop)."""
    tasks: set[asyncio.Task[None]] = set()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            tasks.discard(task)
            await _shut(w)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    pending = list(tasks)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await server.wait_closed()


@pytest.fixture
def ns() -> Iterator[NetNamespace]:
    require_netns()
    with NetNamespace() as n:
        yield n


# A line-driven TCP client run inside the namespace. Commands on stdin, one reply line each:
# "<ok|timeout|error> <elapsed s> [data]".
CLIENT = r"""
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
sock, buf = None, b""
for line in sys.stdin:
    cmd, *args = line.split()
    t0 = time.monotonic()
    data = ""
    try:
        if cmd == "connect":
            sock = socket.create_connection((host, port), timeout=float(args[0]))
        elif cmd == "send":
            sock.sendall(args[0].encode())
        elif cmd == "recv":
            n, deadline = int(args[0]), t0 + float(args[1])
            while len(buf) < n:
                if deadline <= time.monotonic():
                    raise TimeoutError
                sock.settimeout(deadline - time.monotonic())
                chunk = sock.recv(65536)
                if not chunk:
                    raise EOFError
                buf += chunk
            data, buf = buf[:n].decode(), buf[n:]
        status = "ok"
    except TimeoutError:
        status = "timeout"
    except (OSError, EOFError) as e:
        status = "error-" + type(e).__name__
    print(status, f"{time.monotonic() - t0:.4f}", data, flush=True)
if sock is not None:
    sock.close()
"""


class NsClient:
    """The CLIENT script in a namespace, driven one command at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, ns: NetNamespace, port: int) -> NsClient:
        proc = await asyncio.create_subprocess_exec(
            *ns.prefix(),
            sys.executable,
            "-c",
            CLIENT,
            ns.host_ip,
            str(port),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        return cls(proc)

    async def do(self, command: str) -> tuple[str, float, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(20):
            line = (await self.proc.stdout.readline()).decode()
        status, elapsed, *data = line.split()
        return status, float(elapsed), data[0] if data else ""

    async def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await self.proc.communicate()
        except TimeoutError:
            self.proc.kill()
            await self.proc.communicate()


async def run_client(ns: NetNamespace, port: int, *commands: str) -> list[tuple[str, float, str]]:
    client = await NsClient.start(ns, port)
    try:
        return [await client.do(c) for c in commands]
    finally:
        await client.close()


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return {line.split(":")[1].strip().split("@")[0] for line in out.stdout.splitlines()}


def _iptables() -> str:
    return subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout


# -- relay on loopback (no privileges needed) ---------------------------------------------------


async def test_relay_delays_each_direction_and_keeps_order(echo_port: int) -> None:
    async with DelayRelay(
        listen_host="127.0.0.1",
        target_host="127.0.0.1",
        target_port=echo_port,
        delay_s=0.1,
        return_delay_s=0.05,
    ) as relay:
        r, w = await asyncio.open_connection("127.0.0.1", relay.port)
        try:
            t0 = time.monotonic()
            w.write(b"ping")
            assert await r.readexactly(4) == b"ping"
            rtt = time.monotonic() - t0
            assert 0.15 <= rtt < 0.4, rtt
            sent = b"".join(b"%04d" % i for i in range(200))
            for i in range(0, len(sent), 4):  # 200 separate writes, spread over ~20 ms
                w.write(sent[i : i + 4])
                await w.drain()
                if i % 40 == 0:
                    await asyncio.sleep(0.002)
            assert await r.readexactly(len(sent)) == sent
            assert relay.connections == 1
        finally:
            await _shut(w)


async def test_relay_large_transfer_with_backpressure(echo_port: int) -> None:
    payload = os.urandom(4 * 1024 * 1024)
    async with DelayRelay(
        listen_host="127.0.0.1",
        target_host="127.0.0.1",
        target_port=echo_port,
        delay_s=0.01,
        max_chunks=4,
    ) as relay:
        r, w = await asyncio.open_connection("127.0.0.1", relay.port)
        try:

            async def send() -> None:
                for i in range(0, len(payload), 100_000):
                    w.write(payload[i : i + 100_000])
                    await w.drain()

            sender = asyncio.create_task(send())
            echoed = await r.readexactly(len(payload))
            await sender
            assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        finally:
            await _shut(w)


async def test_relay_rate_limits_the_upstream_direction() -> None:
    """A transfer through a relay of rate R takes at least size / R, and arrives intact."""
    rate, size = 1_000_000.0, 500_000
    payload = os.urandom(size)
    got: asyncio.Future[tuple[float, bytes]] = asyncio.get_running_loop().create_future()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # until EOF
        got.set_result((time.monotonic(), data))
        await _shut(w)

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        async with DelayRelay(
            listen_host="127.0.0.1",
            target_host="127.0.0.1",
            target_port=port,
            delay_s=0.0,
            rate_bytes_per_s=rate,
        ) as relay:
            _, w = await asyncio.open_connection("127.0.0.1", relay.port)
            t0 = time.monotonic()
            w.write(payload)
            await _shut(w)
            async with asyncio.timeout(20):
                arrived, data = await got
    finally:
        server.close()
        await server.wait_closed()
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload).digest()
    assert arrived - t0 >= size / rate, arrived - t0


async def test_relay_return_rate_is_its_own(echo_port: int) -> None:
    """Each direction is paced at its own rate: an echo is held to the slower return link."""
    up, back, size = 4_000_000.0, 500_000.0, 300_000
    payload = os.urandom(size)
    with pytest.raises(ValueError, match="rates must be > 0"):
        DelayRelay(
            listen_host="127.0.0.1",
            target_host="127.0.0.1",
            target_port=echo_port,
            delay_s=0.0,
            rate_bytes_per_s=0.0,
        )
    async with DelayRelay(
        listen_host="127.0.0.1",
        target_host="127.0.0.1",
        target_port=echo_port,
        delay_s=0.0,
        rate_bytes_per_s=up,
        return_rate_bytes_per_s=back,
    ) as relay:
        assert (relay.rate_bytes_per_s, relay.return_rate_bytes_per_s) == (up, back)
        r, w = await asyncio.open_connection("127.0.0.1", relay.port)
        try:
            t0 = time.monotonic()
            w.write(payload)
            async with asyncio.timeout(20):
                echoed = await r.readexactly(size)
            took = time.monotonic() - t0
        finally:
            await _shut(w)
    assert echoed == payload
    assert took >= size / back, took


async def test_relay_closes_client_after_upstream_closes() -> None:
    async def say_bye(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"bye")
        await _shut(w)

    server = await asyncio.start_server(say_bye, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        async with DelayRelay(
            listen_host="127.0.0.1", target_host="127.0.0.1", target_port=port, delay_s=0.1
        ) as relay:
            t0 = time.monotonic()
            r, w = await asyncio.open_connection("127.0.0.1", relay.port)
            try:
                assert await r.read() == b"bye"  # data, then EOF, both after the delay
                assert time.monotonic() - t0 >= 0.1
                for _ in range(100):
                    if relay.connections == 0:
                        break
                    await asyncio.sleep(0.01)
                assert relay.connections == 0
            finally:
                await _shut(w)
    finally:
        server.close()
        await server.wait_closed()


async def test_relay_closes_upstream_after_client_closes() -> None:
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()  # until EOF
        got.set_result(data)
        await _shut(w)

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    try:
        async with DelayRelay(
            listen_host="127.0.0.1", target_host="127.0.0.1", target_port=port, delay_s=0.05
        ) as relay:
            _, w = await asyncio.open_connection("127.0.0.1", relay.port)
            w.write(b"last words")
            await _shut(w)
            async with asyncio.timeout(5):
                assert await got == b"last words"
    finally:
        server.close()
        await server.wait_closed()


async def test_relay_unreachable_target_closes_client() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with DelayRelay(
        listen_host="127.0.0.1", target_host="127.0.0.1", target_port=dead_port, delay_s=0.1
    ) as relay:
        r, w = await asyncio.open_connection("127.0.0.1", relay.port)
        try:
            async with asyncio.timeout(5):
                with contextlib.suppress(ConnectionResetError):
                    assert await r.read() == b""
        finally:
            await _shut(w)


async def test_relay_close_aborts_live_connections(echo_port: int) -> None:
    relay = DelayRelay(
        listen_host="127.0.0.1", target_host="127.0.0.1", target_port=echo_port, delay_s=0.01
    )
    await relay.start()
    port = relay.port
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(b"x")
        assert await r.readexactly(1) == b"x"
        await relay.close()
        assert relay.connections == 0
        async with asyncio.timeout(5):
            with contextlib.suppress(ConnectionResetError):
                assert await r.read() == b""
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
    finally:
        await relay.close()
        await _shut(w)


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


def test_relay_in_a_thread_for_synchronous_callers() -> None:
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler) as server:
        serving = threading.Thread(target=server.serve_forever, daemon=True)
        serving.start()
        try:
            with (
                DelayRelay.start_in_thread(
                    listen_host="127.0.0.1",
                    target_host="127.0.0.1",
                    target_port=server.server_address[1],
                    delay_s=0.1,
                ) as relay,
                socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s,
            ):
                t0 = time.monotonic()
                s.sendall(b"hello")
                assert s.recv(5) == b"hello"
                rtt = time.monotonic() - t0
                assert 0.2 <= rtt < 0.5, rtt
                assert relay.connections == 1
            assert not any(t.name == "delay-relay" for t in threading.enumerate())
        finally:
            server.shutdown()
            serving.join(5)


# -- real namespaces (root) -----------------------------------------------------------------


async def test_relay_delay_seen_from_inside_namespace(ns: NetNamespace, echo_port: int) -> None:
    async with DelayRelay(
        listen_host=ns.host_ip, target_host="127.0.0.1", target_port=echo_port, delay_s=0.2
    ) as relay:
        replies = await run_client(
            ns, relay.port, "connect 2", "send hello", "recv 5 3", "send again", "recv 5 3"
        )
    assert [r[0] for r in replies] == ["ok"] * 5, replies
    assert replies[2][2] == "hello" and replies[4][2] == "again"
    for status, rtt, _ in (replies[2], replies[4]):
        assert 0.4 <= rtt < 0.8, (status, rtt)


async def test_cut_drops_everything_and_heal_restores(ns: NetNamespace, echo_port: int) -> None:
    with DelayRelay.start_in_thread(
        listen_host=ns.host_ip, target_host="127.0.0.1", target_port=echo_port, delay_s=0.0
    ) as relay:
        client = await NsClient.start(ns, relay.port)
        try:
            assert (await client.do("connect 2"))[0] == "ok"
            assert (await client.do("send a1"))[0] == "ok"
            assert (await client.do("recv 2 2"))[::2] == ("ok", "a1")

            ns.cut()
            assert ns.is_cut
            assert (await client.do("send b2"))[0] == "ok"  # into the socket buffer
            stalled, fresh = await asyncio.gather(
                client.do("recv 2 2"), run_client(ns, relay.port, "connect 2")
            )
            assert stalled[0] == "timeout", stalled  # established connection: no echo
            assert fresh[0][0] == "timeout", fresh  # new connection: SYN dropped
            assert relay.connections == 1  # nobody noticed: the connection is still open

            ns.heal()
            status, recovery, data = await client.do("recv 2 10")  # TCP retransmits b2
            assert (status, data) == ("ok", "b2")
            assert recovery < 5, recovery
            assert (await client.do("send c3"))[0] == "ok"
            assert (await client.do("recv 2 2"))[::2] == ("ok", "c3")
            fresh = await run_client(ns, relay.port, "connect 2", "send d4", "recv 2 2")
            assert [r[0] for r in fresh] == ["ok"] * 3, fresh
        finally:
            await client.close()


UDP_CLIENT = r"""
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((host, port))
got = set()
for i in range(n):
    s.send(str(i).encode())
    s.settimeout(0.001)  # read replies as we go: a full receive buffer would drop them too
    try:
        while True:
            got.add(int(s.recv(64)))
    except TimeoutError:
        pass
s.settimeout(0.3)
try:
    while True:
        got.add(int(s.recv(64)))
except TimeoutError:
    pass
s.close()
print(len(got))
"""


class _UdpEcho(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.send_errors = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.send_errors += 1  # a DROP in OUTPUT fails the local sendto with EPERM


async def test_lossy_drops_a_fraction_each_way(ns: NetNamespace) -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(_UdpEcho, local_addr=(ns.host_ip, 0))
    port = transport.get_extra_info("sockname")[1]

    async def survivors(n: int) -> int:
        proc = await asyncio.create_subprocess_exec(
            *ns.prefix(),
            sys.executable,
            "-c",
            UDP_CLIENT,
            ns.host_ip,
            str(port),
            str(n),
            stdout=subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0
        return int(out)

    try:
        ns.lossy(0.2)
        assert ns.loss == 0.2
        assert _iptables().count(ns.tag) == 4
        ns.cut()
        assert _iptables().count(ns.tag) == 8
        ns.heal()  # removes exactly the cut rules
        assert _iptables().count(ns.tag) == 4
        n = 400
        fraction = await survivors(n) / n  # expected (1 - 0.2) ** 2 = 0.64, sd 0.024
        assert 0.5 <= fraction <= 0.78, fraction
        ns.clear_loss()
        assert ns.tag not in _iptables()
        assert await survivors(n) == n
    finally:
        transport.close()


def test_teardown_removes_namespace_veth_and_rules_even_on_error() -> None:
    require_netns()
    ns = NetNamespace()
    with pytest.raises(RuntimeError, match="boom"), ns:
        ns.cut()
        ns.lossy(0.05)
        # a tagged rule the object does not know about goes too
        rule = ["-i", ns.host_if, "-m", "comment", "--comment", ns.tag, "-j", "ACCEPT"]
        subprocess.run(["iptables", "-w", "-A", "INPUT", *rule], check=True)
        name, host_if, tag = ns.name, ns.host_if, ns.tag
        assert name in _netns_names()
        assert host_if in _links()
        assert _iptables().count(tag) == 9
        raise RuntimeError("boom")
    assert name not in _netns_names()
    assert host_if not in _links()
    assert tag not in _iptables()
    ns.close()  # idempotent
