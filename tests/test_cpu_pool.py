"""The CPU kernels' thread pool under many back-to-back small calls.

Workers wait for the next job by spinning for a few microseconds (AMLX_CPU_SPIN) before
sleeping, and the caller waits for them the same way; a lost wake-up would hang a call, and a
part claimed twice or by the wrong job would change a result. Several Python threads, each on
its own MLX stream (as the engine's shards are), call the kernels in a loop; every result must
equal, bit for bit, the one computed alone before (each output row is summed by one thread in
a fixed order, so the split does not change it). It runs in a child process per spin setting
(0: always sleep; 1: the spin window ends mid-job, the most sleep/wake transitions; the
default), under a timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import threading
    import numpy as np
    from amlx import _mlx as mx
    from amlx._mlx import cpu_kernels as ck
    from amlx._mlx import ops as O
    from amlx._mlx.device import new_stream, on_stream

    ck.set_threads(3)  # more threads than this machine may have cores: workers get preempted
    rng = np.random.default_rng(0)
    cases = []
    for m, k, n in [(1, 64, 48), (2, 96, 64), (4, 128, 80), (1, 256, 160)]:
        x = O.astype(mx.array(rng.standard_normal((m, k)).astype(np.float32)), mx.bfloat16)
        w = O.astype(mx.array(rng.standard_normal((n, k)).astype(np.float32)), mx.bfloat16)
        cases.append((x, w))
    want = []
    for x, w in cases:
        y = ck.gemv(x, w)
        mx.eval(y)
        want.append(np.asarray(O.astype(y, mx.float32)))
    bad, done = [], []

    def loop(t):
        with on_stream(new_stream("cpu")):
            for i in range(ROUNDS):
                c = (i + t) % len(cases)
                y = ck.gemv(*cases[c])
                mx.eval(y)
                if not np.array_equal(np.asarray(O.astype(y, mx.float32)), want[c]):
                    bad.append((t, i))
        done.append(t)

    threads = [threading.Thread(target=loop, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    loop(THREADS)  # the main thread too, on its own stream
    for t in threads:
        t.join()
    assert not bad, bad[:5]
    assert len(done) == THREADS + 1
    print("ok")
    """
)


@pytest.mark.parametrize("spin", ["0", "1", None])
def test_back_to_back_calls_from_several_threads_are_exact(spin) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AMLX_CPU_SPIN"}
    if spin is not None:
        env["AMLX_CPU_SPIN"] = spin
    code = CHILD.replace("ROUNDS", "1500").replace("THREADS", "3")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
