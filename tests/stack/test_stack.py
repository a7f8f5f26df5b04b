"""The program under Pulumi mocks: what is declared, what each node gets, where secrets go."""

from __future__ import annotations

import base64
import io
import re
import tarfile

import pytest
import yaml

from infra.offline import DoMocks, unwrap
from infra.steps import read_archive_b64
from tests.conftest import (
    PUBLIC_KEY,
    ROOT,
    SENTINEL_PRIVATE_KEY,
    SENTINEL_REGISTRY_PASSWORD,
    SENTINEL_TOKEN,
    base_config,
    run_stack,
)

DROPLET = "digitalocean:index/droplet:Droplet"
RESERVED_IP = "digitalocean:index/reservedIp:ReservedIp"
VPC = "digitalocean:index/vpc:Vpc"
SSH_KEY = "digitalocean:index/sshKey:SshKey"
REMOTE = "command:remote:Command"
NODES = ("primary", "standby")


def archive_files(run, name: str) -> dict[str, tuple[int, str]]:
    """The files a step sends: its stdin is a base64 tar.gz; path -> (mode, text)."""
    return read_archive_b64(run.mocks.named(name).plain("stdin"))


def node_file(run, node: str, step: str, path: str) -> str:
    return archive_files(run, f"minitwit-test-{node}-{step}")[path][1]


def test_resource_set_and_counts(stack_run):
    types = [r.typ for r in stack_run.resources]
    assert types.count(VPC) == 1
    assert types.count(SSH_KEY) == 1
    assert types.count(DROPLET) == 2
    assert types.count(RESERVED_IP) == 1
    assert types.count("minitwit-ha:index:HaPair") == 1
    # No cloud firewall (it cannot pass VRRP) and nothing that assigns the reserved IP.
    assert not [t for t in types if "firewall" in t.lower() and "database" not in t.lower()]
    assert not [t for t in types if "Assignment" in t]
    names = {r.name for r in stack_run.resources if r.typ == DROPLET}
    assert names == {"minitwit-test-primary", "minitwit-test-standby"}


def test_both_droplets_in_the_vpc_and_one_region(stack_run):
    vpc = stack_run.mocks.of_type(VPC)[0]
    assert vpc.plain("ipRange") == "10.110.16.0/24"
    droplets = stack_run.mocks.of_type(DROPLET)
    for d in droplets:
        assert d.plain("vpcUuid") == "c0ffee00-0000-4000-8000-000000000001"
        assert d.plain("region") == vpc.plain("region") == "fra1"
        assert d.plain("monitoring") is True
        assert "minitwit-ha" in d.plain("tags")
        assert d.plain("sshKeys") == ["3b:16:bf:e4:8b:00:8b:b8:59:8c:a9:d3:f0:19:45:fa"]


def test_cloud_init_creates_deploy_and_locks_root(stack_run):
    user_data = stack_run.mocks.of_type(DROPLET)[0].plain("userData")
    assert user_data.startswith("#cloud-config\n")
    doc = yaml.safe_load(user_data)
    deploy, provision = doc["users"]
    assert deploy["name"] == "deploy" and deploy["ssh_authorized_keys"] == [PUBLIC_KEY]
    # deploy is not root: no sudo group (Debian's %sudo is ALL), no cloud-init sudo rule.
    assert "groups" not in deploy and "sudo" not in deploy
    # provision holds the stack's generated key (DoMocks' tls:PrivateKey), nothing else.
    assert provision["name"] == "provision"
    assert provision["ssh_authorized_keys"] == [DoMocks().provision_key[1].strip()]
    sshd = next(f for f in doc["write_files"] if f["path"].startswith("/etc/ssh/sshd_config.d/"))
    assert "PermitRootLogin no" in sshd["content"] and "PasswordAuthentication no" in sshd["content"]
    assert "AllowUsers deploy provision\n" in sshd["content"]
    assert doc["ssh_pwauth"] is False
    # Each droplet's user data differs only by its own host key; it holds that key, so it is secret.
    droplets = stack_run.mocks.of_type(DROPLET)
    assert all(d.is_secret("userData") for d in droplets)
    without_keys = []
    for d in droplets:
        doc = yaml.safe_load(d.plain("userData"))
        assert set(doc.pop("ssh_keys")) == {"ed25519_private", "ed25519_public"}
        without_keys.append(doc)
    assert without_keys[0] == without_keys[1]


