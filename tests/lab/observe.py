"""What an operator sees of the lab's pair: node-exporter on each node, a real Prometheus and a
webhook sink in `client`, as issue #13 asks.

    client (admin address 192.0.2.200)                 primary / standby
      Prometheus :9090  --scrapes every 1 s-->     node-exporter :9100 (the scripts' .prom files)
                                                   HAProxy's exporter :8405
      webhook sink :9095  <--alerts (POST)------   mt-failover (ALERT_WEBHOOK_FILE, 0600)

Prometheus runs as Debian's `prometheus` user, and only that user's connections leave `client`
from the admin address (a uid routing rule): the scrapes pass the nodes' nftables as an operator's
Prometheus would, while everything else in `client` stays an internet client. The sink's URL has
a random path, like a Slack or Discord webhook: it is a credential, kept in 0600 files and checked
by the lab's secrets audit. `python -m tests.lab.observe sink ...` runs the sink.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import secrets
import shutil
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from infra.haproxy import METRICS_PORT
from infra.node import NODE_EXPORTER_PORT

PROM_PORT = 9090
SINK_PORT = 9095
SCRAPE_S = 1.0
EXPORTER_USER = "prometheus"  # Debian's prometheus and prometheus-node-exporter run as this user
UID_ROUTE_TABLE = 100         # client: the prometheus user's routes (source: the admin address)
ALERT_RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "alerts.yml"
MASTER_ALERT = "became MASTER"
TOKEN_ALERT = "failover token failed its check"


def exporter_user() -> str:
    """Debian's `prometheus` user when the package made it, else `nobody`: never root."""
    try:
        pwd.getpwnam(EXPORTER_USER)
    except KeyError:
        return "nobody"
    return EXPORTER_USER


def prometheus_config(hosts: dict[str, str], rules: str) -> dict:
    """prometheus.yml (JSON is YAML): both nodes' node-exporter and HAProxy exporter every second,
    the shipped alert rules evaluated every second. `node` labels the target, so HAProxy's series
    (which carry none) say whose they are; the textfile series carry their own (honor_labels)."""
    def job(name: str, port: int) -> dict:
        return {"job_name": name, "honor_labels": True,
                "static_configs": [{"targets": [f"{addr}:{port}"], "labels": {"node": node}}
                                   for node, addr in sorted(hosts.items())]}
    return {
        "global": {"scrape_interval": f"{SCRAPE_S:g}s", "scrape_timeout": "900ms",
                   "evaluation_interval": f"{SCRAPE_S:g}s"},
        "rule_files": [rules],
        "scrape_configs": [job("node", NODE_EXPORTER_PORT), job("haproxy", METRICS_PORT)],
    }


def node_exporter_argv(metrics_dir: str) -> list[str]:
    """Debian's binary with the textfile collector on the node's METRICS_DIR; the other collectors
    off but two cheap ones (the lab scrapes every second on a shared machine)."""
    return ["prometheus-node-exporter", f"--web.listen-address=:{NODE_EXPORTER_PORT}", "--collector.disable-defaults",
            "--collector.textfile", f"--collector.textfile.directory={metrics_dir}", "--collector.loadavg",
            "--collector.time", "--log.level=warn"]


def new_webhook_path() -> str:
    return f"/hooks/lab/{secrets.token_hex(16)}"


def prepare_dir(path: Path, owner: str) -> None:
    path.mkdir(mode=0o755, parents=True, exist_ok=True)
    entry = pwd.getpwnam(owner)
    shutil.chown(path, entry.pw_uid, entry.pw_gid)


# ---------------------------------------------------------------------------------------------
# Reading what was observed.


def read_alerts(path: Path, since: float = 0.0, until: float | None = None) -> list[dict]:
    """Messages the sink received in [since, until]: [{"t", "text"}], oldest first."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry["t"] >= since and (until is None or entry["t"] <= until):
            out.append(entry)
    return out


def counter_increase(name: str, matcher: str, since: float) -> str:
    """PromQL for how much a counter rose since `since` (epoch): the difference of two samples per
    series, summed. Exact, where increase() extrapolates the first and last sample to the window's
    edges (and so reports 1.2 for one move); the counters survive restarts (metrics.json), so a
    difference never meets a reset."""
    return f"sum({name}{{{matcher}}} - {name}{{{matcher}}} @ {since:.3f})"


# ---------------------------------------------------------------------------------------------
# The sink.


def run_sink(listen: str, port: int, path_file: Path, out: Path) -> None:
    """Record every POST to the secret path as {"t", "text"} (Slack's `text` or Discord's `content`);
    anything else gets 404. Never logs a request line: the path is the credential."""
    secret_path = path_file.read_text().strip()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(min(int(self.headers.get("Content-Length") or 0), 1 << 16))
            if self.path != secret_path:
                self.send_response(404)
            else:
                try:
                    doc = json.loads(body)
                    text = str(doc.get("text") or doc.get("content") or "")
                except (ValueError, AttributeError):
                    text = ""
                with open(out, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"t": time.time(), "text": text}) + "\n")
                self.send_response(200 if text else 400)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((listen, port), Handler)
    (out.parent / "sink.ready").touch()
    server.serve_forever()


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.lab.observe")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sink = sub.add_parser("sink", help="the lab's webhook sink")
    sink.add_argument("--listen", required=True)
    sink.add_argument("--port", type=int, default=SINK_PORT)
    sink.add_argument("--path-file", type=Path, required=True, help="0600 file with the secret URL path")
    sink.add_argument("--out", type=Path, required=True, help="JSONL file of received messages")
    args = ap.parse_args(argv)
    os.umask(0o022)
    run_sink(args.listen, args.port, args.path_file, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
