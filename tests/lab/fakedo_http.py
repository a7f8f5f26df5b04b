"""The fake DigitalOcean API's HTTP side: parse a request, ask the model, answer like DigitalOcean.

Routes: /v2/reserved_ips[/{ip}[/actions[/{id}]]] (bearer token, rate limited, latency, faults),
/metadata/v1/... and /metadata/v1.json (no auth, keyed by the source address, faults),
/_lab/... (the control plane: no auth, never slowed, limited or faulted).

Secrets: request headers are never logged; paths and bodies are scrubbed of every token (and of
whatever credential was presented) before they reach the request log.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.lab.fakedo_model import (
    LOG,
    NOT_FOUND,
    PENDING,
    SERVER_ERROR,
    TOO_MANY,
    UNAUTHORIZED,
    Auth,
    Droplet,
    Fault,
    Model,
    Unprocessable,
    gateway,
    is_int,
    non_negative,
    positive_int,
    preset_settings,
)

MAX_BODY = 1 << 20
SETTINGS_KEYS = ("preset", "latency_s", "action_delay_s", "rate_limit_per_min", "rate_limit_per_hour")

BAD_GATEWAY_HTML = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>bad gateway</center>\r\n"
    b"</body>\r\n</html>\r\n"
)
GARBAGE_JSON = b'{"action": {"id": 2000000001, "status": "in-prog'


@dataclass
class Reply:
    status: int | None  # None: hold the connection, then close it without an answer
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"
    headers: dict[str, str] | None = None
    fault: str | None = None
    hang_s: float = 0.0


def json_reply(status: int, obj: Any, headers: dict[str, str] | None = None, fault: str | None = None) -> Reply:
    return Reply(status, json.dumps(obj).encode(), headers=headers, fault=fault)


def text_reply(status: int, text: str) -> Reply:
    return Reply(status, text.encode(), content_type="text/plain; charset=utf-8")


def scrub(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, "[REDACTED]")
        return value
    if isinstance(value, list):
        return [scrub(v, secrets) for v in value]
    if isinstance(value, dict):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    return value


def classify(method: str, parts: list[str]) -> str | None:
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


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    model: Model


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fakedo"
    sys_version = ""
    server: Server

    def _serve(self) -> None:
        serve(self.server.model, self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

    def log_message(self, format: str, *args: Any) -> None:
        # The default writes every request line to stderr; the model keeps its own (scrubbed) log.
        return


def serve(model: Model, handler: BaseHTTPRequestHandler) -> None:
    ts = time.time()
    source = handler.client_address[0]
    method = handler.command
    try:
        length = int(handler.headers.get("Content-Length") or 0)
    except ValueError:
        length = -1
    raw = handler.rfile.read(length) if 0 < length <= MAX_BODY else b""
    auth = model.authenticate(handler.headers.get("Authorization"), source)
    split = urlsplit(handler.path)
    parts = [p for p in split.path.split("/") if p]
    secrets = model.secrets() + ([auth.presented] if auth.presented and len(auth.presented) >= 8 else [])

    if length < 0 or length > MAX_BODY:
        reply = json_reply(413 if length > MAX_BODY else 400, {"id": "bad_request", "message": "bad length"})
        handler.close_connection = True
    else:
        latency = model.latency()
        # Only the API's answers are slowed: metadata is link-local on a droplet, and the
        # control plane stays fast so the lab can always steer.
        if latency and parts[:1] == ["v2"]:
            model.stopping.wait(latency)
        try:
            reply = route(model, method, split.path, split.query, parts, raw, auth, source)
        except Exception:  # a bug in the fake must show as a 500, not a hung client
            LOG.exception("internal error on %s %s", method, scrub(split.path, secrets))
            reply = json_reply(500, SERVER_ERROR)

    body_obj = None
    if method == "POST" and raw:
        with contextlib.suppress(ValueError):
            body_obj = json.loads(raw)
    model.append_log(
        {
            "ts": ts,
            "method": method,
            "path": scrub(handler.path, secrets),
            "status": reply.status,
            "source": source,
            "fault": reply.fault,
            "body": scrub(body_obj, secrets),
            "auth": auth.state,
            "token": auth.token,  # the token's name, never its value
        }
    )

    if reply.status is None:  # a "timeout" fault: hold the request, then hang up
        model.stopping.wait(reply.hang_s)
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


def route(
    model: Model, method: str, path: str, query: str, parts: list[str], raw: bytes, auth: Auth, source: str
) -> Reply:
    if path.startswith("/_lab/"):
        return lab(model, method, path.rstrip("/"), query, raw)
    is_v2 = parts[:1] == ["v2"]
    fault = model.take_fault(classify(method, parts))
    if fault is not None:
        return fault_reply(model, fault, auth.bucket if is_v2 else None)
    if parts[:1] == ["metadata"]:
        return metadata(model, parts, source)
    if is_v2:
        return v2(model, method, parts, raw, auth)
    return json_reply(404, NOT_FOUND)


def fault_reply(model: Model, fault: Fault, bucket: str | None) -> Reply:
    label = str(fault.status)
    if fault.status == "timeout":
        return Reply(None, fault=label, hang_s=fault.hang_s)
    headers: dict[str, str] = {}
    if bucket is not None:
        _, headers = model.rate(bucket, count=False)  # a faulted request never reached the limiter
    if fault.status == 500:
        return json_reply(500, SERVER_ERROR, headers, label)
    if fault.status == 422:
        return json_reply(422, PENDING, headers, label)
    if fault.status == 429:
        wait = math.ceil(fault.retry_after)
        headers.update(
            {
                "retry-after": str(wait),
                "ratelimit-remaining": "0",
                "ratelimit-reset": str(math.ceil(time.time() + wait)),
            }
        )
        headers.setdefault("ratelimit-limit", str(model.rate_limit_per_hour()))
        return json_reply(429, TOO_MANY, headers, label)
    if fault.status == "html":
        return Reply(200, BAD_GATEWAY_HTML, "text/html", headers, label)
    if fault.status == "garbage":
        return Reply(200, GARBAGE_JSON, headers=headers, fault=label)
    return Reply(200, b"", headers=headers, fault=label)  # "empty"


# -- /v2 -------------------------------------------------------------------------------------


def v2(model: Model, method: str, parts: list[str], raw: bytes, auth: Auth) -> Reply:
    over, headers = model.rate(auth.bucket, count=True)
    if auth.state != "ok":
        return json_reply(401, UNAUTHORIZED, headers)
    if over:
        return json_reply(429, TOO_MANY, headers)
    n = len(parts)
    if parts[1:2] != ["reserved_ips"]:
        return json_reply(404, NOT_FOUND, headers)
    if n == 2 and method == "GET":
        items = model.reserved_ip_objects()
        return json_reply(200, {"reserved_ips": items, "links": {}, "meta": {"total": len(items)}}, headers)
    ip = parts[2] if n >= 3 else ""
    if not model.has_ip(ip):
        return json_reply(404, NOT_FOUND, headers)
    if n == 3 and method == "GET":
        return json_reply(200, {"reserved_ip": model.reserved_ip_object(ip)}, headers)
    if n == 4 and parts[3] == "actions" and method == "POST":
        return post_action(model, ip, raw, headers)
    if n == 4 and parts[3] == "actions" and method == "GET":
        actions = model.actions_of(ip)
        return json_reply(200, {"actions": actions, "links": {}, "meta": {"total": len(actions)}}, headers)
    if n == 5 and parts[3] == "actions" and method == "GET" and parts[4].isdigit():
        action = model.action(ip, int(parts[4]))
        if action is None:
            return json_reply(404, NOT_FOUND, headers)
        return json_reply(200, {"action": action}, headers)
    return json_reply(404, NOT_FOUND, headers)


def post_action(model: Model, ip: str, raw: bytes, headers: dict[str, str]) -> Reply:
    def unprocessable(message: str) -> Reply:
        return json_reply(422, {"id": "unprocessable_entity", "message": message}, headers)

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
        if not is_int(target):
            return unprocessable("droplet_id must be an integer.")
        if not model.has_droplet(target):
            return unprocessable("The Droplet you are trying to assign the reserved IP to does not exist.")
    elif kind != "unassign":
        return unprocessable("type must be one of: assign, unassign.")
    try:
        action = model.start_action(ip, kind, target)
    except Unprocessable as exc:
        return json_reply(422, exc.body, headers)
    return json_reply(201, {"action": action}, headers)


# -- /metadata -------------------------------------------------------------------------------


def metadata(model: Model, parts: list[str], source: str) -> Reply:
    view = model.metadata_view(source)
    if view is None:
        return text_reply(404, "not found")
    droplet, active_ip = view
    if parts == ["metadata", "v1.json"]:
        return json_reply(200, metadata_json(droplet, active_ip, model.region_slug))
    if parts[:2] != ["metadata", "v1"]:
        return text_reply(404, "not found")
    rest = "/".join(parts[2:])
    values = {
        "id": str(droplet.id),
        "hostname": droplet.name,
        "region": model.region_slug,
        "interfaces/public/0/ipv4/address": droplet.public_ipv4,
        "interfaces/public/0/ipv4/netmask": "255.255.255.0",
        "interfaces/public/0/ipv4/gateway": gateway(droplet.public_ipv4),
        "interfaces/public/0/type": "public",
        "interfaces/private/0/ipv4/address": droplet.private_ipv4,
        "interfaces/private/0/ipv4/netmask": "255.255.255.0",
        "interfaces/private/0/ipv4/gateway": gateway(droplet.private_ipv4),
        "interfaces/private/0/type": "private",
    }
    # floating_ip/ is the deprecated name; answered with the same values so that the request
    # log can prove our scripts never ask for it.
    for prefix in ("reserved_ip", "floating_ip"):
        values[f"{prefix}/ipv4/active"] = "true" if active_ip else "false"
        if active_ip:
            values[f"{prefix}/ipv4/ip_address"] = active_ip
    if rest in values:
        return text_reply(200, values[rest])
    return text_reply(404, "not found")


def metadata_json(droplet: Droplet, active_ip: str | None, region_slug: str) -> dict[str, Any]:
    reserved = {"ipv4": {"active": True, "ip_address": active_ip} if active_ip else {"active": False}}

    def interface(addr: str, kind: str) -> dict[str, Any]:
        return {"ipv4": {"ip_address": addr, "netmask": "255.255.255.0", "gateway": gateway(addr)}, "type": kind}

    return {
        "droplet_id": droplet.id,
        "hostname": droplet.name,
        "vendor_data": "",
        "public_keys": [],
        "region": region_slug,
        "interfaces": {
            "public": [interface(droplet.public_ipv4, "public")],
            "private": [interface(droplet.private_ipv4, "private")],
        },
        "reserved_ip": copy.deepcopy(reserved),
        "floating_ip": copy.deepcopy(reserved),
        "dns": {"nameservers": []},
        "tags": [],
        "features": {"dhcp_enabled": False},
    }


# -- /_lab -----------------------------------------------------------------------------------


def apply_settings(model: Model, body: dict[str, Any]) -> None:
    """A preset first, then the explicit values, so {"preset": "realistic", "latency_s": 0}
    means "realistic, but without the latency". Nothing changes unless every value is valid."""
    unknown = set(body) - set(SETTINGS_KEYS)
    if unknown:
        raise ValueError(f"unknown settings: {sorted(unknown)}; valid: {list(SETTINGS_KEYS)}")
    timing = preset_settings(body["preset"]) if "preset" in body else {}
    timing.update({key: non_negative(body[key], key) for key in ("latency_s", "action_delay_s") if key in body})
    limits = {key: positive_int(body[key], key) for key in ("rate_limit_per_min", "rate_limit_per_hour") if key in body}
    if "latency_s" in timing:
        model.set_latency(timing["latency_s"])
    if "action_delay_s" in timing:
        model.set_action_delay(timing["action_delay_s"])
    model.set_rate_limit(limits.get("rate_limit_per_min"), limits.get("rate_limit_per_hour"))


def lab(model: Model, method: str, path: str, query: str, raw: bytes) -> Reply:
    def bad(message: str, status: int = 400) -> Reply:
        return json_reply(status, {"id": "bad_request", "message": message})

    if method == "GET" and path in ("/_lab/requests", "/_lab/moves"):
        try:
            since = parse_qs(query).get("since", ["0"])[0]
            return json_reply(
                200, model.requests(int(since)) if path == "/_lab/requests" else model.moves(float(since))
            )
        except ValueError:
            return bad("since must be a number (a seq for requests, epoch seconds for moves)")
    if method == "GET" and path == "/_lab/state":
        return json_reply(200, model.state())
    if method == "GET" and path == "/_lab/events":
        return json_reply(200, model.events())
    if method != "POST":
        return json_reply(404, NOT_FOUND)
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
            return json_reply(200, {"ok": True, "faults_queued": model.inject(body["status"], **kwargs)})
        if path == "/_lab/clear":
            model.clear_faults()
            return json_reply(200, {"ok": True, "faults_queued": 0})
        if path == "/_lab/settings":
            apply_settings(model, body)
            return json_reply(200, {"ok": True, "settings": model.settings()})
        if path in ("/_lab/revoke", "/_lab/restore"):
            if "name" not in body:
                return bad("name is required (a token name from the config's token_files)")
            try:
                (model.revoke if path == "/_lab/revoke" else model.restore)(body["name"])
            except KeyError as exc:
                return json_reply(404, {"id": "not_found", "message": exc.args[0]})
            return json_reply(200, {"ok": True, "tokens": model.state()["tokens"]})
        if path == "/_lab/droplets":
            # {"add": {"id", "name", "public_ipv4", "private_ipv4"}} or {"remove": id}
            if "add" in body and isinstance(body["add"], dict):
                d = body["add"]
                model.add_droplet(Droplet(d.get("id"), d.get("name"), d.get("public_ipv4"), d.get("private_ipv4")),
                                  d.get("public_ipv4"))
                return json_reply(200, {"ok": True, "added": d.get("id")})
            if "remove" in body and is_int(body["remove"]):
                try:
                    model.remove_droplet(body["remove"])
                except KeyError as exc:
                    return json_reply(404, {"id": "not_found", "message": exc.args[0]})
                return json_reply(200, {"ok": True, "removed": body["remove"]})
            return bad('give {"add": {"id", "name", "public_ipv4", "private_ipv4"}} or {"remove": droplet_id}')
        if path == "/_lab/holder":
            if "ip" not in body or "droplet_id" not in body:
                return bad("ip and droplet_id are required")
            droplet_id = body["droplet_id"]
            if droplet_id is not None and not is_int(droplet_id):
                return bad("droplet_id must be an integer or null")
            try:
                model.set_holder(body["ip"], droplet_id, run_hook=True)
            except KeyError:
                return json_reply(404, NOT_FOUND)
            except RuntimeError as exc:
                return json_reply(500, {"id": "server_error", "message": str(exc)})
            return json_reply(200, {"ok": True, "ip": body["ip"], "droplet_id": droplet_id})
    except (ValueError, TypeError) as exc:
        return bad(str(exc))
    return json_reply(404, NOT_FOUND)
