"""A pytest plugin for `run_gpu.sh tests`: each failing test's report is appended to the
file named by $LIVE_FAILURES the moment it fails.

Why: pytest prints tracebacks at the end of the session, and a GPU call cut at its time
budget never gets there; its output then shows only "F". On 2026-12-06 two failures of
tests/test_quantized_gemv.py came back that way, undiagnosable. Loaded with
`PYTHONPATH=benchmarks python3 -m pytest -p live_failures ...`; without $LIVE_FAILURES it
does nothing."""

from __future__ import annotations

import os


def pytest_runtest_logreport(report) -> None:
    path = os.environ.get("LIVE_FAILURES")
    if path and report.failed:
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")
