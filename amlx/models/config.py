"""Read a Hugging Face ``config.json`` into an architecture's typed arguments.

Checkpoints come with configs in two styles (docs/architecture.md): releases
made with transformers 4.x write ``rope_theta`` / ``rope_scaling`` (Gemma 3 also
``rope_local_base_freq`` / ``sliding_window_pattern``), transformers 5 writes
``rope_parameters`` (nested per layer type for Gemma 3) and ``layer_types``.

This module holds what every architecture shares: `ConfigReader` (typed,
bounded reads that name the file and key on error), `ModelArgs` (the fields
every architecture has, read the same way for all), the rope and layer-type
readers, token ids and quantization. What makes an architecture itself (its
defaults, biases, layer rule, extra fields) lives in its own file, in a
`ModelArgs` subclass registered in `amlx.models.registry`.

Pure Python; no MLX, no transformers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from amlx.errors import ModelLoadError
from amlx.models.rope import ROPE_TYPES

__all__ = [
    "FULL_ATTENTION",
    "SLIDING_ATTENTION",
    "ConfigReader",
    "ModelArgs",
    "LIMITS",
    "load_config",
    "normalize_config",
    "normalize_rope_scaling",
    "parse_config",
    "read_rope",
]

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# Bounds on sizes a config may name, checked before anything is allocated: far
# above every released model, far below what would exhaust memory while a
# hostile config is merely being read (10**9 layers, a 10**12 vocabulary).
LIMITS = {
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 26,
    "sliding_window": 1 << 26,
}

# Config numbers become float32 on the device: beyond these (normal) bounds one is
# infinite or zero there and the logits NaN.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_MIN = 1.1754943508222875e-38

_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor",),
}


class ConfigReader:
    """Typed reads from one JSON object of a config file; errors name the file
    and the key (with `prefix` for nested objects, e.g. ``text_config.``)."""

    def __init__(self, src: Mapping, path: Any = "config.json", prefix: str = ""):
        self.src = src
        self.path = str(path)
        self.prefix = prefix

    def key(self, key: str) -> str:
        return self.prefix + key

    def get(self, key: str, default: Any = None) -> Any:
        return self.src.get(key, default)

    def missing(self, key: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: missing key '{self.key(key)}'")

    def invalid(self, key: str, value: Any, why: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: invalid '{self.key(key)}' = {value!r}: {why}")

    def nested(self, key: str, src: Mapping) -> "ConfigReader":
        return ConfigReader(src, self.path, self.key(key) + ".")

    def integer(self, key: str, default: Any = ..., *, minimum: int = 1) -> int:
        value = self.src.get(key, default)
        if value is ...:
            raise self.missing(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or int(value) != value:
            raise self.invalid(key, value, "expected an integer")
        if value < minimum:
            raise self.invalid(key, value, f"must be >= {minimum}")
        limit = LIMITS.get(key)
        if limit is not None and value > limit:
            raise self.invalid(key, value, f"must be <= {limit}")
        return int(value)

    def number(self, key: str, default: Any = ..., *, positive: bool = True) -> float:
        value = self.src.get(key, default)
        if value is ...:
            raise self.missing(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.invalid(key, value, "expected a finite number")
        if positive and value <= 0:
            raise self.invalid(key, value, "must be > 0")
        if value and not FLOAT32_MIN <= abs(value) <= FLOAT32_MAX:  # rope_theta 1e39 or 1e-300: NaN logits
            raise self.invalid(key, value, "outside the range of float32, in which MLX computes with it")
        return float(value)

    def optional_number(self, key: str, default: Any = None) -> float | None:
        return None if self.src.get(key, default) is None else self.number(key, default)

    def flag(self, key: str, default: bool) -> bool:
        value = self.src.get(key, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.invalid(key, value, "expected true or false")
        return value

    def token_ids(self, key: str, value: Any) -> list[int]:
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        out: list[int] = []
        for v in items:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise self.invalid(key, value, "expected a token id or a list of token ids")
            if v not in out:
                out.append(v)
        return out


# ---------------------------------------------------------------------------
# rope


def normalize_rope_scaling(
    scaling: Mapping | None, *, max_position_embeddings: int, path: Any = "config.json", key: str = "rope_scaling"
) -> dict | None:
    """Turn one ``rope_scaling`` / ``rope_parameters`` dict into ``{"rope_type": ..., params}`` or None.

    Accepts the old ``"type"`` spelling, drops ``rope_theta`` (read separately),
    returns None for plain rope, fills llama3/yarn's ``original_max_position_embeddings``
    from ``max_position_embeddings`` like transformers, and raises ModelLoadError for
    unsupported types or missing parameters.
    """
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ModelLoadError(f"{path}: invalid '{key}' = {scaling!r}: expected an object or null")
    r = ConfigReader(scaling, path, key + ".")
    params = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type", "rope_type")}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise r.invalid("rope_type", rope_type, f"unsupported rope type (supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "default":
        return None
    out: dict[str, Any] = {"rope_type": rope_type}
    for name in _ROPE_REQUIRED[rope_type]:
        out[name] = r.number(name)
    if rope_type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = r.integer("original_max_position_embeddings",
                                                            max_position_embeddings)
    if rope_type == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise r.invalid("high_freq_factor", out["high_freq_factor"], "must be > low_freq_factor")
    if rope_type == "yarn":
        for name in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            if params.get(name) is not None:
                out[name] = r.number(name)
        if params.get("truncate") is not None:
            out["truncate"] = r.flag("truncate", True)
    for name, value in params.items():
        if name not in out and value is not None:
            out[name] = value  # carried (e.g. partial_rotary_factor), for the config writer
    if out.get("partial_rotary_factor", 1.0) != 1.0:
        raise r.invalid("partial_rotary_factor", out["partial_rotary_factor"], "partial rotary embeddings are "
                                                                               "not supported")
    return out


def read_rope(r: ConfigReader, rope: Any, key: str, theta_default: float, max_pos: int) -> tuple[float, dict | None]:
    """(theta, scaling) of one flat rope dict (``rope_parameters`` or a per-layer-type entry)."""
    if rope is None:
        return theta_default, None
    if not isinstance(rope, Mapping):
        raise r.invalid(key, rope, "expected an object")
    theta = r.nested(key, rope).number("rope_theta", theta_default)
    scaling = normalize_rope_scaling(rope, max_position_embeddings=max_pos, path=r.path, key=r.key(key))
    if scaling is not None and scaling["rope_type"] == "yarn" and theta == 1:
        # (YaRN's correction dimensions divide by log(rope_theta): a raw ZeroDivisionError at load)
        raise r.invalid(key, dict(rope), "YaRN scaling needs a rope_theta other than 1")
    return theta, scaling


# ---------------------------------------------------------------------------
# the shared arguments


@dataclasses.dataclass
class ModelArgs:
    """The arguments every architecture has, read from config.json alike.

    A subclass per architecture (in its own file) sets the class-level rules
    below, overrides the hooks it needs and adds its own fields."""

    arch: str
    model_type: str
    text_model_type: str
    multimodal: bool
    weight_prefix: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling: dict | None
    layer_types: list[str]
    sliding_window: int | None
    tie_word_embeddings: bool
    bos_token_id: int | None
    pad_token_id: int | None
    eos_token_ids: list[int]
    torch_dtype: str | None
    quantization: dict | None

    ARCH: ClassVar[str] = ""
    # transformers' class defaults for the keys a config may leave out
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    QK_NORM: ClassVar[bool] = False
    ACT_KEY: ClassVar[str] = "hidden_act"
    # whether the architecture's transformers model reads config.json's layer_types (Llama's
    # does not: its layers never attend within a window, whatever layer_types says)
    READS_LAYER_TYPES: ClassVar[bool] = True
    REQUIRED: ClassVar[tuple[str, ...]] = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    # -- hooks an architecture may override -----------------------------------

    @classmethod
    def text_config(cls, top: ConfigReader) -> tuple[ConfigReader, str, bool]:
        """(reader of the text model's section, its model_type, multimodal)."""
        return top, top.src["model_type"], False

    @classmethod
    def with_defaults(cls, r: ConfigReader) -> ConfigReader:
        """The section with absent keys filled in; here the required ones must be there."""
        for key in cls.REQUIRED:
            if r.get(key) is None:
                raise r.missing(key)
        return r

    @classmethod
    def biases(cls, r: ConfigReader) -> dict[str, bool]:
        bias = r.flag("attention_bias", False)
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": False}

    @classmethod
    def rope(cls, r: ConfigReader, max_pos: int) -> dict[str, Any]:
        theta_default = r.number("rope_theta", cls.DEFAULTS.get("rope_theta", 10_000.0))
        # transformers (convert_rope_params_to_dict): a non-empty rope_scaling replaces
        # rope_parameters whole (a transformers-5 config with rope_scaling added by hand, as
        # model cards say for YaRN, runs the added scaling), its own rope_theta first, then
        # the top-level one, then the class default -- never rope_parameters' theta
        # (rope_parameters is still checked: one that is invalid is refused all the same)
        theta, scaling = read_rope(r, r.get("rope_parameters"), "rope_parameters", theta_default, max_pos)
        if r.get("rope_scaling"):
            theta, scaling = read_rope(r, r.get("rope_scaling"), "rope_scaling", theta_default, max_pos)
        return {"rope_theta": theta, "rope_scaling": scaling}

    @classmethod
    def default_layer_types(cls, r: ConfigReader, n_layers: int) -> list[str]:
        """The layer types of a config without ``layer_types`` (the older spelling)."""
        return [FULL_ATTENTION] * n_layers

    @classmethod
    def tie_embeddings(cls, top: ConfigReader, r: ConfigReader) -> bool:
        return r.flag("tie_word_embeddings", cls.DEFAULTS.get("tie_word_embeddings", False))

    @classmethod
    def extra(cls, r: ConfigReader) -> dict[str, Any]:
        """Values of the architecture's own fields."""
        return {}

    def older_spellings(self, text: dict) -> None:
        """Adds to a config section (in place) the older spellings of this
        architecture's keys that readers such as mlx-lm need."""
        text.setdefault("rope_theta", self.rope_theta)
        if self.rope_scaling is not None:
            text.setdefault("rope_scaling", dict(self.rope_scaling))

    def weight_name(self, name: str) -> str | None:
        """The text model's name for checkpoint tensor `name` (sanitize), or None
        for tensors the model does not read: outside `weight_prefix`, rotary
        caches, the duplicate lm_head of tied embeddings."""
        if not name.startswith(self.weight_prefix):
            return None
        local = name[len(self.weight_prefix):]
        if local.endswith(".rotary_emb.inv_freq") or (self.tie_word_embeddings and local == "lm_head.weight"):
            return None
        return local

    def text_quantization(self) -> dict | None:
        """The quantization with per-layer keys named like the text model's own
        tensors (mlx-lm names them by full path, ``language_model.model.layers.0...``)."""
        q, prefix = self.quantization, self.weight_prefix
        if not q or not prefix:
            return q
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in q.items()}

    # -- the shared reading ----------------------------------------------------

    @classmethod
    def from_config(cls, top: ConfigReader, generation_config: Mapping | None = None) -> "ModelArgs":
        r, text_model_type, multimodal = cls.text_config(top)
        r = cls.with_defaults(r)
        out: dict[str, Any] = {"arch": cls.ARCH, "model_type": top.src["model_type"],
                               "text_model_type": text_model_type, "multimodal": multimodal,
                               "weight_prefix": "language_model." if multimodal else ""}
        out.update(_sizes(cls, r))
        out["rms_norm_eps"] = r.number("rms_norm_eps", cls.DEFAULTS.get("rms_norm_eps", 1e-6))
        act = r.get(cls.ACT_KEY) or cls.DEFAULTS.get(cls.ACT_KEY, "silu")
        if not isinstance(act, str):
            raise r.invalid(cls.ACT_KEY, act, "expected an activation name")
        out["hidden_act"] = act
        out.update(cls.biases(r))
        out["qk_norm"] = cls.QK_NORM
        out.update(cls.rope(r, out["max_position_embeddings"]))
        out["layer_types"] = _layer_types(cls, r, out["num_hidden_layers"])
        out["sliding_window"] = r.integer("sliding_window") if SLIDING_ATTENTION in out["layer_types"] else None
        out["tie_word_embeddings"] = cls.tie_embeddings(top, r)
        out.update(cls.extra(r))
        out.update(_token_ids(top, r, multimodal, generation_config, out["vocab_size"]))
        dtype = top.get("torch_dtype", top.get("dtype", r.get("torch_dtype", r.get("dtype"))))
        out["torch_dtype"] = dtype if isinstance(dtype, str) else None
        out["quantization"] = _quantization(top)
        return cls(**out)


