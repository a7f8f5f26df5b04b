"""A fake DigitalOcean API for the lab: reserved IPs, their actions, droplet metadata, faults.

The lab has no DigitalOcean account, so `mt-failover` and the lab orchestrator talk to this
server instead. It answers the endpoints they use with the real JSON shapes, status codes and
rate-limit headers, and it plays DigitalOcean's edge: when an assign completes it runs a hook
(a Python callable or an argv template) that re-routes the reserved IP to the chosen droplet.

    d1 = Droplet(id=101, name="primary", public_ipv4="192.0.2.11", private_ipv4="198.51.100.11")
    with FakeDO(token=token, droplets=[d1], reserved_ips={"203.0.113.10": None}) as fake:
        fake.url              # http://127.0.0.1:PORT
        fake.inject(500)      # the next assign answers 500
        fake.apply_preset("realistic")  # 0.3 s per API answer, assigns complete after 5 s
        fake.requests()       # the request log (token names, never values)
        fake.moves()          # every completed assign that changed the holder

The pieces: `fakedo_model` (state, actions, limits, tokens, logs; no HTTP), `fakedo_http`
(routes and answers), this module (the server's lifecycle and the command line).

Endpoints (all JSON unless noted):
  /v2/reserved_ips, /v2/reserved_ips/{ip}, POST+GET /v2/reserved_ips/{ip}/actions,
  /v2/reserved_ips/{ip}/actions/{id}                  bearer token, rate limited, latency
  /metadata/v1/...  /metadata/v1.json                 no auth, keyed by the source IP
  GET  /_lab/state|requests?since=SEQ|moves?since=EPOCH|events
  POST /_lab/inject|clear|settings|holder|revoke|restore
                                                      no auth, not rate limited, no faults

Run it in a lab namespace with `python -m tests.lab.fakedo --config FILE.json`; tokens are read
from the files the config names (`token_file`, `token_files`), never from the command line.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.lab.fakedo_http import SETTINGS_KEYS, Handler, Server, apply_settings
from tests.lab.fakedo_model import (
    DEFAULT_TOKEN_NAME,
    LOG,
    PRESETS,
    RATE_LIMIT_PER_HOUR,
    RATE_LIMIT_PER_MIN,
    Droplet,
    Hook,
    Model,
    check_addr,
)

__all__ = ["PRESETS", "Droplet", "FakeDO", "from_config", "main"]


class FakeDO(Model):
    """The fake API server: the model plus an HTTP server on `listen`. Thread-safe."""

    def __init__(
        self,
        token: str | None = None,
        droplets: Sequence[Droplet] = (),
        reserved_ips: dict[str, int | None] | None = None,
        region: str = "fra1",
        metadata_by_source: dict[str, int] | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        on_assign: Hook | None = None,
        on_unassign: Hook | None = None,
        action_delay_s: float = 0.0,
        latency_s: float = 0.0,
        rate_limit_per_min: int = RATE_LIMIT_PER_MIN,
        log_path: str | os.PathLike[str] | None = None,
        *,
        tokens: Mapping[str, str] | None = None,
        rate_limit_per_hour: int = RATE_LIMIT_PER_HOUR,
        rate_window_s: float = 60.0,
        rate_hour_window_s: float = 3600.0,
    ) -> None:
        """`token` is the "default" token; `tokens` adds named ones (e.g. one per node) that
        can be revoked one by one."""
        named = dict(tokens or {})
        if token is not None:
            if DEFAULT_TOKEN_NAME in named:
                raise ValueError(f"token and tokens[{DEFAULT_TOKEN_NAME!r}] both name the default token")
            named = {DEFAULT_TOKEN_NAME: token, **named}
        super().__init__(
            named,
            droplets,
            reserved_ips,
            region,
            metadata_by_source,
            on_assign,
            on_unassign,
            action_delay_s,
            latency_s,
            rate_limit_per_min,
            rate_limit_per_hour,
            log_path,
            rate_window_s=rate_window_s,
            rate_hour_window_s=rate_hour_window_s,
        )
        host, port = listen
        self._listen = (check_addr(host, "listen", allow_unspecified=True), int(port))
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FakeDO:
        if self._server is not None:
            return self
        if self.stopping.is_set():
            raise RuntimeError("a stopped FakeDO cannot be restarted; create a new one")
        self.open_log()
        server = Server(self._listen, Handler)
        server.model = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="fakedo", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, release held ("timeout") requests, cancel pending actions. Idempotent."""
        if not self.close():
            return
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.close_log()

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


# -- command line ------------------------------------------------------------------------------

# What the lab may write. Settings (SETTINGS_KEYS: preset, latency_s, action_delay_s,
# rate_limit_per_min, rate_limit_per_hour) mean the same here as in POST /_lab/settings.
CONFIG_KEYS = {
    "listen",
    "token_file",
    "token_files",
    "droplets",
    "reserved_ips",
    "region",
    "metadata_by_source",
    "on_assign",
    "on_unassign",
    "log_path",
    "ready_file",
    *SETTINGS_KEYS,
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


def _read_tokens(config: dict[str, Any]) -> dict[str, str]:
    files = config.get("token_files", {})
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise ValueError('token_files must map token names to file paths, e.g. {"primary": "/path"}')
    if "token_file" in config:
        if DEFAULT_TOKEN_NAME in files:
            raise ValueError(f"token_file and token_files[{DEFAULT_TOKEN_NAME!r}] both name the default token")
        files = {DEFAULT_TOKEN_NAME: config["token_file"], **files}
    if not files:
        raise ValueError("token_file or token_files is required")
    return {name: _read_token(path) for name, path in files.items()}


def from_config(config: dict[str, Any]) -> tuple[FakeDO, Path | None]:
    """Build a FakeDO from the CLI's JSON config. Returns it and the ready_file path (if any)."""
    if "token" in config or "tokens" in config:
        raise ValueError("the config must not hold tokens; put each in a file named by token_file or token_files")
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}; valid: {sorted(CONFIG_KEYS)}")
    droplets = [Droplet(**d) for d in config.get("droplets", [])]
    reserved = config.get("reserved_ips", {})
    if isinstance(reserved, list):
        reserved = dict.fromkeys(reserved)
    fake = FakeDO(
        tokens=_read_tokens(config),
        droplets=droplets,
        reserved_ips=reserved,
        region=config.get("region", "fra1"),
        metadata_by_source=config.get("metadata_by_source", {}),
        listen=_parse_listen(config.get("listen", "127.0.0.1:0")),
        on_assign=config.get("on_assign"),
        on_unassign=config.get("on_unassign"),
        log_path=config.get("log_path"),
    )
    apply_settings(fake, {key: config[key] for key in SETTINGS_KEYS if key in config})
    ready = config.get("ready_file")
    return fake, Path(ready) if ready else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.lab.fakedo",
        description="Fake DigitalOcean API for the lab. Tokens are read from the files the config names.",
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
