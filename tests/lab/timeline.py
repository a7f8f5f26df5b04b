"""A picture of each drill run: `drill-report.html`, one self-contained file.

    from tests.lab import timeline
    timeline.render_html(report, runs, Path("drill-report.html"))

    # re-draw a saved report (runs.json holds the `runs` list below):
    python -m tests.lab.timeline --report drill-report.json --runs runs.json --out drill-report.html

The page opens with a summary table of the report (failed scenarios and limits highlighted),
then one PNG per scenario with its runs as stacked subplots (at most MAX_RUNS_DRAWN; the caption
says when more were left out). The PNGs are embedded as base64 data URIs and the style is
inline, so the file can be attached to a CI run or mailed and still shows everything.

Each subplot: x is seconds since the run's t0; stacked bars count requests per 100 ms bucket by
*send* time, coloured by the node that served them (the same colour for a node name across the
whole page), failed requests (traffic.ok() False) in red on top; vertical lines for the fault
and the heal, dotted lines for VRRP transitions, and a shaded band from each reserved-IP move's
start to its completion (a move never completed runs to the end of the window).

Input contract (what the drill passes; a missing key raises TimelineInputError naming it, all
problems at once):

    render_html(report: dict, runs: list[dict], out: Path) -> Path

    report: the drill report. Required top-level keys: "profile", "api_action_s",
        "api_latency_s", "runs" (runs per scenario), "passed", "scenarios"; each scenario
        {"name", "passed", "failed", "requests", "ip_moves", "limits", "failover_s" (optional,
        may be None)}, "limits" being {name: {"limit": x, "got": y, "ok": bool}}. Other keys are
        ignored; "keepalived" (the version) is shown when present.
    runs: one dict per scenario run: {"scenario": a name in report["scenarios"], "run": int,
        "t0": epoch float (start of the window), "t1": epoch float (end), "records": [traffic
        records], "events": [{"t": epoch, "kind": one of EVENT_KINDS, "node": str | None,
        "label": str}]}. A scenario without runs (a pass/fail check with no traffic) gets a row
        in the table and no picture.
    A traffic record is what tests/lab/traffic.py writes: {seq, t (epoch at send), dt, op,
        method, path, status, served_by, version, error, ...}; only "t" is required here,
        "served_by" and what traffic.ok() reads are taken when present. Records sent outside
        [t0, t1) are not drawn.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Figure, not pyplot: no global figure registry and no backend switch, so rendering from the
# drill (or from threads) leaves no state behind. Figure.savefig to PNG uses Agg.
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from tests.lab import traffic

BUCKET_S = 0.1
BUCKET_SLACK_S = 1e-5
# Three runs (the drill's default) stacked keep a scenario's PNG near 100 kB.
MAX_RUNS_DRAWN = 3
EVENT_KINDS = ("fault", "heal", "vrrp", "ip_move_start", "ip_move", "note")
REPORT_KEYS = ("profile", "api_action_s", "api_latency_s", "runs", "passed", "scenarios")
SCENARIO_KEYS = ("name", "passed", "failed", "requests", "ip_moves", "limits")
LIMIT_KEYS = ("limit", "got", "ok")
RUN_KEYS = ("scenario", "run", "t0", "t1", "records", "events")
EVENT_KEYS = ("t", "kind", "label")
# How many problems one error lists: enough to see a pattern, short enough to read.
MAX_PROBLEMS = 20

FAILED_COLOUR = "#d62728"
UNKNOWN_NODE = "unknown"  # an answer without X-Served-By
# The pair's colours never change between reports; workers and other names take the next free
# colour in sorted order. None of them is red, which means "failed".
NODE_COLOURS = {"primary": "#1f77b4", "standby": "#2ca02c", UNKNOWN_NODE: "#7f7f7f"}
EXTRA_COLOURS = ("#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#bcbd22", "#e377c2", "#aec7e8", "#98df8a")
MOVE_COLOUR = "#9467bd"
# Event labels: rows of text above the bars; one 7-pt character is about this fraction of the
# axes' width (an 11-inch figure at 90 dpi), enough to tell whether two labels would overlap.
LABEL_ROWS = 4
LABEL_CHAR_FRAC = 0.0068


class TimelineInputError(ValueError):
    """The report or the runs do not follow the contract in this module's docstring."""