def _sizes(cls: type[ModelArgs], r: ConfigReader) -> dict[str, int]:
    out = {key: r.integer(key) for key in ModelArgs.REQUIRED}
    heads = out["num_attention_heads"]
    kv = r.get("num_key_value_heads")
    out["num_key_value_heads"] = heads if kv is None else r.integer("num_key_value_heads")
    if heads % out["num_key_value_heads"]:
        raise r.invalid("num_key_value_heads", out["num_key_value_heads"], f"must divide num_attention_heads={heads}")
    head_dim = r.get("head_dim", cls.DEFAULTS.get("head_dim"))
    if head_dim is None:
        if out["hidden_size"] % heads:
            raise r.invalid("num_attention_heads", heads, f"must divide hidden_size={out['hidden_size']}")
        out["head_dim"] = out["hidden_size"] // heads
    else:
        out["head_dim"] = ConfigReader({"head_dim": head_dim}, r.path, r.prefix).integer("head_dim")
    out["max_position_embeddings"] = r.integer("max_position_embeddings",
                                                cls.DEFAULTS.get("max_position_embeddings", 2048))
    return out


def _layer_types(cls: type[ModelArgs], r: ConfigReader, n_layers: int) -> list[str]:
    raw = r.get("layer_types")
    if raw is None or not cls.READS_LAYER_TYPES:
        return cls.default_layer_types(r, n_layers)
    if not isinstance(raw, list) or len(raw) != n_layers:
        raise r.invalid("layer_types", raw, f"expected a list of {n_layers} layer types")
    for t in raw:
        if t not in (FULL_ATTENTION, SLIDING_ATTENTION):
            raise r.invalid("layer_types", raw, f"unsupported layer type {t!r}")
    return list(raw)


