"""HAProxy on each node: the public HTTP port, the local app first, the peer's app over the VPC.

`render_haproxy_cfg(facts)` is pure, like the other renderers in `infra.node`: one file per node
from the same `NodeFacts` as keepalived.conf. Why it looks the way it does:

- An app crash costs a client nothing. A connection the app refuses never reached it, so HAProxy
  resends that request to the peer's app, whatever its method. A request that did reach an app
  (empty response, time-out) is resent only when it is a GET or HEAD: a POST the dead app may
  already have written is never played twice. A POST an app holds at the instant it dies can
  fail: it may have been written, and no proxy can tell (only app-level idempotency could).
- HAProxy waits min(`timeout connect`, 1 s) before retrying a refused connection unless it
  balances round-robin over 2+ active servers (HAProxy 2.6, `back_handle_st_cer`): `timeout
  connect` is 100 ms, so the retry path costs ~0.1 s, inside the course client's 0.3 s, until the
  checks mark the dead app DOWN (~0.4 s) and requests go straight to the other one.
- The local server is this node's VPC address, not 127.0.0.1: Docker publishes a port on
  127.0.0.1 through docker-proxy, which accepts a connection while the container's app is not yet
  listening and then closes it (an "empty response", not safely retryable for a POST). The VPC
  address goes through Docker's DNAT, so a missing app refuses the connection (safely retried).
- keepalived tracks `monitor-uri` on a loopback-only frontend: 200 while HAProxy runs and at least
  one app server is up, 503 otherwise. It never touches the database, so a database outage cannot
  fault both nodes; an app crash does not move the reserved IP either (the peer's app serves).
- The stats socket (root only, admin level) lets a rollout `set server app/local state drain`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

SERVE_MODES = ("active-standby", "both")
MONITOR_PORT = 8404      # loopback only: keepalived's view of "this node can serve"
METRICS_PORT = 8405      # HAProxy's Prometheus exporter: admin CIDRs and the peer only
MONITOR_PATH = "/minitwit-ha/serving"
METRICS_PATH = "/metrics"
BACKEND = "app"          # backend and server names are the admin socket's contract (rollouts)
LOCAL_SERVER = "local"
PEER_SERVER = "peer"
WORKER_SERVER = "worker-{n}"  # n = 1, 2, ...: the worker's index in the stack output `workers`


def worker_server(index: int) -> str:
    """HAProxy's server name for the worker at `index` (0-based) in the stack output `workers`."""
    return WORKER_SERVER.format(n=index + 1)


@dataclass(frozen=True)
class HaproxyFacts:
    """What HAProxy needs beyond the node's addresses (settings: appPort, appBackendPort, serve)."""

    public_port: int = 80
    backend_port: int = 5000
    serve: str = "active-standby"
    check_path: str = ""               # empty: TCP connect checks (no database involved)
    monitor_port: int = MONITOR_PORT
    metrics_port: int = METRICS_PORT
    user: str = "haproxy"              # Debian's package user; empty: stay the user that started it
    workers: tuple[str, ...] = ()      # app workers' private IPv4s (appWorkers), in output order

    def __post_init__(self) -> None:
        if self.serve not in SERVE_MODES:
            raise ValueError(f"serve={self.serve!r}: use one of {', '.join(SERVE_MODES)}")

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self.monitor_port}{MONITOR_PATH}"


def _servers(private_ip: str, peer_ip: str, h: HaproxyFacts) -> str:
    check = "check inter 200ms fall 2 rise 2"
    servers = [(LOCAL_SERVER, private_ip), (PEER_SERVER, peer_ip)]
    servers += [(worker_server(i), ip) for i, ip in enumerate(h.workers)]
    return "".join(f"    server {name} {ip}:{h.backend_port} {check}\n" for name, ip in servers)


