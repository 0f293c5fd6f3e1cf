"""Agent configuration: one frozen object, from arguments, a TOML file or the environment."""

from __future__ import annotations

import os
import socket
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

from protocol import DEFAULT_ROOT, BrokerAddress, check_id
from protocol.transport import broker_from_setting

ENV_PREFIX = "EDGE_OFFLOAD_AGENT_"


def default_models_dirs() -> tuple[Path, ...]:
    """The zoo shipped with the package (wheel) or the repository's models/ (editable install)."""
    here = Path(__file__).resolve().parent
    found = [p for p in (here / "zoo", here.parent / "models") if (p / "manifest.json").exists()]
    return tuple(found[:1])


def default_spool_dir(agent_id: str) -> Path | None:
    """``$XDG_STATE_HOME/edge-offload/agent-{id}/results``, ``~/.local/state`` when unset.

    None when there is no home directory either (results are then kept in memory only).
    """
    state = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state):  # the XDG spec: relative values are invalid, ignore them
        try:
            state = str(Path.home() / ".local" / "state")
        except RuntimeError:  # no home directory
            return None
    return Path(state) / "edge-offload" / f"agent-{agent_id}" / "results"


def default_model_cache_dir(agent_id: str) -> Path | None:
    """``$XDG_CACHE_HOME/edge-offload/agent-{id}/models``, ``~/.cache`` when unset.

    None when there is no home directory either (the agent then accepts no deployments).
    """
    cache = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):  # the XDG spec: relative values are invalid, ignore them
        try:
            cache = str(Path.home() / ".cache")
        except RuntimeError:  # no home directory
            return None
    return Path(cache) / "edge-offload" / f"agent-{agent_id}" / "models"


# Stand for "default_spool_dir(agent_id)" and "default_model_cache_dir(agent_id)" until
# __post_init__ knows the agent id.
_DEFAULT_SPOOL_DIR = Path("<per-agent default>")
_DEFAULT_MODEL_CACHE_DIR = Path("<per-agent default model cache>")

# onnxruntime's GraphOptimizationLevel, by the names an operator writes in a config file.
GraphOptimization = Literal["disable", "basic", "extended", "all"]
GRAPH_OPTIMIZATIONS: tuple[str, ...] = get_args(GraphOptimization)


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """Everything an agent needs; pass it whole to :class:`agent.Agent`."""

    agent_id: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "agent")
    broker: BrokerAddress = field(default_factory=BrokerAddress)
    root: str = DEFAULT_ROOT
    slots: int = field(default_factory=lambda: os.cpu_count() or 1)
    labels: dict[str, str] = field(default_factory=dict)
    models_dirs: tuple[Path, ...] = field(default_factory=default_models_dirs)
    # onnxruntime intra-op threads per slot; 1 keeps slots independent and predictable.
    threads_per_slot: int = 1
    # Graph optimisations onnxruntime applies when it creates each model's session.
    graph_optimization: GraphOptimization = "all"
    # Providers to try, in order of preference; each is probed with a real inference.
    providers: tuple[str, ...] = ()
    heartbeat_s: float = 2.0
    # Tasks accepted beyond the running ones before new ones are refused.
    queue_limit: int = 64
    # Multiplies service time (by sleeping after each run) to emulate a slower device in
    # tests and benchmarks. Advertised in the birth so nobody mistakes it for real speed.
    slowdown: float = 1.0
    # Fault injection for tests and the chaos suite: this fraction of results carries
    # wrong outputs (right names, shapes and dtypes), as a faulty or hostile device would.
    corrupt_outputs: float = 0.0
    benchmark: bool = True
    drain_timeout_s: float = 30.0
    max_payload_bytes: int = 64 * 2**20
    # Results finished while the broker is unreachable are kept here, one file each, and
    # published on reconnect (also after an agent restart). None keeps them in memory only.
    spool_dir: Path | None = _DEFAULT_SPOOL_DIR
    # Prometheus metrics at http://{metrics_host}:{metrics_port}/metrics (None: off).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    spool_max_items: int = 10_000
    spool_max_bytes: int = 256 * 2**20
    # Models the coordinator deploys over MQTT are kept here (None: accept no deployments),
    # within this much disk; the least recently used one not in use makes room for a new one.
    # Models of models_dirs never count against it.
    model_cache_dir: Path | None = _DEFAULT_MODEL_CACHE_DIR
    model_cache_bytes: int = 2 * 2**30
    # A transfer that receives no chunk for this long is dropped, as if aborted.
    deploy_idle_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        check_id(self.agent_id, "agent id")
        if self.spool_dir is _DEFAULT_SPOOL_DIR:
            object.__setattr__(self, "spool_dir", default_spool_dir(self.agent_id))
        if self.model_cache_dir is _DEFAULT_MODEL_CACHE_DIR:
            object.__setattr__(self, "model_cache_dir", default_model_cache_dir(self.agent_id))
        if self.graph_optimization not in GRAPH_OPTIMIZATIONS:
            raise ValueError(
                f"graph_optimization must be one of {', '.join(GRAPH_OPTIMIZATIONS)}, "
                f"not {self.graph_optimization!r}"
            )
        if self.model_cache_bytes < 1:
            raise ValueError("model_cache_bytes must be >= 1")
        if not self.deploy_idle_timeout_s > 0:
            raise ValueError("deploy_idle_timeout_s must be > 0")
        if self.threads_per_slot < 0:
            raise ValueError("threads_per_slot must be >= 0 (0: onnxruntime's default)")
        if self.spool_max_items < 1 or self.spool_max_bytes < 1:
            raise ValueError("spool_max_items and spool_max_bytes must be >= 1")
        if self.slots < 1:
            raise ValueError("slots must be >= 1")
        if not 1.0 <= self.slowdown <= 1e6:
            raise ValueError("slowdown must be between 1 and 1e6 (it only slows a device down)")
        if not 0.0 <= self.corrupt_outputs <= 1.0:
            raise ValueError("corrupt_outputs is a fraction between 0 and 1")

    def with_(self, **changes: Any) -> AgentConfig:
        # A new agent id gets its own default spool and model cache: two agents must never
        # share one.
        if "agent_id" in changes:
            if "spool_dir" not in changes and self.spool_dir == default_spool_dir(self.agent_id):
                changes["spool_dir"] = _DEFAULT_SPOOL_DIR
            if "model_cache_dir" not in changes and self.model_cache_dir == (
                default_model_cache_dir(self.agent_id)
            ):
                changes["model_cache_dir"] = _DEFAULT_MODEL_CACHE_DIR
        return replace(self, **changes)

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> AgentConfig:
        """Defaults < the TOML file's ``[agent]`` table < the environment < ``overrides``."""
        values: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                data = tomllib.load(f)
            values.update(data.get("agent", data))
        values.update(_from_env())
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**_coerce(values))


