"""The ``edge-offload`` command line: broker, agent, coordinator, submit, jobs, demo, ..."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiomqtt
import numpy as np

from coordinator import cli_monitor
from protocol import BrokerAddress, JobError, JobStatus, OffloadError, json_schemas

# Exit codes
EXIT_OK = 0
EXIT_FAILED = 1  # the job failed or was refused
EXIT_USAGE = 2  # bad arguments or input files
EXIT_UNAVAILABLE = 3  # broker or coordinator unreachable
EXIT_INTERRUPTED = 130

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"

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
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT/metrics (0: any free port)",
    )
    sp.set_defaults(func=cmd_coordinator)

    sp = sub.add_parser("submit", help="submit an inference job and write its outputs")
    common(sp)
    sp.add_argument("model", help="model id, e.g. digits-mlp")
    sp.add_argument("inputs", type=Path, help=".npy (one input) or .npz (named inputs)")
    sp.add_argument(
        "--input-name",
        default=None,
        help="input name for a .npy file (default: the model's only input)",
    )
    sp.add_argument("-o", "--output", type=Path, help="write outputs to .npz (or .npy if one)")
    sp.add_argument("--batch-size", type=int, help="samples per microtask (default: automatic)")
    sp.add_argument("--policy", choices=["earliest_finish", "least_loaded", "round_robin"])
    sp.add_argument("--job-id")
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
    sp.set_defaults(func=cmd_agents)

    sp = sub.add_parser("jobs", help="list the coordinator's recent jobs")
    common(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_jobs)

    cli_monitor.add_parsers(sub, common)

    sp = sub.add_parser("schema", help="print the JSON Schema of every message")
    sp.add_argument("--out", type=Path, help="write one <type>.schema.json per message here")
    sp.set_defaults(func=cmd_schema)

    sp = sub.add_parser("demo", help="broker + coordinator + 3 agents + a digits job, end to end")
    common(sp, local_broker=True)
    sp.add_argument("--agents", type=int, default=3)
    sp.set_defaults(func=cmd_demo)
    return p


# -- logging -------------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


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
        **_root(args),
    }
    if _broker_args_given(args):  # else the config file's broker, or the environment's
        overrides["broker"] = _address(args)
    config = AgentConfig.load(args.config, **overrides)

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
        "metrics_port": args.metrics_port,
        **_root(args),
    }
    if _broker_args_given(args):  # else the config file's broker, or the environment's
        overrides["broker"] = _address(args)
    config = CoordinatorConfig.load(args.config, **overrides)
    asyncio.run(_serve(lambda: Coordinator(config)))
    return EXIT_OK


def load_inputs(path: Path, input_name: str | None) -> dict[str, np.ndarray[Any, Any]]:
    """Arrays from a .npy (one input) or .npz (one array per input name) file."""
    if not path.exists():
        raise OffloadError(f"{path}: no such file", code="bad_request")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    return {input_name or "input": np.load(path, allow_pickle=False)}


def save_outputs(path: Path, outputs: dict[str, np.ndarray[Any, Any]]) -> None:
    if path.suffix == ".npy":
        if len(outputs) != 1:
            raise OffloadError(
                f"{len(outputs)} outputs ({', '.join(outputs)}) need an .npz file",
                code="bad_request",
            )
        np.save(path, next(iter(outputs.values())))
    else:
        np.savez(path, **outputs)  # type: ignore[arg-type]


class Progress:
    """A one-line progress bar on stderr, fed by job status messages."""

    def __init__(self, label: str, *, stream: Any = sys.stderr) -> None:
        self.label = label
        self.stream = stream
        self.start = time.monotonic()
        self.done = 0
        self.total = 0

    def update(self, status: JobStatus) -> None:
        self.done, self.total = status.samples_done, status.samples_total
        self.draw()

    def draw(self, final: bool = False) -> None:
        if not self.total:
            return
        frac = self.done / self.total
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        eta = f"{(self.total - self.done) / rate:.1f}s" if rate > 0 and not final else "-"
        bar = "#" * int(frac * 30)
        self.stream.write(
            f"\r{self.label} [{bar:<30}] {self.done}/{self.total} samples {rate:,.0f}/s ETA {eta}  "
        )
        if final:
            self.stream.write("\n")
        self.stream.flush()


def cmd_submit(args: argparse.Namespace) -> int:
    from coordinator.client import OffloadClient

    try:
        inputs = load_inputs(args.inputs, args.input_name)
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
            )
            try:
                out = await handle.result(args.timeout)
            except JobError as e:
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
                save_outputs(args.output, out.outputs)
                print(f"outputs {', '.join(out.outputs)} written to {args.output}")
            return EXIT_OK

    return _run_client(run())


def cmd_agents(args: argparse.Namespace) -> int:
    from coordinator.client import OffloadClient

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
