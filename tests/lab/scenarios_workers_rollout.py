"""Drill scenario: `rollout.py rollout` with app workers (appWorkers, issue #14), for real over SSH.

`rolling-update-workers`: two workers added (as `appWorkers: 2` and `pulumi up` do), each made what a
worker droplet is for the tool (sshd on a public address, `deploy`'s sudo rule for its mt-deploy,
the app under compose, the stack output `workers`: Lab.deployable_workers). Then, under RATE
requests/s through the reserved IP, each run as an operator runs it from the client namespace:
- the rollout to the next version (v2 on a fresh lab): exit 0, 0 failed, the reserved IP stays,
  no keepalived transition, every app server (both pair apps and both workers) ends on it, the
  workers deployed before the pair;
- a bad version (`bad-...`, 503 forever): the tool exits non-zero after worker-1 failed its health,
  worker-1 rolled back, the pair never deployed (still on the good version), never served, 0 failed.
Then the workers are removed again. IP moves are counted by the drill (EXTRA_MOVE_LIMITS: 0).
"""

from __future__ import annotations

from pathlib import Path

from tests.lab.drill import scenario
from tests.lab.lab import NODES, Lab
from tests.lab.scenarios_rollout import RATE, next_version, one_run, versions

WORKERS = 2
BAD_HEALTH_TIMEOUT_S = 15.0


def all_versions(lab: Lab) -> dict[str, str | None]:
    """The version each app server answers with: both pair nodes and every worker."""
    found = versions(lab)
    for name in lab.worker_names():
        status, headers = lab.app_http(name)
        found[name] = headers.get("x-app-version") if status else None
    return found


def deploy_order(log: str) -> list[str]:
    """The app servers in the order the tool deployed them (its `X: deploying V` lines)."""
    order = []
    for line in log.splitlines():
        head, _, rest = line.partition("rollout: ")[2].partition(": deploying ")
        if rest and head not in order:
            order.append(head)
    return order


@scenario("rolling-update-workers")
def rolling_update_workers(lab: Lab, workdir: Path, runs: int) -> dict:
    lab.wait_pair_ready(timeout=30)
    names = lab.add_workers(WORKERS)
    try:
        lab.deployable_workers()
        runs_out = []
        version = next_version(versions(lab))
        good = one_run(lab, workdir, "rolling-update-workers", ["rollout", "--version", version])
        good.update(version=version, all_versions=all_versions(lab), order=deploy_order(
            (workdir / "rolling-update-workers-tool.log").read_text()))
        runs_out.append(good)
        bad_version = "bad-" + next_version(versions(lab))
        bad = one_run(lab, workdir, "rolling-update-workers-bad",
                      ["rollout", "--version", bad_version, "--health-timeout", str(BAD_HEALTH_TIMEOUT_S)])
        bad.update(version=bad_version, all_versions=all_versions(lab), order=deploy_order(
            (workdir / "rolling-update-workers-bad-tool.log").read_text()),
                   bad_version_served=sum(1 for rec in bad["_records"] if rec.get("version") == bad_version))
        runs_out.append(bad)
    finally:
        lab.plain_workers()
        lab.remove_workers()
    for r in runs_out:
        r.pop("_records", None)
    servers = [*names, *NODES]
    checks = {
        "rollout: exit 0": good["exit_code"] == 0,
        "rollout: 0 failed": good["failed"] == 0,
        f"rollout: at least 50 req/s (ran {RATE})": good["rate_rps"] >= 50,
        "rollout: every app server on the new version": good["all_versions"] == {s: version for s in servers},
        "rollout: workers deployed first, then the pair": good["order"][:WORKERS] == names
                                                           and set(good["order"][WORKERS:]) == set(NODES),
        "rollout: clients get only the new version afterwards": set(good["served_after"]) == {version},
        "rollout: reserved IP stayed, no keepalived transition": good["holder_after"] == good["holder_before"]
                                                                  and good["transitions"] == 0,
        "bad version: tool exited non-zero": bad["exit_code"] not in (0, None),
        "bad version: stopped at worker-1, the pair never deployed": bad["order"] == [names[0]],
        "bad version: every app server still on the good version": bad["all_versions"] == {s: version for s in servers},
        "bad version: never served": bad["bad_version_served"] == 0,
        "bad version: 0 failed": bad["failed"] == 0,
        "no SSH process left": not good["ssh_leftovers"] and not bad["ssh_leftovers"],
    }
    summary = (f"{good['versions_before']} -> {version} over {servers} in {good['duration_s']} s "
               f"(deployed {good['order']}), failed {good['failed']}; {bad_version}: exit {bad['exit_code']}, "
               f"deployed {bad['order']}, served {bad['bad_version_served']}, failed {bad['failed']}")
    return {
        "name": "rolling-update-workers", "passed": all(checks.values()), "checks": checks,
        "requests": good["requests"] + bad["requests"], "failed": good["failed"] + bad["failed"],
        "versions_before": good["versions_before"], "versions_after": bad["all_versions"],
        "duration_s": good["duration_s"], "exit_code": bad["exit_code"], "rate_rps": min(good["rate_rps"], bad["rate_rps"]),
        "bad_version_served": bad["bad_version_served"], "summary": summary, "runs": runs_out,
    }
