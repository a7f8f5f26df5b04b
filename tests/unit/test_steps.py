"""The provisioning steps' shell, run for real: each step's command with its stdin, against a node
root in a temporary directory, with stub `sudo`, `systemctl`, `nft`, `docker` and `keepalived`.

Under mocks the stack tests only see these commands as text; here they run, so a quoting slip, a
wrong mode or a check that lets a broken keepalived.conf through shows up before a droplet does.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from infra import steps
from infra.database import grants_command
from infra.haproxy import HaproxyFacts
from infra.node import (
    STEP_APP,
    STEP_FAILOVER,
    STEP_FIREWALL,
    STEP_HAPROXY,
    STEP_KEEPALIVED,
    NodeFacts,
    NodePaths,
    files_for_step,
    render_node_files,
)
from tests.support.needs import need, not_root

STUBS = {
    # sudo: run the command as we are (root in CI), like passwordless sudo on a droplet.
    "sudo": '#!/bin/sh\nexec "$@"\n',
    "systemctl": '#!/bin/sh\necho "systemctl $*" >> "$STUB_LOG"\n'
                 'if [ "$1" = is-active ]; then [ "${KEEPALIVED_ACTIVE:-no}" = yes ]; exit $?; fi\n',
    "systemd-tmpfiles": '#!/bin/sh\necho "systemd-tmpfiles $*" >> "$STUB_LOG"\n',
    "nft": '#!/bin/sh\necho "nft $*" >> "$STUB_LOG"\n',
    "docker": '#!/bin/sh\necho "docker $*" >> "$STUB_LOG"\n',
    # haproxy -c: refuses a file with BROKEN in it, like a real syntax error.
    "haproxy": '#!/bin/bash\necho "haproxy $*" >> "$STUB_LOG"\n'
               'if grep -q BROKEN "${@: -1}"; then echo "[ALERT] unknown keyword \'BROKEN\'" >&2; exit 1; fi\n',
    # keepalived 2.2.7's -t: warnings on stderr, then it kills itself with SIGTERM (exit 143).
    "keepalived": '#!/bin/bash\necho "keepalived $*" >> "$STUB_LOG"\n'
                  'grep -q BROKEN "${@: -1}" && echo "(${@: -1}: Line 1) Unknown keyword \'BROKEN\'" >&2\n'
                  'kill -TERM $$\n',
}


@pytest.fixture
def node(tmp_path: Path):
    need(not_root())  # the steps chown to root:root, as on a droplet
    root = tmp_path / "node"
    root.mkdir(mode=0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in STUBS.items():
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    paths = NodePaths(root=str(root))
    facts = NodeFacts(name="primary", droplet_id=1, private_ip="10.110.16.3", peer_private_ip="10.110.16.4",
                      reserved_ip="203.0.113.10", priority=150, router_id=51, private_interface="eth1",
                      admin_cidrs=("198.51.100.0/24",), http_ports=(80, 443), health_url="http://127.0.0.1:5000/latest",
                      paths=paths, haproxy=HaproxyFacts())
    files = render_node_files(facts, compose_text="services:\n  minitwit:\n    image: example/minitwit:1\n")
    log = tmp_path / "stub.log"
    log.touch()

    class Node:
        pass

    n = Node()
    n.root, n.paths, n.files, n.log, n.bindir = root, paths, files, log, bindir
    n.facts = facts

    def run(command: str, stdin: str, **env: str) -> subprocess.CompletedProcess:
        full = {"PATH": f"{bindir}:/usr/bin:/bin:/usr/sbin:/sbin", "STUB_LOG": str(log),
                "SSH_CLIENT": "198.51.100.7 50000 22", **env}
        return subprocess.run(["bash", "-c", command], input=stdin, capture_output=True, text=True, env=full,
                              timeout=60)

    def calls() -> list[str]:
        return log.read_text().splitlines()

    n.run, n.calls = run, calls
    return n


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_failover_step_installs_scripts_and_settings_root_owned_and_restarts_the_services(node):
    files = files_for_step(node.files, STEP_FAILOVER)
    proc = node.run(steps.failover_command(node.paths), steps.archive_b64(files))
    assert proc.returncode == 0, proc.stderr
    for f in files:
        st = os.stat(f.path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, f.mode), f.path
        assert Path(f.path).read_text() == f.content
    assert mode(node.paths.libexec) == 0o755 and os.stat(node.paths.libexec).st_uid == 0
    assert "systemctl daemon-reload" in node.calls()
    assert any(c.startswith("systemctl restart minitwit-ha-healthwatch.service") for c in node.calls())


def test_secret_file_is_0600_root_from_stdin_and_never_in_the_command(node):
    secret = "dop_v1_" + "9" * 64
    command = steps.secret_file_command(node.paths.token_file)
    assert secret not in command
    proc = node.run(command, secret)
    assert proc.returncode == 0, proc.stderr
    assert Path(node.paths.token_file).read_text() == secret
    assert mode(node.paths.token_file) == 0o600 and os.stat(node.paths.token_file).st_uid == 0
    assert secret not in proc.stdout + proc.stderr


def test_keepalived_step_checks_then_replaces_then_reloads(node):
    files = files_for_step(node.files, STEP_KEEPALIVED)
    archive = steps.archive_b64(files, steps.staging_path(node.paths.keepalived_conf))
    proc = node.run(steps.keepalived_command(node.paths), archive, KEEPALIVED_ACTIVE="yes")
    assert proc.returncode == 0, proc.stderr
    assert Path(node.paths.keepalived_conf).read_text() == files[0].content
    assert not Path(node.paths.keepalived_conf + ".new").exists()
    calls = node.calls()
    assert calls.index(f"keepalived -t -f {node.paths.keepalived_conf}.new") < calls.index("systemctl reload keepalived")
    assert "systemctl enable --now keepalived" not in calls  # reload, not restart, when it runs


def test_keepalived_step_leaves_a_stopped_keepalived_to_the_start_step(node):
    """A new node's keepalived starts only in keepalived-start, once the survivor unicasts to it."""
    files = files_for_step(node.files, STEP_KEEPALIVED)
    proc = node.run(steps.keepalived_command(node.paths),
                    steps.archive_b64(files, steps.staging_path(node.paths.keepalived_conf)), KEEPALIVED_ACTIVE="no")
    assert proc.returncode == 0, proc.stderr
    assert Path(node.paths.keepalived_conf).read_text() == files[0].content
    assert not [c for c in node.calls() if c.startswith("systemctl") and "is-active" not in c]
    proc = node.run(steps.keepalived_start_command(), "", KEEPALIVED_ACTIVE="no")
    assert proc.returncode == 0, proc.stderr
    assert "systemctl enable --now keepalived" in node.calls()


