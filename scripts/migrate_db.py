#!/usr/bin/env python3
"""Move ITU-MiniTwit's data once from its original server into the shared PostgreSQL.

Runs from an operator's laptop or CI, never on a droplet. The target gets the canonical schema
(scripts/minitwit_schema.sql, next to this file); the source's rows are copied into it by
well-kept tools (pg_dump/pg_restore, pgloader), then every table is verified by row count and
content checksum on both sides. See docs/migration.md for the whole procedure.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

PROG = "migrate_db"
APP_USER = "minitwit"   # the app's role in a managed stack (infra/database.py)
SCHEMA_FILE = Path(__file__).resolve().with_name("minitwit_schema.sql")

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_USAGE = 2
EXIT_CONNECT = 3
EXIT_NOT_EMPTY = 4
EXIT_COPY = 5
EXIT_RIGHTS = 6

# The canonical tables, their columns in order, and each column's kind: "int" or "text".
# `user`, `follower`, `message` are the original MiniTwit schema; `latest` is ours (the
# simulator's last-seen request id) and is copied only when the source has it.
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "user": (("user_id", "int"), ("username", "text"), ("email", "text"), ("pw_hash", "text")),
    "follower": (("who_id", "int"), ("whom_id", "int")),
    "message": (("message_id", "int"), ("author_id", "int"), ("text", "text"), ("pub_date", "int"),
                ("flagged", "int")),
    "latest": (("id", "int"), ("value", "int")),
}
REQUIRED = ("user", "follower", "message")
OPTIONAL = ("latest",)
PRIMARY_KEYS = {"user": "user_id", "message": "message_id", "latest": "id"}
SERIALS = {"user": "user_id", "message": "message_id"}
# Columns the canonical schema declares NOT NULL (source rows violating it are refused up front).
NOT_NULL = {"user": ("user_id", "username", "email", "pw_hash"), "follower": ("who_id", "whom_id"),
            "message": ("message_id", "author_id", "text"), "latest": ("id", "value")}
# PostgreSQL types of the canonical columns (format_type spelling) for the target's shape check.
PG_TYPES = {"int": "integer", "text": "text"}
PG_TYPE_OVERRIDES = {("latest", "value"): "bigint"}
INT4 = (-(2**31), 2**31 - 1)
INT8 = (-(2**63), 2**63 - 1)

HELP_EPILOG = """\
SOURCE is one of
  postgresql://USER:PASSWORD@HOST:PORT/DBNAME[?sslmode=...]   the original server's PostgreSQL
  /path/to/minitwit.db  or  sqlite:///path/to/minitwit.db     the original SQLite file
TARGET is a postgresql:// URI (the managed cluster; DigitalOcean's needs ?sslmode=require), or
  stack:NAME    the app's own database and user from the Pulumi stack NAME's secret output
                database_uri (`pulumi stack output --show-secrets --json --stack NAME`; the
                command is $MIGRATE_PULUMI, default `pulumi`). Recommended: the app's database,
                not doadmin's defaultdb.
Both also accept
  env:VARNAME   the value of an environment variable (recommended: no password in argv)
  @/path/file   the first line of a file (recommended; keep the file mode 0600)
A password written literally on the command line is visible to every local user (ps) and lands
in shell history: the tool warns. Passwords reach pg_dump/pg_restore/pgloader only through
their environment (PGPASSWORD), never their command line, and are masked in all output.

What it does
  1. checks both ends: connects (--timeout), source has MiniTwit's schema and loadable data,
     target holds no data (else exit 4 unless --force)
  2. target: applies scripts/minitwit_schema.sql; MiniTwit's tables (user, follower, message,
     latest) are emptied (kept when their shape is canonical, so grants survive) or recreated
  3. copies the rows, data only, into that schema:
       PostgreSQL source: pg_dump --format=custom --data-only | pg_restore --no-owner
                          --no-privileges --single-transaction (table data entries only)
       SQLite source:     pgloader (CAST type string to text), guarded: see below
  4. resets the SERIAL sequences to max(id), so the app's next insert continues after it
  5. verifies user, follower, message (and latest when the source has it): row counts and a
     SHA-256 over each table's rows in key order, rendered the same way on both sides; prints
     "table  source  target  checksum" on stdout
Other tables in the target are never touched.

Exit codes
  0  copied and verified
  1  verification mismatch (the table shows which table; was the app still writing?)
  2  usage or bad input: bad URI, unset env var, unreadable @file, missing SQLite file, a file
     that is not MiniTwit's schema, source rows the shared schema cannot hold (duplicate
     usernames, NULL ids, NUL characters, invalid UTF-8), source and target the same database
  3  connection or authentication failure (message names the side: source or target)
  4  target not empty and no --force (message lists what it found)
  5  a copy tool failed or is missing (its last error lines are shown, passwords masked)
  6  copied and verified, but the app's user (--app-user) cannot read or write a migrated table:
     the app would see an empty or failing timeline (run `pulumi up`: its db-grants step fixes it)

