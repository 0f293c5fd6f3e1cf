"""The fleet registry: agents from births, heartbeats and deaths, with their measured costs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from protocol import AgentState, Capabilities, Heartbeat, ModelInfo

if TYPE_CHECKING:
    from coordinator.ledger import Microtask

logger = logging.getLogger(__name__)

# Weight of a new observation in the exponentially weighted cost estimates.
EWMA = 0.3
# Loopback-ish defaults until a device's link has been observed.
DEFAULT_LATENCY_MS = 0.3
DEFAULT_BYTES_PER_MS = 50_000.0


@dataclass
class CostModel:
    """Milliseconds per call = ``overhead_ms + per_sample_ms * samples``, one model on one agent.

    Starts from the agent's self-benchmark and is refined from every observed execution by
    recursive least squares with the benchmark as prior and exponential forgetting. The
    prior's uncertainty is relative to each parameter, so a run of equal-sized microtasks
    corrects the parameter that dominates at that size (the overhead for batch 1, the
    per-sample cost for batch 1,000) without corrupting the other.
    """

    overhead_ms: float
    per_sample_ms: float
    # Covariance of (overhead, per-sample) estimates.
    p_oo: float = 0.0
    p_os: float = 0.0
    p_ss: float = 0.0
    observations: int = 0

    def __post_init__(self) -> None:
        if self.p_oo == 0.0 and self.p_ss == 0.0:
            self.p_oo = max(self.overhead_ms, 0.01) ** 2
            self.p_ss = max(self.per_sample_ms, 1e-6) ** 2
        # Forgetting inflates the covariance along directions no observation excites
        # (with equal-sized microtasks, overhead minus per-sample cost); capping it at
        # the prior keeps that direction from drifting.
        self._cap = (self.p_oo, self.p_ss)

    @classmethod
    def from_info(cls, info: ModelInfo, slowdown: float = 1.0) -> CostModel:
        points = sorted(info.cost)
        if len(points) >= 2 and points[0][0] != points[-1][0]:
            (b1, m1), (b2, m2) = points[0], points[-1]
            per = max((m2 - m1) / (b2 - b1), 1e-6)
            return cls(overhead_ms=max(m1 - per * b1, 0.0), per_sample_ms=per)
        if points:
            b, m = points[0]
            return cls(overhead_ms=0.0, per_sample_ms=max(m / b, 1e-6))
        return cls(overhead_ms=1.0, per_sample_ms=1.0 * slowdown)  # unmeasured: pessimistic

    def estimate(self, samples: int) -> float:
        return self.overhead_ms + self.per_sample_ms * samples

    def observe(self, samples: int, exec_ms: float, forget: float = 0.97) -> None:
        """Fold in one execution of ``samples`` samples that took ``exec_ms``."""
        if samples <= 0 or exec_ms <= 0:
            return
        b = float(samples)
        est = self.estimate(samples)
        err = exec_ms - est
        # Measurement noise: 20% of the estimate, plus half the squared error itself, so a
        # one-off stall (a GIL wait, a page fault) barely moves the model while a lasting
        # change still gets through within a few dozen results.
        noise = (0.2 * max(est, 0.01)) ** 2 + 0.5 * err * err
        # P x, and x' P x, for x = (1, b)
        po = self.p_oo + self.p_os * b
        ps = self.p_os + self.p_ss * b
        denom = noise + po + b * ps
        ko, ks = po / denom, ps / denom
        self.overhead_ms = max(self.overhead_ms + ko * err, 0.0)
        self.per_sample_ms = max(self.per_sample_ms + ks * err, 1e-7)
        p_oo = min((self.p_oo - ko * po) / forget, self._cap[0])
        p_ss = min((self.p_ss - ks * ps) / forget, self._cap[1])
        limit = (p_oo * p_ss) ** 0.5  # keep the covariance positive semi-definite
        self.p_os = max(min((self.p_os - ko * ps) / forget, limit), -limit)
        self.p_oo, self.p_ss = p_oo, p_ss
        self.observations += 1


class _Fitness:
    """A flag of an agent's fitness for new work, kept in ``_<name>``: changing it moves
    AgentRecord.epoch (cached candidate lists are then stale)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._attr = f"_{name}"

    def __get__(self, obj: object, objtype: type | None = None) -> bool:
        return bool(getattr(obj, self._attr))

    def __set__(self, obj: object, value: bool) -> None:
        if value != getattr(obj, self._attr):
            setattr(obj, self._attr, value)
            AgentRecord.refit()


