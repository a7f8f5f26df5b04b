"""What one node runs, rendered from plain values: one source of truth for the stack and the lab.

`render_node_files(facts)` returns every non-secret file a node needs (keepalived.conf, the
failover and health env files, the nftables ruleset, systemd units), each tagged with the
provisioning step that installs it. The stack calls it with the droplets' outputs; the lab calls
it with its namespaces' addresses and a path prefix. Pure: no Pulumi, no I/O except reading the
scripts in `scripts/` (`node_scripts`).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from infra.haproxy import HaproxyFacts, render_haproxy_cfg
from infra.profiles import PROFILES, Profile

REPO_ROOT = Path(__file__).resolve().parent.parent
# keepalived priority added while a node holds the reserved IP: larger than the gap between the
# two nodes' base priorities (150 / 100), so the holder always wins, and 150 + 100 stays <= 254.
HOLDER_WEIGHT = 100
# The droplets' metadata service (link-local); containers must not reach it.
METADATA_ADDR = "169.254.169.254"
# Debian's prometheus-node-exporter (its textfile collector serves the scripts' .prom files):
# admin CIDRs and the peer only, like HAProxy's exporter.
NODE_EXPORTER_PORT = 9100
SCRIPT_NAMES = ("mt-deploy", "mt-failover", "mt-health", "mt-healthwatch", "mt_observe.py")
# A shutdown of the holder waits at most this long for the peer to take the reserved IP (a move is
# ~5 s at DigitalOcean, more with 422/429 retries); systemd's stop timeout for the handover unit
# leaves a margin on top, so the handover always ends on its own terms and says how.
HANDOVER_TIMEOUT_S = 30
HANDOVER_STOP_MARGIN_S = 15
HANDOVER_UNIT = "minitwit-ha-handover.service"
# systemd reads drop-ins of docker-.scope.d for every unit named docker-*.scope (Docker's containers).
CONTAINER_SCOPES_DROPIN = "docker-.scope.d/minitwit-ha-handover.conf"

# Provisioning steps (one remote command each); a file's step decides what re-runs when it changes.
STEP_FAILOVER = "failover"      # scripts, env files, systemd units -> restart watcher and reconciler
STEP_FIREWALL = "firewall"      # nftables ruleset -> nft -c, nft -f
STEP_KEEPALIVED = "keepalived"  # keepalived.conf -> keepalived -t, reload
STEP_APP = "app"                # compose file -> docker compose pull/up
STEP_HAPROXY = "haproxy"        # haproxy.cfg -> haproxy -c, swap in, reload (hitless)


@dataclass(frozen=True)
class NodePaths:
    """Where things live on a node. `root` is empty on a droplet; the lab gives each node a prefix."""

    root: str = ""

    def _p(self, path: str) -> str:
        return f"{self.root}{path}"

    @property
    def libexec(self) -> str:
        return self._p("/usr/libexec/minitwit-ha")

    @property
    def etc(self) -> str:
        return self._p("/etc/minitwit-ha")

    @property
    def failover_env(self) -> str:
        return f"{self.etc}/failover.env"

    @property
    def health_env(self) -> str:
        return f"{self.etc}/health.env"

    @property
    def token_file(self) -> str:
        return f"{self.etc}/do-token"

    @property
    def alert_webhook_file(self) -> str:
        return f"{self.etc}/alert-webhook"  # root 0600 like the token: the URL is a credential

    @property
    def metrics_dir(self) -> str:
        return self._p("/var/lib/prometheus/node-exporter")  # Debian's textfile collector directory

    @property
    def keepalived_conf(self) -> str:
        return self._p("/etc/keepalived/keepalived.conf")

    @property
    def haproxy_cfg(self) -> str:
        return self._p("/etc/haproxy/haproxy.cfg")

    @property
    def haproxy_admin_socket(self) -> str:
        return self._p("/run/haproxy/admin.sock")

    @property
    def nftables_conf(self) -> str:
        return self._p("/etc/nftables.conf")

    @property
    def app_dir(self) -> str:
        return self._p("/srv/minitwit")

    @property
    def compose_file(self) -> str:
        return f"{self.app_dir}/compose.yaml"

    @property
    def app_env(self) -> str:
        return f"{self.app_dir}/app.env"

    @property
    def compose_dotenv(self) -> str:
        """compose's own `.env` (variables for ${...} in the compose file); mt-deploy writes the version."""
        return f"{self.app_dir}/.env"

    @property
    def stack_env(self) -> str:
        """The stack's compose variables (the node's VPC address, the backend port), merged into `.env`."""
        return f"{self.app_dir}/stack.env"

    @property
    def state_dir(self) -> str:
        return self._p("/run/minitwit-ha")

    @property
    def keepalived_pidfile(self) -> str:
        return self._p("/run/keepalived.pid")  # Debian's and Ubuntu's default

    @property
    def track_dir(self) -> str:
        return self._p("/run/minitwit-ha-health")

    @property
    def holder_file(self) -> str:
        return f"{self.state_dir}/holder"

    @property
    def track_file(self) -> str:
        return f"{self.track_dir}/status"

    @property
    def lib_dir(self) -> str:
        return self._p("/var/lib/minitwit-ha")

    @property
    def maintenance_flag(self) -> str:
        return f"{self.lib_dir}/maintenance"

    @property
    def tmpfiles_conf(self) -> str:
        return self._p("/etc/tmpfiles.d/minitwit-ha.conf")

    @property
    def systemd_dir(self) -> str:
        return self._p("/etc/systemd/system")

    def script(self, name: str) -> str:
        return f"{self.libexec}/{name}"