SSL: pg_dump/pg_restore/psycopg follow libpq (sslmode=require encrypts, verify-full also checks
the certificate with sslrootcert=). pgloader always verifies the server certificate when SSL is
used: for a SQLite source, add sslrootcert=/path/to/ca-certificate.crt (DigitalOcean: the
cluster's CA certificate) to the TARGET URI.
"""


class Fail(Exception):
    """A failure with its exit code; the message is one line, already password-masked."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- output --------------------------------------------------------------------------------------
_SECRETS: list[str] = []


def redact(text: str) -> str:
    """Mask every known password (raw and URI-encoded) and any user:password@ in URIs."""
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    return re.sub(r"(password=)[^&\s]*", r"\1***", text, flags=re.IGNORECASE)


def remember_secret(secret: str | None) -> None:
    if secret:
        for form in {secret, quote(secret, safe=""), quote(secret)}:
            if form and form not in _SECRETS:
                _SECRETS.append(form)
        _SECRETS.sort(key=len, reverse=True)


def log(message: str) -> None:
    print(f"{PROG}: {redact(message)}", file=sys.stderr, flush=True)


# -- endpoints -----------------------------------------------------------------------------------
@dataclass
class PgEndpoint:
    side: str                      # "source" or "target"
    params: dict[str, str]         # libpq parameters, password included
    conn: psycopg.Connection | None = field(default=None, repr=False)

    @property
    def password(self) -> str | None:
        return self.params.get("password") or None

    @property
    def shown(self) -> str:
        p = self.params
        user = p.get("user", "")
        auth = f"{user}:***@" if self.password else (f"{user}@" if user else "")
        port = f":{p['port']}" if p.get("port") else ""
        extra = f"?sslmode={p['sslmode']}" if p.get("sslmode") else ""
        return f"postgresql://{auth}{p.get('host', '')}{port}/{p.get('dbname', '')}{extra}"

    def conninfo_without_password(self, timeout: int) -> str:
        """What a child gets on its command line: everything but the password."""
        params = {k: v for k, v in self.params.items() if k not in ("password", "sslpassword")}
        params["connect_timeout"] = str(timeout)
        return make_conninfo(**params)

    def child_env(self, timeout: int) -> dict[str, str]:
        env = dict(os.environ)
        env["PGCONNECT_TIMEOUT"] = str(timeout)     # pgloader reads no conninfo; libpq tools do
        env["PGAPPNAME"] = PROG
        if self.password:
            env["PGPASSWORD"] = self.password
        return env


@dataclass
class SqliteSource:
    path: Path
    side: str = "source"

    @property
    def shown(self) -> str:
        return f"SQLite {self.path}"


def stack_output_uri(side: str, stack: str) -> str:
    """The stack's secret `database_uri` output: the app's database as the app's user."""
    command = shlex.split(os.environ.get("MIGRATE_PULUMI", "pulumi"))
    argv = [*command, "stack", "output", "--show-secrets", "--json", "--stack", stack]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    except FileNotFoundError:
        raise Fail(EXIT_USAGE, f"{side}: stack:{stack} needs the Pulumi CLI ({command[0]} not found; "
                               f"install it or set MIGRATE_PULUMI)") from None
    except subprocess.TimeoutExpired:
        raise Fail(EXIT_USAGE, f"{side}: `pulumi stack output` for {stack} did not answer in 120 s") from None
    if proc.returncode != 0:
        raise Fail(EXIT_USAGE, f"{side}: `pulumi stack output --stack {stack}` failed (exit "
                               f"{proc.returncode}):\n" + tail(proc.stderr or proc.stdout))
    try:
        outputs = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise Fail(EXIT_USAGE, f"{side}: `pulumi stack output --json --stack {stack}` did not print JSON") from None
    uri = outputs.get("database_uri") if isinstance(outputs, dict) else None
    if not isinstance(uri, str) or not uri.strip():
        raise Fail(EXIT_USAGE, f"{side}: stack {stack} has no database_uri output (database=none, or a "
                               f"stack last updated before this output existed: run `pulumi up` first)")
    if uri.strip() == "[secret]":
        raise Fail(EXIT_USAGE, f"{side}: stack {stack}'s database_uri came back masked; "
                               f"the command must accept --show-secrets")
    return uri.strip()


def resolve_value(side: str, raw: str) -> tuple[str, bool]:
    """Expand env:VAR, @file and stack:NAME; returns (value, given_literally)."""
    if raw.startswith("stack:"):
        return stack_output_uri(side, raw[len("stack:"):]), False
    if raw.startswith("env:"):
        name = raw[4:]
        value = os.environ.get(name, "")
        if not name or not value.strip():
            raise Fail(EXIT_USAGE, f"{side}: environment variable {name!r} is not set or empty")
        return value.strip(), False
    if raw.startswith("@"):
        path = Path(raw[1:]).expanduser()
        try:
            mode = path.stat().st_mode
            lines = path.read_text().strip().splitlines()
        except OSError as exc:
            raise Fail(EXIT_USAGE, f"{side}: cannot read {path}: {exc.strerror}") from None
        if not lines or not lines[0].strip():
            raise Fail(EXIT_USAGE, f"{side}: {path} is empty")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log(f"warning: {path} is readable by other users; chmod 600 it")
        return lines[0].strip(), False
    return raw, True


def parse_endpoint(side: str, raw: str, allow_sqlite: bool) -> PgEndpoint | SqliteSource:
    value, literal = resolve_value(side, raw)
    if value.startswith(("postgresql://", "postgres://")):
        try:
            params = conninfo_to_dict(value)
        except psycopg.ProgrammingError as exc:
            raise Fail(EXIT_USAGE, f"{side}: not a valid PostgreSQL URI ({redact(value)}): "
                                   f"{one_line(str(exc))}") from None
        params = {k: str(v) for k, v in params.items() if v is not None}
        remember_secret(params.get("password"))
        if literal and params.get("password"):
            log(f"warning: the {side} password was given on the command line, where every local "
                f"user can see it (ps) and shell history keeps it; pass the URI as env:VARNAME or "
                f"@/path/file instead")
        return PgEndpoint(side, params)
    if "://" in value and not value.startswith("sqlite://"):
        scheme = value.split("://", 1)[0]
        raise Fail(EXIT_USAGE, f"{side}: unsupported URI scheme {scheme!r} (want postgresql://"
                               f"{' or a SQLite file' if allow_sqlite else ''})")
    if not allow_sqlite:
        raise Fail(EXIT_USAGE, f"{side}: must be a postgresql:// URI, got {redact(value)!r}")
    # sqlite:///abs/path is /abs/path (pgloader's spelling); a bare path is taken as it is.
    path = value[len("sqlite://"):] if value.startswith("sqlite://") else value
    return SqliteSource(Path(path).expanduser())


def one_line(text: str) -> str:
    return " ".join(text.split())


# -- connecting ----------------------------------------------------------------------------------
def explain_connect_error(exc: Exception, timeout: int) -> str:
    msg = one_line(str(exc))
    low = msg.lower()
    user = re.search(r'password authentication failed for user "([^"]*)"', msg)
    if user:
        return f'password authentication failed for user "{user.group(1)}" (wrong password?)'
    if "no password supplied" in low:
        return "the server wants a password and none was given (put it in the URI, via env:/@file)"
    if "connection refused" in low:
        return "connection refused (is the server up, and are host and port right?)"
    if "timeout expired" in low or "timed out" in low:
        return f"no answer within {timeout} s (host unreachable or filtered; see --timeout)"
    if "could not translate host name" in low:
        return "host name does not resolve"
    # libpq: 'connection failed: connection to server at "h", port p failed: REASON'
    parts = re.split(r"failed:\s*", msg)
    return parts[-1].strip() or msg


def connect(ep: PgEndpoint, timeout: int) -> psycopg.Connection:
    params = dict(ep.params)
    params.setdefault("application_name", PROG)
    # --timeout wins over a connect_timeout in the URI; UTF8 so checksums compare bytes alike.
    params.update(connect_timeout=str(timeout), client_encoding="UTF8")
    try:
        conn = psycopg.connect(**params, autocommit=True)
    except psycopg.Error as exc:
        raise Fail(EXIT_CONNECT, f"{ep.side}: cannot connect to {ep.shown}: "
                                 f"{explain_connect_error(exc, timeout)}") from None
    ep.conn = conn
    return conn


def server_identity(conn: psycopg.Connection) -> tuple:
    return conn.execute(
        "SELECT current_database(), pg_postmaster_start_time(),"
        " (SELECT oid FROM pg_database WHERE datname = current_database())").fetchone()


# -- source inspection ---------------------------------------------------------------------------
@dataclass
class SourcePlan:
    tables: list[str]                                   # canonical tables the source has
    schema: str = "public"                              # PostgreSQL source: its schema
    fixups: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def check_columns(side: str, where: str, table: str, have: list[str]) -> None:
    want = [c for c, _ in TABLES[table]]
    missing = [c for c in want if c not in have]
    extra = [c for c in have if c not in want]
    if missing or extra:
        bits = []
        if missing:
            bits.append(f"missing column(s) {', '.join(missing)}")
        if extra:
            bits.append(f"column(s) the shared schema lacks: {', '.join(extra)}")
        raise Fail(EXIT_USAGE, f"{side}: {where} is not MiniTwit's schema: table {table} has "
                               f"{'; '.join(bits)}")


def inspect_pg_source(ep: PgEndpoint) -> SourcePlan:
    conn = ep.conn
    assert conn is not None
    schema = conn.execute("SELECT current_schema()").fetchone()[0]
    rows = conn.execute(
        "SELECT c.relname, a.attname, t.typcategory, format_type(a.atttypid, a.atttypmod)"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped"
        " JOIN pg_type t ON t.oid = a.atttypid"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND c.relname = ANY(%s)"
        " ORDER BY c.relname, a.attnum", (schema, list(TABLES))).fetchall()
    found: dict[str, list[tuple[str, str, str]]] = {}
    for rel, col, cat, typ in rows:
        found.setdefault(rel, []).append((col, cat, typ))
    where = f"database {ep.params.get('dbname', '')} (schema {schema})"
    missing = [t for t in REQUIRED if t not in found]
    if missing:
        raise Fail(EXIT_USAGE, f"source: {where} is not MiniTwit's schema: no table "
                               f"{', '.join(missing)}")
    plan = SourcePlan(tables=list(REQUIRED), schema=schema)
    for table in REQUIRED:
        check_columns("source", where, table, [c for c, _, _ in found[table]])
        check_pg_types(where, table, found[table])
    if "latest" in found:
        try:
            check_columns("source", where, "latest", [c for c, _, _ in found["latest"]])
            check_pg_types(where, "latest", found["latest"])
            plan.tables.append("latest")
        except Fail as exc:
            plan.notes.append(f"source table latest skipped: {exc}")
    check_pg_content(conn, plan)
    return plan


def check_pg_types(where: str, table: str, cols: list[tuple[str, str, str]]) -> None:
    kinds = dict(TABLES[table])
    for col, cat, typ in cols:
        want = "N" if kinds[col] == "int" else "S"
        if cat != want:
            raise Fail(EXIT_USAGE, f"source: {where}: {table}.{col} is {typ}; the shared schema has "
                                   f"{PG_TYPE_OVERRIDES.get((table, col), PG_TYPES[kinds[col]])}"
                                   f" (convert it before migrating)")


def check_pg_content(conn: psycopg.Connection, plan: SourcePlan) -> None:
    """Refuse, before touching the target, rows the shared schema's constraints would reject."""
    for table in plan.tables:
        cols = NOT_NULL[table]
        cond = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier(c)) for c in cols)
        q = sql.SQL("SELECT count(*) FROM {}.{} WHERE {}").format(
            sql.Identifier(plan.schema), sql.Identifier(table), cond)
        n = conn.execute(q).fetchone()[0]
        if n:
            raise Fail(EXIT_USAGE, f"source: {n} row(s) of {table} have NULL in {', '.join(cols)};"
                                   f" the shared schema requires values (fix or delete them first)")
    dup = conn.execute(
        sql.SQL("SELECT username::text, string_agg(user_id::text, ', ' ORDER BY user_id)"
                " FROM {}.{} GROUP BY username::text HAVING count(*) > 1 LIMIT 3").format(
            sql.Identifier(plan.schema), sql.Identifier("user"))).fetchall()
    if dup:
        raise Fail(EXIT_USAGE, "source: duplicate usernames ("
                   + "; ".join(f"{name!r}: user_id {ids}" for name, ids in dup)
                   + "); the shared schema allows one user per name (rename or merge first)")


