"""The lab's stand-in app: the ITU-MiniTwit simulator API on the shared PostgreSQL.

Each lab node runs one of these where a droplet runs the real app's compose services:

    python -m tests.lab.app --listen 0.0.0.0:80 --node primary --version v1 --env-file app.env

The database URI comes from `DATABASE_URL` in the env file (`KEY=value` lines, `#` comments) or
the process environment (which wins, as for every env file on a node), never from the command
line: it carries a password. `NODE_NAME` / `APP_VERSION` are fallbacks for --node / --version.

What the failover and rolling-update drills rely on:
- every response carries `X-Served-By: <node>` and `X-App-Version: <version>`;
- `?latest=N` is stored as GREATEST(current, N) in the shared database, in the same transaction
  as the request's write, so `/latest` never goes backwards whichever node answers;
- a 204 to a write is sent only after the COMMIT returned: an acknowledged row is durable;
- a version string starting with `bad` listens but answers 503 to everything (a release that
  never becomes healthy) and does not touch the database;
- database trouble is a 503 for that request, never a crash; the pool heals when it returns;
- SIGTERM: stop accepting, finish in-flight requests (bounded), close the pool, exit 0.

`APP_CPU_MS` (env file or environment; default 0, off): every simulator API request (register,
msgs, fllws; not the `/latest` and `/health` probes) first spends that many milliseconds of its
thread's CPU time rendering a timeline page, as MiniTwit's templates do per page. The stand-in
otherwise costs next to nothing per request, so an extra app server (a worker) would not show in
a throughput figure (tests/lab/scenarios_throughput.py).

One log line to stderr per start and stop (and per database state change); never the URI.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import html
import json
import logging
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

SIM_AUTH = "Basic c2ltdWxhdG9yOnN1cGVyX3NhZmUh"  # simulator:super_safe! (the simulator's own)
NOT_AUTHORIZED = "You are not authorized to use this resource!"
SCHEMA_FILE = Path(__file__).resolve().parents[2] / "scripts" / "minitwit_schema.sql"
# pg_advisory_lock key for applying the schema: two nodes start at once, and concurrent
# CREATE TABLE IF NOT EXISTS can still collide in the catalog. ASCII "mtha-sch".
SCHEMA_LOCK_KEY = int.from_bytes(b"mtha-sch", "big") & 0x7FFF_FFFF_FFFF_FFFF
MAX_BODY = 1 << 20
DRAIN_TIMEOUT_S = 5.0
DEFAULT_NO = 100
MAX_NO = 100_000
# Newest first, unflagged only; `{where}` is one of two constant strings, never user input.
MSGS_SQL = (
    'SELECT m.text, m.pub_date, u.username FROM message m JOIN "user" u ON u.user_id = m.author_id '
    "WHERE COALESCE(m.flagged, 0) = 0 {where} ORDER BY m.pub_date DESC, m.message_id DESC LIMIT %s"
)

# Errors that mean "the database is not reachable right now": answer 503, keep serving.
DB_DOWN_ERRORS = (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, PoolClosed)


def log(msg: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} lab-app: {msg}", file=sys.stderr, flush=True)


def read_env_file(path: str | os.PathLike[str] | None) -> dict[str, str]:
    """`KEY=value` lines, `#` comments, no quoting (the node contract's env file format)."""
    if not path:
        return {}
    values: dict[str, str] = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    return values


def parse_listen(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--listen wants HOST:PORT, got {spec!r}")
    return (host or "0.0.0.0"), int(port)


def hash_password(pwd: str) -> str:
    salt = secrets.token_hex(8)
    return f"sha256${salt}${hashlib.sha256((salt + pwd).encode()).hexdigest()}"


class Redactor:
    """Keeps the URI and its password out of anything we print."""

    def __init__(self, uri: str) -> None:
        self._needles = [uri]
        try:
            info = psycopg.conninfo.conninfo_to_dict(uri)
        except psycopg.ProgrammingError:
            info = {}
        password = info.get("password")
        if password:
            self._needles.append(str(password))
        match = re.match(r"^[a-z]+://[^:/@]*:([^@]*)@", uri)
        if match and match.group(1):
            self._needles.append(match.group(1))

    def __call__(self, text: str) -> str:
        for needle in self._needles:
            text = text.replace(needle, "***")
        return text


# A page of the public timeline (30 messages, MiniTwit's PER_PAGE) for APP_CPU_MS to render.
_PAGE = [(f"user{i % 7}", f"message {i} <with> 'markup' & text " * 3, f"2024-05-{i % 28 + 1:02d} @ 12:{i:02d}")
         for i in range(30)]
_ROW = ('<li><img src="https://www.gravatar.com/avatar/{h}?d=identicon&amp;s=48"><p><strong>'
        '<a href="/{user}">{user}</a></strong> {text} <small>&mdash; {date}</small></li>')


def render_work(ms: float) -> None:
    """Spend `ms` of this thread's CPU time rendering `_PAGE` (thread time, not wall time: the cost
    is the same however busy the machine is, as a real page's would be)."""
    end = time.thread_time() + ms / 1000.0
    while time.thread_time() < end:
        # MiniTwit's gravatar_url: an MD5 of the user's e-mail (an identifier, not a secret).
        "".join(_ROW.format(h=hashlib.md5(u.encode(), usedforsecurity=False).hexdigest(), user=html.escape(u),
                            text=html.escape(t), date=d) for u, t, d in _PAGE)


def cpu_ms_setting(env: dict[str, str]) -> float:
    """APP_CPU_MS from the env file / environment: a number of milliseconds, 0 (the default) for none."""
    raw = env.get("APP_CPU_MS", "").strip() or "0"
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1000:
        raise ValueError(f"APP_CPU_MS must be milliseconds from 0 to 1000, got {raw!r}")
    return value


class ApiError(Exception):
    def __init__(self, status: int, msg: str) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg


class App:
    """Request handling against the database; the HTTP layer is `Handler`."""

    def __init__(self, node: str, version: str, pool: ConnectionPool | None, redact: Redactor,
                 cpu_ms: float = 0.0) -> None:
        self.node = node
        self.cpu_ms = cpu_ms
        self.version = version
        self.pool = pool
        self.redact = redact
        self.bad = version.startswith("bad")
        self._db_ok = True
        self._state_lock = threading.Lock()

    # -- database state, logged once per change ------------------------------------------------
    def db_state(self, ok: bool, exc: BaseException | None = None) -> None:
        with self._state_lock:
            if ok == self._db_ok:
                return
            self._db_ok = ok
        if ok:
            log(f"node={self.node} database available again")
        else:
            detail = str(exc).splitlines()[0] if exc and str(exc) else ""
            log(f"node={self.node} database unavailable: {type(exc).__name__}: {self.redact(detail)}")

    @contextlib.contextmanager
    def conn(self) -> Iterator[psycopg.Connection]:
        """A pooled connection that answered a ping just now.

        Every pooled connection can be dead at once: a database restart, or this node back from a
        network cut its keepalives did not survive. A dead one is handed back (the pool discards it
        and opens a replacement) and the next is tried at once, like SQLAlchemy's `pool_pre_ping`.
        Not the pool's own `check`: after a failed check psycopg_pool sleeps ~1 s before the next
        attempt (its reconnect backoff, psycopg PR #711), and that request misses the client's
        0.3 s (seen as the one failure of node-down-workers when the old holder came back).
        """
        assert self.pool is not None
        deadline = time.monotonic() + self.pool.timeout
        for attempt in range(self.pool.max_size + 1):  # each pooled connection once, then a fresh one
            if attempt and time.monotonic() >= deadline:
                break  # a ping to an unreachable database hangs up to tcp_user_timeout: stay bounded
            with self.pool.connection(timeout=max(0.0, deadline - time.monotonic())) as conn:
                try:
                    conn.execute("")  # an empty query: one round trip, no work
                except psycopg.OperationalError:
                    if not conn.closed:
                        raise  # the database answered with an error: not a dead connection
                    continue
                self.db_state(True)
                yield conn
                return
        raise PoolTimeout(f"no working connection within {self.pool.timeout:g} s")

    # -- helpers ----------------------------------------------------------------------------
    @staticmethod
    def _store_latest(cur, latest: int | None) -> None:
        if latest is None:
            return
        cur.execute(
            "INSERT INTO latest (id, value) VALUES (1, %s) "
            "ON CONFLICT (id) DO UPDATE SET value = GREATEST(latest.value, EXCLUDED.value)",
            (latest,),
        )

    @staticmethod
    def _user_id(cur, username: str) -> int | None:
        cur.execute('SELECT user_id FROM "user" WHERE username = %s', (username,))
        row = cur.fetchone()
        return row[0] if row else None

    # -- endpoints ---------------------------------------------------------------------------
    def health(self) -> tuple[int, object]:
        with self.conn() as conn:
            conn.execute("SELECT 1")
        return 200, {"status": "ok", "node": self.node, "version": self.version}

    def get_latest(self) -> tuple[int, object]:
        with self.conn() as conn:
            row = conn.execute("SELECT value FROM latest WHERE id = 1").fetchone()
        return 200, {"latest": row[0] if row else -1}

    def register(self, body: dict, latest: int | None) -> tuple[int, object]:
        username = body.get("username")
        email = body.get("email")
        pwd = body.get("pwd")
        error = None
        if not username or not isinstance(username, str):
            error = "You have to enter a username"
        elif not email or not isinstance(email, str) or "@" not in email:
            error = "You have to enter a valid email address"
        elif not pwd or not isinstance(pwd, str):
            error = "You have to enter a password"
        with self.conn() as conn, conn.transaction(), conn.cursor() as cur:
            if error is None:
                try:
                    # The unique index decides between two nodes registering the same name.
                    with conn.transaction():
                        cur.execute(
                            'INSERT INTO "user" (username, email, pw_hash) VALUES (%s, %s, %s)',
                            (username, email, hash_password(pwd)),
                        )
                except pg_errors.UniqueViolation:
                    error = "The username is already taken"
            self._store_latest(cur, latest)
        if error:
            return 400, {"status": 400, "error_msg": error}
        return 204, None

    def get_msgs(self, username: str | None, no: int, latest: int | None) -> tuple[int, object]:
        with self.conn() as conn, conn.transaction(), conn.cursor() as cur:
            self._store_latest(cur, latest)
            if username is None:
                cur.execute(MSGS_SQL.format(where=""), (no,))
            else:
                user_id = self._user_id(cur, username)
                if user_id is None:
                    return 404, {"status": 404, "error_msg": "User not found"}
                cur.execute(MSGS_SQL.format(where="AND m.author_id = %s"), (user_id, no))
            rows = cur.fetchall()
        return 200, [{"content": t, "pub_date": d, "user": u} for t, d, u in rows]

    def post_msg(self, username: str, body: dict, latest: int | None) -> tuple[int, object]:
        content = body.get("content")
        if not isinstance(content, str) or not content:
            return 400, {"status": 400, "error_msg": "You have to enter a message"}
        with self.conn() as conn, conn.transaction(), conn.cursor() as cur:
            user_id = self._user_id(cur, username)
            if user_id is not None:
                cur.execute(
                    "INSERT INTO message (author_id, text, pub_date, flagged) VALUES (%s, %s, %s, 0)",
                    (user_id, content, int(time.time())),
                )
            # Last, so the one hot row is locked only for the end of the transaction.
            self._store_latest(cur, latest)
            # Leaving the transaction block committed: only now may the caller say 204.
        if user_id is None:
            return 404, {"status": 404, "error_msg": "User not found"}
        return 204, None

    def get_follows(self, username: str, no: int, latest: int | None) -> tuple[int, object]:
        with self.conn() as conn, conn.transaction(), conn.cursor() as cur:
            self._store_latest(cur, latest)
            user_id = self._user_id(cur, username)
            if user_id is None:
                return 404, {"status": 404, "error_msg": "User not found"}
            cur.execute(
                'SELECT u.username FROM follower f JOIN "user" u ON u.user_id = f.whom_id '
                "WHERE f.who_id = %s ORDER BY u.username LIMIT %s",
                (user_id, no),
            )
            follows = [r[0] for r in cur.fetchall()]
        return 200, {"follows": follows}

    def post_follows(self, username: str, body: dict, latest: int | None) -> tuple[int, object]:
        if isinstance(body.get("follow"), str):
            action, target = "follow", body["follow"]
        elif isinstance(body.get("unfollow"), str):
            action, target = "unfollow", body["unfollow"]
        else:
            return 400, {"status": 400, "error_msg": "Expected 'follow' or 'unfollow'"}
        missing = False
        with self.conn() as conn, conn.transaction(), conn.cursor() as cur:
            who = self._user_id(cur, username)
            whom = self._user_id(cur, target)
            if who is None or whom is None:
                missing = True
            elif action == "follow":
                cur.execute(
                    "INSERT INTO follower (who_id, whom_id) SELECT %s, %s WHERE NOT EXISTS "
                    "(SELECT 1 FROM follower WHERE who_id = %s AND whom_id = %s)",
                    (who, whom, who, whom),
                )
            else:
                cur.execute("DELETE FROM follower WHERE who_id = %s AND whom_id = %s", (who, whom))
            self._store_latest(cur, latest)
        if missing:
            return 404, {"status": 404, "error_msg": "User not found"}
        return 204, None


class Handler(BaseHTTPRequestHandler):
    server: Server
    # HTTP/1.0: one request per connection. The lab's edge routes *new* connections to the
    # node holding the reserved IP; keep-alive would only blur what a client sees.
    protocol_version = "HTTP/1.0"
    timeout = 10  # a client that stalls mid-request does not hold a thread forever

    def log_message(self, format: str, *args) -> None:
        pass  # no access log: one line per start/stop is the contract

    # -- plumbing ---------------------------------------------------------------------------
    def _send(self, status: int, payload: object = None) -> None:
        app = self.server.app
        body = b"" if payload is None or status == 204 else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("X-Served-By", app.node)
        self.send_header("X-App-Version", app.version)
        if body:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ApiError(413, "Request body too large")
        raw = self.rfile.read(length) if length > 0 else b""
        if not raw:
            return {}
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, "Invalid JSON body") from exc
        if not isinstance(data, dict):
            raise ApiError(400, "Invalid JSON body")
        return data

    def _dispatch(self, method: str) -> None:
        app = self.server.app
        if app.bad:
            self._send(503, {"status": 503, "error_msg": f"version {app.version} is not healthy"})
            return
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = parse_qs(parts.query)
        try:
            status, payload = self._route(method, path, query)
        except ApiError as exc:
            status, payload = exc.status, {"status": exc.status, "error_msg": exc.msg}
        except DB_DOWN_ERRORS as exc:
            app.db_state(False, exc)
            status, payload = 503, {"status": 503, "error_msg": "database unavailable"}
            if path == "/health":
                payload = {"status": "unavailable", "node": app.node, "version": app.version}
        except psycopg.Error as exc:
            log(f"node={app.node} database error on {method} {path}: {type(exc).__name__}")
            status, payload = 500, {"status": 500, "error_msg": "database error"}
        except Exception as exc:  # a bug: answer 500, log one line (a traceback could carry data)
            log(f"node={app.node} internal error on {method} {path}: {type(exc).__name__}")
            status, payload = 500, {"status": 500, "error_msg": "internal error"}
        # A client that went away changes nothing: the transaction (if any) is already committed.
        with contextlib.suppress(OSError):
            self._send(status, payload)

    def _route(self, method: str, path: str, query: dict[str, list[str]]) -> tuple[int, object]:
        app = self.server.app
        latest = _int_param(query, "latest", None, lenient=True)
        if method == "GET" and path == "/health":
            return app.health()
        if method == "GET" and path == "/latest":
            return app.get_latest()
        segments = path.strip("/").split("/")
        route = segments[0]
        if route not in ("register", "msgs", "fllws") or len(segments) > 2 or (
            route == "register" and len(segments) != 1) or (route == "fllws" and len(segments) != 2):
            return 404, {"status": 404, "error_msg": "Not found"}
        allowed = {"register": ("POST",), "msgs": ("GET", "POST") if len(segments) == 2 else ("GET",),
                   "fllws": ("GET", "POST")}[route]
        if method not in allowed:
            return 405, {"status": 405, "error_msg": "Method not allowed"}
        if self.headers.get("Authorization") != SIM_AUTH:
            return 403, {"status": 403, "error_msg": NOT_AUTHORIZED}
        username = unquote(segments[1]) if len(segments) == 2 else None
        if app.cpu_ms:
            render_work(app.cpu_ms)
        if route == "register":
            return app.register(self._body(), latest)
        if route == "msgs":
            if method == "GET":
                return app.get_msgs(username, _int_param(query, "no", DEFAULT_NO), latest)
            assert username is not None
            return app.post_msg(username, self._body(), latest)
        assert username is not None
        if method == "GET":
            return app.get_follows(username, _int_param(query, "no", DEFAULT_NO), latest)
        return app.post_follows(username, self._body(), latest)

    def do_GET(self) -> None:  # http.server's naming
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


def _int_param(query: dict[str, list[str]], name: str, default, lenient: bool = False):
    """An integer query parameter. `lenient`: a malformed value is ignored (the simulator's
    `latest` must never fail a request); otherwise it is a 400."""
    values = query.get(name)
    if not values:
        return default
    try:
        value = int(values[-1])
        if not -(2**63) <= value < 2**63:  # the column is a BIGINT
            raise ValueError(value)
    except ValueError as exc:
        if lenient:
            return default
        raise ApiError(400, f"Query parameter '{name}' must be an integer") from exc
    return min(max(0, value), MAX_NO) if name == "no" else value


class Server(ThreadingHTTPServer):
    """Counts requests in flight so a SIGTERM can wait for them (bounded)."""

    daemon_threads = True  # we join in-flight work ourselves, with a deadline
    block_on_close = False
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], app: App) -> None:
        self.app = app
        self._inflight = 0
        self._cond = threading.Condition()
        super().__init__(addr, Handler)

    def process_request(self, request, client_address) -> None:
        with self._cond:
            self._inflight += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def _done(self) -> None:
        with self._cond:
            self._inflight -= 1
            self._cond.notify_all()

    def drain(self, timeout: float) -> int:
        """Wait until no request is in flight or `timeout` passed; returns how many are left."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._inflight


def _quiet_psycopg_logging() -> None:
    # psycopg_pool warns on every failed reconnect through `logging`; without a handler Python
    # prints those to stderr. The app logs database state changes itself, once each.
    logger = logging.getLogger("psycopg")
    logger.addHandler(logging.NullHandler())
    logger.propagate = False


def connect_kwargs() -> dict[str, object]:
    # A node that loses its path to the database (a cut link drops packets, no RST) must answer
    # 503 within seconds, not hang: bound connect, unacknowledged sends and idle sockets.
    return {
        "autocommit": True,
        "connect_timeout": 3,
        "tcp_user_timeout": 3000,
        "keepalives": 1,
        "keepalives_idle": 2,
        "keepalives_interval": 1,
        "keepalives_count": 2,
    }


def apply_schema(uri: str, schema_sql: str, deadline: float, redact: Redactor, node: str,
                 stop: threading.Event) -> bool:
    """Apply the schema under an advisory lock, retrying until `deadline` (monotonic).

    Returns False when `stop` was set while waiting for the database.
    """
    logged = False
    while not stop.is_set():
        try:
            with psycopg.connect(uri, **connect_kwargs()) as conn:
                conn.execute("SELECT pg_advisory_lock(%s)", (SCHEMA_LOCK_KEY,))
                try:
                    with conn.transaction():
                        conn.execute(schema_sql)
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s)", (SCHEMA_LOCK_KEY,))
            return True
        except psycopg.OperationalError as exc:
            if time.monotonic() >= deadline:
                raise
            if not logged:
                first = str(exc).splitlines()[0] if str(exc) else ""
                log(f"node={node} waiting for the database: {redact(first)}")
                logged = True
            stop.wait(0.5)
    return False


def make_pool(uri: str, min_size: int, max_size: int, timeout: float) -> ConnectionPool:
    def configure(conn: psycopg.Connection) -> None:
        # A request stuck behind a lock answers 503 rather than pinning a thread.
        conn.execute("SET statement_timeout = 5000")

    return ConnectionPool(
        uri,
        kwargs=connect_kwargs(),
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=timeout,  # a request waits this long for a connection, then 503
        # No `check`: App.conn pings each connection on checkout (why there, see its docstring).
        configure=configure,
        # Give up a background reconnect quickly; the next request that finds the pool empty
        # starts a new attempt at once. The default (exponential backoff up to 5 minutes)
        # would keep a node unhealthy long after the database came back.
        reconnect_timeout=2.0,
        name="lab-app",
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.lab.app", description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=parse_listen, default=("0.0.0.0", 80), help="HOST:PORT (port 0: any)")
    p.add_argument("--node", help="X-Served-By value (default: $NODE_NAME, else the hostname)")
    p.add_argument("--version", help="X-App-Version value (default: $APP_VERSION, else 'dev'); "
                   "'bad...' answers 503 to everything")
    p.add_argument("--env-file", help="KEY=value file with DATABASE_URL (the environment wins)")
    p.add_argument("--schema", default=str(SCHEMA_FILE), help="schema SQL applied at start")
    p.add_argument("--pool-min", type=int, default=2)
    p.add_argument("--pool-max", type=int, default=10)
    p.add_argument("--db-timeout", type=float, default=2.0, help="seconds to wait for a pooled connection")
    p.add_argument("--start-timeout", type=float, default=30.0,
                   help="give up (exit 2) when the database has not answered this long at start")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = {**read_env_file(args.env_file), **os.environ}
    node = args.node or env.get("NODE_NAME") or socket.gethostname()
    version = args.version or env.get("APP_VERSION") or "dev"
    uri = env.get("DATABASE_URL", "")
    redact = Redactor(uri)
    bad = version.startswith("bad")
    try:
        cpu_ms = cpu_ms_setting(env)
    except ValueError as exc:
        log(f"node={node} {exc}")
        return 2
    if not uri and not bad:
        log(f"node={node} DATABASE_URL is not set (env file or environment)")
        return 2
    _quiet_psycopg_logging()

    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum, _frame) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    pool = None if bad else make_pool(uri, args.pool_min, args.pool_max, args.db_timeout)
    app = App(node, version, pool, redact, cpu_ms)
    try:
        server = Server(args.listen, app)
    except OSError as exc:
        log(f"node={node} cannot listen on {args.listen[0]}:{args.listen[1]}: {exc}")
        return 2

    if pool is not None:
        try:
            applied = apply_schema(uri, Path(args.schema).read_text(),
                                   time.monotonic() + args.start_timeout, redact, node, stop)
        except (psycopg.Error, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            log(f"node={node} could not apply the schema: {type(exc).__name__}: {redact(first)}")
            server.server_close()
            return 2
        if not applied:
            log(f"node={node} stopped on {received[0]} before the database answered")
            server.server_close()
            return 0
        pool.open(wait=False)

    host, port = server.server_address[:2]
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                               name="serve", daemon=True)
    serving.start()
    log(f"node={node} version={version} listening on {host}:{port} pid={os.getpid()}"
        + (f" ({cpu_ms:g} ms of CPU per API request)" if cpu_ms else "")
        + (" (bad version: answering 503 to everything)" if bad else ""))

    while not stop.wait(0.5):
        pass
    t0 = time.monotonic()
    server.shutdown()  # stop accepting: serve_forever returns
    server.socket.close()  # new connections are refused from here on
    left = server.drain(DRAIN_TIMEOUT_S)
    if pool is not None:
        pool.close(timeout=2.0)
    log(f"node={node} version={version} stopped on {received[0] if received else 'request'} "
        f"after draining {time.monotonic() - t0:.2f}s"
        + (f"; {left} request(s) abandoned" if left else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
