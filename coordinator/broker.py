"""MQTT broker discovery and lifecycle: external URLs, a local Mosquitto, or embedded amqtt."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeAlias

from protocol.transport import DEFAULT_PORT as DEFAULT_MQTT_PORT
from protocol.transport import parse_broker_url

logger = logging.getLogger(__name__)

BrokerKind: TypeAlias = Literal["external", "mosquitto", "amqtt"]
LocalKind: TypeAlias = Literal["auto", "mosquitto", "amqtt"]

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0
AMQTT_SHUTDOWN_TIMEOUT_S = 2.0  # < STOP_TIMEOUT_S, so the amqtt child still exits with 0
_LOG_TAIL_BYTES = 4000
_POLL_INTERVAL_S = 0.02

DEV_CONFIG_PATH = Path(__file__).resolve().parents[1] / "broker_config" / "mosquitto-dev.conf"

# Used when broker_config/ is not shipped (e.g. installed from a wheel); keep it in sync with
# broker_config/mosquitto-dev.conf, which carries the explanation of every line.
DEV_CONFIG_FALLBACK = """\
allow_anonymous true
set_tcp_nodelay true
persistence false
max_inflight_messages 0
max_queued_messages 100000
max_packet_size 268435456
sys_interval 0
log_dest stderr
log_type error
log_type warning
log_type notice
log_timestamp_format %Y-%m-%dT%H:%M:%S
"""

# Places where distributions install mosquitto that are often not on a user's PATH.
_MOSQUITTO_FALLBACK_DIRS = ("/usr/sbin", "/usr/local/sbin", "/opt/homebrew/sbin")


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is currently free on ``host`` (racy by nature, fine for tests)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True)
class BrokerInfo:
    """Where an MQTT broker can be reached and what runs it."""

    host: str
    port: int
    kind: BrokerKind

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"


def find_mosquitto() -> str | None:
    """Return the path of the mosquitto executable, or None when it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for directory in _MOSQUITTO_FALLBACK_DIRS:
        found = shutil.which("mosquitto", path=directory)
        if found:
            return found
    return None


def amqtt_available() -> bool:
    """Whether the embedded amqtt broker (extra ``edge-offload[broker]``) is importable."""
    return importlib.util.find_spec("amqtt") is not None


def _client_host(host: str) -> str:
    """Address a client should dial for a broker bound to ``host`` (wildcards -> loopback)."""
    return {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)


def _mqtt_connack_ok(host: str, port: int, timeout: float) -> bool:
    """Connect, send an MQTT 3.1.1 CONNECT and return True once a CONNACK comes back."""
    client_id = f"edge-offload-probe-{os.getpid()}".encode()
    variable_header = b"\x00\x04MQTT\x04\x02\x00\x0a"  # protocol, level 4, clean session, 10 s
    payload = len(client_id).to_bytes(2, "big") + client_id
    body = variable_header + payload
    connect = bytes([0x10, len(body)]) + body  # body < 128 bytes: single length byte
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(connect)
            reply = b""
            while len(reply) < 4:
                chunk = sock.recv(4 - len(reply))
                if not chunk:
                    return False
                reply += chunk
            if reply[0] != 0x20 or reply[1] != 0x02:
                return False
            if reply[3] != 0:
                # The broker speaks MQTT but refuses anonymous probes (custom config): it is up.
                logger.debug("broker at %s:%d answered CONNACK code %d", host, port, reply[3])
            with contextlib.suppress(OSError):
                sock.sendall(b"\xe0\x00")  # DISCONNECT, so the broker logs a clean close
            return True
    except OSError:
        return False


def _log_tail(path: Path | None, limit: int = _LOG_TAIL_BYTES) -> str:
    if path is None:
        return "(no log)"
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - limit))
            text = handle.read().decode("utf-8", errors="replace").strip()
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return text or "(log is empty)"


