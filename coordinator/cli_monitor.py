"""CLI commands of monitoring jobs: ``monitor start|list|show|stop``, ``alerts``, ``sensors``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import re
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from protocol import (
    Alert,
    JobError,
    MonitorJob,
    MonitorStatus,
    PlacementRule,
    ReadingFormat,
    Verdict,
    check_id,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parsers(
    sub: Any, common: Callable[[argparse.ArgumentParser], None]
) -> None:  # sub: argparse's private _SubParsersAction
    sp = sub.add_parser(
        "monitor", help="standing monitoring jobs over sensor streams: start, list, show, stop"
    )
    msub = sp.add_subparsers(dest="monitor_action", required=True, metavar="ACTION")

    st = msub.add_parser(
        "start",
        help="start a monitoring job",
        description="Windows of every sensor on the source topics go through the model; "
        "the verdict raises and clears alerts per sensor. Give the job as --spec FILE "
        "(a MonitorJob as JSON, see `edge-offload schema`) or with the options below.",
    )
    common(st)
    st.add_argument("job_id", help="the job's id (also its alert topic's last level)")
    st.add_argument("--spec", type=Path, help="MonitorJob JSON; other options override it")
    st.add_argument("--source", action="append", help="topic filter of sensor messages (repeat)")
    st.add_argument("--model", help="model id (its manifest's verdict is the default rule)")
    st.add_argument("--window", type=int, help="values per window (default 128)")
    st.add_argument("--hop", type=int, help="values between window starts (default window/2)")
    st.add_argument("--input", help="model input that takes the window (if it has several)")
    st.add_argument(
        "--encoding", choices=["json", "text", "float32le", "float64le", "int16le"], default=None
    )
    st.add_argument("--field", help="JSON path of the value(s) (default 'value')")
    st.add_argument("--ts-field", help="JSON path of the first value's timestamp")
    st.add_argument("--rate-hz", type=float, help="values per second within a message")
    st.add_argument("--sensor-level", type=int, help="topic level naming the sensor (default -1)")
    st.add_argument("--sensor-field", help="JSON path naming the sensor instead")
    st.add_argument("--output", help="model output the verdict reads (default 'score')")
    st.add_argument("--index", type=int, help="element of that output per window (default 0)")
    st.add_argument("--op", choices=[">", ">=", "<", "<="], help="default '>'")
    st.add_argument("--threshold", type=float)
    st.add_argument("--clear-threshold", type=float, help="hysteresis: clear past this")
    st.add_argument("--raise-after", type=int, help="consecutive positive windows to alert")
    st.add_argument("--clear-after", type=int, help="consecutive normal windows to clear")
    st.add_argument("--deadline-ms", type=float, help="per window (default 1000)")
    st.add_argument("--alert-topic", help="default {root}/alerts/JOB_ID")
    st.add_argument(
        "--require",
        action="append",
        metavar="LABEL=VALUE",
        help="agents must have this label; VALUE may use {N} (topic level N) or {sensor} (repeat)",
    )
    st.add_argument("--prefer", action="append", metavar="LABEL=VALUE", help="soft --require")
    st.set_defaults(func=cmd_monitor_start)

    ls = msub.add_parser("list", help="the coordinator's monitoring jobs")
    common(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_monitor_list)

    sh = msub.add_parser("show", help="a monitoring job's status and counters")
    common(sh)
    sh.add_argument("job_id")
    sh.add_argument("--json", action="store_true")
    sh.set_defaults(func=cmd_monitor_show)

    so = msub.add_parser("stop", help="stop a monitoring job (or cancel an inference job)")
    common(so)
    so.add_argument("job_id")
    so.set_defaults(func=cmd_monitor_stop)

    al = sub.add_parser("alerts", help="follow alerts (one job's, or all with fleet health)")
    common(al)
    al.add_argument("job_id", nargs="?", help="default: every job and the fleet")
    al.add_argument("--count", type=int, help="exit after this many alerts")
    al.add_argument("--timeout", type=float, help="exit after this many seconds")
    al.add_argument("--json", action="store_true", help="one alert message per line")
    al.set_defaults(func=cmd_alerts)

    se = sub.add_parser(
        "sensors",
        help="simulate vibration sensors on MQTT, with labelled anomalies",
        description="Publishes N 100 Hz vibration sensors as JSON chunks on "
        "PREFIX/SITE/SENSOR ({'ts': first value's time, 'values': [...]}) and injects "
        "faults at random times; --labels writes them to a JSON file.",
    )
    common(se)
    se.add_argument("--sensors", type=int, default=20)
    se.add_argument("--rate", type=float, default=100.0, help="values per second per sensor")
    se.add_argument("--chunk", type=int, default=10, help="values per message")
    se.add_argument("--duration", type=float, default=60.0, help="seconds of sensor time")
    se.add_argument("--speed", type=float, default=1.0, help="faster than real time by this")
    se.add_argument("--prefix", default="plant")
    se.add_argument("--sites", type=int, default=2)
    se.add_argument("--seed", type=int, default=1)
    se.add_argument("--anomaly-gap", type=float, default=30.0, help="mean seconds between faults")
    se.add_argument("--malformed-every", type=int, default=0, help="inject a bad message per N")
    se.add_argument("--labels", type=Path, help="write the injected anomalies here (JSON)")
    se.set_defaults(func=cmd_sensors)


def _labels(pairs: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {pair!r}: expected LABEL=VALUE")
        out[key] = value
    return out


def manifest_verdict(model: str) -> dict[str, Any] | None:
    """The verdict rule a zoo model's manifest recommends, if this install has the zoo."""
    from agent.config import default_models_dirs

    for d in default_models_dirs():
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError):
            continue
        for entry in manifest.get("models", []):
            if entry.get("id") == model and isinstance(entry.get("verdict"), dict):
                return dict(entry["verdict"])
    return None