@pytest.mark.parametrize(("step", "conf", "command", "message"), [
    (STEP_KEEPALIVED, "keepalived_conf", steps.keepalived_command, "keepalived -t rejected"),
    (STEP_HAPROXY, "haproxy_cfg", steps.haproxy_command, "haproxy -c rejected"),
])
def test_a_config_the_daemons_check_rejects_is_never_installed(node, step, conf, command, message):
    good = files_for_step(node.files, step)[0]
    live = Path(getattr(node.paths, conf))
    live.parent.mkdir(parents=True, exist_ok=True)
    live.write_text("# the running configuration\n")
    broken = [type(good)(good.path, good.mode, good.content + "\nBROKEN\n", good.step)]
    proc = node.run(command(node.paths), steps.archive_b64(broken, steps.staging_path(str(live))),
                    KEEPALIVED_ACTIVE="yes")
    assert proc.returncode == 1
    assert f"{message} the rendered configuration" in proc.stderr and "BROKEN" in proc.stderr
    assert live.read_text() == "# the running configuration\n"
    assert not Path(f"{live}.new").exists()
    assert not [c for c in node.calls() if c.startswith("systemctl reload")]


def test_firewall_step_checks_then_applies(node):
    files = files_for_step(node.files, STEP_FIREWALL)
    proc = node.run(steps.firewall_command(node.paths, ("198.51.100.0/24",)), steps.archive_b64(files))
    assert proc.returncode == 0, proc.stderr
    conf = node.paths.nftables_conf
    assert node.calls()[:2] == [f"nft -c -f {conf}", f"nft -f {conf}"]
    assert Path(conf).read_text() == files[0].content


