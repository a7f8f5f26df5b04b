"""scripts/mt-healthwatch: the debounced watcher that writes keepalived's track_file.

The watcher runs as a subprocess against a local health endpoint (HealthServer from
test_mt_health) with a fast WATCH_INTERVAL_S; the tests watch the track file from outside the
way keepalived does: its value and its modification time.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.needs import need, not_root
from tests.unit.test_mt_health import HealthServer, installed_copy

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "mt-healthwatch"
INTERVAL = 0.05


@pytest.fixture
def server() -> Iterator[HealthServer]:
    with HealthServer() as s:
        yield s


class Watch:
    """One watcher process with its env file, track file and log (stderr) file."""

    def __init__(self, root: Path, url: str, script: Path = SCRIPT):
        self.root = root
        self.script = script
        self.env_file = root / "health.env"
        self.track = root / "health" / "status"
        self.flag = root / "maintenance"
        self.log = root / "watch.log"
        self.values = {
            "HEALTH_URL": url,
            "WATCH_INTERVAL_S": str(INTERVAL),
            "WATCH_TIMEOUT_S": "0.3",
            "WATCH_FALL": "3",
            "WATCH_RISE": "2",
            "MAINTENANCE_FLAG": str(self.flag),
            "TRACK_FILE": str(self.track),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.track.parent.mkdir()

    def start(self, user: str | None = None, **overrides: str) -> None:
        self.values.update(overrides)
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in self.values.items()))
        path = "/usr/bin:/bin"  # another user cannot run this interpreter: the system python3 then
        if user is None:
            python_bin = self.root / "python-bin"  # python3 for the shebang, without a version-manager shim
            python_bin.mkdir(exist_ok=True)
            if not (python_bin / "python3").exists():
                (python_bin / "python3").symlink_to(os.environ.get("MT_SCRIPT_PYTHON", sys.executable))
            path = f"{python_bin}:{path}"
        env = {"PATH": path, "MT_HEALTH_ENV": str(self.env_file)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([str(self.script)], env=env, stdout=subprocess.DEVNULL, stderr=log,
                                         user=user, group=user and pwd.getpwnam(user).pw_gid,
                                         extra_groups=[] if user else None)

    def value(self) -> str | None:
        try:
            return self.track.read_text()
        except FileNotFoundError:
            return None

    def wait_value(self, expected: str, timeout: float = 5.0, while_waiting: Callable[[], None] | None = None
                   ) -> float:
        """Poll the track file (every 5 ms) until it holds `expected`; return the time it took."""
        started = time.monotonic()
        while self.value() != expected:
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() - started < timeout, f"track file is {self.value()!r}, not {expected!r}"
            if while_waiting:
                while_waiting()
            time.sleep(0.005)
        return time.monotonic() - started

    def logged(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=5)


@pytest.fixture
def watch(tmp_path: Path, server: HealthServer) -> Iterator[Watch]:
    w = Watch(tmp_path, server.url)
    yield w
    if w.proc is not None and w.proc.poll() is None:
        w.proc.kill()
        w.proc.wait(timeout=5)


def answers_since(server: HealthServer, index: int, ok: bool) -> int:
    return sum(1 for _, mode in server.served[index:] if (mode == 200) == ok)


def wait_requests(server: HealthServer, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    target = len(server.served) + count
    while len(server.served) < target:
        assert time.monotonic() < deadline, "the watcher stopped polling the health URL"
        time.sleep(0.01)


def test_starts_with_one_check_and_flips_after_fall_then_rise(watch: Watch, server: HealthServer):
    watch.start()
    watch.wait_value("0\n")

    server.mode = 500
    switched = len(server.served)
    watch.wait_value("1\n")
    failures = answers_since(server, switched, ok=False)
    assert 3 <= failures <= 4, f"flipped after {failures} failures, WATCH_FALL=3"

    server.mode = 200
    switched = len(server.served)
    watch.wait_value("0\n")
    successes = answers_since(server, switched, ok=True)
    assert 2 <= successes <= 3, f"flipped back after {successes} successes, WATCH_RISE=2"

    assert [p.name for p in watch.track.parent.iterdir()] == ["status"], "temporary files left behind"
    assert "health flipped 0 -> 1: HTTP 500" in watch.logged()
    assert "health flipped 1 -> 0: HTTP 200" in watch.logged()
    assert watch.stop() == 0


def test_unprivileged_watcher_replaces_keepalived_init_file(server: HealthServer):
    """On a node the watcher runs as keepalived_script, and keepalived's `init_file 1` has already
    created the track file as root (0644): the watcher must still be able to report 0."""
    need(not_root())
    user = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="mt-healthwatch-"))  # pytest's tmp_path is root-only (0700)
    root.chmod(0o755)
    watch = Watch(root, server.url, script=installed_copy(root, SCRIPT))
    try:
        os.chown(watch.track.parent, user.pw_uid, user.pw_gid)  # RuntimeDirectory= of the unit
        watch.track.write_text("1\n")  # what init_file leaves behind: root-owned, 0644
        watch.start(user="nobody")
        watch.wait_value("0\n")
        assert watch.track.stat().st_uid == user.pw_uid
        assert watch.stop() == 0
    finally:
        if watch.proc is not None and watch.proc.poll() is None:
            watch.proc.kill()
            watch.proc.wait(timeout=5)
        shutil.rmtree(root)


def test_fewer_failures_than_fall_do_not_flip(watch: Watch, server: HealthServer):
    watch.start()
    watch.wait_value("0\n")
    written = watch.track.stat().st_mtime_ns
    server.queue = [500, 500, 200, 500, 500]  # never 3 in a row
    wait_requests(server, 8)
    assert watch.value() == "0\n"
    assert watch.track.stat().st_mtime_ns == written, "the track file was rewritten without a change"
    assert "flipped" not in watch.logged()


def test_unchanged_value_is_never_rewritten(watch: Watch, server: HealthServer):
    server.mode = 500
    watch.start()
    watch.wait_value("1\n")  # a failing start is reported at once: one check decides the start value
    written = watch.track.stat().st_mtime_ns
    wait_requests(server, 10)
    assert watch.track.stat().st_mtime_ns == written


def test_maintenance_flag_flips_at_once_and_clears_after_rise(watch: Watch, server: HealthServer):
    watch.start(WATCH_FALL="100")  # a debounced failure would need 100 checks (5 s)
    watch.wait_value("0\n")
    watch.flag.touch()
    took = watch.wait_value("3\n", timeout=1.0)
    assert took < 1.0
    served = len(server.served)
    time.sleep(5 * INTERVAL)
    assert len(server.served) <= served + 1, "the health URL is not asked while the flag is present"
    watch.flag.unlink()
    switched = len(server.served)
    watch.wait_value("0\n")
    assert 2 <= answers_since(server, switched, ok=True) <= 3
    assert "maintenance flag" in watch.logged()


def test_hanging_health_url_counts_as_failure(watch: Watch, server: HealthServer):
    watch.start(WATCH_TIMEOUT_S="0.2", WATCH_FALL="2")
    watch.wait_value("0\n")
    server.mode = "hang"
    took = watch.wait_value("1\n", timeout=5)
    assert took < 2.0
    assert "no answer within 0.2 s" in watch.logged()
    started = time.monotonic()
    assert watch.stop() == 0  # even while a request hangs
    assert time.monotonic() - started < 1.0


def test_missing_track_directory_is_retried(watch: Watch, server: HealthServer):
    watch.track.parent.rmdir()
    watch.start()
    deadline = time.monotonic() + 5
    while "cannot write TRACK_FILE" not in watch.logged():
        assert time.monotonic() < deadline and watch.proc.poll() is None, watch.logged()
        time.sleep(0.01)
    wait_requests(server, 3)
    assert watch.logged().count("cannot write TRACK_FILE") == 1, "logged once, not every tick"
    watch.track.parent.mkdir()
    watch.wait_value("0\n", timeout=2)
    assert "writable again" in watch.logged()


def test_sigterm_exits_0(watch: Watch):
    watch.start()
    watch.wait_value("0\n")
    assert watch.stop() == 0
    assert "stopped (SIGTERM)" in watch.logged()


def test_configuration_error_exits_4(watch: Watch):
    watch.start(HEALTH_URL="")
    assert watch.proc.wait(timeout=10) == 4
    assert "HEALTH_URL=''" in watch.logged()
    assert watch.value() is None


def test_serve_url_is_watched_instead_of_the_app(watch: Watch, server: HealthServer):
    """With HAProxy in front, the track file follows HAProxy's monitor, not the local app."""
    watch.start(HEALTH_URL="http://127.0.0.1:9/latest", SERVE_URL=server.url)  # the app itself: down
    watch.wait_value("0\n")
    server.mode = 503  # the monitor: no app server UP
    watch.wait_value("1\n")
