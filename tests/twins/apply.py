"""An offline `pulumi up` of the stack's commands against the twins.

`collect()` runs the program under Pulumi mocks (infra/offline.py) whose droplets answer with the
twins' addresses, and returns every `command:remote:Command` and `command:local:Command` with its
resolved inputs and dependencies. `Engine.apply()` runs them as pulumi-command does:

- a remote step: one SSH session as the connection's user with the connection's key, the
  `create` text as the session's command and `stdin` as its standard input; no environment sent
  (the ssh client reads no config file, so no SendEnv), no terminal;
- a local step: `sh -c create` in its `dir`, here from the operator's namespace;
- in dependency order (`depends_on`), independent steps in parallel; a failing step stops the
  apply (steps already running finish) and its output is kept;
- a step runs when it is new or when any input pulumi-command compares changed (create, stdin,
  triggers, environment, dir, update); otherwise it is left alone, as `pulumi up` leaves an
  unchanged resource. The recorded inputs live in the engine's state file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import infra.ha_pair
from infra.node import NodeFacts
from infra.offline import DoMocks, run_offline, unwrap
from infra.program import run
from infra.settings import DictSource
from tests.lab.lab import REPO
from tests.twins.twins import NODES, PRIVATE, PUBLIC, Twins, ns

REMOTE = "command:remote:Command"
LOCAL = "command:local:Command"
DROPLET = "digitalocean:index/droplet:Droplet"
# The inputs whose change makes pulumi-command run a step again (triggers replace; the others
# update, and without an `update` command an update runs `create`).
RERUN_INPUTS = ("create", "update", "stdin", "triggers", "environment", "dir")
OUTPUT_TAIL = 4000


@dataclass
class Step:
    name: str
    node: str                  # primary | standby | local
    kind: str                  # remote | local
    inputs: dict[str, Any]
    depends_on: list[str]
    timeout_s: float

    @property
    def digest(self) -> str:
        seen = {k: self.inputs.get(k) for k in RERUN_INPUTS}
        return hashlib.sha256(json.dumps(seen, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Result:
    name: str
    node: str
    rc: int
    seconds: float
    output: str = ""


@dataclass
class Collected:
    steps: list[Step]
    user_data: dict[str, str]     # per node: each carries its own pinned host key
    droplet_ids: dict[str, int]
    outputs: dict[str, Any] = field(default_factory=dict)


class TwinMocks(DoMocks):
    """DoMocks whose droplets answer with the twins' addresses, and whose host keys are real
    ed25519 keys (cloud-init installs them in the twins' sshd), made once and kept."""

    key_dir: Path | None = None

    def host_key(self, name: str) -> tuple[str, str]:
        if self.key_dir is None:
            return super().host_key(name)
        path = self.key_dir / name
        if not path.exists():
            self.key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
        return path.read_text(), Path(f"{path}.pub").read_text()

    def new_resource(self, args):
        rid, outputs = super().new_resource(args)
        if args.typ == DROPLET:
            node = next(n for n in NODES if args.name.endswith(n))
            outputs.update(ipv4Address=PUBLIC[node], ipv4AddressPrivate=PRIVATE[node])
        return [rid, outputs]


@contextmanager
def api_urls(api_url: str, metadata_url: str):
    """Render the nodes' failover.env with the fake DigitalOcean API's URLs (a named stand-in):
    the stack keeps NodeFacts' defaults, the real API and the link-local metadata address."""
    original = infra.ha_pair.NodeFacts
    # The fake API speaks http: mt-failover refuses to send a token over it unless told
    # ALLOW_INSECURE_HTTP=1 (rendered into failover.env), which the lab and the twins set.
    infra.ha_pair.NodeFacts = functools.partial(NodeFacts, api_url=api_url, metadata_url=metadata_url,
                                                allow_insecure_http=True)
    try:
        yield
    finally:
        infra.ha_pair.NodeFacts = original


def _timeout(opts) -> float:
    t = getattr(opts, "custom_timeouts", None) if opts is not None else None
    text = (t.create if t is not None else None) or "10m"
    return float(text[:-1]) * {"s": 1, "m": 60, "h": 3600}[text[-1]]


def collect(config: dict, secret_keys: frozenset[str], api_url: str, stack: str = "twins") -> Collected:
    twins = Twins()
    # The stack's generated provisioning key is the twins' key here, so the steps can log in as `provision`.
    mocks = TwinMocks(vpc_range=config.get("vpcIpRange", "10.110.16.0/24"), reserved_ip=config["_reserved_ip"],
                      provision_key=(twins.key.read_text(), twins.public_key))
    mocks.key_dir = twins.home / "host-keys"
    values = {k: v for k, v in config.items() if not k.startswith("_")}
    source = DictSource(values, secret_keys)
    with api_urls(api_url, f"{api_url}/metadata/v1"):
        resolved = run_offline(lambda: run(source, stack=stack, project_dir=REPO), mocks, stack=stack)
    steps = []
    for r in mocks.resources:
        if r.typ not in (REMOTE, LOCAL):
            continue
        opts = mocks.options.get(r.name)
        deps = opts.depends_on if opts is not None and opts.depends_on is not None else []
        deps = deps if isinstance(deps, list) else [deps]
        node = next((n for n in NODES if f"-{n}-" in r.name), "local")
        inputs = {k: unwrap(v) for k, v in r.inputs.items()}
        steps.append(Step(r.name, node, "remote" if r.typ == REMOTE else "local", inputs,
                          sorted(str(getattr(d, "_name", d)) for d in deps), _timeout(opts)))
    droplets = {next(n for n in NODES if r.name.endswith(n)): r for r in mocks.of_type(DROPLET)}
    user_data = {n: d.plain("userData") for n, d in droplets.items()}
    ids = {n: int(resolved["nodes"].value[n]["droplet_id"]) for n in NODES}
    return Collected(steps, user_data, ids, {k: v.value for k, v in resolved.items()})


class ApplyFailed(RuntimeError):
    def __init__(self, result: Result) -> None:
        super().__init__(f"step {result.name} on {result.node} failed (exit {result.rc}) after "
                         f"{result.seconds:.1f}s:\n{result.output[-OUTPUT_TAIL:]}")
        self.result = result


class Engine:
    """Runs collected steps against the twins; remembers each step's inputs like a stack's state."""

    def __init__(self, twins: Twins, state_file: Path, log=print, parallel: int = 4) -> None:
        self.twins = twins
        self.state_file = state_file
        self.log = log
        self.parallel = parallel
        self.state: dict[str, str] = json.loads(state_file.read_text()) if state_file.exists() else {}
        self._lock = threading.Lock()

    def pending(self, steps: list[Step]) -> list[Step]:
        return [s for s in steps if self.state.get(s.name) != s.digest]

    def apply(self, steps: list[Step]) -> list[Result]:
        """Run the steps whose inputs changed, in dependency order; raise ApplyFailed on the first failure."""
        names = {s.name for s in steps}
        todo = {s.name: s for s in self.pending(steps)}
        done: set[str] = {s.name for s in steps if s.name not in todo}
        results: list[Result] = []
        failure: Result | None = None
        running: dict[Future, Step] = {}
        with ThreadPoolExecutor(self.parallel) as pool:
            while (todo and failure is None) or running:
                if failure is None:
                    for name, step in list(todo.items()):
                        if all(d in done or d not in names for d in step.depends_on) and len(running) < self.parallel:
                            running[pool.submit(self._run, step)] = step
                            del todo[name]
                if not running:
                    missing = {n: [d for d in s.depends_on if d not in done] for n, s in todo.items()}
                    raise RuntimeError(f"dependency cycle or unknown dependency: {missing}")
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    step = running.pop(fut)
                    result = fut.result()
                    results.append(result)
                    self.log(f"twins: {step.name} ({step.node}) exit {result.rc} in {result.seconds:.1f}s")
                    if result.rc == 0:
                        done.add(step.name)
                        with self._lock:
                            self.state[step.name] = step.digest
                            self.state_file.write_text(json.dumps(self.state, indent=2, sort_keys=True))
                    elif failure is None:
                        failure = result
        if failure is not None:
            raise ApplyFailed(failure)
        return results

    def _run(self, step: Step) -> Result:
        start = time.monotonic()
        if step.kind == "local":
            argv = ["ip", "netns", "exec", ns("client"), "sh", "-c", step.inputs["create"]]
            rc, out = self._exec(argv, None, step.timeout_s, cwd=step.inputs.get("dir") or str(REPO))
            return Result(step.name, step.node, rc, time.monotonic() - start, out)
        conn = step.inputs["connection"]
        key = self.twins.home / "ssh" / "id_ed25519"
        if conn.get("privateKey", "").strip() != key.read_text().strip():
            return Result(step.name, step.node, 1, 0.0, "connection.privateKey is not the twins' key (config mismatch)")
        argv = [*self.twins.ssh_argv(host=conn["host"], user=conn["user"]), step.inputs["create"]]
        # dialErrorLimit -1: keep dialling until the step's timeout (a fresh droplet's sshd is late).
        retry = conn.get("dialErrorLimit", 10)
        attempts = 0
        while True:
            rc, out = self._exec(argv, step.inputs.get("stdin"), step.timeout_s - (time.monotonic() - start))
            attempts += 1
            unreachable = rc == 255 and ("Connection refused" in out or "timed out" in out
                                         or "No route" in out or "Permission denied" in out)
            if not unreachable or (retry != -1 and attempts >= retry) or time.monotonic() - start > step.timeout_s:
                return Result(step.name, step.node, rc, time.monotonic() - start, out)
            time.sleep(2)

    @staticmethod
    def _exec(argv: list[str], stdin: str | None, timeout: float, cwd: str | None = None) -> tuple[int, str]:
        try:
            proc = subprocess.run(argv, input=stdin if stdin is not None else "", capture_output=True, text=True,
                                  timeout=max(timeout, 1), cwd=cwd, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
        except subprocess.TimeoutExpired as exc:
            return 124, f"timed out after {timeout:.0f}s\n{exc.stdout or ''}{exc.stderr or ''}"
        return proc.returncode, proc.stdout + proc.stderr


def result_dict(r: Result) -> dict[str, Any]:
    d = asdict(r)
    d.pop("output")
    d["seconds"] = round(d["seconds"], 1)
    return d
