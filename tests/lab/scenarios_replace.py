"""Replacing a node (issue #12): `pulumi up --replace <standby droplet> --target-dependents`, played
in the lab in the engine's order, under traffic, with a third namespace as the new droplet.

The engine's order (infra/ha_pair.py NodeChain; the retire step is delete-before-replace):
1. the new droplet is created: a namespace on br-inet and br-vpc with new addresses, its droplet
   ID and metadata registered with the fake API (nothing runs on it yet);
2. the old droplet's retire `delete` runs ON THE OLD node: infra/steps.py retire_command's own
   script text, in the old node's namespace, with `systemctl` and `sudo` played by this module
   (the lab has no systemd): the reconciler and the watcher, then keepalived, stop; it waits until
   the metadata service says the reserved IP left; then HAProxy stops;
3. the new retire is created (a no-op echo);
4. the survivor is re-rendered with the new peer (failover settings -> restart of the watcher and
   the reconciler, nftables, HAProxy reload, keepalived reload) and, in parallel, the new node is
   provisioned (bootstrap..app, HAProxy, keepalived). Each node's keepalived-start step waits for
   both nodes' keepalived steps, so the engine re-points the survivor first (`peer-first`: the new
   node starts, hears the survivor and stays BACKUP). Both orders are played:
   - `new-first` (the worse one, for defence in depth: a `pulumi up --target` without dependents,
     a hand-run step): the new node's keepalived starts while the survivor still unicasts to the
     old address and its nftables drop the new one, so the new node hears nothing and becomes
     MASTER; the survivor is re-pointed REPOINT_LAG_S later. mt-failover's takeover must not move
     the IP off the survivor, which holds it and serves (`deaf start`);
   - `peer-first`: the engine's order.
5. the old droplet is deleted: its processes end, the API forgets it, its namespace goes.

The scenario replaces `standby` with `standby2` (192.0.2.13 / 198.51.100.13, new-first), then
replaces `standby2` with a rebuilt `standby` (its original addresses and droplet ID, peer-first),
so the lab is back in its usual shape for later scenarios and the rest of the lab code keeps its
two node names. Limits, over the whole scenario: at most 1 IP move, 0 failed requests; two MASTERs
at once (all three nodes' vrrp_state sampled every 0.1 s, a MASTER counted only while its
keepalived runs) for at most 1 s in the peer-first pass; the new-first pass reports its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from infra.node import STEP_FAILOVER, STEP_FIREWALL, STEP_HAPROXY, STEP_KEEPALIVED, files_for_step, render_node_files
from infra.steps import retire_command
from tests.lab import lab as labmod
from tests.lab import traffic
from tests.lab.drill import Traffic, check_limits, scenario
from tests.lab.lab import LAB_ROOT, Lab, _write, in_ns, node_paths, node_root, ns, sh, wait_for

NEW = {"name": "standby2", "public": "192.0.2.13", "private": "198.51.100.13", "droplet_id": 410000003,
       "links": ("n-inet", "n-vpc")}
OLD = {"name": "standby", "public": labmod.PUBLIC["standby"], "private": labmod.PRIVATE["standby"],
       "droplet_id": labmod.DROPLET_ID["standby"], "links": ("s-inet", "s-vpc")}
SURVIVOR = "primary"
REPOINT_LAG_S = 3.0       # new-first: how long the survivor's re-point lags the new node's keepalived
DOUBLE_MASTER_MAX_S = 1.0
SAMPLE_S = 0.1
# The units retire_command stops -> the lab's process keys of a node.
UNITS = {"minitwit-ha-reconcile.service": "reconcile", "minitwit-ha-healthwatch.service": "watch",
         "keepalived": "keepalived", "haproxy": "haproxy"}


# -- systemctl and sudo for the retire script (the lab has no systemd) ---------------------------
def shim_dir() -> Path:
    """`sudo` (runs its command) and `systemctl` (this module's `systemctl` below) for one script."""
    d = LAB_ROOT / "retire-bin"
    _write(d / "sudo", '#!/bin/sh\nexec "$@"\n', 0o755)
    _write(d / "systemctl", f'#!/bin/sh\nexec {sys.executable} -m tests.lab.scenarios_replace systemctl "$@"\n', 0o755)
    return d


def systemctl(argv: list[str]) -> int:
    """`systemctl disable --now UNIT...` inside a lab node: end the node's recorded process for each
    unit (Lab.stop: by PID and start time, SIGKILL after 10 s) and wait for it to exit, as systemd's stop does.
    Reads the lab's state file only; the scenario forgets the stopped processes afterwards."""
    node = os.environ["RETIRE_NODE"]
    if argv[:2] != ["disable", "--now"]:
        print(f"lab systemctl: only `disable --now` is played, got {argv}", file=sys.stderr)
        return 1
    lab = Lab()
    procs = lab.procs()
    for unit in argv[2:]:
        key = f"{node}-{UNITS.get(unit, unit)}"
        proc = procs.get(key)
        if proc is None or not proc.alive():
            continue
        lab.stop(key, forget=False)
        with open(LAB_ROOT / "logs" / "retire.log", "a") as log:
            log.write(json.dumps({"t": time.time(), "node": node, "stopped": unit}) + "\n")
    return 0


def retire(lab: Lab, old: str) -> dict:
    """The old node's retire `delete`: retire_command's script, run in the old node's namespace."""
    t0 = time.monotonic()
    env = {"PATH": f"{shim_dir()}:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(labmod.REPO),
           "LAB_ROOT": str(LAB_ROOT), "LAB_PREFIX": labmod.PREFIX, "RETIRE_NODE": old}
    proc = in_ns(old, "env", "-i", *[f"{k}={v}" for k, v in env.items()], "sh", "-c",
                 retire_command(node_paths(old)), check=False, timeout=90)
    for key in UNITS.values():
        lab.stop(f"{old}-{key}")  # ended by the script: forget them
    return {"exit": proc.returncode, "seconds": round(time.monotonic() - t0, 3), "out": proc.stdout.strip()[-200:],
            "err": proc.stderr.strip()[-300:]}


# -- the droplets ------------------------------------------------------------------------------
def register(node: dict) -> None:
    """The lab's maps learn the node (its role's priority), as the stack's outputs would."""
    name = node["name"]
    labmod.PUBLIC[name], labmod.PRIVATE[name] = node["public"], node["private"]
    labmod.DROPLET_ID[name], labmod.PRIORITY[name] = node["droplet_id"], labmod.PRIORITY["standby"]


def create_droplet(lab: Lab, node: dict) -> None:
    """Step 1: the droplet exists (network, addresses, API and metadata), nothing runs on it yet."""
    name = node["name"]
    register(node)
    sh("ip", "netns", "add", ns(name))
    lab.state["namespaces"].append(ns(name))
    # The stack's one failover token serves every node of the pair; the lab's per-role token too.
    lab.state["node_token_files"][name] = lab.state["node_token_files"]["standby"]
    lab._save()
    in_ns(name, "ip", "link", "set", "lo", "up")
    lab._link(name, "eth0", node["links"][0], "br-inet", [f"{node['public']}/24"])
    lab._link(name, "eth1", node["links"][1], "br-vpc", [f"{node['private']}/24"])
    lab.api_post("/_lab/droplets", {"add": {"id": node["droplet_id"], "name": name, "public_ipv4": node["public"],
                                            "private_ipv4": node["private"]}})


def provision(lab: Lab, node: dict) -> None:
    """Step 4, the new node: the lab's own node build (files, firewall, app, HAProxy, the watcher,
    the reconciler, keepalived last); sshd and node-exporter when it is a pair role again."""
    name = node["name"]
    _write(Path(node_paths(name).alert_webhook_file), Path(node_paths(SURVIVOR).alert_webhook_file).read_text(), 0o600)
    lab._node(name, lab.state["profile"])
    sshd = node_root(name) / "etc" / "ssh" / "sshd_config"
    if sshd.exists():  # the rebuilt standby: the stack's host key outlives the droplet
        lab.spawn(f"{name}-sshd", name, ["/usr/sbin/sshd", "-D", "-e", "-f", str(sshd)])
    if name in labmod.NODES:
        from tests.lab import observe

        metrics_dir = Path(node_paths(name).metrics_dir)
        metrics_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        lab.spawn(f"{name}-node-exporter", name, observe.node_exporter_argv(str(metrics_dir)),
                  user=observe.exporter_user(), cwd=LAB_ROOT)


def repoint(lab: Lab, survivor: str, new: dict) -> None:
    """Step 4, the survivor: its failover, firewall, HAProxy and keepalived steps with the new peer."""
    paths = node_paths(survivor)
    facts = replace(lab.node_facts(survivor, lab.state["profile"]), peer_private_ip=new["private"],
                    peer_public_ip=new["public"])
    files = render_node_files(facts, compose_text=Path(paths.compose_file).read_text())
    for step in (STEP_FAILOVER, STEP_FIREWALL, STEP_HAPROXY, STEP_KEEPALIVED):
        for f in files_for_step(files, step):
            _write(Path(f.path), f.content, f.mode)
    for key in ("watch", "reconcile"):  # the failover step restarts both
        lab.stop(f"{survivor}-{key}")
    lab.start_daemons(survivor, which=("watch", "reconcile"))
    in_ns(survivor, "nft", "-f", paths.nftables_conf)
    lab.reload_haproxy(survivor)
    keepalived = lab.procs()[f"{survivor}-keepalived"]
    os.kill(keepalived.pid, signal.SIGHUP)  # `systemctl reload keepalived`


def delete_droplet(lab: Lab, old: dict, keep_host_key: bool) -> None:
    """Step 5: the old droplet is destroyed; the stack's host key (a pulumi-tls resource) stays."""
    name = old["name"]
    pid = lab.app_pid(name)
    if pid:
        os.kill(pid, signal.SIGKILL)
    for key in [k for k in lab.procs() if k.startswith(f"{name}-")]:
        lab.stop(key, sig=signal.SIGKILL)
    lab.api_post("/_lab/droplets", {"remove": old["droplet_id"]})
    if name not in labmod.NODES:
        lab.state["node_token_files"].pop(name, None)
    if sh("ip", "netns", "del", ns(name), check=False).returncode == 0:
        lab.state["namespaces"].remove(ns(name))
    lab._save()
    root = node_root(name)
    ssh = root / "etc" / "ssh"
    keep = LAB_ROOT / f"host-key-{name}"
    if keep_host_key and ssh.is_dir():
        shutil.move(str(ssh), keep)
    shutil.rmtree(root, ignore_errors=True)
    if keep.is_dir():
        (root / "etc").mkdir(mode=0o755, parents=True)
        shutil.move(str(keep), ssh)


# -- observation -------------------------------------------------------------------------------
class MasterSampler:
    """Every SAMPLE_S: which of the nodes are MASTER (vrrp-state MASTER and keepalived running)."""

    def __init__(self, lab: Lab, names: list[str]) -> None:
        self.lab, self.names, self.samples = lab, names, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _master(self, name: str) -> bool:
        pidfile = Path(node_paths(name).keepalived_pidfile)
        try:
            pid = int(pidfile.read_text().strip())
            running = Path(f"/proc/{pid}/comm").read_text().strip() == "keepalived"
        except (OSError, ValueError):
            running = False
        return running and self.lab.vrrp_state(name) == "MASTER"

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), [n for n in self.names if self._master(n)]))
            self._stop.wait(SAMPLE_S)

    def start(self) -> MasterSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def double_master_s(self, since: float, until: float) -> float:
        """The longest stretch in [since, until] with two or more MASTERs (seconds)."""
        longest, start = 0.0, None
        for t, masters in self.samples:
            if not since <= t <= until:
                continue
            if len(masters) >= 2:
                start = t if start is None else start
                longest = max(longest, t - start + SAMPLE_S)
            else:
                start = None
        return round(longest, 2)