@dataclass(frozen=True)
class NodeFacts:
    """Everything that differs between nodes and stacks, as plain values."""

    name: str                      # primary | standby
    droplet_id: int
    private_ip: str
    peer_private_ip: str
    reserved_ip: str
    priority: int
    router_id: int
    private_interface: str
    admin_cidrs: tuple[str, ...]
    http_ports: tuple[int, ...]
    health_url: str
    profile: Profile = PROFILES["fast"]
    api_url: str = "https://api.digitalocean.com"
    metadata_url: str = "http://169.254.169.254/metadata/v1"
    compose_project: str = "minitwit"
    with_compose: bool = True      # false: no compose services check (a node without compose)
    script_user: str = "keepalived_script"
    docker_cmd: str = "docker"     # the docker CLI the node scripts call (the lab: its stand-in)
    paths: NodePaths = field(default_factory=NodePaths)
    log_file: str = ""             # extra log file for mt-failover (the lab); syslog is always used
    peer_public_ip: str = ""       # the peer's public IPv4: is it still serving through the reserved IP?
    app_image: str = ""            # MINITWIT_IMAGE for the compose file; empty: no stack.env (the lab)
    app_version: str = ""          # MINITWIT_VERSION a node without one starts with (appVersion)
    allow_insecure_http: bool = False  # the lab only: its fake API and webhook sink speak plain http
    # HAProxy in front of the app (the stack always sets it). None: the app owns the public port
    # and keepalived checks the app itself (the lab until it runs HAProxy).
    haproxy: HaproxyFacts | None = None
    # Set only on an app worker (appWorkers): the two pair nodes' private IPs, the only sources its
    # app port admits (their HAProxy). A worker runs the app alone: no keepalived, no reserved IP.
    pair_private_ips: tuple[str, ...] = ()

    @property
    def is_worker(self) -> bool:
        return bool(self.pair_private_ips)


@dataclass(frozen=True)
class NodeFile:
    path: str
    mode: int
    content: str
    step: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


def _header(facts: NodeFacts, what: str, comment: str = "#") -> str:
    return (f"{comment} {what} for minitwit-ha node \"{facts.name}\" (droplet {facts.droplet_id}).\n"
            f"{comment} Rendered by infra/node.py from the stack's outputs; edits on the node are overwritten.\n")


