"""Observability, proven in the lab (issue #13, and #10's `token-revoked`): what an operator's
Prometheus, webhook and `pairctl status` show is what happened.

Registered with the drill: `metrics-ports`, `pairctl-status`, `token-revoked`; and an observer
that adds to every failover scenario's runs `alerts` (messages the webhook sink received from the
fault on), `master_alerts` ("became MASTER" among them) and `metrics_ip_moves` (the moves
Prometheus counted), checked against the API's own `ip_moves` by the drill's limits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.lab import traffic
from tests.lab.drill import RUN_OBSERVERS, Traffic, peer, scenario
from tests.lab.lab import (
    ADMIN_ADDR,
    API_ADDR,
    API_PORT,
    CLIENT_ADDR,
    LAB_ROOT,
    NODES,
    PUBLIC,
    REPO,
    Lab,
    LabError,
    in_ns,
    node_paths,
    node_root,
    ns,
    wait_for,
)
from tests.lab.observe import MASTER_ALERT, SCRAPE_S, TOKEN_ALERT, counter_increase
from tests.lab.scenarios_hardening import _connect

METRIC_PORTS = {9100: "minitwit_ha_vrrp_state", 8405: "haproxy_process_"}  # port -> a series it must serve
PAIRCTL = REPO / "scripts" / "pairctl.py"
TOKEN_LOG_LINE = "token check failed"


# ---------------------------------------------------------------------------------------------
# Every failover run: the alerts and the moves Prometheus saw.


def observe_run(lab: Lab, scenario_name: str, t_fault: float, ip_moves: int) -> dict:
    """Alerts received since the fault; IP moves counted by Prometheus since the fault. A node counts
    its move when its poll sees the action completed (up to ~1 s after the API's own record), so
    wait until Prometheus has scraped both nodes after that."""
    settle = time.time() + 1.0
    wait_for(lambda: scraped_after(lab, settle), 10)
    try:
        value = lab.prom_value(counter_increase("minitwit_ha_assign_total", 'result="ok"', t_fault))
    except LabError:
        value = None
    counted = None if value is None else int(round(value))
    alerts = lab.alerts(t_fault)
    masters = sum(MASTER_ALERT in a["text"] for a in alerts)
    return {"alerts": len(alerts), "master_alerts": masters, "metrics_ip_moves": counted,
            "metrics_moves_off": None if counted is None else abs(counted - ip_moves),
            "master_alerts_off": abs(masters - (1 if ip_moves else 0))}


def scraped_after(lab: Lab, t: float) -> bool:
    """Both nodes' textfile series have a sample newer than `t`."""
    try:
        return lab.prom_value(f"count(timestamp(minitwit_ha_become_master_total) > {t:.3f})") == len(NODES)
    except LabError:
        return False


RUN_OBSERVERS.append(observe_run)


# ---------------------------------------------------------------------------------------------
# metrics-ports: the exporters answer the admin address and never the internet.


def _scrape(src: str, host: str, port: int) -> str:
    """GET /metrics from the client namespace with source `src`: the body ('' when it failed)."""
    out = in_ns("client", "curl", "--silent", "--fail", "--max-time", "3", "--interface", src,
                f"http://{host}:{port}/metrics", check=False, timeout=15)
    return out.stdout if out.returncode == 0 else ""


@scenario("metrics-ports")
def metrics_ports(lab: Lab, workdir: Path, runs: int) -> dict:
    checks: dict[str, tuple[str, str]] = {}
    for node in NODES:
        for port, series in METRIC_PORTS.items():
            checks[f"{PUBLIC[node]}:{port} from the internet ({CLIENT_ADDR})"] = (
                "dropped", _connect(CLIENT_ADDR, PUBLIC[node], port))
            body = _scrape(ADMIN_ADDR, PUBLIC[node], port)
            checks[f"{PUBLIC[node]}:{port}/metrics from the admin address"] = (
                f"serves {series}", f"serves {series}" if series in body else f"{len(body)} bytes without it")
    up = {f"{r['metric']['job']}/{r['metric']['node']}": r["value"][1] for r in lab.prom_query("up")}
    checks["Prometheus scrapes every exporter"] = (
        "4 up", f"{sum(v == '1' for v in up.values())} up" + ("" if len(up) == 4 else f" of {sorted(up)}"))
    failed = [k for k, (want, got) in checks.items() if want != got]
    return {
        "name": "metrics-ports", "passed": not failed, "requests": 0, "failed": 0,  # no traffic runs here
        "checks": {k: {"expected": want, "got": got} for k, (want, got) in checks.items()},
        "summary": f"{len(checks)} checks" + ("" if not failed else f"; unexpected: {json.dumps(failed)}"),
    }


# ---------------------------------------------------------------------------------------------
# pairctl-status: the operator's table, against the lab over SSH as deploy.


def run_pairctl(lab: Lab) -> tuple[int, str, dict]:
    """scripts/pairctl.py status --json from the admin address: (exit code, its output, the report)."""
    d = lab.ssh_dir
    ssh = (f"ssh -i {d / 'id_ed25519'} -o BatchMode=yes -o UserKnownHostsFile={d / 'known_hosts'} "
           f"-o StrictHostKeyChecking=yes -o ConnectTimeout=3 -o BindAddress={ADMIN_ADDR}")
    token = Path(lab.state["token_file"]).read_text().strip()  # the operator's (read) token, in the env only
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C.UTF-8",
           "HOME": os.environ.get("HOME", "/root"), "PAIRCTL_SSH": ssh, "DIGITALOCEAN_READ_TOKEN": token,
           "DO_API_URL": f"http://{API_ADDR}:{API_PORT}", "PAIRCTL_ALLOW_HTTP": "1"}
    argv = ["ip", "netns", "exec", ns("client"), sys.executable, str(PAIRCTL), "status", "--json",
            "--outputs", str(lab.outputs_file), "--remote-root", f"{LAB_ROOT}/{{node}}"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    if token in out:
        raise LabError("pairctl printed the API token")
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        report = {}
    return proc.returncode, out, report


def _pair_line(report: dict) -> str:
    nodes = report.get("nodes", {})
    return ", ".join(f"{n} {v.get('vrrp_state')}/token {v.get('token_ok')}" for n, v in sorted(nodes.items()))


@scenario("pairctl-status")
def pairctl_status(lab: Lab, workdir: Path, runs: int) -> dict:
    active = lab.wait_pair_ready(timeout=30)
    backup = peer(active)
    rc_ok, out_ok, ok = run_pairctl(lab)
    (workdir / "pairctl-redundant.txt").write_text(out_ok)
    lab.fault(backup, "keepalived")
    try:
        wait_for(lambda: lab.vrrp_state(backup) != "BACKUP", 5)
        rc_bad, out_bad, bad = run_pairctl(lab)
        (workdir / "pairctl-degraded.txt").write_text(out_bad)
    finally:
        lab.heal(backup, "keepalived")
    lab.wait_pair_ready(timeout=30)
    holder = ok.get("holder", {}).get("node")
    checks = {
        "redundant pair: exit 0": rc_ok == 0,
        "shows the MASTER holding the IP and the BACKUP": (
            holder == active and ok.get("nodes", {}).get(active, {}).get("vrrp_state") == "MASTER"
            and ok.get("nodes", {}).get(backup, {}).get("vrrp_state") == "BACKUP"),
        "both nodes' token checks work": all(n.get("token_ok") for n in ok.get("nodes", {}).values()),
        f"keepalived stopped on {backup}: exit 1": rc_bad == 1,
        "says why": any("no healthy BACKUP" in p for p in bad.get("problems", [])),
    }
    failed = [k for k, v in checks.items() if not v]
    return {
        "name": "pairctl-status", "passed": not failed, "requests": 0, "failed": 0, "checks": checks, "exit_redundant": rc_ok,
        "exit_degraded": rc_bad, "problems_degraded": bad.get("problems"),
        "summary": (f"exit {rc_ok} ({_pair_line(ok)}); {backup} keepalived stopped: exit {rc_bad} "
                    f"({_pair_line(bad)})" + ("" if not failed else f"; failed: {failed}")),
    }


# ---------------------------------------------------------------------------------------------
# token-revoked (#10): the standby's token dies; the standby says so before a failover needs it.


def failover_settings(node: str) -> dict[str, str]:
    text = Path(node_paths(node).failover_env).read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def node_script(lab: Lab, node: str, *args: str) -> subprocess.CompletedProcess:
    """`mt-failover ARGS` as root in the node's namespace, with the node's env file."""
    return subprocess.run(["ip", "netns", "exec", ns(node), node_paths(node).script("mt-failover"), *args],
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", **lab.node_env(node)},
                          capture_output=True, text=True, timeout=30)


def node_status(lab: Lab, node: str) -> dict:
    """`mt-failover status` run in the node's namespace, as an operator on the droplet would."""
    out = node_script(lab, node, "status")
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": (out.stderr or out.stdout).strip()[-200:]}


def api_log(lab: Lab) -> list[dict]:
    """The fake API's request log (never holds a token, only the token's name)."""
    path = LAB_ROOT / "logs" / "api-requests.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def token_limit_s(settings: dict[str, str], lab: Lab) -> float:
    """When a revoked token must show, at the latest: a BACKUP's check starts TOKEN_CHECK_INTERVAL_S
    after the previous one started, but only when a reconciler pass looks (every RECONCILE_INTERVAL_S
    plus that pass's metadata read, one API round trip); then the check's own round trip; then at most
    one scrape for Prometheus."""
    latency = lab.api_timing["latency_s"]
    return (float(settings["TOKEN_CHECK_INTERVAL_S"]) + float(settings["RECONCILE_INTERVAL_S"])
            + 2 * latency + SCRAPE_S)


@scenario("token-revoked")
def token_revoked(lab: Lab, workdir: Path, runs: int) -> dict:
    active = lab.wait_pair_ready(timeout=30)
    backup = peer(active)
    settings = failover_settings(backup)
    limit = token_limit_s(settings, lab)
    log = node_root(backup) / "var" / "log" / "mt-failover.log"
    log_start = log.stat().st_size if log.exists() else 0
    transitions_before = lab.transitions()
    gen = Traffic(lab, workdir / "token-revoked.jsonl").start()
    t0 = time.time()
    lab.revoke_token(backup)
    seen: dict[str, float] = {}
    status_doc: dict = {}
    try:
        while time.time() < t0 + limit + 10 and len(seen) < 4:
            now = time.time()
            if "log" not in seen and log.exists():
                with open(log, "rb") as fh:
                    fh.seek(log_start)
                    if TOKEN_LOG_LINE.encode() in fh.read():
                        seen["log"] = now - t0
            if "log" in seen and "status" not in seen:  # the status reads what the check wrote
                doc = node_status(lab, backup)
                if (doc.get("token_check") or {}).get("ok") is False:
                    seen["status"], status_doc = time.time() - t0, doc
            if "prometheus" not in seen and lab.prom_value(f'minitwit_ha_token_ok{{node="{backup}"}}') == 0:
                seen["prometheus"] = now - t0
            if "alert" not in seen and any(TOKEN_ALERT in a["text"] for a in lab.alerts(t0)):
                seen["alert"] = now - t0
            time.sleep(0.25)
    finally:
        lab.revoke_token(backup, revoked=False)
    t_restored = time.time()
    # What an operator runs once the token is fixed: one check now instead of at the next interval.
    once = node_script(lab, backup, "reconcile", "--once")
    recovered = wait_for(lambda: lab.prom_value(f'minitwit_ha_token_ok{{node="{backup}"}}') == 1, 10)
    time.sleep(1.0)
    window = gen.stop()
    alerts = lab.alerts(t0)
    refused = [e["ts"] for e in api_log(lab) if e.get("token") == backup and e.get("status") == 401 and e["ts"] >= t0]
    entry = {
        "name": "token-revoked", "node": backup, "limit_s": round(limit, 3),
        "token_check_interval_s": float(settings["TOKEN_CHECK_INTERVAL_S"]),
        "seen_s": {k: round(v, 3) for k, v in sorted(seen.items())},
        "detect_s": round(max(seen.values()), 3) if len(seen) == 4 else None,
        # The API's first refusal of the revoked token: the BACKUP's check (the phase of its interval).
        "api_refused_s": round(refused[0] - t0, 3) if refused else None,
        "status_token_check": status_doc.get("token_check"),
        "alerts": len(alerts), "alert_texts": [a["text"] for a in alerts],
        "transitions": lab.transitions() - transitions_before, "requests": len(window),
        "failed": len(traffic.failed(window)), "holder_after": lab.holder(), "holder_before": active,
        "restore_check_exit": once.returncode,
        "restored_s": None if recovered is None else round(time.time() - t_restored, 3),
    }
    entry["limits"] = {
        "detect_s": {"limit": entry["limit_s"], "got": entry["detect_s"],
                     "ok": entry["detect_s"] is not None and entry["detect_s"] <= limit},
        "alerts": {"limit": 1, "got": entry["alerts"], "ok": entry["alerts"] == 1},
        "transitions": {"limit": 0, "got": entry["transitions"], "ok": entry["transitions"] == 0},
        "failed": {"limit": 0, "got": entry["failed"], "ok": entry["failed"] == 0},
    }
    entry["passed"] = (all(v["ok"] for v in entry["limits"].values()) and entry["holder_after"] == active
                       and once.returncode == 0 and recovered is not None)
    entry["summary"] = (f"{backup}'s token revoked: seen {entry['seen_s']} (limit {limit:.1f} s; the API "
                        f"refused it first at {entry['api_refused_s']} s), alerts {entry['alerts']}, transitions "
                        f"{entry['transitions']}, restored in {entry['restored_s']} s")
    return entry
