#!/usr/bin/env python3
"""rollout.py: zero-downtime rolling updates and planned switchovers of the minitwit-ha pair.

    rollout.py rollout --version V --outputs outputs.json --identity ~/.ssh/deploy_ed25519
    rollout.py switchover --stack prod --identity ~/.ssh/deploy_ed25519
    rollout.py resize --size s-2vcpu-4gb --stack prod --identity ~/.ssh/deploy_ed25519
    rollout.py reimage --image ubuntu-24-04-x64 --stack prod --identity ~/.ssh/deploy_ed25519

`rollout` updates app workers first (stack output `workers`, appWorkers), --batch at a time, each out of
rotation in both nodes' HAProxy while deployed; a worker that fails stops the rollout (rolled back,
the pair untouched), and no batch may leave fewer than half of all app servers healthy. Then the
pair, one app at a time behind HAProxy, the standby's first: it takes that app out of
rotation in both nodes' HAProxy (drain, wait until no request is left on it, maint), deploys V,
waits until the app is healthy on V, and puts it back (ready, UP). Meanwhile the other app serves
every request through the active node's HAProxy, so keepalived never changes state and the
reserved IP never moves. A version that never becomes healthy is rolled back while still out of
rotation (never served), and the active node's app is not touched.
`switchover` is the planned move of the reserved IP to the healthy standby (node maintenance): the
active node's HAProxy first forwards every request to the standby's app, then the maintenance flag
hands the IP over; requests still reaching the old holder until the API's action has completed are
served by the new one's app, so the move's seconds cost no request.
`resize` / `reimage` change one droplet per `pulumi up`: the standby first (`nodeOverrides` names only
it, `pulumi up --target` its droplet and what depends on it), a health wait, a switchover, then the
former active the same way; finally dropletSize/dropletImage is set and the overrides are cleared.

Nothing is touched until both nodes are locked and the pair is in a state the tool trusts: the
DigitalOcean API and keepalived agree on the active node, the other node is BACKUP and healthy,
and the app answers through the reserved IP. Every failure stops with traffic on a healthy node
where that is possible, and says what happened, where traffic is and what to do (docs/rollout.md).

The node side is `mt-deploy` on each droplet, run over OpenSSH as the `deploy` user with `sudo -n`.
The API token comes from DIGITALOCEAN_TOKEN (read-only scope is enough), never from argv.
Python 3.10+ standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

EXIT_OK = 0          # done, or nothing to do
EXIT_FAILED = 1      # stopped and rolled back: traffic on a healthy node, the other node healthy too
EXIT_USAGE = 2       # bad arguments, outputs or environment: nothing was touched
EXIT_REFUSED = 3     # the pair is not in a state to start from, or another rollout holds a lock: nothing touched
EXIT_DEGRADED = 4    # stopped and the pair needs an operator now (a node left unhealthy, drained or out of rotation, or
                     # traffic not confirmed on a healthy node); the last lines say where traffic is
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: locks released, what this run drained undrained when safe

EPILOG = """exit codes:
  0    done (or nothing to do: the version already runs everywhere)
  1    failed and rolled back: traffic is on a healthy node and the other node is healthy (a
       worker that failed the version is back on the previous one; the pair was not touched)
  2    usage or configuration error (arguments, --batch, outputs file, DIGITALOCEAN_TOKEN): nothing
       touched
  3    refused: API and keepalived disagree, the standby or a worker is not healthy, a node or
       worker is unreachable, or another rollout holds a node's lock: nothing touched
  4    failed and the pair is degraded: a node is left unhealthy or drained, an app (or a worker)
       is left out of rotation in HAProxy, or traffic could not be confirmed on a healthy node. Act
       now; the last lines say where traffic is
  130  interrupted (SIGINT/SIGTERM): locks released, drains undone and apps put back in rotation
       where they were healthy

environment: DIGITALOCEAN_TOKEN (required; reserved_ip:read is enough). See docs/rollout.md.
"""

VERSION_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
NODE_SCRIPT = "/usr/libexec/minitwit-ha/mt-deploy"
SSH_UNREACHABLE = 255
STATUS_TIMEOUT_S = 40.0
SMALL_CMD_TIMEOUT_S = 30.0
WORKER_SERVER = "worker-{n}"   # infra/haproxy.py: HAProxy's name for workers[n-1] in both nodes' backend


# ---------------------------------------------------------------------------------------------
# Errors.


class ToolError(Exception):
    """Stop with `code`; the message says what happened and what to do."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class Interrupted(BaseException):
    """SIGINT/SIGTERM: unwind to the clean-up (a BaseException so `except Exception` never eats it)."""


class TransportError(Exception):
    """The node could not be reached (ssh exit 255, time-out)."""


class NodeCommandFailed(Exception):
    def __init__(self, node: str, args: Sequence[str], code: int, detail: str):
        super().__init__(f"`mt-deploy {' '.join(args)}` on {node} exited {code}: {detail}")
        self.node, self.code, self.detail = node, code, detail


class Timeout(Exception):
    pass


class ApiError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Transport: how mt-deploy is run on a node. The real one is OpenSSH; tests use a fake.


@dataclass
class RunResult:
    code: int
    stdout: str
    stderr: str


class Transport(Protocol):
    def run(self, node: str, args: Sequence[str], timeout: float) -> RunResult:
        """Run `mt-deploy ARGS` as root on `node`; raise TransportError if the node cannot be reached."""
        ...


class SshTransport:
    """`ssh deploy@<public ip> sudo -n <root>/usr/libexec/minitwit-ha/mt-deploy ARGS`, non-interactive."""

    def __init__(self, hosts: dict[str, str], user: str = "deploy", identity: str | None = None,
                 known_hosts: str | None = None, strict: str = "yes", options: Sequence[str] = (),
                 remote_root: str = "", connect_timeout: int = 10, multiplex: bool = True):
        self.hosts, self.user, self.identity = hosts, user, identity
        self.known_hosts, self.strict, self.options = known_hosts, strict, list(options)
        self.remote_root, self.connect_timeout = remote_root, connect_timeout
        self.multiplex = multiplex
        self.control_dir: str | None = None
        self.masters: set[str] = set()

    # One SSH connection per node for the whole run (a status poll then costs a session, not a
    # handshake). The master is started explicitly with -f and no pipes, so it never holds this
    # process's output open; `close` ends it with -O exit. A node without a master is still reached
    # directly (ControlMaster=no falls back to a new connection).
    def __enter__(self) -> SshTransport:
        if self.multiplex:
            self.control_dir = tempfile.mkdtemp(prefix="rollout-ssh-")
            for node in sorted(self.hosts):
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    if subprocess.run([*self._base(), "-o", "ControlMaster=yes", "-o", "ControlPersist=120",
                                       "-N", "-f", "-l", self.user, self.hosts[node]],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      timeout=self.connect_timeout + 10).returncode == 0:
                        self.masters.add(node)
        return self

    def __exit__(self, *exc: object) -> None:
        for node in sorted(self.masters):
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                subprocess.run([*self._base(), "-O", "exit", "-l", self.user, self.hosts[node]],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
        self.masters.clear()
        if self.control_dir:
            shutil.rmtree(self.control_dir, ignore_errors=True)
            self.control_dir = None

    def _base(self) -> list[str]:
        argv = ["ssh"]
        if self.identity:
            argv += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        argv += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}",
                 "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                 "-o", f"StrictHostKeyChecking={self.strict}"]
        if self.known_hosts:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}"]
        for opt in self.options:
            argv += ["-o", opt]
        if self.control_dir:
            argv += ["-o", f"ControlPath={self.control_dir}/%C"]
        return argv

    def argv(self, node: str, args: Sequence[str]) -> list[str]:
        root = self.remote_root.replace("{node}", node).rstrip("/")
        remote = " ".join(shlex.quote(a) for a in ["sudo", "-n", root + NODE_SCRIPT, *args])
        argv = self._base()
        if self.control_dir:
            argv += ["-o", "ControlMaster=no"]
        return [*argv, "-l", self.user, self.hosts[node], "--", remote]

    def run(self, node: str, args: Sequence[str], timeout: float) -> RunResult:
        try:
            proc = subprocess.run(self.argv(node, args), stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TransportError(f"ssh to {node} ({self.hosts[node]}): no answer within {timeout:.0f} s") from None
        except OSError as e:
            raise TransportError(f"cannot run ssh: {e.strerror}") from None
        if proc.returncode == SSH_UNREACHABLE:
            raise TransportError(f"ssh to {node} ({self.hosts[node]}) failed: {last_line(proc.stderr)}")
        return RunResult(proc.returncode, proc.stdout, proc.stderr)


def last_line(text: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = " ".join(lines[-1].split()) if lines else "no output"
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# The DigitalOcean API (who holds the reserved IP) and the client's view (who answers app_url).

_OPENER = None


def _opener() -> urllib.request.OpenerDirector:
    global _OPENER
    if _OPENER is None:
        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, req, fp, code, msg, headers, newurl):
                return None  # a redirect would carry the token elsewhere

        _OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())
    return _OPENER


