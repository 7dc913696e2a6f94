"""`mypy --strict` on a user's script, against amlx as installed (issue 14).

The script (tests/typing/user_script.py) uses the public API: typed generation
options (`GenerateOptions` through `Unpack`), `Completion`, `Token`,
`stats()` / `memory()` (`EngineStats` / `MemoryStats`). It must pass; the same
script with one option misspelled must fail with an error naming the option.

mypy runs as a user would run it: in a directory outside the repository, with
no PYTHONPATH or MYPYPATH, so it finds amlx only through the install (`pip
install -e .` leaves a plain path entry; see pyproject.toml's package-dir).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "typing" / "user_script.py"


def mypy(tmp_path: Path, name: str, text: str) -> subprocess.CompletedProcess:
    work = tmp_path / "user"
    work.mkdir(exist_ok=True)
    (work / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MYPYPATH")}
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-color-output",
                           "--cache-dir", str(tmp_path / "cache"), name],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("typing")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_user_script_passes_mypy_strict(tmp_dir):
    result = mypy(tmp_dir, "user_script.py", SCRIPT.read_text())
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_a_misspelled_option_is_a_static_error(tmp_dir):
    text = SCRIPT.read_text()
    assert text.count("temperature=0.7") == 1
    result = mypy(tmp_dir, "misspelled.py", text.replace("temperature=0.7", "temperatur=0.7"))
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and '"temperatur"' in errors[0], result.stdout
