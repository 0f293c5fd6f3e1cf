"""Model deployment to a real agent over Mosquitto: the test plays the coordinator.

Offers, chunks (binary frames) and aborts go to the agent's ``models`` topic; its acks come
back on ``deploys``, its births on ``state``. Models are the digits MLP and variants of it
whose bytes (hence sha256) differ only in the ONNX doc_string.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from prometheus_client import generate_latest

from agent import Agent, AgentConfig
from agent.config import default_model_cache_dir
from agent.deploy import ModelCacheDir, PartialFile, check_offer
from agent.store import ModelStore
from protocol import (
    AgentState,
    BrokerAddress,
    Heartbeat,
    ModelAbort,
    ModelAck,
    ModelChunk,
    ModelInfo,
    ModelOffer,
    RunTask,
    TaskResult,
    Tensor,
    TensorSpec,
    Topics,
    encode,
    encode_arrays,
)
from tests.agent.test_agent import RawClient, raw_client
from tests.conftest import DIGITS_MODEL, MODELS, wait_until

CHUNK = 64 * 1024
MANIFEST = json.loads((MODELS / "manifest.json").read_text())
DIGITS_ENTRY = next(m for m in MANIFEST["models"] if m["id"] == "digits-mlp")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def variant(tmp_path: Path, tag: str) -> Path:
    """The digits model with another doc_string: same graph, other bytes and sha256."""
    model = onnx.load(str(DIGITS_MODEL))
    model.doc_string = f"variant {tag}"
    path = tmp_path / f"digits-{tag}.onnx"
    onnx.save(model, str(path))
    return path


def offer_for(
    blob: bytes,
    model_id: str,
    transfer_id: str,
    *,
    chunk_size: int = CHUNK,
    sha: str | None = None,
) -> ModelOffer:
    info = ModelInfo(
        id=model_id,
        version="2",
        sha256=sha or sha256(blob),
        size=len(blob),
        inputs=[TensorSpec(**s) for s in DIGITS_ENTRY["inputs"]],
        outputs=[TensorSpec(**s) for s in DIGITS_ENTRY["outputs"]],
    )
    return ModelOffer(
        transfer_id=transfer_id,
        model=info,
        chunk_size=chunk_size,
        chunks=-(-len(blob) // chunk_size),
        source="tests",
        licence="BSD-3-Clause",
        ts=time.time(),
    )


def chunk_msg(transfer_id: str, blob: bytes, index: int, *, corrupt: bool = False) -> bytes:
    data = blob[index * CHUNK : (index + 1) * CHUNK]
    digest = sha256(data)  # of the right data: a flipped byte on the way must be caught
    if corrupt:
        data = bytes([data[0] ^ 0xFF]) + data[1:]
    tensor = Tensor.from_array(np.frombuffer(data, dtype=np.uint8))
    msg = ModelChunk(transfer_id=transfer_id, index=index, sha256=digest, data=tensor)
    return encode(msg, "binary")


def run_msg(task_id: str, model: str, x: np.ndarray[Any, Any], sha: str | None) -> bytes:
    return RunTask(
        task_id=task_id,
        job_id="deploy-job",
        attempt=1,
        model=model,
        inputs=encode_arrays({"input": x}),
        lease_until=time.time() + 60,
        sent_at=time.time(),
        model_sha256=sha,
    ).to_json()


class FakeCoordinator:
    """Publishes to one agent's topics and sorts what the agent publishes by topic."""

    def __init__(self, client: RawClient, topics: Topics, agent_id: str) -> None:
        self.client = client
        self.topics = topics
        self.agent_id = agent_id
        self.acks: asyncio.Queue[ModelAck] = asyncio.Queue()
        self.births: asyncio.Queue[AgentState] = asyncio.Queue()
        self.results: asyncio.Queue[TaskResult] = asyncio.Queue()
        self.heartbeats: asyncio.Queue[Heartbeat] = asyncio.Queue()

    async def pump(self) -> None:
        async for m in self.client.messages:
            payload = m.payload
            assert isinstance(payload, bytes)
            if m.topic.matches(self.topics.deploys(self.agent_id)):
                self.acks.put_nowait(ModelAck.from_json(payload))
            elif m.topic.matches(self.topics.state(self.agent_id)):
                self.births.put_nowait(AgentState.from_json(payload))
            elif m.topic.matches(self.topics.results(self.agent_id)):
                self.results.put_nowait(TaskResult.from_json(payload))
            elif m.topic.matches(self.topics.heartbeat(self.agent_id)):
                self.heartbeats.put_nowait(Heartbeat.from_json(payload))

    async def send(self, payload: bytes) -> None:
        await self.client.publish(self.topics.models(self.agent_id), payload, qos=1)

    async def task(self, payload: bytes) -> None:
        await self.client.publish(self.topics.tasks(self.agent_id), payload, qos=1)

    async def ack(self, timeout: float = 10) -> ModelAck:
        return await asyncio.wait_for(self.acks.get(), timeout)

    async def result(self, timeout: float = 10) -> TaskResult:
        return await asyncio.wait_for(self.results.get(), timeout)

    async def birth_where(
        self, predicate: Callable[[AgentState], bool], timeout: float = 10
    ) -> AgentState:
        async with asyncio.timeout(timeout):
            while not predicate(birth := await self.births.get()):
                pass
        return birth

    async def deploy(
        self, blob: bytes, model_id: str, transfer_id: str, *, corrupt: frozenset[int] = frozenset()
    ) -> list[ModelAck]:
        """Offer, then send every chunk at once (the window is the whole file) and go back
        to the chunk the agent asks for, until it installs or refuses the model."""
        offer = offer_for(blob, model_id, transfer_id)
        await self.send(offer.to_json())
        acks = [await self.ack()]
        assert (acks[0].state, acks[0].next_chunk) == ("receiving", 0), acks[0]
        corrupted: set[int] = set()
        sent = 0
        while True:
            for i in range(sent, offer.chunks):
                bad = i in corrupt and i not in corrupted
                corrupted.add(i)
                await self.send(chunk_msg(transfer_id, blob, i, corrupt=bad))
            sent = offer.chunks
            ack = await self.ack()
            acks.append(ack)
            if ack.state != "receiving":
                return acks
            if ack.error is not None:  # refused chunk: go back to it
                sent = ack.next_chunk


