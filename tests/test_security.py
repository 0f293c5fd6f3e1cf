"""The production broker configuration, attacked, and the coordinator's own checks.

A real Mosquitto runs ``broker_config/mosquitto-prod.conf`` and ``broker_config/acl``
as shipped (only paths, ports and the loopback address are rewritten), with a CA and
device certificates made by ``broker_config/make-dev-ca.sh`` and ``make-device-cert.sh``
and password users made by ``mosquitto_passwd``.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import re
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import pytest

from agent import Agent, AgentConfig
from coordinator import Coordinator, CoordinatorConfig, OffloadClient
from coordinator.broker import LocalBroker, find_mosquitto, free_port
from protocol import BrokerAddress, JobError, TaskResult, Topics, encode_arrays
from protocol.transport import connect_options
from tests.agent.test_agent import raw_client
from tests.conftest import MODELS, REPO, require_mosquitto, wait_until
from tests.coordinator.test_failures import assert_exact

CONFIG = REPO / "broker_config"
ROOT = "offload/v1"  # the root the shipped ACL is written for
TOPICS = Topics(ROOT)
DEVICES = ("coordinator", "a0", "a1", "bridge-plant-1")


@dataclass
class SecureBroker:
    mtls_port: int
    password_port: int
    pki: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def device(self, name: str, **changes: Any) -> BrokerAddress:
        """Log in with the certificate issued to ``name``."""
        address = BrokerAddress.parse(
            f"mqtts://localhost:{self.mtls_port}",
            ca_file=str(self.pki / "ca.crt"),
            cert_file=str(self.pki / f"{name}.crt"),
            key_file=str(self.pki / f"{name}.key"),
        )
        return replace(address, **changes)

    def user(self, name: str, password: str) -> BrokerAddress:
        """Log in with a password over TLS."""
        return BrokerAddress.parse(
            f"mqtts://localhost:{self.password_port}",
            ca_file=str(self.pki / "ca.crt"),
            username=name,
            password=password,
        )


def render(conf: str, pki: Path, state: Path, mtls_port: int, password_port: int) -> str:
    """The shipped config with this test's paths and ports, on loopback."""
    conf = conf.replace("/etc/mosquitto/certs/", f"{pki}/")
    conf = conf.replace("/etc/mosquitto/passwd", str(state / "passwd"))
    conf = conf.replace("/etc/mosquitto/acl", str(state / "acl"))
    conf = conf.replace("/var/lib/mosquitto/", f"{state}/")
    conf = conf.replace("listener 8883\n", f"listener {mtls_port} 127.0.0.1\n")
    conf = conf.replace("listener 8884\n", f"listener {password_port} 127.0.0.1\n")
    conf = conf.replace("log_dest syslog", "log_dest stderr")
    assert conf.count("127.0.0.1\n") == 2, "the shipped config's listeners changed"
    return run_as_me(conf)


def run_as_me(conf: str) -> str:
    """Run Mosquitto as the user starting the test, who can read the test's key files
    (started as root, it would switch to user mosquitto)."""
    return f"user {getpass.getuser()}\n{conf}"


def agent_config(agent_id: str, broker: BrokerAddress, tmp_path: Path) -> AgentConfig:
    return AgentConfig(
        agent_id=agent_id,
        broker=broker,
        root=ROOT,
        models_dirs=(MODELS,),
        benchmark=False,
        heartbeat_s=0.5,
        spool_dir=tmp_path / f"{agent_id}-spool",
    )


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    require_mosquitto()
    tmp = tmp_path_factory.mktemp("secure-broker")
    pki = tmp / "pki"
    subprocess.run([str(CONFIG / "make-dev-ca.sh"), str(pki), "localhost"], check=True)
    for name in DEVICES:
        subprocess.run([str(CONFIG / "make-device-cert.sh"), str(pki), name], check=True)
    passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    for i, (user, password) in enumerate((("ops", "ops-secret"), ("other", "x"))):
        flags = ["-c", "-b"] if i == 0 else ["-b"]
        subprocess.run([passwd, *flags, str(tmp / "passwd"), user, password], check=True)
    for wildcard in ("+", "#"):  # refused or not by mosquitto_passwd: either way, no access
        subprocess.run([passwd, "-b", str(tmp / "passwd"), wildcard, "x"], check=False)
    shutil.copy(CONFIG / "acl", tmp / "acl")
    mtls_port, password_port = free_port(), free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        render((CONFIG / "mosquitto-prod.conf").read_text(), pki, tmp, mtls_port, password_port)
    )
    log = tmp / "broker.log"
    mosquitto = find_mosquitto()
    assert mosquitto is not None
    with open(log, "wb") as f:
        proc = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=f, stderr=subprocess.STDOUT)
    broker = SecureBroker(mtls_port, password_port, pki, proc, log)
    try:
        deadline = time.monotonic() + 10
        while not _tls_port_open(mtls_port):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield broker
    finally:
        proc.terminate()
        proc.wait(10)


