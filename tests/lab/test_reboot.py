"""A reboot of either node loses no request (#16), asserted on the session's one drill report
(tests/lab/conftest.py runs `holder-reboot` and `standby-reboot` once each, in the same lab as the
other scenarios, under 50 requests/s and the realistic API: an assign takes 5 s)."""

from __future__ import annotations

import pytest

from tests.lab.conftest import scenario

pytestmark = pytest.mark.lab


@pytest.fixture
def report(drill_report):
    return drill_report


def test_a_reboot_of_the_holder_hands_over_first_and_loses_no_request(report):
    s = scenario(report, "holder-reboot")
    assert s["failed"] == 0 and s["requests"] > 200, s
    assert s["ip_moves_own"] == 1 and s["holder_after"] != s["holder_before"] == s["node"], s  # once, to the peer
    assert s["stop"]["handover"] == "done" and s["stop"]["exit"] == 0, s["stop"]
    # The handover waits for the API's action; the whole stop stays within it + 5 s.
    assert report["api_action_s"] <= s["stop"]["handover_s"] <= s["stop_s"] <= report["api_action_s"] + 5.0, s
    assert s["node_after"] == "BACKUP", s  # back as the standby, and the IP was not moved back
    assert s["passed"], s


def test_a_reboot_of_the_standby_moves_nothing_and_loses_no_request(report):
    s = scenario(report, "standby-reboot")
    assert s["failed"] == 0 and s["requests"] > 200, s
    assert s["ip_moves"] == s["ip_moves_own"] == 0 and s["holder_after"] == s["holder_before"] != s["node"], s
    assert s["stop"]["handover"] == "not-holder" and s["stop"]["handover_s"] < 2.0, s["stop"]
    assert s["node_after"] == "BACKUP", s
    assert s["passed"], s


def test_the_reboot_scenarios_are_in_the_printed_table(report):
    for name in ("holder-reboot", "standby-reboot"):
        assert name in report["_stdout"]
        assert "limits" in scenario(report, name) and "ip_moves" in scenario(report, name)["limits"]