def _token_ids(top: ConfigReader, r: ConfigReader, multimodal: bool, generation: Mapping | None,
               vocab_size: int) -> dict[str, Any]:
    """bos, pad and eos ids; the top level wins for multimodal configs (gemma-3-4b-it
    puts eos there), generation_config.json adds its eos ids (transformers' generate
    uses them). An eos id must lie inside the vocabulary: one beyond it loaded, and every
    constrained request failed (llguidance: "EOS token ID ... is out of range")."""
    def source(key: str) -> tuple[ConfigReader, Any]:
        if multimodal and top.get(key) is not None:
            return top, top.get(key)
        return r, r.get(key)

    def first(key: str) -> int | None:
        c, v = source(key)
        if key == "pad_token_id" and isinstance(v, int) and not isinstance(v, bool) and v < 0:
            v = None  # early Llama conversions wrote pad_token_id: -1 for "none"
        ids = c.token_ids(key, v)
        return ids[0] if ids else None

    out: dict[str, Any] = {"bos_token_id": first("bos_token_id"), "pad_token_id": first("pad_token_id")}
    def eos_of(c: ConfigReader, value: Any) -> list[int]:
        ids = c.token_ids("eos_token_id", value)
        if any(i >= vocab_size for i in ids):
            raise c.invalid("eos_token_id", value, f"beyond the vocabulary of {vocab_size} tokens")
        return ids

    eos = eos_of(*source("eos_token_id"))
    if generation is not None:
        gen = ConfigReader(generation, Path(top.path).with_name("generation_config.json"))
        for t in eos_of(gen, generation.get("eos_token_id")):
            if t not in eos:
                eos.append(t)
    out["eos_token_ids"] = eos
    return out


