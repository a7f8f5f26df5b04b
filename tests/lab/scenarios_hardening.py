"""Hardening, proven in the lab: a rogue VRRP speaker is ignored, SSH is closed to outsiders and
to root, and only the app's ports answer from the internet.

Registered with the drill (`make drill`): `rogue-vrrp`, `ssh-from-outside`, `http-open`,
`deploy-not-root`.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.lab import traffic
from tests.lab.drill import Traffic, scenario
from tests.lab.lab import (
    ADMIN_ADDR,
    CLIENT_ADDR,
    DEPLOY_USER,
    NODES,
    PRIVATE,
    PUBLIC,
    RESERVED_IP,
    ROGUE_ADDR,
    ROUTER_ID,
    Lab,
    in_ns,
    node_paths,
    ns,
)

CLOSED_PORTS = (8081, 5432, 2375, 3306)  # a listener on the node that the internet must not reach


def vrrp_drops(node: str) -> int:
    """Packets the node's ruleset dropped as VRRP from anyone but the peer (its counter)."""
    out = in_ns(node, "nft", "list", "chain", "inet", "minitwit_ha", "input").stdout
    m = re.search(r"meta l4proto vrrp counter packets (\d+)", out)
    return int(m.group(1)) if m else -1


@scenario("rogue-vrrp")
def rogue_vrrp(lab: Lab, workdir: Path, runs: int) -> dict:
    active = lab.wait_pair_ready(timeout=30)
    before = lab.transitions()
    drops_before = {n: vrrp_drops(n) for n in NODES}
    gen = Traffic(lab, workdir / "rogue-vrrp.jsonl").start()
    try:
        out = in_ns("rogue", sys.executable, "-m", "tests.lab.rogue", "--vrid", str(ROUTER_ID), "--priority",
                    "254", "--src", ROGUE_ADDR, "--to", PRIVATE["primary"], "--to", PRIVATE["standby"],
                    "--seconds", "5", "--interval", "0.1", timeout=30)
        time.sleep(1.5)  # longer than the master-down interval: a takeover would have happened by now
    finally:
        window = gen.stop()
    drops = {n: vrrp_drops(n) - drops_before[n] for n in NODES}
    transitions = lab.transitions() - before
    holder = lab.holder()
    entry = {
        "name": "rogue-vrrp", "requests": len(window), "failed": len(traffic.failed(window)),
        "transitions": transitions, "holder_before": active, "holder_after": holder,
        "rogue_adverts_sent": int(re.search(r"sent (\d+)", out.stdout).group(1)),
        "dropped_by_firewall": drops,
    }
    entry["passed"] = (transitions == 0 and holder == active and entry["failed"] == 0
                       and all(d > 0 for d in drops.values()) and entry["rogue_adverts_sent"] > 0)
    entry["summary"] = (f"{entry['rogue_adverts_sent']} rogue adverts (prio 254), dropped {drops}, "
                        f"transitions {transitions}, holder {active}->{holder}")
    return entry