@contextlib.asynccontextmanager
async def coordinator(
    address: BrokerAddress, root: str, agent_id: str
) -> AsyncIterator[FakeCoordinator]:
    topics = Topics(root)
    filters = [
        topics.deploys(agent_id),
        topics.state(agent_id),
        topics.results(agent_id),
        topics.heartbeat(agent_id),
    ]
    async with raw_client(address, *filters) as client:
        fake = FakeCoordinator(client, topics, agent_id)
        pump = asyncio.create_task(fake.pump())
        try:
            yield fake
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await pump


def listed(state: AgentState, model_id: str) -> str | None:
    """The sha256 a birth lists for ``model_id``, or None."""
    assert state.capabilities is not None
    return next((m.sha256 for m in state.capabilities.models if m.id == model_id), None)


def cached_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name not in (".lock", "index.json"))


# -- end to end ---------------------------------------------------------------------------------


async def test_full_transfer_installs_announces_and_runs(
    mosquitto_address: BrokerAddress, root: str, agent_factory: Any, tmp_path: Path, digits: Any
) -> None:
    cache = tmp_path / "cache"
    agent = await agent_factory(
        mosquitto_address, "dep-1", model_cache_dir=cache, graph_optimization="extended"
    )
    # A byte-for-byte copy of the zoo's digits model, under a new id: the cache gets its own.
    blob = DIGITS_MODEL.read_bytes()
    sha = sha256(blob)
    async with coordinator(mosquitto_address, root, "dep-1") as c:
        first = await c.birth_where(lambda s: s.online)
        assert first.capabilities is not None and first.capabilities.model_cache is not None
        assert first.capabilities.model_cache.used_bytes == 0
        assert listed(first, "digits-copy") is None
        acks = await c.deploy(blob, "digits-copy", "tr-1")
        chunks = -(-len(blob) // CHUNK)
        assert chunks > 5
        assert [(a.state, a.next_chunk) for a in acks] == [("receiving", 0)] + [
            ("receiving", i) for i in range(1, chunks)
        ] + [("installed", 0)]
        assert all(a.transfer_id == "tr-1" and a.sha256 == sha and a.error is None for a in acks)

        birth = await c.birth_where(lambda s: listed(s, "digits-copy") is not None)
        assert birth.seq == first.seq and birth.online, "same connection, same seq"
        assert listed(birth, "digits-copy") == sha
        assert listed(birth, "digits-mlp") is not None, "the zoo is still there"
        assert birth.capabilities is not None and birth.capabilities.model_cache is not None
        assert birth.capabilities.model_cache.used_bytes == len(blob)
        info = next(m for m in birth.capabilities.models if m.id == "digits-copy")
        assert info.version == "2" and info.size == len(blob)

        x = digits[0][:16]
        await c.task(run_msg("run.0", "digits-copy", x, sha))
        result = await c.result()
    assert result.ok, result.error
    direct = ort.InferenceSession(str(DIGITS_MODEL), providers=["CPUExecutionProvider"])
    label, proba = direct.run(None, {"input": x})
    np.testing.assert_array_equal(result.outputs["label"].to_array(), label)
    np.testing.assert_allclose(result.outputs["probabilities"].to_array(), proba, rtol=1e-5)

    # The birth is retained: a coordinator starting now learns the model too.
    async with coordinator(mosquitto_address, root, "dep-1") as late:
        retained = await late.birth_where(lambda s: True)
        assert listed(retained, "digits-copy") == sha

    assert cached_files(cache) == [f"{sha}.onnx"]
    index = json.loads((cache / "index.json").read_text())
    (entry,) = index["models"]
    assert (entry["id"], entry["sha256"], entry["size"]) == ("digits-copy", sha, len(blob))
    assert (entry["version"], entry["source"], entry["licence"]) == ("2", "tests", "BSD-3-Clause")
    assert entry["batch_axis"] == 0 and entry["last_used"] > 0
    # The deployed session has the configured optimisation level.
    assert agent._store is not None
    so = agent._store.get("digits-copy").session.get_session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    d = agent.stats.deploy
    assert (d.installed, d.chunks, d.bytes_received) == (1, chunks, len(blob))


async def test_corrupt_chunk_is_refused_then_resent_and_accepted(
    mosquitto_address: BrokerAddress, root: str, agent_factory: Any, tmp_path: Path, digits: Any
) -> None:
    agent = await agent_factory(mosquitto_address, "dep-2", model_cache_dir=tmp_path / "cache")
    blob = variant(tmp_path, "b").read_bytes()
    async with coordinator(mosquitto_address, root, "dep-2") as c:
        acks = await c.deploy(blob, "digits-b", "tr-2", corrupt=frozenset({3}))
        x = digits[0][:4]
        await c.task(run_msg("run.b", "digits-b", x, sha256(blob)))
        result = await c.result()
    refused = [a for a in acks if a.error is not None]
    assert [(a.state, a.next_chunk, a.error.code) for a in refused if a.error] == [
        ("receiving", 3, "corrupt")
    ]
    assert acks[-1].state == "installed"
    # Chunks 4.. of the first window were out of order: acked with "go back to 3".
    ahead = acks[acks.index(refused[0]) + 1 :]
    assert all(a.next_chunk == 3 for a in ahead[: agent.stats.deploy.chunks_out_of_order])
    assert agent.stats.deploy.chunks_refused == 1
    metrics = generate_latest(agent.metrics.registry).decode()
    assert 'edge_offload_agent_model_chunks_total{event="refused_corrupt"} 1.0' in metrics
    assert 'edge_offload_agent_model_deploys_total{outcome="installed"} 1.0' in metrics
    assert result.ok and result.outputs["label"].to_array().shape == (4,)


async def test_file_not_matching_the_offer_is_refused_and_never_loaded(
    mosquitto_address: BrokerAddress, root: str, agent_factory: Any, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    agent = await agent_factory(mosquitto_address, "dep-3", model_cache_dir=cache)
    blob = variant(tmp_path, "c").read_bytes()
    claimed = sha256(variant(tmp_path, "other").read_bytes())
    async with coordinator(mosquitto_address, root, "dep-3") as c:
        first = await c.birth_where(lambda s: s.online)
        # Every chunk matches its own sha256; the whole file does not match the offer's.
        await c.send(offer_for(blob, "digits-c", "tr-3", sha=claimed).to_json())
        assert (await c.ack()).state == "receiving"
        for i in range(-(-len(blob) // CHUNK)):
            await c.send(chunk_msg("tr-3", blob, i))
        while (ack := await c.ack()).state == "receiving":
            assert ack.error is None
        assert ack.state == "refused" and ack.error is not None
        assert ack.error.code == "corrupt" and "sha256" in ack.error.message
        # No new birth: the retained one (this connection's) still lacks the model.
        await asyncio.sleep(0.2)
        assert c.births.empty()
    async with coordinator(mosquitto_address, root, "dep-3") as late:
        retained = await late.birth_where(lambda s: True)
        assert retained.seq == first.seq and listed(retained, "digits-c") is None
    assert cached_files(cache) == [], "neither the partial file nor a model file is left"
    assert "digits-c" not in {m.id for m in agent.capabilities.models}
    assert agent.stats.deploy.refused == {"corrupt": 1}


async def test_model_larger_than_the_budget_is_refused_no_room(
    mosquitto_address: BrokerAddress, root: str, agent_factory: Any, tmp_path: Path
) -> None:
    blob = DIGITS_MODEL.read_bytes()
    agent = await agent_factory(
        mosquitto_address,
        "dep-4",
        model_cache_dir=tmp_path / "cache",
        model_cache_bytes=len(blob) - 1,
        max_payload_bytes=256 * 1024,
    )
    topics = Topics(root)
    async with coordinator(mosquitto_address, root, "dep-4") as c:
        await c.send(b"\x00EOB garbage")
        await c.send(b'{"type": "model_offer"}')
        await c.send(b"{" * 300_000)  # over max_payload_bytes
        # On another agent's topic: the agent does not subscribe, and would not obey.
        agent._on_message(topics.models("someone-else"), offer_for(blob, "x", "t").to_json())
        await c.send(offer_for(blob, "digits-big", "tr-4").to_json())
        ack = await c.ack()
    assert ack.state == "refused" and ack.error is not None and ack.error.code == "no_room"
    assert f"needs {len(blob)} bytes" in ack.error.message
    d = agent.stats.deploy
    assert d.refused == {"no_room": 1} and d.rejected == 3 and agent.stats.misrouted == 1


async def test_least_recently_used_model_is_evicted_to_make_room(
    mosquitto_address: BrokerAddress, root: str, agent_factory: Any, tmp_path: Path, digits: Any
) -> None:
    cache = tmp_path / "cache"
    blobs = {tag: variant(tmp_path, tag).read_bytes() for tag in "xyz"}
    size = max(len(b) for b in blobs.values())
    agent = await agent_factory(
        mosquitto_address,
        "dep-5",
        model_cache_dir=cache,
        model_cache_bytes=size * 5 // 2,  # two fit, three do not
    )
    async with coordinator(mosquitto_address, root, "dep-5") as c:
        for tag in "xy":
            assert (await c.deploy(blobs[tag], f"digits-{tag}", f"tr-{tag}"))[-1].state == (
                "installed"
            )
        # x is used after y was installed: y is now the least recently used.
        await c.task(run_msg("use.x", "digits-x", digits[0][:2], None))
        assert (await c.result()).ok
        assert (await c.deploy(blobs["z"], "digits-z", "tr-z"))[-1].state == "installed"
        birth = await c.birth_where(lambda s: listed(s, "digits-z") is not None)
    ids = {m.id for m in birth.capabilities.models} if birth.capabilities else set()
    assert {"digits-x", "digits-z", "digits-mlp", "vibration-anomaly"} <= ids
    assert "digits-y" not in ids
    assert cached_files(cache) == sorted(f"{sha256(blobs[t])}.onnx" for t in "xz")
    assert agent.stats.deploy.evictions == 1
    assert birth.capabilities is not None and birth.capabilities.model_cache is not None
    used = birth.capabilities.model_cache.used_bytes
    assert used == len(blobs["x"]) + len(blobs["z"]) <= birth.capabilities.model_cache.budget_bytes


async def test_microtask_for_a_model_on_its_way_is_held_until_installed(
    mosquitto_address: BrokerAddress, root: str, agent_factory: Any, tmp_path: Path, digits: Any
) -> None:
    agent = await agent_factory(mosquitto_address, "dep-6", model_cache_dir=tmp_path / "cache")
    blob = variant(tmp_path, "h").read_bytes()
    sha = sha256(blob)
    x = digits[0][:8]
    async with coordinator(mosquitto_address, root, "dep-6") as c:
        await c.send(offer_for(blob, "digits-h", "tr-6").to_json())
        await c.task(run_msg("held.0", "digits-h", x, sha))
        assert (await c.ack()).state == "receiving"
        # Another version of a zoo model, and none on the way: refused at once.
        await c.task(run_msg("wrong.0", "digits-mlp", x, sha))
        wrong = await c.result()
        assert wrong.task_id == "wrong.0" and wrong.error is not None
        assert wrong.error.code == "unknown_model"
        zoo_sha = DIGITS_ENTRY["sha256"]
        assert sha[:12] in wrong.error.message and zoo_sha[:12] in wrong.error.message
        # Held, not refused: a heartbeat lists it, so its lease is renewed.
        async with asyncio.timeout(5):
            while ("held.0", 1) not in (await c.heartbeats.get()).active:
                pass
        assert c.results.empty()
        for i in range(-(-len(blob) // CHUNK)):
            await c.send(chunk_msg("tr-6", blob, i))
        result = await c.result()
        while (await c.ack()).state == "receiving":
            pass
    assert result.task_id == "held.0" and result.ok, result.error
    assert result.outputs["label"].to_array().shape == (8,)
    await wait_until(lambda: not agent._active, timeout=5, what="nothing held")


async def test_held_microtasks_are_answered_when_the_transfer_is_aborted_or_times_out(
    mosquitto_address: BrokerAddress, root: str, agent_factory: Any, tmp_path: Path, digits: Any
) -> None:
    cache = tmp_path / "cache"
    agent = await agent_factory(
        mosquitto_address, "dep-7", model_cache_dir=cache, deploy_idle_timeout_s=0.5
    )
    blob = variant(tmp_path, "a").read_bytes()
    sha = sha256(blob)
    x = digits[0][:2]
    async with coordinator(mosquitto_address, root, "dep-7") as c:
        await c.send(offer_for(blob, "digits-a", "tr-7").to_json())
        await c.task(run_msg("abort.0", "digits-a", x, sha))
        assert (await c.ack()).state == "receiving"
        await c.send(chunk_msg("tr-7", blob, 0))
        assert (await c.ack()).next_chunk == 1
        await c.send(ModelAbort(transfer_id="tr-7", reason="operator said so").to_json())
        aborted = await c.result()
        assert aborted.task_id == "abort.0" and aborted.error is not None
        assert aborted.error.code == "unknown_model" and "operator said so" in aborted.error.message
        await c.send(chunk_msg("tr-7", blob, 1))  # of a transfer that is over: ignored

        # No chunk at all after the offer: dropped after the idle timeout.
        await c.send(offer_for(blob, "digits-a", "tr-8").to_json())
        await c.task(run_msg("idle.0", "digits-a", x, sha))
        assert (await c.ack()).state == "receiving"
        timed_out = await c.result()
        ack = await c.ack()
    assert timed_out.task_id == "idle.0" and timed_out.error is not None
    assert timed_out.error.code == "unknown_model"
    assert ack.state == "refused" and ack.transfer_id == "tr-8"
    d = agent.stats.deploy
    assert (d.aborted, d.timed_out, d.chunks_ignored) == (1, 1, 1)
    assert cached_files(cache) == []


async def test_restart_reloads_the_cache_but_never_a_corrupted_file(
    mosquitto_address: BrokerAddress, root: str, tmp_path: Path, digits: Any
) -> None:
    cache = tmp_path / "cache"
    blobs = {tag: variant(tmp_path, tag).read_bytes() for tag in ("good", "bad", "short")}
    config = AgentConfig(
        agent_id="dep-8",
        broker=mosquitto_address,
        root=root,
        models_dirs=(MODELS,),
        benchmark=False,
        heartbeat_s=0.5,
        spool_dir=None,
        model_cache_dir=cache,
    )
    async with Agent(config) as agent, coordinator(mosquitto_address, root, "dep-8") as c:
        await agent.wait_connected()
        for tag, blob in blobs.items():
            assert (await c.deploy(blob, f"digits-{tag}", f"tr-{tag}"))[-1].state == "installed"
        old_seq = (await c.birth_where(lambda s: listed(s, "digits-short") is not None)).seq
    # While the agent is down, one file is damaged, one truncated, and a transfer was
    # left unfinished.
    bad = cache / f"{sha256(blobs['bad'])}.onnx"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    short = cache / f"{sha256(blobs['short'])}.onnx"
    short.write_bytes(blobs["short"][:1000])
    (cache / f".partial-{'0' * 64}").write_bytes(b"half a model")

    async with Agent(config) as agent, coordinator(mosquitto_address, root, "dep-8") as c:
        await agent.wait_connected()
        birth = await c.birth_where(lambda s: s.seq != old_seq)  # not the retained old one
        assert listed(birth, "digits-good") == sha256(blobs["good"])
        assert listed(birth, "digits-bad") is None and listed(birth, "digits-short") is None
        assert birth.capabilities is not None and birth.capabilities.model_cache is not None
        assert birth.capabilities.model_cache.used_bytes == len(blobs["good"])
        await c.task(run_msg("after.0", "digits-good", digits[0][:3], sha256(blobs["good"])))
        result = await c.result()
        assert result.ok, result.error
    assert cached_files(cache) == [f"{sha256(blobs['good'])}.onnx"]
    index = json.loads((cache / "index.json").read_text())
    assert [e["id"] for e in index["models"]] == ["digits-good"]


async def test_reoffer_restarts_and_a_cached_file_serves_a_second_id_at_once(
    mosquitto_address: BrokerAddress, root: str, agent_factory: Any, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    agent = await agent_factory(mosquitto_address, "dep-9", model_cache_dir=cache)
    blob = variant(tmp_path, "r").read_bytes()
    sha = sha256(blob)
    async with coordinator(mosquitto_address, root, "dep-9") as c:
        await c.send(offer_for(blob, "digits-r", "tr-r").to_json())
        assert (await c.ack()).next_chunk == 0
        for i in range(3):
            await c.send(chunk_msg("tr-r", blob, i))
        assert [(await c.ack()).next_chunk for _ in range(3)] == [1, 2, 3]
        # The coordinator lost track and offers again: the agent starts over at chunk 0.
        acks = await c.deploy(blob, "digits-r", "tr-r")
        assert acks[-1].state == "installed"
        # The same file under another id: nothing to transfer.
        await c.send(offer_for(blob, "digits-r2", "tr-r2").to_json())
        ack = await c.ack()
        assert (ack.state, ack.transfer_id) == ("installed", "tr-r2")
        birth = await c.birth_where(lambda s: listed(s, "digits-r2") is not None)
        # And again under the first id: installed already.
        await c.send(offer_for(blob, "digits-r", "tr-r3").to_json())
        assert (await c.ack()).state == "installed"
    assert listed(birth, "digits-r") == listed(birth, "digits-r2") == sha
    assert birth.capabilities is not None and birth.capabilities.model_cache is not None
    assert birth.capabilities.model_cache.used_bytes == len(blob), "one file for both ids"
    assert cached_files(cache) == [f"{sha}.onnx"]
    assert agent.stats.deploy.installed == 2


async def test_inconsistent_model_messages_are_refused_and_nothing_breaks(
    mosquitto_address: BrokerAddress, root: str, agent_factory: Any, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    agent = await agent_factory(mosquitto_address, "dep-10", model_cache_dir=cache)
    topic = Topics(root).models("dep-10")
    blob = variant(tmp_path, "i").read_bytes()
    good = chunk_msg("tr-i", blob, 0)
    offer = offer_for(blob, "digits-i", "tr-i")
    async with coordinator(mosquitto_address, root, "dep-10") as c:
        for payload in (
            good[:-1],  # truncated binary frame
            good[:40],
            b"\x00EOB" + b"\xff" * 8,
            b"[]",
            b'{"type": "model_chunk", "transfer_id": "tr-i", "index": -1}',
            ModelAbort(transfer_id="nobody").to_json(),  # nothing to abort: ignored
            offer.model_copy(update={"chunks": offer.chunks + 5}).to_json(),
        ):
            agent._on_message(topic, payload)  # never raises
        ack = await c.ack()
        assert (ack.state, ack.error and ack.error.code) == ("refused", "bad_request")
        # A chunk of another length than the offer says: the transfer is refused.
        await c.send(offer.to_json())
        assert (await c.ack()).state == "receiving"
        short = Tensor.from_array(np.frombuffer(blob[:100], dtype=np.uint8))
        msg = ModelChunk(transfer_id="tr-i", index=0, sha256=sha256(blob[:100]), data=short)
        await c.send(encode(msg, "binary"))
        ack = await c.ack()
        assert (ack.state, ack.error and ack.error.code) == ("refused", "bad_request")
        # The agent still installs a good transfer afterwards.
        assert (await c.deploy(blob, "digits-i", "tr-i2"))[-1].state == "installed"
    d = agent.stats.deploy
    assert d.rejected == 5 and d.refused == {"bad_request": 2}
    assert cached_files(cache) == [f"{sha256(blob)}.onnx"]


# -- without a broker ---------------------------------------------------------------------------


def test_go_back_n_rule(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 10  # 2560 bytes in chunks of 1000
    pieces = [blob[i : i + 1000] for i in range(0, len(blob), 1000)]
    f = PartialFile(tmp_path / ".partial-x", len(blob), 1000, len(pieces))
    assert f.accept(1, sha256(pieces[1]), pieces[1]) == "ahead"
    assert f.accept(0, sha256(pieces[1]), pieces[0]) == "corrupt"
    assert f.next_chunk == 0, "a refused chunk is asked for again"
    assert f.accept(0, sha256(pieces[0]), pieces[0]) == "written"
    assert f.accept(0, sha256(pieces[0]), pieces[0]) == "duplicate"
    assert f.accept(2, sha256(pieces[2]), pieces[2]) == "ahead"
    assert f.accept(1, sha256(pieces[1]), pieces[1]) == "written"
    assert not f.complete
    assert f.accept(2, sha256(pieces[2]), pieces[2]) == "written"
    assert f.complete and f.next_chunk == 3
    assert f.finish(sha256(blob)) is None
    assert (tmp_path / ".partial-x").read_bytes() == blob

    g = PartialFile(tmp_path / ".partial-y", len(blob), 1000, len(pieces))
    for i, p in enumerate(pieces):
        assert g.accept(i, sha256(p), p) == "written"
    assert "sha256" in (g.finish("0" * 64) or "")
    assert not (tmp_path / ".partial-y").exists(), "a file that fails its check is deleted"


def test_offers_must_describe_their_chunks() -> None:
    blob = b"x" * 1000
    assert check_offer(offer_for(blob, "m", "t", chunk_size=100)) is None
    assert check_offer(offer_for(blob, "m", "t", chunk_size=300)) is None  # 4 chunks
    too_few = offer_for(blob, "m", "t", chunk_size=100).model_copy(update={"chunks": 9})
    assert "cannot hold" in (check_offer(too_few) or "")
    too_many = offer_for(blob, "m", "t", chunk_size=100).model_copy(update={"chunks": 11})
    assert "need 10 chunks" in (check_offer(too_many) or "")


def test_sessions_honour_the_configured_optimisation_and_threads(tmp_path: Path) -> None:
    cpu = ["CPUExecutionProvider"]
    store = ModelStore((MODELS,), providers=cpu, threads_per_slot=2, graph_optimization="basic")
    store.load_all()
    so = store.get("digits-mlp").session.get_session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert so.intra_op_num_threads == 2
    assert not store.get("digits-mlp").deployed

    # install() takes a verified file; another sha256 under the same id replaces the model.
    path = variant(tmp_path, "s")
    model = store.install(path, {"id": "digits-mlp", "sha256": sha256(path.read_bytes())})
    assert model.deployed and store.get("digits-mlp") is model
    so = model.session.get_session_options()
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert store.remove("digits-mlp") is model and store.find("digits-mlp") is None
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not onnx")
    with pytest.raises(Exception, match="cannot load"):
        store.install(bogus, {"id": "bogus", "sha256": sha256(b"not onnx")})


def test_cache_dir_cleans_up_and_is_one_process_only(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f".partial-{'a' * 64}").write_bytes(b"x")
    (cache / f"{'b' * 64}.onnx").write_bytes(b"not listed in any index")
    (cache / "index.json").write_text("{not json")
    shutil.copy(DIGITS_MODEL, cache / "keep-me.txt")  # not ours: left alone
    first = ModelCacheDir(cache)
    try:
        assert sorted(p.name for p in cache.iterdir()) == [".lock", "index.json", "keep-me.txt"]
        assert json.loads((cache / "index.json").read_text())["models"] == [], "rewritten"
        assert first.entries() == [] and first.used_bytes == 0
        with pytest.raises(RuntimeError, match="in use"):
            ModelCacheDir(cache)
    finally:
        first.close()
    ModelCacheDir(cache).close()


def test_model_cache_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    cfg = AgentConfig(agent_id="press-7")
    assert cfg.model_cache_dir == tmp_path / "c/edge-offload/agent-press-7/models"
    assert (cfg.model_cache_bytes, cfg.graph_optimization) == (2 * 2**30, "all")
    assert cfg.deploy_idle_timeout_s == 60.0
    assert cfg.with_(agent_id="press-8").model_cache_dir == default_model_cache_dir("press-8")
    assert cfg.with_(slots=3).model_cache_dir == cfg.model_cache_dir
    assert AgentConfig(agent_id="a", model_cache_dir=None).model_cache_dir is None

    toml = tmp_path / "agent.toml"
    toml.write_text(
        '[agent]\nagent_id = "a"\nmodel_cache_dir = "/srv/models"\nmodel_cache_bytes = 1000\n'
        'graph_optimization = "basic"\n'
    )
    cfg = AgentConfig.load(toml)
    assert (cfg.model_cache_dir, cfg.model_cache_bytes) == (Path("/srv/models"), 1000)
    assert cfg.graph_optimization == "basic"
    monkeypatch.setenv("EDGE_OFFLOAD_AGENT_MODEL_CACHE_DIR", "none")
    monkeypatch.setenv("EDGE_OFFLOAD_AGENT_GRAPH_OPTIMIZATION", "DISABLE")
    monkeypatch.setenv("EDGE_OFFLOAD_AGENT_DEPLOY_IDLE_TIMEOUT_S", "5")
    cfg = AgentConfig.load(toml)
    assert (cfg.model_cache_dir, cfg.graph_optimization) == (None, "disable")
    assert cfg.deploy_idle_timeout_s == 5.0
    with pytest.raises(ValueError, match="graph_optimization"):
        AgentConfig.load(toml, graph_optimization="fastest")


def test_agent_cli_options_reach_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator import cli

    seen: list[AgentConfig] = []

    async def serve(factory: Callable[[], Agent], drain: Any) -> None:
        seen.append(factory().config)

    monkeypatch.setattr(cli, "_serve", serve)
    args = cli.build_parser().parse_args(
        [
            "agent",
            "--id",
            "cli-1",
            "--model-cache-dir",
            "/tmp/m",
            "--model-cache-mb",
            "3",
            "--graph-optimization",
            "extended",
        ]
    )
    assert args.func(args) == 0
    (cfg,) = seen
    assert (cfg.model_cache_dir, cfg.model_cache_bytes) == (Path("/tmp/m"), 3 * 2**20)
    assert cfg.graph_optimization == "extended"
