"""`make plan`: the offline plan a reviewer reads, byte-identical, secrets masked, diffs that point at the change."""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from infra.database import NONE_WARNING
from infra.settings import load_settings
from tests.conftest import ROOT

# scripts/plan.py is a script, not a package module: load it by path (registered, for its dataclasses).
_spec = importlib.util.spec_from_file_location("minitwit_plan", ROOT / "scripts" / "plan.py")
assert _spec is not None and _spec.loader is not None
plan = sys.modules.setdefault("minitwit_plan", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(plan)

PROD = ROOT / "Pulumi.prod.yaml"
STAGING = ROOT / "Pulumi.staging.yaml"
VENV = Path(sys.executable).parent.parent


def stack_file(tmp_path: Path, name: str, source: Path = PROD, **changes) -> Path:
    """A copy of a stack file (same file name, so plans differ only by what changed)."""
    doc = yaml.safe_load(source.read_text())
    for key, value in changes.items():
        if value is None:
            doc["config"].pop(f"minitwit-ha:{key}", None)
        else:
            doc["config"][f"minitwit-ha:{key}"] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def changed_lines(before: str, after: str) -> list[str]:
    diff = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return [line for line in diff if line[:1] in "+-" and not line.startswith(("+++", "---"))]


@pytest.fixture(scope="module")
def prod_plan() -> str:
    return plan.render_plan("prod")


# ---------------------------------------------------------------------------------------------
# make plan in a clean checkout
# ---------------------------------------------------------------------------------------------
def clean_checkout(dest: Path) -> Path:
    """The working tree as a fresh clone would have it: tracked and new files, nothing ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def can_drop_network() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0


def run_make_plan(checkout: Path, seed: str) -> subprocess.CompletedProcess:
    # No credentials and no Pulumi state: a bare environment, an empty HOME, no network when we
    # can take it away (root: a fresh network namespace has only a downed loopback).
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(checkout / ".home"),
           "LANG": "C.UTF-8", "PYTHONHASHSEED": seed}
    # `-o` keeps make from (re)building the venv this test runs in; the command is the Makefile's own.
    argv = ["make", "--no-print-directory", "-o", f"{VENV}/.installed", f"VENV={VENV}", "plan", "STACK=prod"]
    if can_drop_network():
        argv = ["unshare", "--net", *argv]
    return subprocess.run(argv, cwd=checkout, env=env, capture_output=True, text=True, timeout=120)


def test_make_plan_in_a_clean_checkout_is_offline_and_byte_identical(tmp_path):
    checkout = clean_checkout(tmp_path / "checkout")
    assert not (checkout / "plan").exists()
    outputs = []
    for seed in ("1", "2"):
        proc = run_make_plan(checkout, seed)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Exception ignored" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        outputs.append((checkout / "plan" / "prod.txt").read_bytes())
    assert outputs[0] == outputs[1]
    # ...and the same bytes as a plan rendered from this checkout: no absolute path, no machine.
    assert outputs[0].decode() == plan.render_plan("prod")
    assert str(checkout) not in outputs[0].decode() and str(ROOT) not in outputs[0].decode()


# ---------------------------------------------------------------------------------------------
# what the plan shows
# ---------------------------------------------------------------------------------------------
def section(text: str, title: str) -> str:
    start = text.index(f"\n== {title}")
    end = text.find("\n== ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_plan_lists_every_resource_with_type_parent_options_and_dependencies(prod_plan):
    resources = section(prod_plan, "resources")
    headers = [line[4:] for line in resources.splitlines() if line.startswith("--- ")]
    assert headers == sorted(headers)
    assert f"== resources ({len(headers)})" in resources
    for name in ("minitwit-prod-vpc", "minitwit-prod-primary", "minitwit-prod-standby", "minitwit-prod-reserved-ip",
                 "minitwit-prod-db", "minitwit-prod-db-firewall", "minitwit-prod-primary-keepalived",
                 "minitwit-prod-standby-app", "minitwit-prod-ready"):
        assert name in headers
    droplet = resources.split("--- minitwit-prod-primary\n")[1].split("\n\n")[0]
    assert "type: digitalocean:index/droplet:Droplet" in droplet and "parent: minitwit-prod" in droplet
    assert "size: s-1vcpu-2gb" in droplet and "image: debian-12-x64" in droplet and "region: fra1" in droplet
    rip = resources.split("--- minitwit-prod-reserved-ip\n")[1].split("\n\n")[0]
    assert "ignore_changes: dropletId" in rip and "protect: true" in rip
    app = resources.split("--- minitwit-prod-primary-app\n")[1].split("\n\n")[0]
    deps = app.split("depends_on:\n")[1].split("\n  inputs:")[0]
    assert "- minitwit-prod-standby-app" in deps  # standby's app first
    assert "privateKey: [secret]" in app
    db = resources.split("--- minitwit-prod-db\n")[1].split("\n\n")[0]
    assert "nodeCount: 2" in db and "size: db-s-1vcpu-2gb" in db and "version: 16" in db
    firewall = resources.split("--- minitwit-prod-db-firewall\n")[1].split("\n\n")[0]
    assert "- type: tag\n        value: minitwit-ha-prod" in firewall and "type: droplet" not in firewall


def test_plan_shows_each_nodes_rendered_files_and_hides_secret_ones(prod_plan):
    for node, peer_ip in (("primary", "10.110.16.4"), ("standby", "10.110.16.3")):
        files = section(prod_plan, f"node files: {node}")
        keepalived = files.split("--- /etc/keepalived/keepalived.conf  mode 0644")[1].split("\n--- ")[0]
        assert "  |     unicast_peer {\n  |         " + peer_ip in keepalived
        assert "advert_int 0.2" in keepalived
        for path in ("/etc/minitwit-ha/failover.env", "/etc/minitwit-ha/health.env", "/etc/nftables.conf",
                     "/etc/systemd/system/minitwit-ha-healthwatch.service", "/srv/minitwit/compose.yaml"):
            assert f"--- {path}  mode 0644" in files
        # Secret files: path and mode only.
        for path in ("/srv/minitwit/app.env", "/etc/minitwit-ha/do-token"):
            assert f"--- {path}  mode 0600" in files
            assert files.split(f"--- {path}  mode 0600")[1].split("\n--- ")[0].strip().endswith("[secret]")
        # Scripts: in the repo already, so path, mode and hash, not the body.
        body = (ROOT / "scripts" / "mt-failover").read_text()
        assert "--- /usr/libexec/minitwit-ha/mt-failover  mode 0755" in files
        assert body.splitlines()[5] not in files
        assert plan._sha(body) in files


def test_secrets_and_their_placeholders_never_appear(tmp_path):
    cipher = "v1:CIPHERTEXT-that-must-not-leak"
    config = stack_file(tmp_path, "Pulumi.prod.yaml", sshPrivateKey={"secure": cipher},
                        failoverToken={"secure": cipher + "2"}, registryPassword={"secure": cipher + "3"},
                        registryServer="registry.digitalocean.com", registryUsername="minitwit-ci")
    text = plan.render_plan("prod", config)
    assert cipher not in text
    for placeholder in plan.PLACEHOLDERS.values():
        for line in placeholder.splitlines():
            assert line not in text
    login = text.split("--- minitwit-prod-primary-registry-login\n")[1].split("\n\n")[0]
    assert "stdin: [secret]" in login and "--username minitwit-ci --password-stdin registry.digitalocean.com" in login


def test_warnings_the_program_logs_are_in_the_plan(tmp_path):
    text = plan.render_plan("prod", stack_file(tmp_path, "Pulumi.prod.yaml", database="none"))
    assert "== warnings (1)\n  warning: " + NONE_WARNING in text
    assert "== warnings (0)" in plan.render_plan("prod")


# ---------------------------------------------------------------------------------------------
# diffs that point at the change
# ---------------------------------------------------------------------------------------------
def test_a_droplet_size_change_shows_in_the_droplet_size_lines_and_nowhere_else(tmp_path, prod_plan):
    after = plan.render_plan("prod", stack_file(tmp_path, "Pulumi.prod.yaml", dropletSize="s-2vcpu-4gb"))
    assert changed_lines(prod_plan, after) == [
        "-    size: s-1vcpu-2gb", "+    size: s-2vcpu-4gb",  # minitwit-prod-primary
        "-    size: s-1vcpu-2gb", "+    size: s-2vcpu-4gb",  # minitwit-prod-standby
    ]


def test_a_keepalived_timing_change_shows_in_both_keepalived_confs(tmp_path, prod_plan):
    after = plan.render_plan("prod", stack_file(tmp_path, "Pulumi.prod.yaml", failoverProfile="tutorial"))
    lines = changed_lines(prod_plan, after)
    assert lines.count("-  |     advert_int 0.2   # VRRPv3: the peer is declared dead after 3 x 0.2 s + skew (~0.72 s)") == 2
    assert sum(1 for line in lines if line.startswith("+  |     advert_int 1 ")) == 2
    assert not [line for line in lines if "size:" in line or "image:" in line]


def test_diff_mode_compares_two_plan_files(tmp_path, prod_plan):
    base, head = tmp_path / "base.txt", tmp_path / "head.txt"
    base.write_text(prod_plan)
    head.write_text(prod_plan.replace("size: s-1vcpu-2gb", "size: s-4vcpu-8gb", 1))
    out = tmp_path / "out" / "prod.diff"
    assert plan.main(["--diff", str(base), str(head), "--out", str(out)]) == 0
    diff = out.read_text()
    assert diff.startswith("--- base/base.txt\n+++ head/head.txt\n")
    assert "-    size: s-1vcpu-2gb\n+    size: s-4vcpu-8gb\n" in diff
    # A stack new in the head diffs against nothing; identical plans give an empty diff.
    assert plan.plan_diff(tmp_path / "missing.txt", head).startswith("--- /dev/null\n+++ head/head.txt\n")
    assert plan.plan_diff(base, base) == ""


# ---------------------------------------------------------------------------------------------
# the stack file, read without decrypting anything
# ---------------------------------------------------------------------------------------------
def test_stack_values_replace_secure_and_missing_secrets_with_placeholders(tmp_path):
    path = tmp_path / "Pulumi.x.yaml"
    path.write_text(yaml.safe_dump({
        "encryptionsalt": "v1:salt",
        "config": {
            "digitalocean:token": {"secure": "v1:provider"},
            "minitwit-ha:failoverToken": {"secure": "v1:token"},
            "minitwit-ha:registryServer": "registry.digitalocean.com",
            "minitwit-ha:dropletSize": "s-1vcpu-2gb",
            "minitwit-ha:adminCidrs": ["198.51.100.0/24"],
        },
    }))
    values, secrets = plan.stack_values(path)
    assert "token" not in values  # another namespace: ignored
    assert values["failoverToken"] == plan.PLACEHOLDERS["failoverToken"]
    assert "sshPrivateKey" not in values                                         # not asked for any more
    assert values["registryPassword"] == plan.PLACEHOLDERS["registryPassword"]  # needed by registryServer
    assert "databaseUri" not in values                                           # database is not external
    assert secrets == {"failoverToken", "registryPassword"}
    assert values["adminCidrs"] == ["198.51.100.0/24"] and values["dropletSize"] == "s-1vcpu-2gb"


def test_an_invalid_config_fails_with_the_message_pulumi_up_would_give(tmp_path, capsys):
    bad = stack_file(tmp_path, "Pulumi.prod.yaml", vpcIpRange="10.244.0.0/24", dropletSize="huge")
    out = tmp_path / "plan.txt"
    assert plan.main(["--stack", "prod", "--config", str(bad), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "minitwit-ha:vpcIpRange: 10.244.0.0/24 overlaps 10.244.0.0/16" in err
    assert "minitwit-ha:dropletSize: 'huge' is not a droplet size slug" in err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# the staging stack file
# ---------------------------------------------------------------------------------------------
def load(path: Path, stack: str):
    values, secrets = plan.stack_values(path)
    return load_settings(plan.DictSource(values, secrets), stack=stack, project_dir=ROOT)


def test_staging_config_validates_and_is_smaller_and_unprotected():
    staging, prod = load(STAGING, "staging"), load(PROD, "prod")
    assert staging.protect is False and prod.protect is True
    assert staging.droplet_size == "s-1vcpu-1gb" and staging.database.node_count == 1
    assert staging.database.size == "db-s-1vcpu-1gb"
    assert staging.reserved_ip is None  # its own reserved IP, never an adopted (possibly prod's) one
    # The same keys as prod: staging rehearses prod's shape.
    keys = {k for k in yaml.safe_load(STAGING.read_text())["config"]}
    prod_keys = {k for k in yaml.safe_load(PROD.read_text())["config"]}
    assert keys ^ prod_keys <= {"minitwit-ha:sshPublicKey", "minitwit-ha:sshKeyFingerprints"}


def test_staging_vpc_range_does_not_overlap_prods():
    staging, prod = load(STAGING, "staging"), load(PROD, "prod")
    assert not ipaddress.ip_network(staging.vpc_ip_range).overlaps(ipaddress.ip_network(prod.vpc_ip_range))


def test_staging_names_its_own_deploy_key_by_fingerprint_never_prods():
    """Staging's jobs hold STAGING_SSH_PRIVATE_KEY, not prod's key; a stack that pinned prod's
    fingerprint would install prod's key and that private key could not log in. By fingerprint
    because every per-PR stack copies the file and DigitalOcean registers a public key only once."""
    import base64
    import hashlib

    prod_key = yaml.safe_load(PROD.read_text())["config"]["minitwit-ha:sshPublicKey"].split()[1]
    blob = base64.b64decode(prod_key + "=" * (-len(prod_key) % 4))
    md5 = hashlib.md5(blob).hexdigest()  # noqa: S324 - DigitalOcean names keys by MD5 fingerprint
    prods = ":".join(md5[i:i + 2] for i in range(0, 32, 2))
    staging = load(STAGING, "staging")
    assert staging.ssh_public_key is None and len(staging.ssh_key_fingerprints) == 1
    assert prods not in staging.ssh_key_fingerprints


def changed_sections(before: str, after: str) -> set[str]:
    """The plan sections (`--- RESOURCE`, `== files of NODE` ...) that hold a changed line."""
    def owner(lines: list[str], index: int) -> str:
        for line in reversed(lines[:index + 1]):
            if line.startswith(("--- ", "== ")):
                return line
        return "(header)"

    a, b = before.splitlines(), after.splitlines()
    sections = set()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            sections |= {owner(a, i) for i in range(i1, max(i2, i1 + 1)) if i < len(a)}
            sections |= {owner(b, j) for j in range(j1, max(j2, j1 + 1)) if j < len(b)}
    return sections


def test_a_standby_only_override_changes_standby_resources_only(tmp_path, prod_plan):
    """Two offline plans: nodeOverrides naming the standby touches the standby's droplet and nothing else."""
    override = '{"standby": {"dropletSize": "s-2vcpu-4gb"}}'
    after = plan.render_plan("prod", stack_file(tmp_path, "Pulumi.prod.yaml", nodeOverrides=override))
    assert changed_sections(prod_plan, after) == {"--- minitwit-prod-standby"}
    assert changed_lines(prod_plan, after) == ["-    size: s-1vcpu-2gb", "+    size: s-2vcpu-4gb"]
    # A rebuild (its own image) also drops the standby's ignore_changes, still on the standby only.
    rebuilt = plan.render_plan("prod", stack_file(tmp_path, "Pulumi.prod.yaml",
                                                  nodeOverrides='{"standby": {"dropletImage": "ubuntu-24-04-x64"}}'))
    assert changed_sections(prod_plan, rebuilt) == {"--- minitwit-prod-standby"}
    assert "-  ignore_changes: image, sshKeys, userData" in changed_lines(prod_plan, rebuilt)
