"""The drill's HTML timeline report, drawn from synthetic runs: a failover and a clean rolling update."""

from __future__ import annotations

import base64
import copy
import io
import json
import re

import pytest
from PIL import Image  # matplotlib's own dependency

from tests.lab import timeline
from tests.lab.timeline import TimelineInputError, render_html

T0 = 1_764_590_400.0  # 2025-12-01 12:00:00 UTC
RATE = 50
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(t0: float, seconds: float, serve) -> list[dict]:
    """RATE requests a second from t0; `serve(offset_s)` -> (status, served_by, error)."""
    out = []
    for seq in range(int(seconds * RATE)):
        offset = seq / RATE
        status, node, error = serve(offset)
        out.append({"seq": seq, "t": t0 + offset, "dt": 0.01, "op": "read", "method": "GET", "path": "/latest",
                    "status": status, "served_by": node, "version": "v1", "error": error})
    return out


def failover_run(run: int = 0) -> dict:
    """Primary serves until its link goes down at 3.0 s; requests fail until the IP has moved
    (start 3.9 s, done 4.5 s); the standby serves after."""
    t0 = T0 + 100 * run

    def serve(x: float):
        if x < 3.0:
            return 200, "primary", None
        if x < 4.5:
            return None, None, "connection refused"
        return 200, "standby", None

    events = [
        {"t": t0 + 3.0, "kind": "fault", "node": "primary", "label": "link down"},
        {"t": t0 + 3.1, "kind": "vrrp", "node": "primary", "label": "FAULT"},
        {"t": t0 + 3.8, "kind": "vrrp", "node": "standby", "label": "MASTER"},
        {"t": t0 + 3.9, "kind": "ip_move_start", "node": "standby", "label": "assign"},
        {"t": t0 + 4.5, "kind": "ip_move", "node": "standby", "label": "assigned"},
        {"t": t0 + 8.0, "kind": "heal", "node": "primary", "label": "link up"},
        {"t": t0 + 8.9, "kind": "vrrp", "node": "primary", "label": "primary BACKUP"},
    ]
    return {"scenario": "node-down", "run": run, "t0": t0, "t1": t0 + 10.0,
            "records": _records(t0, 10.0, serve), "events": events}


def rolling_run() -> dict:
    """A rolling update: the primary's app drains while the standby's and a worker serve; no failure."""
    t0 = T0 + 1000

    def serve(x: float):
        if 2.0 <= x < 5.0:
            return 200, "standby" if int(x * RATE) % 2 else "worker-1", None
        return 200, "primary", None

    events = [{"t": t0 + 2.0, "kind": "note", "node": "primary", "label": "drain primary"},
              {"t": t0 + 5.0, "kind": "note", "node": "primary", "label": "primary on v2"}]
    return {"scenario": "rolling-update", "run": 0, "t0": t0, "t1": t0 + 7.0,
            "records": _records(t0, 7.0, serve), "events": events}


def report_for(runs: list[dict]) -> dict:
    failover = [r for r in runs if r["scenario"] == "node-down"]
    failed = sum(timeline.run_counts(r)[1] for r in failover)
    return {
        "keepalived": "2.2.7", "profile": "fast", "api_action_s": 0.5, "api_latency_s": 0.1, "runs": len(failover),
        "passed": False,
        "scenarios": [
            {"name": "node-down", "passed": False, "failed": failed,
             "requests": sum(len(r["records"]) for r in failover), "ip_moves": len(failover), "failover_s": 1.52,
             "limits": {"failover_s": {"limit": 2.0, "got": 1.52, "ok": True},
                        "failed": {"limit": 50, "got": failed, "ok": failed <= 50}}},
            {"name": "rolling-update", "passed": True, "failed": 0, "requests": 350, "ip_moves": 0,
             "limits": {"failed": {"limit": 0, "got": 0, "ok": True}}},
            {"name": "hardening", "passed": True, "failed": 0, "requests": 0, "ip_moves": 0, "failover_s": None,
             "limits": {}},
        ],
    }


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    runs = [failover_run(0), failover_run(1), rolling_run()]
    report = report_for(runs)
    out = render_html(report, runs, tmp_path_factory.mktemp("timeline") / "drill-report.html")
    return report, runs, out.read_text()