def open_sqlite(src: SqliteSource) -> sqlite3.Connection:
    path = src.path
    if not path.exists():
        raise Fail(EXIT_USAGE, f"source: no such file: {path}")
    if not path.is_file():
        raise Fail(EXIT_USAGE, f"source: not a regular file: {path}")
    try:
        conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=5)
        conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.DatabaseError as exc:
        raise Fail(EXIT_USAGE, f"source: {path} is not a readable SQLite database ({exc})") from None
    # Text comes back as bytes so that invalid UTF-8 is found here, not half-way through a load.
    conn.text_factory = bytes
    return conn


def render(value: object) -> str | None:
    """A SQLite value as the text PostgreSQL must hold: the ONE normalisation rule.

    MiniTwit's `string` columns have SQLite's NUMERIC affinity, so a username typed as "42" is
    stored as the integer 42 and a message "3.14" as the real 3.14 (the original text is gone
    already). The original app showed them with Python's str(); so do we: int -> "42",
    float -> repr ("3.14", "1e+20"), text/blob -> the UTF-8 text.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8")       # UnicodeDecodeError is reported by the caller
    if isinstance(value, float):
        return repr(value)
    return str(value)


def inspect_sqlite_source(src: SqliteSource, conn: sqlite3.Connection) -> SourcePlan:
    names = {r[0].decode() if isinstance(r[0], bytes) else r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    where = str(src.path)
    missing = [t for t in REQUIRED if t not in names]
    if missing:
        have = ", ".join(sorted(n for n in names if not n.startswith("sqlite_"))) or "none"
        raise Fail(EXIT_USAGE, f"source: {where} is not MiniTwit's database: no table "
                               f"{', '.join(missing)} (tables: {have})")
    plan = SourcePlan(tables=list(REQUIRED))
    for table in [*REQUIRED, *[t for t in OPTIONAL if t in names]]:
        cols = [r[1].decode() if isinstance(r[1], bytes) else r[1]
                for r in conn.execute(f'PRAGMA table_info("{table}")')]
        try:
            check_columns("source", where, table, cols)
        except Fail as exc:
            if table in REQUIRED:
                raise
            plan.notes.append(f"source table {table} skipped: {exc}")
            continue
        if table not in plan.tables:
            plan.tables.append(table)
    check_sqlite_content(conn, plan)
    return plan


def check_sqlite_content(conn: sqlite3.Connection, plan: SourcePlan) -> None:
    """One pass over the source: refuse what the shared schema cannot hold, and note the rows
    whose text pgloader would garble (reals in text columns, see pgloader_setup)."""
    usernames: dict[str, int] = {}
    for table in plan.tables:
        cols = TABLES[table]
        pk = PRIMARY_KEYS.get(table)
        names = ", ".join(f'"{c}", typeof("{c}")' for c, _ in cols)
        fixups: list[tuple[int, dict[str, str]]] = []
        query = f'SELECT {names} FROM "{table}"'  # noqa: S608 -- names from TABLES, not input
        for rownum, both in enumerate(conn.execute(query), start=1):
            row, types = both[0::2], both[1::2]
            ident = f"{pk} {row[0]}" if pk else f"row {rownum}"
            fix: dict[str, str] = {}
            for (col, kind), value, typ in zip(cols, row, types, strict=True):
                where = f"source: {table}.{col} of {ident}"
                if value is None:
                    if col in NOT_NULL[table]:
                        raise Fail(EXIT_USAGE, f"{where} is NULL; the shared schema requires a value"
                                               f" (fix or delete the row first)")
                    continue
                if kind == "int":
                    lo, hi = INT8 if (table, col) in PG_TYPE_OVERRIDES else INT4
                    if not isinstance(value, int) or not lo <= value <= hi:
                        shown = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                        raise Fail(EXIT_USAGE, f"{where} holds {shown!r}, which is not an integer the"
                                               f" shared schema's {PG_TYPES['int']} column can hold")
                    continue
                try:
                    text = render(value)
                except UnicodeDecodeError:
                    raise Fail(EXIT_USAGE, f"{where} is not valid UTF-8") from None
                assert text is not None
                if "\x00" in text:
                    raise Fail(EXIT_USAGE, f"{where} contains a NUL character, which PostgreSQL text"
                                           f" cannot hold (pgloader would silently cut it there)")
                if typ in (b"real", b"blob", "real", "blob"):
                    fix[col] = text     # pgloader would write 3.14 as "3.14d0"; see fix_reals
                if table == "user" and col == "username":
                    if text in usernames:
                        raise Fail(EXIT_USAGE, f"source: username {text!r} is used by user_id "
                                               f"{usernames[text]} and {row[0]}; the shared schema "
                                               f"allows one user per name (rename or merge first)")
                    usernames[text] = row[0]
            if fix and pk:
                fixups.append((row[0], fix))
        if fixups:
            plan.fixups[table] = fixups


# -- target --------------------------------------------------------------------------------------
def target_contents(conn: psycopg.Connection) -> tuple[list[str], list[str]]:
    """(MiniTwit tables with rows and their counts, other tables that hold rows)."""
    schema = conn.execute("SELECT current_schema()").fetchone()[0]
    if schema is None:
        raise Fail(EXIT_USAGE, "target: no schema on the search_path exists (create one, e.g. public)")
    tables = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition"
        " AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_%'"
        " ORDER BY 1, 2").fetchall()
    ours, others = [], []
    for nsp, rel in tables:
        ident = sql.Identifier(nsp, rel)
        if nsp == schema and rel in REQUIRED:
            n = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()[0]
            if n:
                ours.append(f"{rel}: {n} rows")
        elif not (nsp == schema and rel in OPTIONAL):
            try:
                with conn.transaction():
                    has = conn.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(ident)
                                       ).fetchone()[0]
            except psycopg.Error as exc:
                others.append(f"{nsp}.{rel} (cannot read it: {one_line(str(exc))[:80]})")
                continue
            if has:
                others.append(f"{nsp}.{rel}")
    return ours, others


def prepare_target(conn: psycopg.Connection) -> None:
    """Empty MiniTwit's tables in one transaction: a table of canonical shape is truncated (its
    owner and grants survive, so the app's role keeps its rights), any other shape is dropped;
    then the canonical schema script (idempotent) creates what is missing."""
    script = SCHEMA_FILE.read_text()
    schema = conn.execute("SELECT current_schema()").fetchone()[0]
    try:
        with conn.transaction():
            for table in TABLES:
                cols = conn.execute(
                    "SELECT a.attname, format_type(a.atttypid, a.atttypmod)"
                    " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p')"
                    " AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                    (schema, table)).fetchall()
                if not cols:
                    continue
                want = [(c, PG_TYPE_OVERRIDES.get((table, c), PG_TYPES[k])) for c, k in TABLES[table]]
                ident = sql.Identifier(table)
                if [tuple(c) for c in cols] == want:
                    conn.execute(sql.SQL("TRUNCATE {} RESTART IDENTITY").format(ident))
                else:
                    conn.execute(sql.SQL("DROP TABLE {}").format(ident))
            conn.execute(script)
    except psycopg.Error as exc:
        raise Fail(EXIT_COPY, f"target: preparing MiniTwit's tables failed: {one_line(str(exc))}"
                   ) from None


def role_exists(conn: psycopg.Connection, role: str) -> bool:
    return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %s)", (role,)).fetchone()[0]


# What the app does to each table (the simulator API and the web app both read and write).
APP_TABLE_RIGHTS = ("SELECT", "INSERT", "UPDATE", "DELETE")


def app_rights_problems(conn: psycopg.Connection, role: str, tables: list[str]) -> list[str]:
    """What `role` may not do to the migrated tables and their id sequences, e.g. "SELECT on user".
    Each right is asked on its own: has_table_privilege with a list is true if ANY is held."""
    schema = conn.execute("SELECT current_schema()").fetchone()[0]
    missing = []
    for table in tables:
        rel = sql.Identifier(schema, table).as_string(conn)
        for right in APP_TABLE_RIGHTS:
            if not conn.execute("SELECT has_table_privilege(%s, %s, %s)", (role, rel, right)).fetchone()[0]:
                missing.append(f"{right} on {table}")
        if table in SERIALS:
            seq = conn.execute("SELECT pg_get_serial_sequence(%s, %s)", (rel, SERIALS[table])).fetchone()[0]
            if seq and not conn.execute("SELECT has_sequence_privilege(%s, %s, 'USAGE')",
                                        (role, seq)).fetchone()[0]:
                missing.append(f"USAGE on sequence {seq}")
    return missing


def reset_sequences(conn: psycopg.Connection) -> None:
    for table, col in SERIALS.items():
        conn.execute(sql.SQL(
            "SELECT setval(pg_get_serial_sequence({tab}, {col}),"
            " COALESCE((SELECT max({c}) FROM {t}), 0) + 1, false)").format(
            tab=sql.Literal(sql.Identifier(table).as_string(conn)), col=sql.Literal(col),
            c=sql.Identifier(col), t=sql.Identifier(table)))


# -- copying -------------------------------------------------------------------------------------
def find_tool(name: str) -> str:
    path = shutil.which(name)
    if not path:
        pkg = "pgloader" if name == "pgloader" else "postgresql-client"
        raise Fail(EXIT_COPY, f"{name} not found on PATH (Debian/Ubuntu: apt-get install {pkg})")
    return path


def tool_major(path: str) -> int | None:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"(\d+)(?:\.\d+)?", out)
    return int(m.group(1)) if m else None


def run_tool(name: str, argv: list[str], env: dict[str, str], side: str) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise Fail(EXIT_COPY, f"{side}: cannot run {name}: {exc}") from None
    if proc.returncode != 0:
        raise Fail(EXIT_COPY, f"{side}: {name} failed (exit {proc.returncode}):\n"
                   + tail(proc.stderr or proc.stdout))
    return proc


def tail(text: str, lines: int = 12) -> str:
    kept = [ln for ln in text.strip().splitlines() if ln.strip()][-lines:]
    return "\n".join("    " + redact(ln) for ln in kept)


def copy_pg_to_pg(src: PgEndpoint, tgt: PgEndpoint, plan: SourcePlan, work: Path, timeout: int) -> None:
    pg_dump, pg_restore = find_tool("pg_dump"), find_tool("pg_restore")
    dump, listing = work / "source.dump", work / "restore.list"
    tables = [f'--table="{plan.schema.replace(chr(34), chr(34) * 2)}"."{t}"' for t in plan.tables]
    log(f"copying with pg_dump --format=custom --data-only {' '.join(plan.tables)} ...")
    run_tool("pg_dump", [pg_dump, "--format=custom", "--data-only", f"--file={dump}", *tables,
                         f"--dbname={src.conninfo_without_password(timeout)}"],
             src.child_env(timeout), "source")
    toc = run_tool("pg_restore", [pg_restore, "--list", str(dump)], dict(os.environ), "source")
    # Only the rows: the target already has the canonical schema, and the source's sequence
    # names need not match ours (we reset the sequences ourselves afterwards).
    entries = [ln for ln in toc.stdout.splitlines() if not ln.startswith(";") and " TABLE DATA " in ln]
    listing.write_text("\n".join(entries) + "\n")
    log("restoring with pg_restore --data-only --no-owner --no-privileges --single-transaction ...")
    run_tool("pg_restore", [pg_restore, "--data-only", "--no-owner", "--no-privileges",
                            "--single-transaction", "--exit-on-error", f"--use-list={listing}",
                            f"--dbname={tgt.conninfo_without_password(timeout)}", str(dump)],
             tgt.child_env(timeout), "target")


_PGLOADER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_PGLOADER_PROBLEM = re.compile(r"\b(ERROR|FATAL)\b|KABOOM")


def pgloader_target(tgt: PgEndpoint) -> tuple[str, dict[str, str]]:
    """The target as pgloader's URI (no password) plus extra environment for it."""
    p = tgt.params
    host, user, db = p.get("host", ""), p.get("user", ""), p.get("dbname", "")
    for what, value in (("host", host), ("user", user), ("database name", db)):
        if not value or not _PGLOADER_NAME.match(value):
            raise Fail(EXIT_USAGE, f"target: pgloader needs a plain TCP {what} (letters, digits, "
                                   f"._-) in the URI, got {value!r}")
    env: dict[str, str] = {}
    mode = p.get("sslmode", "")
    query = ""
    if mode in ("verify-ca", "verify-full"):
        query = "?sslmode=require"          # pgloader knows no verify-*; it verifies anyway
    elif mode in ("disable", "allow", "prefer", "require"):
        query = f"?sslmode={mode}"
    root = p.get("sslrootcert") or os.environ.get("PGSSLROOTCERT")
    if root:
        # pgloader (OpenSSL through cl+ssl) verifies the server certificate against OpenSSL's
        # default store; SSL_CERT_FILE points that store at the cluster's CA.
        env["SSL_CERT_FILE"] = str(Path(root).expanduser())
    return f"postgresql://{user}@{host}:{p.get('port', '5432')}/{db}{query}", env


