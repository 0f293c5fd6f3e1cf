"""The transport's write path: a burst of small messages goes out corked, and all of it."""

from __future__ import annotations

import asyncio
import socket

from protocol import BrokerAddress
from protocol.transport import CORK, Link, cancel_and_wait
from tests.conftest import wait_until


async def test_a_burst_of_small_messages_arrives_whole_in_order_and_uncorked(
    mosquitto_address: BrokerAddress, root: str
) -> None:
    received: list[bytes] = []
    topic = f"{root}/burst"
    sink = Link(
        address=mosquitto_address,
        client_id="burst-sink",
        subscriptions=[(topic, 1)],
        on_message=lambda t, p: received.append(p),
    )
    source = Link(
        address=mosquitto_address,
        client_id="burst-source",
        subscriptions=[],
        on_message=lambda t, p: None,
    )
    tasks = [asyncio.create_task(sink.run()), asyncio.create_task(source.run())]
    try:
        await asyncio.wait_for(sink.connected.wait(), 10)
        await asyncio.wait_for(source.connected.wait(), 10)
        # 3,000 messages of ~600 bytes in one loop iteration: one corked flush (on Linux)
        sent = [f"{i:06d}".encode() + b"x" * 600 for i in range(3_000)]
        assert all(source.publish_nowait(topic, payload) for payload in sent)
        await wait_until(lambda: len(received) == len(sent), what="the whole burst")
        assert received == sent
        # ...and a lone message after it is not held back by a cork left on the socket
        if CORK is not None:
            sock = source.client._client.socket()
            assert isinstance(sock, socket.socket)
            assert sock.getsockopt(socket.IPPROTO_TCP, CORK) == 0
        assert source.publish_nowait(topic, b"last")
        await wait_until(lambda: received[-1:] == [b"last"], what="the lone message")
    finally:
        await cancel_and_wait(tasks)
