"""Mistral: the Llama block; when config.json sets ``sliding_window`` every
layer attends within that one window."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from amlx.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ConfigReader
from amlx.models.llama import LlamaArgs, build_prenorm
from amlx.models.registry import Architecture


@dataclasses.dataclass
class MistralArgs(LlamaArgs):
    ARCH: ClassVar[str] = "mistral"
    # with layer_types, transformers runs a mistral config as Ministral, which follows them
    READS_LAYER_TYPES: ClassVar[bool] = True

    @classmethod
    def default_layer_types(cls, r: ConfigReader, n_layers: int) -> list[str]:
        return [SLIDING_ATTENTION if r.get("sliding_window") is not None else FULL_ATTENTION] * n_layers


ARCHITECTURE = Architecture("mistral", ("mistral",), MistralArgs, build_prenorm)