def render_haproxy_cfg(facts) -> str:  # facts: infra.node.NodeFacts (import cycle otherwise)
    h: HaproxyFacts = facts.haproxy
    ipaddress.ip_address(facts.private_ip)  # fail loudly on garbage rather than render it
    ipaddress.ip_address(facts.peer_private_ip)
    trusted = " ".join([*facts.admin_cidrs, f"{facts.peer_private_ip}/32", "127.0.0.1/32"])
    user = f"    user {h.user}\n    group {h.user}\n" if h.user else ""
    for ip in h.workers:
        ipaddress.ip_address(ip)
    if h.workers:
        balance = (f"    # {len(h.workers)} app worker(s) (appWorkers): each request to the app server with the fewest\n"
                   "    # requests in progress, over both nodes' apps and every worker, whatever `serve` says:\n"
                   "    # the peer's app is one more server over the VPC, like a worker, and a slow server gets less.\n"
                   "    balance leastconn\n")
    elif h.serve == "active-standby":
        balance = ("    # active-standby: every request to the first server (the local app, no maxconn); the peer's\n"
                   "    # app only while the local one is DOWN, and for the retry of a request the local app\n"
                   "    # refused (a retry avoids the server that failed). Not `backup`: a backup server is not\n"
                   "    # eligible for that retry while the local app still counts as UP, so until the checks\n"
                   "    # mark it DOWN every retry would go back to the dead app.\n"
                   "    balance first\n")
    else:
        balance = ("    # both: each request to the app with fewer requests in progress, so the standby's app\n"
                   "    # serves too and a slow app gets less.\n"
                   "    balance leastconn\n")
    check = ""
    if h.check_path:
        check = (f"    # Liveness: the app answers {h.check_path} with 2xx/3xx (the path must not need the database,\n"
                 "    # or a database outage marks both apps DOWN and faults both nodes).\n"
                 f"    option httpchk GET {h.check_path}\n")
    from infra.node import _header  # infra.node imports this module for render_node_files

    return f"""{_header(facts, 'HAProxy configuration')}#
# Debian's haproxy.service runs master-worker (-Ws): `systemctl reload haproxy` re-reads this
# file and hands the listening sockets to the new worker, so a reload drops no connection.

global
    log /dev/log local0 notice
{user}    # Root only, admin level: drain or disable a server during a rollout
    # (`echo "set server {BACKEND}/{LOCAL_SERVER} state drain" | socat stdio {facts.paths.haproxy_admin_socket}`).
    stats socket {facts.paths.haproxy_admin_socket} mode 660 level admin user root group root
    # An old worker keeps serving its requests after a reload for at most this long.
    hard-stop-after 30s

defaults
    mode http
    log global
    option httplog
    option dontlognull
    # Clients see the real address in X-Forwarded-For; the apps log it.
    option forwardfor
    # A client gets a 408 when it sends no complete request headers within 10 s.
    timeout http-request 10s
    # A client that stops reading or sending mid-request is cut off after 30 s.
    timeout client 30s
    # A kept-alive client connection idle for 10 s is closed (the client reconnects on its next request).
    timeout http-keep-alive 10s
    # A connection to an app that is not accepted within 100 ms (a dead peer drops SYNs) is
    # retried at once on the other app. Also the pause before a retry: min(connect, 1 s).
    timeout connect 100ms
    # An app that has not answered within 5 s: a GET is resent to the other app, a POST gets a 504.
    timeout server 5s
    # A request waits at most 1 s for a free server slot before a 503.
    timeout queue 1s
    # Health checks: an app that has not answered a check within 500 ms failed it.
    timeout check 500ms

frontend public
    # The public HTTP port (appPort): the reserved IP's traffic lands here on the active node.
    bind :{h.public_port}
    default_backend {BACKEND}

backend {BACKEND}
{balance}    # A fresh server connection per request: a request never goes out on a kept-alive
    # connection the app closed meanwhile (that failure would not be safe to retry for a POST).
    option http-server-close
    # Up to 3 more attempts behind one request: the client sees only the final answer.
    retries 3
    # Every retry avoids the app that just failed: the retry of a refused request reaches the peer.
    option redispatch 1
    # What is retried: a refused or timed-out connection (the request never reached an app) always;
    # an empty answer or a server time-out only for GET/HEAD (below). A retry costs ~0.1 s.
    retry-on conn-failure empty-response response-timeout
    # Never resend a POST (or any write) that an app may already have processed: no duplicate
    # registrations, follows or messages. It is resent only when its connection was refused.
    http-request disable-l7-retry unless METH_GET
{check}    # Each server: a TCP connect every 200 ms, DOWN after 2 failed checks (~0.4 s; until then a
    # refused request costs ~0.1 s, not an error), UP again after 2 good ones. Not `observe
    # layer4 ... mark-down`: one connect time-out under load would mark the last server DOWN too.
    # No on-marked-down shutdown-sessions: requests already at a slow app may still finish.
{_servers(facts.private_ip, facts.peer_private_ip, h)}
frontend monitor
    # keepalived's check (mt-healthwatch, mt-health serve), loopback only: 200 while this node can
    # serve (HAProxy up, at least one app server UP), 503 otherwise. No database involved.
    bind 127.0.0.1:{h.monitor_port}
    monitor-uri {MONITOR_PATH}
    monitor fail if {{ nbsrv({BACKEND}) lt 1 }}
    http-request set-log-level silent  # polled every 0.2 s / every scrape: not worth a log line

frontend metrics
    # HAProxy's Prometheus exporter; nftables admits only the admin CIDRs and the peer, and so does this.
    bind :{h.metrics_port}
    http-request deny unless {{ src {trusted} }}
    http-request use-service prometheus-exporter if {{ path {METRICS_PATH} }}
    http-request set-log-level silent  # polled every 0.2 s / every scrape: not worth a log line
"""
