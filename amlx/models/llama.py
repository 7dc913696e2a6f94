"""Llama (2, 3, 3.1 with llama3 rope scaling) and the architectures that share
its pre-norm block: Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) are
built by their own files on top of `build_prenorm`."""

from __future__ import annotations

from amlx._mlx import Array
from amlx.cache import KVCache
from amlx.models.base import (Attention, CausalLM, Decoder, GatedMLP, ModelInfo, RoPE, Step, Weights, residual,
                              silu)
from amlx.models.config import SLIDING_ATTENTION
from amlx.models.nn import Module
from amlx.errors import ModelLoadError


class PreNormBlock(Module):
    def __init__(self, w: Weights, p: str, cfg: dict, rope: RoPE, window: int | None):
        h, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        qk_norm = (lambda name, dim: w.norm(name, dim, eps)) if cfg["qk_norm"] else None
        self.input_layernorm = w.norm(f"{p}.input_layernorm", h, eps)
        self.self_attn = Attention(w, f"{p}.self_attn", h, cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                   cfg["head_dim"], cfg["head_dim"] ** -0.5, rope, qkv_bias=cfg["qkv_bias"],
                                   qk_norm=qk_norm, window=window)
        self.post_attention_layernorm = w.norm(f"{p}.post_attention_layernorm", h, eps)
        self.mlp = GatedMLP(w, f"{p}.mlp", h, cfg["intermediate_size"], silu)

    def __call__(self, x: Array, normed: Array, cache: KVCache | None, step: Step,
                 after: Module) -> tuple[Array, Array]:
        """x: the residual stream, normed: input_layernorm(x); returns the new
        stream and `after` (the next layer's input norm, or the final norm) of it."""
        x, normed = residual(step, x, self.self_attn(normed, cache, step), self.post_attention_layernorm)
        return residual(step, x, self.mlp(normed, step), after)


def build_prenorm(cfg: dict, w: Weights, model_type: str) -> CausalLM:
    """The Llama-family decoder described by a normalised config."""
    if cfg["hidden_act"] != "silu":
        raise ModelLoadError(f"{model_type}: activation {cfg['hidden_act']!r} is not supported (silu only)")
    if cfg.get("o_bias") or cfg.get("mlp_bias"):
        raise ModelLoadError(f"{model_type}: biases on o_proj or the MLP are not supported")
    rope = RoPE(cfg["head_dim"], cfg["rope_theta"], cfg["rope_scaling"])
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    layers = []
    for i, kind in enumerate(cfg["layer_types"]):
        window = cfg["sliding_window"] if kind == SLIDING_ATTENTION else None
        layers.append(PreNormBlock(w, f"model.layers.{i}", cfg, rope, window))
    decoder = Decoder(w.embedding("model.embed_tokens", vocab, h), layers,
                      w.norm("model.norm", h, cfg["rms_norm_eps"]))
    lm_head = None if cfg["tie_word_embeddings"] else w.linear("lm_head", vocab, h)
    model = CausalLM(decoder, lm_head, ModelInfo.from_config(cfg))
    model.model_type = model_type
    return model


def build(cfg: dict, w: Weights) -> CausalLM:
    return build_prenorm(cfg, w, "llama")
