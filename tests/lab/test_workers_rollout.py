"""`rollout.py rollout` with two app workers, for real in the lab (tests/lab/scenarios_workers_rollout.py),
read from the session's one drill (tests/lab/conftest.py):
- the rollout v1 -> v2 under at least 50 requests/s through the reserved IP: exit 0, 0 failed,
  0 IP moves, no keepalived transition, every app server (both pair apps and both workers) on v2,
  the workers deployed before the pair;
- a bad version: the tool exits non-zero after worker-1, the pair never deployed (still v2), the
  bad version never answers, 0 failed.
"""

from __future__ import annotations

import pytest

from tests.lab.conftest import scenario

pytestmark = pytest.mark.lab

NAME = "rolling-update-workers"
SERVERS = ("worker-1", "worker-2", "primary", "standby")


def test_a_rollout_with_workers_updates_every_app_server_workers_first_with_no_failed_request(drill_report):
    s = scenario(drill_report, NAME)
    assert s["passed"], s["checks"]
    good, _ = s["runs"]
    assert good["exit_code"] == 0, good["log_tail"]
    assert good["failed"] == 0 and good["rate_rps"] >= 50 and good["requests"] >= 50 * 5, good["failed_examples"]
    assert s["ip_moves"] == 0 and good["transitions"] == 0 and good["holder_after"] == good["holder_before"]
    assert good["all_versions"] == {n: good["version"] for n in SERVERS}
    assert good["order"][:2] == ["worker-1", "worker-2"] and set(good["order"][2:]) == {"primary", "standby"}


def test_a_bad_version_stops_at_the_first_worker_before_the_pair(drill_report):
    s = scenario(drill_report, NAME)
    good, bad = s["runs"]
    assert bad["exit_code"] == 1, bad["log_tail"]       # rolled back, every app healthy: not degraded
    assert bad["order"] == ["worker-1"]
    assert bad["all_versions"] == {n: good["version"] for n in SERVERS}
    assert s["bad_version_served"] == 0 and bad["failed"] == 0
    assert "The pair was not touched" in bad["tool_message"]