def test_firewall_step_refuses_to_lock_out_the_machine_running_it(node):
    files = files_for_step(node.files, STEP_FIREWALL)
    proc = node.run(steps.firewall_command(node.paths, ("198.51.100.0/24",)), steps.archive_b64(files),
                    SSH_CLIENT="203.0.113.50 50000 22")
    assert proc.returncode != 0
    assert "203.0.113.50" in proc.stderr and "not in adminCidrs" in proc.stderr
    assert node.calls() == [] and not Path(node.paths.nftables_conf).exists()


def test_app_step_pulls_starts_and_waits_for_health_bounded(node):
    files = files_for_step(node.files, STEP_APP)
    health = Path(node.paths.script("mt-health"))
    health.parent.mkdir(parents=True, exist_ok=True)
    health.write_text('#!/bin/sh\necho "mt-health $*" >> "$STUB_LOG"\nexit 1\n')  # never healthy
    health.chmod(0o755)
    command = steps.app_command(node.paths, "minitwit", health_timeout_s=3)
    proc = node.run(command, steps.archive_b64(files))
    assert proc.returncode == 1
    assert "app not healthy after 3s" in proc.stderr
    calls = node.calls()
    assert calls[0].startswith("docker compose -p minitwit -f") and calls[0].endswith("pull --quiet")
    assert calls[1].endswith("up -d --remove-orphans")
    assert Path(node.paths.compose_file).read_text() == next(f for f in files if f.path.endswith("compose.yaml")).content
    health.write_text('#!/bin/sh\nexit 0\n')
    assert node.run(command, steps.archive_b64(files)).returncode == 0


def test_app_step_merges_the_image_into_dotenv_and_keeps_the_rollouts_version(node):
    from dataclasses import replace

    facts = replace(node.facts, app_image="ghcr.io/team/minitwit")
    files = files_for_step(render_node_files(facts, compose_text="services: {}\n"), STEP_APP)
    health = Path(node.paths.script("mt-health"))
    health.parent.mkdir(parents=True, exist_ok=True)
    health.write_text("#!/bin/sh\nexit 0\n")
    health.chmod(0o755)
    dotenv = Path(node.paths.app_dir) / ".env"
    dotenv.parent.mkdir(parents=True, exist_ok=True)
    dotenv.write_text("MINITWIT_IMAGE=old/image\nMINITWIT_VERSION=v7\nEXTRA=kept\n")  # as mt-deploy leaves it
    command = steps.app_command(node.paths, "minitwit", health_timeout_s=3)
    for _ in range(2):  # a re-run changes nothing
        proc = node.run(command, steps.archive_b64(files))
        assert proc.returncode == 0, proc.stderr
        values = [ln for ln in dotenv.read_text().splitlines() if not ln.startswith("#")]
        assert values == ["MINITWIT_IMAGE=ghcr.io/team/minitwit", "MTHA_PRIVATE_IPV4=10.110.16.3",
                          "MTHA_APP_BACKEND_PORT=5000", "MINITWIT_VERSION=v7", "EXTRA=kept"]
        assert mode(dotenv) == 0o644 and os.stat(dotenv).st_uid == 0
    dotenv.unlink()  # a fresh node: no .env yet
    assert node.run(command, steps.archive_b64(files)).returncode == 0
    assert "MINITWIT_IMAGE=ghcr.io/team/minitwit" in dotenv.read_text().splitlines()


