"""The HaPair component: VPC, SSH key, two droplets, the reserved IP, and each node's provisioning.

Why it looks the way it does:
- The reserved IP is created with a region only (or adopted) and is never assigned by Pulumi:
  keepalived moves it at runtime, and a `ReservedIpAssignment` or a `droplet_id` would be read
  back as drift on refresh and moved back to the droplet named in code on the next `up`.
- No DigitalOcean Cloud Firewall: it filters only TCP/UDP/ICMP, also on VPC traffic, so it
  cannot pass VRRP (IP protocol 112). Each node gets a host nftables ruleset instead.
- One node at a time (day two): the droplets ignore drift in image, user data and SSH keys (each
  forces a replacement, and both nodes share them), unless `nodeOverrides` gives that node its own
  image; a size change resizes only the node whose override names it. scripts/rollout.py
  resize|reimage walks the pair with these overrides (docs/operations.md).
- A replaced droplet never fights: its retire step (triggered only by its ID) stops keepalived,
  the reconciler and HAProxy on the old droplet, delete-before-replace, before the survivor's
  firewall, HAProxy and keepalived are re-pointed at the new peer. Each node's keepalived starts
  in a step of its own after both nodes' keepalived configuration, so a new node never starts
  before the survivor unicasts to it (it would hear nobody and become a second MASTER).
- Each node's SSH host key is generated here (pulumi-tls, ed25519), installed by cloud-init and
  pinned in every connection; `known_hosts` is a stack output for CI and the rollout tool.
- Each node's files are rendered from *both* droplets' outputs (own private IP as unicast source,
  the other's as peer), so only rendering waits for both droplets; the two nodes' remote chains
  run in parallel, except the app step, which goes standby first so the pair never restarts its
  app on both nodes at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_command as command
import pulumi_digitalocean as do
import pulumi_tls as tls
from pulumi import Output, ResourceOptions

from infra import steps
from infra.adopt import stack_tag
from infra.cloudinit import PROVISION_USER, HostKey, render_cloud_init
from infra.database import DB_CA_FILE, GrantsStep, SharedDatabase, db_client_tag
from infra.haproxy import HaproxyFacts, worker_server
from infra.node import (
    REPO_ROOT,
    STEP_APP,
    STEP_FAILOVER,
    STEP_FIREWALL,
    STEP_HAPROXY,
    STEP_KEEPALIVED,
    NodeFacts,
    NodeFile,
    NodePaths,
    files_for_step,
    render_node_files,
    render_worker_files,
    step_digest,
)
from infra.profiles import PROFILES
from infra.settings import Settings

NODES = ("primary", "standby")
PRIORITY = {"primary": 150, "standby": 100}
COMPOSE_PROJECT = "minitwit"
DEPLOY_USER = "deploy"


@dataclass(frozen=True)
class HaPairArgs:
    settings: Settings
    repo_root: Path = REPO_ROOT


def _tags(settings: Settings, node: str) -> list[str]:
    # db_client_tag: the database firewall trusts it, so a replacement droplet reaches the database
    # without the firewall changing (it used to list droplet IDs, updated as soon as a new ID existed).
    return ["minitwit-ha", stack_tag(settings.stack), f"minitwit-ha:{node}", db_client_tag(settings.stack)]


# Drift the droplets ignore: each of these forces a replacement, and both nodes share them, so one
# `pulumi up` would replace both at once. A node rebuilt on purpose (nodeOverrides) takes them again.
REPLACING_INPUTS = ["image", "userData", "sshKeys"]


def known_hosts_line(host: str, public_key: str) -> str:
    """One known_hosts line: the address, then the key (`ssh-ed25519 AAAA...`), no comment."""
    return f"{host} {' '.join(public_key.split()[:2])}"


def _hostname(name: str, node: str) -> str:
    host = "".join(c if c.isalnum() or c == "-" else "-" for c in f"{name}-{node}".lower())
    return host.strip("-")[:63]


class HaPair(pulumi.ComponentResource):
    """A hot/standby pair of droplets sharing one reserved IP."""

    def __init__(self, name: str, args: HaPairArgs, opts: ResourceOptions | None = None) -> None:
        super().__init__("minitwit-ha:index:HaPair", name, None, opts)
        s = args.settings
        child_opts = ResourceOptions(parent=self)
        protect_opts = ResourceOptions(parent=self, protect=s.protect)

        self.vpc = do.Vpc(
            f"{name}-vpc",
            region=s.region,
            ip_range=s.vpc_ip_range,
            description=f"minitwit-ha {s.stack}: the pair's private network (VRRP, database)",
            opts=protect_opts,
        )

        key_refs: list[pulumi.Input[str]] = list(s.ssh_key_fingerprints)
        if s.ssh_public_key:
            self.ssh_key = do.SshKey(f"{name}-deploy-key", public_key=s.ssh_public_key, opts=child_opts)
            key_refs.append(self.ssh_key.fingerprint)

        # The provisioning identity's key: generated here, so it lives only in the stack's state
        # (a secret) and only `pulumi up` uses it; `deploy`'s key (rollouts) cannot become root.
        self.provision_key = tls.PrivateKey(f"{name}-provision-key", algorithm="ED25519", opts=child_opts)
        self.host_keys: dict[str, tls.PrivateKey] = {}
        self.droplets: dict[str, do.Droplet] = {}
        # App workers (appWorkers) are droplets like the pair's, built the same way: worker-1, worker-2, ...
        worker_names = [worker_server(i) for i in range(s.app_workers)]
        for node in (*NODES, *worker_names):
            # The node's SSH host key, made here so every connection can pin it. It outlives a
            # replaced droplet: the new one gets the same key, and known_hosts stays valid.
            key = tls.PrivateKey(f"{name}-{node}-host-key", algorithm="ED25519", opts=child_opts)
            self.host_keys[node] = key
            user_data = Output.secret(Output.all(key.private_key_openssh, key.public_key_openssh,
                                                 self.provision_key.public_key_openssh).apply(
                lambda k: render_cloud_init(s.ssh_public_key, k[2], HostKey(private=k[0], public=k[1]))))
            self.droplets[node] = do.Droplet(
                f"{name}-{node}",
                name=_hostname(name, node),
                image=s.node_image(node),
                region=s.region,
                size=s.node_size(node),
                vpc_uuid=self.vpc.id,
                ssh_keys=key_refs,
                monitoring=True,
                ipv6=False,
                tags=_tags(s, node),
                user_data=user_data,
                graceful_shutdown=True,
                opts=ResourceOptions(parent=self, ignore_changes=[] if s.rebuilds(node) else REPLACING_INPUTS),
            )

        if s.reserved_ip:
            # Adopted: read only. Pulumi never changes, assigns or deletes an adopted reserved IP.
            self.reserved_ip = do.ReservedIp.get(f"{name}-reserved-ip", s.reserved_ip, opts=child_opts)
        else:
            # Region only, no droplet_id: the active node's notify script assigns it (see module doc).
            self.reserved_ip = do.ReservedIp(
                f"{name}-reserved-ip",
                region=s.region,
                opts=ResourceOptions(parent=self, protect=s.protect, ignore_changes=["dropletId"]),
            )

        # The shared database (or the warning that there is none); its URI reaches the nodes as a
        # secret app.env.
        self.database = SharedDatabase(name, s, self.vpc, list(self.droplets.values()), self)

        self.node_chains: dict[str, NodeChain] = {}
        for node in (*NODES, *worker_names):
            peer = {"primary": "standby", "standby": "primary"}.get(node)
            self.node_chains[node] = NodeChain(
                name=f"{name}-{node}", node=node, settings=s, droplet=self.droplets[node],
                peer=self.droplets[peer] if peer else None, host_key=self.host_keys[node].public_key_openssh,
                provision_key=self.provision_key.private_key_openssh, parent=self)
        worker_ips = [self.droplets[w].ipv4_address_private for w in worker_names]
        app_after: list[pulumi.Resource] = []
        for node in ("standby", "primary"):  # app step: standby first, then primary
            peer = "standby" if node == "primary" else "primary"
            chain = self.node_chains[node]
            chain.provision(
                reserved_ip=self.reserved_ip.ip_address, app_env=self.database.app_env, repo_root=args.repo_root,
                app_after=list(app_after), peer_retire=self.node_chains[peer].retire,
                db_ca=self.database.ca_certificate,
                # The app user's rights, granted once from the node whose app starts first.
                db_grants=self.database.grants if not app_after else None,
                workers=worker_ips,
            )
            app_after.append(chain.app)
        for node in NODES:  # after both nodes' keepalived configuration (see NodeChain.start_keepalived)
            peer = "standby" if node == "primary" else "primary"
            self.node_chains[node].start_keepalived(self.node_chains[peer].keepalived)
        # Workers provision in parallel with the pair; each app starts once the app user's grants exist.
        grants = [c for c in (self.node_chains["standby"].db_grants,) if c is not None]
        for w in worker_names:
            self.node_chains[w].provision_worker(
                pair=[self.droplets[n] for n in NODES], app_env=self.database.app_env, repo_root=args.repo_root,
                db_ca=self.database.ca_certificate, app_after=grants)

        port = "" if s.app_port == 80 else f":{s.app_port}"
        self.app_url = Output.concat("http://", self.reserved_ip.ip_address, port, "/")
        ready_url = Output.concat("http://", self.reserved_ip.ip_address, port, s.health_path)
        gate_deps = [c for chain in self.node_chains.values() for c in chain.commands]
        self.ready = command.local.Command(
            f"{name}-ready",
            # The project's own interpreter and a relative dir: an absolute path would show as drift
            # (`~dir`) when another checkout (CI, a colleague) runs the next `pulumi up` or drift check.
            create=Output.concat(
                ".venv/bin/python scripts/wait_ready.py --timeout 300 --url ", ready_url,
            ),
            dir=_relative_dir(args.repo_root),
            triggers=[chain.digest for chain in self.node_chains.values()],
            opts=ResourceOptions(parent=self, depends_on=gate_deps),
        )

        self.nodes = {
            node: {
                "droplet_id": d.id.apply(int),
                "public_ipv4": d.ipv4_address,
                "private_ipv4": d.ipv4_address_private,
            }
            for node, d in self.droplets.items() if node in NODES
        }
        # In HAProxy's order: `workers[i]` is server worker-(i+1) in both nodes' backend. The public
        # address is where `rollout.py rollout` reaches the worker's sshd (admin CIDRs only).
        self.workers = [
            {"droplet_id": self.droplets[w].id.apply(int), "public_ipv4": self.droplets[w].ipv4_address,
             "private_ipv4": self.droplets[w].ipv4_address_private}
            for w in worker_names
        ]
        # known_hosts lines for every droplet's public address, workers too (CI's ssh and the rollout tool).
        self.known_hosts = Output.all(*[Output.all(self.droplets[n].ipv4_address, self.host_keys[n].public_key_openssh)
                                        for n in self.droplets]).apply(
            lambda pairs: "".join(known_hosts_line(h, k) + "\n" for h, k in pairs))
        self.register_outputs({
            "reserved_ip": self.reserved_ip.ip_address,
            "app_url": self.app_url,
            "vpc_id": self.vpc.id,
            "nodes": self.nodes,
            "workers": self.workers,
            "database_host": self.database.host,
            "known_hosts": self.known_hosts,
        })


def _step_inputs(rendered: Output[list[NodeFile]]):
    """step -> (archive, digest) of that step's files in `rendered` (`rename` stages a file as .new)."""
    def step_inputs(step: str, rename: dict[str, str] | None = None) -> tuple[Output[str], Output[str]]:
        archive = rendered.apply(lambda fs: steps.archive_b64(files_for_step(fs, step), rename))
        digest = rendered.apply(lambda fs: step_digest(files_for_step(fs, step)))
        return archive, digest
    return step_inputs