def pgloader_setup(src: SqliteSource, tgt: PgEndpoint, plan: SourcePlan, work: Path,
                   timeout: int) -> tuple[list[str], dict[str, str]]:
    """SQLite -> the canonical schema with pgloader, data only: its command file and environment.

    pgloader 3.6.9 (Debian 12) is used with guards, each found on this machine:
    - it exits 0 even when rows were rejected (duplicate key, NOT NULL, bad UTF-8), also with
      `on error stop`, and even on a FATAL connection error: so any ERROR/FATAL line in its log
      is a failure here;
    - it cuts text at a NUL character without a word, and drops rows with invalid UTF-8:
      check_sqlite_content() refuses those up front;
    - it writes a SQLite REAL found in a text column in Lisp syntax ("3.14" -> "3.14d0",
      dimitri/pgloader#249, #747): those few rows are rewritten afterwards (fix_reals);
    - it verifies the server certificate even with sslmode=require: see pgloader_target(), and
      a --dry-run checks its connection before the target is touched.
    SCRAM authentication against PostgreSQL 15 works. The verification step checks the result.
    """
    pgloader = find_tool("pgloader")
    path = str(src.path.resolve())
    if "'" in path or any(ord(ch) < 32 for ch in path):
        raise Fail(EXIT_USAGE, f"source: pgloader cannot take a path with quotes or control "
                               f"characters: {path!r} (copy or rename the file)")
    uri, extra_env = pgloader_target(tgt)
    tables = ", ".join(f"'{t}'" for t in plan.tables)
    command = work / "minitwit.load"
    command.write_text(
        "LOAD DATABASE\n"
        f"  FROM '{path}'\n"
        f"  INTO {uri}\n"
        "  WITH data only, on error stop, workers = 2, concurrency = 1\n"
        "  CAST type string to text drop typemod\n"          # MiniTwit's `string` columns
        f"  INCLUDING ONLY TABLE NAMES LIKE {tables};\n")
    argv = [pgloader, "--root-dir", str(work / "pgloader"), str(command)]
    return argv, tgt.child_env(timeout) | extra_env


