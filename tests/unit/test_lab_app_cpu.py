"""The lab app's optional per-request CPU cost (APP_CPU_MS), which the throughput scenario uses."""

from __future__ import annotations

import time

import pytest

from tests.lab import app


def test_the_cost_is_off_by_default_and_must_be_milliseconds():
    assert app.cpu_ms_setting({}) == 0.0 and app.cpu_ms_setting({"APP_CPU_MS": " "}) == 0.0
    assert app.cpu_ms_setting({"APP_CPU_MS": "7.5"}) == 7.5
    for bad in ("-1", "ten", "1001"):
        with pytest.raises(ValueError, match=f"APP_CPU_MS must be milliseconds from 0 to 1000, got '{bad}'"):
            app.cpu_ms_setting({"APP_CPU_MS": bad})


def test_render_work_spends_the_cpu_time_asked_for():
    t0 = time.thread_time()
    app.render_work(20)
    spent = time.thread_time() - t0
    assert 0.020 <= spent < 0.030, spent
