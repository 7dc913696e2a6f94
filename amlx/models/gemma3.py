"""Gemma 3 text (also the language model inside multimodal gemma3 checkpoints).

Quirks against the Llama family: RMSNorm scales by (1 + w); four norms per
block (around attention and around the MLP); per-head q/k norms; embeddings
scaled by sqrt(hidden); attention scaled by query_pre_attn_scalar^-1/2;
GELU (tanh) MLP; sliding-window local layers with their own rope base.

config.json: ``gemma3_text`` (transformers' Gemma3TextConfig) or the
multimodal ``gemma3``, whose text model sits under ``text_config`` (weights
under ``language_model.``) and leaves out every value equal to the
transformers default. Older configs name ``rope_local_base_freq`` and
``sliding_window_pattern``; newer ones nest ``rope_parameters`` per layer type
and list ``layer_types``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from amlx._mlx import Array
from amlx.cache import KVCache
from amlx.errors import ModelLoadError
from amlx.models.base import Attention, CausalLM, Decoder, GatedMLP, RoPE, Step, Weights, gelu_tanh, residual
from amlx.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ConfigReader, ModelArgs, read_rope
from amlx.models.nn import Module, RMSNorm
from amlx.models.registry import Architecture

# Gemma3TextConfig defaults: gemma-3-4b-it and larger list only what differs from these.
TEXT_DEFAULTS: dict[str, Any] = {
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


@dataclasses.dataclass
class Gemma3Args(ModelArgs):
    rope_local_base_freq: float = 10_000.0
    rope_local_scaling: dict | None = None
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    ARCH: ClassVar[str] = "gemma3"
    DEFAULTS: ClassVar[dict[str, Any]] = TEXT_DEFAULTS
    QK_NORM: ClassVar[bool] = True
    ACT_KEY: ClassVar[str] = "hidden_activation"  # transformers ignores a hidden_act here

    @classmethod
    def text_config(cls, top: ConfigReader) -> tuple[ConfigReader, str, bool]:
        if top.src["model_type"] != "gemma3":
            return top, top.src["model_type"], False
        cfg = top.get("text_config")
        if cfg is None:
            cfg = {}  # every text value at its default, as transformers allows
        if not isinstance(cfg, Mapping):
            raise top.invalid("text_config", cfg, "expected an object")
        text_type = cfg.get("model_type", "gemma3_text")
        if text_type != "gemma3_text":
            raise ModelLoadError(f"{top.path}: unsupported architecture text_config.model_type={text_type!r} "
                                 f"(supported: gemma3_text)")
        return top.nested("text_config", cfg), text_type, True

    @classmethod
    def with_defaults(cls, r: ConfigReader) -> ConfigReader:
        given = {k: v for k, v in r.src.items() if v is not None or k not in cls.REQUIRED}
        return ConfigReader({**TEXT_DEFAULTS, **given}, r.path, r.prefix)

    @classmethod
    def rope(cls, r: ConfigReader, max_pos: int) -> dict[str, Any]:
        """As transformers' Gemma3TextConfig reads it: ``rope_parameters`` nested per layer
        type (absent entries default, at ``rope_theta`` / ``rope_local_base_freq``), and an
        older-style ``rope_scaling`` merged over the full-attention entry (it never applies
        to the sliding layers)."""
        theta = r.number("rope_theta", TEXT_DEFAULTS["rope_theta"])
        local = r.number("rope_local_base_freq", TEXT_DEFAULTS["rope_local_base_freq"])
        params = r.get("rope_parameters")
        if params is None:
            params = {}
        if not isinstance(params, Mapping):
            raise r.invalid("rope_parameters", params, "expected an object")
        flat = sorted(str(k) for k in params if k not in (FULL_ATTENTION, SLIDING_ATTENTION))
        if flat:
            # transformers ignores them (both layer types then run plain rope): refused
            # rather than guessed at
            raise r.invalid("rope_parameters", dict(params), f"Gemma 3 nests rope parameters per layer type "
                                                             f"({FULL_ATTENTION}, {SLIDING_ATTENTION}); "
                                                             f"transformers ignores {', '.join(flat)} here")
        out: dict[str, Any] = {}
        full, full_key = params.get(FULL_ATTENTION), "rope_parameters." + FULL_ATTENTION
        scaling = r.get("rope_scaling")
        if scaling is not None:
            if not isinstance(scaling, Mapping):
                raise r.invalid("rope_scaling", scaling, "expected an object or null")
            if full is not None and not isinstance(full, Mapping):
                raise r.invalid(full_key, full, "expected an object")
            full, full_key = {**(full or {}), **scaling}, "rope_scaling"
        out["rope_theta"], out["rope_scaling"] = read_rope(r, full, full_key, theta, max_pos)
        out["rope_local_base_freq"], out["rope_local_scaling"] = read_rope(
            r, params.get(SLIDING_ATTENTION), "rope_parameters." + SLIDING_ATTENTION, local, max_pos)
        return out

    @classmethod
    def default_layer_types(cls, r: ConfigReader, n_layers: int) -> list[str]:
        # transformers 5 also writes `_sliding_window_pattern`; like transformers, ignore it
        pattern = r.integer("sliding_window_pattern", TEXT_DEFAULTS["sliding_window_pattern"])
        return [SLIDING_ATTENTION if (i + 1) % pattern else FULL_ATTENTION for i in range(n_layers)]

    @classmethod
    def tie_embeddings(cls, top: ConfigReader, r: ConfigReader) -> bool:
        if top is r:
            return r.flag("tie_word_embeddings", True)
        tie = top.get("tie_word_embeddings", True)  # multimodal: the top level says
        if not isinstance(tie, bool):
            raise top.invalid("tie_word_embeddings", tie, "expected true or false")
        return tie

    @classmethod
    def extra(cls, r: ConfigReader) -> dict[str, Any]:
        if r.get("use_bidirectional_attention"):
            raise r.invalid("use_bidirectional_attention", True, "bidirectional (embedding) Gemma is not supported")
        return {"query_pre_attn_scalar": r.number("query_pre_attn_scalar"),
                "attn_logit_softcapping": r.optional_number("attn_logit_softcapping"),
                "final_logit_softcapping": r.optional_number("final_logit_softcapping")}

    def older_spellings(self, text: dict) -> None:
        super().older_spellings(text)
        text.setdefault("rope_local_base_freq", self.rope_local_base_freq)
        if "sliding_window_pattern" not in text:
            pattern = _pattern_of(self.layer_types)
            if pattern is not None:
                text["sliding_window_pattern"] = pattern
        if self.sliding_window is not None:
            text.setdefault("sliding_window", self.sliding_window)
        text.setdefault("query_pre_attn_scalar", self.query_pre_attn_scalar)
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size"):
            text.setdefault(key, getattr(self, key))


def _pattern_of(layer_types: list[str]) -> int | None:
    n = len(layer_types)
    for p in range(1, n + 2):
        if layer_types == [SLIDING_ATTENTION if (i + 1) % p else FULL_ATTENTION for i in range(n)]:
            return p
    return None


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaling by (1 + weight); the checkpoint's weight is kept as is."""

    def norm_weight(self) -> Array:
        return self.derive("scale", self.weight, lambda w: 1.0 + w)

    def derived_arrays(self) -> list[Array]:
        return [self.norm_weight()]


