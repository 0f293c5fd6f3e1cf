"""Per-job performance reports from a trace: makespan against its lower bound, throughput,
per-agent utilisation and share, queue waits, transfer against execution time, retries;
as a table, as JSON, and as a PNG with a Gantt chart and a utilisation plot."""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.trace import JobTrace

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# How the report's derived figures are defined; printed with the table and in the JSON.
DEFINITIONS = {
    "makespan": "first dispatch of the job to its last accepted result",
    "lower_bound": "total measured work (sum of the agents' exec_ms over accepted results) / "
    "total fleet capacity (sum of the slots of the agents that ran accepted results): the "
    "makespan if that work were spread perfectly over every slot, with no transfer or waiting",
    "ratio": "makespan / lower bound (1.0 is ideal)",
    "utilisation": "an agent's busy time (sum of its exec_ms) / (its slots x the makespan)",
    "share": "an agent's samples / all samples of the accepted results",
    "queue_wait": "time a microtask waited on its agent for a free slot (the agent's queued_ms)",
    "transfer": "round trip at the coordinator - queue wait - execution: network, broker and "
    "(de)serialisation, both ways",
}
PLOT_EXTRA = "plot"


@dataclass(frozen=True, slots=True)
class AgentReport:
    """One agent's part in a job."""

    agent: str
    slots: int
    tasks: int
    samples: int
    share: float
    busy_s: float
    utilisation: float
    exec_ms_p50: float
    queued_ms_p50: float
    queued_ms_p95: float
    transfer_ms_p50: float
    failed_attempts: int


@dataclass(frozen=True, slots=True)
class Report:
    """Figures of one job, computed from its trace by :func:`build_report`."""

    job_id: str
    model: str
    policy: str
    ok: bool | None
    error: str | None
    samples: int
    units: int
    tasks: int  # accepted results (one per unit, or redundancy per unit)
    batch_size: int
    redundancy: int
    start_delay_s: float  # submitted -> first dispatch
    makespan_s: float
    end_to_end_s: float | None  # submitted -> finished
    work_s: float
    capacity_slots: int
    lower_bound_s: float
    ratio: float | None
    samples_per_s: float
    tasks_per_s: float
    exec_s: float
    queued_s: float
    transfer_s: float
    queued_ms_p50: float
    queued_ms_p95: float
    queued_ms_max: float
    transfer_ms_p50: float
    transfer_ms_p95: float
    estimate_ratio_p50: float | None  # measured exec_ms / the coordinator's estimate
    retries: int
    failures_by_code: dict[str, int]
    agents: list[AgentReport]
    dropped_rows: int


@dataclass(frozen=True, slots=True)
class _Columns:
    agent: np.ndarray[Any, Any]
    samples: np.ndarray[Any, Any]
    dispatched: np.ndarray[Any, Any]
    received: np.ndarray[Any, Any]
    queued_ms: np.ndarray[Any, Any]
    exec_ms: np.ndarray[Any, Any]
    est_ms: np.ndarray[Any, Any]
    transfer_ms: np.ndarray[Any, Any]


def _columns(trace: JobTrace) -> _Columns:
    dispatched = np.asarray(trace.dispatched, dtype=np.float64)
    received = np.asarray(trace.received, dtype=np.float64)
    queued = np.asarray(trace.queued_ms, dtype=np.float64)
    exec_ms = np.asarray(trace.exec_ms, dtype=np.float64)
    rtt_ms = (received - dispatched) * 1000
    return _Columns(
        agent=np.asarray(trace.agent, dtype=object),
        samples=np.asarray(trace.samples, dtype=np.int64),
        dispatched=dispatched,
        received=received,
        queued_ms=queued,
        exec_ms=exec_ms,
        est_ms=np.asarray(trace.est_ms, dtype=np.float64),
        transfer_ms=np.maximum(rtt_ms - queued - exec_ms, 0.0),
    )


