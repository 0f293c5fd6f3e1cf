#!/usr/bin/env python3
"""Container health check: is this container connected to its MQTT broker?

Healthy (exit 0) when the container's network namespace holds an ESTABLISHED TCP
connection to the broker named by EDGE_OFFLOAD_BROKER (its port, and one of the addresses
its host name resolves to). An agent or a coordinator keeps exactly such a connection
while it works: when the broker is unreachable, or the process hangs (no MQTT keepalive,
so the broker closes the connection), there is none, and the container turns
"unhealthy" after a few checks.

Why this and not a question to the broker: the check sends nothing and needs no
credentials, so it cannot disturb the service it watches. A check that connected to the
broker with the service's own login would, on a broker that uses the user name as the
client id (Mosquitto's use_username_as_clientid), disconnect the service every time.

Standard library only; reads /proc/net/tcp and /proc/net/tcp6 (Linux).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

ESTABLISHED = "01"
DEFAULT_BROKER = "mqtt://broker:1883"


def broker_endpoint(url: str) -> tuple[str, int]:
    """``mqtt://host:port``, ``tcp://host:port``, ``host:port`` or ``host`` -> (host, port)."""
    if "://" not in url:
        url = "mqtt://" + url
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"no host in broker URL {url!r}")
    return parts.hostname, parts.port or 1883


def _decode_address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """/proc/net/tcp{,6} print addresses as 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    address = ipaddress.ip_address(words)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def established_peers(
    proc_net: Path = Path("/proc/net"),
) -> set[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]]:
    """(remote address, remote port) of every ESTABLISHED TCP connection in this namespace."""
    peers = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = (proc_net / name).read_text().splitlines()[1:]
        except OSError:  # no IPv6 in this kernel or namespace
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != ESTABLISHED:
                continue
            address, _, port = fields[2].partition(":")
            peers.add((_decode_address(address), int(port, 16)))
    return peers


def resolve(host: str, port: int) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return {ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos}


def check(url: str, proc_net: Path = Path("/proc/net")) -> tuple[bool, str]:
    host, port = broker_endpoint(url)
    peers = established_peers(proc_net)
    try:
        addresses = resolve(host, port)
    except OSError as e:
        return False, f"cannot resolve broker host {host!r}: {e}"
    if any((address, port) in peers for address in addresses):
        return True, f"connected to the broker {host}:{port}"
    return False, f"no established connection to the broker {host}:{port}"


def main() -> int:
    url = os.environ.get("EDGE_OFFLOAD_BROKER") or DEFAULT_BROKER
    try:
        healthy, message = check(url)
    except ValueError as e:
        healthy, message = False, str(e)
    print(message)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
