"""The failover drill: inject each fault under steady traffic and measure what a client sees.

The fake DigitalOcean API runs with realistic timing by default (an assign stays in-progress
5 s before the reserved IP moves, +0.3 s per request; `--api ideal` for the instant API), and
the traffic generator gives up on a request after 0.3 s and never retries, like the course's
load generator. Per scenario the report has:

- `failover_s`: time from the fault to the first 2xx served by the other node through the
  reserved IP, median over the runs (`None` when the other node never had to serve). For
  `split-brain` and `restart-both` it is the time from the heal / restart until exactly one
  MASTER holds the reserved IP.
- `ip_moves`: assign actions that completed and moved the IP during the run (the fake API's own
  record), the most in any run; `ip_moves_after_heal` the same, counted from the heal.
- `detection_s` / `action_s` (node-down): fault to the new holder's assign request, and that
  request to the move's completion.
- `failed`: client requests that failed (non-2xx, refused, reset or past 0.3 s), all runs.
- `rows_lost`: writes the app acknowledged (204) that the shared database does not have.
- `limits`: every limit the scenario must meet, with what it got; `passed` is all of them.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.lab import traffic
from tests.lab.lab import NODES, Lab, LabError, wait_for

SCENARIOS = ("app-crash", "keepalived-stop", "node-down", "split-brain", "api-flaky", "restart-both",
             "vpc-partition", "node-freeze", "db-outage", "haproxy-crash")
# The fault each failover scenario injects on the active node. api-flaky: the node stops serving
# (HAProxy dies) while the API answers 500, 429 and 422 to the first assigns.
FAULT_OF = {"app-crash": "app", "keepalived-stop": "keepalived", "node-down": "link", "api-flaky": "haproxy",
            "haproxy-crash": "haproxy"}
CUT_S = 10.0             # split-brain / vpc-partition: how long the VPC between the nodes is cut
FREEZE_S = 1.0           # node-freeze: how long every process of the active node is stopped
DB_OUTAGE_S = 10.0       # db-outage: how long the shared database refuses connections
RATE = 50
CLIENT_TIMEOUT_S = 0.3   # the course's load generator: gives up after 0.3 s, never retries
BAD_LOG_LINES = ("unsafe permissions", "SECURITY VIOLATION", "disabling")


# Limits on what the observers measured (tests/lab/scenarios_observe.py); a lab without them (the
# twins) is judged on the rest.
OBSERVER_LIMITS = ("metrics_moves_off", "master_alerts_off")


def limits_for(name: str, action_s: float) -> dict[str, float]:
    """What each scenario must meet, given the API's action time. Keys: `failover_s` (median, at
    most), `ip_moves` / `ip_moves_after_heal` (any run, at most), `failed` (all runs, at most),
    `failed_outside_fault` (requests sent outside the fault window that failed, at most),
    `detection_s` (median, at most); from the observers: `metrics_moves_off` (|moves Prometheus
    counted - moves the API made|, any run) and `master_alerts_off` (|"became MASTER" alerts - 1 if
    the IP moved else 0|, any run)."""
    fail_over = action_s + 1.5   # detection (~0.7 s) + the API's requests (2 x 0.3 s) + the action
    # What the operator sees must match (tests/lab/scenarios_observe.py): Prometheus counts exactly
    # the moves the API made, and a fault that moves the IP sends exactly one "became MASTER" alert
    # (none when the IP stays).
    seen = dict.fromkeys(OBSERVER_LIMITS[:1], 0)
    seen_fault = dict.fromkeys(OBSERVER_LIMITS, 0)
    limits = {
        # HAProxy answers from the peer's app and the IP stays where it is; the only request that may
        # fail is a write the app held at the instant it died (never resent: it may be stored).
        "app-crash": {"failed_outside_fault": 0, "ip_moves": 0},
        # The node cannot serve at all: the IP moves once, failures bounded like node-down.
        "haproxy-crash": {"failover_s": fail_over, "ip_moves": 1},
        # The stopped node still serves until the move completes: nothing may fail.
        "keepalived-stop": {"ip_moves": 1, "failed": 0},
        "node-down": {"failover_s": fail_over, "ip_moves": 1, "detection_s": 2.0},
        "api-flaky": {"failover_s": action_s + 5.0, "ip_moves": 1},
        "split-brain": {"failover_s": 3.0, "ip_moves": 1, "ip_moves_after_heal": 0, "failed": 0},
        "restart-both": {"failover_s": 3.0, "ip_moves": 1, "ip_moves_after_heal": 0},
        "vpc-partition": {"ip_moves": 1, "ip_moves_after_heal": 0, "failed": 0},
        "node-freeze": {"ip_moves": 0, "failed_outside_fault": 0},
        "db-outage": {"ip_moves": 0},
    }.get(name, {})
    if name in FAULT_OF:
        return {**limits, **seen_fault}
    return {**limits, **seen} if name in SCENARIOS else limits


# More scenarios live in their own modules (rolling updates, hardening) and register here:
# name -> fn(lab, workdir, runs) -> report entry (a dict with at least "name" and "passed").
EXTRA_SCENARIOS: dict[str, Callable[[Lab, Path, int], dict]] = {}
EXTRA_MODULES = ("tests.lab.scenarios_rollout", "tests.lab.scenarios_hardening", "tests.lab.scenarios_observe",
                 "tests.lab.scenarios_reboot", "tests.lab.scenarios_workers",
                 "tests.lab.scenarios_workers_rollout",
                 "tests.lab.scenarios_throughput", "tests.lab.scenarios_replace")
# IP moves each extra scenario may cost (the drill counts them around the call).
EXTRA_MOVE_LIMITS = {"rogue-vrrp": 0, "ssh-from-outside": 0, "http-open": 0, "planned-switchover": 1,
                     "metrics-ports": 0, "pairctl-status": 0, "token-revoked": 0,
                     "holder-reboot": 1, "standby-reboot": 0,
                     "rolling-update": 0, "rolling-update-bad-version": 0, "serve-both": 0,
                     "workers": 0, "rolling-update-workers": 0, "node-down-workers": 1, "throughput": 0,
                     "replace-standby": 1}
# Observers add numbers to every failover scenario's runs (tests/lab/scenarios_observe.py: the
# alerts the webhook sink received, the IP moves Prometheus counted): fn(lab, scenario, t_fault,
# ip_moves) -> {key: int or None}. The summary keeps each key's most in any run, and `<key>_runs`.
RUN_OBSERVERS: list[Callable[[Lab, str, float, int], dict]] = []


def scenario(name: str):
    """Decorator for scenario modules: register `fn` under `name`."""
    def register(fn: Callable[[Lab, Path, int], dict]) -> Callable[[Lab, Path, int], dict]:
        EXTRA_SCENARIOS[name] = fn
        return fn
    return register


def load_extra_scenarios() -> list[str]:
    for module in EXTRA_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return list(EXTRA_SCENARIOS)


def peer(node: str) -> str:
    return "standby" if node == "primary" else "primary"


@dataclass
class RunResult:
    failover_s: float | None
    requests: int
    failed: int
    holder_after: str | None
    single_master: bool
    rows_lost: int
    ip_moves: int = 0
    ip_moves_after_heal: int = 0
    failed_outside_fault: int = 0
    detection_s: float | None = None
    action_s: float | None = None
    notes: list[str] = field(default_factory=list)
    timeline: dict = field(default_factory=dict)
    observed: dict = field(default_factory=dict)


class Traffic:
    """The traffic generator, running in the client namespace, recording to a JSONL file."""

    def __init__(self, lab: Lab, out: Path, rate: float = RATE) -> None:
        self.lab, self.out, self.rate = lab, out, rate
        self.key = f"traffic-{out.stem}"

    def start(self) -> Traffic:
        self.lab.spawn(self.key, "client", [
            sys.executable, "-m", "tests.lab.traffic", "--url", f"http://{self.lab.reserved_ip}", "--rate", str(self.rate),
            "--duration", "0", "--out", str(self.out), "--timeout", str(CLIENT_TIMEOUT_S), "--run-id", self.out.stem,
        ])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if sum(1 for r in self.records() if traffic.ok(r) and r.get("op") != "register") >= 10:
                return self
            time.sleep(0.1)
        raise LabError(f"traffic did not get going through {self.lab.reserved_ip} (see {self.out})")

    def records(self) -> list[dict]:
        return traffic.load(self.out) if self.out.exists() else []

    def stop(self) -> list[dict]:
        """Stop the generator; its records of the requests (the user's registration left out)."""
        self.lab.stop(self.key, timeout=15)
        return [r for r in self.records() if r.get("op") != "register"]


def first_answer_by(records: list[dict], node: str, after: float) -> float | None:
    """Arrival time of the first 2xx served by `node` for a request sent after `after`. Sent, not
    arrived: with app workers the old holder's HAProxy balances over the peer's app too, and an
    answer it relayed from there just after the fault is no failover (node-down-workers measured
    0.002 s so)."""
    times = [r["t"] + r["dt"] for r in records
             if traffic.ok(r) and r.get("served_by") == node and r["t"] > after]
    return min(times) if times else None


def settle_time(lab: Lab, since_wall: float, timeout: float = 15.0) -> float | None:
    """Seconds from `since_wall` until exactly one MASTER holds the reserved IP (and stays so 0.5 s)."""
    deadline = time.monotonic() + timeout
    first_ok = None
    while time.monotonic() < deadline:
        masters = lab.masters()
        ok = len(masters) == 1 and lab.holder() == masters[0]
        now = time.time()
        if ok and first_ok is None:
            first_ok = now
        elif not ok:
            first_ok = None
        if first_ok is not None and now - first_ok >= 0.5:
            return first_ok - since_wall
        time.sleep(0.05)
    return None


def rows_lost(lab: Lab, records: list[dict]) -> int:
    acked = traffic.acked_writes(records)
    if not acked:
        return 0
    lost, _missing = traffic.rows_lost(acked, lab.db_admin_uri())
    return lost


def duplicate_rows(lab: Lab) -> int:
    """Messages stored more than once: a write that a proxy resent after the app had done it."""
    return traffic.duplicate_rows(lab.db_admin_uri())


class Marks:
    """What the drill did and when, for the timeline: faults, heals and notes."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, kind: str, label: str, node: str | None = None) -> float:
        now = time.time()
        self.events.append({"t": now, "kind": kind, "node": node, "label": label})
        return now


def timeline_events(lab: Lab, marks: Marks, t0: float, t1: float) -> list[dict]:
    """The drill's own marks plus the nodes' VRRP transitions and the API's IP moves in [t0, t1]."""
    events = list(marks.events)
    events += [{"t": e["t"], "kind": "vrrp", "node": e["node"], "label": f"{e['node']} {e['to']}"}
               for e in lab.transition_log(t0, t1)]
    for move in lab.moves(t0, t1):
        events.append({"t": move["requested"], "kind": "ip_move_start", "node": move["to"],
                       "label": f"assign to {move['to']} accepted"})
        events.append({"t": move["t"], "kind": "ip_move", "node": move["to"], "label": f"IP moved to {move['to']}"})
    return sorted(events, key=lambda e: e["t"])


def run_once(lab: Lab, scenario: str, workdir: Path, index: int) -> RunResult:
    active = lab.wait_pair_ready(timeout=30)
    other = peer(active)
    gen = Traffic(lab, workdir / f"{scenario}-{index}.jsonl").start()
    marks = Marks()
    t0 = time.time()
    time.sleep(1.0)
    notes: list[str] = []
    failover_s = None
    t_heal = None
    fault_window = None
    t_fault = t_killed = time.time()
    try:
        if scenario in FAULT_OF:
            if scenario == "api-flaky":
                lab.fault(active, "api", count=3)
            t_fault = marks("fault", f"{FAULT_OF[scenario]} fault on {active}", active)
            lab.fault(active, FAULT_OF[scenario])
            t_killed = time.time()
            waited = wait_for(lambda: first_answer_by(gen.records(), other, t_fault) is not None, 15)
            if waited is None:
                notes.append(f"no answer from {other} within 15 s")
            else:
                failover_s = first_answer_by(gen.records(), other, t_fault) - t_fault
            time.sleep(1.0)
            t_heal = marks("heal", f"heal {active}", active)
            lab.heal(active, FAULT_OF[scenario])
            if scenario == "api-flaky":
                lab.heal(active, "api")
        elif scenario in ("split-brain", "vpc-partition"):
            t_fault = marks("fault", f"VPC cut for {CUT_S:g} s")
            lab.fault(active, "vpc")
            both = wait_for(lambda: len(lab.masters()) == 2, 5)
            notes.append("both nodes MASTER during the cut" if both is not None else "no split brain formed")
            time.sleep(max(0.0, CUT_S - (time.time() - t_fault)))
            t_heal = marks("heal", "VPC healed")
            lab.heal(active, "vpc")
            if scenario == "split-brain":
                failover_s = settle_time(lab, t_heal)
            else:
                time.sleep(3.0)
        elif scenario == "restart-both":
            # Both at once, as a package upgrade on both nodes would: one stopping first would be a
            # plain keepalived-stop failover of its own.
            procs = lab.procs()
            for node in NODES:  # SIGTERM to both first, then wait for each (and forget it)
                proc = procs.get(f"{node}-keepalived")
                if proc is not None and proc.alive():
                    os.kill(proc.pid, signal.SIGTERM)
            for node in NODES:
                lab.fault(node, "keepalived")
            t_fault = t_heal = marks("fault", "keepalived restarted on both nodes")
            for node in NODES:
                lab.heal(node, "keepalived")
            failover_s = settle_time(lab, t_heal)
        elif scenario == "node-freeze":
            t_fault = marks("fault", f"every process of {active} stopped for {FREEZE_S:g} s", active)
            lab.fault(active, "freeze")
            time.sleep(FREEZE_S)
            t_heal = marks("heal", f"{active} resumed", active)
            lab.heal(active, "freeze")
            # A request sent while the node was stopped may fail (0.3 s); one sent after must not.
            fault_window = (t_fault - CLIENT_TIMEOUT_S, t_heal)
            time.sleep(3.0)
        elif scenario == "db-outage":
            t_fault = marks("fault", f"database refuses connections for {DB_OUTAGE_S:g} s")
            lab.fault(active, "db")
            masters_seen = []
            while time.time() - t_fault < DB_OUTAGE_S:
                masters_seen.append(len(lab.masters()))
                time.sleep(0.1)
            t_heal = marks("heal", "database back")
            lab.heal(active, "db")
            fault_window = (t_fault - CLIENT_TIMEOUT_S, t_heal + 2.0)  # the app's pool reconnects
            if any(n != 1 for n in masters_seen):
                notes.append(f"MASTER count during the outage was {sorted(set(masters_seen))}, not always 1")
            time.sleep(2.0)
        else:
            raise LabError(f"unknown scenario {scenario}")
        time.sleep(1.0)
    finally:
        window = gen.stop()
    t1 = time.time()
    try:
        now_active = lab.wait_steady(timeout=30)
    except LabError as exc:
        now_active = None
        notes.append(str(exc))
    masters = lab.masters()
    moves = lab.moves(t_fault, time.time())
    failed = traffic.failed(window)
    outside = [r for r in failed if fault_window and not fault_window[0] <= r["t"] <= fault_window[1]]
    if scenario == "app-crash":
        # A write the app was working on when it was killed may have been stored: HAProxy must not
        # resend it (a duplicate), so it fails. Any other failure is one HAProxy should have saved.
        outside = traffic.failed_except_writes_in_flight(window, [(t_fault, t_killed)])
        fault_window = (t_fault, t_killed)
    if scenario == "db-outage" and any("not always 1" in n for n in notes):
        masters_ok = False
    else:
        masters_ok = len(masters) == 1 and now_active is not None
    observed: dict = {}
    for observer in RUN_OBSERVERS if lab.observed else ():
        observed.update(observer(lab, scenario, t_fault, len(moves)))
    detection_s = action_s = None
    if moves:
        detection_s, action_s = moves[0]["requested"] - t_fault, moves[0]["t"] - moves[0]["requested"]
    return RunResult(
        failover_s=failover_s, requests=len(window), failed=len(failed),
        holder_after=lab.holder(), single_master=masters_ok,
        rows_lost=rows_lost(lab, window), ip_moves=len(moves),
        # A move asked for after the heal: the pair moved the IP once the fault was gone.
        ip_moves_after_heal=len([m for m in moves if t_heal is not None and m["requested"] > t_heal]),
        failed_outside_fault=len(outside) if fault_window else len(failed),
        detection_s=detection_s, action_s=action_s, notes=notes,
        timeline={"scenario": scenario, "run": index, "t0": t0, "t1": t1, "records": window,
                  "events": timeline_events(lab, marks, t0, t1)},
        observed=observed,
    )


def steady_run(lab: Lab, workdir: Path, seconds: float) -> dict:
    """No spurious failover: steady traffic for `seconds`, no VRRP transition, no failed request."""
    active = lab.wait_pair_ready(timeout=30)
    before = lab.transitions()
    gen = Traffic(lab, workdir / "steady.jsonl").start()
    t0 = time.time()
    time.sleep(seconds)
    window = gen.stop()
    transitions = lab.transitions() - before
    failed = len(traffic.failed(window))
    moves = len(lab.moves(t0, time.time()))
    return {"name": "steady", "seconds": round(time.time() - t0, 1), "requests": len(window), "failed": failed,
            "transitions": transitions, "ip_moves": moves, "holder_after": lab.holder(), "active_before": active,
            "rows_lost": rows_lost(lab, window),
            "passed": transitions == 0 and failed == 0 and moves == 0}


def keepalived_version() -> str:
    out = subprocess.run(["keepalived", "--version"], capture_output=True, text=True)
    words = (out.stdout + out.stderr).split()
    return words[1].lstrip("v") if len(words) > 1 else "unknown"


def _median(values: list[float | None]) -> float | None:
    """The median when every run has a value, else None (a run that never got there fails it)."""
    if not values or any(v is None for v in values):
        return None
    return round(statistics.median(values), 3)


def summarize(name: str, runs: list[RunResult], action_s: float) -> dict:
    failover = [r.failover_s for r in runs]
    out = {
        "name": name,
        "failover_s": _median(failover),
        "runs_s": [None if v is None else round(v, 3) for v in failover],
        "requests": sum(r.requests for r in runs),
        "failed": sum(r.failed for r in runs),
        "ip_moves": max((r.ip_moves for r in runs), default=0),
        "ip_moves_runs": [r.ip_moves for r in runs],
        "ip_moves_after_heal": max((r.ip_moves_after_heal for r in runs), default=0),
        "failed_outside_fault": sum(r.failed_outside_fault for r in runs),
        "detection_s": _median([r.detection_s for r in runs]) if any(r.detection_s for r in runs) else None,
        "action_s": _median([r.action_s for r in runs]) if any(r.action_s for r in runs) else None,
        "holder_after": runs[-1].holder_after if runs else None,
        "single_master": all(r.single_master for r in runs),
        "rows_lost": sum(r.rows_lost for r in runs),
        "notes": sorted({n for r in runs for n in r.notes}),
    }
    for key in sorted({k for r in runs for k in r.observed}):
        values = [r.observed.get(key) for r in runs]
        out[key] = None if None in values else max(values)
        out[f"{key}_runs"] = values
    limits = limits_for(name, action_s)
    if not any(r.observed for r in runs):  # no Prometheus or webhook sink watched (the twins)
        limits = {k: v for k, v in limits.items() if k not in OBSERVER_LIMITS}
    if "failover_s" in limits:
        out["target_s"] = round(limits["failover_s"], 3)
    out["limits"] = check_limits(out, limits)
    out["passed"] = (all(v["ok"] for v in out["limits"].values()) and out["single_master"]
                     and out["rows_lost"] == 0 and all(r.holder_after is not None for r in runs))
    return out


def check_limits(entry: dict, limits: dict[str, float]) -> dict[str, dict]:
    """{limit name: {"limit", "got", "ok"}}: each value in `entry` must be at most its limit; a
    missing (None) value fails it (a failover that never happened has no time)."""
    out = {}
    for key, limit in limits.items():
        got = entry.get(key)
        out[key] = {"limit": round(limit, 3), "got": got, "ok": got is not None and got <= limit}
    return out


def run_extra(lab: Lab, name: str, workdir: Path) -> tuple[dict, list[dict]]:
    """Run a registered scenario once; count the IP moves around it and collect its traffic."""
    before = set(workdir.glob("*.jsonl"))
    lab.wait_pair_ready(timeout=30)  # no move still in flight from before is charged to this one
    t0 = time.time()
    entry = EXTRA_SCENARIOS[name](lab, workdir, 1)
    t1 = time.time()
    entry["ip_moves"] = len(lab.moves(t0, t1))
    entry.setdefault("limits", {})
    entry.setdefault("requests", 0)  # a check without traffic: no request sent, none failed
    entry.setdefault("failed", 0)
    if name in EXTRA_MOVE_LIMITS:
        entry["limits"] = {**entry.get("limits", {}),
                           **check_limits(entry, {"ip_moves": EXTRA_MOVE_LIMITS[name]})}
        entry["passed"] = entry["passed"] and all(v["ok"] for v in entry["limits"].values())
    runs = []
    for i, path in enumerate(sorted(set(workdir.glob("*.jsonl")) - before)):
        records = [r for r in traffic.load(path) if r.get("op") != "register"]
        if records:
            runs.append({"scenario": name, "run": i, "t0": min(r["t"] for r in records), "t1": t1,
                         "records": records, "events": timeline_events(lab, Marks(), t0, t1)})
    return entry, runs


def run_drill(profile: str = "fast", runs: int = 3, only: list[str] | None = None, steady_s: float = 0.0,
              lab: Lab | None = None, evidence: Path | None = None, api: str = "realistic",
              api_action_s: float | None = None, api_latency_s: float | None = None,
              timelines: list[dict] | None = None, serve: str = "active-standby") -> dict:
    """Bring the lab up (unless given one), run the scenarios, tear down, return the report.

    When anything fails and `evidence` is given, the lab's logs, traffic records and node state
    are copied there before the teardown, so the failure can be read afterwards. `timelines`, when
    given, receives one entry per scenario run for the picture (tests/lab/timeline.py)."""
    extras = load_extra_scenarios()
    chosen = [s for s in SCENARIOS if not only or s in only]
    chosen_extras = [s for s in extras if not only or s in only]
    unknown = set(only or []) - set(SCENARIOS) - set(extras) - {"steady"}
    if unknown:
        raise LabError(f"unknown scenario(s) {sorted(unknown)}; use {', '.join([*SCENARIOS, *extras])} or steady")
    own = lab is None
    lab = lab or Lab()
    if own:
        lab.up(profile=profile, api=api, api_action_s=api_action_s, api_latency_s=api_latency_s, serve=serve)
    timing = lab.api_timing
    workdir = lab.drill_dir
    workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
    report = {"keepalived": lab.keepalived_version() if lab.twins else keepalived_version(), "twins": lab.twins,
              "profile": profile, "serve": lab.serve, "api": timing["preset"], "api_action_s": timing["action_s"],
              "api_latency_s": timing["latency_s"],
              "client_timeout_s": CLIENT_TIMEOUT_S, "rate_rps": RATE, "runs": runs, "scenarios": []}
    if lab.twins:
        report["stand_ins"] = lab.stand_ins()
    timelines = timelines if timelines is not None else []
    try:
        for name in chosen:
            results = [run_once(lab, name, workdir, i) for i in range(runs)]
            timelines += [r.timeline for r in results]
            report["scenarios"].append(summarize(name, results, timing["action_s"]))
            _progress(report["scenarios"][-1])
        for name in chosen_extras:
            # Failover scenarios run `runs` times (their time is a median); rollouts and the
            # hardening checks are pass/fail and run once.
            entry, extra_runs = run_extra(lab, name, workdir)
            timelines += extra_runs
            report["scenarios"].append(entry)
            print(f"  {name:<16} ip_moves {entry['ip_moves']} {'ok' if entry['passed'] else 'FAILED'}",
                  file=sys.stderr, flush=True)
        if steady_s > 0 and (not only or "steady" in only):
            report["steady"] = steady_run(lab, workdir, steady_s)
        report["duplicate_rows"] = duplicate_rows(lab)
        logs = {n: lab.keepalived_log(n) for n in NODES}
        bad = [f"{n}: {ln.strip()}" for n, text in logs.items() for ln in text.splitlines()
               if any(b in ln for b in BAD_LOG_LINES)]
        report["keepalived_log_clean"] = not bad
        report["keepalived_log_findings"] = bad[:20]
        report["secrets_audit"] = lab.audit_secrets({"drill report": json.dumps(report)})
        report["passed"] = (all(s["passed"] for s in report["scenarios"]) and not bad
                            and report["duplicate_rows"] == 0
                            and report["secrets_audit"]["clean"] and report.get("steady", {}).get("passed", True))
    finally:
        if evidence is not None and not report.get("passed"):
            report["evidence"] = str(lab.save_evidence(evidence))
        if own:
            lab.down()
    return report


def _progress(s: dict) -> None:
    print(f"  {s['name']:<16} failover {s['failover_s']}s (runs {s['runs_s']}) ip_moves {s['ip_moves_runs']} "
          f"failed {s['failed']}/{s['requests']} {'ok' if s['passed'] else 'FAILED'}", file=sys.stderr, flush=True)


def _limits_text(s: dict) -> str:
    bad = [f"{k} {v['got']} > {v['limit']}" for k, v in s.get("limits", {}).items() if not v["ok"]]
    return "; ".join(bad)


def table(report: dict) -> str:
    rows = [f"keepalived {report['keepalived']}, profile {report['profile']}, API {report.get('api', '?')} "
            f"(assign action {report['api_action_s']:g} s, +{report['api_latency_s']:g} s per request), "
            f"client timeout {report.get('client_timeout_s', '?')} s, median of {report['runs']} run(s)", "",
            f"{'scenario':<17}{'failover_s':>11}{'target':>8}{'ip_moves':>9}{'requests':>10}{'failed':>8}  "
            f"{'holder_after':<13}{'single_master':<15}{'rows_lost':>9}  result"]
    extras = []
    for s in report["scenarios"]:
        if "runs_s" not in s:
            extras.append(s)
            continue
        fs = "-" if s["failover_s"] is None else f"{s['failover_s']:.2f}"
        target = f"{s['target_s']:.1f}" if "target_s" in s else "-"
        rows.append(f"{s['name']:<17}{fs:>11}{target:>8}{s['ip_moves']:>9}{s['requests']:>10}{s['failed']:>8}  "
                    f"{str(s['holder_after']):<13}{str(s['single_master']):<15}{s['rows_lost']:>9}  "
                    f"{'pass' if s['passed'] else 'FAIL ' + _limits_text(s)}")
    node_down = next((s for s in report["scenarios"] if s["name"] == "node-down"), None)
    if node_down and node_down.get("detection_s") is not None:
        rows.append(f"node-down: detection {node_down['detection_s']:.2f} s + the API's action "
                    f"{node_down['action_s']:.2f} s")
    if extras:
        rows += ["", f"{'scenario':<28}{'requests':>10}{'failed':>8}{'ip_moves':>9}  result  details"]
        for s in extras:
            details = s.get("summary", "")
            rows.append(f"{s['name']:<28}{s.get('requests', '-'):>10}{s.get('failed', '-'):>8}"
                        f"{s.get('ip_moves', '-'):>9}  {'pass' if s['passed'] else 'FAIL':<6}  {details}")
    if "steady" in report:
        st = report["steady"]
        rows.append(f"{'steady':<17}{'':>11}{'':>8}{st['ip_moves']:>9}{st['requests']:>10}{st['failed']:>8}  "
                    f"{str(st['holder_after']):<13}{'transitions=' + str(st['transitions']):<15}"
                    f"{st['rows_lost']:>9}  {'pass' if st['passed'] else 'FAIL'}")
    rows.append("")
    if "duplicate_rows" in report:
        rows.append(f"duplicate rows (a write stored twice): {report['duplicate_rows']}")
    audit = report.get("secrets_audit")
    if audit:
        rows.append(f"secrets audit: {audit['files_scanned']} files scanned, "
                    + ("no secret outside its 0600 home" if audit["clean"] else
                       "FINDINGS: " + "; ".join(audit["findings"] + audit["homes_not_0600"])))
    rows.append("keepalived log: " + ("clean (no unsafe permissions, SECURITY VIOLATION or disabling lines)"
                                      if report["keepalived_log_clean"] else
                                      "FINDINGS: " + "; ".join(report["keepalived_log_findings"])))
    return "\n".join(rows)


def write_outputs(result: dict, timelines: list[dict], report: str) -> None:
    """drill-report.json, its timelines (for a redraw) and the picture, drill-report.html."""
    path = Path(report)
    path.write_text(json.dumps(result, indent=2) + "\n")
    runs_file = path.with_name(path.stem + "-timelines.json")
    runs_file.write_text(json.dumps(timelines) + "\n")
    try:
        from tests.lab.timeline import render_html
    except ImportError as exc:
        print(f"(no picture: {exc})", file=sys.stderr)
        return
    try:
        html = render_html(result, timelines, path.with_suffix(".html"))
    except ValueError as exc:  # the report stands without its picture; say why there is none
        print(f"(no picture: {exc})", file=sys.stderr)
        return
    print(f"timeline: {os.path.abspath(html)}")


def main_drill(profile: str, runs: int, report: str, only: list[str] | None, steady_s: float,
               api: str = "realistic", api_action_s: float | None = None,
               api_latency_s: float | None = None, serve: str = "active-standby", lab: Lab | None = None) -> int:
    """The drill's command; `lab`, when given, is one already up (the twins) that the caller tears down."""
    print(f"drill: profile {profile}, API {api}, {runs} run(s) per scenario ...", file=sys.stderr)
    timelines: list[dict] = []
    result = run_drill(profile=profile, runs=runs, only=only, steady_s=steady_s, api=api, serve=serve, lab=lab,
                       api_action_s=api_action_s, api_latency_s=api_latency_s, timelines=timelines,
                       evidence=Path(report).with_name(Path(report).stem + "-evidence"))
    print(table(result))
    print(f"\nreport: {os.path.abspath(report)}")
    write_outputs(result, timelines, report)
    if "evidence" in result:
        print(f"logs and node state of the failed run: {result['evidence']}")
    if profile != "fast":
        print(f"(profile {profile} is for comparison; the targets are the fast profile's)")
        return 0
    return 0 if result["passed"] else 1


def main_demo(profile: str = "fast", api: str = "realistic", api_action_s: float | None = None,
              api_latency_s: float | None = None, report: str = "drill-report.json",
              serve: str = "active-standby") -> int:
    print("demo: building the lab (namespaces, PostgreSQL, fake DigitalOcean API, two keepalived nodes) ...",
          file=sys.stderr)
    lab = Lab()
    lab.up(profile=profile, api=api, api_action_s=api_action_s, api_latency_s=api_latency_s, serve=serve)
    timelines: list[dict] = []
    try:
        lab.wait_pair_ready(timeout=30)  # both nodes settled: one MASTER serving, the other BACKUP
        print(json.dumps(lab.status(), indent=2))
        print("demo: one run of each failover scenario under 50 requests/s ...", file=sys.stderr)
        result = run_drill(profile=profile, runs=1, lab=lab, timelines=timelines)
        print(table(result))
    finally:
        lab.down()
        print("demo: lab torn down", file=sys.stderr)
    write_outputs(result, timelines, report)
    return 0 if result["passed"] else 1
