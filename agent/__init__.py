"""The edge agent: advertises a device's capabilities and runs microtasks with onnxruntime."""

from agent.config import AgentConfig
from agent.daemon import Agent, AgentStats
from agent.providers import probe, usable_providers
from agent.store import LoadedModel, ModelStore, sha256_file

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentStats",
    "LoadedModel",
    "ModelStore",
    "probe",
    "sha256_file",
    "usable_providers",
]
