"""The lab's stand-in app (tests/lab/app.py) as a process on loopback, on a throwaway PostgreSQL."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.lab import traffic
from tests.lab.app import SIM_AUTH
from tests.support.needs import need
from tests.support.pg import PgServer, missing_requirements, pg_bindir

pytestmark = pytest.mark.db

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = {"status": 403, "error_msg": "You are not authorized to use this resource!"}
TAKEN = {"status": 400, "error_msg": "The username is already taken"}


# -- helpers ---------------------------------------------------------------------------------

def free_pg_port() -> int:
    for port in random.sample(range(55000, 56000), 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 55000-55999")


@contextlib.contextmanager
def pg_server():
    need(missing_requirements())
    server = PgServer(port=free_pg_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()


def pg_ctl(pg: PgServer, *args: str) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", str(pg_bindir() / "pg_ctl"), "-D", str(pg.datadir),
                    *args], check=True, capture_output=True, timeout=60)


def sql(pg: PgServer, query: str, *params: object) -> list[tuple]:
    with psycopg.connect(pg.uri("postgres"), autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class AppProc:
    """`python -m tests.lab.app` on 127.0.0.1:<ephemeral>; the URI only in a 0600 env file."""

    def __init__(self, tmp: Path, pg: PgServer, node: str | None, version: str | None, *extra: str,
                 env_lines: str = "NODE_NAME=from-env-file\nAPP_VERSION=from-env-file\n",
                 uri: str | None = None) -> None:
        self.pg = pg
        tag = unique(node or "app")
        self.env_file = tmp / f"{tag}.env"
        fd = os.open(self.env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"# a lab node's app.env\nDATABASE_URL={uri or pg.uri('postgres')}\n{env_lines}")
        self.log_path = tmp / f"{tag}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "NODE_NAME", "APP_VERSION")}
        flags = [*(["--node", node] if node else []), *(["--version", version] if version else [])]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.lab.app", "--listen", "127.0.0.1:0", *flags,
                 "--env-file", str(self.env_file), *extra],
                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log,
            )
        self.port = self._wait_listening()

    def _wait_listening(self) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for line in self.log():
                if " listening on 127.0.0.1:" in line:
                    return int(line.split(" listening on 127.0.0.1:")[1].split()[0])
            if self.proc.poll() is not None:
                pytest.fail(f"app exited with {self.proc.returncode}:\n" + "\n".join(self.log()))
            time.sleep(0.05)
        pytest.fail("app did not report listening within 20 s:\n" + "\n".join(self.log()))

    def log(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def call(self, method: str, path: str, body: dict | None = None, auth: str | None = SIM_AUTH,
             timeout: float = 10.0) -> tuple[int, object, dict[str, str]]:
        return call(self.port, method, path, body, auth, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def call(port: int, method: str, path: str, body: dict | None = None, auth: str | None = SIM_AUTH,
         timeout: float = 10.0) -> tuple[int, object, dict[str, str]]:
    headers = {"Connection": "close"}
    if auth:
        headers["Authorization"] = auth
    payload = json.dumps(body).encode() if body is not None else None
    if payload is not None:
        headers["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (json.loads(data) if data else None), dict(resp.getheaders())
    finally:
        conn.close()


def wait_for(predicate, timeout: float, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


# -- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg():
    with pg_server() as server:
        yield server


@pytest.fixture
def start_app(tmp_path, pg):
    """Factory: start an app on the module's database; every app is killed by PID at teardown."""
    apps: list[AppProc] = []

    def start(node: str | None = "primary", version: str | None = "v1", *extra: str,
              server: PgServer | None = None, **kw):
        app = AppProc(tmp_path, server or pg, node, version, *extra, **kw)
        apps.append(app)
        return app

    try:
        yield start
    finally:
        for app in apps:
            app.kill()


# -- the API contract ------------------------------------------------------------------------

