"""`make drill TWINS=1`: app-crash, node-down and holder-reboot on booted, stack-provisioned twins,
one run each.

The same limits as the namespace lab (tests/lab/drill.py limits_for, with the fake API's action
time the report states): an app crash costs no request and no IP move; a dead node's IP moves
once, within detection + the API's requests + its action. A `systemctl reboot` of the holder
(tests/twins/scenarios.py) meets the lab's reboot limits (tests/lab/scenarios_reboot.py): no
request fails, the handover unit's stop moves the IP once before the machine goes, within the
API's action time + 5 s, and the node comes back as BACKUP. Acknowledged writes are all in the
shared database, none twice, and no secret leaves its 0600 home.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.needs import need

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.lab, pytest.mark.slow]
SCENARIOS = ("app-crash", "node-down", "holder-reboot")
REBOOTS = ("holder-reboot",)   # the lab's reboot limits and checks, not limits_for's


def _missing() -> str | None:
    from tests.lab.lab import missing as lab_missing
    from tests.twins.twins import missing

    return missing() or lab_missing()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    need(_missing())
    path = tmp_path_factory.mktemp("twins-drill") / "drill-report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TWIN_ROOT": "/var/tmp/minitwit-ha-twins-drill",
           "TWIN_PREFIX": "mttd"}
    proc = subprocess.run([sys.executable, "-m", "tests.lab", "drill", "--twins", "--runs", "1", "--steady-s", "0",
                           "--scenarios", ",".join(SCENARIOS), "--report", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert path.exists(), f"no report written:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(path.read_text())
    data["_exit"], data["_out"] = proc.returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return data


def test_the_report_says_it_ran_on_twins(report):
    assert report["twins"] is True
    assert [s["name"] for s in report["scenarios"]] == list(SCENARIOS)


def _limits(name: str, action_s: float) -> dict[str, float]:
    """The namespace lab's limits for `name`, without the observers' (twins have no Prometheus)."""
    from tests.lab.drill import EXTRA_MOVE_LIMITS, OBSERVER_LIMITS, limits_for
    from tests.lab.scenarios_reboot import reboot_limits

    if name in REBOOTS:
        return {**reboot_limits(action_s, of_holder=name == "holder-reboot"), "ip_moves": EXTRA_MOVE_LIMITS[name]}
    return {k: v for k, v in limits_for(name, action_s).items() if k not in OBSERVER_LIMITS}


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_meets_the_namespace_labs_limits(report, name):
    entry = next(s for s in report["scenarios"] if s["name"] == name)
    want = _limits(name, report["api_action_s"])
    assert set(entry["limits"]) == set(want), entry["limits"]
    for key, limit in want.items():
        got = entry["limits"][key]["got"]
        assert got is not None and got <= limit, f"{name}: {key} {got} > {limit}\n{json.dumps(entry, indent=2)}"
    assert entry["rows_lost"] == 0, entry
    assert name in REBOOTS or entry["single_master"], entry  # a reboot's entry judges its own masters
    assert entry["passed"], json.dumps(entry, indent=2)


@pytest.mark.parametrize("name", REBOOTS)
def test_a_real_reboot_hands_over_first_and_comes_back_as_backup(report, name):
    entry = next(s for s in report["scenarios"] if s["name"] == name)
    stop = entry["stop"]
    # The handover unit's ExecStop ran (systemd, not the drill, started it) and waited for the move.
    assert stop.get("handover") == "done" and stop.get("exit") == 0, json.dumps(entry, indent=2)
    assert report["api_action_s"] <= stop["handover_s"] <= entry["stop_s"], stop
    assert entry["ip_moves_own"] == 1 and entry["holder_after"] != entry["holder_before"] == entry["node"], entry
    assert entry["node_after"] == "BACKUP" and entry["checks"] and all(entry["checks"].values()), entry["checks"]


def test_no_write_twice_no_secret_out_clean_keepalived_log(report):
    assert report["duplicate_rows"] == 0
    assert report["secrets_audit"]["clean"], report["secrets_audit"]
    assert report["keepalived_log_clean"], report["keepalived_log_findings"]
    assert report["passed"] and report["_exit"] == 0, report["_out"]