def run_pgloader(argv: list[str], env: dict[str, str], dry_run: bool) -> None:
    if dry_run:
        argv = [argv[0], "--dry-run", *argv[1:]]
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise Fail(EXIT_COPY, f"target: cannot run pgloader: {exc}") from None
    output = proc.stdout + "\n" + proc.stderr
    problems = [ln for ln in output.splitlines() if _PGLOADER_PROBLEM.search(ln)]
    if proc.returncode == 0 and not problems:
        return
    hint = ""
    if "SSL verify error" in output:
        hint = ("\n  pgloader verifies the server certificate: add sslrootcert=/path/to/"
                "ca-certificate.crt (the cluster's CA certificate) to the TARGET URI")
    if dry_run:
        raise Fail(EXIT_CONNECT, "target: pgloader cannot connect (checked before touching the "
                                 "target):\n" + tail("\n".join(problems) or output) + hint)
    raise Fail(EXIT_COPY, f"target: pgloader failed (exit {proc.returncode}, {len(problems)} error "
                          f"line(s)):\n" + tail("\n".join(problems) or output) + hint)


def fix_reals(conn: psycopg.Connection, plan: SourcePlan) -> None:
    for table, rows in plan.fixups.items():
        pk = PRIMARY_KEYS[table]
        with conn.transaction():
            for key, values in rows:
                sets = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in values)
                conn.execute(sql.SQL("UPDATE {} SET {} WHERE {} = %s").format(
                    sql.Identifier(table), sets, sql.Identifier(pk)), [*values.values(), key])
        log(f"rewrote {len(rows)} {table} row(s) whose text SQLite held as a real or blob "
            f"(pgloader renders 3.14 as 3.14d0)")


