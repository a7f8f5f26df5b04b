"""The lab's traffic generator: open-loop (or closed-loop) simulator traffic, one JSON line per request.

Runs in the lab's `client` namespace against the reserved IP:

    python -m tests.lab.traffic --url http://203.0.113.10 --rate 50 --duration 30 --out run.jsonl

Requests are *scheduled* at `rate` per second whatever earlier ones do (a hung request occupies
one worker thread, never the schedule), each on a new TCP connection with `Connection: close`:
the lab's edge, like DigitalOcean's, routes new connections to the node holding the reserved IP,
so a kept-alive connection would hide a failover. The user is registered first; then each request
is a write (`POST /msgs/<user>`, unique content `lab-<run>-<seq>`) with probability
`write_ratio`, else a read (`GET /msgs?no=5` or `GET /latest`). Every request carries the
simulator's Authorization header and `latest=<seq>`.

Each record is written and flushed as the request completes (the drill reads the file while it
grows): {seq, t (epoch at send), dt, op, method, path, status, served_by, version, error,
content, latest_seen}. `--duration 0` runs until SIGTERM/SIGINT; either way the generator stops
scheduling, waits for requests in flight (bounded), records them and exits 0.

Closed loop (`--clients N` instead of `--rate`): N clients, each sending its next request as soon
as its last one was answered (or failed), for `--duration` seconds: the rate is whatever the
servers sustain, which is what a throughput figure measures (`closed_loop_stats`).

The analysis helpers at the bottom are pure functions over records; the drill's report uses them.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import queue
import random
import secrets
import signal
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

SIM_AUTH = "Basic c2ltdWxhdG9yOnN1cGVyX3NhZmUh"  # simulator:super_safe!
MAX_WORKERS = 1000
Record = dict[str, Any]


class _Workers:
    """A thread pool that grows whenever no worker is idle, so a submitted request starts now.

    `concurrent.futures` would queue work behind hung requests once its fixed size is reached,
    which turns an open-loop generator into a closed-loop one. Daemon threads: a request stuck
    past the stop deadline must not keep the process alive.
    """

    def __init__(self, cap: int = MAX_WORKERS) -> None:
        self._cap = cap
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0
        self._threads: list[threading.Thread] = []

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._idle > 0:
                self._idle -= 1
            elif len(self._threads) < self._cap:
                t = threading.Thread(target=self._run, name=f"traffic-{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()
        self._queue.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            if fn is None:
                return
            try:
                fn()
            finally:
                with self._lock:
                    self._idle += 1

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    @property
    def size(self) -> int:
        return len(self._threads)


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "remote disconnected"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"[:120]
    return f"{type(exc).__name__}: {exc}"[:120]


class TrafficGenerator:
    """Open-loop simulator traffic against `url` (or closed-loop with `clients`); records every
    request's outcome.

        gen = TrafficGenerator("http://127.0.0.1:8080", rate=50, out="run.jsonl").start()
        ...
        records = gen.stop()

    `duration` None or 0: run until stop(). `records` is a snapshot of what completed so far.
    """

    def __init__(
        self,
        url: str,
        rate: float,
        duration: float | None = None,
        out: str | Path | None = None,
        user: str | None = None,
        write_ratio: float = 0.3,
        timeout: float = 1.0,
        run_id: str | None = None,
        seed: int | None = None,
        register_timeout: float = 5.0,
        latest_ratio: float = 0.5,
        clients: int | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url must be http://HOST[:PORT][/base], got {url!r}")
        if clients is not None and clients < 1:
            raise ValueError("clients must be >= 1")
        if clients is None and rate <= 0:
            raise ValueError("rate must be > 0")
        if not 0.0 <= write_ratio <= 1.0:
            raise ValueError("write_ratio must be within [0, 1]")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.base = parts.path.rstrip("/")
        self.rate = float(rate)
        self.clients = clients
        self.duration = duration or None
        self.out = Path(out) if out else None
        self.run_id = run_id or secrets.token_hex(3)
        self.user = user or f"lab-{self.run_id}"
        self.write_ratio = write_ratio
        self.latest_ratio = latest_ratio
        self.timeout = timeout
        self.register_timeout = register_timeout
        self._rng = random.Random(seed)
        self._seq = 0
        self._lock = threading.Lock()
        self._records: list[Record] = []
        self._inflight: dict[int, Record] = {}
        self._drained = threading.Condition(self._lock)
        self._fh: IO[str] | None = None
        self._stop = threading.Event()
        self._done = threading.Event()
        self._registered = threading.Event()
        self._closed = False
        self._workers = _Workers()
        self._scheduler: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> TrafficGenerator:
        if self.out:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.out, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self._scheduler = threading.Thread(target=self._schedule, name="traffic-schedule", daemon=True)
        self._scheduler.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the duration to run out (or stop()); True when no more requests will be sent."""
        return self._done.wait(timeout)

    def stop(self, grace: float | None = None) -> list[Record]:
        """Stop scheduling, wait for requests in flight (at most `grace`, default 3 x timeout + 1 s),
        record the stragglers as unfinished, close the file. Returns all records."""
        self._stop.set()
        if self._scheduler is not None:
            self._scheduler.join()
        grace = 3 * self.timeout + 1.0 if grace is None else grace
        deadline = time.monotonic() + grace
        with self._lock:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._drained.wait(left)
            for seq in sorted(self._inflight):
                rec = self._inflight.pop(seq)
                rec.update(dt=round(time.time() - rec["t"], 6), error="unfinished at stop")
                self._emit(rec)
            self._closed = True
            if self._fh is not None:
                self._fh.close()
                self._fh = None
        self._workers.close()
        return self.records

    def __enter__(self) -> TrafficGenerator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def records(self) -> list[Record]:
        with self._lock:
            return list(self._records)

    @property
    def workers(self) -> int:
        """How many worker threads the open loop needed so far."""
        return self._workers.size

    # -- the schedule --------------------------------------------------------------------------
    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def _schedule(self) -> None:
        if self.clients:
            self._closed_loop()
            return
        try:
            self._register()
            interval = 1.0 / self.rate
            t0 = time.monotonic()
            end = t0 + self.duration if self.duration else math.inf
            i = 0
            while True:
                due = t0 + i * interval
                if due >= end:
                    break
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    break
                self._workers.submit(self._one_request())
                i += 1
        finally:
            self._done.set()

    def _closed_loop(self) -> None:
        """`clients` threads, each sending its next request when its last one is done."""
        try:
            self._register()
            end = time.monotonic() + self.duration if self.duration else math.inf

            def client() -> None:
                while not self._stop.is_set() and time.monotonic() < end:
                    self._one_request()()

            threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(self.clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            self._done.set()

    def _register_body(self) -> dict[str, str]:
        return {"username": self.user, "email": f"{self.user}@lab.invalid", "pwd": self.run_id}

    def _register(self) -> None:
        """Register the user (400 "taken" is fine), retrying until answered or register_timeout.

        If nothing answered by then, the schedule starts anyway and a write slot becomes a
        registration attempt until one is answered (so writes do not 404 for the whole run).
        """
        deadline = time.monotonic() + self.register_timeout
        while not self._stop.is_set():
            self._request(self._next_seq(), "register", "POST", "/register", self._register_body())
            if self._registered.is_set() or time.monotonic() >= deadline:
                return
            self._stop.wait(0.2)

    def _one_request(self) -> Callable[[], None]:
        seq = self._next_seq()
        roll = self._rng.random()
        if roll < self.write_ratio and not self._registered.is_set():
            return lambda: self._request(seq, "register", "POST", "/register", self._register_body())
        if roll < self.write_ratio:
            content = f"lab-{self.run_id}-{seq}"
            path = f"/msgs/{quote(self.user, safe='')}"
            return lambda: self._request(seq, "write", "POST", path, {"content": content}, content)
        if self._rng.random() < self.latest_ratio:
            return lambda: self._request(seq, "latest", "GET", "/latest")
        return lambda: self._request(seq, "read", "GET", "/msgs?no=5")

    # -- one request ---------------------------------------------------------------------------
    def _request(self, seq: int, op: str, method: str, path: str, body: dict | None = None,
                 content: str | None = None) -> Record:
        full = f"{self.base}{path}{'&' if '?' in path else '?'}latest={seq}"
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": SIM_AUTH, "Connection": "close"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        rec: Record = {
            "seq": seq, "t": time.time(), "dt": None, "op": op, "method": method, "path": full,
            "status": None, "served_by": None, "version": None, "error": None,
            "content": content, "latest_seen": None,
        }
        with self._lock:
            self._inflight[seq] = rec
        t0 = time.monotonic()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, full, body=payload, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            rec["status"] = resp.status
            rec["served_by"] = resp.getheader("X-Served-By")
            rec["version"] = resp.getheader("X-App-Version")
            if op == "register" and resp.status in (204, 400):
                self._registered.set()
            if op == "latest" and resp.status == 200:
                try:
                    rec["latest_seen"] = int(json.loads(data)["latest"])
                except (ValueError, KeyError, TypeError):
                    rec["error"] = "bad /latest body"
        except (OSError, http.client.HTTPException) as exc:
            rec["error"] = _short_error(exc)
        finally:
            conn.close()
        rec["dt"] = round(time.monotonic() - t0, 6)
        self._finish(rec)
        return rec

    def _finish(self, rec: Record) -> None:
        with self._lock:
            if self._inflight.pop(rec["seq"], None) is None:
                return  # already recorded as unfinished by stop()
            self._emit(rec)
            self._drained.notify_all()

    def _emit(self, rec: Record) -> None:
        # Caller holds self._lock.
        self._records.append(rec)
        if self._fh is not None and not self._closed:
            self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._fh.flush()