def _tls_port_open(port: int) -> bool:
    import socket

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


@contextlib.asynccontextmanager
async def mqtt(address: BrokerAddress, client_id: str = "") -> AsyncIterator[aiomqtt.Client]:
    # A refused TLS handshake is not always answered: do not wait 10 s for each one.
    options = connect_options(address, identifier=client_id or None, timeout=2)
    async with aiomqtt.Client(**options) as c:
        yield c


@dataclass
class Attempts:
    """Every attack tried, and whether it worked (the goal: none)."""

    tried: list[tuple[str, bool]] = field(default_factory=list)

    def record(self, what: str, succeeded: bool) -> None:
        self.tried.append((what, succeeded))

    @property
    def succeeded(self) -> list[str]:
        return [what for what, ok in self.tried if ok]


async def connects(address: BrokerAddress) -> bool:
    address = replace(address, keepalive=5)
    try:
        async with mqtt(address):
            return True
    except (aiomqtt.MqttError, ssl.SSLError, OSError):
        return False


async def receives(listener: aiomqtt.Client, topic: str, wait: float = 0.3) -> bool:
    """Did ``listener`` (already subscribed) get a message on ``topic`` within ``wait``?"""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(wait):
            async for m in listener.messages:
                if m.topic.value == topic:
                    return True
    return False


