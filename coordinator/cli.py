"""The ``edge-offload`` command line: broker, agent, coordinator, submit, jobs, demo, ..."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import shutil
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiomqtt
import numpy as np

from coordinator import cli_models, cli_monitor
from protocol import (
    DEFAULT_ROOT,
    AgentState,
    BrokerAddress,
    Capabilities,
    CoordinatorState,
    Heartbeat,
    JobError,
    JobStatus,
    JobSummary,
    OffloadError,
    ProtocolError,
    Topics,
    check_id,
    json_schemas,
)
from protocol.transport import Link, cancel_and_wait

# Exit codes
EXIT_OK = 0
EXIT_FAILED = 1  # the job failed or was refused
EXIT_USAGE = 2  # bad arguments or input files
EXIT_UNAVAILABLE = 3  # broker or coordinator unreachable
EXIT_INTERRUPTED = 130

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
SUBMIT_EPILOG = """\
Inputs are split into microtasks along the model's batch axis, except those given
with --whole, which go unchanged with every microtask (a state tensor, a sample
rate, a lookup table; a 0-d .npy is a scalar). Examples:

  edge-offload submit digits-mlp x.npy -o out.npz
  edge-offload submit nearest --input x=x.npy --whole prototypes=protos.npy -o out.npz
  edge-offload submit silero-vad --input input=chunks.npy \\
      --whole state=state.npy --whole sr=sr.npy -o vad.npz

