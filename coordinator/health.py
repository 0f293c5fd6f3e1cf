"""Fleet health alerts: agents that go suspect, die, leave, run hot or overloaded."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from coordinator.registry import AgentRecord
from protocol import Alert, Heartbeat

# Below the thresholds by this much before a hot / overloaded agent counts as recovered,
# so a reading hovering at the threshold does not flap.
HOT_HYSTERESIS_C = 5.0
CPU_HYSTERESIS_PERCENT = 15.0
LOW_MEMORY_FRACTION = 0.05
# Consecutive heartbeats with the CPU saturated before an agent counts as overloaded: one
# heartbeat's CPU figure covers its whole interval, its "running" only the instant it
# was sent, so a single one says little.
OVERLOAD_HEARTBEATS = 3


@dataclass(frozen=True)
class HealthLimits:
    hot_c: float = 85.0
    overload_cpu_percent: float = 95.0


class FleetHealth:
    """Compares each agent's condition with the one last announced; a change is an alert.

    Conditions: ``dead`` (offline without saying goodbye, or silent past the dead timeout),
    ``left`` (drained and said goodbye), ``suspect``, ``hot`` (temperature at or above the
    limit), ``overloaded`` (CPU saturated by something other than our microtasks for
    OVERLOAD_HEARTBEATS heartbeats in a row, or memory nearly exhausted). An agent whose
    conditions all cleared is ``recovered``.
    """

    def __init__(self, limits: HealthLimits) -> None:
        self.limits = limits
        self.flags: dict[str, frozenset[str]] = {}
        # agent -> consecutive heartbeats with the CPU saturated by others
        self._busy: dict[str, int] = {}

    def heartbeat(self, agent: AgentRecord, hb: Heartbeat) -> None:
        """Count an agent's heartbeat (called for every one, as it arrives)."""
        limit = self.limits.overload_cpu_percent - (
            CPU_HYSTERESIS_PERCENT if "overloaded" in self.flags.get(agent.agent_id, ()) else 0.0
        )
        if hb.cpu_percent >= limit and hb.running < hb.slots:
            self._busy[agent.agent_id] = self._busy.get(agent.agent_id, 0) + 1
        else:
            self._busy.pop(agent.agent_id, None)

    def conditions(self, agent: AgentRecord) -> frozenset[str]:
        if not agent.online:
            return frozenset({"left" if agent.offline_reason == "drained" else "dead"})
        had = self.flags.get(agent.agent_id, frozenset())
        now: set[str] = set()
        if agent.suspect:
            now.add("suspect")
        hb = agent.heartbeat
        if hb is not None:
            hot = self.limits.hot_c - (HOT_HYSTERESIS_C if "hot" in had else 0.0)
            if hb.temperature_c is not None and hb.temperature_c >= hot:
                now.add("hot")
            total = agent.capabilities.memory_total
            if self._busy.get(agent.agent_id, 0) >= OVERLOAD_HEARTBEATS or (
                total > 0 and hb.memory_available < LOW_MEMORY_FRACTION * total
            ):
                now.add("overloaded")
        return frozenset(now)

    def check(self, agents: Iterable[AgentRecord], wall: float) -> list[Alert]:
        alerts = []
        seen = set()
        for agent in agents:
            seen.add(agent.agent_id)
            old = self.flags.get(agent.agent_id, frozenset())
            new = self.conditions(agent)
            if new == old:
                continue
            self.flags[agent.agent_id] = new
            for flag in sorted(new - old):
                alerts.append(self._alert(agent, flag, wall))
            if old and not new:
                alerts.append(
                    Alert(
                        kind="agent_recovered",
                        agent_id=agent.agent_id,
                        message=f"agent {agent.agent_id}: no longer {', '.join(sorted(old))}",
                        ts=wall,
                    )
                )
        for gone in self.flags.keys() - seen:  # forgotten by the registry
            del self.flags[gone]
        for gone in self._busy.keys() - seen:
            del self._busy[gone]
        return alerts

    def _alert(self, agent: AgentRecord, flag: str, wall: float) -> Alert:
        hb = agent.heartbeat
        if flag == "hot" and hb is not None:
            text = f"temperature {hb.temperature_c:.0f} C (limit {self.limits.hot_c:.0f} C)"
        elif flag == "overloaded" and hb is not None:
            text = (
                f"cpu {hb.cpu_percent:.0f}% with {hb.running}/{hb.slots} slots busy, "
                f"{hb.memory_available // 2**20} MiB memory available"
            )
        elif flag in ("dead", "left"):
            text = f"offline ({agent.offline_reason or 'no reason given'})"
        else:
            text = "suspect: silent, or let a lease expire; no new work until heard from"
        kind = {
            "dead": "agent_dead",
            "left": "agent_left",
            "suspect": "agent_suspect",
            "hot": "agent_hot",
            "overloaded": "agent_overloaded",
        }[flag]
        return Alert(
            kind=kind,  # type: ignore[arg-type]
            agent_id=agent.agent_id,
            message=f"agent {agent.agent_id}: {text}",
            ts=wall,
        )
