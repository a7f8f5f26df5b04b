"""Drill scenarios for planned switchovers and rolling updates, run with the real tool over real SSH.

Each scenario runs `scripts/rollout.py` in the lab's client namespace, exactly as an operator runs
it from a laptop: the lab's stack outputs file, the lab's deploy key and known_hosts, SSH from the
admin address to the sshd in each node, `sudo -n mt-deploy` there, the fake DigitalOcean API for
the reserved IP's holder, and the token in DIGITALOCEAN_TOKEN (never on a command line). Traffic
runs through the reserved IP at RATE requests/s the whole time.

- `planned-switchover`: the reserved IP moves to the standby and stays there (1 IP move). 0 failed
  requests: the old holder forwards to the standby's app until the API's action completes.
- `rolling-update`: both nodes move to the next version (v1 -> v2 ...), each app out of rotation in
  HAProxy while the other serves, standby's first. 0 failed, 0 IP moves, no keepalived transition;
  the tool's duration <= both nodes' deploy+health times (from its own report) + 10 s.
- `rolling-update-bad-version`: a version that never becomes healthy (`bad-...`, 503 forever).
  The tool exits non-zero, the standby is rolled back, the active is never touched, no request
  through the reserved IP is answered by the bad version, 0 failed, 0 IP moves.
- `serve-both`: both nodes' HAProxy reloaded with serve=both rendered (under traffic), then each
  node's app serves >= 30% of the requests through the reserved IP; each app crashed in turn costs
  no request; active-standby restored (the lab's own mode). 0 failed, 0 IP moves.

IP moves are counted by the drill around each scenario (drill.EXTRA_MOVE_LIMITS).

Each returns the drill's report entry: name, passed, requests, failed, versions_before/after
(per node), duration_s, exit_code, summary, plus the per-run details. The lab is left on the last
version that rolled out (rolling-update moves it forward; the bad version leaves it as it was).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.lab import traffic
from tests.lab.drill import Traffic, limits_for, peer, scenario
from tests.lab.lab import ADMIN_ADDR, API_ADDR, API_PORT, LAB_ROOT, NODES, REPO, Lab, LabError, ns

TOOL = REPO / "scripts" / "rollout.py"
RATE = 60                       # requests/s through the reserved IP (target: at least 50)
OVERHEAD_TARGET_S = 10.0        # a rollout may take both nodes' deploy+health times plus this
SWITCHOVER_TARGET_S = 10.0      # a planned switchover: the standby's settle check, the undrain (+ the move)


def move_s(lab: Lab) -> float:
    """What one reserved-IP move may add: the drill's own failover budget (detection, the API's
    requests and its action time: 6.5 s with the realistic API)."""
    return limits_for("node-down", lab.api_timing["action_s"])["failover_s"]


def serving_apps(lab: Lab, holder: str) -> set[str]:
    """The apps that answer through `holder`'s HAProxy when both are healthy."""
    return set(NODES) if lab.serve == "both" else {holder}


BAD_HEALTH_TIMEOUT_S = 15.0     # how long the bad version gets to become healthy (it never does)
TOOL_TIMEOUT_S = 600.0


def versions(lab: Lab) -> dict[str, str | None]:
    nodes = lab.status()["nodes"]
    return {n: nodes[n]["app_version"] for n in NODES}


def next_version(current: dict[str, str | None]) -> str:
    numbers = [int(m.group(1)) for v in current.values() if v and (m := re.fullmatch(r"v(\d+)", v))]
    return f"v{max(numbers, default=1) + 1}"


def ssh_leftovers(lab: Lab) -> list[str]:
    """Processes still using the lab's deploy key (an SSH master the tool failed to end)."""
    key = str(lab.ssh_dir / "id_ed25519")
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if key in cmdline and cmdline.startswith("ssh"):
            found.append(f"{pid}: {cmdline.strip()}")
    return found