@dataclass(eq=False)
class AgentRecord:
    """What the coordinator knows about one agent."""

    agent_id: str
    seq: int
    capabilities: Capabilities
    _online: bool = True
    last_seen: float = field(default_factory=time.monotonic)
    heartbeat: Heartbeat | None = None
    heartbeat_at: float = 0.0  # monotonic time of the last heartbeat
    _draining: bool = False
    # Silent for a while, or let a lease expire: no new work until it is heard from again.
    _suspect: bool = False
    in_flight: dict[str, Microtask] = field(default_factory=dict)
    costs: dict[str, CostModel] = field(default_factory=dict)
    models: dict[str, ModelInfo] = field(default_factory=dict)
    latency_ms: float = DEFAULT_LATENCY_MS
    bytes_per_ms: float = DEFAULT_BYTES_PER_MS
    completed: int = 0
    # Observed execution time per microtask (ms, exponentially weighted); 0 until measured.
    exec_ms_avg: float = 0.0
    # Sum of the estimated execution times of the microtasks in flight (ms), and when the
    # agent last made visible progress on them (a result, or work arriving at an idle agent).
    queued_ms: float = 0.0
    progress_mark: float = 0.0
    # Why it went offline (its death message's reason, or "silent").
    offline_reason: str | None = None
    # Models it lacks but could be sent (coordinator.deployer): estimated ms until one
    # would be installed, added to the finish estimate of a microtask placed here; and
    # the models whose cost model is borrowed from other agents until it has measured one.
    deploy_ms: dict[str, float] = field(default_factory=dict)
    borrowed_costs: set[str] = field(default_factory=set)
    # The registry's change sets (coordinator.placement): this agent is added to each when
    # what a finish estimate reads of it changes (work in flight, costs, link).
    watchers: list[set[AgentRecord]] = field(default_factory=list, repr=False)

    # Moves whenever any agent's fitness for new work changes (online, draining, suspect,
    # models, capabilities): lists of candidate agents cached against it are then stale.
    epoch: ClassVar[int] = 0

    def __post_init__(self) -> None:
        self._load_models()

    def changed(self) -> None:
        """What a finish estimate reads of this agent changed."""
        for watcher in self.watchers:
            watcher.add(self)

    @staticmethod
    def refit() -> None:
        """Some agent's fitness for new work changed."""
        AgentRecord.epoch += 1

    online = _Fitness()
    draining = _Fitness()
    suspect = _Fitness()

    def _load_models(self) -> None:
        self.refit()
        self.models = {m.id: m for m in self.capabilities.models}
        old = {k: v for k, v in self.costs.items() if k not in self.borrowed_costs}
        self.borrowed_costs.clear()
        self.deploy_ms.clear()
        self.costs = {
            m.id: old.get(m.id) or CostModel.from_info(m, self.capabilities.slowdown)
            for m in self.capabilities.models
        }

    @property
    def slots(self) -> int:
        return self.capabilities.slots

    @property
    def available(self) -> bool:
        """Can receive new work."""
        return self.online and not self.draining and not self.suspect

    def heard_from(self) -> None:
        self.last_seen = time.monotonic()
        self.suspect = False

    def has_model(self, model_id: str, sha256: str | None = None) -> bool:
        """Has ``model_id`` installed (that exact file, when ``sha256`` is given)."""
        m = self.models.get(model_id)
        return m is not None and (sha256 is None or m.sha256 == sha256)

    def drains_at(self) -> float | None:
        """When the work in flight should be done (monotonic s), by its estimates and the
        agent's last progress; None when nothing is in flight."""
        if not self.in_flight:
            return None
        return self.progress_mark + self.queued_ms / self.slots / 1000

    def transfer_ms(self, nbytes: int) -> float:
        return self.latency_ms + nbytes / self.bytes_per_ms


