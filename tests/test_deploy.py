"""The deployment files in deploy/ are valid, hardened and agree with the code they run.

systemd units (systemd-analyze verify and security, systemd-sysusers), Docker images and
compose (hadolint, the Compose Specification's JSON schema, the entrypoint and health check
run for real), Kubernetes manifests (kubernetes-validate's bundled API schemas, kubectl
kustomize) and the checks of our own that no schema makes: every command line parses with
the real CLI parser, every EDGE_OFFLOAD_* variable names a real configuration field, label
selectors match, references resolve. Each home-made check is also run on a broken copy, to
show that it fails. No network: everything runs offline, on this machine's loopback.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import tomllib
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from agent import AgentConfig
from agent.config import ENV_PREFIX as AGENT_ENV_PREFIX
from coordinator import CoordinatorConfig
from coordinator.broker import find_mosquitto
from coordinator.cli import build_parser
from coordinator.config import ENV_PREFIX as COORDINATOR_ENV_PREFIX
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
SYSTEMD = DEPLOY / "systemd"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "kubernetes"

AGENT_UNITS = ["edge-offload-agent.service", "edge-offload-agent@.service"]
UNITS = [*AGENT_UNITS, "edge-offload-coordinator.service"]
DRAIN_S = AgentConfig(agent_id="x").drain_timeout_s
# Variables edge-offload (or its container entrypoint) reads besides the config fields.
GLOBAL_ENV = {
    "EDGE_OFFLOAD_BROKER",
    "EDGE_OFFLOAD_USERNAME",
    "EDGE_OFFLOAD_PASSWORD",
    "EDGE_OFFLOAD_LOG_LEVEL",
    "EDGE_OFFLOAD_LOG_JSON",
}


def tool(name: str) -> str:
    """The path of a command-line tool, or skip: only when it is really not installed."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def unknown_env_names(names: set[str]) -> list[str]:
    """EDGE_OFFLOAD_* names that no code reads (a typo configures nothing, silently)."""
    agent_fields = {f.name for f in fields(AgentConfig)}
    coordinator_fields = {f.name for f in fields(CoordinatorConfig)}
    bad = []
    for name in sorted(names):
        if not name.startswith("EDGE_OFFLOAD_") or name in GLOBAL_ENV:
            continue
        if name.startswith(AGENT_ENV_PREFIX):
            ok = name[len(AGENT_ENV_PREFIX) :].lower() in agent_fields
        elif name.startswith(COORDINATOR_ENV_PREFIX):
            ok = name[len(COORDINATOR_ENV_PREFIX) :].lower() in coordinator_fields
        else:
            ok = False
        if not ok:
            bad.append(name)
    return bad


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """Parse with the real `edge-offload` parser; a typo fails here, not on a device."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"edge-offload refuses {argv}") from e


def test_unknown_env_names_catches_a_typo() -> None:
    assert unknown_env_names({"EDGE_OFFLOAD_AGENT_SLOTS", "EDGE_OFFLOAD_BROKER"}) == []
    assert unknown_env_names({"EDGE_OFFLOAD_AGENT_SLOT", "EDGE_OFFLOAD_BROKR"}) == [
        "EDGE_OFFLOAD_AGENT_SLOT",
        "EDGE_OFFLOAD_BROKR",
    ]


# --- systemd ---------------------------------------------------------------------------------

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """A unit file as {section: [(key, value), ...]}, repeated keys kept in order."""
    unit: Unit = {}
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            unit.setdefault(section, [])
            continue
        key, _, value = line.partition("=")
        unit.setdefault(section, []).append((key.strip(), value.strip()))
    return unit


def last(unit: Unit, section: str, key: str) -> str | None:
    values = [v for k, v in unit.get(section, []) if k == key]
    return values[-1] if values else None


def exec_start(unit: Unit) -> str:
    starts = [v for k, v in unit["Service"] if k == "ExecStart" and v]
    assert len(starts) == 1, starts
    return starts[0]


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m)?", value)
    assert match, value
    scale = {"ms": 0.001, "s": 1, None: 1, "min": 60, "m": 60}[match.group(2)]
    return float(match.group(1)) * scale


# What every unit must set: the sandbox, and how it is stopped and restarted.
HARDENING = {
    "User": "edge-offload",
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateUsers": "yes",
    "PrivateMounts": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectProc": "invisible",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "RemoveIPC": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "UMask": "0077",
    "KillSignal": "SIGTERM",
    "Restart": "on-failure",
}


def unit_problems(text: str) -> list[str]:
    """What is wrong with one of our units (an empty list when nothing is)."""
    unit = parse_unit(text)
    problems = [
        f"{key}={last(unit, 'Service', key)!r}, wanted {want!r}"
        for key, want in HARDENING.items()
        if last(unit, "Service", key) != want
    ]
    if last(unit, "Service", "DynamicUser") not in (None, "no"):
        problems.append("DynamicUser= is set, but the units share the static user")
    if not last(unit, "Service", "StateDirectory"):
        problems.append("no StateDirectory=")
    if last(unit, "Service", "ProcSubset") == "pid" and " agent " in exec_start(unit):
        problems.append("ProcSubset=pid hides /proc/stat and /proc/meminfo from heartbeats")
    for key in ("RestartSec", "TimeoutStopSec"):
        if last(unit, "Service", key) is None:
            problems.append(f"no {key}=")
    for key in ("StartLimitIntervalSec", "StartLimitBurst"):
        if last(unit, "Unit", key) is None:
            problems.append(f"no {key}= in [Unit]")
    if not any(k == "EnvironmentFile" for k, _ in unit["Service"]):
        problems.append("no EnvironmentFile=")
    if " agent " in exec_start(unit):
        stop = last(unit, "Service", "TimeoutStopSec")
        if stop is not None and seconds(stop) <= DRAIN_S:
            problems.append(f"TimeoutStopSec={stop} does not exceed the {DRAIN_S:.0f} s drain")
    return problems


@pytest.mark.parametrize("name", UNITS)
def test_unit_is_hardened(name: str) -> None:
    assert unit_problems((SYSTEMD / name).read_text()) == []


def test_unit_check_fails_on_a_weakened_unit() -> None:
    text = (SYSTEMD / "edge-offload-agent.service").read_text()
    assert unit_problems(text.replace("NoNewPrivileges=yes\n", "")) == [
        "NoNewPrivileges=None, wanted 'yes'"
    ]
    assert unit_problems(text.replace("TimeoutStopSec=45s", "TimeoutStopSec=20s")) == [
        "TimeoutStopSec=20s does not exceed the 30 s drain"
    ]
    assert unit_problems(text.replace("ProtectSystem=strict", "ProtectSystem=full")) == [
        "ProtectSystem='full', wanted 'strict'"
    ]


def unit_argv(
    command: str, *, broker: str = "mqtt://broker.local:1883", instance: str = "p-7"
) -> list[str]:
    """An ExecStart= command line as the process would get it, binary path dropped."""
    command = command.replace("${EDGE_OFFLOAD_BROKER}", broker).replace("%i", instance)
    argv = shlex.split(command)
    assert argv[0].lstrip("-+@!:") == "/usr/local/bin/edge-offload", argv[0]
    return argv[1:]


@pytest.mark.parametrize("name", UNITS)
def test_unit_command_line_parses_and_writes_only_to_its_state_directory(name: str) -> None:
    unit = parse_unit((SYSTEMD / name).read_text())
    args = parse_cli(unit_argv(exec_start(unit)))
    assert args.broker == "mqtt://broker.local:1883", "the unit must pass --broker"
    state = Path("/var/lib") / str(last(unit, "Service", "StateDirectory")).replace("%i", "p-7")
    if args.command == "agent":
        assert Path(args.spool_dir).is_relative_to(state)
        if name.endswith("@.service"):
            assert args.agent_id == "p-7"
            assert "/agent-p-7/" in args.spool_dir, "instances must not share a spool"
    else:
        assert args.command == "coordinator"
        assert args.journal.is_relative_to(state)
    assert str(args.config).startswith("/etc/edge-offload/")


def verify_root(tmp_path: Path, dropins: dict[str, list[str]] | None = None) -> Path:
    """A file system root with our units (and drop-ins) installed, for --root=."""
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(SYSTEMD / name, units / name)
    for unit, files in (dropins or {}).items():
        (units / f"{unit}.d").mkdir()
        for f in files:
            shutil.copy(SYSTEMD / "dropins" / f, units / f"{unit}.d" / f)
    # The targets the units refer to: the host's own unit directory.
    system = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")))
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    # verify checks that ExecStart= binaries exist and are executable: install the real
    # console script (what pip installs) where the units expect it, and a shell.
    script = Path(sys.executable).parent / "edge-offload"
    if not script.exists():
        script = Path(shutil.which("edge-offload") or sys.executable)
    (root / "usr/local/bin").mkdir(parents=True)
    shutil.copy(script, root / "usr/local/bin/edge-offload")
    (root / "bin").mkdir()
    shutil.copy("/bin/sh", root / "bin/sh")
    return root


def systemd_verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("systemd-analyze"), "verify", f"--root={root}", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=root,
    )


AGENT = "edge-offload-agent.service"
TEMPLATE = "edge-offload-agent@.service"
COORDINATOR = "edge-offload-coordinator.service"
# name: ({unit: [drop-ins]}, units to verify)
VERIFY_CASES: dict[str, tuple[dict[str, list[str]], list[str]]] = {
    "units": ({}, [AGENT, "edge-offload-agent@press-7.service", COORDINATOR]),
    "gpu-nvidia": ({AGENT: ["gpu-nvidia.conf"]}, [AGENT]),
    "gpu-jetson": ({TEMPLATE: ["gpu-jetson.conf"]}, ["edge-offload-agent@orin-1.service"]),
    "agent-credentials": ({AGENT: ["agent-credentials.conf"]}, [AGENT]),
    "coordinator-credentials": ({COORDINATOR: ["coordinator-credentials.conf"]}, [COORDINATOR]),
}


@pytest.mark.parametrize("case", VERIFY_CASES)
def test_systemd_analyze_verify(tmp_path: Path, case: str) -> None:
    dropins, units = VERIFY_CASES[case]
    result = systemd_verify(verify_root(tmp_path, dropins), *units)
    # Unknown keys are only warnings (exit code 0): any output at all is a failure.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_analyze_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    root = verify_root(tmp_path)
    unit = root / "etc/systemd/system/edge-offload-agent.service"
    unit.write_text(unit.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = systemd_verify(root, "edge-offload-agent.service")
    assert "Unknown key 'NoNewPrivilege'" in result.stderr
    (root / "usr/local/bin/edge-offload").unlink()
    result = systemd_verify(root, "edge-offload-agent.service")
    assert result.returncode != 0 and "/usr/local/bin/edge-offload" in result.stderr


def exposure(root: Path, unit: str) -> float:
    result = subprocess.run(
        [tool("systemd-analyze"), "security", "--offline=yes", f"--root={root}", unit],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=root,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    return float(match.group(1))


def test_systemd_security_exposure(tmp_path: Path) -> None:
    """`systemd-analyze security` scores 0 (locked down) to 10 (exposed); README quotes it."""
    root = verify_root(tmp_path)
    scores = {
        unit: exposure(root, unit)
        for unit in (
            "edge-offload-agent.service",
            "edge-offload-agent@press-7.service",
            "edge-offload-coordinator.service",
        )
    }
    assert all(score <= 1.5 for score in scores.values()), scores
    readme = (SYSTEMD / "README.md").read_text()
    for score in scores.values():
        assert f"{score:.1f}" in readme, f"README.md does not quote the score {score}"
    unit = root / "etc/systemd/system/edge-offload-agent.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=no"))
    assert exposure(root, "edge-offload-agent.service") > scores["edge-offload-agent.service"]


def test_sysusers_creates_a_system_user_without_login(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    conf = (SYSTEMD / "sysusers.d/edge-offload.conf").read_text()
    subprocess.run(
        [tool("systemd-sysusers"), f"--root={tmp_path}", "-"],
        input=conf,
        text=True,
        check=True,
        capture_output=True,
        timeout=30,
    )
    users = {
        line.split(":")[0]: line.split(":")
        for line in (tmp_path / "etc/passwd").read_text().splitlines()
    }
    _, _, uid, gid, _, home, shell = users["edge-offload"]
    assert 0 < int(uid) < 1000 and int(gid) > 0
    assert shell.endswith("nologin") and home == "/var/lib/edge-offload"
    assert "edge-offload:" in (tmp_path / "etc/group").read_text()


def env_file_names(path: Path) -> set[str]:
    """KEY of every KEY=VALUE line, commented-out examples included."""
    names = set()
    for line in path.read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=.*", line.strip())
        if match:
            names.add(match.group(1))
    return names


def test_example_configuration_files_name_real_settings() -> None:
    etc = SYSTEMD / "etc"
    for env in ("agent.env", "coordinator.env"):
        names = env_file_names(etc / env)
        assert "EDGE_OFFLOAD_BROKER" in names and "EDGE_OFFLOAD_PASSWORD" in names
        assert unknown_env_names(names) == [], env
    # An unknown key in the TOML files is a TypeError here, as it would be on the device.
    agent = AgentConfig.load(etc / "agent.toml")
    coordinator = CoordinatorConfig.load(etc / "coordinator.toml")
    assert agent.drain_timeout_s < seconds("45s")
    assert coordinator.journal is None, "the unit sets the journal with --journal"
    assert "broker" not in tomllib.loads((etc / "agent.toml").read_text())["agent"]


def stub_edge_offload(bin_dir: Path) -> Path:
    """An `edge-offload` that prints its arguments and credentials as JSON."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    stub = bin_dir / "edge-offload"
    stub.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "print(json.dumps({'argv': sys.argv[1:], "
        "'password': os.environ.get('EDGE_OFFLOAD_PASSWORD')}))\n"
    )
    stub.chmod(0o755)
    return stub


