"""The rogue-VRRP check is only meaningful if the rogue's adverts are real VRRP.

Control experiment: a bare keepalived (no firewall, no vrrp_check_unicast_src) hears the same
adverts the `rogue-vrrp` drill scenario sends, and steps down to their higher priority. In the
drill, the stack's ruleset and settings make the same adverts change nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.support.needs import missing_binaries, need, not_root

pytestmark = pytest.mark.lab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = """global_defs {
    router_id rogue-control
}
vrrp_instance minitwit {
    state BACKUP
    interface eth1
    virtual_router_id 51
    priority 100
    version 3
    advert_int 0.2
    unicast_src_ip 198.51.100.31
    unicast_peer {
        198.51.100.32
    }
    virtual_ipaddress {
        203.0.113.99/32 dev lo
    }
}
"""


def sh(*argv):
    return subprocess.run(list(argv), check=True, capture_output=True, text=True)


@pytest.fixture
def pair(tmp_path):
    need(not_root() or missing_binaries("ip", "keepalived"))
    tag = uuid.uuid4().hex[:6]
    a, b = f"mthac-a-{tag}", f"mthac-b-{tag}"
    procs = []
    try:
        for name in (a, b):
            sh("ip", "netns", "add", name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "link", "add", "eth1", "netns", a, "type", "veth", "peer", "name", "eth1", "netns", b)
        for name, addr in ((a, "198.51.100.31/24"), (b, "198.51.100.32/24")):
            sh("ip", "-n", name, "addr", "add", addr, "dev", "eth1")
            sh("ip", "-n", name, "link", "set", "eth1", "up")
        yield a, b, procs, tmp_path
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for name in (a, b):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def wait_for(path, text, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return True
        time.sleep(0.05)
    return False


def test_a_bare_keepalived_yields_to_the_rogue_adverts(pair):
    a, b, procs, tmp = pair
    conf = tmp / "keepalived.conf"
    conf.write_text(CONF)
    log = tmp / "keepalived.log"
    with open(log, "w") as fh:
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", a, "keepalived", "--dont-fork", "--log-console", "--no-syslog", "--vrrp",
             "-f", str(conf), "-p", str(tmp / "k.pid"), "-r", str(tmp / "v.pid")], stdout=fh, stderr=subprocess.STDOUT))
    assert wait_for(log, "Entering MASTER STATE", 10), log.read_text()
    rogue = subprocess.run(["ip", "netns", "exec", b, sys.executable, "-m", "tests.lab.rogue", "--vrid", "51",
                            "--priority", "254", "--src", "198.51.100.32", "--to", "198.51.100.31", "--seconds", "2"],
                           cwd=ROOT, capture_output=True, text=True, timeout=30, env={**os.environ, "PYTHONPATH": ROOT})
    assert rogue.returncode == 0, rogue.stderr
    assert wait_for(log, "Entering BACKUP STATE", 5), log.read_text()