def test_simulator_api_round_trips_with_node_and_version_headers(start_app, pg):
    app = start_app("primary", "v1")
    alice, bob = unique("alice"), unique("bob")

    status, body, headers = app.call("GET", "/health", auth=None)
    assert (status, body) == (200, {"status": "ok", "node": "primary", "version": "v1"})
    assert (headers["X-Served-By"], headers["X-App-Version"]) == ("primary", "v1")
    status, body, _ = app.call("GET", "/latest", auth=None)
    assert status == 200 and isinstance(body["latest"], int)

    # Everything else needs the simulator's credentials.
    for method, path, payload in [("GET", "/msgs", None), ("GET", f"/msgs/{alice}", None),
                                  ("POST", f"/msgs/{alice}", {"content": "x"}),
                                  ("POST", "/register", {"username": alice, "email": "a@x", "pwd": "p"}),
                                  ("GET", f"/fllws/{alice}", None), ("POST", f"/fllws/{alice}", {"follow": bob})]:
        for auth in (None, "Basic c2ltdWxhdG9yOndyb25n"):
            status, body, headers = app.call(method, path, payload, auth=auth)
            assert (status, body) == (403, FORBIDDEN), (method, path, auth)
            assert headers["X-Served-By"] == "primary"
    assert sql(pg, 'SELECT count(*) FROM "user" WHERE username = %s', alice) == [(0,)]

    # Registration: field checks, then the unique name.
    assert app.call("POST", "/register", {"email": "a@x", "pwd": "p"})[:2] == (
        400, {"status": 400, "error_msg": "You have to enter a username"})
    assert app.call("POST", "/register", {"username": alice, "email": "nope", "pwd": "p"})[:2] == (
        400, {"status": 400, "error_msg": "You have to enter a valid email address"})
    assert app.call("POST", "/register", {"username": alice, "email": "a@x"})[:2] == (
        400, {"status": 400, "error_msg": "You have to enter a password"})
    status, body, headers = app.call("POST", "/register", {"username": alice, "email": "a@x", "pwd": "p"})
    assert (status, body, headers["X-App-Version"]) == (204, None, "v1")
    assert app.call("POST", "/register", {"username": alice, "email": "b@x", "pwd": "q"})[:2] == (400, TAKEN)
    assert app.call("POST", "/register", {"username": bob, "email": "b@x", "pwd": "hunter2-plain"})[0] == 204
    [(pw_hash,)] = sql(pg, 'SELECT pw_hash FROM "user" WHERE username = %s', bob)
    assert "hunter2" not in pw_hash

    # Messages, newest first; flagged ones are hidden.
    for text in ("first", "second", "third"):
        assert app.call("POST", f"/msgs/{alice}", {"content": f"{alice} {text}"})[:2] == (204, None)
    status, msgs, _ = app.call("GET", f"/msgs/{alice}?no=2")
    assert status == 200
    assert [m["content"] for m in msgs] == [f"{alice} third", f"{alice} second"]
    assert {m["user"] for m in msgs} == {alice} and all(isinstance(m["pub_date"], int) for m in msgs)
    status, msgs, _ = app.call("GET", "/msgs?no=1")
    assert (status, [m["content"] for m in msgs]) == (200, [f"{alice} third"])
    sql(pg, "UPDATE message SET flagged = 1 WHERE text = %s", f"{alice} third")
    assert [m["content"] for m in app.call("GET", f"/msgs/{alice}")[1]] == [f"{alice} second", f"{alice} first"]
    assert app.call("GET", "/msgs?no=1")[1][0]["content"] == f"{alice} second"
    nobody = unique("nobody")
    status, body, headers = app.call("GET", f"/msgs/{nobody}")
    assert status == 404 and headers["X-Served-By"] == "primary"
    assert app.call("POST", f"/msgs/{nobody}", {"content": "lost"})[0] == 404

    # Follows.
    assert app.call("GET", f"/fllws/{alice}")[:2] == (200, {"follows": []})
    assert app.call("POST", f"/fllws/{alice}", {"follow": bob})[:2] == (204, None)
    assert app.call("POST", f"/fllws/{alice}", {"follow": bob})[0] == 204
    assert app.call("GET", f"/fllws/{alice}")[:2] == (200, {"follows": [bob]})
    assert app.call("GET", f"/fllws/{bob}")[:2] == (200, {"follows": []})
    assert app.call("POST", f"/fllws/{alice}", {"unfollow": bob})[0] == 204
    assert app.call("GET", f"/fllws/{alice}")[:2] == (200, {"follows": []})
    assert app.call("POST", f"/fllws/{alice}", {"follow": nobody})[0] == 404
    assert app.call("POST", f"/fllws/{nobody}", {"follow": alice})[0] == 404
    assert app.call("GET", f"/fllws/{nobody}")[0] == 404

    # The database password is in the env file only: not on the command line, not in the log.
    cmdline = Path(f"/proc/{app.proc.pid}/cmdline").read_bytes().decode()
    log = "\n".join(app.log())
    for secret in (pg.password, pg.uri("postgres")):
        assert secret not in cmdline and secret not in log


