"""Results finished while the broker is away: kept on disk, bounded, sent after the next birth."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from agent import AgentConfig
from agent.config import default_spool_dir
from agent.spool import MemorySpool, ResultSpool
from coordinator.broker import DEV_CONFIG_FALLBACK, DEV_CONFIG_PATH, LocalBroker
from protocol import (
    AgentState,
    BrokerAddress,
    ErrorInfo,
    TaskResult,
    Topics,
    connect_options,
)
from tests.agent.test_agent import collect, raw_client, run_task
from tests.conftest import require_mosquitto, wait_until

Spool = ResultSpool | MemorySpool


def results_on_disk(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".result")


@pytest.fixture(params=["disk", "memory"])
def make_spool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Spool]]:
    """Open spools of one kind; both kinds keep the same order and bounds."""
    opened: list[Spool] = []

    def make(max_items: int = 100, max_bytes: int = 2**20) -> Spool:
        spool: Spool
        if request.param == "disk":
            spool = ResultSpool(tmp_path / "spool", max_items, max_bytes)
        else:
            spool = MemorySpool(max_items, max_bytes)
        opened.append(spool)
        return spool

    yield make
    for s in opened:
        s.close()


# -- ResultSpool and MemorySpool --------------------------------------------------------------


def test_entries_come_back_in_arrival_order(make_spool: Callable[..., Spool]) -> None:
    spool = make_spool()
    # Task ids that sort the other way round: the order must be arrival, not name.
    for i, task_id in enumerate(["z.9", "m:5", "a.0"]):
        assert spool.put(f"r/{i}", f"payload {i}".encode(), (task_id, i + 1))
    assert spool.keys() == [("z.9", 1), ("m:5", 2), ("a.0", 3)]
    entries = list(spool.items())
    assert [(e.topic, e.payload, e.key) for e in entries] == [
        ("r/0", b"payload 0", ("z.9", 1)),
        ("r/1", b"payload 1", ("m:5", 2)),
        ("r/2", b"payload 2", ("a.0", 3)),
    ]
    spool.remove(entries[1])
    spool.remove(entries[1])  # twice: no effect
    assert spool.keys() == [("z.9", 1), ("a.0", 3)] and len(spool) == 2
    if isinstance(spool, ResultSpool):
        names = results_on_disk(spool.directory)
        assert len(names) == 2 and names[0].endswith("-z.9-1.result")
        assert names[1].endswith("-a.0-3.result")


def test_bounded_by_count(make_spool: Callable[..., Spool]) -> None:
    spool = make_spool(max_items=2)
    assert spool.put("t", b"a", ("a", 1)) and spool.put("t", b"b", ("b", 1))
    assert not spool.put("t", b"c", ("c", 1)), "a third result exceeds max_items"
    assert spool.keys() == [("a", 1), ("b", 1)]
    spool.remove(next(iter(spool.items())))
    assert spool.put("t", b"c", ("c", 1)), "room again once one was sent"
    assert spool.keys() == [("b", 1), ("c", 1)]


def test_bounded_by_bytes(make_spool: Callable[..., Spool]) -> None:
    spool = make_spool(max_bytes=1000)
    assert not spool.put("t", b"x" * 1001, ("huge", 1)), "larger than the whole spool"
    assert spool.put("t", b"x" * 400, ("a", 1))
    assert spool.put("t", b"x" * 400, ("b", 1))
    used = spool.nbytes
    assert 800 <= used <= 1000
    assert not spool.put("t", b"x" * 400, ("c", 1)), "would exceed max_bytes"
    assert spool.nbytes == used and len(spool) == 2
    for entry in list(spool.items()):
        spool.remove(entry)
    assert spool.nbytes == 0
    assert spool.put("t", b"x" * 400, ("c", 1))


def test_results_survive_a_restart_and_new_ones_sort_after_them(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path, 100, 2**20)
    big = bytes(range(256)) * 1000
    assert spool.put("res/a", big, ("job.0", 1))
    assert spool.put("res/b", b"\x00EOB binary frame", ("job.1", 3))
    spool.close()

    again = ResultSpool(tmp_path, 100, 2**20)
    assert again.keys() == [("job.0", 1), ("job.1", 3)] and again.corrupt == 0
    assert again.nbytes == spool.nbytes
    assert again.put("res/c", b"new", ("job.2", 1))
    assert [(e.topic, e.payload) for e in again.items()] == [
        ("res/a", big),
        ("res/b", b"\x00EOB binary frame"),
        ("res/c", b"new"),
    ]
    again.close()


def test_corrupt_and_unfinished_files_are_deleted_and_counted(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path, 100, 2**20)
    for i in range(3):
        assert spool.put("res", b"p" * 100, (f"t.{i}", 1))
    spool.close()
    first, second, third = results_on_disk(tmp_path)
    # cut short, as a full disk or a copy gone wrong would leave it
    data = (tmp_path / second).read_bytes()
    (tmp_path / second).write_bytes(data[:-10])
    # a file with the right name but not a spooled result
    (tmp_path / "0000000000000099-x-1.result").write_bytes(b"not a result at all")
    # a write the previous process never finished
    (tmp_path / "0000000000000100.tmp").write_bytes(b"EOR1")
    (tmp_path / "notes.txt").write_text("not ours: left alone")

    again = ResultSpool(tmp_path, 100, 2**20)
    assert again.corrupt == 3
    assert again.keys() == [("t.0", 1), ("t.2", 1)]
    assert results_on_disk(tmp_path) == [first, third]
    assert not list(tmp_path.glob("*.tmp")) and (tmp_path / "notes.txt").exists()

    # damaged after it was indexed: skipped when read, and counted too
    (tmp_path / third).write_bytes(b"EOR1")
    assert [e.key for e in again.items()] == [("t.0", 1)]
    assert again.corrupt == 4 and again.keys() == [("t.0", 1)]
    again.close()


def test_one_process_per_spool_directory(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path, 10, 2**20)
    with pytest.raises(RuntimeError, match="in use"):
        ResultSpool(tmp_path, 10, 2**20)
    spool.close()
    ResultSpool(tmp_path, 10, 2**20).close()


def test_an_unwritable_spool_refuses_instead_of_raising(tmp_path: Path) -> None:
    spool = ResultSpool(tmp_path / "spool", 10, 2**20)
    assert spool.put("t", b"x", ("a", 1))
    shutil.rmtree(tmp_path / "spool")  # every write now fails, as on a full or broken disk
    assert not spool.put("t", b"y", ("b", 1))
    assert spool.keys() == [("a", 1)]
    spool.close()


# -- configuration ----------------------------------------------------------------------------


def test_spool_config_defaults_toml_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    cfg = AgentConfig(agent_id="press-7")
    assert cfg.spool_dir == tmp_path / "state/edge-offload/agent-press-7/results"
    assert (cfg.spool_max_items, cfg.spool_max_bytes) == (10_000, 256 * 2**20)
    assert cfg.with_(agent_id="press-8").spool_dir == default_spool_dir("press-8")
    assert cfg.with_(slots=3).spool_dir == cfg.spool_dir
    assert AgentConfig(agent_id="a", spool_dir=None).spool_dir is None

    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    assert (
        AgentConfig(agent_id="a").spool_dir
        == Path.home() / ".local/state/edge-offload/agent-a/results"
    )

    toml = tmp_path / "a.toml"
    toml.write_text('[agent]\nagent_id = "a"\nspool_dir = "/srv/spool"\nspool_max_items = 5\n')
    cfg = AgentConfig.load(toml)
    assert (cfg.spool_dir, cfg.spool_max_items) == (Path("/srv/spool"), 5)
    monkeypatch.setenv("EDGE_OFFLOAD_AGENT_SPOOL_DIR", "none")
    monkeypatch.setenv("EDGE_OFFLOAD_AGENT_SPOOL_MAX_BYTES", "4096")
    cfg = AgentConfig.load(toml)
    assert (cfg.spool_dir, cfg.spool_max_bytes) == (None, 4096), "environment beats the file"
    assert AgentConfig.load(toml, spool_dir="").spool_dir is None
    with pytest.raises(ValueError, match="spool_max_items"):
        AgentConfig(agent_id="a", spool_max_items=0)


# -- against a real broker --------------------------------------------------------------------


def result_payload(task_id: str, attempt: int, agent_id: str) -> bytes:
    return TaskResult(
        task_id=task_id,
        job_id="old",
        attempt=attempt,
        agent_id=agent_id,
        ok=False,
        error=ErrorInfo(code="execution_failed", message="finished before the restart"),
    ).to_json()


async def test_results_left_by_a_previous_run_follow_the_first_birth(
    address: BrokerAddress, root: str, agent_factory: Any, digits: Any, tmp_path: Path
) -> None:
    topics = Topics(root)
    spool_dir = tmp_path / "spool"
    left = ResultSpool(spool_dir, 10, 2**20)
    assert left.put(topics.results("sp-2"), result_payload("old.0", 2, "sp-2"), ("old.0", 2))
    left.close()
    async with raw_client(address, topics.results("sp-2"), topics.state("sp-2")) as c:
        agent = await agent_factory(address, "sp-2", spool_dir=spool_dir)
        msgs = await collect(c, 2, timeout=10)
        kinds = [m.topic.value.rsplit("/", 1)[1] for m in msgs]
        assert kinds == ["state", "results"], "the birth first, then the result it announced"
        birth = AgentState.from_json(msgs[0].payload)  # type: ignore[arg-type]
        assert birth.online and birth.held == [("old.0", 2)]
        result = TaskResult.from_json(msgs[1].payload)  # type: ignore[arg-type]
        assert (result.task_id, result.attempt) == ("old.0", 2)
        assert results_on_disk(spool_dir) == []
        # The same attempt delivered again is already answered: not run a second time.
        await c.publish(topics.tasks("sp-2"), run_task("old.0", digits[0][:2], attempt=2), qos=1)
        await wait_until(lambda: agent.stats.duplicates == 1, timeout=10, what="duplicate")
        assert await collect(c, 1, timeout=0.5) == []
    assert agent.stats.received == 0


@pytest.fixture
def restartable_mosquitto(tmp_path: Path) -> Iterator[LocalBroker]:
    """A Mosquitto of our own that keeps sessions across a restart (the shared one must not
    restart under other tests): a subscriber then misses nothing, whoever reconnects first."""
    require_mosquitto()
    base = DEV_CONFIG_PATH.read_text() if DEV_CONFIG_PATH.is_file() else DEV_CONFIG_FALLBACK
    assert "persistence false" in base
    conf = tmp_path / "mosquitto.conf"
    db = tmp_path / "db"
    db.mkdir()
    # Started as root, Mosquitto drops to the "mosquitto" user, which cannot write in
    # tmp_path; "user" names the current user, and has no effect when not root.
    user = pwd.getpwuid(os.getuid()).pw_name
    persist = f"persistence true\npersistence_location {db}/\nuser {user}"
    conf.write_text(base.replace("persistence false", persist))
    with LocalBroker(kind="mosquitto", config=conf) as broker:
        yield broker


@contextlib.asynccontextmanager
async def persistent_client(address: BrokerAddress, ident: str) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client(
        **connect_options(address, identifier=ident, clean_session=False)
    ) as c:
        yield c


async def test_a_result_finished_during_an_outage_is_spooled_then_sent_once(
    restartable_mosquitto: LocalBroker, root: str, agent_factory: Any, digits: Any, tmp_path: Path
) -> None:
    broker = restartable_mosquitto
    address = BrokerAddress(host=broker.info.host, port=broker.info.port)
    topics = Topics(root)
    spool_dir = tmp_path / "spool"
    watched = (topics.results("sp-1"), topics.state("sp-1"))
    watcher = f"t-{uuid.uuid4().hex[:8]}"
    async with persistent_client(address, watcher) as c:
        for t in watched:
            await c.subscribe(t, qos=1)
    # one slot, about 1.5 s per microtask: still running when the broker goes away
    agent = await agent_factory(address, "sp-1", slots=1, slowdown=1000.0, spool_dir=spool_dir)
    async with raw_client(address) as c:
        await c.publish(topics.tasks("sp-1"), run_task("sp.0", digits[0][:500], attempt=2), qos=1)
    await wait_until(lambda: agent.stats.peak_running == 1, timeout=10, what="task running")

    broker.stop()
    assert agent.stats.completed == 0, "the microtask must finish while disconnected"
    await wait_until(lambda: agent.stats.completed == 1, timeout=30, what="microtask done")
    assert agent.stats.spooled == 1, "finished with no broker: spooled, not handed to paho"
    assert agent.stats.spool_dropped == 0
    (name,) = results_on_disk(spool_dir)
    assert name.endswith("-sp.0-2.result")

    broker.start()
    async with persistent_client(address, watcher) as c:
        msgs: list[aiomqtt.Message] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                async for m in c.messages:
                    if any(m.topic.matches(t) for t in watched):
                        msgs.append(m)
                    if m.topic.matches(watched[0]):
                        break
        # anything that would be a second copy arrives in well under a second
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                async for m in c.messages:
                    if any(m.topic.matches(t) for t in watched):
                        msgs.append(m)
    # In arrival order: ("state", AgentState) and ("result", TaskResult).
    seen: list[tuple[str, Any]] = [
        ("result", TaskResult.from_json(m.payload))  # type: ignore[arg-type]
        if m.topic.matches(watched[0])
        else ("state", AgentState.from_json(m.payload))  # type: ignore[arg-type]
        for m in msgs
    ]
    results = [(r.task_id, r.attempt, r.ok) for kind, r in seen if kind == "result"]
    assert results == [("sp.0", 2, True)], "exactly once"
    births = [i for i, (kind, s) in enumerate(seen) if kind == "state" and s.online]
    assert births, "a birth after the reconnect"
    # The first birth (queued for the watcher before the outage) held nothing yet.
    assert seen[births[-1]][1].held == [("sp.0", 2)], "the birth lists the result it holds"
    assert births[-1] < [kind for kind, _ in seen].index("result"), "birth before result"
    assert results_on_disk(spool_dir) == [], "removed once handed to the client"
