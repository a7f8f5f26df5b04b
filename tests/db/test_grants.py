"""The app user's rights as DigitalOcean gives them, and the stack's grant step that fixes them.

A throwaway PostgreSQL 15+ with roles made the DigitalOcean way (tests/support/pg.py
digitalocean_like): `doadmin` is no superuser and owns the database, `minitwit` is a plain login
role. The stack's own remote command (infra/database.py grants_command, run with bash and its
secret stdin, as on a node) must let the app create its schema, read and write, and let a
migration through either user reach the app.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import psycopg
import pytest

from infra.database import grant_sql, grants_command
from tests.db.test_app import AppProc, free_pg_port
from tests.db.test_migrate import make_pg_source, run_tool
from tests.support.needs import missing_binaries, need
from tests.support.pg import PgServer, missing_requirements, pg_bindir

pytestmark = pytest.mark.db

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = (ROOT / "scripts" / "minitwit_schema.sql").read_text()
DATA = {
    "user": [(1, "alice", "a@example.org", "h1"), (2, "bob", "b@example.org", "h2")],
    "follower": [(1, 2)],
    "message": [(1, 1, "hello from the old server", 1_600_000_000, 0), (2, 2, "second", 1_600_000_100, 0)],
    "latest": [(1, 4242)],
}


@pytest.fixture(scope="module")
def pg():
    need(missing_requirements() or missing_binaries("pg_dump", "pg_restore"))
    server = PgServer(port=free_pg_port())
    try:
        server.start()
        if server.psql("SHOW server_version_num").strip() < "150000":
            pytest.skip("needs PostgreSQL 15+ (the public-schema defaults DigitalOcean's 16 has)")
        admin_pw, app_pw = server.digitalocean_like("minitwit")
        server.admin_pw, server.app_pw = admin_pw, app_pw
        yield server
    finally:
        server.stop()


def fresh_db(pg: PgServer) -> str:
    """Another database owned by doadmin, as the DigitalOcean API creates it (no grants yet)."""
    name = f"minitwit_{uuid.uuid4().hex[:8]}"
    pg.create_database(name, owner="doadmin")
    return name


def admin_uri(pg: PgServer, db: str) -> str:
    return pg.uri(db, user="doadmin", password=pg.admin_pw)


def app_uri(pg: PgServer, db: str) -> str:
    return pg.uri(db, user="minitwit", password=pg.app_pw)


def run_grants(pg: PgServer, db: str) -> subprocess.CompletedProcess:
    """The stack's step as a node runs it: the command text, then stdin = password + SQL."""
    command = grants_command(pg.listen, pg.port, "doadmin", db=db, sslmode="disable")
    assert pg.admin_pw not in command
    env = {"PATH": f"{pg_bindir()}:/usr/bin:/bin", "HOME": "/nonexistent"}
    return subprocess.run(["bash", "-c", command], input=f"{pg.admin_pw}\n{grant_sql(db=db)}", env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_digitalocean_app_user_cannot_create_its_schema_without_the_grants(pg):
    db = fresh_db(pg)
    with psycopg.connect(app_uri(pg, db), autocommit=True) as conn, \
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied for schema public"):
        conn.execute(SCHEMA)


def test_the_grant_step_lets_the_app_user_create_read_and_write_and_is_idempotent(pg):
    db = fresh_db(pg)
    for _ in range(2):  # `pulumi up` re-runs it on a replaced droplet: same result, no error
        proc = run_grants(pg, db)
        assert proc.returncode == 0, proc.stderr
        assert f"granted minitwit its rights on database {db}" in proc.stdout
        assert pg.admin_pw not in proc.stdout + proc.stderr
    with psycopg.connect(app_uri(pg, db), autocommit=True) as conn:
        conn.execute(SCHEMA)  # what the app does at start
        conn.execute("INSERT INTO \"user\" (username, email, pw_hash) VALUES ('carol', 'c@x', 'h')")
        assert conn.execute('SELECT username FROM "user"').fetchall() == [("carol",)]
    # A table doadmin creates after the grants (a migration run as the admin) is the app's too.
    with psycopg.connect(admin_uri(pg, db), autocommit=True) as conn:
        conn.execute("CREATE TABLE admin_made (id SERIAL PRIMARY KEY, v TEXT)")
        conn.execute("INSERT INTO admin_made (v) VALUES ('from doadmin')")
    with psycopg.connect(app_uri(pg, db), autocommit=True) as conn:
        conn.execute("INSERT INTO admin_made (v) VALUES ('from the app')")
        assert [r[0] for r in conn.execute("SELECT v FROM admin_made ORDER BY id")] == ["from doadmin", "from the app"]


def test_a_wrong_admin_password_fails_the_step(pg):
    db = fresh_db(pg)
    command = grants_command(pg.listen, pg.port, "doadmin", db=db, sslmode="disable")
    proc = subprocess.run(["bash", "-c", command], input=f"wrong\n{grant_sql(db=db)}",
                          env={"PATH": f"{pg_bindir()}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "password authentication failed" in proc.stderr


def test_the_app_serves_as_the_app_user_after_the_grants(pg, tmp_path):
    db = fresh_db(pg)
    assert run_grants(pg, db).returncode == 0
    app = AppProc(tmp_path, pg, "primary", "v1", uri=app_uri(pg, db))
    try:
        assert app.call("POST", "/register", {"username": "dana", "email": "d@x", "pwd": "p"})[0] == 204
        assert app.call("POST", "/msgs/dana", {"content": "as minitwit"})[0] == 204
        status, msgs, _ = app.call("GET", "/msgs/dana")
        assert status == 200 and [m["content"] for m in msgs] == ["as minitwit"]
    finally:
        app.kill()
    owners = pg.psql("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'", dbname=db)
    assert owners.split() == ["minitwit"]  # the app created its schema itself


def fake_pulumi(tmp_path: Path, outputs: str, rc: int = 0) -> str:
    """A stand-in for `pulumi stack output --show-secrets --json --stack NAME` (MIGRATE_PULUMI)."""
    script = tmp_path / "pulumi"
    script.write_text(f"#!{sys.executable}\nimport sys\nopen({str(tmp_path / 'argv')!r}, 'w').write(' '.join(sys.argv[1:]))\n"
                      f"sys.stdout.write({outputs!r})\nsys.exit({rc})\n")
    script.chmod(0o755)
    return str(script)


def test_migration_to_stack_targets_the_apps_database_and_user(pg, tmp_path):
    db = fresh_db(pg)
    assert run_grants(pg, db).returncode == 0
    source = make_pg_source(pg, DATA)
    pulumi = fake_pulumi(tmp_path, f'{{"reserved_ip": "203.0.113.10", "database_uri": "{app_uri(pg, db)}"}}')
    (tmp_path / "tmp").mkdir()
    (tmp_path / "bin").mkdir()
    proc = run_tool(tmp_path, "--from", "env:MT_SRC", "--to", "stack:prod", MT_SRC=source, MIGRATE_PULUMI=pulumi)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "argv").read_text() == "stack output --show-secrets --json --stack prod"
    assert "target: postgresql://minitwit:***@" in proc.stderr and pg.app_pw not in proc.stderr + proc.stdout
    assert "app user minitwit can read and write every migrated table" in proc.stderr
    # The app's own view: what the old server had is on the timeline.
    with psycopg.connect(app_uri(pg, db)) as conn:
        assert conn.execute("SELECT text FROM message ORDER BY message_id").fetchall() == [
            ("hello from the old server",), ("second",)]
        conn.execute("INSERT INTO message (author_id, text) VALUES (1, 'after the move')")  # sequences usable


def test_migration_as_doadmin_checks_the_app_users_rights(pg, tmp_path):
    (tmp_path / "tmp").mkdir()
    (tmp_path / "bin").mkdir()
    source = make_pg_source(pg, DATA)
    # Without the grant step: copied and verified, but the app could not read it -> exit 6.
    bare = fresh_db(pg)
    proc = run_tool(tmp_path, "--from", "env:MT_SRC", "--to", "env:MT_TGT", MT_SRC=source, MT_TGT=admin_uri(pg, bare))
    assert proc.returncode == 6, proc.stderr
    assert "the app's user minitwit lacks SELECT on user" in proc.stderr and "pulumi up" in proc.stderr
    # With it (default privileges cover the tables doadmin creates): exit 0.
    granted = fresh_db(pg)
    assert run_grants(pg, granted).returncode == 0
    proc = run_tool(tmp_path, "--from", "env:MT_SRC", "--to", "env:MT_TGT", MT_SRC=source,
                    MT_TGT=admin_uri(pg, granted))
    assert proc.returncode == 0, proc.stderr
    assert "app user minitwit can read and write every migrated table" in proc.stderr
    # A role that does not exist is refused before the target is touched.
    other = fresh_db(pg)
    proc = run_tool(tmp_path, "--from", "env:MT_SRC", "--to", "env:MT_TGT", "--app-user", "nobody",
                    MT_SRC=source, MT_TGT=admin_uri(pg, other))
    assert proc.returncode == 2 and "--app-user nobody: no such role" in proc.stderr
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'", dbname=other).strip() == "0"


@pytest.mark.parametrize("outputs,rc,message", [
    ('{"reserved_ip": "203.0.113.10"}', 0, "has no database_uri output"),
    ('{"database_uri": "[secret]"}', 0, "came back masked"),
    ("", 255, "failed (exit 255)"),
])
def test_stack_target_errors_name_the_stack(tmp_path, outputs, rc, message):
    pulumi = fake_pulumi(tmp_path, outputs, rc)
    env = {k: v for k, v in os.environ.items() if k != "MIGRATE_PULUMI"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "migrate_db.py"), "--from", "/nonexistent.db",
                           "--to", "stack:prod"], env={**env, "MIGRATE_PULUMI": pulumi},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    with contextlib.suppress(FileNotFoundError):
        assert "--stack prod" in (tmp_path / "argv").read_text()