def test_reserved_ip_created_with_region_only(stack_run):
    rip = stack_run.mocks.of_type(RESERVED_IP)[0]
    assert rip.resource_id is None
    assert rip.plain("region") == "fra1"
    assert "dropletId" not in rip.inputs
    assert stack_run.outputs["reserved_ip"].value == "203.0.113.10"


def test_adopted_reserved_ip_is_read_not_managed():
    run = run_stack(base_config(reservedIp="203.0.113.77"))
    rip = run.mocks.of_type(RESERVED_IP)[0]
    assert rip.resource_id == "203.0.113.77"  # a .get(): Pulumi neither changes nor deletes it
    assert rip.inputs == {}
    assert run.outputs["reserved_ip"].value == "203.0.113.77"
    assert run.outputs["app_url"].value == "http://203.0.113.77/"


def test_no_resource_can_move_the_reserved_ip(stack_run):
    for r in stack_run.resources:
        assert "dropletId" not in r.inputs or r.typ != RESERVED_IP
        assert "ReservedIpAssignment" not in r.typ and "FloatingIpAssignment" not in r.typ
    # Nothing Pulumi runs calls the reserved-IP API; only keepalived's notify script does, on the node.
    for r in stack_run.commands():
        for key in ("create", "update", "delete"):
            assert "reserved_ips" not in str(r.plain(key) or "")


def test_outputs_have_the_contract_names_and_shapes(stack_run):
    out = {k: v.value for k, v in stack_run.outputs.items()}
    assert set(out) == {"reserved_ip", "app_url", "vpc_id", "nodes", "workers", "database_host", "database_uri",
                        "known_hosts"}
    assert out["workers"] == []  # appWorkers defaults to 0: the pair alone
    assert stack_run.outputs["database_uri"].secret
    assert out["app_url"] == "http://203.0.113.10/"
    assert set(out["nodes"]) == set(NODES)
    ids = set()
    for node in NODES:
        n = out["nodes"][node]
        assert set(n) == {"droplet_id", "public_ipv4", "private_ipv4"}
        assert isinstance(n["droplet_id"], int)
        ids.add(n["droplet_id"])
    assert len(ids) == 2
    assert out["nodes"]["primary"]["private_ipv4"] != out["nodes"]["standby"]["private_ipv4"]


@pytest.mark.parametrize("node,peer", [("primary", "standby"), ("standby", "primary")])
def test_keepalived_conf_uses_own_ip_as_source_and_the_other_as_peer(stack_run, node, peer):
    nodes = stack_run.outputs["nodes"].value
    conf = node_file(stack_run, node, "keepalived", "/etc/keepalived/keepalived.conf.new")
    assert re.search(rf"^\s*unicast_src_ip {re.escape(nodes[node]['private_ipv4'])}$", conf, re.M)
    peers = re.search(r"unicast_peer \{\s*([^}]*)\}", conf).group(1).split()
    assert peers == [nodes[peer]["private_ipv4"]]
    # Both start BACKUP; no nopreempt: the holder of the reserved IP outranks the other by its weight.
    assert re.search(r"^\s*state BACKUP$", conf, re.M) and not re.search(r"^\s*nopreempt$", conf, re.M)
    assert re.search(r'track_file reserved_ip_holder \{\s*file "/run/minitwit-ha/holder"\s*weight 100', conf)
    assert "enable_script_security" in conf
    assert re.search(r'notify "/usr/libexec/minitwit-ha/mt-failover notify" root', conf)
    assert f"priority {150 if node == 'primary' else 100}" in conf


