"""The coordinator: fleet registry, job intake, scheduling, result assembly, client SDK and CLI."""

from coordinator.client import OffloadClient
from coordinator.config import CoordinatorConfig
from coordinator.handles import JobHandle, JobOutput
from coordinator.ledger import Job, Ledger, Microtask, TaskState
from coordinator.policies import POLICIES, Placement, Policy, make_policy
from coordinator.registry import AgentRecord, CostModel, Registry
from coordinator.service import Coordinator

__all__ = [
    "POLICIES",
    "AgentRecord",
    "Coordinator",
    "CoordinatorConfig",
    "CostModel",
    "Job",
    "JobHandle",
    "JobOutput",
    "Ledger",
    "Microtask",
    "OffloadClient",
    "Placement",
    "Policy",
    "Registry",
    "TaskState",
    "make_policy",
]
