"""Fuzzing every inbound topic with hypothesis: no crash, no hang, bounded memory, every
rejection counted.

Each inbound topic gets at least 10,000 distinct seeded payloads and 1,000 fully
hypothesis-driven ones (tests/fuzz_payloads.py), handed straight to the real handler of
running services (a coordinator, an agent with the digits model and an SDK client on the
session's Mosquitto, shared by these tests): through the broker they would take a hundred
times longer. One smaller test sends 500 payloads per coordinator topic through Mosquitto.

For every payload: the handler does not raise and returns within a second, and what it
did is what a model of the contract predicts: a message that is not valid and acceptable
is counted once, in its bucket (``Coordinator.rejected``; ``Agent.stats``); a client
resolves nothing it should not. Per topic, the process's RSS grows by less than 20 MB
from the warm-up to the end, tracemalloc finds less than 2 MB left allocated by 1,000 of
the payloads, and a real job through the same services afterwards returns exactly
onnxruntime's outputs.

The tests at the end reproduce the bugs this fuzzing found (a crash on deeply nested frame
headers and on absurd self-benchmarks, results with wrong dtypes or trailing dimensions
accepted, an infinite lease, unbounded memory for early results and dead agents, drops
that were not counted, a client trusting a payload's job id over its topic, ids with a
trailing newline); each failed before its fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import math
import struct
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
import psutil
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from agent import Agent, AgentConfig
from agent.store import ModelStore
from coordinator import Coordinator, CoordinatorConfig, OffloadClient
from coordinator.broker import LocalBroker
from coordinator.service import BIRTHS_GRACE_S, EARLY_RESULTS_LIMIT
from protocol import (
    AgentState,
    BrokerAddress,
    CancelTask,
    Capabilities,
    CoordinatorState,
    Heartbeat,
    InferenceJob,
    JobResult,
    JobStatus,
    ProtocolError,
    TaskResult,
    Topics,
    decode,
    encode_arrays,
    parse_task,
)
from protocol.codec import MAGIC
from tests import fuzz_payloads as fp
from tests.agent.test_agent import raw_client
from tests.conftest import MODELS, wait_until
from tests.coordinator.test_failures import assert_exact
from tests.coordinator.test_jobs import direct

pytestmark = pytest.mark.mosquitto

AGENT = "fz-agent"
LIMIT = 64 * 1024  # max_payload_bytes of the services under test: oversized is cheap
SEEDED = 10_000  # distinct seeded payloads per topic, at least
STRUCTURED = 1_000  # fully hypothesis-driven payloads per topic
SEEDED_BATCH, STRUCTURED_BATCH = 50, 25  # payloads per hypothesis example
RUN_EXAMPLES = 20  # examples per hypothesis run; the event loop runs between runs
PAYLOAD_S = 1.0  # no single payload may take longer (typical: 0.1 ms)
TOPIC_S = 60.0  # nor all of one topic's
MEMORY_BOUND = 20 * 2**20
RSS_BOUND = 64 * 2**20
THROUGH_BROKER = 500  # payloads per coordinator topic in the end-to-end test

# Messages the coordinator drops because of its state (valid, but out of date or from
# nobody it knows), and the counter each must land in.
DROPPED = {
    "heartbeat_from_unknown_or_offline_agent": {
        "heartbeat_unknown_agent",
        "heartbeat_offline_agent",
    },
    "heartbeat_with_an_old_seq": {"heartbeat_stale"},
    "birth_without_capabilities": {"state_no_capabilities"},
    "death_of_an_unknown_agent": {"state_unknown"},
    "death_of_an_offline_agent": {"state_stale"},
    "state_with_an_old_seq": {"state_stale"},
}
# The coordinator's counters for a message that is not acceptable, whatever the state.
COUNTED_ALWAYS = ("bad_topic", "too_large", "malformed_", "forged_", "job_too_large")

# The fuzz tests share one fleet, started once on a module-wide event loop.
FLEET_LOOP = pytest.mark.asyncio(loop_scope="module")

HYPOTHESIS = settings(
    max_examples=RUN_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.generate, Phase.shrink),
)


# -- logging: format every record, keep none ---------------------------------------------------


class _FormatOnly(logging.Handler):
    """Formats every record, so a record that cannot be formatted fails the handler that
    logged it, and keeps none: pytest's capture would keep 100,000 records, and through
    their exceptions' tracebacks the payloads too, which is not the services' memory."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.levels: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)
        self.levels[record.levelname] += 1


@contextlib.contextmanager
def format_only_logging() -> Iterator[_FormatOnly]:
    handler = _FormatOnly()
    saved = []
    for name in ("coordinator", "agent", "protocol"):
        lg = logging.getLogger(name)
        saved.append((lg, lg.propagate, lg.level))
        lg.addHandler(handler)
        lg.propagate = False
        lg.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        for lg, propagate, level in saved:
            lg.removeHandler(handler)
            lg.propagate = propagate
            lg.setLevel(level)


@pytest.fixture
def formatted_logs() -> Iterator[_FormatOnly]:
    with format_only_logging() as handler:
        yield handler


# -- the services ---------------------------------------------------------------------------------


@dataclass
class Fleet:
    coord: Coordinator
    agent: Agent
    client: OffloadClient
    topics: Topics
    x: np.ndarray[Any, Any]
    first_job: str  # a real job that ran before the fuzzing: its ids are replayed


async def past_births_grace(coord: Coordinator) -> None:
    """Submissions are judged at once (not held for the births) from then on."""
    await asyncio.sleep(max(0.0, coord._connected_at + BIRTHS_GRACE_S + 0.1 - time.monotonic()))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(
    mosquitto: LocalBroker, tmp_path_factory: pytest.TempPathFactory, digits: Any
) -> AsyncIterator[Fleet]:
    """One coordinator, agent and client for every fuzz test of this module (started once:
    each fuzz test leaves them as it found them, and checks that they still serve)."""
    address = BrokerAddress(host=mosquitto.info.host, port=mosquitto.info.port)
    root = f"test/fuzz-{uuid.uuid4().hex[:8]}"
    agent_config = AgentConfig(
        agent_id=AGENT,
        broker=address,
        root=root,
        models_dirs=(MODELS,),
        slots=1,
        benchmark=False,
        heartbeat_s=0.5,
        max_payload_bytes=LIMIT,
        spool_dir=tmp_path_factory.mktemp("fuzz-spool"),
    )
    # No rate limits: every payload reaches the parsers (tests/test_security.py floods).
    config = CoordinatorConfig(
        broker=address,
        root=root,
        max_payload_bytes=LIMIT,
        client_rate_per_s=0,
        agent_rate_per_s=0,
    )
    with format_only_logging():
        async with contextlib.AsyncExitStack() as stack:
            agent = await stack.enter_async_context(Agent(agent_config))
            await agent.wait_connected()
            coord = await stack.enter_async_context(Coordinator(config))
            await coord.wait_connected()
            await coord.wait_for_agents(1)
            client = await stack.enter_async_context(OffloadClient(address, root=root))
            x = digits[0][:40]
            out = await coord.run("digits-mlp", {"input": x}, batch_size=10, timeout=30)
            assert_exact(out, x, batch=10)
            await past_births_grace(coord)
            yield Fleet(coord, agent, client, Topics(root), x, out.job_id)


