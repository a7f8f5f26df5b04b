"""scripts/pairctl.py status with a stub ssh (answers per host from files) and the fake API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.fakedo import Droplet, FakeDO

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "pairctl.py"
TOKEN = "dop_v1_" + "c" * 64
IP = "203.0.113.10"
PUBLIC = {"primary": "192.0.2.11", "standby": "192.0.2.12"}
IDS = {"primary": 101, "standby": 102}
STUB_SSH = """import json, os, sys
host = sys.argv[-2].split("@", 1)[1]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
path = os.path.join(os.environ["STUB_DIR"], host)
if not os.path.exists(path):
    sys.stderr.write(f"ssh: connect to host {host} port 22: No route to host\\n")
    sys.exit(255)
sys.stdout.write(open(path).read())
"""


def node_docs(name: str, state: str, healthy: bool = True, token_ok: bool = True) -> str:
    now = time.time()
    failover = {"node": name, "droplet_id": IDS[name], "reserved_ip": IP, "vrrp_state": state,
                "vrrp_since": now - 300, "holder": None,
                "token_check": {"ok": token_ok, "result": "ok" if token_ok else "refused (HTTP 401)",
                                "detail": "", "time": now - 20, "ok_time": now - 20},
                "transitions": [{"ts": "2026-11-25T18:00:00.123Z", "from": "BACKUP", "to": state, "priority": 150}]}
    deploy = {"node": name, "vrrp_state": state, "configured_version": "v7", "running_version": "v7",
              "healthy": healthy, "maintenance": False}
    return json.dumps(failover) + "\n" + json.dumps(deploy) + "\n"


@pytest.fixture
def pair(tmp_path: Path):
    droplets = [Droplet(id=IDS[n], name=n, public_ipv4=PUBLIC[n], private_ipv4=f"198.51.100.{IDS[n] - 90}")
                for n in IDS]
    with FakeDO(token=TOKEN, droplets=droplets, reserved_ips={IP: IDS["primary"]}) as fake:
        stub_dir = tmp_path / "hosts"
        stub_dir.mkdir()
        (tmp_path / "ssh").write_text(STUB_SSH)
        outputs = tmp_path / "outputs.json"
        outputs.write_text(json.dumps({"reserved_ip": IP, "app_url": f"http://{IP}/", "vpc_id": "v",
                                       "nodes": {n: {"droplet_id": IDS[n], "public_ipv4": PUBLIC[n],
                                                     "private_ipv4": "198.51.100.1"} for n in IDS}}))
        env = {**os.environ, "STUB_DIR": str(stub_dir), "STUB_LOG": str(tmp_path / "ssh.log"),
               "PAIRCTL_SSH": f"{sys.executable} {tmp_path / 'ssh'}", "DO_API_URL": fake.url,
               "PAIRCTL_ALLOW_HTTP": "1", "DIGITALOCEAN_READ_TOKEN": TOKEN,
               "PAIRCTL_OUTPUTS_CMD": f"cat {outputs}"}  # stands in for `pulumi stack output --json`

        def run(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, str(SCRIPT), "status", *args], env={**env, **extra},
                                  capture_output=True, text=True, timeout=60, check=False)

        def answer(name: str, text: str | None) -> None:
            path = stub_dir / PUBLIC[name]
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(text)

        yield run, answer, fake, tmp_path


def test_a_redundant_pair_exits_0_with_one_table(pair):
    run, answer, fake, tmp_path = pair
    answer("primary", node_docs("primary", "MASTER"))
    answer("standby", node_docs("standby", "BACKUP"))
    proc = run()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "reserved IP 203.0.113.10: held by primary (droplet 101) per the API" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("primary", "standby"))}
    assert rows["primary"].split()[:6] == ["primary", "101", "MASTER", "5m", "ago", "ok"]
    assert "v7" in rows["standby"] and "ok 20s ago" in rows["standby"] and "BACKUP" in rows["standby"]
    assert "redundant: yes" in out
    # read-only commands only, as deploy, via sudo -n
    calls = [json.loads(line) for line in (tmp_path / "ssh.log").read_text().splitlines()]
    assert sorted(c[-2] for c in calls) == ["deploy@192.0.2.11", "deploy@192.0.2.12"]
    assert all(c[-1] == "sudo -n /usr/libexec/minitwit-ha/mt-failover status; "
                        "sudo -n /usr/libexec/minitwit-ha/mt-deploy status" for c in calls)
    assert [r["auth"] for r in fake.requests()] == ["ok"]


def test_remote_root_prefixes_each_nodes_scripts(pair):
    """The lab keeps each node's files under its own root: `--remote-root /run/lab/{node}`."""
    run, answer, _, tmp_path = pair
    answer("primary", node_docs("primary", "MASTER"))
    answer("standby", node_docs("standby", "BACKUP"))
    assert run("--remote-root", "/run/lab/{node}/").returncode == 0
    calls = {c[-2]: c[-1] for c in map(json.loads, (tmp_path / "ssh.log").read_text().splitlines())}
    assert calls["deploy@192.0.2.12"] == ("sudo -n /run/lab/standby/usr/libexec/minitwit-ha/mt-failover status; "
                                          "sudo -n /run/lab/standby/usr/libexec/minitwit-ha/mt-deploy status")


