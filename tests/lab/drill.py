"""The failover drill: inject each fault under steady traffic and measure what a client sees.

`failover_s` is the time from the fault to the first 2xx served by the new node through the
reserved IP, as the client saw it (the answer's arrival), median over the runs. For
`split-brain` (VPC cut 10 s, then healed) and `restart-both` it is the time from the heal /
restart until exactly one MASTER holds the reserved IP. `rows_lost` counts writes the app
acknowledged (204) during the run that the shared database does not have afterwards.
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.lab import traffic
from tests.lab.lab import LAB_ROOT, NODES, RESERVED_IP, Lab, LabError, wait_for

# Targets (lab, API latency 0, the "fast" profile).
FAILOVER_TARGET_S = {"app-crash": 1.5, "keepalived-stop": 1.5, "node-down": 2.0, "api-flaky": 5.0}
SETTLE_TARGET_S = 3.0
SCENARIOS = ("app-crash", "keepalived-stop", "node-down", "split-brain", "api-flaky", "restart-both")
FAULT_OF = {"app-crash": "app", "keepalived-stop": "keepalived", "node-down": "link", "api-flaky": "app"}
SPLIT_S = 10.0
RATE = 50
BAD_LOG_LINES = ("unsafe permissions", "SECURITY VIOLATION", "disabling")

# More scenarios live in their own modules (rolling updates, hardening) and register here:
# name -> fn(lab, workdir, runs) -> report entry (a dict with at least "name" and "passed").
EXTRA_SCENARIOS: dict[str, Callable[[Lab, Path, int], dict]] = {}
EXTRA_MODULES = ("tests.lab.scenarios_rollout", "tests.lab.scenarios_hardening")


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
    notes: list[str] = field(default_factory=list)


class Traffic:
    """The traffic generator, running in the client namespace, recording to a JSONL file."""

    def __init__(self, lab: Lab, out: Path, rate: float = RATE) -> None:
        self.lab, self.out, self.rate = lab, out, rate
        self.key = f"traffic-{out.stem}"

    def start(self) -> Traffic:
        self.lab.spawn(self.key, "client", [
            sys.executable, "-m", "tests.lab.traffic", "--url", f"http://{RESERVED_IP}", "--rate", str(self.rate),
            "--duration", "0", "--out", str(self.out), "--timeout", "1.0", "--run-id", self.out.stem,
        ])
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if sum(1 for r in self.records() if traffic.ok(r) and r.get("op") != "register") >= 10:
                return self
            time.sleep(0.1)
        raise LabError(f"traffic did not get going through {RESERVED_IP} (see {self.out})")

    def records(self) -> list[dict]:
        return traffic.load(self.out) if self.out.exists() else []

    def stop(self) -> list[dict]:
        """Stop the generator; its records of the requests (the user's registration left out)."""
        self.lab.stop(self.key, timeout=15)
        return [r for r in self.records() if r.get("op") != "register"]


def first_answer_by(records: list[dict], node: str, after: float) -> float | None:
    """Arrival time of the first 2xx served by `node` that arrived after `after`."""
    times = [r["t"] + r["dt"] for r in records
             if traffic.ok(r) and r.get("served_by") == node and r["t"] + r["dt"] > after]
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
    socket_uri = f"postgresql://postgres@/minitwit?host={LAB_ROOT / 'db'}&port=5432"
    lost, _missing = traffic.rows_lost(acked, socket_uri)
    return lost


def run_once(lab: Lab, scenario: str, workdir: Path, index: int) -> RunResult:
    active = lab.wait_pair_ready(timeout=30)
    other = peer(active)
    gen = Traffic(lab, workdir / f"{scenario}-{index}.jsonl").start()
    time.sleep(1.0)
    notes: list[str] = []
    failover_s = None
    t_fault = time.time()
    try:
        if scenario in FAULT_OF:
            if scenario == "api-flaky":
                lab.fault(active, "api", count=3)
            t_fault = time.time()
            lab.fault(active, FAULT_OF[scenario])
            waited = wait_for(lambda: first_answer_by(gen.records(), other, t_fault) is not None, 15)
            if waited is None:
                notes.append(f"no answer from {other} within 15 s")
            else:
                failover_s = first_answer_by(gen.records(), other, t_fault) - t_fault
            time.sleep(1.0)
            lab.heal(active, "api" if scenario == "api-flaky" else FAULT_OF[scenario])
            if scenario == "api-flaky":
                lab.heal(active, "app")
        elif scenario == "split-brain":
            lab.fault(active, "vpc")
            both = wait_for(lambda: len(lab.masters()) == 2, 5)
            notes.append("both nodes MASTER during the cut" if both is not None else "no split brain formed")
            time.sleep(max(0.0, SPLIT_S - (time.time() - t_fault)))
            t_heal = time.time()
            lab.heal(active, "vpc")
            failover_s = settle_time(lab, t_heal)
        elif scenario == "restart-both":
            for node in NODES:
                lab.fault(node, "keepalived")
            t_restart = time.time()
            for node in NODES:
                lab.heal(node, "keepalived")
            failover_s = settle_time(lab, t_restart)
        else:
            raise LabError(f"unknown scenario {scenario}")
        time.sleep(1.0)
    finally:
        window = gen.stop()
    try:
        now_active = lab.wait_steady(timeout=30)
    except LabError as exc:
        now_active = None
        notes.append(str(exc))
    masters = lab.masters()
    return RunResult(
        failover_s=failover_s, requests=len(window), failed=len(traffic.failed(window)),
        holder_after=lab.holder(), single_master=len(masters) == 1 and now_active is not None,
        rows_lost=rows_lost(lab, window), notes=notes,
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
    return {"name": "steady", "seconds": round(time.time() - t0, 1), "requests": len(window), "failed": failed,
            "transitions": transitions, "holder_after": lab.holder(), "active_before": active,
            "rows_lost": rows_lost(lab, window), "passed": transitions == 0 and failed == 0}




def keepalived_version() -> str:
    out = subprocess.run(["keepalived", "--version"], capture_output=True, text=True)
    words = (out.stdout + out.stderr).split()
    return words[1].lstrip("v") if len(words) > 1 else "unknown"


def summarize(name: str, runs: list[RunResult]) -> dict:
    times = [r.failover_s for r in runs if r.failover_s is not None]
    median = round(statistics.median(times), 3) if len(times) == len(runs) and times else None
    target = FAILOVER_TARGET_S.get(name, SETTLE_TARGET_S)
    out = {
        "name": name,
        "failover_s": median,
        "target_s": target,
        "runs_s": [None if r.failover_s is None else round(r.failover_s, 3) for r in runs],
        "requests": sum(r.requests for r in runs),
        "failed": sum(r.failed for r in runs),
        "holder_after": runs[-1].holder_after if runs else None,
        "single_master": all(r.single_master for r in runs),
        "rows_lost": sum(r.rows_lost for r in runs),
        "notes": sorted({n for r in runs for n in r.notes}),
    }
    out["passed"] = (median is not None and median <= target and out["single_master"] and out["rows_lost"] == 0
                     and all(r.holder_after is not None for r in runs))
    return out


def run_drill(profile: str = "fast", runs: int = 3, only: list[str] | None = None, steady_s: float = 0.0,
              lab: Lab | None = None, evidence: Path | None = None) -> dict:
    """Bring the lab up (unless given one), run the scenarios, tear down, return the report.

    When anything fails and `evidence` is given, the lab's logs, traffic records and node state
    are copied there before the teardown, so the failure can be read afterwards."""
    extras = load_extra_scenarios()
    chosen = [s for s in SCENARIOS if not only or s in only]
    chosen_extras = [s for s in extras if not only or s in only]
    unknown = set(only or []) - set(SCENARIOS) - set(extras) - {"steady"}
    if unknown:
        raise LabError(f"unknown scenario(s) {sorted(unknown)}; use {', '.join([*SCENARIOS, *extras])} or steady")
    own = lab is None
    lab = lab or Lab()
    if own:
        lab.up(profile=profile)
    workdir = LAB_ROOT / "drill"
    workdir.mkdir(mode=0o755, exist_ok=True)
    report = {"keepalived": keepalived_version(), "profile": profile, "api_latency_s": 0, "runs": runs,
              "scenarios": []}
    try:
        for name in chosen:
            results = [run_once(lab, name, workdir, i) for i in range(runs)]
            report["scenarios"].append(summarize(name, results))
            _progress(report["scenarios"][-1])
        for name in chosen_extras:
            # Failover scenarios run `runs` times (their time is a median); rollouts and the
            # hardening checks are pass/fail and run once.
            entry = EXTRA_SCENARIOS[name](lab, workdir, 1)
            report["scenarios"].append(entry)
            print(f"  {name:<16} {'ok' if entry['passed'] else 'FAILED'}", file=sys.stderr, flush=True)
        if steady_s > 0 and (not only or "steady" in only):
            report["steady"] = steady_run(lab, workdir, steady_s)
        logs = {n: lab.keepalived_log(n) for n in NODES}
        bad = [f"{n}: {ln.strip()}" for n, text in logs.items() for ln in text.splitlines()
               if any(b in ln for b in BAD_LOG_LINES)]
        report["keepalived_log_clean"] = not bad
        report["keepalived_log_findings"] = bad[:20]
        report["secrets_audit"] = lab.audit_secrets({"drill report": json.dumps(report)})
        report["passed"] = (all(s["passed"] for s in report["scenarios"]) and not bad
                            and report["secrets_audit"]["clean"] and report.get("steady", {}).get("passed", True))
    finally:
        if evidence is not None and not report.get("passed"):
            report["evidence"] = str(lab.save_evidence(evidence))
        if own:
            lab.down()
    return report


def _progress(s: dict) -> None:
    print(f"  {s['name']:<16} failover {s['failover_s']}s (runs {s['runs_s']}) "
          f"failed {s['failed']}/{s['requests']} {'ok' if s['passed'] else 'FAILED'}", file=sys.stderr, flush=True)


def table(report: dict) -> str:
    rows = [f"keepalived {report['keepalived']}, profile {report['profile']}, API latency {report['api_latency_s']} s, "
            f"median of {report['runs']} run(s)", "",
            f"{'scenario':<17}{'failover_s':>11}{'target':>8}{'requests':>10}{'failed':>8}  {'holder_after':<13}"
            f"{'single_master':<15}{'rows_lost':>9}  result"]
    extras = []
    for s in report["scenarios"]:
        if "failover_s" not in s or "target_s" not in s:
            extras.append(s)
            continue
        fs = "-" if s["failover_s"] is None else f"{s['failover_s']:.2f}"
        rows.append(f"{s['name']:<17}{fs:>11}{s['target_s']:>8.1f}{s['requests']:>10}{s['failed']:>8}  "
                    f"{str(s['holder_after']):<13}{str(s['single_master']):<15}{s['rows_lost']:>9}  "
                    f"{'pass' if s['passed'] else 'FAIL'}")
    if extras:
        rows += ["", f"{'scenario':<28}{'requests':>10}{'failed':>8}  result  details"]
        for s in extras:
            details = s.get("summary", "")
            rows.append(f"{s['name']:<28}{s.get('requests', '-'):>10}{s.get('failed', '-'):>8}  "
                        f"{'pass' if s['passed'] else 'FAIL':<6}  {details}")
    if "steady" in report:
        st = report["steady"]
        rows.append(f"{'steady':<17}{'':>11}{'':>8}{st['requests']:>10}{st['failed']:>8}  "
                    f"{str(st['holder_after']):<13}{'transitions=' + str(st['transitions']):<15}"
                    f"{st['rows_lost']:>9}  {'pass' if st['passed'] else 'FAIL'}")
    rows.append("")
    audit = report.get("secrets_audit")
    if audit:
        rows.append(f"secrets audit: {audit['files_scanned']} files scanned, "
                    + ("no secret outside its 0600 home" if audit["clean"] else
                       "FINDINGS: " + "; ".join(audit["findings"] + audit["homes_not_0600"])))
    rows.append("keepalived log: " + ("clean (no unsafe permissions, SECURITY VIOLATION or disabling lines)"
                                      if report["keepalived_log_clean"] else
                                      "FINDINGS: " + "; ".join(report["keepalived_log_findings"])))
    return "\n".join(rows)


def main_drill(profile: str, runs: int, report: str, only: list[str] | None, steady_s: float) -> int:
    print(f"drill: profile {profile}, {runs} run(s) per scenario ...", file=sys.stderr)
    result = run_drill(profile=profile, runs=runs, only=only, steady_s=steady_s,
                       evidence=Path(report).with_name(Path(report).stem + "-evidence"))
    Path(report).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nreport: {os.path.abspath(report)}")
    if "evidence" in result:
        print(f"logs and node state of the failed run: {result['evidence']}")
    if profile != "fast":
        print(f"(profile {profile} is for comparison; the targets are the fast profile's)")
        return 0
    return 0 if result["passed"] else 1


def main_demo(profile: str = "fast") -> int:
    print("demo: building the lab (namespaces, PostgreSQL, fake DigitalOcean API, two keepalived nodes) ...",
          file=sys.stderr)
    lab = Lab()
    lab.up(profile=profile)
    try:
        print(json.dumps(lab.status(), indent=2))
        print("demo: one run of each failover scenario under 50 requests/s ...", file=sys.stderr)
        result = run_drill(profile=profile, runs=1, lab=lab)
        print(table(result))
    finally:
        lab.down()
        print("demo: lab torn down", file=sys.stderr)
    return 0 if result["passed"] else 1
