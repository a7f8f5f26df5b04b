"""Replacing the standby droplet starts no IP fight (#12), asserted on the session's one drill report
(tests/lab/conftest.py runs `replace-standby` once, in the same lab as the other scenarios, under
50 requests/s and the realistic API). The scenario plays `pulumi up --replace` in the engine's order
twice: standby -> standby2 with the new node's keepalived started before the survivor is re-pointed
(new-first), then standby2 -> a rebuilt standby the other way round (peer-first)."""

from __future__ import annotations

import pytest

from tests.lab.conftest import scenario

pytestmark = pytest.mark.lab


def test_replacing_the_standby_loses_no_request_and_moves_the_ip_at_most_once(drill_report):
    s = scenario(drill_report, "replace-standby")
    assert s["failed"] == 0 and s["requests"] > 500, s
    assert s["ip_moves"] <= 1, s
    # The only move a replacement may cost: the retired node held the IP and the survivor took it.
    assert s["ip_moves"] == (1 if s["holder_before"] == "standby" else 0), s
    assert s["passed"], s


def test_the_retire_step_runs_on_the_old_node_and_each_new_node_joins_as_backup(drill_report):
    s = scenario(drill_report, "replace-standby")
    assert [(p["old"], p["new"], p["order"]) for p in s["passes"]] == [
        ("standby", "standby2", "new-first"), ("standby2", "standby", "peer-first")]
    for p in s["passes"]:
        assert p["retire"]["exit"] == 0 and p["retire"]["out"].startswith("retired:"), p["retire"]
        assert p["new_backup_after_s"] is not None, p


def test_two_masters_never_last_over_a_second_and_a_deaf_new_node_takes_nothing(drill_report):
    s = scenario(drill_report, "replace-standby")
    assert s["double_master_s"] <= 1.0, s  # peer-first: the survivor already talks to the new node
    new_first = s["passes"][0]
    # new-first: the new node heard nobody and became MASTER (the risk is real in this run) ...
    assert new_first["deaf_start_held"] and s["double_master_s_new_first"] > 0, new_first
    # ... and left the IP on the survivor: no move to it, however long the survivor took.
    assert s["moves_to_new_node"] == 0, s


def test_the_lab_is_back_in_shape_for_the_scenarios_after_it(drill_report):
    s = scenario(drill_report, "replace-standby")
    assert s["checks"]["the pair is back: standby BACKUP"], s
    assert "replace-standby" in drill_report["_stdout"]
