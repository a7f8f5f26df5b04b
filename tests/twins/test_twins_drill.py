"""`make drill TWINS=1`: app-crash and node-down on booted, stack-provisioned twins, one run each.

The same limits as the namespace lab (tests/lab/drill.py limits_for, with the fake API's action
time the report states): an app crash costs no request and no IP move; a dead node's IP moves
once, within detection + the API's requests + its action. Acknowledged writes are all in the
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
SCENARIOS = ("app-crash", "node-down")


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


@pytest.mark.parametrize("name", SCENARIOS)
def test_scenario_meets_the_namespace_labs_limits(report, name):
    from tests.lab.drill import OBSERVER_LIMITS, limits_for

    entry = next(s for s in report["scenarios"] if s["name"] == name)
    want = {k: v for k, v in limits_for(name, report["api_action_s"]).items() if k not in OBSERVER_LIMITS}
    assert set(entry["limits"]) == set(want), entry["limits"]
    for key, limit in want.items():
        got = entry["limits"][key]["got"]
        assert got is not None and got <= limit, f"{name}: {key} {got} > {limit}\n{json.dumps(entry, indent=2)}"
    assert entry["rows_lost"] == 0 and entry["single_master"], entry
    assert entry["passed"], json.dumps(entry, indent=2)


def test_no_write_twice_no_secret_out_clean_keepalived_log(report):
    assert report["duplicate_rows"] == 0
    assert report["secrets_audit"]["clean"], report["secrets_audit"]
    assert report["keepalived_log_clean"], report["keepalived_log_findings"]
    assert report["passed"] and report["_exit"] == 0, report["_out"]