def test_a_node_down_is_not_redundant_and_says_why(pair):
    run, answer, fake, _ = pair
    answer("primary", None)  # ssh: no route to host
    answer("standby", node_docs("standby", "MASTER"))
    fake.set_holder(IP, IDS["standby"], run_hook=False)
    proc = run("--json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["redundant"] is False and report["holder"]["node"] == "standby"
    assert report["nodes"]["primary"]["reachable"] is False
    assert "No route to host" in report["nodes"]["primary"]["error"]
    assert any("no healthy BACKUP" in p for p in report["problems"])


@pytest.mark.parametrize(("primary", "standby", "holder", "problem"), [
    (("MASTER",), ("BACKUP", False), "primary", "no healthy BACKUP"),          # standby app failing
    (("MASTER",), ("BACKUP", True, False), "primary", "no healthy BACKUP"),    # standby token revoked
    (("MASTER",), ("MASTER",), "primary", "2 nodes are MASTER"),
    (("MASTER",), ("BACKUP",), "standby", "not on the MASTER primary"),
])
def test_what_makes_a_pair_not_redundant(pair, primary, standby, holder, problem):
    run, answer, fake, _ = pair
    answer("primary", node_docs("primary", *primary))
    answer("standby", node_docs("standby", *standby))
    fake.set_holder(IP, IDS[holder], run_hook=False)
    proc = run()
    assert proc.returncode == 1, proc.stdout
    assert "redundant: NO" in proc.stdout and problem in proc.stdout


def test_without_a_read_token_the_api_column_is_unknown(pair):
    run, answer, fake, _ = pair
    answer("primary", node_docs("primary", "MASTER"))
    answer("standby", node_docs("standby", "BACKUP"))
    proc = run(DIGITALOCEAN_READ_TOKEN="")
    assert "held by unknown: no DIGITALOCEAN_READ_TOKEN" in proc.stdout
    assert proc.returncode == 0 and fake.requests() == []
    proc = run(PAIRCTL_ALLOW_HTTP="0")  # plain http refused outside tests: the token stays home
    assert "DO_API_URL is not https" in proc.stdout and fake.requests() == []


def test_unreadable_outputs_exit_2(pair, tmp_path):
    run, *_ = pair
    bad = tmp_path / "bad.json"
    bad.write_text('{"reserved_ip": "203.0.113.10"}')
    proc = run("--outputs", str(bad))
    assert proc.returncode == 2 and "lack reserved_ip or nodes.primary/standby" in proc.stderr
    proc = run(PAIRCTL_OUTPUTS_CMD="false")
    assert proc.returncode == 2 and "false failed" in proc.stderr