def _from_env() -> dict[str, Any]:
    names = {f.name for f in fields(AgentConfig)}
    out: dict[str, Any] = {}
    for key, value in os.environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX) :].lower()
            if name in names:
                out[name] = value
    if url := os.environ.get("EDGE_OFFLOAD_BROKER"):
        out.setdefault("broker", url)
    return out


def _coerce(values: dict[str, Any]) -> dict[str, Any]:
    """Turn strings (environment, CLI) and TOML values into the field types."""
    out = dict(values)
    out["broker"] = broker_from_setting(out.get("broker"))
    if isinstance(out.get("labels"), str):
        out["labels"] = parse_labels(out["labels"].split(","))
    if isinstance(out.get("models_dirs"), str):
        out["models_dirs"] = tuple(Path(p) for p in out["models_dirs"].split(os.pathsep) if p)
    elif isinstance(out.get("models_dirs"), list | tuple):
        out["models_dirs"] = tuple(Path(p) for p in out["models_dirs"])
    if isinstance(out.get("providers"), str):
        out["providers"] = tuple(p for p in out["providers"].split(",") if p)
    elif isinstance(out.get("providers"), list):
        out["providers"] = tuple(out["providers"])
    for name in ("spool_dir", "model_cache_dir"):
        if isinstance(out.get(name), str):
            # TOML has no null: an empty value or "none" turns the directory off.
            text = out[name].strip()
            out[name] = None if text.lower() in ("", "none") else Path(text)
    for name, kind in (
        ("slots", int),
        ("threads_per_slot", int),
        ("queue_limit", int),
        ("max_payload_bytes", int),
        ("spool_max_items", int),
        ("metrics_port", int),
        ("spool_max_bytes", int),
        ("model_cache_bytes", int),
        ("heartbeat_s", float),
        ("slowdown", float),
        ("corrupt_outputs", float),
        ("drain_timeout_s", float),
        ("deploy_idle_timeout_s", float),
    ):
        if isinstance(out.get(name), str):
            out[name] = kind(out[name])
    if isinstance(out.get("graph_optimization"), str):
        out["graph_optimization"] = out["graph_optimization"].strip().lower()
    if isinstance(out.get("benchmark"), str):
        out["benchmark"] = out["benchmark"].lower() in ("1", "true", "yes", "on")
    return out


def parse_labels(items: list[str]) -> dict[str, str]:
    """``["site=plant1", "zone=a"]`` -> ``{"site": "plant1", "zone": "a"}``."""
    labels: dict[str, str] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"label {item!r} is not KEY=VALUE")
        labels[key.strip()] = value.strip()
    return labels
