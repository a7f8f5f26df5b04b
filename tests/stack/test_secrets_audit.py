"""Secrets audit of a whole stack run under mocks, with sentinel values for every secret.

Each secret may appear in exactly one kind of place: its own destination (stdin of the command
that installs it 0600 on a node, or the SSH connection for the provisioning key), always marked
secret so the state encrypts it. Nowhere else: not in a command line, an environment, a trigger,
a rendered file, user data, or a plain stack output. The deploy key (sshPrivateKey) has no home
at all: `pulumi up` provisions with its own generated key, so the deploy key is in no resource.
"""

from __future__ import annotations

import pytest

from infra.offline import unwrap
from tests.conftest import (
    SENTINEL_DB_URI,
    SENTINEL_PRIVATE_KEY,
    SENTINEL_REGISTRY_PASSWORD,
    SENTINEL_TOKEN,
    base_config,
    run_stack,
)

SENTINELS = {
    "token": SENTINEL_TOKEN,
    "private key": SENTINEL_PRIVATE_KEY.splitlines()[1],
    "registry password": SENTINEL_REGISTRY_PASSWORD,
    "database password": "SENTINEL-db-password-91c2",
    "alert webhook": "SENTINEL-webhook-5d1e",
    "provision key": "mock-provision-key",  # DoMocks' tls:PrivateKey
}
# secret -> (resource name suffix, input) where it belongs
HOMES = {
    "token": [("-failover-token", "stdin")],
    "private key": [],
    "provision key": [("", "connection")],
    "registry password": [("-registry-login", "stdin")],
    "database password": [("-app-env", "stdin")],
    "alert webhook": [("-alert-webhook", "stdin")],
}


@pytest.fixture(scope="module")
def run():
    return run_stack(base_config(registryServer="registry.digitalocean.com", registryUsername="ci",
                                 registryPassword=SENTINEL_REGISTRY_PASSWORD, database="external",
                                 databaseUri=SENTINEL_DB_URI,
                                 alertWebhookUrl="https://hooks.slack.com/services/T0/B0/SENTINEL-webhook-5d1e"))


def test_every_secret_is_only_in_its_own_destination(run):
    findings, homes_seen = [], {k: 0 for k in SENTINELS}
    for r in run.resources:
        for key, value in r.inputs.items():
            text = repr(unwrap(value))
            for what, sentinel in SENTINELS.items():
                if sentinel not in text:
                    continue
                at_home = any(r.name.endswith(suffix) and key == k for suffix, k in HOMES[what])
                if not at_home:
                    findings.append(f"{what} in {r.typ} {r.name}.{key}")
                elif not r.is_secret(key) and key != "connection":
                    findings.append(f"{what} in {r.name}.{key} without the secret flag")
                else:
                    homes_seen[what] += 1
    assert findings == []
    # Each secret did reach its destinations (both nodes), so the audit looked at real traffic.
    assert homes_seen["token"] == 2 and homes_seen["registry password"] == 2
    assert homes_seen["database password"] == 2 and homes_seen["provision key"] >= 2
    assert homes_seen["alert webhook"] == 2


def test_secret_destinations_are_written_0600_by_root(run):
    for r in run.commands():
        if r.name.endswith(("-failover-token", "-app-env", "-alert-webhook")):
            assert "install -m 0600 -o root -g root /dev/stdin" in r.plain("create")


def test_connections_are_secret(run):
    remote = [r for r in run.resources if r.typ == "command:remote:Command"]
    assert remote and all(r.is_secret("connection") for r in remote)


def test_no_plain_output_carries_a_secret(run):
    for key, out in run.outputs.items():
        if out.secret:
            continue
        for what, sentinel in SENTINELS.items():
            assert sentinel not in repr(out.value), f"{what} in output {key}"
    assert run.outputs["database_host"].value == "db.internal.example"