class GemmaBlock(Module):
    def __init__(self, w: Weights, p: str, args: Gemma3Args, rope: RoPE, window: int | None):
        h, eps = args.hidden_size, args.rms_norm_eps

        def norm(name: str, dim: int = h) -> Module:
            return w.norm(name, dim, eps, cls=GemmaRMSNorm)

        self.input_layernorm = norm(f"{p}.input_layernorm")
        self.self_attn = Attention(w, f"{p}.self_attn", h, args.num_attention_heads, args.num_key_value_heads,
                                   args.head_dim, args.query_pre_attn_scalar ** -0.5, rope,
                                   qkv_bias=args.qkv_bias, qk_norm=norm, window=window)
        self.post_attention_layernorm = norm(f"{p}.post_attention_layernorm")
        self.pre_feedforward_layernorm = norm(f"{p}.pre_feedforward_layernorm")
        self.mlp = GatedMLP(w, f"{p}.mlp", h, args.intermediate_size, gelu_tanh)
        self.post_feedforward_layernorm = norm(f"{p}.post_feedforward_layernorm")

    def __call__(self, x: Array, normed: Array, cache: KVCache | None, step: Step,
                 after: Module) -> tuple[Array, Array]:
        """x: the residual stream, normed: input_layernorm(x); returns the new
        stream and `after` (the next layer's input norm, or the final norm) of it."""
        attn = self.self_attn(normed, cache, step)
        x, normed = residual(step, x, attn, self.pre_feedforward_layernorm, pre=self.post_attention_layernorm)
        return residual(step, x, self.mlp(normed, step), after, pre=self.post_feedforward_layernorm)


def build(args: Gemma3Args, w: Weights) -> CausalLM:
    prefix = "text_config." if args.multimodal else ""
    if args.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelLoadError(f"gemma3: invalid '{prefix}hidden_activation' = {args.hidden_act!r}: activation "
                             f"{args.hidden_act!r} is not supported (gelu_pytorch_tanh only, or gelu_tanh)")
    if args.attn_logit_softcapping:
        raise ModelLoadError(f"gemma3: invalid '{prefix}attn_logit_softcapping' = {args.attn_logit_softcapping!r}: "
                             f"attn_logit_softcapping is not supported")
    h, vocab, hd = args.hidden_size, args.vocab_size, args.head_dim
    global_rope = RoPE(hd, args.rope_theta, args.rope_scaling)
    local_rope = RoPE(hd, args.rope_local_base_freq, args.rope_local_scaling)
    layers = []
    for i, kind in enumerate(args.layer_types):
        local = kind == SLIDING_ATTENTION
        layers.append(GemmaBlock(w, f"model.layers.{i}", args, local_rope if local else global_rope,
                                 args.sliding_window if local else None))
    decoder = Decoder(w.embedding("model.embed_tokens", vocab, h), layers,
                      w.norm("model.norm", h, args.rms_norm_eps, cls=GemmaRMSNorm), embed_scale=h ** 0.5)
    lm_head = None if args.tie_word_embeddings else w.linear("lm_head", vocab, h)
    # transformers' Gemma3ForConditionalGeneration (the multimodal model) never applies
    # text_config.final_logit_softcapping, only Gemma3ForCausalLM does: do as the reference
    softcap = None if args.multimodal else args.final_logit_softcapping
    model = CausalLM(decoder, lm_head, final_softcap=softcap)
    model.model_type = "gemma3"
    return model


ARCHITECTURE = Architecture("gemma3", ("gemma3_text", "gemma3"), Gemma3Args, build)
