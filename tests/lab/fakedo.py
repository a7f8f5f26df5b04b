"""A fake DigitalOcean API for the lab: reserved IPs, their actions, droplet metadata, faults.

The lab has no DigitalOcean account, so `mt-failover` and the lab orchestrator talk to this
server instead. It answers the endpoints they use with the real JSON shapes, status codes and
rate-limit headers, and it plays DigitalOcean's edge: when an assign completes it runs a hook
(a Python callable or an argv template) that re-routes the reserved IP to the chosen droplet.

    d1 = Droplet(id=101, name="primary", public_ipv4="192.0.2.11", private_ipv4="198.51.100.11")
    with FakeDO(token=token, droplets=[d1], reserved_ips={"203.0.113.10": None}) as fake:
        fake.url              # http://127.0.0.1:PORT
        fake.inject(500)      # the next assign answers 500
        fake.requests()       # the request log (never the token)

Endpoints (all JSON unless noted):
  /v2/reserved_ips, /v2/reserved_ips/{ip}, POST+GET /v2/reserved_ips/{ip}/actions,
  /v2/reserved_ips/{ip}/actions/{id}                       bearer token, rate limited
  /metadata/v1/...  /metadata/v1.json                      no auth, keyed by the source IP
  /_lab/inject|clear|settings|holder|state|requests|events no auth, not rate limited, no faults

Run it in a lab namespace with `python -m tests.lab.fakedo --config FILE.json`; the token is
read from the file named by the config's `token_file`, never from the command line.

Secrets: the bearer token is compared in memory only. Request headers are never logged, the
rate-limit buckets are keyed by a hash, and paths and bodies are scrubbed of the token before
they reach the request log.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["Droplet", "FakeDO", "main"]

LOG = logging.getLogger("fakedo")

# The lab uses documentation ranges only (RFC 5737) plus loopback; refusing anything else keeps
# a mistyped config from ever pointing lab traffic at a real network.
_ALLOWED_NETS = tuple(ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"))

FAULT_KINDS = (500, 429, 422, "timeout", "html", "garbage", "empty")
FAULT_MATCHES = ("assign", "action", "get", "metadata", "any")
HOOK_TIMEOUT_S = 10.0
MAX_BODY = 1 << 20
FIRST_ACTION_ID = 2_000_000_001
PROJECT_ID = "4de7ac8b-495b-4884-9a69-1050c6793cd6"

UNAUTHORIZED = {"id": "Unauthorized", "message": "Unable to authenticate you"}
NOT_FOUND = {"id": "not_found", "message": "The resource you were accessing could not be found."}
PENDING = {"id": "unprocessable_entity", "message": "Reserved IP already has a pending event."}
SERVER_ERROR = {"id": "server_error", "message": "Server Error"}
TOO_MANY = {"id": "too_many_requests", "message": "API Rate limit exceeded."}

BAD_GATEWAY_HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>bad gateway</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
GARBAGE_JSON = b'{"action": {"id": 2000000001, "status": "in-prog'

REGION_NAMES = {
    "ams3": "Amsterdam 3",
    "blr1": "Bangalore 1",
    "fra1": "Frankfurt 1",
    "lon1": "London 1",
    "nyc1": "New York 1",
    "nyc3": "New York 3",
    "sfo3": "San Francisco 3",
    "sgp1": "Singapore 1",
    "syd1": "Sydney 1",
    "tor1": "Toronto 1",
}
REGION_FEATURES = ["backups", "ipv6", "metadata", "install_agent", "storage", "image_transfer"]

Hook = Callable[[str, "Droplet | None"], Any] | Sequence[str] | Sequence[Sequence[str]]


def _check_addr(value: Any, what: str, *, allow_unspecified: bool = False) -> str:
    try:
        addr = ipaddress.IPv4Address(value)
    except (ValueError, TypeError):
        raise ValueError(f"{what}: {value!r} is not an IPv4 address") from None
    if addr.is_loopback or any(addr in net for net in _ALLOWED_NETS):
        return str(addr)
    if allow_unspecified and addr.is_unspecified:
        return str(addr)
    raise ValueError(f"{what}: {addr} is outside the lab's ranges (RFC 5737 documentation nets, loopback)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _non_negative(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{what} must be a number >= 0, got {value!r}")
    return float(value)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _gateway(addr: str) -> str:
    """The .1 of the address's /24: what DigitalOcean reports as a droplet's gateway."""
    return str(ipaddress.IPv4Network(f"{addr}/24", strict=False).network_address + 1)


@dataclass(frozen=True)
class Droplet:
    """A droplet as the fake knows it: enough for the API's droplet object and the metadata."""

    id: int
    name: str
    public_ipv4: str
    private_ipv4: str

    def __post_init__(self) -> None:
        if not _is_int(self.id) or self.id <= 0:
            raise ValueError(f"droplet id must be a positive integer, got {self.id!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"droplet {self.id}: name must be a non-empty string")
        object.__setattr__(
            self, "public_ipv4", _check_addr(self.public_ipv4, f"droplet {self.id} public_ipv4")
        )
        object.__setattr__(
            self, "private_ipv4", _check_addr(self.private_ipv4, f"droplet {self.id} private_ipv4")
        )

    def api_object(self, region: dict[str, Any]) -> dict[str, Any]:
        """The droplet object embedded in a reserved IP (a subset of the real one, same shapes)."""
        return {
            "id": self.id,
            "name": self.name,
            "memory": 1024,
            "vcpus": 1,
            "disk": 25,
            "locked": False,
            "status": "active",
            "created_at": "2024-01-01T00:00:00Z",
            "features": ["private_networking", "monitoring"],
            "backup_ids": [],
            "snapshot_ids": [],
            "volume_ids": [],
            "size_slug": "s-1vcpu-1gb",
            "networks": {
                "v4": [
                    {
                        "ip_address": self.public_ipv4,
                        "netmask": "255.255.255.0",
                        "gateway": _gateway(self.public_ipv4),
                        "type": "public",
                    },
                    {
                        "ip_address": self.private_ipv4,
                        "netmask": "255.255.255.0",
                        "gateway": _gateway(self.private_ipv4),
                        "type": "private",
                    },
                ],
                "v6": [],
            },
            "region": copy.deepcopy(region),
            "tags": [],
        }


@dataclass
class _Fault:
    status: int | str
    remaining: int
    match: str
    retry_after: float
    hang_s: float

    def describe(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "remaining": self.remaining,
            "match": self.match,
            "retry_after": self.retry_after,
            "hang_s": self.hang_s,
        }


@dataclass
class _Reply:
    status: int | None  # None: hold the connection, then close it without an answer
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] | None = None
    fault: str | None = None
    hang_s: float = 0.0