def replace_node(lab: Lab, old: dict, new: dict, order: str, sampler: MasterSampler) -> dict:
    """One `pulumi up --replace`: the five steps, with the survivor's re-point and the new node's
    keepalived in `order` (new-first | peer-first)."""
    t0 = time.time()
    steps = {}

    def step(name: str, fn) -> None:
        t = time.monotonic()
        fn()
        steps[name] = round(time.monotonic() - t, 3)

    step("create", lambda: create_droplet(lab, new))
    retired: dict = {}
    step("retire", lambda: retired.update(retire(lab, old["name"])))
    if order == "peer-first":
        step("repoint", lambda: repoint(lab, SURVIVOR, new))
        step("provision", lambda: provision(lab, new))
    else:
        step("provision", lambda: provision(lab, new))
        time.sleep(REPOINT_LAG_S)
        step("repoint", lambda: repoint(lab, SURVIVOR, new))
    became_backup = wait_for(lambda: lab.vrrp_state(new["name"]) == "BACKUP", 15)
    step("delete", lambda: delete_droplet(lab, old, keep_host_key=old["name"] in labmod.NODES))
    t1 = time.time()
    log = node_root(new["name"]) / "var" / "log" / "mt-failover.log"  # Lab.node_facts' log_file
    new_log = log.read_text(errors="replace") if log.exists() else ""
    return {"old": old["name"], "new": new["name"], "order": order, "steps_s": steps, "retire": retired,
            "new_backup_after_s": became_backup, "double_master_s": sampler.double_master_s(t0, t1),
            # Asked for during this pass (an assign completes 5 s later, maybe in the next pass).
            "moves": [m for m in lab.moves(t0) if t0 <= m["requested"] <= t1], "t0": t0, "t1": t1,
            "deaf_start_held": "deaf start" in new_log}


