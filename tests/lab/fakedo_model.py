"""The fake DigitalOcean API's model: what the platform knows, with no HTTP in it.

Holders of the reserved IPs, actions and the ones still pending, the edge hook that re-routes
an IP when an assign completes, the rate-limit windows, queued faults, named tokens (revocable),
the request and event logs and the record of every IP move. `tests.lab.fakedo_http` turns
requests into calls on a `Model`; `tests.lab.fakedo.FakeDO` adds the server around it.

DigitalOcean behaviours modelled here (what our scripts must survive):
- an action answers `in-progress`; the edge keeps sending traffic to the old holder until the
  action completes (`action_delay_s` later), and only then does the IP change hands;
- 422 for a second action on an IP with one pending, for an action touching a droplet that is
  part of another pending action ("Droplet already has a pending event"), and for assigning an
  IP to the droplet that already holds it;
- 250 requests per minute (burst) and 5,000 per hour per token, sliding windows; the
  `ratelimit-*` headers describe the hourly quota, a 429 past either limit carries `retry-after`;
- a revoked token answers 401 "Unable to authenticate you" like any unknown one.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG = logging.getLogger("fakedo")

# The lab uses documentation ranges only (RFC 5737) plus loopback; refusing anything else keeps
# a mistyped config from ever pointing lab traffic at a real network.
_ALLOWED_NETS = tuple(ipaddress.IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"))

FAULT_KINDS = (500, 429, 422, "timeout", "html", "garbage", "empty")
FAULT_MATCHES = ("assign", "action", "get", "metadata", "any")
HOOK_TIMEOUT_S = 10.0
FIRST_ACTION_ID = 2_000_000_001
PROJECT_ID = "4de7ac8b-495b-4884-9a69-1050c6793cd6"
DEFAULT_TOKEN_NAME = "default"

# DigitalOcean's documented limits: 250/min is the burst limit, 5,000/h the quota the
# ratelimit-* headers report.
RATE_LIMIT_PER_MIN = 250
RATE_LIMIT_PER_HOUR = 5000

# Timing the lab can pick by name. "realistic": DigitalOcean publishes no move time and says
# "a few seconds"; an AWS Elastic IP moved by keepalived takes 5-6 s, and 0.3 s is a typical
# API round trip from a droplet.
PRESETS: dict[str, dict[str, float]] = {
    "ideal": {"latency_s": 0.0, "action_delay_s": 0.0},
    "realistic": {"latency_s": 0.3, "action_delay_s": 5.0},
}

UNAUTHORIZED = {"id": "Unauthorized", "message": "Unable to authenticate you"}
NOT_FOUND = {"id": "not_found", "message": "The resource you were accessing could not be found."}
# The platform's own wording (doctl#493 and clients matching on it); the reserved-IP endpoints
# kept the floating-IP text.
PENDING = {"id": "unprocessable_entity", "message": "The floating IP already has a pending event."}
DROPLET_PENDING = {"id": "unprocessable_entity", "message": "Droplet already has a pending event."}
# No published text found for this one; clients in the wild match "is already assigned".
ALREADY_ASSIGNED = {
    "id": "unprocessable_entity",
    "message": "The floating IP is already assigned to that Droplet.",
}
SERVER_ERROR = {"id": "server_error", "message": "Server Error"}
TOO_MANY = {"id": "too_many_requests", "message": "API Rate limit exceeded."}

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


def check_addr(value: Any, what: str, *, allow_unspecified: bool = False) -> str:
    try:
        addr = ipaddress.IPv4Address(value)
    except (ValueError, TypeError):
        raise ValueError(f"{what}: {value!r} is not an IPv4 address") from None
    if addr.is_loopback or any(addr in net for net in _ALLOWED_NETS):
        return str(addr)
    if allow_unspecified and addr.is_unspecified:
        return str(addr)
    raise ValueError(f"{what}: {addr} is outside the lab's ranges (RFC 5737 documentation nets, loopback)")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def non_negative(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{what} must be a number >= 0, got {value!r}")
    return float(value)


def positive_int(value: Any, what: str) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def gateway(addr: str) -> str:
    """The .1 of the address's /24: what DigitalOcean reports as a droplet's gateway."""
    return str(ipaddress.IPv4Network(f"{addr}/24", strict=False).network_address + 1)


def preset_settings(name: Any) -> dict[str, float]:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return dict(PRESETS[name])


@dataclass(frozen=True)
class Droplet:
    """A droplet as the fake knows it: enough for the API's droplet object and the metadata."""

    id: int
    name: str
    public_ipv4: str
    private_ipv4: str

    def __post_init__(self) -> None:
        if not is_int(self.id) or self.id <= 0:
            raise ValueError(f"droplet id must be a positive integer, got {self.id!r}")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"droplet {self.id}: name must be a non-empty string")
        object.__setattr__(self, "public_ipv4", check_addr(self.public_ipv4, f"droplet {self.id} public_ipv4"))
        object.__setattr__(
            self, "private_ipv4", check_addr(self.private_ipv4, f"droplet {self.id} private_ipv4")
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
                        "gateway": gateway(self.public_ipv4),
                        "type": "public",
                    },
                    {
                        "ip_address": self.private_ipv4,
                        "netmask": "255.255.255.0",
                        "gateway": gateway(self.private_ipv4),
                        "type": "private",
                    },
                ],
                "v6": [],
            },
            "region": copy.deepcopy(region),
            "tags": [],
        }


