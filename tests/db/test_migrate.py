"""scripts/migrate_db.py against two throwaway PostgreSQL servers (source and target).

One MiniTwit data set in the ORIGINAL schema (300 users, ~600 follows, 10,050 messages with
quotes, newlines, tabs, backslashes, control characters, unicode, number-like names and texts)
is migrated from PostgreSQL (pg_dump/pg_restore) and from SQLite (pgloader). Expected contents
are computed here, independently of the tool: rows read with psycopg/sqlite3 and compared as
sorted lists. The tool runs as an operator runs it: a subprocess with env: URIs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.support.needs import missing_binaries, need
from tests.support.pg import PgServer, missing_requirements

pytestmark = pytest.mark.db

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "scripts" / "migrate_db.py"
PORTS = range(56000, 57000)          # 55xxx belongs to other suites running concurrently

COLUMNS = {
    "user": ("user_id", "username", "email", "pw_hash"),
    "follower": ("who_id", "whom_id"),
    "message": ("message_id", "author_id", "text", "pub_date", "flagged"),
    "latest": ("id", "value"),
}
TEXT_COLUMNS = {"username", "email", "pw_hash", "text"}

# The original MiniTwit schema, verbatim in spirit: `string` columns (NUMERIC affinity in SQLite).
SQLITE_SCHEMA = """
create table user (user_id integer primary key autoincrement, username string not null,
                   email string not null, pw_hash string not null);
create table follower (who_id integer, whom_id integer);
create table message (message_id integer primary key autoincrement, author_id integer not null,
                      text string not null, pub_date integer, flagged integer);
"""
# The same on the original server's PostgreSQL container, plus the simulator's `latest`.
PG_SCHEMA = """
CREATE TABLE "user" (user_id SERIAL PRIMARY KEY, username VARCHAR(255) NOT NULL,
                     email VARCHAR(255) NOT NULL, pw_hash VARCHAR(255) NOT NULL);
CREATE TABLE follower (who_id INTEGER, whom_id INTEGER);
CREATE TABLE message (message_id SERIAL PRIMARY KEY, author_id INTEGER NOT NULL, text TEXT NOT NULL,
                      pub_date INTEGER, flagged INTEGER);
CREATE TABLE latest (id INTEGER PRIMARY KEY, value BIGINT NOT NULL);
"""


# -- fixtures ------------------------------------------------------------------------------------
def free_port(taken: set[int]) -> int:
    for port in random.sample(PORTS, len(PORTS)):
        if port in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        taken.add(port)
        return port
    raise RuntimeError("no free port in 56000-56999")


@pytest.fixture(scope="module")
def servers():
    need(missing_requirements() or missing_binaries("pg_dump", "pg_restore", "pgloader"))
    taken: set[int] = set()
    with contextlib.ExitStack() as stack:
        source = PgServer(port=free_port(taken))
        stack.callback(source.stop)               # registered before start: stops even half-up
        target = PgServer(port=free_port(taken))
        stack.callback(target.stop)
        source.start()
        target.start()
        yield source, target, free_port(taken)    # the last one: a port nothing listens on


@pytest.fixture(scope="module")
def dataset():
    """Rows as the original app would have written them (Python str and int values)."""
    rng = random.Random(20240601)
    names = ["42", "O'Brien", 'say "cheese"', "tab\tname", "back\\slash", "ünïcødé 名前",
             "bird 🐦", "new\nline", "\\N", "  spaced  ", "semi;colon", "NULL"]
    names += [f"user{i:03d}" for i in range(300 - len(names))]
    users = [(i + 1, name, f"{name.strip() or 'x'}@example.org",
              f"pbkdf2:sha256:260000${rng.getrandbits(64):016x}${rng.getrandbits(128):032x}")
             for i, name in enumerate(names)]
    follows = [(rng.randint(1, 300), rng.randint(1, 300)) for _ in range(600)]
    follows += follows[:3]                        # the original app could store a follow twice
    pieces = ["hello", "it's", 'say "hi"', "tab\there", "line1\nline2", "crlf\r\nend",
              "back\\slash", "\\N", "\\\\N", "ünïcødé", "日本語", "🐦🔥", "semi;colon", "%s %(x)s",
              "<b>html</b>", "{\"json\": 1}", "\x08bs \x0bvt \x0cff \x01soh", "trailing\\"]
    numberlike = ["3.14", "1e3", "42", "-7", "0.1", "1.50"]
    messages = []
    ids = [i for i in range(1, 10081) if i % 337]  # gaps, as deleted rows leave them
    for n, mid in enumerate(ids[:10050]):
        if n % 1000 == 7:
            text = numberlike[(n // 1000) % len(numberlike)]
        elif n == 5:
            text = "long " * 1500
        elif n == 6:
            text = ""
        else:
            text = " ".join(rng.sample(pieces, rng.randint(1, 5)))
        pub = None if n % 97 == 0 else 1_600_000_000 + n * 37
        flag = None if n % 89 == 0 else n % 2
        messages.append((mid, rng.randint(1, 300), text, pub, flag))
    return {"user": users, "follower": follows, "message": messages, "latest": [(1, 123456)]}


@pytest.fixture
def workdir():
    with tempfile.TemporaryDirectory(prefix="mtha-migrate-test-") as tmp:
        path = Path(tmp)
        (path / "tmp").mkdir()                    # the tool's TMPDIR: must be empty afterwards
        (path / "bin").mkdir()
        yield path


# -- helpers -------------------------------------------------------------------------------------
def new_db(server: PgServer, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    server.create_database(name)
    return name


def make_pg_source(server: PgServer, data: dict) -> str:
    db = new_db(server, "src")
    with psycopg.connect(server.uri(db)) as conn:
        conn.execute(PG_SCHEMA)
        with conn.cursor() as cur:
            for table, rows in data.items():
                cols = ", ".join(f'"{c}"' for c in COLUMNS[table])
                with cur.copy(f'COPY "{table}" ({cols}) FROM STDIN') as copy:
                    for row in rows:
                        copy.write_row(row)
            cur.execute("SELECT setval('user_user_id_seq', 300)")
    return server.uri(db)


def make_sqlite_source(path: Path, data: dict) -> Path:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SQLITE_SCHEMA)
        conn.executemany("insert into user values (?, ?, ?, ?)", data["user"])
        conn.executemany("insert into follower values (?, ?)", data["follower"])
        conn.executemany("insert into message values (?, ?, ?, ?, ?)", data["message"])
        conn.commit()
    finally:
        conn.close()
    return path


def as_text(value):
    """What MiniTwit showed for a value of a `string` column: str(), as the original app did.
    SQLite's NUMERIC affinity stored "42" as 42 and "3.14" as 3.14; str() gives them back."""
    return None if value is None else str(value)