# --- input checks -------------------------------------------------------------------------------

def _missing(obj: Any, keys: Iterable[str], where: str) -> list[str]:
    if not isinstance(obj, Mapping):
        return [f"{where}: expected an object, got {type(obj).__name__}"]
    return [f"{where}: missing key {k!r}" for k in keys if k not in obj]


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(report: Any, runs: Any) -> None:
    """Raise TimelineInputError listing every way `report` and `runs` break the contract."""
    problems = _missing(report, REPORT_KEYS, "report")
    names: set[str] = set()
    scenarios = report.get("scenarios") if isinstance(report, Mapping) else None
    if scenarios is not None and not isinstance(scenarios, list):
        problems.append(f"report: 'scenarios' must be a list, got {type(scenarios).__name__}")
    for i, s in enumerate(scenarios if isinstance(scenarios, list) else []):
        where = f"report.scenarios[{i}]" + (f" ({s['name']})" if isinstance(s, Mapping) and "name" in s else "")
        problems += _missing(s, SCENARIO_KEYS, where)
        if not isinstance(s, Mapping):
            continue
        names.add(str(s.get("name")))
        limits = s.get("limits", {})
        if not isinstance(limits, Mapping):
            problems.append(f"{where}: 'limits' must be an object {{name: {{limit, got, ok}}}}")
            continue
        for lname, lim in limits.items():
            problems += _missing(lim, LIMIT_KEYS, f"{where}.limits[{lname!r}]")
    if not isinstance(runs, list):
        problems.append(f"runs: expected a list of runs, got {type(runs).__name__}")
        runs = []
    for i, run in enumerate(runs):
        where = f"runs[{i}]"
        problems += _missing(run, RUN_KEYS, where)
        if not isinstance(run, Mapping):
            continue
        if "scenario" in run and names and run["scenario"] not in names:
            problems.append(f"{where}: scenario {run['scenario']!r} is not in report.scenarios "
                            f"(valid: {', '.join(sorted(names))})")
        t0, t1 = run.get("t0"), run.get("t1")
        for key, val in (("t0", t0), ("t1", t1)):
            if key in run and not _is_number(val):
                problems.append(f"{where}: {key!r} must be an epoch time in seconds, got {val!r}")
        if _is_number(t0) and _is_number(t1) and t1 <= t0:
            problems.append(f"{where}: 't1' ({t1}) must be after 't0' ({t0})")
        for key in ("records", "events"):
            if key in run and not isinstance(run[key], list):
                problems.append(f"{where}: {key!r} must be a list, got {type(run[key]).__name__}")
        for j, rec in enumerate(run.get("records") if isinstance(run.get("records"), list) else []):
            problems += _missing(rec, ("t",), f"{where}.records[{j}]")
            if isinstance(rec, Mapping) and "t" in rec and not _is_number(rec["t"]):
                problems.append(f"{where}.records[{j}]: 't' must be an epoch time in seconds, got {rec['t']!r}")
        for j, ev in enumerate(run.get("events") if isinstance(run.get("events"), list) else []):
            ew = f"{where}.events[{j}]"
            problems += _missing(ev, EVENT_KEYS, ew)
            if isinstance(ev, Mapping) and "t" in ev and not _is_number(ev["t"]):
                problems.append(f"{ew}: 't' must be an epoch time in seconds, got {ev['t']!r}")
            if isinstance(ev, Mapping) and "kind" in ev and ev["kind"] not in EVENT_KINDS:
                problems.append(f"{ew}: 'kind' {ev['kind']!r} is not one of {', '.join(EVENT_KINDS)}")
    if problems:
        shown = problems[:MAX_PROBLEMS]
        more = len(problems) - len(shown)
        raise TimelineInputError("drill timeline input does not follow the contract in tests/lab/timeline.py:\n  "
                                 + "\n  ".join(shown) + (f"\n  ... and {more} more" if more else ""))