@pytest.mark.parametrize("name", ["agent", "coordinator"])
def test_credentials_dropin_exports_the_password_and_runs_the_unit_command(
    tmp_path: Path, name: str
) -> None:
    unit = parse_unit((SYSTEMD / f"edge-offload-{name}.service").read_text())
    dropin = parse_unit((SYSTEMD / "dropins" / f"{name}-credentials.conf").read_text())
    assert next(v for k, v in dropin["Service"] if k == "ExecStart") == "", "must reset it first"
    credential, _, source = str(last(dropin, "Service", "LoadCredential")).partition(":")
    assert source.startswith("/etc/edge-offload/")
    # Run the drop-in's command as systemd would ($$ is a literal $), with a stub binary.
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / credential).write_text("s3cret")
    stub = stub_edge_offload(tmp_path / "bin")
    argv = shlex.split(exec_start(dropin).replace("$$", "$"))
    assert argv[0] == "/bin/sh"
    argv[-1] = argv[-1].replace("/usr/local/bin/edge-offload", str(stub))
    env = {"PATH": "/usr/bin:/bin", "CREDENTIALS_DIRECTORY": str(creds)}
    env["EDGE_OFFLOAD_BROKER"] = "mqtt://broker.local:1883"
    result = subprocess.run(argv, env=env, capture_output=True, text=True, check=True, timeout=30)
    out = json.loads(result.stdout)
    assert out["password"] == "s3cret"
    # ... and it is the unit's own command line: the two cannot drift apart.
    assert out["argv"] == unit_argv(exec_start(unit))
    # Without the credential the shell stops (sh -e) instead of starting with no password.
    (creds / credential).unlink()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and result.stdout == ""