# --------------------------------------------------------------------------------------------
# keepalived
# --------------------------------------------------------------------------------------------
def render_keepalived_conf(facts: NodeFacts) -> str:
    p = facts.profile
    paths = facts.paths
    ipaddress.ip_address(facts.private_ip)  # fail loudly on garbage rather than render it
    ipaddress.ip_address(facts.peer_private_ip)
    ipaddress.ip_address(facts.reserved_ip)
    health = paths.script("mt-health")
    failover = paths.script("mt-failover")
    fall_rise = ""
    if p.check_fall is not None:
        fall_rise += (f"    fall {p.check_fall}         # {p.check_fall} failed runs in a row before FAULT: "
                      "one slow answer is not an outage\n")
    if p.check_rise is not None:
        fall_rise += (f"    rise {p.check_rise}         # {p.check_rise} good runs in a row before leaving FAULT: "
                      "no flapping on one lucky answer\n")
    services = ""
    track_services = ""
    # With HAProxy in front, keepalived tracks whether this node can serve (HAProxy's monitor: it
    # runs and at least one app, local or the peer's, is UP), not the local app or its containers:
    # a crashed app is absorbed by HAProxy, and moving the reserved IP would only add an outage.
    serving = facts.haproxy is not None
    check_mode, check_what = ("serve", "This node can serve (HAProxy's monitor answers)") if serving else (
        "http", "The app answers on its health URL")
    if facts.with_compose and not serving:
        services = f"""
# Every service of the compose file is running. Needs the docker socket, which is root-equivalent,
# so this one script runs as root; it only reads (`docker compose ps`).
vrrp_script chk_services {{
    script "{health} services"
    user root
    interval 2     # whole seconds in keepalived 2.2.x; a dead sidecar is found within ~2-4 s
    timeout 5      # docker can be slow under load; a hung check counts as a failure after 5 s
    fall 2
    rise 2
}}
"""
        track_services = "        chk_services\n"
    watcher = ""
    track_file = ""
    if p.use_watcher:
        watched = "HAProxy's monitor URL" if serving else "the health URL"
        watcher = f"""
# The fast path. mt-healthwatch polls {watched} and the maintenance flag every
# {p.watch_interval_s} s and writes 0 (healthy) or the failing check's code here; keepalived re-reads
# the file the moment it changes (inotify), so a failed check reaches FAULT in about
# {p.watch_fall} x {p.watch_interval_s} s instead of whole-second script intervals.
track_file app_watch {{
    file "{paths.track_file}"
    weight 0       # weight 0: any non-zero value means FAULT
    init_file 1    # until the watcher has spoken, assume unhealthy (created only if missing)
}}
"""
        track_file = """
    track_file {
        app_watch
    }
"""
    holder = f"""
# 1 while the DigitalOcean API (the metadata service) says this droplet holds the reserved IP,
# else 0 (mt-failover keeps it current). Weighted so the holder always outranks the other node:
# when two MASTERs meet again (a healed VPC cut, a node back from a stall, both keepalived
# restarted), the one that keeps MASTER is the one traffic already reaches, and the IP stays put.
track_file reserved_ip_holder {{
    file "{paths.holder_file}"
    weight {HOLDER_WEIGHT}     # priority {facts.priority} + {HOLDER_WEIGHT} while holding (max 254)
    init_file 0    # until mt-failover has asked, assume not holding (created only if missing)
}}
"""
    track_file = track_file.replace("        app_watch\n", "        app_watch\n        reserved_ip_holder\n") if track_file \
        else """
    track_file {
        reserved_ip_holder
    }
"""
    advert_comment = (f"VRRPv{p.vrrp_version}: the peer is declared dead after 3 x {p.advert_int} s + skew "
                      f"(~{p.master_down_s:.2f} s)")
    return f"""{_header(facts, 'keepalived configuration', '#')}# Profile "{p.name}".
# Failover time = fault detection + VRRP takeover + the reserved-IP move (API).

global_defs {{
    router_id minitwit-ha-{facts.name}
    # Scripts run only when every directory on their path is root-owned and not writable by
    # others; they live in {paths.libexec} for that reason (Debian's /usr/local/bin is group staff).
    enable_script_security
    # Scripts run unprivileged unless they say otherwise.
    script_user {facts.script_user}
    # Accept adverts only from our unicast peer (the nftables ruleset also drops VRRP from anyone else).
    vrrp_check_unicast_src
}}

# {check_what} (and no maintenance flag). The slow, thorough
# path: a backstop if the watcher below is not running.
vrrp_script chk_app {{
    script "{health} {check_mode}"
    interval {p.check_interval}     # whole seconds in keepalived 2.2.x
    timeout {p.check_timeout}      # a hung check counts as a failure after {p.check_timeout} s
{fall_rise}}}

# A planned drain (rolling update, switchover): the maintenance flag makes this node step down.
vrrp_script chk_flag {{
    script "{health} flag"
    interval 1     # the watcher sees the flag within {p.watch_interval_s} s; this is the backstop
    fall 1         # a drain is deliberate: act on the first sight of the flag
    rise 1
}}
{services}{watcher}{holder}
vrrp_instance minitwit {{
    # Both nodes start BACKUP, and preempt: the holder of the reserved IP outranks the other node
    # by {HOLDER_WEIGHT} (track_file reserved_ip_holder), so a preemption only ever hands MASTER to
    # the node traffic already reaches. A recovered node never grabs the IP back (it does not hold
    # it, so it ranks lower), and a MASTER that does not hold the IP (after both keepalived
    # restarted, or a takeover that raced a recovery) yields to the holder without an IP move.
    state BACKUP
    # VRRP stays on the VPC interface; DigitalOcean Cloud Firewalls cannot pass it (IP protocol
    # 112), so the host nftables ruleset admits it from the peer only.
    interface {facts.private_interface}
    virtual_router_id {facts.router_id}
    priority {facts.priority}
    version {p.vrrp_version}
    advert_int {p.advert_int}   # {advert_comment}
    unicast_src_ip {facts.private_ip}
    unicast_peer {{
        {facts.peer_private_ip}
    }}
    # keepalived 2.2.7 refuses a VRRPv3 instance without a virtual address. The reserved IP as a
    # /32 on lo is bookkeeping only: DigitalOcean delivers reserved-IP traffic to the droplet's
    # anchor address, and the move itself is the API call made by the notify script below.
    virtual_ipaddress {{
        {facts.reserved_ip}/32 dev lo
    }}
    track_script {{
        chk_app
        chk_flag
{track_services}    }}{track_file}
    # One script for every transition (keepalived appends: TYPE NAME STATE PRIORITY). On MASTER it
    # assigns the reserved IP to this droplet through the API. Root: it reads the 0600 token.
    notify "{failover} notify" root
    # A MASTER hearing a lower-priority MASTER (a healed split brain) makes sure the IP is here.
    notify_master_rx_lower_pri "{failover} reclaim" root
}}
"""


