#!/usr/bin/env python3
"""pairctl: see the pair from a laptop or CI.

  pairctl.py status [--stack NAME | --outputs FILE] [--json] [--remote-root PREFIX]

Reads the stack outputs (`pulumi stack output --json`, or a saved copy), asks each node over SSH
as `deploy` for its read-only status (`sudo -n mt-failover status` and `sudo -n mt-deploy status`:
the only root commands `deploy` may run besides a deploy), and asks the DigitalOcean API with a
read-only token which droplet holds the reserved IP. Prints one table (or `--json`).

Exit codes: 0 the pair is redundant (one MASTER holding the IP, one healthy BACKUP whose token
works); 1 it is not (the reasons are printed); 2 usage or the stack outputs cannot be read.

Environment (every external call can be pointed elsewhere, which is how the tests run it):
  DIGITALOCEAN_READ_TOKEN   read-only API token (reserved_ip:read); without it the API column is unknown
  DO_API_URL                API base URL (default https://api.digitalocean.com; https only unless
                            PAIRCTL_ALLOW_HTTP=1)
  PAIRCTL_SSH               ssh command (default: ssh -o BatchMode=yes -o ConnectTimeout=10)
  PAIRCTL_OUTPUTS_CMD       command printing the outputs JSON (default: pulumi stack output --json)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

EXIT_OK, EXIT_DEGRADED, EXIT_USAGE = 0, 1, 2
LIBEXEC = "/usr/libexec/minitwit-ha"
SSH_USER = "deploy"
SSH_TIMEOUT_S = 30
NODES = ("primary", "standby")


class UsageError(Exception):
    pass


def load_outputs(args: argparse.Namespace) -> dict:
    if args.outputs:
        try:
            text = open(args.outputs, encoding="utf-8").read()  # noqa: SIM115 - read once
        except OSError as e:
            raise UsageError(f"--outputs {args.outputs}: {e.strerror}") from None
    else:
        argv = shlex.split(os.environ.get("PAIRCTL_OUTPUTS_CMD", "pulumi stack output --json"))
        if args.stack:
            argv += ["--stack", args.stack]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UsageError(f"cannot run {' '.join(argv)}: {e}") from None
        if proc.returncode != 0:
            raise UsageError(f"{' '.join(argv)} failed: {proc.stderr.strip()[-300:]}")
        text = proc.stdout
    try:
        outputs = json.loads(text)
        nodes = {n: outputs["nodes"][n] for n in NODES}
        for n in NODES:
            nodes[n]["public_ipv4"], nodes[n]["droplet_id"] = str(nodes[n]["public_ipv4"]), int(nodes[n]["droplet_id"])
        return {"reserved_ip": str(outputs["reserved_ip"]), "nodes": nodes}
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"the stack outputs lack reserved_ip or nodes.primary/standby "
                         f".public_ipv4/.droplet_id ({type(e).__name__}: {e})") from None


def node_status(host: str, root: str = "") -> dict:
    """Both read-only status commands in one SSH session; {"error": ...} when the node cannot say.
    `root` prefixes the scripts' path (a lab node's root; empty on a droplet)."""
    remote = "; ".join(f"sudo -n {shlex.quote(f'{root}{LIBEXEC}/{script}')} status"
                       for script in ("mt-failover", "mt-deploy"))
    argv = shlex.split(os.environ.get("PAIRCTL_SSH", "ssh -o BatchMode=yes -o ConnectTimeout=10"))
    try:
        proc = subprocess.run([*argv, f"{SSH_USER}@{host}", remote], capture_output=True, text=True,
                              timeout=SSH_TIMEOUT_S, check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"ssh {host}: {e}"}
    doc: dict = {}
    for line in proc.stdout.splitlines():
        try:
            part = json.loads(line)
        except ValueError:
            continue
        if isinstance(part, dict):
            doc["failover" if "droplet_id" in part else "deploy"] = part
    if not doc:
        last = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": f"ssh {host}: {last[:200]}"}
    return doc


def api_holder(reserved_ip: str) -> tuple[int | None, str]:
    """(droplet ID or None, '' or why the API could not say). Sends the token to DO_API_URL only."""
    token = os.environ.get("DIGITALOCEAN_READ_TOKEN", "")
    if not token:
        return None, "no DIGITALOCEAN_READ_TOKEN"
    base = os.environ.get("DO_API_URL", "https://api.digitalocean.com").rstrip("/")
    if urllib.parse.urlsplit(base).scheme != "https" and os.environ.get("PAIRCTL_ALLOW_HTTP") != "1":
        return None, "DO_API_URL is not https (PAIRCTL_ALLOW_HTTP=1 is for tests only)"
    req = urllib.request.Request(f"{base}/v2/reserved_ips/{reserved_ip}",
                                 headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as resp:
            droplet = json.loads(resp.read(1 << 20))["reserved_ip"].get("droplet")
    except urllib.error.HTTPError as e:
        return None, f"API HTTP {e.code}"
    except (OSError, ValueError, KeyError, AttributeError) as e:
        return None, f"API: {type(e).__name__}"
    return (droplet.get("id") if isinstance(droplet, dict) else None), ""


def collect(outputs: dict, remote_root: str = "") -> dict:
    with ThreadPoolExecutor(max_workers=3) as pool:
        holder_f = pool.submit(api_holder, outputs["reserved_ip"])
        node_f = {n: pool.submit(node_status, outputs["nodes"][n]["public_ipv4"],
                                 remote_root.replace("{node}", n).rstrip("/")) for n in NODES}
        holder, why = holder_f.result()
        nodes = {n: summarize(n, outputs["nodes"][n], node_f[n].result()) for n in NODES}
    by_id = {outputs["nodes"][n]["droplet_id"]: n for n in NODES}
    report = {"reserved_ip": outputs["reserved_ip"], "holder": {"droplet_id": holder, "node": by_id.get(holder),
                                                               "error": why or None}, "nodes": nodes}
    report["problems"] = problems(report)
    report["redundant"] = not report["problems"]
    return report


def summarize(name: str, facts: dict, doc: dict) -> dict:
    failover, deploy = doc.get("failover", {}), doc.get("deploy", {})
    token = failover.get("token_check") or {}
    return {
        "node": name, "droplet_id": facts["droplet_id"], "public_ipv4": facts["public_ipv4"],
        "reachable": "error" not in doc, "error": doc.get("error"),
        "vrrp_state": failover.get("vrrp_state") or deploy.get("vrrp_state"),
        "vrrp_since": failover.get("vrrp_since") or deploy.get("vrrp_since"),
        "healthy": deploy.get("healthy"), "maintenance": deploy.get("maintenance"),
        "version": deploy.get("running_version") or deploy.get("configured_version"),
        "token_ok": token.get("ok"), "token_checked": token.get("time"), "token_result": token.get("result"),
        "transitions": failover.get("transitions") or [],
    }


def problems(report: dict) -> list[str]:
    nodes = list(report["nodes"].values())
    found = [f"{n['node']}: unreachable ({n['error']})" for n in nodes if not n["reachable"]]
    masters = [n for n in nodes if n["vrrp_state"] == "MASTER"]
    if len(masters) != 1:
        found.append(f"{len(masters)} nodes are MASTER (want exactly 1)")
    holder = report["holder"]
    if len(masters) == 1 and holder["error"] is None and holder["droplet_id"] != masters[0]["droplet_id"]:
        found.append(f"the API says the reserved IP is on {holder['node'] or holder['droplet_id']}, "
                     f"not on the MASTER {masters[0]['node']}")
    backups = [n for n in nodes if n["vrrp_state"] == "BACKUP" and n["healthy"] and n["token_ok"]]
    if not backups:
        found.append("no healthy BACKUP with a working token: a failure now would not fail over")
    return found


def _ago(epoch: float | None, now: float) -> str:
    if not epoch:
        return "-"
    seconds = max(0, int(now - epoch))
    return f"{seconds}s ago" if seconds < 120 else f"{seconds // 60}m ago" if seconds < 7200 else \
        f"{seconds // 3600}h ago"


def render_table(report: dict, now: float) -> str:
    h = report["holder"]
    holder = (f"{h['node'] or 'droplet'} (droplet {h['droplet_id']})" if h["droplet_id"] else
              "nobody" if h["error"] is None else f"unknown: {h['error']}")
    lines = [f"reserved IP {report['reserved_ip']}: held by {holder} per the API", ""]
    rows = [("node", "droplet", "vrrp", "since", "health", "version", "token check", "last transitions")]
    for n in report["nodes"].values():
        if not n["reachable"]:
            rows.append((n["node"], str(n["droplet_id"]), "?", "-", "?", "?", "?", n["error"] or ""))
            continue
        health = "drained" if n["maintenance"] else "ok" if n["healthy"] else "FAILING" if n["healthy"] is False else "?"
        token = {True: "ok", False: "FAILING", None: "?"}[n["token_ok"]] + f" {_ago(n['token_checked'], now)}"
        moves = ", ".join(f"{t.get('to')} {t.get('ts', '')[5:19]}" for t in n["transitions"][-3:]) or "-"
        rows.append((n["node"], str(n["droplet_id"]), str(n["vrrp_state"]), _ago(n["vrrp_since"], now), health,
                     str(n["version"] or "?"), token, moves))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    lines += ["redundant: yes"] if report["redundant"] else ["redundant: NO"] + [f"  - {p}" for p in report["problems"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pairctl.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="one table: the API's holder and each node's state")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--stack", help="pulumi stack name (passed to the outputs command)")
    source.add_argument("--outputs", help="a saved `pulumi stack output --json`")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--remote-root", default="", metavar="PREFIX",
                   help="the nodes' files live under PREFIX ({node} is replaced by the node's name): the lab")
    args = parser.parse_args(argv)
    try:
        outputs = load_outputs(args)
    except UsageError as e:
        print(f"pairctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    report = collect(outputs, args.remote_root)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if args.json else render_table(report, time.time()))
    return EXIT_OK if report["redundant"] else EXIT_DEGRADED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
