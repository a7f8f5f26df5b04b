"""One drill for all lab tests: every scenario (failover x3, rollouts, hardening, reboots, node
replacement, and the five-minute steady run when its slow test is selected) in one lab, under its own prefix and root
so a developer's lab is never disturbed, with sentinel secrets planted for the audit. The drill
tears the lab down even when a scenario fails; `lab_leftovers()` checks that it did."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.needs import need

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_ENV = {"LAB_ROOT": "/run/mtha-lab-test", "LAB_PREFIX": "mthat"}
SENTINEL_TOKEN = "dop_v1_" + "5e" * 32
SENTINEL_DB_PASSWORD = "SENTINEL-lab-db-password-4b1d"


def lab_missing() -> str | None:
    from tests.lab.lab import missing

    return missing()


def run_lab(*args: str, timeout: float = 1500, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, **TEST_ENV, "PYTHONPATH": ROOT, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tests.lab", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=timeout)


def lab_leftovers() -> list[str]:
    """Anything the test lab left behind: namespaces, its root, processes naming it, its sudoers file."""
    found = [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
             if n.startswith(TEST_ENV["LAB_PREFIX"] + "-")]
    for path in (TEST_ENV["LAB_ROOT"], f"/etc/sudoers.d/{TEST_ENV['LAB_PREFIX']}-lab"):
        if os.path.exists(path):
            found.append(path)
    procs = subprocess.run(["pgrep", "-af", TEST_ENV["LAB_ROOT"]], capture_output=True, text=True).stdout
    found += [ln for ln in procs.splitlines() if "pgrep" not in ln and "pytest" not in ln]
    return found


def _steady_wanted(session) -> bool:
    """Run the five-minute steady check in the same lab only when its (slow) test is selected."""
    return any(item.get_closest_marker("slow") and "drill_report" in getattr(item, "fixturenames", ())
               for item in session.items)


@pytest.fixture(scope="session")
def drill_report(request, tmp_path_factory):
    need(lab_missing())
    path = tmp_path_factory.mktemp("drill") / "drill-report.json"
    steady = "300" if _steady_wanted(request.session) else "0"
    proc = run_lab("drill", "--runs", "3", "--steady-s", steady, "--report", str(path),
                   # Benchmarks (scenario `throughput`) give README figures, not behaviour: `make drill` runs them.
                   env={"LAB_TOKEN": SENTINEL_TOKEN, "LAB_DB_PASSWORD": SENTINEL_DB_PASSWORD, "LAB_BENCHMARKS": "0"},
                   timeout=2700)  # every scenario (workers, replacement included) plus the steady 300 s
    assert path.exists(), f"drill wrote no report (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    data = json.loads(path.read_text())
    html = path.with_suffix(".html")
    data.update(_stdout=proc.stdout, _stderr=proc.stderr, _raw=path.read_text(), _returncode=proc.returncode,
                _html=html.read_text() if html.exists() else None)
    return data


def scenario(report: dict, name: str) -> dict:
    return next(s for s in report["scenarios"] if s["name"] == name)
