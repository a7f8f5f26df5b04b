"""scripts/mt-failover, run as keepalived runs it, against the fake DigitalOcean API.

Every test gets its own FakeDO on an ephemeral loopback port, its own env file, 0600 token file,
STATE_DIR and LOG_DIR under tmp_path. After every test two things are checked for all tests:
the token never appeared in anything the script wrote or printed, and nothing ever asked for a
deprecated floating_ip path.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lab.fakedo import Droplet, FakeDO

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "mt-failover"
TOKEN = "dop_v1_" + "a" * 64
OTHER_TOKEN = "dop_v1_" + "b" * 64
IP = "203.0.113.10"
ME, PEER = 101, 102
IP_PATH = f"/v2/reserved_ips/{IP}"
ACTIONS_PATH = f"{IP_PATH}/actions"
LINE_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z minitwit-ha\[primary\] \S")
# Keys the script reads from the environment; scrubbed so the caller's shell cannot leak in.
SCRIPT_KEYS = {
    "NODE_NAME", "RESERVED_IP", "DROPLET_ID", "DO_API_URL", "METADATA_URL", "TOKEN_FILE", "STATE_DIR",
    "LOG_DIR", "LOG_FILE", "HTTP_TIMEOUT_S", "ASSIGN_DEADLINE_S", "RETRY_MODE", "BACKOFF_BASE_S",
    "BACKOFF_MAX_S", "RETRY_FIXED_S", "RETRY_MAX_ATTEMPTS", "POLL_INTERVAL_S", "RECONCILE_INTERVAL_S",
    "MT_FAILOVER_ENV", "KEEPALIVED_PIDFILE", "METRICS_DIR", "TRACK_FILE", "ALERT_WEBHOOK_FILE", "ALERT_ATTEMPTS",
    "ALERT_RETRY_S", "TOKEN_CHECK_INTERVAL_S", "RECONCILE_GRACE_S", "ALLOW_INSECURE_HTTP",
    "MAINTENANCE_FLAG", "HANDOVER_TIMEOUT_S", "HANDOVER_POLL_S",
}


@pytest.fixture(scope="module")
def python_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PATH entry whose `python3` is this interpreter (or $MT_SCRIPT_PYTHON, e.g. a 3.10 to check
    the droplets' oldest python): the script still starts through its `#!/usr/bin/env python3`
    line, as keepalived starts it, without a slow version-manager shim in between."""
    directory = tmp_path_factory.mktemp("python-bin")
    (directory / "python3").symlink_to(os.environ.get("MT_SCRIPT_PYTHON", sys.executable))
    return directory


