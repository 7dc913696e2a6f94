"""Checkpoint loading: the host phase (`amlx.checkpoint.read_checkpoint`: files,
config, headers, all checked without MLX) and the MLX phase (`build_model`:
lazy arrays, the architecture's module tree, every weight read)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from amlx._mlx import Array, eval as mx_eval
from amlx._mlx.dtypes import as_dtype
from amlx.checkpoint import CheckpointSpec, read_checkpoint, read_tensors
from amlx.errors import MLXError, ModelLoadError
from amlx.models.base import CausalLM, Weights
from amlx.models.registry import architecture

__all__ = ["LoadedModel", "build_model", "build_module_tree", "check_dtype", "load_model", "prepare"]


@dataclass
class LoadedModel:
    model: CausalLM
    config: dict
    path: Path
    dtype: str
    args: Any = None  # the architecture's ModelArgs


def check_dtype(dtype: Any):
    """The MLX dtype a `dtype` override names (None: keep the checkpoint's); ValueError otherwise."""
    if dtype is None:
        return None
    try:
        dt = as_dtype(dtype)
    except (TypeError, ValueError, KeyError):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}") from None
    if dt.name not in ("float32", "bfloat16", "float16"):  # (float64 loaded, then every request failed)
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dt.name}")
    return dt


def build_module_tree(spec: CheckpointSpec, tensors: dict[str, Array], dt=None) -> tuple[CausalLM, list[Array]]:
    """The architecture's model over `tensors` (lazy, nothing read) and the tensors
    it does not use. Every tensor the model reads is checked for shape and dtype;
    ModelLoadError names what is missing, misshaped, mislabelled or left over."""
    args = spec.args
    own, unused = {}, []
    for name, arr in tensors.items():
        local = args.weight_name(name)
        if local is None:
            unused.append(arr)  # the vision tower of a multimodal checkpoint, rotary caches
        else:
            own[local] = arr
    w = Weights(own, args.text_quantization(), str(spec.path), dtype=dt,
                origin={args.weight_name(n): str(t.file) for n, t in spec.tensors.items()
                        if args.weight_name(n) is not None})
    try:
        model = architecture(spec.raw_config["model_type"]).build(args, w)
    except ModelLoadError as exc:
        if str(spec.path) in str(exc):
            raise
        # what an architecture refuses comes from config.json (the weights' errors name their files)
        raise ModelLoadError(f"{Path(spec.path) / 'config.json'}: {exc}") from exc
    extra = w.leftover()
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        listed = ", ".join(f"{n!r} in {Path(w.origin(n)).name}" for n in extra[:3])
        raise ModelLoadError(f"{spec.path}: unexpected tensor(s) {listed}{more} for a {args.arch} model with "
                             f"this config")
    return model, unused


def build_model(spec: CheckpointSpec, dtype=None, progress: bool | None = None,
                shard: Callable[[CausalLM], None] | None = None) -> LoadedModel:
    """The MLX phase of loading (on the engine's worker): arrays, the model, every
    weight read. `dtype` ("float32", "bfloat16", "float16") overrides the
    checkpoint's floating-point type. `shard` (tensor parallelism, amlx.tp)
    cuts the model down to one rank's part before the weights are read, so a
    rank never holds the whole model."""
    dt = check_dtype(dtype)
    if dt is None:
        dt = _one_float_dtype(spec)
    tensors = read_tensors(spec)
    try:
        model, unused = build_module_tree(spec, tensors, dt)
    except BaseException:
        for a in tensors.values():
            a.close()
        raise
    model._unused = unused
    if shard is not None:
        try:
            shard(model)
        except BaseException:
            model.close()
            raise
    _materialise(model, spec.path, progress)
    first = next(p for _, p in model.named_parameters() if p.dtype.is_floating)
    return LoadedModel(model, spec.config, spec.path, (dt or first.dtype).name, spec.args)


_SAFETENSORS_FLOATS = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _one_float_dtype(spec: CheckpointSpec):
    """The dtype every floating-point weight of the model is cast to when the checkpoint
    mixes several (a bfloat16 model with float32 norms): the config's dtype when it names
    one of them, else the one most elements have (transformers loads one dtype too). None
    when they agree. Mixed, the CPU kernels (e.g. the residual norm) refused every request
    ("x and y must be (N, C) floats of one dtype")."""
    sizes: dict[str, int] = {}
    for name, info in spec.tensors.items():
        if info.dtype in _SAFETENSORS_FLOATS and spec.args.weight_name(name) is not None:
            n = _SAFETENSORS_FLOATS[info.dtype]
            sizes[n] = sizes.get(n, 0) + math.prod(info.shape)
    if len(sizes) < 2:
        return None
    named = spec.args.torch_dtype
    return as_dtype(named if named in sizes else max(sizes, key=sizes.__getitem__))


def prepare(path: str | os.PathLike, dtype=None) -> CheckpointSpec:
    """The host phase of loading: the options checked and the checkpoint's files
    read and validated (`amlx.checkpoint.read_checkpoint`). Pure Python, no MLX:
    it may run on any thread, and a hostile file cannot block it (FIFOs, devices,
    oversized json and out-of-bounds sizes are refused before anything is opened
    or allocated)."""
    check_dtype(dtype)
    return read_checkpoint(path)


def load_model(path: str | os.PathLike, dtype=None, progress: bool | None = None) -> LoadedModel:
    """Loads a checkpoint directory: `prepare` then `build_model`."""
    return build_model(prepare(path, dtype), dtype, progress)


def _materialise(model: CausalLM, path: Path, progress: bool | None) -> None:
    """Reads every weight now, so I/O errors surface at load and not mid-request."""
    from amlx.checkpoint import progress_bar

    params = [p for _, p in model.named_parameters()]
    bar = progress_bar(len(params), f"loading {path.name}", progress)
    try:
        for i in range(0, len(params), 16):
            mx_eval(*params[i:i + 16])
            if bar is not None:
                bar.update(len(params[i:i + 16]))
        model.prepare()
    except MLXError as exc:
        model.close()
        raise ModelLoadError(f"{path}: reading the weights failed ({exc.mlx_message})") from None
    finally:
        if bar is not None:
            bar.close()
