"""Convert a checkpoint into an MLX checkpoint, optionally quantized.

`convert(src, dst, quantize=4)` reads a Hugging Face (or MLX) checkpoint
directory and writes one that amlx and mlx-lm both load, in the format of the
mlx-community releases:

* weights in safetensors with ``{"format": "mlx"}`` metadata, in
  ``model.safetensors`` or, above `max_shard_size`, in
  ``model-00001-of-0000N.safetensors`` shards; ``model.safetensors.index.json``
  (weight map, total size and parameter count) is written in both cases, as
  mlx-lm does;
* when quantizing: every Linear layer and the token embedding of the language
  model stored as MLX's affine format (packed uint32 ``weight``, ``scales``,
  ``biases`` per group of `group_size` inputs), and config.json gains
  ``"quantization": {"group_size": g, "bits": b}`` and the same dict as
  ``"quantization_config"``. Layers whose input size is not a multiple of the
  group size stay unquantized and have no ``scales``; like mlx-lm, the config
  does not list them (both loaders read a layer without ``scales`` as a plain
  one);
* tensors inference never reads (``rotary_emb.inv_freq``, the duplicate
  ``lm_head.weight`` of tied embeddings) are dropped; tensors outside the
  language model (the vision tower of a multimodal Gemma 3) are kept as they
  are, cast to `dtype` but never quantized;
* config.json is rewritten: besides ``quantization``, keys that only have a
  newer spelling (``rope_parameters``, ``layer_types``) gain their older one
  (``rope_theta``, ``rope_scaling``, ``rope_local_base_freq``,
  ``sliding_window_pattern``) when absent, and a multimodal Gemma 3 config
  gains a top-level ``vocab_size``, since mlx-lm reads only those; amlx reads
  the result identically;
* the tokenizer, chat template and generation config files are copied
  (Python files are not: no code from a checkpoint is carried or run).

The source is validated exactly as `load_model` validates it (config, every
tensor's presence and shape) before anything is written; its weights are read
lazily and written one shard at a time, so memory stays near one shard. The
output appears at `dst` only once complete.
"""

from __future__ import annotations

import json
import operator
import os
from pathlib import Path

from amlx._mlx import Array, ops
from amlx.checkpoint import (CheckpointSpec, check_creatable, check_destination, copy_carried, read_checkpoint,
                             read_tensors, staged_directory, write_config, write_weights)

__all__ = ["convert", "DEFAULT_MAX_SHARD_SIZE", "QUANTIZE_BITS", "GROUP_SIZES", "mlx_config"]