A model without a batch axis runs one item (one slice of the leading axis of every
split input) per microtask, and its outputs may differ in shape from item to item:
-o writes them per item into the .npz as NAME.I (output.0, output.1, ..., in input
order).
"""

logger = logging.getLogger("edge_offload.cli")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, json_logs=args.log_json)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-offload",
        description="Offload ONNX inference microtasks to a fleet of edge devices over MQTT.",
    )
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default), ERROR")
    p.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, *, local_broker: bool = False) -> None:
        default = "start one locally" if local_broker else DEFAULT_BROKER
        sp.add_argument(
            "--broker",
            default=None,
            metavar="URL",
            help=f"MQTT broker, mqtt://host:port or mqtts://host:port for TLS "
            f"(default: env EDGE_OFFLOAD_BROKER, else {default})",
        )
        sp.add_argument("--root", default=None, help="topic root (default offload/v1)")
        sp.add_argument("--username", default=None, help="env EDGE_OFFLOAD_USERNAME")
        sp.add_argument(
            "--password",
            default=None,
            help="visible in the process list: prefer --password-file or env EDGE_OFFLOAD_PASSWORD",
        )
        sp.add_argument("--password-file", metavar="FILE", help="env EDGE_OFFLOAD_PASSWORD_FILE")
        sp.add_argument(
            "--tls-ca",
            metavar="FILE",
            help="CA bundle that signed the broker's certificate (turns TLS on; "
            "env EDGE_OFFLOAD_TLS_CA)",
        )
        sp.add_argument(
            "--tls-cert", metavar="FILE", help="client certificate (env EDGE_OFFLOAD_TLS_CERT)"
        )
        sp.add_argument(
            "--tls-key", metavar="FILE", help="client certificate's key (env EDGE_OFFLOAD_TLS_KEY)"
        )
        sp.add_argument(
            "--tls-no-verify-hostname",
            action="store_true",
            help="accept any certificate the CA signed, whatever host it names (test rigs)",
        )

    sp = sub.add_parser(
        "broker", help="run a local MQTT broker (Mosquitto if installed, else amqtt)"
    )
    sp.add_argument("--kind", choices=["auto", "mosquitto", "amqtt"], default="auto")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=1883)
    sp.set_defaults(func=cmd_broker)

    sp = sub.add_parser("agent", help="run an agent daemon on this device")
    common(sp)
    sp.add_argument("--config", type=Path, help="TOML file with an [agent] table")
    sp.add_argument("--id", dest="agent_id", help="agent id (default: host name)")
    sp.add_argument("--slots", type=int, help="concurrent microtasks (default: CPU count)")
    sp.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="operator label, repeatable (e.g. site=plant-1)",
    )
    sp.add_argument(
        "--models-dir",
        action="append",
        type=Path,
        default=[],
        help="directory with manifest.json and/or *.onnx (repeatable)",
    )
    sp.add_argument(
        "--provider",
        action="append",
        default=[],
        help="preferred onnxruntime execution provider (probed before use)",
    )
    sp.add_argument("--threads-per-slot", type=int)
    sp.add_argument("--heartbeat", type=float, dest="heartbeat_s", help="seconds")
    sp.add_argument(
        "--slowdown",
        type=float,
        help="multiply service time to emulate a slower device (tests/benchmarks)",
    )
    sp.add_argument(
        "--corrupt-outputs",
        type=float,
        metavar="FRACTION",
        help="answer this fraction of microtasks with wrong outputs (fault injection)",
    )
    sp.add_argument("--no-benchmark", action="store_true", help="skip the start-up self-benchmark")
    sp.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: any free port)",
    )
    sp.add_argument(
        "--spool-dir",
        metavar="DIR",
        help="results finished while the broker is unreachable wait here "
        '(default ~/.local/state/edge-offload/agent-ID/results; "none": memory only)',
    )
    sp.add_argument(
        "--model-cache-dir",
        metavar="DIR",
        help="models the coordinator deploys are kept here "
        '(default ~/.cache/edge-offload/agent-ID/models; "none": accept no deployments)',
    )
    sp.add_argument(
        "--model-cache-mb",
        type=int,
        metavar="MB",
        help="disk the deployed models may use, in MiB (default 2048)",
    )
    sp.add_argument(
        "--graph-optimization",
        choices=["disable", "basic", "extended", "all"],
        help="onnxruntime graph optimisation level of every model's session (default all)",
    )
    sp.set_defaults(func=cmd_agent)

    sp = sub.add_parser("coordinator", help="run the coordinator service")
    common(sp)
    sp.add_argument("--config", type=Path, help="TOML file with a [coordinator] table")
    sp.add_argument("--policy", choices=["earliest_finish", "least_loaded", "round_robin"])
    sp.add_argument("--target-task-ms", type=float)
    sp.add_argument(
        "--journal",
        type=Path,
        help="SQLite file: jobs submitted over MQTT survive a coordinator restart",
    )
    sp.add_argument(
        "--trace-dir",
        metavar="DIR",
        help="write each job's trace here, for `edge-offload report` (default: traces/ "
        'beside the journal, if any; "none": no traces)',
    )
    sp.add_argument(
        "--catalog",
        metavar="DIR",
        help="the model registry (`edge-offload models add`) whose models are sent to agents "
        'that lack them (default: $XDG_DATA_HOME/edge-offload/models; "none": no registry)',
    )
    sp.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: any free port)",
    )
    sp.set_defaults(func=cmd_coordinator)

    sp = sub.add_parser(
        "submit",
        help="submit an inference job and write its outputs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SUBMIT_EPILOG,
    )
    common(sp)
    sp.add_argument("model", help="model id, e.g. digits-mlp")
    sp.add_argument("inputs", type=Path, nargs="?", help=".npy (one input) or .npz (named inputs)")
    sp.add_argument(
        "--input-name",
        default=None,
        help='input name for the positional .npy file (default: "input")',
    )
    sp.add_argument(
        "--input",
        action="append",
        default=[],
        dest="named_inputs",
        metavar="NAME=FILE.npy",
        help="input NAME from a .npy file, split into microtasks (repeatable)",
    )
    sp.add_argument(
        "--whole",
        action="append",
        default=[],
        metavar="NAME[=FILE.npy]",
        help="input NAME passed whole to every microtask, from a .npy file, or without "
        "=FILE the array NAME of the positional .npz (repeatable)",
    )
    sp.add_argument(
        "-o",
        "--output",
        type=Path,
        help="write outputs to .npz (or .npy if one); per-item outputs as NAME.I",
    )
    sp.add_argument("--batch-size", type=int, help="samples per microtask (default: automatic)")
    sp.add_argument("--policy", choices=["earliest_finish", "least_loaded", "round_robin"])
    sp.add_argument("--job-id")
    sp.add_argument(
        "--require-provider",
        action="append",
        default=[],
        metavar="NAME",
        help="run only on agents whose probed providers include this one (repeat: any of them), "
        "e.g. CUDAExecutionProvider",
    )
    sp.add_argument(
        "--prefer-provider",
        action="append",
        default=[],
        metavar="NAME",
        help="prefer agents with this execution provider when any is available",
    )
    sp.add_argument(
        "--redundancy",
        type=int,
        default=1,
        metavar="K",
        help="run every microtask on K distinct agents and keep the majority's outputs",
    )
    sp.add_argument(
        "--tolerance",
        type=float,
        default=0.0,
        help="with --redundancy: float outputs agree within this (relative and absolute)",
    )
    sp.add_argument("--timeout", type=float, default=600.0)
    sp.add_argument("--watch", action="store_true", help="show a progress bar")
    sp.set_defaults(func=cmd_submit)

    sp = sub.add_parser("agents", help="list the fleet (retained births on the broker)")
    common(sp)
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--all", action="store_true", help="include offline agents")
    sp.add_argument(
        "--watch",
        action="store_true",
        help="a live fleet table (load, running/slots, models) from births and heartbeats",
    )
    sp.add_argument("--interval", type=float, default=1.0, help="--watch: seconds per refresh")
    sp.add_argument("--count", type=int, metavar="N", help="--watch: stop after N refreshes")
    sp.set_defaults(func=cmd_agents)

    sp = sub.add_parser(
        "jobs", help="list the coordinator's recent jobs; `jobs watch [JOB]`: follow one"
    )
    common(sp)
    sp.add_argument(
        "action",
        nargs="?",
        choices=["watch"],
        help="watch: a live progress bar of JOB (default: the newest unfinished job)",
    )
    sp.add_argument("job", nargs="?", help="with watch: the job id")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_jobs)

    sp = sub.add_parser(
        "report", help="a job's performance report from its trace: table, JSON, PNG chart"
    )
    sp.add_argument("job", nargs="?", help="job id (reads {trace dir}/{job}.json)")
    where = sp.add_mutually_exclusive_group()
    where.add_argument(
        "--trace-dir",
        type=Path,
        metavar="DIR",
        help="the coordinator's trace directory (default: its trace_dir from --config or "
        "the environment, e.g. traces/ beside its journal)",
    )
    where.add_argument("--trace", type=Path, metavar="FILE", help="a trace file")
    sp.add_argument("--config", type=Path, help="the coordinator's TOML file (for trace_dir)")
    sp.add_argument(
        "--png",
        type=Path,
        metavar="PATH",
        help="write a Gantt chart and a utilisation plot (needs the plot extra: matplotlib)",
    )
    sp.add_argument(
        "--json", type=Path, metavar="PATH", help="write the report as JSON ('-': print it)"
    )
    sp.set_defaults(func=cmd_report)

    cli_monitor.add_parsers(sub, common)
    cli_models.add_parsers(sub)

    sp = sub.add_parser("schema", help="print the JSON Schema of every message")
    sp.add_argument("--out", type=Path, help="write one <type>.schema.json per message here")
    sp.set_defaults(func=cmd_schema)

    sp = sub.add_parser("demo", help="broker + coordinator + 3 agents + a digits job, end to end")
    common(sp, local_broker=True)
    sp.add_argument("--agents", type=int, default=3)
    sp.set_defaults(func=cmd_demo)
    return p


# -- logging -------------------------------------------------------------------------------------


# Ids a log call may attach (``extra=``); --log-json writes them as fields of their own,
# so a log pipeline can select every line of a job, a microtask or an agent.
LOG_FIELDS = ("job_id", "task_id", "attempt", "agent_id", "tasks", "reason")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in LOG_FIELDS:
            if (value := getattr(record, name, None)) is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class _AgentIdFilter(logging.Filter):
    def __init__(self, agent_id: str) -> None:
        super().__init__()
        self.agent_id = agent_id

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "agent_id", None) is None:
            record.agent_id = self.agent_id
        return True


def setup_logging(level: str, *, json_logs: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if json_logs
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


# -- helpers -------------------------------------------------------------------------------------


_BROKER_ARGS = (
    "broker",
    "username",
    "password",
    "password_file",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "tls_no_verify_hostname",
)


def _broker_args_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, name, None) for name in _BROKER_ARGS)


def _address(args: argparse.Namespace) -> BrokerAddress:
    """The broker from the command line, completed from the environment."""
    import os

    url = args.broker or os.environ.get("EDGE_OFFLOAD_BROKER") or DEFAULT_BROKER
    return BrokerAddress.from_settings(
        url,
        username=args.username,
        password=args.password,
        password_file=args.password_file,
        ca_file=args.tls_ca,
        cert_file=args.tls_cert,
        key_file=args.tls_key,
        verify_hostname=False if args.tls_no_verify_hostname else None,
    )


def _run_client(main: Coroutine[Any, Any, int]) -> int:
    """Run a client command; an unreachable broker is an error message, not a traceback."""
    try:
        return asyncio.run(main)
    except (OSError, TimeoutError, aiomqtt.MqttError) as e:
        print(f"error: cannot reach the broker: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE


def _root(args: argparse.Namespace) -> dict[str, str]:
    return {"root": args.root} if args.root else {}


async def _serve(
    start: Callable[[], Any], drain: Callable[[Any], Coroutine[Any, Any, None]] | None = None
) -> None:
    """Run a component until SIGINT/SIGTERM; the first signal drains, the second cancels."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with start() as component:
        # Everything allocated at start-up (onnxruntime, numpy, pydantic schemas) lives as
        # long as the process: keep it out of the collector's way so a full collection
        # does not pause a microtask for milliseconds.
        gc.collect()
        gc.freeze()
        await stop.wait()
        if drain is not None:
            stop.clear()
            drain_task = asyncio.create_task(drain(component))
            second = asyncio.create_task(stop.wait())
            await asyncio.wait({drain_task, second}, return_when=asyncio.FIRST_COMPLETED)
            if not drain_task.done():
                drain_task.cancel()
            second.cancel()