@dataclass
class Fault:
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
class _Action:
    """An action and what the API does not show: its IP, target and the holder it started from."""

    public: dict[str, Any]  # the JSON object the API answers with
    ip: str
    kind: str  # "assign" | "unassign"
    target: int | None
    previous: int | None
    requested_at: float


@dataclass(frozen=True)
class Auth:
    """Who a request claims to be: state ok|bad|missing|revoked, the token's name when known,
    the rate bucket (a name or a hash, never the value) and the presented credential (to scrub)."""

    state: str
    token: str | None
    bucket: str
    presented: str | None


class Unprocessable(Exception):
    """An action the platform refuses with 422; `body` is DigitalOcean's JSON answer."""

    def __init__(self, body: dict[str, str]):
        super().__init__(body["message"])
        self.body = body


class Tokens:
    """Named bearer tokens, compared in constant time; revoking one makes it answer 401."""

    def __init__(self, tokens: Mapping[str, str]):
        if not tokens:
            raise ValueError("at least one token is required (token or tokens)")
        self._values: dict[str, bytes] = {}
        for name, value in tokens.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"token names must be non-empty strings, got {name!r}")
            if not isinstance(value, str) or not value or value != value.strip() or " " in value:
                # Never echo the value: it is a secret even when it is malformed.
                raise ValueError(f"token {name!r} must be a non-empty string without whitespace")
            clash = [n for n, v in self._values.items() if hmac.compare_digest(v, value.encode())]
            if clash:
                raise ValueError(f"tokens {clash[0]!r} and {name!r} have the same value")
            self._values[name] = value.encode()
        self._revoked: set[str] = set()

    def secrets(self) -> list[str]:
        """The values, for scrubbing logs only."""
        return [v.decode() for v in self._values.values()]

    def set_revoked(self, name: Any, revoked: bool) -> None:
        if name not in self._values:
            raise KeyError(f"unknown token name {name!r}; known: {sorted(self._values)}")
        if revoked:
            self._revoked.add(name)
        else:
            self._revoked.discard(name)

    def describe(self) -> dict[str, dict[str, bool]]:
        return {name: {"revoked": name in self._revoked} for name in self._values}

    def authenticate(self, header: str | None, source: str) -> Auth:
        if not header:
            return Auth("missing", None, f"source:{source}", None)
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            return Auth("bad", None, f"source:{source}", credential or None)
        presented = credential.encode()
        for name, value in self._values.items():
            if hmac.compare_digest(presented, value):
                return Auth("revoked" if name in self._revoked else "ok", name, f"token:{name}", credential)
        return Auth("bad", None, "token:" + hashlib.sha256(presented).hexdigest(), credential)


