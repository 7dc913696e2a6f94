"""Qwen3: the Llama block with RMSNorm over each head's queries and keys
(q_norm, k_norm) before rotary embedding, and no attention biases."""

from __future__ import annotations

from amlx.models.base import CausalLM, Weights
from amlx.models.llama import build_prenorm


def build(cfg: dict, w: Weights) -> CausalLM:
    return build_prenorm(cfg, w, "qwen3")
