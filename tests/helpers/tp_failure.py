"""A tensor-parallel rank fails mid-stream; run as its own process by
tests/test_tensor_parallel.py: `python -m tests.helpers.tp_failure CKPT kill|stop`.

It loads CKPT with tensor_parallel=2, starts a stream, and after two tokens
kills (SIGKILL) or stops (SIGSTOP) rank 1; then prints one JSON line: the
error the stream ended with, how long that took, whether the model closed and
which follower processes are still running, whether the model's close ran
to its end, and whether another model then loads and answers. It runs apart
from the test process: without amlx.tp.keeper, MLX's ring backend would leave
rank 0's pending collectives waiting for good and stall later MLX work of the
whole process (docs/scaling.md), and a regression there must fail this test,
not hang the suite.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time

import amlx


async def scenario(path: str, how: str) -> dict:
    m = await amlx.load(path, device="cpu", tensor_parallel=2)
    pid = m.engine.mirror.alive[0]
    got, start, out = 0, 0.0, {}
    try:
        async for _ in m.generate([1, 5, 9, 33, 7, 2, 8], max_tokens=5000, max_buffer=65536):
            got += 1
            if got == 2:
                start = time.monotonic()
                os.kill(pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        out["error"] = None
    except Exception as exc:  # noqa: BLE001 - reported to the test
        out["error"], out["message"] = type(exc).__name__, str(exc)
    out["seconds"] = time.monotonic() - start
    for _ in range(200):
        if m.closed:
            break
        await asyncio.sleep(0.05)
    out["closed"] = m.closed
    try:
        m.generate([1, 2, 3])
        out["after_close"] = None
    except amlx.AmlxError as exc:
        out["after_close"] = type(exc).__name__
    await m.aclose()  # returns at once: the failure began the close
    for _ in range(100):
        out["followers"] = m.engine.mirror.alive
        if not out["followers"]:
            break
        await asyncio.sleep(0.05)
    # the close ran to its end on the model's worker, and MLX still works in this process:
    # another model loads and answers
    for _ in range(400):
        if m.engine.mirror.closed:
            break
        await asyncio.sleep(0.05)
    out["closed_fully"] = m.engine.mirror.closed
    try:  # (a failed model's group is kept, not freed under the ring's threads: amlx.tp.leader)
        m.engine.mirror.group.handle
        out["group_kept"] = True
    except ValueError:
        out["group_kept"] = False
    try:
        other = await asyncio.wait_for(amlx.load(path, device="cpu"), 30)
        out["after"] = (await asyncio.wait_for(other.complete([1, 2, 3], max_tokens=3), 30)).token_ids
        await other.aclose()
    except asyncio.TimeoutError:
        out["after"] = None
    return out


def main() -> None:
    out = asyncio.run(scenario(sys.argv[1], sys.argv[2]))
    print("RESULT " + json.dumps(out), flush=True)
    os._exit(0)  # rank 0's model thread may wait in MLX for good (see the docstring)


if __name__ == "__main__":
    main()