def _json_reply(
    status: int, obj: Any, headers: dict[str, str] | None = None, fault: str | None = None
) -> _Reply:
    return _Reply(status, json.dumps(obj).encode(), headers=headers, fault=fault)


def _text_reply(status: int, text: str) -> _Reply:
    return _Reply(status, text.encode(), content_type="text/plain; charset=utf-8")


def _hook_argvs(hook: Any) -> list[list[str]] | None:
    """An argv template, or a list of them, as a list of argvs; None when `hook` is neither."""
    if isinstance(hook, str | bytes) or not isinstance(hook, Sequence) or not hook:
        return None
    if all(isinstance(item, str) for item in hook):
        return [list(hook)]
    if all(
        isinstance(argv, Sequence)
        and not isinstance(argv, str)
        and argv
        and all(isinstance(i, str) for i in argv)
        for argv in hook
    ):
        return [list(argv) for argv in hook]
    return None


def _check_hook(hook: Any, what: str) -> Any:
    if hook is None or callable(hook):
        return hook
    argvs = _hook_argvs(hook)
    if argvs is None:
        raise TypeError(f"{what} must be None, a callable, an argv template (list of str) or a list of them")
    return argvs


def _substitute(item: str, ip: str, droplet: Droplet | None) -> str:
    values = {
        "{ip}": ip,
        "{droplet_id}": str(droplet.id) if droplet else "",
        "{public_ipv4}": droplet.public_ipv4 if droplet else "",
        "{private_ipv4}": droplet.private_ipv4 if droplet else "",
        "{name}": droplet.name if droplet else "",
    }
    # Plain replacement, not str.format: nft templates contain bare "{" and "}" items.
    for key, value in values.items():
        item = item.replace(key, value)
    return item


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeDO


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakedo"
    sys_version = ""
    server: _Server

    def _serve(self) -> None:
        self.server.fake._serve(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request line to stderr; FakeDO keeps its own (scrubbed) log.
        return


class FakeDO:
    """The fake API server. Thread-safe; every public method may be called while it serves."""

    def __init__(
        self,
        token: str,
        droplets: Sequence[Droplet] = (),
        reserved_ips: dict[str, int | None] | None = None,
        region: str = "fra1",
        metadata_by_source: dict[str, int] | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        on_assign: Hook | None = None,
        on_unassign: Hook | None = None,
        action_delay_s: float = 0.0,
        latency_s: float = 0.0,
        rate_limit_per_min: int = 250,
        log_path: str | os.PathLike[str] | None = None,
        *,
        rate_window_s: float = 60.0,
    ) -> None:
        if not isinstance(token, str) or not token or token != token.strip() or " " in token:
            # Never echo the value: it is a secret even when it is malformed.
            raise ValueError("token must be a non-empty string without whitespace")
        self._token = token
        self._token_bytes = token.encode()
        self._droplets: dict[int, Droplet] = {}
        for d in droplets:
            if not isinstance(d, Droplet):
                raise TypeError(f"droplets must be Droplet objects, got {type(d).__name__}")
            if d.id in self._droplets:
                raise ValueError(f"duplicate droplet id {d.id}")
            self._droplets[d.id] = d
        self._holders: dict[str, int | None] = {}
        for ip, holder in (reserved_ips or {}).items():
            ip = _check_addr(ip, "reserved ip")
            if holder is not None and holder not in self._droplets:
                raise ValueError(f"reserved ip {ip}: unknown droplet {holder!r}")
            self._holders[ip] = holder
        if not isinstance(region, str) or not region:
            raise ValueError("region must be a non-empty slug")
        self._region_slug = region
        self._metadata_by_source: dict[str, int] = {}
        for source, did in (metadata_by_source or {}).items():
            source = _check_addr(source, "metadata source")
            if did not in self._droplets:
                raise ValueError(f"metadata source {source}: unknown droplet {did!r}")
            self._metadata_by_source[source] = did
        host, port = listen
        self._listen = (_check_addr(host, "listen", allow_unspecified=True), int(port))
        self._on_assign = _check_hook(on_assign, "on_assign")
        self._on_unassign = _check_hook(on_unassign, "on_unassign")
        self._action_delay_s = _non_negative(action_delay_s, "action_delay_s")
        self._latency_s = _non_negative(latency_s, "latency_s")
        if not _is_int(rate_limit_per_min) or rate_limit_per_min < 1:
            raise ValueError(f"rate_limit_per_min must be a positive integer, got {rate_limit_per_min!r}")
        self._rate_limit = rate_limit_per_min
        self._rate_window_s = _non_negative(rate_window_s, "rate_window_s") or 60.0
        self._log_path = Path(log_path) if log_path is not None else None

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._action_ids = itertools.count(FIRST_ACTION_ID)
        self._actions: dict[int, dict[str, Any]] = {}
        self._action_meta: dict[int, tuple[str, str, int | None]] = {}  # id -> (ip, kind, target)
        self._pending: dict[str, int] = {}
        self._timers: set[threading.Timer] = set()
        self._faults: list[_Fault] = []
        self._buckets: dict[str, deque[float]] = {}
        self._log: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._seq = 0
        self._logfile: Any = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeDO:
        if self._server is not None:
            return self
        if self._stopped:
            raise RuntimeError("a stopped FakeDO cannot be restarted; create a new one")
        if self._log_path is not None:
            self._logfile = open(self._log_path, "a", encoding="utf-8")  # noqa: SIM115 -- closed by stop()
        server = _Server(self._listen, _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakedo", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release held ("timeout") requests, cancel pending actions. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            timers = list(self._timers)
            self._timers.clear()
        self._stop.set()
        for timer in timers:
            timer.cancel()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            if self._logfile is not None:
                self._logfile.close()
                self._logfile = None

    def __enter__(self) -> FakeDO:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeDO is not started")
        host, port = self._server.server_address[:2]
        if ipaddress.IPv4Address(host).is_unspecified:
            host = "127.0.0.1"
        return f"http://{host}:{port}"

    # -- test and lab controls ---------------------------------------------------------------

    def inject(
        self,
        status: int | str,
        count: int = 1,
        match: str = "assign",
        retry_after: float = 1,
        hang_s: float = 30,
    ) -> int:
        """Answer the next `count` requests that `match` with a fault. Returns the faults queued."""
        if isinstance(status, str) and status.isdigit():
            status = int(status)
        if status not in FAULT_KINDS or isinstance(status, bool):
            raise ValueError(f"fault status must be one of {FAULT_KINDS}, got {status!r}")
        if not _is_int(count) or count < 1:
            raise ValueError(f"count must be a positive integer, got {count!r}")
        if match not in FAULT_MATCHES:
            raise ValueError(f"match must be one of {FAULT_MATCHES}, got {match!r}")
        fault = _Fault(
            status, count, match, _non_negative(retry_after, "retry_after"), _non_negative(hang_s, "hang_s")
        )
        with self._lock:
            self._faults.append(fault)
            return self._faults_queued()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_latency(self, seconds: float) -> None:
        value = _non_negative(seconds, "latency_s")
        with self._lock:
            self._latency_s = value

    def set_action_delay(self, seconds: float) -> None:
        """Takes effect for actions started afterwards."""
        value = _non_negative(seconds, "action_delay_s")
        with self._lock:
            self._action_delay_s = value

    def set_rate_limit(self, per_min: int) -> None:
        if not _is_int(per_min) or per_min < 1:
            raise ValueError(f"rate_limit_per_min must be a positive integer, got {per_min!r}")
        with self._lock:
            self._rate_limit = per_min

    def holder(self, ip: str) -> int | None:
        with self._lock:
            if ip not in self._holders:
                raise KeyError(ip)
            return self._holders[ip]

    def set_holder(self, ip: str, droplet_id: int | None, run_hook: bool = True) -> None:
        """Set who holds `ip` (lab/test setup). With run_hook the edge is re-routed first;
        a failing hook raises RuntimeError and leaves the holder unchanged."""
        with self._lock:
            if ip not in self._holders:
                raise KeyError(ip)
            if droplet_id is not None and droplet_id not in self._droplets:
                raise ValueError(f"unknown droplet {droplet_id!r}")
            previous = self._holders[ip]
        if run_hook:
            if droplet_id is None:
                error = self._run_hook("unassign", ip, previous) if previous is not None else None
            else:
                error = self._run_hook("assign", ip, droplet_id)
            if error is not None:
                raise RuntimeError(f"hook failed: {error}")
        with self._lock:
            self._holders[ip] = droplet_id

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        """The request log (entries with seq > since), oldest first."""
        with self._lock:
            return [copy.deepcopy(e) for e in self._log if e["seq"] > since]

    def events(self) -> list[dict[str, Any]]:
        """Hook runs: {"ts", "event": "hook", "kind", "ip", "droplet_id", "ok", "error"}."""
        with self._lock:
            return copy.deepcopy(self._events)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "reserved_ips": dict(self._holders),
                "pending": dict(self._pending),
                "faults_queued": self._faults_queued(),
                "faults": [f.describe() for f in self._faults],
                "settings": self._settings(),
            }

    def wait_for(self, predicate: Callable[[], Any], timeout: float, interval: float = 0.01) -> Any:
        """Poll `predicate` until it returns something truthy (returned) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    # -- internals: state helpers (call with self._lock held where noted) ----------------------

    def _faults_queued(self) -> int:  # lock held
        return sum(f.remaining for f in self._faults)

    def _settings(self) -> dict[str, Any]:  # lock held
        return {
            "latency_s": self._latency_s,
            "action_delay_s": self._action_delay_s,
            "rate_limit_per_min": self._rate_limit,
        }

    def _region(self) -> dict[str, Any]:
        return {
            "name": REGION_NAMES.get(self._region_slug, self._region_slug.upper()),
            "slug": self._region_slug,
            "features": list(REGION_FEATURES),
            "available": True,
            "sizes": [],
        }

    def _reserved_ip_object(self, ip: str) -> dict[str, Any]:  # lock held
        holder = self._holders[ip]
        region = self._region()
        return {
            "ip": ip,
            "droplet": self._droplets[holder].api_object(region) if holder is not None else None,
            "region": region,
            "locked": False,
            "project_id": PROJECT_ID,
        }

    def _take_fault(self, kind: str | None) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.match == "any" or fault.match == kind:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _rate(self, key: str, *, count: bool) -> tuple[bool, dict[str, str]]:
        """Sliding-window rate limit per credential. Returns (over the limit, headers)."""
        with self._lock:
            now = time.monotonic()
            window = self._rate_window_s
            bucket = self._buckets.setdefault(key, deque())
            while bucket and bucket[0] <= now - window:
                bucket.popleft()
            limit = self._rate_limit
            over = False
            if count:
                if len(bucket) >= limit:
                    over = True
                else:
                    bucket.append(now)
            oldest = bucket[0] if bucket else now
            until_free = max(0.0, oldest + window - now)
            headers = {
                "ratelimit-limit": str(limit),
                "ratelimit-remaining": str(0 if over else max(0, limit - len(bucket))),
                "ratelimit-reset": str(math.ceil(time.time() + until_free)),
            }
            if over:
                headers["retry-after"] = str(max(1, math.ceil(until_free)))
            return over, headers

    def _record_event(self, event: dict[str, Any]) -> None:
        with self._lock:
            self._events.append(event)

    def _run_hook(self, kind: str, ip: str, droplet_id: int | None) -> str | None:
        """Run the edge hook for `kind`; return None on success, else the error text."""
        hook = self._on_assign if kind == "assign" else self._on_unassign
        droplet = self._droplets.get(droplet_id) if droplet_id is not None else None
        if hook is None:
            return None
        error: str | None = None
        try:
            if callable(hook):
                hook(ip, droplet)
            else:
                for template in hook:
                    argv = [_substitute(item, ip, droplet) for item in template]
                    proc = subprocess.run(
                        argv, capture_output=True, text=True, timeout=HOOK_TIMEOUT_S, check=False
                    )
                    if proc.returncode != 0:
                        error = f"{argv} exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
                        break
        except Exception as exc:  # any failure of the edge marks the action errored
            error = f"{type(exc).__name__}: {exc}"
        self._record_event(
            {
                "ts": time.time(),
                "event": "hook",
                "kind": kind,
                "ip": ip,
                "droplet_id": droplet_id,
                "ok": error is None,
                "error": error,
            }
        )
        if error is not None:
            LOG.warning("%s hook for %s (droplet %s) failed: %s", kind, ip, droplet_id, error)
        else:
            LOG.info("%s hook for %s (droplet %s) done", kind, ip, droplet_id)
        return error

    def _complete(self, action_id: int) -> None:
        """Finish an action: the edge hook first, then the action's status and the holder."""
        with self._lock:
            ip, kind, target = self._action_meta[action_id]
            hook_droplet = target if kind == "assign" else self._holders.get(ip)
        error = None
        # An unassign of an unassigned IP has nothing routed, so nothing for the edge to take down.
        if kind == "assign" or hook_droplet is not None:
            error = self._run_hook(kind, ip, hook_droplet)
        with self._lock:
            action = self._actions[action_id]
            action["completed_at"] = _iso(time.time())
            if error is None:
                action["status"] = "completed"
                self._holders[ip] = target if kind == "assign" else None
            else:
                action["status"] = "errored"
            if self._pending.get(ip) == action_id:
                del self._pending[ip]

    def _timer_fired(self, action_id: int, timer_box: list[threading.Timer]) -> None:
        with self._lock:
            self._timers.discard(timer_box[0])
            if self._stopped:
                return
        self._complete(action_id)

    # -- internals: HTTP -----------------------------------------------------------------------

    def _auth(self, header: str | None, source: str) -> tuple[str, str, str | None]:
        """(auth state, rate bucket key, presented credential). The key is a hash, never the token."""
        if not header:
            return "missing", f"source:{source}", None
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return "bad", f"source:{source}", credential or None
        key = "token:" + hashlib.sha256(credential.encode()).hexdigest()
        if hmac.compare_digest(credential.encode(), self._token_bytes):
            return "ok", key, credential
        return "bad", key, credential

    def _scrub(self, value: Any, secrets: list[str]) -> Any:
        if isinstance(value, str):
            for secret in secrets:
                value = value.replace(secret, "[REDACTED]")
            return value
        if isinstance(value, list):
            return [self._scrub(v, secrets) for v in value]
        if isinstance(value, dict):
            return {self._scrub(k, secrets): self._scrub(v, secrets) for k, v in value.items()}
        return value

    def _serve(self, handler: _Handler) -> None:
        ts = time.time()
        source = handler.client_address[0]
        method = handler.command
        try:
            length = int(handler.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        raw = handler.rfile.read(length) if 0 < length <= MAX_BODY else b""
        auth, bucket, presented = self._auth(handler.headers.get("Authorization"), source)
        path = urlsplit(handler.path).path
        is_lab = path.startswith("/_lab/")

        if length < 0 or length > MAX_BODY:
            reply = _json_reply(
                413 if length > MAX_BODY else 400, {"id": "bad_request", "message": "bad length"}
            )
            handler.close_connection = True
        else:
            with self._lock:
                latency = self._latency_s
            if latency and not is_lab:  # the control plane stays fast so the lab can always steer
                self._stop.wait(latency)
            try:
                reply = self._route(method, handler.path, raw, auth, bucket, source)
            except Exception:  # a bug in the fake must show as a 500, not a hung client
                LOG.exception("internal error on %s %s", method, self._scrub(path, [self._token]))
                reply = _json_reply(500, SERVER_ERROR)

        body_obj = None
        if method == "POST" and raw:
            with contextlib.suppress(ValueError):
                body_obj = json.loads(raw)
        secrets = [self._token] + ([presented] if presented and len(presented) >= 8 else [])
        entry = {
            "ts": ts,
            "method": method,
            "path": self._scrub(handler.path, secrets),
            "status": reply.status,
            "source": source,
            "fault": reply.fault,
            "body": self._scrub(body_obj, secrets),
            "auth": auth,
        }
        self._append_log(entry)

        if reply.status is None:  # a "timeout" fault: hold the request, then hang up
            self._stop.wait(reply.hang_s)
            handler.close_connection = True
            return
        try:
            handler.send_response(reply.status)
            handler.send_header("Content-Type", reply.content_type)
            handler.send_header("Content-Length", str(len(reply.body)))
            for name, value in (reply.headers or {}).items():
                handler.send_header(name, value)
            handler.send_header("Connection", "close")
            handler.end_headers()
            if method != "HEAD":
                handler.wfile.write(reply.body)
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass
        handler.close_connection = True

    def _append_log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            entry = {"seq": self._seq, **entry}
            self._log.append(entry)
            if self._logfile is not None:
                self._logfile.write(json.dumps(entry) + "\n")
                self._logfile.flush()

    @staticmethod
    def _classify(method: str, parts: list[str]) -> str | None:
        """Which fault `match` a request falls under (besides "any")."""
        if parts[:1] == ["metadata"]:
            return "metadata"
        if parts[:2] != ["v2", "reserved_ips"]:
            return None
        if method == "GET" and len(parts) == 3:
            return "get"
        if method == "POST" and len(parts) == 4 and parts[3] == "actions":
            return "assign"
        if method == "GET" and len(parts) == 5 and parts[3] == "actions":
            return "action"
        return None

    def _route(self, method: str, target: str, raw: bytes, auth: str, bucket: str, source: str) -> _Reply:
        split = urlsplit(target)
        path = split.path
        if path.startswith("/_lab/"):
            return self._lab(method, path.rstrip("/"), split.query, raw)
        parts = [p for p in path.split("/") if p]
        is_v2 = parts[:1] == ["v2"]
        fault = self._take_fault(self._classify(method, parts))
        if fault is not None:
            return self._fault_reply(fault, bucket if is_v2 else None)
        if parts[:1] == ["metadata"]:
            return self._metadata(parts, source)
        if is_v2:
            return self._v2(method, parts, raw, auth, bucket)
        return _json_reply(404, NOT_FOUND)

    def _fault_reply(self, fault: _Fault, bucket: str | None) -> _Reply:
        label = str(fault.status)
        if fault.status == "timeout":
            return _Reply(None, fault=label, hang_s=fault.hang_s)
        headers: dict[str, str] = {}
        if bucket is not None:
            _, headers = self._rate(bucket, count=False)  # a faulted request never reached the limiter
        if fault.status == 500:
            return _json_reply(500, SERVER_ERROR, headers, label)
        if fault.status == 422:
            return _json_reply(422, PENDING, headers, label)
        if fault.status == 429:
            wait = math.ceil(fault.retry_after)
            headers.update(
                {
                    "retry-after": str(wait),
                    "ratelimit-remaining": "0",
                    "ratelimit-reset": str(math.ceil(time.time() + wait)),
                }
            )
            headers.setdefault("ratelimit-limit", str(self._rate_limit))
            return _json_reply(429, TOO_MANY, headers, label)
        if fault.status == "html":
            return _Reply(200, BAD_GATEWAY_HTML, "text/html", headers, label)
        if fault.status == "garbage":
            return _Reply(200, GARBAGE_JSON, headers=headers, fault=label)
        return _Reply(200, b"", headers=headers, fault=label)  # "empty"

    # -- /v2 ---------------------------------------------------------------------------------

    def _v2(self, method: str, parts: list[str], raw: bytes, auth: str, bucket: str) -> _Reply:
        over, headers = self._rate(bucket, count=True)
        if auth != "ok":
            return _json_reply(401, UNAUTHORIZED, headers)
        if over:
            return _json_reply(429, TOO_MANY, headers)
        n = len(parts)
        if parts[1:2] != ["reserved_ips"]:
            return _json_reply(404, NOT_FOUND, headers)
        if n == 2 and method == "GET":
            with self._lock:
                items = [self._reserved_ip_object(ip) for ip in self._holders]
            return _json_reply(
                200, {"reserved_ips": items, "links": {}, "meta": {"total": len(items)}}, headers
            )
        ip = parts[2] if n >= 3 else ""
        with self._lock:
            known = ip in self._holders
        if not known:
            return _json_reply(404, NOT_FOUND, headers)
        if n == 3 and method == "GET":
            with self._lock:
                obj = self._reserved_ip_object(ip)
            return _json_reply(200, {"reserved_ip": obj}, headers)
        if n == 4 and parts[3] == "actions" and method == "POST":
            return self._post_action(ip, raw, headers)
        if n == 4 and parts[3] == "actions" and method == "GET":
            with self._lock:
                actions = [
                    copy.deepcopy(a) for i, a in self._actions.items() if self._action_meta[i][0] == ip
                ]
            return _json_reply(
                200, {"actions": actions, "links": {}, "meta": {"total": len(actions)}}, headers
            )
        if n == 5 and parts[3] == "actions" and method == "GET" and parts[4].isdigit():
            action_id = int(parts[4])
            with self._lock:
                meta = self._action_meta.get(action_id)
                action = copy.deepcopy(self._actions[action_id]) if meta and meta[0] == ip else None
            if action is None:
                return _json_reply(404, NOT_FOUND, headers)
            return _json_reply(200, {"action": action}, headers)
        return _json_reply(404, NOT_FOUND, headers)

    def _post_action(self, ip: str, raw: bytes, headers: dict[str, str]) -> _Reply:
        def unprocessable(message: str) -> _Reply:
            return _json_reply(422, {"id": "unprocessable_entity", "message": message}, headers)

        try:
            body = json.loads(raw)
        except ValueError:
            return unprocessable("The request body is not valid JSON.")
        if not isinstance(body, dict):
            return unprocessable("The request body must be a JSON object.")
        kind = body.get("type")
        target: int | None = None
        if kind == "assign":
            target = body.get("droplet_id")
            if not _is_int(target):
                return unprocessable("droplet_id must be an integer.")
            with self._lock:
                exists = target in self._droplets
            if not exists:
                return unprocessable(
                    "The Droplet you are trying to assign the reserved IP to does not exist."
                )
        elif kind != "unassign":
            return unprocessable("type must be one of: assign, unassign.")

        with self._lock:
            if ip in self._pending:
                return _json_reply(422, PENDING, headers)
            action_id = next(self._action_ids)
            action = {
                "id": action_id,
                "status": "in-progress",
                "type": "assign_ip" if kind == "assign" else "unassign_ip",
                "started_at": _iso(time.time()),
                "completed_at": None,
                "resource_id": int(ipaddress.IPv4Address(ip)),
                "resource_type": "reserved_ip",
                "region": self._region(),
                "region_slug": self._region_slug,
            }
            self._actions[action_id] = action
            self._action_meta[action_id] = (ip, kind, target)
            self._pending[ip] = action_id
            answer = {"action": copy.deepcopy(action)}
            delay = self._action_delay_s
            if delay > 0:
                box: list[threading.Timer] = []
                timer = threading.Timer(delay, self._timer_fired, args=(action_id, box))
                timer.daemon = True
                box.append(timer)
                self._timers.add(timer)
                timer.start()
        if delay <= 0:
            # Like the real API the answer says "in-progress"; the edge has moved before it is sent.
            self._complete(action_id)
        return _json_reply(201, answer, headers)

    # -- /metadata ---------------------------------------------------------------------------

    def _metadata(self, parts: list[str], source: str) -> _Reply:
        with self._lock:
            did = self._metadata_by_source.get(source)
            if did is None:
                return _text_reply(404, "not found")
            droplet = self._droplets[did]
            active_ip = next((ip for ip, h in self._holders.items() if h == did), None)
        if parts == ["metadata", "v1.json"]:
            return _json_reply(200, self._metadata_json(droplet, active_ip))
        if parts[:2] != ["metadata", "v1"]:
            return _text_reply(404, "not found")
        rest = "/".join(parts[2:])
        values = {
            "id": str(droplet.id),
            "hostname": droplet.name,
            "region": self._region_slug,
            "interfaces/public/0/ipv4/address": droplet.public_ipv4,
            "interfaces/public/0/ipv4/netmask": "255.255.255.0",
            "interfaces/public/0/ipv4/gateway": _gateway(droplet.public_ipv4),
            "interfaces/public/0/type": "public",
            "interfaces/private/0/ipv4/address": droplet.private_ipv4,
            "interfaces/private/0/ipv4/netmask": "255.255.255.0",
            "interfaces/private/0/ipv4/gateway": _gateway(droplet.private_ipv4),
            "interfaces/private/0/type": "private",
        }
        # floating_ip/ is the deprecated name; answered with the same values so that the request
        # log can prove our scripts never ask for it.
        for prefix in ("reserved_ip", "floating_ip"):
            values[f"{prefix}/ipv4/active"] = "true" if active_ip else "false"
            if active_ip:
                values[f"{prefix}/ipv4/ip_address"] = active_ip
        if rest in values:
            return _text_reply(200, values[rest])
        return _text_reply(404, "not found")

    def _metadata_json(self, droplet: Droplet, active_ip: str | None) -> dict[str, Any]:
        reserved = {"ipv4": {"active": True, "ip_address": active_ip} if active_ip else {"active": False}}
        return {
            "droplet_id": droplet.id,
            "hostname": droplet.name,
            "vendor_data": "",
            "public_keys": [],
            "region": self._region_slug,
            "interfaces": {
                "public": [
                    {
                        "ipv4": {
                            "ip_address": droplet.public_ipv4,
                            "netmask": "255.255.255.0",
                            "gateway": _gateway(droplet.public_ipv4),
                        },
                        "type": "public",
                    }
                ],
                "private": [
                    {
                        "ipv4": {
                            "ip_address": droplet.private_ipv4,
                            "netmask": "255.255.255.0",
                            "gateway": _gateway(droplet.private_ipv4),
                        },
                        "type": "private",
                    }
                ],
            },
            "reserved_ip": copy.deepcopy(reserved),
            "floating_ip": copy.deepcopy(reserved),
            "dns": {"nameservers": []},
            "tags": [],
            "features": {"dhcp_enabled": False},
        }

    # -- /_lab -------------------------------------------------------------------------------

    def _lab(self, method: str, path: str, query: str, raw: bytes) -> _Reply:
        def bad(message: str, status: int = 400) -> _Reply:
            return _json_reply(status, {"id": "bad_request", "message": message})

        if method == "GET" and path == "/_lab/state":
            return _json_reply(200, self.state())
        if method == "GET" and path == "/_lab/requests":
            try:
                since = int(parse_qs(query).get("since", ["0"])[0])
            except ValueError:
                return bad("since must be an integer")
            return _json_reply(200, self.requests(since))
        if method == "GET" and path == "/_lab/events":
            return _json_reply(200, self.events())
        if method != "POST":
            return _json_reply(404, NOT_FOUND)
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            return bad("body is not JSON")
        if not isinstance(body, dict):
            return bad("body must be a JSON object")
        try:
            if path == "/_lab/inject":
                if "status" not in body:
                    return bad("status is required")
                kwargs = {k: body[k] for k in ("count", "match", "retry_after", "hang_s") if k in body}
                queued = self.inject(body["status"], **kwargs)
                return _json_reply(200, {"ok": True, "faults_queued": queued})
            if path == "/_lab/clear":
                self.clear_faults()
                return _json_reply(200, {"ok": True, "faults_queued": 0})
            if path == "/_lab/settings":
                unknown = set(body) - {"latency_s", "action_delay_s", "rate_limit_per_min"}
                if unknown:
                    return bad(f"unknown settings: {sorted(unknown)}")
                if "latency_s" in body:
                    self.set_latency(body["latency_s"])
                if "action_delay_s" in body:
                    self.set_action_delay(body["action_delay_s"])
                if "rate_limit_per_min" in body:
                    self.set_rate_limit(body["rate_limit_per_min"])
                with self._lock:
                    return _json_reply(200, {"ok": True, "settings": self._settings()})
            if path == "/_lab/holder":
                if "ip" not in body or "droplet_id" not in body:
                    return bad("ip and droplet_id are required")
                droplet_id = body["droplet_id"]
                if droplet_id is not None and not _is_int(droplet_id):
                    return bad("droplet_id must be an integer or null")
                try:
                    self.set_holder(body["ip"], droplet_id, run_hook=True)
                except KeyError:
                    return _json_reply(404, NOT_FOUND)
                except RuntimeError as exc:
                    return _json_reply(500, {"id": "server_error", "message": str(exc)})
                return _json_reply(200, {"ok": True, "ip": body["ip"], "droplet_id": droplet_id})
        except (ValueError, TypeError) as exc:
            return bad(str(exc))
        return _json_reply(404, NOT_FOUND)


# -- command line ------------------------------------------------------------------------------

CONFIG_KEYS = {
    "listen",
    "token_file",
    "droplets",
    "reserved_ips",
    "region",
    "metadata_by_source",
    "on_assign",
    "on_unassign",
    "action_delay_s",
    "latency_s",
    "rate_limit_per_min",
    "log_path",
    "ready_file",
}


def _parse_listen(value: Any) -> tuple[str, int]:
    if isinstance(value, list) and len(value) == 2:
        return str(value[0]), int(value[1])
    if isinstance(value, str) and ":" in value:
        host, _, port = value.rpartition(":")
        return host, int(port)
    raise ValueError(f'listen must be "HOST:PORT", got {value!r}')


def _read_token(path: str) -> str:
    token_path = Path(path)
    mode = token_path.stat().st_mode
    if mode & 0o077:
        LOG.warning("token file %s is readable by group or others (mode %o)", path, mode & 0o777)
    token = token_path.read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError(f"token file {path} is empty")
    return token


def from_config(config: dict[str, Any]) -> tuple[FakeDO, Path | None]:
    """Build a FakeDO from the CLI's JSON config. Returns it and the ready_file path (if any)."""
    if "token" in config:
        raise ValueError("the config must not hold the token; put it in the file named by token_file")
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    if "token_file" not in config:
        raise ValueError("token_file is required")
    droplets = [Droplet(**d) for d in config.get("droplets", [])]
    reserved = config.get("reserved_ips", {})
    if isinstance(reserved, list):
        reserved = dict.fromkeys(reserved)
    kwargs: dict[str, Any] = {
        "token": _read_token(config["token_file"]),
        "droplets": droplets,
        "reserved_ips": reserved,
        "metadata_by_source": config.get("metadata_by_source", {}),
        "listen": _parse_listen(config.get("listen", "127.0.0.1:0")),
        "on_assign": config.get("on_assign"),
        "on_unassign": config.get("on_unassign"),
        "log_path": config.get("log_path"),
    }
    for key in ("region", "action_delay_s", "latency_s", "rate_limit_per_min"):
        if key in config:
            kwargs[key] = config[key]
    ready = config.get("ready_file")
    return FakeDO(**kwargs), Path(ready) if ready else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.lab.fakedo",
        description="Fake DigitalOcean API for the lab. The token is read from the config's token_file.",
    )
    parser.add_argument("--config", required=True, help="JSON config file (see the module docstring)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fakedo: %(message)s", stream=sys.stderr)

    try:
        config = json.loads(Path(args.config).read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("the config must be a JSON object")
        fake, ready_file = from_config(config)
    except (OSError, ValueError, TypeError) as exc:
        LOG.error("config error: %s", exc)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if ready_file is not None:
        ready_file.unlink(missing_ok=True)  # a stale file from an earlier run must not mean "ready"
    try:
        fake.start()
    except OSError as exc:
        LOG.error("cannot listen: %s", exc)
        return 2
    try:
        if ready_file is not None:
            tmp = ready_file.with_name(ready_file.name + ".tmp")
            tmp.write_text(fake.url + "\n", encoding="utf-8")
            tmp.replace(ready_file)  # atomic: a reader never sees a half-written URL
        LOG.info("listening on %s", fake.url)
        while not stop.wait(0.5):
            pass
        LOG.info("stopping")
    finally:
        fake.stop()
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
