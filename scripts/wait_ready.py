#!/usr/bin/env python3
"""Wait (bounded) until a URL answers 2xx: the stack's final readiness gate.

Run by `pulumi up` on the machine running it (a laptop or CI), after both nodes are provisioned:
the app answering on the reserved IP proves the whole chain, keepalived electing a MASTER and
its notify script assigning the reserved IP through the API. Standard library only.

    wait_ready.py --url http://203.0.113.10/latest --timeout 300
Exit 0 when ready; 1 with the last error when the timeout passes; 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit


def probe(url: str, timeout: float) -> str | None:
    """None when the URL answered 2xx, else a short reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True, help="URL that must answer 2xx")
    ap.add_argument("--timeout", type=float, default=300, help="give up after this many seconds (default 300)")
    ap.add_argument("--interval", type=float, default=3, help="seconds between attempts (default 3)")
    args = ap.parse_args(argv)
    if urlsplit(args.url).scheme not in ("http", "https"):
        print(f"wait_ready: --url must be http(s), got {args.url!r}", file=sys.stderr)
        return 2
    start = time.monotonic()
    last = "no attempt made"
    while True:
        reason = probe(args.url, timeout=min(5.0, args.interval + 2))
        elapsed = time.monotonic() - start
        if reason is None:
            print(f"wait_ready: {args.url} answered after {elapsed:.0f}s")
            return 0
        if reason != last:
            print(f"wait_ready: {args.url} not ready yet ({reason}), {elapsed:.0f}s", file=sys.stderr)
            last = reason
        if elapsed + args.interval > args.timeout:
            print(f"wait_ready: {args.url} did not answer 2xx within {args.timeout:.0f}s (last: {last}). "
                  "Check: keepalived on both nodes (`journalctl -u keepalived -t minitwit-ha`), "
                  "`/usr/libexec/minitwit-ha/mt-failover status`, and the app (`docker compose ps`).",
                  file=sys.stderr)
            return 1
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
