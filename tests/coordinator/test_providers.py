"""Jobs that require or prefer an execution provider."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from protocol import BrokerAddress, JobError

pytestmark = pytest.mark.mosquitto

CUDA = "CUDAExecutionProvider"


async def fleet(
    address: BrokerAddress,
    coordinator_factory: Callable[..., Any],
    agent_factory: Callable[..., Any],
) -> Any:
    coord = await coordinator_factory(address)
    await agent_factory(address, "cpu-1")
    await agent_factory(address, "gpu-1")
    await coord.wait_for_agents(2)
    # No accelerator on this machine: the agents' probes advertise the CPU only (see
    # tests/agent/test_agent.py). Placement reads the advertised list, so one agent is made
    # to advertise CUDA on the coordinator's side.
    gpu = coord.registry.agents["gpu-1"]
    gpu.capabilities = gpu.capabilities.model_copy(
        update={"providers": [CUDA, "CPUExecutionProvider"]}
    )
    return coord


async def test_required_provider_places_only_there_and_is_refused_when_absent(
    mosquitto_address: BrokerAddress,
    coordinator_factory: Callable[..., Any],
    agent_factory: Callable[..., Any],
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
) -> None:
    coord = await fleet(mosquitto_address, coordinator_factory, agent_factory)
    x = digits[0][:800]
    out = await coord.run("digits-mlp", x, batch_size=50, require_providers=[CUDA], timeout=30)
    assert set(out.result.per_agent) == {"gpu-1"}
    assert out.result.per_agent["gpu-1"].samples == 800

    with pytest.raises(JobError) as refused:
        coord.submit_arrays("digits-mlp", x, require_providers=["TensorrtExecutionProvider"])
    assert refused.value.code == "no_capacity"
    assert "TensorrtExecutionProvider" in refused.value.message
    assert "CPUExecutionProvider" in refused.value.message  # what the fleet does offer


async def test_preferred_provider_is_used_when_available(
    mosquitto_address: BrokerAddress,
    coordinator_factory: Callable[..., Any],
    agent_factory: Callable[..., Any],
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
) -> None:
    coord = await fleet(mosquitto_address, coordinator_factory, agent_factory)
    x = digits[0][:800]
    out = await coord.run("digits-mlp", x, batch_size=50, prefer_providers=[CUDA], timeout=30)
    assert set(out.result.per_agent) == {"gpu-1"}
    # Preferring one nobody has is no obstacle: any agent runs it.
    out = await coord.run(
        "digits-mlp", x, batch_size=50, prefer_providers=["TensorrtExecutionProvider"], timeout=30
    )
    assert out.result.samples == 800
