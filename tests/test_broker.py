"""Tests for coordinator.broker: local broker lifecycle, URL parsing and broker resolution."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Literal

import aiomqtt
import pytest

from coordinator import broker as broker_mod
from coordinator.broker import (
    DEV_CONFIG_FALLBACK,
    DEV_CONFIG_PATH,
    BrokerInfo,
    LocalBroker,
    find_mosquitto,
    free_port,
    parse_broker_url,
    resolve_broker,
)

Kind = Literal["mosquitto", "amqtt"]

NODELAY: list[aiomqtt.types.SocketOption] = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]

KINDS = [
    pytest.param("mosquitto", marks=pytest.mark.mosquitto, id="mosquitto"),
    pytest.param("amqtt", id="amqtt"),
]


def _require_mosquitto() -> None:
    if find_mosquitto() is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("mosquitto binary not found, and it is required when CI is set")
    pytest.skip("mosquitto binary not found on PATH or in /usr/sbin (install mosquitto)")


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    value: Kind = request.param
    if value == "mosquitto":
        _require_mosquitto()
    return value


@pytest.fixture
def local_broker(kind: Kind) -> Iterator[LocalBroker]:
    with LocalBroker(kind=kind) as broker:
        yield broker


@contextlib.asynccontextmanager
async def mqtt_client(port: int) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", port, socket_options=NODELAY, timeout=5) as client:
        yield client


def assert_refused(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def assert_process_gone(pid: int) -> None:
    # The broker is our child: after stop() it must also have been reaped (no zombie).
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def pubsub_once(port: int, topic: str = "test/broker") -> None:
    async with mqtt_client(port) as sub, mqtt_client(port) as pub:
        await sub.subscribe(topic, qos=1)
        await pub.publish(topic, b"hello", qos=1)
        async with asyncio.timeout(5):
            message = await anext(sub.messages)
    assert message.topic.matches(topic)
    assert message.payload == b"hello"
    assert message.qos == 1


# -- LocalBroker ----------------------------------------------------------------------------


async def test_publish_subscribe_qos1(local_broker: LocalBroker, kind: Kind) -> None:
    info = local_broker.info
    assert info.kind == kind
    assert info.host == "127.0.0.1"
    assert info.url == f"mqtt://127.0.0.1:{info.port}"
    assert local_broker.pid is not None
    assert local_broker.log_path is not None and local_broker.log_path.is_file()
    await pubsub_once(info.port)


async def test_round_trip_latency(local_broker: LocalBroker, kind: str) -> None:
    """Print (never assert) the QoS 1 request->reply time through the broker.

    This is the microtask pattern: coordinator publishes a task, the agent replies from its
    message handler (PUBACK + PUBLISH written back to back). Without TCP_NODELAY on both the
    broker and the clients, Nagle + delayed ACK stall it to ~44-88 ms instead of < 2 ms.
    """
    port, rounds = local_broker.port, 60
    samples: list[float] = []
    async with mqtt_client(port) as coordinator, mqtt_client(port) as agent:
        await agent.subscribe("rtt/task", qos=1)
        await coordinator.subscribe("rtt/result", qos=1)

        async def echo() -> None:
            # Ends by itself after `rounds` replies instead of being cancelled: on Python 3.11
            # asyncio.wait_for (used inside aiomqtt's publish) swallows a cancel that lands in
            # the same loop tick as the PUBACK, and the task then waits for messages forever.
            handled = 0
            async for message in agent.messages:
                assert isinstance(message.payload, bytes)
                await agent.publish("rtt/result", message.payload, qos=1)
                handled += 1
                if handled == rounds:
                    return

        echo_task = asyncio.create_task(echo())
        try:
            for i in range(rounds):
                payload = i.to_bytes(4, "big") * 25
                start = time.perf_counter()
                await coordinator.publish("rtt/task", payload, qos=1)
                async with asyncio.timeout(5):
                    reply = await anext(coordinator.messages)
                samples.append(time.perf_counter() - start)
                assert reply.payload == payload
            async with asyncio.timeout(5):
                await echo_task
        finally:
            if not echo_task.done():
                echo_task.cancel()
                await asyncio.wait({echo_task}, timeout=1)
    warm = samples[10:]
    print(
        f"\n{kind}: QoS 1 request->reply round trip over {len(warm)} messages: "
        f"median {statistics.median(warm) * 1e3:.3f} ms, "
        f"p90 {statistics.quantiles(warm, n=10)[-1] * 1e3:.3f} ms, "
        f"max {max(warm) * 1e3:.3f} ms"
    )


async def test_offline_persistent_session_keeps_qos1_backlog(
    local_broker: LocalBroker,
) -> None:
    """QoS 1 messages for a disconnected clean_session=False agent are queued, not dropped.

    2000 exceeds Mosquitto's default max_queued_messages (1000), so this also proves the dev
    config is in effect; on amqtt it guards against sessions being treated as anonymous.
    """
    port, count = local_broker.port, 2000

    def agent() -> aiomqtt.Client:
        return aiomqtt.Client(
            "127.0.0.1",
            port,
            identifier="agent-offline",
            clean_session=False,
            socket_options=NODELAY,
        )

    async with agent() as a:
        await a.subscribe("tasks/agent-offline", qos=1)
    async with mqtt_client(port) as coordinator:
        coordinator.pending_calls_threshold = count  # silence aiomqtt's backlog warning
        await asyncio.gather(
            *(
                coordinator.publish("tasks/agent-offline", i.to_bytes(4, "big"), qos=1)
                for i in range(count)
            )
        )
    await asyncio.sleep(1.5)  # amqtt would have expired an "anonymous" session by now
    received: set[int] = set()
    async with agent() as a, asyncio.timeout(20):
        async for message in a.messages:
            assert isinstance(message.payload, bytes)
            received.add(int.from_bytes(message.payload, "big"))
            if len(received) == count:
                break
    assert received == set(range(count))


async def test_stop_releases_port_and_reaps_process(kind: Kind) -> None:
    broker = LocalBroker(kind=kind)
    broker.start()
    try:
        pid, port = broker.pid, broker.port
        assert pid is not None
        await pubsub_once(port)
    finally:
        broker.stop()
    assert broker.pid is None
    assert not broker.running
    assert_refused(port)
    assert_process_gone(pid)
    broker.stop()  # idempotent
    log_path = broker.log_path
    assert log_path is not None and log_path.is_file()  # kept for post-mortem until close()
    broker.close()
    assert not log_path.exists()


async def test_restart_keeps_port(local_broker: LocalBroker) -> None:
    port, first_pid = local_broker.port, local_broker.pid
    assert first_pid is not None
    local_broker.restart()
    assert local_broker.port == port
    assert local_broker.pid not in (None, first_pid)
    assert_process_gone(first_pid)
    await pubsub_once(port)


async def test_kill_then_restart(local_broker: LocalBroker) -> None:
    port, pid = local_broker.port, local_broker.pid
    assert pid is not None
    local_broker.kill()
    assert_process_gone(pid)
    assert_refused(port)
    local_broker.kill()  # idempotent
    local_broker.restart()
    assert local_broker.port == port
    await pubsub_once(port)


def test_start_failure_reports_log_tail(kind: Kind) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = LocalBroker(kind=kind, port=port)
        with pytest.raises(RuntimeError, match="exited with code") as excinfo:
            broker.start()
    assert "in use" in str(excinfo.value).lower()
    assert not broker.running
    broker.close()


def test_explicit_mosquitto_config_is_used(tmp_path: Path) -> None:
    _require_mosquitto()
    conf = tmp_path / "custom.conf"
    conf.write_text("allow_anonymous true\nlog_dest stderr\nlog_type all\n")
    with LocalBroker(kind="mosquitto", config=conf) as broker:
        assert broker.log_path is not None
        # "information" messages are only logged with the custom `log_type all`.
        assert "mosquitto version" in broker.log_path.read_text()


def test_config_rejected_for_amqtt(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Mosquitto config"):
        LocalBroker(kind="amqtt", config=tmp_path / "x.conf")


def test_missing_mosquitto_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod, "find_mosquitto", lambda: None)
    with pytest.raises(FileNotFoundError, match="mosquitto"):
        LocalBroker(kind="mosquitto")
    assert LocalBroker(kind="auto").kind == "amqtt"


def test_auto_prefers_mosquitto() -> None:
    _require_mosquitto()
    assert LocalBroker().kind == "mosquitto"


def test_builtin_config_matches_file() -> None:
    """The fallback used from a wheel must carry the same directives as the shipped file."""
    lines = [
        line.strip()
        for line in DEV_CONFIG_PATH.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines == DEV_CONFIG_FALLBACK.strip().splitlines()
    assert not any(line.startswith("listener") for line in lines)


# -- helpers and URL handling ---------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_broker_info_url() -> None:
    assert BrokerInfo("10.0.0.5", 1884, "external").url == "mqtt://10.0.0.5:1884"
    assert BrokerInfo("::1", 1883, "amqtt").url == "mqtt://[::1]:1883"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local:1884", ("broker.local", 1884)),
        ("tcp://10.0.0.5:1883", ("10.0.0.5", 1883)),
        ("MQTT://Host:1", ("host", 1)),
        ("mqtt://broker.local", ("broker.local", 1883)),
        ("mqtt://broker.local/", ("broker.local", 1883)),
        ("localhost:18830", ("localhost", 18830)),
        ("localhost", ("localhost", 1883)),
        ("  127.0.0.1:2000 ", ("127.0.0.1", 2000)),
        ("mqtt://[::1]:1885", ("::1", 1885)),
        ("[::1]", ("::1", 1883)),
        ("mqtts://broker:8884", ("broker", 8884)),
        ("mqtts://broker", ("broker", 8883)),
        ("ssl://broker", ("broker", 8883)),
    ],
)
def test_parse_broker_url(url: str, expected: tuple[str, int]) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "",
        "   ",
        "http://broker:1883",
        "wss://broker:8883",
        "ws://broker:9001",
        "mqtt://",
        "mqtt://:1883",
        "broker:notaport",
        "broker:70000",
        "broker:0",
        "mqtt://broker:1883/topic",
        "mqtt://broker:1883?x=1",
        "mqtt://user:pw@broker:1883",
    ],
)
def test_parse_broker_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        parse_broker_url(url)


def test_resolve_broker_with_url_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_local_broker(*args: object, **kwargs: object) -> LocalBroker:
        raise AssertionError("resolve_broker must not start a broker when given a URL")

    monkeypatch.setattr(broker_mod, "LocalBroker", no_local_broker)
    with resolve_broker("mqtt://broker.example:1884") as info:
        assert info == BrokerInfo("broker.example", 1884, "external")
        assert info.url == "mqtt://broker.example:1884"


def test_resolve_broker_with_bad_url_raises() -> None:
    with pytest.raises(ValueError, match="broker URL"), resolve_broker("http://nope"):
        pass


async def test_resolve_broker_starts_and_stops_local(kind: Kind) -> None:
    with resolve_broker(None, kind=kind) as info:
        assert info.kind == kind
        await pubsub_once(info.port)
    assert_refused(info.port)
