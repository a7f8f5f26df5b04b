"""Drill scenarios that only twins can play: a real `systemctl reboot` of a node.

Registered under the namespace lab's names, replacing the lab's version when the drill runs on
twins (tests/lab/__main__.py imports this module after the lab's scenario modules). The lab has
no systemd and plays a reboot as the handover unit's ExecStop plus stopping the daemons; a twin
reboots for real: systemd stops every unit in its order (the stack's handover unit, when the node
has one, hands the reserved IP over before HAProxy, the app and keepalived stop), the machine
goes away, tests.twins.boot starts it again, and the stack's units come up as on a droplet.

- `holder-reboot`: the node holding the reserved IP. The same limits as the lab's: 0 failed
  requests, one IP move, the stop (reboot asked -> machine gone) within the API's action time
  + 5 s, the node back as BACKUP and the IP left on the peer.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.lab import traffic
from tests.lab.drill import Traffic, check_limits, peer, scenario
from tests.lab.lab import wait_for

STOP_EXTRA_S = 5.0        # the lab's limit: the stop may take the API's action time plus this
BACK_TIMEOUT_S = 180.0    # a twin boots in tens of seconds on a loaded machine


def stopped_at(lab, node: str, after: float) -> float | None:
    """When the twin's machine went away (nspawn's exit, from tests.twins.boot's log) after `after`."""
    try:
        text = lab.tw.log(f"{node}-nspawn").read_text(errors="replace")
    except OSError:
        return None
    times = [float(ln.rsplit(" at ", 1)[1]) for ln in text.splitlines() if ln.startswith("twin-boot: nspawn exited")]
    return next((t for t in times if t > after), None)


@scenario("holder-reboot")
def holder_reboot(lab, workdir: Path, runs: int) -> dict:
    active = lab.wait_pair_ready(timeout=60)
    node = active
    action_s = lab.api_timing["action_s"]
    gen = Traffic(lab, workdir / "holder-reboot.jsonl").start()
    notes: list[str] = []
    t0 = time.time()
    boot_s = None
    try:
        time.sleep(1.0)
        t_reboot = time.time()
        lab.fault(node, "reboot")
        try:
            lab.wait_booted(node, after=t_reboot, timeout=BACK_TIMEOUT_S)
            wait_for(lambda: lab.vrrp_state(node) == "BACKUP", 60, f"{node} back as BACKUP")
            boot_s = round(time.time() - t_reboot, 1)
        except Exception as exc:  # noqa: BLE001 - reported; the drill's next wait says more
            notes.append(str(exc))
        time.sleep(2.0)   # after the boot: no move back, nothing fails
    finally:
        window = gen.stop()
    gone = stopped_at(lab, node, t_reboot)
    moves = lab.moves(t0, time.time())
    failed = traffic.failed(window)
    holder_after = lab.holder()
    entry = {
        "name": "holder-reboot", "node": node, "twins": True, "holder_before": active, "holder_after": holder_after,
        "requests": len(window), "failed": len(failed), "ip_moves": len(moves),
        "stop_s": None if gone is None else round(gone - t_reboot, 3), "boot_s": boot_s,
        "node_after": lab.vrrp_state(node), "notes": notes,
        "failed_examples": [{k: r.get(k) for k in ("t", "status", "error", "served_by")} for r in failed[:5]],
    }
    stop_limit = action_s + STOP_EXTRA_S
    entry["limits"] = check_limits(entry, {"failed": 0, "stop_s": stop_limit})
    want = {"ip_moves": 1, "holder_after": peer(active), "node_after": "BACKUP"}
    entry["checks"] = {f"{k} {v}": entry.get(k) == v for k, v in want.items()}
    entry["passed"] = all(v["ok"] for v in entry["limits"].values()) and all(entry["checks"].values())
    entry["target_s"] = stop_limit
    entry["summary"] = (f"{node}: systemctl reboot, gone in {entry['stop_s']} s (limit {stop_limit:g}), back as "
                        f"{entry['node_after']} in {boot_s} s, holder {active}->{holder_after}, failed {len(failed)}")
    return entry