async def still_serves(fleet: Fleet, *, through_broker: bool = False) -> None:
    """A real job through the same services returns exactly onnxruntime's outputs."""
    await fleet.coord.wait_for_agents(1, timeout=10)
    runner = fleet.client if through_broker else fleet.coord
    out = await runner.run("digits-mlp", {"input": fleet.x}, batch_size=10, timeout=30)
    assert_exact(out, fleet.x, batch=10)


def idle_heartbeat(agent_id: str, seq: int) -> Heartbeat:
    return Heartbeat(
        agent_id=agent_id,
        seq=seq,
        ts=0,
        cpu_percent=0,
        memory_available=0,
        running=0,
        queued=0,
        slots=1,
        completed=0,
    )


def state_payload(agent_id: str, *, online: bool, seq: int, caps: Any = None) -> bytes:
    msg: dict[str, Any] = {"v": 1, "type": "state", "agent_id": agent_id, "online": online}
    msg |= {"seq": seq, "ts": time.time()}
    if caps is not None:
        msg["capabilities"] = caps if isinstance(caps, dict) else caps.model_dump(mode="json")
    return fp.to_json(msg)


def deliver_state(coord: Coordinator, agent_id: str, **fields: Any) -> None:
    coord._on_message(coord.topics.state(agent_id), state_payload(agent_id, **fields))


def bury_fakes(coord: Coordinator) -> None:
    """Deaths for every agent but the real one, so that no job goes to an agent that is
    not there."""
    for rec in list(coord.registry.agents.values()):
        if rec.agent_id != AGENT and rec.online:
            deliver_state(coord, rec.agent_id, online=False, seq=rec.seq)
            assert not rec.online


def expire_early_results(coord: Coordinator) -> None:
    """What housekeeping does ``dead_after_s`` later: results of agents that never announced
    themselves are dropped, and each is counted."""
    held, before = coord._early_count, coord.rejected["result_from_unknown_agent"]
    coord._expire_early_results(time.monotonic() + coord.config.dead_after_s + 1)
    assert coord._early_count == 0 and not coord._early_results
    assert coord.rejected["result_from_unknown_agent"] - before == held


# -- the fuzz driver ------------------------------------------------------------------------------

Check = Callable[[str, bytes], str]  # handles one payload, asserts, returns what happened


@dataclass
class FuzzRun:
    payloads: int = 0
    distinct: set[int] = field(default_factory=set)
    seconds: float = 0.0
    slowest_s: float = 0.0
    slowest: bytes = b""
    outcomes: Counter[str] = field(default_factory=Counter)
    traced_growth: int = 0
    rss_growth: int = 0

    def summary(self, topic: str) -> str:
        top = ", ".join(f"{k} {v}" for k, v in self.outcomes.most_common())
        return (
            f"{topic}: {self.payloads} payloads ({len(self.distinct)} distinct) in "
            f"{self.seconds:.1f}s, slowest {self.slowest_s * 1000:.1f} ms; RSS "
            f"{self.rss_growth / 2**20:+.1f} MiB after the warm-up, "
            f"{self.traced_growth / 2**10:.0f} KiB left allocated by 1,000 payloads (traced); "
            f"{top}"
        )


def plan(
    builder: Callable[..., Any],
    topics: dict[str, fp.Pools],
    *,
    weights: dict[str, int] | None = None,
) -> fp.Plan:
    """Each topic with the builder of its messages (its own id pools), ``weights`` times."""
    base = [(topic, functools.partial(builder, pools=pools)) for topic, pools in topics.items()]
    return [entry for entry in base for _ in range((weights or {}).get(entry[0], 1))]


async def fuzz(check: Check, topics: fp.Plan, settle: Callable[[], Awaitable[None]]) -> FuzzRun:
    """Seeded payloads until SEEDED distinct ones went through ``check``, then
    STRUCTURED hypothesis-driven ones, in hypothesis runs of about 1,000 between which the
    event loop serves the services (publishes flush, heartbeats arrive, the agent's
    results come back).

    Memory: the process's RSS from after the first run (imports, caches, warm-up) to the
    end, with the services settled and after a garbage collection; and, traced with
    tracemalloc (which makes the run about three times slower, hence not throughout),
    what one run of 1,000 seeded payloads leaves allocated once settled.
    """
    run = FuzzRun()
    proc = psutil.Process()
    salt = [0]

    def one(topic: str, payload: bytes) -> None:
        t0 = time.perf_counter()
        outcome = check(topic, payload)
        dt = time.perf_counter() - t0
        run.payloads += 1
        run.distinct.add(hash((topic, payload)))
        run.outcomes[outcome] += 1
        if dt > run.slowest_s:
            run.slowest_s, run.slowest = dt, payload[:200]
        assert dt < PAYLOAD_S, f"{topic}: one payload took {dt:.2f}s: {payload[:200]!r}"

    @HYPOTHESIS
    @given(fp.seeded(topics, size=SEEDED_BATCH, limit=LIMIT, salt=lambda: salt[0]))
    def seeded_run(samples: list[fp.Sample]) -> None:
        for s in samples:
            try:
                one(s.topic, s.payload)
            except Exception as e:
                e.add_note(f"{s!r}; made again by fp.sample(plan, {s.seed}, limit=LIMIT)")
                raise

    @HYPOTHESIS
    @given(
        st.lists(
            fp.structured(topics, limit=LIMIT), min_size=STRUCTURED_BATCH, max_size=STRUCTURED_BATCH
        )
    )
    def structured_run(samples: list[tuple[str, bytes]]) -> None:
        for topic, payload in samples:
            try:
                one(topic, payload)
            except Exception as e:
                e.add_note(f"on {topic}: {payload[:300]!r}")
                raise

    async def seeded_runs(until: Callable[[], bool]) -> None:
        while True:
            salt[0] += 1
            seeded_run()
            await asyncio.sleep(0.01)
            if until():
                return

    async def settled() -> int:
        await settle()
        gc.collect()
        return int(proc.memory_info().rss)

    start = time.perf_counter()
    await seeded_runs(lambda: True)  # warm-up: one run
    rss = await settled()
    await seeded_runs(lambda: len(run.distinct) >= SEEDED)
    tracemalloc.start()
    try:
        await seeded_runs(lambda: True)  # one run, traced
        await settle()
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    # What the test itself keeps (the set of distinct payloads) is not the services' memory.
    mine = snapshot.filter_traces([tracemalloc.Filter(True, __file__)])
    run.traced_growth = sum(s.size for s in snapshot.statistics("filename")) - sum(
        s.size for s in mine.statistics("filename")
    )
    target = run.payloads + STRUCTURED
    while run.payloads < target:
        structured_run()
        await asyncio.sleep(0.01)
    run.rss_growth = await settled() - rss
    run.seconds = time.perf_counter() - start
    return run