# -- commands ------------------------------------------------------------------------------------


def cmd_broker(args: argparse.Namespace) -> int:
    from coordinator.broker import LocalBroker

    with LocalBroker(kind=args.kind, host=args.host, port=args.port) as broker:
        print(f"{broker.info.kind} broker listening on {broker.info.url}", flush=True)
        stop = False

        def _stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        while not stop and broker.running:
            time.sleep(0.2)
        return EXIT_OK if stop else EXIT_FAILED


def cmd_agent(args: argparse.Namespace) -> int:
    from agent import Agent, AgentConfig
    from agent.config import parse_labels

    overrides: dict[str, Any] = {
        "agent_id": args.agent_id,
        "slots": args.slots,
        "threads_per_slot": args.threads_per_slot,
        "heartbeat_s": args.heartbeat_s,
        "slowdown": args.slowdown,
        "corrupt_outputs": args.corrupt_outputs,
        "labels": parse_labels(args.label) if args.label else None,
        "models_dirs": tuple(args.models_dir) if args.models_dir else None,
        "providers": tuple(args.provider) if args.provider else None,
        "benchmark": False if args.no_benchmark else None,
        "spool_dir": args.spool_dir,
        "metrics_port": args.metrics_port,
        "model_cache_dir": args.model_cache_dir,
        "model_cache_bytes": None if args.model_cache_mb is None else args.model_cache_mb * 2**20,
        "graph_optimization": args.graph_optimization,
        **_root(args),
    }
    if _broker_args_given(args):  # else the config file's broker, or the environment's
        overrides["broker"] = _address(args)
    config = AgentConfig.load(args.config, **overrides)
    # Every line of an agent's log is about that agent.
    for handler in logging.getLogger().handlers:
        handler.addFilter(_AgentIdFilter(config.agent_id))

    async def drain(agent: Agent) -> None:
        await agent.drain()

    asyncio.run(_serve(lambda: Agent(config), drain))
    return EXIT_OK