async def test_the_production_broker_confines_every_identity(secure_broker: SecureBroker) -> None:
    b = secure_broker
    log = Attempts()
    plain = BrokerAddress(host="127.0.0.1", port=b.mtls_port)

    # -- who may connect at all --------------------------------------------------------
    anonymous = replace(b.user("x", "y"), username=None, password=None)
    log.record("anonymous, TLS, password listener", await connects(anonymous))
    log.record("plain text to the certificate listener", await connects(plain))
    log.record(
        "plain text to the password listener",
        await connects(BrokerAddress(host="127.0.0.1", port=b.password_port)),
    )
    log.record(
        "TLS without a client certificate",
        await connects(replace(b.device("a0"), cert_file=None, key_file=None)),
    )
    log.record("a wrong password", await connects(b.user("ops", "guess")))
    assert await connects(b.device("a0")) and await connects(b.user("ops", "ops-secret"))

    # -- user names that are MQTT wildcards ----------------------------------------------
    # The password file given to the broker holds users "+" and "#" (an operator's
    # mistake; the provisioning scripts refuse such names). If %u expanded to them, the
    # ACL's agent patterns would cover every agent.
    for name in ("+", "#"):
        refused = await asyncio.to_thread(
            subprocess.run,
            [str(CONFIG / "make-device-cert.sh"), str(b.pki), name],
            capture_output=True,
        )
        assert refused.returncode == 2, "make-device-cert.sh refuses a wildcard name"
        if not await connects(b.user(name, "x")):
            log.record(f"user name {name!r} logs in", False)
            continue
        async with mqtt(b.device("coordinator")) as coord, mqtt(b.user(name, "x")) as wild:
            await coord.subscribe(TOPICS.all_agents("results"), qos=1)
            await wild.subscribe(TOPICS.all_agents("tasks"), qos=1)
            await wild.subscribe(f"{ROOT}/agents/{name}/tasks", qos=1)
            await coord.publish(TOPICS.tasks("a0"), b"{}", qos=1)
            got = await receives(wild, TOPICS.tasks("a0"))
            log.record(f"user {name!r} reads every agent's tasks", got)
            await wild.publish(TOPICS.results("a0"), b"{}", qos=1)
            got = await receives(coord, TOPICS.results("a0"))
            log.record(f"user {name!r} publishes an agent's results", got)

    # -- what a0's credentials may do --------------------------------------------------
    async with (
        mqtt(b.device("coordinator")) as coord,
        mqtt(b.device("a1")) as a1,
        mqtt(b.device("a0")) as a0,
    ):
        await coord.subscribe(TOPICS.all_agents("results"), qos=1)
        await a1.subscribe(TOPICS.tasks("a1"), qos=1)
        # reading another agent's work, or everything, one way at a time
        for topic in (TOPICS.tasks("a1"), "#", f"{ROOT}/#", TOPICS.all_agents("tasks")):
            await a0.subscribe(topic, qos=1)
            await coord.publish(TOPICS.tasks("a1"), b'{"probe": 1}', qos=1)
            got = await receives(a0, TOPICS.tasks("a1"))
            log.record(f"a0 reads a1's tasks by subscribing to {topic!r}", got)
            assert await receives(a1, TOPICS.tasks("a1")), "the legitimate reader got it"
            await a0.unsubscribe(topic)
        # forging another agent's results, or commanding any agent (itself included)
        await a0.publish(TOPICS.results("a1"), b'{"forged": 1}', qos=1)
        log.record("a0 publishes on a1's results", await receives(coord, TOPICS.results("a1")))
        await a0.publish(TOPICS.tasks("a1"), b'{"run": "evil"}', qos=1)
        log.record("a0 publishes a task to a1", await receives(a1, TOPICS.tasks("a1")))
        await a0.subscribe(TOPICS.tasks("a0"), qos=1)
        await a0.publish(TOPICS.tasks("a0"), b'{"run": "evil"}', qos=1)
        log.record("a0 publishes a task to itself", await receives(a0, TOPICS.tasks("a0")))
        # its own topics still work
        await a0.publish(TOPICS.results("a0"), b'{"mine": 1}', qos=1)
        assert await receives(coord, TOPICS.results("a0"))

    # taking over a1's session by claiming its client id
    async with mqtt(b.device("coordinator")) as coord, mqtt(b.device("a1")) as a1:
        await a1.subscribe(TOPICS.tasks("a1"), qos=1)
        async with mqtt(b.device("a0"), client_id="a1"):
            await coord.publish(TOPICS.tasks("a1"), b'{"still": "a1"}', qos=1)
            log.record(
                "a0 connects as client id 'a1' and a1 loses its session",
                not await receives(a1, TOPICS.tasks("a1"), wait=1.0),
            )

    # -- what a client's password may do ----------------------------------------------
    async with mqtt(b.device("coordinator")) as coord, mqtt(b.user("ops", "ops-secret")) as ops:
        await coord.subscribe(f"{TOPICS.submit}/+", qos=1)
        await ops.publish(TOPICS.submit_as("other"), b"{}", qos=1)
        got = await receives(coord, TOPICS.submit_as("other"))
        log.record("ops submits a job as 'other'", got)
        await ops.publish(TOPICS.state("ops"), b"{}", qos=1)
        await ops.subscribe(TOPICS.tasks("a0"), qos=1)
        await coord.publish(TOPICS.tasks("a0"), b"{}", qos=1)
        log.record("ops reads a0's tasks", await receives(ops, TOPICS.tasks("a0")))
        await ops.publish(TOPICS.submit_as("ops"), b"{}", qos=1)
        assert await receives(coord, TOPICS.submit_as("ops")), "its own submissions go through"

    print(f"\n{len(log.tried)} attacks tried, {len(log.succeeded)} succeeded")
    for what, ok in log.tried:
        print(f"  {'SUCCEEDED' if ok else 'refused  '}  {what}")
    assert len(log.tried) >= 15
    assert log.succeeded == []


async def test_a_job_runs_end_to_end_over_tls_with_certificates_and_passwords(
    secure_broker: SecureBroker, digits: Any, tmp_path: Path
) -> None:
    b = secure_broker
    async with (
        Agent(agent_config("a0", b.device("a0"), tmp_path)) as agent,
        Coordinator(
            CoordinatorConfig(broker=b.device("coordinator"), root=ROOT, client_id="coordinator")
        ) as coord,
        OffloadClient(b.user("ops", "ops-secret"), root=ROOT) as client,
    ):
        await agent.wait_connected()
        await coord.wait_connected()
        await coord.wait_for_agents(1)
        x = digits[0][:300]
        out = await client.run("digits-mlp", {"input": x}, batch_size=100, timeout=60)
    assert_exact(out, x)
    assert client.client_id == "ops", "the client's identity is its login"


async def test_secrets_never_reach_the_logs(
    secure_broker: SecureBroker, caplog: pytest.LogCaptureFixture
) -> None:
    address = secure_broker.user("ops", "hunter2-not-the-password")
    assert "hunter2" not in repr(address) and "hunter2" not in str(
        CoordinatorConfig(broker=address)
    )
    with caplog.at_level("DEBUG"), pytest.raises((aiomqtt.MqttError, OSError)):
        async with OffloadClient(address, root=ROOT):
            pass
    assert "hunter2" not in caplog.text


