"""mt_observe: what the node scripts share so that the pair can be seen and trusted.

- root-only secret files (the failover token, the alert webhook URL): opened without following a
  symbolic link and checked on the open descriptor, so nobody can swap the file between a check
  and the read;
- metrics for node-exporter's textfile collector: counters persisted in the lib dir so that they
  survive script restarts, each `.prom` file replaced atomically so that a scrape never reads
  half a file;
- alert messages to a Slack- or Discord-compatible webhook, posted by a detached process with
  bounded retries so that an alert never delays a failover.

Shipped next to mt-failover and mt-deploy in /usr/libexec/minitwit-ha (infra/node.py SCRIPT_NAMES)
and imported from there: Python puts a script's own directory first on sys.path.
Python 3.10+ standard library only: this runs on the droplets, outside any virtualenv.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import socket
import stat
import sys
import syslog
import time
import urllib.parse
from collections.abc import Callable

DEFAULT_METRICS_DIR = "/var/lib/prometheus/node-exporter"  # Debian's textfile collector directory
FAILOVER_PROM = "minitwit_ha_failover.prom"
APP_PROM = "minitwit_ha_app.prom"
VRRP_VALUES = {"BACKUP": 0, "MASTER": 1, "FAULT": 2}  # anything else (STOP, UNKNOWN, STALE): 3
VRRP_OTHER = 3
ASSIGN_RESULTS = ("ok", "already", "gave_up", "refused", "aborted")
# Assign durations (POST to action completed): DigitalOcean says "a few seconds"; 60 s is the deadline.
ASSIGN_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
STORE_LOCK_WAIT_S = 1.0  # metrics are never worth delaying a failover for longer than this
MAX_SECRET_BYTES = 4096

Logger = Callable[..., None]  # called as log(event, **fields), like mt-failover's LOG.warn


# ---------------------------------------------------------------------------------------------
# Logging: one line per event; secrets registered with hide() never reach a line.


def _fmt_value(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if text == "" or any(c.isspace() or c in "\"'=\\" for c in text):
        return json.dumps(text)
    return text


def one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Log:
    """One line per event to stderr, syslog (tag minitwit-ha) and, when set, LOG_FILE.

    `prefix` names the script in the line when it is not mt-failover ("mt-deploy: ").
    """

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.node = socket.gethostname() or "?"
        self.log_file = ""
        self._secrets: list[str] = []
        self._syslog_open = False
        self._file_warned = False

    def hide(self, secret: str) -> None:
        """Belt and braces: whatever happens, this string never reaches a log line."""
        if secret:
            self._secrets.append(secret)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    def __call__(self, event: str, level: int = syslog.LOG_INFO, **fields: object) -> None:
        body = self.redact(self.prefix + event + "".join(f" {k}={_fmt_value(v)}" for k, v in fields.items()))
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
        line = f"{stamp} minitwit-ha[{self.node}] {body}"
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        try:  # glibc's syslog() fails silently when /dev/log is absent (the lab); never let it raise
            if not self._syslog_open:
                syslog.openlog("minitwit-ha", syslog.LOG_PID, syslog.LOG_DAEMON)
                self._syslog_open = True
            syslog.syslog(level, f"[{self.node}] {body}")
        except Exception:  # noqa: S110 - logging must never break a failover
            pass
        if self.log_file:
            try:
                with open(self.log_file, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError as e:
                if not self._file_warned:
                    self._file_warned = True
                    with contextlib.suppress(OSError, ValueError):
                        sys.stderr.write(f"{stamp} minitwit-ha[{self.node}] cannot write LOG_FILE "
                                         f"{self.log_file}: {e.strerror}\n")

    def warn(self, event: str, **fields: object) -> None:
        self(event, syslog.LOG_WARNING, **fields)

    def error(self, event: str, **fields: object) -> None:
        self(event, syslog.LOG_ERR, **fields)



# ---------------------------------------------------------------------------------------------
# Files.

LIBEXEC_SUFFIX = "/usr/libexec/minitwit-ha"


def install_root(script_path: str, name: str) -> str | None:
    """The root a script is installed under, `<root>/usr/libexec/minitwit-ha/<name>`: "" on a
    droplet, the node's prefix in the lab; None when it runs from elsewhere (a checkout).

    sudo resets the environment, so a script run through `sudo -n` finds its files from its own
    path (which the sudoers rule names exactly), not from a variable."""
    suffix = f"{LIBEXEC_SUFFIX}/{name}"
    path = os.path.abspath(script_path)
    return path[: -len(suffix)] if path.endswith(suffix) else None



def write_atomically(path: str, text: str, mode: int = 0o644, fsync: bool = True) -> None:
    """tmp + rename in the same directory: readers see the old or the new file, never half.

    The tmp name starts with a dot and does not end in `.prom`, so node-exporter never reads it.
    """
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class SecretFileError(Exception):
    """The secret file cannot be trusted or read; the message names the file and the fix."""


def read_secret_file(path: str, what: str, allow_empty: bool = False) -> str:
    """The one-line secret in `path`: a regular file, not a symlink, owned by root, mode 0600 or stricter.

    `what` names the secret in messages ("token file", "alert webhook file"); the content never does.
    Owner: root, or the user running this (tests run unprivileged; on a node that user is root).
    """
    fix = f"it must be a regular file owned by root with mode 0600 (chown root:root {path}; chmod 600 {path})"
    try:
        # O_NOFOLLOW: a symlink planted in place of the file is refused, not followed. O_NONBLOCK: a
        # FIFO must not hang the caller before fstat() refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretFileError(f"{what} {path} not found: {fix}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SecretFileError(f"{what} {path} is a symbolic link, which is not followed: {fix}") from None
        raise SecretFileError(f"{what} {path} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)  # the file actually opened, not whatever the path names a moment later
        if not stat.S_ISREG(st.st_mode):
            raise SecretFileError(f"{what} {path} is not a regular file: {fix}")
        if st.st_uid not in (0, os.geteuid()):
            raise SecretFileError(f"{what} {path} is owned by uid {st.st_uid}, not root: {fix}")
        if st.st_mode & 0o177:
            raise SecretFileError(f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: it must not be "
                                  f"group/world accessible or executable (chmod 600 {path})")
        data = os.read(fd, MAX_SECRET_BYTES)
    except OSError as e:
        raise SecretFileError(f"{what} {path} is unreadable: {e.strerror}") from None
    finally:
        os.close(fd)
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SecretFileError(f"{what} {path} is unreadable: not UTF-8 text") from None
    if not value and not allow_empty:
        raise SecretFileError(f"{what} {path} is empty: write the value on one line")
    if "\n" in value or "\r" in value:
        raise SecretFileError(f"{what} {path} has more than one line: it must hold only the value")
    if not value.isprintable() or any(c.isspace() for c in value):
        raise SecretFileError(f"{what} {path} holds spaces or control characters: it must hold only the value")
    return value


# ---------------------------------------------------------------------------------------------
# Metrics: one persisted JSON document per node, rendered to a textfile-collector file.


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) and not float(value).is_integer() else str(int(value))


def vrrp_value(state: str) -> int:
    return VRRP_VALUES.get(state, VRRP_OTHER)


def empty_values() -> dict:
    return {
        "vrrp_state": None,
        "become_master_total": 0,
        "assign_total": dict.fromkeys(ASSIGN_RESULTS, 0),
        "assign_duration": {"buckets": [0] * len(ASSIGN_BUCKETS), "sum": 0.0, "count": 0},
        "reconcile_corrections_total": 0,
        "alerts_total": {"sent": 0, "failed": 0},
        "reserved_ip_held": None,
        "health_ok": None,
        "token": None,  # the last token check: {"ok", "result", "detail", "time", "ok_time"}
    }


def observe_assign(values: dict, result: str, seconds: float | None) -> None:
    values["assign_total"][result] = values["assign_total"].get(result, 0) + 1
    if seconds is not None:
        hist = values["assign_duration"]
        hist["sum"] += seconds
        hist["count"] += 1
        for i, bound in enumerate(ASSIGN_BUCKETS):
            if seconds <= bound:
                hist["buckets"][i] += 1  # cumulative, as Prometheus exposes them


def render_failover_metrics(values: dict, node: str) -> str:
    n = f'node="{_label(node)}"'
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        out.append(f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n")
        out.extend(f"{name}{{{labels}}} {_num(value)}\n" for labels, value in samples)

    def gauge(name: str, help_text: str, value: float | None) -> None:
        if value is not None:  # unknown: no sample rather than a made-up one
            metric(name, "gauge", help_text, [(n, value)])

    state = values["vrrp_state"]
    gauge("minitwit_ha_vrrp_state", "VRRP state of this node: 0 backup, 1 master, 2 fault, 3 stopped or "
          "unknown.", None if state is None else vrrp_value(state))
    metric("minitwit_ha_become_master_total", "counter", "Transitions of this node to MASTER.",
           [(n, values["become_master_total"])])
    metric("minitwit_ha_assign_total", "counter", "Reserved-IP assign runs by result (ok: the IP moved "
           "here; already: it was here).", [(f'{n},result="{r}"', c) for r, c in values["assign_total"].items()])
    hist = values["assign_duration"]
    samples = [(f'{n},le="{_num(b)}"', c) for b, c in zip(ASSIGN_BUCKETS, hist["buckets"], strict=True)]
    samples.append((f'{n},le="+Inf"', hist["count"]))
    out.append("# HELP minitwit_ha_assign_duration_seconds Time from the assign POST to the action "
               "completed.\n# TYPE minitwit_ha_assign_duration_seconds histogram\n")
    out.extend(f"minitwit_ha_assign_duration_seconds_bucket{{{lb}}} {_num(c)}\n" for lb, c in samples)
    out.append(f"minitwit_ha_assign_duration_seconds_sum{{{n}}} {_num(round(hist['sum'], 6))}\n")
    out.append(f"minitwit_ha_assign_duration_seconds_count{{{n}}} {hist['count']}\n")
    metric("minitwit_ha_reconcile_corrections_total", "counter", "Times the reconciler moved the reserved "
           "IP back to this MASTER.", [(n, values["reconcile_corrections_total"])])
    metric("minitwit_ha_alerts_total", "counter", "Alert messages posted to the webhook by result.",
           [(f'{n},result="{r}"', c) for r, c in values["alerts_total"].items()])
    gauge("minitwit_ha_reserved_ip_held", "1 when the API says this droplet holds the reserved IP.",
          values["reserved_ip_held"])
    gauge("minitwit_ha_health_ok", "1 when the health watcher reports this node healthy (track file 0).",
          values["health_ok"])
    token = values["token"] or {}
    if token.get("ok") is not None:
        gauge("minitwit_ha_token_ok", "1 when the last definite check of the failover token against the "
              "API succeeded.", int(token["ok"]))
    if token.get("time"):
        gauge("minitwit_ha_token_check_timestamp_seconds", "When the token was last checked (any result).",
              round(token["time"], 3))
    return "".join(out)


def render_version_metric(node: str, version: str) -> str:
    return ("# HELP minitwit_ha_app_version_info The app version this node's compose runs; always 1.\n"
            "# TYPE minitwit_ha_app_version_info gauge\n"
            f'minitwit_ha_app_version_info{{node="{_label(node)}",version="{_label(version)}"}} 1\n')


def write_textfile(metrics_dir: str, name: str, text: str) -> None:
    """One `.prom` file for node-exporter, replaced atomically (no fsync: it is rewritten often)."""
    write_atomically(os.path.join(metrics_dir, name), text, 0o644, fsync=False)


class MetricsStore:
    """The persisted values behind FAILOVER_PROM: every writer (notify, reconciler, assign) updates
    them under one flock, so concurrent processes never lose an increment, and re-renders the file."""

    def __init__(self, lib_dir: str, metrics_dir: str, node: str, warn: Logger):
        self.lib_dir, self.metrics_dir, self.node, self.warn = lib_dir, metrics_dir, node, warn
        self.state_file = os.path.join(lib_dir, "metrics.json")
        self._problem = ""

    def read(self) -> dict:
        values = empty_values()
        try:
            with open(self.state_file, encoding="utf-8") as f:
                loaded = json.load(f)
        except (OSError, ValueError):
            return values
        if isinstance(loaded, dict):
            for key, default in values.items():
                if isinstance(default, dict) and isinstance(loaded.get(key), dict):
                    default.update(loaded[key])
                elif key in loaded:
                    values[key] = loaded[key]
        return values

    def update(self, change: Callable[[dict], None], force: bool = False) -> dict | None:
        """Apply `change`, persist, re-render when something changed. Never raises: metrics must never
        break a failover. Returns the values after the change (None when the store is unusable)."""
        try:
            os.makedirs(self.lib_dir, mode=0o755, exist_ok=True)
            fd = os.open(self.state_file + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                deadline = time.monotonic() + STORE_LOCK_WAIT_S
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise OSError(errno.EWOULDBLOCK, "metrics lock busy", self.state_file) from None
                        time.sleep(0.01)
                values = self.read()
                before = json.dumps(values, sort_keys=True)
                change(values)
                after = json.dumps(values, sort_keys=True)
                if after != before:
                    write_atomically(self.state_file, after + "\n", 0o644, fsync=False)
                prom = os.path.join(self.metrics_dir, FAILOVER_PROM) if self.metrics_dir else ""
                if prom and (force or after != before or not os.path.exists(prom)):
                    write_textfile(self.metrics_dir, FAILOVER_PROM, render_failover_metrics(values, self.node))
            finally:
                os.close(fd)  # releases the flock
        except (OSError, ValueError, TypeError, KeyError) as e:
            problem = f"{getattr(e, 'strerror', None) or e} ({getattr(e, 'filename', None) or self.state_file})"
            if problem != self._problem:  # once per kind of problem: the reconciler calls this every pass
                self.warn("cannot update metrics", error=problem, metrics_dir=self.metrics_dir or "off")
                self._problem = problem
            return None
        self._problem = ""
        return values


# ---------------------------------------------------------------------------------------------
# Alerts: Slack/Discord-compatible webhooks, posted in the background with bounded retries.


def check_webhook_url(url: str, allow_http: bool) -> str:
    """'' when the URL may be used; otherwise why not (never quoting the URL: it is a secret)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "https" or (parsed.scheme == "http" and allow_http):
        return "" if parsed.hostname else "it has no host name"
    if parsed.scheme == "http":
        return "it is plain http: only https is allowed (ALLOW_INSECURE_HTTP=1 is for the lab only)"
    return "it is not an https URL"


