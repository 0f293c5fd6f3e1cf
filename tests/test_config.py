"""Configuration: defaults < TOML file < environment < command-line overrides, as documented."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent import AgentConfig
from coordinator import CoordinatorConfig
from protocol import BrokerAddress, ProtocolError

TOML = """
[agent]
agent_id = "press-7"
broker = "mqtt://broker.local:1884"
slots = 2
labels = { site = "plant-1", line = "3" }
models_dirs = ["/opt/models"]
heartbeat_s = 2.5

[coordinator]
broker = "tcp://central:1885"
policy = "round_robin"
target_task_ms = 20.0
max_attempts = 5
wire_encoding = "json"
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "edge-offload.toml"
    path.write_text(TOML)
    return path


def test_agent_config_precedence(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = AgentConfig.load(config_file)
    assert cfg.agent_id == "press-7" and cfg.slots == 2 and cfg.heartbeat_s == 2.5
    assert cfg.broker == BrokerAddress(host="broker.local", port=1884)
    assert cfg.labels == {"site": "plant-1", "line": "3"}
    assert cfg.models_dirs == (Path("/opt/models"),)

    monkeypatch.setenv("EDGE_OFFLOAD_AGENT_SLOTS", "4")
    monkeypatch.setenv("EDGE_OFFLOAD_AGENT_LABELS", "site=plant-2")
    cfg = AgentConfig.load(config_file)
    assert cfg.slots == 4 and cfg.labels == {"site": "plant-2"}, "environment beats the file"
    cfg = AgentConfig.load(config_file, slots=8, agent_id=None)
    assert cfg.slots == 8 and cfg.agent_id == "press-7", "options beat both; None is unset"


def test_coordinator_config_precedence(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CoordinatorConfig.load(config_file)
    assert cfg.broker == BrokerAddress(host="central", port=1885)
    assert (cfg.policy, cfg.target_task_ms, cfg.max_attempts) == ("round_robin", 20.0, 5)
    assert cfg.wire_encoding == "json"
    monkeypatch.setenv("EDGE_OFFLOAD_COORDINATOR_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("EDGE_OFFLOAD_COORDINATOR_DEAD_AFTER_S", "30")
    cfg = CoordinatorConfig.load(config_file, policy="least_loaded")
    assert (cfg.max_attempts, cfg.dead_after_s, cfg.policy) == (7, 30.0, "least_loaded")


def test_broker_from_the_environment_when_nothing_else_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EDGE_OFFLOAD_BROKER", "mqtt://[::1]:1999")
    assert CoordinatorConfig.load().broker == BrokerAddress(host="::1", port=1999)
    assert AgentConfig.load(agent_id="a1").broker.url == "mqtt://[::1]:1999"


@pytest.mark.parametrize(
    "bad",
    [
        {"agent_id": "a/b"},
        {"agent_id": "+"},
        {"slots": 0},
        {"slowdown": 0.5},
        {"broker": "ws://x:1"},
        {"labels": "nokey"},
    ],
)
def test_invalid_agent_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises((ValueError, ProtocolError)):
        AgentConfig.load(**bad)


def test_broker_tls_and_credentials_from_a_table_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    path = tmp_path / "edge.toml"
    path.write_text(
        "[agent]\nagent_id = 'a0'\n"
        "[agent.broker]\nurl = 'mqtts://broker.local'\nca_file = '/etc/ca.crt'\n"
        "cert_file = '/etc/a0.crt'\nkey_file = '/etc/a0.key'\n"
        "[coordinator]\nallowed_clients = ['ops', 'hmi']\n"
    )
    cfg = AgentConfig.load(path)
    b = cfg.broker
    assert (b.tls, b.port, b.ca_file, b.cert_file, b.key_file) == (
        True,
        8883,
        "/etc/ca.crt",
        "/etc/a0.crt",
        "/etc/a0.key",
    )
    assert b.url == "mqtts://broker.local:8883"
    monkeypatch.setenv("EDGE_OFFLOAD_USERNAME", "coordinator")
    monkeypatch.setenv("EDGE_OFFLOAD_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("EDGE_OFFLOAD_COORDINATOR_CLIENT_RATE_PER_S", "5")
    coord = CoordinatorConfig.load(path)
    assert (coord.broker.username, coord.broker.password) == ("coordinator", "s3cret")
    assert coord.allowed_clients == ("ops", "hmi") and coord.client_rate_per_s == 5.0
    assert "s3cret" not in repr(coord) and "s3cret" not in repr(coord.broker)
    with pytest.raises(ValueError, match="broker table needs 'url'"):
        path.write_text("[agent]\nagent_id = 'a0'\n[agent.broker]\nhost = 'x'\n")
        AgentConfig.load(path)