def run_tool(lab: Lab, workdir: Path, tag: str, args: list[str]) -> tuple[int, str, dict]:
    """scripts/rollout.py in the client namespace, as an operator runs it; (exit code, log, its report)."""
    import json

    report_file = workdir / f"{tag}-tool.json"
    report_file.unlink(missing_ok=True)
    argv = ["ip", "netns", "exec", ns("client"), sys.executable, str(TOOL), *args,
            "--outputs", str(lab.outputs_file), "--identity", str(lab.ssh_dir / "id_ed25519"),
            "--known-hosts", str(lab.ssh_dir / "known_hosts"), "--ssh-option", f"BindAddress={ADMIN_ADDR}",
            "--remote-root", f"{LAB_ROOT}/{{node}}", "--api-url", f"http://{API_ADDR}:{API_PORT}",
            "--report", str(report_file)]
    token = Path(lab.state["token_file"]).read_text().strip()
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8",
           "HOME": os.environ.get("HOME", "/root"), "DIGITALOCEAN_TOKEN": token}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    log = proc.stdout + proc.stderr
    (workdir / f"{tag}-tool.log").write_text(log)
    if token in log or any(token in a for a in argv):
        raise LabError(f"{tag}: the API token appeared in the tool's output or command line")
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    return proc.returncode, log, report


def one_run(lab: Lab, workdir: Path, tag: str, args: list[str]) -> dict:
    """Steady traffic, the tool, steady traffic: what a client saw, what the tool said."""
    lab.wait_pair_ready(timeout=30)
    before, holder_before, transitions_before = versions(lab), lab.holder(), lab.transitions()
    gen = Traffic(lab, workdir / f"{tag}.jsonl", rate=RATE).start()
    time.sleep(1.0)
    t_start = time.time()
    try:
        code, log, report = run_tool(lab, workdir, tag, args)
        t_end = time.time()
        time.sleep(1.0)
    finally:
        window = gen.stop()
    bad = traffic.failed(window)
    span = (max(r["t"] for r in window) - min(r["t"] for r in window)) if len(window) > 1 else 0.0
    return {
        "exit_code": code, "requests": len(window), "failed": len(bad),
        "rate_rps": round(len(window) / span, 1) if span else 0.0,
        "versions_before": before, "versions_after": versions(lab),
        "holder_before": holder_before, "holder_after": lab.holder(),
        "transitions": lab.transitions() - transitions_before,
        "served_before": traffic.versions_seen(window, until=t_start, ok_only=True),
        "served_during": traffic.versions_seen(window, since=t_start, until=t_end),
        "served_after": traffic.versions_seen(window, since=t_end, ok_only=True),
        "served_by_during": traffic.served_by_counts([r for r in window if t_start <= r["t"] < t_end], ok_only=True),
        "served_by_after": traffic.served_by_counts([r for r in window if r["t"] >= t_end], ok_only=True),
        "duration_s": report.get("duration_s"), "deploy_health_s": report.get("deploy_health_s", {}),
        "tool_outcome": report.get("outcome"), "tool_message": report.get("message", ""),
        "ssh_leftovers": ssh_leftovers(lab),
        "failed_examples": [{k: r.get(k) for k in ("t", "status", "error", "served_by", "version")} for r in bad[:5]],
        "log_tail": log.strip().splitlines()[-6:],
        "_records": window,
    }


def entry(name: str, runs: list[dict], checks: dict[str, bool], summary: str, **extra: object) -> dict:
    for r in runs:
        r.pop("_records", None)
    return {
        "name": name, "passed": all(checks.values()), "checks": checks,
        "requests": sum(r["requests"] for r in runs), "failed": sum(r["failed"] for r in runs),
        "versions_before": runs[0]["versions_before"], "versions_after": runs[-1]["versions_after"],
        "duration_s": max((r["duration_s"] or 0.0) for r in runs),
        "exit_code": runs[-1]["exit_code"], "rate_rps": min(r["rate_rps"] for r in runs),
        "summary": summary, "runs": runs, **extra,
    }


@scenario("planned-switchover")
def planned_switchover(lab: Lab, workdir: Path, runs: int) -> dict:
    results = [one_run(lab, workdir, f"planned-switchover-{i}", ["switchover"]) for i in range(runs)]
    checks = {
        "exit 0": all(r["exit_code"] == 0 for r in results),
        "0 failed": all(r["failed"] == 0 for r in results),
        f"at least 50 req/s (ran {RATE})": all(r["rate_rps"] >= 50 for r in results),
        "reserved IP moved to the other node": all(r["holder_after"] == peer(r["holder_before"]) for r in results),
        "served through the other node afterwards": all(set(r["served_by_after"]) == serving_apps(lab, r["holder_after"])
                                                        for r in results),
        "versions unchanged": all(r["versions_after"] == r["versions_before"] for r in results),
        f"duration <= {SWITCHOVER_TARGET_S + move_s(lab):g} s": all(
            (r["duration_s"] or 1e9) <= SWITCHOVER_TARGET_S + move_s(lab) for r in results),
        "no SSH process left": all(not r["ssh_leftovers"] for r in results),
    }
    last = results[-1]
    summary = (f"{last['holder_before']} -> {last['holder_after']} in {last['duration_s']} s, "
               f"failed {sum(r['failed'] for r in results)}")
    return entry("planned-switchover", results, checks, summary, target_s=SWITCHOVER_TARGET_S + move_s(lab))