class Api:
    def __init__(self, base_url: str, token: str, reserved_ip: str, timeout: float = 5.0):
        self.url = f"{base_url.rstrip('/')}/v2/reserved_ips/{reserved_ip}"
        self._token, self.timeout = token, timeout

    def holder(self) -> int | None:
        """The droplet ID holding the reserved IP (None: unassigned). ApiError on any failure."""
        req = urllib.request.Request(self.url, headers={"Authorization": f"Bearer {self._token}",
                                                        "Accept": "application/json",
                                                        "User-Agent": "minitwit-ha-rollout/1"})
        try:
            with _opener().open(req, timeout=self.timeout) as resp:
                doc = json.loads(resp.read(1 << 20))
        except urllib.error.HTTPError as e:
            hint = {401: " (token rejected)", 403: " (token lacks reserved_ip:read)",
                    404: " (reserved IP not in this account)"}.get(e.code, "")
            raise ApiError(f"GET {self.url}: HTTP {e.code}{hint}") from None
        except (OSError, ValueError) as e:
            raise ApiError(f"GET {self.url}: {type(e).__name__}: {getattr(e, 'reason', e)}") from None
        rip = doc.get("reserved_ip") if isinstance(doc, dict) else None
        if not isinstance(rip, dict):
            raise ApiError(f"GET {self.url}: answer has no reserved_ip object")
        droplet = rip.get("droplet")
        if not droplet:
            return None
        droplet_id = droplet.get("id") if isinstance(droplet, dict) else None
        if not isinstance(droplet_id, int) or isinstance(droplet_id, bool):
            raise ApiError(f"GET {self.url}: reserved_ip.droplet has no integer id")
        return droplet_id


@dataclass
class Answer:
    status: int | None       # None: no answer
    served_by: str | None    # X-Served-By
    version: str | None      # X-App-Version
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Probe:
    """GET the app through the reserved IP, as a client does (a new connection each time)."""

    def __init__(self, url: str, timeout: float = 3.0):
        self.url, self.timeout = url, timeout

    def get(self) -> Answer:
        req = urllib.request.Request(self.url, headers={"Connection": "close", "User-Agent": "minitwit-ha-rollout/1"})
        try:
            with _opener().open(req, timeout=self.timeout) as resp:
                resp.read(1 << 16)
                return Answer(resp.status, resp.headers.get("X-Served-By"), resp.headers.get("X-App-Version"))
        except urllib.error.HTTPError as e:
            h = e.headers or {}
            return Answer(e.code, h.get("X-Served-By"), h.get("X-App-Version"))
        except (OSError, ValueError) as e:
            return Answer(None, None, None, f"{type(e).__name__}: {getattr(e, 'reason', e)}")


# ---------------------------------------------------------------------------------------------
# What a node reports (mt-deploy status) and what the tool concludes from it.


@dataclass
class NodeStatus:
    node: str
    vrrp_state: str
    vrrp_since: float | None
    keepalived_running: bool | None
    configured_version: str | None
    running_version: str | None
    http_status: int | None
    app_health: int
    maintenance: bool
    track: str | None
    lock: dict | None
    haproxy: dict | None = None   # {"local"|"peer": {"status", "sessions"}}: this node's HAProxy's view

    @classmethod
    def parse(cls, node: str, text: str) -> NodeStatus:
        try:
            doc = json.loads(text.strip().splitlines()[-1])
            return cls(node=node, vrrp_state=str(doc["vrrp_state"]), vrrp_since=doc.get("vrrp_since"),
                       keepalived_running=doc.get("keepalived_running"),
                       configured_version=doc.get("configured_version"), running_version=doc.get("running_version"),
                       http_status=doc.get("http_status"), app_health=int(doc["app_health"]),
                       maintenance=bool(doc["maintenance"]), track=doc.get("track"), lock=doc.get("lock"),
                       haproxy=doc.get("haproxy") if isinstance(doc.get("haproxy"), dict) else None)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise TransportError(f"{node}: mt-deploy status answered garbage ({type(e).__name__}): "
                                 f"{last_line(text, 80)!r}") from None

    @property
    def version(self) -> str | None:
        """The version the node runs: what the app reports, else what compose was told."""
        return self.running_version or self.configured_version

    def runs(self, version: str) -> bool:
        if self.running_version is not None:
            return self.running_version == version and self.configured_version in (None, version)
        return self.configured_version == version

    @property
    def app_ok(self) -> bool:
        return self.app_health == 0

    @property
    def ready_backup(self) -> bool:
        """Could take over right now: keepalived BACKUP and running, app healthy, not drained."""
        return (self.vrrp_state == "BACKUP" and self.keepalived_running is not False and self.app_ok
                and not self.maintenance and self.track in (None, "0"))

    def describe(self, app_only: bool = False) -> str:
        """One line for the log; app_only: a worker's (no keepalived, no HAProxy, no drain flag)."""
        health = {0: "healthy", 1: "health URL failing", 2: "compose service down", 4: "config error"}
        bits = [f"version {self.version or 'unknown'}", health.get(self.app_health, f"mt-health exit {self.app_health}")]
        if app_only:
            return ", ".join(bits)
        bits.insert(0, f"keepalived {self.vrrp_state}" + (" (not running)" if self.keepalived_running is False else ""))
        if self.maintenance:
            bits.append("drained (maintenance flag)")
        if self.out_of_rotation():
            bits.append("HAProxy: " + ", ".join(f"{k} {v}" for k, v in self.out_of_rotation().items()))
        return ", ".join(bits)

    def out_of_rotation(self) -> dict[str, str]:
        """This node's HAProxy servers that get no new request (DRAIN, MAINT, DOWN): {server: status}."""
        return {k: str(v.get("status")) for k, v in sorted((self.haproxy or {}).items())
                if isinstance(v, dict) and not str(v.get("status", "")).startswith("UP")}


# ---------------------------------------------------------------------------------------------
# Stack outputs.


@dataclass
class Stack:
    reserved_ip: str
    app_url: str
    droplets: dict[str, int]   # node -> droplet ID
    hosts: dict[str, str]      # node (and worker) -> public IPv4 (SSH)
    workers: dict[str, int] = field(default_factory=dict)  # worker-N -> droplet ID, in HAProxy's order


def parse_outputs(doc: object) -> Stack:
    def bad(what: str) -> ToolError:
        return ToolError(EXIT_USAGE, f"stack outputs: {what} (expected the stack's `pulumi stack output --json`)")

    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    for key in ("reserved_ip", "app_url", "nodes"):
        if key not in doc:
            raise bad(f"no `{key}`")
    nodes = doc["nodes"]
    if not isinstance(nodes, dict) or len(nodes) != 2:
        raise bad("`nodes` must hold exactly two nodes")
    droplets, hosts = {}, {}
    for name, node in sorted(nodes.items()):
        if not (isinstance(node, dict) and isinstance(node.get("droplet_id"), int)
                and isinstance(node.get("public_ipv4"), str)):
            raise bad(f"nodes.{name} needs an integer droplet_id and a public_ipv4")
        droplets[name], hosts[name] = node["droplet_id"], node["public_ipv4"]
    workers = doc.get("workers") or []   # absent (a stack from before appWorkers) or []: the pair alone
    if not isinstance(workers, list):
        raise bad("`workers` must be a list")
    ids = {}
    for i, worker in enumerate(workers):
        if not (isinstance(worker, dict) and isinstance(worker.get("droplet_id"), int)
                and isinstance(worker.get("public_ipv4"), str)):
            raise bad(f"workers[{i}] needs an integer droplet_id and a public_ipv4")
        name = WORKER_SERVER.format(n=i + 1)
        ids[name], hosts[name] = worker["droplet_id"], worker["public_ipv4"]
    return Stack(str(doc["reserved_ip"]), str(doc["app_url"]), droplets, hosts, ids)