def test_app_step_sets_the_stack_variables_in_compose_env_and_keeps_the_version(node):
    dotenv = Path(node.paths.compose_dotenv)
    dotenv.parent.mkdir(parents=True, exist_ok=True)
    dotenv.write_text("MINITWIT_VERSION=v7\nMTHA_PRIVATE_IPV4=10.0.0.99\nOTHER=kept\n")  # a stale address
    health = Path(node.paths.script("mt-health"))
    health.parent.mkdir(parents=True, exist_ok=True)
    health.write_text("#!/bin/sh\nexit 0\n")
    health.chmod(0o755)
    proc = node.run(steps.app_command(node.paths, "minitwit"), steps.archive_b64(files_for_step(node.files, STEP_APP)))
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in dotenv.read_text().splitlines() if not ln.startswith("#")]
    assert sorted(lines) == sorted(["MINITWIT_VERSION=v7", "OTHER=kept", "MTHA_PRIVATE_IPV4=10.110.16.3",
                                    "MTHA_APP_BACKEND_PORT=5000"])
    assert mode(dotenv) == 0o644 and os.stat(dotenv).st_uid == 0


def test_haproxy_step_checks_then_replaces_then_reloads(node):
    files = files_for_step(node.files, STEP_HAPROXY)
    archive = steps.archive_b64(files, steps.staging_path(node.paths.haproxy_cfg))
    proc = node.run(steps.haproxy_command(node.paths), archive, KEEPALIVED_ACTIVE="yes")  # the stub: "active"
    assert proc.returncode == 0, proc.stderr
    assert Path(node.paths.haproxy_cfg).read_text() == files[0].content
    assert not Path(node.paths.haproxy_cfg + ".new").exists()
    calls = node.calls()
    assert calls.index(f"haproxy -c -q -f {node.paths.haproxy_cfg}.new") < calls.index("systemctl reload haproxy")


