"""The remote provisioning steps: what each one sends and runs on a node. Pure functions.

Every step receives its files as one deterministic tar.gz archive (base64) on stdin and extracts
it as root, so owner and mode are right from the first byte. Secrets are the exception: each
goes alone on stdin to `install -m 0600 /dev/stdin PATH`. Nothing secret ever appears in a
command line or an SSH environment variable (sshd would also drop those without AcceptEnv).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import shlex
import tarfile

from infra.haproxy import BACKEND, LOCAL_SERVER, PEER_SERVER
from infra.node import HANDOVER_UNIT, NodeFile, NodePaths

# keepalived 2.2.7 (Debian 12) kills itself with SIGTERM after a *clean* `-t` run (exit 143; fixed
# in 2.2.8, acassen/keepalived#2587), and it reports unknown keywords only as warnings. So a config
# passes when the exit code is 0 or 143 and keepalived printed nothing.
KEEPALIVED_T_OK = (0, 143)


def _root_owned(name: str, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = 0
    return info


def archive_b64(files: list[NodeFile], rename: dict[str, str] | None = None) -> str:
    """A reproducible tar.gz of `files` (root:root, their modes, mtime 0), base64-encoded.

    Parent directories are included as root:root 0755 so a fresh node gets them right; tar is
    run with --no-overwrite-dir, so existing system directories keep their metadata."""
    rename = rename or {}
    buf = io.BytesIO()
    # gzip header mtime 0 and sorted members: the same files give the same bytes.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        dirs: set[str] = set()
        for f in files:
            parts = rename.get(f.path, f.path).lstrip("/").split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        for d in sorted(dirs):
            info = _root_owned(d, 0o755)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for f in sorted(files, key=lambda f: f.path):
            data = f.content.encode()
            info = _root_owned(rename.get(f.path, f.path).lstrip("/"), f.mode)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return base64.b64encode(buf.getvalue()).decode()


def read_archive_b64(text: str) -> dict[str, tuple[int, str]]:
    """The files in an `archive_b64` archive: absolute path -> (mode, text). Raises on anything else."""
    files: dict[str, tuple[int, str]] = {}
    with tarfile.open(fileobj=io.BytesIO(base64.b64decode(text, validate=True)), mode="r:gz") as tar:
        for member in tar:
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None  # noqa: S101 - a regular file always has data
                files["/" + member.name] = (member.mode, extracted.read().decode())
    return files


EXTRACT = "base64 -d | sudo tar -xzf - -C / --no-overwrite-dir --same-owner --same-permissions"


def _script(*lines: str) -> str:
    return "\n".join(["set -eu", *lines]) + "\n"


def wait_command() -> str:
    """Wait for cloud-init (deploy user, sshd hardening) before anything else touches the node."""
    return _script(
        "# cloud-init exit codes: 0 done, 2 done with recoverable errors; anything else is a failed boot.",
        "rc=0; sudo cloud-init status --wait >/dev/null || rc=$?",
        'if [ "$rc" -ne 0 ] && [ "$rc" -ne 2 ]; then',
        '  echo "cloud-init failed (exit $rc):" >&2; sudo cloud-init status --long >&2; exit 1',
        "fi",
        'echo "cloud-init finished (exit $rc)"',
    )


def bootstrap_command() -> str:
    """The bootstrap script itself arrives on stdin (scripts/node-bootstrap.sh)."""
    return "sudo bash -s"


def secret_file_command(path: str, owner: str = "root", mode: str = "0600") -> str:
    """Write stdin to `path` with its final owner and mode from the first byte."""
    q = shlex.quote(path)
    return _script(
        f"sudo install -d -m 0755 -o root -g root {shlex.quote(path.rsplit('/', 1)[0])}",
        f"sudo install -m {mode} -o {owner} -g {owner} /dev/stdin {q}",
        f'echo "wrote {path} ({mode})"',
    )


def failover_command(paths: NodePaths) -> str:
    units = "minitwit-ha-healthwatch.service minitwit-ha-reconcile.service"
    return _script(
        EXTRACT,
        f"sudo systemd-tmpfiles --create {paths.tmpfiles_conf}",
        "sudo systemctl daemon-reload",
        f"sudo systemctl enable {units}",
        "# Restart so the watcher and the reconciler run the scripts and settings just installed.",
        f"sudo systemctl restart {units}",
        "# Never restart the handover unit: its stop hands the reserved IP over. Start is a no-op",
        "# while it is active (ExecStart only clears a flag a killed handover left).",
        f"sudo systemctl enable --now {HANDOVER_UNIT}",
        'echo "failover scripts and settings installed"',
    )


def firewall_command(paths: NodePaths, admin_cidrs: tuple[str, ...]) -> str:
    conf = shlex.quote(paths.nftables_conf)
    cidrs = " ".join(shlex.quote(c) for c in admin_cidrs)
    return _script(
        "# Refuse to lock out the machine running this: its address must be inside adminCidrs.",
        'client="${SSH_CLIENT%% *}"',
        f'python3 - "$client" {cidrs} <<\'EOF\'',
        "import ipaddress, sys",
        "client = ipaddress.ip_address(sys.argv[1])",
        "if not any(client in ipaddress.ip_network(c) for c in sys.argv[2:]):",
        "    sys.exit(f'refusing to apply the firewall: this SSH session comes from {client}, which is '",
        "             f'not in adminCidrs ({\", \".join(sys.argv[2:])}); add it or run from inside')",
        "EOF",
        EXTRACT,
        f"sudo nft -c -f {conf}",
        f"sudo nft -f {conf}",
        "sudo systemctl enable nftables",
        'echo "nftables ruleset applied"',
    )


def _checked_swap(conf: str, service: str, tool: str, check: list[str], accepted: str, why: str,
                  start: bool = True) -> str:
    """Extract `conf`.new, run `check` on it (it sets $out), install it only when `accepted` holds,
    then reload `service` (or, with `start`, start it when it is not running)."""
    if start:
        load = (f"if systemctl is-active --quiet {service}; then sudo systemctl reload {service};"
                f" else sudo systemctl enable --now {service}; fi")
    else:
        load = f"if systemctl is-active --quiet {service}; then sudo systemctl reload {service}; fi"
    new = shlex.quote(f"{conf}.new")
    return _script(
        EXTRACT,
        "# Check the new file before it replaces the running one.",
        *check,
        f"if ! {{ {accepted}; }}; then",
        f'  echo "{tool} rejected the rendered configuration:" >&2; echo "$out" >&2',
        f"  sudo rm -f {new}; exit 1",
        "fi",
        f"sudo mv {new} {shlex.quote(conf)}",
        f"# {why}",
        load,
        f'echo "{service} configuration checked and loaded"',
    )


def staging_path(conf: str) -> dict[str, str]:
    """The archive writes `conf` as `conf`.new: the step checks it before it replaces the live file."""
    return {conf: f"{conf}.new"}


def keepalived_command(paths: NodePaths) -> str:
    conf = paths.keepalived_conf
    ok = "|".join(str(c) for c in KEEPALIVED_T_OK)
    return _checked_swap(
        conf, "keepalived", "keepalived -t",
        [f"out=$(sudo keepalived -t -f {shlex.quote(conf + '.new')} 2>&1) && rc=0 || rc=$?",
         f'case "$rc" in {ok}) ;; *) rc=fail ;; esac'],
        '[ "$rc" != fail ] && [ -z "$out" ]',
        "Reload, not restart: a restart would drop MASTER and move the reserved IP for nothing. A stopped"
        " keepalived stays stopped: keepalived_start_command starts it once the peer's config is in.",
        start=False,
    )


def keepalived_start_command() -> str:
    """Start keepalived (a no-op while it runs). A step of its own, after both nodes' keepalived
    configuration: a new node's keepalived must not start before the survivor unicasts to it and its
    nftables admit it, or the new node hears nobody and becomes a second MASTER."""
    return _script(
        "sudo systemctl enable --now keepalived",
        'echo "keepalived running"',
    )


def haproxy_command(paths: NodePaths) -> str:
    conf = paths.haproxy_cfg
    return _checked_swap(
        conf, "haproxy", "haproxy -c",
        [f"out=$(sudo haproxy -c -q -f {shlex.quote(conf + '.new')} 2>&1) && rc=0 || rc=$?"],
        '[ "$rc" = 0 ]',
        "Reload, not restart: master-worker (-Ws) hands the listening sockets to a new worker and the "
        "old one finishes its requests, so no connection is refused or cut.",
    )


def registry_login_command(server: str, username: str) -> str:
    return _script(
        f"sudo docker login --username {shlex.quote(username)} --password-stdin {shlex.quote(server)} >/dev/null",
        f'echo "logged in to {server} as {username}"',
    )


# Keys the stack only seeds: a node whose .env has one keeps it. MINITWIT_VERSION belongs to the
# rollout (mt-deploy writes it); appVersion only gives a new or replaced node its peer's version.
SEED_KEYS = ("MINITWIT_VERSION",)


def merge_compose_env_lines(paths: NodePaths) -> tuple[str, ...]:
    """Merge the stack's keys (stack.env) into the app's .env, keeping every other line: the stack's
    lines first, then the old lines whose key it does not set. A seed key (SEED_KEYS) the old .env
    already has keeps its old value. Idempotent; written beside .env and renamed, so compose never
    reads half a file."""
    ours, dotenv = shlex.quote(paths.stack_env), shlex.quote(paths.compose_dotenv)
    new = shlex.quote(f"{paths.compose_dotenv}.new")
    seeds = " ".join(SEED_KEYS)
    program = ("FNR == NR { ours[++n] = $0; key[n] = $1; own[$1] = 1; next } "
               "{ old[++m] = $0; okey[m] = $1; have[$1] = 1 } "
               "END { split(seeds, s, \" \"); for (i in s) seed[s[i]] = 1; "
               "for (i = 1; i <= n; i++) if (!(key[i] in seed && key[i] in have)) print ours[i]; "
               "for (i = 1; i <= m; i++) if (!(okey[i] in own) || okey[i] in seed) print old[i] }")
    return (
        f"if [ -f {ours} ]; then",
        f"  sudo touch {dotenv}",
        f"  merged=$(sudo awk -F= -v seeds={shlex.quote(seeds)} {shlex.quote(program)} {ours} {dotenv})",
        f"  printf '%s\\n' \"$merged\" | sudo install -m 0644 -o root -g root /dev/stdin {new}",
        f"  sudo mv {new} {dotenv}",
        "fi",
    )


def haproxy_admin_lines(paths: NodePaths) -> tuple[str, ...]:
    """A shell function `haproxy_admin COMMAND`: one command on HAProxy's admin socket (root only),
    its answer on stdout. Python, not socat: python3 is on every node already."""
    return (
        f"sock={shlex.quote(paths.haproxy_admin_socket)}",
        "haproxy_admin() {",
        "  sudo python3 - \"$sock\" \"$1\" <<'EOF'",
        "import socket, sys",
        "s = socket.socket(socket.AF_UNIX)",
        "s.settimeout(5)",
        "s.connect(sys.argv[1])",
        "s.sendall(sys.argv[2].encode() + b'\\n')",
        "out = b''",
        "while chunk := s.recv(65536):",
        "    out += chunk",
        "sys.stdout.write(out.decode())",
        "EOF",
        "}",
    )


def _server_field(server: str, column: int) -> str:
    """awk printing one column of `show stat` CSV for app/<server> (2 svname, 5 scur, 18 status)."""
    return f"awk -F, '$1 == \"{BACKEND}\" && $2 == \"{server}\" {{ print ${column} }}'"


def app_command(paths: NodePaths, project: str, health_timeout_s: int = 300, drain_wait_s: int = 10) -> str:
    """Pull, then restart the app drained: HAProxy sends new requests to the peer's app over the VPC
    while compose recreates this one, so a compose change through `pulumi up` costs no failover and no
    reserved-IP move (the holder's keepalived keeps seeing HAProxy's monitor up). Only when the peer's
    app is UP; without HAProxy yet (a fresh node) or a peer down it restarts undrained, as before."""
    compose = f"sudo docker compose -p {shlex.quote(project)} -f {shlex.quote(paths.compose_file)}"
    health = paths.script("mt-health")
    server = f"{BACKEND}/{LOCAL_SERVER}"
    return _script(
        EXTRACT,
        *merge_compose_env_lines(paths),
        f"{compose} pull --quiet",
        *haproxy_admin_lines(paths),
        "drained=no",
        "undrain() {",
        '  if [ "$drained" = yes ]; then',
        f'    if haproxy_admin "set server {server} state ready" >/dev/null; then echo "HAProxy: {server} ready again";',
        f'    else echo "could not put {server} back in HAProxy; run: set server {server} state ready" >&2; fi',
        "  fi",
        "}",
        "# Whatever happens below, the local app is back in HAProxy's rotation.",
        "trap undrain EXIT",
        'if [ -S "$sock" ]; then',
        f'  peer=$(haproxy_admin "show stat" | {_server_field(PEER_SERVER, 18)})',
        '  if [ "$peer" = UP ]; then',
        f'    haproxy_admin "set server {server} state drain" >/dev/null',
        "    drained=yes",
        f"    # Requests already at the local app finish first (at most {drain_wait_s} s).",
        f"    i=0; while [ \"$i\" -lt {drain_wait_s * 2} ]; do",
        f'      busy=$(haproxy_admin "show stat" | {_server_field(LOCAL_SERVER, 5)})',
        '      [ "${busy:-0}" = 0 ] && break',
        "      sleep 0.5; i=$((i + 1))",
        "    done",
        f'    echo "HAProxy: {server} drained; the peer\'s app serves while this one restarts"',
        "  else",
        '    echo "the peer\'s app is ${peer:-not in HAProxy}: restarting the local app undrained" >&2',
        "  fi",
        "fi",
        f"{compose} up -d --remove-orphans",
        "# Wait (bounded) until this node is healthy again before the other node's turn.",
        f"deadline=$(( $(date +%s) + {health_timeout_s} ))",
        f"until sudo {shlex.quote(health)} all; do",
        '  if [ "$(date +%s)" -ge "$deadline" ]; then',
        f'    echo "app not healthy after {health_timeout_s}s; see: {compose} ps; {compose} logs" >&2; exit 1',
        "  fi",
        "  sleep 2",
        "done",
        'echo "app up and healthy"',
    )


def retire_armed_command() -> str:
    return _script('echo "armed: keepalived, the reconciler and HAProxy stop here before this droplet is deleted"')


# After the reserved IP has left, HAProxy keeps serving this long: a request the edge sent here just
# before the move is still being answered (the lab's replace-standby lost one, 7-20 ms after the
# move, to an HAProxy stopped at once). A client gives up after 0.3 s, so 1 s covers every request
# that could still succeed.
RETIRE_DRAIN_S = 1


def retire_command(paths: NodePaths, release_timeout_s: int = 60) -> str:
    """The retire step's `delete`: runs on a droplet about to be replaced or destroyed, before the
    survivor is re-pointed at the new peer. Without it the old node would keep running keepalived and
    the reconciler until Pulumi deletes it at the end of the run, shut out of the survivor's VRRP by
    its re-rendered unicast_peer and nftables rule: two MASTERs, both reassigning the reserved IP.
    `disable --now`, so a droplet whose deletion then fails does not come back to fight after a reboot."""
    env = shlex.quote(paths.failover_env)
    return _script(
        "# The reconciler and the watcher first: nothing here may reassign the reserved IP any more.",
        "sudo systemctl disable --now minitwit-ha-reconcile.service minitwit-ha-healthwatch.service 2>/dev/null || true",
        "# keepalived: a MASTER's last advert has priority 0, so the peer takes over at once (one IP move).",
        "sudo systemctl disable --now keepalived 2>/dev/null || true",
        "# HAProxy serves until the edge has moved the reserved IP away (bounded), then stops.",
        f"md=$(sudo sed -n 's/^METADATA_URL=//p' {env} 2>/dev/null || true)",
        'md="${md:-http://169.254.169.254/metadata/v1}"',
        f"i=0; while [ \"$i\" -lt {release_timeout_s} ]; do",
        '  held=$(curl --fail --silent --max-time 2 "$md/reserved_ip/ipv4/active" 2>/dev/null || echo unknown)',
        '  [ "$held" = false ] && break',
        "  sleep 1; i=$((i + 1))",
        "done",
        f"sleep {RETIRE_DRAIN_S}  # requests that reached HAProxy before the move finish",
        "sudo systemctl disable --now haproxy 2>/dev/null || true",
        'echo "retired: keepalived, the reconciler and HAProxy stopped and disabled"',
    )


def digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()