def _pct(values: np.ndarray[Any, Any], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def _first_dispatch(trace: JobTrace) -> float | None:
    times = list(trace.dispatched) + [f.dispatched for f in trace.failures]
    return min(times) if times else None


def build_report(trace: JobTrace) -> Report:
    """Every figure of the report; see :data:`DEFINITIONS`."""
    c = _columns(trace)
    n = len(c.samples)
    first = _first_dispatch(trace)
    last = float(c.received.max()) if n else first
    makespan = (last - first) if first is not None and last is not None else 0.0
    agents = sorted(set(trace.agent))
    capacity = sum(trace.slots.get(a, 1) for a in agents)
    work_s = float(c.exec_ms.sum()) / 1000
    lower_bound = work_s / capacity if capacity else 0.0
    samples = int(c.samples.sum())
    failed_by_agent = Counter(f.agent for f in trace.failures)
    per_agent = []
    for agent_id in agents:
        mine = c.agent == agent_id
        slots = trace.slots.get(agent_id, 1)
        busy_s = float(c.exec_ms[mine].sum()) / 1000
        per_agent.append(
            AgentReport(
                agent=agent_id,
                slots=slots,
                tasks=int(mine.sum()),
                samples=int(c.samples[mine].sum()),
                share=float(c.samples[mine].sum()) / samples if samples else 0.0,
                busy_s=busy_s,
                utilisation=busy_s / (slots * makespan) if makespan > 0 else 0.0,
                exec_ms_p50=_pct(c.exec_ms[mine], 50),
                queued_ms_p50=_pct(c.queued_ms[mine], 50),
                queued_ms_p95=_pct(c.queued_ms[mine], 95),
                transfer_ms_p50=_pct(c.transfer_ms[mine], 50),
                failed_attempts=failed_by_agent.get(agent_id, 0),
            )
        )
    measured = (c.est_ms > 0) & (c.exec_ms > 0)
    return Report(
        job_id=trace.job_id,
        model=trace.model,
        policy=trace.policy,
        ok=trace.ok,
        error=trace.error,
        samples=samples,
        units=trace.units,
        tasks=n,
        batch_size=trace.batch_size,
        redundancy=trace.redundancy,
        start_delay_s=(first - trace.submitted) if first is not None else 0.0,
        makespan_s=makespan,
        end_to_end_s=(trace.finished - trace.submitted) if trace.finished is not None else None,
        work_s=work_s,
        capacity_slots=capacity,
        lower_bound_s=lower_bound,
        ratio=makespan / lower_bound if lower_bound > 0 else None,
        samples_per_s=samples / makespan if makespan > 0 else 0.0,
        tasks_per_s=n / makespan if makespan > 0 else 0.0,
        exec_s=work_s,
        queued_s=float(c.queued_ms.sum()) / 1000,
        transfer_s=float(c.transfer_ms.sum()) / 1000,
        queued_ms_p50=_pct(c.queued_ms, 50),
        queued_ms_p95=_pct(c.queued_ms, 95),
        queued_ms_max=float(c.queued_ms.max()) if n else 0.0,
        transfer_ms_p50=_pct(c.transfer_ms, 50),
        transfer_ms_p95=_pct(c.transfer_ms, 95),
        estimate_ratio_p50=(
            float(np.median(c.exec_ms[measured] / c.est_ms[measured])) if measured.any() else None
        ),
        retries=trace.retries,
        failures_by_code=dict(Counter(f.code for f in trace.failures).most_common()),
        agents=per_agent,
        dropped_rows=trace.dropped_rows,
    )


def to_json(report: Report) -> str:
    """The report as a JSON document, with the definitions of its figures."""
    return json.dumps({**asdict(report), "definitions": DEFINITIONS}, indent=2) + "\n"


def _s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds < 100 else f"{seconds:,.1f} s"


def format_report(report: Report) -> str:
    """A readable table of the report (for a terminal)."""
    r = report
    state = {True: "done", False: "FAILED", None: "unfinished"}[r.ok]
    lines = [
        f"job {r.job_id} ({r.model}, {r.policy}): {state}, {r.samples:,} samples in "
        f"{r.tasks:,} microtasks of up to {r.batch_size:,}"
        + (f", each unit on {r.redundancy} agents" if r.redundancy > 1 else ""),
    ]
    if r.error:
        lines.append(f"  error: {r.error}")
    ratio, efficiency = (
        ("-", "") if r.ratio is None else (f"{r.ratio:.2f}x", f"{1 / r.ratio:.0%} of the ideal")
    )
    e2e = "-" if r.end_to_end_s is None else _s(r.end_to_end_s)
    rows = [
        ("makespan", _s(r.makespan_s), "first dispatch -> last result"),
        (
            "lower bound",
            _s(r.lower_bound_s),
            f"measured work {_s(r.work_s)} / {r.capacity_slots} slots of the agents that took part",
        ),
        ("makespan / bound", ratio, efficiency),
        (
            "end to end",
            e2e,
            f"submitted -> finished; {_s(r.start_delay_s)} before the first dispatch",
        ),
        (
            "throughput",
            f"{r.samples_per_s:,.0f} samples/s",
            f"{r.tasks_per_s:,.1f} microtasks/s over the makespan",
        ),
        ("execution", _s(r.exec_s), "sum over microtasks of the agents' exec_ms"),
        (
            "transfer",
            _s(r.transfer_s),
            f"round trip - queue - exec, summed; p50 {r.transfer_ms_p50:.2f} ms, "
            f"p95 {r.transfer_ms_p95:.2f} ms per microtask",
        ),
        (
            "queue wait",
            f"p50 {r.queued_ms_p50:.2f} ms",
            f"p95 {r.queued_ms_p95:.2f} ms, max {r.queued_ms_max:.2f} ms (waiting for a slot "
            "on the agent)",
        ),
        (
            "estimates",
            "-" if r.estimate_ratio_p50 is None else f"x{r.estimate_ratio_p50:.2f}",
            "median of measured exec / the coordinator's estimate",
        ),
        (
            "retries",
            str(r.retries),
            ", ".join(f"{code} {n}" for code, n in r.failures_by_code.items()),
        ),
    ]
    width = max(len(v) for _, v, _ in rows)
    for name, value, note in rows:
        lines.append(f"  {name:<17} {value:>{width}}   {note}".rstrip())
    if r.dropped_rows:
        lines.append(f"  ({r.dropped_rows:,} results beyond the trace's limit are not counted)")
    if r.agents:
        aw = max(5, *(len(a.agent) for a in r.agents))
        lines += [
            "",
            f"  {'AGENT':<{aw}} {'SLOTS':>5} {'TASKS':>7} {'SAMPLES':>9} {'SHARE':>6} "
            f"{'BUSY':>9} {'UTIL':>6} {'EXEC p50':>9} {'QUEUE p50/p95':>15} {'XFER p50':>9} "
            f"{'FAILED':>6}",
        ]
        for a in r.agents:
            queue = f"{a.queued_ms_p50:.1f}/{a.queued_ms_p95:.1f} ms"
            lines.append(
                f"  {a.agent:<{aw}} {a.slots:>5} {a.tasks:>7,} {a.samples:>9,} {a.share:>6.1%} "
                f"{a.busy_s:>7.3f} s {a.utilisation:>6.1%} {a.exec_ms_p50:>6.2f} ms "
                f"{queue:>15} {a.transfer_ms_p50:>6.2f} ms {a.failed_attempts:>6}"
            )
    lines += [
        "",
        *textwrap.wrap(
            "lower bound: " + DEFINITIONS["lower_bound"],
            96,
            initial_indent="  ",
            subsequent_indent="    ",
        ),
    ]
    if r.redundancy > 1:
        lines.append("  shares count every copy of a unit (each ran on several agents)")
    return "\n".join(lines) + "\n"


# -- plot ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Bar:
    start: float
    width: float
    lane: int
    kind: str


# Microtasks on one agent slot up to which the Gantt chart outlines each of them.
GANTT_EDGES_UP_TO = 400
_KINDS = {
    "first": ("first attempt", "#4878d0"),
    "retried": ("retried microtask (earlier attempt failed)", "#ee854a"),
    "speculative": ("copy overtaking a straggler", "#956cb4"),
}


def _bars(trace: JobTrace, t0: float) -> dict[str, list[_Bar]]:
    """Execution intervals per agent, packed into slot lanes.

    An agent reports how long a microtask waited for a slot and ran, not when: it is taken
    to have arrived after the agent's shortest one-way trip (half its least transfer time),
    which measured traces show to be steadier than the way back (results wait their turn
    at a busy coordinator).
    """
    c = _columns(trace)
    rtt = c.received - c.dispatched
    exec_s = c.exec_ms / 1000
    unmeasured = (c.exec_ms <= 0) & (c.queued_ms <= 0)
    exec_s = np.where(unmeasured, rtt, exec_s)
    one_way = np.zeros(len(rtt))
    for agent_id in set(trace.agent):
        mine = c.agent == agent_id
        one_way[mine] = c.transfer_ms[mine].min() / 2000
    start = np.where(unmeasured, c.dispatched, c.dispatched + one_way + c.queued_ms / 1000)
    latest = c.received - exec_s - t0  # it ended by the time its result arrived
    start = np.minimum(start - t0, latest)
    by_agent: dict[str, list[_Bar]] = {}
    lane_ends: dict[str, list[float]] = {}
    for i in np.argsort(start, kind="stable"):
        agent_id = trace.agent[i]
        kind = "speculative" if trace.speculative[i] else "retried" if trace.retried[i] else "first"
        ends = lane_ends.setdefault(agent_id, [])
        s, w = float(start[i]), float(exec_s[i])
        free = [j for j, end in enumerate(ends) if end <= s]
        if free:  # the lane free the longest
            lane = min(free, key=ends.__getitem__)
        elif len(ends) < trace.slots.get(agent_id, 1):
            ends.append(0.0)
            lane = len(ends) - 1
        else:
            # All its slots busy by the estimate: the agent ran at most `slots` microtasks
            # at once, so this one waited for the slot that freed first (and still ended
            # before its result arrived).
            lane = min(range(len(ends)), key=ends.__getitem__)
            s = max(min(ends[lane], float(latest[i])), s)
        ends[lane] = max(ends[lane], s + w)
        by_agent.setdefault(agent_id, []).append(_Bar(s, w, lane, kind))
    return by_agent


def _busy_at(
    starts: np.ndarray[Any, Any], ends: np.ndarray[Any, Any], t: np.ndarray[Any, Any]
) -> Any:
    """Busy time accumulated by the intervals [starts, ends) up to each time in ``t``:
    sum of max(0, t - s) - max(0, t - e), from sorted prefix sums."""

    def ramp(points: np.ndarray[Any, Any]) -> Any:
        p = np.sort(points)
        prefix = np.concatenate(([0.0], np.cumsum(p)))
        k = np.searchsorted(p, t, side="right")
        return k * t - prefix[k]

    return ramp(starts) - ramp(ends)


def plot(trace: JobTrace, path: Path, report: Report | None = None) -> Path:
    """Write one PNG: a Gantt chart of the microtasks on each agent's slots over time, and
    below it each agent's and the fleet's utilisation over time.

    Needs matplotlib (the ``plot`` extra); raises :class:`ImportError` naming it otherwise.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError as e:
        raise ImportError(
            f"plotting a report needs matplotlib: pip install 'edge-offload[{PLOT_EXTRA}]'"
        ) from e
    report = report or build_report(trace)
    t0 = _first_dispatch(trace) or trace.submitted
    by_agent = _bars(trace, t0)
    agents = sorted(set(by_agent) | {f.agent for f in trace.failures})
    lanes = {
        a: max(trace.slots.get(a, 1), 1 + max((b.lane for b in by_agent.get(a, [])), default=0))
        for a in agents
    }
    total_lanes = sum(lanes.values()) or 1
    end = max(report.makespan_s, max((f.failed - t0 for f in trace.failures), default=0.0))
    scale, unit = (1000.0, "ms") if end < 1.0 else (1.0, "s")
    digits = 1 if unit == "ms" else 2

    gantt_h = min(max(2.5, 0.32 * total_lanes + 1.0), 12.0)
    fig = Figure(figsize=(12, gantt_h + 3.6), layout="constrained")
    FigureCanvasAgg(fig)  # rendered by Agg, whatever backend the process has selected
    gantt, util = fig.subplots(2, 1, sharex=True, height_ratios=[gantt_h, 2.6])
    min_width = max(end, 1e-6) * scale / 1500  # the shortest microtask still shows
    base: dict[str, int] = {}
    y = 0
    for a in reversed(agents):  # the first agent at the top
        base[a] = y
        y += lanes[a]
    kinds = {"first"} | {b.kind for bars in by_agent.values() for b in bars}
    for a in agents:
        for kind in kinds:
            for lane in range(lanes[a]):
                spans = [
                    (b.start * scale, max(b.width * scale, min_width))
                    for b in by_agent.get(a, [])
                    if b.kind == kind and b.lane == lane
                ]
                if spans:
                    # A thin white edge shows where one microtask ends and the next starts,
                    # as long as the bars are wide enough for it not to whiten the lane.
                    gantt.broken_barh(
                        spans,
                        (base[a] + lane + 0.1, 0.8),
                        facecolors=_KINDS[kind][1],
                        edgecolors="white" if len(spans) <= GANTT_EDGES_UP_TO else "none",
                        linewidth=0.5,
                    )
        if base[a]:
            gantt.axhline(base[a], color="#999999", linewidth=0.6)
    fails = [((f.failed - t0) * scale, base[f.agent] + lanes[f.agent] / 2) for f in trace.failures]
    if fails:
        xs, ys = zip(*fails, strict=True)
        gantt.scatter(xs, ys, marker="x", color="#d62728", s=40, zorder=3, linewidths=1.5)
    gantt.axvline(report.makespan_s * scale, color="black", linewidth=1)
    if report.lower_bound_s > 0:
        gantt.axvline(report.lower_bound_s * scale, color="#2a9d4b", linestyle="--", linewidth=1.2)
    gantt.set_yticks(
        [base[a] + lanes[a] / 2 for a in agents],
        [f"{a}\n{_plural(trace.slots.get(a, 1), 'slot')}" for a in agents],
    )
    gantt.set_ylim(0, total_lanes)
    gantt.set_ylabel("agent (one lane per slot)")
    ratio = f" = {report.ratio:.2f}x the lower bound" if report.ratio is not None else ""
    gantt.set_title(
        f"job {trace.job_id}: {trace.model}, {report.samples:,} samples in "
        f"{_plural(report.tasks, 'microtask')} on {_plural(len(agents), 'agent')} "
        f"({trace.policy})\nmakespan {report.makespan_s * scale:.{digits}f} {unit}{ratio}; "
        f"{report.samples_per_s:,.0f} samples/s; {_plural(report.retries, 'retry', 'retries')}",
        fontsize=11,
    )
    handles: list[Any] = [
        Patch(color=color, label=label) for kind, (label, color) in _KINDS.items() if kind in kinds
    ]
    if fails:
        handles.append(
            Line2D([], [], marker="x", color="#d62728", linestyle="none", label="failed attempt")
        )
    handles.append(
        Line2D(
            [],
            [],
            color="black",
            linewidth=1,
            label=f"makespan {report.makespan_s * scale:.{digits}f} {unit}",
        )
    )
    if report.lower_bound_s > 0:
        handles.append(
            Line2D(
                [],
                [],
                color="#2a9d4b",
                linestyle="--",
                label=f"lower bound {report.lower_bound_s * scale:.{digits}f} {unit}"
                "\n(work / slots)",
            )
        )
    gantt.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)
    gantt.text(
        0.0,
        -0.02,
        "bars: execution on the agent (its exec_ms), placed after its queue wait and the "
        "agent's shortest one-way trip (an estimate)",
        transform=gantt.transAxes,
        fontsize=8,
        color="#555555",
        va="top",
    )
    _plot_utilisation(util, trace, by_agent, end, scale)
    util.set_xlim(0, end * scale * 1.02 if end > 0 else 1.0)
    util.set_xlabel(f"time since the first dispatch ({unit})")
    fig.savefig(path, dpi=110)
    return path


# Beyond this many agents the utilisation plot shows the fleet only.
MAX_AGENT_LINES = 12


def _plot_utilisation(
    ax: Axes, trace: JobTrace, by_agent: dict[str, list[_Bar]], end: float, scale: float
) -> None:
    from matplotlib.ticker import PercentFormatter

    # Bins of a few microtasks each: narrower ones only show microtasks starting and ending.
    widths = [b.width for bars in by_agent.values() for b in bars]
    typical = float(np.median(widths)) if widths else end
    bins = int(np.clip(end / max(4 * typical, 1e-9), 10, 120))
    edges = np.linspace(0.0, max(end, 1e-6), bins + 1)
    width = edges[1] - edges[0]
    fleet_busy = np.zeros(bins)
    fleet_slots = 0
    for a in sorted(by_agent):
        bars = by_agent[a]
        starts = np.array([b.start for b in bars])
        busy = np.diff(_busy_at(starts, starts + np.array([b.width for b in bars]), edges))
        slots = trace.slots.get(a, 1)
        fleet_busy += busy
        fleet_slots += slots
        if len(by_agent) <= MAX_AGENT_LINES:
            # Placement is estimated: clip the odd bin where estimates overlap.
            util = np.minimum(busy / (slots * width), 1.0)
            ax.stairs(util, edges * scale, label=a, linewidth=1.1, alpha=0.85)
    if fleet_slots:
        ax.stairs(
            np.minimum(fleet_busy / (fleet_slots * width), 1.0),
            edges * scale,
            label=f"fleet ({_plural(fleet_slots, 'slot')})",
            color="black",
            linewidth=2.0,
        )
    ax.set_ylim(0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel("utilisation\n(busy slots / slots)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else plural or word + 's'}"


def load_report(path: Path) -> tuple[JobTrace, Report]:
    """Read a trace file and compute its report."""
    trace = JobTrace.load(path)
    return trace, build_report(trace)