def assert_fuzz_run(run: FuzzRun, topic: str) -> None:
    print(run.summary(topic))
    assert len(run.distinct) >= SEEDED
    assert run.payloads >= SEEDED + STRUCTURED
    assert run.seconds < TOPIC_S, run.summary(topic)
    # RSS also keeps what the allocator has freed but not returned (it varied from +6 to
    # +30 MiB between runs of the same payloads): a coarse bound against a real leak, over
    # 13,000 payloads of up to 64 KiB; the traced check below is the precise one.
    assert run.rss_growth < RSS_BOUND, run.summary(topic)
    assert run.traced_growth < MEMORY_BOUND / 10, run.summary(topic)  # per 1,000 payloads


# -- what the coordinator should do with a payload ------------------------------------------------

_FROM_AGENT: dict[str, tuple[type[Any], str]] = {
    "results": (TaskResult, "result"),
    "heartbeat": (Heartbeat, "heartbeat"),
    "state": (AgentState, "state"),
}


def not_json(payload: bytes) -> bool:
    """An independent opinion: Python's own parser refuses it (and it is no binary frame;
    large payloads are left to the size limit)."""
    if payload[:4] == MAGIC or len(payload) > 8192:
        return False
    try:
        json.loads(payload)
    except (ValueError, RecursionError):
        return True
    return False


class CoordinatorOracle:
    """Predicts, from the payload and the coordinator's state, what the coordinator must do
    with a message on one of its inbound topics, then checks it did exactly that."""

    def __init__(self, coord: Coordinator) -> None:
        self.coord = coord
        self.limit = coord.config.max_payload_bytes

    def expect(self, topic: str, payload: bytes) -> tuple[str, Any]:
        coord = self.coord
        if topic.startswith(coord.topics.submit):
            identity = coord.topics.parse_submit(topic)  # "" on the anonymous topic
            if identity is None:
                return "bad_topic", None
            allowed = coord.config.allowed_clients
            if allowed and identity not in allowed:
                return "job_forbidden", None
            if len(payload) > self.limit:
                return "job_too_large", None
            try:
                spec = decode(InferenceJob, payload)
            except ProtocolError:
                return "job_malformed", None
            if identity and spec.client_id not in (None, identity):
                return "job_forbidden", spec
            if spec.job_id in coord.ledger.jobs or spec.job_id in coord._results:
                return "duplicate_job", spec
            return "job_judged", spec
        try:
            agent_id, channel = coord.topics.parse_agent(topic)
        except ProtocolError:
            return "bad_topic", None
        if channel not in _FROM_AGENT:
            return "bad_topic", None  # see test_messages_on_other_agent_channels_are_bad_topics
        if len(payload) > self.limit:
            return "too_large", None
        if channel == "state" and not payload:
            return "retained_state_cleared", None
        cls, kind = _FROM_AGENT[channel]
        try:
            msg = decode(cls, payload)
        except ProtocolError:
            return f"malformed_{kind}", None
        if msg.agent_id != agent_id:
            return f"forged_{kind}", msg
        rec = coord.registry.agents.get(agent_id)
        if kind == "result":
            if rec is None:
                full = coord._early_count >= EARLY_RESULTS_LIMIT
                return ("result_from_unknown_agent" if full else "result_held_for_birth"), msg
            task = coord._find_task(msg.job_id, msg.task_id)
            if task is None or not coord.ledger.is_current(task, msg.attempt, agent_id):
                return "stale_result", msg
            return "current_result", msg
        if kind == "heartbeat":
            if rec is None or not rec.online:
                return "heartbeat_from_unknown_or_offline_agent", msg
            if msg.seq < rec.seq:
                return "heartbeat_with_an_old_seq", msg
            return "heartbeat_applied", msg
        if rec is not None and msg.seq < rec.seq:
            return "state_with_an_old_seq", msg
        if msg.online:
            return ("birth" if msg.capabilities is not None else "birth_without_capabilities"), msg
        if rec is None:
            return "death_of_an_unknown_agent", msg
        return ("death" if rec.online else "death_of_an_offline_agent"), msg

    def __call__(self, topic: str, payload: bytes) -> str:
        coord = self.coord
        expected, msg = self.expect(topic, payload)
        if not_json(payload) and len(payload) <= self.limit and payload:
            assert expected.startswith(("malformed_", "job_malformed", "bad_topic")), (
                f"{topic}: {payload[:200]!r} is not JSON but {expected}"
            )
        before = Counter(coord.rejected)
        early, stale_states = coord._early_count, coord.registry.stale_states
        early_submits, jobs = len(coord._early_submits), len(coord.ledger.jobs)
        coord._on_message(topic, payload)  # must not raise
        counted = coord.rejected - before
        where = f"{topic} {payload[:300]!r}: expected {expected}, counted {dict(counted)}"
        assert len(coord._early_submits) == early_submits, where
        if expected.startswith(COUNTED_ALWAYS) or expected in (
            "job_malformed",
            "job_forbidden",
            "duplicate_job",
            "stale_result",
            "result_from_unknown_agent",
        ):
            assert counted == Counter({expected: 1}), where
        elif expected == "job_judged":
            if msg.job_id in coord.ledger.jobs:
                assert not counted and len(coord.ledger.jobs) >= jobs, where
                return "job_accepted"
            (bucket,) = counted.elements()
            assert bucket.startswith("job_"), where
            return bucket
        elif expected == "result_held_for_birth":
            assert not counted and coord._early_count == early + 1, where
        elif expected == "current_result":
            assert set(counted) <= {"bad_result"}, where
        elif expected in DROPPED:
            assert sum(counted.values()) == 1 and set(counted) <= DROPPED[expected], where
            if expected == "state_with_an_old_seq":
                assert coord.registry.stale_states == stale_states + 1, where
        else:
            assert not counted, where
            rec = coord.registry.agents[msg.agent_id] if msg is not None else None
            if expected == "heartbeat_applied":
                assert rec is not None and rec.heartbeat is not None, where
                assert rec.heartbeat.to_json() == msg.to_json(), where  # NaN != NaN
            elif expected == "birth":
                assert rec is not None and rec.online and rec.seq == msg.seq, where
            elif expected == "death":
                assert rec is not None and not rec.online, where
        return expected


