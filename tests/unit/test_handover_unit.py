"""minitwit-ha-handover.service as rendered (#16): its stop must run before anything that serves
is stopped, stay inside systemd's stop timeout, and never be skipped because its start failed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from infra import steps
from infra.haproxy import HaproxyFacts
from infra.node import CONTAINER_SCOPES_DROPIN, HANDOVER_UNIT, STEP_FAILOVER, NodeFacts, NodePaths, render_node_files
from tests.support.needs import missing_binaries, need

SERVING = {"keepalived.service", "haproxy.service", "docker.service", "minitwit-ha-healthwatch.service",
           "minitwit-ha-reconcile.service", "network-online.target", "nss-lookup.target"}


def facts(root: str = "") -> NodeFacts:
    return NodeFacts(name="primary", droplet_id=1, private_ip="10.110.16.3", peer_private_ip="10.110.16.4",
                     reserved_ip="203.0.113.10", priority=150, router_id=51, private_interface="eth1",
                     admin_cidrs=("198.51.100.0/24",), http_ports=(80, 443),
                     health_url="http://127.0.0.1:5000/latest", paths=NodePaths(root=root), haproxy=HaproxyFacts())


def parse_unit(text: str) -> dict[str, list[str]]:
    """key -> every value it was given (systemd adds up repeated After= lines)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def env_values(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


@pytest.fixture
def rendered():
    return {f.path: f for f in render_node_files(facts())}


def test_its_stop_hands_over_before_anything_that_serves_stops(rendered):
    unit = rendered[f"/etc/systemd/system/{HANDOVER_UNIT}"]
    assert unit.step == STEP_FAILOVER and unit.mode == 0o644
    u = parse_unit(unit.content)
    after = {name for value in u["After"] for name in value.split()}
    assert after >= SERVING, SERVING - after
    assert "Before" not in u and "DefaultDependencies" not in u  # stopped by shutdown.target like any service
    assert u["Type"] == ["oneshot"] and u["RemainAfterExit"] == ["yes"]  # active until shutdown: ExecStop runs then
    assert u["ExecStop"] == ["/usr/libexec/minitwit-ha/mt-failover handover"]
    # A failed start would leave the unit inactive, and an inactive unit's ExecStop never runs.
    assert u["ExecStart"] == ["-/usr/libexec/minitwit-ha/mt-failover handover --release"]
    assert u["WantedBy"] == ["multi-user.target"]


def test_the_app_containers_stop_only_after_the_handover(rendered):
    """Docker's container scopes sit in system.slice, which a shutdown stops all at once: without an
    order the app dies while the handover waits for the move, and the requests it holds fail."""
    dropin = rendered[f"/etc/systemd/system/{CONTAINER_SCOPES_DROPIN}"]
    assert dropin.step == STEP_FAILOVER and dropin.mode == 0o644
    # The prefix drop-in systemd applies to every docker-<id>.scope (and no other unit).
    assert CONTAINER_SCOPES_DROPIN.split("/")[0] == "docker-.scope.d"
    # Before= the handover: stops run in reverse order, so the containers stop after its ExecStop.
    assert parse_unit(dropin.content) == {"Before": [HANDOVER_UNIT]}
    assert "[Unit]" in dropin.content


def test_the_handover_ends_on_its_own_well_inside_the_stop_timeout(rendered):
    u = parse_unit(rendered[f"/etc/systemd/system/{HANDOVER_UNIT}"].content)
    env = env_values(rendered["/etc/minitwit-ha/failover.env"].content)
    assert u["Environment"] == ["MT_FAILOVER_ENV=/etc/minitwit-ha/failover.env"]
    timeout = float(env["HANDOVER_TIMEOUT_S"])
    assert timeout >= 10 and int(u["TimeoutStopSec"][0]) >= timeout + 10
    # The same drain flag the watcher and mt-health act on.
    health = env_values(rendered["/etc/minitwit-ha/health.env"].content)
    assert env["MAINTENANCE_FLAG"] == health["MAINTENANCE_FLAG"] == "/var/lib/minitwit-ha/maintenance"
    assert env["MAINTENANCE_FLAG"].startswith(u["ReadWritePaths"][0].split()[1])  # writable under ProtectSystem


def test_provisioning_enables_it_but_never_restarts_it():
    """A restart is a stop: it would hand the reserved IP over on every `pulumi up`."""
    command = steps.failover_command(NodePaths())
    assert f"systemctl enable --now {HANDOVER_UNIT}" in command
    assert not [line for line in command.splitlines() if "restart" in line and HANDOVER_UNIT in line]


def test_systemd_accepts_the_unit(tmp_path: Path):
    need(missing_binaries("systemd-analyze"))
    files = render_node_files(facts(root=str(tmp_path)))
    for f in files:
        path = Path(f.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f.content)
        path.chmod(f.mode)
    unit = tmp_path / "etc" / "systemd" / "system" / HANDOVER_UNIT
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    mine = [line for line in (proc.stdout + proc.stderr).splitlines() if HANDOVER_UNIT in line]
    assert proc.returncode == 0 and not mine, proc.stdout + proc.stderr