# --------------------------------------------------------------------------------------------
# env files (no secrets: the token is its own 0600 file)
# --------------------------------------------------------------------------------------------
def render_failover_env(facts: NodeFacts) -> str:
    p = facts.profile
    paths = facts.paths
    lines = {
        "NODE_NAME": facts.name,
        "RESERVED_IP": facts.reserved_ip,
        "DROPLET_ID": str(facts.droplet_id),
        "DO_API_URL": facts.api_url.rstrip("/"),
        "METADATA_URL": facts.metadata_url.rstrip("/"),
        "TOKEN_FILE": paths.token_file,
        "STATE_DIR": paths.state_dir,
        "LOG_DIR": paths.lib_dir,
        "LOG_FILE": facts.log_file,
        "KEEPALIVED_PIDFILE": paths.keepalived_pidfile,
        "HTTP_TIMEOUT_S": "3",
        "ASSIGN_DEADLINE_S": "60",
        "RETRY_MODE": p.retry_mode,
        "BACKOFF_BASE_S": p.backoff_base_s,
        "BACKOFF_MAX_S": p.backoff_max_s,
        "RETRY_FIXED_S": str(p.retry_fixed_s),
        "RETRY_MAX_ATTEMPTS": str(p.retry_max_attempts),
        "POLL_INTERVAL_S": "0.2",
        "RECONCILE_INTERVAL_S": p.reconcile_interval_s,
        "HOLDER_FILE": paths.holder_file,
        # The peer is probed before the IP moves (mt-failover's class Peer says why): over the VPC
        # right after a takeover, and at its public address by a MASTER that does not hold the IP.
        "PEER_PRIVATE_IP": facts.peer_private_ip,
        "PEER_PUBLIC_IP": facts.peer_public_ip,
        "PEER_PORT": str(facts.http_ports[0]),
        "PEER_HEALTH_PATH": urlsplit(facts.health_url).path or "/",
        "PROBE_CONNECT_TIMEOUT_S": "0.05",  # a live peer on the VPC answers a SYN in well under 1 ms
        "PROBE_RESPONSE_TIMEOUT_S": "1.5",  # connected but silent this long: its processes are gone
        "PROBE_SLOW_S": "0.15",             # an answer slower than this came after a stall
        "STALL_GRACE_S": "0.8",             # time for a peer back from a stall to reclaim MASTER
        "METRICS_DIR": paths.metrics_dir,
        "TRACK_FILE": paths.track_file,
        "ALERT_WEBHOOK_FILE": paths.alert_webhook_file,
        "TOKEN_CHECK_INTERVAL_S": "60",
        "ALLOW_INSECURE_HTTP": "1" if facts.allow_insecure_http else "0",
        # `handover` (a shutdown of the holder): the drain flag health.env's watcher reacts to, and
        # its bound (the unit's TimeoutStopSec is larger).
        "MAINTENANCE_FLAG": paths.maintenance_flag,
        "HANDOVER_TIMEOUT_S": str(HANDOVER_TIMEOUT_S),
        "HANDOVER_POLL_S": "0.2",  # a holder's reboot waits on this poll (plus ~0.3 s per API call)
    }
    return _env_file(_header(facts, "Failover settings (read by mt-failover)"), lines)


