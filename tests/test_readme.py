"""The README's commands are true: CI runs its test command, and its MQTT example works."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from protocol import BrokerAddress, JobResult
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def quick_start() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, flags=re.S)


def test_quick_start_is_two_commands_and_ci_runs_the_test_command_verbatim() -> None:
    demo, tests = quick_start()[:2]
    assert "\n" not in demo and demo.endswith("edge-offload demo")
    assert "\n" not in tests and "pytest" in tests
    ci = (REPO / ".ci" / "run").read_text()
    assert tests in ci.splitlines()
    assert "apt-get install -y" in ci and "mosquitto mosquitto-clients" in ci


async def test_mosquitto_pub_example_gets_its_result(
    mosquitto_address: BrokerAddress, root: str, agent_factory: Any, coordinator_factory: Any
) -> None:
    block = README.split("<!-- mosquitto-example -->", 1)[1].split("<!-- /mosquitto-example -->")[0]
    script = re.search(r"```sh\n(.*?)\n```", block, flags=re.S)
    assert script is not None
    commands = (
        script.group(1)
        .replace("-p 1883", f"-p {mosquitto_address.port}")
        .replace("offload/v1", root)
    )
    await agent_factory(mosquitto_address, "readme-1")
    coord = await coordinator_factory(mosquitto_address)
    await coord.wait_for_agents(1)
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", commands, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 40)
    assert proc.returncode == 0, err.decode()
    result = JobResult.from_json(out.strip())
    assert result.ok and result.job_id == "hello-1"
    assert result.outputs["label"].to_array().tolist() == [0]
    assert json.loads(out)["outputs"]["label"]["data"] == "AAAAAAAAAAA="
