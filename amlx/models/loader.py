"""Checkpoint loading: config, safetensors (single file or shards), weight checks."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from amlx._mlx import Array, eval as mx_eval, io
from amlx._mlx.dtypes import as_dtype
from amlx.errors import MLXError, ModelLoadError
from amlx.models import gemma3, llama, qwen2, qwen3
from amlx.models.base import CausalLM, Weights
from amlx.models.config import load_config

# normalised arch name -> builder
ARCHITECTURES = {"qwen3": qwen3.build, "qwen2": qwen2.build, "llama": llama.build, "gemma3": gemma3.build}

# Tensors real checkpoints carry that inference does not use.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: CausalLM
    config: dict
    path: Path
    dtype: str


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ModelLoadError(f"{index}: shard file(s) missing: {', '.join(missing)}")
        return [path / f for f in files]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(path.glob("*.safetensors"))
    if others:
        return others
    raise ModelLoadError(f"{path}: no model.safetensors (or model.safetensors.index.json with shards) found")


def _read_tensors(files: list[Path], index_map: dict | None, origin: dict[str, str] | None = None) -> dict[str, Array]:
    """Every tensor of the files by name (lazy); `origin` gets each name's file."""
    tensors: dict[str, Array] = {}
    origin = {} if origin is None else origin
    for f in files:
        try:
            arrays, _ = io.load_safetensors(f)
        except MLXError as exc:
            raise ModelLoadError(f"{f}: cannot read safetensors ({exc.mlx_message})") from None
        for name, arr in arrays.items():
            if name in tensors:
                raise ModelLoadError(f"{f}: tensor {name!r} appears in more than one shard")
            tensors[name] = arr
            origin[name] = str(f)
    if index_map:
        for n, listed in index_map.items():
            if n not in tensors or Path(origin[n]).name != listed:
                where = "no file holds it" if n not in tensors else f"it is in {Path(origin[n]).name}"
                raise ModelLoadError(f"{files[0].parent / 'model.safetensors.index.json'}: lists tensor {n!r} in "
                                     f"{listed}, but that file does not hold it ({where})")
    return tensors


def local_quantization(quant: dict | None, prefix: str) -> dict | None:
    """The config's quantization with per-layer keys named like the text model's own
    tensors: mlx-lm names them by full path (``language_model.model.layers.0...``)."""
    if not quant or not prefix:
        return quant
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in quant.items()}


def load_model(path: str | os.PathLike, dtype=None, progress: bool | None = None) -> LoadedModel:
    """Loads a checkpoint directory. `dtype` ("float32", "bfloat16", "float16")
    overrides the checkpoint's floating-point type."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a directory (expected a Hugging Face or MLX checkpoint)")
    cfg = load_config(path)
    dt = None
    if dtype is not None:
        try:
            dt = as_dtype(dtype)
        except TypeError:
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}") from None
        if not dt.is_floating:
            raise ValueError(f"dtype must be a floating-point type, not {dt.name}")
    files = checkpoint_files(path)
    index = path / "model.safetensors.index.json"
    index_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    origin: dict[str, str] = {}
    tensors = _read_tensors(files, index_map, origin)
    prefix = cfg["weight_prefix"]
    own, unused = {}, []
    for name, arr in tensors.items():
        if prefix and not name.startswith(prefix):
            unused.append(arr)  # e.g. the vision tower of a multimodal checkpoint
        elif name.endswith(_IGNORED_SUFFIXES) or (cfg["tie_word_embeddings"] and name == prefix + "lm_head.weight"):
            unused.append(arr)
        else:
            own[name[len(prefix):]] = arr
    w = Weights(own, local_quantization(cfg["quantization"], prefix), str(path), dtype=dt,
                origin={n[len(prefix):]: f for n, f in origin.items() if n.startswith(prefix)})
    try:
        model = ARCHITECTURES[cfg["arch"]](cfg, w)
    except ModelLoadError:
        for a in tensors.values():
            a.close()
        raise
    extra = w.leftover()
    if extra:
        for a in tensors.values():
            a.close()
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        listed = ", ".join(f"{n!r} in {Path(w.origin(n)).name}" for n in extra[:3])
        raise ModelLoadError(f"{path}: unexpected tensor(s) {listed}{more} for a {cfg['arch']} model with "
                             f"this config")
    model._unused = unused
    _materialise(model, path, progress)
    first = next(p for _, p in model.named_parameters() if p.dtype.is_floating)
    return LoadedModel(model, cfg, path, (dt or first.dtype).name)


def _materialise(model: CausalLM, path: Path, progress: bool | None) -> None:
    """Reads every weight now, so I/O errors surface at load and not mid-request."""
    params = [p for _, p in model.named_parameters()]
    groups = [params[i:i + 16] for i in range(0, len(params), 16)]
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(params), desc=f"loading {path.name}", unit="tensor", disable=progress is False
                   if progress is not None else None, leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    try:
        for g in groups:
            mx_eval(*g)
            if bar is not None:
                bar.update(len(g))
        model.prepare()
    except MLXError as exc:
        model.close()
        raise ModelLoadError(f"{path}: reading the weights failed ({exc.mlx_message})") from None
    finally:
        if bar is not None:
            bar.close()