def test_two_apps_registering_one_name_at_once_have_exactly_one_winner(start_app, pg):
    apps = [start_app("primary", "v1"), start_app("standby", "v1")]
    name = unique("race")
    barrier = threading.Barrier(8)
    results: list[tuple[int, object, str]] = []
    lock = threading.Lock()

    def register(i: int) -> None:
        app = apps[i % 2]
        barrier.wait(timeout=10)
        status, body, headers = app.call("POST", "/register", {"username": name, "email": "r@x", "pwd": str(i)})
        with lock:
            results.append((status, body, headers["X-Served-By"]))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert len(results) == 8
    assert sorted(s for s, _, _ in results) == [204] + [400] * 7
    assert all(body == TAKEN for s, body, _ in results if s == 400)
    assert {node for _, _, node in results} == {"primary", "standby"}
    assert sql(pg, 'SELECT count(*) FROM "user" WHERE username = %s', name) == [(1,)]


def test_latest_never_goes_back_whichever_app_answers(start_app):
    a, b = start_app("primary", "v1"), start_app("standby", "v2")
    user = unique("lat")
    base = a.call("GET", "/latest", auth=None)[1]["latest"] + 1000

    assert a.call("GET", f"/msgs?no=1&latest={base}")[0] == 200
    status, body, headers = b.call("GET", "/latest", auth=None)
    assert (status, body, headers["X-Served-By"], headers["X-App-Version"]) == (
        200, {"latest": base}, "standby", "v2")
    # A lower value arriving later (another node, a retried request) does not lower it.
    assert b.call("POST", f"/register?latest={base - 500}", {"username": user, "email": "l@x", "pwd": "p"})[0] == 204
    assert a.call("GET", "/latest", auth=None)[1] == {"latest": base}
    # Stored in the same transaction as the write, even when the request is refused (400).
    assert b.call("POST", f"/register?latest={base + 1}", {"username": user, "email": "l@x", "pwd": "p"})[0] == 400
    assert a.call("GET", "/latest", auth=None)[1] == {"latest": base + 1}
    assert b.call("POST", f"/msgs/{user}?latest={base + 2}", {"content": "hi"})[0] == 204
    assert a.call("GET", "/latest", auth=None)[1] == {"latest": base + 2}
    # Without credentials nothing is stored.
    assert a.call("GET", f"/msgs?latest={base + 50}", auth=None)[0] == 403
    assert b.call("GET", "/latest", auth=None)[1] == {"latest": base + 2}


def test_a_bad_version_listens_but_answers_503_to_everything(start_app):
    # Node and version from the env file this time (the command line wins when given).
    app = start_app(None, None, env_lines="NODE_NAME=standby\nAPP_VERSION=bad-2\n")
    for method, path, auth in [("GET", "/health", None), ("GET", "/latest", None), ("GET", "/msgs", SIM_AUTH),
                               ("POST", "/register", SIM_AUTH)]:
        status, _, headers = app.call(method, path, {"username": "x"} if method == "POST" else None, auth=auth)
        assert status == 503, path
        assert (headers["X-Served-By"], headers["X-App-Version"]) == ("standby", "bad-2")
    assert app.proc.poll() is None


def test_generator_at_100_per_second_against_the_app_loses_nothing(start_app, pg, tmp_path):
    app = start_app("primary", "v1")
    gen = traffic.TrafficGenerator(
        f"http://127.0.0.1:{app.port}", rate=100, duration=3.0, out=tmp_path / "t.jsonl", write_ratio=0.3)
    gen.start()
    try:
        assert gen.wait(10)
    finally:
        records = gen.stop()
    assert len(records) >= 295
    assert traffic.failed(records) == []
    assert traffic.served_by_counts(records) == {"primary": len(records)}
    acked = traffic.acked_writes(records)
    assert len(acked) > 40
    assert traffic.rows_lost(acked, pg.uri("postgres")) == (0, [])
    assert traffic.rows_lost([*acked[:3], "lab-never-written"], pg.uri("postgres")) == (1, ["lab-never-written"])
    assert traffic.latest_regressions(records) == []