def test_the_step_scripts_are_shellcheck_clean(tmp_path):
    from tests.support.needs import missing_binaries

    need(missing_binaries("shellcheck"))
    paths = NodePaths()
    for name, text in {
        "wait": steps.wait_command(), "secret": steps.secret_file_command(paths.token_file),
        "failover": steps.failover_command(paths), "firewall": steps.firewall_command(paths, ("198.51.100.0/24",)),
        "keepalived": steps.keepalived_command(paths), "app": steps.app_command(paths, "minitwit"),
        "retire": steps.retire_command(paths), "retire-armed": steps.retire_armed_command(),
        "haproxy": steps.haproxy_command(paths),
        "registry": steps.registry_login_command("registry.digitalocean.com", "ci"),
        "db-grants": grants_command("private-db.example.invalid", 25060, "doadmin"),
    }.items():
        script = tmp_path / f"{name}.sh"
        script.write_text("#!/bin/sh\n" + text)
        proc = subprocess.run(["shellcheck", "-s", "sh", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{name}:\n{proc.stdout}"


class FakeHaproxyAdmin:
    """HAProxy's admin socket, as far as the app step uses it: `show stat` (CSV with the peer's status
    and the local server's current sessions) and `set server`. Records every command it got."""

    def __init__(self, path: str, peer_status: str = "UP") -> None:
        import socket
        import threading

        self.commands: list[str] = []
        self.peer_status, self.local_state = peer_status, "ready"
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(8)
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                line = conn.recv(4096).decode().strip()
                self.commands.append(line)
                if line == "show stat":
                    local = "DRAIN" if self.local_state == "drain" else "UP"
                    row = ",".join(["app", "{name}", "0", "0", "0"] + ["0"] * 12 + ["{status}"])
                    conn.sendall((row.format(name="local", status=local) + "\n"
                                  + row.format(name="peer", status=self.peer_status) + "\n").encode())
                elif line.startswith("set server app/local state "):
                    self.local_state = line.rsplit(" ", 1)[1]
                    conn.sendall(b"\n")

    def close(self) -> None:
        self.sock.close()


def _healthy(node, exit_code: int = 0) -> None:
    health = Path(node.paths.script("mt-health"))
    health.parent.mkdir(parents=True, exist_ok=True)
    health.write_text(f'#!/bin/sh\necho "mt-health $*" >> "$STUB_LOG"\nexit {exit_code}\n')
    health.chmod(0o755)


@pytest.mark.parametrize("healthy", [True, False])
def test_app_step_drains_the_local_app_in_haproxy_while_compose_restarts_it(node, healthy):
    """The peer's app serves while this one restarts: no failover; ready again even when the step fails."""
    _healthy(node, 0 if healthy else 1)
    admin = FakeHaproxyAdmin(node.paths.haproxy_admin_socket)
    try:
        command = steps.app_command(node.paths, "minitwit", health_timeout_s=2)
        proc = node.run(command, steps.archive_b64(files_for_step(node.files, STEP_APP)))
    finally:
        admin.close()
    assert proc.returncode == (0 if healthy else 1), proc.stderr
    sets = [c for c in admin.commands if c.startswith("set server")]
    assert sets == ["set server app/local state drain", "set server app/local state ready"]
    assert admin.local_state == "ready"
    assert "drained; the peer's app serves" in proc.stdout


def test_app_step_does_not_drain_when_the_peers_app_is_down(node):
    _healthy(node)
    admin = FakeHaproxyAdmin(node.paths.haproxy_admin_socket, peer_status="DOWN")
    try:
        proc = node.run(steps.app_command(node.paths, "minitwit"), steps.archive_b64(files_for_step(node.files, STEP_APP)))
    finally:
        admin.close()
    assert proc.returncode == 0, proc.stderr
    assert [c for c in admin.commands if c.startswith("set server")] == []
    assert "the peer's app is DOWN: restarting the local app undrained" in proc.stderr


def test_app_version_only_seeds_a_node_without_one(node):
    from dataclasses import replace

    files = files_for_step(render_node_files(replace(node.facts, app_version="v9"), compose_text="services: {}\n"),
                           STEP_APP)
    _healthy(node)
    dotenv = Path(node.paths.compose_dotenv)
    dotenv.parent.mkdir(parents=True, exist_ok=True)
    command = steps.app_command(node.paths, "minitwit")
    # A new or replaced node: no .env yet, so it starts on appVersion (its peer's version).
    assert node.run(command, steps.archive_b64(files)).returncode == 0
    assert "MINITWIT_VERSION=v9" in dotenv.read_text().splitlines()
    # A running node keeps what the rollout wrote.
    dotenv.write_text("MINITWIT_VERSION=v10\nOTHER=kept\n")
    assert node.run(command, steps.archive_b64(files)).returncode == 0
    lines = [ln for ln in dotenv.read_text().splitlines() if not ln.startswith("#")]
    assert lines.count("MINITWIT_VERSION=v10") == 1 and "MINITWIT_VERSION=v9" not in lines and "OTHER=kept" in lines


def test_retire_stops_the_reconciler_and_keepalived_then_haproxy_once_the_ip_has_left(node, tmp_path):
    import http.server
    import threading

    answers = iter(["true", "true", "false"])  # the metadata service: the IP leaves on the third poll

    class Metadata(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # http.server's naming
            body = next(answers, "false").encode() if self.path.endswith("/reserved_ip/ipv4/active") else b""
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = Path(node.paths.failover_env)
    env.parent.mkdir(parents=True, exist_ok=True)
    env.write_text(f"METADATA_URL=http://127.0.0.1:{server.server_port}/metadata/v1\n")
    try:
        proc = node.run(steps.retire_command(node.paths, release_timeout_s=10), "")
    finally:
        server.shutdown()
    assert proc.returncode == 0, proc.stderr
    # HAProxy outlives the move by the drain: a request sent just before it is still answered.
    assert f"sleep {steps.RETIRE_DRAIN_S}" in steps.retire_command(node.paths) and steps.RETIRE_DRAIN_S >= 1
    assert node.calls() == [
        "systemctl disable --now minitwit-ha-reconcile.service minitwit-ha-healthwatch.service",
        "systemctl disable --now keepalived",
        "systemctl disable --now haproxy",
    ]
    assert next(answers, None) is None  # HAProxy stopped only after the third poll said "false"