# --- pure data for the picture --------------------------------------------------------------------

def node_colours(names: Iterable[str]) -> dict[str, str]:
    """A colour per node name: the pair's are fixed, others take EXTRA_COLOURS in sorted order."""
    colours = dict(NODE_COLOURS)
    extras = sorted(set(names) - set(colours))
    for i, name in enumerate(extras):
        colours[name] = EXTRA_COLOURS[i % len(EXTRA_COLOURS)]
    return colours


def served_by(record: Mapping[str, Any]) -> str:
    return record.get("served_by") or UNKNOWN_NODE


def buckets(records: Iterable[Mapping[str, Any]], t0: float, t1: float,
            bucket_s: float = BUCKET_S) -> tuple[int, dict[str, list[int]], list[int]]:
    """Count requests sent in [t0, t1) per `bucket_s` bucket.

    Returns (number of buckets, {node: successful answers per bucket}, failures per bucket).
    A failure counts once, in red, whoever served it: an error often has no node at all."""
    n = max(1, math.ceil((t1 - t0) / bucket_s))
    ok_by: dict[str, list[int]] = {}
    failures = [0] * n
    for r in records:
        if not t0 <= r["t"] < t1:
            continue
        # An epoch float carries ~0.2 us of noise, so t0 + 0.1 - t0 can come out as 0.09999976 and a
        # request sent on a bucket's edge would land in the bucket before; 10 us of slack absorbs it.
        i = min(n - 1, int((r["t"] - t0 + BUCKET_SLACK_S) / bucket_s))
        if traffic.ok(r):
            ok_by.setdefault(served_by(r), [0] * n)[i] += 1
        else:
            failures[i] += 1
    return n, ok_by, failures


def move_bands(events: Iterable[Mapping[str, Any]], t1: float) -> list[tuple[float, float, bool]]:
    """Reserved-IP moves as (start, end, completed), from "ip_move_start" to the next "ip_move".

    A completion without a start is a zero-width band at the completion; a start never
    completed runs to t1, so a stuck move shows as a band to the end of the window."""
    bands: list[tuple[float, float, bool]] = []
    start: float | None = None
    for ev in sorted(events, key=lambda e: e["t"]):
        if ev["kind"] == "ip_move_start":
            if start is not None:
                bands.append((start, ev["t"], False))
            start = ev["t"]
        elif ev["kind"] == "ip_move":
            bands.append((ev["t"] if start is None else start, ev["t"], True))
            start = None
    if start is not None:
        bands.append((start, t1, False))
    return bands


def run_counts(run: Mapping[str, Any]) -> tuple[int, int, int]:
    """(requests, failed, completed IP moves) of one run's window."""
    window = [r for r in run["records"] if run["t0"] <= r["t"] < run["t1"]]
    moves = sum(1 for e in run["events"] if e["kind"] == "ip_move")
    return len(window), len(traffic.failed(window)), moves


# --- drawing ----------------------------------------------------------------------------------------

def _fmt(x: Any, unit: str = "") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.2f}{unit}"
    return f"{x}{unit}"


def _event_text(ev: Mapping[str, Any]) -> str:
    label, node = str(ev["label"]), ev.get("node")
    # A VRRP transition reads "standby MASTER"; the drill may or may not put the node in the label.
    return f"{node} {label}" if node and node not in label else label


def label_rows(spans: list[tuple[float, float]], rows: int = LABEL_ROWS) -> list[int]:
    """A row for each label so that labels in one row do not overlap.

    `spans` are (start, end) as fractions of the axes' width, sorted by start. Each label takes
    the first row whose last label ends before it starts; when no row is free (a burst of VRRP
    flaps), the row that frees up first, so overlaps are spread out rather than piled up."""
    ends = [-1.0] * rows
    out = []
    for start, end in spans:
        free = [i for i in range(rows) if ends[i] < start]
        row = free[0] if free else min(range(rows), key=ends.__getitem__)
        ends[row] = end
        out.append(row)
    return out


