"""scripts/mt-deploy: the node side of a rollout, installed under a tmp_path root as on a droplet.

Each test installs the script (and mt-health, which `status` runs) at
<root>/usr/libexec/minitwit-ha/, writes the node's health.env and failover.env under
<root>/etc/minitwit-ha/ and points DOCKER at a stub that records every call (its arguments, the
MINITWIT_VERSION it was given in the environment, and the app's .env as it was at that moment).
The script runs by its installed path with a bare environment, as `sudo -n` runs it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"

STUB = r'''#!/usr/bin/env python3
import json, os, sys
control = json.load(open(CONTROL))
args = sys.argv[1:]
app_dir = os.path.dirname(args[args.index("-f") + 1])
try:
    dotenv = open(os.path.join(app_dir, ".env")).read()
except FileNotFoundError:
    dotenv = None
call = args[5] if len(args) > 5 else "?"
with open(LOG, "a") as f:
    f.write(json.dumps({"args": args[5:], "env_version": os.environ.get("MINITWIT_VERSION"), "dotenv": dotenv}) + "\n")
if call == "config":
    print("minitwit")
elif call == "ps":
    print("minitwit" if control.get("running", True) else "")
if control.get("fail") == call:
    print("Error response from daemon: manifest for registry/minitwit:nope not found", file=sys.stderr)
    sys.exit(18)
'''


class App(BaseHTTPRequestHandler):
    status = 200
    version = "v1"

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(App.status)
        self.send_header("X-App-Version", App.version)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def app():
    server = ThreadingHTTPServer(("127.0.0.1", 0), App)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    App.status, App.version = 200, "v1"
    yield server
    server.shutdown()
    server.server_close()


class Node:
    def __init__(self, root: Path, health_url: str) -> None:
        self.root = root
        libexec = root / "usr/libexec/minitwit-ha"
        libexec.mkdir(parents=True)
        for name in ("mt-deploy", "mt-health", "mt_observe.py"):
            shutil.copy2(SCRIPTS / name, libexec / name)
        self.script = libexec / "mt-deploy"
        self.app_dir = root / "srv/minitwit"
        self.app_dir.mkdir(parents=True)
        (self.app_dir / "compose.yaml").write_text("services:\n  minitwit:\n    image: x:${MINITWIT_VERSION}\n")
        self.dotenv = self.app_dir / ".env"
        self.dotenv.write_text("MINITWIT_IMAGE=registry.example/minitwit\nMINITWIT_VERSION=v1\n")
        self.flag = root / "var/lib/minitwit-ha/maintenance"
        self.lib = root / "var/lib/minitwit-ha"
        self.state = root / "run/minitwit-ha"
        self.control = root / "stub.json"
        self.log = root / "docker.log"
        self.set_stub()
        docker = root / "bin/docker"
        docker.parent.mkdir()
        docker.write_text(f"#!{sys.executable}\nCONTROL = {str(self.control)!r}\nLOG = {str(self.log)!r}\n"
                          + STUB.split("\n", 1)[1])
        docker.chmod(0o755)
        etc = root / "etc/minitwit-ha"
        etc.mkdir(parents=True)
        (etc / "health.env").write_text(
            f"HEALTH_URL={health_url}\nHEALTH_TIMEOUT_S=2\nCOMPOSE_FILE={self.app_dir}/compose.yaml\n"
            f"COMPOSE_PROJECT=minitwit\nDOCKER={docker}\nMAINTENANCE_FLAG={self.flag}\n"
            f"TRACK_FILE={root}/run/minitwit-ha-health/status\n")
        (etc / "failover.env").write_text(
            f"NODE_NAME=primary\nSTATE_DIR={self.state}\nLOG_DIR={self.lib}\nKEEPALIVED_PIDFILE={root}/run/keepalived.pid\n")

    def set_stub(self, **control: object) -> None:
        self.control.write_text(json.dumps(control))

    def calls(self) -> list[dict]:
        return [json.loads(ln) for ln in self.log.read_text().splitlines()] if self.log.exists() else []

    def run(self, *args: str, script: Path | None = None) -> subprocess.CompletedProcess:
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}  # what sudo leaves: no settings
        return subprocess.run([str(script or self.script), *args], env=env, capture_output=True, text=True, timeout=30)

    def json(self, *args: str) -> tuple[int, dict]:
        proc = self.run(*args)
        return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}


@pytest.fixture
def node(tmp_path, app):
    return Node(tmp_path / "node", f"http://127.0.0.1:{app.server_address[1]}/latest")


# ------------------------------------------------------------------------------------------------
# deploy


def test_deploy_pulls_the_new_tag_first_then_swaps_the_env_file_atomically_then_recreates(node):
    inode = node.dotenv.stat().st_ino
    code, out = node.json("deploy", "v2")
    assert code == 0
    assert out["deployed"] == "v2" and out["previous"] == "v1" and out["node"] == "primary"
    pull, up = node.calls()
    # The pull sees the new tag from the environment while .env still names the old one: a failed
    # pull changes nothing.
    assert pull["args"] == ["pull", "--quiet"] and pull["env_version"] == "v2" and "MINITWIT_VERSION=v1" in pull["dotenv"]
    assert up["args"] == ["up", "-d", "--remove-orphans"] and "MINITWIT_VERSION=v2" in up["dotenv"]
    assert node.dotenv.read_text() == "MINITWIT_IMAGE=registry.example/minitwit\nMINITWIT_VERSION=v2\n"
    assert node.dotenv.stat().st_ino != inode                    # replaced by rename, never rewritten in place
    assert oct(node.dotenv.stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in node.app_dir.iterdir()) == [".env", "compose.yaml"]  # no temp file left


def test_deploy_and_status_publish_the_version_for_node_exporter(node):
    prom = node.root / "var/lib/prometheus/node-exporter/minitwit_ha_app.prom"  # Debian's dir under the root
    assert node.json("status")[0] == 0
    assert 'minitwit_ha_app_version_info{node="primary",version="v1"} 1\n' in prom.read_text()
    assert node.json("deploy", "v2")[0] == 0
    text = prom.read_text()
    assert 'version="v2"} 1' in text and 'version="v1"' not in text  # one series: the version now configured
    assert "# TYPE minitwit_ha_app_version_info gauge" in text
    assert [p.name for p in prom.parent.iterdir()] == ["minitwit_ha_app.prom"]  # no temp file for a scrape


def test_an_unwritable_metrics_dir_never_fails_a_deploy(node):
    blocker = node.root / "var/lib/prometheus"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the directory should be\n")
    proc = node.run("deploy", "v2")
    assert proc.returncode == 0, proc.stderr
    assert "cannot write the version metric" in proc.stderr
    assert node.dotenv.read_text().endswith("MINITWIT_VERSION=v2\n")


def test_deploy_creates_the_env_file_when_there_is_none(node):
    node.dotenv.unlink()
    code, out = node.json("deploy", "2026.11.25-abc123")
    assert code == 0 and out["previous"] is None
    assert node.dotenv.read_text() == "MINITWIT_VERSION=2026.11.25-abc123\n"


def test_a_failed_pull_changes_nothing(node):
    node.set_stub(fail="pull")
    proc = node.run("deploy", "nope")
    assert proc.returncode == 5
    assert "pull failed (exit 18): Error response from daemon: manifest for registry/minitwit:nope not found" in proc.stderr
    assert "MINITWIT_VERSION=v1" in node.dotenv.read_text()
    assert [c["args"][0] for c in node.calls()] == ["pull"]


def test_a_failed_up_is_exit_5_with_dockers_message(node):
    node.set_stub(fail="up")
    proc = node.run("deploy", "v2")
    assert proc.returncode == 5 and "docker compose up failed" in proc.stderr


@pytest.mark.parametrize("version", ["", "v2 v3", "v2;reboot", "../v2", "-v2", ".v2", "x" * 129, "v2\n"])
def test_deploy_refuses_anything_but_a_docker_tag(node, version):
    proc = node.run("deploy", version)
    assert proc.returncode == 2 and "invalid VERSION" in proc.stderr
    assert node.calls() == [] and "MINITWIT_VERSION=v1" in node.dotenv.read_text()


# ------------------------------------------------------------------------------------------------
# drain, undrain, status


def test_drain_and_undrain_are_idempotent_and_status_shows_the_flag(node):
    for _ in range(2):
        assert node.run("drain", "ci-run-7").returncode == 0
    assert node.flag.exists() and "ci-run-7" in node.flag.read_text()
    code, st = node.json("status")
    assert st["maintenance"] is True and st["healthy"] is False and st["app_health"] == 0  # app fine, node drained
    for _ in range(2):
        assert node.run("undrain").returncode == 0
    assert not node.flag.exists()
    assert node.json("status")[1]["healthy"] is True


def test_status_reports_versions_health_and_vrrp_state(node, app):
    App.version = "v7"
    node.state.mkdir(parents=True)
    (node.state / "vrrp-state").write_text(json.dumps({"state": "BACKUP", "since": 1234.5}))
    code, st = node.json("status")
    assert code == 0
    assert st["node"] == "primary" and st["vrrp_state"] == "BACKUP" and st["vrrp_since"] == 1234.5
    assert st["configured_version"] == "v1" and st["running_version"] == "v7" and st["http_status"] == 200
    assert st["healthy"] is True and st["app_health"] == 0 and st["lock"] is None
    assert st["keepalived_running"] is False            # the pidfile names no keepalived


def test_status_sees_a_failing_app_a_stopped_service_and_a_stale_master(node, app):
    App.status = 503
    node.state.mkdir(parents=True)
    (node.state / "vrrp-state").write_text(json.dumps({"state": "MASTER", "since": 1.0}))
    code, st = node.json("status")
    assert st["app_health"] == 1 and st["healthy"] is False and st["http_status"] == 503
    assert st["vrrp_state"] == "STALE"                   # recorded MASTER, keepalived not running
    App.status = 200
    node.set_stub(running=False)
    assert node.json("status")[1]["app_health"] == 2     # compose service not running


def test_status_without_any_vrrp_state_is_unknown_and_an_app_that_does_not_answer_has_no_version(node, app):
    health = node.root / "etc/minitwit-ha/health.env"
    health.write_text(health.read_text().replace(f":{app.server_address[1]}/", ":9/"))
    code, st = node.json("status")
    assert code == 0 and st["vrrp_state"] == "UNKNOWN"
    assert st["running_version"] is None and st["http_status"] is None and st["app_health"] == 1


# ------------------------------------------------------------------------------------------------
# the rollout lock


def test_the_lock_has_one_owner_at_a_time_and_says_who(node):
    assert node.run("lock", "laptop:alice:1").returncode == 0
    proc = node.run("lock", "gha-run-42")
    assert proc.returncode == 3
    assert json.loads(proc.stdout)["holder"]["owner"] == "laptop:alice:1"
    assert node.run("lock", "laptop:alice:1").returncode == 0            # the owner refreshes it
    assert node.run("unlock", "gha-run-42").returncode == 3              # not yours
    assert node.json("status")[1]["lock"]["owner"] == "laptop:alice:1"
    assert node.run("unlock", "laptop:alice:1").returncode == 0
    assert node.run("unlock", "laptop:alice:1").returncode == 0          # nothing held: fine
    assert node.run("lock", "gha-run-42").returncode == 0


def test_a_stale_lock_is_taken_over_and_a_live_one_only_with_force(node):
    node.lib.mkdir(parents=True)
    (node.lib / "rollout.lock").write_text(json.dumps({"owner": "dead-run", "since": time.time() - 120, "ttl_s": 60}))
    code, out = node.json("lock", "new-run", "--ttl", "600")
    assert code == 0 and out["previous"] == "dead-run"
    assert node.run("unlock", "someone-else").returncode == 3
    assert node.run("unlock", "someone-else", "--force").returncode == 0
    assert not (node.lib / "rollout.lock").exists()


def test_concurrent_lockers_get_exactly_one_winner(node):
    procs = [subprocess.Popen([str(node.script), "lock", f"run-{i}"], env={"PATH": "/usr/bin:/bin"},
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for i in range(6)]
    codes = [p.wait(timeout=30) for p in procs]
    for p in procs:
        p.stdout.close()
    assert sorted(codes) == [0, 3, 3, 3, 3, 3]


@pytest.mark.parametrize("owner", ["", "a b", "x;y", "o" * 129])
def test_lock_owner_is_validated(node, owner):
    assert node.run("lock", owner).returncode == 2


# ------------------------------------------------------------------------------------------------
# configuration and usage


def test_it_must_run_from_its_installed_path(node):
    proc = node.run("status", script=SCRIPTS / "mt-deploy")
    assert proc.returncode == 4 and "run the installed copy" in proc.stderr


def test_a_missing_env_file_is_a_configuration_error(node):
    os.unlink(node.root / "etc/minitwit-ha/health.env")
    proc = node.run("status")
    assert proc.returncode == 4 and "health.env not found" in proc.stderr


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["deploy"], ["deploy", "v1", "v2"], ["lock"], ["status", "x"]])
def test_usage_errors_exit_2(node, args):
    proc = node.run(*args)
    assert proc.returncode == 2 and "usage: mt-deploy" in proc.stderr


# ------------------------------------------------------------------------------------------------
# server: HAProxy's runtime API, against a fake admin socket


class FakeHaproxy:
    """HAProxy's admin socket as the runtime API answers it (one command per connection): `show
    stat` CSV for backend `app`, `set server app/NAME state ready|drain|maint`. `sessions` drop by
    one per `show stat` once a server no longer gets new requests (they finish); `alive` says
    whether a server's app answers HAProxy's checks (ready: UP, else DOWN)."""

    HEADER = "# pxname,svname,qcur,qmax,scur,smax,slim,stot,status,weight\n"

    def __init__(self, path: str) -> None:
        self.path = path
        self.status = {"local": "UP", "peer": "UP"}
        self.sessions = {"local": 0, "peer": 0}
        self.alive = {"local": True, "peer": True}
        self.sticky_sessions = False   # sessions never finish (a stuck request)
        self.refuse: str | None = None
        self.commands: list[str] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(16)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def answer(self, command: str) -> str:
        self.commands.append(command)
        if command == "show stat":
            rows = [self.HEADER]
            for name in self.status:
                if self.status[name] != "UP" and not self.sticky_sessions and self.sessions[name]:
                    self.sessions[name] -= 1
                rows.append(f"app,{name},0,0,{self.sessions[name]},0,,9,{self.status[name]},1\n")
            rows.append("app,BACKEND,0,0,0,0,,9,UP,2\n")
            return "".join(rows) + "\n"
        parts = command.split()
        if len(parts) == 5 and parts[:2] == ["set", "server"] and parts[3] == "state":
            name = parts[2].removeprefix("app/")
            if self.refuse or name not in self.status:
                return (self.refuse or "No such server.") + "\n\n"
            self.status[name] = {"drain": "DRAIN", "maint": "MAINT"}.get(
                parts[4], "UP" if self.alive[name] else "DOWN")
            return "\n"
        return "Unknown command.\n\n"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                conn.sendall(self.answer(data.decode().strip()).encode())

    def sets(self) -> list[str]:
        return [c for c in self.commands if c.startswith("set ")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def haproxy(node):
    short = tempfile.mkdtemp(prefix="mtd-", dir="/tmp")  # a UNIX socket path must stay under 108 bytes
    fake = FakeHaproxy(f"{short}/admin.sock")
    health = node.root / "etc/minitwit-ha/health.env"
    health.write_text(health.read_text() + f"HAPROXY_SOCKET={fake.path}\n")
    yield fake
    fake.close()
    shutil.rmtree(short, ignore_errors=True)


def test_server_maint_drains_first_waits_until_no_session_is_left_then_disables(node, haproxy):
    haproxy.sessions["local"] = 3
    code, out = node.json("server", "local", "maint")
    assert code == 0
    assert haproxy.sets() == ["set server app/local state drain", "set server app/local state maint"]
    # maint came only once the sessions had finished (each poll lets one finish)
    polls_before_maint = haproxy.commands[:haproxy.commands.index("set server app/local state maint")]
    assert polls_before_maint.count("show stat") >= 4
    assert out["state"] == "MAINT" and out["previous"] == "UP" and out["sessions_left"] == 0
    assert out["servers"]["peer"]["status"] == "UP"


def test_server_maint_gives_up_waiting_after_wait_seconds_and_says_how_many_sessions_were_left(node, haproxy):
    haproxy.sessions["peer"], haproxy.sticky_sessions = 2, True
    t0 = time.monotonic()
    proc = node.run("server", "peer", "maint", "--wait", "0.5")
    assert proc.returncode == 0, proc.stderr
    assert 0.5 <= time.monotonic() - t0 < 5
    out = json.loads(proc.stdout)
    assert out["state"] == "MAINT" and out["sessions_left"] == 2
    assert "sessions still open" in proc.stderr


def test_server_refuses_to_take_out_the_only_app_server_that_is_up(node, haproxy):
    haproxy.status["peer"] = "DOWN"
    proc = node.run("server", "local", "maint")
    assert proc.returncode == 7
    assert "only app server UP" in proc.stderr and "peer DOWN" in proc.stderr
    assert haproxy.sets() == []                            # nothing was changed
    assert haproxy.status["local"] == "UP"


def test_server_ready_waits_until_the_checks_see_it_up_and_fails_when_they_do_not(node, haproxy):
    haproxy.status["local"] = "MAINT"
    code, out = node.json("server", "local", "ready")
    assert code == 0 and out["state"] == "UP" and out["previous"] == "MAINT"
    haproxy.status["local"], haproxy.alive["local"] = "MAINT", False
    t0 = time.monotonic()
    proc = node.run("server", "local", "ready", "--wait", "0.4")
    assert proc.returncode == 7 and "did not see it UP within 0.4 s (status DOWN)" in proc.stderr
    assert time.monotonic() - t0 < 5


def test_server_state_is_idempotent_and_a_server_already_out_may_go_further_out(node, haproxy):
    haproxy.status["peer"] = "DOWN"
    haproxy.status["local"] = "DRAIN"                      # already out: disabling it changes no capacity
    code, out = node.json("server", "local", "maint")
    assert code == 0 and out["state"] == "MAINT"
    assert node.json("server", "local", "maint")[0] == 0


def test_server_reports_haproxy_refusals_and_a_missing_socket_as_exit_6(node, haproxy):
    haproxy.refuse = "Permission denied"
    proc = node.run("server", "peer", "drain")
    assert proc.returncode == 7 and "HAProxy refused `set server app/peer state drain`: Permission denied" in proc.stderr
    haproxy.close()
    os.unlink(haproxy.path)
    proc = node.run("server", "peer", "drain")
    assert proc.returncode == 7 and "admin socket" in proc.stderr and "not found" in proc.stderr


def test_worker_servers_are_reported_taken_out_and_count_as_app_servers_up(node, haproxy):
    # appWorkers: both nodes' HAProxy list worker-1, worker-2, ...; a rollout takes each one out.
    for name in ("worker-1", "worker-2"):
        haproxy.status[name], haproxy.sessions[name], haproxy.alive[name] = "UP", 0, True
    assert set(node.json("status")[1]["haproxy"]) == {"local", "peer", "worker-1", "worker-2"}
    code, out = node.json("server", "worker-2", "maint")
    assert code == 0 and out["state"] == "MAINT" and haproxy.status["worker-2"] == "MAINT"
    # With both pair apps out, worker-1 still serves: local may go; then worker-1 is the last one UP.
    haproxy.status["peer"] = "MAINT"
    assert node.run("server", "local", "maint").returncode == 0
    proc = node.run("server", "worker-1", "maint")
    assert proc.returncode == 7 and "only app server UP" in proc.stderr and haproxy.status["worker-1"] == "UP"
    assert node.json("server", "worker-2", "ready")[1]["state"] == "UP"


@pytest.mark.parametrize("args", [["server", "backup", "maint"], ["server", "worker-0", "maint"],
                                  ["server", "worker-x", "maint"], ["server", "local", "disable"],
                                  ["server", "local"], ["server", "local", "maint", "--wait", "soon"]])
def test_server_usage_errors_exit_2(node, args):
    assert node.run(*args).returncode == 2


def test_status_shows_haproxys_view_of_both_apps_and_null_without_haproxy(node, haproxy):
    haproxy.status["peer"], haproxy.sessions["peer"] = "MAINT", 0
    st = node.json("status")[1]
    assert st["haproxy"] == {"local": {"status": "UP", "sessions": 0}, "peer": {"status": "MAINT", "sessions": 0}}
    haproxy.close()
    os.unlink(haproxy.path)
    code, st = node.json("status")
    assert code == 0 and st["haproxy"] is None


def test_the_socket_path_and_server_names_are_the_ones_the_stack_renders():
    from infra import haproxy as rendered
    from infra.node import NodePaths

    text = (SCRIPTS / "mt-deploy").read_text()
    assert f'HAPROXY_SOCKET = "{NodePaths().haproxy_admin_socket}"' in text
    assert f'HAPROXY_BACKEND = "{rendered.BACKEND}"' in text
    assert f'HAPROXY_SERVERS = ("{rendered.LOCAL_SERVER}", "{rendered.PEER_SERVER}")' in text
