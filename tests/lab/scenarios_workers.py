"""Drill scenario for app workers (appWorkers, issue #14): the pair's HAProxy in front of more apps.

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

from tests.lab import traffic
from tests.lab.drill import Traffic, scenario
from tests.lab.lab import Lab

RATE = 60          # requests/s through the reserved IP (target: at least 50)
WORKERS = 2
MEASURE_S = 10.0   # how long each app's share is measured
MIN_SHARE = 0.20   # each worker's share of the requests through the reserved IP, at least
CRASH_S = 2.0      # how long the worker's app stays dead


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
