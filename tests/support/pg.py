"""A throwaway PostgreSQL server started from the machine's binaries (initdb, pg_ctl).

Used by the database tests and the lab's `db` namespace. The server runs as the `postgres`
system user (initdb refuses root), keeps its data and socket in a private temporary directory,
requires a SCRAM password for TCP connections and is stopped and deleted by `stop()`.

    with PgServer(port=55432) as pg:
        pg.uri("minitwit")  -> postgresql://postgres:...@127.0.0.1:55432/minitwit
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

PG_SEARCH_DIRS = ("/usr/lib/postgresql",)


class PgUnavailable(RuntimeError):
    """The machine lacks what a throwaway server needs (binaries, the postgres user)."""


def pg_bindir() -> Path:
    """Directory holding initdb and pg_ctl: $PG_BINDIR, else the newest /usr/lib/postgresql/N/bin."""
    env = os.environ.get("PG_BINDIR")
    if env:
        return Path(env)
    for base in PG_SEARCH_DIRS:
        root = Path(base)
        if root.is_dir():
            versions = sorted(
                (p for p in root.iterdir() if (p / "bin" / "initdb").exists()),
                key=lambda p: int(p.name) if p.name.isdigit() else 0,
            )
            if versions:
                return versions[-1] / "bin"
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    raise PgUnavailable("initdb not found (install the Debian package 'postgresql' or set PG_BINDIR)")


def missing_requirements() -> str | None:
    """Why a server cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (to run initdb as the postgres user)"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "needs the 'postgres' system user (Debian package 'postgresql')"
    try:
        bindir = pg_bindir()
    except PgUnavailable as exc:
        return str(exc)
    for tool in ("initdb", "pg_ctl"):
        if not (bindir / tool).exists():
            return f"{tool} missing in {bindir}"
    if not shutil.which("runuser"):
        return "runuser missing (util-linux)"
    return None


@dataclass
class PgServer:
    """One PostgreSQL cluster. `netns` runs it inside a network namespace (the lab's `db`)."""

    port: int = 55432
    listen: str = "127.0.0.1"
    netns: str | None = None
    password: str = field(default_factory=lambda: secrets.token_urlsafe(18))
    user: str = "postgres"
    root: Path | None = None
    log_tail_lines: int = 40

    def __post_init__(self) -> None:
        self._owns_root = self.root is None
        self._started = False

    # -- paths -------------------------------------------------------------------------------
    @property
    def datadir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        assert self.root is not None
        return self.root

    def uri(self, dbname: str = "postgres", user: str | None = None, password: str | None = None,
            host: str | None = None) -> str:
        u = user or self.user
        p = self.password if password is None else password
        h = host or self.listen
        return f"postgresql://{quote(u)}:{quote(p, safe='')}@{h}:{self.port}/{quote(dbname)}"

    # -- lifecycle ---------------------------------------------------------------------------
    def _as_postgres(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        cmd = ["runuser", "-u", "postgres", "--", *argv]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)

    def start(self) -> PgServer:
        why = missing_requirements()
        if why:
            raise PgUnavailable(why)
        bindir = pg_bindir()
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="mtha-pg-"))
        pg = pwd.getpwnam("postgres")
        os.chown(self.root, pg.pw_uid, pg.pw_gid)
        os.chmod(self.root, 0o700)
        pwfile = self.root / "pwfile"
        # The password file lives in the private 0700 directory only for initdb's run.
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(self.password + "\n")
        os.chown(pwfile, pg.pw_uid, pg.pw_gid)
        try:
            self._as_postgres([
                str(bindir / "initdb"), "-D", str(self.datadir), "-U", self.user,
                "--pwfile", str(pwfile), "--auth-local=trust", "--auth-host=scram-sha-256",
                "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
            ])
        finally:
            pwfile.unlink(missing_ok=True)
        with open(self.datadir / "pg_hba.conf", "a") as fh:
            # TCP from anywhere the listener is reachable, always with a SCRAM password.
            fh.write("host all all 0.0.0.0/0 scram-sha-256\n")
        opts = (f"-c listen_addresses={self.listen} -c port={self.port} "
                f"-c unix_socket_directories={self.socket_dir} -c fsync=off "
                f"-c synchronous_commit=on -c max_connections=100")
        try:
            self._as_postgres([
                str(bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
                "-o", opts, "-w", "-t", "30", "start",
            ])
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"PostgreSQL did not start: {exc.stderr.strip()}\n{self.log_tail()}") from exc
        self._started = True
        return self

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL over the private socket as the superuser; returns unaligned output."""
        out = self._as_postgres([
            "psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", str(self.socket_dir),
            "-p", str(self.port), "-U", self.user, "-d", dbname, "-c", sql,
        ])
        return out.stdout

    def create_database(self, name: str, owner: str | None = None) -> None:
        owner_sql = f' OWNER "{owner}"' if owner else ""
        self.psql(f'CREATE DATABASE "{name}"{owner_sql}')

    def digitalocean_like(self, db: str, admin: str = "doadmin", app: str = "minitwit") -> tuple[str, str]:
        """Roles and a database the way DigitalOcean's managed PostgreSQL gives them: `admin` is
        no superuser (CREATEDB, CREATEROLE) and owns `db`; `app` is a plain login role that owns
        nothing, so with PostgreSQL 15+ defaults it may not create in `public`. Returns the two
        passwords (admin, app)."""
        admin_pw, app_pw = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
        self.psql(f"CREATE ROLE \"{admin}\" LOGIN CREATEDB CREATEROLE NOSUPERUSER PASSWORD '{admin_pw}'")
        self.psql(f"CREATE ROLE \"{app}\" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{app_pw}'")
        self.create_database(db, owner=admin)
        return admin_pw, app_pw

    def log_tail(self) -> str:
        try:
            lines = self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-self.log_tail_lines:])

    def stop(self) -> None:
        if self.root is None:
            return
        if self._started:
            with contextlib.suppress(subprocess.CalledProcessError):
                self._as_postgres([str(pg_bindir() / "pg_ctl"), "-D", str(self.datadir), "-m",
                                   "immediate", "-w", "-t", "20", "stop"])
            self._started = False
        if self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