# -- analysis: pure functions over records -----------------------------------------------------

def load(path: str | Path) -> list[Record]:
    """Records from a JSON-lines file; a torn last line (the file is still growing) is skipped."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break
            raise
    return records


def ok(record: Record) -> bool:
    """2xx without error. A registration answered 400 ("taken") counts as ok: the user exists."""
    if record.get("error"):
        return False
    status = record.get("status")
    if status is None:
        return False
    return 200 <= status < 300 or (record.get("op") == "register" and status == 400)


def _in_window(record: Record, since: float | None, until: float | None) -> bool:
    t = record["t"]
    return (since is None or t >= since) and (until is None or t < until)


def failed(records: Iterable[Record], since: float | None = None, until: float | None = None) -> list[Record]:
    """Requests sent in [since, until) that did not succeed (status not 2xx, or an error)."""
    return [r for r in records if _in_window(r, since, until) and not ok(r)]


def first_success_by(records: Iterable[Record], node: str, after: float) -> float | None:
    """Send time of the first 2xx answer served by `node` among requests sent at or after `after`."""
    times = [r["t"] for r in records if r["t"] >= after and r.get("served_by") == node and ok(r)]
    return min(times) if times else None


DYING_S = 0.05


def failed_except_writes_in_flight(records: Iterable[Record], kills: Iterable[tuple[float, float]]) -> list[Record]:
    """Failed requests, less the writes an app held when it was killed: each kill is (when the
    kill was issued, when it had happened). Such a write may already be stored, so a proxy must not
    resend it (a duplicate) and it fails; every other request (a refused connection, a GET) a
    proxy can resend, so its failure counts."""
    kills = list(kills)

    def held(r: Record) -> bool:
        # DYING_S: a killed process's listening socket lives on for a moment (its teardown, or a
        # kill delivered through systemd); a connection accepted then is reset after its request.
        return r.get("method") == "POST" and any(r["t"] <= done + DYING_S and r["t"] + r["dt"] >= start
                                                 for start, done in kills)
    return [r for r in failed(records) if not held(r)]


def closed_loop_stats(records: Iterable[Record]) -> dict[str, Any]:
    """Throughput of a closed-loop run (the registration left out): answered requests per second
    over the run's span (first send to last answer), p50/p99 latency of the successful ones (ms,
    nearest rank), how many failed."""
    recs = [r for r in records if r.get("op") != "register" and r.get("dt") is not None]
    if not recs:
        return {"requests": 0, "failed": 0, "seconds": 0.0, "req_s": 0.0, "p50_ms": None, "p99_ms": None}
    span = max(r["t"] + r["dt"] for r in recs) - min(r["t"] for r in recs)
    good = sorted(r["dt"] for r in recs if ok(r))

    def pct(q: float) -> float | None:
        return round(1000 * good[max(0, math.ceil(q * len(good)) - 1)], 1) if good else None

    return {"requests": len(recs), "failed": len(recs) - len(good), "seconds": round(span, 2),
            "req_s": round(len(good) / span, 1) if span > 0 else 0.0, "p50_ms": pct(0.50), "p99_ms": pct(0.99)}


def served_by_counts(records: Iterable[Record], ok_only: bool = False) -> dict[str, int]:
    """How many answers each node gave (any status; only successes with ok_only)."""
    return dict(Counter(r["served_by"] for r in records
                        if r.get("served_by") is not None and (not ok_only or ok(r))))


def versions_seen(records: Iterable[Record], since: float | None = None, until: float | None = None,
                  ok_only: bool = False) -> dict[str, int]:
    """X-App-Version values answered by requests sent in [since, until), with counts."""
    return dict(Counter(r["version"] for r in records
                        if r.get("version") is not None and _in_window(r, since, until)
                        and (not ok_only or ok(r))))


def acked_writes(records: Iterable[Record], before: float | None = None) -> list[str]:
    """Contents of writes answered 204 (sent before `before`): rows that must be in the database."""
    return [r["content"] for r in records
            if r.get("op") == "write" and r.get("status") == 204 and not r.get("error")
            and (before is None or r["t"] < before)]


def latest_regressions(records: Iterable[Record]) -> list[Record]:
    """/latest answers lower than something a client had already seen before sending them.

    Requests overlap, so "before" means happened-before: the earlier request *completed*
    (t + dt) before the later one was *sent* (t). The floor a /latest answer must reach is the
    highest of (a) the latest=<seq> of any request answered 2xx (the app stores it before
    answering) other than /latest itself, and (b) any /latest answer, among those that completed
    before it was sent. Returns one entry per violating answer, with the floor it broke.
    """
    events = []  # (time, kind, record): completions raise the floor, sends are checked against it
    for r in records:
        if not ok(r) or r.get("dt") is None:
            continue
        done = r["t"] + r["dt"]
        if r.get("op") == "latest":
            if r.get("latest_seen") is None:
                continue
            events.append((done, 1, r, r["latest_seen"]))
            events.append((r["t"], 0, r, None))
        elif 200 <= r.get("status", 0) < 300:
            events.append((done, 1, r, r["seq"]))
    # At equal times a send is checked before a completion is counted (strict happened-before).
    events.sort(key=lambda e: (e[0], e[1]))
    floor, floor_seq = -1, None
    out = []
    for _when, kind, r, value in events:
        if kind == 1:
            if value > floor:
                floor, floor_seq = value, r["seq"]
        elif r["latest_seen"] < floor:
            out.append({"seq": r["seq"], "t": r["t"], "served_by": r.get("served_by"),
                        "latest_seen": r["latest_seen"], "floor": floor, "floor_seq": floor_seq})
    return out


def rows_lost(acked_contents: Iterable[str], db_url: str) -> tuple[int, list[str]]:
    """How many acknowledged contents are missing from table `message` (one query), and which.

    `db_url` is passed in by the caller (never a command-line argument: it carries a password).
    """
    import psycopg  # lazily: the generator itself needs only the standard library

    wanted = list(dict.fromkeys(acked_contents))
    if not wanted:
        return 0, []
    with psycopg.connect(db_url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT c FROM unnest(%s::text[]) WITH ORDINALITY AS w(c, i) "
            "WHERE NOT EXISTS (SELECT 1 FROM message m WHERE m.text = w.c) ORDER BY i",
            (wanted,),
        ).fetchall()
    missing = [r[0] for r in rows]
    return len(missing), missing


def duplicate_rows(db_url: str) -> int:
    """Messages stored more than once. Every write the generator sends carries unique content, so
    a duplicate is a request that was executed twice (a proxy or a client resent it)."""
    import psycopg

    with psycopg.connect(db_url, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(n - 1), 0) FROM (SELECT count(*) AS n FROM message GROUP BY author_id, text "
            "HAVING count(*) > 1) d"
        ).fetchone()
    return int(row[0])


# -- CLI ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.lab.traffic", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="http://HOST[:PORT], e.g. http://203.0.113.10")
    p.add_argument("--rate", type=float, help="requests per second (scheduled, open loop)")
    p.add_argument("--clients", type=int, help="closed loop instead: this many clients, each sending its "
                   "next request when the last one is answered")
    p.add_argument("--duration", type=float, default=0.0, help="seconds; 0 = until SIGTERM/SIGINT")
    p.add_argument("--out", required=True, help="JSON-lines file, one record per request")
    p.add_argument("--user", help="simulator user to write as (default lab-<run>)")
    p.add_argument("--write-ratio", type=float, default=0.3)
    p.add_argument("--timeout", type=float, default=1.0, help="per-request socket timeout, seconds")
    p.add_argument("--run-id", help="tag in write contents (default: random)")
    p.add_argument("--seed", type=int, help="seed for the read/write mix")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (args.rate is None) == (args.clients is None):
        print("traffic: give either --rate (open loop) or --clients (closed loop)", file=sys.stderr)
        return 2
    try:
        gen = TrafficGenerator(args.url, args.rate or 0.0, duration=args.duration, out=args.out, user=args.user,
                               write_ratio=args.write_ratio, timeout=args.timeout, run_id=args.run_id,
                               seed=args.seed, clients=args.clients)
    except ValueError as exc:
        print(f"traffic: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    gen.start()
    load = f"clients={args.clients} (closed loop)" if args.clients else f"rate={args.rate}/s"
    print(f"traffic: run={gen.run_id} user={gen.user} url={args.url} {load} "
          f"duration={args.duration or 'until SIGTERM'} out={args.out}", file=sys.stderr, flush=True)
    while not stop.is_set() and not gen.wait(0.1):
        pass
    records = gen.stop()
    bad = failed(records)
    with contextlib.suppress(OSError):
        print(f"traffic: {len(records)} requests, {len(bad)} failed, served_by {served_by_counts(records)}, "
              f"{gen.workers} worker threads", file=sys.stderr, flush=True)
        if args.clients:
            print(f"traffic: closed loop {json.dumps(closed_loop_stats(records))}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
