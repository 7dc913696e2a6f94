"""Qwen2 / Qwen2.5: the Llama block with biases on the q, k and v projections,
hard-wired by the architecture (config.json never says so), and an optional
sliding window on the layers from ``max_window_layers`` on."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from amlx.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ConfigReader, ModelArgs
from amlx.models.llama import build_prenorm
from amlx.models.registry import Architecture


def qwen_layer_types(r: ConfigReader, n_layers: int) -> list[str]:
    """Qwen2's and Qwen3's rule: with ``use_sliding_window`` and a window, the
    layers from ``max_window_layers`` on use it."""
    if r.flag("use_sliding_window", False) and r.get("sliding_window") is not None:
        first = r.integer("max_window_layers", 28, minimum=0)
        return [SLIDING_ATTENTION if i >= first else FULL_ATTENTION for i in range(n_layers)]
    return [FULL_ATTENTION] * n_layers


# transformers' Qwen2Config defaults (Qwen3's differ in head_dim only)
QWEN_DEFAULTS: dict[str, Any] = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768, "rope_theta": 10_000.0,
                                 "hidden_act": "silu", "head_dim": None, "tie_word_embeddings": False}


@dataclasses.dataclass
class Qwen2Args(ModelArgs):
    ARCH: ClassVar[str] = "qwen2"
    DEFAULTS: ClassVar[dict[str, Any]] = QWEN_DEFAULTS

    @classmethod
    def default_layer_types(cls, r: ConfigReader, n_layers: int) -> list[str]:
        return qwen_layer_types(r, n_layers)

    @classmethod
    def biases(cls, r: ConfigReader) -> dict[str, bool]:
        return {"qkv_bias": True, "o_bias": False, "mlp_bias": False}  # whatever attention_bias says


ARCHITECTURE = Architecture("qwen2", ("qwen2",), Qwen2Args, build_prenorm)
