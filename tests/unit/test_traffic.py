"""The lab's traffic generator against a stub HTTP server on loopback, and its analysis helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.lab import traffic
from tests.lab.traffic import TrafficGenerator

REPO = Path(__file__).resolve().parents[2]
FIELDS = {"seq", "t", "dt", "op", "method", "path", "status", "served_by", "version", "error",
          "content", "latest_seen"}


class Stub:
    """A tiny simulator stand-in. `behave(method, path) -> (status, delay_s)`; everything it
    received is in `requests` (with the number of the TCP connection it came on)."""

    def __init__(self, behave=None) -> None:
        self.behave = behave or (lambda method, path: (200, 0.0))
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.connections = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1 keeps a connection open unless the client says close: a client that
            # reused connections would show up here as several requests on one connection.
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with stub.lock:
                    stub.connections += 1
                    self.conn_no = stub.connections

            def log_message(self, *args) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                latest = parse_qs(parts.query).get("latest", [None])[0]
                with stub.lock:
                    stub.requests.append({
                        "conn": self.conn_no, "method": self.command, "path": parts.path,
                        "latest": int(latest) if latest is not None else None,
                        "auth": self.headers.get("Authorization"),
                        "connection": self.headers.get("Connection"),
                        "body": json.loads(body) if body else None,
                    })
                status, delay = stub.behave(self.command, parts.path)
                if delay:
                    time.sleep(delay)
                payload = b""
                if status == 200 and parts.path == "/latest":
                    payload = json.dumps({"latest": 7}).encode()
                elif status == 200:
                    payload = b"[]"
                self.send_response(status)
                self.send_header("X-Served-By", "stub")
                self.send_header("X-App-Version", "v9")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = _answer
            do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def simulator(method: str, path: str) -> tuple[int, float]:
    """Answers like the app: 204 to writes and registration, 200 to reads."""
    return (204 if method == "POST" else 200), 0.0


def run(gen: TrafficGenerator, seconds: float) -> list[dict]:
    gen.start()
    try:
        time.sleep(seconds)
    finally:
        records = gen.stop()
    return records


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_records_every_request_with_its_fields_each_on_a_new_connection(tmp_path):
    out = tmp_path / "run.jsonl"
    with Stub(simulator) as stub:
        gen = TrafficGenerator(stub.url, rate=40, duration=1.0, out=out, write_ratio=0.5, seed=1,
                               run_id="r1")
        gen.start()
        assert gen.wait(5), "a 1 s run did not finish its schedule"
        records = gen.stop()

    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == records
    assert 38 <= len(records) <= 43  # register + 40 scheduled (+/- one at the edges)
    assert all(set(r) == FIELDS for r in records)
    assert records[0]["op"] == "register" and records[0]["status"] == 204
    assert stub.requests[0]["body"] == {"username": "lab-r1", "email": "lab-r1@lab.invalid", "pwd": "r1"}

    # One TCP connection per request, each asking the server to close it.
    assert stub.connections == len(stub.requests) == len(records)
    assert len({r["conn"] for r in stub.requests}) == len(stub.requests)
    assert {r["connection"] for r in stub.requests} == {"close"}
    assert {r["auth"] for r in stub.requests} == {traffic.SIM_AUTH}
    # Every request carries latest=<its seq>; seqs are unique.
    assert sorted(r["latest"] for r in stub.requests) == sorted(r["seq"] for r in records)
    assert len({r["seq"] for r in records}) == len(records)

    ops = {r["op"] for r in records[1:]}
    assert ops == {"write", "read", "latest"}
    for r in records:
        assert r["status"] in (200, 204) and r["error"] is None
        assert (r["served_by"], r["version"]) == ("stub", "v9")
        assert r["dt"] >= 0 and abs(r["t"] - time.time()) < 30
    writes = [r for r in records if r["op"] == "write"]
    assert all(r["content"] == f"lab-r1-{r['seq']}" and r["path"].startswith("/msgs/lab-r1?")
               for r in writes)
    assert {b["content"] for b in (q["body"] for q in stub.requests if q["path"] == "/msgs/lab-r1")} \
        == {r["content"] for r in writes}
    assert all(r["latest_seen"] == 7 for r in records if r["op"] == "latest")
    assert all(r["latest_seen"] is None for r in records if r["op"] != "latest")
    assert {r["path"].split("?")[0] for r in records if r["op"] == "read"} == {"/msgs"}


def test_schedule_is_kept_while_requests_hang():
    # Every /latest hangs 0.8 s; an open loop keeps sending at 40/s regardless.
    def behave(method, path):
        return (200, 0.8) if path == "/latest" else simulator(method, path)

    with Stub(behave) as stub:
        gen = TrafficGenerator(stub.url, rate=40, duration=2.0, write_ratio=0.0, timeout=3.0, seed=2)
        gen.start()
        assert gen.wait(6)
        records = [r for r in gen.stop() if r["op"] != "register"]

    sends = sorted(r["t"] for r in records)
    assert 78 <= len(sends) <= 82
    assert sends[-1] - sends[0] < 2.2
    gaps = [b - a for a, b in zip(sends, sends[1:], strict=False)]
    assert max(gaps) < 0.15, f"the schedule stalled for {max(gaps):.2f}s behind hung requests"
    hung = [r for r in records if r["op"] == "latest"]
    assert len(hung) >= 20 and all(r["dt"] >= 0.75 and r["status"] == 200 for r in hung)


def test_a_500_is_recorded_as_a_failure():
    def behave(method, path):
        return (204, 0.0) if path == "/register" else (500, 0.0)

    with Stub(behave) as stub:
        records = run(TrafficGenerator(stub.url, rate=20, seed=3), 0.5)
    rest = records[1:]
    assert rest and all(r["status"] == 500 and r["error"] is None for r in rest)
    assert all(r["served_by"] == "stub" for r in rest)
    assert traffic.failed(records) == rest


def test_a_hung_request_is_recorded_as_a_timeout():
    def behave(method, path):
        return (204, 0.0) if path == "/register" else (200, 1.5)

    with Stub(behave) as stub:
        records = run(TrafficGenerator(stub.url, rate=10, timeout=0.3, seed=4), 0.6)
    rest = records[1:]
    assert rest and all(r["status"] is None and r["error"] == "timeout" for r in rest)
    assert all(0.25 <= r["dt"] < 1.0 for r in rest)
    assert traffic.failed(records) == rest


def test_connection_refused_is_recorded_and_the_schedule_goes_on():
    url = f"http://127.0.0.1:{free_port()}"
    records = run(TrafficGenerator(url, rate=20, register_timeout=0.3, seed=5), 1.0)
    registers = [r for r in records if r["op"] == "register"]
    assert len(registers) >= 2, "registration is retried while nothing answers"
    # ~0.4 s of registration attempts, then the schedule: 20/s for the remaining ~0.6 s.
    assert len(records) >= 12 and {"read", "latest"} <= {r["op"] for r in records}
    assert all(r["status"] is None and r["error"] == "connection refused" and r["served_by"] is None
               for r in records)
    assert len(traffic.failed(records)) == len(records)


def test_registration_is_retried_in_write_slots_until_answered():
    t_up = time.time() + 0.6  # the app "comes up" 0.6 s after the start

    def behave(method, path):
        return (503, 0.0) if time.time() < t_up else simulator(method, path)

    with Stub(behave) as stub:
        gen = TrafficGenerator(stub.url, rate=20, write_ratio=1.0, register_timeout=0.2, seed=7)
        records = run(gen, 1.5)
    answered = [r for r in records if r["op"] == "register" and r["status"] == 204]
    assert answered, "the user was never registered"
    first_ok = answered[0]["t"] + answered[0]["dt"]
    early = [r for r in records if r["t"] + r["dt"] <= first_ok]
    late = [r for r in records if r["t"] > first_ok]
    assert len([r for r in early if r["op"] == "register"]) >= 5 and len(late) >= 10
    assert {r["op"] for r in late} == {"write"} and all(r["status"] == 204 for r in late)
    assert {r["path"].split("?")[0] for r in late} == {f"/msgs/{gen.user}"}


def test_cli_flushes_in_flight_requests_on_sigterm(tmp_path):
    out = tmp_path / "cli.jsonl"

    def behave(method, path):
        return (200, 0.5) if path == "/latest" else simulator(method, path)

    with Stub(behave) as stub:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.lab.traffic", "--url", stub.url, "--rate", "20",
             "--duration", "0", "--out", str(out), "--write-ratio", "0.3", "--seed", "6"],
            cwd=REPO, stderr=subprocess.PIPE, text=True,
        )
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if out.exists() and len(out.read_text().splitlines()) >= 15:
                    break
                time.sleep(0.05)
            else:
                pytest.fail("the CLI wrote fewer than 15 records in 10 s")
            lines_before = len(out.read_text().splitlines())
            os.kill(proc.pid, signal.SIGTERM)
            _, err = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        received = sorted(r["latest"] for r in stub.requests)

    assert proc.returncode == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]  # every line whole
    # Everything the server received is on file, including what was in flight at SIGTERM.
    assert sorted(r["seq"] for r in records) == received
    assert len(records) > lines_before
    assert all(r["status"] in (200, 204) and r["error"] is None for r in records)
    assert f"{len(records)} requests, 0 failed" in err


def test_closed_loop_keeps_exactly_n_requests_in_flight_and_goes_as_fast_as_answers_come():
    # Every request takes 50 ms: 3 clients in a closed loop send ~60/s over 1 s, never a 4th at once.
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def behave(method, path):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1
        return simulator(method, path)

    with Stub(behave) as stub:
        gen = TrafficGenerator(stub.url, rate=0, clients=3, duration=1.0, seed=8)
        gen.start()
        assert gen.wait(5)
        records = gen.stop()
    stats = traffic.closed_loop_stats(records)
    assert state["most"] == 3
    assert 45 <= stats["requests"] <= 63 and stats["failed"] == 0, stats
    assert 45 <= stats["req_s"] <= 63 and 50 <= stats["p50_ms"] <= stats["p99_ms"] < 150, stats
    assert {"read", "write", "latest"} <= {r["op"] for r in records}


def test_the_cli_wants_a_rate_or_clients_not_both(tmp_path):
    for args in ([], ["--rate", "5", "--clients", "2"]):
        proc = subprocess.run([sys.executable, "-m", "tests.lab.traffic", "--url", "http://127.0.0.1:9",
                               "--out", str(tmp_path / "x.jsonl"), *args], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 2 and "either --rate (open loop) or --clients (closed loop)" in proc.stderr


def test_closed_loop_stats_count_answers_over_the_span_and_latency_of_successes():
    records = [rec(1, 99.0, op="register", status=204)]  # the registration is not a measured request
    records += [rec(i, 100.0 + i * 0.01, dt=0.010 if i < 99 else 0.5) for i in range(2, 101)]
    records += [rec(101, 101.0, status=503, dt=0.1)]
    stats = traffic.closed_loop_stats(records)
    # 99 answered 2xx from t=100.02 to the last answer at 101.5; the 503 counts as failed, not served.
    assert stats["requests"] == 100 and stats["failed"] == 1 and stats["seconds"] == 1.48
    assert stats["req_s"] == round(99 / 1.48, 1) and stats["p50_ms"] == 10.0 and stats["p99_ms"] == 500.0
    assert traffic.closed_loop_stats([])["req_s"] == 0.0


# -- analysis helpers on hand-made records --------------------------------------------------------

def rec(seq, t, dt=0.05, op="read", status=200, served_by="primary", version="v1", error=None,
        content=None, latest_seen=None):
    return {"seq": seq, "t": t, "dt": dt, "op": op, "method": "GET", "path": f"/x?latest={seq}",
            "status": status, "served_by": served_by, "version": version, "error": error,
            "content": content, "latest_seen": latest_seen}


RECORDS = [
    rec(1, 100.0, op="register", status=400),  # "taken": fine
    rec(2, 101.0, op="write", status=204, content="c2"),
    rec(3, 102.0, op="write", status=503, content="c3"),
    rec(4, 103.0, status=None, served_by=None, version=None, error="timeout", dt=1.0),
    rec(5, 104.0, status=200, served_by="standby", version="v1"),
    rec(6, 105.0, op="write", status=204, served_by="standby", version="v2", content="c6"),
    rec(7, 106.0, op="write", status=204, served_by="primary", version="v2", content="c7"),
    rec(8, 107.0, status=503, served_by="standby", version="bad-1"),
]


def test_failed_counts_non_2xx_and_errors_within_the_window():
    assert [r["seq"] for r in traffic.failed(RECORDS)] == [3, 4, 8]
    assert [r["seq"] for r in traffic.failed(RECORDS, since=102.5, until=107.0)] == [4]
    assert traffic.failed([rec(9, 1.0, op="register", status=500)])  # only "taken" is fine


def test_first_success_by_a_node_after_a_time():
    assert traffic.first_success_by(RECORDS, "standby", after=100.0) == 104.0
    assert traffic.first_success_by(RECORDS, "standby", after=104.5) == 105.0
    assert traffic.first_success_by(RECORDS, "standby", after=105.5) is None  # 503 is no success
    assert traffic.first_success_by(RECORDS, "primary", after=103.0) == 106.0


def test_served_by_and_versions():
    assert traffic.served_by_counts(RECORDS) == {"primary": 4, "standby": 3}
    assert traffic.served_by_counts(RECORDS, ok_only=True) == {"primary": 3, "standby": 2}
    assert traffic.versions_seen(RECORDS, since=104.0, until=107.5) == {"v1": 1, "v2": 2, "bad-1": 1}
    assert traffic.versions_seen(RECORDS, since=104.0, ok_only=True) == {"v1": 1, "v2": 2}


def test_acked_writes_are_the_204_answered_ones():
    assert traffic.acked_writes(RECORDS) == ["c2", "c6", "c7"]
    assert traffic.acked_writes(RECORDS, before=106.0) == ["c2", "c6"]


def test_latest_regressions_use_happened_before():
    records = [
        rec(10, 10.0, op="write", status=204, dt=0.1, content="a"),  # stored latest=10 by 10.1
        rec(11, 10.05, op="latest", dt=0.2, latest_seen=5),   # sent before 10 completed: fine
        rec(12, 10.2, op="latest", dt=0.1, latest_seen=10),   # fine
        rec(13, 10.4, op="latest", dt=0.1, latest_seen=9, served_by="standby"),  # below 10: regression
        rec(20, 10.5, op="read", status=503, dt=0.1),          # not stored: raises no floor
        rec(21, 10.7, op="latest", dt=0.1, latest_seen=12),
        rec(22, 10.75, op="latest", dt=0.3, latest_seen=11),   # overlaps 21: fine
        rec(23, 11.2, op="latest", dt=0.1, latest_seen=11),    # 21 answered 12 before: regression
    ]
    got = traffic.latest_regressions(records)
    assert [(g["seq"], g["latest_seen"], g["floor"], g["floor_seq"]) for g in got] == [
        (13, 9, 10, 10), (23, 11, 12, 21)]
    assert got[0]["served_by"] == "standby"
    assert traffic.latest_regressions(records[:3] + records[4:7]) == []


def test_load_skips_only_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]) + "\n" + '{"seq": 3, "t"')
    assert traffic.load(path) == RECORDS[:2]
    path.write_text('{"seq": 3, "t"\n' + json.dumps(RECORDS[1]) + "\n")
    with pytest.raises(ValueError):
        traffic.load(path)


def test_only_a_write_held_at_the_kill_is_excused():
    from tests.lab.traffic import failed_except_writes_in_flight

    kill = (10.0, 10.01)
    recs = [
        {"seq": 1, "t": 9.99, "dt": 0.05, "method": "POST", "status": 502, "error": None},  # at the app: excused
        {"seq": 2, "t": 9.99, "dt": 0.05, "method": "GET", "status": 502, "error": None},   # a GET: resendable
        {"seq": 3, "t": 10.2, "dt": 0.01, "method": "POST", "status": 503, "error": None},  # sent after: counts
        {"seq": 4, "t": 9.0, "dt": 0.01, "method": "POST", "status": 500, "error": None},   # done before: counts
        {"seq": 5, "t": 9.99, "dt": 0.02, "method": "POST", "status": 204, "error": None},  # fine
    ]
    assert [r["seq"] for r in failed_except_writes_in_flight(recs, [kill])] == [2, 3, 4]
