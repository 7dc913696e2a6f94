"""One side of a benchmark (amlx or mlx-lm) in a process of its own, driven over a pipe
(bigspeed.py, speculative.py): each side's memory and MLX state start clean, and a side
that hangs or dies cannot take the other's figures with it.

The protocol, one JSON object per line: the child prints `READY {...}` once its models are
loaded, then reads commands on stdin and prints one `RESULT {...}` per command;
`{"op": "quit"}` ends it. `serve` is the child's loop, `Child` the parent's handle, every
wait of which ends by a deadline (time.monotonic).
"""

from __future__ import annotations

import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

__all__ = ["Child", "run_meta", "serve"]


def run_meta() -> dict:
    """Date, platform and package versions for a side-by-side run's results (from the
    packages' metadata: importing mlx_lm would import transformers, seconds a budgeted
    device call does not have)."""
    from importlib import metadata

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "platform": platform.platform(),
            "python": sys.version.split()[0]}
    for dist in ("mlx", "mlx-cuda-13", "mlx-cpu", "mlx-lm"):
        try:
            meta[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return meta


def release_cached_memory() -> None:
    """Hands MLX's cached buffers back to the device, for whichever bindings this process
    loaded (amlx's, mlx's). The sides' processes share one GPU, and MLX keeps freed buffers
    cached up to its memory limit (95% of a CUDA device), so one side's cache after a
    64-stream run left the other out of memory (bigspeed.py, gemma3-27b-4bit, H200,
    2026-12-03). Called between commands, outside what they time."""
    if "amlx._mlx" in sys.modules:
        from amlx._mlx import memory

        memory.clear_cache()
    core = sys.modules.get("mlx.core")
    if core is not None:
        core.clear_cache()


def serve(start: Callable[[], tuple[dict, Callable[[dict], dict], Callable[[], None]]]) -> int:
    """The child's loop: `start()` loads the side and returns (what READY reports, a handler
    from a command to its result, a closer); then one RESULT line per command, each
    followed by `release_cached_memory`."""
    out = sys.stdout
    sys.stdout = sys.stderr  # libraries' prints go to the log, not the pipe
    ready, handle, close = start()
    print("READY " + json.dumps(ready), file=out, flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        result = handle(cmd)
        release_cached_memory()
        print("RESULT " + json.dumps(result), file=out, flush=True)
    close()
    return 0


class Child:
    """A child process running `script --child SIDE *args` (which calls `serve`)."""

    def __init__(self, side: str, script: Path, args: list[str], env: dict[str, str] | None = None):
        self.side = side
        self.ready: dict = {}  # what the child reported once its model was loaded (the caller's wait_for)
        # no load-time warm-up of quantized kernels: the benchmarks compile what they measure
        # themselves (an untimed first run, or side by side beforehand), and the warm-up would
        # compile every variant, minutes of a call's budget
        # (`env`: more variables for this child, e.g. a switch of the side being compared)
        env = dict(os.environ, AMLX_WARMUP="0", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, str(script), "--child", side, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, tag: str, deadline: float) -> dict:
        """The JSON of the child's next line tagged `tag`; TimeoutError past `deadline`,
        RuntimeError if the child exits first."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.side}: no {tag} before the deadline")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"{self.side} exited (status {self.proc.wait()}) before {tag}")
            if line.startswith(tag + " "):
                return json.loads(line[len(tag) + 1:])

    def ask(self, deadline: float, **cmd) -> dict:
        """Sends a command and waits for its RESULT."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.wait_for("RESULT", deadline)

    def stop(self, grace: float = 20.0) -> None:
        """Asks the child to quit; kills it after `grace` seconds (at once when 0)."""
        try:
            if self.proc.poll() is None and self.proc.stdin is not None and grace > 0:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
            self.proc.wait(timeout=max(0.01, grace))
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