# Dead agents remembered (to order a late birth or death against); the longest dead are
# forgotten beyond this. And agents known at all: births of new ids beyond are refused.
MAX_DEAD_AGENTS = 1_000
MAX_AGENTS = 100_000


class Registry:
    """Agents keyed by id. Births with an older ``seq`` than the one known are ignored."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentRecord] = {}
        self.stale_states = 0
        # Sets of agents whose estimates changed, one per cached placement index; shared
        # with every record (AgentRecord.changed).
        self.watchers: list[set[AgentRecord]] = []

    def apply_state(self, msg: AgentState) -> tuple[AgentRecord | None, str]:
        """Apply a birth or death; return the record and what happened (``born``,
        ``reborn``, ``died``, ``stale``, ``unknown``, ``no_capabilities``, ``too_many``)."""
        rec = self.agents.get(msg.agent_id)
        if rec is None and msg.online and len(self.agents) >= MAX_AGENTS:
            self._forget_dead(0)
            if len(self.agents) >= MAX_AGENTS:
                return None, "too_many"
        if rec is not None and msg.seq < rec.seq:
            self.stale_states += 1
            return rec, "stale"
        if msg.online:
            if msg.capabilities is None:
                return rec, "no_capabilities"
            if rec is None:
                rec = AgentRecord(
                    agent_id=msg.agent_id,
                    seq=msg.seq,
                    capabilities=msg.capabilities,
                    watchers=self.watchers,
                )
                self.agents[msg.agent_id] = rec
                return rec, "born"
            was_online, same_session = rec.online, rec.seq == msg.seq
            rec.seq = msg.seq
            rec.capabilities = msg.capabilities
            rec._load_models()
            rec.online = True
            rec.draining = False
            rec.heard_from()
            return rec, "born" if (was_online and same_session) else "reborn"
        if rec is None:
            return None, "unknown"
        if not rec.online:
            return rec, "stale"
        rec.seq = msg.seq
        rec.online = False
        rec.offline_reason = msg.reason
        # A dead agent's capabilities are of no use (a rebirth brings its own); its
        # learned costs are kept for when it comes back.
        rec.capabilities = rec.capabilities.model_copy(update={"labels": {}, "models": []})
        rec.models = {}
        rec.refit()
        self._forget_dead(MAX_DEAD_AGENTS)
        return rec, "died"

    def _forget_dead(self, keep: int) -> None:
        dead = [a for a in self.agents.values() if not a.online and not a.in_flight]
        if len(dead) > keep:
            dead.sort(key=lambda a: a.last_seen)
            for a in dead[: len(dead) - keep]:
                del self.agents[a.agent_id]

    def apply_heartbeat(self, hb: Heartbeat) -> AgentRecord | None:
        rec = self.agents.get(hb.agent_id)
        if rec is None or hb.seq < rec.seq or not rec.online:
            return None
        rec.heartbeat = hb
        rec.heartbeat_at = time.monotonic()
        rec.heard_from()
        rec.draining = hb.draining
        return rec

    def silent(self, older_than_s: float) -> list[AgentRecord]:
        """Online agents not heard from for ``older_than_s`` seconds."""
        limit = time.monotonic() - older_than_s
        return [a for a in self.agents.values() if a.online and a.last_seen < limit]

    def online(self) -> list[AgentRecord]:
        return [a for a in self.agents.values() if a.online]

    def model_info(self, model_id: str) -> ModelInfo | None:
        for a in self.agents.values():
            if a.online and model_id in a.models:
                return a.models[model_id]
        return None

    def known_models(self) -> list[str]:
        return sorted({m for a in self.agents.values() if a.online for m in a.models})
