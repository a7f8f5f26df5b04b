"""The holder going down with two app workers behind the pair (#14), asserted on the session's one
drill report (tests/lab/conftest.py): it fails over as plain `node-down` does, and the workers keep
serving through the new holder's HAProxy."""

from __future__ import annotations

import pytest

from tests.lab.conftest import scenario

pytestmark = pytest.mark.lab


def test_the_holder_down_with_workers_fails_over_within_node_downs_limits(drill_report):
    s = scenario(drill_report, "node-down-workers")
    plain = scenario(drill_report, "node-down")
    assert s["limits"].keys() >= plain["limits"].keys(), s["limits"]  # the same limits as without workers
    assert all(v["ok"] for v in s["limits"].values()), s["limits"]
    assert s["ip_moves"] == 1 and s["failover_s"] <= s["target_s"] and s["rows_lost"] == 0, s
    assert s["holder_after"] is not None and s["single_master"], s


def test_every_worker_keeps_serving_through_the_new_holder(drill_report):
    s = scenario(drill_report, "node-down-workers")
    assert s["requests_after_move"] >= 50 and s["failed_after_move"] == 0, s
    assert all(s["shares_after_move"].get(w, 0) >= 0.2 for w in s["workers"]) and len(s["workers"]) == 2, s
    assert s["passed"], s


def test_the_benchmark_stays_out_of_the_test_suites_drill(drill_report):
    assert "throughput" not in {s["name"] for s in drill_report["scenarios"]}


def test_the_old_holders_return_costs_no_request(drill_report):
    # Its app rejoins least connections with every pooled database connection dead from the cut.
    s = scenario(drill_report, "node-down-workers")
    assert s["failed_after_restore"] == 0 and s["checks"]["0 failed after the node is restored"], s
