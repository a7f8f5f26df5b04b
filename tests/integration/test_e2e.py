"""The pair on DigitalOcean: `up`, app_url answers, keepalived stopped on the active node moves the
reserved IP to the other one, and the stack is destroyed whatever happened. See __init__.py."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PROJECT = "minitwit-ha"
API = "https://api.digitalocean.com/v2"
STAGING = yaml.safe_load((ROOT / "Pulumi.staging.yaml").read_text())["config"]


def _missing() -> str | None:
    gaps = [f"${name}" for name in ("DIGITALOCEAN_TOKEN", "E2E_FAILOVER_TOKEN", "E2E_SSH_KEY", "E2E_ADMIN_CIDRS")
            if not os.environ.get(name)]
    if STAGING.get(f"{PROJECT}:registryServer") and not os.environ.get("E2E_REGISTRY_PASSWORD"):
        gaps.append("$E2E_REGISTRY_PASSWORD (Pulumi.staging.yaml names a registry)")
    gaps += [f"`{tool}` on PATH" for tool in ("pulumi", "ssh") if shutil.which(tool) is None]
    if not gaps:
        return None
    return ("opt-in end-to-end test on a real DigitalOcean account; missing: " + ", ".join(gaps)
            + " (tests/integration/__init__.py lists what it needs)")


pytestmark = [pytest.mark.integration, pytest.mark.skipif(_missing() is not None, reason=_missing() or "")]


def do_api(path: str) -> tuple[int, dict]:
    req = urllib.request.Request(f"{API}{path}", headers={"Authorization": f"Bearer {os.environ['DIGITALOCEAN_TOKEN']}"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def holder(ip: str) -> int | None:
    """The droplet the reserved IP is assigned to right now, per the API."""
    status, body = do_api(f"/reserved_ips/{ip}")
    assert status == 200, f"GET /v2/reserved_ips/{ip}: HTTP {status}"
    droplet = body["reserved_ip"].get("droplet")
    return int(droplet["id"]) if droplet else None


def wait_for(what: str, check, timeout: float, interval: float = 3.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(interval)


def public_key(private_key: Path) -> str:
    pub = Path(f"{private_key}.pub")
    if pub.exists():
        return pub.read_text().strip()
    return subprocess.run(["ssh-keygen", "-y", "-f", str(private_key)], check=True, capture_output=True,
                          text=True).stdout.strip()


def md5_fingerprint(pubkey: str) -> str:
    blob = pubkey.split()[1]
    digest = hashlib.md5(base64.b64decode(blob + "=" * (-len(blob) % 4))).hexdigest()  # noqa: S324 - DO's key IDs
    return ":".join(digest[i:i + 2] for i in range(0, 32, 2))


def stack_config(pubkey: str) -> dict:
    """Staging's values (never its secrets), with what makes this stack its own."""
    config = {k: v for k, v in STAGING.items() if k.startswith(f"{PROJECT}:") and not isinstance(v, dict)}
    config.pop(f"{PROJECT}:sshPublicKey", None)
    config.pop(f"{PROJECT}:sshKeyFingerprints", None)
    # DigitalOcean refuses to register a key twice: reuse it by fingerprint if the account has it.
    fingerprint = md5_fingerprint(pubkey)
    if do_api(f"/account/keys/{fingerprint}")[0] == 200:
        config[f"{PROJECT}:sshKeyFingerprints"] = [fingerprint]
    else:
        config[f"{PROJECT}:sshPublicKey"] = pubkey
    config.update({
        f"{PROJECT}:vpcIpRange": f"10.112.{secrets.randbelow(256)}.0/24",
        f"{PROJECT}:adminCidrs": [c.strip() for c in os.environ["E2E_ADMIN_CIDRS"].split(",") if c.strip()],
        f"{PROJECT}:database": "none",
        f"{PROJECT}:protect": False,
    })
    return config


def set_secret(stack_name: str, key: str, value: str) -> None:
    # Through stdin: the Automation API's set_config would put the value on pulumi's command line.
    subprocess.run(["pulumi", "config", "set", "--secret", "--stack", stack_name, f"{PROJECT}:{key}"],
                   input=value, text=True, cwd=ROOT, check=True, capture_output=True)


@pytest.fixture
def e2e_stack(request):
    from pulumi import automation as auto

    key = Path(os.environ["E2E_SSH_KEY"]).expanduser()
    name = f"e2e-{time.strftime('%m%d%H%M')}-{secrets.token_hex(2)}"
    settings_file = ROOT / f"Pulumi.{name}.yaml"
    state = {"created": False, "removed": False}
    # Registered first, so it runs last: drop the stack file unless a failed destroy still needs it.
    request.addfinalizer(lambda: settings_file.unlink(missing_ok=True)
                         if state["removed"] or not state["created"] else None)

    opts = auto.LocalWorkspaceOptions(
        stack_settings={name: auto.StackSettings(config=stack_config(public_key(key)))})
    stack = auto.create_stack(name, work_dir=str(ROOT), opts=opts)
    state["created"] = True

    def teardown() -> None:
        stack.destroy(on_output=print, color="never")
        stack.workspace.remove_stack(name)
        state["removed"] = True

    request.addfinalizer(teardown)  # before `up`: whatever `up` leaves behind is destroyed

    set_secret(name, "failoverToken", os.environ["E2E_FAILOVER_TOKEN"])
    if os.environ.get("E2E_REGISTRY_PASSWORD"):
        set_secret(name, "registryPassword", os.environ["E2E_REGISTRY_PASSWORD"])
    result = stack.up(on_output=print, color="never")
    return {k: v.value for k, v in result.outputs.items()}, key


def test_up_serves_app_url_and_stopping_keepalived_moves_the_reserved_ip(e2e_stack, tmp_path):
    outputs, key = e2e_stack
    app_url, rip, nodes = outputs["app_url"], outputs["reserved_ip"], outputs["nodes"]
    ready = [sys.executable, str(ROOT / "scripts" / "wait_ready.py"), "--url", app_url]
    assert subprocess.run([*ready, "--timeout", "120"]).returncode == 0, f"{app_url} does not answer"

    ids = {node: int(n["droplet_id"]) for node, n in nodes.items()}
    active_id = wait_for("the reserved IP assigned to a node", lambda: holder(rip), 120)
    assert active_id in ids.values(), f"{rip} is on droplet {active_id}, not on this pair {ids}"
    active = next(node for node, i in ids.items() if i == active_id)
    other = next(node for node in ids if node != active)

    ssh = ["ssh", "-i", str(key), "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
           "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={tmp_path / 'known_hosts'}",
           f"deploy@{nodes[active]['public_ipv4']}", "sudo systemctl stop keepalived"]
    subprocess.run(ssh, check=True, timeout=60)

    wait_for(f"the reserved IP moving from {active} to {other}", lambda: holder(rip) == ids[other], 120)
    assert subprocess.run([*ready, "--timeout", "60"]).returncode == 0, f"{app_url} down after the failover"
