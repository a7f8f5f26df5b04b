"""Rendered node files: golden files per role, and the real tools' checks (keepalived -t, nft -c,
haproxy -c).

Golden files live in tests/golden/<role>/; after an intended change, regenerate them with
`UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_render.py` and review the diff.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import uuid
from pathlib import Path

import pytest

from infra.cloudinit import SSHD_DROPIN, render_cloud_init, render_deploy_sudoers
from infra.haproxy import HaproxyFacts
from infra.node import NodeFacts, NodePaths, render_haproxy_cfg, render_keepalived_conf, render_nftables
from infra.profiles import PROFILES
from infra.steps import KEEPALIVED_T_OK
from tests.conftest import ROOT, base_config, run_stack
from tests.stack.test_stack import archive_files
from tests.support.needs import missing_binaries, need, not_root

GOLDEN = ROOT / "tests" / "golden"
FILES = {
    "keepalived.conf": ("keepalived", "/etc/keepalived/keepalived.conf.new"),
    "nftables.conf": ("firewall", "/etc/nftables.conf"),
    "failover.env": ("failover", "/etc/minitwit-ha/failover.env"),
    "health.env": ("failover", "/etc/minitwit-ha/health.env"),
    "haproxy.cfg": ("haproxy", "/etc/haproxy/haproxy.cfg.new"),
    "stack.env": ("app", "/srv/minitwit/stack.env"),
}


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, str]]:
    run = run_stack(base_config())
    both = run_stack(base_config(serve="both", appCheckPath="/healthz"))
    workers = run_stack(base_config(appWorkers=2))
    out: dict[str, dict[str, str]] = {
        "both": {"haproxy.cfg": archive_files(both, "minitwit-test-primary-haproxy")["/etc/haproxy/haproxy.cfg.new"][1]},
        # appWorkers: 2: the primary's HAProxy over both apps and two workers, and a worker's own ruleset.
        "workers": {"haproxy.cfg": archive_files(workers, "minitwit-test-primary-haproxy")[
            "/etc/haproxy/haproxy.cfg.new"][1]},
        "worker": {"nftables.conf": archive_files(workers, "minitwit-test-worker-1-firewall")["/etc/nftables.conf"][1]},
    }
    for role in ("primary", "standby"):
        out[role] = {}
        for name, (step, path) in FILES.items():
            out[role][name] = archive_files(run, f"minitwit-test-{role}-{step}")[path][1]
    return out


@pytest.mark.parametrize(("role", "name"), [(r, n) for r in ("primary", "standby") for n in sorted(FILES)]
                         + [("both", "haproxy.cfg"), ("workers", "haproxy.cfg"), ("worker", "nftables.conf")])
def test_matches_golden_file(rendered, role, name):
    path = GOLDEN / role / name
    text = rendered[role][name]
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{role}/{name} differs from its golden file"


def test_roles_differ_only_where_they_should(rendered):
    p, s = rendered["primary"]["keepalived.conf"], rendered["standby"]["keepalived.conf"]
    diff = {ln for ln in p.splitlines() if ln not in s.splitlines()}
    assert all(any(k in ln for k in ("router_id", "priority", "unicast_src_ip", "droplet", "10.110.16."))
               for ln in diff), diff


def _netns_with_iface(iface: str) -> str:
    ns = f"mtha-kt-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "add", iface, "type", "veth", "peer", "name", "ktpeer0"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", iface, "up"], check=True)
    return ns


def keepalived_check(conf: str, tmp_path: Path, iface: str = "eth1") -> tuple[int, str]:
    """Run `keepalived -t` on `conf` inside a namespace that has the VPC interface, like a droplet."""
    path = tmp_path / "keepalived.conf"
    path.write_text(conf)
    ns = _netns_with_iface(iface)
    try:
        proc = subprocess.run(["ip", "netns", "exec", ns, "keepalived", "-t", "-f", str(path)],
                              capture_output=True, text=True, timeout=30)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    # A shell reports "killed by SIGTERM" as 143; Python as -15. Use the shell's convention.
    rc = 128 - proc.returncode if proc.returncode < 0 else proc.returncode
    return rc, (proc.stdout + proc.stderr).strip()


def _need_keepalived():
    need(not_root() or missing_binaries("keepalived", "ip"))
    try:
        pwd.getpwnam("keepalived_script")
    except KeyError:
        need("needs the system user keepalived_script, which the droplets have (`make setup-lab` creates it)")


@pytest.mark.parametrize("role", ["primary", "standby"])
def test_rendered_keepalived_conf_passes_keepalived_t(rendered, role, tmp_path):
    _need_keepalived()
    rc, out = keepalived_check(rendered[role]["keepalived.conf"], tmp_path)
    assert rc in KEEPALIVED_T_OK and out == "", f"keepalived -t exit {rc}: {out}"


def test_keepalived_t_check_catches_a_broken_file(rendered, tmp_path):
    """The acceptance rule (exit 0/143 and no output) must reject real mistakes."""
    _need_keepalived()
    bad = rendered["primary"]["keepalived.conf"].replace("vrrp_check_unicast_src", "vrrp_check_unicast_srcc")
    rc, out = keepalived_check(bad, tmp_path)
    assert "Unknown keyword 'vrrp_check_unicast_srcc'" in out


def test_tutorial_profile_also_passes(tmp_path):
    _need_keepalived()
    facts = NodeFacts(name="primary", droplet_id=1, private_ip="198.51.100.11", peer_private_ip="198.51.100.12",
                      reserved_ip="203.0.113.10", priority=150, router_id=51, private_interface="eth1",
                      admin_cidrs=("192.0.2.192/26",), http_ports=(80, 443), health_url="http://127.0.0.1/latest",
                      profile=PROFILES["tutorial"])
    rc, out = keepalived_check(render_keepalived_conf(facts), tmp_path)
    assert rc in KEEPALIVED_T_OK and out == "", out


@pytest.mark.parametrize("role", ["primary", "standby", "worker"])
def test_rendered_ruleset_passes_nft_check(rendered, role, tmp_path):
    need(not_root() or missing_binaries("nft"))
    path = tmp_path / "nftables.conf"
    path.write_text(rendered[role]["nftables.conf"])
    proc = subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_nft_check_catches_a_broken_ruleset(rendered, tmp_path):
    need(not_root() or missing_binaries("nft"))
    path = tmp_path / "nftables.conf"
    path.write_text(rendered["primary"]["nftables.conf"].replace("policy drop;", "policy dorp;"))
    assert subprocess.run(["nft", "-c", "-f", str(path)], capture_output=True).returncode != 0


def test_ipv6_admin_cidrs_get_their_own_set():
    facts = NodeFacts(name="primary", droplet_id=1, private_ip="10.0.0.2", peer_private_ip="10.0.0.3",
                      reserved_ip="203.0.113.10", priority=150, router_id=51, private_interface="eth1",
                      admin_cidrs=("198.51.100.0/24", "2001:db8::/32"), http_ports=(80, 443, 8080),
                      health_url="http://127.0.0.1/latest")
    rules = render_nftables(facts)
    assert "tcp dport { 22, 9100 } ip6 saddr @admin_v6 accept" in rules and "2001:db8::/32" in rules
    assert "tcp dport { 80, 443, 8080 } accept" in rules
    # Without HAProxy: node-exporter alone for the peer, no backend port.
    assert 'tcp dport 9100 iifname "eth1" ip saddr 10.0.0.3 accept' in rules and "5000" not in rules


@pytest.mark.parametrize("role", ["primary", "standby", "both", "workers"])
def test_rendered_haproxy_cfg_passes_haproxy_c(rendered, role, tmp_path):
    need(missing_binaries("haproxy"))
    try:
        pwd.getpwnam("haproxy")
    except KeyError:
        need("needs the system user haproxy, which Debian's haproxy package creates")
    path = tmp_path / "haproxy.cfg"
    path.write_text(rendered[role]["haproxy.cfg"])
    proc = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr


def test_haproxy_c_catches_a_broken_file(rendered, tmp_path):
    need(missing_binaries("haproxy"))
    path = tmp_path / "haproxy.cfg"
    path.write_text(rendered["primary"]["haproxy.cfg"].replace("retry-on conn-failure", "retry-on conn-failed"))
    assert subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True).returncode != 0


def _haproxy_facts(serve: str = "active-standby", check_path: str = "") -> NodeFacts:
    return NodeFacts(name="primary", droplet_id=1, private_ip="10.0.0.2", peer_private_ip="10.0.0.3",
                     reserved_ip="203.0.113.10", priority=150, router_id=51, private_interface="eth1",
                     admin_cidrs=("198.51.100.0/24",), http_ports=(80, 443), health_url="http://127.0.0.1:5000/x",
                     haproxy=HaproxyFacts(serve=serve, check_path=check_path))


def test_haproxy_never_retries_a_write_that_may_have_reached_an_app():
    cfg = render_haproxy_cfg(_haproxy_facts())
    assert "retry-on conn-failure empty-response response-timeout" in cfg
    assert "http-request disable-l7-retry unless METH_GET" in cfg
    assert "option http-server-close" in cfg  # no request on a kept-alive connection the app closed
    assert "option redispatch 1" in cfg and "retries 3" in cfg
    assert "timeout connect 100ms" in cfg  # the pause before a retry: min(connect, 1 s) must fit in 0.3 s


def test_haproxy_serve_modes_and_checks():
    standby = render_haproxy_cfg(_haproxy_facts())
    both = render_haproxy_cfg(_haproxy_facts("both", "/healthz"))
    assert "balance first" in standby and "balance leastconn" not in standby
    assert "balance leastconn" in both and "balance first" not in both
    assert "option httpchk" not in standby and "option httpchk GET /healthz" in both
    with pytest.raises(ValueError, match="serve='hot'"):
        HaproxyFacts(serve="hot")


def test_keepalived_tracks_haproxys_monitor_not_the_app_when_haproxy_fronts_it():
    conf = render_keepalived_conf(_haproxy_facts())
    assert 'mt-health serve"' in conf and 'mt-health http"' not in conf
    assert "chk_services" not in conf  # a dead app container is HAProxy's to absorb, not a failover


def test_every_timeout_and_retry_line_says_what_a_client_sees():
    lines = render_haproxy_cfg(_haproxy_facts()).splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(("timeout ", "retries", "retry-on", "option redispatch")):
            assert lines[i - 1].strip().startswith("#"), f"no comment above: {line.strip()}"


# --------------------------------------------------------------------------------------------
# Least privilege on the node: deploy's sudoers, the sshd drop-in, the Docker apt key check
# --------------------------------------------------------------------------------------------
def _visudo(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "sudoers"
    path.write_text(text)
    path.chmod(0o440)
    return subprocess.run(["visudo", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("paths", [(NodePaths(),), (NodePaths("/run/lab/primary"), NodePaths("/run/lab/standby"))],
                         ids=["droplet", "lab"])
def test_deploy_sudoers_passes_visudo(paths, tmp_path):
    need(missing_binaries("visudo"))
    text = render_deploy_sudoers(paths)
    proc = _visudo(text, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Every node's deploy script, and mt-failover only with `status`.
    for p in paths:
        assert p.script("mt-deploy") in text and f"{p.script('mt-failover')} status" in text
    assert "NOSETENV" in text and "env_reset" in text and "SETENV:" not in text.replace("NOSETENV:", "")


def test_visudo_check_catches_a_broken_sudoers(tmp_path):
    need(missing_binaries("visudo"))
    assert _visudo(render_deploy_sudoers().replace("NOPASSWD:", "NOPASSWD"), tmp_path).returncode != 0


def test_sshd_dropin_passes_sshd_t(tmp_path):
    need(missing_binaries("sshd", "ssh-keygen"))
    key = tmp_path / "host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    conf = tmp_path / "sshd_config"
    conf.write_text(SSHD_DROPIN + f"HostKey {key}\n")
    proc = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(conf)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    effective = set(proc.stdout.splitlines())
    for line in ("permitrootlogin no", "passwordauthentication no", "kbdinteractiveauthentication no",
                 "authenticationmethods publickey", "allowtcpforwarding no", "allowagentforwarding no",
                 "x11forwarding no", "allowusers deploy", "allowusers provision"):
        assert line in effective, line


def test_root_keys_are_emptied_only_once_deploy_has_them():
    import yaml

    doc = yaml.safe_load(render_cloud_init("ssh-ed25519 AAAA deploy@x", "ssh-ed25519 BBBB provision"))
    copy = next(c[2] for c in doc["runcmd"] if "authorized_keys.new" in " ".join(c))
    steps_ = copy.split(" && ")
    # Chained with &&: a failed copy leaves root's keys where they were (and root login is off anyway).
    assert steps_[-1] == "truncate -c -s 0 /root/.ssh/authorized_keys"
    assert any(s.startswith("install -m 0600 -o deploy") for s in steps_[:-1])


BOOTSTRAP = ROOT / "scripts" / "node-bootstrap.sh"


def _check_docker_key(key_file: Path, fpr: str) -> subprocess.CompletedProcess:
    """The bootstrap's own check_docker_key, run from the script without its main."""
    script = BOOTSTRAP.read_text().replace('\nmain "$@"\n', "\n")
    return subprocess.run(["bash", "-c", script + '\ncheck_docker_key "$1"', "bootstrap", str(key_file)],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], "DOCKER_KEY_FPR": fpr,
                               "DOCKER_KEY_FPR_FILE": "/nonexistent"})


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory) -> tuple[Path, str]:
    need(missing_binaries("gpg"))
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    env = {**os.environ, "GNUPGHOME": str(home)}
    subprocess.run(["gpg", "--batch", "--passphrase", "", "--quick-gen-key", "test <t@example.invalid>",
                    "ed25519", "sign", "never"], env=env, check=True, capture_output=True, timeout=60)
    key = home / "key.asc"
    key.write_text(subprocess.run(["gpg", "--armor", "--export"], env=env, check=True, capture_output=True,
                                  text=True, timeout=30).stdout)
    listing = subprocess.run(["gpg", "--with-colons", "--list-keys"], env=env, check=True, capture_output=True,
                             text=True, timeout=30).stdout
    fpr = next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr:"))
    subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True, check=False)
    return key, fpr


def test_bootstrap_trusts_a_docker_key_with_the_expected_fingerprint(signing_key):
    key, fpr = signing_key
    proc = _check_docker_key(key, fpr)
    assert proc.returncode == 0, proc.stderr


def test_bootstrap_refuses_any_other_docker_key(signing_key, tmp_path):
    key, fpr = signing_key
    proc = _check_docker_key(key, "9DC858229FC7DD38854AE2D88D81803C0EBFCD88")  # Docker's: not this key
    assert proc.returncode != 0 and f"primary key fingerprint(s) '{fpr}'" in proc.stderr
    garbage = tmp_path / "gpg"
    garbage.write_text("<html>captive portal</html>\n")
    assert _check_docker_key(garbage, fpr).returncode != 0


def test_bootstrap_default_fingerprint_is_dockers_published_one():
    assert 'DOCKER_KEY_FPR="${DOCKER_KEY_FPR:-9DC858229FC7DD38854AE2D88D81803C0EBFCD88}"' in BOOTSTRAP.read_text()