class Node:
    """One droplet's view: env file, token file, state and log dirs, and a way to run the script."""

    def __init__(self, root: Path, fake: FakeDO, python_bin: Path):
        self.root = root
        self.python_bin = python_bin
        self.fake = fake
        self.state_dir = root / "run"
        self.log_dir = root / "lib"
        self.log_file = root / "failover.log"
        self.token_file = root / "do-token"
        self.env_file = root / "failover.env"
        self.metrics_dir = root / "metrics"
        self.webhook_file = root / "alert-webhook"
        self.captured: list[str] = []
        self.write_token(TOKEN)
        self.values = {
            "NODE_NAME": "primary",
            "RESERVED_IP": IP,
            "DROPLET_ID": str(ME),
            "DO_API_URL": fake.url,
            "METADATA_URL": fake.url + "/metadata/v1",
            "TOKEN_FILE": str(self.token_file),
            "STATE_DIR": str(self.state_dir),
            "LOG_DIR": str(self.log_dir),
            "LOG_FILE": str(self.log_file),
            "HTTP_TIMEOUT_S": "1",
            "ASSIGN_DEADLINE_S": "10",
            "RETRY_MODE": "backoff",
            "BACKOFF_BASE_S": "0.02",
            "BACKOFF_MAX_S": "0.2",
            "RETRY_FIXED_S": "0.3",
            "RETRY_MAX_ATTEMPTS": "5",
            "POLL_INTERVAL_S": "0.02",
            "RECONCILE_INTERVAL_S": "0.1",
            "RECONCILE_GRACE_S": "0",
            "TOKEN_CHECK_INTERVAL_S": "60",
            "METRICS_DIR": str(self.metrics_dir),
            "ALERT_WEBHOOK_FILE": str(self.webhook_file),  # absent: alerts off
            "ALERT_RETRY_S": "0.05",
            "ALLOW_INSECURE_HTTP": "1",  # the fake API speaks plain http, like the lab's
        }
        self.write_env()

    def write_token(self, token: str, mode: int = 0o600) -> None:
        self.token_file.write_text(token + "\n")
        self.token_file.chmod(mode)

    def write_env(self, **overrides: str) -> None:
        self.values.update(overrides)
        lines = ["# written by test_mt_failover"] + [f"{k}={v}" for k, v in self.values.items()]
        self.env_file.write_text("\n".join(lines) + "\n")

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SCRIPT_KEYS}
        env["MT_FAILOVER_ENV"] = str(self.env_file)
        env["PATH"] = f"{self.python_bin}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(SCRIPT), *args], env=self.env(), capture_output=True, text=True,
                              timeout=timeout, check=False)
        self.captured += [proc.stdout, proc.stderr]
        return proc

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([str(SCRIPT), *args], env=self.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def finish(self, proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
        out, err = proc.communicate(timeout=timeout)
        self.captured += [out, err]
        return proc.returncode, out, err

    def notify(self, state: str, priority: str = "150") -> subprocess.CompletedProcess[str]:
        return self.run("notify", "INSTANCE", "minitwit", state, priority)

    def force_state(self, state: str) -> None:
        """Write vrrp-state as a notify would have (the contract's JSON), without any API call."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        doc = {"node": "primary", "type": "INSTANCE", "instance": "minitwit", "state": state,
               "priority": 150, "since": time.time(), "previous": None}
        (self.state_dir / "vrrp-state").write_text(json.dumps(doc))

    def vrrp_state(self) -> dict:
        return json.loads((self.state_dir / "vrrp-state").read_text())

    def transitions(self) -> list[dict]:
        path = self.log_dir / "transitions.log"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def everything_written(self) -> str:
        """All output and every file the script may have written (not the token file itself)."""
        texts = list(self.captured)
        for directory in (self.state_dir, self.log_dir):
            if directory.is_dir():
                texts += [p.read_text(errors="replace") for p in directory.rglob("*") if p.is_file()]
        if self.log_file.exists():
            texts.append(self.log_file.read_text())
        return "\n".join(texts)


@pytest.fixture
def fake(request: pytest.FixtureRequest):
    extra = getattr(request, "param", {})  # indirect parametrisation: extra FakeDO arguments
    droplets = [
        Droplet(id=ME, name="primary", public_ipv4="192.0.2.11", private_ipv4="198.51.100.11"),
        Droplet(id=PEER, name="standby", public_ipv4="192.0.2.12", private_ipv4="198.51.100.12"),
    ]
    with FakeDO(token=TOKEN, droplets=droplets, reserved_ips={IP: None},
                metadata_by_source={"127.0.0.1": ME}, **extra) as server:
        yield server
        paths = [r["path"] for r in server.requests()]
        assert not [p for p in paths if "floating_ip" in p], "deprecated floating_ip path requested"


@pytest.fixture
def node(tmp_path: Path, fake: FakeDO, python_bin: Path):
    n = Node(tmp_path, fake, python_bin)
    yield n
    written = n.everything_written()
    assert TOKEN not in written, "the token leaked into output, logs or state files"
    assert OTHER_TOKEN not in written, "a (wrong) token leaked into output, logs or state files"


def posts(fake: FakeDO) -> list[dict]:
    return [r for r in fake.requests() if r["method"] == "POST" and r["path"] == ACTIONS_PATH]


def accepted_posts(fake: FakeDO) -> list[dict]:
    """Assign POSTs the API accepted (201: an action started). A takeover POSTs before it reads
    the holder, so a POST the API refused (422 already assigned, 401, 404) moved nothing."""
    return [r for r in posts(fake) if r["status"] == 201]


def takeover(node, match: str):  # noqa: ANN001, ANN201
    """The command whose requests `match` faults: a takeover (notify) POSTs first, so a fault on the
    GET of the holder is met by the operator's `assign` (which reads the holder first)."""
    if match == "get":
        node.force_state("MASTER")
        return node.run("assign")
    return node.notify("MASTER")


def api_requests(fake: FakeDO) -> list[dict]:
    return [r for r in fake.requests() if r["path"].startswith("/v2/")]


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


# -- the happy paths ------------------------------------------------------------------------------


def test_master_assigns_with_one_post_then_polls(node: Node, fake: FakeDO):
    fake.set_action_delay(0.3)  # long enough that the script has to poll the action
    proc = node.notify("MASTER")
    assert proc.returncode == 0, proc.stderr
    assert fake.holder(IP) == ME
    sent = posts(fake)
    assert len(sent) == 1
    assert sent[0]["body"] == {"type": "assign", "droplet_id": ME}
    assert type(sent[0]["body"]["droplet_id"]) is int  # noqa: E721 - "101" would be a string
    polls = [r for r in fake.requests() if r["method"] == "GET" and r["path"].startswith(ACTIONS_PATH + "/")]
    assert len(polls) >= 2 and polls[0]["seq"] > sent[0]["seq"]
    assert all(r["auth"] == "ok" for r in api_requests(fake))
    assert re.search(r"\bassigned ip=203\.0\.113\.10 droplet=101 .*elapsed=\d+\.\d{3}", proc.stderr)
    state = node.vrrp_state()
    assert (state["state"], state["priority"], state["instance"]) == ("MASTER", 150, "minitwit")
    # one documented line per event, the same on stderr and in LOG_FILE
    stderr_lines = [line for line in proc.stderr.splitlines() if line]
    assert stderr_lines and all(LINE_RE.match(line) for line in stderr_lines), proc.stderr
    assert node.log_file.read_text().splitlines() == stderr_lines
    # the droplet-ID sanity check asks the metadata service once, never with the token
    meta = [r for r in fake.requests() if r["path"].startswith("/metadata/")]
    assert [(r["path"], r["auth"]) for r in meta] == [("/metadata/v1/id", "missing")]


def test_already_assigned_makes_no_post(node: Node, fake: FakeDO):
    fake.set_holder(IP, ME, run_hook=False)
    node.force_state("MASTER")
    proc = node.run("assign")  # the operator's assign reads the holder first: no POST at all
    assert proc.returncode == 0, proc.stderr
    assert "already assigned" in proc.stderr
    assert posts(fake) == []


def test_a_takeover_of_an_ip_already_here_starts_no_action(node: Node, fake: FakeDO):
    fake.set_holder(IP, ME, run_hook=False)
    proc = node.notify("MASTER")  # POSTs first (one round trip less per failover): the API says 422
    assert proc.returncode == 0, proc.stderr
    assert "already assigned" in proc.stderr
    assert len(posts(fake)) == 1 and accepted_posts(fake) == [] and fake.moves() == []


def test_non_master_states_only_record(node: Node, fake: FakeDO):
    for state, priority in [("BACKUP", "100"), ("MASTER", "150"), ("FAULT", "0"), ("BACKUP", "100"),
                            ("STOP", "100")]:
        before = len(fake.requests())
        proc = node.notify(state, priority)
        assert proc.returncode == 0, proc.stderr
        if state != "MASTER":
            assert len(fake.requests()) == before, f"{state}: a non-MASTER notify must not touch the network"
        state_doc = node.vrrp_state()
        assert (state_doc["state"], state_doc["priority"]) == (state, int(priority))
    steps = [(t["from"], t["to"], t["priority"]) for t in node.transitions()]
    assert steps == [(None, "BACKUP", 100), ("BACKUP", "MASTER", 150), ("MASTER", "FAULT", 0),
                     ("FAULT", "BACKUP", 100), ("BACKUP", "STOP", 100)]
    last = node.transitions()[-1]
    assert last["node"] == "primary" and last["instance"] == "minitwit" and {"ts", "epoch"} <= set(last)
    assert node.vrrp_state()["previous"] == "BACKUP"
    assert "vrrp transition BACKUP -> STOP" in proc.stderr
    assert not list(node.state_dir.glob(".vrrp-state*")), "temporary state file left behind"


def test_group_notify_without_priority_is_recorded(node: Node, fake: FakeDO):
    proc = node.run("notify", "GROUP", "minitwit-group", "BACKUP")  # sync groups pass no priority
    assert proc.returncode == 0, proc.stderr
    last = node.transitions()[-1]
    assert (last["type"], last["instance"], last["to"], last["priority"]) == ("GROUP", "minitwit-group",
                                                                            "BACKUP", None)


# -- transient failures are retried ---------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 422])
def test_5xx_and_pending_are_retried_with_backoff(node: Node, fake: FakeDO, status: int):
    fake.inject(status, count=2, match="assign")
    started = time.monotonic()
    proc = node.notify("MASTER")
    assert proc.returncode == 0, proc.stderr
    assert fake.holder(IP) == ME
    assert [r["status"] for r in posts(fake)] == [status, status, 201]
    assert f"HTTP {status}" in proc.stderr
    # backoff (base 0.02, max 0.2) - never the tutorial's fixed 3-second sleeps
    assert time.monotonic() - started < 3


def test_429_waits_at_least_retry_after(node: Node, fake: FakeDO):
    fake.inject(429, count=1, match="assign", retry_after=1)
    proc = node.notify("MASTER")
    assert proc.returncode == 0, proc.stderr
    first, second = posts(fake)
    assert first["status"] == 429 and second["status"] == 201
    assert second["ts"] - first["ts"] >= 1.0
    assert "rate limited" in proc.stderr


def test_429_retry_after_is_capped_by_the_deadline(node: Node, fake: FakeDO):
    node.write_env(ASSIGN_DEADLINE_S="0.5")
    fake.inject(429, count=1, match="assign", retry_after=30)
    started = time.monotonic()
    proc = node.notify("MASTER")
    assert proc.returncode == 3, proc.stderr
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("match", ["get", "assign"])
def test_timeout_is_retried(node: Node, fake: FakeDO, match: str):
    node.write_env(HTTP_TIMEOUT_S="0.3")
    fake.inject("timeout", count=1, match=match, hang_s=5)
    started = time.monotonic()
    proc = takeover(node, match)
    assert proc.returncode == 0, proc.stderr
    assert fake.holder(IP) == ME
    assert "no answer within 0.3 s" in proc.stderr
    assert time.monotonic() - started < 3, "the hung request was not cut off by HTTP_TIMEOUT_S"


@pytest.mark.parametrize(("kind", "match"), [("html", "get"), ("garbage", "assign"), ("empty", "action"),
                                             ("html", "action")])
def test_unexpected_bodies_are_retried(node: Node, fake: FakeDO, kind: str, match: str):
    fake.inject(kind, count=2, match=match)
    proc = takeover(node, match)
    assert proc.returncode == 0, proc.stderr
    assert fake.holder(IP) == ME
    assert "not JSON" in proc.stderr or "no action object" in proc.stderr


def test_deadline_gives_up_with_exit_3_and_a_clear_line(node: Node, fake: FakeDO):
    node.write_env(ASSIGN_DEADLINE_S="0.5")
    fake.inject(500, count=1000, match="assign")
    started = time.monotonic()
    proc = node.notify("MASTER")
    elapsed = time.monotonic() - started
    assert proc.returncode == 3, proc.stderr
    assert 0.5 <= elapsed < 3
    assert len(posts(fake)) >= 2
    line = last_line(proc.stderr)
    assert "gave up assigning reserved IP 203.0.113.10 to droplet 101" in line
    assert re.search(r"attempts=\d+ last_error=\".*HTTP 500.*\" elapsed=0\.[5-9]\d\d exit=3", line), line
    assert fake.holder(IP) is None


def test_fixed_mode_sleeps_retry_fixed_between_attempts(node: Node, fake: FakeDO):
    node.write_env(RETRY_MODE="fixed", RETRY_FIXED_S="0.25")
    fake.inject(500, count=2, match="assign")
    proc = node.notify("MASTER")
    assert proc.returncode == 0, proc.stderr
    stamps = [r["ts"] for r in posts(fake)]
    assert len(stamps) == 3
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert all(0.25 <= gap < 1.0 for gap in gaps), gaps


def test_fixed_mode_stops_after_retry_max_attempts(node: Node, fake: FakeDO):
    node.write_env(RETRY_MODE="fixed", RETRY_FIXED_S="0.05", RETRY_MAX_ATTEMPTS="3")
    fake.inject(500, count=1000, match="assign")
    proc = node.notify("MASTER")
    assert proc.returncode == 3, proc.stderr
    assert len(posts(fake)) == 3
    assert "RETRY_MAX_ATTEMPTS=3" in last_line(proc.stderr)


class FlakyEdge:
    """An on_assign hook that fails the first time: the fake then marks the action errored."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, ip: str, droplet: object) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("edge down")


@pytest.mark.parametrize("fake", [{"on_assign": FlakyEdge()}], indirect=True)
def test_errored_action_is_assigned_again(node: Node, fake: FakeDO):
    proc = node.notify("MASTER")
    assert proc.returncode == 0, proc.stderr
    assert len(posts(fake)) == 2
    assert "errored" in proc.stderr
    assert fake.holder(IP) == ME


# -- permanent refusals ---------------------------------------------------------------------------


def test_rejected_token_exits_4_at_once(node: Node, fake: FakeDO):
    node.write_token(OTHER_TOKEN)
    proc = node.notify("MASTER")
    assert proc.returncode == 4, proc.stderr
    line = last_line(proc.stderr)
    assert f"token rejected: check {node.token_file} (needs reserved_ip:update)" in line
    assert len(api_requests(fake)) == 1, "a 401 must not be retried"
    assert accepted_posts(fake) == []


def test_unknown_reserved_ip_exits_4_without_assigning(node: Node, fake: FakeDO):
    node.write_env(RESERVED_IP="203.0.113.99")
    proc = node.notify("MASTER")
    assert proc.returncode == 4, proc.stderr
    assert "reserved IP 203.0.113.99 not found in this account" in proc.stderr
    assert "check RESERVED_IP" in proc.stderr
    assert accepted_posts(fake) == []


# -- leaving MASTER aborts ------------------------------------------------------------------------


def wait_until(predicate, timeout: float = 10.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_backup_during_retries_aborts_with_exit_5(node: Node, fake: FakeDO):
    # fixed mode: the script sleeps 0.8 s after the first failure, the BACKUP notify lands inside it.
    node.write_env(RETRY_MODE="fixed", RETRY_FIXED_S="0.8", ASSIGN_DEADLINE_S="20")
    fake.inject(500, count=1000, match="assign")
    master = node.start("notify", "INSTANCE", "minitwit", "MASTER", "150")
    try:
        wait_until(lambda: len(posts(fake)) >= 1)
        assert node.notify("BACKUP", "100").returncode == 0
        recorded = time.time()
        code, _, err = node.finish(master, timeout=10)
    finally:
        master.kill()
    assert code == 5, err
    assert "no longer MASTER" in last_line(err)
    assert [r for r in posts(fake) if r["ts"] > recorded] == []


def test_backup_while_polling_aborts_with_exit_5(node: Node, fake: FakeDO):
    fake.set_action_delay(5)
    master = node.start("notify", "INSTANCE", "minitwit", "MASTER", "150")
    try:
        wait_until(lambda: len(posts(fake)) == 1)
        assert node.notify("BACKUP", "100").returncode == 0
        started = time.monotonic()
        code, _, err = node.finish(master, timeout=10)
    finally:
        master.kill()
    assert code == 5, err
    assert time.monotonic() - started < 2
    assert len(posts(fake)) == 1


def test_concurrent_notifies_post_once(node: Node, fake: FakeDO):
    fake.set_action_delay(0.3)
    procs = [node.start("notify", "INSTANCE", "minitwit", "MASTER", "150") for _ in range(2)]
    try:
        results = [node.finish(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [code for code, _, _ in results] == [0, 0], results
    assert len(accepted_posts(fake)) == 1, "the lock must serialise assigns: the second finds the IP here"
    assert fake.holder(IP) == ME
    # The second either finds the IP here, or (forked second, started first) stands down as the
    # older transition: "arrived after a later one".
    assert any("already assigned" in err or "arrived after a later one" in err for _, _, err in results), results


def test_assign_refuses_when_not_master_unless_forced(node: Node, fake: FakeDO):
    node.force_state("BACKUP")
    proc = node.run("assign")
    assert proc.returncode == 5, proc.stderr
    assert "vrrp-state is BACKUP, not MASTER (an operator can use assign --force)" in proc.stderr
    assert api_requests(fake) == []
    proc = node.run("assign", "--force")
    assert proc.returncode == 0, proc.stderr
    assert fake.holder(IP) == ME


# -- configuration is validated before any request ------------------------------------------------


def break_config(node: Node, how: str) -> str:
    """Apply one misconfiguration; return what the error line must name."""
    if how == "env file missing":
        node.env_file.unlink()
        return str(node.env_file)
    if how.startswith("RESERVED_IP") or how.startswith("DROPLET_ID") or how.startswith("DO_API_URL"):
        key, _, value = how.partition("=")
        node.write_env(**{key: value})
        return key
    if how == "token missing":
        node.token_file.unlink()
    elif how == "token empty":
        node.write_token("   ")
    elif how == "token 0644":
        node.write_token(TOKEN, 0o644)
    elif how == "token two lines":
        node.write_token(TOKEN + "\n" + TOKEN)
    elif how == "token is a directory":
        node.token_file.unlink()
        node.token_file.mkdir(mode=0o700)
    return str(node.token_file)


@pytest.mark.parametrize("how", [
    "env file missing",
    "RESERVED_IP=203.0.113.256",
    "RESERVED_IP=reserved-ip",
    "RESERVED_IP=",
    "DROPLET_ID=0",
    "DROPLET_ID=-101",
    "DROPLET_ID=101.0",
    "DROPLET_ID=primary",
    "DO_API_URL=ftp://127.0.0.1",
    "token missing",
    "token empty",
    "token 0644",
    "token two lines",
    "token is a directory",
])
def test_configuration_errors_exit_2_before_any_request(node: Node, fake: FakeDO, how: str):
    named = break_config(node, how)
    proc = node.notify("MASTER")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "configuration error" in line]
    assert len(errors) == 1, proc.stderr
    assert named in errors[0] and "exit=2" in errors[0]
    assert fake.requests() == []


def test_token_mode_error_says_how_to_fix(node: Node):
    node.write_token(TOKEN, 0o640)
    proc = node.run("status")
    assert proc.returncode == 2
    assert "mode 0640" in proc.stderr and f"chmod 600 {node.token_file}" in proc.stderr


def test_transition_is_recorded_even_when_the_token_is_broken(node: Node, fake: FakeDO):
    node.write_token(TOKEN, 0o644)
    proc = node.notify("MASTER")
    assert proc.returncode == 2
    assert node.vrrp_state()["state"] == "MASTER"  # the reconciler acts on it once the token is fixed
    assert fake.requests() == []


def test_environment_overrides_the_env_file(node: Node, fake: FakeDO):
    node.write_env(DROPLET_ID="999")  # wrong in the file...
    env = node.env() | {"DROPLET_ID": str(ME)}  # ...fixed by the environment
    proc = subprocess.run([str(SCRIPT), "assign", "--force"], env=env, capture_output=True, text=True,
                          timeout=30, check=False)
    node.captured += [proc.stdout, proc.stderr]
    assert proc.returncode == 0, proc.stderr
    assert posts(fake)[0]["body"]["droplet_id"] == ME


# -- droplet ID sanity through the metadata service -----------------------------------------------


def test_metadata_naming_another_droplet_is_refused(node: Node, fake: FakeDO):
    node.write_env(DROPLET_ID=str(PEER))  # the standby's env file on the primary
    proc = node.notify("MASTER")
    assert proc.returncode == 2, proc.stderr
    assert "metadata service says this droplet is 101" in last_line(proc.stderr)
    assert api_requests(fake) == []


@pytest.mark.parametrize("kind", ["garbage", "html", "timeout"])
def test_metadata_unusable_is_a_warning_only(node: Node, fake: FakeDO, kind: str):
    node.write_env(HTTP_TIMEOUT_S="0.3")
    fake.inject(kind, count=1, match="metadata", hang_s=5)
    proc = node.notify("MASTER")
    assert proc.returncode == 0, proc.stderr
    assert "metadata droplet ID unavailable, trusting DROPLET_ID" in proc.stderr
    assert fake.holder(IP) == ME


# -- reclaim, reconcile, status -------------------------------------------------------------------


def test_reclaim_assigns_only_when_master(node: Node, fake: FakeDO):
    fake.set_holder(IP, PEER, run_hook=False)
    node.force_state("BACKUP")
    proc = node.run("reclaim")
    assert proc.returncode == 0, proc.stderr
    assert api_requests(fake) == [] and fake.holder(IP) == PEER
    node.force_state("MASTER")
    proc = node.run("reclaim")
    assert proc.returncode == 0, proc.stderr
    assert fake.holder(IP) == ME


def test_reconcile_once_reclaims_from_the_peer(node: Node, fake: FakeDO):
    fake.set_holder(IP, PEER, run_hook=False)
    node.force_state("MASTER")
    proc = node.run("reconcile", "--once")
    assert proc.returncode == 0, proc.stderr
    assert "reserved IP on droplet 102, reclaiming" in proc.stderr
    assert fake.holder(IP) == ME
    assert len(posts(fake)) == 1


def test_reconcile_leaves_the_move_to_a_running_notify(node: Node, fake: FakeDO):
    fake.set_holder(IP, PEER, run_hook=False)
    fake.set_action_delay(0.6)
    master = node.start("notify", "INSTANCE", "minitwit", "MASTER", "150")
    try:
        wait_until(lambda: len(posts(fake)) == 1)
        proc = node.run("reconcile", "--once")
        code, _, err = node.finish(master)
    finally:
        master.kill()
    assert proc.returncode == 0 and code == 0, proc.stderr + err
    assert "reclaiming" not in proc.stderr
    assert len(posts(fake)) == 1 and fake.holder(IP) == ME


def test_reconcile_once_on_a_backup_only_checks_the_token(node: Node, fake: FakeDO):
    fake.set_holder(IP, PEER, run_hook=False)
    node.force_state("BACKUP")
    proc = node.run("reconcile", "--once")
    assert proc.returncode == 0, proc.stderr
    assert [(r["method"], r["path"], r["auth"]) for r in api_requests(fake)] == [("GET", IP_PATH, "ok")]
    assert fake.holder(IP) == PEER


def test_reconcile_once_reports_api_errors(node: Node, fake: FakeDO):
    node.force_state("MASTER")
    fake.inject(500, count=1, match="get")
    proc = node.run("reconcile", "--once")
    assert proc.returncode == 3, proc.stderr
    assert "cannot read the reserved IP's holder" in proc.stderr


def test_reconcile_daemon_reclaims_survives_errors_and_stops_on_sigterm(node: Node, fake: FakeDO):
    fake.set_holder(IP, ME, run_hook=False)
    node.force_state("MASTER")
    daemon = node.start("reconcile")
    try:
        holder_gets = lambda: [r for r in fake.requests() if r["path"] == IP_PATH]  # noqa: E731
        wait_until(lambda: len(holder_gets()) >= 2)
        fake.set_holder(IP, PEER, run_hook=False)  # someone moved it away (split brain, console)
        wait_until(lambda: fake.holder(IP) == ME)
        fake.inject(500, count=1000, match="get")
        seen = len(holder_gets())
        wait_until(lambda: len(holder_gets()) >= seen + 4)  # several failing passes
        fake.clear_faults()
        # The recovery is logged after the good answer arrives: wait for the line, not the request.
        wait_until(lambda: node.log_file.exists() and "API reachable again" in node.log_file.read_text())
        stopped = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code, _, err = node.finish(daemon, timeout=5)
    finally:
        daemon.kill()
    assert code == 0, err
    assert time.monotonic() - stopped < 2
    assert "reserved IP on droplet 102, reclaiming" in err
    assert err.count("cannot read the reserved IP's holder") == 1, "an ongoing error must be logged once"
    assert "API reachable again" in err
    assert "reconciler stopped (SIGTERM)" in last_line(err)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_prints_holder(node: Node, fake: FakeDO):
    node.force_state("MASTER")
    proc = node.run("status")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert {k: doc[k] for k in ("node", "droplet_id", "reserved_ip", "vrrp_state", "holder")} == {
        "node": "primary", "droplet_id": ME, "reserved_ip": IP, "vrrp_state": "MASTER", "holder": None}
    fake.set_holder(IP, PEER, run_hook=False)
    assert json.loads(node.run("status").stdout)["holder"] == PEER


def test_status_reports_an_unreachable_api(node: Node):
    node.write_env(DO_API_URL=f"http://127.0.0.1:{closed_port()}")
    proc = node.run("status")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["holder"].startswith("error: ") and doc["vrrp_state"] == "UNKNOWN"


def test_script_is_an_executable_stdlib_only_python3_script():
    source = SCRIPT.read_text()
    assert source.startswith("#!/usr/bin/env python3\n") and os.access(SCRIPT, os.X_OK)
    imported = set(re.findall(r"^(?:import|from) ([a-z_]+)", source, re.M))
    assert imported <= set(sys.stdlib_module_names) | {"__future__", "mt_observe"}, imported
    # the one shipped helper module is stdlib-only too
    helper = set(re.findall(r"^\s*(?:import|from) ([a-z_]+)", (SCRIPT.parent / "mt_observe.py").read_text(), re.M))
    assert helper <= set(sys.stdlib_module_names) | {"__future__"}, helper


# -- bad input never moves the reserved IP away from a healthy MASTER (issue 7) -------------------
#
# The peer (droplet 102) is the healthy MASTER holding the IP. Whatever garbage this node's
# inputs hold, every command it runs as a BACKUP (notify, reclaim, reconcile, status) ends with a
# defined exit code and a clear last line, and the IP stays on the peer.

def _peer_holds_it(fake: FakeDO) -> None:
    fake.set_holder(IP, PEER, run_hook=False)


def _as_backup_node_runs_everything(node: Node) -> dict[str, int]:
    return {
        "notify BACKUP": node.notify("BACKUP", "100").returncode,
        "notify FAULT": node.notify("FAULT", "100").returncode,
        "reclaim": node.run("reclaim").returncode,
        "reconcile --once": node.run("reconcile", "--once").returncode,
    }


@pytest.mark.parametrize("kind", ["html", "garbage", "empty", 500])
def test_garbage_from_api_or_metadata_never_moves_the_ip(node: Node, fake: FakeDO, kind):
    _peer_holds_it(fake)
    fake.inject(kind, count=100, match="any")
    codes = _as_backup_node_runs_everything(node)
    # reconcile on a BACKUP checks the token: 3 says the API could not answer; it never moves the IP
    assert codes == {"notify BACKUP": 0, "notify FAULT": 0, "reclaim": 0, "reconcile --once": 3}
    assert posts(fake) == [] and fake.holder(IP) == PEER


@pytest.mark.parametrize("how", ["env file missing", "token missing", "token empty", "token 0644",
                                 "RESERVED_IP=203.0.113.256"])
def test_broken_config_on_a_backup_never_moves_the_ip(node: Node, fake: FakeDO, how: str):
    _peer_holds_it(fake)
    named = break_config(node, how)
    for args in (("notify", "INSTANCE", "minitwit", "BACKUP", "100"), ("reclaim",), ("reconcile", "--once")):
        proc = node.run(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        errors = [ln for ln in proc.stderr.splitlines() if "configuration error" in ln]
        assert len(errors) == 1 and named in errors[0] and "exit=2" in errors[0], (args, proc.stderr)
    assert posts(fake) == [] and fake.holder(IP) == PEER


def test_wrong_reserved_ip_on_a_master_refuses_and_leaves_the_real_ip_alone(node: Node, fake: FakeDO):
    _peer_holds_it(fake)
    node.write_env(RESERVED_IP="203.0.113.99")  # not in this account: the API says 404
    proc = node.notify("MASTER")
    assert proc.returncode == 4, proc.stderr
    assert "203.0.113.99" in last_line(proc.stderr) and "RESERVED_IP" in last_line(proc.stderr)
    assert posts(fake) == [] and fake.holder(IP) == PEER


@pytest.mark.parametrize("kind", ["html", "garbage", "empty"])
def test_garbage_answers_to_a_master_end_in_one_clear_give_up_line(node: Node, fake: FakeDO, kind):
    _peer_holds_it(fake)
    node.write_env(ASSIGN_DEADLINE_S="1")
    fake.inject(kind, count=1000, match="any")
    proc = node.notify("MASTER")
    assert proc.returncode == 3, proc.stderr
    assert "gave up" in last_line(proc.stderr) or "giving up" in last_line(proc.stderr), proc.stderr
    assert fake.holder(IP) == PEER


def test_a_master_whose_keepalived_died_is_not_master_for_the_reconciler(node: Node, fake: FakeDO, tmp_path):
    """keepalived killed without its STOP notify: vrrp-state still says MASTER. The reconciler must not
    keep reclaiming the IP from the node that really is MASTER now."""
    _peer_holds_it(fake)
    pidfile = tmp_path / "keepalived.pid"
    pidfile.write_text("999999\n")  # no such process
    node.write_env(KEEPALIVED_PIDFILE=str(pidfile))
    node.force_state("MASTER")
    proc = node.run("reconcile", "--once")
    assert proc.returncode == 0, proc.stderr
    assert posts(fake) == [] and fake.holder(IP) == PEER
    status = json.loads(node.run("status").stdout)
    assert status["vrrp_state"] == "STALE"


def test_a_master_with_a_live_keepalived_still_reclaims(node: Node, fake: FakeDO, tmp_path):
    _peer_holds_it(fake)
    fake_keepalived = tmp_path / "keepalived"  # a process whose name is keepalived
    fake_keepalived.write_bytes(Path("/bin/sleep").read_bytes())
    fake_keepalived.chmod(0o755)
    proc = subprocess.Popen([str(fake_keepalived), "30"])
    try:
        (tmp_path / "keepalived.pid").write_text(f"{proc.pid}\n")
        node.write_env(KEEPALIVED_PIDFILE=str(tmp_path / "keepalived.pid"))
        node.force_state("MASTER")
        result = node.run("reconcile", "--once")
        assert result.returncode == 0, result.stderr
        assert fake.holder(IP) == ME and len(posts(fake)) == 1
    finally:
        proc.kill()
        proc.wait()


def test_a_notify_that_started_late_never_overwrites_a_later_transition(node: Node, fake: FakeDO):
    """keepalived forks FAULT then BACKUP within a millisecond at every start; the BACKUP notify can
    record first. The FAULT one, forked earlier (lower start time), must then leave BACKUP standing."""
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    node.notify("BACKUP")
    doc = node.vrrp_state()
    assert doc["order"][0] == boot and doc["order"][2] > 0  # who recorded it, in keepalived's fork order
    later = {**doc, "order": [boot, 2**62, 1]}           # as if recorded by a notify forked after this one
    (node.state_dir / "vrrp-state").write_text(json.dumps(later))
    before = len(node.transitions())
    proc = node.notify("FAULT")
    assert proc.returncode == 0 and node.vrrp_state()["state"] == "BACKUP", proc.stderr
    assert "vrrp transition to FAULT arrived after a later one: not recorded" in proc.stderr
    assert len(node.transitions()) == before
    proc = node.notify("MASTER")  # a late MASTER notify: no assign for a node that is not MASTER now
    assert proc.returncode == 0 and node.vrrp_state()["state"] == "BACKUP" and posts(fake) == []
    # Recorded by an earlier notify, or in an earlier boot: the new transition is recorded.
    (node.state_dir / "vrrp-state").write_text(json.dumps({**doc, "order": ["another-boot", 2**62, 1]}))
    assert node.notify("FAULT").returncode == 0 and node.vrrp_state()["state"] == "FAULT"
    assert node.notify("BACKUP").returncode == 0 and node.vrrp_state()["state"] == "BACKUP"


def test_holder_writes_the_weight_the_metadata_service_gives_before_keepalived_starts(node: Node, fake: FakeDO,
                                                                                      tmp_path: Path):
    """keepalived's ExecStartPre: a node stopped while the IP moved away must start with weight 0,
    or it would outrank the new holder and take the IP back (a second move)."""
    holder = tmp_path / "holder"
    node.write_env(HOLDER_FILE=str(holder))
    holder.write_text("1\n")  # left from when this node held the IP
    fake.set_holder(IP, PEER, run_hook=False)
    assert node.run("holder").returncode == 0
    assert holder.read_text() == "0\n"
    fake.set_holder(IP, ME, run_hook=False)
    assert node.run("holder").returncode == 0
    assert holder.read_text() == "1\n"
    assert posts(fake) == []  # it only reads the metadata service: no API call, no token