def render_health_env(facts: NodeFacts) -> str:
    p = facts.profile
    paths = facts.paths
    lines = {
        "HEALTH_URL": facts.health_url,
        # keepalived's checks (mt-healthwatch, `mt-health serve`): HAProxy's monitor when it fronts
        # the app; empty: they check HEALTH_URL, the app itself.
        "SERVE_URL": facts.haproxy.monitor_url if facts.haproxy and not facts.is_worker else "",
        "HEALTH_TIMEOUT_S": "1",
        "WATCH_INTERVAL_S": p.watch_interval_s,
        "WATCH_TIMEOUT_S": "0.5",
        "WATCH_FALL": str(p.watch_fall),
        "WATCH_RISE": str(p.watch_rise),
        "WATCH_REFRESH_S": "2",
        "COMPOSE_FILE": paths.compose_file if facts.with_compose else "",
        "COMPOSE_PROJECT": facts.compose_project,
        "DOCKER": facts.docker_cmd,
        "MAINTENANCE_FLAG": paths.maintenance_flag,
        "TRACK_FILE": paths.track_file,
    }
    return _env_file(_header(facts, "Health check settings (read by mt-health and mt-healthwatch)"), lines)


def render_stack_env(facts: NodeFacts) -> str | None:
    """The compose variables the stack owns: the image (appImage), the node's VPC address and the
    backend port (HAProxy). compose reads `${...}` only from `.env`, where the rollout keeps
    MINITWIT_VERSION, so the app step merges these keys in rather than replacing the file.
    None when the stack owns none (the lab without HAProxy)."""
    lines = {}
    if facts.app_image:
        lines["MINITWIT_IMAGE"] = facts.app_image
    if facts.app_version:
        # Only a seed: the app step keeps a MINITWIT_VERSION the rollout already wrote (steps.SEED_KEYS).
        lines["MINITWIT_VERSION"] = facts.app_version
    if facts.haproxy is not None:
        lines["MTHA_PRIVATE_IPV4"] = facts.private_ip
        lines["MTHA_APP_BACKEND_PORT"] = str(facts.haproxy.backend_port)
    if not lines:
        return None
    return _env_file(_header(facts, "Compose variables set by the stack (merged into .env by the app step)"), lines)


