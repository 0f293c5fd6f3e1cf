"""MQTT topic names of the edge-offload contract; nothing else formats a topic by hand."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from protocol.errors import ProtocolError

DEFAULT_ROOT = "offload/v1"

AgentChannel = Literal["state", "heartbeat", "tasks", "results", "models", "deploys"]
JobChannel = Literal["status", "result"]

_AGENT_CHANNELS: frozenset[str] = frozenset(
    {"state", "heartbeat", "tasks", "results", "models", "deploys"}
)
# Ids become topic levels, so they must never contain MQTT wildcards or separators.
# \Z, not $: "$" also matches before a trailing newline ("a\n" is no id).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}\Z")


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid agent/job id, else raise :class:`ProtocolError`."""
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ProtocolError(
            f"invalid {what} {value!r}: use 1-128 of [A-Za-z0-9_.:-], starting alphanumeric",
            code="bad_request",
        )
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """All topics under one configurable root (default ``offload/v1``)."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        if not self.root or any(c in self.root for c in "+#") or self.root.endswith("/"):
            raise ProtocolError(f"invalid topic root {self.root!r}", code="bad_request")

    # -- agent topics ------------------------------------------------------------------
    def agent(self, agent_id: str, channel: AgentChannel) -> str:
        return f"{self.root}/agents/{agent_id}/{channel}"

    def state(self, agent_id: str) -> str:
        return self.agent(agent_id, "state")

    def heartbeat(self, agent_id: str) -> str:
        return self.agent(agent_id, "heartbeat")

    def tasks(self, agent_id: str) -> str:
        return self.agent(agent_id, "tasks")

    def results(self, agent_id: str) -> str:
        return self.agent(agent_id, "results")

    def models(self, agent_id: str) -> str:
        """Model transfers to one agent (coordinator -> agent: offer, chunks, abort)."""
        return self.agent(agent_id, "models")

    def deploys(self, agent_id: str) -> str:
        """An agent's answers to model transfers (agent -> coordinator: ModelAck)."""
        return self.agent(agent_id, "deploys")

    def all_agents(self, channel: AgentChannel) -> str:
        """Subscription filter for one channel of every agent."""
        return f"{self.root}/agents/+/{channel}"

    def parse_agent(self, topic: str) -> tuple[str, AgentChannel]:
        """Split ``{root}/agents/{id}/{channel}`` into ``(id, channel)``."""
        prefix = f"{self.root}/agents/"
        if topic.startswith(prefix):
            rest = topic[len(prefix) :]
            agent_id, sep, channel = rest.partition("/")
            if sep and channel in _AGENT_CHANNELS and _ID_RE.match(agent_id):
                return agent_id, channel  # type: ignore[return-value]
        raise ProtocolError(f"not an agent topic: {topic!r}", code="bad_request")

    # -- job topics --------------------------------------------------------------------
    @property
    def submit(self) -> str:
        """Anonymous submissions (refused when the coordinator has an allow-list)."""
        return f"{self.root}/jobs/submit"

    def submit_as(self, client_id: str) -> str:
        """Submissions of one identity: a broker ACL (``pattern write .../jobs/submit/%u``)
        makes the last segment the publisher's authenticated user name."""
        return f"{self.root}/jobs/submit/{check_id(client_id, 'client id')}"

    def parse_submit(self, topic: str) -> str | None:
        """The identity of a submit topic: ``""`` for the anonymous one, None if not one."""
        if topic == self.submit:
            return ""
        prefix = f"{self.submit}/"
        if topic.startswith(prefix) and _ID_RE.match(topic[len(prefix) :]):
            return topic[len(prefix) :]
        return None

    @property
    def rejected(self) -> str:
        """Where submissions are refused that cannot be tied to a job id (malformed JSON)."""
        return f"{self.root}/jobs/rejected"

    def job(self, job_id: str, channel: JobChannel) -> str:
        return f"{self.root}/jobs/{job_id}/{channel}"

    def status(self, job_id: str) -> str:
        return self.job(job_id, "status")

    def result(self, job_id: str) -> str:
        return self.job(job_id, "result")

    def replies(self, client_id: str) -> str:
        """Results and terminal statuses of the jobs a client submitted with ``client_id``."""
        return f"{self.root}/clients/{client_id}/replies"

    @property
    def coordinator(self) -> str:
        """Retained coordinator state (online flag and recent jobs)."""
        return f"{self.root}/coordinator/state"

    def alerts(self, job_id: str) -> str:
        """Alerts of a monitoring job (unless its spec names another topic)."""
        return f"{self.root}/alerts/{job_id}"

    @property
    def fleet_alerts(self) -> str:
        """Fleet health alerts (agents suspect, dead, hot, overloaded, recovered); no job
        may be called ``fleet``."""
        return f"{self.root}/alerts/fleet"

    @property
    def all_alerts(self) -> str:
        return f"{self.root}/alerts/#"
