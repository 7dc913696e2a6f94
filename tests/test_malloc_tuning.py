"""glibc malloc tuned at load (vendor/mlxc/malloc_tuning.cpp): a step's large
temporaries reuse the memory of the step before instead of fresh pages.

The check is behavioural: after a warm-up, another round of the same large
temporaries (more than MLX's own 32 MB buffer cache keeps) costs almost no
page faults. Without the tuning (AMLX_MALLOC_TUNING=0) every round faults in
many of its pages again; the second test shows the first is not vacuous.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="tunes glibc's malloc only")

_ROUNDS = """
import resource, sys
import numpy as np
from amlx import _mlx as mx
from amlx._mlx import ops as O
x = mx.array(np.ones((2 << 20,), np.float32))  # 8 MB
def round_():
    # six 8 MB temporaries alive at once (48 MB, over MLX's 32 MB cache), then freed
    ys = [O.add(x, float(i)) for i in range(6)]
    mx.eval(*ys)
    del ys
for _ in range(3):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
pages = 48 * 256  # 4 KB pages in 48 MB
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / pages)
"""


def _fault_share(env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", _ROUNDS], capture_output=True, text=True, env=env, check=True)
    return float(out.stdout.split()[-1])


def test_malloc_is_tuned_at_load() -> None:
    from amlx._mlx import lib

    assert lib.mlxc_malloc_tuned() == 1


def test_large_temporaries_reuse_memory() -> None:
    env = {k: v for k, v in os.environ.items() if k != "AMLX_MALLOC_TUNING"}
    assert _fault_share(env) < 0.1
    # the same rounds with malloc as glibc sets it fault many pages in again (about half here)
    assert _fault_share({**env, "AMLX_MALLOC_TUNING": "0"}) > 0.25