# -- verification --------------------------------------------------------------------------------
# Rows are compared as PostgreSQL's COPY text format renders them (ints in decimal, text with
# \\ \b \f \n \r \t \v escaped, NULL as \N, tab between columns), ordered by every column (the
# primary key first; text in byte order, i.e. COLLATE "C"). The PostgreSQL sides produce that with
# COPY itself; the SQLite side renders the same bytes in Python (render() + copy_field()).
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                               "\t": "\\t", "\v": "\\v"})


def copy_field(text: str | None) -> str:
    return "\\N" if text is None else text.translate(_COPY_ESCAPES)


def order_columns(table: str) -> list[tuple[str, str]]:
    cols = list(TABLES[table])
    return sorted(cols, key=lambda c: c[1] != "int")   # ints (pk first) then text, stable


def pg_summary(conn: psycopg.Connection, schema: str | None, table: str) -> tuple[int, str]:
    cols = TABLES[table]
    select = sql.SQL(", ").join(
        sql.SQL("{}::bigint" if k == "int" else "{}::text").format(sql.Identifier(c)) for c, k in cols)
    order = sql.SQL(", ").join(
        sql.SQL("{}" if k == "int" else '{} COLLATE "C"').format(sql.Identifier(c))
        for c, k in order_columns(table))
    rel = sql.Identifier(schema, table) if schema else sql.Identifier(table)
    query = sql.SQL("COPY (SELECT {} FROM {} ORDER BY {}) TO STDOUT").format(select, rel, order)
    digest, rows = hashlib.sha256(), 0
    with conn.cursor() as cur, cur.copy(query) as copy:
        for block in copy:
            data = bytes(block)
            digest.update(data)
            rows += data.count(b"\n")
    return rows, digest.hexdigest()