def build_spec(args: argparse.Namespace) -> MonitorJob:
    """The MonitorJob of ``monitor start``: --spec, overridden by the options given."""
    doc: dict[str, Any] = json.loads(args.spec.read_text()) if args.spec else {}
    doc["job_id"] = args.job_id
    doc.setdefault("type", "monitor")
    if args.source:
        doc["sources"] = args.source
    for opt in ("model", "window", "hop", "input", "deadline_ms", "alert_topic"):
        if getattr(args, opt) is not None:
            doc[opt] = getattr(args, opt)
    doc.setdefault("window", 128)
    doc.setdefault("hop", max(doc["window"] // 2, 1))
    reading = dict(doc.get("reading", {}))
    for opt in ("encoding", "field", "ts_field", "rate_hz", "sensor_level", "sensor_field"):
        if getattr(args, opt) is not None:
            reading[opt] = getattr(args, opt)
    doc["reading"] = ReadingFormat.model_validate(reading).model_dump()
    verdict = dict(doc.get("verdict") or manifest_verdict(doc.get("model", "")) or {})
    verdict = {k: v for k, v in verdict.items() if k in Verdict.model_fields}
    for opt in (
        "output",
        "index",
        "op",
        "threshold",
        "clear_threshold",
        "raise_after",
        "clear_after",
    ):
        if getattr(args, opt) is not None:
            verdict[opt] = getattr(args, opt)
    doc["verdict"] = verdict
    placement = dict(doc.get("placement", {}))
    if args.require:
        placement["require"] = _labels(args.require, "--require")
    if args.prefer:
        placement["prefer"] = _labels(args.prefer, "--prefer")
    doc["placement"] = PlacementRule.model_validate(placement).model_dump()
    return MonitorJob.model_validate(doc)


def print_status(status: MonitorStatus) -> None:
    s = status.stats
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(status.started))

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f} ms"

    print(f"monitor {status.job_id}: {status.state.upper()} since {started}")
    print(f"  model {status.model}; sources {', '.join(status.sources)}")
    print(f"  alerts on {status.alert_topic}")
    print(
        f"  sensors {s.sensors}, messages {s.messages}, readings {s.readings}, "
        f"malformed {sum(s.malformed.values())}"
        + (
            f" ({', '.join(f'{k} {v}' for k, v in sorted(s.malformed.items()))})"
            if s.malformed
            else ""
        )
    )
    print(
        f"  windows {s.windows}: processed {s.processed}, missed deadline {s.missed}, "
        f"failed {s.failed}, shed {s.shed}"
    )
    print(
        f"  window->verdict latency p50 {ms(s.latency_ms_p50)} p99 {ms(s.latency_ms_p99)}; "
        f"alerts {s.alerts}, cleared {s.cleared}, alarming now {s.alarming}"
    )
    if s.per_agent:
        print(
            "  windows per agent: " + ", ".join(f"{a} {n}" for a, n in sorted(s.per_agent.items()))
        )
    if status.last_error:
        print(f"  last problem: {status.last_error}")
    if status.error:
        print(f"  error: [{status.error.code}] {status.error.message}")


def format_alert(a: Alert) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(a.ts))
    parts = [when, f"{a.kind.upper():<16}"]
    if a.job_id:
        parts.append(a.job_id)
    if a.sensor:
        parts.append(f"sensor={a.sensor}")
    if a.score is not None:
        parts.append(f"score={a.score:.4g}")
    if a.agent_id:
        parts.append(f"agent={a.agent_id}")
    if a.latency_ms is not None:
        parts.append(f"latency={a.latency_ms:.1f}ms" + (" LATE" if a.late else ""))
    if a.kind not in ("anomaly", "cleared"):
        parts.append(a.message)
    return " ".join(parts)


# -- commands ------------------------------------------------------------------------------------


