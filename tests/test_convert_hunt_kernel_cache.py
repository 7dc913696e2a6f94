"""MLX's CPU kernel cache when the temporary directory it lives under is unusable: the load
says so, naming the variable, instead of every request failing in MLX's compiler."""

from __future__ import annotations

import io

import pytest

import amlx
from amlx.kernel_cache import first_run_notice

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.mark.parametrize("kind", ["missing", "a-file", "empty"])
def test_a_tmpdir_that_is_not_a_directory_is_refused_at_load(qwen, tmp_path, monkeypatch, kind):
    """MLX asks std::filesystem::temp_directory_path() where to build its CPU kernels at every
    compile; with TMPDIR naming no directory that throws, as it does for a TMPDIR set but empty
    (which the cache's location skipped, as if unset). The model loaded, the command line
    announced a minute of compiling, then every request failed after its first token with
    "eval: filesystem error: temp_directory_path: No such file or directory"."""
    tmp = tmp_path / kind
    if kind == "a-file":
        tmp.write_text("")
    monkeypatch.setenv("TMPDIR", "" if kind == "empty" else str(tmp))
    out = io.StringIO()
    assert not first_run_notice("cpu", out=out) and out.getvalue() == ""
    with pytest.raises(amlx.ModelLoadError) as info:
        amlx.load_sync(qwen, device="cpu")
    problem = "TMPDIR is set but empty" if kind == "empty" else f"TMPDIR={tmp} is not a directory"
    assert str(info.value) == (f"{problem}: MLX compiles its CPU kernels under it, so no request could run; point "
                               f"TMPDIR at an existing directory")