@pytest.mark.parametrize("node", NODES)
def test_env_file_carries_reserved_ip_and_own_droplet_id(stack_run, node):
    nodes = stack_run.outputs["nodes"].value
    env = node_file(stack_run, node, "failover", "/etc/minitwit-ha/failover.env")
    values = dict(line.split("=", 1) for line in env.splitlines() if line and not line.startswith("#"))
    assert values["RESERVED_IP"] == "203.0.113.10"
    assert values["DROPLET_ID"] == str(nodes[node]["droplet_id"])
    assert values["NODE_NAME"] == node
    assert values["DO_API_URL"] == "https://api.digitalocean.com"
    assert values["METADATA_URL"] == "http://169.254.169.254/metadata/v1"
    assert SENTINEL_TOKEN not in env


@pytest.mark.parametrize("node,peer", [("primary", "standby"), ("standby", "primary")])
def test_firewall_admits_vrrp_only_from_the_peer(stack_run, node, peer):
    nodes = stack_run.outputs["nodes"].value
    rules = node_file(stack_run, node, "firewall", "/etc/nftables.conf")
    vrrp_accept = [ln.strip() for ln in rules.splitlines() if "vrrp" in ln and "accept" in ln]
    assert vrrp_accept == [f'meta l4proto vrrp iifname "eth1" ip saddr {nodes[peer]["private_ipv4"]} accept']
    assert "tcp dport { 22, 8405, 9100 } ip saddr @admin_v4 accept" in rules and "198.51.100.0/24" in rules
    assert "tcp dport { 80, 443 } accept" in rules
    assert "policy drop" in rules


@pytest.mark.parametrize("node,peer", [("primary", "standby"), ("standby", "primary")])
def test_firewall_admits_the_backend_port_and_metrics_only_from_the_peer_over_the_vpc(stack_run, node, peer):
    peer_ip = stack_run.outputs["nodes"].value[peer]["private_ipv4"]
    rules = node_file(stack_run, node, "firewall", "/etc/nftables.conf")
    mentions = [ln.strip() for ln in rules.splitlines() if "5000" in ln and not ln.strip().startswith("#")]
    assert mentions == [
        f'tcp dport {{ 5000, 8405, 9100 }} iifname "eth1" ip saddr {peer_ip} accept',
        f'ct state new ct status dnat meta l4proto tcp ct original proto-dst 5000 iifname "eth1" '
        f'ip saddr {peer_ip} accept',
    ]
    # The public ports stay 80/443: the backend port and the exporters are nobody else's.
    assert [ln.strip() for ln in rules.splitlines() if "accept" in ln and "saddr" not in ln and "dport" in ln] == [
        "tcp dport { 80, 443 } accept"]


@pytest.mark.parametrize("node,peer", [("primary", "standby"), ("standby", "primary")])
def test_firewall_admits_node_exporter_only_from_admin_cidrs_and_the_peer(stack_run, node, peer):
    """The textfile metrics (who is MASTER, the token check) are for the operator's Prometheus only."""
    peer_ip = stack_run.outputs["nodes"].value[peer]["private_ipv4"]
    rules = node_file(stack_run, node, "firewall", "/etc/nftables.conf")
    mentions = [ln.strip() for ln in rules.splitlines() if "9100" in ln and not ln.strip().startswith("#")]
    assert mentions == ["tcp dport { 22, 8405, 9100 } ip saddr @admin_v4 accept",
                        f'tcp dport {{ 5000, 8405, 9100 }} iifname "eth1" ip saddr {peer_ip} accept']


@pytest.mark.parametrize("node,peer", [("primary", "standby"), ("standby", "primary")])
def test_haproxy_cfg_serves_the_local_app_first_and_the_peers_over_the_vpc(stack_run, node, peer):
    nodes = stack_run.outputs["nodes"].value
    cfg = node_file(stack_run, node, "haproxy", "/etc/haproxy/haproxy.cfg.new")
    servers = [ln.split()[:3] for ln in cfg.splitlines() if ln.strip().startswith("server ")]
    assert servers == [["server", "local", f"{nodes[node]['private_ipv4']}:5000"],
                       ["server", "peer", f"{nodes[peer]['private_ipv4']}:5000"]]
    assert "    bind :80\n" in cfg and "balance first" in cfg
    assert "bind 127.0.0.1:8404" in cfg and "stats socket /run/haproxy/admin.sock mode 660 level admin" in cfg