# -- coordinator topics ---------------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["results", "heartbeat", "state", "submit"])
@FLEET_LOOP
async def test_fuzz_coordinator_topic(fleet: Fleet, channel: str) -> None:
    coord, t = fleet.coord, fleet.topics
    caps = fleet.agent.capabilities.model_dump_json()
    jobs = (fleet.first_job, "fz-job-0", "fz-job-1")
    # A registered fake (no work), one that died, and ids never heard of (their own for
    # each test); the real agent's topics too, except its state (a death would stop it).
    known, dead, ghost, ghost2 = (f"fz-{k}-{channel}" for k in ("known", "dead", "ghost", "ghost2"))
    if channel != "submit":
        deliver_state(coord, known, online=True, seq=10**6, caps=json.loads(caps))
        deliver_state(coord, dead, online=True, seq=5, caps=json.loads(caps))
        deliver_state(coord, dead, online=False, seq=5)
    others = (known, ghost, dead, AGENT)

    def agents(*ids: str) -> dict[str, fp.Pools]:
        # Most messages name the topic's agent; the others are forged.
        return {
            t.agent(a, channel): fp.Pools(  # type: ignore[arg-type]
                senders=(a, a, a, *others), jobs=jobs, capabilities=caps
            )
            for a in ids
        }

    if channel == "results":
        builder, topics = fp.task_result, agents(AGENT, known, ghost)
    elif channel == "heartbeat":
        builder, topics = fp.heartbeat, agents(AGENT, known, ghost, dead)
    elif channel == "state":
        builder, topics = fp.agent_state, agents(known, ghost, ghost2)
    else:
        # Anonymous and identified submissions (a job may claim another client id), and
        # submit topics that are not.
        builder = fp.inference_job
        pools = fp.Pools(jobs=(*jobs, "fz-job-2"), clients=("fz-client", "fz-client-2"))
        bad = (f"{t.submit}x", f"{t.submit}/a b", f"{t.submit}/fz-client/x", f"{t.submit}/")
        topics = {t.submit: pools, t.submit_as("fz-client"): pools} | dict.fromkeys(bad, pools)

    async def settle() -> None:
        await asyncio.sleep(0.3)  # rejections and statuses published, fuzz jobs run
        expire_early_results(coord)

    before = sum(coord.rejected.values())
    weights = {t.submit: 4, t.submit_as("fz-client"): 4}
    run = await fuzz(CoordinatorOracle(coord), plan(builder, topics, weights=weights), settle)
    assert_fuzz_run(run, f"coordinator {channel}")
    assert sum(coord.rejected.values()) - before >= run.payloads // 2  # most are refused
    state = coord._state_message(online=True)  # what coordinator/state publishes
    for reason, n in coord.rejected.items():
        assert state.counts[f"rejected_{reason}"] == n
    bury_fakes(coord)
    await still_serves(fleet)


# -- the agent's tasks topic ----------------------------------------------------------------------


class AgentOracle:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def expect(self, topic: str, payload: bytes) -> tuple[str, tuple[str, int] | None]:
        agent = self.agent
        if topic != agent._tasks_topic:
            return "misrouted", None
        if len(payload) > agent.config.max_payload_bytes:
            return "rejected", None
        try:
            msg = parse_task(payload)
        except ProtocolError:
            return "rejected", None
        key = (msg.task_id, msg.attempt)
        if isinstance(msg, CancelTask):
            return ("cancelled" if key in agent._active else "cancel_remembered"), key
        if key in agent._active or key in agent._seen:
            return "duplicates", key
        return "received", key

    def __call__(self, topic: str, payload: bytes) -> str:
        agent = self.agent
        expected, key = self.expect(topic, payload)
        if not_json(payload) and len(payload) <= agent.config.max_payload_bytes:
            assert expected in ("rejected", "misrouted"), f"{payload[:200]!r} is not JSON"
        s = agent.stats
        fields = ("misrouted", "rejected", "duplicates", "received", "cancelled")
        before = {f: getattr(s, f) for f in fields}
        agent._on_message(topic, payload)  # must not raise
        diff = {f: getattr(s, f) - before[f] for f in fields if getattr(s, f) != before[f]}
        where = f"{topic} {payload[:300]!r}: expected {expected}, counted {diff}"
        if expected == "cancel_remembered":
            assert not diff and key in agent._seen, where  # a late run must not start
        else:
            assert diff == {expected: 1}, where
        if expected == "received":
            assert key in agent._seen, where
        return expected


@FLEET_LOOP
async def test_fuzz_agent_tasks_topic(fleet: Fleet) -> None:
    agent, t = fleet.agent, fleet.topics
    pools = fp.Pools(jobs=("fz-job-0", "fz-job-1", fleet.first_job))
    topics = {t.tasks(AGENT): pools}
    # Topics the agent never subscribed to (a broker routing fault) must not be obeyed.
    misrouted = (t.results(AGENT), t.tasks("fz-other"), t.state(AGENT), t.tasks(AGENT) + "/x")
    topics |= dict.fromkeys(misrouted, pools)
    # The agent's own topic gets most of the payloads.
    topics_plan = plan(fp.task_message, topics, weights={t.tasks(AGENT): 6})

    async def settle() -> None:
        await wait_until(lambda: not agent._active, timeout=30, what="the agent's queue")
        await asyncio.sleep(0.2)

    run = await fuzz(AgentOracle(agent), topics_plan, settle)
    assert_fuzz_run(run, "agent tasks")
    s = agent.stats
    assert s.rejected + s.misrouted + s.duplicates + s.received + s.cancelled <= run.payloads
    assert s.peak_running <= agent.config.slots
    await still_serves(fleet)


# -- the client's topics --------------------------------------------------------------------------