class RateLimiter:
    """DigitalOcean's two sliding windows per credential: a burst limit per minute and a quota
    per hour. Each request expires one window after it was made (not all at once)."""

    def __init__(self, per_min: int, per_hour: int, minute_s: float = 60.0, hour_s: float = 3600.0):
        self.per_min = positive_int(per_min, "rate_limit_per_min")
        self.per_hour = positive_int(per_hour, "rate_limit_per_hour")
        self.minute_s = non_negative(minute_s, "rate_window_s") or 60.0
        self.hour_s = non_negative(hour_s, "rate_hour_window_s") or 3600.0
        self._minute: dict[str, deque[float]] = {}
        self._hour: dict[str, deque[float]] = {}

    @staticmethod
    def _trim(bucket: deque[float], now: float, window: float) -> None:
        while bucket and bucket[0] <= now - window:
            bucket.popleft()

    def check(self, key: str, *, count: bool) -> tuple[bool, dict[str, str]]:
        """(over a limit, headers). Call with the model's lock held. A refused request is not
        counted, so a client that backs off recovers."""
        now, wall = time.monotonic(), time.time()
        minute = self._minute.setdefault(key, deque())
        hour = self._hour.setdefault(key, deque())
        self._trim(minute, now, self.minute_s)
        self._trim(hour, now, self.hour_s)
        waits = []
        if len(minute) >= self.per_min:
            waits.append(minute[0] + self.minute_s - now)
        if len(hour) >= self.per_hour:
            waits.append(hour[0] + self.hour_s - now)
        over = bool(waits) and count
        if count and not waits:
            minute.append(now)
            hour.append(now)
        # The headers describe the hourly quota; "reset" is when its oldest request expires.
        oldest = hour[0] if hour else now
        headers = {
            "ratelimit-limit": str(self.per_hour),
            "ratelimit-remaining": str(max(0, self.per_hour - len(hour))),
            "ratelimit-reset": str(math.ceil(wall + max(0.0, oldest + self.hour_s - now))),
        }
        if over:
            headers["retry-after"] = str(max(1, math.ceil(max(waits))))
        return over, headers


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


