"""The first-run notice: MLX's CPU kernel cache is found where MLX writes it, and
the one-line notice appears exactly when that cache is cold and the model runs on the CPU."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest

from amlx._mlx import version
from amlx.kernel_cache import NOTICE, first_run_notice, kernel_cache_dir, kernel_cache_is_cold

_COMPILE_ONE_KERNEL = """
import numpy as np
from amlx._mlx import array, device, ops, transforms
device.set_default_device("cpu")
f = transforms.compile(lambda x: ops.exp(x * 2.0 + 1.0))  # one fused elementwise kernel
print(repr(float(f(array(np.ones(8, np.float32))).numpy()[0])))
"""


def test_the_cache_is_where_mlx_writes_its_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert kernel_cache_dir() == tmp_path / "mlx" / version() / "cpu"
    assert kernel_cache_is_cold()
    out = io.StringIO()
    assert first_run_notice("cpu", out=out)
    assert out.getvalue() == NOTICE + "\n"
    # a real compiled function on the CPU: MLX builds its kernel with g++ into that directory
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _COMPILE_ONE_KERNEL], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) == pytest.approx(float(np.exp(np.float32(3.0))), rel=1e-6)
    assert [p.suffix for p in kernel_cache_dir().glob("*.so")] == [".so"]
    assert not kernel_cache_is_cold()
    out = io.StringIO()
    assert not first_run_notice("cpu", out=out) and out.getvalue() == ""


def test_no_notice_for_the_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    out = io.StringIO()
    assert not first_run_notice("gpu", out=out) and out.getvalue() == ""