def cmd_coordinator(args: argparse.Namespace) -> int:
    from coordinator import Coordinator, CoordinatorConfig

    overrides: dict[str, Any] = {
        "policy": args.policy,
        "target_task_ms": args.target_task_ms,
        "journal": args.journal,
        "trace_dir": args.trace_dir,
        "catalog_dir": args.catalog,
        "metrics_port": args.metrics_port,
        **_root(args),
    }
    if _broker_args_given(args):  # else the config file's broker, or the environment's
        overrides["broker"] = _address(args)
    config = CoordinatorConfig.load(args.config, **overrides)
    asyncio.run(_serve(lambda: Coordinator(config)))
    return EXIT_OK


def load_inputs(
    path: Path, input_name: str | None, *, npy_only: bool = False
) -> dict[str, np.ndarray[Any, Any]]:
    """Arrays from a .npy (one input) or .npz (one array per input name) file."""
    if not path.exists():
        raise OffloadError(f"{path}: no such file", code="bad_request")
    if npy_only and path.suffix == ".npz":
        raise OffloadError(f"{path}: NAME=FILE takes a .npy file", code="bad_request")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    return {input_name or "input": np.load(path, allow_pickle=False)}


def load_job_inputs(
    path: Path | None, input_name: str | None, named: list[str], whole: list[str]
) -> tuple[dict[str, np.ndarray[Any, Any]], list[str]]:
    """A job's arrays from the positional file and ``--input``/``--whole NAME=FILE.npy``,
    and the names of those passed whole."""
    inputs = load_inputs(path, input_name) if path is not None else {}
    whole_names: list[str] = []
    for flag, items in (("--input", named), ("--whole", whole)):
        for item in items:
            name, sep, file = item.partition("=")
            if not name or (sep and not file):
                raise OffloadError(f"{flag} {item!r}: expected NAME=FILE.npy", code="bad_request")
            if sep:
                if name in inputs:
                    raise OffloadError(f"{flag} {name}: input given twice", code="bad_request")
                inputs[name] = load_inputs(Path(file), name, npy_only=True)[name]
            elif flag == "--input":
                raise OffloadError(f"--input {item!r}: expected NAME=FILE.npy", code="bad_request")
            elif name not in inputs:
                raise OffloadError(
                    f"--whole {name}: no array {name!r} in {path or 'the inputs'}; "
                    "give it as --whole NAME=FILE.npy",
                    code="bad_request",
                )
            if flag == "--whole":
                whole_names.append(name)
    if not inputs:
        raise OffloadError(
            "no inputs: give a .npy or .npz file, or --input NAME=FILE.npy", code="bad_request"
        )
    return inputs, whole_names


def save_outputs(
    path: Path,
    outputs: dict[str, np.ndarray[Any, Any]],
    parts: list[dict[str, np.ndarray[Any, Any]]] | None = None,
) -> None:
    """Outputs to .npy (one array) or .npz; item ``i``'s output ``name`` (a model without a
    batch axis) is stored as ``{name}.{i}``."""
    arrays = dict(outputs)
    for i, part in enumerate(parts or []):
        arrays.update({f"{name}.{i}": a for name, a in part.items()})
    if path.suffix == ".npy":
        if len(arrays) != 1:
            names = ", ".join(list(arrays)[:6]) + (", ..." if len(arrays) > 6 else "")
            raise OffloadError(
                f"{len(arrays)} outputs ({names}) need an .npz file", code="bad_request"
            )
        np.save(path, next(iter(arrays.values())))
    else:
        np.savez(path, **arrays)  # type: ignore[arg-type]


