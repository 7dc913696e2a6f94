"""A process without standard error (pythonw, a service started with `2>&-`: Python sets
`sys.stderr` to None) loads a model and generates. Loading hung there: the progress bar
(tqdm) failed on the missing stream in its constructor and deadlocked in its finalizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import sys
if sys.argv[1] == "none":
    sys.stderr = None
import amlx
with amlx.load_sync(sys.argv[2], device="cpu") as model:
    out = model.complete_sync("Hello", max_tokens=4, temperature=0.0)
print("tokens", len(out.token_ids))
"""


@pytest.mark.parametrize("how", ["none", "closed"])
def test_a_process_without_stderr_loads_and_generates(how, tmp_path):
    try:
        from tests.helpers.checkpoints import make_checkpoint
    except ImportError:  # tests/ itself on sys.path
        from helpers.checkpoints import make_checkpoint
    path = make_checkpoint(tmp_path / "qwen3", "qwen3")
    args = [sys.executable, "-c", SCRIPT, how, str(path)]
    if how == "closed":  # (fd 2 closed before Python starts: sys.stderr is None there too)
        args = ["bash", "-c", 'exec "$@" 2>&-', "bash", *args]
    # (a hang is a failure at the timeout, not a stuck suite)
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE if how == "none" else None, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r
    assert r.stdout.startswith("tokens "), r.stdout
