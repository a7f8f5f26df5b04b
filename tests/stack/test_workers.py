"""App workers (appWorkers) under mocks: droplets, chains without keepalived, both HAProxy configs,
the database's trust, each worker's own firewall; and appWorkers 0 is exactly the pair."""

from __future__ import annotations

import pytest
import yaml

from infra.database import db_client_tag
from tests.conftest import base_config, run_stack
from tests.stack.test_stack import DROPLET, NODES, archive_files, node_file

WORKERS = ("worker-1", "worker-2", "worker-3")


@pytest.fixture(scope="module")
def three():
    return run_stack(base_config(appWorkers=3))


def _step_names(run, node: str) -> set[str]:
    prefix = f"minitwit-test-{node}-"
    return {r.name[len(prefix):] for r in run.commands() if r.name.startswith(prefix)}


def test_three_workers_give_five_droplets_all_trusted_by_the_database(three):
    droplets = three.mocks.of_type(DROPLET)
    assert sorted(d.name for d in droplets) == sorted(f"minitwit-test-{n}" for n in (*NODES, *WORKERS))
    for d in droplets:
        assert db_client_tag("test") in d.plain("tags"), d.name
    assert len({d.plain("vpcUuid") for d in droplets}) == 1


def test_worker_chains_run_the_app_steps_but_no_keepalived_haproxy_failover_or_token(three):
    for w in WORKERS:
        assert _step_names(three, w) == {"wait", "bootstrap", "firewall", "app-env", "db-ca", "app"}, w
    for n in NODES:
        assert {"keepalived", "haproxy", "failover", "failover-token", "retire"} <= _step_names(three, n)


def test_both_haproxy_configs_list_every_worker_and_balance_by_least_connections(three):
    workers = three.outputs["workers"].value
    nodes = three.outputs["nodes"].value
    assert [set(w) for w in workers] == [{"droplet_id", "public_ipv4", "private_ipv4"}] * 3
    ips = [w["private_ipv4"] for w in workers]
    assert len(set(ips) | {n["private_ipv4"] for n in nodes.values()}) == 5
    for node in NODES:
        cfg = node_file(three, node, "haproxy", "/etc/haproxy/haproxy.cfg.new")
        servers = [ln.split() for ln in cfg.splitlines() if ln.strip().startswith("server ")]
        assert [s[1:3] for s in servers[2:]] == [[f"worker-{i + 1}", f"{ip}:5000"] for i, ip in enumerate(ips)]
        # The same checks as the pair's own apps.
        assert len({" ".join(s[3:]) for s in servers}) == 1
        assert "balance leastconn" in cfg and "balance first" not in cfg


def test_a_worker_firewall_admits_the_app_port_only_from_the_pair_and_ssh_only_from_admins(three):
    nodes = three.outputs["nodes"].value
    pair = f'{{ {nodes["primary"]["private_ipv4"]}, {nodes["standby"]["private_ipv4"]} }}'
    rules = node_file(three, "worker-1", "firewall", "/etc/nftables.conf")
    accepts = [ln.strip() for ln in rules.splitlines() if ln.strip().endswith("accept") and ("dport" in ln or "proto-dst" in ln)]
    assert accepts == [
        "tcp dport { 22, 9100 } ip saddr @admin_v4 accept",
        f'tcp dport 5000 iifname "eth1" ip saddr {pair} accept',
        f'ct state new ct status dnat meta l4proto tcp ct original proto-dst 5000 iifname "eth1" ip saddr {pair} accept',
    ]
    assert "policy drop" in rules and "vrrp" in rules and "accept" not in [
        ln for ln in rules.splitlines() if "vrrp" in ln][0]


def test_a_worker_gets_the_app_its_health_check_and_mt_deploy_but_no_keepalived_or_haproxy(three):
    files = archive_files(three, "minitwit-test-worker-2-app")
    assert {"/srv/minitwit/compose.yaml", "/etc/minitwit-ha/health.env",
            "/usr/libexec/minitwit-ha/mt-deploy", "/usr/libexec/minitwit-ha/mt-health"} <= set(files)
    assert not [p for p in files if "keepalived" in p or "haproxy" in p or p.endswith(".service")]
    env = dict(ln.split("=", 1) for ln in files["/srv/minitwit/stack.env"][1].splitlines() if "=" in ln
               and not ln.startswith("#"))
    assert env["MTHA_PRIVATE_IPV4"] == three.outputs["workers"].value[1]["private_ipv4"]
    health = files["/etc/minitwit-ha/health.env"][1]
    assert "SERVE_URL=\n" in health  # nothing on a worker checks HAProxy's monitor


def test_known_hosts_covers_the_workers_for_the_rollout(three):
    known = three.outputs["known_hosts"].value.splitlines()
    assert len(known) == 5


def test_app_workers_zero_renders_exactly_the_pair():
    """The same resources and the same step inputs as a config without the key (golden files: test_render)."""
    def snapshot(run):
        return sorted((r.typ, r.name, str(r.inputs.get("stdin")), str(r.inputs.get("triggers"))) for r in run.resources)
    assert snapshot(run_stack(base_config(appWorkers=0))) == snapshot(run_stack(base_config()))


@pytest.mark.parametrize("value", [-1, 11, "two"])
def test_app_workers_out_of_range_is_refused_naming_the_key(value):
    from infra.settings import SettingsError
    with pytest.raises(SettingsError, match="appWorkers"):
        run_stack(base_config(appWorkers=value))


def test_rollout_py_reaches_every_worker_as_deploy_and_may_run_only_mt_deploy_there(three):
    # `rollout.py rollout` updates workers too: SSH to the output's public address, pinned by the
    # stack's known_hosts, as `deploy`, whose one sudo rule names the worker's installed mt-deploy.
    workers = three.outputs["workers"].value
    known = three.outputs["known_hosts"].value.splitlines()
    nodes = three.outputs["nodes"].value
    assert len({w["public_ipv4"] for w in workers} | {n["public_ipv4"] for n in nodes.values()}) == 5
    for i, w in enumerate(workers):
        name = f"minitwit-test-worker-{i + 1}"
        droplet = three.mocks.named(name)
        doc = yaml.safe_load(droplet.plain("userData"))
        assert f"{w['public_ipv4']} {doc['ssh_keys']['ed25519_public']}" in known
        assert "deploy" in [u["name"] for u in doc["users"]]
        sudoers = next(f["content"] for f in doc["write_files"] if f["path"] == "/etc/sudoers.d/minitwit-ha-deploy")
        assert "deploy ALL=(root) NOPASSWD: NOSETENV: /usr/libexec/minitwit-ha/mt-deploy," in sudoers
        shipped = archive_files(three, f"{name}-app")
        assert shipped["/usr/libexec/minitwit-ha/mt-deploy"][0] == 0o755
