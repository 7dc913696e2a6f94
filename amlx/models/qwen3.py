"""Qwen3: the Llama block with RMSNorm over each head's queries and keys
(q_norm, k_norm) before rotary embedding; head_dim 128 unless the config says
otherwise; long-context releases use YaRN rope scaling."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from amlx.models.config import ConfigReader, ModelArgs
from amlx.models.llama import build_prenorm
from amlx.models.qwen2 import QWEN_DEFAULTS, qwen_layer_types
from amlx.models.registry import Architecture


@dataclasses.dataclass
class Qwen3Args(ModelArgs):
    ARCH: ClassVar[str] = "qwen3"
    DEFAULTS: ClassVar[dict[str, Any]] = {**QWEN_DEFAULTS, "head_dim": 128}
    QK_NORM: ClassVar[bool] = True

    @classmethod
    def default_layer_types(cls, r: ConfigReader, n_layers: int) -> list[str]:
        return qwen_layer_types(r, n_layers)


ARCHITECTURE = Architecture("qwen3", ("qwen3",), Qwen3Args, build_prenorm)
