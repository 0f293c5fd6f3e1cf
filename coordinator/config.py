"""Coordinator configuration: one frozen object, from arguments, a TOML file or the environment."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from coordinator.catalog import default_catalog_dir
from protocol import DEFAULT_ROOT, BrokerAddress
from protocol.transport import broker_from_setting

ENV_PREFIX = "EDGE_OFFLOAD_COORDINATOR_"

PolicyName = Literal["earliest_finish", "least_loaded", "round_robin"]

# Stands for "default_trace_dir(journal)" until __post_init__ knows the journal.
_BESIDE_JOURNAL = Path("<beside the journal>")


def default_trace_dir(journal: Path | None) -> Path | None:
    """``traces/`` beside the journal file, or None without a journal."""
    return journal.parent / "traces" if journal is not None else None


@dataclass(frozen=True, kw_only=True)
class CoordinatorConfig:
    """Everything the coordinator needs; pass it whole to :class:`coordinator.Coordinator`."""

    broker: BrokerAddress = field(default_factory=BrokerAddress)
    root: str = DEFAULT_ROOT
    # MQTT client id; by default derived from ``root``, so coordinators of different
    # roots on one broker do not take over each other's session.
    client_id: str | None = None
    # Keep the MQTT session (clean_session=False) across restarts: job submissions and
    # results published while the coordinator is down are queued by the broker (up to
    # its max_queued_messages) and delivered when it is back.
    persistent_session: bool = True
    policy: PolicyName = "earliest_finish"
    # A microtask should take about this long on the fleet: long enough to amortise the
    # per-message overhead (~0.3 ms), short enough to balance, to recover cheaply, and to
    # keep onnxruntime's batches cache-friendly (digits-mlp: 3.3 us/sample at batch 1,024,
    # 4.6 at 11,232; a 50 ms target made the large-job benchmark 25% slower).
    target_task_ms: float = 10.0
    # ... and every slot of the fleet should get at least this many microtasks of a job,
    # so that faster devices can take a proportionally larger share.
    min_tasks_per_slot: int = 4
    # Microtasks in flight per agent slot (one running, the rest queued on the device), so
    # a device never waits on the network for its next task and placement stays late.
    prefetch_per_slot: int = 2
    # A lease lasts max(lease_min_s, lease_factor x estimated time to finish).
    lease_min_s: float = 10.0
    lease_factor: float = 4.0
    max_attempts: int = 3
    # With redundancy: an agent whose outputs disagree with the majority gets no more of
    # that job's work.
    exclude_disagreeing: bool = True
    # Near the end of a job (nothing left to dispatch), a microtask running this many
    # times longer than estimated (and at least speculate_min_ms) gets a second copy on
    # an idle agent; the first result wins and the other copy is cancelled.
    speculate: bool = True
    speculate_factor: float = 4.0
    speculate_min_ms: float = 200.0
    # An agent silent this long (no heartbeat, no result) gets no new work (suspect)...
    suspect_after_s: float = 6.0
    # ... and this long, is treated as dead: its microtasks run elsewhere.
    dead_after_s: float = 15.0
    max_payload_bytes: int = 256 * 2**20
    # Identities (the last segment of jobs/submit/{id}, which a broker ACL ties to the
    # authenticated user) allowed to submit jobs; empty: anyone, anonymous included.
    allowed_clients: tuple[str, ...] = ()
    # Token buckets per sender: messages a second on average, and the burst allowed.
    # Generous by default (a fleet's results arrive by the thousand a second); tighten
    # them for fleets you do not trust. 0 means unlimited.
    client_rate_per_s: float = 1000.0
    client_burst: float = 2000.0
    agent_rate_per_s: float = 20000.0
    agent_burst: float = 40000.0
    # "auto": binary tensor frames (protocol.codec) to agents that advertise them; "json":
    # JSON everywhere, e.g. to watch microtasks with mosquitto_sub.
    wire_encoding: Literal["auto", "json"] = "auto"
    # SQLite journal of jobs submitted over MQTT: a restarted coordinator resumes them.
    # None keeps jobs in memory only.
    journal: Path | None = None
    # Per-job traces ({trace_dir}/{job_id}.json, read by `edge-offload report`). By
    # default a "traces" directory beside the journal; None (or "none") writes none.
    trace_dir: Path | None = _BESIDE_JOURNAL
    status_interval_s: float = 0.5
    # Prometheus metrics at http://{metrics_host}:{metrics_port}/metrics (None: off; 0: any
    # free port, see Coordinator.metrics_port).
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # A coordinator resuming jobs from the journal waits up to this long for every online
    # agent to report (by heartbeat) the microtasks it still holds, before dispatching the
    # rest; what an agent holds is taken over, not run again.
    resume_grace_s: float = 5.0
    # Monitoring jobs: windows handed to agents and not decided yet, per job; beyond this
    # new windows are shed (counted, never silently dropped).
    monitor_backlog: int = 10_000
    # A window no agent has run this long after its deadline fails (counted as failed).
    window_expire_s: float = 30.0
    # Fleet health alerts: an agent at or above this temperature is hot; one whose CPU is
    # this busy while our microtasks leave slots free is overloaded.
    hot_temperature_c: float = 85.0
    overload_cpu_percent: float = 95.0
    # The model registry (coordinator.catalog): models registered with `edge-offload
    # models add`, sent to agents that lack them. None (or "none"): no registry.
    catalog_dir: Path | None = field(default_factory=default_catalog_dir)
    # Placement counts the time to send a model to an agent that lacks it (download and
    # install) in the agent's finish-time estimate. Off: such an agent looks ready now
    # (the naive baseline of bench/deploy.py).
    download_aware: bool = True
    deploy_chunk_bytes: int = 512 * 1024
    # Chunks of a transfer unacknowledged at once; a transfer without progress this long
    # is offered again (up to max_attempts times, then given up).
    deploy_window: int = 8
    deploy_stall_s: float = 10.0
    # Final results of jobs submitted over MQTT are kept (encoded, as published) for this
    # long after they are published, up to this many bytes in all, oldest dropped first;
    # a result larger than that is not kept. A job submitted again under the same id (a
    # client that reconnected) gets its kept result again, and the results published just
    # before the coordinator's own connection was lost are published again. 0: keep none.
    result_cache_bytes: int = 64 * 2**20
    result_keep_s: float = 600.0

    @property
    def mqtt_client_id(self) -> str:
        if self.client_id:
            return self.client_id
        return "coordinator" if self.root == DEFAULT_ROOT else f"coordinator:{self.root}"

    def __post_init__(self) -> None:
        if self.result_cache_bytes < 0 or not self.result_keep_s >= 0:
            raise ValueError("result_cache_bytes and result_keep_s must be >= 0")
        if self.trace_dir is _BESIDE_JOURNAL:
            object.__setattr__(self, "trace_dir", default_trace_dir(self.journal))

    def with_(self, **changes: Any) -> CoordinatorConfig:
        # A new journal brings its own default trace directory.
        if (
            "journal" in changes
            and "trace_dir" not in changes
            and self.trace_dir == default_trace_dir(self.journal)
        ):
            changes["trace_dir"] = _BESIDE_JOURNAL
        return replace(self, **changes)

    @classmethod
    def load(cls, path: Path | None = None, **overrides: Any) -> CoordinatorConfig:
        """Defaults < the TOML file's ``[coordinator]`` table < environment < ``overrides``."""
        values: dict[str, Any] = {}
        if path is not None:
            with open(path, "rb") as f:
                data = tomllib.load(f)
            values.update(data.get("coordinator", data))
        names = {fld.name: fld for fld in fields(cls)}
        for key, value in os.environ.items():
            if key.startswith(ENV_PREFIX) and (name := key[len(ENV_PREFIX) :].lower()) in names:
                values[name] = value
        if url := os.environ.get("EDGE_OFFLOAD_BROKER"):
            values.setdefault("broker", url)
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["broker"] = broker_from_setting(values.get("broker"))
        if isinstance(values.get("journal"), str):
            values["journal"] = Path(values["journal"])
        for name in ("trace_dir", "catalog_dir"):
            if isinstance(values.get(name), str):
                # TOML has no null: an empty value or "none" turns it off.
                text = values[name].strip()
                values[name] = None if text.lower() in ("", "none") else Path(text)
        for name, value in list(values.items()):
            fld = names.get(name)
            if fld is None or not isinstance(value, str):
                continue
            if fld.type in ("int", "float", "int | None"):
                values[name] = float(value) if fld.type == "float" else int(value)
            elif fld.type == "bool":
                values[name] = value.strip().lower() in ("1", "true", "yes", "on")
            elif fld.type == "tuple[str, ...]":
                values[name] = tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(values.get("allowed_clients"), list):
            values["allowed_clients"] = tuple(values["allowed_clients"])
        return cls(**values)