def _draw_run(ax: Any, run: Mapping[str, Any], colours: Mapping[str, str]) -> None:
    t0, t1 = run["t0"], run["t1"]
    n, ok_by, failures = buckets(run["records"], t0, t1)
    # Stacked bars drawn as one filled step outline per series (stairs with the series below as
    # baseline): it looks the same as a bar per bucket, and a 5-minute window is 3,000 buckets.
    edges = [i * BUCKET_S for i in range(n + 1)]
    bottom = [0] * n
    series = [(ok_by[node], colours[node]) for node in sorted(ok_by, key=lambda name: (name not in NODE_COLOURS, name))]
    if any(failures):
        series.append((failures, FAILED_COLOUR))
    for counts, colour in series:
        top_of = [b + c for b, c in zip(bottom, counts, strict=True)]
        ax.stairs(top_of, edges, baseline=bottom, fill=True, color=colour, linewidth=0, zorder=2)
        bottom = top_of
    top = max(bottom) if any(bottom) else 1
    # The bars fill the lower ~55 %; the event labels sit in rows above them.
    ax.set_ylim(0, top * 1.8 + 1)
    ax.set_xlim(0, t1 - t0)
    if not run["records"]:
        ax.text(0.5, 0.3, "no requests recorded", transform=ax.transAxes, ha="center", va="center", color="#555")

    labels: list[tuple[float, str, str]] = []
    for start, end, completed in move_bands(run["events"], t1):
        s, e = max(start, t0) - t0, min(end, t1) - t0
        # Under the bars (zorder 1 < 2): the band marks the time, the bars keep their true colours.
        ax.axvspan(s, max(e, s + BUCKET_S / 2), color=MOVE_COLOUR, alpha=0.22, linewidth=0, zorder=1)
        labels.append((s, f"IP move {end - start:.2f} s" if completed else "IP move not completed", MOVE_COLOUR))

    for ev in sorted(run["events"], key=lambda e: e["t"]):
        kind, x = ev["kind"], ev["t"] - t0
        if kind in ("ip_move_start", "ip_move") or not 0 <= x <= t1 - t0:
            continue
        if kind in ("fault", "heal"):
            ax.axvline(x, color="black", linewidth=1.6, linestyle="-" if kind == "fault" else "--", zorder=3)
            labels.append((x, f"{kind}: {_event_text(ev)}", "black"))
        elif kind == "vrrp":
            colour = colours.get(ev.get("node") or "", "#444")
            ax.axvline(x, color=colour, linewidth=1.4, linestyle=":", zorder=3)
            labels.append((x, _event_text(ev), colour))
        else:  # note
            ax.axvline(x, color="#999", linewidth=0.8, linestyle="-.", zorder=3)
            labels.append((x, _event_text(ev), "#555"))
    _place_labels(ax, labels, t1 - t0)

    requests, failed, moves = run_counts(run)
    ax.set_title(f"{run['scenario']} run {run['run']}: {failed}/{requests} failed, {moves} IP move(s)",
                 fontsize=10, loc="left", color=FAILED_COLOUR if failed else "black")
    ax.set_ylabel(f"requests / {int(BUCKET_S * 1000)} ms")
    ax.grid(axis="y", alpha=0.3, zorder=0)