def _row(page: str, name: str) -> str:
    rows = [r for r in re.findall(r"<tr[^>]*>.*?</tr>", page, re.S) if f">{name}<" in r]
    assert len(rows) == 1, f"expected one table row for {name}"
    return rows[0]


def test_the_page_is_self_contained(drawn):
    _, _, page = drawn
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    assert not re.search(r"url\(|@import", page), "the style must not fetch anything"


def test_one_png_per_scenario_with_runs(drawn):
    _, _, page = drawn
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # node-down and rolling-update have runs; the hardening check has none and gets no picture.
    assert len(images) == 2 == page.count("<img ")
    assert all(base64.b64decode(b).startswith(PNG_MAGIC) for b in images)
    assert 'id="s-node-down"' in page and 'id="s-rolling-update"' in page and 'id="s-hardening"' not in page


def _pixels(png_b64: str) -> dict[str, int]:
    """How many pixels of each colour ("#rrggbb") a PNG has."""
    image = Image.open(io.BytesIO(base64.b64decode(png_b64))).convert("RGB")
    return {"#{:02x}{:02x}{:02x}".format(*rgb): n for n, rgb in image.getcolors(maxcolors=1 << 20)}


def test_pictures_show_who_served_and_what_failed(drawn):
    _, _, page = drawn
    failover, rolling = (_pixels(b) for b in re.findall(r"base64,([A-Za-z0-9+/=]+)", page))
    nodes = timeline.node_colours(["worker-1"])
    red = timeline.FAILED_COLOUR
    assert failover.get(nodes["primary"]) and failover.get(nodes["standby"]) and nodes["worker-1"] not in failover
    assert all(rolling.get(nodes[n]) for n in ("primary", "standby", "worker-1"))
    # Red is a bar in the failover; in the clean rolling update it is only the legend's swatch.
    assert failover.get(red, 0) > 5000 and rolling.get(red, 0) < 500


def test_summary_table_shows_failures_highlighted(drawn):
    report, _, page = drawn
    node_down = _row(page, "node-down")
    failed = report["scenarios"][0]["failed"]
    assert failed == 2 * 75  # 1.5 s of connection refused at 50 rps, two runs
    assert 'class="failed"' in node_down and f'<td class="num">{failed}</td>' in node_down
    assert "FAILED" in node_down and "failover_s 1.52 (limit 2.00, ok)" in node_down
    rolling = _row(page, "rolling-update")
    assert 'class="passed"' in rolling and "FAILED" not in rolling
    assert "hardening" in page and "<h1>Drill report: " in page and "FAILED</span></h1>" in page
    assert "api_action_s" not in page and "API action time 0.50 s" in page


def test_a_limit_that_failed_is_marked(tmp_path):
    runs = [failover_run(0)]
    report = report_for(runs)
    report["scenarios"][0]["limits"]["failover_s"] = {"limit": 1.0, "got": 1.52, "ok": False}
    page = render_html(report, runs, tmp_path / "r.html").read_text()
    assert '<span class="bad">failover_s 1.52 (limit 1.00, not met)</span>' in _row(page, "node-down")


def test_scenario_with_more_runs_than_drawn_says_so(tmp_path):
    runs = [failover_run(i) for i in range(timeline.MAX_RUNS_DRAWN + 1)]
    page = render_html(report_for(runs), runs, tmp_path / "r.html").read_text()
    assert page.count("<img ") == 1
    assert f"{timeline.MAX_RUNS_DRAWN} of {timeline.MAX_RUNS_DRAWN + 1} run(s)" in page
    assert f"Runs {timeline.MAX_RUNS_DRAWN} are not drawn." in page


def test_buckets_count_by_send_time_node_and_failure():
    run = failover_run(0)
    n, ok_by, failures = timeline.buckets(run["records"], run["t0"], run["t1"])
    assert n == 100
    assert ok_by["primary"][:30] == [5] * 30 and sum(ok_by["primary"][30:]) == 0
    assert failures[30:45] == [5] * 15 and sum(failures) == 75
    assert sum(ok_by["standby"]) == 5 * 55
    late = [{"t": run["t1"] + 1, "status": 200, "served_by": "primary"},
            {"t": run["t0"] - 1, "status": 500, "served_by": "primary"}]
    _, ok_late, fail_late = timeline.buckets(late, run["t0"], run["t1"])
    assert ok_late == {} and sum(fail_late) == 0


