"""A reboot of either node loses no request (#16), proven in the lab under traffic.

A lab node has no systemd, so a reboot is played the way systemd runs one on a droplet: the
rendered minitwit-ha-handover.service's ExecStop first (the unit is ordered After= everything
that serves, so at shutdown its stop runs before theirs), exactly as written in the node's unit
file, with the unit's Environment=; then what a shutdown stops: HAProxy, the app, keepalived,
the reconciler and the watcher. The node then starts again in boot order (the app, HAProxy, the
watcher, the reconciler, keepalived, then the unit's ExecStart).

Registered with the drill (`make drill`):
- `holder-reboot`: the node holding the reserved IP. 0 failed requests, exactly one IP move, the
  stop (handover + stopping the daemons) within the API's action time + 5 s, the node back as a
  BACKUP and the IP left on the peer (no move back).
- `standby-reboot`: the other node. 0 failed, 0 IP moves, the stop within 5 s (nothing to wait for).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path

from infra.node import HANDOVER_STOP_MARGIN_S, HANDOVER_TIMEOUT_S, HANDOVER_UNIT
from tests.lab import traffic
from tests.lab.drill import Traffic, check_limits, peer, scenario
from tests.lab.lab import LAB_ROOT, Lab, in_ns, node_paths, wait_for

STOP_EXTRA_S = 5.0   # the stop may take the API's action time plus this
BOOT_TIMEOUT_S = 30.0


def unit_lines(node: str) -> dict[str, str]:
    """The handover unit's settings as rendered into the node (last value of each key)."""
    text = (Path(node_paths(node).systemd_dir) / HANDOVER_UNIT).read_text()
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "[")):
            out[key.strip()] = value.strip()
    return out