class ClientOracle:
    """The client waits on a few jobs, watches one job's status and asks for the coordinator
    state; a payload may resolve a waiter only if it is a valid message meant for it."""

    def __init__(self, client: OffloadClient, jobs: tuple[str, ...], watched: str) -> None:
        self.client, self.jobs, self.watched = client, jobs, watched
        self.loop = asyncio.get_running_loop()
        self.statuses: list[JobStatus] = []
        self.t = client.topics

    def _arm(self) -> None:
        c = self.client
        for job in self.jobs:
            fut = c._waiting.get(job)
            if fut is None or fut.done():
                if fut is not None and not fut.cancelled():
                    fut.exception()  # retrieved: no "never retrieved" noise
                c._waiting[job] = self.loop.create_future()
        c._watchers[self.watched] = self.statuses.append
        if c._coordinator is None or c._coordinator.done():
            c._coordinator = self.loop.create_future()

    def __call__(self, topic: str, payload: bytes) -> str:
        c = self.client
        self._arm()
        valid: Any = None
        with contextlib.suppress(ProtocolError):
            if payload and topic == self.t.replies(c.client_id):
                valid = decode(JobResult, payload)
            elif payload and topic == self.t.coordinator:
                valid = CoordinatorState.from_json(payload)
            elif payload and topic == self.t.status(self.watched):
                valid = JobStatus.from_json(payload)
        waiting = dict(c._waiting)
        coordinator, statuses = c._coordinator, len(self.statuses)
        c._on_message(topic, payload)  # must not raise
        where = f"{topic} {payload[:300]!r}: valid {type(valid).__name__}"
        resolved = [job for job, fut in waiting.items() if fut.done()]
        assert coordinator is not None
        if isinstance(valid, JobResult) and valid.job_id in waiting:
            assert resolved == [valid.job_id], where
            fut = waiting[valid.job_id]
            if valid.ok:
                out = fut.result()
                assert out.outputs.keys() == valid.outputs.keys(), where
            else:
                assert fut.exception() is not None, where
        else:
            assert resolved == [], where
        assert coordinator.done() == isinstance(valid, CoordinatorState), where
        if coordinator.done():
            assert coordinator.result() == valid, where
        if isinstance(valid, JobStatus) and valid.job_id == self.watched:
            assert self.statuses[statuses:] == [valid], where
        else:  # a job's topic speaks only for that job
            assert len(self.statuses) == statuses, where
            if isinstance(valid, JobStatus):
                return "status_naming_another_job_ignored"
        if valid is None:
            return "ignored"
        return f"valid_{type(valid).__name__}" + ("_resolved" if resolved else "")


@pytest.mark.parametrize("kind", ["replies", "status", "coordinator"])
@FLEET_LOOP
async def test_fuzz_client_topic(fleet: Fleet, kind: str) -> None:
    client, t = fleet.client, fleet.topics
    jobs = ("fz-job-0", "fz-job-1")
    pools = fp.Pools(jobs=(*jobs, "fz-job-2"))
    topic, builder = {
        "replies": (t.replies(client.client_id), fp.job_result),
        "status": (t.status("fz-job-0"), fp.job_status),
        "coordinator": (t.coordinator, fp.coordinator_state),
    }[kind]
    # Some on topics the client never subscribed to (replies of another client).
    topics = {topic: pools, t.replies("fz-other-client"): pools}
    oracle = ClientOracle(client, jobs, watched="fz-job-0")

    async def settle() -> None:
        await asyncio.sleep(0.05)

    run = await fuzz(oracle, plan(builder, topics, weights={topic: 4}), settle)
    assert_fuzz_run(run, f"client {kind}")
    for job in jobs:  # leave the client as it was
        fut = client._waiting.pop(job, None)
        if fut is not None and fut.done() and not fut.cancelled():
            fut.exception()
    client._watchers.clear()
    client._coordinator = None
    await still_serves(fleet, through_broker=True)


# -- through the broker ---------------------------------------------------------------------------


