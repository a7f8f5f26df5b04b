"""scripts/wait_ready.py, the stack's readiness gate: bounded, clear, and right about 2xx."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "wait_ready.py"


class Server:
    """Answers 503 until `ready_after` requests were seen, then 200."""

    def __init__(self, ready_after: int) -> None:
        self.seen = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                outer.seen += 1
                self.send_response(200 if outer.seen > ready_after else 503)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/latest"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request):
    s = Server(getattr(request, "param", 2))
    yield s
    s.close()


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=30)


def test_waits_until_the_url_answers_2xx(server):
    proc = run("--url", server.url, "--timeout", "10", "--interval", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert server.seen == 3
    assert "HTTP 503" in proc.stderr and "answered after" in proc.stdout


@pytest.mark.parametrize("server", [10_000], indirect=True)
def test_gives_up_after_the_timeout_with_what_to_check(server):
    started = time.monotonic()
    proc = run("--url", server.url, "--timeout", "1", "--interval", "0.2")
    assert proc.returncode == 1
    assert time.monotonic() - started < 5
    last = proc.stderr.strip().splitlines()[-1]
    assert "did not answer 2xx within 1s" in last and "HTTP 503" in last and "mt-failover status" in last


def test_nothing_listening_is_reported_not_crashed():
    proc = run("--url", "http://127.0.0.1:9/latest", "--timeout", "0.5", "--interval", "0.1")
    assert proc.returncode == 1 and "refused" in proc.stderr.lower()


def test_bad_url_is_a_usage_error():
    proc = run("--url", "ftp://127.0.0.1/x")
    assert proc.returncode == 2 and "must be http(s)" in proc.stderr