class Progress:
    """A progress bar of a job on stderr: samples done, throughput and ETA.

    Fed by job status messages (:meth:`update`) or counts (:meth:`set`). On a terminal it
    redraws one line in place; elsewhere (a pipe, a log) it prints a line at most every
    ``interval`` seconds, and the last one. Throughput is over the last ``window_s``
    seconds; a watch that starts mid-job (``from_zero=False``) shows it from the second
    message on.
    """

    def __init__(
        self,
        label: str,
        *,
        stream: Any = sys.stderr,
        tty: bool | None = None,
        interval: float = 1.0,
        window_s: float = 10.0,
        from_zero: bool = True,
    ) -> None:
        self.label = label
        self.stream = stream
        self.tty = _isatty(stream) if tty is None else tty
        self.interval = interval
        self.window_s = window_s
        self.start = time.monotonic()
        self.done = 0
        self.total = 0
        self._points: deque[tuple[float, int]] = deque()
        if from_zero:
            self._points.append((self.start, 0))
        self._first = self._points[0] if self._points else None
        self._last_line = -math.inf
        self._drawn = 0  # characters on the terminal line

    def update(self, status: JobStatus) -> None:
        self.set(status.samples_done, status.samples_total)

    def set(self, done: int, total: int) -> None:
        now = time.monotonic()
        self.done, self.total = done, total
        self._points.append((now, done))
        if self._first is None:
            self._first = (now, done)
        while len(self._points) > 2 and now - self._points[0][0] > self.window_s:
            self._points.popleft()
        self.draw()

    def rate(self, *, overall: bool = False) -> float | None:
        """Samples per second, recently (or since the first count); None until known."""
        first = self._first if overall else (self._points[0] if self._points else None)
        if first is None:
            return None
        t0, done0 = first
        t1, done1 = (time.monotonic(), self.done) if overall else self._points[-1]
        if t1 <= t0 or (overall and done1 <= done0):  # nothing seen happening
            return None
        return (done1 - done0) / (t1 - t0)

    def draw(self, final: bool = False) -> None:
        if not self.total:
            return
        now = time.monotonic()
        if not final and not self.tty and now - self._last_line < self.interval:
            return
        self._last_line = now
        rate = self.rate(overall=final)
        remaining = self.total - self.done
        if final or remaining <= 0:
            eta = "-"
        elif rate:
            eta = f"{remaining / rate:.1f}s"
        else:
            eta = "?"
        speed = "-" if rate is None else f"{rate:,.0f}"
        bar = "#" * int(min(self.done / self.total, 1.0) * 30)
        line = f"{self.label} [{bar:<30}] {self.done}/{self.total} samples {speed}/s ETA {eta}"
        if self.tty:
            self.stream.write("\r" + line.ljust(self._drawn))
            self._drawn = 0 if final else len(line)
            if final:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line (after an interruption) so the next output starts afresh."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0


def _isatty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty()) if callable(isatty) else False


