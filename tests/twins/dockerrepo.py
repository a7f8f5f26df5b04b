"""The twins' stand-in for Docker's apt repository, and the lab CA that makes its HTTPS real.

The bootstrap (scripts/node-bootstrap.sh) runs unchanged on a twin: it fetches the repository
key from https://<Docker's host>/linux/debian/gpg, writes the `deb [signed-by=...]` line and
installs docker-ce, docker-ce-cli, containerd.io and docker-compose-plugin. Those four packages
come from here: signed by a throwaway key, they install the stand-in CLI (docker_shim/docker)
and app (docker_shim/app.py) plus a docker.service that idles once it has brought back what
`compose up` started (Docker's restart policy at boot). That is the one part of a twin that is
not Debian's or the stack's own.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM = HERE / "docker_shim"
SUITE, COMPONENT, ARCH = "bookworm", "stable", "amd64"
PACKAGES = ("docker-ce", "docker-ce-cli", "containerd.io", "docker-compose-plugin")

DOCKER_UNIT = """\
# minitwit-ha twins: stand-in docker.service (no engine; `docker compose` runs transient units).
[Unit]
Description=Docker Application Container Engine (twin stand-in)
# As Docker's own unit: the containers it brings back at boot need the network.
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
ExecStart=/bin/sleep infinity
# The restart policy at boot: what `compose up` started and nobody stopped comes back.
ExecStartPost=/usr/bin/docker twin-restart

[Install]
WantedBy=multi-user.target
"""


def _run(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, **kw)


def _deb(name: str, pool: Path, files: dict[str, tuple[int, bytes]], depends: str = "") -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for path, (mode, data) in files.items():
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(mode)
        (root / "DEBIAN").mkdir()
        control = (f"Package: {name}\nVersion: 5:0.0.0~twin\nArchitecture: {ARCH}\n"
                   "Maintainer: minitwit-ha twins <twins@example.invalid>\n"
                   + (f"Depends: {depends}\n" if depends else "")
                   + "Description: minitwit-ha twins stand-in for Docker's package\n")
        (root / "DEBIAN" / "control").write_text(control)
        out = pool / f"{name}_0.0.0~twin_{ARCH}.deb"
        _run("dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(root), str(out))
        return out


def _packages_entry(deb: Path, rel: str) -> str:
    control = _run("dpkg-deb", "-f", str(deb)).stdout.strip()
    data = deb.read_bytes()
    return (f"{control}\nFilename: {rel}\nSize: {len(data)}\nMD5sum: {hashlib.md5(data).hexdigest()}\n"  # noqa: S324 - apt's field
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n")


def build_ca(home: Path, host: str) -> dict[str, Path]:
    """A lab CA and a certificate for `host` signed by it (openssl)."""
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    ca_key, ca_crt = home / "ca.key", home / "ca.crt"
    key, csr, crt, ext = home / "edge.key", home / "edge.csr", home / "edge.crt", home / "edge.ext"
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         "/CN=minitwit-ha twins lab CA", "-keyout", str(ca_key), "-out", str(ca_crt))
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}", "-keyout", str(key),
         "-out", str(csr))
    ext.write_text(f"subjectAltName=DNS:{host}\n")
    _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(crt))
    return {"ca": ca_crt, "cert": crt, "key": key}


def build_repo(root: Path, url_path: str) -> Path:
    """The signed repository under root/<url_path>/debian (the layout of Docker's)."""
    base = root / url_path.strip("/") / "debian"
    shutil.rmtree(base, ignore_errors=True)
    pool = base / "pool"
    pool.mkdir(parents=True)
    shim = {
        "/usr/bin/docker": (0o755, (SHIM / "docker").read_bytes()),
        "/usr/lib/docker-twin/app.py": (0o755, (SHIM / "app.py").read_bytes()),
        "/lib/systemd/system/docker.service": (0o644, DOCKER_UNIT.encode()),
    }
    debs = [_deb("docker-ce", pool, shim, depends="python3, systemd")]
    debs += [_deb(name, pool, {}) for name in PACKAGES[1:]]
    entries = "\n".join(_packages_entry(d, f"pool/{d.name}") for d in debs)
    bindir = base / "dists" / SUITE / COMPONENT / f"binary-{ARCH}"
    bindir.mkdir(parents=True)
    (bindir / "Packages").write_text(entries)
    (bindir / "Packages.gz").write_bytes(gzip.compress(entries.encode(), mtime=0))
    dist = base / "dists" / SUITE
    sums = []
    for f in sorted(bindir.iterdir()):
        data = f.read_bytes()
        sums.append(f" {hashlib.sha256(data).hexdigest()} {len(data)} {f.relative_to(dist)}")
    date = time.strftime("%a, %d %b %Y %H:%M:%S UTC", time.gmtime())
    (dist / "Release").write_text(
        f"Origin: minitwit-ha twins\nLabel: Docker stand-in\nSuite: {SUITE}\nCodename: {SUITE}\n"
        f"Architectures: {ARCH}\nComponents: {COMPONENT}\nDate: {date}\nSHA256:\n" + "\n".join(sums) + "\n")
    # A throwaway signing key in a temporary keyring (never under the served directory); its
    # agent is stopped before the keyring goes.
    with tempfile.TemporaryDirectory() as gnupg:
        env = {**os.environ, "GNUPGHOME": gnupg}
        try:
            _run("gpg", "--batch", "--passphrase", "", "--quick-gen-key",
                 "minitwit-ha twins <twins@example.invalid>", "ed25519", "sign", "2d", env=env)
            _run("gpg", "--batch", "--yes", "--clearsign", "-o", str(dist / "InRelease"), str(dist / "Release"),
                 env=env)
            (base / "gpg").write_text(_run("gpg", "--armor", "--export", env=env).stdout)
            # The bootstrap trusts only a key with a known fingerprint; the twins name this one.
            fpr = next(line.split(":")[9] for line in _run("gpg", "--with-colons", "--fingerprint", env=env)
                       .stdout.splitlines() if line.startswith("fpr:"))
            (root / "signing-key.fpr").write_text(fpr + "\n")
        finally:
            subprocess.run(["gpgconf", "--kill", "gpg-agent"], env=env, capture_output=True, check=False)
    return base
