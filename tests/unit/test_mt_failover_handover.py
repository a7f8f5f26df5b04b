"""`mt-failover handover`: the ExecStop of minitwit-ha-handover.service, run before a shutdown or
reboot stops HAProxy, the app and keepalived (#16).

The real script against the fake DigitalOcean API, with a stand-in peer (an HTTP server on
loopback) and the peer's takeover played by the test: it waits for the drain flag keepalived
would react to, then moves the IP at the fake API. Every way the handover can end lets the
shutdown continue, within its bound, and says why; none leaves this node drained.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.lab.fakedo import FakeDO
from tests.unit import test_mt_failover as base
from tests.unit.test_mt_failover import IP, IP_PATH, ME, PEER, Node, posts, wait_until

# The same fixtures (fake API, node, and their after-test check that the token never leaked).
fake, node, python_bin = base.fake, base.node, base.python_bin

TIMEOUT_S = 3.0   # HANDOVER_TIMEOUT_S in these tests; the rendered default is 30 s


class PeerApp:
    """The peer's public port: answers GET /latest with `status` (changeable while it runs)."""

    def __init__(self, status: int = 200):
        self.status = status
        self.hits = 0
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                peer.hits += 1
                self.send_response(peer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def peer_app():
    app = PeerApp()
    yield app
    app.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(node: Node, fake: FakeDO, port: int, holder: int | None = ME) -> Path:
    """This node holds the IP (unless told otherwise); the peer listens on `port`. The flag's path."""
    flag = node.root / "lib" / "maintenance"
    node.write_env(MAINTENANCE_FLAG=str(flag), HANDOVER_TIMEOUT_S=str(TIMEOUT_S), HANDOVER_POLL_S="0.05",
                   PEER_PRIVATE_IP="127.0.0.1", PEER_PUBLIC_IP="127.0.0.1", PEER_PORT=str(port),
                   PEER_HEALTH_PATH="/latest")
    fake.set_holder(IP, holder)
    return flag


class PeerKeepalived:
    """Plays the peer's keepalived and notify: once the handover has asked the API who holds the IP
    and the drain flag is there, the IP moves to the peer after `delay` (the API's action).
    Records whether and when it saw the flag."""

    def __init__(self, fake: FakeDO, flag: Path, delay: float = 0.5, take: bool = True, then=None):  # noqa: ANN001
        self.flag_seen_at: float | None = None
        self.flag_text = ""
        self.stop = threading.Event()

        def run() -> None:
            while not self.stop.is_set():
                asked = any(r["method"] == "GET" and r["path"] == IP_PATH for r in fake.requests())
                if asked and flag.exists():
                    self.flag_seen_at = time.monotonic()
                    self.flag_text = flag.read_text()
                    if then is not None:  # what else changes once the node is draining
                        then()
                    break
                time.sleep(0.01)
            else:
                return
            time.sleep(delay)
            if take:
                fake.set_holder(IP, PEER)

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def outcome(proc) -> dict:  # noqa: ANN001
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout + proc.stderr
    return json.loads(lines[0])


def handover_under(node: Node, fake: FakeDO, flag: Path, run=None, **peer: object):  # noqa: ANN001, ANN201
    """`mt-failover handover` (or `run`) while the peer plays its part: (process, seconds, the peer)."""
    keepalived = PeerKeepalived(fake, flag, **peer)
    t0 = time.monotonic()
    try:
        proc = run() if run is not None else node.run("handover", timeout=TIMEOUT_S + 20)
    finally:
        keepalived.close()
    return proc, time.monotonic() - t0, keepalived


# -- the holder hands over --------------------------------------------------------------------------


def test_the_holder_drains_and_returns_once_the_peer_holds_the_ip_and_answers(node: Node, fake: FakeDO, peer_app):
    flag = setup(node, fake, peer_app.port)
    holder_file = node.state_dir / "holder"
    node.state_dir.mkdir(parents=True, exist_ok=True)
    holder_file.write_text("1\n")  # keepalived's weight for the holder, as the reconciler keeps it
    node.write_env(HOLDER_FILE=str(holder_file))
    proc, took, peer = handover_under(node, fake, flag, delay=0.5)
    assert proc.returncode == 0, proc.stderr
    doc = outcome(proc)
    assert doc["handover"] == "done" and doc["holder"] == PEER and doc["node"] == "primary", doc
    # It waited for the move (0.5 s after the flag), and not much longer.
    assert peer.flag_seen_at is not None and peer.flag_text.startswith("handover by mt-failover")
    assert 0.5 <= doc["seconds"] < TIMEOUT_S and took < TIMEOUT_S + 3, (doc, took)
    assert fake.holder(IP) == PEER and posts(fake) == []  # this node never assigns: the peer does
    assert not flag.exists(), "the handover left this node drained"
    assert holder_file.read_text() == "0\n", "back from its reboot, this node would outrank the new holder"
    assert "handover: reserved IP 203.0.113.10 is on droplet 102 and the peer answers through it" in proc.stderr


def test_an_operators_drain_flag_is_waited_on_and_left_in_place(node: Node, fake: FakeDO, peer_app):
    flag = setup(node, fake, peer_app.port)
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text("drained by rollout-42 at 2026-12-01T10:00:00Z\n")
    proc, _, peer = handover_under(node, fake, flag, delay=0.2)
    assert proc.returncode == 0 and outcome(proc)["handover"] == "done", proc.stderr
    assert flag.read_text().startswith("drained by rollout-42"), "an operator's drain must survive the handover"


# -- every other ending lets the shutdown continue, and says why -------------------------------------


def test_a_node_that_does_not_hold_the_ip_just_stops(node: Node, fake: FakeDO, peer_app):
    flag = setup(node, fake, peer_app.port, holder=PEER)
    proc, took, peer = handover_under(node, fake, flag)
    assert proc.returncode == 0 and outcome(proc)["handover"] == "not-holder", proc.stderr
    assert "on droplet 102, not here: nothing to hand over" in proc.stderr
    assert peer.flag_seen_at is None and not flag.exists() and took < 3


@pytest.mark.parametrize("peer_state", ["closed", "503"])
def test_an_unhealthy_peer_means_no_handover(node: Node, fake: FakeDO, peer_app, peer_state: str):
    if peer_state == "503":
        peer_app.status = 503
    flag = setup(node, fake, closed_port() if peer_state == "closed" else peer_app.port)
    proc, took, peer = handover_under(node, fake, flag)
    assert proc.returncode == 6, proc.stderr
    doc = outcome(proc)
    assert doc["handover"] == "no-healthy-peer" and doc["holder"] == ME, doc
    assert "no healthy peer to hand over to" in proc.stderr
    assert ("HTTP 503" if peer_state == "503" else "refused") in doc["detail"]
    assert peer.flag_seen_at is None, "drained towards a peer that cannot serve"
    assert fake.holder(IP) == ME and took < 4


def test_an_api_that_cannot_answer_means_no_handover(node: Node, fake: FakeDO, peer_app):
    flag = setup(node, fake, peer_app.port)
    fake.inject(500, count=5, match="get")
    proc, took, peer = handover_under(node, fake, flag)
    assert proc.returncode == 3, proc.stderr
    doc = outcome(proc)
    assert doc["handover"] == "api-error" and "HTTP 500" in doc["detail"], doc
    assert "the peer could not move it either: stopping without a handover" in proc.stderr
    assert peer.flag_seen_at is None and took < 4


def test_an_api_failing_during_the_wait_ends_at_the_timeout(node: Node, fake: FakeDO, peer_app):
    flag = setup(node, fake, peer_app.port)
    proc, took, _ = handover_under(node, fake, flag, take=False,
                                   then=lambda: fake.inject(500, count=1000, match="get"))
    assert proc.returncode == 3, proc.stderr
    doc = outcome(proc)
    assert doc["handover"] == "timeout" and "HTTP 500" in doc["detail"], doc
    assert "letting the shutdown continue" in proc.stderr
    assert proc.stderr.count("cannot read the holder, asking again") == 1  # once per kind of error, no flood
    assert TIMEOUT_S <= took < TIMEOUT_S + 3 and not flag.exists()


def test_a_peer_that_never_takes_the_ip_ends_at_the_timeout(node: Node, fake: FakeDO, peer_app):
    flag = setup(node, fake, peer_app.port)
    proc, took, peer = handover_under(node, fake, flag, take=False)
    assert proc.returncode == 3, proc.stderr
    doc = outcome(proc)
    assert doc["handover"] == "timeout" and doc["holder"] == ME, doc
    assert f"timed out after {TIMEOUT_S:g} s (the API still names this droplet): letting the shutdown continue" \
        in proc.stderr
    assert peer.flag_seen_at is not None and TIMEOUT_S <= took < TIMEOUT_S + 3
    assert not flag.exists(), "a timed-out handover left this node drained"


def test_the_peer_must_answer_where_the_ip_now_leads(node: Node, fake: FakeDO, peer_app):
    """The API naming the peer is not enough: a peer that stopped answering is waited on."""
    flag = setup(node, fake, peer_app.port)
    proc, _, _ = handover_under(node, fake, flag, delay=0.1, then=lambda: setattr(peer_app, "status", 503))
    assert proc.returncode == 3, proc.stderr
    assert "the API names droplet 102, but the peer does not answer yet" in outcome(proc)["detail"]


def test_sigterm_from_systemd_ends_it_at_once_and_undrains(node: Node, fake: FakeDO, peer_app):
    flag = setup(node, fake, peer_app.port)
    node.write_env(HANDOVER_TIMEOUT_S="60")
    proc = node.start("handover")
    wait_until(flag.exists)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, _, err = node.finish(proc, timeout=10)
    assert code == 3 and time.monotonic() - t0 < 5, err  # at once, give or take a loaded machine
    assert "handover: interrupted (SIGTERM): letting the shutdown continue" in err
    assert not flag.exists()


# -- boot and configuration ------------------------------------------------------------------------


def test_release_at_boot_removes_only_a_flag_a_handover_left(node: Node, fake: FakeDO, peer_app):
    flag = setup(node, fake, peer_app.port)
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.write_text("handover by mt-failover at 2026-12-01T10:00:00Z (pid 1): removed when the handover ends\n")
    assert node.run("handover", "--release").returncode == 0 and not flag.exists()
    flag.write_text("drained by operator at 2026-12-01T10:00:00Z\n")
    assert node.run("handover", "--release").returncode == 0 and flag.exists()
    assert node.run("handover", "--release").returncode == 0  # and again: idempotent
    assert api_free(fake), "--release needs no API call"


def api_free(fake: FakeDO) -> bool:
    return not [r for r in fake.requests() if r["path"].startswith("/v2/")]


def test_handover_without_a_maintenance_flag_path_is_a_config_error(node: Node, fake: FakeDO):
    proc = node.run("handover")
    assert proc.returncode == 2
    assert "MAINTENANCE_FLAG='' is invalid: handover needs the absolute path" in proc.stderr
    assert api_free(fake)


# -- the rollout's path: `sudo -n mt-deploy handover` before it powers a node off ---------------------


def install_deploy(node: Node, tmp_path: Path) -> Path:
    """mt-deploy and mt-failover installed under a root, as on a droplet, with this node's settings."""
    root = tmp_path / "droplet"
    libexec = root / "usr/libexec/minitwit-ha"
    libexec.mkdir(parents=True)
    for name in ("mt-deploy", "mt-failover", "mt_observe.py"):
        shutil.copy2(base.ROOT / "scripts" / name, libexec / name)
    etc = root / "etc/minitwit-ha"
    etc.mkdir(parents=True)
    shutil.copy2(node.env_file, etc / "failover.env")
    (etc / "health.env").write_text(f"HEALTH_URL=http://127.0.0.1:1/latest\nMAINTENANCE_FLAG={node.values['MAINTENANCE_FLAG']}\n")
    return libexec / "mt-deploy"


@pytest.mark.parametrize("peer_healthy", [True, False])
def test_mt_deploy_handover_runs_the_same_path_for_a_rollout(node: Node, fake: FakeDO, peer_app, tmp_path: Path,
                                                              peer_healthy: bool):
    flag = setup(node, fake, peer_app.port if peer_healthy else closed_port())
    script = install_deploy(node, tmp_path)
    # What `sudo -n` leaves: no settings in the environment.
    proc, _, _ = handover_under(node, fake, flag, delay=0.2, run=lambda: subprocess.run(
        [str(script), "handover"], env={"PATH": f"{node.python_bin}:/usr/bin:/bin"}, capture_output=True, text=True,
        timeout=TIMEOUT_S + 20))
    node.captured += [proc.stdout, proc.stderr]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    if peer_healthy:
        assert proc.returncode == 0 and doc["handover"] == "done" and fake.holder(IP) == PEER, proc.stderr
    else:
        assert proc.returncode == 6 and doc["handover"] == "no-healthy-peer" and fake.holder(IP) == ME, proc.stderr
    assert not flag.exists()