def sqlite_summary(conn: sqlite3.Connection, table: str) -> tuple[int, str]:
    cols = TABLES[table]
    names = ", ".join(f'"{c}"' for c, _ in cols)
    order = ", ".join(f'"{c}" NULLS LAST' for c, _ in order_columns(table))
    digest, rows = hashlib.sha256(), 0
    query = f'SELECT {names} FROM "{table}" ORDER BY {order}'  # noqa: S608 -- names from TABLES
    for row in conn.execute(query):
        line = "\t".join(copy_field(render(v)) for v in row) + "\n"
        digest.update(line.encode("utf-8"))
        rows += 1
    return rows, digest.hexdigest()


def verify(summaries: list[tuple[str, tuple[int, str], tuple[int, str]]]) -> bool:
    print(f"{'table':<10} {'source':>10} {'target':>10}  checksum (SHA-256 of the rows)")
    ok = True
    for table, (s_rows, s_sum), (t_rows, t_sum) in summaries:
        same = s_rows == t_rows and s_sum == t_sum
        ok &= same
        verdict = f"ok {s_sum[:16]}" if same else f"MISMATCH source {s_sum[:12]} target {t_sum[:12]}"
        print(f"{table:<10} {s_rows:>10} {t_rows:>10}  {verdict}", flush=True)
    return ok