def test_database_down_is_a_503_and_the_app_recovers_when_it_returns(start_app):
    with pg_server() as own:
        app = start_app("primary", "v1", "--db-timeout", "1", server=own)
        user = unique("outage")
        assert app.call("POST", "/register", {"username": user, "email": "o@x", "pwd": "p"})[0] == 204
        assert app.call("POST", f"/msgs/{user}", {"content": "before"})[0] == 204

        pg_ctl(own, "-m", "fast", "-w", "stop")
        assert wait_for(lambda: app.call("GET", "/health", auth=None, timeout=5)[0] == 503, 10)
        status, body, headers = app.call("GET", "/health", auth=None, timeout=5)
        assert (status, body["status"], headers["X-Served-By"]) == (503, "unavailable", "primary")
        assert app.call("POST", f"/msgs/{user}", {"content": "during"}, timeout=5)[:2] == (
            503, {"status": 503, "error_msg": "database unavailable"})
        assert app.call("GET", "/latest", auth=None, timeout=5)[0] == 503
        assert app.proc.poll() is None

        opts = (f"-c listen_addresses={own.listen} -c port={own.port} "
                f"-c unix_socket_directories={own.socket_dir} -c fsync=off")
        pg_ctl(own, "-l", str(own.logfile), "-o", opts, "-w", "-t", "30", "start")
        t0 = time.monotonic()
        assert wait_for(lambda: app.call("GET", "/health", auth=None, timeout=5)[0] == 200, 10), \
            "the app did not recover within 10 s of the database's return"
        recovered = time.monotonic() - t0
        assert app.call("POST", f"/msgs/{user}", {"content": "after"})[0] == 204
        assert [m["content"] for m in app.call("GET", f"/msgs/{user}")[1]] == ["after", "before"]
        log = "\n".join(app.log())
        assert "database unavailable" in log and "database available again" in log
        assert own.password not in log
        print(f"recovered {recovered:.2f}s after the database came back")


def test_sigterm_finishes_the_request_in_flight_then_exits_0(start_app, pg):
    app = start_app("primary", "v1")
    user = unique("drain")
    assert app.call("POST", "/register?latest=1", {"username": user, "email": "d@x", "pwd": "p"})[0] == 204
    result: list[tuple[int, object, dict]] = []

    with psycopg.connect(pg.uri("postgres"), autocommit=True) as blocker:
        # Hold the row every write updates: the app's next write blocks on it, in flight.
        blocker.execute("BEGIN")
        blocker.execute("SELECT value FROM latest WHERE id = 1 FOR UPDATE")
        writer = threading.Thread(target=lambda: result.append(
            app.call("POST", f"/msgs/{user}?latest=2", {"content": f"{user} in flight"})))
        writer.start()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        assert wait_for(lambda: blocker.execute(waiting).fetchone()[0] >= 1, 5), "the write never blocked"

        app.proc.send_signal(signal.SIGTERM)
        time.sleep(0.6)
        assert app.proc.poll() is None, "exited with a request in flight"
        with pytest.raises(ConnectionRefusedError):
            call(app.port, "GET", "/latest", auth=None, timeout=2)
        blocker.execute("COMMIT")

    writer.join(timeout=10)
    assert app.proc.wait(timeout=10) == 0
    assert result and result[0][0] == 204 and result[0][2]["X-Served-By"] == "primary"
    assert sql(pg, "SELECT count(*) FROM message WHERE text = %s", f"{user} in flight") == [(1,)]
    assert "stopped on SIGTERM" in app.log()[-1]


def test_pooled_connections_that_died_cost_the_next_request_no_pause(start_app):
    """A node back from a network cut (lab scenario node-down-workers) finds every pooled connection
    dead: the first request through it must still answer within the course client's 0.3 s."""
    with pg_server() as own:
        app = start_app("primary", "v1", "--pool-min", "2", server=own)
        for _ in range(4):  # the pool's connections are open and have served
            assert app.call("GET", "/latest", auth=None)[0] == 200
        killed = sql(own, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()")
        assert len(killed) >= 2, killed
        t0 = time.monotonic()
        status, body, _ = app.call("GET", "/latest", auth=None, timeout=5)
        took = time.monotonic() - t0
        assert status == 200, body
        assert took < 0.3, f"the first request after the pool's connections died took {took:.2f} s"
        assert app.call("GET", "/latest", auth=None)[0] == 200