DEFAULT_MAX_SHARD_SIZE = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
QUANTIZE_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def _integer(value) -> int | None:
    """`value` as a Python int when it is an integer (int or a numpy integer, not a bool), else
    None. A float, even 4.0, is not one: `4.0 in (4, 8)` held, and config.json then said
    ``"bits": 4.0``, which loaders that want an int refuse."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        return None
    return operator.index(value)


def _check_options(quantize, group_size, dtype, max_shard_size):
    """(dtype, bits, group size), the latter two as Python ints (json writes a numpy integer not at all)."""
    from amlx.models.loader import check_dtype

    bits = None if quantize is None else _integer(quantize)
    if quantize is not None and bits not in QUANTIZE_BITS:
        raise ValueError(f"quantize must be None, 4 or 8 (integer bits), not {quantize!r}")
    group = _integer(group_size)
    if group not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size!r}")
    dt = check_dtype(dtype)
    if dt is not None and dt.name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dt.name}")
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, not {max_shard_size!r}")
    return dt, bits, group


class _Source:
    """The source checkpoint, validated like `load_model` but with no weight read yet."""

    def __init__(self, path: Path):
        from amlx.models.loader import build_module_tree

        self.path = path
        self.spec: CheckpointSpec = read_checkpoint(path)
        self.cfg = self.spec.config
        self.raw = self.spec.raw_config
        args = self.spec.args
        self.tensors: dict[str, Array] = read_tensors(self.spec)
        self.prefix = args.weight_prefix
        self.quantization = args.text_quantization()
        # in the text model but never read (rotary caches, a tied lm_head): not written;
        # outside it (the vision tower): carried over as is
        self.dropped = {n for n in self.tensors if n.startswith(self.prefix) and args.weight_name(n) is None}
        try:
            self.model, _ = build_module_tree(self.spec, self.tensors)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for a in self.tensors.values():
            a.close()


def _modules(model) -> tuple[dict[str, str], list[str]]:
    """(path -> "linear" | "embedding" for plain layers, paths of already quantized layers)."""
    from amlx.models.nn import Embedding, Linear, QuantizedEmbedding, QuantizedLinear

    plain, quantized = {}, []
    for path, m in model.named_modules():
        if isinstance(m, Linear):
            plain[path] = "linear"
        elif isinstance(m, Embedding):
            plain[path] = "embedding"
        elif isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
            quantized.append(path)
    return plain, quantized


def _plan(src: _Source, dt, bits, group_size, units: list):
    """Appends the output tensors, lazily computed, to `units`, in units kept in one
    shard: ([(name, array), ...], the source tensor), so the source is released with it.
    Returns the number of parameters (quantized ones unpacked) and the quantized layers."""
    plain, already = _modules(src.model)
    if bits is not None and already:
        raise ValueError(f"{src.path} is already quantized ({already[0]} and others); convert it from an "
                         f"unquantized checkpoint")
    n_params = 0
    quantized_layers = []
    for name in sorted(src.tensors):
        if name in src.dropped:
            continue
        arr = src.tensors[name]
        local = name[len(src.prefix):] if name.startswith(src.prefix) else None
        module, _, leaf = (local or "").rpartition(".")
        if bits is not None and local is not None and leaf == "weight" and module in plain \
                and arr.shape[-1] % group_size == 0:
            w = arr.astype(dt) if dt is not None and arr.dtype is not dt else arr
            wq, scales, biases = ops.quantize(w, group_size, bits)
            base = name[:-len("weight")]
            units.append(([(name, wq), (base + "scales", scales), (base + "biases", biases)], arr))
            n_params += arr.size
            quantized_layers.append(module)
            continue
        out = arr.astype(dt) if dt is not None and arr.dtype.is_floating and arr.dtype is not dt else arr
        units.append(([(name, out)], arr))
        if local is not None and leaf in ("scales", "biases") and module in already:
            continue
        if local is not None and leaf == "weight" and module in already:
            q = src.quantization
            override = q.get(module)
            b = int(override.get("bits", q["bits"])) if isinstance(override, dict) else q["bits"]
            n_params += arr.size * 32 // b
        else:
            n_params += arr.size
    return n_params, quantized_layers


def mlx_config(raw: dict, args, dt, bits, group_size) -> dict:
    """config.json of the written checkpoint: `raw` plus the older spellings mlx-lm
    reads (amlx reads either), the new dtype and the quantization entry."""
    raw = json.loads(json.dumps(raw))  # a deep copy
    raw.pop("_name_or_path", None)
    if args.multimodal:
        if not isinstance(raw.get("text_config"), dict):
            raw["text_config"] = {}
        text = raw["text_config"]
    else:
        text = raw
    args.older_spellings(text)
    if args.multimodal:
        raw.setdefault("vocab_size", args.vocab_size)  # mlx-lm's gemma3 reads it there
        raw["text_config"] = dict(sorted(text.items()))
        text = raw["text_config"]
    if dt is not None:
        for section in (raw, text):
            for key in ("torch_dtype", "dtype"):
                if isinstance(section.get(key), str):
                    section[key] = dt.name
    if bits is not None:
        raw.pop("quantization", None)
        raw.pop("quantization_config", None)
        q = {"group_size": group_size, "bits": bits}
        raw["quantization"] = q
        raw["quantization_config"] = dict(q)
    elif "quantization" in raw:
        raw["quantization_config"] = raw["quantization"]
    return dict(sorted(raw.items()))


def convert(src: str | os.PathLike, dst: str | os.PathLike, quantize: int | None = None, group_size: int = 64,
            dtype=None, progress: bool | None = None, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Writes the checkpoint at `src` to the new directory `dst` as an MLX checkpoint.

    quantize: None (keep the weights as floats), 4 or 8 (bits of MLX affine quantization).
    group_size: inputs per quantization group: 32, 64 or 128.
    Both are integers (int or a numpy integer); a float, even 4.0, or a bool is refused
    (ValueError naming the option), so config.json always records integers.
    dtype: "float32", "bfloat16" or "float16": cast every floating-point tensor (and
    the quantization scales and biases) to it; None keeps the source dtypes.
    progress: a tqdm progress bar; None shows it on a terminal only.
    max_shard_size: bytes per safetensors file before a new shard starts (5 GiB, as mlx-lm).

    Returns the path of `dst`. Raises ModelLoadError when `src` is not a loadable
    checkpoint, ValueError for bad options (also when `dst` exists and is not empty,
    or when asked to quantize an already quantized checkpoint).
    """
    dt, quantize, group_size = _check_options(quantize, group_size, dtype, max_shard_size)
    src, dst = Path(src), Path(dst)
    check_destination(src, dst)
    check_creatable(dst)  # (a file in its way was a raw FileExistsError, once the source was read)
    source = _Source(src)
    units: list = []
    try:
        n_params, quantized_layers = _plan(source, dt, quantize, group_size, units)
        config = mlx_config(source.raw, source.spec.args, dt, quantize, group_size)
        if quantize is not None and not quantized_layers:
            raise ValueError(f"no layer of {src} has an input size divisible by group_size={group_size}; "
                             f"nothing would be quantized")
        with staged_directory(dst) as tmp:
            write_weights(tmp, units, n_params, max_shard_size, f"converting {src.name}", progress)
            write_config(tmp, config)
            copy_carried(src, tmp)
    finally:
        for pairs, _ in units:
            for _, a in pairs:
                a.close()
        source.close()
    return dst