def collect(topics: fp.Plan, n: int) -> list[tuple[str, bytes]]:
    """``n`` seeded payloads, generated up front."""
    out: list[tuple[str, bytes]] = []

    @settings(HYPOTHESIS, max_examples=n // SEEDED_BATCH, phases=[Phase.generate])
    @given(fp.seeded(topics, size=SEEDED_BATCH, limit=LIMIT))
    def run(samples: list[fp.Sample]) -> None:
        out.extend((s.topic, s.payload) for s in samples)

    run()
    return out


@FLEET_LOOP
async def test_fuzz_coordinator_through_mosquitto(
    fleet: Fleet, mosquitto_address: BrokerAddress
) -> None:
    """500 payloads per coordinator topic published on Mosquitto by a plain MQTT client:
    each is delivered, none makes the handler raise, the counters that do not depend on
    the coordinator's state match exactly, and a job from the SDK is still exact."""
    coord, t = fleet.coord, fleet.topics
    caps = fleet.agent.capabilities.model_dump_json()
    jobs = ("fz-job-0", "fz-job-1", fleet.first_job)
    ghosts = ("fz-broker-ghost-0", "fz-broker-ghost-1")

    def pools(a: str) -> fp.Pools:
        return fp.Pools(senders=(a, a, a, AGENT), jobs=jobs, capabilities=caps)

    channels: dict[str, tuple[Callable[..., Any], dict[str, fp.Pools]]] = {
        "results": (fp.task_result, {t.results(a): pools(a) for a in (AGENT, *ghosts)}),
        "heartbeat": (fp.heartbeat, {t.heartbeat(a): pools(a) for a in ghosts}),
        "state": (fp.agent_state, {t.state(a): pools(a) for a in ghosts}),
        "submit": (fp.inference_job, {t.submit: fp.Pools(jobs=jobs)}),
    }
    messages: list[tuple[str, bytes]] = []
    for builder, topics in channels.values():
        batch = collect(plan(builder, topics), THROUGH_BROKER)
        assert len(batch) == THROUGH_BROKER
        messages += batch
    oracle = CoordinatorOracle(coord)
    # The buckets a payload lands in whatever the coordinator's state: counted exactly.
    expected: Counter[str] = Counter()
    for topic, payload in messages:
        bucket, _ = oracle.expect(topic, payload)
        if bucket.startswith(COUNTED_ALWAYS) or bucket == "job_malformed":
            expected[bucket] += 1

    pending = Counter(messages)  # delivered ones are crossed off
    delivered: list[str] = []
    failures: list[tuple[str, bytes, BaseException]] = []

    def counting(topic: str, payload: bytes) -> None:
        if pending[topic, payload] > 0:
            pending[topic, payload] -= 1
            delivered.append(topic)
        try:
            coord._on_message(topic, payload)
        except Exception as e:  # the Link would only log it
            failures.append((topic, payload, e))

    coord._link.on_message = counting
    before = Counter(coord.rejected)
    start = time.perf_counter()
    async with raw_client(mosquitto_address) as c:
        for topic, payload in messages:
            await c.publish(topic, payload, qos=1)
    await wait_until(lambda: len(delivered) >= len(messages), timeout=60, what="every payload")
    elapsed = time.perf_counter() - start
    assert not failures, failures[:3]
    assert len(delivered) == len(messages)
    counted = coord.rejected - before
    for bucket, n in expected.items():
        assert counted[bucket] == n, (bucket, counted, expected)
    print(f"through mosquitto: {len(messages)} payloads in {elapsed:.1f}s; counted {dict(counted)}")
    await asyncio.sleep(0.3)
    bury_fakes(coord)
    expire_early_results(coord)
    await still_serves(fleet, through_broker=True)


# -- each rejection in its bucket -----------------------------------------------------------------


@pytest.fixture(scope="module")
def capabilities() -> Capabilities:
    """What a real agent with the digits model advertises (no self-benchmark)."""
    store = ModelStore((MODELS,), providers=["CPUExecutionProvider"])
    store.load_all()
    return Capabilities(
        hostname="fuzz",
        arch="x86_64",
        platform="Linux",
        cpu_count=1,
        memory_total=2**30,
        memory_available=2**30,
        onnxruntime=ort.__version__,
        providers=["CPUExecutionProvider"],
        slots=1,
        models=store.infos(),
    )


@dataclass
class Bench:
    """A coordinator whose only agent, ``fz-fake``, is the test itself."""

    coord: Coordinator
    topics: Topics
    x: np.ndarray[Any, Any]

    def run_job(self, n: int = 4, batch: int = 2) -> Any:
        """A job dispatched to fz-fake; returns its handle and its microtasks."""
        handle = self.coord.submit_arrays("digits-mlp", self.x[:n], batch_size=batch)
        job = self.coord.ledger.jobs[handle.job_id]
        assert all(task.agent_id == "fz-fake" for task in job.tasks)
        return handle, job.tasks

    def result(self, task: Any, **changes: Any) -> TaskResult:
        """The right answer to ``task``'s current attempt, with ``changes``."""
        label, prob = direct(self.x[task.start : task.stop])
        fields: dict[str, Any] = {
            "task_id": task.task_id,
            "job_id": task.job.job_id,
            "attempt": task.attempt,
            "agent_id": "fz-fake",
            "ok": True,
            "outputs": encode_arrays({"label": label, "probabilities": prob}),
        }
        return TaskResult(**(fields | changes))

    def deliver(self, topic: str, payload: bytes) -> Counter[str]:
        before = Counter(self.coord.rejected)
        self.coord._on_message(topic, payload)
        return self.coord.rejected - before


@pytest.fixture
async def bench(
    mosquitto_address: BrokerAddress,
    coordinator_factory: Any,
    capabilities: Capabilities,
    digits: Any,
    formatted_logs: _FormatOnly,
) -> Bench:
    coord = await coordinator_factory(mosquitto_address, max_payload_bytes=LIMIT)
    deliver_state(coord, "fz-fake", online=True, seq=1, caps=capabilities)
    await coord.wait_for_agents(1)
    return Bench(coord, coord.topics, digits[0][:8])


HUGE_TENSOR_RESULT = (
    b'{"v":1,"type":"result","task_id":"j.0","job_id":"j","attempt":1,"agent_id":"fz-fake",'
    b'"ok":true,"outputs":{"label":{"dtype":"int64","shape":[2147483648,2147483648],"data":""}}}'
)


def padded(payload: bytes, size: int) -> bytes:
    return payload + b" " * (size - len(payload))


def job_payload(job_id: str, x: np.ndarray[Any, Any], **fields: Any) -> bytes:
    spec = InferenceJob(job_id=job_id, model="digits-mlp", inputs=encode_arrays({"input": x}))
    return spec.model_copy(update=fields).to_json()


async def test_each_rejection_is_counted_in_its_bucket(bench: Bench) -> None:
    coord, t, x = bench.coord, bench.topics, bench.x
    await past_births_grace(coord)
    handle, (first, second) = bench.run_job()
    res = t.results("fz-fake")
    good = bench.result(first).to_json()
    hb = idle_heartbeat("fz-fake", 1)
    bad_frame = MAGIC + struct.pack("<I", 2) + b"{}" + b"x"  # no $buffers
    steps: list[tuple[str, str, bytes, dict[str, int]]] = [
        ("a topic outside the contract", f"{coord.config.root}/elsewhere", good, {"bad_topic": 1}),
        (
            "an agent id that is no id",
            f"{coord.config.root}/agents/a b/results",
            good,
            {"bad_topic": 1},
        ),
        ("a channel below a channel", res + "/x", good, {"bad_topic": 1}),
        ("one byte over the limit", res, padded(good, LIMIT + 1), {"too_large": 1}),
        ("not JSON", res, b'{"v":1,', {"malformed_result": 1}),
        ("invalid UTF-8", res, good.replace(b'"fz-fake"', b'"fz-\xff"'), {"malformed_result": 1}),
        ("a frame without $buffers", res, bad_frame, {"malformed_result": 1}),
        ("a wrong schema version", res, good.replace(b'"v":1', b'"v":2'), {"malformed_result": 1}),
        ("an unknown field", res, good[:-1] + b',"x":1}', {"malformed_result": 1}),
        ("2**62 elements, no data", res, HUGE_TENSOR_RESULT, {"malformed_result": 1}),
        (
            "a sender that is not the topic's",
            res,
            bench.result(first, agent_id="fz-other").to_json(),
            {"forged_result": 1},
        ),
        (
            "an attempt never dispatched",
            res,
            bench.result(first, attempt=first.attempt + 1).to_json(),
            {"stale_result": 1},
        ),
        (
            "a job nobody submitted",
            res,
            bench.result(first, job_id="fz-nojob", task_id="fz-nojob.0").to_json(),
            {"stale_result": 1},
        ),
        (
            "outputs under the wrong names",
            res,
            bench.result(first, outputs=encode_arrays({"label": np.zeros(2, np.int64)})).to_json(),
            {"bad_result": 1},
        ),
        ("heartbeat: not JSON", t.heartbeat("fz-fake"), b"\x00EOB", {"malformed_heartbeat": 1}),
        (
            "heartbeat: another sender",
            t.heartbeat("fz-fake"),
            hb.model_copy(update={"agent_id": "fz-x"}).to_json(),
            {"forged_heartbeat": 1},
        ),
        (
            "heartbeat: over the limit",
            t.heartbeat("fz-fake"),
            padded(hb.to_json(), LIMIT + 1),
            {"too_large": 1},
        ),
        ("state: not JSON", t.state("fz-fake"), b"[]", {"malformed_state": 1}),
        (
            "state: another sender",
            t.state("fz-fake"),
            state_payload("fz-x", online=False, seq=9),
            {"forged_state": 1},
        ),
        ("job: not JSON", t.submit, b"\xff", {"job_malformed": 1}),
        (
            "job: over the limit",
            t.submit,
            padded(job_payload("fz-big", x), LIMIT + 1),
            {"job_too_large": 1},
        ),
        (
            "job: unknown model",
            t.submit,
            job_payload("fz-j1", x, model="nope"),
            {"job_unknown_model": 1},
        ),
        ("job: wrong shape", t.submit, job_payload("fz-j2", x[:, :32]), {"job_bad_input": 1}),
        (
            "job: more redundancy than agents",
            t.submit,
            job_payload("fz-j3", x, redundancy=2),
            {"job_no_capacity": 1},
        ),
        ("job: submitted twice", t.submit, job_payload(handle.job_id, x), {"duplicate_job": 1}),
        ("job: a submit topic that is none", f"{t.submit}/a b", good, {"bad_topic": 1}),
        (
            "job: another client's id",
            t.submit_as("fz-c1"),
            job_payload("fz-j4", x, client_id="fz-c2"),
            {"job_forbidden": 1},
        ),
    ]
    for what, topic, payload, counted in steps:
        assert bench.deliver(topic, payload) == Counter(counted), what
    # The bad result was retried on fz-fake: a right answer exactly at the size limit is
    # accepted, and the same answer again is a stale duplicate.
    await wait_until(lambda: first.attempt == 2, timeout=5, what="the retry")
    for task in (first, second):
        answer = padded(bench.result(task).to_json(), LIMIT)
        assert bench.deliver(res, answer) == Counter()
        assert bench.deliver(res, answer) == Counter({"stale_result": 1}), "a replay"
    assert_exact(await handle.result(timeout=10), x[:4], batch=2)
    # A result from an agent never heard of waits for its birth, then is counted.
    nobody = bench.result(first, agent_id="fz-nobody").to_json()
    assert bench.deliver(t.results("fz-nobody"), nobody) == Counter()
    expire_early_results(coord)
    # Every bucket is published in coordinator/state.
    counts = coord._state_message(online=True).counts
    for reason, n in coord.rejected.items():
        assert counts[f"rejected_{reason}"] == n
    assert coord.rejected["result_from_unknown_agent"] == 1


# -- bugs this fuzzing found: each reproduced here (each failed before its fix) ----------------


def deep_frame(nesting: str) -> bytes:
    """A binary frame of about 10 KB whose header nests deeply: 5,000 arrays (json.loads
    overflows) or 600 objects (json.loads copes, codec._insert overflows)."""
    if nesting == "arrays":
        head = b"[" * 5000 + b"]" * 5000
    else:
        head = b'{"$buffers":[],"a":' + b'{"a":' * 600 + b"1" + b"}" * 601
    return MAGIC + struct.pack("<I", len(head)) + head


@FLEET_LOOP
@pytest.mark.parametrize(
    ("where", "nesting"),
    [
        ("coordinator results", "arrays"),
        ("coordinator results", "objects"),
        ("coordinator submit", "arrays"),
        ("agent tasks", "arrays"),
        ("client replies", "arrays"),
    ],
)
async def test_binary_frame_with_a_deeply_nested_header_is_counted(
    fleet: Fleet, where: str, nesting: str
) -> None:
    coord, agent, client, t = fleet.coord, fleet.agent, fleet.client, fleet.topics
    payload = deep_frame(nesting)
    if where == "agent tasks":
        before = agent.stats.rejected
        agent._on_message(t.tasks(AGENT), payload)
        assert agent.stats.rejected == before + 1
    elif where == "client replies":
        client._on_message(t.replies(client.client_id), payload)  # to be logged and ignored
    else:
        topic, bucket = {
            "coordinator results": (t.results(AGENT), "malformed_result"),
            "coordinator submit": (t.submit, "job_malformed"),
        }[where]
        before = Counter(coord.rejected)
        coord._on_message(topic, payload)
        assert coord.rejected - before == Counter({bucket: 1})


@pytest.mark.parametrize(
    "cost",
    [
        pytest.param(
            [[1, 1.0], [1, 2.0]],
            id="one batch size twice",
        ),
        pytest.param(
            [[1, 0.0], [2, 1e200]],
            id="1e200 ms",
        ),
    ],
)
async def test_birth_with_an_absurd_benchmark_is_counted(
    bench: Bench, capabilities: Capabilities, cost: list[list[float]]
) -> None:
    caps = capabilities.model_dump(mode="json")
    caps["models"][0]["cost"] = cost
    payload = state_payload("fz-eq", online=True, seq=1, caps=caps)
    counted = bench.deliver(bench.topics.state("fz-eq"), payload)
    rec = bench.coord.registry.agents.get("fz-eq")
    assert counted == Counter({"malformed_state": 1}) or (rec is not None and rec.online)


def wrong_outputs(bench: Bench, task: Any, kind: str) -> bytes:
    label, prob = direct(bench.x[task.start : task.stop])
    if kind == "trailing dimensions":
        outputs = {"label": label, "probabilities": prob[:, :3]}
    else:  # dtypes
        outputs = {"label": label.astype(np.float64), "probabilities": prob.astype(np.float16)}
    return bench.result(task, outputs=encode_arrays(outputs)).to_json()


async def test_result_with_wrong_trailing_dimensions_is_a_bad_result(bench: Bench) -> None:
    _, (first, second) = bench.run_job()
    res = bench.topics.results("fz-fake")
    assert bench.deliver(res, bench.result(first).to_json()) == Counter()
    counted = bench.deliver(res, wrong_outputs(bench, second, "trailing dimensions"))
    assert counted == Counter({"bad_result": 1})


async def test_result_with_wrong_dtypes_is_a_bad_result(bench: Bench) -> None:
    handle, tasks = bench.run_job()
    res = bench.topics.results("fz-fake")
    counted = Counter[str]()
    for task in tasks:
        counted += bench.deliver(res, wrong_outputs(bench, task, "dtypes"))
    assert counted == Counter({"bad_result": len(tasks)}), await handle.result(timeout=5)


async def test_an_infinite_slowdown_still_gives_a_finite_lease(
    bench: Bench, capabilities: Capabilities
) -> None:
    caps = capabilities.model_dump(mode="json")
    caps["slowdown"] = math.inf  # written as Infinity, which pydantic's JSON accepts
    inf_birth = state_payload("fz-inf", online=True, seq=1, caps=caps)
    counted = bench.deliver(bench.topics.state("fz-inf"), inf_birth)
    assert counted == Counter({"malformed_state": 1}), "an infinite slowdown is refused"
    # the slowest a device may claim still gets a finite lease
    caps["slowdown"] = 1e6
    caps["models"][0]["cost"] = [[1, 1e7], [2, 1e7]]
    coord = bench.coord
    deliver_state(coord, "fz-fake", online=False, seq=1)  # the slow one is the only agent
    deliver_state(coord, "fz-slow", online=True, seq=1, caps=caps)
    assert coord.registry.agents["fz-slow"].online
    handle = coord.submit_arrays("digits-mlp", bench.x[:2], batch_size=1)
    tasks = coord.ledger.jobs[handle.job_id].tasks
    assert all(task.agent_id == "fz-slow" for task in tasks)
    assert all(math.isfinite(task.lease_until) for task in tasks), [t.lease_until for t in tasks]


@pytest.mark.parametrize("channel", ["models", "tasks"])
async def test_messages_on_other_agent_channels_are_bad_topics(
    bench: Bench, capabilities: Capabilities, channel: str
) -> None:
    topic = bench.topics.agent("fz-m", channel)  # type: ignore[arg-type]
    counted = bench.deliver(topic, state_payload("fz-m", online=True, seq=1, caps=capabilities))
    assert counted == Counter({"bad_topic": 1}) and "fz-m" not in bench.coord.registry.agents


@FLEET_LOOP
@pytest.mark.parametrize("channel", ["result", "status"])
async def test_client_takes_a_jobs_messages_only_from_its_own_topics(
    fleet: Fleet, channel: str
) -> None:
    client, t = fleet.client, fleet.topics
    loop = asyncio.get_running_loop()
    waiters = {job: loop.create_future() for job in ("fz-a", "fz-b")}
    client._waiting.update(waiters)
    seen: list[JobStatus] = []
    client._watchers["fz-a"] = seen.append
    try:
        if channel == "result":
            other = JobResult(job_id="fz-b", ok=False, error={"code": "internal", "message": "x"})
            client._on_message(t.result("fz-a"), other.to_json())
        else:
            other = JobStatus(job_id="fz-b", state="running", ts=0)
            client._on_message(t.status("fz-a"), other.to_json())
        assert not waiters["fz-b"].done() and not seen
    finally:
        for job, fut in waiters.items():
            client._waiting.pop(job, None)
            if fut.done():
                fut.exception()
        client._watchers.pop("fz-a", None)


@pytest.mark.parametrize(
    "case",
    [
        "heartbeat from an agent never born",
        "heartbeat older than the birth",
        "birth without capabilities",
        "death of an agent never born",
        "death of an agent already dead",
        "state older than the birth",
    ],
)
async def test_dropped_messages_are_counted(bench: Bench, case: str) -> None:
    t, coord = bench.topics, bench.coord
    fake = coord.registry.agents["fz-fake"]
    deliver_state(coord, "fz-gone", online=True, seq=3, caps=fake.capabilities)
    deliver_state(coord, "fz-gone", online=False, seq=3)

    def heartbeat(agent_id: str, seq: int) -> bytes:
        return idle_heartbeat(agent_id, seq).to_json()

    topic, payload = {
        "heartbeat from an agent never born": (t.heartbeat("fz-new"), heartbeat("fz-new", 1)),
        "heartbeat older than the birth": (t.heartbeat("fz-fake"), heartbeat("fz-fake", 0)),
        "birth without capabilities": (
            t.state("fz-new"),
            state_payload("fz-new", online=True, seq=1),
        ),
        "death of an agent never born": (
            t.state("fz-new"),
            state_payload("fz-new", online=False, seq=1),
        ),
        "death of an agent already dead": (
            t.state("fz-gone"),
            state_payload("fz-gone", online=False, seq=3),
        ),
        "state older than the birth": (
            t.state("fz-fake"),
            state_payload("fz-fake", online=False, seq=0),
        ),
    }[case]
    assert sum(bench.deliver(topic, payload).values()) == 1


async def test_results_held_for_unknown_agents_are_bounded_in_bytes(bench: Bench) -> None:
    n_rows = (LIMIT - 2048) * 3 // 4 // 8  # a ~62 KiB result, just under the limit
    payloads = {}
    for i in range(20):
        agent_id = f"fz-unknown-{i}"
        label = np.zeros(n_rows, np.int64)
        msg = TaskResult(
            task_id="fz-j.0",
            job_id="fz-j",
            attempt=1,
            agent_id=agent_id,
            ok=True,
            outputs=encode_arrays({"label": label}),
        )
        payloads[bench.topics.results(agent_id)] = msg.to_json()
    assert all(len(p) <= LIMIT for p in payloads.values())
    gc.collect()
    tracemalloc.start()
    refused: Counter[str] = Counter()
    try:
        for i in range(1000):
            topic = bench.topics.results(f"fz-unknown-{i % 20}")
            refused += bench.deliver(topic, payloads[topic])
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    kept = bench.coord._early_count
    assert 0 < kept < 1000 and refused == Counter({"result_from_unknown_agent": 1000 - kept})
    assert held < MEMORY_BOUND, f"{held / 2**20:.0f} MiB held for 1,000 results"


async def test_an_identity_with_a_trailing_newline_is_a_bad_topic(bench: Bench) -> None:
    await past_births_grace(bench.coord)
    counted = bench.deliver(bench.topics.submit + "/fz-c\n", job_payload("fz-nl", bench.x))
    assert counted == Counter({"bad_topic": 1}), bench.coord.ledger.jobs["fz-nl"].client_id


async def test_agents_that_died_are_not_kept_without_bound(
    bench: Bench, capabilities: Capabilities
) -> None:
    caps = capabilities.model_dump(mode="json")
    caps["labels"] = {f"k{i}": "v" * 100 for i in range((LIMIT - 8192) // 110)}
    gc.collect()
    tracemalloc.start()
    try:
        for i in range(500):
            agent_id = f"fz-many-{i}"
            birth = state_payload(agent_id, online=True, seq=1, caps=caps)
            assert len(birth) <= LIMIT
            assert bench.deliver(bench.topics.state(agent_id), birth) == Counter()
            deliver_state(bench.coord, agent_id, online=False, seq=1)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(bench.coord.registry.online()) == 1  # fz-fake
    assert held < MEMORY_BOUND, f"{held / 2**20:.0f} MiB held for 500 dead agents"
