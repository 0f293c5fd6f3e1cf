"""Shared fixtures: real brokers, unique topic roots, agent processes and in-process services."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent import Agent, AgentConfig
from coordinator import Coordinator, CoordinatorConfig, OffloadClient
from coordinator.broker import LocalBroker, find_mosquitto
from protocol import BrokerAddress

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
DIGITS_MODEL = MODELS / "digits_mlp.onnx"


def require_mosquitto() -> None:
    """Skip when Mosquitto is absent locally; fail under CI, where it must be installed."""
    if find_mosquitto() is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("mosquitto is not installed, and CI requires it (apt-get install mosquitto)")
    pytest.skip("mosquitto not installed (apt-get install mosquitto mosquitto-clients)")


@pytest.fixture(scope="session", autouse=True)
def _private_user_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Coordinators' model registry and agents' model caches default to the user's data and
    cache directories: tests (and the processes they start) get their own."""
    saved = {k: os.environ.get(k) for k in ("XDG_DATA_HOME", "XDG_CACHE_HOME")}
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[LocalBroker]:
    require_mosquitto()
    with LocalBroker(kind="mosquitto") as broker:
        yield broker


@pytest.fixture(scope="session")
def amqtt_broker() -> Iterator[LocalBroker]:
    with LocalBroker(kind="amqtt") as broker:
        yield broker


@pytest.fixture(params=["mosquitto", "amqtt"])
def broker(request: pytest.FixtureRequest) -> LocalBroker:
    """Each test using this runs once against Mosquitto and once against the embedded broker."""
    name = "mosquitto" if request.param == "mosquitto" else "amqtt_broker"
    b: LocalBroker = request.getfixturevalue(name)
    return b


@pytest.fixture
def address(broker: LocalBroker) -> BrokerAddress:
    return BrokerAddress(host=broker.info.host, port=broker.info.port)


@pytest.fixture
def mosquitto_address(mosquitto: LocalBroker) -> BrokerAddress:
    return BrokerAddress(host=mosquitto.info.host, port=mosquitto.info.port)


@pytest.fixture
def root() -> str:
    """A topic root no other test uses, so tests sharing a broker never see each other."""
    return f"test/{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    with np.load(MODELS / "digits_samples.npz") as data:
        return data["x"].astype(np.float32), data["y"]


# -- services ---------------------------------------------------------------------------------


@pytest.fixture
async def coordinator_factory(
    root: str,
) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process coordinators; all are closed at teardown."""
    stack = contextlib.AsyncExitStack()

    async def start(address: BrokerAddress, **overrides: Any) -> Coordinator:
        coord = await stack.enter_async_context(
            Coordinator(CoordinatorConfig(broker=address, root=root, **overrides))
        )
        await coord.wait_connected()
        return coord

    async with stack:
        yield start


@pytest.fixture
async def agent_factory(root: str, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start in-process agents (models from models/, no self-benchmark unless asked)."""
    stack = contextlib.AsyncExitStack()

    async def start(address: BrokerAddress, agent_id: str, **overrides: Any) -> Agent:
        overrides.setdefault("benchmark", False)
        overrides.setdefault("spool_dir", tmp_path / f"{agent_id}-spool")
        overrides.setdefault("heartbeat_s", 0.5)
        overrides.setdefault("models_dirs", (MODELS,))
        overrides.setdefault("model_cache_dir", tmp_path / f"{agent_id}-models")
        config = AgentConfig(agent_id=agent_id, broker=address, root=root, **overrides)
        agent = await stack.enter_async_context(Agent(config))
        await agent.wait_connected()
        return agent

    async with stack:
        yield start


@pytest.fixture
async def client_factory(root: str) -> AsyncIterator[Callable[..., Any]]:
    stack = contextlib.AsyncExitStack()

    async def start(address: BrokerAddress) -> OffloadClient:
        return await stack.enter_async_context(OffloadClient(address, root=root))

    async with stack:
        yield start


@dataclass
class AgentProcess:
    agent_id: str
    proc: subprocess.Popen[bytes]
    log: Path

    def terminate(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def agent_processes(root: str, tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """Start real ``edge-offload agent`` processes; every one is stopped at teardown."""
    started: list[AgentProcess] = []

    def start(address: BrokerAddress, agent_id: str, *args: str) -> AgentProcess:
        log = tmp_path / f"{agent_id}.log"
        cmd = [
            sys.executable,
            "-m",
            "coordinator.cli",
            "--log-level",
            "INFO",
            "agent",
            "--broker",
            address.url,
            "--root",
            root,
            "--id",
            agent_id,
            "--models-dir",
            str(MODELS),
            "--heartbeat",
            "0.5",
            "--spool-dir",
            str(tmp_path / f"{agent_id}-spool"),
            "--model-cache-dir",
            str(tmp_path / f"{agent_id}-models"),
            *args,
        ]
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
        ap = AgentProcess(agent_id, proc, log)
        started.append(ap)
        return ap

    yield start
    for ap in started:
        with contextlib.suppress(Exception):
            ap.terminate(timeout=10)
        if ap.proc.poll() is None:
            ap.kill()


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.02)


async def cli(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run ``edge-offload`` without blocking the event loop (an in-process coordinator
    and agents keep running meanwhile)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
