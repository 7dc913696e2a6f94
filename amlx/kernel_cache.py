"""MLX's cache of compiled CPU kernels, and the one-line notice of a first run.

On the CPU, MLX turns every fused graph of a compiled function (amlx compiles
its decode step) into C++ source, builds it with `g++ -O3` into a shared
library and keeps it in `<temp dir>/mlx/<MLX version>/cpu/` (`lib<kernel>.so`),
where later processes find it. The first run on a machine (or after an MLX
upgrade) therefore sits silent while g++ runs once per kernel; the command line
says so while it happens. GPUs are not concerned (Metal ships its kernels
prebuilt; CUDA's are compiled in memory in well under a second each).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

from amlx.notices import stderr_stream

__all__ = ["kernel_cache_dir", "kernel_cache_is_cold", "first_run_notice"]

NOTICE = ("amlx: compiling MLX's CPU kernels for this machine (once per machine and MLX version; "
          "about a minute)…")


def _temp_dir() -> Path:
    # std::filesystem::temp_directory_path() on POSIX: the first of these that is set, else /tmp
    for var in ("TMPDIR", "TMP", "TEMP", "TEMPDIR"):
        value = os.environ.get(var)
        if value:
            return Path(value)
    return Path("/tmp")


def kernel_cache_dir() -> Path:
    """Where the MLX in use keeps its compiled CPU kernels."""
    from amlx._mlx import version

    return _temp_dir() / "mlx" / version() / "cpu"


def kernel_cache_is_cold() -> bool:
    """True when no compiled CPU kernel exists yet for this MLX version (a first run)."""
    d = kernel_cache_dir()
    try:
        return not any(f.suffix == ".so" for f in d.iterdir())
    except OSError:  # missing or unreadable: MLX will create it and compile everything
        return True


def first_run_notice(device: str = "auto", out: TextIO | None = None) -> bool:
    """Writes the one-line notice to `out` (stderr) when a model about to run on the
    CPU will find the kernel cache cold; returns whether it did."""
    from amlx._mlx import device as mxdevice

    on_cpu = device == "cpu" or (device == "auto" and not mxdevice.gpu_available())
    if not on_cpu or not kernel_cache_is_cold():
        return False
    stream = stderr_stream() if out is None else out
    if stream is None:
        return False
    stream.write(NOTICE + "\n")
    stream.flush()
    return True
