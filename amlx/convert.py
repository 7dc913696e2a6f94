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
import os
import shutil
import tempfile
from pathlib import Path

from amlx._mlx import Array, eval as mx_eval, io, ops
from amlx._mlx.dtypes import as_dtype
from amlx.errors import ModelLoadError

__all__ = ["convert", "DEFAULT_MAX_SHARD_SIZE", "QUANTIZE_BITS", "GROUP_SIZES"]

DEFAULT_MAX_SHARD_SIZE = 5 << 30  # mlx-lm's MAX_FILE_SIZE_GB
QUANTIZE_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)

# Files of a checkpoint other than weights and config.json that are carried over.
_CARRIED_SUFFIXES = (".json", ".jinja", ".model", ".txt", ".tiktoken", ".jsonl")
# config.json is rewritten; weight indexes and other tools' quantization metadata would mislead.
_NOT_CARRIED = ("config.json", "hf_quant_config.json", "quantize_config.json")


def _check_options(quantize, group_size, dtype, max_shard_size):
    if quantize is not None and (isinstance(quantize, bool) or quantize not in QUANTIZE_BITS):
        raise ValueError(f"quantize must be None, 4 or 8 (bits), not {quantize!r}")
    if isinstance(group_size, bool) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, not {group_size!r}")
    dt = None
    if dtype is not None:
        try:
            dt = as_dtype(dtype)
        except (TypeError, ValueError, KeyError):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dtype!r}") from None
        if dt.name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {dt.name}")
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be a positive number of bytes, not {max_shard_size!r}")
    return dt


def _check_paths(src: Path, dst: Path) -> None:
    if not src.is_dir():
        raise ModelLoadError(f"{src}: not a directory (expected a Hugging Face or MLX checkpoint)")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise ValueError(f"dst {dst} must lie outside the source checkpoint {src}")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"dst {dst} already exists and is not an empty directory")


class _Source:
    """The source checkpoint, validated like `load_model` but with no weight read yet."""

    def __init__(self, path: Path):
        from amlx.models.base import Weights
        from amlx.models.config import _read_json, load_config
        from amlx.models.loader import (ARCHITECTURES, _IGNORED_SUFFIXES, _read_tensors, checkpoint_files,
                                        local_quantization)

        self.path = path
        self.cfg = load_config(path)
        self.raw = _read_json(path / "config.json", required=True)
        files = checkpoint_files(path)
        index = path / "model.safetensors.index.json"
        index_map = json.loads(index.read_text())["weight_map"] if index.is_file() else None
        origin: dict[str, str] = {}
        self.tensors: dict[str, Array] = _read_tensors(files, index_map, origin)
        prefix = self.prefix = self.cfg["weight_prefix"]
        self.dropped: set[str] = set()
        own = {}
        for name, arr in self.tensors.items():
            if prefix and not name.startswith(prefix):
                continue  # e.g. the vision tower: carried over as is
            local = name[len(prefix):]
            if local.endswith(_IGNORED_SUFFIXES) or (self.cfg["tie_word_embeddings"] and local == "lm_head.weight"):
                self.dropped.add(name)
            else:
                own[local] = arr
        try:
            self.quantization = local_quantization(self.cfg["quantization"], prefix)
            w = Weights(own, self.quantization, str(path),
                        origin={n[len(prefix):]: f for n, f in origin.items() if n.startswith(prefix)})
            self.model = ARCHITECTURES[self.cfg["arch"]](self.cfg, w)
            extra = w.leftover()
            if extra:
                more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
                listed = ", ".join(f"{n!r} in {Path(w.origin(n)).name}" for n in extra[:3])
                raise ModelLoadError(f"{path}: unexpected tensor(s) {listed}{more} for a {self.cfg['arch']} "
                                     f"model with this config")
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


def _shards(units, max_bytes: int) -> list[list]:
    """Units in order, a new shard whenever the next would pass `max_bytes` (mlx-lm's rule)."""
    shards: list[list] = []
    size = 0
    for unit in units:
        nbytes = sum(a.nbytes for _, a in unit[0])
        if not shards or size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += nbytes
    return shards


def _text_section(raw: dict, cfg: dict) -> dict:
    if cfg["multimodal"]:
        if not isinstance(raw.get("text_config"), dict):
            raw["text_config"] = {}
        return raw["text_config"]
    return raw


def _pattern_of(layer_types: list[str]) -> int | None:
    n = len(layer_types)
    for p in range(1, n + 2):
        if layer_types == ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n)]:
            return p
    return None


