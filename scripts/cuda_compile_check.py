"""Compiles amlx's CUDA kernels (decode attention, the few-row quantized matmul) with NVRTC, without a GPU, as
MLX's CUDA `custom_kernel` builds them: its default header, the signature it
writes (`const T* name` per input, `const __grid_constant__ Shape name_shape`
where the body uses it, outputs, template constants), then our body; NVRTC
options as MLX's JIT passes them (device code by default, sm_90a).

    python scripts/cuda_compile_check.py --nvrtc LIBNVRTC --mlx-include DIR --cuda-include DIR

LIBNVRTC: libnvrtc.so of CUDA 13 (the pip package nvidia-cuda-nvrtc, its
libnvrtc-builtins beside it on LD_LIBRARY_PATH); --mlx-include: a directory
holding mlx/backend/cuda/device/*.cuh of MLX's source or CUDA wheel; --cuda-include:
the toolkit's include directory (cuda_bf16.h; cccl/ under it is added too).
Prints each variant (decode attention: contiguous, paged (also writing the pool), paged quantized,
each also split over blocks, and the split's merge;
with and without head norms; float32/float16/bfloat16; head dims, bits, groups;
quantized_gemv: both versions, dtypes, bits, row buckets) and exits 1 if one fails to compile;
`--only attention|lanes|qgemv|step|dense` compiles one kernel's variants (lanes: decode attention's
lane-group loop, `decode_attention.LANE_DIMS`; step: step_kernels'
residual + RMSNorm and gated activation; dense: dense_rows' tensor-core matmul of 2-64 rows); `--ptxas` adds ptxas's registers and
spills to each line, fails a kernel whose block could not launch for its registers, and fails a variant that uses more registers than
`quantized_gemv.REGISTERS` says (the launch rules count warps an SM holds from that table).
Compiling is not running: the GPU tests (tests/test_decode_kernels.py) check what the kernels
compute.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amlx.models import decode_attention as da  # noqa: E402
from amlx.models import dense_rows as dr  # noqa: E402
from amlx.models import quantized_gemv as qg  # noqa: E402
from amlx.models import step_kernels as sk  # noqa: E402

_DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
_CUDA_TYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "uint32": "uint32_t",
              "int32": "int32_t"}


def kernel_text(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]], template: dict,
                body: str, header: str) -> str:
    """The translation unit MLX would compile: (name, dtype) inputs and outputs;
    template values are ints or dtype names."""
    text = _DEFAULT_HEADER + header + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    text += f"__global__ void {name}(\n"
    for n, t in inputs:
        text += f"    const {_CUDA_TYPE[t]}* {n},\n"
        for suffix, kind in (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int")):
            if n + suffix in body:
                text += f"    const __grid_constant__ {kind} {n}{suffix},\n"
    text += ",\n".join(f"    {_CUDA_TYPE[t]}* {n}" for n, t in outputs) + ") {\n"
    for key, value in template.items():
        if isinstance(value, str):
            text += f"  using {key} = {_CUDA_TYPE[value]};\n"
        else:
            text += f"  constexpr int {key} = {value};\n"
    return text + "\n" + body + "\n}\n\n} // namespace mlx::core::cu\n"


PTXAS_VERBOSE = False  # --ptxas: ptxas's registers and spills of each variant into its line


def compile_text(lib, text: str, name: str, includes: list[str]) -> tuple[int, str]:
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), (name + ".cu").encode(), 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    opts = [b"--device-as-default-execution-space", b"--gpu-architecture=sm_90a"]
    opts += [f"--include-path={d}".encode() for d in includes]
    if PTXAS_VERBOSE:
        opts.append(b"--ptxas-options=-v")
    status = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value + 1)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return status, log.value.decode(errors="replace")


def _qgemv(lib, includes: list[str]) -> int:
    """The few-row quantized matmul's variants (the group size is read from the
    shapes at run time, so it is no variant); returns how many failed."""
    failed = 0
    for version, dtype, bits, rows in itertools.product((2, 1), ["float32", "float16", "bfloat16"], qg.BITS,
                                                        qg.ROW_BUCKETS):
        name, names, body, header = qg.kernel_source(version)
        inputs = [(n, "uint32" if n == "w" else dtype) for n in names]
        text = kernel_text(name, inputs, [("out", dtype)], {"T": dtype, "BITS": bits, "RB": rows}, body, header)
        status, log = compile_text(lib, text, name, includes)
        # the launch rules' residency reads registers from qg.REGISTERS: a variant using more fails
        table = qg.REGISTERS[(version, rows, bits, 4 if dtype == "float32" else 2)]
        regs = _ptxas_registers(log)
        over = regs is not None and regs > table
        print(f"{name} {dtype} bits={bits} rows={rows}: " + (("ok" if not over else f"FAILED: over {table}")
                                                              + _ptxas_summary(log) if status == 0 else
                                                              "FAILED\n" + log), flush=True)
        failed += status != 0 or over
    return failed


def _step(lib, includes: list[str]) -> int:
    """The residual + RMSNorm kernels (columns a thread: 1, 4, 8, 11, MAX_PER) and the gated
    activation, per dtype; returns how many failed (or use more registers than a block of
    MAX_THREADS threads may: 65,536 / MAX_THREADS a thread)."""
    failed = 0
    for dtype, (name, template) in itertools.product(
            ["float32", "float16", "bfloat16"],
            [*((k, {"EPS_BITS": 1, "PRE_EPS_BITS": 1, "PER": per}) for k in ("residual", "residual_pre")
               for per in (1, 4, 8, 11, sk.MAX_PER)), ("gated", {"ACT": 0}), ("gated", {"ACT": 1})]):
        kernel, names, outputs, body, header = sk.kernel_source(name)
        text = kernel_text(kernel, [(n, dtype) for n in names], [(n, dtype) for n in outputs],
                           {"T": dtype, **template}, body, header)
        status, log = compile_text(lib, text, kernel, includes)
        regs = _ptxas_registers(log)
        over = regs is not None and regs > 65536 // sk.MAX_THREADS
        print(f"{kernel} {dtype} {template}: " + (("FAILED: too many registers" if over else "ok") + _ptxas_summary(log)
                                                  if status == 0 else "FAILED\n" + log), flush=True)
        failed += status != 0 or over
    return failed


def _dense_rows(lib, includes: list[str]) -> int:
    """The tensor-core matmul of 2-64 rows: every (MT, NT, U) `dense_rows.tiles` picks, per
    16-bit dtype; returns how many failed (or use more registers than a block of its
    WARPS warps may)."""
    failed = 0
    variants = sorted({dr.tiles(rows, n) for rows in range(dr.MIN_ROWS, dr.MAX_ROWS + 1) for n in (8, 16, 2048, 4096)})
    for dtype, (mt, nt, u) in itertools.product(["float16", "bfloat16"], variants):
        text = kernel_text(dr.NAME, [(n, dtype) for n in dr.INPUTS], [("out", dtype)],
                           {"T": dtype, "MT": mt, "NT": nt, "U": u}, dr.SOURCE, dr.HEADER)
        status, log = compile_text(lib, text, dr.NAME, includes)
        regs = _ptxas_registers(log)
        over = regs is not None and regs > 65536 // (32 * dr.WARPS)
        print(f"{dr.NAME} {dtype} MT={mt} NT={nt} U={u}: " + (("FAILED: too many registers" if over else "ok")
                                                               + _ptxas_summary(log) if status == 0 else
                                                               "FAILED\n" + log), flush=True)
        failed += status != 0 or over
    return failed


def _attention_variant(lib, includes: list[str], source: tuple, dtype: str, quantized: bool, write: bool,
                       split: bool, template: dict, label: str) -> int:
    """Compiles one decode-attention variant (`source`: kernel_source's result) at `template`
    (its T, CHUNK and WARPS filled in here), prints `label` with the outcome; 1 if it failed
    to compile or (--ptxas) its block of WARPS warps could not launch for its registers."""
    name, names, body, header = source
    fixed = {"inv_freq": "float32", "pos": "int32", "table": "int32"}
    inputs = [(n, fixed.get(n, "uint32" if n == "kv" and quantized else dtype)) for n in names]
    template = {"T": dtype, **template, "WARPS": da.WARPS, "CHUNK": da.SPLIT_KEYS if split else 0}
    outputs = ([("part_o", "float32"), ("part_ml", "float32")] if split else [("out", dtype)]) + (
        [] if write else [("kv_new", dtype)])
    status, log = compile_text(lib, kernel_text(name, inputs, outputs, template, body, header), name, includes)
    regs = _ptxas_registers(log)
    over = regs is not None and regs > 65536 // (32 * da.WARPS)  # a block of WARPS warps must launch
    print(f"{name} {dtype} {label}: " + (("FAILED: too many registers" if over else "ok") + _ptxas_summary(log)
                                         if status == 0 else "FAILED\n" + log), flush=True)
    return int(status != 0 or over)


def _lanes(lib, includes: list[str]) -> int:
    """Decode attention's lane-group loop (`decode_attention.LANE_DIMS` 4, 8 and 16, one group where
    that gives one key a round, `LANE_ONE`): every head dim
    where it applies, contiguous, paged (also writing the pool) and quantized (4 and 8 bits),
    each also split, unquantized ones at every `LANE_BYTES`; --ptxas fails one whose 16-warp
    block would not launch."""
    failed = 0
    saved = da.LANE_DIMS, da.LANE_BYTES, da.LANE_ONE
    da.LANE_ONE = True  # (one group of 32 lanes too, where the dims give one key a round)
    for qk_norm, (paged, quantized), dtype, dim, lane_dims, bits, lane_bytes in itertools.product(
            [False, True], [(False, False), (True, False), (True, True)], ["float32", "float16", "bfloat16"],
            [64, 128, 256, 512], [4, 8, 16], [4, 8], da.LANE_BYTES_CHOICES):
        da.LANE_DIMS, da.LANE_BYTES = lane_dims, lane_bytes
        groups = da.lane_groups(dim, quantized)
        if (not groups or (bits == 4 and not quantized) or (quantized and lane_dims > 8)
                or (quantized and lane_bytes != 64)):  # (a quantized pool's loads take no LANE_BYTES)
            continue
        for write, split in [(w, sp) for sp in (False, True) for w in ([False, True] if paged and not quantized
                                                                        else [False])]:
            template = {"H": 32, "KVH": 8, "D": dim, "WINDOW": 7, "SCALE_BITS": 1, "EPS_BITS": 1, "LG": groups}
            if quantized:
                template.update(BITS=bits, GROUP=64)
            failed += _attention_variant(
                lib, includes, da.kernel_source(qk_norm, paged, quantized, 1, write, split, lanes=True), dtype,
                quantized, write, split, template,
                f"D={dim} LG={groups}" + (f" bits={bits}" if quantized else f" bytes={lane_bytes}"))
    da.LANE_DIMS, da.LANE_BYTES, da.LANE_ONE = saved
    return failed


def _ptxas_registers(log: str) -> int | None:
    import re

    regs = re.search(r"Used (\d+) registers", log)
    return int(regs.group(1)) if regs else None


def _ptxas_summary(log: str) -> str:
    """' (N registers, S bytes spilled)' from ptxas -v's lines in an NVRTC log, or ''."""
    import re

    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return f" ({regs.group(1)} registers, {spills.group(1) if spills else '?'} bytes spilled)" if regs else ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvrtc", required=True)
    ap.add_argument("--mlx-include", required=True)
    ap.add_argument("--cuda-include", required=True)
    ap.add_argument("--only", choices=["attention", "lanes", "qgemv", "step", "dense"], default=None)
    ap.add_argument("--ptxas", action="store_true", help="registers and spills of each qgemv variant (ptxas -v)")
    a = ap.parse_args()
    global PTXAS_VERBOSE
    PTXAS_VERBOSE = a.ptxas
    lib = ctypes.CDLL(a.nvrtc)
    includes = [a.mlx_include, a.cuda_include, str(Path(a.cuda_include) / "cccl")]
    failed = 0
    if a.only in (None, "step"):
        failed += _step(lib, includes)
    if a.only in (None, "qgemv"):
        failed += _qgemv(lib, includes)
    if a.only in (None, "dense"):
        failed += _dense_rows(lib, includes)
    if a.only in (None, "lanes"):
        failed += _lanes(lib, includes)
    if a.only in ("lanes", "qgemv", "step", "dense"):
        print(f"{failed} failed")
        return 1 if failed else 0
    shapes = [(64, 8, 64), (128, 4, 64), (128, 8, 64), (256, 8, 32), (256, 8, 64), (96, 4, 32), (da.MAX_DIM, 8, 64),
              (da.MAX_QUANT_DIM, 4, 64)]
    for qk_norm, (paged, quantized), dtype, (dim, bits, group) in itertools.product(
            [False, True], [(False, False), (True, False), (True, True)], ["float32", "float16", "bfloat16"], shapes):
        if (not quantized and (bits, group) != (8, 64)) or (quantized and dim > da.MAX_QUANT_DIM):
            continue  # (supports() refuses a quantized pool beyond MAX_QUANT_DIM)
        # keys a round: every count round_keys allows at this dim (with head norms, float32 and
        # bfloat16: the variants with the most registers), else the default's
        keys = ({da.round_keys(dim, quantized, w) for w in (1, 2, 4)} if qk_norm and dtype != "float16"
                else {da.round_keys(dim, quantized)})
        # (the paged, unquantized kernel also in its variant that writes the pool itself; each
        # variant also split over blocks, handing back partial results)
        for u, write, split in [(u, w, sp) for u in sorted(keys) for sp in (False, True)
                                for w in ([False, True] if paged and not quantized else [False])]:
            template = {"H": 16, "KVH": 8, "D": dim, "WINDOW": 7, "SCALE_BITS": 1, "EPS_BITS": 1}
            if quantized:
                template.update(BITS=bits, GROUP=group)
            failed += _attention_variant(
                lib, includes, da.kernel_source(qk_norm, paged, quantized, u, write, split), dtype, quantized, write,
                split, template, f"D={dim} U={u}" + (f" bits={bits} group={group}" if quantized else ""))
    for dtype in ["float32", "float16", "bfloat16"]:  # the split step's merge
        text = kernel_text("amlx_decode_attention_combine", [("part_o", "float32"), ("part_ml", "float32")],
                           [("out", dtype)], {"T": dtype, "H": 16, "D": 128}, da._COMBINE, "")
        status, log = compile_text(lib, text, "amlx_decode_attention_combine", includes)
        print(f"amlx_decode_attention_combine {dtype}: " + ("ok" + _ptxas_summary(log) if status == 0
                                                           else "FAILED\n" + log), flush=True)
        failed += status != 0
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
