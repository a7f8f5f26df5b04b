"""One source of data for both nodes: the `database` setting's three modes.

- managed: a DigitalOcean PostgreSQL cluster in the pair's region and VPC, a database and a user
  for the app, and a database firewall whose only trusted sources are the two droplets.
- external: the URI the user supplied (a secret).
- none: each node's compose file runs its own database; a failover then serves other data, so
  `pulumi preview` says so.

Whatever the mode, each node gets the result as DATABASE_URL in a root-only 0600 env file
(/srv/minitwit/app.env, read by the compose services); the URI stays a secret Output end to end.
"""

from __future__ import annotations

from urllib.parse import quote, urlsplit

import pulumi
import pulumi_digitalocean as do
from pulumi import Output, ResourceOptions

from infra.settings import Settings

APP_DB = "minitwit"
APP_USER = "minitwit"
NONE_WARNING = ("database=none: each node uses its compose file's own database, so after a failover the "
                "other node serves a different, older data set. Use database=managed (or external) for one "
                "shared database.")


def app_env_text(uri: str | None) -> str:
    header = "# minitwit-ha: the app's settings, read by the compose services (root-only, 0600).\n"
    if uri is None:
        return header + "# database=none: the compose file's own database is used.\n"
    return header + f"DATABASE_URL={uri}\n"


def managed_uri(user: str, password: str, host: str, port: int | str, db: str) -> str:
    return (f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(db, safe='')}"
            "?sslmode=require")


class SharedDatabase:
    """Declares the database resources (children of `parent`) and exposes app_env and host."""

    def __init__(self, name: str, settings: Settings, vpc: do.Vpc, droplets: list[do.Droplet],
                 parent: pulumi.Resource) -> None:
        db = settings.database
        self.cluster = None
        self.firewall = None
        if db.mode == "managed":
            self.cluster = do.DatabaseCluster(
                f"{name}-db",
                engine="pg",
                version=db.version,
                size=db.size,
                region=settings.region,
                node_count=db.node_count,
                # On the VPC: the nodes reach it over the private network only.
                private_network_uuid=vpc.id,
                tags=["minitwit-ha", f"minitwit-ha:{settings.stack}"],
                opts=ResourceOptions(parent=parent, protect=settings.protect),
            )
            self.database = do.DatabaseDb(f"{name}-db-minitwit", cluster_id=self.cluster.id, name=APP_DB,
                                          opts=ResourceOptions(parent=parent, protect=settings.protect))
            self.user = do.DatabaseUser(f"{name}-db-app", cluster_id=self.cluster.id, name=APP_USER,
                                        opts=ResourceOptions(parent=parent))
            # Trusted sources: exactly the two droplets (nothing else, not even the admin CIDRs).
            self.firewall = do.DatabaseFirewall(
                f"{name}-db-firewall",
                cluster_id=self.cluster.id,
                rules=[do.DatabaseFirewallRuleArgs(type="droplet", value=d.id) for d in droplets],
                opts=ResourceOptions(parent=parent),
            )
            uri = Output.all(self.user.name, self.user.password, self.cluster.private_host, self.cluster.port,
                             self.database.name).apply(lambda v: managed_uri(*v))
            self.app_env: Output[str] = Output.secret(uri.apply(app_env_text))
            self.host: Output[str] = self.cluster.private_host
        elif db.mode == "external":
            assert db.uri is not None  # noqa: S101 - settings guarantee it
            text = db.uri.reveal()
            self.app_env = Output.secret(app_env_text(text))
            self.host = Output.from_input(urlsplit(text).hostname or "")
        else:
            pulumi.log.warn(NONE_WARNING)
            self.app_env = Output.secret(app_env_text(None))
            self.host = Output.from_input("")
