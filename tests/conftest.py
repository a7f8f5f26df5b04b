"""Shared fixtures: a valid stack config (sentinel secrets), and the program run under mocks.

The mocks class is `infra.offline.DoMocks` (also used by `make plan`): it returns camelCase
computed outputs with distinct addresses per droplet and records every resource's inputs, so
tests assert on what was declared.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from infra.offline import DoMocks, Resolved, run_offline
from infra.program import run
from infra.settings import DictSource

ROOT = Path(__file__).resolve().parent.parent

# Sentinel secrets: unique strings a test can search for anywhere (commands, outputs, files).
SENTINEL_TOKEN = "dop_v1_" + "5e" * 32
SENTINEL_PRIVATE_KEY = ("-----BEGIN OPENSSH PRIVATE KEY-----\nSENTINEL-PRIVATE-KEY-b3BlbnNzaC1rZXktdjEAAAA\n"
                        "-----END OPENSSH PRIVATE KEY-----\n")
SENTINEL_REGISTRY_PASSWORD = "SENTINEL-registry-password-7f3a"
SENTINEL_DB_URI = ("postgresql://app:SENTINEL-db-password-91c2@db.internal.example:25060/minitwit"
                   "?sslmode=verify-full&sslrootcert=/etc/ssl/certs/db-ca.pem")
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGZha2Uta2V5LWZvci10ZXN0cw deploy@example"

SECRET_KEYS = frozenset({"sshPrivateKey", "failoverToken", "registryPassword", "databaseUri", "alertWebhookUrl"})


def base_config(**overrides) -> dict:
    cfg = {
        "region": "fra1",
        "vpcIpRange": "10.110.16.0/24",
        "sshPublicKey": PUBLIC_KEY,
        "adminCidrs": ["198.51.100.0/24"],
        "failoverToken": SENTINEL_TOKEN,
        "composeFile": "deploy/compose.yaml",
        "database": "none",
    }
    cfg.update(overrides)
    return {k: v for k, v in cfg.items() if v is not None}


@dataclass
class StackRun:
    mocks: DoMocks
    outputs: dict[str, Resolved]

    @property
    def resources(self):
        return self.mocks.resources

    def commands(self):
        return [r for r in self.resources if r.typ.startswith("command:")]


def run_stack(config: dict, secret_keys=SECRET_KEYS, stack: str = "test", project_dir: Path = ROOT,
              mocks: DoMocks | None = None) -> StackRun:
    mocks = mocks or DoMocks(vpc_range=config.get("vpcIpRange", "10.110.16.0/24"))
    source = DictSource(config, frozenset(k for k in secret_keys if k in config))
    outputs = run_offline(lambda: run(source, stack=stack, project_dir=project_dir), mocks, stack=stack)
    return StackRun(mocks, outputs)


@pytest.fixture
def stack_run() -> StackRun:
    return run_stack(base_config())
