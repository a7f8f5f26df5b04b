"""The alerting rules and the Grafana dashboard are code: promtool checks and unit-tests the rules
(series in deploy/prometheus/alerts_test.yml), and every expression must name metrics the node
scripts really write (taken from their renderers, not from a list kept by hand)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.needs import missing_binaries, need

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "minitwit-ha.json"
sys.path.insert(0, str(ROOT / "scripts"))
import mt_observe as obs  # noqa: E402

METRIC_RE = re.compile(r"\bminitwit_ha_[a-z0-9_]+")


def exported_metrics() -> set[str]:
    """Every series name the scripts write, with every optional gauge present."""
    values = obs.empty_values()
    values.update(vrrp_state="MASTER", reserved_ip_held=1, health_ok=1,
                  token={"ok": True, "result": "ok", "detail": "", "time": 1.0, "ok_time": 1.0})
    text = obs.render_failover_metrics(values, "primary") + obs.render_version_metric("primary", "v1")
    return {line.split("{")[0] for line in text.splitlines() if not line.startswith("#")}


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule["expr"] for group in doc["groups"] for rule in group["rules"]]


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in doc.get("annotations", {}).get("list", []) if "expr" in a]
    return exprs


def test_the_scripts_export_the_metrics_the_issue_asks_for():
    assert {"minitwit_ha_vrrp_state", "minitwit_ha_become_master_total", "minitwit_ha_assign_total",
            "minitwit_ha_assign_duration_seconds_bucket", "minitwit_ha_reserved_ip_held", "minitwit_ha_token_ok",
            "minitwit_ha_health_ok", "minitwit_ha_app_version_info"} <= exported_metrics()


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_expression_names_metrics_that_exist(source: str):
    exprs = rule_exprs() if source == "alerts" else dashboard_exprs()
    assert exprs
    known = exported_metrics()
    for expr in exprs:
        named = set(METRIC_RE.findall(expr))
        assert named, f"{expr!r} names no minitwit_ha_ metric"
        assert named <= known, f"{expr!r} names {sorted(named - known)}, which no node script writes"


def test_the_dashboard_is_importable_grafana_json():
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 30
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in doc["panels"]:
        assert p["title"] and p["targets"] and p["datasource"]["uid"] == "${datasource}"
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"])
    shown = {m for e in dashboard_exprs() for m in METRIC_RE.findall(e)}
    assert {"minitwit_ha_vrrp_state", "minitwit_ha_token_ok", "minitwit_ha_app_version_info"} <= shown


def test_the_alert_rules_cover_the_issue():
    names = {rule["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for rule in g["rules"]}
    assert {"MinitwitHaFailover", "MinitwitHaNoMaster", "MinitwitHaTwoMasters", "MinitwitHaTokenFailing",
            "MinitwitHaReservedIpNotOnMaster"} <= names


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    need(missing_binaries("promtool"))
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, check=False,
                          cwd=RULES.parent)


def test_promtool_checks_the_rules():
    proc = promtool("check", "rules", RULES.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rule_exprs())} rules found" in proc.stdout


def test_promtool_unit_tests_pass():
    proc = promtool("test", "rules", RULE_TESTS.name)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_promtool_notices_a_wrong_rule(tmp_path: Path):
    """The unit tests can fail: a rule that fires too late breaks them."""
    broken = RULES.read_text().replace("for: 30s\n        labels:\n          severity: critical\n"
                                       "        annotations:\n          summary: \"minitwit-ha: no node",
                                       "for: 5m\n        labels:\n          severity: critical\n"
                                       "        annotations:\n          summary: \"minitwit-ha: no node")
    assert broken != RULES.read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts_test.yml").write_text(RULE_TESTS.read_text())
    need(missing_binaries("promtool"))
    proc = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], capture_output=True, text=True,
                          timeout=120, check=False, cwd=tmp_path)
    assert proc.returncode != 0 and "MinitwitHaNoMaster" in proc.stdout + proc.stderr
