"""Builds `amlx._mlxc`, the cffi out-of-line (API mode) extension over vendor/mlxc, and
`amlx._arraytype`, Array's C core (vendor/mlxc/arraytype.c).

The cdef is read from vendor/mlxc/mlxc.h (the single source of truth). MLX's
headers and libmlx come from the installed MLX wheel (mlx-cpu, mlx-cuda-13,
mlx-metal), found through the import system or the AMLX_MLX_DIR override (a
directory holding include/mlx/mlx.h and lib/libmlx.*).

Run directly (`python build_ffi.py`) to build the extension in place.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import sys

from cffi import FFI

MLX_VERSION = "0.32.4"  # the C++ ABI is pinned: keep in step with pyproject.toml
ROOT = pathlib.Path(__file__).resolve().parent
HEADER = ROOT / "vendor" / "mlxc" / "mlxc.h"
# gemv_<isa>.cpp: one unit per instruction set, each with its own `#pragma GCC target`
# (the build flags stay portable); cpu_gemv.cpp picks one at run time.
SOURCES = ("mlxc.cpp", "blas.cpp", "cpu_gemv.cpp", "gemv_generic.cpp", "gemv_avx2.cpp", "gemv_avx512.cpp",
           "gemv_avxvnni.cpp", "gemv_avx512vnni.cpp",  # the int8 kernels on VNNI (gemv_int8.h)
           "gemv_amx.cpp",  # bf16 matmuls on AMX tiles (quantized prompts dequantized to bf16), where the CPU has them
           "gemv_avx512bf16.cpp",  # the same with AVX512-BF16, where the CPU has that but no tiles (AMD Zen 4/5)
           "distributed.cpp",  # distributed.cpp: MLX's collectives, for tensor parallelism (amlx.tp)
           "malloc_tuning.cpp",  # glibc thresholds raised at load: large temporaries reuse memory
           "buffer_view.cpp",  # the decode kernel reads the KV pools without holding them
           "cpu_step.cpp",  # the decode step's fused kernels on the CPU (attention, residual norm, activation)
           "cpu_attention.cpp",  # a prompt's attention on the CPU
           "device_copy.cpp")  # host data copied to the GPU by the CUDA driver (a step's token masks)


# Array's C core (amlx._arraytype): plain C over Python's API, no MLX (it calls mlxc
# through addresses the cffi module hands it at import: amlx/_mlx/array.py).
ARRAYTYPE_SOURCE = "vendor/mlxc/arraytype.c"


def arraytype_extension():
    """The setuptools Extension of amlx._arraytype (setup.py builds it beside amlx._mlxc)."""
    from setuptools import Extension

    return Extension("amlx._arraytype", sources=[ARRAYTYPE_SOURCE], include_dirs=["vendor/mlxc"],
                     extra_compile_args=["-O2"] if sys.platform != "win32" else [])


def build_arraytype_in_place() -> None:
    """Builds amlx._arraytype beside the package, as `python build_ffi.py` does the cffi module."""
    from setuptools import Distribution

    dist = Distribution({"name": "amlx", "ext_modules": [arraytype_extension()]})
    cmd = dist.get_command_obj("build_ext")
    cmd.inplace = True
    cmd.build_temp = str(pathlib.Path("build", "arraytype"))
    cmd.ensure_finalized()
    cmd.run()


class MLXNotFound(RuntimeError):
    pass


def _candidate_dirs():
    override = os.environ.get("AMLX_MLX_DIR")
    if override:
        yield pathlib.Path(override)
        return
    spec = importlib.util.find_spec("mlx")
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            yield pathlib.Path(loc)


def find_mlx() -> pathlib.Path:
    """The MLX directory holding include/mlx/mlx.h and lib/libmlx.*, at the pinned version."""
    tried = []
    for d in _candidate_dirs():
        tried.append(str(d))
        version_h = d / "include" / "mlx" / "version.h"
        libs = list((d / "lib").glob("libmlx.*")) if (d / "lib").is_dir() else []
        if version_h.is_file() and libs:
            found = _header_version(version_h)
            if found != MLX_VERSION:
                raise MLXNotFound(
                    f"MLX {found} found at {d}, but amlx is built against MLX {MLX_VERSION} "
                    f"(its C++ ABI is pinned): pip install 'mlx-cpu=={MLX_VERSION}' "
                    f"(or mlx-cuda-13 / mlx-metal =={MLX_VERSION})"
                )
            return d
    where = ", ".join(tried) or "nowhere (no 'mlx' package on the import path)"
    raise MLXNotFound(
        f"MLX's C++ library and headers were not found; looked in {where}. "
        f"Install the wheel for your machine: pip install 'mlx-cpu=={MLX_VERSION}' (Linux CPU), "
        f"'mlx-cuda-13=={MLX_VERSION}' (NVIDIA) or 'mlx-metal=={MLX_VERSION}' (macOS), "
        f"or set AMLX_MLX_DIR to a directory with include/mlx and lib/libmlx."
    )


def _header_version(version_h: pathlib.Path) -> str:
    text = version_h.read_text()
    parts = [re.search(rf"#define MLX_VERSION_{k} (\d+)", text) for k in ("MAJOR", "MINOR", "PATCH")]
    if not all(parts):
        return "unknown"
    return ".".join(m.group(1) for m in parts)


def read_cdef(header: pathlib.Path = HEADER) -> str:
    """The part of mlxc.h between the cdef markers, without preprocessor lines."""
    text = header.read_text()
    body = text.split("/* cdef-begin */", 1)[1].split("/* cdef-end */", 1)[0]
    return "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("#"))


def make_builder(absolute: bool = False) -> FFI:
    """The cffi builder; setuptools wants source paths relative to the project root,
    a direct compile (which changes directory) wants them absolute."""
    mlx = find_mlx()
    vendor = ROOT / "vendor" / "mlxc" if absolute else pathlib.Path("vendor", "mlxc")
    ffi = FFI()
    ffi.cdef(read_cdef())
    # The trampoline through which MLX calls Python functions (compile, grads).
    ffi.cdef('extern "Python" int amlx_call_python(void*, mlxc_vec, mlxc_vec);')
    libdir = str(mlx / "lib")
    rpaths = [libdir]
    if sys.platform != "darwin":
        rpaths.insert(0, "$ORIGIN/../mlx/lib")
    link_args = [f"-Wl,-rpath,{p}" for p in rpaths]
    ffi.set_source(
        "amlx._mlxc",
        '#include "mlxc.h"',
        sources=[(vendor / name).as_posix() for name in SOURCES],
        source_extension=".cpp",
        include_dirs=[str(ROOT / "vendor" / "mlxc"), str(mlx / "include")],
        library_dirs=[libdir],
        libraries=["mlx"] + (["dl"] if sys.platform.startswith("linux") else []),
        extra_compile_args=["-std=c++20", "-O2", "-fvisibility=hidden", "-Wno-deprecated-declarations"],
        extra_link_args=link_args,
    )
    return ffi


try:
    ffibuilder = make_builder()
except MLXNotFound as exc:
    # setuptools imports this module to find `ffibuilder`; say why plainly.
    raise SystemExit(f"amlx build: {exc}") from None


if __name__ == "__main__":
    make_builder(absolute=True).compile(tmpdir=str(ROOT / "build" / "cffi"), verbose=True, target=None)
    # cffi writes the module under tmpdir/amlx/; put it beside the package.
    built = list((ROOT / "build" / "cffi" / "amlx").glob("_mlxc*.so")) + list(
        (ROOT / "build" / "cffi").glob("amlx/_mlxc*.pyd")
    )
    for old in (ROOT / "amlx").glob("_mlxc*.so"):
        old.unlink()  # a stale build with another tag would shadow the new one
    for f in built:
        dest = ROOT / "amlx" / f.name
        dest.write_bytes(f.read_bytes())
        print(f"built {dest}")
    os.chdir(ROOT)
    for old in (ROOT / "amlx").glob("_arraytype*.so"):
        old.unlink()
    build_arraytype_in_place()