def _quantization(top: ConfigReader) -> dict | None:
    q, key = top.get("quantization"), "quantization"
    if q is None and top.get("quantization_config") is not None:
        q, key = top.get("quantization_config"), "quantization_config"
    if q is None:
        return None
    if not isinstance(q, Mapping):
        raise top.invalid(key, q, "expected an object")
    if "quant_method" in q:
        raise top.invalid(key, q, f"unsupported quantization method {q['quant_method']!r} (MLX quantization only)")
    sub = top.nested(key, q)
    out = dict(q)
    out["group_size"], out["bits"] = _group_and_bits(sub, 64, 4)
    _affine(sub, q)
    for name, layer in q.items():
        if isinstance(layer, Mapping):  # one layer's own group size and bits (mlx-lm's per-layer entries)
            lr = sub.nested(name, layer)
            _affine(lr, layer)
            group, bits = _group_and_bits(lr, out["group_size"], out["bits"])
            out[name] = {**layer, "group_size": group, "bits": bits}
    return out


# What the quantized matmuls amlx runs accept: any other value loaded, and the first request
# failed inside MLX ("Quantization bits must be ...", "group size must be 32, 64 or 128").
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)


def _group_and_bits(r: ConfigReader, group_default: int, bits_default: int) -> tuple[int, int]:
    group, bits = r.integer("group_size", group_default), r.integer("bits", bits_default)
    if group not in QUANT_GROUP_SIZES:
        raise r.invalid("group_size", group, f"quantized layers need groups of "
                                             f"{', '.join(map(str, QUANT_GROUP_SIZES))}")
    if bits not in QUANT_BITS:
        raise r.invalid("bits", bits, f"quantized layers need {', '.join(map(str, QUANT_BITS))} bits")
    return group, bits


