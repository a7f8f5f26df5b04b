"""The twins' edge: what the twins reach on "the internet", served from inside the lab.

One process, listening inside the twins' client namespace (the twins' /etc/hosts send the
mirror's and Docker's host names here), making its outbound requests from this machine's own
network namespace:

- http://<the Debian mirror host>/...   forwarded to that mirror (the same one this machine's apt
                                         uses); .deb files are cached on disk between runs. Only
                                         the mirror hosts named in the config are forwarded.
- https://<Docker's repository host>/...  the twins' stand-in Docker apt repository (built by
                                         tests/twins/dockerrepo.py), with a certificate from the
                                         lab's own CA, which the twins trust.

    python -m tests.twins.edge --config FILE.json   (started and stopped by tests/twins/twins.py)
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import ssl
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

CLONE_NEWNET = 0x40000000
CHUNK = 1 << 16


def bind_in_netns(netns: str, addr: str, port: int, handler) -> ThreadingHTTPServer:
    """A server whose socket lives in /run/netns/`netns`; this thread returns to its own namespace,
    so the threads that forward requests connect from this machine's namespace."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {netns}")
        try:
            return ThreadingHTTPServer((addr, port), handler)
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back")
    finally:
        os.close(own)
        os.close(target)


def make_handler(cfg: dict):
    mirrors = set(cfg["mirror_hosts"])
    repo_host = cfg["repo_host"]
    repo_root = Path(cfg["repo_root"]).resolve()
    cache = Path(cfg["deb_cache"])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
            sys.stderr.write(f"edge: {self.headers.get('Host', '-')} {format % args}\n")

        def do_HEAD(self) -> None:  # noqa: N802 - http.server's name
            self.do_GET(head=True)

        def do_GET(self, head: bool = False) -> None:  # noqa: N802 - http.server's name
            host = (self.headers.get("Host") or "").split(":")[0]
            if isinstance(self.server.socket, ssl.SSLSocket) and host == repo_host:
                return self._static(head)
            if host in mirrors and not isinstance(self.server.socket, ssl.SSLSocket):
                return self._forward(host, head)
            self.send_error(403, f"the twins' edge serves only {sorted(mirrors)} and {repo_host}")

        def _send_file(self, path: Path, head: bool) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(path.stat().st_size))
            self.end_headers()
            if not head:
                with open(path, "rb") as fh:
                    shutil.copyfileobj(fh, self.wfile, CHUNK)

        def _static(self, head: bool) -> None:
            path = (repo_root / unquote(self.path.split("?")[0]).lstrip("/")).resolve()
            if not path.is_relative_to(repo_root) or not path.is_file():
                return self.send_error(404)
            self._send_file(path, head)

        def _forward(self, host: str, head: bool) -> None:
            url = f"http://{host}{self.path}"
            cached = cache / hashlib.sha256(url.encode()).hexdigest()
            if self.path.endswith(".deb") and cached.exists():
                return self._send_file(cached, head)
            req = urllib.request.Request(url, method="HEAD" if head else "GET")
            for h in ("If-Modified-Since", "Range", "If-Range"):
                if self.headers.get(h):
                    req.add_header(h, self.headers[h])
            try:
                resp = urllib.request.urlopen(req, timeout=60)  # noqa: S310 - http mirror by design
            except urllib.error.HTTPError as exc:
                resp = exc
            except (urllib.error.URLError, OSError) as exc:
                return self.send_error(502, f"mirror {host} unreachable: {exc}")
            with resp:
                self.send_response(resp.status)
                for h in ("Content-Type", "Content-Length", "Last-Modified", "Content-Range", "ETag"):
                    if resp.headers.get(h):
                        self.send_header(h, resp.headers[h])
                self.end_headers()
                if head:
                    return
                if self.path.endswith(".deb") and resp.status == 200:
                    tmp = cached.with_suffix(f".{threading.get_ident()}.tmp")
                    with open(tmp, "wb") as fh:
                        shutil.copyfileobj(resp, fh, CHUNK)
                    tmp.replace(cached)
                    with open(cached, "rb") as fh:
                        shutil.copyfileobj(fh, self.wfile, CHUNK)
                else:
                    shutil.copyfileobj(resp, self.wfile, CHUNK)

    return Handler


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    cfg = json.loads(Path(ap.parse_args(argv).config).read_text())
    Path(cfg["deb_cache"]).mkdir(parents=True, exist_ok=True)
    handler = make_handler(cfg)
    plain = bind_in_netns(cfg["netns"], cfg["addr"], 80, handler)
    tls = bind_in_netns(cfg["netns"], cfg["addr"], 443, handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cfg["cert"], cfg["key"])
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    threading.Thread(target=tls.serve_forever, daemon=True).start()
    Path(cfg["ready_file"]).write_text("ready\n")
    plain.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