def _place_labels(ax: Any, labels: list[tuple[float, str, str]], width_s: float) -> None:
    """Horizontal labels beside their markers, in rows (label_rows) so close events stay readable."""
    placed = []
    for x, text, colour in labels:
        frac, w = x / width_s, len(text) * LABEL_CHAR_FRAC + 0.01
        # A label that would run off the right edge goes to the left of its marker instead.
        span, ha = ((frac - w, frac), "right") if frac + w > 1 else ((frac, frac + w), "left")
        placed.append((span, frac, text, colour, ha))
    placed.sort(key=lambda p: p[0])
    for (_, frac, text, colour, ha), row in zip(placed, label_rows([p[0] for p in placed]), strict=True):
        ax.text(frac + (0.003 if ha == "left" else -0.003), 0.96 - row * 0.1, text, transform=ax.transAxes,
                ha=ha, va="top", fontsize=7, color=colour, zorder=4,
                bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0, "pad": 1})


def _legend_handles(runs: list[Mapping[str, Any]], colours: Mapping[str, str]) -> list[Any]:
    nodes = {served_by(r) for run in runs for r in run["records"]
             if run["t0"] <= r["t"] < run["t1"] and traffic.ok(r)}
    kinds = {e["kind"] for run in runs for e in run["events"]}
    handles: list[Any] = [Patch(color=colours[n], label=f"served by {n}")
                          for n in sorted(nodes, key=lambda name: (name not in NODE_COLOURS, name))]
    handles.append(Patch(color=FAILED_COLOUR, label="failed"))
    if "fault" in kinds:
        handles.append(Line2D([], [], color="black", linewidth=1.6, label="fault"))
    if "heal" in kinds:
        handles.append(Line2D([], [], color="black", linewidth=1.6, linestyle="--", label="heal"))
    if "vrrp" in kinds:
        handles.append(Line2D([], [], color="#444", linewidth=1.2, linestyle=":", label="VRRP transition"))
    if kinds & {"ip_move_start", "ip_move"}:
        handles.append(Patch(color=MOVE_COLOUR, alpha=0.3, label="reserved-IP move"))
    if "note" in kinds:
        handles.append(Line2D([], [], color="#999", linewidth=0.8, linestyle="-.", label="note"))
    return handles


