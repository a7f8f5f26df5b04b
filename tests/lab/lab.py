"""The lab: the stack's hosts on one machine, in Linux network namespaces.

    client  (the internet: traffic generator, the fake DigitalOcean API, the reserved IP's edge)
       |  br-inet 192.0.2.0/24 (in the switch namespace)
    primary ---- standby        each: keepalived, mt-healthwatch, mt-failover reconcile,
       |  br-vpc 198.51.100.0/24     the stand-in app, the node's nftables ruleset
      db (PostgreSQL)

Every address is from the documentation ranges; the reserved IP is 203.0.113.10. The nodes get
their files from the same renderer as the stack (infra/node.py), with a path prefix, and run the
same scripts. An assign at the fake API re-routes 203.0.113.10 in `client` to the chosen node's
public address (a DNAT map), which is how DigitalOcean's edge behaves.

State (PIDs, namespaces, paths) lives in $LAB_ROOT/state.json so `up`, `fault`, `status` and
`down` can be separate commands; `down` ends only the processes the lab recorded, by PID.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from infra.haproxy import SERVE_MODES, HaproxyFacts, worker_server
from infra.node import NodeFacts, NodePaths, render_node_files
from infra.profiles import PROFILES
from tests.support.pg import PgServer, missing_requirements

REPO = Path(__file__).resolve().parents[2]
LAB_ROOT = Path(os.environ.get("LAB_ROOT", "/run/mtha-lab"))
PREFIX = os.environ.get("LAB_PREFIX", "mtha")
NODES = ("primary", "standby")
# mt-failover's default DEAF_START_S (the stack does not override it): see Lab._past_deaf_start.
DEAF_START_S = 5.0
RESERVED_IP = "203.0.113.10"
API_ADDR, API_PORT = "192.0.2.2", 8080
CLIENT_ADDR = "192.0.2.100"
ADMIN_ADDR = "192.0.2.200"
ADMIN_CIDR = "192.0.2.192/26"
PUBLIC = {"primary": "192.0.2.11", "standby": "192.0.2.12"}
PRIVATE = {"primary": "198.51.100.11", "standby": "198.51.100.12"}
DB_ADDR, DB_PORT = "198.51.100.20", 5432
ROGUE_ADDR = "198.51.100.66"
# App workers (up --workers N): worker-1 at 198.51.100.31, worker-2 at .32, ...
WORKER_NET, WORKER_FIRST, WORKER_MAX, WORKER_ID = "198.51.100.", 31, 10, 410000031
WORKER_PUBLIC_NET = "192.0.2."   # a deployable worker's public address (sshd): 192.0.2.31, .32, ...
LAB_COMPOSE = "services:\n  minitwit:\n    image: lab/minitwit:${MINITWIT_VERSION:-v1}\n"
DROPLET_ID = {"primary": 410000001, "standby": 410000002}
PRIORITY = {"primary": 150, "standby": 100}
ROUTER_ID = 51
SCRIPT_USER = "nobody"  # exists on every Debian machine; droplets use keepalived_script
BACKEND_PORT = 5000  # the app behind each node's HAProxy (appBackendPort)
HEALTH_URL = f"http://127.0.0.1:{BACKEND_PORT}/latest"
BINARIES = ("ip", "nft", "keepalived", "haproxy", "curl", "runuser", "setpriv", "sshd", "ssh", "ssh-keygen", "sudo", "visudo",
            "prometheus", "prometheus-node-exporter")
DEPLOY_USER = "deploy"
EDGE_TABLE = "mtha_edge"
DB_CUT_TABLE = "mtha_dbcut"
# The fake API's timing: (seconds an assign action stays in-progress before the IP moves, seconds
# added to every API request). "realistic" is what the drill and the demo use by default:
# DigitalOcean says an assign takes "a few seconds" and the closest published figure (an AWS
# Elastic IP moved by keepalived) is 5-6 s; traffic keeps reaching the old holder meanwhile.
API_PRESETS = {"ideal": (0.0, 0.0), "realistic": (5.0, 0.3)}


FAULT_KINDS = ("app", "haproxy", "keepalived", "link", "vpc", "api", "freeze", "db")


class LabError(RuntimeError):
    """The lab cannot do what was asked; the message says why and what to do."""


def ns(role: str) -> str:
    return f"{PREFIX}-{role}"


def missing() -> str | None:
    """Why the lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, nftables, keepalived)"
    gone = [b for b in BINARIES if shutil.which(b) is None]
    if gone:
        return f"the lab needs {', '.join(gone)} (Debian: make setup-lab)"
    return missing_requirements()


def sh(*argv: str, check: bool = True, input: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input, timeout=timeout)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def in_ns(role: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns(role), *argv, **kw)


def link_veth(switch: str, host: str, inner: str, outer: str, bridge: str, addrs: list[str]) -> None:
    """A veth from namespace `host` (its end named `inner`, with `addrs`) to `bridge` in `switch`."""
    def run(where: str, *argv: str) -> None:
        sh("ip", "netns", "exec", where, *argv)

    sh("ip", "link", "add", outer, "netns", switch, "type", "veth", "peer", "name", inner, "netns", host)
    run(switch, "ip", "link", "set", outer, "master", bridge)
    run(switch, "ip", "link", "set", outer, "up")
    for addr in addrs:
        run(host, "ip", "addr", "add", addr, "dev", inner)
    run(host, "ip", "link", "set", inner, "up")


def moves_in(answer: subprocess.CompletedProcess, names: dict[int, str], since: float = 0.0,
             until: float | None = None) -> list[dict]:
    """The fake API's /_lab/moves answer as the drill counts moves: [{"t": completed (epoch),
    "requested": accepted (epoch), "from": node|None, "to": node}], completed within [since, until]."""
    moves = json.loads(answer.stdout) if answer.returncode == 0 and answer.stdout else []
    if isinstance(moves, dict):
        moves = moves.get("moves", [])
    return [{"t": m["completed_at"], "requested": m["requested_at"], "from": names.get(m["from"]),
             "to": names.get(m["to"])}
            for m in moves if m["completed_at"] >= since and (until is None or m["completed_at"] <= until)]


def scan_secrets(files, homes: set[Path], values: dict[str, str], extra: dict[str, str] | None = None) -> dict:
    """Search `files` (regular, not symlinks) and the `extra` texts for every secret value; only its
    homes may hold one, and those must be 0600 or stricter. The report the drill and tests read."""
    findings, scanned, bad_modes = [], 0, []
    for path in files:
        if not path.is_file() or path.is_symlink():
            continue
        if path in homes:
            if path.stat().st_mode & 0o077:
                bad_modes.append(f"{path} is {oct(path.stat().st_mode & 0o777)}")
            continue
        data = path.read_bytes()
        scanned += 1
        findings += [f"{what} in {path}" for what, value in values.items() if value.encode() in data]
    for name, text in (extra or {}).items():
        scanned += 1
        findings += [f"{what} in {name}" for what, value in values.items() if value in text]
    return {"files_scanned": scanned, "secrets": sorted(values), "findings": findings,
            "homes_not_0600": bad_modes, "clean": not findings and not bad_modes}