def webhook_payload(url: str, text: str) -> dict[str, str]:
    """Discord reads `content`; Slack, Mattermost and Rocket.Chat read `text`."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    discord = host in ("discord.com", "discordapp.com") or host.endswith((".discord.com", ".discordapp.com"))
    return {"content": text} if discord else {"text": text}


def post_webhook(url: str, text: str, timeout: float) -> tuple[bool, bool, str]:
    """One POST: (delivered, worth retrying, what happened). No proxies, no redirects."""
    import http.client
    import urllib.error
    import urllib.request

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())
    body = json.dumps(webhook_payload(url, text)).encode()
    req = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "minitwit-ha-alert/1"})
    try:
        with opener.open(req, timeout=timeout) as resp:
            return True, False, f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        e.close()
        return False, e.code == 429 or e.code >= 500, f"HTTP {e.code}"
    except (OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", e)
        return False, True, f"{type(reason).__name__}: {getattr(reason, 'strerror', None) or reason}"


def deliver(url: str, text: str, attempts: int, retry_s: float, timeout: float) -> tuple[bool, int, str]:
    """Up to `attempts` POSTs, waiting retry_s, 2*retry_s, ... between them: (delivered, tries, last)."""
    last = ""
    for attempt in range(1, attempts + 1):
        ok, again, last = post_webhook(url, text, timeout)
        if ok or not again or attempt == attempts:
            return ok, attempt, last
        time.sleep(retry_s * 2 ** (attempt - 1))
    return False, attempts, last


def in_background(work: Callable[[], None]) -> bool:
    """Run `work` in a detached grandchild (own session, stdio on /dev/null) and return at once.

    The caller (a keepalived notify, the reconciler) never waits for it and never collects a zombie:
    the child exits at once and the grandchild is adopted by init. False when fork() failed.
    """
    try:
        pid = os.fork()
    except OSError:
        return False
    if pid:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return True
    try:  # the child: start the grandchild and leave
        os.setsid()
        if os.fork():
            os._exit(0)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        work()
    except BaseException:  # noqa: BLE001, S110 - the detached worker must exit, never return into the caller
        pass
    finally:
        os._exit(0)


def finite_positive(text: str, default: float) -> float:
    try:
        value = float(text)
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default
