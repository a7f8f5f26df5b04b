"""Droplet twins: booted Debian 12 machines in network namespaces, one per droplet of the pair.

    mttw-client  192.0.2.131 (the operator: ssh, the readiness gate), 192.0.2.132:8080 (the fake
       |         DigitalOcean API), 192.0.2.130 (the edge: Debian mirror, Docker's repository)
       |  br-inet 192.0.2.0/24 (in mttw-sw)
    mttw-primary 192.0.2.141 / eth1 198.51.100.141      systemd-nspawn --boot of an overlay of
    mttw-standby 192.0.2.142 / eth1 198.51.100.142      the cached image (tests/twins/image.py)
          br-vpc 198.51.100.0/24 (in mttw-sw)

The addresses sit above the namespace lab's (tests/lab/lab.py), so both can run at once. Each twin
boots with systemd as PID 1 and a NoCloud seed carrying the stack's own rendered user data, so
cloud-init creates `deploy` and hardens sshd as on a droplet. `Twins` is the handle a drill uses:

    tw = Twins(); tw.up(user_data, public_key)   # network, API, edge, both twins booted
    tw.ssh("primary", "sudo systemctl is-active keepalived")
    tw.root("primary")                            # the twin's file system, seen from the host
    tw.down()                                     # everything, also after a failed up()

State (PIDs, mounts, namespaces) lives in $TWIN_ROOT/state.json, so `python -m tests.twins down`
cleans up after an interrupted run; only recorded processes are ended, by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.lab.lab import REPO, LabError, _pg_ctl, _starttime, _write, link_veth, sh, wait_for
from tests.support.pg import PgServer
from tests.twins import dockerrepo
from tests.twins.image import Image, ensure_image

TWIN_ROOT = Path(os.environ.get("TWIN_ROOT", "/var/tmp/minitwit-ha-twins"))
# TWIN_PREFIX names the namespaces and machines, so two runs (other TWIN_ROOTs) can share a host.
PREFIX = os.environ.get("TWIN_PREFIX", "mttw")
NODES = ("primary", "standby")
EDGE_ADDR = "192.0.2.130"
OPERATOR_ADDR = "192.0.2.131"
ADMIN_CIDR = "192.0.2.128/27"
API_ADDR, API_PORT = "192.0.2.132", 8080
PUBLIC = {"primary": "192.0.2.141", "standby": "192.0.2.142"}
PRIVATE = {"primary": "198.51.100.141", "standby": "198.51.100.142"}
RESERVED_IP = "203.0.113.140"
# The shared database (the drill's): in its own namespace on the VPC, as a managed cluster would be.
DB_ADDR, DB_PORT = "198.51.100.150", 5432
EDGE_TABLE = "mttw_edge"
BINARIES = ("ip", "nft", "systemd-nspawn", "nsenter", "mount", "ssh", "ssh-keygen", "openssl", "gpg", "dpkg-deb",
            "debootstrap")
# keepalived and nftables need CAP_NET_ADMIN; the rest is nspawn's default set for a booted system.
CAPABILITIES = "CAP_NET_ADMIN,CAP_NET_RAW,CAP_SYS_ADMIN"


def ns(role: str) -> str:
    return f"{PREFIX}-{role}"


def in_ns(role: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", ns(role), *argv, **kw)


def missing() -> str | None:
    """Why twins cannot run here, or None."""
    if os.geteuid() != 0:
        return "twins need root (network namespaces, overlay mounts, systemd-nspawn)"
    gone = [b for b in BINARIES if shutil.which(b) is None]
    if gone:
        return f"twins need {', '.join(gone)} (Debian: apt-get install systemd-container debootstrap openssh-client ...)"
    return None


def docker_repo_url() -> str:
    """The Docker repository URL the bootstrap uses by default (read from the script, not repeated)."""
    text = (REPO / "scripts" / "node-bootstrap.sh").read_text()
    m = re.search(r'DOCKER_APT_URL:-(https://[^}"]+)', text)
    if not m:
        raise LabError("scripts/node-bootstrap.sh: no default DOCKER_APT_URL found; the twins' edge serves it")
    return m.group(1)


class Twins:
    """The twins' network, services and machines. Every method re-reads state from disk."""

    def __init__(self, root: Path = TWIN_ROOT) -> None:
        self.home = root
        self.state_file = root / "state.json"
        self.state: dict = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}

    # -- paths a drill or a test reads ------------------------------------------------------
    def root(self, node: str) -> Path:
        """The twin's root file system (the overlay), as seen from this machine."""
        return self.home / node / "merged"

    @property
    def key(self) -> Path:
        return self.home / "ssh" / "id_ed25519"

    @property
    def public_key(self) -> str:
        return (self.home / "ssh" / "id_ed25519.pub").read_text().strip()

    @property
    def token_file(self) -> Path:
        return self.home / "api" / "token"

    def log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    @property
    def api_url(self) -> str:
        return f"http://{API_ADDR}:{API_PORT}"

    # -- state ------------------------------------------------------------------------------
    def _save(self) -> None:
        self.home.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True))
        tmp.replace(self.state_file)

    def _spawn(self, key: str, argv: list[str], stdin=subprocess.DEVNULL) -> int:
        self.log(key).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with open(self.log(key), "ab") as fh:
            p = subprocess.Popen(argv, stdin=stdin, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO,
                                 env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                                      "PYTHONPATH": str(REPO)},
                                 start_new_session=True)
        time.sleep(0.05)
        self.state.setdefault("processes", {})[key] = {"pid": p.pid, "starttime": _starttime(p.pid),
                                                        "spawned": time.time()}
        self._save()
        return p.pid

    def _alive(self, key: str) -> bool:
        p = self.state.get("processes", {}).get(key)
        return bool(p) and p["starttime"] is not None and _starttime(p["pid"]) == p["starttime"]

    def _stop(self, key: str, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        p = self.state.get("processes", {}).get(key)
        if p is None:
            return
        if self._alive(key):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p["pid"], sig)
            if wait_for(lambda: not self._alive(key), timeout) is None and self._alive(key):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p["pid"], signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(p["pid"], os.WNOHANG)
        self.state["processes"].pop(key, None)
        self._save()

    # -- up ---------------------------------------------------------------------------------
    def up(self, user_data: dict[str, str], droplet_ids: dict[str, int], log=print,
           api_timing: tuple[float, float] = (0.0, 0.0), db_password: str | None = None,
           lab_app: bool = False) -> dict[str, float]:
        """Build what is missing, boot both twins; returns each twin's boot time in seconds.

        `api_timing` is the fake API's (action seconds, per-request seconds); `db_password` adds the
        shared PostgreSQL with a `minitwit` database (db_uri() is the URI the stack is given);
        `lab_app` makes the docker stand-in run the lab's app (tests/lab/app.py) instead of its stub."""
        why = missing()
        if why:
            raise LabError(why)
        if self.state_file.exists():
            raise LabError(f"twins are already up (or were interrupted): run `python -m tests.twins down` first "
                           f"(state: {self.state_file})")
        self.home.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.state = {"namespaces": [], "mounts": [], "processes": {}, "created": time.time(),
                      "droplet_ids": droplet_ids}
        self._save()
        try:
            image = ensure_image(log=log)
            self.state["image"] = {"rootfs": str(image.rootfs), "built_s": image.built_s}
            self._save()
            self._network(db_password is not None)
            self._edge()
            self._api(droplet_ids, api_timing)
            if db_password is not None:
                self._database(db_password)
            boot = {}
            for node in NODES:
                self._boot(node, image, user_data[node], droplet_ids[node], lab_app)
            for node in NODES:
                boot[node] = self._wait_booted(node)
                log(f"twins: {node} booted in {boot[node]:.1f}s ({self.state['booted'][node]['state']})")
            return boot
        except BaseException:
            self.down()
            raise

    def _network(self, database: bool = False) -> None:
        existing = sh("ip", "netns", "list").stdout.split()
        for role in ("sw", "client", *NODES, *(("db",) if database else ())):
            if ns(role) in existing:
                raise LabError(f"network namespace {ns(role)} already exists: `python -m tests.twins down` first")
            sh("ip", "netns", "add", ns(role))
            self.state["namespaces"].append(ns(role))
            self._save()
            in_ns(role, "ip", "link", "set", "lo", "up")
        for br in ("br-inet", "br-vpc"):
            in_ns("sw", "ip", "link", "add", br, "type", "bridge")
            in_ns("sw", "ip", "link", "set", br, "up")
        self._link("client", "eth0", "c-inet", "br-inet", [f"{a}/24" for a in (EDGE_ADDR, OPERATOR_ADDR, API_ADDR)])
        for node in NODES:
            self._link(node, "eth0", f"{node[0]}-inet", "br-inet", [f"{PUBLIC[node]}/24"])
            self._link(node, "eth1", f"{node[0]}-vpc", "br-vpc", [f"{PRIVATE[node]}/24"])
        if database:
            self._link("db", "eth1", "d-vpc", "br-vpc", [f"{DB_ADDR}/24"])
        # DigitalOcean's edge: new connections to the reserved IP go to its holder (the fake API's
        # assign hook fills the map). Unassigned, its packets go nowhere, as at DigitalOcean.
        in_ns("client", "nft", "-f", "-", input=f"""table ip {EDGE_TABLE} {{
    map rip {{ type ipv4_addr : ipv4_addr; }}
    chain out {{ type nat hook output priority -100; ip daddr {RESERVED_IP} dnat to ip daddr map @rip; }}
}}
""")
        in_ns("client", "ip", "route", "add", f"{RESERVED_IP}/32", "dev", "eth0")
        # As in the namespace lab (tests/lab/lab.py _edge): a connection attempt nobody answered (a
        # node down) keeps its DNAT in SYN_SENT for 120 s, and a later one reusing its source port
        # would follow it to the old node; one client reusing its ports is a lab artefact.
        in_ns("client", "sysctl", "-q", "-w", "net.netfilter.nf_conntrack_tcp_timeout_syn_sent=2")

    def _link(self, role: str, inner: str, outer: str, bridge: str, addrs: list[str]) -> None:
        link_veth(ns("sw"), ns(role), inner, outer, bridge, addrs)

    def _edge(self) -> None:
        repo_url = docker_repo_url()
        m = re.match(r"https://([^/]+)(/.*)?$", repo_url)
        assert m  # noqa: S101 - docker_repo_url matched https:// already
        repo_host, repo_path = m.group(1), m.group(2) or "/"
        edge = self.home / "edge"
        tls = dockerrepo.build_ca(edge / "tls", repo_host)
        dockerrepo.build_repo(edge / "www", repo_path)
        image = self.state["image"]
        mirrors = sorted({re.sub(r"^https?://([^/]+).*$", r"\1", u) for u in _recipe_mirrors(image["rootfs"])})
        self.state["edge"] = {"hosts": [*mirrors, repo_host], "ca": str(tls["ca"]), "repo_url": repo_url}
        config = {"netns": ns("client"), "addr": EDGE_ADDR, "mirror_hosts": mirrors, "repo_host": repo_host,
                  "repo_root": str(edge / "www"), "cert": str(tls["cert"]), "key": str(tls["key"]),
                  "deb_cache": str(Path(image["rootfs"]).parent.parent / "debs"),
                  "ready_file": str(edge / "ready")}
        _write(edge / "config.json", json.dumps(config, indent=2), 0o600)
        self._spawn("edge", [sys.executable, "-m", "tests.twins.edge", "--config", str(edge / "config.json")])
        wait_for(lambda: (edge / "ready").exists(), 10, "the twins' edge to listen")

    def _api(self, droplet_ids: dict[str, int], timing: tuple[float, float] = (0.0, 0.0)) -> None:
        api = self.home / "api"
        api.mkdir(mode=0o700, exist_ok=True)
        self.ensure_token()
        config = {
            "listen": f"{API_ADDR}:{API_PORT}",
            "token_file": str(self.token_file),
            "region": "fra1",
            "droplets": [{"id": droplet_ids[n], "name": n, "public_ipv4": PUBLIC[n], "private_ipv4": PRIVATE[n]}
                         for n in NODES],
            "reserved_ips": {RESERVED_IP: None},
            "metadata_by_source": {PUBLIC[n]: droplet_ids[n] for n in NODES},
            "on_assign": ["ip", "netns", "exec", ns("client"), "nft",
                          f"flush map ip {EDGE_TABLE} rip; add element ip {EDGE_TABLE} rip {{ {{ip}} : {{public_ipv4}} }}"],
            "on_unassign": ["ip", "netns", "exec", ns("client"), "nft", f"flush map ip {EDGE_TABLE} rip"],
            "log_path": str(self.home / "logs" / "api-requests.jsonl"),
            "ready_file": str(api / "ready"),
            "action_delay_s": timing[0],
            "latency_s": timing[1],
        }
        _write(api / "config.json", json.dumps(config, indent=2), 0o600)
        self._spawn("api", ["ip", "netns", "exec", ns("client"), sys.executable, "-m", "tests.lab.fakedo",
                            "--config", str(api / "config.json")])
        wait_for(lambda: (api / "ready").exists(), 10, "the fake DigitalOcean API to listen")

    def _database(self, password: str) -> None:
        root = self.home / "db"
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(mode=0o700)
        pg = PgServer(port=DB_PORT, listen=DB_ADDR, netns=ns("db"), password=password, root=root)
        self.state["db"] = {"root": str(root), "port": DB_PORT}
        self._save()
        pg.start()
        pg.create_database("minitwit")

    @staticmethod
    def db_uri(password: str) -> str:
        """The app's DATABASE_URL (the stack's databaseUri): the superuser, as the lab's app uses."""
        return PgServer(port=DB_PORT, listen=DB_ADDR, password=password).uri("minitwit")

    def db_socket_uri(self) -> str:
        """The database over its private socket on this machine (the drill's rows_lost check)."""
        return f"postgresql://postgres@/minitwit?host={self.home / 'db'}&port={DB_PORT}"

    def _lab_app(self, node: str, merged: Path) -> list[str]:
        """The docker stand-in runs the lab's app (tests/lab/app.py) with this machine's Python
        packages (psycopg's binary wheel bundles libpq): the repository and the packages are bound
        read-only into the twin at their own paths, as a container image carries its own runtime."""
        import psycopg

        site = Path(psycopg.__file__).resolve().parents[1]
        _write(merged / "etc" / "docker-twin" / "lab-app.env",
               f"NODE_NAME={node}\nLAB_REPO={REPO}\nLAB_SITE={site}\n", 0o644)
        return [f"--bind-ro={d}" for d in (REPO, site) if d == REPO or REPO not in d.parents]

    def ensure_key(self) -> str:
        """The stack's SSH key pair for the twins (generated once per TWIN_ROOT); the public key."""
        d = self.home / "ssh"
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.key.exists():
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "minitwit-ha-twins", "-f", str(self.key))
        return self.public_key

    def ensure_token(self) -> str:
        """The failover token the fake API accepts (generated once per TWIN_ROOT)."""
        if not self.token_file.exists():
            _write(self.token_file, "dop_v1_" + os.urandom(32).hex() + "\n", 0o600)
        return self.token_file.read_text().strip()

    def _boot(self, node: str, image: Image, user_data: str, droplet_id: int, lab_app: bool = False) -> None:
        base = self.home / node
        upper, work, merged = base / "upper", base / "work", base / "merged"
        for d in (upper, work, merged):
            d.mkdir(mode=0o755, parents=True, exist_ok=True)
        sh("mount", "-t", "overlay", f"{PREFIX}-{node}", "-o",
           f"lowerdir={image.rootfs},upperdir={upper},workdir={work}", str(merged))
        self.state["mounts"].append(str(merged))
        self._save()
        seed = merged / "var" / "lib" / "cloud" / "seed" / "nocloud"
        # DigitalOcean's metadata gives the droplet its id, its hostname and the account keys the
        # droplet was created with (cloud-init puts them in root's authorized_keys).
        _write(seed / "meta-data", (f"instance-id: {droplet_id}\nlocal-hostname: minitwit-twins-{node}\n"
                                    f"public-keys:\n  - {self.public_key}\n"), 0o644)
        _write(seed / "user-data", user_data, 0o644)
        # The stand-in Docker repository is signed with the twins' own key: the bootstrap's key check
        # (DOCKER_KEY_FPR_FILE, root-owned) is told its fingerprint instead of Docker's.
        _write(merged / "etc" / "minitwit-ha" / "docker-apt-key.fpr",
               (self.home / "edge" / "www" / "signing-key.fpr").read_text(), 0o644)
        # Stand-ins, in the twin's upper layer only: the internet hosts the twin reaches are the
        # edge. cloud-init renders /etc/hosts from this template (manage_etc_hosts, as on a droplet).
        tmpl = merged / "etc" / "cloud" / "templates" / "hosts.debian.tmpl"
        _write(tmpl, tmpl.read_text() + f"\n# minitwit-ha twins: the lab's edge stands in for these hosts\n"
               f"{EDGE_ADDR} {' '.join(self.state['edge']['hosts'])}\n", 0o644)
        ca = Path(self.state["edge"]["ca"]).read_text()
        _write(merged / "usr" / "local" / "share" / "ca-certificates" / "minitwit-twins-lab.crt", ca, 0o644)
        bundle = merged / "etc" / "ssl" / "certs" / "ca-certificates.crt"
        _write(bundle, bundle.read_text() + ca, 0o644)
        binds = []
        if lab_app:
            binds = self._lab_app(node, merged)
        in_ns(node, "ip", "route", "add", "default", "via", EDGE_ADDR, "dev", "eth0", check=False)
        # tests.twins.boot runs nspawn again when the twin reboots (nspawn exits 133), as a
        # droplet comes back after `systemctl reboot`.
        self._spawn(f"{node}-nspawn", [
            sys.executable, "-m", "tests.twins.boot", "--",
            "systemd-nspawn", *binds, "--quiet", "--boot", f"--directory={merged}", f"--machine={ns(node)}",
            f"--network-namespace-path=/run/netns/{ns(node)}", "--register=no", "--keep-unit",
            f"--capability={CAPABILITIES}", "--resolv-conf=off", "--timezone=off", "--link-journal=no",
            "--console=pipe",
        ])

    def leader(self, node: str) -> int | None:
        """The twin's PID 1 (systemd), seen from this machine."""
        p = self.state.get("processes", {}).get(f"{node}-nspawn")
        if not p or not self._alive(f"{node}-nspawn"):
            return None
        todo = [p["pid"]]
        while todo:
            pid = todo.pop(0)
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd" and pid != p["pid"]:
                    return pid
                for task in Path(f"/proc/{pid}/task").iterdir():
                    todo += [int(c) for c in (task / "children").read_text().split()]
        return None

    def machine(self, node: str, *argv: str, check: bool = False, timeout: float = 60,
                input: str | None = None) -> subprocess.CompletedProcess:
        """Run argv inside the twin as root (console access, not SSH: for checks and faults)."""
        pid = self.leader(node)
        if pid is None:
            raise LabError(f"twin {node} is not running (see {self.log(f'{node}-nspawn')})")
        return sh("nsenter", f"--target={pid}", "--all", *argv, check=check, timeout=timeout, input=input)

    def _wait_booted(self, node: str, timeout: float = 300) -> float:
        start = self.state["processes"][f"{node}-nspawn"]
        begin = time.monotonic()
        spawned = start["spawned"]
        state = "unknown"
        while time.monotonic() - begin < timeout:
            if not self._alive(f"{node}-nspawn"):
                raise LabError(f"twin {node} exited while booting; see {self.log(f'{node}-nspawn')}")
            if self.leader(node) is not None:
                state = self.machine(node, "systemctl", "is-system-running").stdout.strip()
                if state in ("running", "degraded") and self._sshd_listening(node):
                    break
            time.sleep(0.5)
        else:
            raise LabError(f"twin {node} did not finish booting within {timeout:.0f}s (last state: {state}); "
                           f"see {self.log(f'{node}-nspawn')}")
        seconds = time.time() - spawned  # from nspawn's start, though the twins boot in parallel
        failed = []
        if state == "degraded":
            failed = self.machine(node, "systemctl", "--failed", "--plain", "--no-legend").stdout.split("\n")
            failed = [line.split()[0] for line in failed if line.strip()]
        self.state.setdefault("booted", {})[node] = {"state": state, "failed_units": failed, "pid": start["pid"]}
        self._save()
        return seconds

    def _sshd_listening(self, node: str) -> bool:
        out = in_ns(node, "ss", "-Hltn", "sport", "=", ":22", check=False).stdout
        return bool(out.strip())

    # -- access -----------------------------------------------------------------------------
    def ssh_argv(self, node: str | None = None, host: str | None = None, user: str = "deploy") -> list[str]:
        """ssh as the operator (in mttw-client, inside adminCidrs) with the stack's key: no config
        file (no SendEnv, no multiplexing), no host key pinning (pulumi-command pins none)."""
        host = host or PUBLIC[node or "primary"]
        return ["ip", "netns", "exec", ns("client"), "ssh", "-F", "/dev/null", "-i", str(self.key), "-T",
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10", f"{user}@{host}"]

    def ssh(self, node: str, command: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.ssh_argv(node), command], input=input, capture_output=True, text=True,
                              timeout=timeout, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})

    # -- down -------------------------------------------------------------------------------
    def down(self) -> list[str]:
        """Stop the twins (a clean poweroff first), the services, unmount, delete the namespaces."""
        problems: list[str] = []
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else self.state
        if not self.state:
            return problems
        for node in NODES:
            # SIGTERM makes nspawn ask the twin's systemd for a clean poweroff.
            self._stop(f"{node}-nspawn", timeout=30)
        for key in list(self.state.get("processes", {})):
            self._stop(key)
        db = self.state.get("db")
        if db and (Path(db["root"]) / "data" / "postmaster.pid").exists():
            sh("runuser", "-u", "postgres", "--", str(_pg_ctl()), "-D", str(Path(db["root"]) / "data"),
               "-m", "fast", "-w", "-t", "20", "stop", check=False)
        for mount in reversed(self.state.get("mounts", [])):
            if sh("umount", mount, check=False).returncode != 0 and os.path.ismount(mount):
                problems.append(f"could not unmount {mount}")
        for name in reversed(self.state.get("namespaces", [])):
            sh("ip", "netns", "delete", name, check=False)
        if not problems:
            for node in NODES:
                shutil.rmtree(self.home / node, ignore_errors=True)
            shutil.rmtree(self.home / "db", ignore_errors=True)
            self.state_file.unlink(missing_ok=True)
            self.state = {}
        return problems


def _recipe_mirrors(rootfs: str) -> list[str]:
    recipe = json.loads((Path(rootfs).parent / "recipe.json").read_text())
    return [recipe["mirror"], recipe["security_mirror"]]