def transitions_in(logs: dict[str, str], since: float = 0.0, until: float | None = None) -> list[dict]:
    """The transitions in each node's transitions.log text within [since, until], oldest first:
    [{"t": epoch, "node", "from", "to"}] (mt-failover writes one JSON line per transition)."""
    out = []
    for node, text in logs.items():
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry["epoch"] >= since and (until is None or entry["epoch"] <= until):
                out.append({"t": entry["epoch"], "node": node, "from": entry.get("from"), "to": entry["to"]})
    return sorted(out, key=lambda e: e["t"])


def _starttime(pid: int) -> str | None:
    """The process's start time (to tell it from a later process with the same PID); None when it
    is gone or a zombie (exited, not yet reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


@dataclass
class Proc:
    key: str
    pid: int
    starttime: str | None
    log: str

    def alive(self) -> bool:
        return self.starttime is not None and _starttime(self.pid) == self.starttime


def node_root(node: str) -> Path:
    return LAB_ROOT / node


def node_paths(node: str) -> NodePaths:
    return NodePaths(root=str(node_root(node)))


class Lab:
    """A handle on the lab's state file; every method re-reads what it needs from there."""

    def __init__(self) -> None:
        self.state_file = LAB_ROOT / "state.json"
        self.state: dict = {}
        if self.state_file.exists():
            self.state = json.loads(self.state_file.read_text())

    # -- state ------------------------------------------------------------------------------
    def _save(self) -> None:
        LAB_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True))
        tmp.replace(self.state_file)

    @property
    def is_up(self) -> bool:
        return bool(self.state.get("up"))

    def procs(self) -> dict[str, Proc]:
        return {k: Proc(k, **v) for k, v in self.state.get("processes", {}).items()}

    # -- processes ----------------------------------------------------------------------------
    def spawn(self, key: str, role: str, argv: list[str], env: dict[str, str] | None = None,
              user: str | None = None, cwd: Path = REPO) -> Proc:
        """Start argv inside namespace `role`, detached, logging to $LAB_ROOT/logs/<key>.log."""
        logs = LAB_ROOT / "logs"
        logs.mkdir(mode=0o755, parents=True, exist_ok=True)
        log = logs / f"{key}.log"
        cmd = ["ip", "netns", "exec", ns(role)]
        if user:
            cmd += ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}", "--clear-groups", "--"]
        full_env = {"PATH": f"{LAB_ROOT}/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                    "PYTHONPATH": str(REPO), **(env or {})}
        with open(log, "ab") as fh:
            p = subprocess.Popen(cmd + argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                 env=full_env, cwd=cwd, start_new_session=True)
        time.sleep(0.02)
        proc = Proc(key, p.pid, _starttime(p.pid), str(log))
        self.state.setdefault("processes", {})[key] = {"pid": proc.pid, "starttime": proc.starttime,
                                                       "log": proc.log}
        self._save()
        return proc

    def stop(self, key: str, sig: int = signal.SIGTERM, timeout: float = 10.0, forget: bool = True) -> None:
        """End a process the lab started (checked by PID and start time), then forget it (unless
        `forget` is False: a helper process that must not write the lab's state, which its parent owns)."""
        proc = self.procs().get(key)
        if proc is None:
            return
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            deadline = time.monotonic() + timeout
            while proc.alive() and time.monotonic() < deadline:
                time.sleep(0.05)
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        # Reap it if it is our child (the CLI process that spawned it may be this one).
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(proc.pid, os.WNOHANG)
        if forget:
            self.state.get("processes", {}).pop(key, None)
            self._save()

    def app_pid(self, node: str) -> int | None:
        try:
            pid = int((node_root(node) / "run" / "minitwit-app.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"tests.lab.app" in cmdline else None

    # -- up -------------------------------------------------------------------------------------
    def up(self, profile: str = "fast", wait: bool = True, api: str = "realistic",
           api_action_s: float | None = None, api_latency_s: float | None = None,
           serve: str = "active-standby") -> None:
        """Build the lab. `api` picks the fake API's timing preset; the two seconds override it.
        `serve` is the stack's setting: HAProxy sends to the local app (active-standby) or both."""
        why = missing()
        if why:
            raise LabError(why)
        if self.state_file.exists():
            raise LabError(f"a lab is already up (or was interrupted): run `python -m tests.lab down` first "
                           f"(state: {self.state_file})")
        if profile not in PROFILES:
            raise LabError(f"unknown profile {profile!r}; use one of {', '.join(PROFILES)}")
        if serve not in SERVE_MODES:
            raise LabError(f"unknown serve mode {serve!r}; use one of {', '.join(SERVE_MODES)}")
        if api not in API_PRESETS:
            raise LabError(f"unknown API preset {api!r}; use one of {', '.join(API_PRESETS)}")
        action_s, latency_s = API_PRESETS[api]
        action_s = action_s if api_action_s is None else api_action_s
        latency_s = latency_s if api_latency_s is None else api_latency_s
        for what, value in (("--api-action-s", action_s), ("--api-latency-s", latency_s)):
            if not 0 <= value <= 60:
                raise LabError(f"{what} must be between 0 and 60 seconds, got {value}")
        LAB_ROOT.mkdir(mode=0o755, parents=True, exist_ok=True)
        os.chmod(LAB_ROOT, 0o755)
        self.state = {"up": False, "profile": profile, "namespaces": [], "processes": {},
                      "root": str(LAB_ROOT), "created": time.time(),
                      "api": {"preset": api, "action_s": action_s, "latency_s": latency_s}, "serve": serve}
        self._save()
        try:
            self._network()
            self._edge()
            self._database()
            self._api()
            self._alert_sink()  # before the nodes: their first MASTER alert is recorded too
            for node in NODES:
                self._node(node, profile)
            self._ssh()
            self._observability()
            self._outputs()
            self.state["up"] = True
            self._save()
            if wait:  # settled: one MASTER serving with the IP, the other BACKUP, no assign in flight
                self.wait_pair_ready(timeout=60)
        except BaseException:
            self.down()
            raise

    def _network(self) -> None:
        for role in ("sw", "client", "primary", "standby", "db", "rogue"):
            name = ns(role)
            if name in sh("ip", "netns", "list").stdout.split():
                raise LabError(f"network namespace {name} already exists (another lab?); "
                               f"remove it or set LAB_PREFIX")
            sh("ip", "netns", "add", name)
            self.state["namespaces"].append(name)
            self._save()
            in_ns(role, "ip", "link", "set", "lo", "up")
        for br in ("br-inet", "br-vpc"):
            in_ns("sw", "ip", "link", "add", br, "type", "bridge")
            in_ns("sw", "ip", "link", "set", br, "up")
        self._link("client", "eth0", "c-inet", "br-inet", [f"{CLIENT_ADDR}/24", f"{API_ADDR}/24", f"{ADMIN_ADDR}/24"])
        for node, short in (("primary", "p"), ("standby", "s")):
            self._link(node, "eth0", f"{short}-inet", "br-inet", [f"{PUBLIC[node]}/24"])
            self._link(node, "eth1", f"{short}-vpc", "br-vpc", [f"{PRIVATE[node]}/24"])
        self._link("db", "eth1", "d-vpc", "br-vpc", [f"{DB_ADDR}/24"])
        # A third host on the VPC, for the rogue-VRRP-speaker check.
        self._link("rogue", "eth1", "r-vpc", "br-vpc", [f"{ROGUE_ADDR}/24"])

    def _link(self, role: str, inner: str, outer: str, bridge: str, addrs: list[str]) -> None:
        link_veth(ns("sw"), ns(role), inner, outer, bridge, addrs)

    def _edge(self) -> None:
        """DigitalOcean's edge, in `client`: new connections to the reserved IP go to its holder."""
        rules = f"""table ip {EDGE_TABLE} {{
    map rip {{ type ipv4_addr : ipv4_addr; }}
    chain out {{ type nat hook output priority -100; ip daddr {RESERVED_IP} dnat to ip daddr map @rip; }}
}}
"""
        in_ns("client", "nft", "-f", "-", input=rules)
        # Locally sent packets are routed before the NAT hook rewrites them: give the reserved IP a
        # route. Unassigned, its packets go nowhere (connect timeouts), as at DigitalOcean.
        in_ns("client", "ip", "route", "add", f"{RESERVED_IP}/32", "dev", "eth0")
        # A connection attempt that got no answer (its node was down or unreachable) leaves a
        # conntrack entry in SYN_SENT, with its DNAT, for 120 s; a later connection that happens to
        # reuse that source port would join the entry and go to the old node, whoever holds the IP
        # by then (seen: 9 refused requests in a rolling update). One client reusing its ports is a
        # lab artefact, so keep such entries (this namespace only) for 2 s.
        in_ns("client", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_timeout_syn_sent=2")

    def _database(self) -> None:
        root = LAB_ROOT / "db"
        root.mkdir(mode=0o700, exist_ok=True)
        # LAB_DB_PASSWORD / LAB_TOKEN let a test plant sentinel values and audit where they end up.
        password = os.environ.get("LAB_DB_PASSWORD") or secrets.token_urlsafe(18)
        pg = PgServer(port=DB_PORT, listen=DB_ADDR, netns=ns("db"), password=password, root=root)
        pg.start()
        self.state["db"] = {"root": str(root), "port": DB_PORT}
        self._save()
        pg.create_database("minitwit")
        secret_file = LAB_ROOT / "db-url"
        _write(secret_file, f"{pg.uri('minitwit', host=DB_ADDR)}\n", 0o600)
        self.state["db"]["url_file"] = str(secret_file)
        self._save()

    def db_url(self) -> str:
        return Path(self.state["db"]["url_file"]).read_text().strip()

    def _api(self) -> None:
        api_dir = LAB_ROOT / "api"
        api_dir.mkdir(mode=0o700, exist_ok=True)
        # The operator's token (rollouts, status) and one failover token per node, as on
        # DigitalOcean, so one node's token can be revoked alone. LAB_TOKEN plants a known value.
        token = os.environ.get("LAB_TOKEN") or "dop_v1_" + secrets.token_hex(32)
        _write(api_dir / "token", token + "\n", 0o600)
        self.state["token_file"] = str(api_dir / "token")
        self.state["node_token_files"] = {}
        for node in NODES:
            node_token = "dop_v1_" + hashlib.sha256(f"{token}/{node}".encode()).hexdigest()
            _write(api_dir / f"token-{node}", node_token + "\n", 0o600)
            self.state["node_token_files"][node] = str(api_dir / f"token-{node}")
        config = {
            "listen": f"{API_ADDR}:{API_PORT}",
            "token_file": str(api_dir / "token"),
            "token_files": self.state["node_token_files"],
            "region": "fra1",
            "droplets": [{"id": DROPLET_ID[n], "name": n, "public_ipv4": PUBLIC[n], "private_ipv4": PRIVATE[n]}
                         for n in NODES],
            "reserved_ips": {RESERVED_IP: None},
            "metadata_by_source": {PUBLIC[n]: DROPLET_ID[n] for n in NODES},
            "on_assign": ["nft", f"flush map ip {EDGE_TABLE} rip; add element ip {EDGE_TABLE} rip "
                                 "{ {ip} : {public_ipv4} }"],
            "on_unassign": ["nft", f"flush map ip {EDGE_TABLE} rip"],
            "log_path": str(LAB_ROOT / "logs" / "api-requests.jsonl"),
            "ready_file": str(api_dir / "ready"),
            "action_delay_s": self.state["api"]["action_s"],
            "latency_s": self.state["api"]["latency_s"],
        }
        _write(api_dir / "config.json", json.dumps(config, indent=2), 0o600)
        self.spawn("api", "client", [sys.executable, "-m", "tests.lab.fakedo", "--config", str(api_dir / "config.json")])
        wait_for(lambda: (api_dir / "ready").exists(), 10, "the fake DigitalOcean API to listen")

    def node_facts(self, node: str, profile: str) -> NodeFacts:
        peer = "standby" if node == "primary" else "primary"
        paths = node_paths(node)
        return NodeFacts(
            name=node, droplet_id=DROPLET_ID[node], private_ip=PRIVATE[node], peer_private_ip=PRIVATE[peer],
            peer_public_ip=PUBLIC[peer],
            reserved_ip=RESERVED_IP, priority=PRIORITY[node], router_id=ROUTER_ID, private_interface="eth1",
            admin_cidrs=(ADMIN_CIDR,), http_ports=(80, 443), health_url=HEALTH_URL, profile=PROFILES[profile],
            # HAProxy as on a droplet, run as root (the lab has no haproxy user per node).
            haproxy=HaproxyFacts(public_port=80, backend_port=BACKEND_PORT, serve=self.serve, user="",
                                 workers=tuple(self.state.get("workers", []))),
            api_url=f"http://{API_ADDR}:{API_PORT}", metadata_url=f"http://{API_ADDR}:{API_PORT}/metadata/v1",
            script_user=SCRIPT_USER, docker_cmd=str(LAB_ROOT / "bin" / "docker"), paths=paths,
            log_file=str(node_root(node) / "var" / "log" / "mt-failover.log"), allow_insecure_http=True,
        )

    def _node(self, node: str, profile: str) -> None:
        root = node_root(node)
        paths = node_paths(node)
        facts = self.node_facts(node, profile)
        compose = LAB_COMPOSE
        for d in ("", "/run", "/var/log", "/etc/minitwit-lab"):
            Path(f"{root}{d}").mkdir(mode=0o755, parents=True, exist_ok=True)
        for f in render_node_files(facts, compose_text=compose):
            _write(Path(f.path), f.content, f.mode)
        for d in (paths.state_dir, paths.lib_dir, paths.track_dir):
            Path(d).mkdir(mode=0o755, parents=True, exist_ok=True)
        uid = pwd.getpwnam(SCRIPT_USER)
        os.chown(paths.track_dir, uid.pw_uid, uid.pw_gid)
        # The bin directory on keepalived's PATH holds the lab's docker stand-in (root-owned, 0755).
        bindir = LAB_ROOT / "bin"
        bindir.mkdir(mode=0o755, exist_ok=True)
        shutil.copy2(REPO / "tests" / "lab" / "bin" / "docker", bindir / "docker")
        os.chmod(bindir / "docker", 0o755)
        token = Path(self.state["node_token_files"][node]).read_text()
        _write(Path(paths.token_file), token, 0o600)
        _write(Path(paths.app_env), f"DATABASE_URL={self.db_url()}\n", 0o600)
        _write(root / "etc" / "minitwit-lab" / "node.env",
               f"NODE_NAME={node}\nLAB_PYTHON={sys.executable}\nLAB_REPO={REPO}\nAPP_LISTEN=0.0.0.0:{BACKEND_PORT}\n",
               0o644)
        _write(Path(paths.app_dir) / ".env", "MINITWIT_VERSION=v1\n", 0o644)
        # The node's own firewall, for real.
        in_ns(node, "nft", "-f", paths.nftables_conf)
        self.compose(node, "up", "-d")
        self.start_daemons(node)

    # -- SSH: the production transport for rollouts, and the hardening checks ------------------
    @property
    def ssh_dir(self) -> Path:
        return LAB_ROOT / "ssh"

    @property
    def sudoers_file(self) -> Path:
        return Path(f"/etc/sudoers.d/{PREFIX}-lab")

    def _ssh(self) -> None:
        """An sshd per node (the droplets' sshd hardening, from the same text cloud-init writes),
        a `deploy` user with a lab key, and sudo for the node scripts only."""
        try:
            pwd.getpwnam(DEPLOY_USER)
        except KeyError:
            sh("useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent", "--shell", "/bin/bash",
               DEPLOY_USER)
            sh("usermod", "-p", "*", DEPLOY_USER)  # no password, but not "locked" (sshd refuses locked accounts)
            self.state["created_user"] = DEPLOY_USER
            self._save()
        d = self.ssh_dir
        (d / "authorized_keys").mkdir(mode=0o755, parents=True, exist_ok=True)
        if not (d / "id_ed25519").exists():
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "lab-operator", "-f", str(d / "id_ed25519"))
        _write(d / "authorized_keys" / DEPLOY_USER, (d / "id_ed25519.pub").read_text(), 0o644)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
        known = [self.start_sshd(node, PUBLIC[node]) for node in NODES]
        _write(d / "known_hosts", "\n".join(known) + "\n", 0o644)
        self.install_sudoers(NODES)

    @property
    def outputs_file(self) -> Path:
        return LAB_ROOT / "stack-outputs.json"

    def _outputs(self) -> None:
        """The lab's answer to `pulumi stack output --json`: the same names and shapes as the stack."""
        outputs = {
            "reserved_ip": RESERVED_IP,
            "app_url": f"http://{RESERVED_IP}/",
            "vpc_id": "lab-vpc",
            "database_host": DB_ADDR,
            "nodes": {n: {"droplet_id": DROPLET_ID[n], "public_ipv4": PUBLIC[n], "private_ipv4": PRIVATE[n]}
                      for n in NODES},
        }
        _write(self.outputs_file, json.dumps(outputs, indent=2) + "\n", 0o644)

    def ssh_argv(self, node: str, source: str = ADMIN_ADDR, user: str = DEPLOY_USER) -> list[str]:
        """ssh to a node from the client namespace, as an operator at `source` would."""
        d = self.ssh_dir
        return ["ip", "netns", "exec", ns("client"), "ssh", "-i", str(d / "id_ed25519"), "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={d / 'known_hosts'}", "-o", "StrictHostKeyChecking=yes",
                "-o", "ConnectTimeout=3", "-o", f"BindAddress={source}", f"{user}@{PUBLIC[node]}"]

    def node_env(self, node: str) -> dict[str, str]:
        paths = node_paths(node)
        return {"MT_FAILOVER_ENV": paths.failover_env, "MT_HEALTH_ENV": paths.health_env}

    def compose(self, node: str, *args: str) -> subprocess.CompletedProcess:
        paths = node_paths(node)
        return in_ns(node, "env", f"PATH={LAB_ROOT}/bin:/usr/bin:/bin", str(LAB_ROOT / "bin" / "docker"),
                     "compose", "-p", "minitwit", "-f", paths.compose_file, *args)

    def start_daemons(self, node: str,
                      which: tuple[str, ...] = ("haproxy", "watch", "reconcile", "keepalived")) -> None:
        paths = node_paths(node)
        env = self.node_env(node)
        if "haproxy" in which:
            self.start_haproxy(node)
        if "watch" in which and PROFILES[self.state["profile"]].use_watcher:
            self.spawn(f"{node}-watch", node, [paths.script("mt-healthwatch")], env=env, user=SCRIPT_USER)
        if "reconcile" in which:
            self.spawn(f"{node}-reconcile", node, [paths.script("mt-failover"), "reconcile"], env=env)
        if "keepalived" in which:
            self.start_keepalived(node)

    def start_haproxy(self, node: str) -> Proc:
        """HAProxy in master-worker mode in the foreground (-W -db), as Debian's unit runs it (-Ws)."""
        paths = node_paths(node)
        Path(paths.haproxy_admin_socket).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        sh("haproxy", "-c", "-q", "-f", paths.haproxy_cfg)
        proc = self.spawn(f"{node}-haproxy", node, ["haproxy", "-W", "-db", "-f", paths.haproxy_cfg])
        wait_for(lambda: self.haproxy_serving(node), 10, f"{node}'s HAProxy to listen")
        return proc

    def haproxy_serving(self, node: str) -> bool:
        """HAProxy's monitor (keepalived's check) answers 200: it runs and has an app server UP."""
        out = in_ns(node, "curl", "--silent", "--output", "/dev/null", "--write-out", "%{http_code}", "--max-time", "1",
                    HaproxyFacts().monitor_url, check=False)
        return out.stdout.strip() == "200"

    def reload_haproxy(self, node: str) -> None:
        """What `systemctl reload haproxy` does: check, then SIGUSR2 to the master (hitless)."""
        sh("haproxy", "-c", "-q", "-f", node_paths(node).haproxy_cfg)
        proc = self.procs().get(f"{node}-haproxy")
        if proc is None or not proc.alive():
            raise LabError(f"{node}: HAProxy is not running")
        os.kill(proc.pid, signal.SIGUSR2)

    def start_keepalived(self, node: str) -> Proc:
        paths = node_paths(node)
        # What the stack's keepalived drop-in runs first (ExecStartPre): the holder weight, fresh.
        in_ns(node, "env", f"MT_FAILOVER_ENV={paths.failover_env}", paths.script("mt-failover"), "holder",
              check=False)
        run = node_root(node) / "run"
        return self.spawn(f"{node}-keepalived", node, [
            "keepalived", "--dont-fork", "--log-console", "--log-detail", "--no-syslog", "--vrrp",
            "-f", paths.keepalived_conf, "-p", paths.keepalived_pidfile, "-r", str(run / "keepalived-vrrp.pid"),
        ], env=self.node_env(node))

    # -- observation ------------------------------------------------------------------------------
    def vrrp_state(self, node: str) -> str | None:
        try:
            return json.loads((Path(node_paths(node).state_dir) / "vrrp-state").read_text()).get("state")
        except (OSError, ValueError):
            return None

    def api_state(self) -> dict:
        out = in_ns("client", "curl", "--fail", "--silent", "--show-error", "--max-time", "3",
                    f"http://{API_ADDR}:{API_PORT}/_lab/state", check=False)
        if out.returncode != 0:
            return {}
        return json.loads(out.stdout)

    def api_post(self, path: str, body: dict) -> dict:
        out = in_ns("client", "curl", "--fail", "--silent", "--show-error", "--max-time", "5", "-X", "POST",
                    "-H", "Content-Type: application/json", "--data", json.dumps(body),
                    f"http://{API_ADDR}:{API_PORT}{path}")
        return json.loads(out.stdout or "{}")

    def holder(self) -> str | None:
        ids = {v: k for k, v in DROPLET_ID.items()}
        return ids.get(self.api_state().get("reserved_ips", {}).get(RESERVED_IP))

    def http(self, url: str, timeout: float = 2.0) -> tuple[int | None, dict[str, str]]:
        out = in_ns("client", "curl", "--silent", "--max-time", str(timeout), "--dump-header", "-",
                    "--output", "/dev/null", url, check=False)
        if out.returncode != 0:
            return None, {}
        lines = out.stdout.splitlines()
        status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else None
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:]) if v}
        return status, headers

    def app_http(self, node: str) -> tuple[int | None, dict[str, str]]:
        """The node's own app (behind its HAProxy), asked from inside the node: status, headers."""
        out = in_ns(node, "curl", "--silent", "--max-time", "1", "--dump-header", "-", "--output", "/dev/null",
                    HEALTH_URL, check=False)
        lines = out.stdout.splitlines() if out.returncode == 0 else []
        if not lines or not lines[0].startswith("HTTP/"):
            return None, {}
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:]) if v}
        return int(lines[0].split()[1]), headers

    def masters(self) -> list[str]:
        return [n for n in NODES if self.vrrp_state(n) == "MASTER"]

    # Prometheus and the webhook sink watch this lab (RUN_OBSERVERS in the drill); the twins: no.
    observed = True

    @property
    def serve(self) -> str:
        return self.state.get("serve", "active-standby")

    @property
    def api_timing(self) -> dict:
        """{"preset", "action_s", "latency_s"}: the fake API's timing this lab was built with."""
        return self.state.get("api", {"preset": "ideal", "action_s": 0.0, "latency_s": 0.0})

    def moves(self, since: float = 0.0, until: float | None = None) -> list[dict]:
        """Completed assigns that moved the reserved IP to another droplet, from the fake API's own
        record: [{"t": completed (epoch), "requested": accepted (epoch), "from": node|None, "to": node}],
        completed within [since, until]."""
        out = in_ns("client", "curl", "--fail", "--silent", "--show-error", "--max-time", "3",
                    f"http://{API_ADDR}:{API_PORT}/_lab/moves?since={since}", check=False)
        return moves_in(out, {v: k for k, v in DROPLET_ID.items()}, since, until)

    def revoke_token(self, node: str, revoked: bool = True) -> None:
        """Revoke (or restore) a node's failover token at the fake API."""
        self.api_post("/_lab/revoke" if revoked else "/_lab/restore", {"name": node})

    def transition_log(self, since: float = 0.0, until: float | None = None) -> list[dict]:
        """Every VRRP transition both nodes recorded in the window, oldest first:
        [{"t": epoch, "node", "from", "to"}]."""
        paths = {n: Path(node_paths(n).lib_dir) / "transitions.log" for n in NODES}
        return transitions_in({n: p.read_text() if p.exists() else "" for n, p in paths.items()}, since, until)

    def steady(self) -> str | None:
        """The active node when exactly one MASTER holds the reserved IP and serves through it."""
        masters = self.masters()
        api = self.api_state()
        holder = {v: k for k, v in DROPLET_ID.items()}.get(api.get("reserved_ips", {}).get(RESERVED_IP))
        if len(masters) != 1 or holder != masters[0] or api.get("pending"):
            return None  # an assign still in flight can move the IP yet
        status, headers = self.http(f"http://{RESERVED_IP}/latest")
        # active-standby: the MASTER's own app answers (its HAProxy sends there first); with serve=both
        # or app workers, HAProxy balances over every app, so any of them may answer.
        workers = self.worker_names()
        served = headers.get("x-served-by") in ((*NODES, *workers) if self.serve == "both" or workers
                                                else (masters[0],))
        return masters[0] if status == 200 and served else None

    def wait_steady(self, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = self.steady()
            if active:
                return active
            time.sleep(0.2)
        raise LabError(f"the pair did not settle within {timeout:.0f}s: {json.dumps(self.status())}")

    def wait_pair_ready(self, timeout: float = 30.0) -> str:
        """Steady, and the other node BACKUP (recovered, ready to take over): nothing in flight."""
        deadline = time.monotonic() + timeout
        active = self.wait_steady(timeout)
        while time.monotonic() < deadline:
            other = "standby" if active == "primary" else "primary"
            if self.vrrp_state(other) == "BACKUP" and self.steady() == active and self._past_deaf_start():
                return active
            time.sleep(0.1)
            active = self.steady() or active
        raise LabError(f"the standby did not become BACKUP within {timeout:.0f}s: {json.dumps(self.status())}")

    def keepalived_pidfile(self, node: str) -> str | None:
        return node_paths(node).keepalived_pidfile

    def _past_deaf_start(self) -> bool:
        """Both keepalived running longer than mt-failover's DEAF_START_S: a node that became MASTER
        sooner would leave the IP on a peer that serves (docs/node-contract.md), which is not what a
        scenario starting from a settled pair measures."""
        now = time.time()
        for node in NODES:
            pidfile = self.keepalived_pidfile(node)
            try:
                age = now - os.stat(pidfile).st_mtime if pidfile else -1.0
            except OSError:
                return False
            if age <= DEAF_START_S:
                return False
        return True

    def status(self) -> dict:
        nodes = {}
        procs = self.procs()
        for node in NODES:
            status, headers = self.app_http(node)
            nodes[node] = {
                "vrrp_state": self.vrrp_state(node),
                "app_version": headers.get("x-app-version") if status else None,
                "app_status": status,
                "processes": {k.split("-", 1)[1]: p.alive() for k, p in procs.items() if k.startswith(node + "-")},
            }
            nodes[node]["processes"]["app"] = self.app_pid(node) is not None
        return {"up": self.is_up, "profile": self.state.get("profile"), "nodes": nodes,
                "reserved_ip": {"address": RESERVED_IP, "holder": self.holder()}}

    def keepalived_log(self, node: str) -> str:
        try:  # spawn() logs every keepalived run of a node to the same file
            return (LAB_ROOT / "logs" / f"{node}-keepalived.log").read_text(errors="replace")
        except OSError:
            return ""

    def transitions(self) -> int:
        """VRRP transitions recorded so far on both nodes (mt-failover's transitions.log)."""
        total = 0
        for node in NODES:
            path = Path(node_paths(node).lib_dir) / "transitions.log"
            total += len(path.read_text().splitlines()) if path.exists() else 0
        return total

    def save_evidence(self, dest: Path) -> Path:
        """Copy what explains a run (logs, traffic records, each node's state and transition log)
        out of the lab before it is torn down. No secrets: those live in etc/ (and the audit checks
        these files)."""
        dest.mkdir(parents=True, exist_ok=True)
        keep = [LAB_ROOT / "logs", LAB_ROOT / "drill"]
        for node in NODES:
            paths = node_paths(node)
            keep += [Path(paths.state_dir), Path(paths.lib_dir), node_root(node) / "var" / "log"]
        for src in keep:
            if src.is_dir():
                shutil.copytree(src, dest / src.relative_to(LAB_ROOT), dirs_exist_ok=True)
        return dest

    # -- secrets audit ----------------------------------------------------------------------------
    def secret_values(self) -> dict[str, str]:
        from urllib.parse import unquote, urlsplit

        out = {"failover token": Path(self.state["token_file"]).read_text().strip()}
        for node, path in self.state.get("node_token_files", {}).items():
            out[f"failover token ({node})"] = Path(path).read_text().strip()
        password = urlsplit(self.db_url()).password
        if password:
            out["database password"] = unquote(password)
        hook = self.observe_dir / "webhook-path"
        if hook.exists():  # a webhook URL's path is its credential (Slack, Discord)
            out["alert webhook URL"] = hook.read_text().strip()
        return out

    def secret_homes(self) -> set[Path]:
        """The only files a secret may be in: its own 0600 destinations."""
        homes = {Path(self.state["token_file"]), Path(self.state["db"]["url_file"]),
                 *map(Path, self.state.get("node_token_files", {}).values())}
        for node in (*NODES, *self.worker_names()):  # a worker has no token file, only its app.env
            homes |= {Path(node_paths(node).token_file), Path(node_paths(node).app_env),
                      Path(node_paths(node).alert_webhook_file)}
        return homes | {self.observe_dir / "webhook-path"}

    def audit_secrets(self, extra: dict[str, str] | None = None) -> dict:
        """Search every file the lab wrote (logs, state, rendered files, traffic records, the API's
        request log) and `extra` texts for the lab's secrets; only their 0600 homes may hold them."""
        secrets_ = self.secret_values()
        homes = self.secret_homes()
        skip = LAB_ROOT / "db" / "data"  # PostgreSQL's own files: a SCRAM verifier, never the password
        files = (p for p in sorted(LAB_ROOT.rglob("*")) if skip not in p.parents)
        return scan_secrets(files, homes, secrets_, extra)

    # -- faults -------------------------------------------------------------------------------------
    def fault(self, node: str, kind: str, count: int = 3, statuses: tuple = (500, 429, 422)) -> None:
        if kind == "app":
            pid = self.app_pid(node)
            if pid is None:
                raise LabError(f"{node}: the app is not running")
            os.kill(pid, signal.SIGKILL)
        elif kind == "keepalived":
            self.stop(f"{node}-keepalived")
        elif kind == "haproxy":
            self.stop(f"{node}-haproxy", sig=signal.SIGKILL)
        elif kind == "link":
            for dev in ("eth0", "eth1"):
                in_ns(node, "ip", "link", "set", dev, "down")
        elif kind == "vpc":
            rules = """table bridge mtha_cut {
    chain cut {
        type filter hook forward priority -100;
        iifname "p-vpc" oifname "s-vpc" drop
        iifname "s-vpc" oifname "p-vpc" drop
    }
}
"""
            in_ns("sw", "nft", "-f", "-", input=rules)
        elif kind == "freeze":
            # A noisy neighbour or a live migration: every process of the node stops at once while
            # its kernel (and so its TCP stack) goes on.
            for pid in self._ns_pids(node):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
        elif kind == "db":
            # The shared database refuses every connection, the open ones included (a reset on
            # their next packet), as during a managed database's failover or maintenance.
            in_ns("db", "nft", "-f", "-", input=f"""table inet {DB_CUT_TABLE} {{
    chain input {{ type filter hook input priority -10; tcp dport {DB_PORT} reject with tcp reset; }}
}}
""")
        elif kind == "api":
            for i in range(count):
                self.api_post("/_lab/inject", {"status": statuses[i % len(statuses)], "count": 1,
                                               "match": "assign", "retry_after": 1})
        else:
            raise LabError(f"unknown fault kind {kind!r}; use {', '.join(FAULT_KINDS)}")

    def heal(self, node: str, kind: str) -> None:
        if kind == "app":
            self.compose(node, "up", "-d")
        elif kind == "keepalived":
            if not (self.procs().get(f"{node}-keepalived") and self.procs()[f"{node}-keepalived"].alive()):
                self.state.get("processes", {}).pop(f"{node}-keepalived", None)
                self.start_keepalived(node)
        elif kind == "haproxy":
            if not (self.procs().get(f"{node}-haproxy") and self.procs()[f"{node}-haproxy"].alive()):
                self.state.get("processes", {}).pop(f"{node}-haproxy", None)
                self.start_haproxy(node)
        elif kind == "link":
            for dev in ("eth0", "eth1"):
                in_ns(node, "ip", "link", "set", dev, "up")
        elif kind == "vpc":
            in_ns("sw", "nft", "delete", "table", "bridge", "mtha_cut", check=False)
        elif kind == "api":
            self.api_post("/_lab/clear", {})
        elif kind == "freeze":
            for pid in self._ns_pids(node):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        elif kind == "db":
            in_ns("db", "nft", "delete", "table", "inet", DB_CUT_TABLE, check=False)
        else:
            raise LabError(f"unknown fault kind {kind!r}; use {', '.join(FAULT_KINDS)}")

    def _ns_pids(self, node: str) -> list[int]:
        """Every process in the node's namespace (all of them the lab's own)."""
        out = sh("ip", "netns", "pids", ns(node), check=False).stdout.split()
        return [int(p) for p in out if p.isdigit() and int(p) != os.getpid()]

    # -- down -----------------------------------------------------------------------------------------
    def down(self) -> list[str]:
        """Tear everything down that the lab recorded; safe to call twice or after a crash."""
        notes = []
        for node in NODES:  # a frozen node's processes would sit on their SIGTERM
            if ns(node) in self.state.get("namespaces", []):
                self.heal(node, "freeze")
        for node in NODES:
            pid = self.app_pid(node)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 5)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for key in sorted(self.procs(), key=lambda k: k.endswith("api")):  # the API last
            self.stop(key)
        db = self.state.get("db")
        if db:
            data = Path(db["root"]) / "data"
            if (data / "postmaster.pid").exists():
                sh("runuser", "-u", "postgres", "--", str(_pg_ctl()), "-D", str(data), "-m", "fast", "-w",
                   "-t", "20", "stop", check=False)
        sudoers = self.state.get("sudoers")
        if sudoers:
            Path(sudoers).unlink(missing_ok=True)
        if self.state.get("created_user"):
            # Another lab on this machine (other LAB_PREFIX) may be using the same user right now.
            others = [p for p in LAB_ROOT.parent.glob("*/state.json") if p.parent != LAB_ROOT]
            if others:
                notes.append(f"left user {self.state['created_user']}: in use by {others[0].parent}")
            else:
                sh("userdel", self.state["created_user"], check=False)
        for name in reversed(self.state.get("namespaces", [])):
            if sh("ip", "netns", "del", name, check=False).returncode != 0:
                notes.append(f"could not delete namespace {name}")
        if LAB_ROOT.exists():
            shutil.rmtree(LAB_ROOT, ignore_errors=True)
        self.state = {}
        return notes

    # -- the serve setting, changed on a running pair ---------------------------------------------
    def set_serve(self, serve: str) -> None:
        """What `pulumi config set serve ...` and `pulumi up` do to both nodes: re-render haproxy.cfg
        for `serve`, check it and reload HAProxy hitlessly; the lab then expects that mode (steady()).
        A reload starts every server READY again (runtime states are not kept)."""
        from infra.haproxy import render_haproxy_cfg

        if serve not in SERVE_MODES:
            raise LabError(f"unknown serve mode {serve!r}; use one of {', '.join(SERVE_MODES)}")
        self.state["serve"] = serve
        self._save()
        for node in NODES:
            paths = node_paths(node)
            _write(Path(paths.haproxy_cfg), render_haproxy_cfg(self.node_facts(node, self.state["profile"])), 0o644)
            self.reload_haproxy(node)
        for node in NODES:
            wait_for(lambda node=node: self.haproxy_serving(node), 10, f"{node}'s HAProxy to serve after the reload")


    # -- observability (issue #13): node-exporter, Prometheus, the webhook sink (tests/lab/observe.py)
    @property
    def observe_dir(self) -> Path:
        return LAB_ROOT / "observe"

    @property
    def alerts_file(self) -> Path:
        return self.observe_dir / "alerts.jsonl"

    def _alert_sink(self) -> None:
        """The webhook sink in `client` at the admin address; its URL in each node's 0600 alert file."""
        from tests.lab import observe

        d = self.observe_dir
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
        path_file = d / "webhook-path"
        _write(path_file, observe.new_webhook_path() + "\n", 0o600)
        self.spawn("alert-sink", "client", [sys.executable, "-m", "tests.lab.observe", "sink", "--listen", ADMIN_ADDR,
                                            "--port", str(observe.SINK_PORT), "--path-file", str(path_file),
                                            "--out", str(self.alerts_file)])
        wait_for(lambda: (d / "sink.ready").exists(), 10, "the webhook sink to listen")
        url = f"http://{ADMIN_ADDR}:{observe.SINK_PORT}{path_file.read_text().strip()}"
        for node in NODES:
            _write(Path(node_paths(node).alert_webhook_file), url + "\n", 0o600)

    def _observability(self) -> None:
        """node-exporter in each node (textfile collector on its METRICS_DIR) and Prometheus in
        `client`, bound to the admin address and scraping from it, with the shipped alert rules."""
        from tests.lab import observe

        user = observe.exporter_user()
        for node in NODES:
            metrics_dir = Path(node_paths(node).metrics_dir)
            metrics_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.spawn(f"{node}-node-exporter", node, observe.node_exporter_argv(str(metrics_dir)), user=user,
                       cwd=LAB_ROOT)
        d = self.observe_dir
        rules = d / "alerts.yml"
        _write(rules, observe.ALERT_RULES.read_text(), 0o644)
        config = d / "prometheus.yml"
        _write(config, json.dumps(observe.prometheus_config(PUBLIC, str(rules)), indent=2) + "\n", 0o644)
        data = d / "prometheus-data"
        observe.prepare_dir(data, user)
        # Only Prometheus's connections leave from the admin address (the nodes admit their exporters
        # only from there); every other client-namespace connection stays an internet client's.
        uid = pwd.getpwnam(user).pw_uid
        table = str(observe.UID_ROUTE_TABLE)
        in_ns("client", "ip", "route", "add", "192.0.2.0/24", "dev", "eth0", "src", ADMIN_ADDR, "table", table)
        in_ns("client", "ip", "rule", "add", "pref", "100", "uidrange", f"{uid}-{uid}", "lookup", table)
        self.spawn("prometheus", "client", [
            "prometheus", f"--config.file={config}", f"--storage.tsdb.path={data}",
            f"--web.listen-address={ADMIN_ADDR}:{observe.PROM_PORT}", "--storage.tsdb.retention.time=1d",
            "--log.level=warn"], user=user, cwd=LAB_ROOT)
        want = 2 * len(NODES)  # node-exporter and HAProxy's exporter on each node
        wait_for(lambda: self._targets_up() == want, 30, f"Prometheus to scrape all {want} exporters")

    def _targets_up(self) -> int:
        try:
            return int(self.prom_value("count(up == 1)") or 0)
        except LabError:
            return 0

    def prom_query(self, expr: str, at: float | None = None) -> list[dict]:
        """An instant PromQL query at `at` (epoch; default now): Prometheus's result vector."""
        from tests.lab import observe

        args = ["curl", "--fail", "--silent", "--show-error", "--max-time", "5", "--get",
                "--data-urlencode", f"query={expr}"]
        if at is not None:
            args += ["--data-urlencode", f"time={at:.3f}"]
        out = in_ns("client", *args, f"http://{ADMIN_ADDR}:{observe.PROM_PORT}/api/v1/query", check=False)
        if out.returncode != 0:
            raise LabError(f"Prometheus query {expr!r} failed: {out.stderr.strip()}")
        return json.loads(out.stdout)["data"]["result"]

    def prom_value(self, expr: str, at: float | None = None) -> float | None:
        """The query's single value; None when the result is empty."""
        result = self.prom_query(expr, at)
        return float(result[0]["value"][1]) if result else None

    def alerts(self, since: float = 0.0, until: float | None = None) -> list[dict]:
        """Messages the webhook sink received in [since, until]: [{"t", "text"}]."""
        from tests.lab import observe

        return observe.read_alerts(self.alerts_file, since, until)

    # -- app workers (appWorkers, issue #14): app-only hosts on the VPC behind both nodes' HAProxy --
    def worker_names(self) -> list[str]:
        return [worker_server(i) for i in range(len(self.state.get("workers", [])))]

    def add_workers(self, count: int) -> list[str]:
        """What `appWorkers: count` and `pulumi up` do: `count` worker hosts on br-vpc (198.51.100.31+),
        each with its worker nftables and the stand-in app on the shared database, then both nodes'
        haproxy.cfg re-rendered with them and reloaded hitlessly."""
        from infra.node import render_worker_files

        if not 0 < count <= WORKER_MAX:
            raise LabError(f"--workers must be 1..{WORKER_MAX}, got {count}")
        if self.state.get("workers"):
            raise LabError("the lab already has workers; remove_workers() first")
        ips = [f"{WORKER_NET}{WORKER_FIRST + i}" for i in range(count)]
        self.state["workers"] = ips  # HAProxy picks them up only with set_serve below
        for i, ip in enumerate(ips):
            name = worker_server(i)
            sh("ip", "netns", "add", ns(name))
            self.state["namespaces"].append(ns(name))
            self._save()
            in_ns(name, "ip", "link", "set", "lo", "up")
            self._link(name, "eth1", f"w{i + 1}-vpc", "br-vpc", [f"{ip}/24"])
            root = node_root(name)
            facts = replace(self.node_facts("primary", self.state["profile"]), name=name, droplet_id=WORKER_ID + i,
                            private_ip=ip, pair_private_ips=tuple(PRIVATE[n] for n in NODES), paths=node_paths(name))
            for f in render_worker_files(facts):
                _write(Path(f.path), f.content, f.mode)
            in_ns(name, "nft", "-f", facts.paths.nftables_conf)
            _write(Path(facts.paths.app_env), f"DATABASE_URL={self.db_url()}\n", 0o600)
            (root / "var" / "log").mkdir(parents=True, exist_ok=True)
            self.start_worker_app(name)
        self.set_serve(self.serve)  # both nodes' HAProxy re-rendered with the workers, reloaded
        return self.worker_names()

    def start_worker_app(self, name: str) -> Proc:
        paths = node_paths(name)
        proc = self.spawn(f"{name}-app", name, [
            sys.executable, "-m", "tests.lab.app", "--listen", f"0.0.0.0:{BACKEND_PORT}", "--node", name,
            "--version", "v1", "--env-file", paths.app_env])
        wait_for(lambda: self.worker_http(name) == 200, 15, f"{name}'s app to answer")
        return proc

    def worker_http(self, name: str) -> int | None:
        """The worker's app, asked from the primary (the worker's nftables admit only the pair)."""
        ip = self.state.get("workers", [])[self.worker_names().index(name)]
        out = in_ns("primary", "curl", "--silent", "--output", "/dev/null", "--write-out", "%{http_code}",
                    "--max-time", "1", f"http://{ip}:{BACKEND_PORT}/latest", check=False)
        return int(out.stdout) if out.stdout.strip().isdigit() and out.stdout.strip() != "000" else None

    def remove_workers(self) -> None:
        """`appWorkers: 0`: both nodes' HAProxy first (no request goes to a worker any more), then the
        workers' apps and hosts."""
        names = self.worker_names()
        self.state["workers"] = []
        self._save()
        self.set_serve(self.serve)
        for name in names:
            self.stop(f"{name}-app")
            if sh("ip", "netns", "del", ns(name), check=False).returncode == 0:
                self.state["namespaces"].remove(ns(name))
            shutil.rmtree(node_root(name), ignore_errors=True)  # a destroyed droplet's disk goes with it
        self._save()


    # -- what the drill reads from any lab (the twins' adapter, tests/twins/twinlab.py, too) ------
    twins = False

    @property
    def reserved_ip(self) -> str:
        return RESERVED_IP

    @property
    def drill_dir(self) -> Path:
        """Where the drill keeps its traffic records."""
        return LAB_ROOT / "drill"

    def db_admin_uri(self) -> str:
        """The shared database as its superuser over the private socket (rows_lost, duplicates)."""
        return f"postgresql://postgres@/minitwit?host={LAB_ROOT / 'db'}&port={DB_PORT}"


    # -- rollouts to app workers (issue #14): a worker as rollout.py reaches it ---------------------
    def start_sshd(self, node: str, address: str) -> str:
        """`node`'s sshd on `address` (the droplets' hardening, from the text cloud-init writes, plus
        lab paths); returns its known_hosts line."""
        from infra.cloudinit import SSHD_DROPIN

        etc = node_root(node) / "etc" / "ssh"
        etc.mkdir(mode=0o755, parents=True, exist_ok=True)
        key = etc / "ssh_host_ed25519_key"
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"{node}-host", "-f", str(key))
        _write(etc / "sshd_config", (
            "# The lab node's sshd: the droplets' hardening (infra/cloudinit.py) plus lab paths.\n"
            + SSHD_DROPIN +
            f"ListenAddress {address}:22\n"
            f"HostKey {key}\n"
            f"PidFile {node_root(node) / 'run' / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.ssh_dir / 'authorized_keys'}/%u\n"
            "UsePAM no\nPubkeyAuthentication yes\nStrictModes yes\nPrintMotd no\n"
        ), 0o644)
        sh("sshd", "-t", "-f", str(etc / "sshd_config"))
        self.spawn(f"{node}-sshd", node, ["/usr/sbin/sshd", "-D", "-e", "-f", str(etc / "sshd_config")])
        return f"{address} {' '.join(Path(str(key) + '.pub').read_text().split()[:2])}"

    def install_sudoers(self, nodes) -> None:
        """The droplets' own sudoers text (one renderer), over these lab nodes' scripts."""
        from infra.cloudinit import render_deploy_sudoers

        tmp = LAB_ROOT / "sudoers.tmp"
        _write(tmp, render_deploy_sudoers([node_paths(n) for n in nodes], user=DEPLOY_USER), 0o440)
        sh("visudo", "-c", "-q", "-f", str(tmp))
        shutil.move(str(tmp), self.sudoers_file)
        self.state["sudoers"] = str(self.sudoers_file)
        self._save()

    def worker_public_ip(self, name: str) -> str:
        return f"{WORKER_PUBLIC_NET}{WORKER_FIRST + self.worker_names().index(name)}"

    def deployable_workers(self) -> list[str]:
        """What a worker droplet has for `rollout.py rollout` (cloud-init and its app step): a public
        address with sshd (known_hosts pinned), `deploy`'s sudo rule for its mt-deploy, the app run by
        compose (the lab's stand-in adopts the running app: no restart) at MINITWIT_VERSION=v1, and
        the stack outputs' `workers`. Undone by plain_workers()."""
        names = self.worker_names()
        known = (self.ssh_dir / "known_hosts").read_text()
        for i, name in enumerate(names):
            root, paths = node_root(name), node_paths(name)
            self._link(name, "eth0", f"w{i + 1}-inet", "br-inet", [f"{self.worker_public_ip(name)}/24"])
            known += self.start_sshd(name, self.worker_public_ip(name)) + "\n"
            _write(Path(paths.compose_file), LAB_COMPOSE, 0o644)
            _write(root / "etc" / "minitwit-lab" / "node.env",
                   f"NODE_NAME={name}\nLAB_PYTHON={sys.executable}\nLAB_REPO={REPO}\nAPP_LISTEN=0.0.0.0:{BACKEND_PORT}\n",
                   0o644)
            _write(Path(paths.app_dir) / ".env", "MINITWIT_VERSION=v1\n", 0o644)
            for d in (paths.state_dir, paths.lib_dir):
                Path(d).mkdir(mode=0o755, parents=True, exist_ok=True)
            _write(root / "run" / "minitwit-app.pid", f"{self.procs()[f'{name}-app'].pid}\n", 0o644)
        _write(self.ssh_dir / "known_hosts", known, 0o644)
        self.install_sudoers((*NODES, *names))
        outputs = json.loads(self.outputs_file.read_text())
        outputs["workers"] = [{"droplet_id": WORKER_ID + i, "public_ipv4": self.worker_public_ip(n),
                               "private_ipv4": ip} for i, (n, ip) in enumerate(zip(names, self.state["workers"], strict=True))]
        _write(self.outputs_file, json.dumps(outputs, indent=2) + "\n", 0o644)
        return names

    def plain_workers(self) -> None:
        """Undo deployable_workers(): the outputs, sudo rule and known_hosts of the pair alone; the
        workers' sshd and their apps (whichever process runs them now) stopped."""
        outputs = json.loads(self.outputs_file.read_text())
        outputs.pop("workers", None)
        _write(self.outputs_file, json.dumps(outputs, indent=2) + "\n", 0o644)
        self.install_sudoers(NODES)
        known = (self.ssh_dir / "known_hosts").read_text().splitlines()
        _write(self.ssh_dir / "known_hosts", "".join(ln + "\n" for ln in known if ln.split()[0] in PUBLIC.values()),
               0o644)
        for name in self.worker_names():
            self.stop(f"{name}-sshd")
            pid = self.app_pid(name)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), 5)

def _pg_ctl() -> Path:
    from tests.support.pg import pg_bindir

    return pg_bindir() / "pg_ctl"


def _write(path: Path, content: str, mode: int) -> None:
    """Create `path` with its final mode from the first byte (parents root-owned 0755)."""
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(content)
    os.chmod(path, mode)


def wait_for(pred, timeout: float, what: str | None = None, step: float = 0.05) -> float | None:
    """Seconds until `pred()` held; None after `timeout`, or LabError naming `what` when given."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(step)
    if what:
        raise LabError(f"timed out after {timeout:.0f}s waiting for {what}")
    return None