def check_batch(batch: int, workers: int) -> None:
    """--batch: how many workers are out of rotation at once. Never more than there are workers,
    and never so many that fewer than half of all app servers (the pair's two apps + the workers)
    would be left serving."""
    total = 2 + workers
    most = max(1, min(workers, total // 2))
    if not 1 <= batch <= most:
        why = (f"the stack has {workers} worker(s) and {total} app servers in all; more than {most} out at "
               "once would leave fewer than half of them serving") if workers else "the stack has no workers"
        raise ToolError(EXIT_USAGE, f"--batch {batch}: must be 1..{most} ({why}). Nothing was touched")


def load_outputs(path: str | None, stack: str | None) -> Stack:
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return parse_outputs(json.load(f))
        except OSError as e:
            raise ToolError(EXIT_USAGE, f"cannot read --outputs {path}: {e.strerror}") from None
        except ValueError:
            raise ToolError(EXIT_USAGE, f"--outputs {path} is not JSON") from None
    try:
        proc = subprocess.run(["pulumi", "stack", "output", "--json", "--stack", stack or ""],
                              capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ToolError(EXIT_USAGE, f"cannot run `pulumi stack output --json --stack {stack}`: {e}") from None
    if proc.returncode != 0:
        raise ToolError(EXIT_USAGE, f"`pulumi stack output --json --stack {stack}` failed: {last_line(proc.stderr)}")
    try:
        return parse_outputs(json.loads(proc.stdout))
    except ValueError:
        raise ToolError(EXIT_USAGE, "`pulumi stack output --json` did not print JSON") from None


# ---------------------------------------------------------------------------------------------
# The orchestration.


@dataclass
class Options:
    health_timeout: float = 300.0
    move_timeout: float = 60.0
    deploy_timeout: float = 1200.0
    poll_interval: float = 0.5
    settle: float = 2.0        # a standby must look ready twice, this far apart, with no VRRP transition
    drain_timeout: float = 10.0  # how long HAProxy's requests on an app may take to finish before it is disabled
    batch: int = 1             # workers updated at once (out of rotation together)


@dataclass
class Pair:
    active: str
    standby: str
    status: dict[str, NodeStatus]


@dataclass
class Report:
    command: str
    version: str | None = None
    exit_code: int | None = None
    outcome: str = ""
    message: str = ""
    active_before: str | None = None
    active_after: str | None = None
    duration_s: float | None = None
    deploy_health_s: dict[str, float] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    traffic: dict = field(default_factory=dict)


class Logger:
    def __init__(self, stream=None, secrets: Sequence[str] = ()):
        self.stream = stream or sys.stderr
        self.secrets = [s for s in secrets if s]

    def __call__(self, message: str) -> None:
        for s in self.secrets:
            message = message.replace(s, "<redacted>")
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(f"{stamp} rollout: {message}\n")
            self.stream.flush()


def default_owner() -> str:
    if os.environ.get("GITHUB_RUN_ID"):
        raw = f"gha-{os.environ.get('GITHUB_REPOSITORY', 'repo')}-run-{os.environ['GITHUB_RUN_ID']}"
    else:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        raw = f"{user}@{socket.gethostname()}"
    return re.sub(r"[^A-Za-z0-9_.:@+-]", "-", f"{raw}:{os.getpid()}")[:120]


class Rollout:
    def __init__(self, stack: Stack, transport: Transport, api: Api, probe: Probe, opts: Options,
                 log: Callable[[str], None], owner: str, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        self.stack, self.transport, self.api, self.probe, self.opts = stack, transport, api, probe, opts
        self.log, self.owner, self.clock, self.sleep = log, owner, clock, sleep
        self.nodes = sorted(stack.droplets)  # the fixed lock order
        self.workers = list(stack.workers)   # worker-1, worker-2, ...: HAProxy's order
        self.locked: list[str] = []
        self.drained: list[str] = []                  # nodes with the maintenance flag set by this run
        self.out: dict[str, list[tuple[str, str]]] = {}  # app's node -> [(HAProxy's node, server)] taken out
        self.active: str | None = None
        self.report = Report(command="")
        self.t0 = clock()

    # -- node commands ------------------------------------------------------------------------
    def call(self, node: str, args: Sequence[str], timeout: float, attempts: int = 3) -> RunResult:
        """Run an idempotent mt-deploy command; retry when the node could not be reached."""
        for attempt in range(1, attempts + 1):
            try:
                return self.transport.run(node, args, timeout)
            except TransportError as e:
                if attempt == attempts:
                    raise
                self.log(f"{node}: {e}; retrying ({attempt}/{attempts - 1})")
                self.sleep(min(2.0, self.opts.poll_interval * 2))
        raise AssertionError("unreachable")

    def command(self, node: str, args: Sequence[str], timeout: float = SMALL_CMD_TIMEOUT_S) -> RunResult:
        result = self.call(node, args, timeout)
        if result.code != 0:
            raise NodeCommandFailed(node, args, result.code, last_line(result.stderr or result.stdout))
        return result

    def status(self, node: str) -> NodeStatus:
        return NodeStatus.parse(node, self.command(node, ["status"], STATUS_TIMEOUT_S).stdout)

    def holder(self, attempts: int = 3) -> str | None:
        """The node the API says holds the reserved IP; '?<id>' for a droplet outside this stack."""
        for attempt in range(1, attempts + 1):
            try:
                droplet = self.api.holder()
                break
            except ApiError as e:
                if attempt == attempts:
                    raise
                self.log(f"API: {e}; retrying")
                self.sleep(1.0)
        if droplet is None:
            return None
        names = {v: k for k, v in self.stack.droplets.items()}
        return names.get(droplet, f"?{droplet}")

    def each(self, fn: Callable[[str], object], nodes: Sequence[str] | None = None
             ) -> tuple[dict[str, object], dict[str, Exception]]:
        """fn(node) on both nodes (or `nodes`) at once (independent reads, unlocks, a batch's deploys):
        results and errors by node."""
        results: dict[str, object] = {}
        errors: dict[str, Exception] = {}

        def work(node: str) -> None:
            try:
                results[node] = fn(node)
            except Exception as e:
                errors[node] = e

        threads = [threading.Thread(target=work, args=(n,), daemon=True) for n in (self.nodes if nodes is None else nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results, errors

    def step(self, name: str, node: str | None, started: float, **extra: object) -> float:
        seconds = round(self.clock() - started, 3)
        self.report.steps.append({"step": name, "node": node, "seconds": seconds, **extra})
        return seconds

    # -- locks ----------------------------------------------------------------------------------
    def lock_all(self) -> None:
        ttl = int(2 * (self.opts.deploy_timeout + self.opts.health_timeout) + self.opts.move_timeout + 600)
        for node in self.nodes:
            # Recorded before the call: an interrupt while ssh runs must still release a lock it may have taken.
            self.locked.append(node)
            try:
                result = self.call(node, ["lock", self.owner, "--ttl", str(ttl)], SMALL_CMD_TIMEOUT_S)
            except TransportError as e:
                self.locked.remove(node)
                raise ToolError(EXIT_REFUSED, f"cannot reach {node} to take its lock: {e}. Nothing was changed; "
                                              "check SSH access (key, known_hosts, admin CIDR) and run again") from None
            if result.code != 0:
                self.locked.remove(node)
            if result.code == 3:
                holder = "another rollout"
                with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                    held = json.loads(result.stdout.strip().splitlines()[-1])["holder"]
                    holder = f"{held['owner']} (for {held['age_s']:.0f} s)"
                raise ToolError(EXIT_REFUSED, f"{node} is locked by {holder}: another rollout or switchover is "
                                              "running. Nothing was changed; wait for it (CI: the concurrency "
                                              "group queues runs) and run again")
            if result.code != 0:
                raise ToolError(EXIT_REFUSED, f"cannot lock {node}: mt-deploy exited {result.code}: "
                                              f"{last_line(result.stderr)}. Nothing was changed")
        self.log(f"locked {' and '.join(self.nodes)} as {self.owner}")

    def unlock_all(self) -> None:
        held = list(self.locked)
        _, errors = self.each(lambda n: self.command(n, ["unlock", self.owner]) if n in held else None)
        for node in held:
            if node in errors:
                self.log(f"WARNING: could not release the lock on {node}: {errors[node]}. It expires by itself; "
                         f"or run `sudo {NODE_SCRIPT} unlock {self.owner}` on {node}")
            else:
                self.locked.remove(node)
        if not self.locked:
            self.log("locks released")

    # -- the pair's state -----------------------------------------------------------------------
    def survey(self) -> Pair:
        """Which node is active? Both the API and keepalived must agree, and the other node must be ready."""
        try:
            holder = self.holder()
        except ApiError as e:
            raise ToolError(EXIT_REFUSED, f"cannot ask the DigitalOcean API who holds the reserved IP: {e}. "
                                          "Nothing was changed") from None
        results, errors = self.each(self.status)
        for node, e in errors.items():
            if not isinstance(e, (TransportError, NodeCommandFailed)):
                raise e
            raise ToolError(EXIT_REFUSED, f"cannot read {node}'s status: {e}. Nothing was changed") from None
        status: dict[str, NodeStatus] = results  # type: ignore[assignment]
        masters = [n for n in self.nodes if status[n].vrrp_state == "MASTER"]
        state = "; ".join(f"{n}: {status[n].describe()}" for n in self.nodes)
        self.log(f"pair: reserved IP {self.stack.reserved_ip} on {holder or 'nobody'} (API); {state}")
        if holder is None or holder.startswith("?"):
            where = "unassigned" if holder is None else f"on droplet {holder[1:]}, not in this stack"
            raise ToolError(EXIT_REFUSED, f"the API says the reserved IP is {where}: the pair is not serving "
                                          "normally. Nothing was changed; fix that first (docs/node-contract.md, "
                                          "mt-failover status)")
        if masters != [holder]:
            raise ToolError(EXIT_REFUSED, f"the API says {holder} holds the reserved IP but keepalived MASTER is "
                                          f"{' and '.join(masters) or 'nobody'}: the pair disagrees (a failover in "
                                          "progress, or a split brain). Nothing was changed; wait until it settles "
                                          "and run again")
        active = holder
        standby = next(n for n in self.nodes if n != active)
        a, s = status[active], status[standby]
        if a.keepalived_running is False or not a.app_ok or a.maintenance:
            raise ToolError(EXIT_REFUSED, f"the active node ({active}) is not in a normal state ({a.describe()}). "
                                          "Nothing was changed")
        if not s.ready_backup:
            raise ToolError(EXIT_REFUSED, f"the standby ({standby}) cannot take over ({s.describe()}, track file "
                                          f"{s.track}): a rollout or switchover needs a healthy BACKUP. Nothing was "
                                          f"changed; fix {standby} first")
        held_out = {n: {k: v for k, v in status[n].out_of_rotation().items() if v.startswith(("MAINT", "DRAIN"))}
                    for n in self.nodes}
        for node, servers in held_out.items():
            if servers:
                which = ", ".join(f"{k} {v}" for k, v in servers.items())
                raise ToolError(EXIT_REFUSED, f"{node}'s HAProxy has an app out of rotation ({which}; an earlier run "
                                              "stopped?). Nothing was changed; once that app is healthy, put it back "
                                              f"with `sudo {NODE_SCRIPT} server {next(iter(servers))} ready` on {node}")
        answer = self.probe.get()
        # Through the active node's HAProxy: its own app, or (serve=both, or its app just failed) the peer's,
        # or with workers any of them (least connections over every app).
        if not answer.ok or (answer.served_by and answer.served_by not in (*self.nodes, *self.workers)):
            seen = f"HTTP {answer.status}" if answer.status else f"no answer ({answer.error})"
            raise ToolError(EXIT_REFUSED, f"{self.probe.url} through the reserved IP: {seen}, served by "
                                          f"{answer.served_by or 'unknown'} (expected {active}'s HAProxy to answer "
                                          f"from one of the pair's apps{' or a worker' if self.workers else ''}). "
                                          "Nothing was changed")
        self.log(f"active node: {active} ({a.version}); standby: {standby} ({s.version}); "
                 f"{self.probe.url} answers {answer.status} from {answer.served_by or active}")
        self.report.active_before = active
        self.active = active
        return Pair(active, standby, status)

    def confirm_still_active(self, pair: Pair) -> None:
        """Just before the drain: nothing moved while the standby was being updated."""
        try:
            holder = self.holder()
            st = self.status(pair.active)
        except (ApiError, TransportError, NodeCommandFailed) as e:
            raise ToolError(EXIT_DEGRADED, f"cannot confirm {pair.active} is still active before draining it: {e}") from None
        if holder != pair.active or st.vrrp_state != "MASTER":
            raise ToolError(EXIT_DEGRADED, f"the pair changed during the rollout: the API says {holder or 'nobody'} "
                                           f"holds the reserved IP, {pair.active} is {st.vrrp_state}. Stopped "
                                           "before draining anything")

    def where(self) -> dict:
        """Where traffic is now, as the API, keepalived and a client see it; logged in one line."""
        info: dict = {}
        try:
            info["holder"] = self.holder(attempts=2)
        except ApiError as e:
            info["holder"] = f"unknown ({e})"
        results, errors = self.each(self.status)
        for node in self.nodes:
            st = results.get(node)
            if isinstance(st, NodeStatus):
                info[node] = {"vrrp_state": st.vrrp_state, "version": st.version, "app_ok": st.app_ok,
                              "maintenance": st.maintenance, "haproxy_out": st.out_of_rotation()}
            else:
                info[node] = {"error": str(errors.get(node))}
        if self.workers:
            results, errors = self.each(self.status, self.workers)
            info["workers"] = {w: {"version": st.version, "app_ok": st.app_ok} if isinstance(st := results.get(w), NodeStatus)
                               else {"error": str(errors.get(w))} for w in self.workers}
            self.log("workers now: " + "; ".join(f"{w} {v.get('version', '?')}{'' if v.get('app_ok') else ' UNHEALTHY'}"
                                                 for w, v in info["workers"].items()))
        answer = self.probe.get()
        info["client"] = {"status": answer.status, "served_by": answer.served_by, "version": answer.version}
        nodes = "; ".join(f"{n} {info[n].get('vrrp_state', '?')} {info[n].get('version', '?')}"
                          f"{' drained' if info[n].get('maintenance') else ''}"
                          + "".join(f" (HAProxy {k} {v})" for k, v in info[n].get("haproxy_out", {}).items())
                          + f"{'' if info[n].get('app_ok', False) else ' UNHEALTHY'}" for n in self.nodes)
        self.log(f"traffic now: reserved IP on {info['holder'] or 'nobody'} (API); {nodes}; {self.probe.url} -> "
                 f"{answer.status or 'no answer'} from {answer.served_by or '?'} version {answer.version or '?'}")
        self.report.traffic = info
        if isinstance(info["holder"], str) and info["holder"] in self.nodes:
            self.report.active_after = info["holder"]
        return info

    def healthy_pair(self, info: dict) -> bool:
        """One MASTER holding the IP and serving, the other a healthy, undrained BACKUP, no app held
        out of rotation in either HAProxy."""
        holder = info.get("holder")
        if holder not in self.nodes or not (info["client"]["status"] and 200 <= info["client"]["status"] < 300):
            return False
        other = next(n for n in self.nodes if n != holder)
        h, o = info[holder], info[other]
        return (h.get("vrrp_state") == "MASTER" and h.get("app_ok") and o.get("vrrp_state") == "BACKUP"
                and o.get("app_ok") and not o.get("maintenance")
                and not any(info[n].get("haproxy_out") for n in self.nodes))

    # -- waiting ----------------------------------------------------------------------------------
    def wait_ready(self, node: str, version: str | None, as_backup: bool, timeout: float,
                   settle: float | None = None) -> float:
        """Until `node` is healthy on `version` (and, as_backup, keepalived BACKUP and undrained), seen twice
        `settle` seconds apart with no VRRP transition in between. Returns the seconds waited."""
        settle = self.opts.settle if settle is None else settle
        start = self.clock()
        first_ok: tuple[float, float | None] | None = None
        last = "no status yet"
        while True:
            try:
                st = self.status(node)
                ok = st.app_ok and (version is None or st.runs(version)) and (st.ready_backup if as_backup else True)
                last = st.describe()
                if not ok:
                    first_ok = None
                else:
                    if first_ok is None or st.vrrp_since != first_ok[1]:
                        first_ok = (self.clock(), st.vrrp_since)
                    if self.clock() - first_ok[0] >= settle:
                        return self.clock() - start
            except (TransportError, NodeCommandFailed) as e:
                first_ok, last = None, f"status failed: {e}"
            if self.clock() - start >= timeout:
                raise Timeout(f"{node} not healthy{' on ' + version if version else ''} after {timeout:g} s "
                              f"(last seen: {last})")
            self.sleep(self.opts.poll_interval)

    def wait_moved(self, target: str) -> float:
        """Until the API says `target` holds the reserved IP (its action completed: the edge now sends
        clients to `target`), its keepalived is MASTER, and a client gets a 2xx through the reserved IP.
        Who answers proves nothing here: the old holder's HAProxy already forwards to `target`'s app."""
        start = self.clock()
        last = "nothing checked yet"
        while True:
            try:
                holder = self.holder(attempts=1)
                answer = self.probe.get()
                if holder != target:
                    last = f"API holder {holder or 'nobody'}"
                elif not answer.ok:
                    last = f"client got {answer.status or answer.error}"
                else:
                    st = self.status(target)
                    if st.vrrp_state == "MASTER":
                        return self.clock() - start
                    last = f"{target} keepalived {st.vrrp_state}"
            except (ApiError, TransportError, NodeCommandFailed) as e:
                last = str(e)
            if self.clock() - start >= self.opts.move_timeout:
                raise Timeout(f"the reserved IP did not move to {target} within {self.opts.move_timeout:g} s "
                              f"(last seen: {last})")
            self.sleep(min(self.opts.poll_interval, 0.25))

    # -- actions ----------------------------------------------------------------------------------
    def deploy(self, node: str, version: str) -> float:
        start = self.clock()
        self.log(f"{node}: deploying {version} (pull, docker compose up -d)")
        self.command(node, ["deploy", version], self.opts.deploy_timeout)
        seconds = self.step("deploy", node, start, version=version)
        self.log(f"{node}: {version} deployed in {seconds:.1f} s; waiting until healthy "
                 f"(at most {self.opts.health_timeout:g} s)")
        return seconds

    def drain(self, node: str) -> None:
        self.drained.append(node)  # before the call: an interrupt while ssh runs must still undo it
        self.command(node, ["drain", self.owner])
        self.log(f"{node}: drained (maintenance flag set): keepalived hands the reserved IP over")

    def undrain(self, node: str) -> None:
        self.command(node, ["undrain"])
        if node in self.drained:
            self.drained.remove(node)
        self.log(f"{node}: undrained (maintenance flag removed)")

    def routes_to(self, node: str) -> list[tuple[str, str]]:
        """Every HAProxy server that sends requests to `node`'s app, the active node's first (it carries
        the traffic; serve=both or a failover in flight may route through the other one too). A worker
        is server `node` in both nodes' HAProxy."""
        if node in self.workers:
            routes = [(n, node) for n in self.nodes]
        else:
            other = next(n for n in self.nodes if n != node)
            routes = [(node, "local"), (other, "peer")]
        return sorted(routes, key=lambda r: r[0] != self.active)

    def take_out(self, node: str, routes: list[tuple[str, str]] | None = None) -> None:
        """Take `node`'s app out of rotation: in each HAProxy, drain it, wait until no request is left on
        it (at most drain_timeout), disable it. mt-deploy refuses when it is the last app server UP there."""
        start = self.clock()
        taken = self.out.setdefault(node, [])
        for where, server in routes or self.routes_to(node):
            if (where, server) in taken:
                continue
            taken.append((where, server))  # before the call: an interrupt while ssh runs must still undo it
            result = self.command(where, ["server", server, "maint", "--wait", f"{self.opts.drain_timeout:g}"],
                                  self.opts.drain_timeout + SMALL_CMD_TIMEOUT_S)
            with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
                left = json.loads(result.stdout.strip().splitlines()[-1])["sessions_left"]
                if left:
                    self.log(f"{where}: {left} request(s) still on {node}'s app after {self.opts.drain_timeout:g} s; "
                             "disabled anyway")
        self.step("out", node, start)
        self.log(f"{node}: app out of rotation ({', '.join(f'{w} HAProxy {s}' for w, s in taken)}); the other app "
                 "serves every request")

    def put_back(self, node: str) -> None:
        """Back into rotation where take_out removed it, once HAProxy's checks see it UP."""
        start = self.clock()
        routes = list(self.out.get(node, []))
        for where, server in sorted(routes, key=lambda r: r[0] == self.active):  # the serving HAProxy last
            self.command(where, ["server", server, "ready", "--wait", f"{self.opts.drain_timeout:g}"],
                         self.opts.drain_timeout + SMALL_CMD_TIMEOUT_S)
            self.out[node].remove((where, server))
        self.out.pop(node, None)
        self.step("in", node, start)
        self.log(f"{node}: app back in rotation")

    def update(self, node: str, version: str, as_backup: bool) -> float:
        """Deploy and wait healthy; returns the deploy-plus-health seconds."""
        start = self.clock()
        self.deploy(node, version)
        waited = self.wait_ready(node, version, as_backup, self.opts.health_timeout)
        total = self.step("update", node, start, version=version, health_s=round(waited, 3))
        self.report.deploy_health_s[node] = total
        self.log(f"{node}: healthy on {version} after {waited:.1f} s (deploy + health {total:.1f} s)")
        return total

    def roll_back(self, node: str, previous: str | None, as_backup: bool) -> bool:
        if previous is None:
            self.log(f"{node}: cannot roll back: its previous version is unknown")
            return False
        self.log(f"{node}: rolling back to {previous}")
        try:
            self.deploy(node, previous)
            self.wait_ready(node, previous, as_backup, self.opts.health_timeout)
        except (Timeout, NodeCommandFailed, TransportError) as e:
            self.log(f"{node}: ROLLBACK FAILED: {e}")
            return False
        self.log(f"{node}: rolled back to {previous} and healthy")
        return True

    # -- commands -----------------------------------------------------------------------------------
    def rollout(self, version: str) -> int:
        self.report.version = version
        check_batch(self.opts.batch, len(self.workers))
        pair = self.survey()
        active, standby = pair.active, pair.standby
        workers = self.survey_workers(pair) if self.workers else {}
        pending = [w for w in self.workers if not workers[w].runs(version)]
        pair_done = all(pair.status[n].runs(version) for n in self.nodes)
        if pair_done and not pending:
            self.log(f"nothing to do: both nodes{' and every worker' if self.workers else ''} run {version} and "
                     f"are healthy; traffic stays on {active}")
            self.report.active_after = active
            return EXIT_OK
        if pending:
            # 0. The workers, --batch at a time; a version that fails on one stops here, before the pair.
            self.log(f"plan: update {', '.join(pending)} to {version}, {self.opts.batch} at a time, each out of "
                     f"rotation in both nodes' HAProxy while the other apps serve; then the pair's apps")
            self.update_workers(pending, version, {w: workers[w].version for w in pending})
            if pair_done:
                self.log(f"done: {version} on every worker; the pair already ran it; the reserved IP stayed on {active}")
                self.report.active_after = active
                return EXIT_OK
            self.confirm_still_active(pair)
        self.log(f"plan: update {standby}'s app (the standby) to {version}, then {active}'s, each out of rotation "
                 f"in HAProxy while the other app serves; the reserved IP stays on {active}")

        # 1. The standby's app first; the active's is not touched until the standby's is proven.
        if pair.status[standby].runs(version):
            self.log(f"{standby}: already runs {version} (an earlier run stopped after this step); checking it")
            try:
                self.wait_ready(standby, version, True, min(self.opts.health_timeout, 60.0))
            except Timeout as e:
                raise ToolError(EXIT_REFUSED, f"the standby ({standby}) runs {version} but did not stay ready: {e}. "
                                              "Nothing was changed") from None
        else:
            self.ensure_half([standby], f"{standby}'s app (the standby) was not touched")
            self.update_app(standby, version, pair.status[standby].version, as_backup=True,
                            failed=f"{version} never became healthy on the standby ({standby}); ",
                            untouched=f" The active node ({active}) was not touched and still serves "
                                      f"{pair.status[active].version}")

        if pair.status[active].runs(version):
            self.log(f"{active}: already runs {version}; done")
            self.report.active_after = active
            return EXIT_OK

        # 2. The active node's app, while the standby's app (now on the new version) serves.
        self.confirm_still_active(pair)
        self.ensure_half([active], f"{active}'s app (the active node's) was not touched")
        self.update_app(active, version, pair.status[active].version, as_backup=False,
                        failed=f"{version} serves on {standby}'s app, but it did not become healthy on {active}'s; ",
                        untouched=" The pair runs mixed versions. Find out why, then run the rollout again")
        self.log(f"done: {version} on both nodes{' and every worker' if self.workers else ''}; the reserved IP "
                 f"stayed on {active}")
        self.report.active_after = active
        return EXIT_OK

    def update_app(self, node: str, version: str, previous: str | None, as_backup: bool, failed: str,
                   untouched: str) -> None:
        """Out of rotation, deploy, healthy, back in. A version that fails is rolled back while still out
        (never served); the app goes back in only when healthy, else it stays out and that is degraded."""
        try:
            self.take_out(node)
        except (NodeCommandFailed, TransportError) as e:
            self.log(f"{node}: could not take its app out of rotation: {e}")
            self.put_back_if_healthy(node)
            raise ToolError(EXIT_FAILED, f"{node}'s app could not be taken out of rotation in HAProxy ({e}); "
                                         f"nothing was deployed on {node}") from None
        try:
            self.update(node, version, as_backup)
        except (Timeout, NodeCommandFailed, TransportError) as e:
            self.log(f"{node}: {version} failed: {e}")
            back = self.roll_back(node, previous, as_backup)
            if back:
                self.put_back(node)
            raise ToolError(EXIT_FAILED if back else EXIT_DEGRADED, failed
                            + (f"{node} is back on {previous} and in rotation." if back else
                               f"{node} could NOT be rolled back; its app stays out of rotation (the other app "
                               "serves alone, no fallback): fix it now.") + untouched) from None
        self.put_back(node)

    # -- app workers (appWorkers): app-only droplets behind both nodes' HAProxy ---------------------
    def survey_workers(self, pair: Pair) -> dict[str, NodeStatus]:
        """Every worker answers, is healthy, and is a server in both nodes' HAProxy; else nothing is touched."""
        results, errors = self.each(self.status, self.workers)
        for worker, e in sorted(errors.items()):
            if not isinstance(e, (TransportError, NodeCommandFailed)):
                raise e
            raise ToolError(EXIT_REFUSED, f"cannot read {worker}'s status: {e}. Nothing was changed") from None
        status: dict[str, NodeStatus] = results  # type: ignore[assignment]
        self.log("workers: " + "; ".join(f"{w}: {status[w].describe(app_only=True)}" for w in self.workers))
        for worker in self.workers:
            if not status[worker].app_ok:
                raise ToolError(EXIT_REFUSED, f"{worker} is not healthy ({status[worker].describe(app_only=True)}): "
                                              "a rollout could not tell a bad version from a broken worker. Nothing "
                                              f"was changed; fix {worker} (or remove it: appWorkers) and run again")
        for node in self.nodes:
            view = pair.status[node].haproxy
            missing = [w for w in self.workers if view is not None and w not in view]
            if missing:
                raise ToolError(EXIT_REFUSED, f"{node}'s HAProxy has no server {', '.join(missing)} although the stack "
                                              "outputs list it: its haproxy.cfg predates the worker. Nothing was "
                                              "changed; run `pulumi up` first")
        return status

    def ensure_half(self, taking: list[str], untouched: str) -> None:
        """Taking `taking` out of rotation must leave at least half of all app servers (the pair's two
        apps and every worker) healthy. Checked just before, from each one's own health check."""
        if not self.workers:
            return  # the pair alone: one app out of two, as always
        apps = [*self.nodes, *self.workers]
        results, _ = self.each(self.status, apps)
        healthy = [a for a in apps if isinstance(results.get(a), NodeStatus) and results[a].app_ok]  # type: ignore[union-attr]
        left = [a for a in healthy if a not in taking]
        if 2 * len(left) < len(apps):
            sick = [a for a in apps if a not in healthy]
            raise ToolError(EXIT_FAILED, f"taking {', '.join(taking)} out of rotation now would leave {len(left)} of "
                                         f"{len(apps)} app servers healthy, fewer than half ({', '.join(sick)} not "
                                         f"healthy). Stopped before it: {untouched}. Fix "
                                         f"{', '.join(sick)} and run the rollout again (it skips what is done)")

    def update_workers(self, pending: list[str], version: str, previous: dict[str, str | None]) -> None:
        """`pending` workers to `version`, --batch at a time: out of both HAProxies, deploys side by
        side, each healthy, back in. A batch with a worker that fails stops the rollout there: that
        worker rolled back while still out, the batch's healthy ones back in, the pair not touched."""
        done: list[str] = []
        for i in range(0, len(pending), self.opts.batch):
            batch = pending[i:i + self.opts.batch]
            untouched = (f"{', '.join(batch)} and the pair were not touched"
                         + (f"; {', '.join(done)} already run {version}" if done else ""))
            self.ensure_half(batch, untouched)
            for worker in batch:
                try:
                    self.take_out(worker)
                except (NodeCommandFailed, TransportError) as e:
                    self.log(f"{worker}: could not take its app out of rotation: {e}")
                    for w in batch:
                        self.put_back_if_healthy(w)
                    raise ToolError(EXIT_FAILED, f"{worker}'s app could not be taken out of rotation in HAProxy "
                                                 f"({e}); nothing was deployed on {', '.join(batch)}; the pair was "
                                                 "not touched") from None
            _, errors = self.each(lambda w: self.update(w, version, as_backup=False), batch)
            for e in errors.values():
                if not isinstance(e, (Timeout, NodeCommandFailed, TransportError)):
                    raise e
            for worker in batch:
                if worker not in errors:
                    self.put_back(worker)
            if errors:
                stuck = []
                for worker in (w for w in batch if w in errors):
                    self.log(f"{worker}: {version} failed: {errors[worker]}")
                    if self.roll_back(worker, previous[worker], as_backup=False):
                        self.put_back(worker)
                    else:
                        stuck.append(worker)
                failed = [w for w in batch if w in errors]
                ok = [*done, *(w for w in batch if w not in errors)]
                raise ToolError(EXIT_DEGRADED if stuck else EXIT_FAILED,
                                f"{version} never became healthy on {', '.join(failed)}; "
                                + (f"{', '.join(stuck)} could NOT be rolled back and stay out of rotation (the other "
                                   "apps serve): fix them now. " if stuck else
                                   f"{', '.join(failed)} back on the previous version and in rotation. ")
                                + "The pair was not touched and still serves its version"
                                + (f"; {', '.join(ok)} run {version}" if ok else "")) from None
            done += batch
            self.log(f"{', '.join(batch)}: on {version} and back in rotation ({len(done)} of {len(pending)} workers)")

    def put_back_if_healthy(self, node: str) -> bool:
        if not self.out.get(node):
            self.out.pop(node, None)
            return True
        try:
            st = self.status(node)
            if st.app_ok:
                self.put_back(node)
                return True
            self.log(f"{node}: its app stays out of rotation: it is not healthy ({st.describe()}); once it is, "
                     + "; ".join(f"`sudo {NODE_SCRIPT} server {s} ready` on {w}" for w, s in self.out[node]))
        except (TransportError, NodeCommandFailed) as e:
            self.log(f"{node}: could not check or put back its app: {e}; it is probably still out of rotation")
        return False

    def switch(self, active: str, standby: str, version: str | None = None) -> None:
        """The reserved IP to `standby` (running `version`, when known: for the log). The active node's
        HAProxy first forwards every request to the standby's app, so the requests that still reach it
        until the API's action completes (seconds) are served by the app that serves after the move too."""
        start = self.clock()
        self.take_out(active, [(active, "local")])
        self.drain(active)
        try:
            moved = self.wait_moved(standby)
        except Timeout as e:
            self.log(f"switchover failed: {e}; undraining {active} so it keeps serving")
            self.undrain(active)
            self.put_back(active)
            raise ToolError(EXIT_FAILED, f"{e}. {active} is undrained; check the API and keepalived logs "
                                         "(docs/rollout.md). Run again once the cause is fixed") from None
        self.active = standby
        self.step("move", standby, start)
        self.log(f"reserved IP moved to {standby} in {moved:.1f} s; clients are served by {standby}"
                 + (f" ({version})" if version else ""))

    def rejoin(self, node: str, version: str | None) -> None:
        self.undrain(node)
        try:
            self.wait_ready(node, version, True, self.opts.health_timeout, settle=0)
        except Timeout as e:
            raise ToolError(EXIT_DEGRADED, f"{node} was undrained but did not rejoin as a healthy BACKUP: {e}. "
                                           "Traffic is served, but there is no working standby: fix it now") from None
        self.put_back(node)
        self.log(f"{node}: BACKUP and healthy again (the standby)")

    def switchover(self) -> int:
        pair = self.survey()
        # The standby must stay ready for `settle` seconds: a node that is about to flap must not get traffic.
        try:
            self.wait_ready(pair.standby, None, True, min(self.opts.health_timeout, 60.0))
        except Timeout as e:
            raise ToolError(EXIT_REFUSED, f"the standby ({pair.standby}) did not stay ready: {e}. Nothing was changed") from None
        self.confirm_still_active(pair)
        self.switch(pair.active, pair.standby)
        self.rejoin(pair.active, None)
        self.log(f"done: traffic on {pair.standby}; {pair.active} is the standby")
        return EXIT_OK

    # -- clean-up -----------------------------------------------------------------------------------
    def on_interrupt(self) -> None:
        for node in list(self.drained):
            try:
                st = self.status(node)
                if not st.maintenance:
                    self.drained.remove(node)
                elif st.app_ok:
                    self.undrain(node)
                else:
                    self.log(f"{node}: left drained: its app is not healthy ({st.describe()}); undrain it with "
                             f"`sudo {NODE_SCRIPT} undrain` once it is")
            except (TransportError, NodeCommandFailed) as e:
                self.log(f"{node}: could not check or undrain it: {e}; it is probably still drained")
        for node in list(self.out):
            self.put_back_if_healthy(node)

    def execute(self, name: str, body: Callable[[], int]) -> int:
        """Locks, the body, the clean-up; whatever happens, locks are released and traffic is reported."""
        self.report.command = name
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def interrupt(signum, _frame):
            raise Interrupted(signal.Signals(signum).name)

        for sig in previous:
            signal.signal(sig, interrupt)
        code, message = EXIT_OK, ""
        try:
            try:
                self.lock_all()
                code = body()
            except Interrupted as e:
                for sig in previous:  # finish the clean-up; a second Ctrl-C must not leave a node drained
                    signal.signal(sig, lambda *_: self.log("clean-up in progress, please wait"))
                self.log(f"interrupted ({e}): cleaning up")
                code, message = EXIT_INTERRUPTED, f"interrupted by {e}"
                self.on_interrupt()
            except ToolError as e:
                code, message = e.code, str(e)
                self.log(f"FAILED: {e}")
            except (TransportError, NodeCommandFailed, ApiError, Timeout) as e:
                code, message = EXIT_DEGRADED, f"unexpected failure: {e}"
                self.log(f"FAILED: {message}")
            for sig in previous:
                signal.signal(sig, lambda *_: self.log("clean-up in progress, please wait"))
            if code not in (EXIT_OK, EXIT_USAGE) and self.locked:
                info = self.where()
                if code == EXIT_FAILED and not self.healthy_pair(info):
                    code = EXIT_DEGRADED
                    self.log("the pair is not back to one healthy MASTER and one healthy BACKUP: treat this as degraded")
            elif code == EXIT_OK:
                self.where()
        finally:
            self.unlock_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.report.exit_code = code
        self.report.message = message
        self.report.outcome = {EXIT_OK: "ok", EXIT_FAILED: "failed", EXIT_REFUSED: "refused",
                               EXIT_DEGRADED: "degraded", EXIT_INTERRUPTED: "interrupted"}.get(code, "error")
        self.report.duration_s = round(self.clock() - self.t0, 3)
        self.log(f"{name} {self.report.outcome} in {self.report.duration_s:.1f} s (exit {code})"
                 + "".join(f"; {n} deploy+health {s:.1f} s" for n, s in self.report.deploy_health_s.items()))
        return code


# ---------------------------------------------------------------------------------------------
# Day two: resize and reimage, one node per `pulumi up`.

REBUILD_KEYS = {"resize": "dropletSize", "reimage": "dropletImage"}
SLUG_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class PulumiCli:
    """The `pulumi` commands of a resize or reimage. `argv0` comes from --pulumi (tests run a stand-in)."""

    def __init__(self, argv0: Sequence[str], stack: str, log: Callable[[str], None], timeout: float = 3600.0,
                 project: str = "minitwit-ha"):
        self.argv0, self.stack, self.log, self.timeout, self.project = list(argv0), stack, log, timeout, project

    def run(self, *args: str) -> str:
        argv = [*self.argv0, *args, "--stack", self.stack]
        self.log(f"$ pulumi {' '.join(shlex.quote(a) for a in args)} --stack {self.stack}")
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.timeout, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PulumiFailed(f"`pulumi {args[0]}` could not run: {e}") from None
        if proc.returncode != 0:
            raise PulumiFailed(f"`pulumi {' '.join(args[:2])}` exited {proc.returncode}: {last_line(proc.stderr)}")
        return proc.stdout

    def set_overrides(self, overrides: dict[str, dict[str, str]]) -> None:
        # Empty string: no overrides (the schema's default); a map otherwise. Always one node at most.
        self.run("config", "set", "nodeOverrides", json.dumps(overrides, sort_keys=True) if overrides else "")

    def set(self, key: str, value: str) -> None:
        self.run("config", "set", key, value)

    def droplet_urn(self, node: str) -> str:
        return (f"urn:pulumi:{self.stack}::{self.project}::{self.project}:index:HaPair$"
                f"digitalocean:index/droplet:Droplet::minitwit-{self.stack}-{node}")

    def up(self, node: str) -> None:
        # The node's droplet and everything that depends on it: its own steps, and the peer's
        # firewall/HAProxy/keepalived when the droplet's addresses change (a reimage).
        self.run("up", "--yes", "--skip-preview", "--target", self.droplet_urn(node), "--target-dependents")

    def outputs(self) -> dict:
        try:
            return json.loads(self.run("stack", "output", "--json"))
        except ValueError:
            raise PulumiFailed("`pulumi stack output --json` did not print JSON") from None


class PulumiFailed(Exception):
    pass


class NodeRebuild:
    """resize/reimage on top of a Rollout: its survey, waits, switchover and locks."""

    def __init__(self, tool: Rollout, cli: PulumiCli, on_outputs: Callable[[dict], None] = lambda _doc: None):
        self.tool, self.cli, self.on_outputs = tool, cli, on_outputs

    def one_node(self, node: str, key: str, value: str, as_backup: bool) -> None:
        t = self.tool
        start = t.clock()
        t.log(f"{node}: {key}={value} through `pulumi up` of this node only")
        self.cli.set_overrides({node: {key: value}})
        self.cli.up(node)
        doc = self.cli.outputs()
        fresh = parse_outputs(doc)
        t.stack.droplets.update(fresh.droplets)   # a reimaged node has a new ID and address
        t.stack.hosts.update(fresh.hosts)
        self.on_outputs(doc)
        waited = t.wait_ready(node, None, as_backup, t.opts.health_timeout)
        t.step("pulumi-up", node, start, key=key, value=value, health_s=round(waited, 3))
        t.log(f"{node}: {key}={value} applied and healthy after {waited:.1f} s")

    def run(self, command: str, value: str) -> int:
        t, key = self.tool, REBUILD_KEYS[command]
        pair = t.survey()
        active, standby = pair.active, pair.standby
        t.log(f"plan: {key}={value} on the standby ({standby}), switch traffic to it, then on {active}; "
              "never both nodes in one `pulumi up`")
        try:
            self.one_node(standby, key, value, as_backup=True)
        except (PulumiFailed, Timeout) as e:
            raise ToolError(EXIT_FAILED, f"{key}={value} failed on the standby ({standby}): {e}. The active node "
                                         f"({active}) was not touched and serves; nodeOverrides still names {standby}: "
                                         "fix the cause and run again") from None
        t.confirm_still_active(pair)
        t.switch(active, standby, None)
        try:
            # The stack-wide value first, the override moves to the other node: the standby already has it.
            self.cli.set(key, value)
            self.one_node(active, key, value, as_backup=False)
        except (PulumiFailed, Timeout) as e:
            raise ToolError(EXIT_DEGRADED, f"{key}={value} serves on {standby} (active now), but it failed on "
                                           f"{active}: {e}. There is no working standby: fix {active} and run "
                                           "`pulumi up` for it (docs/operations.md)") from None
        t.rejoin(active, None)
        try:
            self.cli.set_overrides({})
        except PulumiFailed as e:
            t.log(f"WARNING: both nodes are done, but nodeOverrides could not be cleared ({e}); clear it with "
                  "`pulumi config set nodeOverrides ''`")
        t.log(f"done: {key}={value} on both nodes; traffic on {standby}; {active} is the standby; nodeOverrides "
              "cleared (`make plan` / `pulumi preview` shows no droplet change)")
        return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    common = argparse.ArgumentParser(add_help=False)
    src = common.add_mutually_exclusive_group(required=True)
    src.add_argument("--outputs", metavar="FILE", help="JSON of `pulumi stack output --json`")
    src.add_argument("--stack", metavar="NAME", help="run `pulumi stack output --json --stack NAME`")
    common.add_argument("--identity", metavar="PATH", help="the deploy user's SSH private key (default: ssh's own)")
    common.add_argument("--user", default="deploy", help="SSH user (default deploy)")
    common.add_argument("--known-hosts", metavar="PATH", help="known_hosts file with both droplets' host keys")
    common.add_argument("--strict-host-keys", choices=("yes", "accept-new"), default="yes",
                        help="StrictHostKeyChecking (default yes)")
    common.add_argument("--ssh-option", action="append", default=[], metavar="OPT",
                        help="extra `ssh -o OPT` (repeatable), e.g. BindAddress=192.0.2.200")
    common.add_argument("--remote-root", default="", metavar="PREFIX",
                        help="where a node's files live (empty on droplets; '{node}' is replaced by the node name)")
    common.add_argument("--no-ssh-multiplex", action="store_true",
                        help="a new SSH connection per command (default: one shared connection per node)")
    common.add_argument("--api-url", default="https://api.digitalocean.com", help="DigitalOcean API base URL")
    common.add_argument("--probe-path", default="latest",
                        help="path under app_url a client GETs to see who serves (default: latest)")
    common.add_argument("--health-timeout", type=float, default=300.0, help="seconds a node may take to become "
                        "healthy after a deploy (default 300)")
    common.add_argument("--move-timeout", type=float, default=60.0,
                        help="seconds the reserved IP may take to move (default 60)")
    common.add_argument("--deploy-timeout", type=float, default=1200.0,
                        help="seconds for the node's pull and compose up (default 1200)")
    common.add_argument("--drain-timeout", type=float, default=10.0,
                        help="seconds HAProxy's requests on an app may take to finish before the app is taken "
                             "out of rotation anyway (default 10; HAProxy's own server timeout is 5)")
    common.add_argument("--poll-interval", type=float, default=0.5, help=argparse.SUPPRESS)
    common.add_argument("--settle", type=float, default=2.0, help=argparse.SUPPRESS)
    common.add_argument("--report", metavar="FILE", help="write a JSON summary of the run (steps, timings, traffic)")
    parser = argparse.ArgumentParser(prog="rollout.py", description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rollout", parents=[common], help="rolling update to --version, standby first",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", required=True, help="the image tag to deploy (MINITWIT_VERSION)")
    p.add_argument("--batch", type=int, default=1, metavar="N",
                   help="app workers updated at once, out of rotation together (default 1; at most the number "
                        "of workers, and never so many that fewer than half of all app servers serve)")
    sub.add_parser("switchover", parents=[common], help="planned move of the reserved IP to the healthy standby",
                   epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    for command, flag, what in (("resize", "--size", "droplet size slug"), ("reimage", "--image", "image slug or ID")):
        p = sub.add_parser(command, parents=[common], help=f"{command} the droplets one at a time, standby first "
                           "(needs --stack and the Pulumi CLI)", epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument(flag, dest="value", required=True, help=f"the new {what}")
        p.add_argument("--pulumi", default="pulumi", metavar="CMD",
                       help="the Pulumi CLI to run (default: pulumi; split like a shell would)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    token = os.environ.get("DIGITALOCEAN_TOKEN", "").strip()
    log = Logger(secrets=[token])
    report = Report(command=args.command, version=getattr(args, "version", None))
    try:
        if args.command == "rollout" and not VERSION_RE.fullmatch(args.version):
            raise ToolError(EXIT_USAGE, f"--version {args.version[:80]!r} is not a docker tag "
                                        "([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})")
        for name in ("health_timeout", "move_timeout", "deploy_timeout", "poll_interval", "drain_timeout"):
            value = getattr(args, name)
            if not (math.isfinite(value) and value > 0):
                raise ToolError(EXIT_USAGE, f"--{name.replace('_', '-')} must be a positive number of seconds")
        if not token:
            raise ToolError(EXIT_USAGE, "DIGITALOCEAN_TOKEN is not set: the tool asks the API who holds the reserved "
                                        "IP (a read-only token is enough). It is read from the environment only")
        if args.identity and not os.path.isfile(args.identity):
            raise ToolError(EXIT_USAGE, f"--identity {args.identity}: no such file")
        if args.command in REBUILD_KEYS:
            if not args.stack:
                raise ToolError(EXIT_USAGE, f"{args.command} runs `pulumi config set` and `pulumi up` on a stack: "
                                            "give --stack NAME (not --outputs)")
            if not SLUG_RE.fullmatch(args.value):
                raise ToolError(EXIT_USAGE, f"{args.value[:80]!r} is not a DigitalOcean slug or image ID")
        stack = load_outputs(args.outputs, args.stack)
        if args.command == "rollout":
            check_batch(args.batch, len(stack.workers))
        transport = SshTransport(stack.hosts, args.user, args.identity, args.known_hosts, args.strict_host_keys,
                                 args.ssh_option, args.remote_root, multiplex=not args.no_ssh_multiplex)
        probe_url = urllib.parse.urljoin(stack.app_url if stack.app_url.endswith("/") else stack.app_url + "/",
                                         args.probe_path.lstrip("/"))
        opts = Options(args.health_timeout, args.move_timeout, args.deploy_timeout, args.poll_interval, args.settle,
                       args.drain_timeout, batch=getattr(args, "batch", 1))
        tool = Rollout(stack, transport, Api(args.api_url, token, stack.reserved_ip), Probe(probe_url), opts, log,
                       default_owner())
        with transport:
            if args.command == "rollout":
                log(f"rollout of {args.version} to the pair behind {stack.reserved_ip} "
                    f"({', '.join(sorted(stack.droplets))})"
                    + (f" and its workers ({', '.join(stack.workers)}), {args.batch} at a time" if stack.workers else ""))
                code = tool.execute("rollout", lambda: tool.rollout(args.version))
            elif args.command in REBUILD_KEYS:
                def keep_known_hosts(doc: dict) -> None:
                    # A reimaged node keeps its pinned host key but may get a new address.
                    if args.known_hosts and isinstance(doc.get("known_hosts"), str):
                        with open(args.known_hosts, "w", encoding="utf-8") as f:
                            f.write(doc["known_hosts"])

                cli = PulumiCli(shlex.split(args.pulumi), args.stack, log)
                rebuild = NodeRebuild(tool, cli, keep_known_hosts)
                code = tool.execute(args.command, lambda: rebuild.run(args.command, args.value))
            else:
                log(f"switchover of the pair behind {stack.reserved_ip}")
                code = tool.execute("switchover", tool.switchover)
        report = tool.report
    except ToolError as e:
        log(f"FAILED: {e}")
        code = e.code
        report.exit_code, report.outcome, report.message = code, "error", str(e)
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report.__dict__, f, indent=2)
            f.write("\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
