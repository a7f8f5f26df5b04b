#!/usr/bin/python3
"""The twins' stand-in for the MiniTwit container: answers the health URL on the published ports.

Run by the stand-in `docker compose up` as a transient systemd unit. Every answer is 200 with
`X-Served-By: <hostname>`; `/latest` answers `{"latest": 0}` like a fresh MiniTwit. No database.
"""

import argparse
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = json.dumps({"latest": 0} if self.path.startswith("/latest") else {"ok": True}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", socket.gethostname())
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--service", required=True)
    ap.add_argument("--port", type=int, action="append", default=[])
    args = ap.parse_args()
    servers = [ThreadingHTTPServer(("0.0.0.0", p), Handler) for p in args.port]  # noqa: S104 - like a published port
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print(f"{args.service}: serving on {args.port}", flush=True)
    if servers:
        servers[0].serve_forever()
    else:
        threading.Event().wait()


if __name__ == "__main__":
    main()
