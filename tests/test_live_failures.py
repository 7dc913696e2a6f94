"""benchmarks/live_failures.py: a failing test's traceback reaches $LIVE_FAILURES while the
session is still running (a GPU call cut at its budget keeps it), setup errors too; passing
tests write nothing; without the variable nothing is written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.environment import python_path

ROOT = Path(__file__).resolve().parents[1]

BODY = '''
import os, pytest

@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")

def test_passes():
    assert True

def test_fails():
    assert 1 + 1 == 3, "arithmetic"

def test_setup_error(broken):
    pass

def test_after():
    # the failures above are already on disk while this test runs
    text = open(os.environ["LIVE_FAILURES"]).read()
    assert "test_fails" in text and "fixture broke" in text
'''


def _run(tmp_path: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text(BODY)
    env = {**os.environ, "PYTHONPATH": python_path(ROOT / "benchmarks"), **env_extra}
    if "LIVE_FAILURES" not in env_extra:
        env.pop("LIVE_FAILURES", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "live_failures",
                           "--tb=short", "test_sample.py"], cwd=tmp_path, env=env, capture_output=True, text=True)


def test_failures_are_written_as_they_happen(tmp_path):
    log = tmp_path / "failures.txt"
    done = _run(tmp_path, {"LIVE_FAILURES": str(log)})
    assert "2 passed" in done.stdout and "1 failed" in done.stdout and "1 error" in done.stdout, done.stdout
    text = log.read_text()
    assert "== test_sample.py::test_fails (call)" in text and "arithmetic" in text
    assert "== test_sample.py::test_setup_error (setup)" in text and "fixture broke" in text
    assert "test_passes" not in text and "test_after" not in text


def test_nothing_is_written_without_the_variable(tmp_path):
    done = _run(tmp_path, {})
    assert "2 failed" in done.stdout, done.stdout  # (test_after too: it finds no variable)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["test_sample.py"]
