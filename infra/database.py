"""One source of data for both nodes: the `database` setting's three modes.

- managed: a DigitalOcean PostgreSQL cluster in the pair's region and VPC, a database and a user
  for the app, and a database firewall whose only trusted source is a tag only this stack's
  droplets carry (db_client_tag): a replacement droplet is trusted when it is created, and the
  firewall never changes while a node is replaced.
- external: the URI the user supplied (a secret).
- none: each node's compose file runs its own database; a failover then serves other data, so
  `pulumi preview` says so.

Whatever the mode, each node gets the result as DATABASE_URL in a root-only 0600 env file
(/srv/minitwit/app.env, read by the compose services); the URI stays a secret Output end to end.

TLS is verified, not just used: `sslmode=require` encrypts but accepts any certificate, so anyone
on the path could answer as the database. A managed cluster's certificates are signed by its
project's own CA (the provider's `getDatabaseCa` data source); the stack ships that CA to every
node as DB_CA_FILE (public data, 0644, mounted at the same path into the app's container) and the
URI says `sslmode=verify-full&sslrootcert=DB_CA_FILE`, so libpq checks the CA and the host name.
The provider and DigitalOcean's docs do not say whether the cluster's private host name
(`private-...`) is in the certificate; if a cluster's is not, `databaseSslMode: verify-ca` still
pins the project CA (the CA is per project, so no other server holds a certificate it signed).

Rights, as DigitalOcean gives them: the cluster's `doadmin` owns the databases the API creates,
and a user created through the API is a plain login role. On PostgreSQL 15+ only the database
owner may create in `public`, so the app user could neither create its tables nor read tables
doadmin creates (a migration run as doadmin). `grant_sql()` fixes both; one node runs it as
doadmin over the VPC (the cluster trusts only the droplets), the password on stdin.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import pulumi
import pulumi_digitalocean as do
from pulumi import Output, ResourceOptions

from infra.settings import DB_CA_FILE, Settings
from infra.steps import digest as _digest

APP_DB = "minitwit"
APP_USER = "minitwit"
NONE_WARNING = ("database=none: each node uses its compose file's own database, so after a failover the "
                "other node serves a different, older data set. Use database=managed (or external) for one "
                "shared database.")


def db_client_tag(stack: str) -> str:
    """The tag the database firewall trusts; both droplets carry it and nothing else should. Only
    letters, digits, '-', '_' and ':' are valid in a DigitalOcean tag (at most 255)."""
    clean = "".join(c if c.isalnum() or c in "-_" else "-" for c in stack)
    return f"minitwit-ha-{clean}"[:255]


def app_env_text(uri: str | None) -> str:
    header = "# minitwit-ha: the app's settings, read by the compose services (root-only, 0600).\n"
    if uri is None:
        return header + "# database=none: the compose file's own database is used.\n"
    return header + f"DATABASE_URL={uri}\n"


# What the app user may do to tables and sequences in `public` that it does not own.
TABLE_RIGHTS = "SELECT, INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER"
SEQUENCE_RIGHTS = "USAGE, SELECT, UPDATE"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def grant_sql(db: str = APP_DB, user: str = APP_USER) -> str:
    """Run as the database's owner (doadmin), connected to `db`. Idempotent: GRANTs that exist are
    no-ops. Grants rather than `ALTER DATABASE ... OWNER`: changing the owner needs membership in
    the app role, which a CREATEROLE admin no longer gets implicitly on PostgreSQL 16."""
    d, u = _ident(db), _ident(user)
    return f"""\\set ON_ERROR_STOP 1
BEGIN;
GRANT CONNECT, TEMPORARY ON DATABASE {d} TO {u};
-- PostgreSQL 15+: PUBLIC may no longer create in `public`; the app creates its schema at start.
GRANT USAGE, CREATE ON SCHEMA public TO {u};
-- Tables the admin created already (a migration run as doadmin) ...
GRANT {TABLE_RIGHTS} ON ALL TABLES IN SCHEMA public TO {u};
GRANT {SEQUENCE_RIGHTS} ON ALL SEQUENCES IN SCHEMA public TO {u};
-- ... and the ones it creates later.
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT {TABLE_RIGHTS} ON TABLES TO {u};
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT {SEQUENCE_RIGHTS} ON SEQUENCES TO {u};
COMMIT;
"""


def _tls_params(sslmode: str) -> dict[str, str]:
    """libpq's TLS parameters: the CA file whenever the mode verifies."""
    params = {"sslmode": sslmode}
    if sslmode.startswith("verify-"):
        params["sslrootcert"] = DB_CA_FILE
    return params


