"""The drill on droplet twins: a `Lab` look-alike whose nodes are the booted, provisioned twins.

tests/lab/drill.py talks to a lab through a handful of methods (up/down, spawn/stop for the
traffic generator in the client namespace, fault/heal, masters/holder/moves/transition_log,
wait_pair_ready, api_timing, serve, audit_secrets, save_evidence). `TwinLab` gives it the same
methods over tests/twins/twins.py, so the drill's own code runs unchanged against machines that
boot Debian 12 and were provisioned by the stack's own commands (tests/twins/apply.py):

- keepalived, HAProxy and the node scripts run as the systemd units the stack installed, so a
  fault is what an operator would do to a droplet: `systemctl stop keepalived`, a SIGKILL to the
  app's unit (its restart policy then acts like Docker's), the links taken down, `systemctl reboot`;
- the app is the lab's MiniTwit stand-in (tests/lab/app.py) on a shared PostgreSQL in the twins'
  `db` namespace, so the drill's rows_lost and duplicate checks hold as in the namespace lab;
- a node's files are read from the running twin (/proc/<its PID 1>/root), its /run included.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

from infra.node import NodePaths
from tests.lab.lab import API_PRESETS, NODES, REPO, Lab, LabError, _write, moves_in, scan_secrets, transitions_in, wait_for
from tests.twins.apply import Engine, collect
from tests.twins.twins import RESERVED_IP, TWIN_ROOT, Twins, in_ns, ns

COMPOSE_PROJECT = "minitwit"      # mt-health's default, the stack's project name
COMPOSE_FILE = "/srv/minitwit/compose.yaml"
APP_UNIT = f"docker-twin-{COMPOSE_PROJECT}-minitwit.service"   # the docker stand-in's unit for the service
BOOT_TIMEOUT_S = 180.0
FAULT_KINDS = ("app", "haproxy", "keepalived", "link", "api", "db", "reboot")


class TwinLab:
    """A drill's handle on the twins. Every method re-reads the twins' state file."""

    twins = True
    observed = False  # no Prometheus or webhook sink here: the drill judges the rest

    def __init__(self, root: Path = TWIN_ROOT) -> None:
        self.tw = Twins(root)

    # -- up / down ------------------------------------------------------------------------------
    @property
    def state(self) -> dict:
        return self.tw.state.get("drill", {})

    @property
    def is_up(self) -> bool:
        return bool(self.state.get("up"))

    def up(self, profile: str = "fast", wait: bool = True, api: str = "realistic",
           api_action_s: float | None = None, api_latency_s: float | None = None,
           serve: str = "active-standby", log=print) -> None:
        """Boot both twins, provision them with the stack's commands (database=external on the
        twins' PostgreSQL, the profile and serve mode as settings), wait for the pair to settle."""
        from tests.twins.__main__ import SECRET_KEYS, config

        if api not in API_PRESETS:
            raise LabError(f"unknown API preset {api!r}; use one of {', '.join(API_PRESETS)}")
        action_s, latency_s = API_PRESETS[api]
        action_s = action_s if api_action_s is None else api_action_s
        latency_s = latency_s if api_latency_s is None else api_latency_s
        tw = self.tw
        if tw.state_file.exists():
            raise LabError(f"twins are already up (or were interrupted): run `python -m tests.twins down` first "
                           f"(state: {tw.state_file})")
        tw.home.mkdir(mode=0o755, parents=True, exist_ok=True)
        compose = tw.home / "compose.yaml"
        shutil.copyfile(REPO / "deploy" / "compose.yaml", compose)
        password = secrets.token_urlsafe(18)
        cfg = {**config(tw, compose), "database": "external", "databaseUri": Twins.db_uri(password),
               # The lab's PostgreSQL has no TLS; `require` is the one mode an external URI without
               # sslrootcert passes (the stack warns about it), and libpq then falls back to plain.
               "databaseSslMode": "require", "failoverProfile": profile, "serve": serve}
        t0 = time.monotonic()
        collected = collect(cfg, SECRET_KEYS | {"databaseUri"}, tw.api_url)
        boot = tw.up(collected.user_data, collected.droplet_ids, log=log, api_timing=(action_s, latency_s),
                     db_password=password, lab_app=True)
        try:
            _write(tw.home / "api" / "db-password", password + "\n", 0o600)
            tw.state["drill"] = {"profile": profile, "serve": serve, "up": False,
                                 "api": {"preset": api, "action_s": action_s, "latency_s": latency_s},
                                 "boot_s": boot}
            tw._save()
            # Fresh twins: a stack state left by an earlier run would skip their provisioning.
            (tw.home / "engine-state.json").unlink(missing_ok=True)
            steps = Engine(tw, tw.home / "engine-state.json", log=lambda *_: None).apply(collected.steps)
            tw.state["drill"].update(up=True, provisioned_s=round(time.monotonic() - t0, 1), steps=len(steps))
            tw._save()
            log(f"twins: provisioned by {len(steps)} steps of the stack in {time.monotonic() - t0:.0f}s")
            if wait:
                self.wait_steady(timeout=60)
        except BaseException:
            self.down()
            raise

    def down(self) -> list[str]:
        return self.tw.down()

    # -- processes in the client namespace (the traffic generator) ------------------------------------
    def spawn(self, key: str, role: str, argv: list[str], **_kw) -> int:
        if role != "client":
            raise LabError(f"twins run only the client's processes from outside, not {role}'s")
        return self.tw._spawn(key, ["ip", "netns", "exec", ns("client"), *argv])

    def stop(self, key: str, timeout: float = 10.0) -> None:
        self.tw._stop(key, timeout=timeout)

    # -- the drill's seams -------------------------------------------------------------------------
    @property
    def reserved_ip(self) -> str:
        return RESERVED_IP

    @property
    def drill_dir(self) -> Path:
        return self.tw.home / "drill"

    def db_admin_uri(self) -> str:
        return self.tw.db_socket_uri()

    # -- a node's files, seen in the running twin ------------------------------------------------------
    def paths(self, node: str) -> NodePaths | None:
        pid = self.tw.leader(node)
        return NodePaths(root=f"/proc/{pid}/root") if pid else None

    def _read(self, node: str, attr: str, name: str) -> str | None:
        paths = self.paths(node)
        if paths is None:
            return None
        try:
            return (Path(getattr(paths, attr)) / name).read_text()
        except OSError:
            return None

    def vrrp_state(self, node: str) -> str | None:
        text = self._read(node, "state_dir", "vrrp-state")
        try:
            return json.loads(text).get("state") if text else None
        except ValueError:
            return None

    def transition_log(self, since: float = 0.0, until: float | None = None) -> list[dict]:
        return transitions_in({n: self._read(n, "lib_dir", "transitions.log") or "" for n in NODES}, since, until)

    def transitions(self) -> int:
        return len(self.transition_log())

    def keepalived_version(self) -> str:
        """The twins' keepalived (Debian's package on the twin, not this machine's)."""
        words = self.tw.machine("primary", "keepalived", "--version").stderr.split()
        return words[1].lstrip("v") if len(words) > 1 else "unknown"

    def keepalived_log(self, node: str) -> str:
        """keepalived's own log on the twin: its unit's journal (where unsafe permissions show)."""
        if self.tw.leader(node) is None:
            return ""
        return self.tw.machine(node, "journalctl", "--no-pager", "-o", "cat", "-u", "keepalived").stdout

    # -- the fake API and the client's view ------------------------------------------------------------
    def _curl(self, *argv: str, timeout: float = 3):
        return in_ns("client", "curl", "--fail", "--silent", "--show-error", "--max-time", str(timeout), *argv,
                     check=False)

    def api_state(self) -> dict:
        out = self._curl(f"{self.tw.api_url}/_lab/state")
        return json.loads(out.stdout) if out.returncode == 0 and out.stdout else {}

    def api_post(self, path: str, body: dict) -> dict:
        out = self._curl("-X", "POST", "-H", "Content-Type: application/json", "--data", json.dumps(body),
                         f"{self.tw.api_url}{path}", timeout=5)
        if out.returncode != 0:
            raise LabError(f"fake API {path}: {out.stderr.strip()}")
        return json.loads(out.stdout or "{}")

    def _names(self) -> dict[int, str]:
        return {v: k for k, v in self.tw.state.get("droplet_ids", {}).items()}

    def holder(self) -> str | None:
        return self._names().get(self.api_state().get("reserved_ips", {}).get(RESERVED_IP))

    def moves(self, since: float = 0.0, until: float | None = None) -> list[dict]:
        return moves_in(self._curl(f"{self.tw.api_url}/_lab/moves?since={since}"), self._names(), since, until)

    def http(self, url: str, timeout: float = 2.0) -> tuple[int | None, dict[str, str]]:
        out = in_ns("client", "curl", "--silent", "--max-time", str(timeout), "--dump-header", "-",
                    "--output", "/dev/null", url, check=False)
        lines = out.stdout.splitlines() if out.returncode == 0 else []
        if not lines or not lines[0].startswith("HTTP/"):
            return None, {}
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:]) if v}
        return int(lines[0].split()[1]), headers

    def steady(self) -> str | None:
        """The active node when exactly one MASTER holds the reserved IP and serves through it."""
        masters = self.masters()
        api = self.api_state()
        holder = self._names().get(api.get("reserved_ips", {}).get(RESERVED_IP))
        if len(masters) != 1 or holder != masters[0] or api.get("pending"):
            return None
        status, headers = self.http(f"http://{RESERVED_IP}/latest")
        served = headers.get("x-served-by") in (NODES if self.serve == "both" else (masters[0],))
        return masters[0] if status == 200 and served else None

    # The namespace lab's own code, over this class's state (the "drill" part of the twins' state),
    # steady() and vrrp_state().
    serve = Lab.serve
    api_timing = Lab.api_timing
    masters = Lab.masters
    wait_steady = Lab.wait_steady
    wait_pair_ready = Lab.wait_pair_ready
    _past_deaf_start = Lab._past_deaf_start

    def keepalived_pidfile(self, node: str) -> str | None:
        """The twin's /run/keepalived.pid (systemd's keepalived.service), seen from the host."""
        paths = self.paths(node)
        return paths.keepalived_pidfile if paths else None

    def status(self) -> dict:
        return {"up": self.is_up, "twins": True, "profile": self.state.get("profile"),
                "nodes": {n: {"vrrp_state": self.vrrp_state(n), "running": self.tw.leader(n) is not None}
                          for n in NODES},
                "reserved_ip": {"address": RESERVED_IP, "holder": self.holder()}}

    # -- faults: what an operator (or the platform) does to a droplet ----------------------------------
    def _systemctl(self, node: str, *argv: str) -> None:
        out = self.tw.machine(node, "systemctl", *argv)
        if out.returncode != 0:
            raise LabError(f"{node}: systemctl {' '.join(argv)} failed: {out.stderr.strip()}")

    def fault(self, node: str, kind: str, count: int = 3, statuses: tuple = (500, 429, 422)) -> None:
        if kind == "app":
            # The container dies; its unit's Restart=always then plays Docker's restart policy. The
            # main process only: killing a unit's whole cgroup fails inside nspawn (EIO).
            self._systemctl(node, "kill", "--kill-whom=main", "--signal=SIGKILL", APP_UNIT)
        elif kind == "haproxy":
            self._systemctl(node, "kill", "--kill-whom=main", "--signal=SIGKILL", "haproxy.service")
        elif kind == "keepalived":
            self._systemctl(node, "stop", "keepalived.service")
        elif kind == "link":
            for dev in ("eth0", "eth1"):
                in_ns(node, "ip", "link", "set", dev, "down")
        elif kind == "api":
            for i in range(count):
                self.api_post("/_lab/inject", {"status": statuses[i % len(statuses)], "count": 1,
                                               "match": "assign", "retry_after": 1})
        elif kind == "db":
            in_ns("db", "nft", "-f", "-", input="""table inet twins_dbcut {
    chain input { type filter hook input priority -10; tcp dport 5432 reject with tcp reset; }
}
""")
        elif kind == "reboot":
            self.tw.machine(node, "systemctl", "reboot")
        else:
            raise LabError(f"fault {kind!r} is not played on twins; use {', '.join(FAULT_KINDS)}")

    def heal(self, node: str, kind: str) -> None:
        if kind == "app":
            out = self.tw.machine(node, "docker", "compose", "-p", COMPOSE_PROJECT, "-f", COMPOSE_FILE, "up", "-d")
            if out.returncode != 0:
                raise LabError(f"{node}: docker compose up failed: {out.stderr.strip()}")
        elif kind in ("haproxy", "keepalived"):
            self._systemctl(node, "start", f"{kind}.service")
        elif kind == "link":
            for dev in ("eth0", "eth1"):
                in_ns(node, "ip", "link", "set", dev, "up")
        elif kind == "api":
            self.api_post("/_lab/clear", {})
        elif kind == "db":
            in_ns("db", "nft", "delete", "table", "inet", "twins_dbcut", check=False)
        elif kind == "reboot":
            self.wait_booted(node)
        else:
            raise LabError(f"fault {kind!r} is not played on twins; use {', '.join(FAULT_KINDS)}")

    def boots(self, node: str) -> list[float]:
        """Wall-clock times the twin's machine started (tests.twins.boot logs one line per boot)."""
        try:
            text = self.tw.log(f"{node}-nspawn").read_text(errors="replace")
        except OSError:
            return []
        return [float(ln.split(" at ")[1]) for ln in text.splitlines() if ln.startswith("twin-boot: boot ")]

    def wait_booted(self, node: str, after: float = 0.0, timeout: float = BOOT_TIMEOUT_S) -> float:
        """Seconds until the twin booted (again, after `after`) and its system is up."""
        def up() -> bool:
            if not any(t > after for t in self.boots(node)) or self.tw.leader(node) is None:
                return False
            state = self.tw.machine(node, "systemctl", "is-system-running").stdout.strip()
            return state in ("running", "degraded")
        return wait_for(up, timeout, f"twin {node} to boot", step=0.5)

    def stand_ins(self) -> list[dict[str, str]]:
        """`make twins`' list, with the drill's app and database in place of the stub and `none`."""
        from tests.twins.__main__ import stand_ins

        mine = {
            "the MiniTwit container": "the lab's app (tests/lab/app.py, the MiniTwit simulator API) run by the docker "
            "stand-in as a transient unit with Restart=always, on Debian's python3 with this machine's repository "
            "and Python packages (psycopg's wheel) bound read-only into the twin",
            "the database": "database=external: PostgreSQL (this machine's) in the twins' db namespace on the VPC, "
            "no TLS (databaseSslMode=require, libpq falls back to plain)",
        }
        return [{**s, "instead": mine.get(s["what"], s["instead"])} for s in stand_ins(self.tw)]

    # -- evidence and the secrets audit ----------------------------------------------------------------
    def save_evidence(self, dest: Path) -> Path:
        """The twins' logs, the drill's traffic, and each twin's journal and node state."""
        dest.mkdir(parents=True, exist_ok=True)
        for src in (self.tw.home / "logs", self.drill_dir):
            if src.is_dir():
                shutil.copytree(src, dest / src.name, dirs_exist_ok=True)
        for node in NODES:
            if self.tw.leader(node) is None:
                continue
            journal = self.tw.machine(node, "journalctl", "--no-pager", "-o", "short-precise").stdout
            (dest / f"{node}-journal.log").write_text(journal)
            paths = self.paths(node)
            for attr in ("state_dir", "lib_dir"):
                src = Path(getattr(paths, attr))
                if src.is_dir():
                    shutil.copytree(src, dest / node / attr, dirs_exist_ok=True)
        return dest

    def secret_values(self) -> dict[str, str]:
        return {"failover token": self.tw.token_file.read_text().strip(),
                "database password": (self.tw.home / "api" / "db-password").read_text().strip()}

    def audit_secrets(self, extra: dict[str, str] | None = None) -> dict:
        """Search what the twins wrote on this machine (logs, the API's request log, traffic,
        state) and each twin's own changes (its overlay's upper layer) for the secrets; only their
        0600 homes may hold them: on this machine the token and password files, on a twin the
        stack's token file and app.env."""
        values = self.secret_values()
        homes = {self.tw.token_file, self.tw.home / "api" / "db-password", self.tw.home / "api" / "config.json"}
        node_homes = ("etc/minitwit-ha/do-token", "srv/minitwit/app.env")
        roots = [self.tw.home / "logs", self.drill_dir, self.tw.state_file]
        for node in NODES:
            upper = self.tw.home / node / "upper"
            homes |= {upper / h for h in node_homes}
            roots.append(upper)
        files = (path for root in roots
                 for path in ([root] if root.is_file() else sorted(root.rglob("*")) if root.is_dir() else []))
        return scan_secrets(files, homes, values, extra)

