"""amlx: asyncio-native LLM inference and LoRA fine-tuning on Apple's MLX (Metal, CUDA, CPU)."""

from amlx.errors import (AmlxError, ChatTemplateError, ClosedError, ConstraintError, ContextLengthError, MLXError,
                         ModelLoadError)
from amlx.model import Model, ModelInfo, TokenStream, load, load_sync
from amlx.types import Completion, EngineStats, GenerateOptions, GenerationOptions, MemoryStats, Token, ToolCall, Usage
from amlx.convert import convert  # cheap: it imports amlx.models only when called

__version__ = "0.1.0"


def memory() -> MemoryStats:
    """MLX memory counters in bytes: {"active", "peak", "cache"}."""
    from amlx._mlx import memory as _memory

    counters = _memory.counters()
    return MemoryStats(active=counters["active"], peak=counters["peak"], cache=counters["cache"])


__all__ = ["load", "load_sync", "Model", "ModelInfo", "TokenStream", "Token", "Completion", "ToolCall", "Usage",
           "GenerationOptions", "AmlxError", "ClosedError", "ContextLengthError", "MLXError", "ModelLoadError", "memory",
           "convert", "GenerateOptions", "EngineStats", "MemoryStats", "ChatTemplateError", "ConstraintError"]
