"""The failover drill, run for real in the lab (root, keepalived, nftables, PostgreSQL).

One drill run (3 runs per scenario, as `make drill`) produces the report; each test asserts one
scenario's targets on it. The lab runs under its own prefix and root so a developer's lab is not
disturbed, and it is torn down by the drill even when a scenario fails.
"""

from __future__ import annotations

import json

import pytest

from tests.lab.conftest import (
    SENTINEL_DB_PASSWORD,
    SENTINEL_TOKEN,
    lab_leftovers,
    lab_missing,
    run_lab,
    scenario,
)
from tests.support.needs import need

pytestmark = pytest.mark.lab

FAILOVER_TARGETS = {"app-crash": 1.5, "keepalived-stop": 1.5, "node-down": 2.0, "api-flaky": 5.0}
SETTLE_TARGETS = {"split-brain": 3.0, "restart-both": 3.0}


@pytest.fixture
def report(drill_report):
    return drill_report


def test_report_shape(report):
    assert report["keepalived"].startswith("2.2.")
    assert report["profile"] == "fast" and report["api_latency_s"] == 0
    names = [s["name"] for s in report["scenarios"]]
    assert names[:6] == ["app-crash", "keepalived-stop", "node-down", "split-brain", "api-flaky", "restart-both"]
    assert {"rogue-vrrp", "ssh-from-outside", "http-open"} <= set(names)
    for s in report["scenarios"][:6]:
        assert {"name", "failover_s", "requests", "failed", "holder_after", "single_master", "rows_lost",
                "passed"} <= set(s)
        assert len(s["runs_s"]) == 3
    assert "scenario" in report["_stdout"] and "failover_s" in report["_stdout"]  # the printed table


@pytest.mark.parametrize("name", sorted(FAILOVER_TARGETS))
def test_failover_within_target(report, name):
    s = scenario(report, name)
    assert s["failover_s"] is not None and s["failover_s"] <= FAILOVER_TARGETS[name], s
    assert s["holder_after"] in ("primary", "standby")
    assert s["passed"], s


@pytest.mark.parametrize("name", sorted(SETTLE_TARGETS))
def test_exactly_one_master_holding_the_ip_within_target(report, name):
    s = scenario(report, name)
    assert s["single_master"], s
    assert s["failover_s"] is not None and s["failover_s"] <= SETTLE_TARGETS[name], s
    assert s["passed"], s


def test_no_rows_lost_anywhere(report):
    lost = {s["name"]: s["rows_lost"] for s in report["scenarios"] if "rows_lost" in s}
    assert set(FAILOVER_TARGETS) | set(SETTLE_TARGETS) <= set(lost)
    assert lost == {name: 0 for name in lost}
    assert all(s["requests"] > 100 for s in report["scenarios"] if "rows_lost" in s)  # real traffic to lose


def test_split_brain_costs_no_requests(report):
    """During a VPC cut both nodes serve the shared database: nothing fails, only the IP moves."""
    assert scenario(report, "split-brain")["failed"] == 0
    assert "both nodes MASTER during the cut" in scenario(report, "split-brain")["notes"]


def test_keepalived_log_is_free_of_script_security_problems(report):
    assert report["keepalived_log_clean"], report["keepalived_log_findings"]


def test_rogue_vrrp_speaker_changes_nothing(report):
    s = scenario(report, "rogue-vrrp")
    assert s["rogue_adverts_sent"] > 0
    # The adverts reached both nodes and the ruleset dropped them (control: tests/lab/test_rogue.py shows
    # the same adverts make a bare keepalived step down).
    assert all(n > 0 for n in s["dropped_by_firewall"].values()), s
    assert s["transitions"] == 0 and s["holder_after"] == s["holder_before"] and s["failed"] == 0, s


def test_ssh_only_from_admin_cidrs_only_as_deploy(report):
    s = scenario(report, "ssh-from-outside")
    assert s["passed"], json.dumps(s["checks"], indent=1)
    assert len(s["checks"]) == 8


def test_only_the_app_ports_answer_from_the_internet(report):
    s = scenario(report, "http-open")
    assert s["passed"], json.dumps(s["checks"], indent=1)
    assert {c["got"] for c in s["checks"].values()} == {"200", "dropped", "refused", "open"}


def test_secrets_audit_finds_nothing(report):
    audit = report["secrets_audit"]
    assert audit["secrets"] == ["database password", "failover token"]
    assert audit["files_scanned"] > 50  # logs, state, rendered files, traffic records, API request log
    assert audit["findings"] == [] and audit["homes_not_0600"] == [] and audit["clean"]
    for text in (report["_raw"], report["_stdout"], report["_stderr"]):
        assert SENTINEL_TOKEN not in text and SENTINEL_DB_PASSWORD not in text


def test_the_drill_tore_the_lab_down(report):
    assert lab_leftovers() == []


@pytest.mark.slow
def test_no_spurious_failover_under_five_minutes_of_steady_traffic(report):
    steady = report["steady"]
    assert steady["seconds"] >= 300
    assert steady["transitions"] == 0, steady
    assert steady["failed"] == 0 and steady["requests"] >= 300 * 45, steady
    assert steady["holder_after"] == steady["active_before"]
    assert steady["rows_lost"] == 0


def test_cli_up_status_fault_heal_down():
    need(lab_missing())
    try:
        up = run_lab("up", timeout=120)
        assert up.returncode == 0, up.stderr
        status = json.loads(run_lab("status").stdout)
        holder = status["reserved_ip"]["holder"]
        assert holder in ("primary", "standby")
        assert status["nodes"][holder]["vrrp_state"] == "MASTER"
        other = "standby" if holder == "primary" else "primary"
        assert status["nodes"][other]["vrrp_state"] == "BACKUP"
        assert {n["app_version"] for n in status["nodes"].values()} == {"v1"}
        assert run_lab("fault", holder, "keepalived").returncode == 0
        # The reserved IP moves to the other node, as the fake API and the node's state both say.
        for _ in range(50):
            status = json.loads(run_lab("status").stdout)
            if status["reserved_ip"]["holder"] == other and status["nodes"][other]["vrrp_state"] == "MASTER":
                break
        assert status["reserved_ip"]["holder"] == other, status
        assert run_lab("heal", holder, "keepalived").returncode == 0
        bad = run_lab("fault", holder, "nonsense")
        assert bad.returncode != 0 and "invalid choice" in bad.stderr
    finally:
        down = run_lab("down")
    assert down.returncode == 0, down.stderr
    assert lab_leftovers() == []
    assert json.loads(run_lab("status").stdout or "{}") == {"up": False}