def scenario_png(scenario: Mapping[str, Any], runs: list[Mapping[str, Any]], colours: Mapping[str, str]) -> bytes:
    """One PNG for a scenario: its runs stacked, sharing the time axis."""
    fig = Figure(figsize=(11, 0.9 + 2.3 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False)[:, 0]
    for ax, run in zip(axes, runs, strict=True):
        _draw_run(ax, run, colours)
    axes[-1].set_xlabel("seconds since the start of the run's window (t0)")
    verdict = "PASSED" if scenario["passed"] else "FAILED"
    failover = scenario.get("failover_s")
    fig.suptitle(f"{scenario['name']}: {verdict}, {scenario['failed']}/{scenario['requests']} failed, "
                 f"{scenario['ip_moves']} IP move(s)" + ("" if failover is None else f", failover {_fmt(failover, ' s')}"),
                 fontsize=12, color="black" if scenario["passed"] else FAILED_COLOUR)
    fig.legend(handles=_legend_handles(runs, colours), loc="outside right upper", fontsize=8, frameon=False)
    buf = io.BytesIO()
    # No "Software" stamp: the same report draws the same bytes whatever matplotlib built it.
    fig.savefig(buf, format="png", dpi=90, metadata={"Software": None})
    return buf.getvalue()


# --- HTML -------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.failed td { background: #fde2e2; }
.bad { color: #b00; font-weight: bold; }
.ok { color: #2a7a2a; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _anchor(name: str) -> str:
    return "s-" + "".join(c if c.isalnum() else "-" for c in name)


def _limits_cell(limits: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for name, lim in limits.items():
        cls, mark = ("ok", "ok") if lim["ok"] else ("bad", "not met")
        parts.append(f'<span class="{cls}">{_esc(name)} {_esc(_fmt(lim["got"]))} '
                     f'(limit {_esc(_fmt(lim["limit"]))}, {mark})</span>')
    return "<br>".join(parts) or "-"


def summary_table(report: Mapping[str, Any], drawn: set[str]) -> str:
    rows = ["<tr><th>scenario</th><th>result</th><th>failover_s</th><th>requests</th><th>failed</th>"
            "<th>IP moves</th><th>limits</th></tr>"]
    for s in report["scenarios"]:
        name = str(s["name"])
        link = f'<a href="#{_anchor(name)}">{_esc(name)}</a>' if name in drawn else _esc(name)
        result = '<span class="ok">passed</span>' if s["passed"] else '<span class="bad">FAILED</span>'
        rows.append(f'<tr class="{"passed" if s["passed"] else "failed"}"><td>{link}</td><td>{result}</td>'
                    f'<td class="num">{_esc(_fmt(s.get("failover_s")))}</td><td class="num">{_esc(s["requests"])}</td>'
                    f'<td class="num">{_esc(s["failed"])}</td><td class="num">{_esc(s["ip_moves"])}</td>'
                    f'<td>{_limits_cell(s["limits"])}</td></tr>')
    return "<table>\n" + "\n".join(rows) + "\n</table>"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def render_html(report: dict, runs: list[dict], out: Path) -> Path:
    """Write the self-contained HTML report of `report` and its `runs` to `out`; return `out`."""
    validate(report, runs)
    out = Path(out)
    colours = node_colours(served_by(r) for run in runs for r in run["records"])
    by_scenario: dict[str, list[dict]] = {}
    for run in runs:
        by_scenario.setdefault(run["scenario"], []).append(run)
    verdict = '<span class="ok">PASSED</span>' if report["passed"] else '<span class="bad">FAILED</span>'
    facts = [f"profile {_esc(report['profile'])}", f"{_esc(report['runs'])} run(s) per scenario",
             f"API action time {_esc(_fmt(report['api_action_s'], ' s'))}",
             f"API latency {_esc(_fmt(report['api_latency_s'], ' s'))}"]
    if "keepalived" in report:
        facts.insert(0, f"keepalived {_esc(report['keepalived'])}")
    first = min((run["t0"] for run in runs), default=None)
    if first is not None:
        facts.append(f"started {_esc(_when(first))}")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>minitwit-ha drill report</title>", f"<style>{STYLE}</style></head><body>",
        f"<h1>Drill report: {verdict}</h1>", f"<p>{'; '.join(facts)}.</p>",
        summary_table(report, set(by_scenario)),
    ]
    for s in report["scenarios"]:
        name = str(s["name"])
        s_runs = sorted(by_scenario.get(name, []), key=lambda r: r["run"])
        if not s_runs:
            continue
        drawn = s_runs[:MAX_RUNS_DRAWN]
        png = base64.b64encode(scenario_png(s, drawn, colours)).decode("ascii")
        note = (f" Runs {', '.join(str(r['run']) for r in s_runs[MAX_RUNS_DRAWN:])} are not drawn."
                if len(s_runs) > len(drawn) else "")
        parts += [
            f'<section id="{_anchor(name)}"><h2>{_esc(name)}</h2><figure>',
            f'<img src="data:image/png;base64,{png}" alt="timeline of {_esc(name)}: requests per 100 ms by serving '
            f'node, failures in red, fault, VRRP and reserved-IP move markers">',
            f"<figcaption>{len(drawn)} of {len(s_runs)} run(s); run {drawn[0]['run']} window starts "
            f"{_esc(_when(drawn[0]['t0']))}.{_esc(note)}</figcaption></figure></section>",
        ]
    parts.append("</body></html>\n")
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.lab.timeline", description=__doc__.splitlines()[0])
    ap.add_argument("--report", required=True, type=Path, help="the drill report JSON (drill-report.json)")
    ap.add_argument("--runs", required=True, type=Path, help="JSON list of the runs (see the module docstring)")
    ap.add_argument("--out", default=Path("drill-report.html"), type=Path, help="HTML file to write")
    args = ap.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
        runs = json.loads(args.runs.read_text())
        print(render_html(report, runs, args.out))
    except (OSError, json.JSONDecodeError, TimelineInputError) as exc:
        print(f"timeline: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