class LocalBroker:
    """A broker subprocess (Mosquitto, or amqtt as fallback) bound to a local port.

    Synchronous context manager: ``with LocalBroker() as broker: broker.info.url``.
    The port is chosen once (``port=None`` picks a free one) and kept across ``restart()``.
    Logs of every (re)start go to ``log_path`` inside a temporary directory that is removed
    when the context exits (or at interpreter exit / garbage collection otherwise).
    The process is never left behind: ``stop()`` runs from ``__exit__`` and from ``atexit``;
    it also shares our process group, so a terminal Ctrl-C reaches it as well.
    """

    def __init__(
        self,
        *,
        kind: LocalKind = "auto",
        host: str = "127.0.0.1",
        port: int | None = None,
        config: Path | None = None,
    ) -> None:
        self._mosquitto = find_mosquitto() if kind in ("auto", "mosquitto") else None
        resolved: Literal["mosquitto", "amqtt"]
        if kind == "mosquitto" or (kind == "auto" and self._mosquitto is not None):
            if self._mosquitto is None:
                raise FileNotFoundError(
                    "mosquitto executable not found on PATH or in "
                    + ", ".join(_MOSQUITTO_FALLBACK_DIRS)
                )
            resolved = "mosquitto"
        elif kind in ("auto", "amqtt"):
            resolved = "amqtt"
        else:
            raise ValueError(f"unknown broker kind {kind!r}; expected auto, mosquitto or amqtt")
        if config is not None and resolved != "mosquitto":
            raise ValueError(
                f"config={str(config)!r} is a Mosquitto config but the broker kind is {resolved}"
            )
        self.kind: Literal["mosquitto", "amqtt"] = resolved
        self.host = host
        self._port = port
        self._config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: Path | None = None
        self._cleanup_tmpdir: weakref.finalize[Any, Any] | None = None
        self._atexit_registered = False

    # -- properties ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The broker's port (chosen on first start when it was not given)."""
        if self._port is None:
            self._port = free_port(self.host)
        return self._port

    @property
    def info(self) -> BrokerInfo:
        return BrokerInfo(host=_client_host(self.host), port=self.port, kind=self.kind)

    @property
    def pid(self) -> int | None:
        """PID of the running broker process, None when it is not running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """The broker's combined stdout/stderr log (None before the first start)."""
        return None if self._tmpdir is None else self._tmpdir / "broker.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker and wait until it answers an MQTT CONNECT (no-op if running).

        Raises RuntimeError, with the tail of the broker log, if the process exits or does
        not accept MQTT connections within 10 s.
        """
        if self.running:
            return
        tmpdir = self._ensure_tmpdir()
        log_path = tmpdir / "broker.log"
        argv, env = self._command(tmpdir)
        logger.debug("starting %s broker on %s:%d: %s", self.kind, self.host, self.port, argv)
        with log_path.open("ab") as log_file:
            log_file.write(f"--- starting {self.kind} on {self.host}:{self.port}\n".encode())
            log_file.flush()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmpdir,
            )
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        try:
            self._wait_ready(START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        logger.info("%s broker ready at %s (pid %d)", self.kind, self.info.url, self._proc.pid)

    def stop(self) -> None:
        """SIGTERM the broker, SIGKILL it after 5 s, and reap it. Idempotent."""
        proc, self._proc = self._proc, None
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s broker (pid %d) ignored SIGTERM for %.0f s; killing it",
                    self.kind,
                    proc.pid,
                    STOP_TIMEOUT_S,
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        logger.debug("%s broker (pid %d) exited with %s", self.kind, proc.pid, proc.returncode)

    def kill(self) -> None:
        """SIGKILL the broker without a clean shutdown (simulates a crash). Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self.stop()  # reaps state and unregisters atexit

    def restart(self) -> None:
        """Stop (if running) and start again on the same host and port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and delete its temporary directory (config and log)."""
        self.stop()
        if self._cleanup_tmpdir is not None:
            self._cleanup_tmpdir()
        self._cleanup_tmpdir = None
        self._tmpdir = None

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalBroker(kind={self.kind!r}, url={self.info.url!r}, pid={self.pid})"

    # -- internals ----------------------------------------------------------------------

    def _ensure_tmpdir(self) -> Path:
        if self._tmpdir is None:
            self._tmpdir = Path(tempfile.mkdtemp(prefix=f"edge-offload-{self.kind}-"))
            self._cleanup_tmpdir = weakref.finalize(
                self, shutil.rmtree, str(self._tmpdir), ignore_errors=True
            )
        return self._tmpdir

    def _command(self, tmpdir: Path) -> tuple[list[str], dict[str, str] | None]:
        if self.kind == "mosquitto":
            assert self._mosquitto is not None
            conf = tmpdir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} {self.host}\n{self._config_text()}")
            return [self._mosquitto, "-c", str(conf)], None
        if not amqtt_available():
            raise RuntimeError(
                "neither mosquitto nor amqtt is available; install Mosquitto or "
                "`pip install edge-offload[broker]`"
            )
        # The child imports this module by name; make sure it resolves to this very file
        # even when the project is not installed and the caller's cwd is elsewhere.
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        argv = [
            sys.executable,
            "-m",
            "coordinator.broker",
            "--host",
            self.host,
            "--port",
            str(self.port),
        ]
        return argv, env

    def _config_text(self) -> str:
        if self._config is not None:
            return self._config.read_text()
        if DEV_CONFIG_PATH.is_file():
            return DEV_CONFIG_PATH.read_text()
        logger.debug("%s not found; using the built-in development config", DEV_CONFIG_PATH)
        return DEV_CONFIG_FALLBACK

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        host = _client_host(self.host)
        deadline = time.monotonic() + timeout
        # A healthy broker answers CONNACK in about a millisecond. Start with a short probe
        # timeout so a squatter on the port (accepts, never answers) does not hide the
        # broker's own exit for long, and back off in case the machine is just very slow.
        probe_timeout = 0.25
        while True:
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(
                    f"{self.kind} broker exited with code {code} during startup on "
                    f"{self.host}:{self.port}; log tail:\n{_log_tail(self.log_path)}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"{self.kind} broker did not accept MQTT connections on "
                    f"{self.host}:{self.port} within {timeout:.0f} s; log tail:\n"
                    f"{_log_tail(self.log_path)}"
                )
            probe_start = time.monotonic()
            if _mqtt_connack_ok(host, self.port, timeout=min(probe_timeout, remaining)):
                return
            if time.monotonic() - probe_start >= probe_timeout:
                probe_timeout = min(probe_timeout * 2, 2.0)
            time.sleep(_POLL_INTERVAL_S)


