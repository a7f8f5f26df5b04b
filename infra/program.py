"""The whole program as a function: config source in, stack outputs out (`__main__.py` exports them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pulumi

from infra.adopt import check_reserved_ip_holder
from infra.ha_pair import HaPair, HaPairArgs
from infra.settings import ConfigSource, Settings, load_settings

PROJECT_DIR = Path(__file__).resolve().parent.parent


# The deploy key's private half has no use in `pulumi up` any more (it provisions with a key the
# stack generates); kept in config it only widens who holds the deploy key.
STALE_PRIVATE_KEY_WARNING = (
    "sshPrivateKey is set but unused: `pulumi up` provisions as `provision` with a key the stack "
    "generates, and rollouts read the deploy key from their own environment. Remove it so the deploy "
    "key stops travelling with the stack's config: `pulumi config rm sshPrivateKey`"
)


def component_name(stack: str) -> str:
    return f"minitwit-{stack}"


def build(settings: Settings, project_dir: Path = PROJECT_DIR) -> dict[str, Any]:
    """Declare the resources for validated settings; return the stack outputs (names are a contract)."""
    if settings.stale_private_key:
        pulumi.log.warn(STALE_PRIVATE_KEY_WARNING)
    pair = HaPair(component_name(settings.stack), HaPairArgs(settings=settings, repo_root=project_dir))
    return {
        "reserved_ip": pair.reserved_ip.ip_address,
        "app_url": pair.app_url,
        "vpc_id": pair.vpc.id,
        "nodes": pair.nodes,
        # The app workers (appWorkers), in the order both nodes' HAProxy lists them: [] without any.
        "workers": pair.workers,
        "database_host": pair.database.host,
        # Plain text in known_hosts format: both droplets' pinned host keys (CI's ssh reads it).
        "known_hosts": pair.known_hosts,
        # Secret: the app's own database URI (public host), for `migrate_db.py --to stack:NAME`.
        "database_uri": pair.database.app_uri,
    }


def run(source: ConfigSource, stack: str, project_dir: Path = PROJECT_DIR) -> dict[str, Any]:
    """Validate every setting first (raises SettingsError before any resource exists), then build."""
    settings = load_settings(source, stack=stack, project_dir=project_dir)
    check_reserved_ip_holder(settings)  # an adopted IP another droplet holds: refused unless told
    return build(settings, project_dir)


def export_all(outputs: dict[str, Any]) -> None:
    for key, value in outputs.items():
        pulumi.export(key, value)