@scenario("replace-standby")
def replace_standby(lab: Lab, workdir: Path, runs: int) -> dict:
    lab.wait_pair_ready(timeout=30)
    holder_before = lab.holder()
    t_start = time.time()
    sampler = MasterSampler(lab, [SURVIVOR, OLD["name"], NEW["name"]]).start()
    gen = Traffic(lab, workdir / "replace-standby.jsonl").start()
    passes: list[dict] = []
    notes: list[str] = []
    try:
        time.sleep(1.0)
        passes.append(replace_node(lab, OLD, NEW, "new-first", sampler))
        time.sleep(1.0)
        passes.append(replace_node(lab, NEW, OLD, "peer-first", sampler))
        time.sleep(1.0)
    except Exception as exc:  # noqa: BLE001 - reported; the lab is put back below
        notes.append(f"{type(exc).__name__}: {exc}")
    finally:
        window = gen.stop()
        sampler.stop()
        if ns(NEW["name"]) in lab.state.get("namespaces", []):  # an interrupted pass: no third droplet left
            delete_droplet(lab, NEW, keep_host_key=False)
    failed = traffic.failed(window)
    moves = lab.moves(t_start, time.time())
    by_order = {p["order"]: p for p in passes}
    entry = {
        "name": "replace-standby", "requests": len(window), "failed": len(failed), "ip_moves_own": len(moves),
        "holder_before": holder_before, "holder_after": lab.holder(), "notes": notes,
        "moves_to_new_node": len([m for m in moves if m["to"] == NEW["name"]]),
        "double_master_s": by_order.get("peer-first", {}).get("double_master_s"),
        "double_master_s_new_first": by_order.get("new-first", {}).get("double_master_s"),
        "passes": [{k: v for k, v in p.items() if k not in ("t0", "t1")} for p in passes],
        "failed_examples": [{k: r.get(k) for k in ("t", "status", "error", "served_by")} for r in failed[:5]],
    }
    entry["limits"] = check_limits(entry, {"failed": 0, "double_master_s": DOUBLE_MASTER_MAX_S})
    entry["checks"] = {
        "both passes ran": len(passes) == 2 and not notes,
        "each retire ran to the end": all(p["retire"].get("exit") == 0 for p in passes),
        "each new node became BACKUP": all(p["new_backup_after_s"] is not None for p in passes),
        "new-first: the new node heard nobody and became MASTER (the risk was played)": (
            (entry["double_master_s_new_first"] or 0) > 0),
        # A move to the deaf new node is the fight: its old peer's reconciler then sees it serve.
        "new-first: the deaf new MASTER left the IP on the survivor": entry["moves_to_new_node"] == 0,
        "the pair is back: standby BACKUP": lab.vrrp_state("standby") == "BACKUP",
    }
    entry["passed"] = all(v["ok"] for v in entry["limits"].values()) and all(entry["checks"].values())
    entry["summary"] = (f"moves {len(moves)}, failed {len(failed)}, two MASTERs at most "
                        f"{entry['double_master_s']} s (peer-first) / {entry['double_master_s_new_first']} s "
                        f"(new-first, survivor re-pointed {REPOINT_LAG_S:g} s late)")
    return entry


if __name__ == "__main__":
    if sys.argv[1:2] == ["systemctl"]:
        sys.exit(systemctl(sys.argv[2:]))
    sys.exit(f"usage: {sys.argv[0]} systemctl disable --now UNIT...")