class Model:
    """The platform's state. Thread-safe: every public method may be called from any thread."""

    def __init__(
        self,
        tokens: Mapping[str, str],
        droplets: Sequence[Droplet] = (),
        reserved_ips: dict[str, int | None] | None = None,
        region: str = "fra1",
        metadata_by_source: dict[str, int] | None = None,
        on_assign: Hook | None = None,
        on_unassign: Hook | None = None,
        action_delay_s: float = 0.0,
        latency_s: float = 0.0,
        rate_limit_per_min: int = RATE_LIMIT_PER_MIN,
        rate_limit_per_hour: int = RATE_LIMIT_PER_HOUR,
        log_path: str | os.PathLike[str] | None = None,
        *,
        rate_window_s: float = 60.0,
        rate_hour_window_s: float = 3600.0,
    ) -> None:
        self._tokens = Tokens(tokens)
        self._droplets: dict[int, Droplet] = {}
        for d in droplets:
            if not isinstance(d, Droplet):
                raise TypeError(f"droplets must be Droplet objects, got {type(d).__name__}")
            if d.id in self._droplets:
                raise ValueError(f"duplicate droplet id {d.id}")
            self._droplets[d.id] = d
        self._holders: dict[str, int | None] = {}
        for ip, holder in (reserved_ips or {}).items():
            ip = check_addr(ip, "reserved ip")
            if holder is not None and holder not in self._droplets:
                raise ValueError(f"reserved ip {ip}: unknown droplet {holder!r}")
            self._holders[ip] = holder
        if not isinstance(region, str) or not region:
            raise ValueError("region must be a non-empty slug")
        self.region_slug = region
        self._metadata_by_source: dict[str, int] = {}
        for source, did in (metadata_by_source or {}).items():
            source = check_addr(source, "metadata source")
            if did not in self._droplets:
                raise ValueError(f"metadata source {source}: unknown droplet {did!r}")
            self._metadata_by_source[source] = did
        self._on_assign = _check_hook(on_assign, "on_assign")
        self._on_unassign = _check_hook(on_unassign, "on_unassign")
        self._action_delay_s = non_negative(action_delay_s, "action_delay_s")
        self._latency_s = non_negative(latency_s, "latency_s")
        self._limiter = RateLimiter(rate_limit_per_min, rate_limit_per_hour, rate_window_s, rate_hour_window_s)
        self._log_path = Path(log_path) if log_path is not None else None

        self._lock = threading.Lock()
        self.stopping = threading.Event()  # set on close(): held requests and latencies end at once
        self._action_ids = itertools.count(FIRST_ACTION_ID)
        self._actions: dict[int, _Action] = {}
        self._pending: dict[str, int] = {}  # ip -> action id
        self._timers: set[threading.Timer] = set()
        self._faults: list[Fault] = []
        self._log: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._moves: list[dict[str, Any]] = []
        self._seq = 0
        self._logfile: Any = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    def open_log(self) -> None:
        if self._log_path is not None and self._logfile is None:
            self._logfile = open(self._log_path, "a", encoding="utf-8")  # noqa: SIM115 -- closed by close()

    def close(self) -> bool:
        """Cancel pending actions (their edge never moves) and release held requests.
        Returns False when already closed. The request log stays readable."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            timers = list(self._timers)
            self._timers.clear()
        self.stopping.set()
        for timer in timers:
            timer.cancel()
        return True

    def close_log(self) -> None:
        with self._lock:
            if self._logfile is not None:
                self._logfile.close()
                self._logfile = None

    # -- controls (tests and the lab) ----------------------------------------------------------

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
        positive_int(count, "count")
        if match not in FAULT_MATCHES:
            raise ValueError(f"match must be one of {FAULT_MATCHES}, got {match!r}")
        fault = Fault(
            status, count, match, non_negative(retry_after, "retry_after"), non_negative(hang_s, "hang_s")
        )
        with self._lock:
            self._faults.append(fault)
            return self._faults_queued()

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_latency(self, seconds: float) -> None:
        """Added to every /v2 answer (metadata and the control plane stay fast)."""
        value = non_negative(seconds, "latency_s")
        with self._lock:
            self._latency_s = value

    def set_action_delay(self, seconds: float) -> None:
        """How long an action stays in-progress. Takes effect for actions started afterwards."""
        value = non_negative(seconds, "action_delay_s")
        with self._lock:
            self._action_delay_s = value

    def set_rate_limit(self, per_min: int | None = None, per_hour: int | None = None) -> None:
        values = {}
        if per_min is not None:
            values["per_min"] = positive_int(per_min, "rate_limit_per_min")
        if per_hour is not None:
            values["per_hour"] = positive_int(per_hour, "rate_limit_per_hour")
        with self._lock:
            for attr, value in values.items():
                setattr(self._limiter, attr, value)

    def apply_preset(self, name: str) -> None:
        """Set latency and action delay from PRESETS[name] ("ideal", "realistic")."""
        values = preset_settings(name)
        self.set_latency(values["latency_s"])
        self.set_action_delay(values["action_delay_s"])

    def revoke(self, name: str) -> None:
        """From now on the token named `name` answers 401, as after deleting it in the panel."""
        with self._lock:
            self._tokens.set_revoked(name, True)

    def restore(self, name: str) -> None:
        with self._lock:
            self._tokens.set_revoked(name, False)

    def holder(self, ip: str) -> int | None:
        with self._lock:
            if ip not in self._holders:
                raise KeyError(ip)
            return self._holders[ip]

    def set_holder(self, ip: str, droplet_id: int | None, run_hook: bool = True) -> None:
        """Set who holds `ip` (lab/test setup, not an IP move). With run_hook the edge is
        re-routed first; a failing hook raises RuntimeError and leaves the holder unchanged."""
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

    def add_droplet(self, droplet: Droplet, metadata_source: str) -> None:
        """A droplet created while the platform runs (a replacement node), with the address its
        metadata requests come from."""
        source = check_addr(metadata_source, "metadata source")
        with self._lock:
            if droplet.id in self._droplets:
                raise ValueError(f"duplicate droplet id {droplet.id}")
            self._droplets[droplet.id] = droplet
            self._metadata_by_source[source] = droplet.id

    def remove_droplet(self, droplet_id: int) -> None:
        """A droplet destroyed: gone from the API and the metadata service. A reserved IP it held
        becomes unassigned, as at DigitalOcean (the edge stops routing it)."""
        with self._lock:
            if droplet_id not in self._droplets:
                raise KeyError(f"unknown droplet {droplet_id!r}")
            held = [ip for ip, h in self._holders.items() if h == droplet_id]
        for ip in held:
            self.set_holder(ip, None, run_hook=True)
        with self._lock:
            del self._droplets[droplet_id]
            for source in [s for s, d in self._metadata_by_source.items() if d == droplet_id]:
                del self._metadata_by_source[source]

    def requests(self, since: int = 0) -> list[dict[str, Any]]:
        """The request log (entries with seq > since), oldest first."""
        with self._lock:
            return [copy.deepcopy(e) for e in self._log if e["seq"] > since]

    def events(self) -> list[dict[str, Any]]:
        """Hook runs: {"ts", "event": "hook", "kind", "ip", "droplet_id", "ok", "error"}."""
        with self._lock:
            return copy.deepcopy(self._events)

    def moves(self, since: float = 0.0) -> list[dict[str, Any]]:
        """Completed assigns that changed the holder, completed at or after `since` (epoch):
        {"ip", "from", "to", "action_id", "requested_at", "completed_at"}, oldest first."""
        with self._lock:
            return [dict(m) for m in self._moves if m["completed_at"] >= since]

    def in_progress(self) -> list[dict[str, Any]]:
        """Actions still pending: {"ip", "kind", "from", "to", "action_id", "requested_at"}."""
        with self._lock:
            return self._in_progress()

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "reserved_ips": dict(self._holders),
                "pending": dict(self._pending),
                "in_progress": self._in_progress(),
                "moves": [dict(m) for m in self._moves],
                "faults_queued": self._faults_queued(),
                "faults": [f.describe() for f in self._faults],
                "settings": self._settings(),
                "tokens": self._tokens.describe(),
            }

    def settings(self) -> dict[str, Any]:
        with self._lock:
            return self._settings()

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

    # -- what the HTTP layer asks ---------------------------------------------------------------

    def latency(self) -> float:
        with self._lock:
            return self._latency_s

    def secrets(self) -> list[str]:
        """Every token value, so the HTTP layer can scrub them from what it logs."""
        return self._tokens.secrets()

    def authenticate(self, header: str | None, source: str) -> Auth:
        with self._lock:
            return self._tokens.authenticate(header, source)

    def rate(self, bucket: str, *, count: bool) -> tuple[bool, dict[str, str]]:
        with self._lock:
            return self._limiter.check(bucket, count=count)

    def take_fault(self, kind: str | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.match == "any" or fault.match == kind:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def rate_limit_per_hour(self) -> int:
        with self._lock:
            return self._limiter.per_hour

    def has_ip(self, ip: str) -> bool:
        with self._lock:
            return ip in self._holders

    def has_droplet(self, droplet_id: int) -> bool:
        with self._lock:
            return droplet_id in self._droplets

    def reserved_ip_objects(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._reserved_ip_object(ip) for ip in self._holders]

    def reserved_ip_object(self, ip: str) -> dict[str, Any]:
        with self._lock:
            return self._reserved_ip_object(ip)

    def actions_of(self, ip: str) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(a.public) for a in self._actions.values() if a.ip == ip]

    def action(self, ip: str, action_id: int) -> dict[str, Any] | None:
        with self._lock:
            action = self._actions.get(action_id)
            return copy.deepcopy(action.public) if action is not None and action.ip == ip else None

    def metadata_view(self, source: str) -> tuple[Droplet, str | None] | None:
        """The droplet a metadata request from `source` describes, and the IP it holds."""
        with self._lock:
            did = self._metadata_by_source.get(source)
            if did is None:
                return None
            active_ip = next((ip for ip, h in self._holders.items() if h == did), None)
            return self._droplets[did], active_ip

    def start_action(self, ip: str, kind: str, target: int | None) -> dict[str, Any]:
        """Accept an assign/unassign on a known IP and return the action object (in-progress);
        raise Unprocessable with DigitalOcean's 422 answer when the platform would refuse it."""
        with self._lock:
            if ip in self._pending:
                raise Unprocessable(PENDING)
            previous = self._holders[ip]
            if kind == "assign" and previous == target:
                raise Unprocessable(ALREADY_ASSIGNED)
            # One event per droplet at a time: both the droplet the IP leaves and the one it
            # joins take part in a move, so either being busy refuses the next one.
            involved = {target, previous} - {None}
            if involved & self._busy_droplets():
                raise Unprocessable(DROPLET_PENDING)
            now = time.time()
            action_id = next(self._action_ids)
            public = {
                "id": action_id,
                "status": "in-progress",
                "type": "assign_ip" if kind == "assign" else "unassign_ip",
                "started_at": iso(now),
                "completed_at": None,
                "resource_id": int(ipaddress.IPv4Address(ip)),
                "resource_type": "reserved_ip",
                "region": self.region(),
                "region_slug": self.region_slug,
            }
            self._actions[action_id] = _Action(public, ip, kind, target, previous, now)
            self._pending[ip] = action_id
            answer = copy.deepcopy(public)
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
        return answer

    def append_log(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            entry = {"seq": self._seq, **entry}
            self._log.append(entry)
            if self._logfile is not None:
                self._logfile.write(json.dumps(entry) + "\n")
                self._logfile.flush()

    def region(self) -> dict[str, Any]:
        return {
            "name": REGION_NAMES.get(self.region_slug, self.region_slug.upper()),
            "slug": self.region_slug,
            "features": list(REGION_FEATURES),
            "available": True,
            "sizes": [],
        }

    # -- internals (lock held where noted) ------------------------------------------------------

    def _faults_queued(self) -> int:  # lock held
        return sum(f.remaining for f in self._faults)

    def _settings(self) -> dict[str, Any]:  # lock held
        timing = {"latency_s": self._latency_s, "action_delay_s": self._action_delay_s}
        return {
            **timing,
            "preset": next((name for name, values in PRESETS.items() if values == timing), None),
            "rate_limit_per_min": self._limiter.per_min,
            "rate_limit_per_hour": self._limiter.per_hour,
        }

    def _busy_droplets(self) -> set[int]:  # lock held
        busy: set[int] = set()
        for action_id in self._pending.values():
            action = self._actions[action_id]
            busy |= {action.target, action.previous} - {None}
        return busy

    def _in_progress(self) -> list[dict[str, Any]]:  # lock held
        out = []
        for action_id in self._pending.values():
            a = self._actions[action_id]
            out.append(
                {
                    "ip": a.ip,
                    "kind": a.kind,
                    "from": a.previous,
                    "to": a.target,
                    "action_id": action_id,
                    "requested_at": a.requested_at,
                }
            )
        return sorted(out, key=lambda a: a["requested_at"])

    def _reserved_ip_object(self, ip: str) -> dict[str, Any]:  # lock held
        holder = self._holders[ip]
        region = self.region()
        return {
            "ip": ip,
            "droplet": self._droplets[holder].api_object(region) if holder is not None else None,
            "region": region,
            "locked": False,
            "project_id": PROJECT_ID,
        }

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
        event = {
            "ts": time.time(),
            "event": "hook",
            "kind": kind,
            "ip": ip,
            "droplet_id": droplet_id,
            "ok": error is None,
            "error": error,
        }
        with self._lock:
            self._events.append(event)
        if error is not None:
            LOG.warning("%s hook for %s (droplet %s) failed: %s", kind, ip, droplet_id, error)
        else:
            LOG.info("%s hook for %s (droplet %s) done", kind, ip, droplet_id)
        return error

    def _complete(self, action_id: int) -> None:
        """Finish an action: the edge hook first, then the action's status and the holder.
        Until the hook has run, traffic for the IP still reaches the old holder."""
        with self._lock:
            action = self._actions[action_id]
            hook_droplet = action.target if action.kind == "assign" else self._holders.get(action.ip)
        error = None
        # An unassign of an unassigned IP has nothing routed, so nothing for the edge to take down.
        if action.kind == "assign" or hook_droplet is not None:
            error = self._run_hook(action.kind, action.ip, hook_droplet)
        with self._lock:
            now = time.time()
            action.public["completed_at"] = iso(now)
            if error is None:
                action.public["status"] = "completed"
                before = self._holders[action.ip]
                self._holders[action.ip] = action.target if action.kind == "assign" else None
                if action.kind == "assign" and before != action.target:
                    self._moves.append(
                        {
                            "ip": action.ip,
                            "from": before,
                            "to": action.target,
                            "action_id": action_id,
                            "requested_at": action.requested_at,
                            "completed_at": now,
                        }
                    )
            else:
                action.public["status"] = "errored"
            if self._pending.get(action.ip) == action_id:
                del self._pending[action.ip]

    def _timer_fired(self, action_id: int, timer_box: list[threading.Timer]) -> None:
        with self._lock:
            self._timers.discard(timer_box[0])
            if self._closed:
                return
        self._complete(action_id)
