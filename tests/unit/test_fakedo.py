"""The lab's fake DigitalOcean API behaves like the real one where our scripts can tell.

Every test talks HTTP to a server on 127.0.0.1 (ephemeral port), as mt-failover will.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.lab.fakedo import PRESETS, Droplet, FakeDO, from_config

TOKEN = "dop_v1_" + "a" * 64
WRONG_TOKEN = "dop_v1_" + "b" * 64
OTHER_TOKEN = "dop_v1_" + "c" * 64
RIP = "203.0.113.10"
RIP2 = "203.0.113.11"
D1 = Droplet(id=101, name="primary", public_ipv4="192.0.2.11", private_ipv4="198.51.100.11")
D2 = Droplet(id=102, name="standby", public_ipv4="192.0.2.12", private_ipv4="198.51.100.12")
PENDING_422 = {"id": "unprocessable_entity", "message": "The floating IP already has a pending event."}
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    fake: FakeDO | str,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = TOKEN,
    raw: bytes | None = None,
    timeout: float = 5.0,
    source: str | None = None,
) -> Resp:
    u = urlsplit(fake if isinstance(fake, str) else fake.url)
    conn = http.client.HTTPConnection(
        u.hostname, u.port, timeout=timeout, source_address=(source, 0) if source else None
    )
    headers = {}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return Resp(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def assign(fake: FakeDO | str, droplet_id: Any, ip: str = RIP, timeout: float = 5.0) -> Resp:
    body = {"type": "assign", "droplet_id": droplet_id}
    return call(fake, "POST", f"/v2/reserved_ips/{ip}/actions", body, timeout=timeout)


def action_status(fake: FakeDO, action_id: int, ip: str = RIP) -> str:
    return call(fake, "GET", f"/v2/reserved_ips/{ip}/actions/{action_id}").json()["action"]["status"]


@pytest.fixture
def make_fake():
    fakes: list[FakeDO] = []

    def _make(**kwargs: Any) -> FakeDO:
        args: dict[str, Any] = {
            "token": TOKEN,
            "droplets": [D1, D2],
            "reserved_ips": {RIP: None},
            "metadata_by_source": {"127.0.0.1": 101, "127.0.0.2": 102},
            "listen": ("127.0.0.1", 0),
        }
        args.update(kwargs)
        fake = FakeDO(**args)
        fakes.append(fake)  # teardown is registered before the server starts
        return fake.start()

    yield _make
    for fake in fakes:
        fake.stop()


# -- auth, shapes, actions ---------------------------------------------------------------------


@pytest.mark.parametrize("token", [None, WRONG_TOKEN, ""])
def test_missing_or_wrong_token_is_401(make_fake, token):
    fake = make_fake()
    r = call(fake, "GET", f"/v2/reserved_ips/{RIP}", token=token)
    assert r.status == 401
    assert r.json() == {"id": "Unauthorized", "message": "Unable to authenticate you"}
    assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= set(r.headers)
    r = call(
        fake, "POST", f"/v2/reserved_ips/{RIP}/actions", {"type": "assign", "droplet_id": 101}, token=token
    )
    assert r.status == 401
    assert fake.holder(RIP) is None


def test_get_reserved_ip_shape_before_and_after_assign(make_fake):
    fake = make_fake()
    r = call(fake, "GET", f"/v2/reserved_ips/{RIP}")
    assert r.status == 200
    assert r.headers["content-type"].startswith("application/json")
    rip = r.json()["reserved_ip"]
    assert rip["ip"] == RIP and rip["droplet"] is None and rip["locked"] is False
    assert rip["region"]["slug"] == "fra1" and rip["region"]["name"] == "Frankfurt 1"
    assert rip["region"]["available"] is True and isinstance(rip["region"]["features"], list)
    assert isinstance(rip["project_id"], str) and rip["project_id"]

    assert assign(fake, 102).status == 201
    droplet = call(fake, "GET", f"/v2/reserved_ips/{RIP}").json()["reserved_ip"]["droplet"]
    assert droplet["id"] == 102 and droplet["name"] == "standby" and droplet["status"] == "active"
    v4 = {n["type"]: n["ip_address"] for n in droplet["networks"]["v4"]}
    assert v4 == {"public": "192.0.2.12", "private": "198.51.100.12"}
    assert droplet["networks"]["v6"] == []
    assert droplet["region"]["slug"] == "fra1"


def test_list_reserved_ips(make_fake):
    fake = make_fake(reserved_ips={RIP: 101, RIP2: None})
    body = call(fake, "GET", "/v2/reserved_ips").json()
    assert body["meta"] == {"total": 2} and body["links"] == {}
    holders = {r["ip"]: (r["droplet"] or {}).get("id") for r in body["reserved_ips"]}
    assert holders == {RIP: 101, RIP2: None}


def test_assign_answers_in_progress_then_completes(make_fake):
    fake = make_fake()
    r = assign(fake, 101)
    assert r.status == 201
    action = r.json()["action"]
    assert action["status"] == "in-progress" and action["completed_at"] is None
    assert action["type"] == "assign_ip" and action["resource_type"] == "reserved_ip"
    assert action["resource_id"] == int(ipaddress.IPv4Address(RIP)) == 3405803786
    assert ISO_Z.match(action["started_at"])
    assert action["region_slug"] == "fra1" and action["region"]["slug"] == "fra1"
    assert isinstance(action["id"], int)

    polled = call(fake, "GET", f"/v2/reserved_ips/{RIP}/actions/{action['id']}")
    assert polled.status == 200
    done = polled.json()["action"]
    assert done["status"] == "completed" and ISO_Z.match(done["completed_at"])
    assert done["id"] == action["id"] and done["resource_id"] == action["resource_id"]
    assert fake.holder(RIP) == 101


def test_unassign_clears_the_holder_and_runs_the_unassign_hook(make_fake):
    calls = []
    fake = make_fake(reserved_ips={RIP: 101}, on_unassign=lambda ip, d: calls.append((ip, d)))
    r = call(fake, "POST", f"/v2/reserved_ips/{RIP}/actions", {"type": "unassign"})
    assert r.status == 201 and r.json()["action"]["type"] == "unassign_ip"
    assert action_status(fake, r.json()["action"]["id"]) == "completed"
    assert fake.holder(RIP) is None
    assert calls == [(RIP, D1)]
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").json()["reserved_ip"]["droplet"] is None


# -- the edge hook -----------------------------------------------------------------------------


def test_hook_runs_once_inside_the_post_when_there_is_no_delay(make_fake):
    seen = []

    def hook(ip, droplet):
        seen.append((ip, droplet, fake.holder(ip)))

    fake = make_fake(on_assign=hook)
    r = assign(fake, 101)
    assert seen == [(RIP, D1, None)]  # ran before the 201 was sent, while the holder was still old
    action_id = r.json()["action"]["id"]
    for _ in range(3):
        assert action_status(fake, action_id) == "completed"
    assert len(seen) == 1


def test_hook_finishes_before_the_action_reads_completed(make_fake):
    entered, release = threading.Event(), threading.Event()
    calls = []

    def hook(ip, droplet):
        calls.append(droplet.id)
        entered.set()
        release.wait(5)

    fake = make_fake(on_assign=hook, action_delay_s=0.05)
    action_id = assign(fake, 102).json()["action"]["id"]
    assert entered.wait(5)
    # The edge is busy re-routing: the API must not yet claim the move happened.
    assert action_status(fake, action_id) == "in-progress"
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").json()["reserved_ip"]["droplet"] is None
    assert fake.holder(RIP) is None
    release.set()
    assert fake.wait_for(lambda: action_status(fake, action_id) == "completed", 5)
    assert fake.holder(RIP) == 102
    assert calls == [102]


def test_argv_hook_gets_the_droplet_values_substituted(make_fake, tmp_path):
    out = tmp_path / "hook.jsonl"
    recorder = "import json, sys; open(sys.argv[1], 'a').write(json.dumps(sys.argv[2:]) + '\\n')"
    template = [sys.executable, "-c", recorder, str(out)]
    fake = make_fake(
        on_assign=[
            *template,
            "add",
            "{",
            "{ip}",
            ":",
            "{public_ipv4}",
            "}",
            "{droplet_id}",
            "{private_ipv4}",
            "{name}",
        ],
        on_unassign=[*template, "del", "{ip}", "{name}"],
    )
    assert assign(fake, 101).status == 201
    assert call(fake, "POST", f"/v2/reserved_ips/{RIP}/actions", {"type": "unassign"}).status == 201
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines == [
        ["add", "{", RIP, ":", "192.0.2.11", "}", "101", "198.51.100.11", "primary"],
        ["del", RIP, "primary"],
    ]


@pytest.mark.parametrize("kind", ["callable", "argv"])
def test_failing_hook_marks_the_action_errored_and_keeps_the_holder(make_fake, kind):
    def boom(ip, droplet):
        raise OSError("edge down")

    hook = boom if kind == "callable" else [sys.executable, "-c", "raise SystemExit(3)"]
    fake = make_fake(reserved_ips={RIP: 101}, on_assign=hook)
    action = assign(fake, 102).json()["action"]
    polled = call(fake, "GET", f"/v2/reserved_ips/{RIP}/actions/{action['id']}").json()["action"]
    assert polled["status"] == "errored" and polled["completed_at"] is not None
    assert fake.holder(RIP) == 101
    events = fake.events()
    assert len(events) == 1 and events[0]["ok"] is False and events[0]["droplet_id"] == 102
    # An errored action is no longer pending: the next try is accepted.
    assert assign(fake, 102).status == 201


def test_set_holder_runs_the_hook_only_when_asked(make_fake):
    calls = []
    fake = make_fake(
        on_assign=lambda ip, d: calls.append(d.id), on_unassign=lambda ip, d: calls.append(-d.id)
    )
    fake.set_holder(RIP, 101)
    fake.set_holder(RIP, 102, run_hook=False)
    fake.set_holder(RIP, None)
    assert calls == [101, -102]
    assert fake.holder(RIP) is None
    with pytest.raises(KeyError):
        fake.holder("203.0.113.99")


# -- 422, 404 ----------------------------------------------------------------------------------


def test_second_action_while_pending_is_422_then_accepted(make_fake):
    fake = make_fake(action_delay_s=0.3)
    t0 = time.monotonic()
    first = assign(fake, 101)
    assert first.status == 201
    second = assign(fake, 102)
    assert second.status == 422
    assert second.json() == PENDING_422
    first_id = first.json()["action"]["id"]
    assert call(fake, "GET", "/_lab/state").json()["pending"] == {RIP: first_id}
    assert action_status(fake, first_id) == "in-progress"
    assert fake.wait_for(lambda: action_status(fake, first_id) == "completed", 5)
    assert time.monotonic() - t0 >= 0.3
    assert fake.holder(RIP) == 101
    assert assign(fake, 102).status == 201


def test_droplet_in_a_pending_move_refuses_another_action_with_droplet_pending(make_fake):
    droplet_pending = {"id": "unprocessable_entity", "message": "Droplet already has a pending event."}
    fake = make_fake(reserved_ips={RIP: 101, RIP2: None}, action_delay_s=0.3)
    moving = assign(fake, 102)  # RIP leaves 101 for 102: both droplets are busy until it completes
    assert moving.status == 201
    assert assign(fake, 102, ip=RIP2).json() == droplet_pending  # the target is busy
    assert assign(fake, 101, ip=RIP2).json() == droplet_pending  # the holder it leaves is busy too
    r = call(fake, "POST", f"/v2/reserved_ips/{RIP2}/actions", {"type": "unassign"})
    assert r.status == 201  # RIP2 involves no busy droplet
    assert fake.holder(RIP2) is None
    assert fake.wait_for(lambda: action_status(fake, moving.json()["action"]["id"]) == "completed", 5)
    # RIP2's own unassign (0.3 s too) must be done as well, or RIP2 itself is busy: wait for it by id.
    unassign_id = r.json()["action"]["id"]
    assert fake.wait_for(lambda: action_status(fake, unassign_id, ip=RIP2) == "completed", 5)
    assert assign(fake, 101, ip=RIP2).status == 201


def test_assigning_to_the_current_holder_is_422_and_changes_nothing(make_fake):
    calls = []
    fake = make_fake(reserved_ips={RIP: 101}, on_assign=lambda ip, d: calls.append(d.id))
    r = assign(fake, 101)
    assert r.status == 422 and r.json()["id"] == "unprocessable_entity"
    assert "already assigned" in r.json()["message"]
    assert calls == [] and fake.moves() == [] and fake.state()["pending"] == {}
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}/actions").json()["actions"] == []
    assert assign(fake, 102).status == 201 and calls == [102]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"type": "assign", "droplet_id": "101"}',
        b'{"type": "assign", "droplet_id": true}',
        b'{"type": "assign", "droplet_id": 999}',
        b'{"type": "assign"}',
        b'{"type": "teleport", "droplet_id": 101}',
        b'{"type": "assign", "droplet_id": 101',
        b'["assign"]',
        b"",
    ],
    ids=[
        "string-id",
        "bool-id",
        "unknown-droplet",
        "no-id",
        "unknown-type",
        "malformed",
        "not-object",
        "empty",
    ],
)
def test_bad_action_bodies_are_422(make_fake, raw):
    fake = make_fake()
    r = call(fake, "POST", f"/v2/reserved_ips/{RIP}/actions", raw=raw)
    assert r.status == 422
    assert r.json()["id"] == "unprocessable_entity" and r.json()["message"]
    if b'"101"' in raw or b"true" in raw:  # refused for its type, not because no droplet "101" exists
        assert "integer" in r.json()["message"]
    assert fake.holder(RIP) is None
    assert call(fake, "GET", "/_lab/state").json()["pending"] == {}


def test_unknown_ip_action_and_route_are_404(make_fake):
    fake = make_fake(reserved_ips={RIP: None, RIP2: None})
    not_found = {"id": "not_found", "message": "The resource you were accessing could not be found."}
    assert call(fake, "GET", "/v2/reserved_ips/203.0.113.99").json() == not_found
    assert call(fake, "GET", "/v2/reserved_ips/203.0.113.99").status == 404
    r = call(fake, "POST", "/v2/reserved_ips/203.0.113.99/actions", {"type": "assign", "droplet_id": 101})
    assert r.status == 404
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}/actions/12345").status == 404
    action_id = assign(fake, 101).json()["action"]["id"]
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP2}/actions/{action_id}").status == 404  # not this IP's
    assert call(fake, "GET", "/v2/droplets").status == 404


# -- faults ------------------------------------------------------------------------------------


def test_fault_500(make_fake):
    fake = make_fake()
    fake.inject(500)
    r = assign(fake, 101)
    assert r.status == 500 and r.json() == {"id": "server_error", "message": "Server Error"}
    assert fake.holder(RIP) is None
    assert assign(fake, 101).status == 201


def test_fault_429_carries_retry_after_and_ratelimit_headers(make_fake):
    fake = make_fake()
    fake.inject(429, retry_after=7)
    r = assign(fake, 101)
    assert r.status == 429
    assert r.json() == {"id": "too_many_requests", "message": "API Rate limit exceeded."}
    assert r.headers["retry-after"] == "7"
    assert r.headers["ratelimit-remaining"] == "0" and r.headers["ratelimit-limit"] == "5000"
    assert abs(int(r.headers["ratelimit-reset"]) - (time.time() + 7)) <= 2


def test_fault_422_is_the_pending_event_answer(make_fake):
    fake = make_fake()
    fake.inject(422)
    r = assign(fake, 101)
    assert r.status == 422 and r.json() == PENDING_422
    assert fake.holder(RIP) is None


@pytest.mark.parametrize(
    ("kind", "content_type"),
    [("html", "text/html"), ("garbage", "application/json"), ("empty", "application/json")],
)
def test_fault_unparseable_200s(make_fake, kind, content_type):
    fake = make_fake()
    fake.inject(kind, match="get")
    r = call(fake, "GET", f"/v2/reserved_ips/{RIP}")
    assert r.status == 200 and r.headers["content-type"].startswith(content_type)
    with pytest.raises(ValueError):
        json.loads(r.body)
    if kind == "html":
        assert b"bad gateway" in r.body.lower() and r.body.startswith(b"<html>")
    if kind == "empty":
        assert r.body == b""
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").json()["reserved_ip"]["ip"] == RIP


def test_fault_timeout_holds_then_hangs_up_without_an_answer(make_fake):
    fake = make_fake()
    fake.inject("timeout", hang_s=0.3)
    t0 = time.monotonic()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        assign(fake, 101, timeout=5)
    assert 0.25 <= time.monotonic() - t0 < 3
    assert fake.holder(RIP) is None
    assert fake.requests()[-1]["fault"] == "timeout" and fake.requests()[-1]["status"] is None


def test_fault_timeout_trips_the_client_timeout_and_stop_releases_it(make_fake):
    fake = make_fake()
    fake.inject("timeout", hang_s=30)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        assign(fake, 101, timeout=0.3)
    assert time.monotonic() - t0 < 2
    fake.inject("timeout", hang_s=30, match="get")
    outcome: list[BaseException] = []

    def client():
        try:
            call(fake, "GET", f"/v2/reserved_ips/{RIP}", timeout=10)
        except (http.client.HTTPException, OSError) as exc:
            outcome.append(exc)

    t = threading.Thread(target=client)
    t.start()
    assert fake.wait_for(lambda: len(fake.requests()) == 2, 5)
    t0 = time.monotonic()
    fake.stop()
    t.join(5)
    assert not t.is_alive() and len(outcome) == 1
    assert time.monotonic() - t0 < 3


def test_faults_are_consumed_in_order_and_only_by_matching_requests(make_fake):
    fake = make_fake()
    fake.inject(500, match="assign")
    fake.inject(429, match="assign")
    fake.inject("html", count=2, match="get")
    fake.inject(500, match="metadata")
    assert call(fake, "GET", "/_lab/state").json()["faults_queued"] == 5

    assert call(fake, "GET", "/v2/reserved_ips").status == 200  # matches none of them
    assert call(fake, "GET", "/metadata/v1/id", token=None).status == 500
    assert call(fake, "GET", "/metadata/v1/id", token=None).body == b"101"
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").headers["content-type"] == "text/html"
    assert assign(fake, 101).status == 500
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").headers["content-type"] == "text/html"
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").status == 200
    r = assign(fake, 101)
    assert r.status == 429
    action_id = assign(fake, 101).json()["action"]["id"]

    fake.inject(500, match="action")
    assert assign(fake, 102).status == 201  # "action" is the poll, not the POST
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}/actions/{action_id}").status == 500
    assert action_status(fake, action_id) == "completed"

    fake.inject(500, count=2, match="any")
    fake.clear_faults()
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").status == 200
    faults = [(e["method"], e["status"], e["fault"]) for e in fake.requests() if e["fault"]]
    assert faults == [
        ("GET", 500, "500"),
        ("GET", 200, "html"),
        ("POST", 500, "500"),
        ("GET", 200, "html"),
        ("POST", 429, "429"),
        ("GET", 500, "500"),
    ]


def test_any_fault_hits_every_kind_of_request_but_the_control_plane(make_fake):
    fake = make_fake()
    fake.inject(500, count=3, match="any")
    assert call(fake, "GET", "/_lab/state").status == 200
    assert call(fake, "GET", "/metadata/v1/id", token=None).status == 500
    assert call(fake, "GET", "/v2/reserved_ips").status == 500
    assert assign(fake, 101).status == 500
    assert assign(fake, 101).status == 201


def test_bad_fault_arguments_are_refused(make_fake):
    fake = make_fake()
    for kwargs in ({"status": 418}, {"status": 500, "match": "assgin"}, {"status": 500, "count": 0}):
        with pytest.raises(ValueError):
            fake.inject(**kwargs)
    assert fake.state()["faults_queued"] == 0


def test_latency_delays_every_api_answer_but_not_metadata(make_fake):
    fake = make_fake(latency_s=0.25)
    t0 = time.monotonic()
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").status == 200
    assert time.monotonic() - t0 >= 0.25
    t0 = time.monotonic()
    assert call(fake, "GET", "/metadata/v1/id", token=None).status == 200  # link-local on a droplet
    assert time.monotonic() - t0 < 0.2
    fake.set_latency(0)
    t0 = time.monotonic()
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").status == 200
    assert time.monotonic() - t0 < 0.2


# -- rate limiting -----------------------------------------------------------------------------


def test_burst_limit_per_minute_is_429_with_retry_after_and_frees_as_requests_expire(make_fake):
    fake = make_fake(rate_limit_per_min=3, rate_window_s=0.6)
    remaining = []
    for _ in range(3):
        r = call(fake, "GET", f"/v2/reserved_ips/{RIP}")
        assert r.status == 200 and r.headers["ratelimit-limit"] == "5000"  # the headers tell the hourly quota
        remaining.append(r.headers["ratelimit-remaining"])
    assert remaining == ["4999", "4998", "4997"]
    r = assign(fake, 101)
    assert r.status == 429 and r.json() == {"id": "too_many_requests", "message": "API Rate limit exceeded."}
    assert r.headers["retry-after"] == "1"  # the oldest request leaves the 0.6 s window within a second
    assert r.headers["ratelimit-remaining"] == "4997"  # a refused request is not counted
    assert fake.holder(RIP) is None
    # Other credentials, metadata and the control plane do not share this token's budget.
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}", token=WRONG_TOKEN).status == 401
    assert call(fake, "GET", "/metadata/v1/id", token=None).status == 200
    assert call(fake, "GET", "/_lab/state").status == 200
    time.sleep(0.65)
    assert assign(fake, 101).status == 201


def test_hourly_quota_is_429_past_5000_style_limit_with_headers_at_zero(make_fake):
    fake = make_fake(rate_limit_per_hour=3, rate_hour_window_s=0.8, rate_limit_per_min=100)
    t0 = time.time()
    answers = [call(fake, "GET", f"/v2/reserved_ips/{RIP}") for _ in range(3)]
    assert [r.headers["ratelimit-remaining"] for r in answers] == ["2", "1", "0"]
    assert all(r.headers["ratelimit-limit"] == "3" for r in answers)
    # "reset" is when the oldest request of the hour expires (epoch seconds).
    assert t0 <= int(answers[-1].headers["ratelimit-reset"]) <= t0 + 2
    r = call(fake, "GET", f"/v2/reserved_ips/{RIP}")
    assert r.status == 429 and r.headers["ratelimit-remaining"] == "0" and int(r.headers["retry-after"]) >= 1
    time.sleep(0.85)
    r = call(fake, "GET", f"/v2/reserved_ips/{RIP}")
    assert r.status == 200 and r.headers["ratelimit-remaining"] == "2"


def test_each_named_token_has_its_own_budget(make_fake):
    fake = make_fake(tokens={"standby": OTHER_TOKEN}, rate_limit_per_min=2)
    assert [call(fake, "GET", "/v2/reserved_ips").status for _ in range(3)] == [200, 200, 429]
    assert call(fake, "GET", "/v2/reserved_ips", token=OTHER_TOKEN).status == 200


def test_default_rate_limit_headers(make_fake):
    fake = make_fake()
    assert fake.state()["settings"]["rate_limit_per_min"] == 250
    r = call(fake, "GET", "/v2/reserved_ips")
    assert r.headers["ratelimit-limit"] == "5000" and r.headers["ratelimit-remaining"] == "4999"
    assert int(r.headers["ratelimit-reset"]) >= int(time.time()) + 3599


# -- metadata ----------------------------------------------------------------------------------


def test_metadata_answers_by_source_address(make_fake):
    fake = make_fake()
    m1 = {
        p: call(fake, "GET", f"/metadata/v1/{p}", token=None, source="127.0.0.1").body.decode()
        for p in (
            "id",
            "hostname",
            "region",
            "interfaces/private/0/ipv4/address",
            "interfaces/public/0/ipv4/address",
        )
    }
    assert m1 == {
        "id": "101",
        "hostname": "primary",
        "region": "fra1",
        "interfaces/private/0/ipv4/address": "198.51.100.11",
        "interfaces/public/0/ipv4/address": "192.0.2.11",
    }
    assert call(fake, "GET", "/metadata/v1/id", token=None, source="127.0.0.2").body == b"102"
    r = call(fake, "GET", "/metadata/v1/id", token=None, source="127.0.0.3")
    assert r.status == 404
    sources = [e["source"] for e in fake.requests()]
    assert sources[-2:] == ["127.0.0.2", "127.0.0.3"]


def test_metadata_reserved_ip_follows_assignments(make_fake):
    fake = make_fake()

    def md(path: str, source: str = "127.0.0.1") -> Resp:
        return call(fake, "GET", f"/metadata/v1/{path}", token=None, source=source)

    assert md("reserved_ip/ipv4/active").body == b"false"
    assert md("reserved_ip/ipv4/ip_address").status == 404
    assert assign(fake, 101).status == 201
    assert md("reserved_ip/ipv4/active").body == b"true"
    assert md("reserved_ip/ipv4/ip_address").body == RIP.encode()
    assert md("reserved_ip/ipv4/active", source="127.0.0.2").body == b"false"

    doc = call(fake, "GET", "/metadata/v1.json", token=None).json()
    assert doc["droplet_id"] == 101 and doc["hostname"] == "primary" and doc["region"] == "fra1"
    assert doc["reserved_ip"] == {"ipv4": {"active": True, "ip_address": RIP}}
    assert doc["interfaces"]["private"][0]["ipv4"]["ip_address"] == "198.51.100.11"
    assert doc["interfaces"]["public"][0]["ipv4"]["ip_address"] == "192.0.2.11"
    other = call(fake, "GET", "/metadata/v1.json", token=None, source="127.0.0.2").json()
    assert other["reserved_ip"] == {"ipv4": {"active": False}}


def test_legacy_floating_ip_metadata_is_answered_and_logged(make_fake):
    fake = make_fake(reserved_ips={RIP: 101})
    assert call(fake, "GET", "/metadata/v1/floating_ip/ipv4/active", token=None).body == b"true"
    assert call(fake, "GET", "/metadata/v1/floating_ip/ipv4/ip_address", token=None).body == RIP.encode()
    legacy = [e["path"] for e in fake.requests() if "floating_ip" in e["path"]]
    assert legacy == ["/metadata/v1/floating_ip/ipv4/active", "/metadata/v1/floating_ip/ipv4/ip_address"]


# -- the request log never holds the token ------------------------------------------------------


def test_request_log_shape_and_no_token_anywhere(make_fake, tmp_path, capfd):
    log = tmp_path / "requests.jsonl"
    fake = make_fake(log_path=log, reserved_ips={RIP: None})
    assign(fake, 101)
    call(fake, "GET", f"/v2/reserved_ips/{RIP}", token=WRONG_TOKEN)
    call(fake, "GET", f"/v2/reserved_ips/{TOKEN}?t={WRONG_TOKEN}", token=WRONG_TOKEN)
    call(fake, "POST", f"/v2/reserved_ips/{RIP}/actions", {"type": "assign", "droplet_id": TOKEN})
    call(fake, "GET", "/metadata/v1/id", token=None)
    fake.stop()

    entries = fake.requests()
    assert [(e["method"], e["status"], e["auth"]) for e in entries] == [
        ("POST", 201, "ok"),
        ("GET", 401, "bad"),
        ("GET", 401, "bad"),
        ("POST", 422, "ok"),
        ("GET", 200, "missing"),
    ]
    first = entries[0]
    assert set(first) == {"seq", "ts", "method", "path", "status", "source", "fault", "body", "auth", "token"}
    assert [e["token"] for e in entries] == ["default", None, None, "default", None]
    assert first["body"] == {"type": "assign", "droplet_id": 101} and first["source"] == "127.0.0.1"
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert abs(first["ts"] - time.time()) < 30
    file_entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert file_entries == entries

    out, err = capfd.readouterr()
    for text in (json.dumps(entries), log.read_text(), out, err):
        assert TOKEN not in text and WRONG_TOKEN not in text
        assert "a" * 64 not in text and "b" * 64 not in text


# -- control plane -----------------------------------------------------------------------------


def test_control_plane(make_fake):
    calls = []
    fake = make_fake(on_assign=lambda ip, d: calls.append(d.id), rate_limit_per_min=2)
    r = call(fake, "POST", "/_lab/inject", {"status": 500, "count": 2, "match": "get"}, token=None)
    assert r.status == 200 and r.json()["faults_queued"] == 2
    assert call(fake, "POST", "/_lab/inject", {"status": "timeout", "hang_s": 0.1}, token=None).status == 200
    state = call(fake, "GET", "/_lab/state", token=None).json()
    assert state["faults_queued"] == 3 and state["reserved_ips"] == {RIP: None} and state["pending"] == {}
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").status == 500
    assert call(fake, "POST", "/_lab/clear", token=None).json()["faults_queued"] == 0
    assert call(fake, "GET", "/_lab/state", token=None).json()["faults_queued"] == 0

    r = call(fake, "POST", "/_lab/settings", {"latency_s": 0.2, "action_delay_s": 0.1}, token=None)
    assert r.status == 200
    assert call(fake, "GET", "/_lab/state").json()["settings"]["action_delay_s"] == 0.1
    t0 = time.monotonic()
    call(fake, "GET", "/v2/reserved_ips", token=None)
    assert time.monotonic() - t0 >= 0.2
    t0 = time.monotonic()
    call(fake, "GET", "/_lab/state", token=None)  # the control plane is never slowed down
    assert time.monotonic() - t0 < 0.15
    call(fake, "POST", "/_lab/settings", {"latency_s": 0}, token=None)

    r = call(fake, "POST", "/_lab/holder", {"ip": RIP, "droplet_id": 102}, token=None)
    assert r.status == 200 and fake.holder(RIP) == 102 and calls == [102]
    assert call(fake, "GET", "/_lab/state").json()["reserved_ips"] == {RIP: 102}
    assert call(fake, "POST", "/_lab/holder", {"ip": "203.0.113.99", "droplet_id": 101}).status == 404

    for bad in ({"status": 418}, {"count": 1}, {"status": 500, "match": "nope"}):
        assert call(fake, "POST", "/_lab/inject", bad).status == 400
    assert call(fake, "POST", "/_lab/settings", {"latency": 1}).status == 400
    assert call(fake, "POST", "/_lab/settings", {"latency_s": -1}).status == 400

    seq = fake.requests()[-1]["seq"]
    call(fake, "GET", "/metadata/v1/hostname", token=None)
    later = call(fake, "GET", f"/_lab/requests?since={seq}").json()
    assert [e["path"] for e in later] == ["/metadata/v1/hostname"]
    lab_paths = [e["path"] for e in fake.requests() if e["path"].startswith("/_lab/")]
    assert len(lab_paths) >= 10  # logged, and none of them was rate limited (limit is 2)
    assert all(e["status"] != 429 for e in fake.requests())


# -- timing presets and the record of IP moves ---------------------------------------------------


def test_presets_name_the_timings_and_settings_can_mix_them(make_fake):
    assert PRESETS == {
        "ideal": {"latency_s": 0.0, "action_delay_s": 0.0},
        "realistic": {"latency_s": 0.3, "action_delay_s": 5.0},
    }
    fake = make_fake()
    assert fake.settings()["preset"] == "ideal"
    r = call(fake, "POST", "/_lab/settings", {"preset": "realistic"}, token=None)
    assert r.status == 200
    assert {k: r.json()["settings"][k] for k in ("preset", "latency_s", "action_delay_s")} == {
        "preset": "realistic",
        "latency_s": 0.3,
        "action_delay_s": 5.0,
    }
    t0 = time.monotonic()
    first = assign(fake, 101)
    assert time.monotonic() - t0 >= 0.3
    assert first.json()["action"]["status"] == "in-progress"
    assert fake.holder(RIP) is None  # 5 s to go: the test stops the fake before it completes
    # A preset and an explicit value: the value wins; nothing changes when any value is bad.
    r = call(fake, "POST", "/_lab/settings", {"preset": "realistic", "action_delay_s": 0.2}, token=None)
    assert r.json()["settings"]["action_delay_s"] == 0.2 and r.json()["settings"]["preset"] is None
    for bad in ({"preset": "fast"}, {"preset": "ideal", "latency_s": -1}, {"rate_limit_per_hour": 0}):
        assert call(fake, "POST", "/_lab/settings", bad, token=None).status == 400
    assert fake.settings()["latency_s"] == 0.3 and fake.settings()["rate_limit_per_hour"] == 5000


def test_traffic_stays_on_the_old_holder_until_the_action_completes(make_fake):
    edge: list[tuple[float, int]] = []
    fake = make_fake(reserved_ips={RIP: 101}, on_assign=lambda ip, d: edge.append((time.time(), d.id)))
    fake.set_action_delay(0.3)
    t0 = time.time()
    action_id = assign(fake, 102).json()["action"]["id"]
    time.sleep(0.15)
    # Half-way: the edge has not been touched, the API and the metadata still name the old holder.
    assert edge == [] and fake.holder(RIP) == 101
    assert call(fake, "GET", "/metadata/v1/reserved_ip/ipv4/active", token=None, source="127.0.0.2").body == b"false"
    [pending] = fake.state()["in_progress"]
    assert pending == {
        "ip": RIP,
        "kind": "assign",
        "from": 101,
        "to": 102,
        "action_id": action_id,
        "requested_at": pending["requested_at"],
    }
    assert t0 <= pending["requested_at"] <= t0 + 0.1
    assert fake.wait_for(lambda: action_status(fake, action_id) == "completed", 5)
    assert len(edge) == 1 and edge[0][1] == 102 and edge[0][0] >= t0 + 0.3
    assert fake.holder(RIP) == 102 and fake.in_progress() == []


def test_moves_record_each_completed_assign_that_changed_the_holder(make_fake):
    fail_next = []

    def edge(ip, droplet):
        if fail_next:
            raise OSError(fail_next.pop())

    fake = make_fake(reserved_ips={RIP: None, RIP2: None}, on_assign=edge)
    fake.set_holder(RIP2, 102)  # lab setup, not a move
    t0 = time.time()
    first = assign(fake, 101).json()["action"]["id"]
    fail_next.append("edge down")
    assert action_status(fake, assign(fake, 102).json()["action"]["id"]) == "errored"  # no move
    assert call(fake, "POST", f"/v2/reserved_ips/{RIP2}/actions", {"type": "unassign"}).status == 201
    t1 = time.time()
    second = assign(fake, 102).json()["action"]["id"]
    moves = fake.moves()
    assert [(m["ip"], m["from"], m["to"], m["action_id"]) for m in moves] == [
        (RIP, None, 101, first),
        (RIP, 101, 102, second),
    ]
    for m in moves:
        assert set(m) == {"ip", "from", "to", "action_id", "requested_at", "completed_at"}
        assert t0 <= m["requested_at"] <= m["completed_at"] <= time.time()
    assert [m["action_id"] for m in fake.moves(since=t1)] == [second]
    assert call(fake, "GET", f"/_lab/moves?since={t1}").json() == fake.moves(since=t1)
    assert call(fake, "GET", "/_lab/state").json()["moves"] == moves
    assert call(fake, "GET", "/_lab/moves?since=yesterday").status == 400


def test_an_assign_that_finds_its_target_already_holding_is_no_move(make_fake):
    fake = make_fake(reserved_ips={RIP: 101}, action_delay_s=0.2)
    action_id = assign(fake, 102).json()["action"]["id"]
    fake.set_holder(RIP, 102, run_hook=False)  # the lab moved it by hand meanwhile
    assert fake.wait_for(lambda: action_status(fake, action_id) == "completed", 5)
    assert fake.holder(RIP) == 102 and fake.moves() == []


# -- named tokens, revocable --------------------------------------------------------------------


def test_a_revoked_token_answers_401_until_restored_and_the_log_names_it(make_fake, tmp_path):
    log = tmp_path / "requests.jsonl"
    fake = make_fake(token=None, tokens={"primary": TOKEN, "standby": OTHER_TOKEN}, log_path=log)
    assert fake.state()["tokens"] == {"primary": {"revoked": False}, "standby": {"revoked": False}}
    r = call(fake, "POST", "/_lab/revoke", {"name": "standby"}, token=None)
    assert r.status == 200 and r.json()["tokens"]["standby"] == {"revoked": True}
    body = {"type": "assign", "droplet_id": 102}
    refused = call(fake, "POST", f"/v2/reserved_ips/{RIP}/actions", body, token=OTHER_TOKEN)
    assert refused.status == 401 and refused.json() == {"id": "Unauthorized", "message": "Unable to authenticate you"}
    assert fake.holder(RIP) is None
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").status == 200  # the other token still works
    assert call(fake, "POST", "/_lab/restore", {"name": "standby"}, token=None).status == 200
    assert call(fake, "GET", f"/v2/reserved_ips/{RIP}", token=OTHER_TOKEN).status == 200
    assert call(fake, "POST", "/_lab/revoke", {"name": "nobody"}, token=None).status == 404
    assert call(fake, "POST", "/_lab/revoke", {}, token=None).status == 400
    fake.stop()
    v2 = [(e["auth"], e["token"], e["status"]) for e in fake.requests() if e["path"].startswith("/v2/")]
    assert v2 == [("revoked", "standby", 401), ("ok", "primary", 200), ("ok", "standby", 200)]
    text = log.read_text()
    assert TOKEN not in text and OTHER_TOKEN not in text


def test_tokens_are_checked_when_built():
    with pytest.raises(ValueError, match="at least one token"):
        FakeDO()
    with pytest.raises(ValueError, match="same value") as exc:
        FakeDO(token=TOKEN, tokens={"standby": TOKEN})
    assert TOKEN not in str(exc.value)
    with pytest.raises(ValueError, match="'standby'") as exc:
        FakeDO(tokens={"standby": "two words"})
    assert "two words" not in str(exc.value)


# -- lifecycle and CLI -------------------------------------------------------------------------


def test_stop_is_idempotent_and_the_context_manager_stops(make_fake):
    with FakeDO(token=TOKEN, droplets=[D1], reserved_ips={RIP: None}) as fake:
        url = fake.url
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert call(fake, "GET", f"/v2/reserved_ips/{RIP}").status == 200
    fake.stop()
    port = urlsplit(url).port
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_addresses_outside_the_lab_ranges_are_refused():
    with pytest.raises(ValueError, match="outside"):
        Droplet(id=1, name="x", public_ipv4="8.8.8.8", private_ipv4="198.51.100.1")
    with pytest.raises(ValueError, match="outside"):
        FakeDO(token=TOKEN, reserved_ips={"10.0.0.1": None})
    with pytest.raises(ValueError, match="outside"):
        FakeDO(token=TOKEN, listen=("10.1.2.3", 0))


def _cli_config(tmp_path: Path, **extra: Any) -> Path:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    config = {
        "listen": "127.0.0.1:0",
        "token_file": str(token_file),
        "droplets": [
            {"id": 101, "name": "primary", "public_ipv4": "192.0.2.11", "private_ipv4": "198.51.100.11"},
            {"id": 102, "name": "standby", "public_ipv4": "192.0.2.12", "private_ipv4": "198.51.100.12"},
        ],
        "reserved_ips": {RIP: None},
        "region": "fra1",
        "metadata_by_source": {"127.0.0.1": 102},
        "on_assign": [
            sys.executable,
            "-c",
            "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
            str(tmp_path / "edge"),
            "{ip}->{public_ipv4}",
        ],
        "action_delay_s": 0,
        "latency_s": 0,
        "rate_limit_per_min": 250,
        "log_path": str(tmp_path / "requests.jsonl"),
        "ready_file": str(tmp_path / "ready"),
        **extra,
    }
    path = tmp_path / "fakedo.json"
    path.write_text(json.dumps(config))
    return path


def _start_cli(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.lab.fakedo", "--config", str(config)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_cli_serves_from_a_config_file_and_exits_0_on_sigterm(tmp_path):
    config = _cli_config(tmp_path)
    ready = tmp_path / "ready"
    proc = _start_cli(config)
    try:
        deadline = time.monotonic() + 10
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "no ready file"
        url = ready.read_text().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        assert call(url, "GET", f"/v2/reserved_ips/{RIP}").status == 200
        assert call(url, "GET", f"/v2/reserved_ips/{RIP}", token=WRONG_TOKEN).status == 401
        assert assign(url, 101).status == 201
        assert (tmp_path / "edge").read_text() == f"{RIP}->192.0.2.11"
        assert call(url, "GET", "/metadata/v1/id", token=None).body == b"102"
        assert TOKEN not in " ".join(proc.args)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, err
    assert not ready.exists()
    log_text = (tmp_path / "requests.jsonl").read_text()
    assert len(log_text.splitlines()) == 4
    for text in (out, err, log_text):
        assert TOKEN not in text and WRONG_TOKEN not in text


@pytest.mark.parametrize(
    "extra",
    [
        {"token": TOKEN},
        {"tokens": {"standby": TOKEN}},
        {"token_file": "/nonexistent/token"},
        {"token_files": {"standby": "/nonexistent/token"}},
        {"token_files": ["/tmp/token"]},
        {"listen": "8.8.8.8:80"},
        {"preset": "warp"},
        {"latency": 1},
    ],
    ids=["token", "tokens", "no-file", "no-named-file", "files-list", "listen", "preset", "unknown-key"],
)
def test_cli_refuses_a_bad_config_with_exit_2(tmp_path, extra):
    proc = _start_cli(_cli_config(tmp_path, **extra))
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 2
    assert "config error" in err and TOKEN not in out + err


def test_config_names_token_files_and_a_preset_with_overrides(tmp_path):
    standby = tmp_path / "standby-token"
    standby.write_text(OTHER_TOKEN + "\n")
    standby.chmod(0o600)
    config = json.loads(_cli_config(tmp_path).read_text())
    del config["latency_s"], config["action_delay_s"]
    config.update({"token_files": {"standby": str(standby)}, "preset": "realistic", "action_delay_s": 0.2})
    fake, ready = from_config(config)
    try:
        assert ready == tmp_path / "ready"
        settings = fake.settings()
        assert (settings["latency_s"], settings["action_delay_s"], settings["preset"]) == (0.3, 0.2, None)
        assert fake.state()["tokens"] == {"default": {"revoked": False}, "standby": {"revoked": False}}
        fake.set_latency(0)
        fake.start()
        assert call(fake, "GET", f"/v2/reserved_ips/{RIP}", token=OTHER_TOKEN).status == 200
        assert call(fake, "GET", f"/v2/reserved_ips/{RIP}", token=TOKEN).status == 200
        assert [e["token"] for e in fake.requests()] == ["standby", "default"]
    finally:
        fake.stop()
    config["token_files"] = {"default": str(standby)}
    with pytest.raises(ValueError, match="default"):
        from_config(config)


def test_a_droplet_created_and_destroyed_at_runtime(make_fake):
    """A replacement node: its droplet and metadata exist from its creation; destroyed, it is gone,
    and a reserved IP it held is unassigned (the lab's replace-standby scenario)."""
    fake = make_fake()
    new = {"id": 103, "name": "standby2", "public_ipv4": "127.0.0.3", "private_ipv4": "198.51.100.13"}
    assert assign(fake, 103).status == 422  # unknown before it is created
    assert call(fake, "POST", "/_lab/droplets", {"add": new}, token=None).status == 200
    assert call(fake, "POST", "/_lab/droplets", {"add": new}, token=None).status == 400  # duplicate id
    assert call(fake, "GET", "/metadata/v1/id", token=None, source="127.0.0.3").body == b"103"
    assert assign(fake, 103).status == 201
    assert fake.wait_for(lambda: fake.holder(RIP) == 103, 5)
    assert call(fake, "GET", "/metadata/v1/reserved_ip/ipv4/active", token=None, source="127.0.0.3").body == b"true"
    assert call(fake, "POST", "/_lab/droplets", {"remove": 103}, token=None).status == 200
    assert fake.holder(RIP) is None
    assert call(fake, "GET", "/metadata/v1/id", token=None, source="127.0.0.3").status == 404
    assert assign(fake, 103).status == 422
    assert call(fake, "POST", "/_lab/droplets", {"remove": 103}, token=None).status == 404
    assert call(fake, "POST", "/_lab/droplets", {"remove": "x"}, token=None).status == 400
