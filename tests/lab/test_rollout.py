"""Planned switchover and rolling updates, for real in the lab: the tool over SSH, under traffic.

The session's one drill (tests/lab/conftest.py) runs these scenarios once each, after the failover
scenarios, in the same lab; each test asserts one target on its report:
- 0 failed requests in all three, under at least 50 requests/s through the reserved IP;
- the versions before and after (fresh lab: v1 everywhere; v2 after the rolling update; the bad
  version changes nothing);
- the bad version never answers a request through the reserved IP and the tool exits non-zero;
- a rollout takes no longer than both nodes' deploy+health times (from the tool's own report) + 10 s;
- a rolling update (good or bad version) moves the reserved IP 0 times with no keepalived
  transition; a switchover moves it exactly once;
- serve-both: with serve=both rendered, each app serves >= 30% through the reserved IP, and a crash
  of either app fails no request.
"""

from __future__ import annotations

import pytest

from tests.lab.conftest import lab_leftovers, scenario

pytestmark = pytest.mark.lab

SCENARIOS = ("planned-switchover", "rolling-update", "rolling-update-bad-version")
REQUIRED_FIELDS = {"name", "passed", "requests", "failed", "versions_before", "versions_after", "duration_s",
                   "exit_code", "summary"}


@pytest.fixture
def report(drill_report):
    return drill_report


def test_the_report_has_the_three_scenarios_and_the_drill_passed(report):
    names = [s["name"] for s in report["scenarios"]]
    assert [n for n in names if n in SCENARIOS] == list(SCENARIOS)
    for s in (scenario(report, n) for n in SCENARIOS):
        assert set(s) >= REQUIRED_FIELDS, s.keys()
        assert s["name"] in report["_stdout"]                    # the printed table lists it
    assert all(scenario(report, n)["passed"] for n in SCENARIOS), [scenario(report, n).get("checks") for n in SCENARIOS]


@pytest.mark.parametrize("name", SCENARIOS)
def test_no_request_fails_under_at_least_50_requests_per_second(report, name):
    s = scenario(report, name)
    assert s["failed"] == 0, s["runs"][0]["failed_examples"]
    assert s["rate_rps"] >= 50 and s["requests"] >= 50 * 5, s   # real, sustained traffic


def test_a_planned_switchover_moves_the_reserved_ip_to_the_standby_and_changes_no_version(report):
    s = scenario(report, "planned-switchover")
    run = s["runs"][0]
    assert s["exit_code"] == 0
    assert {run["holder_before"], run["holder_after"]} == {"primary", "standby"}
    assert set(run["served_by_after"]) == {run["holder_after"]}
    assert s["versions_before"] == s["versions_after"] == {"primary": "v1", "standby": "v1"}
    assert s["ip_moves"] == 1
    assert s["duration_s"] <= s["target_s"], s                  # 10 s + one move as the drill budgets it


def test_a_rolling_update_moves_both_nodes_to_the_new_version(report):
    s = scenario(report, "rolling-update")
    run = s["runs"][0]
    assert s["exit_code"] == 0, run["log_tail"]
    assert s["versions_before"] == {"primary": "v1", "standby": "v1"}
    assert s["versions_after"] == {"primary": "v2", "standby": "v2"}
    assert set(run["served_before"]) == {"v1"} and set(run["served_after"]) == {"v2"}
    assert run["holder_after"] == run["holder_before"]         # each app updated behind HAProxy: the IP stayed
    assert s["ip_moves"] == 0 and run["transitions"] == 0
    assert set(run["served_by_during"]) == {"primary", "standby"}  # one app served while the other was updated


def test_a_rolling_update_takes_no_longer_than_both_deploys_plus_health_plus_10_s(report):
    s = scenario(report, "rolling-update")
    measured = s["deploy_health_s"]                             # from the tool's own report, per node
    assert set(measured) == {"primary", "standby"} and all(0 < v < 300 for v in measured.values()), measured
    assert s["duration_s"] <= sum(measured.values()) + 10.0, s["summary"]


def test_a_version_that_never_becomes_healthy_never_serves_and_the_tool_fails(report):
    s = scenario(report, "rolling-update-bad-version")
    run = s["runs"][0]
    assert s["exit_code"] == 1, run["log_tail"]                 # failed and rolled back: not degraded
    assert s["bad_version_served"] == 0
    assert run["holder_after"] == run["holder_before"]          # traffic never left the active node
    assert s["ip_moves"] == 0 and run["transitions"] == 0
    assert s["versions_after"] == s["versions_before"] == {"primary": "v2", "standby": "v2"}
    assert "never became healthy" in run["tool_message"]


def test_serve_both_spreads_the_requests_over_both_apps_and_an_app_crash_fails_none(report):
    s = scenario(report, "serve-both")
    assert s["passed"], s["checks"]
    assert all(share >= 0.30 for share in s["shares"].values()) and set(s["shares"]) == {"primary", "standby"}
    assert s["failed"] == 0 and s["ip_moves"] == 0 and s["requests"] >= 50 * 10, s["summary"]
    assert {k: v for k, v in s["failed_in"].items() if "crash" in k} == {"primary app crash": 0, "standby app crash": 0}


def test_no_ssh_connection_outlives_the_tool_and_keepalived_logged_no_script_problems(report):
    assert all(not r["ssh_leftovers"] for s in (scenario(report, n) for n in SCENARIOS) for r in s["runs"])
    assert report["keepalived_log_clean"], report["keepalived_log_findings"]


def test_the_drill_tore_the_lab_down(report):
    assert lab_leftovers() == []
