"""Gemma 3 text (also the language model inside multimodal gemma3 checkpoints).

Quirks against the Llama family: RMSNorm scales by (1 + w); four norms per
block (around attention and around the MLP); per-head q/k norms; embeddings
scaled by sqrt(hidden); attention scaled by query_pre_attn_scalar^-1/2;
GELU (tanh) MLP; sliding-window local layers with their own rope base."""

from __future__ import annotations

from amlx._mlx import Array
from amlx.cache import KVCache
from amlx.errors import ModelLoadError
from amlx.models.base import (Attention, CausalLM, Decoder, GatedMLP, ModelInfo, RoPE, Step, Weights, gelu_tanh,
                              residual)
from amlx.models.config import SLIDING_ATTENTION
from amlx.models.nn import Module, RMSNorm


class GemmaRMSNorm(RMSNorm):
    """RMSNorm scaling by (1 + weight); the checkpoint's weight is kept as is."""

    def norm_weight(self) -> Array:
        return self._derived("scale", self.weight, lambda w: 1.0 + w)

    def derived_arrays(self) -> list[Array]:
        return [self.norm_weight()]


class GemmaBlock(Module):
    def __init__(self, w: Weights, p: str, cfg: dict, rope: RoPE, window: int | None):
        h, eps = cfg["hidden_size"], cfg["rms_norm_eps"]

        def norm(name: str, dim: int = h) -> Module:
            return w.norm(name, dim, eps, cls=GemmaRMSNorm)

        self.input_layernorm = norm(f"{p}.input_layernorm")
        self.self_attn = Attention(w, f"{p}.self_attn", h, cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                   cfg["head_dim"], cfg["query_pre_attn_scalar"] ** -0.5, rope,
                                   qkv_bias=cfg["qkv_bias"], qk_norm=norm, window=window)
        self.post_attention_layernorm = norm(f"{p}.post_attention_layernorm")
        self.pre_feedforward_layernorm = norm(f"{p}.pre_feedforward_layernorm")
        self.mlp = GatedMLP(w, f"{p}.mlp", h, cfg["intermediate_size"], gelu_tanh)
        self.post_feedforward_layernorm = norm(f"{p}.post_feedforward_layernorm")

    def __call__(self, x: Array, normed: Array, cache: KVCache | None, step: Step,
                 after: Module) -> tuple[Array, Array]:
        """x: the residual stream, normed: input_layernorm(x); returns the new
        stream and `after` (the next layer's input norm, or the final norm) of it."""
        attn = self.self_attn(normed, cache, step)
        x, normed = residual(step, x, attn, self.pre_feedforward_layernorm, pre=self.post_attention_layernorm)
        return residual(step, x, self.mlp(normed, step), after, pre=self.post_feedforward_layernorm)


def build(cfg: dict, w: Weights) -> CausalLM:
    if cfg["hidden_act"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ModelLoadError(f"gemma3: activation {cfg['hidden_act']!r} is not supported")
    if cfg.get("attn_logit_softcapping"):
        raise ModelLoadError("gemma3: attn_logit_softcapping is not supported")
    h, vocab, hd = cfg["hidden_size"], cfg["vocab_size"], cfg["head_dim"]
    global_rope = RoPE(hd, cfg["rope_theta"], cfg["rope_scaling"])
    local_rope = RoPE(hd, cfg["rope_local_base_freq"], cfg.get("rope_local_scaling"))
    layers = []
    for i, kind in enumerate(cfg["layer_types"]):
        local = kind == SLIDING_ATTENTION
        layers.append(GemmaBlock(w, f"model.layers.{i}", cfg, local_rope if local else global_rope,
                                 cfg["sliding_window"] if local else None))
    decoder = Decoder(w.embedding("model.embed_tokens", vocab, h), layers,
                      w.norm("model.norm", h, cfg["rms_norm_eps"], cls=GemmaRMSNorm), embed_scale=h ** 0.5)
    lm_head = None if cfg["tie_word_embeddings"] else w.linear("lm_head", vocab, h)
    model = CausalLM(decoder, lm_head, ModelInfo.from_config(cfg), final_softcap=cfg.get("final_logit_softcapping"))
    model.model_type = "gemma3"
    return model
