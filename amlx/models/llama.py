"""Llama (2, 3, 3.1 with llama3 rope scaling) and its pre-norm block, which
Qwen2, Qwen3 and Mistral share (their files reuse `build_prenorm`).

config.json: transformers' LlamaConfig. ``attention_bias`` puts biases on
q/k/v and o; ``mlp_bias`` on the MLP (neither is supported by the block below
beyond q/k/v); ``head_dim`` defaults to hidden_size / heads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from amlx._mlx import Array
from amlx.cache import KVCache
from amlx.errors import ModelLoadError
from amlx.models.base import Attention, CausalLM, Decoder, GatedMLP, RoPE, Step, Weights, residual, silu
from amlx.models.config import SLIDING_ATTENTION, ConfigReader, ModelArgs
from amlx.models.nn import Module
from amlx.models.registry import Architecture


@dataclasses.dataclass
class LlamaArgs(ModelArgs):
    ARCH: ClassVar[str] = "llama"
    DEFAULTS: ClassVar[dict[str, Any]] = {
        "rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10_000.0, "hidden_act": "silu",
        "head_dim": None, "tie_word_embeddings": False}
    READS_LAYER_TYPES: ClassVar[bool] = False

    @classmethod
    def biases(cls, r: ConfigReader) -> dict[str, bool]:
        return {**super().biases(r), "mlp_bias": r.flag("mlp_bias", False)}


class PreNormBlock(Module):
    def __init__(self, w: Weights, p: str, args: ModelArgs, rope: RoPE, window: int | None):
        h, eps = args.hidden_size, args.rms_norm_eps
        qk_norm = (lambda name, dim: w.norm(name, dim, eps)) if args.qk_norm else None
        self.input_layernorm = w.norm(f"{p}.input_layernorm", h, eps)
        self.self_attn = Attention(w, f"{p}.self_attn", h, args.num_attention_heads, args.num_key_value_heads,
                                   args.head_dim, args.head_dim ** -0.5, rope, qkv_bias=args.qkv_bias,
                                   qk_norm=qk_norm, window=window)
        self.post_attention_layernorm = w.norm(f"{p}.post_attention_layernorm", h, eps)
        self.mlp = GatedMLP(w, f"{p}.mlp", h, args.intermediate_size, silu)

    def __call__(self, x: Array, normed: Array, cache: KVCache | None, step: Step,
                 after: Module) -> tuple[Array, Array]:
        """x: the residual stream, normed: input_layernorm(x); returns the new
        stream and `after` (the next layer's input norm, or the final norm) of it."""
        x, normed = residual(step, x, self.self_attn(normed, cache, step), self.post_attention_layernorm)
        return residual(step, x, self.mlp(normed, step), after)


def build_prenorm(args: ModelArgs, w: Weights) -> CausalLM:
    """The Llama-family decoder described by `args`."""
    if args.hidden_act != "silu":
        raise ModelLoadError(f"{args.arch}: invalid 'hidden_act' = {args.hidden_act!r}: activation "
                             f"{args.hidden_act!r} is not supported (silu only)")
    if args.o_bias or args.mlp_bias:
        key = "attention_bias" if args.o_bias else "mlp_bias"
        raise ModelLoadError(f"{args.arch}: invalid '{key}' = true: biases on o_proj or the MLP are not supported "
                             f"(q/k/v biases only)")
    rope = RoPE(args.head_dim, args.rope_theta, args.rope_scaling)
    h, vocab = args.hidden_size, args.vocab_size
    layers = []
    for i, kind in enumerate(args.layer_types):
        window = args.sliding_window if kind == SLIDING_ATTENTION else None
        layers.append(PreNormBlock(w, f"model.layers.{i}", args, rope, window))
    decoder = Decoder(w.embedding("model.embed_tokens", vocab, h), layers, w.norm("model.norm", h, args.rms_norm_eps))
    lm_head = None if args.tie_word_embeddings else w.linear("lm_head", vocab, h)
    model = CausalLM(decoder, lm_head)
    model.model_type = args.arch
    return model


ARCHITECTURE = Architecture("llama", ("llama",), LlamaArgs, build_prenorm)