def grants_command(host: str, port: int | str, admin_user: str, db: str = APP_DB, user: str = APP_USER,
                   sslmode: str = "verify-full") -> str:
    """The remote command: stdin is the admin password on its first line, then grant_sql()."""
    tls = " ".join(f"{k}={v}" for k, v in _tls_params(sslmode).items())
    conninfo = (f"host={host} port={port} user={admin_user} dbname={db} {tls} "
                "connect_timeout=10 application_name=minitwit-ha-grants")
    return "\n".join([
        "set -eu",
        "# psql comes with postgresql-client (Debian 12: 15; a 15 client runs these statements on 16 and 17).",
        "if ! command -v psql >/dev/null 2>&1; then",
        "  sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -q postgresql-client >/dev/null",
        "fi",
        "# The password is stdin's first line and lives only in psql's environment (never on a",
        "# command line); psql reads the rest of stdin: the SQL.",
        "IFS= read -r PGPASSWORD",
        "export PGPASSWORD",
        f"psql -X -q {shlex.quote(conninfo)}",
        f'echo "granted {user} its rights on database {db}"',
    ]) + "\n"


@dataclass(frozen=True)
class GrantsStep:
    """What the node running the grants needs: its command, its secret stdin, its triggers."""

    create: Output[str]
    stdin: Output[str]
    triggers: list
    depends_on: list


def managed_uri(user: str, password: str, host: str, port: int | str, db: str, sslmode: str = "verify-full") -> str:
    query = "&".join(f"{k}={quote(v, safe='/')}" for k, v in _tls_params(sslmode).items())
    return f"postgresql://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(db, safe='')}?{query}"


class SharedDatabase:
    """Declares the database resources (children of `parent`) and exposes app_env and host."""

    def __init__(self, name: str, settings: Settings, vpc: do.Vpc, droplets: list[do.Droplet],
                 parent: pulumi.Resource) -> None:
        db = settings.database
        self.cluster = None
        self.firewall = None
        self.grants: GrantsStep | None = None  # managed only: external/none rights are the user's
        # Always shipped (empty without a managed cluster), so the compose file's mount of it
        # never makes Docker create a directory in its place.
        self.ca_certificate: Output[str] = Output.from_input("")
        sslmode = db.sslmode
        if sslmode == "require" and db.mode != "none":
            pulumi.log.warn("databaseSslMode=require: the app encrypts its database connection but does not check "
                            "who answers; use verify-full (or verify-ca) unless your server's CA cannot be had")
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
            # Trusted source: the stack's droplets by tag (nothing else, not even the admin CIDRs). Not
            # droplet IDs: a replacement's ID would update the rules as soon as it existed. After the
            # droplets (depends_on, no ID input): the tag exists once a droplet carries it.
            self.firewall = do.DatabaseFirewall(
                f"{name}-db-firewall",
                cluster_id=self.cluster.id,
                rules=[do.DatabaseFirewallRuleArgs(type="tag", value=db_client_tag(settings.stack))],
                opts=ResourceOptions(parent=parent, depends_on=list(droplets)),
            )
            self.ca_certificate = do.get_database_ca_output(cluster_id=self.cluster.id).certificate
            uri = Output.all(self.user.name, self.user.password, self.cluster.private_host, self.cluster.port,
                             self.database.name).apply(lambda v: managed_uri(*v, sslmode=sslmode))
            self.app_env: Output[str] = Output.secret(uri.apply(app_env_text))
            self.host: Output[str] = self.cluster.private_host
            # The same user and database over the cluster's public host: what an operator's
            # migration (`migrate_db.py --to stack:NAME`) connects to from outside the VPC.
            self.app_uri: Output[str] = Output.secret(Output.all(
                self.user.name, self.user.password, self.cluster.host, self.cluster.port, self.database.name,
            # `require`, not verify-*: the operator's laptop has no DB_CA_FILE (the nodes do).
            ).apply(lambda v: managed_uri(*v, sslmode="require")))
            sql = grant_sql()
            self.grants = GrantsStep(
                create=Output.all(self.cluster.private_host, self.cluster.port, self.cluster.user).apply(
                    lambda v: grants_command(*v, sslmode=sslmode)),
                stdin=Output.secret(Output.concat(self.cluster.password, "\n", sql)),
                triggers=[self.cluster.id, self.database.name, self.user.name, _digest(sql)],
                depends_on=[self.database, self.user],
            )
        elif db.mode == "external":
            assert db.uri is not None  # noqa: S101 - settings guarantee it
            text = db.uri.reveal()
            self.app_env = Output.secret(app_env_text(text))
            self.host = Output.from_input(urlsplit(text).hostname or "")
            self.app_uri = Output.secret(text)
        else:
            pulumi.log.warn(NONE_WARNING)
            self.app_env = Output.secret(app_env_text(None))
            self.host = Output.from_input("")
            self.app_uri = Output.secret("")