def normalise(table: str, rows) -> list[tuple]:
    cols = COLUMNS[table]
    out = [tuple(as_text(v) if c in TEXT_COLUMNS else v for c, v in zip(cols, row, strict=True))
           for row in rows]
    return sorted(out, key=lambda r: [(v is None, v if v is not None else 0) for v in r])


def pg_rows(uri: str, table: str) -> list[tuple]:
    cols = ", ".join(f'"{c}"' for c in COLUMNS[table])
    with psycopg.connect(uri) as conn:
        query = f'SELECT {cols} FROM "{table}"'  # noqa: S608 -- names from COLUMNS
        return normalise(table, conn.execute(query).fetchall())


def sqlite_rows(path: Path, table: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        cols = ", ".join(f'"{c}"' for c in COLUMNS[table])
        query = f'SELECT {cols} FROM "{table}"'  # noqa: S608 -- names from COLUMNS
        return normalise(table, conn.execute(query).fetchall())
    finally:
        conn.close()


def digest(rows: list[tuple]) -> str:
    return hashlib.sha256(repr(rows).encode()).hexdigest()


def assert_same(table: str, expected: list[tuple], actual: list[tuple]) -> None:
    assert len(actual) == len(expected), f"{table}: {len(actual)} rows in target, {len(expected)} in source"
    if digest(actual) != digest(expected):
        first = next(i for i, (a, b) in enumerate(zip(expected, actual, strict=True)) if a != b)
        pytest.fail(f"{table}: first difference at row {first}: source {expected[first]!r} "
                    f"target {actual[first]!r}")


def target_snapshot(uri: str) -> dict[str, str]:
    return {t: digest(pg_rows(uri, t)) for t in COLUMNS}


def wrap_tools(bindir: Path, log: Path) -> None:
    """pg_dump, pg_restore, pgloader first on PATH: record each command line, run the real tool."""
    for name in ("pg_dump", "pg_restore", "pgloader"):
        real = shutil.which(name)
        assert real, name
        script = bindir / name
        script.write_text(f'#!/bin/sh\nprintf "%s\\n" "{name} $*" >> "{log}"\nexec "{real}" "$@"\n')
        script.chmod(stat.S_IRWXU)


def run_tool(workdir: Path, *args: str, **env_uris: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PGPASSWORD", None)
    env.update(env_uris)
    env["TMPDIR"] = str(workdir / "tmp")
    env["PATH"] = f"{workdir / 'bin'}:{env['PATH']}"
    return subprocess.run([sys.executable, str(TOOL), *args], env=env, capture_output=True,
                          text=True, timeout=180, check=False)


def table_lines(stdout: str) -> dict[str, str]:
    return {ln.split()[0]: ln for ln in stdout.splitlines() if ln.strip()}


# -- tests ---------------------------------------------------------------------------------------
def test_migrates_from_postgres_verifies_refuses_and_force_replaces(servers, dataset, workdir):
    src_pg, tgt_pg, _ = servers
    source = make_pg_source(src_pg, dataset)
    target = tgt_pg.uri(new_db(tgt_pg, "tgt"))
    wrap_tools(workdir / "bin", workdir / "argv.log")
    uris = {"MT_SRC": source, "MT_TGT": target}
    outputs = []

    first = run_tool(workdir, "--from", "env:MT_SRC", "--to", "env:MT_TGT", **uris)
    outputs.append(first.stdout + first.stderr)
    assert first.returncode == 0, first.stderr
    lines = table_lines(first.stdout)
    for table in ("user", "follower", "message", "latest"):
        assert_same(table, pg_rows(source, table), pg_rows(target, table))
        assert " ok " in lines[table], first.stdout
    assert "10050" in lines["message"]

    # The app's next inserts continue after the highest copied id, not at 1 or at the row count.
    before = target_snapshot(target)
    again = run_tool(workdir, "--from", "env:MT_SRC", "--to", "env:MT_TGT", **uris)
    outputs.append(again.stdout + again.stderr)
    assert again.returncode == 4, again.stderr
    assert "not empty" in again.stderr and "--force" in again.stderr
    assert "message: 10050 rows" in again.stderr
    assert target_snapshot(target) == before

    with psycopg.connect(target) as conn:
        uid = conn.execute("INSERT INTO \"user\" (username, email, pw_hash) VALUES ('fresh', 'f@x', 'h')"
                           " RETURNING user_id").fetchone()[0]
        mid = conn.execute("INSERT INTO message (author_id, text, pub_date, flagged)"
                           " VALUES (1, 'after migration', 1, 0) RETURNING message_id").fetchone()[0]
        conn.execute("DELETE FROM follower WHERE who_id < 50")
    assert uid == 301
    assert mid == max(m[0] for m in dataset["message"]) + 1

    forced = run_tool(workdir, "--from", "env:MT_SRC", "--to", "env:MT_TGT", "--force", **uris)
    outputs.append(forced.stdout + forced.stderr)
    assert forced.returncode == 0, forced.stderr
    for table in ("user", "follower", "message", "latest"):
        assert_same(table, pg_rows(source, table), pg_rows(target, table))

    argv = (workdir / "argv.log").read_text()
    assert "pg_dump " in argv and "pg_restore " in argv
    for secret in (src_pg.password, tgt_pg.password):
        assert secret not in argv
        for out in outputs:
            assert secret not in out
    assert list((workdir / "tmp").iterdir()) == []


def test_migrates_from_sqlite_with_pgloader(servers, dataset, workdir):
    _, tgt_pg, _ = servers
    db = make_sqlite_source(workdir / "minitwit.db", dataset)
    target = tgt_pg.uri(new_db(tgt_pg, "tgt"))
    wrap_tools(workdir / "bin", workdir / "argv.log")
    (workdir / "target.uri").write_text(target + "\n")
    (workdir / "target.uri").chmod(0o600)
    outputs = []

    first = run_tool(workdir, "--from", f"sqlite://{db}", "--to", f"@{workdir / 'target.uri'}")
    outputs.append(first.stdout + first.stderr)
    assert first.returncode == 0, first.stderr
    lines = table_lines(first.stdout)
    for table in ("user", "follower", "message"):
        assert_same(table, sqlite_rows(db, table), pg_rows(target, table))
        assert " ok " in lines[table], first.stdout
    assert "pgloader " in (workdir / "argv.log").read_text()

    # What a MiniTwit user sees: the number-like texts SQLite kept as numbers read as before.
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM \"user\" WHERE username = '42'").fetchone()[0] == 1
        texts = {r[0] for r in conn.execute("SELECT text FROM message WHERE length(text) < 6")}
        assert {"3.14", "1000", "42", "-7", "0.1", "1.5"} <= texts
        assert conn.execute("SELECT count(*) FROM message WHERE text ~ '^[0-9.e+-]+d[0-9]+$'"
                            ).fetchone()[0] == 0
        uid = conn.execute("INSERT INTO \"user\" (username, email, pw_hash) VALUES ('fresh', 'f', 'h')"
                           " RETURNING user_id").fetchone()[0]
        mid = conn.execute("INSERT INTO message (author_id, text) VALUES (1, 'x') RETURNING message_id"
                           ).fetchone()[0]
    assert uid == 301
    assert mid == max(m[0] for m in dataset["message"]) + 1

    before = target_snapshot(target)
    again = run_tool(workdir, "--from", str(db), "--to", f"@{workdir / 'target.uri'}")
    outputs.append(again.stdout + again.stderr)
    assert again.returncode == 4, again.stderr
    assert "not empty" in again.stderr and "--force" in again.stderr
    assert target_snapshot(target) == before

    forced = run_tool(workdir, "--from", str(db), "--to", f"@{workdir / 'target.uri'}", "--force")
    outputs.append(forced.stdout + forced.stderr)
    assert forced.returncode == 0, forced.stderr
    for table in ("user", "follower", "message"):
        assert_same(table, sqlite_rows(db, table), pg_rows(target, table))

    argv = (workdir / "argv.log").read_text()
    assert tgt_pg.password not in argv
    for out in outputs:
        assert tgt_pg.password not in out
    assert list((workdir / "tmp").iterdir()) == []


def test_a_corrupted_copy_is_reported_as_a_mismatch(servers, dataset, workdir):
    src_pg, tgt_pg, _ = servers
    source = make_pg_source(src_pg, dataset)
    target = tgt_pg.uri(new_db(tgt_pg, "tgt"))
    # A target that changes one message on the way in (the tool keeps canonical tables and their
    # triggers): the copy "succeeds", only verification can notice.
    schema = (ROOT / "scripts" / "minitwit_schema.sql").read_text()
    with psycopg.connect(target) as conn:
        conn.execute(schema)
        conn.execute("""
            CREATE FUNCTION garble() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN IF NEW.message_id = 500 THEN NEW.text := NEW.text || '!'; END IF; RETURN NEW; END $$;
            CREATE TRIGGER garble BEFORE INSERT ON message FOR EACH ROW EXECUTE FUNCTION garble();
        """)
    result = run_tool(workdir, "--from", "env:MT_SRC", "--to", "env:MT_TGT", MT_SRC=source, MT_TGT=target)
    assert result.returncode == 1, result.stderr
    lines = table_lines(result.stdout)
    assert "MISMATCH" in lines["message"]
    assert " ok " in lines["user"] and " ok " in lines["follower"]
    assert "verification failed for message" in result.stderr


@pytest.mark.parametrize("side", ["source", "target"])
def test_wrong_password_fails_fast_naming_the_side(servers, dataset, workdir, side):
    src_pg, tgt_pg, _ = servers
    uris = {"MT_SRC": src_pg.uri("postgres"), "MT_TGT": tgt_pg.uri("postgres")}
    bad = "not-" + uuid.uuid4().hex
    key = "MT_SRC" if side == "source" else "MT_TGT"
    server = src_pg if side == "source" else tgt_pg
    uris[key] = server.uri("postgres", password=bad)
    started = time.monotonic()
    result = run_tool(workdir, "--from", "env:MT_SRC", "--to", "env:MT_TGT", **uris)
    elapsed = time.monotonic() - started
    assert result.returncode == 3, result.stderr
    assert elapsed < 5
    error = [ln for ln in result.stderr.splitlines() if "error:" in ln]
    assert len(error) == 1, result.stderr
    assert f"error: {side}:" in error[0]
    assert "password authentication failed" in error[0]
    for secret in (bad, src_pg.password, tgt_pg.password):
        assert secret not in result.stdout + result.stderr


def test_unreachable_source_fails_fast(servers, workdir):
    _, tgt_pg, closed_port = servers
    started = time.monotonic()
    result = run_tool(workdir, "--from", "env:MT_SRC", "--to", "env:MT_TGT",
                      MT_SRC=f"postgresql://postgres:pw@127.0.0.1:{closed_port}/minitwit",
                      MT_TGT=tgt_pg.uri("postgres"))
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started < 5
    assert "error: source:" in result.stderr and "refused" in result.stderr


def test_bad_sqlite_sources_are_refused_before_the_target_is_touched(servers, workdir):
    _, tgt_pg, _ = servers
    target = tgt_pg.uri(new_db(tgt_pg, "tgt"))
    not_db = workdir / "notes.txt"
    not_db.write_text("this is not a database\n" * 100)
    other = workdir / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("create table user (user_id integer primary key, name text)")
    conn.close()
    cases = [(workdir / "missing.db", "no such file"),
             (not_db, "not a readable SQLite database"),
             (other, "not MiniTwit's database")]
    for path, message in cases:
        result = run_tool(workdir, "--from", str(path), "--to", target)   # literal URI on purpose
        assert result.returncode == 2, (path, result.stderr)
        assert "error: source:" in result.stderr and message in result.stderr
        # Given literally, the password is warned about but never echoed.
        assert "command line" in result.stderr
        assert tgt_pg.password not in result.stdout + result.stderr
    with psycopg.connect(target) as conn:
        assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
                            ).fetchone()[0] == 0