def run_unit_command(lab: Lab, node: str, key: str) -> subprocess.CompletedProcess:
    """ExecStop / ExecStart of the node's handover unit, in its namespace, with the unit's
    Environment=; killed after the unit's TimeoutStopSec, as systemd would."""
    unit = unit_lines(node)
    argv = shlex.split(unit[key].lstrip("-"))  # "-": systemd ignores its exit code
    env = [f"PATH={LAB_ROOT}/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", unit["Environment"]]
    timeout = float(unit.get("TimeoutStopSec", HANDOVER_TIMEOUT_S + HANDOVER_STOP_MARGIN_S))
    try:
        return in_ns(node, "env", "-i", *env, *argv, check=False, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(e.cmd, -9, e.stdout or "", f"killed after TimeoutStopSec={timeout:g}")


def shutdown(lab: Lab, node: str) -> dict:
    """What `systemctl reboot` does to a node, up to the kernel: the handover, then the services."""
    t0 = time.monotonic()
    proc = run_unit_command(lab, node, "ExecStop")
    handover_s = time.monotonic() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    doc = json.loads(lines[-1]) if lines else {}
    # Then what systemd stops once the handover unit is down: HAProxy, docker (the app) and the
    # reconciler at once (nothing orders them), then keepalived (the reconciler is After= it), then
    # the watcher (keepalived is After= it).
    procs = lab.procs()
    for key in ("haproxy", "reconcile"):
        daemon = procs.get(f"{node}-{key}")
        if daemon is not None and daemon.alive():
            os.kill(daemon.pid, signal.SIGTERM)
    steps = {}

    def stop_app() -> None:
        t = time.monotonic()
        lab.compose(node, "stop")
        steps["app"] = round(time.monotonic() - t, 3)

    app = threading.Thread(target=stop_app)
    app.start()
    for key in ("haproxy", "reconcile", "keepalived", "watch"):
        t = time.monotonic()
        lab.stop(f"{node}-{key}")
        steps[key] = round(time.monotonic() - t, 3)
    app.join()
    return {"exit": proc.returncode, "handover": doc.get("handover"), "detail": doc.get("detail"),
            "handover_s": round(handover_s, 3), "stop_s": round(time.monotonic() - t0, 3),
            "stop_steps_s": steps, "log": proc.stderr.strip().splitlines()[-3:]}


def reboot_limits(action_s: float, of_holder: bool) -> dict[str, float]:
    """What a reboot must meet, in the lab and on twins: nothing fails, and the stop takes at most
    the API's action time + STOP_EXTRA_S on the holder (it waits for the move), STOP_EXTRA_S on the
    other node (nothing to wait for)."""
    return {"failed": 0, "stop_s": action_s + STOP_EXTRA_S if of_holder else STOP_EXTRA_S}


def judge(entry: dict, action_s: float, active: str, of_holder: bool) -> float:
    """Set a reboot entry's limits, checks and verdict (the lab's and the twins' alike): the handover
    done by the holder (`not-holder` on the other node), one IP move of its own to the peer (none),
    the node back as BACKUP. `entry["stop"]` holds the handover's outcome. Returns the stop limit."""
    limits = reboot_limits(action_s, of_holder)
    entry["limits"] = check_limits(entry, limits)
    want = {"handover": "done" if of_holder else "not-holder", "ip_moves_own": 1 if of_holder else 0,
            "holder_after": peer(active) if of_holder else active, "node_after": "BACKUP"}
    stop = entry.get("stop", {})
    entry["checks"] = {**entry.get("checks", {}),
                       **{f"{k} {v}": entry.get(k, stop.get(k)) == v for k, v in want.items()}}
    entry["passed"] = all(v["ok"] for v in entry["limits"].values()) and all(entry["checks"].values())
    entry["target_s"] = limits["stop_s"]
    return limits["stop_s"]


def boot(lab: Lab, node: str) -> float:
    """Start the node in systemd's order; seconds until it is a BACKUP ready to take over."""
    t0 = time.monotonic()
    lab.compose(node, "up", "-d")
    lab.start_daemons(node)
    run_unit_command(lab, node, "ExecStart")
    wait_for(lambda: lab.vrrp_state(node) == "BACKUP", BOOT_TIMEOUT_S, f"{node} to come back as BACKUP")
    return round(time.monotonic() - t0, 3)


def reboot(lab: Lab, workdir: Path, name: str, of_holder: bool) -> dict:
    # Ready twice, 2 s apart: a move the lab's own start-up left in flight is not this reboot's.
    lab.wait_pair_ready(timeout=30)
    time.sleep(2.0)
    active = lab.wait_pair_ready(timeout=30)
    node = active if of_holder else peer(active)
    action_s = lab.api_timing["action_s"]
    gen = Traffic(lab, workdir / f"{name}.jsonl").start()
    notes: list[str] = []
    stop: dict = {}
    boot_s = None
    t0 = time.time()
    try:
        time.sleep(1.0)
        stop = shutdown(lab, node)
        time.sleep(2.0)   # the node is down: the pair serves from the other one alone
        try:
            boot_s = boot(lab, node)
        except Exception as exc:  # noqa: BLE001 - reported, and the drill's next wait_steady says more
            notes.append(str(exc))
        time.sleep(2.0)   # after the boot: no move back, nothing fails
    finally:
        window = gen.stop()
    # The drill counts moves from before this scenario settled (run_extra); this count starts here.
    moves = lab.moves(t0, time.time())
    failed = traffic.failed(window)
    holder_after = lab.holder()
    entry = {
        "name": name, "node": node, "holder_before": active, "holder_after": holder_after,
        "requests": len(window), "failed": len(failed), "ip_moves": len(moves), "ip_moves_own": len(moves),
        "stop": stop,
        "stop_s": stop.get("stop_s"), "boot_s": boot_s, "node_after": lab.vrrp_state(node), "notes": notes,
        "failed_examples": [{k: r.get(k) for k in ("t", "status", "error", "served_by")} for r in failed[:5]],
    }
    stop_limit = judge(entry, action_s, active, of_holder)
    entry["summary"] = (f"{node}: handover {stop.get('handover')} in {stop.get('handover_s')} s, stopped in "
                        f"{stop.get('stop_s')} s (limit {stop_limit:g}), back as {entry['node_after']} in {boot_s} s, "
                        f"holder {active}->{holder_after}, failed {len(failed)}")
    return entry


@scenario("holder-reboot")
def holder_reboot(lab: Lab, workdir: Path, runs: int) -> dict:
    return reboot(lab, workdir, "holder-reboot", of_holder=True)


@scenario("standby-reboot")
def standby_reboot(lab: Lab, workdir: Path, runs: int) -> dict:
    return reboot(lab, workdir, "standby-reboot", of_holder=False)
