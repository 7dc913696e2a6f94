"""First-hour problems of the command line and the README, each fixed with a test here:

- `amlx serve` on a cold CPU kernel cache said nothing, and its first requests waited up to a
  minute in silence while MLX compiled its kernels (generate, chat and demo said so).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

try:
    from tests.helpers.cli import main_in_process
except ImportError:  # tests/ itself on sys.path
    from helpers.cli import main_in_process

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- 1. amlx serve on a cold kernel cache ---------------------------------------------------------------

@pytest.mark.parametrize("disabled", [False, True])
def test_serve_says_its_first_requests_wait_on_a_cold_kernel_cache(capsys, tmp_path, monkeypatch, disabled):
    from amlx.kernel_cache import SERVE_NOTICE

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a cold cache: no compiled kernel there
    monkeypatch.delenv("MLX_DISABLE_COMPILE", raising=False)
    if disabled:  # then nothing compiles, and nothing is to be said
        monkeypatch.setenv("MLX_DISABLE_COMPILE", "1")
    # the model is a missing directory: the notice comes at startup, before the load (which fails)
    rc, err = main_in_process(capsys, "serve", str(tmp_path / "no-model"), "--device", "cpu",
                              "--port", str(_free_port()))
    assert rc == 1
    lines = err.splitlines()
    assert lines[-1].startswith("amlx serve: error: ") and "no-model" in lines[-1], err
    if disabled:
        assert len(lines) == 1, err
    else:
        assert lines[:-1] == [SERVE_NOTICE], err
        assert "first requests will wait" in SERVE_NOTICE and "once per machine" in SERVE_NOTICE