@scenario("rolling-update")
def rolling_update(lab: Lab, workdir: Path, runs: int) -> dict:
    results = []
    for i in range(runs):
        version = next_version(versions(lab))
        r = one_run(lab, workdir, f"rolling-update-{i}", ["rollout", "--version", version])
        r["version"] = version
        r["target_s"] = round(sum(r["deploy_health_s"].values()) + OVERHEAD_TARGET_S, 3)
        results.append(r)
    checks = {
        "exit 0": all(r["exit_code"] == 0 for r in results),
        "0 failed": all(r["failed"] == 0 for r in results),
        f"at least 50 req/s (ran {RATE})": all(r["rate_rps"] >= 50 for r in results),
        "both nodes on the new version": all(set(r["versions_after"].values()) == {r["version"]} for r in results),
        "clients get only the new version afterwards": all(set(r["served_after"]) == {r["version"]} for r in results),
        "both nodes were deployed and measured": all(len(r["deploy_health_s"]) == 2 for r in results),
        "reserved IP stayed on the active node": all(r["holder_after"] == r["holder_before"] for r in results),
        "no keepalived transition": all(r["transitions"] == 0 for r in results),
        "both apps served while the other was updated": all(set(r["served_by_during"]) == {"primary", "standby"}
                                                             for r in results),
        "duration <= deploy+health of both + 10 s": all((r["duration_s"] or 1e9) <= r["target_s"] for r in results),
        "no SSH process left": all(not r["ssh_leftovers"] for r in results),
    }
    last = results[-1]
    summary = (f"{sorted(set(last['versions_before'].values()))} -> {last['version']} in {last['duration_s']} s "
               f"(target {last['target_s']} s: deploy+health {last['deploy_health_s']} + {OVERHEAD_TARGET_S:g}), "
               f"served during {last['served_by_during']}, failed {sum(r['failed'] for r in results)}, "
               f"IP stayed on {last['holder_after']}")
    return entry("rolling-update", results, checks, summary, target_s=last["target_s"],
                 deploy_health_s=last["deploy_health_s"])


@scenario("rolling-update-bad-version")
def rolling_update_bad_version(lab: Lab, workdir: Path, runs: int) -> dict:
    results = []
    for i in range(runs):
        version = "bad-" + next_version(versions(lab))
        r = one_run(lab, workdir, f"rolling-update-bad-version-{i}",
                    ["rollout", "--version", version, "--health-timeout", str(BAD_HEALTH_TIMEOUT_S)])
        r["version"] = version
        r["bad_version_served"] = sum(1 for rec in r["_records"] if rec.get("version") == version)
        results.append(r)
    checks = {
        "tool exited non-zero": all(r["exit_code"] not in (0, None) for r in results),
        "0 failed": all(r["failed"] == 0 for r in results),
        f"at least 50 req/s (ran {RATE})": all(r["rate_rps"] >= 50 for r in results),
        "bad version never served through the reserved IP": all(r["bad_version_served"] == 0 for r in results),
        "reserved IP never left the active node": all(
            r["holder_after"] == r["holder_before"] and set(r["served_by_after"]) == serving_apps(lab, r["holder_before"])
            for r in results),
        "standby rolled back (versions as before)": all(r["versions_after"] == r["versions_before"] for r in results),
        "no keepalived transition": all(r["transitions"] == 0 for r in results),
        "no SSH process left": all(not r["ssh_leftovers"] for r in results),
    }
    last = results[-1]
    summary = (f"{last['version']} refused: exit {last['exit_code']} after {last['duration_s']} s, served "
               f"{last['bad_version_served']} times, failed {sum(r['failed'] for r in results)}")
    return entry("rolling-update-bad-version", results, checks, summary,
                 bad_version_served=sum(r["bad_version_served"] for r in results),
                 health_timeout_s=BAD_HEALTH_TIMEOUT_S)


