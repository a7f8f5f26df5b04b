"""`make twins`: boot the twins, apply the stack's commands to them three times, write a report.

    python -m tests.twins run [--report twin-report.json] [--keep]   (as root)
    python -m tests.twins down                                       (after an interrupted run)

1. apply: every remote command (and the readiness gate) on freshly booted twins, in order;
2. apply again with nothing changed: must run no step (`rerun_steps`: 0);
3. change one rendered file (the compose file the stack deploys gains a comment line) and apply:
   only the steps whose inputs changed run (`changed_steps`; expected: each node's app step and
   the readiness gate, whose triggers carry the nodes' digests).
Exit 0 when all three hold; 1 with the failing step's output otherwise. The twins are torn down
in every case (unless --keep).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tests.lab.lab import REPO, LabError
from tests.twins.apply import ApplyFailed, Engine, collect, result_dict
from tests.twins.twins import (
    ADMIN_CIDR,
    API_ADDR,
    API_PORT,
    EDGE_ADDR,
    PRIVATE,
    RESERVED_IP,
    Twins,
)

SECRET_KEYS = frozenset({"failoverToken"})
CHANGED_FILE = "/srv/minitwit/compose.yaml"


def stand_ins(twins: Twins) -> list[dict[str, str]]:
    """What on the twins is not the real thing, and what stands in for it."""
    edge = twins.state.get("edge", {})
    hosts = ", ".join(edge.get("hosts", []))
    api = f"http://{API_ADDR}:{API_PORT}"
    return [
        {"what": "the droplet", "instead": "a systemd-nspawn container (shared kernel, CAP_NET_ADMIN) booting an "
         "overlay of a debootstrap'ed Debian 12 image; the stack's user data arrives by a NoCloud seed, not "
         "DigitalOcean's metadata service; cloud-init does not configure the network (the lab does)"},
        {"what": "the internet", "instead": f"/etc/hosts on each twin sends {hosts} to the lab's edge "
         f"({EDGE_ADDR}); it forwards Debian mirror requests to this machine's own mirror"},
        {"what": "Docker's apt repository and Docker Engine", "instead": f"{edge.get('repo_url', '')} is served by "
         "the edge (TLS from a lab CA the twins trust) with signed stand-in packages docker-ce, docker-ce-cli, "
         "containerd.io, docker-compose-plugin: a `docker` CLI whose `compose up` runs each service as a "
         "transient systemd service (in system.slice, with the ordering of the docker-.scope.d drop-ins systemd gives "
         "Docker's container scopes), and a docker.service "
         "that only starts again at boot what `compose up` started "
         "(the restart policy); no engine, no image pulled"},
        {"what": "the MiniTwit container", "instead": "tests/twins/docker_shim/app.py answering 200 on the "
         "published port (no database)"},
        {"what": "DigitalOcean's API and droplet metadata", "instead": f"the fake API (tests/lab/fakedo.py) at "
         f"{api}; failover.env is rendered with DO_API_URL={api} and METADATA_URL={api}/metadata/v1 "
         "and ALLOW_INSECURE_HTTP=1 (the stack renders https://api.digitalocean.com and "
         "http://169.254.169.254/metadata/v1, and mt-failover sends its token over https only)"},
        {"what": "addresses", "instead": f"private {', '.join(PRIVATE.values())} and reserved IP {RESERVED_IP} "
         "from the documentation ranges (outside vpcIpRange), droplet IDs from the mocks"},
        {"what": "the database", "instead": "database=none (no managed PostgreSQL)"},
    ]


def config(twins: Twins, compose: Path) -> dict:
    return {
        "region": "fra1", "vpcIpRange": "10.110.16.0/24",
        "sshPublicKey": twins.ensure_key(),
        "adminCidrs": [ADMIN_CIDR], "failoverToken": twins.ensure_token(),
        "composeFile": str(compose), "database": "none", "_reserved_ip": RESERVED_IP,
    }


def run(report_path: Path, keep: bool) -> int:
    t0 = time.monotonic()
    twins = Twins()
    report: dict = {"ok": False, "steps": [], "rerun_steps": None, "changed_steps": None, "boot_s": {}}
    try:
        twins.home.mkdir(mode=0o755, parents=True, exist_ok=True)
        compose = twins.home / "compose.yaml"
        shutil.copyfile(REPO / "deploy" / "compose.yaml", compose)
        cfg = config(twins, compose)
        api = f"http://{API_ADDR}:{API_PORT}"
        first = collect(cfg, SECRET_KEYS, api)
        report["boot_s"] = {n: round(s, 1) for n, s in twins.up(first.user_data, first.droplet_ids).items()}
        report["image"] = twins.state.get("image")
        report["boot"] = twins.state.get("booted")
        report["stand_ins"] = stand_ins(twins)
        state = twins.home / "engine-state.json"
        state.unlink(missing_ok=True)
        engine = Engine(twins, state)
        report["steps"] = [result_dict(r) for r in engine.apply(first.steps)]
        report["rerun_steps"] = len(engine.apply(collect(cfg, SECRET_KEYS, api).steps))
        compose.write_text(compose.read_text() + "# twins: one changed line\n")
        changed = collect(cfg, SECRET_KEYS, api).steps
        report["changed_file"] = CHANGED_FILE
        report["changed_steps"] = sorted(r.name for r in engine.apply(changed))
        report["ok"] = report["rerun_steps"] == 0 and bool(report["changed_steps"])
        return 0 if report["ok"] else 1
    except ApplyFailed as exc:
        report["failed"] = {**result_dict(exc.result), "output": exc.result.output[-4000:]}
        print(f"twins: {exc}", file=sys.stderr)
        return 1
    except (LabError, OSError, subprocess.SubprocessError) as exc:
        report["failed"] = {"error": str(exc)}
        print(f"twins: {exc}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            problems = twins.down()
            if problems:
                print("twins: teardown: " + "; ".join(problems), file=sys.stderr)
        report["total_s"] = round(time.monotonic() - t0, 1)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"twins: report in {report_path} ({report['total_s']:.0f}s, ok={report['ok']})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.twins", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="boot, apply three times, report, tear down")
    r.add_argument("--report", type=Path, default=Path("twin-report.json"))
    r.add_argument("--keep", action="store_true", help="leave the twins running (then: python -m tests.twins down)")
    sub.add_parser("down", help="tear down twins left by an interrupted run")
    args = ap.parse_args(argv)
    if args.cmd == "down":
        problems = Twins().down()
        for p in problems:
            print(f"twins down: {p}", file=sys.stderr)
        return 1 if problems else 0
    return run(args.report, args.keep)


if __name__ == "__main__":
    sys.exit(main())