def _env_file(header: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        if any(c.isspace() for c in value) or "#" in value:
            raise ValueError(f"{key}={value!r}: env file values must not contain spaces or '#'")
    return header + "".join(f"{k}={v}\n" for k, v in values.items())


# --------------------------------------------------------------------------------------------
# nftables
# --------------------------------------------------------------------------------------------
def render_nftables(facts: NodeFacts) -> str:
    admins = [ipaddress.ip_network(c) for c in facts.admin_cidrs]
    v4 = ", ".join(str(n) for n in admins if n.version == 4)
    v6 = ", ".join(str(n) for n in admins if n.version == 6)
    ports = ", ".join(str(p) for p in sorted(set(facts.http_ports)))
    admin_sets = ""
    admin_rules = ""
    exporters = ([NODE_EXPORTER_PORT] if facts.haproxy is None or facts.is_worker
                 else [facts.haproxy.metrics_port, NODE_EXPORTER_PORT])
    admin_ports = _nft_ports([22, *exporters])
    if v4:
        admin_sets += _nft_set("admin_v4", "ipv4_addr", v4)
        admin_rules += f"        tcp dport {admin_ports} ip saddr @admin_v4 accept\n"
    if v6:
        admin_sets += _nft_set("admin_v6", "ipv6_addr", v6)
        admin_rules += f"        tcp dport {admin_ports} ip6 saddr @admin_v6 accept\n"
    peer = f'iifname "{facts.private_interface}" ip saddr {facts.peer_private_ip}'
    peer_rules = ("        # The exporters also for the peer over the VPC (it can scrape or check this node).\n"
                  f"        tcp dport {_nft_ports(exporters)} {peer} accept\n")
    peer_forward = ""
    vrrp = ("        # VRRP only from the peer, only on the VPC interface; checked before conntrack so that no\n"
            "        # other speaker, however its packets are classified, reaches keepalived.\n"
            f'        meta l4proto vrrp iifname "{facts.private_interface}" ip saddr {facts.peer_private_ip} accept\n'
            "        meta l4proto vrrp counter drop\n")
    public_in = f"        # The app, from anywhere.\n        tcp dport {{ {ports} }} accept\n"
    public_forward = ("        # The app's published ports (Docker's DNAT to a container): HTTP(S) and appPort from anywhere.\n"
                      f"        ct status dnat meta l4proto tcp ct original proto-dst {{ {ports} }} accept\n")
    if facts.is_worker:
        # An app worker: no VRRP, no public port. Its app only for the pair's HAProxy over the VPC.
        h = facts.haproxy or HaproxyFacts()
        pair = f'iifname "{facts.private_interface}" ip saddr {{ {", ".join(facts.pair_private_ips)} }}'
        vrrp = ("        # No keepalived here: VRRP falls to the policy like everything else.\n"
                "        meta l4proto vrrp counter drop\n")
        peer_rules = ("        # The app's backend port only for the two pair nodes' HAProxy, over the VPC: a worker\n"
                      "        # serves nobody directly, and never the internet.\n"
                      f"        tcp dport {h.backend_port} {pair} accept\n")
        public_in = public_forward = ""
        peer_forward = ("        # Docker's DNAT of the backend port on the VPC address: the pair's HAProxy only.\n"
                        f"        ct state new ct status dnat meta l4proto tcp ct original proto-dst {h.backend_port} "
                        f"{pair} accept\n")
    elif facts.haproxy is not None:
        h = facts.haproxy
        peer_rules = ("        # The exporters also for the peer; the app's backend port only for the peer's HAProxy\n"
                      "        # over the VPC (its fallback to this node's app): everyone else reaches the app only\n"
                      "        # through HAProxy.\n"
                      f"        tcp dport {_nft_ports([h.backend_port, *exporters])} {peer} accept\n")
        peer_forward = ("        # Docker's DNAT of the backend port on the VPC address: the peer's HAProxy only.\n"
                        f"        ct state new ct status dnat meta l4proto tcp ct original proto-dst {h.backend_port} "
                        f"{peer} accept\n")
    return f"""#!/usr/sbin/nft -f
{_header(facts, 'Host firewall')}#
# Why on the host: DigitalOcean Cloud Firewalls filter only TCP, UDP and ICMP and also apply to
# VPC traffic, so they cannot pass VRRP (IP protocol 112). Only this table is replaced; Docker's
# own iptables-nft tables are left alone.
table inet minitwit_ha
delete table inet minitwit_ha

table inet minitwit_ha {{
{admin_sets}
    chain input {{
        type filter hook input priority filter; policy drop;
        iif "lo" accept
{vrrp}        ct state established,related accept
        ct state invalid drop
        # ICMP errors keep TCP working (path MTU); echo is rate-limited.
        ip protocol icmp icmp type {{ destination-unreachable, time-exceeded, parameter-problem }} accept
        ip protocol icmp icmp type echo-request limit rate 10/second accept
        meta l4proto ipv6-icmp icmpv6 type {{ destination-unreachable, packet-too-big, time-exceeded,
            parameter-problem, nd-neighbor-solicit, nd-neighbor-advert, nd-router-advert }} accept
        # SSH only from the admin CIDRs (and so only they can provision or roll out); the metrics
        # exporters (node-exporter, HAProxy's) too: they tell an attacker the pair's state.
{admin_rules}{peer_rules}{public_in}        counter comment "dropped by policy"
    }}

    chain forward {{
        # Drop by default: this chain runs before Docker's own (priority filter - 10), and a drop
        # here is final, so the node forwards only what is listed below whatever Docker version
        # (or snapshot image) put its rules in. Locally generated traffic (HAProxy to the app on
        # 127.0.0.1, the node's own calls) never passes a forward hook.
        type filter hook forward priority filter - 10; policy drop;
        ct state invalid drop
        # Containers never reach the metadata service: it hands out the droplet's user data and
        # identity to whoever asks. (mt-failover, on the host itself, still does.)
        ip daddr {METADATA_ADDR} counter drop
        ct state established,related accept
{public_forward}{peer_forward}        # What the containers open themselves (the database over the VPC, DNS, registries):
        # from Docker's bridges only (docker0, compose's br-*).
        iifname "docker0" accept
        iifname "br-*" accept
        counter comment "dropped by policy"
    }}
}}
"""


def _nft_ports(ports: list[int]) -> str:
    """One port bare, several as an anonymous set (nft's own syntax for either)."""
    return str(ports[0]) if len(ports) == 1 else "{ " + ", ".join(map(str, ports)) + " }"


def _nft_set(name: str, kind: str, elements: str) -> str:
    return f"    set {name} {{\n        type {kind}\n        flags interval\n        elements = {{ {elements} }}\n    }}\n"


# --------------------------------------------------------------------------------------------
# systemd units
# --------------------------------------------------------------------------------------------
def render_units(facts: NodeFacts) -> dict[str, str]:
    paths = facts.paths
    watch = f"""# minitwit-ha: the fast health watcher feeding keepalived's track_file.
[Unit]
Description=minitwit-ha health watcher (keepalived track_file)
Before=keepalived.service

[Service]
Type=simple
User={facts.script_user}
Group={facts.script_user}
EnvironmentFile=-{paths.health_env}
RuntimeDirectory=minitwit-ha-health
RuntimeDirectoryMode=0755
# Keep the track file across watcher restarts: keepalived must not see it vanish.
RuntimeDirectoryPreserve=yes
ExecStart={paths.script('mt-healthwatch')}
Restart=always
RestartSec=1
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
ReadWritePaths={paths.track_dir}

[Install]
WantedBy=multi-user.target
"""
    reconcile = f"""# minitwit-ha: while this node is MASTER, keep the reserved IP on it (heals a split brain).
[Unit]
Description=minitwit-ha reserved-IP reconciler
After=network-online.target keepalived.service
Wants=network-online.target

[Service]
Type=simple
ExecStart={paths.script('mt-failover')} reconcile
Restart=always
RestartSec=2
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
# "-": a node without node-exporter's directory still runs (metrics are then skipped, logged once).
ReadWritePaths={paths.state_dir} {paths.lib_dir} -{paths.metrics_dir}

[Install]
WantedBy=multi-user.target
"""
    handover = f"""# minitwit-ha: a shutdown or reboot of the holder hands the reserved IP over first (#16).
[Unit]
Description=minitwit-ha reserved-IP handover at shutdown
# systemd stops units in the reverse order it starts them: After= everything that serves or
# decides means this unit's ExecStop runs (and ends) before HAProxy, the app (docker), keepalived,
# the watcher, the reconciler, the network or DNS are stopped, so this node keeps answering while
# the peer takes the IP.
After=network-online.target nss-lookup.target nftables.service docker.service haproxy.service
After=keepalived.service minitwit-ha-healthwatch.service minitwit-ha-reconcile.service
Wants=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
Environment=MT_FAILOVER_ENV={paths.failover_env}
# At boot: remove a drain flag a handover left when it was killed (never an operator's drain).
# "-": even if that fails the unit must become active, or its ExecStop would never run.
ExecStart=-{paths.script('mt-failover')} handover --release
# Only the holder, only to a peer that answers; waits at most HANDOVER_TIMEOUT_S={HANDOVER_TIMEOUT_S}
# (failover.env) for the API to name the peer and the peer to answer, then lets the shutdown go on.
ExecStop={paths.script('mt-failover')} handover
TimeoutStopSec={HANDOVER_TIMEOUT_S + HANDOVER_STOP_MARGIN_S}
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
# The drain flag lives in {paths.lib_dir}.
ReadWritePaths={paths.state_dir} {paths.lib_dir}

[Install]
WantedBy=multi-user.target
"""
    keepalived_dropin = f"""# minitwit-ha: start keepalived after the firewall and the watcher it reads.
[Unit]
After=nftables.service minitwit-ha-healthwatch.service
Wants=minitwit-ha-healthwatch.service

[Service]
# The holder weight as the API's metadata says it now, before keepalived reads it: a node stopped
# while the IP moved away must not start with the old holder's priority and preempt the new holder.
ExecStartPre=-{paths.script('mt-failover')} holder
"""
    # Docker's containers run in transient scopes, docker-<id>.scope in system.slice (the systemd
    # cgroup driver, Docker's default on cgroup v2). A shutdown stops every unit in system.slice at
    # once unless ordered, so the app would die while the handover above still waits for the IP to
    # move, cutting the requests it holds. A prefix drop-in (docker-.scope.d) orders every container
    # scope Before= the handover unit: stopped in reverse, they stop only once the handover is done.
    container_scopes = f"""# minitwit-ha: Docker's container scopes (docker-<id>.scope) stop after the reserved-IP handover.
[Unit]
Before={HANDOVER_UNIT}
"""
    tmpfiles = f"""# minitwit-ha runtime and state directories (root-owned: keepalived's script security).
d {paths.state_dir} 0755 root root -
d {paths.lib_dir} 0755 root root -
"""
    return {
        f"{paths.systemd_dir}/minitwit-ha-healthwatch.service": watch,
        f"{paths.systemd_dir}/minitwit-ha-reconcile.service": reconcile,
        f"{paths.systemd_dir}/{HANDOVER_UNIT}": handover,
        f"{paths.systemd_dir}/keepalived.service.d/minitwit-ha.conf": keepalived_dropin,
        f"{paths.systemd_dir}/{CONTAINER_SCOPES_DROPIN}": container_scopes,
        paths.tmpfiles_conf: tmpfiles,
    }


# --------------------------------------------------------------------------------------------
# everything a node gets
# --------------------------------------------------------------------------------------------
def node_scripts(paths: NodePaths, repo_root: Path = REPO_ROOT) -> list[NodeFile]:
    """The same scripts/ files on every node, root-owned 0755."""
    return [
        NodeFile(paths.script(name), 0o755, (repo_root / "scripts" / name).read_text(), STEP_FAILOVER)
        for name in SCRIPT_NAMES
    ]


def render_node_files(facts: NodeFacts, compose_text: str | None = None,
                      repo_root: Path = REPO_ROOT) -> list[NodeFile]:
    paths = facts.paths
    files = node_scripts(paths, repo_root)
    files += [
        NodeFile(paths.failover_env, 0o644, render_failover_env(facts), STEP_FAILOVER),
        NodeFile(paths.health_env, 0o644, render_health_env(facts), STEP_FAILOVER),
    ]
    files += [NodeFile(path, 0o644, text, STEP_FAILOVER) for path, text in render_units(facts).items()]
    files.append(NodeFile(paths.nftables_conf, 0o644, render_nftables(facts), STEP_FIREWALL))
    files.append(NodeFile(paths.keepalived_conf, 0o644, render_keepalived_conf(facts), STEP_KEEPALIVED))
    if facts.haproxy is not None:
        files.append(NodeFile(paths.haproxy_cfg, 0o644, render_haproxy_cfg(facts), STEP_HAPROXY))
    return files + _app_files(facts, compose_text)


# What a worker's app step ships besides the compose files: the health check (the app step waits on
# `mt-health all`) and mt-deploy (a rollout's `deploy VERSION` there), which reads both env files.
WORKER_SCRIPTS = ("mt-deploy", "mt-health", "mt_observe.py")


def render_worker_files(facts: NodeFacts, compose_text: str | None = None,
                        repo_root: Path = REPO_ROOT) -> list[NodeFile]:
    """An app worker's files (facts.pair_private_ips set): the pair's renderers, without keepalived,
    HAProxy, units or token; everything but the firewall arrives with the app step."""
    if not facts.is_worker:
        raise ValueError(f"{facts.name}: a worker needs pair_private_ips (the two pair nodes' private IPs)")
    paths = facts.paths
    files = [NodeFile(paths.script(name), 0o755, (repo_root / "scripts" / name).read_text(), STEP_APP)
             for name in WORKER_SCRIPTS]
    files += [
        NodeFile(paths.failover_env, 0o644, render_failover_env(facts), STEP_APP),
        NodeFile(paths.health_env, 0o644, render_health_env(facts), STEP_APP),
        NodeFile(paths.nftables_conf, 0o644, render_nftables(facts), STEP_FIREWALL),
    ]
    return files + _app_files(facts, compose_text)


def _app_files(facts: NodeFacts, compose_text: str | None) -> list[NodeFile]:
    """The app step's files: the compose file and the compose variables the stack owns."""
    files = []
    if compose_text is not None:
        files.append(NodeFile(facts.paths.compose_file, 0o644, compose_text, STEP_APP))
    stack_env = render_stack_env(facts)
    if stack_env is not None:
        files.append(NodeFile(facts.paths.stack_env, 0o644, stack_env, STEP_APP))
    return files


def files_for_step(files: list[NodeFile], step: str) -> list[NodeFile]:
    return [f for f in files if f.step == step]


def step_digest(files: list[NodeFile]) -> str:
    """Content hash of a step's files: the step's trigger, so only changed steps re-run."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.path):
        h.update(f"{f.path}\0{f.mode:o}\0{f.sha256}\n".encode())
    return h.hexdigest()