def test_settings_flow_into_haproxy_health_env_and_compose_variables():
    run = run_stack(base_config(appBackendPort=6000, serve="both", appCheckPath="/healthz",
                                healthUrl="http://127.0.0.1:6000/latest"))
    cfg = node_file(run, "primary", "haproxy", "/etc/haproxy/haproxy.cfg.new")
    assert "balance leastconn" in cfg and "option httpchk GET /healthz" in cfg and ":6000 check" in cfg
    health = node_file(run, "primary", "failover", "/etc/minitwit-ha/health.env")
    assert "HEALTH_URL=http://127.0.0.1:6000/latest\n" in health
    assert "SERVE_URL=http://127.0.0.1:8404/minitwit-ha/serving\n" in health
    private = run.outputs["nodes"].value["primary"]["private_ipv4"]
    stack_env = node_file(run, "primary", "app", "/srv/minitwit/stack.env")
    assert f"MTHA_PRIVATE_IPV4={private}\n" in stack_env and "MTHA_APP_BACKEND_PORT=6000\n" in stack_env


def test_haproxy_step_checks_before_the_swap_and_keepalived_waits_for_it(stack_run):
    create = next(r for r in stack_run.commands() if r.name == "minitwit-test-primary-haproxy").plain("create")
    assert create.index("haproxy -c -q -f /etc/haproxy/haproxy.cfg.new") < create.index("sudo mv")
    assert create.index("sudo mv") < create.index("systemctl reload haproxy")
    assert "minitwit-test-primary-haproxy" in _depends_on(stack_run, "minitwit-test-primary-keepalived")
    assert "minitwit-test-primary-app" in _depends_on(stack_run, "minitwit-test-primary-haproxy")


