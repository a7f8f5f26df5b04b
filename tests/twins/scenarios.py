"""Drill scenarios that only twins can play: a real `systemctl reboot` of a node.

Registered under the namespace lab's names, replacing the lab's version when the drill runs on
twins (tests/lab/__main__.py imports this module after the lab's scenario modules). The lab has
no systemd and plays a reboot as the handover unit's ExecStop plus stopping the daemons; a twin
reboots for real: systemd stops every unit in its order (the stack's handover unit, when the node
has one, hands the reserved IP over before HAProxy, the app and keepalived stop), the machine
goes away, tests.twins.boot starts it again, and the stack's units come up as on a droplet.

- `holder-reboot`: the node holding the reserved IP. The lab's limits and checks
  (tests/lab/scenarios_reboot.py judge): 0 failed requests, one IP move, the stop (reboot asked ->
  machine gone) within the API's action time + 5 s, the handover unit's stop `done` (read from the
  twin's journal of the boot before), the node back as BACKUP with its own app running and the IP
  left on the peer; and no acknowledged write lost.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from infra.node import HANDOVER_UNIT
from tests.lab import traffic
from tests.lab.drill import Traffic, rows_lost, scenario
from tests.lab.lab import wait_for
from tests.lab.scenarios_reboot import judge
from tests.twins.twinlab import APP_UNIT

BACK_TIMEOUT_S = 180.0    # a twin boots in tens of seconds on a loaded machine


def stopped_at(lab, node: str, after: float) -> float | None:
    """When the twin's machine went away (nspawn's exit, from tests.twins.boot's log) after `after`."""
    try:
        text = lab.tw.log(f"{node}-nspawn").read_text(errors="replace")
    except OSError:
        return None
    times = [float(ln.rsplit(" at ", 1)[1]) for ln in text.splitlines() if ln.startswith("twin-boot: nspawn exited")]
    return next((t for t in times if t > after), None)


def handover_of_last_boot(lab, node: str) -> dict:
    """What the handover unit's ExecStop did in the boot before this one, from the twin's own
    (persistent) journal: its outcome line (`mt-failover handover` prints one JSON object) and
    whether systemd saw the stop end cleanly. Empty when the unit never ran its stop."""
    out = lab.tw.machine(node, "journalctl", "--no-pager", "-o", "cat", "-b", "-1", "-u", HANDOVER_UNIT).stdout
    lines = out.splitlines()
    docs = [ln for ln in lines if ln.startswith("{")]
    if not docs:
        return {}
    try:
        doc = json.loads(docs[-1])
    except ValueError:
        return {"handover": "unreadable", "log": docs[-1:]}
    failed = [ln for ln in lines if "Control process exited" in ln or "Failed with result" in ln]
    return {"handover": doc.get("handover"), "handover_s": doc.get("seconds"), "detail": doc.get("detail"),
            "exit": 0 if not failed else 1, "log": failed[-3:]}


@scenario("holder-reboot")
def holder_reboot(lab, workdir: Path, runs: int) -> dict:
    active = lab.wait_pair_ready(timeout=60)
    node = active
    action_s = lab.api_timing["action_s"]
    gen = Traffic(lab, workdir / "holder-reboot.jsonl").start()
    notes: list[str] = []
    t0 = time.time()
    boot_s = None
    stop: dict = {}
    app_back = False
    try:
        time.sleep(1.0)
        t_reboot = time.time()
        lab.fault(node, "reboot")
        try:
            lab.wait_booted(node, after=t_reboot, timeout=BACK_TIMEOUT_S)
            wait_for(lambda: lab.vrrp_state(node) == "BACKUP", 60, f"{node} back as BACKUP")
            boot_s = round(time.time() - t_reboot, 1)
            stop = handover_of_last_boot(lab, node)
            app_back = lab.tw.machine(node, "systemctl", "is-active", "--quiet", APP_UNIT).returncode == 0
        except Exception as exc:  # noqa: BLE001 - reported; the drill's next wait says more
            notes.append(str(exc))
        time.sleep(2.0)   # after the boot: no move back, nothing fails
    finally:
        window = gen.stop()
    gone = stopped_at(lab, node, t_reboot)
    moves = lab.moves(t0, time.time())
    failed = traffic.failed(window)
    holder_after = lab.holder()
    # The drill counts moves from before this scenario settled (run_extra); this count starts here.
    entry = {
        "name": "holder-reboot", "node": node, "twins": True, "holder_before": active, "holder_after": holder_after,
        "requests": len(window), "failed": len(failed), "ip_moves": len(moves), "ip_moves_own": len(moves),
        "stop": {**stop, "stop_s": None if gone is None else round(gone - t_reboot, 3)},
        "stop_s": None if gone is None else round(gone - t_reboot, 3), "boot_s": boot_s,
        "node_after": lab.vrrp_state(node), "rows_lost": rows_lost(lab, window), "notes": notes,
        "failed_examples": [{k: r.get(k) for k in ("t", "status", "error", "served_by")} for r in failed[:5]],
    }
    # Acknowledged writes survive the reboot too (the drill's own check on the shared database).
    # And the node's own app is back (its restart policy at boot): BACKUP alone would also be
    # reached with HAProxy serving only the peer's app.
    entry["checks"] = {"rows_lost 0": entry["rows_lost"] == 0, "app back": app_back}
    stop_limit = judge(entry, action_s, active, of_holder=True)
    entry["summary"] = (f"{node}: systemctl reboot, handover {stop.get('handover')} in {stop.get('handover_s')} s, "
                        f"gone in {entry['stop_s']} s (limit {stop_limit:g}), back as {entry['node_after']} in "
                        f"{boot_s} s, holder {active}->{holder_after}, failed {len(failed)}")
    return entry