def cli_identity() -> str:
    """Who the command line submits as when the broker login does not say: the same for
    every command a user runs on this host, so ``monitor stop`` may stop what ``monitor
    start`` started (env EDGE_OFFLOAD_CLIENT_ID overrides it)."""
    if ident := os.environ.get("EDGE_OFFLOAD_CLIENT_ID"):
        return check_id(ident, "EDGE_OFFLOAD_CLIENT_ID")
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid with no passwd entry
        user = str(os.getuid())
    raw = f"cli-{user}.{socket.gethostname()}"
    return re.sub(r"[^A-Za-z0-9_.:-]", "-", raw)[:128]


def _client(args: argparse.Namespace) -> Any:
    from coordinator.cli import _address, _root
    from coordinator.client import OffloadClient

    address = _address(args)
    identity = None if address.username else cli_identity()
    return OffloadClient(address, client_id=identity, **_root(args))


def _run(main: Any) -> int:
    from coordinator.cli import _run_client

    return _run_client(main)


async def _ask(args: argparse.Namespace, call: Callable[[Any], Awaitable[Any]]) -> Any:
    """``call(client)``; prints the coordinator's refusal (or its silence) and returns
    None on failure."""
    async with _client(args) as client:
        try:
            return await call(client)
        except JobError as e:
            print(f"error: {e}", file=sys.stderr)
        except TimeoutError:
            print("error: no answer from a coordinator", file=sys.stderr)
    return None


def cmd_monitor_start(args: argparse.Namespace) -> int:
    try:
        spec = build_spec(args)
    except (ValueError, OSError) as e:  # pydantic's ValidationError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        status = await _ask(args, lambda client: client.start_monitor(spec))
        if status is None:
            return EXIT_FAILED
        print_status(status)
        return EXIT_OK

    return _run(run())


def cmd_monitor_list(args: argparse.Namespace) -> int:
    async def run() -> int:
        monitors = await _ask(args, lambda client: client.monitors())
        if monitors is None:
            return EXIT_FAILED
        if args.json:
            print(json.dumps([m.model_dump() for m in monitors], indent=2))
            return EXIT_OK
        print(
            f"{'JOB':<24} {'STATE':<8} {'MODEL':<20} {'SENSORS':>7} {'WINDOWS':>9} "
            f"{'MISSED':>7} {'ALERTS':>6} {'ALARMING':>8}"
        )
        for m in monitors:
            print(
                f"{m.job_id:<24} {m.state:<8} {m.model:<20} {m.sensors:>7} {m.windows:>9} "
                f"{m.missed:>7} {m.alerts:>6} {m.alarming:>8}"
            )
        return EXIT_OK

    return _run(run())


def cmd_monitor_show(args: argparse.Namespace) -> int:
    async def run() -> int:
        status = await _ask(args, lambda client: client.monitor_status(args.job_id))
        if status is None:
            return EXIT_FAILED
        if args.json:
            print(status.model_dump_json(indent=2))
        else:
            print_status(status)
        return EXIT_OK

    return _run(run())


def cmd_monitor_stop(args: argparse.Namespace) -> int:
    async def run() -> int:
        if await _ask(args, lambda client: _stopped(client, args.job_id)) is None:
            return EXIT_FAILED
        print(f"stopped {args.job_id}")
        return EXIT_OK

    return _run(run())


async def _stopped(client: Any, job_id: str) -> bool:
    await client.stop(job_id)
    return True


def cmd_alerts(args: argparse.Namespace) -> int:
    async def follow() -> int:
        seen = 0
        async with _client(args) as client:
            async for alert in client.alerts(args.job_id):
                print(alert.model_dump_json() if args.json else format_alert(alert), flush=True)
                seen += 1
                if args.count is not None and seen >= args.count:
                    break
        return EXIT_OK

    async def run() -> int:
        try:
            return await asyncio.wait_for(follow(), args.timeout)
        except TimeoutError:
            return EXIT_OK

    return _run(run())


def cmd_sensors(args: argparse.Namespace) -> int:
    from coordinator.cli import _address
    from coordinator.sensors import SensorSimulator, SimulatorConfig

    config = SimulatorConfig(
        sensors=args.sensors,
        rate_hz=args.rate,
        chunk=args.chunk,
        duration_s=args.duration,
        speed=args.speed,
        prefix=args.prefix,
        sites=args.sites,
        seed=args.seed,
        mean_gap_s=args.anomaly_gap,
        malformed_every=args.malformed_every,
    )
    sim = SensorSimulator(_address(args), config)
    print(
        f"{config.sensors} sensors at {config.rate_hz:g} Hz on {config.prefix}/+/+ for "
        f"{config.duration_s:g} s (x{config.speed:g}); {len(sim.anomalies)} anomalies",
        file=sys.stderr,
    )

    async def run() -> int:
        report = await sim.run()
        if args.labels:
            args.labels.write_text(json.dumps(report.labels(), indent=1) + "\n")
        print(
            f"published {report.messages} messages, {sum(report.values.values())} values"
            + (f", {report.malformed.total()} malformed" if report.malformed else "")
            + (f"; labels in {args.labels}" if args.labels else ""),
            file=sys.stderr,
        )
        return EXIT_OK

    return _run(run())