def _ssh(lab: Lab, node: str, source: str, user: str = DEPLOY_USER,
         extra: tuple[str, ...] = ()) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `id -un` over ssh."""
    argv = lab.ssh_argv(node, source=source, user=user)
    argv = argv[:-1] + list(extra) + [argv[-1], "id -un"]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return 255, "", "timed out"
    return proc.returncode, proc.stdout.strip(), proc.stderr.strip()


@scenario("ssh-from-outside")
def ssh_from_outside(lab: Lab, workdir: Path, runs: int) -> dict:
    checks = {}
    for node in NODES:
        rc, out, err = _ssh(lab, node, CLIENT_ADDR)
        checks[f"{node}: outsider {CLIENT_ADDR}"] = ("dropped", rc != 0 and "timed out" in err.lower(), err[-120:])
        rc, out, err = _ssh(lab, node, ADMIN_ADDR)
        checks[f"{node}: admin as deploy"] = ("connects", rc == 0 and out == DEPLOY_USER, out or err[-120:])
        rc, out, err = _ssh(lab, node, ADMIN_ADDR, user="root")
        checks[f"{node}: admin as root"] = ("refused", rc != 0 and "Permission denied" in err, err[-120:])
        rc, out, err = _ssh(lab, node, ADMIN_ADDR, extra=("-o", "PubkeyAuthentication=no", "-o",
                                                          "PreferredAuthentications=password,keyboard-interactive"))
        checks[f"{node}: password login"] = ("refused", rc != 0 and "Permission denied" in err, err[-120:])
    failed = [k for k, (_, ok, _) in checks.items() if not ok]
    return {
        "name": "ssh-from-outside", "passed": not failed,
        "checks": {k: {"expected": exp, "ok": ok, "output": out} for k, (exp, ok, out) in checks.items()},
        "summary": "all as expected" if not failed else f"unexpected: {failed}",
    }


def _connect(src: str, host: str, port: int, timeout: float = 2.0) -> str:
    """From the client namespace: 'open', 'refused' or 'dropped' (no answer within the timeout)."""
    code = (f"import socket,sys\ns=socket.socket();s.settimeout({timeout});s.bind(('{src}',0))\n"
            f"try:\n s.connect(('{host}',{port}));print('open')\n"
            "except ConnectionRefusedError:\n print('refused')\n"
            "except (TimeoutError,socket.timeout):\n print('dropped')\n")
    out = in_ns("client", sys.executable, "-c", code, timeout=timeout + 10)
    return out.stdout.strip()


@scenario("http-open")
def http_open(lab: Lab, workdir: Path, runs: int) -> dict:
    checks: dict[str, tuple[str, str]] = {}
    for url in [f"http://{RESERVED_IP}/latest", *(f"http://{PUBLIC[n]}/latest" for n in NODES)]:
        status, headers = lab.http(url)
        checks[f"GET {url}"] = ("200", str(status))
    listeners = []
    try:
        for node in NODES:
            # Something listening on ports the firewall must close: only the ruleset can keep it dark.
            for port in CLOSED_PORTS:
                listeners.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns(node), sys.executable, "-c",
                     "import socket,time;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);"
                     f"s.bind(('0.0.0.0',{port}));s.listen();time.sleep(60)"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        for node in NODES:
            for port in CLOSED_PORTS:
                checks[f"{PUBLIC[node]}:{port} from the internet"] = ("dropped", _connect(CLIENT_ADDR, PUBLIC[node], port))
            checks[f"{PUBLIC[node]}:443 (open, nothing listening)"] = ("refused", _connect(CLIENT_ADDR, PUBLIC[node], 443))
            checks[f"{PUBLIC[node]}:22 from outside admin CIDRs"] = ("dropped", _connect(CLIENT_ADDR, PUBLIC[node], 22))
            checks[f"{PUBLIC[node]}:22 from an admin address"] = ("open", _connect(ADMIN_ADDR, PUBLIC[node], 22))
            # Control: the listener itself works (from inside the node), so "dropped" means the firewall.
            local = in_ns(node, sys.executable, "-c",
                          f"import socket;socket.create_connection(('127.0.0.1',{CLOSED_PORTS[0]}),2);print('open')",
                          check=False)
            checks[f"{node} 127.0.0.1:{CLOSED_PORTS[0]} from the node itself"] = ("open", local.stdout.strip())
    finally:
        for p in listeners:
            p.kill()
            p.wait()
    failed = [k for k, (want, got) in checks.items() if want != got]
    return {
        "name": "http-open", "passed": not failed,
        "checks": {k: {"expected": want, "got": got} for k, (want, got) in checks.items()},
        "summary": f"{len(checks)} checks" + ("" if not failed else f"; unexpected: {json.dumps(failed)}"),
    }


def _ssh_run(lab: Lab, node: str, command: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `command` run as deploy over SSH from the admin address."""
    argv = lab.ssh_argv(node, source=ADMIN_ADDR)
    argv = argv[:-1] + list(extra) + [argv[-1], command]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return 255, "timed out"
    return proc.returncode, (proc.stdout + proc.stderr).strip()


@scenario("deploy-not-root")
def deploy_not_root(lab: Lab, workdir: Path, runs: int) -> dict:
    """`deploy` (the rollout's key) cannot become root, the droplets' sudoers says so, and the
    rollout's own commands still run through it."""
    checks: dict[str, tuple[str, bool, str]] = {}
    owner = f"drill-{int(time.time())}"
    for node in NODES:
        paths = node_paths(node)
        deploy, failover = paths.script("mt-deploy"), paths.script("mt-failover")
        refused = {
            "sudo -n true": "sudo -n true",
            "sudo -n bash": "sudo -n bash -c 'id -u'",
            "sudo VAR=x mt-deploy": f"sudo -n MT_DEPLOY_ROOT=/tmp {deploy} status",
            "sudo -E mt-deploy": f"MT_DEPLOY_ROOT=/tmp sudo -n -E {deploy} status",
            # -l asks sudo without running: were it allowed, reclaim would move the reserved IP.
            "sudo mt-failover reclaim": f"sudo -n -l {failover} reclaim",
            "sudo -u root -s": "sudo -n -s id -u",
        }
        for what, command in refused.items():
            rc, out = _ssh_run(lab, node, command)
            checks[f"{node}: {what}"] = ("refused", rc != 0 and out.strip() != "0", out[-160:])
        # The rollout's commands, as scripts/rollout.py and pairctl send them.
        rc, out = _ssh_run(lab, node, f"sudo -n {deploy} status")
        checks[f"{node}: sudo mt-deploy status"] = ("runs", rc == 0 and out.startswith("{"), out[-160:])
        rc, out = _ssh_run(lab, node, f"sudo -n {deploy} lock {owner} && sudo -n {deploy} unlock {owner}")
        checks[f"{node}: sudo mt-deploy lock/unlock"] = ("runs", rc == 0, out[-160:])
        # Allowed, asked with -l: a lab node's mt-failover finds its env file only through
        # MT_FAILOVER_ENV, which sudo (rightly) does not pass on; on a droplet it runs as is.
        rc, out = _ssh_run(lab, node, f"sudo -n -l {failover} status")
        checks[f"{node}: sudo mt-failover status"] = ("allowed", rc == 0 and f"{failover} status" in out, out[-160:])
        # No tunnels through a stolen deploy key (sshd: AllowTcpForwarding no).
        rc, out = _ssh_run(lab, node, "true", extra=("-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:22"))
        checks[f"{node}: ssh -R tunnel"] = ("refused", rc != 0 and "forwarding failed" in out, out[-160:])
    failed = [k for k, (_, ok, _) in checks.items() if not ok]
    return {
        "name": "deploy-not-root", "passed": not failed,
        "checks": {k: {"expected": exp, "ok": ok, "output": out} for k, (exp, ok, out) in checks.items()},
        "summary": f"{len(checks)} checks, all as expected" if not failed else f"unexpected: {failed}",
    }