async def test_a_job_runs_through_a_site_broker_bridged_to_the_central_one(
    secure_broker: SecureBroker, digits: Any, tmp_path: Path
) -> None:
    """Agents on a site broker (Mosquitto, development config), the coordinator and the
    client on the central one (the production config), joined by broker_config's bridge
    over mutual TLS."""
    central = secure_broker
    bridge = (CONFIG / "bridge-site.conf").read_text()
    bridge = bridge.replace("central.example.net:8883", f"127.0.0.1:{central.mtls_port}")
    bridge = bridge.replace("/etc/mosquitto/certs/", f"{central.pki}/")
    site_conf = tmp_path / "site.conf"
    site_conf.write_text(run_as_me((CONFIG / "mosquitto-dev.conf").read_text() + "\n" + bridge))
    with LocalBroker(kind="mosquitto", config=site_conf) as site:
        site_address = BrokerAddress(host=site.info.host, port=site.info.port)
        async with (
            Coordinator(
                CoordinatorConfig(
                    broker=central.device("coordinator"), root=ROOT, client_id="coordinator"
                )
            ) as coord,
            Agent(agent_config("a1", site_address, tmp_path)),
            OffloadClient(central.user("ops", "ops-secret"), root=ROOT) as client,
        ):
            await coord.wait_connected()
            await coord.wait_for_agents(1, timeout=30)
            x = digits[0][:500]
            out = await client.run("digits-mlp", {"input": x}, batch_size=100, timeout=60)
    assert_exact(out, x)
    assert set(out.result.per_agent) == {"a1"}, "the work ran on the site's agent"


# -- checks that hold even when the broker is misconfigured (no ACL at all) ------------


async def test_forged_results_are_rejected_by_the_coordinator(
    mosquitto_address: BrokerAddress, agent_factory: Any, coordinator_factory: Any, digits: Any
) -> None:
    await agent_factory(mosquitto_address, "real", slots=1)
    coord: Coordinator = await coordinator_factory(mosquitto_address)
    await coord.wait_for_agents(1)
    topics = Topics(coord.config.root)
    x = digits[0][:200]
    handle = coord.submit_arrays("digits-mlp", {"input": x}, batch_size=100)
    job_id = handle.job_id

    def forged(agent_id: str, attempt: int) -> bytes:
        return TaskResult(
            task_id=f"{job_id}.0",
            job_id=job_id,
            attempt=attempt,
            agent_id=agent_id,
            ok=True,
            outputs=encode_arrays({"label": np.zeros(100, np.int64)}),
        ).to_json()

    before = dict(coord.rejected)
    async with raw_client(mosquitto_address) as attacker:
        # claims to be "real" on another agent's topic; is "real" on its topic but for an
        # attempt it never got; comes from an agent nobody leased anything to
        await attacker.publish(topics.results("intruder"), forged("real", 1), qos=1)
        await attacker.publish(topics.results("real"), forged("real", 99), qos=1)
        await attacker.publish(topics.results("ghost"), forged("ghost", 1), qos=1)
        await wait_until(
            lambda: (
                coord.rejected["forged_result"] > before.get("forged_result", 0)
                and coord.rejected["stale_result"] > before.get("stale_result", 0)
            ),
            what="the forgeries to be counted",
        )
    out = await handle.result(timeout=30)
    assert_exact(out, x)


async def test_only_allowed_identities_may_submit_and_floods_are_limited(
    mosquitto_address: BrokerAddress, agent_factory: Any, coordinator_factory: Any, root: str
) -> None:
    await agent_factory(mosquitto_address, "worker", slots=1)
    coord: Coordinator = await coordinator_factory(
        mosquitto_address, allowed_clients=("ops",), client_rate_per_s=1.0, client_burst=3.0
    )
    await coord.wait_for_agents(1)
    x = np.zeros((4, 64), np.float32)
    async with (
        OffloadClient(mosquitto_address, root=root, client_id="intruder") as intruder,
        OffloadClient(mosquitto_address, root=root, client_id="ops") as ops,
    ):
        with pytest.raises(JobError) as e:
            await intruder.run("digits-mlp", x, timeout=10)
        assert e.value.code == "forbidden" and "'intruder'" in str(e.value)
        out = await ops.run("digits-mlp", x, timeout=10)
        assert out["label"].shape == (4,)
        handles = [await ops.submit("digits-mlp", x) for _ in range(6)]
        await wait_until(lambda: coord.rejected["job_rate_limited"] >= 3, what="the flood cut")
        done = 0
        for h in handles:
            with contextlib.suppress(TimeoutError):
                await h.result(timeout=1)
                done += 1
        assert 1 <= done <= 3, "the burst went through, the rest was refused"
    assert re.search(r"job_forbidden", str(dict(coord.rejected)))
