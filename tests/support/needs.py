"""Skip-or-fail for tests that need root or a binary.

Locally such a test skips and says exactly what is missing. CI sets LAB_REQUIRED=1, and then
the same condition fails the test: a skipped lab test in CI would be a check that cannot fail.
"""

from __future__ import annotations

import os
import shutil

import pytest


def required() -> bool:
    return os.environ.get("LAB_REQUIRED", "") not in ("", "0", "false", "no")


def need(reason: str | None) -> None:
    """Skip (or, with LAB_REQUIRED=1, fail) when `reason` is not None."""
    if reason is None:
        return
    if required():
        pytest.fail(f"LAB_REQUIRED=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def missing_binaries(*names: str) -> str | None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        return f"needs {', '.join(missing)} on PATH (.ci/run installs them: apt-get install ...)"
    return None


def not_root() -> str | None:
    return None if os.geteuid() == 0 else "needs root (network namespaces, daemons)"


def need_root_and(*binaries: str) -> None:
    need(not_root() or missing_binaries(*binaries))
