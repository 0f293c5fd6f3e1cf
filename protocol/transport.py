"""One MQTT connection done right: TCP_NODELAY, Last Will, capped jittered reconnects."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiomqtt

logger = logging.getLogger(__name__)

# Without TCP_NODELAY, Nagle's algorithm and delayed ACKs turn a loopback round trip of
# ~0.6 ms into ~88 ms; every client of this project sets it.
NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# paho's default of 20 unacknowledged QoS 1 messages throttles a dispatcher that sends
# thousands of microtasks; the broker's own limit (max_inflight_messages) still applies.
MAX_INFLIGHT = 65535

_last_seq = 0


def new_seq() -> int:
    """A birth sequence number that increases across reconnects and (clock permitting) restarts."""
    global _last_seq
    _last_seq = max(_last_seq + 1, time.time_ns() // 1000)
    return _last_seq


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker is and how to log in."""

    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = None
    keepalive: int = 30

    @classmethod
    def parse(cls, url: str, **kwargs: Any) -> BrokerAddress:
        """Accept ``mqtt://host:port``, ``tcp://host:port``, ``host:port`` or ``host``."""
        rest = url.strip()
        for scheme in ("mqtt://", "tcp://"):
            if rest.startswith(scheme):
                rest = rest[len(scheme) :]
                break
        else:
            if "://" in rest:
                raise ValueError(f"unsupported broker URL scheme in {url!r} (use mqtt://)")
        rest = rest.rstrip("/")
        host, sep, port = rest.rpartition(":")
        if not sep:
            host, port = rest, "1883"
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"invalid broker URL {url!r}: expected mqtt://host:port")
        return cls(host=host, port=int(port), **kwargs)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def __repr__(self) -> str:  # never show the password
        return f"BrokerAddress({self.url}, username={self.username!r})"


def connect_options(address: BrokerAddress, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for :class:`aiomqtt.Client` that every client of this project uses."""
    opts: dict[str, Any] = {
        "hostname": address.host,
        "port": address.port,
        "username": address.username,
        "password": address.password,
        "keepalive": address.keepalive,
        "socket_options": [NODELAY],
        "max_inflight_messages": MAX_INFLIGHT,
        "timeout": 10,
    }
    opts.update(extra)
    return opts


MessageHandler = Callable[[aiomqtt.Message], None]
ConnectHook = Callable[["Link"], Awaitable[None]]


class Link:
    """A long-lived MQTT session that survives broker outages.

    ``run()`` connects, subscribes, calls ``on_connect`` and feeds every message to
    ``on_message`` (synchronously: handlers must not block); on a connection error it
    waits a capped, jittered backoff and starts over. Only cancellation ends it.
    """

    def __init__(
        self,
        *,
        address: BrokerAddress,
        client_id: str,
        subscriptions: Iterable[tuple[str, int]],
        on_message: MessageHandler,
        on_connect: ConnectHook | None = None,
        will: Callable[[], aiomqtt.Will] | None = None,
        clean_session: bool = True,
        backoff: tuple[float, float] = (0.2, 10.0),
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.subscriptions = list(subscriptions)
        self.on_message = on_message
        self.on_connect = on_connect
        self._will = will
        self._clean_session = clean_session
        self._backoff = backoff
        self._client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.connections = 0

    async def run(self) -> None:
        delay = self._backoff[0]
        while True:
            client = aiomqtt.Client(
                **connect_options(
                    self.address,
                    identifier=self.client_id,
                    will=self._will() if self._will else None,
                    clean_session=self._clean_session,
                )
            )
            try:
                async with client:
                    self._client = client
                    for topic, qos in self.subscriptions:
                        await client.subscribe(topic, qos=qos)
                    self.connections += 1
                    delay = self._backoff[0]
                    if self.on_connect is not None:
                        await self.on_connect(self)
                    self.connected.set()
                    logger.info("%s connected to %s", self.client_id, self.address.url)
                    async for message in client.messages:
                        try:
                            self.on_message(message)
                        except Exception:  # a bad handler must not kill the session
                            logger.exception("handler failed on %s", message.topic)
            except aiomqtt.MqttError as e:
                logger.warning(
                    "%s lost broker %s (%s); retrying in %.1fs",
                    self.client_id,
                    self.address.url,
                    e,
                    delay,
                )
            finally:
                self.connected.clear()
                self._client = None
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._backoff[1])

    @property
    def client(self) -> aiomqtt.Client:
        if self._client is None:
            raise aiomqtt.MqttError("not connected")
        return self._client

    def publish_nowait(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> bool:
        """Queue a publish without waiting for the broker's PUBACK.

        The hot paths (dispatch, results) publish thousands of messages a second; awaiting
        each acknowledgement in turn would bound them by the round trip. End-to-end delivery
        is guaranteed by leases and attempts, not by this hop's acknowledgement. Returns
        False when there is no connection (the caller's lease logic recovers).
        """
        client = self._client
        if client is None:
            return False
        # aiomqtt exposes no fire-and-forget publish; paho's own publish queues the packet
        # and the registered socket writer flushes it from the event loop.
        info = client._client.publish(topic, payload, qos, retain)
        return bool(info.rc == 0)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False
    ) -> None:
        """Publish and wait for the broker's acknowledgement (for births, deaths, status)."""
        await self.client.publish(topic, payload, qos=qos, retain=retain)