def _affine(r: ConfigReader, q: Mapping) -> None:
    """MLX's affine quantization is the one amlx reads (scales and biases per group):
    other modes (mxfp4, nvfp4, mxfp8) store their weights differently."""
    mode = q.get("mode")
    if mode is not None and mode != "affine":
        raise r.invalid("mode", mode, "unsupported quantization mode (MLX's affine quantization only)")


# ---------------------------------------------------------------------------
# the public entry points


def parse_config(raw: Mapping, path: Any = "config.json", generation_config: Mapping | None = None) -> ModelArgs:
    """The typed arguments (the architecture's `ModelArgs` subclass) of the parsed
    ``config.json`` `raw`, in either style. `path` names the file in error messages;
    `generation_config` (the parsed generation_config.json, optional) adds its eos ids.

    Raises ModelLoadError naming the file and the key for missing, invalid or
    out-of-bounds values and for unsupported architectures."""
    from amlx.models.registry import architecture

    if not isinstance(raw, Mapping):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    top = ConfigReader(raw, path)
    if raw.get("model_type") is None:
        raise top.missing("model_type")
    return architecture(raw["model_type"], path).args.from_config(top, generation_config)


def normalize_config(raw: Mapping, path: Any = "config.json", generation_config: Mapping | None = None) -> dict:
    """`parse_config` as one flat dict (its fields by name): arch, model_type,
    text_model_type, multimodal, weight_prefix ("" or "language_model."), the sizes,
    rms_norm_eps, hidden_act, qkv_bias / o_bias / mlp_bias / qk_norm, rope_theta and
    rope_scaling (None or {"rope_type", params}), layer_types, sliding_window,
    tie_word_embeddings, bos/pad token ids, eos_token_ids, torch_dtype, quantization,
    plus the architecture's own fields (Gemma 3: rope_local_base_freq,
    rope_local_scaling, query_pre_attn_scalar, attn/final logit softcapping)."""
    return dataclasses.asdict(parse_config(raw, path, generation_config))


def load_config(model_dir: Any) -> dict:
    """Read ``model_dir/config.json`` (plus generation_config.json if present) and normalise it."""
    from amlx.checkpoint import read_json

    path = Path(model_dir) / "config.json"
    raw = read_json(path)
    gen = read_json(path.with_name("generation_config.json"), required=False)
    return normalize_config(raw, path, generation_config=gen)
