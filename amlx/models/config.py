"""Normalise a Hugging Face ``config.json`` into what amlx's architectures need.

Checkpoints come with configs in two styles (see DESIGN.md): releases made with
transformers 4.x write ``rope_theta`` / ``rope_scaling`` (Gemma 3 also
``rope_local_base_freq`` / ``sliding_window_pattern``), transformers 5 writes
``rope_parameters`` (nested per layer type for Gemma 3) and ``layer_types``.
Multimodal Gemma 3 nests the text model under ``text_config`` and leaves out
every value equal to the transformers default. ``normalize_config`` turns any
of these into one flat, explicit dict (keys listed in its docstring), so model
code never looks at raw config keys.

Pure Python plus numpy; no MLX, no transformers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from amlx.errors import ModelLoadError

__all__ = [
    "ARCHITECTURES",
    "FULL_ATTENTION",
    "SLIDING_ATTENTION",
    "load_config",
    "normalize_config",
    "normalize_rope_scaling",
    "llama3_rope_freqs",
    "rope_inv_freqs",
]

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"

# model_type (of the text model) -> amlx architecture
ARCHITECTURES = {
    "qwen3": "qwen3",
    "qwen2": "qwen2",
    "llama": "llama",
    "mistral": "llama",  # the Llama block; every layer in one sliding window when one is set
    "gemma3_text": "gemma3",
}

# Keys a config must name; transformers would silently fall back to a 7B-sized
# default, which only fails later with a confusing shape mismatch.
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

# Gemma3TextConfig defaults: gemma-3-4b-it and larger list only what differs from these.
_GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208,
    "hidden_size": 2304,
    "intermediate_size": 9216,
    "num_hidden_layers": 26,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "sliding_window_pattern": 6,
    "attention_bias": False,
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "bos_token_id": 2,
}

# transformers' class defaults for the keys a config may leave out
_OPTIONAL_DEFAULTS: dict[str, dict[str, Any]] = {
    "qwen3": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10_000.0,
              "hidden_act": "silu", "head_dim": 128, "tie_word_embeddings": False},
    "qwen2": {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10_000.0,
              "hidden_act": "silu", "head_dim": None, "tie_word_embeddings": False},
    "llama": {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10_000.0,
              "hidden_act": "silu", "head_dim": None, "tie_word_embeddings": False},
}

_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor",),
}


class _Ctx:
    """Where the values come from, for error messages: the file and a key prefix."""

    def __init__(self, path: Any, prefix: str = ""):
        self.path = str(path)
        self.prefix = prefix

    def key(self, key: str) -> str:
        return self.prefix + key

    def missing(self, key: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: missing key '{self.key(key)}'")

    def invalid(self, key: str, value: Any, why: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: invalid '{self.key(key)}' = {value!r}: {why}")


def _int(ctx: _Ctx, src: Mapping, key: str, default: Any = ..., *, minimum: int = 1) -> int:
    value = src.get(key, default)
    if value is ...:
        raise ctx.missing(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise ctx.invalid(key, value, "expected an integer")
    if value < minimum:
        raise ctx.invalid(key, value, f"must be >= {minimum}")
    return int(value)


def _float(ctx: _Ctx, src: Mapping, key: str, default: Any = ..., *, positive: bool = True) -> float:
    value = src.get(key, default)
    if value is ...:
        raise ctx.missing(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ctx.invalid(key, value, "expected a finite number")
    if positive and value <= 0:
        raise ctx.invalid(key, value, "must be > 0")
    return float(value)


def _opt_float(ctx: _Ctx, src: Mapping, key: str, default: Any = None) -> float | None:
    value = src.get(key, default)
    if value is None:
        return None
    return _float(ctx, {key: value}, key)


def _bool(ctx: _Ctx, src: Mapping, key: str, default: bool) -> bool:
    value = src.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ctx.invalid(key, value, "expected true or false")
    return value


def _token_ids(ctx: _Ctx, key: str, value: Any) -> list[int]:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out: list[int] = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ctx.invalid(key, value, "expected a token id or a list of token ids")
        if v not in out:
            out.append(v)
    return out


# ---------------------------------------------------------------------------
# rope


def normalize_rope_scaling(
    scaling: Mapping | None, *, max_position_embeddings: int, path: Any = "config.json", key: str = "rope_scaling"
) -> dict | None:
    """Turn one ``rope_scaling`` / ``rope_parameters`` dict into ``{"rope_type": ..., params}`` or None.

    Accepts the old ``"type"`` spelling, drops ``rope_theta`` (returned separately by
    ``normalize_config``), returns None for plain rope, fills llama3/yarn's
    ``original_max_position_embeddings`` from ``max_position_embeddings`` like
    transformers, and raises ModelLoadError for unsupported types or missing parameters.
    """
    ctx = _Ctx(path, key + ".")
    if scaling is None:
        return None
    if not isinstance(scaling, Mapping):
        raise ModelLoadError(f"{path}: invalid '{key}' = {scaling!r}: expected an object or null")
    params = {k: v for k, v in scaling.items() if k not in ("rope_theta", "type", "rope_type")}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ctx.invalid("rope_type", rope_type, f"unsupported rope type (supported: {', '.join(_ROPE_TYPES)})")
    if rope_type == "default":
        return None
    out: dict[str, Any] = {"rope_type": rope_type}
    for name in _ROPE_REQUIRED[rope_type]:
        out[name] = _float(ctx, params, name)
    if rope_type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = _int(
            ctx, params, "original_max_position_embeddings", max_position_embeddings
        )
    if rope_type == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ctx.invalid("high_freq_factor", out["high_freq_factor"], "must be > low_freq_factor")
    for name, value in params.items():
        if name not in out and value is not None:
            out[name] = value  # e.g. yarn's beta_fast / beta_slow / attention_factor
    return out


def _split_rope(ctx: _Ctx, rope: Any, key: str, theta_default: float, max_pos: int) -> tuple[float, dict | None]:
    """(theta, scaling) of one flat rope dict (``rope_parameters`` or a per-layer-type entry)."""
    if rope is None:
        return theta_default, None
    if not isinstance(rope, Mapping):
        raise ctx.invalid(key, rope, "expected an object")
    sub = _Ctx(ctx.path, ctx.key(key) + ".")
    theta = _float(sub, rope, "rope_theta", theta_default)
    scaling = normalize_rope_scaling(rope, max_position_embeddings=max_pos, path=ctx.path, key=ctx.key(key))
    return theta, scaling


def _rope(ctx: _Ctx, cfg: Mapping, arch: str, defaults: Mapping, max_pos: int) -> dict[str, Any]:
    theta_default = _float(ctx, cfg, "rope_theta", defaults["rope_theta"])
    out: dict[str, Any] = {"rope_local_base_freq": None, "rope_local_scaling": None}
    params = cfg.get("rope_parameters")
    if arch == "gemma3":
        local_default = _float(ctx, cfg, "rope_local_base_freq", defaults["rope_local_base_freq"])
        if params is not None and not isinstance(params, Mapping):
            raise ctx.invalid("rope_parameters", params, "expected an object")
        if params is not None and (FULL_ATTENTION in params or SLIDING_ATTENTION in params):
            full = params.get(FULL_ATTENTION)
            local = params.get(SLIDING_ATTENTION)
            out["rope_theta"], out["rope_scaling"] = _split_rope(
                ctx, full, "rope_parameters." + FULL_ATTENTION, theta_default, max_pos
            )
            out["rope_local_base_freq"], out["rope_local_scaling"] = _split_rope(
                ctx, local, "rope_parameters." + SLIDING_ATTENTION, local_default, max_pos
            )
            return out
        # old style: rope_scaling applies to the global (full attention) layers only
        flat = params if params is not None else cfg.get("rope_scaling")
        key = "rope_parameters" if params is not None else "rope_scaling"
        out["rope_theta"], out["rope_scaling"] = _split_rope(ctx, flat, key, theta_default, max_pos)
        out["rope_local_base_freq"] = local_default
        return out
    if params is not None:
        out["rope_theta"], out["rope_scaling"] = _split_rope(ctx, params, "rope_parameters", theta_default, max_pos)
    else:
        out["rope_theta"] = theta_default
        out["rope_scaling"] = normalize_rope_scaling(
            cfg.get("rope_scaling"), max_position_embeddings=max_pos, path=ctx.path, key=ctx.key("rope_scaling")
        )
    return out


# ---------------------------------------------------------------------------
# attention layout


def _layer_types(ctx: _Ctx, cfg: Mapping, model_type: str, n_layers: int) -> list[str]:
    arch = ARCHITECTURES[model_type]
    raw = cfg.get("layer_types")
    if raw is not None:
        if not isinstance(raw, list) or len(raw) != n_layers:
            raise ctx.invalid("layer_types", raw, f"expected a list of {n_layers} layer types")
        for t in raw:
            if t not in (FULL_ATTENTION, SLIDING_ATTENTION):
                raise ctx.invalid("layer_types", raw, f"unsupported layer type {t!r}")
        return list(raw)
    if arch == "gemma3":
        # transformers 5 also writes `_sliding_window_pattern`; like transformers, ignore it
        pattern = _int(ctx, cfg, "sliding_window_pattern", _GEMMA3_TEXT_DEFAULTS["sliding_window_pattern"])
        return [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(n_layers)]
    if arch in ("qwen2", "qwen3"):
        if _bool(ctx, cfg, "use_sliding_window", False) and cfg.get("sliding_window") is not None:
            first = _int(ctx, cfg, "max_window_layers", 28, minimum=0)
            return [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(n_layers)]
    if model_type == "mistral" and cfg.get("sliding_window") is not None:
        return [SLIDING_ATTENTION] * n_layers
    return [FULL_ATTENTION] * n_layers


# ---------------------------------------------------------------------------
# the public entry points


def _quantization(ctx: _Ctx, raw: Mapping) -> dict | None:
    q = raw.get("quantization")
    key = "quantization"
    if q is None and raw.get("quantization_config") is not None:
        q, key = raw["quantization_config"], "quantization_config"
    if q is None:
        return None
    if not isinstance(q, Mapping):
        raise ctx.invalid(key, q, "expected an object")
    if "quant_method" in q:
        raise ctx.invalid(key, q, f"unsupported quantization method {q['quant_method']!r} (MLX quantization only)")
    sub = _Ctx(ctx.path, key + ".")
    out = dict(q)
    out["group_size"] = _int(sub, q, "group_size", 64)
    out["bits"] = _int(sub, q, "bits", 4)
    return out


def normalize_config(raw: Mapping, path: Any = "config.json", generation_config: Mapping | None = None) -> dict:
    """Normalise the parsed ``config.json`` ``raw`` (either style) into one flat dict.

    ``path`` names the file in error messages. ``generation_config`` (the parsed
    generation_config.json, optional) adds its eos ids, which transformers' generate uses.

    Returns a new dict with:
      arch ("qwen3" | "qwen2" | "llama" | "gemma3"), model_type (top level, e.g. "gemma3"),
      text_model_type, multimodal (bool), weight_prefix ("" or "language_model." -- the
      text weights are named ``weight_prefix + "model.layers.0..."``),
      vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
      num_key_value_heads, head_dim, rms_norm_eps, max_position_embeddings, hidden_act,
      qkv_bias, o_bias, mlp_bias, qk_norm (bools),
      rope_theta (float, full-attention layers), rope_scaling (None or {"rope_type", params}),
      rope_local_base_freq / rope_local_scaling (Gemma 3's sliding layers, else None),
      layer_types (list of "full_attention" | "sliding_attention"), sliding_window (int or None),
      tie_word_embeddings, query_pre_attn_scalar, attn_logit_softcapping,
      final_logit_softcapping (Gemma 3, else None), bos_token_id, pad_token_id (int or None),
      eos_token_ids (list[int]), torch_dtype (str or None), quantization (dict or None).

    Raises ModelLoadError naming the file and the key for missing or invalid values
    and for unsupported architectures.
    """
    top = _Ctx(path)
    if not isinstance(raw, Mapping):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type is None:
        raise top.missing("model_type")
    multimodal = model_type == "gemma3"
    if multimodal:
        cfg = raw.get("text_config")
        if cfg is None:
            cfg = {}  # every text value at its default, as transformers allows
        if not isinstance(cfg, Mapping):
            raise top.invalid("text_config", cfg, "expected an object")
        ctx = _Ctx(path, "text_config.")
        text_model_type = cfg.get("model_type", "gemma3_text")
    else:
        cfg, ctx, text_model_type = raw, top, model_type
    arch = ARCHITECTURES.get(text_model_type)
    if arch is None:
        supported = ", ".join(sorted([*ARCHITECTURES, "gemma3"]))
        key = "text_config.model_type" if multimodal else "model_type"
        raise ModelLoadError(f"{path}: unsupported architecture {key}={text_model_type!r} (supported: {supported})")

    if arch == "gemma3":
        defaults = dict(_GEMMA3_TEXT_DEFAULTS)
        cfg = {**defaults, **{k: v for k, v in cfg.items() if v is not None or k not in _REQUIRED}}
    else:
        for key in _REQUIRED:
            if cfg.get(key) is None:
                raise ctx.missing(key)
        defaults = _OPTIONAL_DEFAULTS[arch]

    out: dict[str, Any] = {
        "arch": arch,
        "model_type": model_type,
        "text_model_type": text_model_type,
        "multimodal": multimodal,
        "weight_prefix": "language_model." if multimodal else "",
    }
    for key in _REQUIRED:
        out[key] = _int(ctx, cfg, key)
    heads = out["num_attention_heads"]
    kv = cfg.get("num_key_value_heads")
    out["num_key_value_heads"] = heads if kv is None else _int(ctx, cfg, "num_key_value_heads")
    if heads % out["num_key_value_heads"]:
        raise ctx.invalid(
            "num_key_value_heads", out["num_key_value_heads"], f"must divide num_attention_heads={heads}"
        )
    head_dim = cfg.get("head_dim", defaults["head_dim"])
    if head_dim is None:
        if out["hidden_size"] % heads:
            raise ctx.invalid("num_attention_heads", heads, f"must divide hidden_size={out['hidden_size']}")
        out["head_dim"] = out["hidden_size"] // heads
    else:
        out["head_dim"] = _int(ctx, {"head_dim": head_dim}, "head_dim")
    out["rms_norm_eps"] = _float(ctx, cfg, "rms_norm_eps", defaults["rms_norm_eps"])
    out["max_position_embeddings"] = _int(ctx, cfg, "max_position_embeddings", defaults["max_position_embeddings"])
    # Gemma spells it hidden_activation (transformers ignores a hidden_act there)
    act_key = "hidden_activation" if arch == "gemma3" else "hidden_act"
    out["hidden_act"] = cfg.get(act_key) or defaults.get(act_key, "silu")
    if not isinstance(out["hidden_act"], str):
        raise ctx.invalid(act_key, out["hidden_act"], "expected an activation name")

    attention_bias = _bool(ctx, cfg, "attention_bias", False)
    if arch == "qwen2":
        out["qkv_bias"], out["o_bias"] = True, False  # hard-wired in Qwen2, never in config.json
    else:
        out["qkv_bias"] = out["o_bias"] = attention_bias
    out["mlp_bias"] = _bool(ctx, cfg, "mlp_bias", False) if arch == "llama" else False
    out["qk_norm"] = arch in ("qwen3", "gemma3")

    out.update(_rope(ctx, cfg, arch, {**defaults, "rope_local_base_freq": 10_000.0}, out["max_position_embeddings"]))

    out["layer_types"] = _layer_types(ctx, cfg, text_model_type, out["num_hidden_layers"])
    if SLIDING_ATTENTION in out["layer_types"]:
        out["sliding_window"] = _int(ctx, cfg, "sliding_window")
    else:
        out["sliding_window"] = None

    if multimodal:
        tie = raw.get("tie_word_embeddings", True)
        if not isinstance(tie, bool):
            raise top.invalid("tie_word_embeddings", tie, "expected true or false")
        out["tie_word_embeddings"] = tie
    else:
        tie_default = arch == "gemma3" or defaults.get("tie_word_embeddings", False)
        out["tie_word_embeddings"] = _bool(ctx, cfg, "tie_word_embeddings", tie_default)

    if arch == "gemma3":
        if cfg.get("use_bidirectional_attention"):
            raise ctx.invalid("use_bidirectional_attention", True, "bidirectional (embedding) Gemma is not supported")
        out["query_pre_attn_scalar"] = _float(ctx, cfg, "query_pre_attn_scalar")
        out["attn_logit_softcapping"] = _opt_float(ctx, cfg, "attn_logit_softcapping")
        out["final_logit_softcapping"] = _opt_float(ctx, cfg, "final_logit_softcapping")
    else:
        out["query_pre_attn_scalar"] = None
        out["attn_logit_softcapping"] = None
        out["final_logit_softcapping"] = None

    # token ids: the top level wins for multimodal Gemma (gemma-3-4b-it puts eos there)
    def tok(key: str) -> Any:
        if multimodal and raw.get(key) is not None:
            return top, raw[key]
        return ctx, cfg.get(key)

    c, v = tok("bos_token_id")
    out["bos_token_id"] = (_token_ids(c, "bos_token_id", v) or [None])[0]
    c, v = tok("pad_token_id")
    if isinstance(v, int) and not isinstance(v, bool) and v < 0:
        v = None  # early Llama conversions wrote pad_token_id: -1 for "none"
    out["pad_token_id"] = (_token_ids(c, "pad_token_id", v) or [None])[0]
    c, v = tok("eos_token_id")
    eos = _token_ids(c, "eos_token_id", v)
    if generation_config is not None:
        gen_ctx = _Ctx(Path(str(path)).with_name("generation_config.json") if str(path) else path)
        for t in _token_ids(gen_ctx, "eos_token_id", generation_config.get("eos_token_id")):
            if t not in eos:
                eos.append(t)
    out["eos_token_ids"] = eos

    dtype = raw.get("torch_dtype", raw.get("dtype", cfg.get("torch_dtype", cfg.get("dtype"))))
    out["torch_dtype"] = dtype if isinstance(dtype, str) else None
    out["quantization"] = _quantization(top, raw)
    return out


def load_config(model_dir: str | os.PathLike) -> dict:
    """Read ``model_dir/config.json`` (plus generation_config.json if present) and normalise it."""
    path = Path(model_dir) / "config.json"
    raw = _read_json(path, required=True)
    gen = _read_json(path.with_name("generation_config.json"), required=False)
    return normalize_config(raw, path, generation_config=gen)


def _read_json(path: Path, *, required: bool) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ModelLoadError(f"{path}: file not found") from None
        return None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


# ---------------------------------------------------------------------------
# rope frequencies


def _default_inv_freqs(head_dim: int, base: float) -> np.ndarray:
    return 1.0 / (float(base) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def llama3_rope_freqs(head_dim: int, base: float, scaling: Mapping) -> np.ndarray:
    """Llama 3.1-style scaled rope inverse frequencies, float32 of shape [head_dim // 2].

    ``scaling`` holds factor, low_freq_factor, high_freq_factor and
    original_max_position_embeddings (a normalised or raw ``rope_scaling`` dict).
    Equals transformers' ``_compute_llama3_parameters``. MLX's ``fast.rope(freqs=...)``
    takes periods, the reciprocal: pass ``1.0 / llama3_rope_freqs(...)``.
    """
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    inv = _default_inv_freqs(head_dim, base)
    wavelen = 2 * math.pi / inv
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    # long wavelengths are slowed down by `factor`, short ones kept, the band between blended
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > low_freq_wavelen, inv / factor, inv)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    out = np.where(medium, blended, out)
    return out.astype(np.float32)


def rope_inv_freqs(head_dim: int, base: float, scaling: Mapping | None = None) -> np.ndarray:
    """Rope inverse frequencies (float32, [head_dim // 2]) for plain, linear or llama3 rope.

    ``scaling`` is a normalised rope scaling dict (``normalize_config``'s ``rope_scaling``)
    or None. Linear scaling divides every frequency by ``factor``. Yarn also changes the
    attention scale, so it is left to the model code.
    """
    rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return _default_inv_freqs(head_dim, base).astype(np.float32)
    if rope_type == "linear":
        return (_default_inv_freqs(head_dim, base) / float(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        return llama3_rope_freqs(head_dim, base, scaling)
    raise ValueError(f"rope_inv_freqs does not handle rope_type {rope_type!r}")
