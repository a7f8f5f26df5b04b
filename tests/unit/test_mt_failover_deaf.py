"""A takeover by a node whose keepalived just started and heard nobody (issue #12, `deaf start`).

A replacement droplet's keepalived can start before the survivor is re-pointed at it: the survivor
still unicasts its adverts to the old address, so the new node hears nothing and becomes MASTER.
Its takeover must then leave the reserved IP on the survivor, which holds it and answers over the
VPC; a node that lost a live peer after hearing it (keepalived-stop, node-down) still moves it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.lab.fakedo import FakeDO
from tests.unit import test_mt_failover as base
from tests.unit.test_mt_failover import IP, ME, PEER, Node, posts
from tests.unit.test_mt_failover_handover import PeerApp, closed_port

fake, node, python_bin = base.fake, base.node, base.python_bin


@pytest.fixture
def peer_app():
    app = PeerApp()
    yield app
    app.close()


@pytest.fixture
def keepalived(tmp_path: Path):
    """A live process named keepalived and its pidfile; `age(s)` dates its start `s` seconds back."""
    binary = tmp_path / "keepalived"
    binary.write_bytes(Path("/bin/sleep").read_bytes())
    binary.chmod(0o755)
    proc = subprocess.Popen([str(binary), "60"])
    pidfile = tmp_path / "keepalived.pid"
    pidfile.write_text(f"{proc.pid}\n")

    def age(seconds: float) -> Path:
        t = time.time() - seconds
        os.utime(pidfile, (t, t))
        return pidfile

    yield age
    proc.kill()
    proc.wait()


def takeover(node: Node, fake: FakeDO, port: int, pidfile: Path, holder: int | None = PEER):
    fake.set_holder(IP, holder)
    node.write_env(KEEPALIVED_PIDFILE=str(pidfile), PEER_PRIVATE_IP="127.0.0.1", PEER_PUBLIC_IP="127.0.0.1",
                   PEER_PORT=str(port), PEER_HEALTH_PATH="/latest", STALL_GRACE_S="0.1")
    assert node.notify("BACKUP", "100").returncode == 0
    return node.notify("MASTER", "100")


def test_a_deaf_start_leaves_the_ip_on_a_peer_that_holds_it_and_answers(node: Node, fake: FakeDO, peer_app,
                                                                       keepalived):
    proc = takeover(node, fake, peer_app.port, keepalived(1.0))
    assert proc.returncode == 0, proc.stderr
    assert posts(fake) == [] and fake.holder(IP) == PEER
    assert "deaf start" in proc.stderr and peer_app.hits >= 1


def test_a_node_that_heard_its_peer_before_still_takes_over(node: Node, fake: FakeDO, peer_app, keepalived):
    """keepalived-stop on the holder: its HAProxy still answers, this keepalived has run for a minute."""
    proc = takeover(node, fake, peer_app.port, keepalived(60.0))
    assert proc.returncode == 0, proc.stderr
    assert len(posts(fake)) == 1 and fake.holder(IP) == ME
    assert "deaf start" not in proc.stderr


def test_a_deaf_start_still_takes_an_unassigned_ip(node: Node, fake: FakeDO, peer_app, keepalived):
    """The first `pulumi up`: the peer's HAProxy answers before its keepalived runs, nobody holds the IP."""
    proc = takeover(node, fake, peer_app.port, keepalived(1.0), holder=None)
    assert proc.returncode == 0, proc.stderr
    assert fake.holder(IP) == ME


def test_a_deaf_start_takes_the_ip_from_a_peer_that_is_gone(node: Node, fake: FakeDO, keepalived):
    proc = takeover(node, fake, closed_port(), keepalived(1.0))
    assert proc.returncode == 0, proc.stderr
    assert fake.holder(IP) == ME and "deaf start" not in proc.stderr


def test_the_labs_settled_pair_waits_out_the_scripts_deaf_start_window():
    # The drill starts each fault from a settled pair: both keepalived older than DEAF_START_S
    # (tests/lab/lab.py). A script default changed without the lab would measure a deaf start.
    import re

    from tests.lab import lab

    text = (Path(__file__).resolve().parents[2] / "scripts" / "mt-failover").read_text()
    default = re.search(r'"DEAF_START_S": "([0-9.]+)"', text)
    assert default is not None and float(default.group(1)) == lab.DEAF_START_S