def cmd_submit(args: argparse.Namespace) -> int:
    from coordinator.client import OffloadClient

    try:
        inputs, whole = load_job_inputs(args.inputs, args.input_name, args.named_inputs, args.whole)
    except (OffloadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        async with OffloadClient(_address(args), **_root(args)) as client:
            progress = Progress(args.job_id or args.model) if args.watch else None
            handle = await client.submit(
                args.model,
                inputs,
                batch_size=args.batch_size,
                policy=args.policy,
                job_id=args.job_id,
                on_status=progress.update if progress else None,
                redundancy=args.redundancy,
                tolerance=args.tolerance,
                whole=whole,
                require_providers=args.require_provider,
                prefer_providers=args.prefer_provider,
            )
            try:
                if progress is None:
                    out = await handle.result(args.timeout)
                elif (watched := await _interruptible(handle.result(args.timeout))) is None:
                    progress.close()
                    print(
                        f"stopped watching; job {handle.job_id} goes on "
                        f"(edge-offload jobs watch {handle.job_id})",
                        file=sys.stderr,
                    )
                    return EXIT_INTERRUPTED
                else:
                    out = watched
            except JobError as e:
                if progress:
                    progress.close()
                print(f"job {handle.job_id} failed: {e}", file=sys.stderr)
                return EXIT_FAILED
            if progress:
                progress.done = progress.total = out.result.samples
                progress.draw(final=True)
            r = out.result
            print(
                f"job {r.job_id}: {r.samples} samples in {r.tasks} microtasks of {r.batch_size}, "
                f"{r.elapsed_s:.3f}s, {r.retries} retries"
            )
            for agent_id, share in r.per_agent.items():
                print(f"  {agent_id}: {share.samples} samples ({share.tasks} microtasks)")
            for agent_id, n in r.disagreements.items():
                print(f"  {agent_id}: outputs disagreed with the majority {n} times")
            if args.output:
                try:
                    save_outputs(args.output, out.outputs, out.parts)
                except (OffloadError, OSError) as e:
                    print(f"error: {e}", file=sys.stderr)
                    return EXIT_USAGE
                if out.parts:
                    names = ", ".join(out.parts[0])
                    print(
                        f"outputs {names} of {len(out.parts)} items written to {args.output} "
                        f"as NAME.0 .. NAME.{len(out.parts) - 1}"
                    )
                else:
                    print(f"outputs {', '.join(out.outputs)} written to {args.output}")
            return EXIT_OK

    return _run_client(run())


def cmd_agents(args: argparse.Namespace) -> int:
    from coordinator.client import OffloadClient

    if args.watch:
        return _run_client(_watch_agents(args))

    async def run() -> int:
        async with OffloadClient(_address(args), **_root(args)) as client:
            states = await client.agents()
        rows = [s for s in states.values() if s.online or args.all]
        if args.json:
            print(json.dumps([s.model_dump(mode="json") for s in rows], indent=2))
            return EXIT_OK
        print(
            f"{'AGENT':<20} {'STATE':<8} {'SLOTS':>5} {'CPUS':>4} {'ARCH':<8} "
            f"{'PROVIDERS':<24} {'MODELS (ms/sample)':<30} LABELS"
        )
        for s in sorted(rows, key=lambda s: s.agent_id):
            c = s.capabilities
            if c is None:
                print(f"{s.agent_id:<20} {'offline':<8}")
                continue
            models = ", ".join(
                f"{m.id} ({m.ms_per_sample():.4f})" if m.cost else m.id for m in c.models
            )
            providers = ",".join(p.removesuffix("ExecutionProvider") for p in c.providers)
            labels = ",".join(f"{k}={v}" for k, v in c.labels.items())
            print(
                f"{s.agent_id:<20} {'online':<8} {c.slots:>5} {c.cpu_count:>4} {c.arch:<8} "
                f"{providers:<24} {models:<30} {labels}"
            )
        return EXIT_OK

    return _run_client(run())


def cmd_jobs(args: argparse.Namespace) -> int:
    from coordinator.client import OffloadClient

    if args.action == "watch":
        return _run_client(_watch_job(args))
    if args.job is not None:
        print("error: a job id goes with `jobs watch JOB`", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        async with OffloadClient(_address(args), **_root(args)) as client:
            try:
                state = await client.coordinator_state()
            except JobError as e:
                print(f"error: {e.message}", file=sys.stderr)
                return EXIT_UNAVAILABLE
        if args.json:
            print(state.model_dump_json(indent=2))
            return EXIT_OK
        print(
            f"coordinator {'online' if state.online else 'OFFLINE'}, "
            f"{state.agents_online} agents online"
        )
        print(
            f"{'JOB':<32} {'STATE':<9} {'MODEL':<16} {'SAMPLES':>8} {'TASKS':>11} "
            f"{'RETRIES':>7} {'SECONDS':>8}"
        )
        for j in state.jobs:
            print(
                f"{j.job_id:<32} {j.state:<9} {j.model:<16} {j.samples:>8} "
                f"{j.tasks_done:>5}/{j.tasks_total:<5} {j.retries:>7} {j.elapsed_s:>8.2f}"
                + (f"  {j.error.message}" if j.error else "")
            )
        return EXIT_OK

    return _run_client(run())


# -- live views and reports ----------------------------------------------------------------------

T = TypeVar("T")

# A watch gives up when the coordinator's retained state does not arrive in this long...
STATE_WAIT_S = 3.0
# ... or when neither that state nor a status message names the job in this long.
UNKNOWN_JOB_S = 5.0
# An agent not heard from in this long shows as silent (the coordinator's suspect_after_s).
SILENT_AFTER_S = 6.0


async def _interruptible(aw: Awaitable[T]) -> T | None:
    """Await ``aw``; SIGINT or SIGTERM (Ctrl-C) cancels it instead, and gives None."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.ensure_future(aw)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


@contextlib.asynccontextmanager
async def _listening(
    args: argparse.Namespace,
    subscriptions: list[tuple[str, int]],
    on_message: Callable[[str, bytes], None],
) -> AsyncIterator[Link]:
    """A read-only MQTT session feeding ``on_message``; after the first connection, it
    reconnects by itself."""
    address = _address(args)
    link = Link(
        address=address,
        client_id=address.username or f"watch-{uuid.uuid4().hex[:12]}",
        subscriptions=subscriptions,
        on_message=on_message,
    )
    runner = asyncio.create_task(link.run(raise_first=True), name="watch-link")
    connected = asyncio.ensure_future(link.connected.wait())
    try:
        await asyncio.wait([runner, connected], return_when=asyncio.FIRST_COMPLETED)
        if runner.done():
            runner.result()  # raises the connection error
            raise aiomqtt.MqttError("the connection ended before it was established")
        yield link
    finally:
        connected.cancel()
        await cancel_and_wait([runner])


class _JobFeed:
    """The coordinator's retained state and one job's status messages, as they arrive."""

    def __init__(self, topics: Topics, job_id: str | None) -> None:
        self.topics = topics
        self.job_id = job_id
        self.state: CoordinatorState | None = None
        self.status: JobStatus | None = None
        self.fresh_state = self.fresh_status = False
        self.changed = asyncio.Event()

    def on_message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            if topic == self.topics.coordinator:
                self.state = CoordinatorState.from_json(payload)
                self.fresh_state = True
            elif self.job_id is not None and topic == self.topics.status(self.job_id):
                status = JobStatus.from_json(payload)
                if status.job_id != self.job_id:
                    return
                self.status = status
                self.fresh_status = True
            else:
                return
        except ProtocolError as e:
            logger.warning("ignored message on %s: %s", topic, e)
            return
        self.changed.set()

    def summary(self) -> JobSummary | None:
        if self.state is None or self.job_id is None:
            return None
        return next((j for j in self.state.jobs if j.job_id == self.job_id), None)


async def _watch_job(args: argparse.Namespace) -> int:
    topics = Topics(args.root or DEFAULT_ROOT)
    subscriptions = [(topics.coordinator, 1)]
    if args.job is not None:
        try:
            subscriptions.append((topics.status(check_id(args.job, "job id")), 0))
        except ProtocolError as e:
            print(f"error: {e.message}", file=sys.stderr)
            return EXIT_USAGE
    feed = _JobFeed(topics, args.job)
    async with _listening(args, subscriptions, feed.on_message) as link:
        code = await _interruptible(_follow_job(feed, link))
    if code is None:
        print(f"stopped watching job {feed.job_id or '(none yet)'}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return code


async def _follow_job(feed: _JobFeed, link: Link) -> int:
    """Draw the job's progress until it ends; its exit code."""
    started = time.monotonic()
    progress: Progress | None = None
    said_waiting = False
    try:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(feed.changed.wait(), 0.5)
            feed.changed.clear()
            fresh_state, fresh_status = feed.fresh_state, feed.fresh_status
            feed.fresh_state = feed.fresh_status = False
            waited = time.monotonic() - started
            if feed.state is None and feed.status is None:
                if waited > STATE_WAIT_S:
                    print(
                        "error: no coordinator state on the broker (is a coordinator running?)",
                        file=sys.stderr,
                    )
                    return EXIT_UNAVAILABLE
                continue
            if feed.job_id is None:
                assert feed.state is not None
                running = [j for j in feed.state.jobs if j.state in ("accepted", "running")]
                if not running:
                    if not said_waiting:
                        print(
                            "no unfinished job; waiting for one (Ctrl-C to stop)", file=sys.stderr
                        )
                        said_waiting = True
                    continue
                feed.job_id = running[-1].job_id
                topic = feed.topics.status(feed.job_id)
                link.subscriptions.append((topic, 0))  # also after a reconnection
                await link.client.subscribe(topic, qos=0)
                fresh_state = True
            summary, status = feed.summary(), feed.status
            if summary is None and status is None:
                if waited > UNKNOWN_JOB_S:
                    print(
                        f"error: job {feed.job_id} is not among the coordinator's recent jobs",
                        file=sys.stderr,
                    )
                    return EXIT_FAILED
                continue
            if progress is None:
                progress = Progress(feed.job_id, from_zero=False)
            final = summary if summary is not None and summary.state in ("done", "failed") else None
            ended = final is not None or (status is not None and status.state in ("done", "failed"))
            if fresh_status and status is not None:
                if ended:
                    progress.done, progress.total = status.samples_done, status.samples_total
                else:
                    progress.update(status)
            elif fresh_state and status is None and summary is not None and summary.tasks_total:
                # No status messages (yet, or a broker ACL withholds them): count microtasks.
                done = summary.samples * summary.tasks_done // summary.tasks_total
                if ended:
                    progress.done, progress.total = done, summary.samples
                else:
                    progress.set(done, summary.samples)
            if not ended:
                continue
            ok = (final.state if final is not None else status.state if status else "") == "done"
            if ok:
                progress.done = progress.total = max(
                    progress.total, summary.samples if summary else 0
                )
            progress.draw(final=True)
            progress = None
            print(_job_line(feed.job_id, final, status))
            return EXIT_OK if ok else EXIT_FAILED
    finally:
        if progress is not None:
            progress.close()


def _job_line(job_id: str, summary: JobSummary | None, status: JobStatus | None) -> str:
    if summary is not None:
        line = (
            f"job {job_id} {summary.state}: {summary.samples} samples in {summary.tasks_total} "
            f"microtasks, {summary.elapsed_s:.3f}s, {summary.retries} retries"
        )
        error = summary.error
    else:
        assert status is not None
        line = f"job {job_id} {status.state}: " + (
            f"{status.samples_total} samples in {status.tasks_total} microtasks"
            if status.state == "done"
            else f"{status.samples_done}/{status.samples_total} samples and "
            f"{status.tasks_done}/{status.tasks_total} microtasks done"
        )
        error = status.error
    return line + (f": {error.message}" if error is not None else "")


class _FleetFeed:
    """The agents' births, deaths and heartbeats, as they arrive."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.states: dict[str, AgentState] = {}
        self.capabilities: dict[str, Capabilities] = {}
        self.beats: dict[str, tuple[float, Heartbeat]] = {}

    def on_message(self, topic: str, payload: bytes) -> None:
        if not payload:
            return
        try:
            agent_id, channel = self.topics.parse_agent(topic)
            if channel == "state":
                state = AgentState.from_json(payload)
                known = self.states.get(agent_id)
                if state.agent_id == agent_id and (known is None or state.seq >= known.seq):
                    self.states[agent_id] = state
                    if state.capabilities is not None:
                        self.capabilities[agent_id] = state.capabilities
            elif channel == "heartbeat":
                hb = Heartbeat.from_json(payload)
                if hb.agent_id == agent_id:
                    self.beats[agent_id] = (time.monotonic(), hb)
        except ProtocolError as e:
            logger.debug("ignored message on %s: %s", topic, e)

    def table(self, *, include_offline: bool, width: int | None = None) -> list[str]:
        """One frame: a summary line, a header, a line per agent."""
        now = time.monotonic()
        rows, online, busy, slots = [], 0, 0, 0
        for agent_id in sorted(self.states):
            state = self.states[agent_id]
            caps = self.capabilities.get(agent_id)
            heard, hb = self.beats.get(agent_id, (None, None))
            if state.online:
                if heard is not None and now - heard > SILENT_AFTER_S:
                    what = "silent"
                else:
                    what = "draining" if hb is not None and hb.draining else "online"
            elif include_offline:
                what = "offline"
            else:
                continue
            n_slots = hb.slots if hb is not None else caps.slots if caps is not None else 0
            if state.online:
                online += 1
                slots += n_slots
                busy += hb.running if hb is not None else 0
            models = ", ".join(m.id for m in caps.models) if caps is not None else "-"
            rows.append(
                f"{agent_id:<20} {what:<8} "
                + (
                    f"{hb.cpu_percent:>4.0f}% {f'{hb.running}/{n_slots}':>9} {hb.queued:>6} "
                    f"{hb.completed:>8} {now - heard:>5.1f}s "
                    if hb is not None and heard is not None
                    else f"{'-':>5} {f'-/{n_slots}':>9} {'-':>6} {'-':>8} {'-':>6} "
                )
                + models
            )
        lines = [
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {online} agents online, "
            f"{busy}/{slots} slots busy",
            f"{'AGENT':<20} {'STATE':<8} {'LOAD':>5} {'RUN/SLOTS':>9} {'QUEUED':>6} "
            f"{'DONE':>8} {'HEARD':>6} MODELS",
            *rows,
        ]
        return [line[:width] for line in lines] if width else lines


async def _watch_agents(args: argparse.Namespace) -> int:
    if args.interval <= 0 or (args.count is not None and args.count < 1):
        print("error: --interval must be > 0 and --count >= 1", file=sys.stderr)
        return EXIT_USAGE
    topics = Topics(args.root or DEFAULT_ROOT)
    feed = _FleetFeed(topics)
    subscriptions = [(topics.all_agents("state"), 1), (topics.all_agents("heartbeat"), 0)]
    async with _listening(args, subscriptions, feed.on_message):
        await _interruptible(_refresh_fleet(feed, args, sys.stdout))
    return EXIT_OK


async def _refresh_fleet(feed: _FleetFeed, args: argparse.Namespace, out: Any) -> None:
    """Redraw the table in place on a terminal; elsewhere, print a frame per refresh."""
    tty = _isatty(out)
    await asyncio.sleep(min(args.interval, 0.5))  # the retained births arrive first
    height = frames = 0
    while True:
        width = shutil.get_terminal_size().columns - 1 if tty else None
        lines = feed.table(include_offline=args.all, width=width)
        if tty:
            # Back to the top of the last frame, and clear it, before drawing this one.
            out.write((f"\x1b[{height}F" if height else "") + "\x1b[J")
        out.write("\n".join(lines) + "\n")
        out.flush()
        height = len(lines)
        frames += 1
        if args.count is not None and frames >= args.count:
            return
        await asyncio.sleep(args.interval)


def cmd_report(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig
    from coordinator.report import build_report, format_report, plot, to_json
    from coordinator.trace import JobTrace, TraceError, trace_path

    path: Path | None = args.trace
    if path is None:
        if args.job is None:
            print("error: name a JOB, or a trace file with --trace FILE", file=sys.stderr)
            return EXIT_USAGE
        directory = args.trace_dir
        if directory is None:
            try:
                directory = CoordinatorConfig.load(args.config).trace_dir
            except (OSError, ValueError, TypeError) as e:
                print(f"error: cannot read the coordinator's configuration: {e}", file=sys.stderr)
                return EXIT_USAGE
        if directory is None:
            print(
                "error: no trace directory: pass --trace-dir DIR or --trace FILE (a coordinator "
                "writes traces with --trace-dir DIR, or to traces/ beside its --journal)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        try:
            path = trace_path(directory, args.job)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE
    try:
        trace = JobTrace.load(path)
    except TraceError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return EXIT_FAILED
    report = build_report(trace)
    to_stdout = args.json is not None and str(args.json) == "-"
    print(to_json(report) if to_stdout else format_report(report), end="")
    try:
        if args.json is not None and not to_stdout:
            args.json.write_text(to_json(report))
            print(f"report written to {args.json}", file=sys.stderr)
        if args.png is not None:
            plot(trace, args.png, report)
            print(f"chart written to {args.png}", file=sys.stderr)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    schemas = json_schemas()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, schema in schemas.items():
            (args.out / f"{name}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
        print(f"wrote {len(schemas)} schemas to {args.out}")
    else:
        print(json.dumps(schemas, indent=2))
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from coordinator.demo import run_demo

    with contextlib.suppress(KeyboardInterrupt):
        return run_demo(args.broker, n_agents=args.agents, root=args.root)
    return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
