"""Benchmark scenario `throughput` (issue #14): requests/s through the reserved IP with 0 and 2 app
workers, on the same machine, measured by the traffic generator in closed loop.

Every app server (the pair's two and the workers) spends CPU_MS of CPU per simulator API request
(the lab app's APP_CPU_MS, like MiniTwit rendering a page), so the app tier is what limits the
rate; then CLIENTS clients, each sending its next request as soon as the last one was answered,
for MEASURE_S seconds: first through the pair alone (active-standby: the holder's app serves),
then with two workers added (least connections over four apps). The report has both rates, their
ratio, latency, the machine's cores and load. All hosts share this machine's cores, so the ratio is
bounded by them: a figure for the README, not a promise for droplets.

It is a benchmark: its checks are that both rates were measured and nothing failed, not a speed.
The test suite's drill leaves it out (LAB_BENCHMARKS=0 in tests/lab/conftest.py); `make drill` runs
it. The app servers get their usual zero cost back afterwards and the workers are removed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from tests.lab import traffic
from tests.lab.drill import scenario
from tests.lab.lab import NODES, Lab, LabError, node_paths, wait_for

CPU_MS = 5.0       # CPU per API request on every app server (APP_CPU_MS)
CLIENTS = 12       # closed-loop clients: enough to keep four app servers busy
MEASURE_S = 15.0   # each measurement
TIMEOUT_S = 2.0    # a benchmark's client waits longer than the drill's 0.3 s: queueing is the point
WORKERS = 2


def set_cpu_cost(lab: Lab, hosts: list[str], ms: float) -> None:
    """Set APP_CPU_MS in each host's app.env (0: remove it) and restart its app, one at a time so
    HAProxy always has another app to send a request to."""
    for host in hosts:
        env = Path(node_paths(host).app_env)  # 0600, carries DATABASE_URL: rewritten in place
        lines = [ln for ln in env.read_text().splitlines() if not ln.startswith("APP_CPU_MS=")]
        env.write_text("\n".join([*lines, *([f"APP_CPU_MS={ms:g}"] if ms else [])]) + "\n")
        if host in NODES:
            lab.compose(host, "stop")
            lab.compose(host, "up", "-d")
            wait_for(lambda host=host: lab.app_http(host)[0] == 200, 15, f"{host}'s app to answer")
        else:
            lab.stop(f"{host}-app")
            lab.start_worker_app(host)
    time.sleep(1.0)  # HAProxy's checks see the restarted apps UP again (rise 2 x 200 ms)


def closed_loop(lab: Lab, out: Path) -> dict:
    """One closed-loop measurement from the client namespace through the reserved IP."""
    key = f"throughput-{out.stem}"
    lab.spawn(key, "client", [
        sys.executable, "-m", "tests.lab.traffic", "--url", f"http://{lab.reserved_ip}", "--clients", str(CLIENTS),
        "--duration", f"{MEASURE_S:g}", "--out", str(out), "--timeout", f"{TIMEOUT_S:g}", "--run-id", out.stem])
    try:
        done = wait_for(lambda: not lab.procs()[key].alive(), MEASURE_S + 3 * TIMEOUT_S + 15)
    finally:
        lab.stop(key)
    if done is None:
        raise LabError(f"the closed-loop run did not end in time (see {out})")
    return traffic.closed_loop_stats(traffic.load(out))


def throughput(lab: Lab, workdir: Path, runs: int) -> dict:
    lab.wait_pair_ready(timeout=30)
    # Not *.jsonl in workdir: the drill would draw thousands of closed-loop requests as a timeline.
    out = workdir / "throughput"
    out.mkdir(mode=0o755, parents=True, exist_ok=True)
    load_before = os.getloadavg()
    measured: dict[int, dict] = {}
    names: list[str] = []
    try:
        set_cpu_cost(lab, list(NODES), CPU_MS)
        lab.wait_pair_ready(timeout=30)
        measured[0] = closed_loop(lab, out / "workers-0.jsonl")
        names = lab.add_workers(WORKERS)
        set_cpu_cost(lab, names, CPU_MS)
        measured[WORKERS] = closed_loop(lab, out / f"workers-{WORKERS}.jsonl")
    finally:
        if names:
            lab.remove_workers()
        set_cpu_cost(lab, list(NODES), 0)
    base, more = measured[0], measured[WORKERS]
    ratio = round(more["req_s"] / base["req_s"], 2) if base["req_s"] else None
    checks = {
        "both rates measured": all(m["requests"] > 0 and m["req_s"] > 0 for m in measured.values()),
        "0 failed": all(m["failed"] == 0 for m in measured.values()),
    }
    return {
        "name": "throughput", "passed": all(checks.values()), "checks": checks,
        "requests": sum(m["requests"] for m in measured.values()),
        "failed": sum(m["failed"] for m in measured.values()),
        "workers_0": base, f"workers_{WORKERS}": more, "ratio": ratio,
        "nproc": os.cpu_count(), "load_avg_before": [round(x, 2) for x in load_before],
        "cpu_ms": CPU_MS, "clients": CLIENTS, "seconds_each": MEASURE_S, "client_timeout_s": TIMEOUT_S,
        "summary": (f"{base['req_s']} req/s (p50 {base['p50_ms']} ms, p99 {base['p99_ms']} ms) with 0 workers, "
                    f"{more['req_s']} req/s (p50 {more['p50_ms']} ms, p99 {more['p99_ms']} ms) with {WORKERS}: "
                    f"x{ratio}; {CLIENTS} clients, {CPU_MS:g} ms CPU/request, {os.cpu_count()} cores"),
    }


# A benchmark gives a figure for the README, not pass/fail behaviour: the test suite's drill leaves it
# out (LAB_BENCHMARKS=0); `make drill` and `--scenarios throughput` run it.
if os.environ.get("LAB_BENCHMARKS", "1") != "0":
    scenario("throughput")(throughput)
