"""Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections
(hard-wired by the architecture; the normalised config sets qkv_bias)."""

from __future__ import annotations

from amlx.models.base import CausalLM, Weights
from amlx.models.llama import build_prenorm


def build(cfg: dict, w: Weights) -> CausalLM:
    return build_prenorm(cfg, w, "qwen2")