@contextlib.contextmanager
def resolve_broker(url: str | None, kind: LocalKind = "auto") -> Iterator[BrokerInfo]:
    """Yield the broker to use: ``url`` as-is when given, else a freshly started LocalBroker."""
    if url is not None:
        host, port = parse_broker_url(url)
        yield BrokerInfo(host=host, port=port, kind="external")
        return
    with LocalBroker(kind=kind) as broker:
        yield broker.info


# -- embedded amqtt broker ------------------------------------------------------------------


_AMQTT_AUTH_PLUGIN = "EdgeOffloadAllowAllAuthPlugin"


async def _allow_all(self: object, *, session: object) -> bool:
    return True


def _amqtt_auth_plugin_path() -> str:
    """Define, once, the auth plugin amqtt loads by dotted path, and return that path.

    amqtt's own AnonymousAuthPlugin(allow_anonymous=True) flags EVERY session anonymous, and
    amqtt never queues QoS 1/2 messages for an offline anonymous session and deletes it ~1 s
    after it disconnects, so clean_session=False agents would silently lose microtasks.
    This plugin accepts every client and leaves ``is_anonymous`` False, matching Mosquitto.
    It is attached to this module at run time (instead of being a module-level class) so
    that importing coordinator.broker never imports the optional amqtt package.
    """
    module = sys.modules[__name__]  # "__main__" under `python -m coordinator.broker`: fine
    if not hasattr(module, _AMQTT_AUTH_PLUGIN):
        from amqtt.plugins.base import BaseAuthPlugin

        plugin = type(_AMQTT_AUTH_PLUGIN, (BaseAuthPlugin,), {"authenticate": _allow_all})
        plugin.__module__ = __name__
        setattr(module, _AMQTT_AUTH_PLUGIN, plugin)
    return f"{__name__}.{_AMQTT_AUTH_PLUGIN}"


def _amqtt_config(host: str, port: int) -> dict[str, Any]:
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return {
        "listeners": {"default": {"type": "tcp", "bind": bind}},
        # Giving `plugins` explicitly replaces amqtt's defaults (event/packet loggers and
        # the $SYS publisher) and avoids the deprecated entry-point plugin loading.
        # Authentication needs at least one plugin voting yes, else every CONNECT is refused.
        "plugins": {_amqtt_auth_plugin_path(): {}},
    }


async def run_amqtt(host: str, port: int) -> None:
    """Serve MQTT 3.1.1 with amqtt on host:port until cancelled, then shut down cleanly.

    No TCP_NODELAY setup is needed: amqtt listens via asyncio.start_server, and asyncio's
    selector transport calls base_events._set_nodelay() on every accepted TCP socket.
    """
    from amqtt.broker import Broker  # optional dependency: imported only when used

    broker = Broker(_amqtt_config(host, port))
    await broker.start()
    logger.info("amqtt broker listening on %s:%d", host, port)
    try:
        await asyncio.Future()  # run until cancelled
    finally:
        # Bounded: amqtt's shutdown waits for each client's reader task to stop, and on
        # Python 3.11 that task can swallow its cancellation (asyncio.wait_for drops a cancel
        # arriving in the same loop tick as incoming data), hanging shutdown while a client
        # keeps sending. Seen in ~1 of 15 stops under continuous QoS 1 publishing.
        try:
            async with asyncio.timeout(AMQTT_SHUTDOWN_TIMEOUT_S):
                await broker.shutdown()
        except TimeoutError:
            logger.warning(
                "amqtt broker on %s:%d did not shut down within %.0f s; abandoning it",
                host,
                port,
                AMQTT_SHUTDOWN_TIMEOUT_S,
            )
        else:
            logger.info("amqtt broker on %s:%d shut down", host, port)


async def _cancel_stragglers(rounds: int = 20) -> None:
    """Cancel every other task, repeatedly: a single cancel can be swallowed (see above)."""
    for _ in range(rounds):
        current = asyncio.current_task()
        pending = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not pending:
            return
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.05)


async def _serve_until_signal(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    server = asyncio.create_task(run_amqtt(host, port))
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({server, stopper}, return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
    if server.done():
        server.result()  # startup failure (e.g. port in use): propagate
        return
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await server
    await _cancel_stragglers()  # leftovers of an abandoned amqtt shutdown


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m coordinator.broker``: run the embedded amqtt broker."""
    parser = argparse.ArgumentParser(description="Run the embedded amqtt MQTT broker.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=DEFAULT_MQTT_PORT)
    parser.add_argument("--verbose", action="store_true", help="log amqtt at INFO level")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("transitions").setLevel(logging.WARNING)
    try:
        asyncio.run(_serve_until_signal(args.host, args.port))
    except Exception as exc:  # amqtt already logged the traceback; end with the gist
        logger.error("amqtt broker on %s:%d failed: %s", args.host, args.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