def _relative_dir(path: Path) -> str:
    """`path` relative to where the program runs (the project directory under `pulumi up`: ".")."""
    import os

    try:
        return os.path.relpath(path) or "."
    except ValueError:  # another drive (Windows): nothing relative exists
        return str(path)


class NodeChain:
    """One node's remote commands: wait and retire first (created for both nodes before either is
    provisioned, because each node's firewall, HAProxy and keepalived wait for the peer's retire),
    then `provision`: bootstrap -> token/failover/firewall -> app -> HAProxy -> keepalived."""

    def __init__(self, *, name: str, node: str, settings: Settings, droplet: do.Droplet, peer: do.Droplet | None,
                 host_key: Output[str], provision_key: Output[str], parent: pulumi.Resource) -> None:
        s = settings
        self.name, self.node, self.settings, self.droplet, self.peer, self.parent = name, node, s, droplet, peer, parent
        self.paths = NodePaths()

        def connection(dial_error_limit: int) -> command.remote.ConnectionArgs:
            return command.remote.ConnectionArgs(
                host=droplet.ipv4_address, user=PROVISION_USER, private_key=Output.secret(provision_key),
                dial_error_limit=dial_error_limit, per_dial_timeout=10,
                # Pinned: the key the stack generated and cloud-init installed, never whatever answers.
                host_key=host_key,
            )

        # A fresh droplet's sshd comes up after ~30-60 s; the default 10 dial attempts give up after
        # ~11 s. The first step retries without limit, bounded by its timeout; later ones give up.
        self.conn = connection(-1)
        self.steady_conn = connection(20)
        self.wait = command.remote.Command(
            f"{name}-wait", connection=self.conn, create=steps.wait_command(),
            triggers=[droplet.id],
            opts=ResourceOptions(parent=parent, custom_timeouts=pulumi.CustomTimeouts(create="15m", update="15m")),
        )
        # Replaced only with the droplet (its ID is the one trigger). Delete-before-replace: the old
        # droplet's services stop as soon as the new droplet answers SSH, before the survivor is
        # re-pointed at it (its steps depend on this), not when Pulumi deletes the old droplet at the end.
        if peer is None:  # an app worker: nothing on it can fight over the reserved IP
            self.retire = None
            return
        self.retire = command.remote.Command(
            f"{name}-retire", connection=self.steady_conn, create=steps.retire_armed_command(),
            delete=steps.retire_command(self.paths), triggers=[droplet.id],
            opts=ResourceOptions(parent=parent, depends_on=[self.wait], delete_before_replace=True),
        )

    def _secret_file(self, step: str, path: str, content: pulumi.Input[str], mode: str = "0600") -> command.remote.Command:
        """Write `content` to `path` on the node, root and `mode` from the first byte, via stdin only."""
        secret = Output.secret(content)
        return command.remote.Command(
            f"{self.name}-{step}", connection=self.steady_conn, create=steps.secret_file_command(path, mode=mode),
            stdin=secret, triggers=[self.droplet.id, secret.apply(steps.digest)],
            opts=ResourceOptions(parent=self.parent, depends_on=[self.bootstrap]),
        )

    def _bootstrap(self, repo_root: Path) -> None:
        bootstrap_script = (repo_root / "scripts" / "node-bootstrap.sh").read_text()
        self.bootstrap = command.remote.Command(
            f"{self.name}-bootstrap", connection=self.steady_conn, create=steps.bootstrap_command(),
            stdin=bootstrap_script, triggers=[self.droplet.id, steps.digest(bootstrap_script)],
            opts=ResourceOptions(parent=self.parent, depends_on=[self.wait],
                                 custom_timeouts=pulumi.CustomTimeouts(create="20m", update="20m")),
        )

    def _firewall(self, step_inputs, after: list[pulumi.Resource]) -> None:
        archive, self.firewall_digest = step_inputs(STEP_FIREWALL)
        self.firewall = command.remote.Command(
            f"{self.name}-firewall", connection=self.steady_conn,
            create=steps.firewall_command(self.paths, self.settings.admin_cidrs),
            stdin=archive, triggers=[self.droplet.id, self.firewall_digest],
            opts=ResourceOptions(parent=self.parent, depends_on=[self.bootstrap, *after]),
        )

    def _app(self, step_inputs, *, app_env: Output[str], db_ca: Output[str] | None, app_deps: list[pulumi.Resource],
             app_after: list[pulumi.Resource], db_grants: GrantsStep | None) -> None:
        """Registry login, app.env, the database's CA (and grants), then compose up: the app step."""
        s, name, droplet, parent, steady_conn = self.settings, self.name, self.droplet, self.parent, self.steady_conn
        self.registry = None
        if s.registry:
            reg = s.registry
            self.registry = command.remote.Command(
                f"{name}-registry-login", connection=steady_conn,
                create=steps.registry_login_command(reg.server, reg.username),
                stdin=Output.secret(reg.password.reveal()),
                triggers=[droplet.id, reg.server, reg.username, Output.secret(steps.digest(reg.password.reveal()))],
                opts=ResourceOptions(parent=parent, depends_on=[self.bootstrap]),
            )
            app_deps.append(self.registry)
        self.app_env = self._secret_file("app-env", self.paths.app_env, app_env)
        # The database's CA (public; empty without a managed cluster), read by the app's container.
        self.db_ca = self._secret_file("db-ca", DB_CA_FILE, db_ca if db_ca is not None else "", mode="0644")
        # After the firewall: its forward chain keeps the containers from the metadata service.
        app_deps += [self.app_env, self.db_ca, self.firewall]
        self.db_grants = None
        if db_grants is not None:
            # Runs here because the cluster trusts only the droplets; doadmin's password on stdin only.
            self.db_grants = command.remote.Command(
                f"{name}-db-grants", connection=steady_conn, create=db_grants.create, stdin=db_grants.stdin,
                triggers=[droplet.id, *db_grants.triggers],
                opts=ResourceOptions(parent=parent, depends_on=[self.bootstrap, self.db_ca, *db_grants.depends_on]),
            )
            app_deps.append(self.db_grants)
        archive, self.app_digest = step_inputs(STEP_APP)
        self.app = command.remote.Command(
            f"{name}-app", connection=steady_conn, create=steps.app_command(self.paths, COMPOSE_PROJECT), stdin=archive,
            triggers=[droplet.id, self.app_digest],
            opts=ResourceOptions(parent=parent, depends_on=app_deps + app_after,
                                 custom_timeouts=pulumi.CustomTimeouts(create="20m", update="20m")),
        )

    def provision_worker(self, *, pair: list[do.Droplet], app_env: Output[str], repo_root: Path,
                         db_ca: Output[str] | None, app_after: list[pulumi.Resource]) -> None:
        """An app worker: wait -> bootstrap -> firewall -> app, the pair's own step functions; no
        token, failover, HAProxy or keepalived. Its nftables admit the app port from `pair` only."""
        s, node, droplet = self.settings, self.node, self.droplet

        def facts(values: list) -> NodeFacts:
            droplet_id, private_ip, *pair_ips = values
            return NodeFacts(
                name=node, droplet_id=int(droplet_id), private_ip=private_ip, peer_private_ip=pair_ips[0],
                reserved_ip="", priority=0, router_id=s.vrrp_router_id, private_interface=s.private_interface,
                admin_cidrs=s.admin_cidrs, http_ports=s.http_ports, health_url=s.health_url,
                compose_project=COMPOSE_PROJECT, paths=self.paths, app_image=s.app_image, app_version=s.app_version,
                haproxy=HaproxyFacts(public_port=s.app_port, backend_port=s.app_backend_port, serve=s.serve,
                                     check_path=s.app_check_path),
                pair_private_ips=tuple(pair_ips),
            )

        rendered: Output[list[NodeFile]] = Output.all(
            droplet.id, droplet.ipv4_address_private, *[d.ipv4_address_private for d in pair],
        ).apply(lambda v: render_worker_files(facts(v), compose_text=s.compose.text, repo_root=repo_root))
        step_inputs = _step_inputs(rendered)
        self._bootstrap(repo_root)
        self.token = self.alert_webhook = self.failover = self.haproxy = self.keepalived = None
        self.failover_digest = self.haproxy_digest = self.keepalived_digest = ""
        self._firewall(step_inputs, [])
        self._app(step_inputs, app_env=app_env, db_ca=db_ca, app_deps=[self.bootstrap], app_after=app_after,
                  db_grants=None)
        self._finish()

    def start_keepalived(self, peer_keepalived: command.remote.Command) -> None:
        """keepalived starts after this node's and the peer's keepalived steps. On a replacement the
        survivor's step (reload) points its unicast_peer at the new node first: a new node started
        before it would hear no advert, become MASTER and try to take the IP. No cycle: the
        configuration steps never wait for a start step. Re-run with every configuration change (a
        no-op while keepalived runs; it starts one that was stopped, as the step used to)."""
        self.keepalived_start = command.remote.Command(
            f"{self.name}-keepalived-start", connection=self.steady_conn, create=steps.keepalived_start_command(),
            triggers=[self.droplet.id, self.keepalived_digest],
            opts=ResourceOptions(parent=self.parent, depends_on=[self.keepalived, peer_keepalived]),
        )
        self.commands.append(self.keepalived_start)

    def _finish(self) -> None:
        self.commands = [c for c in (self.wait, self.retire, self.bootstrap, self.token, self.alert_webhook, self.failover,
                                     self.firewall, self.registry, self.app_env, self.db_ca, self.db_grants, self.app,
                                     self.haproxy, self.keepalived) if c is not None]
        self.digest = Output.all(self.failover_digest, self.firewall_digest, self.keepalived_digest,
                                 self.app_digest, self.haproxy_digest).apply(lambda ds: steps.digest(*ds))

    def provision(self, *, reserved_ip: Output[str], app_env: Output[str], repo_root: Path,
                  app_after: list[pulumi.Resource], peer_retire: pulumi.Resource,
                  db_grants: GrantsStep | None = None, db_ca: Output[str] | None = None,
                  workers: list[Output[str]] | None = None) -> None:
        s, name, node, droplet, peer, parent = self.settings, self.name, self.node, self.droplet, self.peer, self.parent
        paths, steady_conn = self.paths, self.steady_conn

        secret_file = self._secret_file
        def facts(values: list) -> NodeFacts:
            droplet_id, private_ip, peer_ip, rip, peer_public_ip, *worker_ips = values
            return NodeFacts(
                name=node, droplet_id=int(droplet_id), private_ip=private_ip, peer_private_ip=peer_ip,
                peer_public_ip=peer_public_ip,
                reserved_ip=rip, priority=PRIORITY[node], router_id=s.vrrp_router_id,
                private_interface=s.private_interface, admin_cidrs=s.admin_cidrs, http_ports=s.http_ports,
                health_url=s.health_url, profile=PROFILES[s.failover_profile], compose_project=COMPOSE_PROJECT,
                paths=paths, app_image=s.app_image, app_version=s.app_version,
                haproxy=HaproxyFacts(public_port=s.app_port, backend_port=s.app_backend_port,
                                     serve=s.serve, check_path=s.app_check_path, workers=tuple(worker_ips)),
            )

        assert peer is not None  # noqa: S101 - a pair node has a peer (workers use provision_worker)
        rendered: Output[list[NodeFile]] = Output.all(
            droplet.id, droplet.ipv4_address_private, peer.ipv4_address_private, reserved_ip, peer.ipv4_address,
            *(workers or []),
        ).apply(lambda v: render_node_files(facts(v), compose_text=s.compose.text, repo_root=repo_root))
        step_inputs = _step_inputs(rendered)
        self._bootstrap(repo_root)
        self.token = secret_file("failover-token", paths.token_file, s.failover_token.reveal())
        # Always shipped, empty when alerts are off: turning alerts off also removes the old URL.
        webhook = s.alert_webhook_url.reveal() if s.alert_webhook_url else ""
        self.alert_webhook = secret_file("alert-webhook", paths.alert_webhook_file, webhook)
        archive, self.failover_digest = step_inputs(STEP_FAILOVER)
        self.failover = command.remote.Command(
            f"{name}-failover", connection=steady_conn, create=steps.failover_command(paths), stdin=archive,
            triggers=[droplet.id, self.failover_digest],
            opts=ResourceOptions(parent=parent, depends_on=[self.bootstrap, self.token, self.alert_webhook]),
        )
        # After the peer's retire: a replaced peer is stopped before VRRP from it is refused here.
        self._firewall(step_inputs, [peer_retire])
        self._app(step_inputs, app_env=app_env, db_ca=db_ca, app_deps=[self.bootstrap, self.failover],
                  app_after=app_after, db_grants=db_grants)
        # HAProxy after this node's app: on a node that ran the app on port 80 before HAProxy, the
        # app step moves it to appBackendPort first, so HAProxy can take port 80.
        archive, self.haproxy_digest = step_inputs(STEP_HAPROXY, steps.staging_path(paths.haproxy_cfg))
        self.haproxy = command.remote.Command(
            f"{name}-haproxy", connection=steady_conn, create=steps.haproxy_command(paths), stdin=archive,
            triggers=[droplet.id, self.haproxy_digest],
            opts=ResourceOptions(parent=parent, depends_on=[self.bootstrap, self.app, peer_retire]),
        )
        # keepalived last: its checks ask HAProxy's monitor whether this node can serve.
        archive, self.keepalived_digest = step_inputs(STEP_KEEPALIVED, steps.staging_path(paths.keepalived_conf))
        self.keepalived = command.remote.Command(
            f"{name}-keepalived", connection=steady_conn, create=steps.keepalived_command(paths), stdin=archive,
            triggers=[droplet.id, self.keepalived_digest],
            opts=ResourceOptions(parent=parent, depends_on=[self.failover, self.firewall, self.token, self.haproxy,
                                                                  peer_retire]),
        )
        self._finish()
