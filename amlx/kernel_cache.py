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

from amlx.errors import ModelLoadError
from amlx.notices import stderr_stream

__all__ = ["kernel_cache_dir", "kernel_cache_is_cold", "first_run_notice", "check_kernel_cache"]

NOTICE = ("amlx: compiling MLX's CPU kernels for this machine (once per machine and MLX version; "
          "about a minute)…")
# `amlx serve`'s: the compile happens when the first requests arrive, not at startup
SERVE_NOTICE = ("amlx serve: MLX's CPU kernels are not compiled yet for this machine: the first requests will "
                "wait (about a minute) while they compile, once per machine and MLX version")


_TEMP_VARS = ("TMPDIR", "TMP", "TEMP", "TEMPDIR")


def _temp_setting() -> tuple[str | None, str]:
    """(variable, value) that std::filesystem::temp_directory_path() reads on POSIX (libstdc++ and
    libc++ alike): the first of these that is set, even to an empty string, which it then refuses
    as no directory; (None, "/tmp") when none is."""
    return next(((var, os.environ[var]) for var in _TEMP_VARS if var in os.environ), (None, "/tmp"))


def _temp_dir() -> Path:
    return Path(_temp_setting()[1])


def _temp_problem() -> str | None:
    """Why MLX's temp_directory_path() throws (no CPU kernel can compile), or None."""
    var, value = _temp_setting()
    if not value:
        return f"{var} is set but empty"
    if not Path(value).is_dir():
        return f"{value if var is None else f'{var}={value}'} is not a directory"
    return None


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


def check_kernel_cache(device: str) -> None:
    """ModelLoadError when a model about to run on `device` ("cpu" or "gpu", resolved) could not
    compile: on the CPU, MLX asks std::filesystem::temp_directory_path() for the kernel cache at
    every compile, and it throws when its directory is missing or not a directory. The model
    loaded, and then every request failed in MLX ("filesystem error: temp_directory_path: No such
    file or directory"). (Metal ships its kernels prebuilt.)"""
    problem = _temp_problem() if device == "cpu" else None
    if problem is not None:
        var = _temp_setting()[0] or "TMPDIR"
        raise ModelLoadError(f"{problem}: MLX compiles its CPU kernels under it, so no request could run; point "
                             f"{var} at an existing directory")


def compile_disabled() -> bool:
    """Whether MLX_DISABLE_COMPILE is set: MLX then compiles nothing (it checks only that the
    variable exists, whatever its value), so a cold kernel cache costs no g++ run."""
    return "MLX_DISABLE_COMPILE" in os.environ


def first_run_notice(device: str = "auto", out: TextIO | None = None, text: str = NOTICE) -> bool:
    """Writes the one-line notice `text` (NOTICE; SERVE_NOTICE for a server) to `out` (stderr)
    when a model about to run on the CPU will find the kernel cache cold and compile into it;
    returns whether it did.
    (With MLX_DISABLE_COMPILE set nothing compiles: the notice said "compiling ... about
    a minute" before a first token that came at once.)"""
    from amlx._mlx import device as mxdevice

    on_cpu = device == "cpu" or (device == "auto" and not mxdevice.gpu_available())
    if not on_cpu or compile_disabled() or not kernel_cache_is_cold() or _temp_problem() is not None:
        return False  # (_temp_problem: then the load refuses)
    stream = stderr_stream() if out is None else out
    if stream is None:
        return False
    stream.write(text + "\n")
    stream.flush()
    return True