# -- main ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="migrate_db.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy ITU-MiniTwit's data (user, follower, message, latest) from the original "
                    "server's SQLite file or PostgreSQL into the shared PostgreSQL, then verify "
                    "every table by row count and checksum.",
        epilog=HELP_EPILOG)
    parser.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                        help="postgresql:// URI, SQLite file path or sqlite:///path; or env:VAR, @file")
    parser.add_argument("--to", dest="target", required=True, metavar="TARGET",
                        help="postgresql:// URI of the shared database; or env:VAR, @file")
    parser.add_argument("--force", action="store_true",
                        help="replace MiniTwit's tables in a target that already holds data")
    parser.add_argument("--app-user", metavar="ROLE",
                        help="the role the app connects as, checked after the copy for the rights to "
                             "read and write every migrated table (default: the target's user with "
                             "stack:NAME, else minitwit when that role exists, else the target's user)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="connect timeout in seconds for every connection (default 5; "
                             "libpq's minimum is 2)")
    return parser


def run(args: argparse.Namespace) -> int:
    if not args.timeout > 0 or math.isinf(args.timeout):
        raise Fail(EXIT_USAGE, "--timeout must be a positive number of seconds")
    timeout = max(2, math.ceil(args.timeout))
    started = time.monotonic()
    source = parse_endpoint("source", args.source, allow_sqlite=True)
    target = parse_endpoint("target", args.target, allow_sqlite=False)
    assert isinstance(target, PgEndpoint)

    sqlite_conn: sqlite3.Connection | None = None
    work = Path(tempfile.mkdtemp(prefix="minitwit-migrate-"))     # 0700; dump, pgloader files
    try:
        # 1. both ends reachable; then the source must be MiniTwit's and loadable
        if isinstance(source, SqliteSource):
            sqlite_conn = open_sqlite(source)
        else:
            connect(source, timeout)
        tconn = connect(target, timeout)
        if isinstance(source, SqliteSource):
            assert sqlite_conn is not None
            plan = inspect_sqlite_source(source, sqlite_conn)
            pgloader_argv, pgloader_env = pgloader_setup(source, target, plan, work, timeout)
            run_pgloader(pgloader_argv, pgloader_env, dry_run=True)
        else:
            assert source.conn is not None
            if server_identity(source.conn) == server_identity(tconn):
                raise Fail(EXIT_USAGE, "source and target are the same database")
            plan = inspect_pg_source(source)
            check_pg_dump_version(source.conn)
        log(f"source: {source.shown} ({', '.join(plan.tables)})")
        for note in plan.notes:
            log(f"note: {note}")
        log(f"target: {target.shown}")
        app_user = choose_app_user(args, target, tconn)

        # 2. target must be empty unless --force
        ours, others = target_contents(tconn)
        if ours or others:
            found = "; ".join([*ours, *(f"other table {o} has rows" for o in others)])
            if not args.force:
                raise Fail(EXIT_NOT_EMPTY, f"target is not empty ({found}); --force replaces "
                                           f"MiniTwit's tables (user, follower, message, latest) "
                                           f"and leaves other tables alone")
            log(f"--force: replacing MiniTwit's tables in the target (found {found})")

        # 3. schema, rows, sequences
        prepare_target(tconn)
        if isinstance(source, SqliteSource):
            log(f"copying with pgloader (data only) {' '.join(plan.tables)} ...")
            run_pgloader(pgloader_argv, pgloader_env, dry_run=False)
        else:
            copy_pg_to_pg(source, target, plan, work, timeout)
        fix_reals(tconn, plan)
        reset_sequences(tconn)      # pgloader resets them too; pg_restore of data only does not

        # 4. verify every table on both sides
        summaries = []
        for table in plan.tables:
            if isinstance(source, SqliteSource):
                assert sqlite_conn is not None
                s = sqlite_summary(sqlite_conn, table)
            else:
                assert source.conn is not None
                s = pg_summary(source.conn, plan.schema, table)
            summaries.append((table, s, pg_summary(tconn, None, table)))
        ok = verify(summaries)
        if "latest" not in plan.tables:
            print("latest     (not in the source; the app fills it on the first simulator request)")
        if not ok:
            bad = ", ".join(t for t, s, g in summaries if s != g)
            raise Fail(EXIT_MISMATCH, f"verification failed for {bad}: the target differs from the "
                                      f"source (was the app still writing to the source?); fix the "
                                      f"cause and re-run with --force")
        missing = app_rights_problems(tconn, app_user, plan.tables)
        if missing:
            raise Fail(EXIT_RIGHTS, f"copied and verified, but the app's user {app_user} lacks "
                                    f"{', '.join(missing)}: the app would not see this data. Run `pulumi up` "
                                    f"(its db-grants step grants the rights), or as the tables' owner: GRANT "
                                    f"SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO "
                                    f"{app_user}; GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {app_user}")
        log(f"app user {app_user} can read and write every migrated table")
        log(f"done in {time.monotonic() - started:.1f} s: {len(plan.tables)} tables copied and verified")
        return EXIT_OK
    except psycopg.OperationalError as exc:
        raise Fail(EXIT_CONNECT, f"lost a database connection: {one_line(str(exc))}") from None
    except psycopg.Error as exc:
        raise Fail(EXIT_COPY, f"database error: {one_line(str(exc))}") from None
    except sqlite3.Error as exc:
        raise Fail(EXIT_USAGE, f"source: reading {source.shown} failed: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if sqlite_conn is not None:
            sqlite_conn.close()
        for ep in (source, target):
            if isinstance(ep, PgEndpoint) and ep.conn is not None:
                ep.conn.close()


def choose_app_user(args: argparse.Namespace, target: PgEndpoint, conn: psycopg.Connection) -> str:
    """The role whose rights decide whether the app sees the data (see --app-user)."""
    own = target.params.get("user") or conn.execute("SELECT current_user").fetchone()[0]
    if args.app_user:
        if not role_exists(conn, args.app_user):
            raise Fail(EXIT_USAGE, f"target: --app-user {args.app_user}: no such role on the target "
                                   f"(the user in the app's DATABASE_URL)")
        return args.app_user
    if args.target.startswith("stack:") or own == APP_USER:
        return own
    if role_exists(conn, APP_USER):
        return APP_USER
    log(f"note: no role {APP_USER} on the target; checking the rights of the target's user {own} "
        f"(pass --app-user ROLE for the app's)")
    return own


def check_pg_dump_version(conn: psycopg.Connection) -> None:
    server = conn.info.server_version // 10000
    dump = tool_major(find_tool("pg_dump"))
    find_tool("pg_restore")
    if dump is not None and dump < server:
        raise Fail(EXIT_COPY, f"source: the server is PostgreSQL {server} but pg_dump is {dump}; "
                              f"put a pg_dump >= {server} first on PATH (e.g. /usr/lib/postgresql/"
                              f"{server}/bin)")


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # SIGTERM unwinds like Ctrl-C: subprocess.run kills the running child, temp files go.
    signal.signal(signal.SIGTERM, _terminate)
    remember_secret(os.environ.get("PGPASSWORD"))
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except Fail as exc:
        log(f"error: {exc}")
        return exc.code
    except KeyboardInterrupt:
        log("interrupted; the target may be partly loaded: re-run with --force")
        return 130


if __name__ == "__main__":
    sys.exit(main())