# --- Docker ----------------------------------------------------------------------------------

DOCKERFILES = {
    "agent": DOCKER / "Dockerfile.agent",
    "coordinator": DOCKER / "Dockerfile.coordinator",
}


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    steps = instructions(dockerfile)
    start = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[start:]


def copy_sources(dockerfile: Path) -> list[str]:
    """Paths COPY takes from the build context (the repository root)."""
    sources = []
    for word, rest in instructions(dockerfile):
        if word != "COPY" or "--from=" in rest:
            continue
        parts = [p for p in rest.split() if not p.startswith("--")]
        sources += [p.rstrip("/") for p in parts[:-1]]
    return sources


def dockerfile_problems(dockerfile: Path) -> list[str]:
    steps = instructions(dockerfile)
    final = final_stage(dockerfile)
    words = {word: rest for word, rest in final}
    problems = []
    args = dict(rest.split("=", 1) for word, rest in steps if word == "ARG" and "=" in rest)
    bases = [rest.split()[0] for word, rest in steps if word == "FROM"]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), "?"), b) for b in bases]
    if set(resolved) != {"python:3.11-slim"}:
        problems.append(f"base images {bases}, wanted python:3.11-slim")
    user = words.get("USER", "root").split(":")[0]
    if not user.isdigit() or int(user) == 0:
        problems.append(f"final USER {user!r} is not a numeric non-root uid")
    if words.get("STOPSIGNAL") != "SIGTERM":
        problems.append("no STOPSIGNAL SIGTERM")
    if "/var/lib/edge-offload" not in words.get("VOLUME", ""):
        problems.append("no VOLUME /var/lib/edge-offload")
    if "HEALTHCHECK" not in words:
        problems.append("no HEALTHCHECK")
    for source in copy_sources(dockerfile):
        if not (REPO / source).exists():
            problems.append(f"COPY {source}: no such file in the build context")
    return problems


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile(kind: str) -> None:
    assert dockerfile_problems(DOCKERFILES[kind]) == []