def test_scripts_go_to_a_root_owned_libexec_with_mode_0755(stack_run):
    files = archive_files(stack_run, "minitwit-test-primary-failover")
    for name in ("mt-failover", "mt-health", "mt-healthwatch"):
        mode, _ = files[f"/usr/libexec/minitwit-ha/{name}"]
        assert mode == 0o755
    data = base64.b64decode(stack_run.mocks.named("minitwit-test-primary-failover").plain("stdin"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert {(m.uid, m.gid) for m in tar} == {(0, 0)}
        dirs = {m.name: m.mode for m in tar if m.isdir()}
    assert dirs["usr/libexec/minitwit-ha"] == 0o755


def _every_secret_sentinel():
    return (SENTINEL_TOKEN, SENTINEL_PRIVATE_KEY.splitlines()[1], SENTINEL_REGISTRY_PASSWORD)


def test_secrets_never_reach_commands_environments_or_plain_outputs():
    run = run_stack(base_config(registryServer="registry.digitalocean.com", registryUsername="ci",
                                registryPassword=SENTINEL_REGISTRY_PASSWORD))
    commands = run.commands()
    assert len(commands) >= 18
    for r in commands:
        for key in ("create", "update", "delete", "environment", "dir"):
            text = repr(r.plain(key))
            for sentinel in _every_secret_sentinel():
                assert sentinel not in text, f"{r.name}.{key} carries a secret"
        assert "environment" not in r.inputs or not r.plain("environment")
        # Where a secret travels (stdin), it is marked secret so state encrypts it.
        stdin = repr(r.plain("stdin"))
        if any(s in stdin for s in _every_secret_sentinel()):
            assert r.is_secret("stdin"), f"{r.name}.stdin carries a secret without the secret flag"
        if r.typ == REMOTE:
            assert r.is_secret("connection")
    for key, resolved in run.outputs.items():
        if not resolved.secret:
            for sentinel in _every_secret_sentinel():
                assert sentinel not in repr(resolved.value), f"output {key} leaks a secret"
    # ...and the token does reach the node, through its own 0600 install.
    token_cmds = [r for r in commands if r.name.endswith("-failover-token")]
    assert len(token_cmds) == 2
    for r in token_cmds:
        assert unwrap(r.inputs["stdin"]) == SENTINEL_TOKEN and r.is_secret("stdin")
        assert "install -m 0600 -o root -g root /dev/stdin /etc/minitwit-ha/do-token" in r.plain("create")
    login = [r for r in commands if r.name.endswith("-registry-login")]
    assert len(login) == 2 and all("--password-stdin" in r.plain("create") for r in login)


def _step_triggers(run) -> dict[str, str]:
    return {r.name: repr(r.plain("triggers")) for r in run.commands()}


def test_changing_the_compose_file_changes_only_the_app_steps(tmp_path):
    compose = tmp_path / "compose.yaml"
    ports = '    ports: ["127.0.0.1:${MTHA_APP_BACKEND_PORT}:5000", "${MTHA_PRIVATE_IPV4}:${MTHA_APP_BACKEND_PORT}:5000"]\n'
    compose.write_text("services:\n  minitwit:\n    image: example/minitwit:1\n" + ports)
    before = _step_triggers(run_stack(base_config(composeFile=str(compose))))
    compose.write_text("services:\n  minitwit:\n    image: example/minitwit:2\n" + ports)
    after = _step_triggers(run_stack(base_config(composeFile=str(compose))))
    changed = sorted(name for name in before if before[name] != after[name])
    # The two nodes' app steps, and the readiness gate that re-checks the pair after any change.
    assert changed == ["minitwit-test-primary-app", "minitwit-test-ready", "minitwit-test-standby-app"]


def test_changing_a_timing_profile_changes_only_keepalived_and_failover_steps():
    before = _step_triggers(run_stack(base_config()))
    after = _step_triggers(run_stack(base_config(failoverProfile="tutorial")))
    changed = sorted(name for name in before if before[name] != after[name])
    # keepalived-start re-runs with its configuration: a no-op while keepalived runs.
    assert changed == ["minitwit-test-primary-failover", "minitwit-test-primary-keepalived",
                       "minitwit-test-primary-keepalived-start", "minitwit-test-ready",
                       "minitwit-test-standby-failover", "minitwit-test-standby-keepalived",
                       "minitwit-test-standby-keepalived-start"]


def _depends_on(run, name: str) -> list[str]:
    return [getattr(d, "_name", None) for d in (run.mocks.options[name].depends_on or [])]


def test_app_steps_run_standby_first(stack_run):
    """Never restart the app on both nodes at once: primary's app step waits for standby's."""
    assert "minitwit-test-standby-app" in _depends_on(stack_run, "minitwit-test-primary-app")
    assert "minitwit-test-primary-app" not in _depends_on(stack_run, "minitwit-test-standby-app")


def test_protect_flag_reaches_vpc_and_reserved_ip():
    for flag in (True, False):
        options = run_stack(base_config(protect=flag, database="managed")).mocks.options

        def protected(name: str, options=options) -> bool:
            return bool(options[name].protect)

        assert protected("minitwit-test-vpc") is flag
        assert protected("minitwit-test-reserved-ip") is flag
        assert protected("minitwit-test-db") is flag and protected("minitwit-test-db-minitwit") is flag
        assert protected("minitwit-test-primary") is False  # droplets stay replaceable


def test_bad_config_declares_nothing():
    from infra.offline import DoMocks
    from infra.settings import SettingsError

    mocks = DoMocks()
    with pytest.raises(SettingsError) as err:
        run_stack(base_config(vpcIpRange="8.8.8.0/24", adminCidrs=[]), mocks=mocks)
    assert "vpcIpRange" in str(err.value) and "adminCidrs" in str(err.value)
    assert mocks.resources == []


def test_app_image_reaches_each_nodes_compose_env_and_a_change_reruns_only_the_app_steps():
    run = run_stack(base_config(appImage="ghcr.io/team/minitwit"))
    for node in NODES:
        files = archive_files(run, f"minitwit-test-{node}-app")
        mode, text = files["/srv/minitwit/stack.env"]
        assert mode == 0o644 and "MINITWIT_IMAGE=ghcr.io/team/minitwit" in text.splitlines()
        assert "${MINITWIT_IMAGE:?" in files["/srv/minitwit/compose.yaml"][1]
        # The step merges it into the .env compose reads, beside the rollout's MINITWIT_VERSION.
        assert "/srv/minitwit/stack.env /srv/minitwit/.env" in run.mocks.named(f"minitwit-test-{node}-app").plain("create")
    after = _step_triggers(run_stack(base_config(appImage="ghcr.io/team/other")))
    before = _step_triggers(run)
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == ["minitwit-test-primary-app", "minitwit-test-ready", "minitwit-test-standby-app"]


def test_an_adopted_reserved_ip_held_by_another_droplet_is_refused_unless_taken_over():
    from infra.offline import DoMocks
    from infra.settings import SettingsError

    cfg = base_config(reservedIp="203.0.113.50")
    old_server = DoMocks(reserved_ip_holder=31337, droplet_tags={31337: ["web"]})
    with pytest.raises(SettingsError) as err:
        run_stack(cfg, mocks=old_server)
    message = str(err.value)
    assert "minitwit-ha:reservedIp: 203.0.113.50 is assigned to droplet 31337 (droplet-31337)" in message
    assert "reservedIpTakeover" in message and "nothing was created" in message
    assert old_server.resources == []  # refused before any resource was declared
    # The operator says so: adopted as usual, and still never assigned by Pulumi.
    run = run_stack(base_config(reservedIp="203.0.113.50", reservedIpTakeover=True),
                    mocks=DoMocks(reserved_ip_holder=31337, droplet_tags={31337: ["web"]}))
    assert run.outputs["reserved_ip"].value == "203.0.113.50"
    # Held by one of this stack's own droplets (after a failover) or by nobody: no question asked.
    for mocks in (DoMocks(reserved_ip_holder=400000001, droplet_tags={400000001: ["minitwit-ha:test"]}),
                  DoMocks()):
        assert run_stack(cfg, mocks=mocks).outputs["reserved_ip"].value == "203.0.113.50"


# ---------------------------------------------------------------------------------------------
# day two: one node at a time, safe replacement, pinned host keys
# ---------------------------------------------------------------------------------------------
def test_droplets_ignore_replacing_drift_unless_a_node_is_rebuilt_on_purpose():
    run = run_stack(base_config())
    for node in NODES:
        assert sorted(run.mocks.options[f"minitwit-test-{node}"].ignore_changes) == ["image", "sshKeys", "userData"]
    rebuilt = run_stack(base_config(nodeOverrides={"standby": {"dropletImage": "ubuntu-24-04-x64",
                                                               "dropletSize": "s-2vcpu-4gb"}}))
    assert not rebuilt.mocks.options["minitwit-test-standby"].ignore_changes
    assert sorted(rebuilt.mocks.options["minitwit-test-primary"].ignore_changes) == ["image", "sshKeys", "userData"]
    standby, primary = rebuilt.mocks.named("minitwit-test-standby"), rebuilt.mocks.named("minitwit-test-primary")
    assert (standby.plain("image"), standby.plain("size")) == ("ubuntu-24-04-x64", "s-2vcpu-4gb")
    assert (primary.plain("image"), primary.plain("size")) == ("debian-12-x64", "s-1vcpu-2gb")


def test_a_standby_only_override_changes_standby_resources_only():
    def inputs(run):
        return {r.name: repr(sorted((k, repr(unwrap(v))) for k, v in r.inputs.items())) for r in run.resources}

    before = inputs(run_stack(base_config()))
    after = inputs(run_stack(base_config(nodeOverrides={"standby": {"dropletSize": "s-2vcpu-4gb"}})))
    assert sorted(n for n in before if before[n] != after[n]) == ["minitwit-test-standby"]


def test_host_keys_are_generated_installed_and_pinned_on_every_connection(stack_run):
    keys = {r.name: r for r in stack_run.mocks.of_type("tls:index/privateKey:PrivateKey")
            if r.name.endswith("-host-key")}
    assert set(keys) == {"minitwit-test-primary-host-key", "minitwit-test-standby-host-key"}
    assert {r.plain("algorithm") for r in keys.values()} == {"ED25519"}
    known = stack_run.outputs["known_hosts"]
    assert not known.secret
    lines = known.value.splitlines()
    nodes = stack_run.outputs["nodes"].value
    assert [ln.split()[0] for ln in lines] == [nodes[n]["public_ipv4"] for n in NODES]
    pinned = {}
    for node in NODES:
        user_data = yaml.safe_load(stack_run.mocks.named(f"minitwit-test-{node}").plain("userData"))
        public = user_data["ssh_keys"]["ed25519_public"]
        assert user_data["ssh_genkeytypes"] == [] and user_data["ssh_deletekeys"] is True
        assert f"{nodes[node]['public_ipv4']} {public}" in lines
        pinned[node] = public
    remote = [r for r in stack_run.commands() if r.typ == REMOTE]
    assert len(remote) >= 20
    for r in remote:
        node = "primary" if "-primary-" in r.name else "standby"
        assert r.plain("connection")["hostKey"].strip() == pinned[node], r.name


def test_each_droplet_has_one_retire_command_that_stops_it_before_the_peer_is_repointed(stack_run):
    retire = [r for r in stack_run.commands() if r.name.endswith("-retire")]
    assert sorted(r.name for r in retire) == ["minitwit-test-primary-retire", "minitwit-test-standby-retire"]
    nodes = stack_run.outputs["nodes"].value
    for r in retire:
        node = r.name.split("-")[2]
        assert [str(t) for t in r.plain("triggers")] == [str(nodes[node]["droplet_id"])]  # its droplet's ID only
        delete = r.plain("delete")
        stops = [delete.index(f"disable --now {unit}") for unit in ("minitwit-ha-reconcile", "keepalived", "haproxy")]
        assert stops == sorted(stops)  # reconciler, keepalived, then HAProxy once the IP has left
        assert stack_run.mocks.options[r.name].delete_before_replace
    for node, peer in (("primary", "standby"), ("standby", "primary")):
        for step in ("firewall", "haproxy", "keepalived"):
            assert f"minitwit-test-{peer}-retire" in _depends_on(stack_run, f"minitwit-test-{node}-{step}")


def test_a_new_nodes_keepalived_starts_only_after_the_survivor_is_repointed_at_it(stack_run):
    """Either node replaced: its keepalived starts after the survivor's keepalived step (the reload
    with the new unicast_peer), or it hears nobody and becomes a second MASTER. No cycle: the
    configuration steps never wait for a start step."""
    for node, peer in (("primary", "standby"), ("standby", "primary")):
        start = f"minitwit-test-{node}-keepalived-start"
        assert sorted(_depends_on(stack_run, start)) == sorted([f"minitwit-test-{node}-keepalived",
                                                                f"minitwit-test-{peer}-keepalived"])
        assert not [d for d in _depends_on(stack_run, f"minitwit-test-{node}-keepalived") if d.endswith("-start")]
        assert "enable --now keepalived" in next(r for r in stack_run.commands() if r.name == start).plain("create")
        assert start in _depends_on(stack_run, "minitwit-test-ready")
    for node in ("primary", "standby"):  # the configuration step reloads a running keepalived, never starts one
        create = next(r for r in stack_run.commands() if r.name == f"minitwit-test-{node}-keepalived").plain("create")
        assert "systemctl reload keepalived" in create and "enable --now" not in create


def test_no_input_carries_an_absolute_path_of_this_checkout(stack_run):
    root = str(ROOT)
    for r in stack_run.resources:
        assert root not in repr(r.inputs), r.name
    ready = stack_run.mocks.named("minitwit-test-ready")
    assert ready.plain("dir") == "."
    assert ready.plain("create").startswith(".venv/bin/python scripts/wait_ready.py ")


def test_health_that_moves_the_ip_needs_no_database_by_default(stack_run):
    conf = node_file(stack_run, "primary", "keepalived", "/etc/keepalived/keepalived.conf.new")
    health = node_file(stack_run, "primary", "failover", "/etc/minitwit-ha/health.env")
    cfg = node_file(stack_run, "primary", "haproxy", "/etc/haproxy/haproxy.cfg.new")
    # keepalived asks HAProxy's monitor (up while any app server is), and HAProxy checks the apps by
    # TCP connect: no check on the failover path reads the database.
    assert re.search(r'script "/usr/libexec/minitwit-ha/mt-health serve"', conf)
    assert "SERVE_URL=http://127.0.0.1:8404/minitwit-ha/serving\n" in health
    assert "httpchk" not in cfg and "check inter 200ms" in cfg


def test_app_version_seeds_each_nodes_env_and_the_app_step_drains_in_haproxy():
    run = run_stack(base_config(appVersion="2024.06.1"))
    for node in NODES:
        env = node_file(run, node, "app", "/srv/minitwit/stack.env")
        assert "MINITWIT_VERSION=2024.06.1" in env.splitlines()
        create = run.mocks.named(f"minitwit-test-{node}-app").plain("create")
        assert create.index("state drain") < create.index("up -d") < create.index("mt-health all")
    assert "MINITWIT_VERSION" not in node_file(run_stack(base_config()), "primary", "app", "/srv/minitwit/stack.env")


def test_no_rendered_file_lets_deploy_become_root(stack_run):
    """Everything that lands on a node: user data (sudoers, sshd) and every step's files."""
    doc = yaml.safe_load(stack_run.mocks.of_type(DROPLET)[0].plain("userData"))
    texts = [f["content"] for f in doc["write_files"]]
    for r in stack_run.commands():
        stdin = unwrap(r.inputs.get("stdin"))
        if stdin and r.name.endswith(("-failover", "-firewall", "-keepalived", "-app", "-haproxy")):
            texts += [text for _, text in read_archive_b64(stdin).values()]
    rules = [line for text in texts for line in text.splitlines()
             if re.match(r"\s*(deploy|%sudo|ALL)\s", line) or "NOPASSWD" in line and not line.lstrip().startswith("#")]
    assert rules == ["deploy ALL=(root) NOPASSWD: NOSETENV: /usr/libexec/minitwit-ha/mt-deploy, "
                     "/usr/libexec/minitwit-ha/mt-failover status"]
    sudoers = next(f["content"] for f in doc["write_files"] if f["path"] == "/etc/sudoers.d/minitwit-ha-deploy")
    assert "Defaults:deploy env_reset\n" in sudoers
    # Root through sudo only for provision, whose key only the stack holds (cloud-init's sudo: key).
    assert [u.get("sudo") for u in doc["users"]] == [None, "ALL=(root) NOPASSWD:ALL"]


def test_provisioning_logs_in_as_provision_with_the_generated_key(stack_run):
    keys = [k for k in stack_run.mocks.of_type("tls:index/privateKey:PrivateKey") if k.name.endswith("-provision-key")]
    assert [k.plain("algorithm") for k in keys] == ["ED25519"]
    remote = [r for r in stack_run.commands() if r.typ == "command:remote:Command"]
    assert remote
    for r in remote:
        conn = r.plain("connection")
        assert conn["user"] == "provision", r.name
        assert conn["privateKey"] == DoMocks().provision_key[0], r.name


def test_the_app_starts_only_after_the_firewall_keeps_containers_off_the_metadata_service(stack_run):
    for node in ("primary", "standby"):
        deps = {getattr(d, "_name", None) for d in stack_run.mocks.options[f"minitwit-test-{node}-app"].depends_on}
        assert f"minitwit-test-{node}-firewall" in deps
        rules = node_file(stack_run, node, "firewall", "/etc/nftables.conf")
        forward = rules[rules.index("chain forward"):]
        assert "policy drop;" in forward
        assert forward.index("ip daddr 169.254.169.254 counter drop") < forward.index("ct state established")
