"""Models registered on the coordinator only reach the agents that need them, verified."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from coordinator.catalog import Catalog, CatalogEntry
from coordinator.deployer import CORRUPT_ENV
from protocol import BrokerAddress
from tests.conftest import DIGITS_MODEL, cli

pytestmark = pytest.mark.mosquitto

CHUNK = 64 * 1024


def variant(path: Path, out: Path, tag: str) -> Path:
    """The digits model with another doc string: same function, a different file."""
    model = onnx.load(str(path))
    model.doc_string = f"edge-offload test variant {tag}"
    onnx.save(model, str(out))
    return out


def direct(path: Path, x: np.ndarray[Any, Any]) -> dict[str, np.ndarray[Any, Any]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": x}), strict=True))


@pytest.fixture
def registered(tmp_path: Path) -> tuple[Catalog, CatalogEntry, Path]:
    catalog = Catalog(tmp_path / "registry")
    file = variant(DIGITS_MODEL, tmp_path / "digits_remote.onnx", "remote")
    entry = catalog.add(file, model_id="digits-remote", licence="BSD-3-Clause")
    return catalog, entry, file


async def test_registered_model_is_deployed_to_an_agent_that_lacks_it(
    mosquitto_address: BrokerAddress,
    coordinator_factory: Callable[..., Any],
    agent_factory: Callable[..., Any],
    registered: tuple[Catalog, CatalogEntry, Path],
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
    tmp_path: Path,
) -> None:
    catalog, entry, file = registered
    coord = await coordinator_factory(
        mosquitto_address, catalog_dir=catalog.root, deploy_chunk_bytes=CHUNK
    )
    cache = tmp_path / "a1-models"
    agent = await agent_factory(mosquitto_address, "a1", model_cache_dir=cache)
    await coord.wait_for_agents(1)
    assert not coord.registry.agents["a1"].has_model("digits-remote")

    x = digits[0][:600]
    out = await coord.run("digits-remote", x, batch_size=100, timeout=60)
    want = direct(file, x)
    assert np.array_equal(out["label"], want["label"])
    assert np.array_equal(out["probabilities"], want["probabilities"])

    d = coord.deployer
    assert d is not None
    assert d.counts["installed"] == 1 and d.counts["failed"] == 0
    assert d.counts["chunks_sent"] == -(-entry.size // CHUNK)
    # On the agent: the verified file under its sha256, advertised in a new birth.
    cached = cache / f"{entry.sha256}.onnx"
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == entry.sha256
    assert coord.registry.agents["a1"].has_model("digits-remote", entry.sha256)
    assert "digits-remote" in {m.id for m in agent.capabilities.models}

    # The next job finds it there: nothing is sent again.
    await coord.run("digits-remote", x[:50], timeout=30)
    assert d.counts["started"] == 1


async def test_corrupted_chunk_is_refused_and_sent_again(
    mosquitto_address: BrokerAddress,
    coordinator_factory: Callable[..., Any],
    agent_factory: Callable[..., Any],
    registered: tuple[Catalog, CatalogEntry, Path],
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    catalog, entry, file = registered
    monkeypatch.setenv(CORRUPT_ENV, "2")  # chunk 2's bytes flipped on its first send
    coord = await coordinator_factory(
        mosquitto_address, catalog_dir=catalog.root, deploy_chunk_bytes=CHUNK
    )
    cache = tmp_path / "a1-models"
    await agent_factory(mosquitto_address, "a1", model_cache_dir=cache)
    await coord.wait_for_agents(1)

    x = digits[0][:300]
    out = await coord.run("digits-remote", x, timeout=60)
    assert np.array_equal(out["label"], direct(file, x)["label"])

    d = coord.deployer
    assert d is not None
    assert d.counts["corrupted_by_test_hook"] == 1
    assert d.counts["chunks_refused"] == 1  # the agent caught it...
    assert d.counts["chunks_resent"] >= 1  # ... and got it again
    assert d.counts["installed"] == 1
    # What was installed is the registered file, byte for byte; nothing else is in the cache.
    assert hashlib.sha256((cache / f"{entry.sha256}.onnx").read_bytes()).hexdigest() == (
        entry.sha256
    )
    assert sorted(p.name for p in cache.glob("*.onnx")) == [f"{entry.sha256}.onnx"]


@pytest.mark.parametrize("aware", [True, False], ids=["aware", "naive"])
async def test_download_aware_placement_keeps_work_off_a_slow_link(
    aware: bool,
    mosquitto_address: BrokerAddress,
    coordinator_factory: Callable[..., Any],
    agent_factory: Callable[..., Any],
    registered: tuple[Catalog, CatalogEntry, Path],
    digits: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]],
    tmp_path: Path,
) -> None:
    """a1 has the model already; a2 lacks it behind a link the coordinator measured as
    slow (set here: loopback cannot be throttled in a unit test; bench/deploy.py measures
    the makespan with a real throttled link). Aware, the download is priced in and a small
    job stays on a1, with nothing sent; naive, a2 looks ready now."""
    catalog, entry, file = registered
    models = tmp_path / "a1-zoo"
    models.mkdir()
    (models / "digits_remote.onnx").write_bytes(file.read_bytes())
    coord = await coordinator_factory(
        mosquitto_address, catalog_dir=catalog.root, download_aware=aware
    )
    await agent_factory(mosquitto_address, "a1", models_dirs=(models,))
    await agent_factory(mosquitto_address, "a2", model_cache_dir=tmp_path / "a2-models")
    await coord.wait_for_agents(2)
    assert coord.registry.agents["a1"].has_model("digits-remote", entry.sha256)
    slow = coord.registry.agents["a2"]
    slow.bytes_per_ms = 5.0  # 5 kB/s: the 700 kB model would take over two minutes

    x = digits[0][:400]
    out = await coord.run("digits-remote", x, batch_size=20, timeout=60)
    assert np.array_equal(out["label"], direct(file, x)["label"])
    d = coord.deployer
    assert d is not None
    if aware:
        assert slow.deploy_ms["digits-remote"] > entry.size / 5.0  # priced: > 140 s
        assert d.counts["started"] == 0  # never worth sending it over that link
        assert set(out.result.per_agent) == {"a1"}
    else:
        assert slow.deploy_ms["digits-remote"] == 0.0  # looks ready now


async def test_a_pypi_model_registered_as_the_readme_shows_is_deployed_and_runs(
    mosquitto_address: BrokerAddress,
    coordinator_factory: Callable[..., Any],
    agent_factory: Callable[..., Any],
    tmp_path: Path,
) -> None:
    """Silero VAD from its wheel, registered without a batch axis, sent to an agent that
    lacks it; chunks split one per microtask, state and sample rate passed whole."""
    from tests.coordinator.test_any_model import silero_file

    vad = silero_file()
    code, out, err = await cli(
        "models", "add", str(vad), "--catalog", str(tmp_path / "reg"), "--id", "silero-vad",
        "--version", "6.2.1", "--batch-axis", "none", "--licence", "MIT", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["batch_axis"] is None
    coord = await coordinator_factory(mosquitto_address, catalog_dir=tmp_path / "reg")
    await agent_factory(mosquitto_address, "a1")
    await coord.wait_for_agents(1)

    t = np.arange(8 * 512) / 16000
    rng = np.random.default_rng(0)
    audio = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    chunks = audio.astype(np.float32).reshape(-1, 1, 512)
    state, sr = np.zeros((2, 1, 128), np.float32), np.array(16000)
    out_job = await coord.run(
        "silero-vad", {"input": chunks, "state": state, "sr": sr}, whole=["state", "sr"], timeout=60
    )
    session = ort.InferenceSession(str(vad), providers=["CPUExecutionProvider"])
    assert len(out_job.parts) == 8
    for chunk, part in zip(chunks, out_job.parts, strict=True):
        (want,) = session.run(["output"], {"input": chunk, "state": state, "sr": sr})
        assert np.array_equal(part["output"], want)
    assert coord.deployer is not None and coord.deployer.counts["installed"] == 1
