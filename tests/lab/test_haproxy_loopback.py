"""The HAProxy design, proven with the real haproxy on loopback: the rendered haproxy.cfg (the
node's addresses rewritten to 127.0.0.x through NodeFacts), two tiny apps, and the course
client's traffic (a new connection per request, 0.3 s time-out, never a retry).

- The local app is SIGKILLed under traffic and restarted: no request fails, and no POST runs
  twice (each app records every POST body it executed; the bodies are unique).
- A reload under traffic (SIGUSR2 to the master, what `systemctl reload haproxy` does after
  `haproxy -c`): no request fails.

One design limit, asserted as such: a POST an app is holding at the instant it is killed may have
been written; HAProxy cannot know, so it does not resend it and the client gets an error. The
apps here answer in well under a millisecond, so the test's kill lands between requests unless
one is in flight; such a request is the only failure allowed, and it must have been in flight.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from infra.haproxy import HaproxyFacts
from infra.node import NodeFacts, NodePaths, render_haproxy_cfg
from tests.support.needs import need_root_and

pytestmark = pytest.mark.lab

LOCAL, PEER = "127.0.0.2", "127.0.0.3"
CLIENT_TIMEOUT_S = 0.3
RATE = 50  # requests per second, half GET, half POST

# A stdlib app: answers every request, appends each POST body to its record before answering.
APP = r'''
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
host, port, name, record = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
out = open(record, "a", buffering=1)
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def _answer(self):
        body = name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", name)
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self._answer()
    def do_POST(self):
        data = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        out.write(data + "\n")
        self._answer()
    def log_message(self, *a):
        pass
ThreadingHTTPServer.allow_reuse_address = True
ThreadingHTTPServer.request_queue_size = 128  # a real app server's listen backlog, not stdlib's 5
ThreadingHTTPServer((host, port), H).serve_forever()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on {host}:{port} after {timeout} s")


@dataclasses.dataclass
class Outcome:
    method: str
    body: str
    start: float
    end: float
    ok: bool
    detail: str


class Pair:
    """haproxy with the rendered config in front of a 'local' and a 'peer' app."""

    def __init__(self, tmp: Path, serve: str) -> None:
        self.tmp = tmp
        self.backend_port, self.public_port = free_port(), free_port()
        self.monitor_port, self.metrics_port = free_port(), free_port()
        paths = NodePaths(root=str(tmp))
        (tmp / "run" / "haproxy").mkdir(parents=True)  # also creates tmp
        self.facts = NodeFacts(
            name="primary", droplet_id=1, private_ip=LOCAL, peer_private_ip=PEER, reserved_ip="203.0.113.10",
            priority=150, router_id=51, private_interface="eth1", admin_cidrs=("198.51.100.0/24",),
            http_ports=(80, 443), health_url=f"http://127.0.0.1:{self.backend_port}/latest", paths=paths,
            haproxy=HaproxyFacts(public_port=self.public_port, backend_port=self.backend_port, serve=serve,
                                 monitor_port=self.monitor_port, metrics_port=self.metrics_port),
        )
        self.cfg = tmp / "haproxy.cfg"
        self.cfg.write_text(render_haproxy_cfg(self.facts))
        self.apps: dict[str, subprocess.Popen] = {}
        self.haproxy: subprocess.Popen | None = None

    def start_app(self, name: str) -> None:
        host = LOCAL if name == "local" else PEER
        self.apps[name] = subprocess.Popen(
            [sys.executable, "-c", APP, host, str(self.backend_port), name, str(self.tmp / f"{name}.posts")])
        wait_listening(host, self.backend_port)

    def kill_app(self, name: str) -> None:
        self.apps[name].send_signal(signal.SIGKILL)
        self.apps[name].wait()

    def start_haproxy(self) -> None:
        check = subprocess.run(["haproxy", "-c", "-f", str(self.cfg)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        # As Debian's unit runs it: master-worker, foreground (-Ws without systemd is -W -db).
        self.haproxy = subprocess.Popen(["haproxy", "-W", "-db", "-f", str(self.cfg)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_listening("127.0.0.1", self.public_port)

    def reload(self) -> None:
        assert self.haproxy is not None
        self.haproxy.send_signal(signal.SIGUSR2)

    def served(self, path: str = "/") -> tuple[int, str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.public_port, timeout=2)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()

    def monitor(self) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.monitor_port, timeout=2)
        try:
            conn.request("GET", "/minitwit-ha/serving")
            return conn.getresponse().status
        finally:
            conn.close()

    def posts(self) -> Counter:
        counts: Counter = Counter()
        for name in ("local", "peer"):
            path = self.tmp / f"{name}.posts"
            if path.exists():
                counts.update(line for line in path.read_text().splitlines() if line)
        return counts

    def stop(self) -> None:
        procs = [p for p in (self.haproxy, *self.apps.values()) if p is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def pair_factory(tmp_path: Path):
    need_root_and("haproxy")  # haproxy drops to the `haproxy` user, as on a droplet
    pairs: list[Pair] = []

    def make(serve: str = "active-standby") -> Pair:
        p = Pair(tmp_path / f"pair{len(pairs)}", serve)
        pairs.append(p)
        p.start_app("local")
        p.start_app("peer")
        p.start_haproxy()
        return p

    yield make
    for p in pairs:
        p.stop()


def one_request(port: int, method: str, body: str) -> Outcome:
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT_S)
    try:
        if method == "POST":
            conn.request("POST", "/msgs/alice", body=body, headers={"Content-Type": "text/plain"})
        else:
            conn.request("GET", "/latest")
        resp = conn.getresponse()
        resp.read()
        ok, detail = resp.status == 200, f"HTTP {resp.status}"
    except (OSError, http.client.HTTPException) as exc:
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()
    return Outcome(method, body, start, time.monotonic(), ok, detail)


def traffic(port: int, seconds: float, events: list[tuple[float, Callable[[], None]]]) -> tuple[list[Outcome], dict]:
    """RATE requests/s for `seconds`, each in its own thread (a slow one never delays the next);
    each (t, action) runs at t seconds on its own timer and its instant is recorded."""
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    instants: dict[str, float] = {}
    threads = []

    def fire(method: str, body: str) -> None:
        o = one_request(port, method, body)
        with lock:
            outcomes.append(o)

    def timed(action: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            instants[action.__name__] = time.monotonic()
            action()
        return run

    t0 = time.monotonic()
    timers = [threading.Timer(t, timed(action)) for t, action in events]
    for timer in timers:
        timer.start()
    for i in range(int(seconds * RATE)):
        time.sleep(max(0.0, t0 + i / RATE - time.monotonic()))
        method = "POST" if i % 2 else "GET"
        th = threading.Thread(target=fire, args=(method, f"msg-{i}-{os.getpid()}"))
        th.start()
        threads.append(th)
    for th in [*threads, *timers]:
        th.join()
    return outcomes, instants


def in_flight(o: Outcome, instant: float) -> bool:
    return o.start <= instant <= o.end


@pytest.mark.parametrize("serve", ["active-standby", "both"])
def test_local_app_killed_and_restarted_under_traffic_loses_and_duplicates_nothing(pair_factory, serve):
    pair = pair_factory(serve)

    def kill_local() -> None:
        pair.kill_app("local")

    def restart_local() -> None:
        pair.start_app("local")

    outcomes, at = traffic(pair.public_port, 6, [(1.51, kill_local), (3.51, restart_local)])
    failed = [o for o in outcomes if not o.ok]
    # Only a POST in flight at the kill may fail (see the module doc); nothing else, ever.
    assert all(o.method == "POST" and in_flight(o, at["kill_local"]) for o in failed), failed
    assert len(failed) <= 1, failed
    dup = {body: n for body, n in pair.posts().items() if n > 1}
    assert dup == {}, f"POSTs executed more than once: {dup}"
    ok_posts = {o.body for o in outcomes if o.ok and o.method == "POST"}
    assert ok_posts <= set(pair.posts()), "a POST answered 200 that no app executed"
    slowest = max(o.end - o.start for o in outcomes if o.ok)
    assert slowest < CLIENT_TIMEOUT_S, slowest
    # The peer served while the local app was dead; after the restart the local app is back in use.
    status, by = pair.served()
    deadline = time.monotonic() + 3
    while by != "local" and serve == "active-standby" and time.monotonic() < deadline:
        time.sleep(0.1)
        status, by = pair.served()
    assert status == 200 and (serve == "both" or by == "local"), by


def test_reload_under_traffic_fails_nothing(pair_factory):
    pair = pair_factory()

    def reload() -> None:
        pair.reload()

    def reload_again() -> None:
        pair.reload()

    outcomes, _ = traffic(pair.public_port, 4, [(1.01, reload), (2.51, reload_again)])
    failed = [o for o in outcomes if not o.ok]
    assert failed == [], failed
    assert pair.haproxy is not None and pair.haproxy.poll() is None, "the master exited on reload"


def test_monitor_says_serving_while_any_app_is_up(pair_factory):
    pair = pair_factory()
    assert pair.monitor() == 200
    conn = http.client.HTTPConnection("127.0.0.1", pair.metrics_port, timeout=2)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    conn.close()
    for name in ("haproxy_backend_active_servers", "haproxy_server_status", "haproxy_backend_retry_warnings_total",
                 "haproxy_backend_redispatch_warnings_total", "haproxy_backend_http_responses_total"):
        assert f"\n{name}{{" in metrics, f"{name} missing from HAProxy's exporter"
    pair.kill_app("local")
    assert pair.served() == (200, "peer")
    assert pair.monitor() == 200  # the peer's app still serves: no reason to move the reserved IP
    pair.kill_app("peer")
    deadline = time.monotonic() + 3
    while pair.monitor() != 503 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pair.monitor() == 503, "no app is up, yet the monitor still says this node can serve"
