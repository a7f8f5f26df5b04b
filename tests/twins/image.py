"""The twin image: a Debian 12 root file system like DigitalOcean's `debian-12-x64`, cached.

Built once by debootstrap from the Debian mirror this machine already uses (read from its apt
sources at run time, so no mirror host name lives in the repository) and cached under
$TWIN_CACHE (default /var/cache/minitwit-ha/twins/<recipe hash>/rootfs). A change to the recipe
(suite, packages, the files written into the image) changes the hash and builds a new image;
the old one stays until removed by hand.

What differs from the droplet image, on purpose and nowhere else: cloud-init reads a NoCloud
seed (the droplet reads DigitalOcean's metadata service) and does not configure the network (the
twin's interfaces are configured from outside, in its network namespace).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CACHE = Path(os.environ.get("TWIN_CACHE", "/var/cache/minitwit-ha/twins"))
SUITE = "bookworm"

# What DigitalOcean's debian-12-x64 brings that the stack's commands rely on (cloud-init,
# openssh-server, sudo, python3, curl, ca-certificates), plus the base any Debian server has.
PACKAGES = (
    "systemd", "systemd-sysv", "dbus", "cloud-init", "openssh-server", "sudo", "python3", "curl",
    "ca-certificates", "iproute2", "nftables", "iputils-ping", "procps", "less", "netbase", "gnupg",
    "apt-utils", "cron", "logrotate", "tzdata", "locales", "bsdextrautils",
)

CLOUD_CFG = """\
# minitwit-ha twin: the NoCloud seed stands in for DigitalOcean's metadata service, and the
# network is configured from outside (the twin's namespace), so cloud-init leaves it alone.
datasource_list: [NoCloud, None]
network: {config: disabled}
# As on a droplet: the hostname resolves (sudo asks), from cloud-init's hosts template.
manage_etc_hosts: true
"""


class ImageError(RuntimeError):
    """The image cannot be built; the message says why and what to do."""


@dataclass(frozen=True)
class Recipe:
    suite: str
    mirror: str
    security_mirror: str
    packages: tuple[str, ...]
    files: tuple[tuple[str, str], ...]
    commands: tuple[tuple[str, ...], ...]  # run in the image after the files are written

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def host_mirrors(sources_dir: Path = Path("/etc/apt")) -> tuple[str, str]:
    """The Debian mirror and security mirror of this machine's apt sources (one-line .list and
    deb822 .sources files; files with other suffixes are not read by apt either)."""
    uris: list[tuple[str, list[str]]] = []
    files = [sources_dir / "sources.list"] + sorted((sources_dir / "sources.list.d").glob("*.list"))
    for f in files:
        with contextlib.suppress(OSError):
            for line in f.read_text().splitlines():
                m = re.match(r"^\s*deb\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    uris.append((m.group(2), [m.group(3)]))
    for f in sorted((sources_dir / "sources.list.d").glob("*.sources")):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", f.read_text()):
                fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.M))
                if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                    for uri in fields.get("URIs", "").split():
                        uris.append((uri, fields.get("Suites", "").split()))
    main = next((u for u, suites in uris if SUITE in suites), None)
    security = next((u for u, suites in uris if f"{SUITE}-security" in suites), None)
    if main is None:
        raise ImageError(f"no apt source for Debian {SUITE} in {sources_dir}/sources.list*: the twin image is "
                         f"built from this machine's own Debian mirror (add a `deb URI {SUITE} main` source)")
    return main.rstrip("/"), (security or main.rsplit("/", 1)[0] + "/debian-security").rstrip("/")


def recipe(sources_dir: Path = Path("/etc/apt")) -> Recipe:
    mirror, security = host_mirrors(sources_dir)
    sources = (f"deb {mirror} {SUITE} main\n"
               f"deb {mirror} {SUITE}-updates main\n"
               f"deb {security} {SUITE}-security main\n")
    files = (
        ("/etc/apt/sources.list", sources),
        ("/etc/cloud/cloud.cfg.d/90-minitwit-twin.cfg", CLOUD_CFG),
        # Each twin gets its own machine id at first boot, like a fresh droplet.
        ("/etc/machine-id", ""),
        # Not this machine's resolver (debootstrap copies it): the lab has no DNS; the few names a
        # twin needs are in its /etc/hosts.
        ("/etc/resolv.conf", "# minitwit-ha twins: no DNS in the lab; see /etc/hosts\n"),
        # cloud-init sets LANG=en_US.UTF-8 (its locale module) and fails when it is not generated.
        ("/etc/locale.gen", "en_US.UTF-8 UTF-8\n"),
    )
    return Recipe(SUITE, mirror, security, PACKAGES, files, (("locale-gen",),))


@dataclass(frozen=True)
class Image:
    rootfs: Path
    recipe: Recipe
    built_s: float | None  # seconds this run spent building; None when it came from the cache


def _step(argv: list[str], where: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        raise ImageError(f"{argv[0]} failed ({proc.returncode}) building the twin image ({where}):\n{tail}")


def ensure_image(rcp: Recipe | None = None, cache: Path = CACHE, log=print) -> Image:
    """The cached root file system for `rcp`, built first when missing (one builder at a time)."""
    rcp = rcp or recipe()
    home = cache / rcp.digest
    rootfs = home / "rootfs"
    home.mkdir(mode=0o755, parents=True, exist_ok=True)
    with open(home / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (home / "recipe.json").exists() and rootfs.is_dir():
            return Image(rootfs, rcp, None)
        if shutil.which("debootstrap") is None:
            raise ImageError("the twin image needs debootstrap (apt-get install debootstrap)")
        work = home / "rootfs.partial"
        shutil.rmtree(work, ignore_errors=True)
        start = time.monotonic()
        log(f"twins: building the Debian {rcp.suite} image from {rcp.mirror} into {rootfs} (once per recipe)")
        # debootstrap lays down the base; apt then installs the rest, because debootstrap's own
        # resolver does not follow virtual packages (cloud-init's python3-cryptography needs one).
        _step(["debootstrap", "--variant=minbase", "--components=main", rcp.suite, str(work), rcp.mirror],
              f"see {work}/debootstrap/debootstrap.log")
        policy = work / "usr" / "sbin" / "policy-rc.d"
        policy.write_text("#!/bin/sh\n# twins image build: start no daemons in the chroot\nexit 101\n")
        policy.chmod(0o755)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive", "LANG": "C.UTF-8"}
        _step(["chroot", str(work), "apt-get", "install", "-y", "-q", "--no-install-recommends", *rcp.packages],
              "apt-get install in the image", env=env)
        _step(["chroot", str(work), "apt-get", "clean"], "apt-get clean", env=env)
        policy.unlink()
        for path, content in rcp.files:
            target = work / path.lstrip("/")
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            target.write_text(content)
        for argv in rcp.commands:
            _step(["chroot", str(work), *argv], " ".join(argv), env=env)
        # The package cache is rebuilt by the first `apt-get update` on a twin, as on a droplet.
        shutil.rmtree(work / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        (work / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        work.rename(rootfs)
        seconds = time.monotonic() - start
        (home / "recipe.json").write_text(json.dumps({**asdict(rcp), "build_s": round(seconds, 1)}, indent=2))
        log(f"twins: image built in {seconds:.0f}s")
        return Image(rootfs, rcp, seconds)


if __name__ == "__main__":
    img = ensure_image()
    print(img.rootfs, "built in" if img.built_s else "cached", img.built_s or "")