SERVE_BOTH_S = 10.0             # serve-both: how long the share of each app is measured
MIN_SHARE = 0.30                # each app's share of the requests through the reserved IP, at least
CRASH_S = 2.0                   # how long each app stays crashed


def wait_app(lab: Lab, node: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.app_http(node)[0] == 200:
            return
        time.sleep(0.1)
    raise LabError(f"{node}'s app did not answer within {timeout:g} s after the heal")


@scenario("serve-both")
def serve_both(lab: Lab, workdir: Path, runs: int) -> dict:
    """serve=both under traffic: reload both HAProxies with it, measure each app's share, crash each
    app in turn, restore the lab's own mode. Every request of the run counts, the reloads too."""
    original = lab.serve
    active = lab.wait_pair_ready(timeout=30)
    transitions_before = lab.transitions()
    gen = Traffic(lab, workdir / "serve-both.jsonl", rate=RATE).start()
    marks: dict[str, tuple[float, float]] = {}
    kills: list[tuple[float, float]] = []
    try:
        time.sleep(1.0)
        t = time.time()
        lab.set_serve("both")
        marks["reload to both"] = (t, time.time() + 1.0)
        time.sleep(1.0)
        t = time.time()
        time.sleep(SERVE_BOTH_S)
        marks["measure"] = (t, time.time())
        for node in (active, peer(active)):
            t = time.time()
            lab.fault(node, "app")
            kills.append((t, time.time()))
            time.sleep(CRASH_S)
            lab.heal(node, "app")
            wait_app(lab, node)
            time.sleep(1.5)  # HAProxy's checks see it UP again (rise 2 x 200 ms), then steady
            marks[f"{node} app crash"] = (t, time.time())
        t = time.time()
        lab.set_serve(original)
        time.sleep(1.0)
        marks[f"restore {original}"] = (t, time.time())
        time.sleep(2.0)
    finally:
        window = gen.stop()
        if lab.serve != original:
            lab.set_serve(original)
    t_end = max(r["t"] for r in window)
    measured = [r for r in window if marks["measure"][0] <= r["t"] < marks["measure"][1]]
    counts = traffic.served_by_counts(measured, ok_only=True)
    shares = {n: round(counts.get(n, 0) / max(1, len(measured)), 3) for n in NODES}
    # A write an app held at the instant it was killed fails by design (never resent): not counted.
    saved = traffic.failed_except_writes_in_flight(window, kills)
    failed_in = {name: len(traffic.failed(saved, since=a, until=b)) for name, (a, b) in marks.items()}
    after = [r for r in window if marks[f"restore {original}"][1] <= r["t"] <= t_end]
    served_after = traffic.served_by_counts(after, ok_only=True)
    transitions = lab.transitions() - transitions_before
    bad = saved
    span = max(r["t"] for r in window) - min(r["t"] for r in window)
    checks = {
        f"each app serves >= {MIN_SHARE:.0%} with serve=both": all(v >= MIN_SHARE for v in shares.values()),
        "0 failed (reloads and both app crashes included)": not bad,
        **{f"{name}: 0 failed": failed_in[name] == 0 for name in marks if "crash" in name},
        f"at least 50 req/s (ran {RATE})": len(window) / span >= 50 if span else False,
        "no keepalived transition": transitions == 0,
        f"{original} again afterwards": set(served_after) == serving_apps(lab, active),
    }
    summary = (f"shares {shares} over {SERVE_BOTH_S:g} s; failed {len(bad)} "
               f"({', '.join(f'{k} {v}' for k, v in failed_in.items())}); restored {original}")
    return {
        "name": "serve-both", "passed": all(checks.values()), "checks": checks, "requests": len(window),
        "failed": len(bad), "shares": shares, "min_share": MIN_SHARE, "failed_in": failed_in,
        "transitions": transitions, "served_after_restore": served_after, "summary": summary,
        "failed_examples": [{k: r.get(k) for k in ("t", "status", "error", "served_by")} for r in bad[:5]],
        "rate_rps": round(len(window) / span, 1) if span else 0.0,
    }