def _rewrite_config(raw: dict, cfg: dict, dt, bits, group_size) -> dict:
    raw = json.loads(json.dumps(raw))  # a deep copy
    raw.pop("_name_or_path", None)
    text = _text_section(raw, cfg)
    # Spellings older readers (mlx-lm among them) need; amlx reads either.
    text.setdefault("rope_theta", cfg["rope_theta"])
    if cfg["rope_scaling"] is not None:
        text.setdefault("rope_scaling", dict(cfg["rope_scaling"]))
    if cfg["arch"] == "gemma3":
        text.setdefault("rope_local_base_freq", cfg["rope_local_base_freq"])
        if "sliding_window_pattern" not in text:
            pattern = _pattern_of(cfg["layer_types"])
            if pattern is not None:
                text["sliding_window_pattern"] = pattern
        if cfg["sliding_window"] is not None:
            text.setdefault("sliding_window", cfg["sliding_window"])
        text.setdefault("query_pre_attn_scalar", cfg["query_pre_attn_scalar"])
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size"):
            text.setdefault(key, cfg[key])
    if cfg["multimodal"]:
        raw.setdefault("vocab_size", cfg["vocab_size"])  # mlx-lm's gemma3 reads it there
    if dt is not None:
        for section in (raw, text):
            for key in ("torch_dtype", "dtype"):
                if isinstance(section.get(key), str):
                    section[key] = dt.name
    if cfg["multimodal"]:
        raw["text_config"] = dict(sorted(text.items()))
    if bits is not None:
        raw.pop("quantization", None)
        raw.pop("quantization_config", None)
        q = {"group_size": group_size, "bits": bits}
        raw["quantization"] = q
        raw["quantization_config"] = dict(q)
    elif "quantization" in raw:
        raw["quantization_config"] = raw["quantization"]
    return dict(sorted(raw.items()))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _progress_bar(total: int, desc: str, progress: bool | None):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    disable = None if progress is None else not progress
    return tqdm(total=total, desc=desc, unit="tensor", disable=disable, leave=False)


def convert(src: str | os.PathLike, dst: str | os.PathLike, quantize: int | None = None, group_size: int = 64,
            dtype=None, progress: bool | None = None, *, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Writes the checkpoint at `src` to the new directory `dst` as an MLX checkpoint.

    quantize: None (keep the weights as floats), 4 or 8 (bits of MLX affine quantization).
    group_size: inputs per quantization group: 32, 64 or 128.
    dtype: "float32", "bfloat16" or "float16": cast every floating-point tensor (and
    the quantization scales and biases) to it; None keeps the source dtypes.
    progress: a tqdm progress bar; None shows it on a terminal only.
    max_shard_size: bytes per safetensors file before a new shard starts (5 GiB, as mlx-lm).

    Returns the path of `dst`. Raises ModelLoadError when `src` is not a loadable
    checkpoint, ValueError for bad options (also when `dst` exists and is not empty,
    or when asked to quantize an already quantized checkpoint).
    """
    dt = _check_options(quantize, group_size, dtype, max_shard_size)
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    source = _Source(src)
    tmp: Path | None = None
    units: list = []
    try:
        n_params, quantized_layers = _plan(source, dt, quantize, group_size, units)
        config = _rewrite_config(source.raw, source.cfg, dt, quantize, group_size)
        if quantize is not None and not quantized_layers:
            raise ValueError(f"no layer of {src} has an input size divisible by group_size={group_size}; "
                             f"nothing would be quantized")
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent))
        os.chmod(tmp, 0o777 & ~_umask())
        _write_weights(tmp, units, n_params, max_shard_size, src, progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name.endswith(_CARRIED_SUFFIXES) and f.name not in _NOT_CARRIED \
                    and not f.name.endswith(".index.json"):
                shutil.copyfile(f, tmp / f.name)
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(tmp, dst)
        tmp = None
    finally:
        for pairs, _ in units:
            for _, a in pairs:
                a.close()
        source.close()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _write_weights(out: Path, units, n_params: int, max_shard_size: int, src: Path, progress) -> None:
    shards = _shards(units, max_shard_size)
    total_size = sum(a.nbytes for pairs, _ in units for _, a in pairs)
    n = len(shards)
    weight_map: dict[str, str] = {}
    bar = _progress_bar(sum(len(pairs) for pairs, _ in units), f"converting {src.name}", progress)
    try:
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            arrays: dict[str, Array] = {}
            for pairs, _ in shard:
                mx_eval(*(a for _, a in pairs))
                arrays.update(pairs)
                if bar is not None:
                    bar.update(len(pairs))
            io.save_safetensors(out / fname, arrays, {"format": "mlx"})
            for name, a in arrays.items():
                weight_map[name] = fname
                a.close()
            for _, source in shard:
                source.close()  # its data was read for this shard only
            shard.clear()
    finally:
        if bar is not None:
            bar.close()
    index = {"metadata": {"total_size": total_size, "total_parameters": n_params},
             "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=4) + "\n", encoding="utf-8")
