"""scripts/mt-health: every exit code, against a throwaway local HTTP server and a stub `docker`.

The script runs as keepalived runs it: a bare environment (PATH with tests/unit/stubs first,
MT_HEALTH_ENV), no shell profile. `DOCKER_STUB_*` variables steer the stub (see its header).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.needs import missing_binaries, need, not_root

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "mt-health"
STUBS = Path(__file__).resolve().parent / "stubs"
SERVICES = "web db-migrate proxy"


class HealthServer:
    """A local health endpoint on an ephemeral port. It answers the statuses queued in `queue`
    first, then `mode`: an HTTP status, or "hang" to hold the request (until stop).
    `served` records (time, answer) per request. Also used by test_mt_healthwatch."""

    def __init__(self) -> None:
        self.mode: int | str = 200
        self.queue: list[int | str] = []
        self.served: list[tuple[float, int | str]] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                with owner._lock:
                    mode = owner.queue.pop(0) if owner.queue else owner.mode
                    owner.served.append((time.monotonic(), mode))
                if mode == "hang":
                    owner._release.wait(30)
                    return
                self.send_response(int(mode))
                if 300 <= int(mode) < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/latest"

    def __enter__(self) -> HealthServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def server():
    with HealthServer() as s:
        yield s


def installed_copy(root: Path, script: Path) -> Path:
    """The script as a node has it: a root-owned 0755 copy in a directory anyone may enter.

    An unprivileged user cannot run the checkout's own file when the checkout sits somewhere only
    root may enter (a clone in root's home, mode 0700), and a node never runs it from there either."""
    libexec = root / "libexec"
    libexec.mkdir(mode=0o755, exist_ok=True)
    copy = libexec / script.name
    shutil.copy2(script, copy)
    copy.chmod(0o755)
    return copy


class Health:
    def __init__(self, root: Path, url: str, script: Path = SCRIPT):
        self.root = root
        self.script = script
        self.env_file = root / "health.env"
        self.flag = root / "maintenance"
        self.compose_file = root / "compose.yaml"
        self.compose_file.write_text("services: {}\n")  # the stub never reads it; mt-health checks it exists
        self.docker_log = root / "docker-calls.log"
        self.values = {
            "HEALTH_URL": url,
            "HEALTH_TIMEOUT_S": "0.5",
            "COMPOSE_FILE": str(self.compose_file),
            "COMPOSE_PROJECT": "minitwit",
            "MAINTENANCE_FLAG": str(self.flag),
        }
        self.stub = {"DOCKER_STUB_SERVICES": SERVICES, "DOCKER_STUB_RUNNING": SERVICES,
                     "DOCKER_STUB_LOG": str(self.docker_log)}
        self.write_env()

    def write_env(self, **overrides: str) -> None:
        self.values.update(overrides)
        self.env_file.write_text("# health.env\n" + "".join(f"{k}={v}\n" for k, v in self.values.items()))

    def run(self, *args: str, path: str | None = None, user: str | None = None,
            **env: str) -> subprocess.CompletedProcess[str]:
        # keepalived's environment is bare: no profile, just what the daemon was started with
        base = {"PATH": path or f"{STUBS}:/usr/local/bin:/usr/bin:/bin", "MT_HEALTH_ENV": str(self.env_file),
                "DOCKER_TIMEOUT_S": "1"}
        return subprocess.run([str(self.script), *args], env=base | self.stub | env, capture_output=True,
                              text=True, timeout=20, check=False, user=user, group=user and "nogroup",
                              extra_groups=[] if user else None)

    def docker_calls(self) -> list[str]:
        return self.docker_log.read_text().splitlines() if self.docker_log.exists() else []


@pytest.fixture
def health(tmp_path: Path, server: HealthServer) -> Health:
    return Health(tmp_path, server.url)


def test_healthy_node_exits_0_silently(health: Health):
    proc = health.run()
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    compose = f"compose -f {health.compose_file} -p minitwit"
    assert health.docker_calls() == [f"{compose} config --services", f"{compose} ps --services --status running"]


def test_compose_warnings_on_stderr_are_not_service_names(health: Health):
    health.stub["DOCKER_STUB_WARN"] = "1"
    proc = health.run()
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("status", [500, 404, 302])
def test_health_url_not_2xx_exits_1(health: Health, server: HealthServer, status: int):
    server.mode = status
    proc = health.run()
    assert proc.returncode == 1, proc.stderr
    assert server.url in proc.stderr and str(status) in proc.stderr
    assert proc.stderr.count("\n") == 1, "one log line per failing run"


def test_hanging_health_url_is_cut_off_by_health_timeout(health: Health, server: HealthServer):
    server.mode = "hang"
    started = time.monotonic()
    proc = health.run()
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < 3
    assert "timed out" in proc.stderr


def test_unreachable_health_url_exits_1(health: Health):
    health.write_env(HEALTH_URL="http://127.0.0.1:9/latest")  # discard port: nothing listens
    proc = health.run()
    assert proc.returncode == 1, proc.stderr
    assert "http://127.0.0.1:9/latest" in proc.stderr


def test_service_not_running_exits_2_and_names_it(health: Health):
    health.stub["DOCKER_STUB_RUNNING"] = "web proxy"
    proc = health.run()
    assert proc.returncode == 2, proc.stderr
    assert "compose services not running: db-migrate" in proc.stderr


def test_docker_failure_exits_2(health: Health):
    health.stub["DOCKER_STUB_FAIL"] = "ps"
    proc = health.run()
    assert proc.returncode == 2, proc.stderr
    assert "Cannot connect to the Docker daemon" in proc.stderr


def test_hanging_docker_is_timed_out(health: Health):
    health.stub["DOCKER_STUB_HANG"] = "ps"
    started = time.monotonic()
    proc = health.run()
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - started < 5
    assert "timed out after 1 s" in proc.stderr


def test_empty_compose_file_skips_the_services_check(health: Health):
    health.write_env(COMPOSE_FILE="")
    health.stub["DOCKER_STUB_FAIL"] = "ps"  # would fail if it were called
    proc = health.run()
    assert proc.returncode == 0, proc.stderr
    assert health.docker_calls() == []


def test_maintenance_flag_exits_3_and_wins(health: Health, server: HealthServer):
    health.flag.touch()
    server.mode = 500
    health.stub["DOCKER_STUB_RUNNING"] = ""
    proc = health.run()
    assert proc.returncode == 3, proc.stderr
    assert str(health.flag) in proc.stderr
    assert server.served == [] and health.docker_calls() == [], "first failure decides: no further checks"


def test_http_failure_is_reported_before_services(health: Health, server: HealthServer):
    server.mode = 500
    health.stub["DOCKER_STUB_RUNNING"] = ""
    assert health.run().returncode == 1
    assert health.docker_calls() == []


@pytest.mark.parametrize(("mode", "expected"), [("flag", 3), ("http", 1), ("services", 2)])
def test_single_check_modes_run_only_that_check(health: Health, server: HealthServer, mode: str,
                                                expected: int):
    health.flag.touch()
    server.mode = 500
    health.stub["DOCKER_STUB_RUNNING"] = "web"
    proc = health.run(mode)
    assert proc.returncode == expected, proc.stderr


def test_serve_checks_serve_url_and_the_flag_not_the_app_or_its_services(health: Health, server: HealthServer):
    """keepalived's check with HAProxy in front: the node can serve (HAProxy's monitor) even while
    its own app and containers are down, because the peer's app answers."""
    health.write_env(HEALTH_URL="http://127.0.0.1:9/latest", SERVE_URL=server.url)
    health.stub["DOCKER_STUB_RUNNING"] = ""
    assert health.run("serve").returncode == 0
    assert health.docker_calls() == []
    assert health.run("all").returncode == 1  # the app itself is still reported down
    server.mode = 503  # HAProxy: no app server UP
    proc = health.run("serve")
    assert proc.returncode == 1 and server.url in proc.stderr
    health.flag.touch()
    assert health.run("serve").returncode == 3


def test_serve_without_serve_url_checks_health_url(health: Health, server: HealthServer):
    assert health.run("serve").returncode == 0
    server.mode = 500
    assert health.run("serve").returncode == 1


def test_environment_overrides_the_env_file(health: Health, server: HealthServer):
    health.write_env(HEALTH_URL="http://127.0.0.1:9/latest")
    assert health.run("http", HEALTH_URL=server.url).returncode == 0


def test_configuration_errors_exit_4(health: Health, tmp_path: Path):
    url = health.values["HEALTH_URL"]
    assert health.run(MT_HEALTH_ENV=str(tmp_path / "missing.env")).returncode == 4
    proc = health.run("bogus")
    assert proc.returncode == 4 and "usage: mt-health" in proc.stderr
    health.write_env(HEALTH_TIMEOUT_S="soon")
    assert health.run("http").returncode == 4
    health.write_env(HEALTH_TIMEOUT_S="0.5", HEALTH_URL="")
    proc = health.run("http")
    assert proc.returncode == 4 and "HEALTH_URL is empty" in proc.stderr
    health.write_env(HEALTH_URL=url, COMPOSE_FILE=str(tmp_path / "nope.yaml"))
    proc = health.run("services")
    assert proc.returncode == 4 and "nope.yaml" in proc.stderr


def test_env_file_is_read_not_executed(health: Health, tmp_path: Path):
    marker = tmp_path / "pwned"
    health.env_file.write_text(health.env_file.read_text() + f"$(touch {marker})\nX=`touch {marker}`\n")
    assert health.run().returncode == 0
    assert not marker.exists()


def test_a_failing_logger_does_not_change_the_result(health: Health, server: HealthServer):
    server.mode = 500
    proc = health.run(path=f"{STUBS / 'broken-logger'}:{STUBS}:/usr/local/bin:/usr/bin:/bin")
    assert proc.returncode == 1
    assert "/dev/log" not in proc.stderr  # logger's complaint is swallowed; our own line remains
    assert "returned error: 500" in proc.stderr


def test_a_missing_logger_does_not_change_the_result(health: Health, server: HealthServer, tmp_path: Path):
    server.mode = 500
    bin_dir = tmp_path / "bin"  # only what mt-health needs, no logger
    bin_dir.mkdir()
    for tool in ("bash", "curl", "date", "timeout", "grep", "tr"):
        found = next((Path(d) / tool for d in ("/usr/bin", "/bin") if (Path(d) / tool).exists()), None)
        assert found, f"{tool} not found"
        (bin_dir / tool).symlink_to(found)
    proc = health.run("http", path=str(bin_dir))
    assert proc.returncode == 1
    assert "mt-health: health URL" in proc.stderr


def test_http_and_flag_checks_run_unprivileged(server: HealthServer):
    """keepalived runs `mt-health http` and `mt-health flag` as keepalived_script: nothing to write."""
    need(not_root())
    root = Path(tempfile.mkdtemp(prefix="mt-health-"))  # pytest's tmp_path is root-only (0700)
    try:
        root.chmod(0o755)
        health = Health(root, server.url, script=installed_copy(root, SCRIPT))
        assert health.run("http", user="nobody").returncode == 0
        assert health.run("flag", user="nobody").returncode == 0
        health.flag.touch()
        assert health.run("flag", user="nobody").returncode == 3
    finally:
        shutil.rmtree(root)


def test_shellcheck_is_clean():
    need(missing_binaries("shellcheck"))
    files = [SCRIPT, STUBS / "docker", STUBS / "broken-logger" / "logger"]
    proc = subprocess.run(["shellcheck", "--shell=bash", *map(str, files)], capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_script_is_executable_bash_with_strict_mode():
    text = SCRIPT.read_text()
    assert os.access(SCRIPT, os.X_OK)
    assert text.startswith("#!/usr/bin/env bash\n") and "set -Eeuo pipefail\n" in text
    assert text.rstrip().endswith('main "$@"')
