"""`make twins` end to end: the stack's commands on booted Debian 12 twins, and the engine semantics.

One run (image build included when the cache is cold; minutes), then assertions on its report:
every step succeeded on both twins, an unchanged second apply ran nothing, and a one-file change
re-ran exactly the steps that carry that file (each node's app step) plus the readiness gate.
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
PER_NODE = ("wait", "bootstrap", "failover-token", "failover", "firewall", "keepalived", "app-env", "app")


def _missing() -> str | None:
    from tests.twins.twins import missing

    return missing()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    need(_missing())
    path = tmp_path_factory.mktemp("twins") / "twin-report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TWIN_ROOT": "/var/tmp/minitwit-ha-twins-test"}
    proc = subprocess.run([sys.executable, "-m", "tests.twins", "run", "--report", str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert path.exists(), f"no report written:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(path.read_text())
    assert proc.returncode == 0, f"make twins failed: {json.dumps(data.get('failed'), indent=2)}\n{proc.stderr[-3000:]}"
    return data


def test_every_stack_command_succeeds_on_both_twins(report):
    ran = {(s["node"], s["name"].rsplit(f"-{s['node']}-", 1)[-1]) for s in report["steps"] if s["rc"] == 0}
    for node in ("primary", "standby"):
        for step in PER_NODE:
            assert (node, step) in ran, f"{step} did not succeed on {node}: {report['steps']}"
    assert [s["name"] for s in report["steps"] if s["node"] == "local"] == ["minitwit-twins-ready"]
    assert all(s["rc"] == 0 for s in report["steps"])


def test_an_unchanged_apply_runs_nothing(report):
    assert report["rerun_steps"] == 0


def test_a_one_file_change_reruns_only_its_steps(report):
    assert report["changed_steps"] == ["minitwit-twins-primary-app", "minitwit-twins-ready",
                                       "minitwit-twins-standby-app"]


def test_the_report_names_stand_ins_and_boot_times(report):
    whats = {s["what"] for s in report["stand_ins"]}
    assert {"Docker's apt repository and Docker Engine", "DigitalOcean's API and droplet metadata"} <= whats
    assert set(report["boot_s"]) == {"primary", "standby"}
    assert all(0 < s < 300 for s in report["boot_s"].values())
    assert all(b["state"] in ("running", "degraded") for b in report["boot"].values())
