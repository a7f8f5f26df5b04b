"""What mt-failover lets an operator see: textfile metrics, webhook alerts, the token checked on
both nodes, `status`; and the #17 hardening of the token file and the API URL.

Runs the real script (as keepalived does) against the fake DigitalOcean API and a webhook sink on
loopback, with the harness of test_mt_failover (whose fixtures also check the token never leaks).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.needs import missing_binaries, need
from tests.unit import test_mt_failover as base
from tests.unit.test_mt_failover import IP, IP_PATH, ME, OTHER_TOKEN, PEER, TOKEN, Node, posts, wait_until

# The same fixtures (fake API, node, and their after-test check that the token never leaked).
fake, node, python_bin = base.fake, base.node, base.python_bin

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import mt_observe as obs  # noqa: E402


class Sink:
    """A webhook receiver: records every POST body; answers from a script of statuses (then 200)."""

    def __init__(self, statuses: list[int] | None = None, delay: float = 0.0):
        self.bodies: list[dict] = []
        self.statuses = list(statuses or [])
        self.delay = delay
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(sink.delay)
                sink.bodies.append(json.loads(body))
                self.send_response(sink.statuses.pop(0) if sink.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000/secretpart"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts(self) -> list[str]:
        return [b.get("text", "") for b in self.bodies]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sink(node: Node):
    s = Sink()
    node.webhook_file.write_text(s.url + "\n")
    node.webhook_file.chmod(0o600)
    yield s
    s.close()


def metrics(node: Node) -> dict[str, float]:
    """The textfile as {series: value}; also proves every line is in the exposition format."""
    out = {}
    for line in (node.metrics_dir / obs.FAILOVER_PROM).read_text().splitlines():
        if line.startswith("#"):
            assert re.fullmatch(r"# (HELP|TYPE) minitwit_ha_\w+ .+", line), line
            continue
        series, value = line.rsplit(" ", 1)
        out[series] = float(value)
    return out


def m(node: Node, name: str, **labels: str) -> float | None:
    wanted = {"node": "primary", **labels}
    for series, value in metrics(node).items():
        base, _, rest = series.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if base == name and found == wanted:
            return value
    return None


# -- metrics ------------------------------------------------------------------------------------


def test_a_failover_shows_in_counters_that_survive_restarts(node: Node, fake):
    fake.set_action_delay(0.2)
    assert node.run("reconcile", "--once").returncode == 0  # start-up writes every counter at 0
    assert m(node, "minitwit_ha_become_master_total") == 0
    assert node.notify("MASTER").returncode == 0
    assert m(node, "minitwit_ha_vrrp_state") == 1
    assert m(node, "minitwit_ha_become_master_total") == 1
    assert m(node, "minitwit_ha_assign_total", result="ok") == 1
    assert m(node, "minitwit_ha_reserved_ip_held") == 1
    count = m(node, "minitwit_ha_assign_duration_seconds_count")
    total = m(node, "minitwit_ha_assign_duration_seconds_sum")
    assert count == 1 and 0.2 <= total < 5  # POST to completed, including the action's 0.2 s
    assert m(node, "minitwit_ha_assign_duration_seconds_bucket", le="0.5") == 1
    # every process is a fresh start: the counters come from the lib dir, not from memory
    assert node.notify("BACKUP", "100").returncode == 0
    assert m(node, "minitwit_ha_vrrp_state") == 0
    assert node.notify("MASTER").returncode == 0  # already here: no move
    assert m(node, "minitwit_ha_become_master_total") == 2
    assert m(node, "minitwit_ha_assign_total", result="already") == 1
    assert m(node, "minitwit_ha_assign_total", result="ok") == 1
    assert m(node, "minitwit_ha_assign_duration_seconds_count") == 1
    assert node.notify("FAULT").returncode == 0
    assert m(node, "minitwit_ha_vrrp_state") == 2
    assert not [p for p in node.metrics_dir.iterdir() if p.name != obs.FAILOVER_PROM]  # no temp files


def test_the_textfile_passes_promtool(node: Node, fake):
    need(missing_binaries("promtool"))
    node.write_env(TRACK_FILE=str(node.root / "track"))
    (node.root / "track").write_text("0\n")
    assert node.notify("MASTER").returncode == 0
    assert node.run("reconcile", "--once").returncode == 0
    text = (node.metrics_dir / obs.FAILOVER_PROM).read_text()
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert m(node, "minitwit_ha_health_ok") == 1 and m(node, "minitwit_ha_token_ok") == 1


def test_a_broken_metrics_dir_never_stops_a_failover(node: Node, fake):
    node.metrics_dir.write_text("not a directory\n")
    proc = node.notify("MASTER")
    assert proc.returncode == 0, proc.stderr
    assert fake.holder(IP) == ME
    assert "cannot update metrics" in proc.stderr


# -- the token, checked on both nodes -----------------------------------------------------------


def test_a_backup_checks_the_token_once_per_interval(node: Node, fake):
    node.force_state("BACKUP")
    node.write_env(TOKEN_CHECK_INTERVAL_S="0.6", RECONCILE_INTERVAL_S="0.05")
    daemon = node.start("reconcile")
    time.sleep(1.5)
    daemon.terminate()
    node.finish(daemon)
    gets = [r for r in fake.requests() if r["path"] == IP_PATH]
    assert 2 <= len(gets) <= 3, len(gets)  # 30 passes, one read per 0.6 s
    assert posts(fake) == []


def test_a_revoked_token_on_the_backup_shows_at_once_and_alerts_once_per_streak(node: Node, fake, sink: Sink):
    node.force_state("BACKUP")
    node.write_token(OTHER_TOKEN)  # the API does not know it: 401
    first = node.run("reconcile", "--once")
    assert first.returncode == 4
    assert "token check failed: token rejected" in first.stderr
    assert m(node, "minitwit_ha_token_ok") == 0
    wait_until(lambda: len(sink.bodies) == 1)
    assert "failover token failed its check" in sink.texts()[0]
    node.write_env(TOKEN_CHECK_INTERVAL_S="0.01")
    again = node.run("reconcile", "--once")
    assert again.returncode == 4 and "token check failed" not in again.stderr  # same streak: quiet
    time.sleep(0.5)
    assert len(sink.bodies) == 1
    status = json.loads(node.run("status").stdout)
    assert status["token_check"]["ok"] is False and status["token_check"]["result"] == "refused (HTTP 401)"
    assert abs(status["token_check"]["time"] - time.time()) < 30
    node.write_token(TOKEN)
    fixed = node.run("reconcile", "--once")
    assert fixed.returncode == 0 and "the token works again" in fixed.stderr
    assert m(node, "minitwit_ha_token_ok") == 1 and m(node, "minitwit_ha_reserved_ip_held") == 0
    assert json.loads(node.run("status").stdout)["token_check"]["ok"] is True
    assert all(OTHER_TOKEN not in t and TOKEN not in t for t in sink.texts())


def test_an_unreachable_api_does_not_claim_the_token_failed(node: Node, fake, sink: Sink):
    node.force_state("BACKUP")
    assert node.run("reconcile", "--once").returncode == 0
    fake.inject(500, count=10, match="get")
    node.write_env(TOKEN_CHECK_INTERVAL_S="0.01")
    proc = node.run("reconcile", "--once")
    assert proc.returncode == 3 and "token check: cannot reach the API" in proc.stderr
    assert m(node, "minitwit_ha_token_ok") == 1  # the last definite answer stands
    assert json.loads(node.run("status").stdout)["token_check"]["result"] == "error"
    time.sleep(0.3)
    assert sink.bodies == []


# -- alerts -------------------------------------------------------------------------------------


def test_becoming_master_posts_one_alert_without_waiting_for_it(node: Node, fake):
    slow = Sink(delay=3.0)  # a webhook that takes 3 s to answer
    try:
        node.webhook_file.write_text(slow.url + "\n")
        node.webhook_file.chmod(0o600)
        started = time.monotonic()
        proc = node.notify("MASTER")
        assert proc.returncode == 0, proc.stderr
        assert time.monotonic() - started < 2.5  # the failover never waits for the webhook
        assert fake.holder(IP) == ME
        wait_until(lambda: len(slow.bodies) == 1)
        assert list(slow.bodies[0]) == ["text"]  # Slack's field (Discord hosts get "content")
        assert slow.bodies[0]["text"].startswith("minitwit-ha primary: became MASTER (was UNKNOWN, priority 150)")
        wait_until(lambda: "alert sent" in node.log_file.read_text())
        assert slow.url not in node.log_file.read_text()  # the webhook URL is a secret too
        assert m(node, "minitwit_ha_alerts_total", result="sent") == 1
    finally:
        slow.close()


def test_alert_retries_are_bounded(node: Node, fake, sink: Sink):
    sink.statuses = [500, 500, 500, 500]
    node.write_env(ALERT_ATTEMPTS="3")
    assert node.notify("MASTER").returncode == 0
    wait_until(lambda: "alert not delivered" in node.log_file.read_text())
    assert len(sink.bodies) == 3
    assert m(node, "minitwit_ha_alerts_total", result="failed") == 1


def test_an_assign_that_gives_up_alerts(node: Node, fake, sink: Sink):
    fake.set_holder(IP, PEER, run_hook=False)
    fake.inject(500, count=1000, match="any")
    node.write_env(ASSIGN_DEADLINE_S="0.5")
    assert node.notify("MASTER").returncode == 3
    wait_until(lambda: len(sink.bodies) == 2)
    assert "became MASTER" in sink.texts()[0] or "became MASTER" in sink.texts()[1]
    gave_up = [t for t in sink.texts() if "gave up assigning reserved IP 203.0.113.10" in t]
    assert len(gave_up) == 1
    assert m(node, "minitwit_ha_assign_total", result="gave_up") == 1


def test_a_correction_by_the_reconciler_alerts(node: Node, fake, sink: Sink):
    fake.set_holder(IP, PEER, run_hook=False)
    node.force_state("MASTER")
    assert node.run("reconcile", "--once").returncode == 0
    assert fake.holder(IP) == ME
    wait_until(lambda: len(sink.bodies) == 1)
    assert "reconciler moved reserved IP 203.0.113.10 back" in sink.texts()[0]
    assert m(node, "minitwit_ha_reconcile_corrections_total") == 1


def test_the_reconciler_leaves_a_fresh_master_to_its_notify(node: Node, fake, sink: Sink):
    fake.set_holder(IP, PEER, run_hook=False)
    node.force_state("MASTER")
    node.write_env(RECONCILE_GRACE_S="30")
    assert node.run("reconcile", "--once").returncode == 0
    assert posts(fake) == [] and fake.holder(IP) == PEER
    time.sleep(0.3)
    assert sink.bodies == []


def test_webhook_urls_are_https_unless_the_lab_allows_http(node: Node, fake):
    assert obs.check_webhook_url("https://hooks.slack.com/services/x", allow_http=False) == ""
    assert "only https is allowed" in obs.check_webhook_url("http://hooks.example/x", allow_http=False)
    assert obs.check_webhook_url("http://127.0.0.1:9/x", allow_http=True) == ""
    assert "not an https URL" in obs.check_webhook_url("ftp://hooks.example/x", allow_http=True)
    node.webhook_file.write_text("ftp://127.0.0.1:9/hook\n")
    node.webhook_file.chmod(0o600)
    proc = node.notify("MASTER")
    assert proc.returncode == 0 and fake.holder(IP) == ME  # a bad webhook never stops the failover
    assert "alert not sent: the URL in" in proc.stderr and "ftp://" not in proc.stderr


def test_webhook_payload_fits_slack_and_discord():
    assert obs.webhook_payload("https://hooks.slack.com/services/T/B/x", "hi") == {"text": "hi"}
    assert obs.webhook_payload("https://discord.com/api/webhooks/1/x", "hi") == {"content": "hi"}
    assert obs.webhook_payload("https://ptb.discord.com/api/webhooks/1/x", "hi") == {"content": "hi"}


# -- hardening (#17) ----------------------------------------------------------------------------


def test_a_plain_http_api_url_is_refused_before_any_request(node: Node, fake):
    node.write_env(ALLOW_INSECURE_HTTP="0")
    proc = node.notify("MASTER")
    assert proc.returncode == 2
    assert "DO_API_URL=" in proc.stderr and "is refused: the token is sent only over https" in proc.stderr
    assert fake.requests() == []
    node.write_env(ALLOW_INSECURE_HTTP="yes")
    assert "ALLOW_INSECURE_HTTP='yes' is invalid: must be 0 or 1" in node.notify("MASTER").stderr


def test_a_symlinked_token_file_is_refused(node: Node, fake):
    real = node.root / "real-token"
    real.write_text(TOKEN + "\n")
    real.chmod(0o600)
    node.token_file.unlink()
    node.token_file.symlink_to(real)
    proc = node.notify("MASTER")
    assert proc.returncode == 2 and "is a symbolic link, which is not followed" in proc.stderr
    assert [r for r in fake.requests() if r["path"].startswith("/v2/")] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the token file to another owner")
def test_a_token_file_owned_by_someone_else_is_refused(node: Node, fake):
    os.chown(node.token_file, 65534, 65534)
    proc = node.notify("MASTER")
    assert proc.returncode == 2 and "is owned by uid 65534, not root" in proc.stderr
    assert "chown root:root" in proc.stderr


def test_a_fifo_in_place_of_the_token_is_refused_without_hanging(node: Node, fake):
    node.token_file.unlink()
    os.mkfifo(node.token_file, 0o600)
    proc = node.run("status", timeout=10)
    assert proc.returncode == 2 and "is not a regular file" in proc.stderr


# -- status -------------------------------------------------------------------------------------


def test_status_shows_transitions_and_counters(node: Node, fake):
    node.notify("BACKUP", "150")
    node.notify("MASTER", "150")
    doc = json.loads(node.run("status").stdout)
    assert [(t["from"], t["to"]) for t in doc["transitions"]] == [(None, "BACKUP"), ("BACKUP", "MASTER")]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", t["ts"]) for t in doc["transitions"])
    assert doc["vrrp_state"] == "MASTER" and abs(doc["vrrp_since"] - time.time()) < 30
    assert doc["become_master_total"] == 1 and doc["assign_total"]["ok"] == 1
    assert doc["holder"] == ME and PEER != ME