def test_dockerfile_check_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    text = DOCKERFILES["agent"].read_text()
    bad.write_text(
        text.replace("USER 10001:10001", "USER root").replace("COPY bench/", "COPY benches/")
    )
    assert dockerfile_problems(bad) == [
        "final USER 'root' is not a numeric non-root uid",
        "COPY benches: no such file in the build context",
    ]


def wheel_inputs() -> list[str]:
    """What hatchling reads to build the wheel: pyproject.toml, the readme, the packages."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    named = wheel.get("packages") or wheel.get("only-include") or wheel.get("files") or []
    return ["pyproject.toml", project["project"]["readme"], *named, *wheel.get("force-include", {})]


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerfile_copies_everything_the_wheel_is_built_from(kind: str) -> None:
    copied = copy_sources(DOCKERFILES[kind])
    missing = [
        p for p in wheel_inputs() if not any(p == c or p.startswith(c + "/") for c in copied)
    ]
    assert missing == []


def test_wheel_config_names_the_packages_in_a_key_hatchling_reads() -> None:
    # A key hatchling does not know (it once said `files`) builds a wheel without any
    # Python package: `pip install .` in the images would install nothing that runs.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    assert wheel["packages"] == ["protocol", "agent", "coordinator"]
    assert set(wheel) <= {"packages", "force-include"}


def dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(p.split("/")[-1], pattern[3:]) for p in prefixes)
        else:
            depth = pattern.count("/")
            hit = any(fnmatch.fnmatch(p, pattern) and p.count("/") == depth for p in prefixes)
        if hit:
            excluded = not negate
    return excluded


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_dockerignore_sends_what_copy_needs_and_nothing_else(kind: str) -> None:
    ignore = DOCKERFILES[kind].with_name(DOCKERFILES[kind].name + ".dockerignore")
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in copy_sources(DOCKERFILES[kind]):
        assert not dockerignore_excludes(patterns, source), source
        assert not dockerignore_excludes(patterns, source + "/daemon.py"), source
    for unwanted in (
        ".git",
        "tests/test_deploy.py",
        "agent/__pycache__/x.pyc",
        "deploy/kubernetes",
    ):
        assert dockerignore_excludes(patterns, unwanted), unwanted
    assert dockerignore_excludes(patterns[:-2], "agent/__pycache__/x.pyc") is False


def test_hadolint_passes_and_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    hadolint = tool("hadolint")
    for dockerfile in DOCKERFILES.values():
        result = subprocess.run(
            [hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60
        )
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), dockerfile
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install curl\nCMD python\n")
    result = subprocess.run([hadolint, str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout


def run_entrypoint(tmp_path: Path, args: list[str], **env: str) -> list[str]:
    """Run deploy/docker/entrypoint.sh with a stub `edge-offload`; the argv it would get."""
    bin_dir = tmp_path / "bin"
    stub_edge_offload(bin_dir)
    result = subprocess.run(
        ["/bin/sh", str(DOCKER / "entrypoint.sh"), *args],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    argv: list[str] = json.loads(result.stdout)["argv"]
    return argv


def cmd_of(dockerfile: Path) -> list[str]:
    cmd: list[str] = json.loads(dict(final_stage(dockerfile))["CMD"])
    return cmd


@pytest.mark.parametrize("kind", DOCKERFILES)
def test_image_command_runs_the_service_against_the_configured_broker(
    tmp_path: Path, kind: str
) -> None:
    words = dict(final_stage(DOCKERFILES[kind]))
    assert json.loads(words["ENTRYPOINT"]) == ["edge-offload-entrypoint"]
    argv = run_entrypoint(tmp_path, cmd_of(DOCKERFILES[kind]), EDGE_OFFLOAD_BROKER="mqtt://b:1884")
    args = parse_cli(argv)
    assert (args.command, args.broker, args.log_level, args.log_json) == (
        kind,
        "mqtt://b:1884",
        "INFO",
        False,
    )
    if kind == "agent":
        assert args.spool_dir == "/var/lib/edge-offload/results"
    else:
        assert str(args.journal) == "/var/lib/edge-offload/journal.sqlite"


def test_entrypoint_options_and_pass_through(tmp_path: Path) -> None:
    env = {"EDGE_OFFLOAD_LOG_JSON": "1", "EDGE_OFFLOAD_LOG_LEVEL": "DEBUG"}
    argv = run_entrypoint(tmp_path, ["agent", "--broker", "mqtt://other:1"], **env)
    args = parse_cli(argv)
    assert (args.broker, args.log_json, args.log_level) == ("mqtt://other:1", True, "DEBUG")
    assert run_entrypoint(tmp_path, ["schema", "--out", "x"]) == ["schema", "--out", "x"]
    assert parse_cli(run_entrypoint(tmp_path, ["agents", "--json"])).broker == "mqtt://broker:1883"


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", DOCKER / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_sees_the_connection_to_the_broker() -> None:
    health = load_healthcheck()
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        url = f"mqtt://127.0.0.1:{port}"
        assert health.check(url)[0] is False
        with socket.create_connection(("127.0.0.1", port)) as client:
            peer, _ = server.accept()
            with peer:
                deadline = time.monotonic() + 5
                while not health.check(url)[0] and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert health.check(url) == (True, f"connected to the broker 127.0.0.1:{port}")
                assert health.check(f"mqtt://localhost:{port}")[0] is True
                other = port + 1 if port < 65535 else port - 1
                assert health.check(f"mqtt://127.0.0.1:{other}")[0] is False
            client.close()


def test_healthcheck_reads_proc_net_tcp_and_tcp6(tmp_path: Path) -> None:
    health = load_healthcheck()
    header = "  sl  local_address rem_address   st tx_queue rx_queue\n"
    # 10.0.0.5:1883 ESTABLISHED; the same peer but LISTEN (0A) must not count.
    (tmp_path / "tcp").write_text(
        header
        + "   0: 0100007F:A1B2 0500000A:075B 01 00000000:00000000\n"
        + "   1: 0100007F:A1B3 0600000A:075B 0A 00000000:00000000\n"
    )
    # [::1]:8883 and the IPv4-mapped ::ffff:10.0.0.7:1883, both ESTABLISHED.
    (tmp_path / "tcp6").write_text(
        header
        + "   0: 00000000000000000000000001000000:A1B4 00000000000000000000000001000000:22B3 01 0\n"
        + "   1: 00000000000000000000000001000000:A1B5 0000000000000000FFFF00000700000A:075B 01 0\n"
    )
    peers = {(str(a), p) for a, p in health.established_peers(tmp_path)}
    assert peers == {("10.0.0.5", 1883), ("::1", 8883), ("10.0.0.7", 1883)}
    assert health.check("mqtt://[::1]:8883", proc_net=tmp_path)[0] is True
    assert health.check("mqtt://127.0.0.1:1883", proc_net=tmp_path)[0] is False
    assert health.broker_endpoint("broker") == ("broker", 1883)
    assert health.broker_endpoint("tcp://b:1") == ("b", 1)


# --- compose ---------------------------------------------------------------------------------


def load_compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    return data


def listener_port(conf: str) -> int:
    ports = [int(line.split()[1]) for line in conf.splitlines() if line.startswith("listener ")]
    assert len(ports) == 1, ports
    return ports[0]


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def compose_problems(compose: dict[str, Any]) -> list[str]:
    problems = []
    services: dict[str, Any] = compose["services"]
    declared = set(compose.get("volumes") or {})
    broker_port = listener_port((DOCKER / "mosquitto.conf").read_text())
    agent_ids: dict[str, str] = {}
    spools: dict[str, str] = {}
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                problems.append(f"{name}: no Dockerfile {build.get('dockerfile')} in {context}")
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                if not (DOCKER / source).exists():
                    problems.append(f"{name}: bind mount {source} does not exist")
            elif source not in declared:
                problems.append(f"{name}: volume {source} is not declared")
        for dep, cond in (svc.get("depends_on") or {}).items():
            if dep not in services:
                problems.append(f"{name}: depends on unknown service {dep}")
            elif cond.get("condition") == "service_healthy" and "healthcheck" not in services[dep]:
                problems.append(f"{name}: waits for {dep} to be healthy, it has no healthcheck")
        env = env_of(svc)
        problems += [f"{name}: unknown variable {v}" for v in unknown_env_names(set(env))]
        if "EDGE_OFFLOAD_BROKER" in env:
            host, _, port = env["EDGE_OFFLOAD_BROKER"].removeprefix("mqtt://").partition(":")
            if host not in services or int(port or 1883) != broker_port:
                problems.append(f"{name}: broker {env['EDGE_OFFLOAD_BROKER']} is not a service")
        if "Dockerfile.agent" in str(build):
            agent_id = env.get("EDGE_OFFLOAD_AGENT_AGENT_ID", "")
            if not agent_id or agent_id in agent_ids.values():
                problems.append(f"{name}: agent id {agent_id!r} missing or not unique")
            agent_ids[name] = agent_id
            by_target = {v.split(":")[1]: v.split(":")[0] for v in svc.get("volumes", [])}
            spool = by_target.get("/var/lib/edge-offload", "")
            if not spool or spool in spools.values():
                problems.append(f"{name}: spool volume {spool!r} missing or shared")
            spools[name] = spool
            if seconds(str(svc.get("stop_grace_period", "10s"))) <= DRAIN_S:
                problems.append(f"{name}: stop_grace_period shorter than the drain")
    if len(agent_ids) < 2:
        problems.append(f"{len(agent_ids)} agent(s), wanted at least 2")
    return problems


def test_compose_services_fit_together() -> None:
    compose = load_compose()
    assert compose_problems(compose) == []
    broker = compose["services"]["broker"]
    assert broker["image"].startswith("eclipse-mosquitto:2")
    assert "./mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" in broker["volumes"]
    assert all(p.startswith("127.0.0.1:") for p in broker.get("ports", []))


def test_compose_check_fails_on_a_broken_file() -> None:
    compose = load_compose()
    broken = copy.deepcopy(compose)
    broken["services"]["agent-2"]["environment"]["EDGE_OFFLOAD_AGENT_AGENT_ID"] = "agent-1"
    broken["services"]["agent-2"]["stop_grace_period"] = "10s"
    broken["services"]["coordinator"]["environment"]["EDGE_OFFLOAD_BROKER"] = "mqtt://brokr:1883"
    del broken["volumes"]["coordinator-journal"]
    assert compose_problems(broken) == [
        "coordinator: volume coordinator-journal is not declared",
        "coordinator: broker mqtt://brokr:1883 is not a service",
        "agent-2: agent id 'agent-1' missing or not unique",
        "agent-2: stop_grace_period shorter than the drain",
    ]


def check_jsonschema(
    path: Path, schema: str = "vendor.compose-spec"
) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.skip("check-jsonschema is not installed (pip install -e '.[test]')")
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    """The Compose Specification's JSON schema, as vendored by check-jsonschema (offline)."""
    result = check_jsonschema(DOCKER / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(
        (DOCKER / "compose.yaml").read_text().replace("stop_grace_period:", "stop_grace:", 1)
    )
    result = check_jsonschema(broken)
    assert result.returncode != 0 and "stop_grace" in result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def mqtt_connack(port: int) -> bytes:
    """Send an MQTT 3.1.1 CONNECT; return the broker's CONNACK."""
    client_id = b"deploy-test"
    variable = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(bytes([0x10, len(variable)]) + variable)
        return s.recv(4)


@pytest.fixture
def mosquitto_binary() -> str:
    path = find_mosquitto()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(
                "mosquitto is not installed, and CI requires it (apt-get install mosquitto)"
            )
        pytest.skip("mosquitto not installed (apt-get install mosquitto mosquitto-clients)")
    return str(path)


def test_mosquitto_runs_with_the_deployment_config(tmp_path: Path, mosquitto_binary: str) -> None:
    """Mosquitto refuses unknown options: start it on the config (on a loopback port)."""
    conf = (DOCKER / "mosquitto.conf").read_text()
    assert listener_port(conf) == 1883 and "listener 1883 0.0.0.0" in conf
    port = free_port()
    (tmp_path / "data").mkdir()
    conf = conf.replace("listener 1883 0.0.0.0", f"listener {port} 127.0.0.1").replace(
        "persistence_location /mosquitto/data/", f"persistence_location {tmp_path}/data/"
    )
    (tmp_path / "mosquitto.conf").write_text(conf)
    with subprocess.Popen(
        [mosquitto_binary, "-c", str(tmp_path / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as broker:
        try:
            deadline = time.monotonic() + 10
            while True:
                assert broker.poll() is None, broker.stderr.read() if broker.stderr else ""
                try:
                    assert mqtt_connack(port) == b"\x20\x02\x00\x00"
                    break
                except ConnectionRefusedError:
                    assert time.monotonic() < deadline, "mosquitto did not start listening"
                    time.sleep(0.05)
        finally:
            broker.terminate()
            broker.wait(timeout=10)
    assert broker.returncode == 0


# --- Kubernetes ------------------------------------------------------------------------------

WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet")


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def load_manifests() -> list[dict[str, Any]]:
    return [d for p in manifest_files() for d in yaml.safe_load_all(p.read_text()) if d]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def test_every_manifest_is_a_named_object_and_the_kustomization_lists_them() -> None:
    objects = load_manifests()
    assert objects
    for obj in objects:
        assert obj.get("apiVersion") and obj.get("kind") and obj["metadata"].get("name"), obj
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())
    assert (
        kustomization["namespace"] == find(objects, "Namespace", "edge-offload")["metadata"]["name"]
    )


def selects(selector: dict[str, str], workload: dict[str, Any]) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return all(labels.get(k) == v for k, v in selector.items())


def k8s_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Selectors, references, security contexts and resources: what no schema checks."""
    problems = []
    workloads = [o for o in objects if o["kind"] in WORKLOADS]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for w in workloads:
        where = f"{w['kind']}/{w['metadata']['name']}"
        selector = w["spec"]["selector"]["matchLabels"]
        labels = w["spec"]["template"]["metadata"]["labels"]
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            problems.append(f"{where}: selector {selector} does not match its pods {labels}")
        spec = pod_spec(w)
        pod_sc = spec.get("securityContext", {})
        if pod_sc.get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
        if spec.get("automountServiceAccountToken") is not False:
            problems.append(f"{where}: mounts a service account token it does not need")
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {c["metadata"]["name"] for c in w["spec"].get("volumeClaimTemplates", [])}
        for v in spec.get("volumes", []):
            if "configMap" in v and ("ConfigMap", v["configMap"]["name"]) not in names:
                problems.append(
                    f"{where}: volume {v['name']}: no ConfigMap {v['configMap']['name']}"
                )
        for c in spec["containers"]:
            csc = c.get("securityContext", {})
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}/{c['name']}: allowPrivilegeEscalation is not false")
            if csc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}/{c['name']}: root file system is writable")
            if csc.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}/{c['name']}: capabilities are not all dropped")
            res = c.get("resources", {})
            if not res.get("requests") or "memory" not in res.get("limits", {}):
                problems.append(f"{where}/{c['name']}: no resource requests or memory limit")
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{where}/{c['name']}: mounts unknown volume {m['name']}")
            for ref in c.get("envFrom", []):
                if (
                    "configMapRef" in ref
                    and ("ConfigMap", ref["configMapRef"]["name"]) not in names
                ):
                    problems.append(
                        f"{where}/{c['name']}: no ConfigMap {ref['configMapRef']['name']}"
                    )
            for e in c.get("env", []):
                secret = e.get("valueFrom", {}).get("secretKeyRef")
                if secret and ("Secret", secret["name"]) not in names:
                    problems.append(f"{where}/{c['name']}: no Secret {secret['name']}")
            env_names = {e["name"] for e in c.get("env", [])}
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    name = ref["configMapRef"]["name"]
                    maps = [
                        o
                        for o in objects
                        if (o["kind"], o["metadata"]["name"]) == ("ConfigMap", name)
                    ]
                    env_names |= set(maps[0]["data"]) if maps else set()
            for n in unknown_env_names(env_names):
                problems.append(f"{where}/{c['name']}: unknown variable {n}")
    for svc in (o for o in objects if o["kind"] == "Service"):
        selector = svc["spec"].get("selector", {})
        pods = [w for w in workloads if selects(selector, w)]
        if len(pods) != 1:
            problems.append(f"Service/{svc['metadata']['name']}: selects {len(pods)} workloads")
            continue
        ports = {p.get("name") for c in pod_spec(pods[0])["containers"] for p in c.get("ports", [])}
        for port in svc["spec"].get("ports", []):
            if isinstance(port.get("targetPort"), str) and port["targetPort"] not in ports:
                problems.append(f"Service/{svc['metadata']['name']}: no port {port['targetPort']}")
    return problems


def test_manifests_fit_together_and_are_locked_down() -> None:
    assert k8s_problems(load_manifests()) == []


def test_manifest_check_fails_on_broken_manifests() -> None:
    objects = load_manifests()
    broken = copy.deepcopy(objects)
    agent = find(broken, "DaemonSet", "agent")
    agent["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] = "agents"
    container = pod_spec(agent)["containers"][0]
    del container["securityContext"]["readOnlyRootFilesystem"]
    container["env"].append({"name": "EDGE_OFFLOAD_AGENT_SLOT", "value": "2"})
    find(broken, "Service", "broker")["spec"]["ports"][0]["targetPort"] = "mqtts"
    assert k8s_problems(broken) == [
        "DaemonSet/agent: selector {'app.kubernetes.io/name': 'edge-offload', "
        "'app.kubernetes.io/component': 'agents'} does not match its pods "
        "{'app.kubernetes.io/name': 'edge-offload', 'app.kubernetes.io/component': 'agent'}",
        "DaemonSet/agent/agent: root file system is writable",
        "DaemonSet/agent/agent: unknown variable EDGE_OFFLOAD_AGENT_SLOT",
        "Service/broker: no port mqtts",
    ]


def k8s_validate(objects: list[dict[str, Any]], version: str) -> list[str]:
    """kubernetes-validate: the API's OpenAPI schemas, bundled per version, strict mode."""
    if importlib.util.find_spec("kubernetes_validate") is None:
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[test]')")
    import kubernetes_validate

    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {e.message}")
    return errors


# The oldest Kubernetes minor that recent KubeEdge releases support, and the newest schema.
@pytest.mark.parametrize("version", ["1.28.0", "1.37.0"])
def test_manifests_match_the_kubernetes_api_schemas(version: str) -> None:
    assert k8s_validate(load_manifests(), version) == []


def test_schema_validation_rejects_a_misspelt_field() -> None:
    objects = copy.deepcopy(load_manifests())
    spec = pod_spec(find(objects, "DaemonSet", "agent"))
    spec["terminationGracePeriod"] = spec.pop("terminationGracePeriodSeconds")
    errors = k8s_validate(objects, "1.37.0")
    assert len(errors) == 1 and "terminationGracePeriod" in errors[0]


def k8s_args(tmp_path: Path, container: dict[str, Any], env: dict[str, str]) -> argparse.Namespace:
    """A container's args through the image's entrypoint, parsed by the real CLI parser."""
    assert "command" not in container, "the image's entrypoint must run"
    return parse_cli(run_entrypoint(tmp_path, container["args"], **env))


def test_agents_run_on_every_edge_node_named_after_it(tmp_path: Path) -> None:
    objects = load_manifests()
    agent = find(objects, "DaemonSet", "agent")
    spec = pod_spec(agent)
    assert spec["nodeSelector"] == {"node-role.kubernetes.io/edge": ""}
    assert {
        "key": "node-role.kubernetes.io/edge",
        "operator": "Exists",
        "effect": "NoSchedule",
    } in (spec["tolerations"])
    assert spec["terminationGracePeriodSeconds"] > DRAIN_S
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    # The variable AgentConfig reads for its agent_id field, from the node's name.
    assert "agent_id" in {f.name for f in fields(AgentConfig)}
    id_var = env[AGENT_ENV_PREFIX + "AGENT_ID"]
    assert id_var["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    config = find(objects, "ConfigMap", "edge-offload")["data"]
    args = k8s_args(tmp_path, container, config)
    assert args.command == "agent" and args.broker == config["EDGE_OFFLOAD_BROKER"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts[str(Path(args.spool_dir).parent)] == "spool"
    spool = next(v for v in spec["volumes"] if v["name"] == "spool")
    assert "emptyDir" in spool, "the default spool is an emptyDir (README: the trade-off)"


def test_one_coordinator_with_its_journal_on_a_volume_claim(tmp_path: Path) -> None:
    objects = load_manifests()
    coordinator = find(objects, "StatefulSet", "coordinator")
    assert coordinator["spec"]["replicas"] == 1
    assert (
        coordinator["spec"]["serviceName"]
        == find(objects, "Service", "coordinator")["metadata"]["name"]
    )
    (container,) = pod_spec(coordinator)["containers"]
    args = k8s_args(tmp_path, container, find(objects, "ConfigMap", "edge-offload")["data"])
    assert args.command == "coordinator"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    claim = mounts[str(args.journal.parent)]
    assert claim in {c["metadata"]["name"] for c in coordinator["spec"]["volumeClaimTemplates"]}


def test_broker_serves_the_deployment_mosquitto_config() -> None:
    objects = load_manifests()
    conf = find(objects, "ConfigMap", "mosquitto-config")["data"]["mosquitto.conf"]
    assert conf == (DOCKER / "mosquitto.conf").read_text(), "the two copies have drifted"
    broker = find(objects, "Deployment", "broker")
    assert broker["spec"]["replicas"] == 1 and broker["spec"]["strategy"]["type"] == "Recreate"
    url = find(objects, "ConfigMap", "edge-offload")["data"]["EDGE_OFFLOAD_BROKER"]
    service = find(objects, "Service", "broker")
    assert url == f"mqtt://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert service["spec"]["ports"][0]["port"] == listener_port(conf)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [tool("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_kustomize_renders_the_namespace_and_valid_objects() -> None:
    rendered = kustomize(K8S)
    assert len(rendered) == len(load_manifests())
    for obj in rendered:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "edge-offload", obj["metadata"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "edge-offload"
    assert k8s_problems(rendered) == []
    assert k8s_validate(rendered, "1.37.0") == []


def test_hostpath_spool_overlay_renders(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    shutil.copy(K8S / "patches/agent-spool-hostpath.yaml", overlay)
    (overlay / "kustomization.yaml").write_text(
        textwrap.dedent(f"""\
            apiVersion: kustomize.config.k8s.io/v1beta1
            kind: Kustomization
            resources:
              - {os.path.relpath(K8S, overlay)}
            patches:
              - path: agent-spool-hostpath.yaml
            """)
    )
    rendered = kustomize(overlay)
    spec = pod_spec(find(rendered, "DaemonSet", "agent"))
    spool = next(v for v in spec["volumes"] if v["name"] == "spool")
    assert spool == {
        "name": "spool",
        "hostPath": {"path": "/var/lib/edge-offload/agent", "type": "DirectoryOrCreate"},
    }
    (init,) = spec["initContainers"]
    assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    labels = find(rendered, "Namespace", "edge-offload")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    assert k8s_validate(rendered, "1.37.0") == []
