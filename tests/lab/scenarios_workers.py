"""Drill scenario for app workers (appWorkers, issue #14): the pair's HAProxy in front of more apps.

- `node-down-workers`: the core `node-down` run (drill.run_once) with two workers added: node-down's
  limits (drill.limits_for), each worker >= 20% of what the new holder's HAProxy serves after the IP
  moved, 0 failed from the move until the old holder is restored, and 0 failed after it (its app
  rejoins least connections as soon as HAProxy's TCP checks see it: it must serve at once).
- `workers`: two worker hosts added under traffic (what `appWorkers: 2` and `pulumi up` do: the
  hosts, then both nodes' haproxy.cfg re-rendered and reloaded hitlessly); each worker serves
  >= 20% of the requests through the reserved IP (least connections over four apps); then
  `worker-crash`: worker-1's app killed (SIGKILL) for CRASH_S and started again: 0 failed
  requests, 0 IP moves (HAProxy's retries and checks; keepalived never notices); then the workers
  removed again (HAProxy first, so no request reaches a vanishing host). 0 failed, 0 IP moves.

IP moves are counted by the drill around the scenario (drill.EXTRA_MOVE_LIMITS).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.lab import drill, traffic
from tests.lab.drill import Traffic, scenario
from tests.lab.lab import Lab

RATE = 60          # requests/s through the reserved IP (target: at least 50)
WORKERS = 2
MEASURE_S = 10.0   # how long each app's share is measured
MIN_SHARE = 0.20   # each worker's share of the requests through the reserved IP, at least
CRASH_S = 2.0      # how long the worker's app stays dead
# node-down-workers plays drill.run_once's node-down as run number RUN_INDEX: the core node-down's runs
# (0, 1, ...) write to the same database as user lab-node-down-<index> with contents
# lab-node-down-<index>-<seq>, so a run of its own keeps the duplicate and lost-row checks exact.
RUN_INDEX = 1000


@scenario("workers")
def workers(lab: Lab, workdir: Path, runs: int) -> dict:
    lab.wait_pair_ready(timeout=30)
    transitions_before = lab.transitions()
    gen = Traffic(lab, workdir / "workers.jsonl", rate=RATE).start()
    marks: dict[str, tuple[float, float]] = {}
    kills: list[tuple[float, float]] = []
    added = False
    try:
        time.sleep(1.0)
        t = time.time()
        names = lab.add_workers(WORKERS)
        added = True
        marks["add workers"] = (t, time.time() + 1.0)
        time.sleep(1.5)
        t = time.time()
        time.sleep(MEASURE_S)
        marks["measure"] = (t, time.time())
        t = time.time()
        lab.stop(f"{names[0]}-app", sig=signal.SIGKILL)
        kills.append((t, time.time()))
        time.sleep(CRASH_S)
        lab.start_worker_app(names[0])
        time.sleep(1.5)  # HAProxy's checks see it UP again (rise 2 x 200 ms)
        marks["worker-crash"] = (t, time.time())
        t = time.time()
        lab.remove_workers()
        added = False
        time.sleep(1.0)
        marks["remove workers"] = (t, time.time())
        time.sleep(1.0)
    finally:
        window = gen.stop()
        if added:
            lab.remove_workers()
    measured = [r for r in window if marks["measure"][0] <= r["t"] < marks["measure"][1]]
    counts = traffic.served_by_counts(measured, ok_only=True)
    shares = {n: round(counts.get(n, 0) / max(1, len(measured)), 3) for n in sorted(counts)}
    # A write the worker held at the instant it was killed fails by design (never resent): not counted.
    bad = traffic.failed_except_writes_in_flight(window, kills)
    failed_in = {name: len(traffic.failed(bad, since=a, until=b)) for name, (a, b) in marks.items()}
    span = max(r["t"] for r in window) - min(r["t"] for r in window)
    transitions = lab.transitions() - transitions_before
    checks = {
        f"each worker serves >= {MIN_SHARE:.0%}": all(shares.get(n, 0) >= MIN_SHARE for n in names),
        "worker-crash: 0 failed": failed_in["worker-crash"] == 0,
        "0 failed (adding and removing the workers included)": not bad,
        f"at least 50 req/s (ran {RATE})": len(window) / span >= 50 if span else False,
        "no keepalived transition": transitions == 0,
    }
    summary = (f"shares {shares} over {MEASURE_S:g} s; failed {len(bad)} "
               f"({', '.join(f'{k} {v}' for k, v in failed_in.items())})")
    return {
        "name": "workers", "passed": all(checks.values()), "checks": checks, "requests": len(window),
        "failed": len(bad), "shares": shares, "min_share": MIN_SHARE, "failed_in": failed_in,
        "transitions": transitions, "summary": summary,
        "failed_examples": [{k: r.get(k) for k in ("t", "status", "error", "served_by")} for r in bad[:5]],
        "rate_rps": round(len(window) / span, 1) if span else 0.0,
    }


@scenario("node-down-workers")
def node_down_workers(lab: Lab, workdir: Path, runs: int) -> dict:
    """`node-down` (the holder's links cut, then restored) with two workers behind the pair: it
    fails over as without them (node-down's limits from drill.limits_for: time to recover, 1 IP
    move, its detection time), and every worker keeps serving through the new holder's HAProxy."""
    lab.wait_pair_ready(timeout=30)
    names = lab.add_workers(WORKERS)
    try:
        time.sleep(1.5)  # both nodes' HAProxy checks see the workers UP (rise 2 x 200 ms)
        # The core scenario's own run, in a directory of its own (its records are
        # `node-down-<RUN_INDEX>.jsonl` there), then moved where the drill collects this scenario's
        # records for the timeline.
        own = workdir / "node-down-workers"
        own.mkdir(mode=0o755, exist_ok=True)
        result = drill.run_once(lab, "node-down", own, RUN_INDEX)
    finally:
        lab.remove_workers()
    (own / f"node-down-{RUN_INDEX}.jsonl").replace(workdir / "node-down-workers-0.jsonl")
    entry = drill.summarize("node-down", [result], lab.api_timing["action_s"])
    records, events = result.timeline["records"], result.timeline["events"]
    moved = min((e["t"] for e in events if e["kind"] == "ip_move"), default=None)
    healed = min((e["t"] for e in events if e["kind"] == "heal"), default=None)
    # Requests sent once the IP had moved can only have gone through the new holder's HAProxy (it
    # stays there: holder_after). Node-down's outage window ends with the move; from then until the
    # old holder is restored, the new holder's HAProxy serves from its own app and the workers.
    after = [r for r in records if moved is not None and r["t"] >= moved]
    counts = traffic.served_by_counts(after, ok_only=True)
    shares = {n: round(counts.get(n, 0) / max(1, len(after)), 3) for n in sorted(counts)}
    failed_down = traffic.failed(after, until=healed)
    failed_restore = traffic.failed(after, since=healed) if healed is not None else []
    checks = {
        "fails over as node-down (its limits)": entry["passed"],
        f"each worker serves >= {MIN_SHARE:.0%} through the new holder": bool(after) and all(
            shares.get(n, 0) >= MIN_SHARE for n in names),
        "0 failed from the IP move until the node is restored": bool(after) and not failed_down,
        # Its app gets requests as soon as the new holder's checks see it UP (rise 2 x 200 ms),
        # with every pooled database connection dead from the cut (tests/lab/app.py App.conn).
        "0 failed after the node is restored": healed is not None and not failed_restore,
    }
    entry.update(
        name="node-down-workers", checks=checks, passed=all(checks.values()), workers=names,
        shares_after_move=shares, requests_after_move=len(after), failed_after_move=len(failed_down),
        failed_after_restore=len(failed_restore),
        summary=(f"failover {entry['failover_s']} s (limit {entry.get('target_s')}), detection "
                 f"{entry['detection_s']} s; after the move {len(after)} requests, shares {shares}, failed "
                 f"{len(failed_down)} until the restore, {len(failed_restore)} after; failed in all {entry['failed']}"),
    )
    return entry