def test_ip_move_band_runs_from_start_to_completion_or_window_end():
    ev = failover_run(0)["events"]
    assert timeline.move_bands(ev, T0 + 10) == [(T0 + 3.9, T0 + 4.5, True)]
    stuck = [e for e in ev if e["kind"] != "ip_move"]
    assert timeline.move_bands(stuck, T0 + 10) == [(T0 + 3.9, T0 + 10, False)]


def test_node_colours_are_stable_and_never_failure_red():
    a = timeline.node_colours(["primary", "standby", "worker-1"])
    b = timeline.node_colours(["worker-2", "standby", "worker-1", "primary"])
    assert a["primary"] == b["primary"] and a["standby"] == b["standby"] and a["worker-1"] == b["worker-1"]
    assert len({b[n] for n in ("primary", "standby", "worker-1", "worker-2")}) == 4
    assert timeline.FAILED_COLOUR not in b.values()


@pytest.mark.parametrize(("breakage", "message"), [
    (lambda rep, runs: rep["scenarios"][0].pop("ip_moves"), "report.scenarios[0] (node-down): missing key 'ip_moves'"),
    (lambda rep, runs: rep.pop("api_action_s"), "report: missing key 'api_action_s'"),
    (lambda rep, runs: rep["scenarios"][0]["limits"]["failed"].pop("ok"),
     "report.scenarios[0] (node-down).limits['failed']: missing key 'ok'"),
    (lambda rep, runs: runs[0].pop("t1"), "runs[0]: missing key 't1'"),
    (lambda rep, runs: runs[0]["records"][7].pop("t"), "runs[0].records[7]: missing key 't'"),
    (lambda rep, runs: runs[0]["events"][2].update(kind="vrrp-ish"),
     "runs[0].events[2]: 'kind' 'vrrp-ish' is not one of fault, heal, vrrp, ip_move_start, ip_move, note"),
    (lambda rep, runs: runs[0].update(scenario="node-dwon"), "runs[0]: scenario 'node-dwon' is not in report.scenarios"),
])
def test_bad_input_names_the_key(tmp_path, breakage, message):
    runs = [failover_run(0), rolling_run()]
    report = report_for(runs)
    breakage(report, runs)
    with pytest.raises(TimelineInputError) as err:
        render_html(report, runs, tmp_path / "r.html")
    assert message in str(err.value)
    assert not (tmp_path / "r.html").exists()


def test_every_problem_is_reported_at_once(tmp_path):
    runs = [failover_run(0)]
    report = report_for(runs)
    report["scenarios"][1].pop("requests")
    runs[0].pop("events")
    with pytest.raises(TimelineInputError) as err:
        render_html(report, runs, tmp_path / "r.html")
    assert "'requests'" in str(err.value) and "runs[0]: missing key 'events'" in str(err.value)


def test_cli_redraws_a_saved_report(tmp_path, capsys):
    runs = [failover_run(0), rolling_run()]
    report = report_for(runs)
    (tmp_path / "drill-report.json").write_text(json.dumps(report))
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    out = tmp_path / "drill-report.html"
    argv = ["--report", str(tmp_path / "drill-report.json"), "--runs", str(tmp_path / "runs.json"), "--out", str(out)]
    assert timeline.main(argv) == 0
    assert out.read_text().count("<img ") == 2

    broken = copy.deepcopy(report)
    del broken["scenarios"][0]["failed"]
    (tmp_path / "drill-report.json").write_text(json.dumps(broken))
    assert timeline.main(argv) == 2
    assert "report.scenarios[0] (node-down): missing key 'failed'" in capsys.readouterr().err


def test_labels_of_close_events_take_separate_rows():
    # fault at 30 %, a VRRP transition 1 % later, then one far away: the first two must not share a
    # row, the far one reuses the top row.
    spans = [(0.30, 0.45), (0.31, 0.40), (0.80, 0.90)]
    assert timeline.label_rows(spans) == [0, 1, 0]
    # More overlapping labels than rows: the extra goes where the row frees up first, not always row 0.
    crowd = [(0.1, 0.5), (0.11, 0.3), (0.12, 0.6), (0.13, 0.7), (0.14, 0.2)]
    assert timeline.label_rows(crowd, rows=4) == [0, 1, 2, 3, 1]
