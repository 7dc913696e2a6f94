"""amlx: asyncio-native LLM inference and LoRA fine-tuning on Apple's MLX (Metal, CUDA, CPU)."""

from amlx.errors import AmlxError, ClosedError, ContextLengthError, MLXError, ModelLoadError
from amlx.model import Model, ModelInfo, TokenStream, load, load_sync
from amlx.types import Completion, GenerationOptions, Token, ToolCall, Usage
from amlx.convert import convert  # cheap: it imports amlx.models only when called

__version__ = "0.1.0"


def memory() -> dict:
    """MLX memory counters in bytes: {"active", "peak", "cache"}."""
    from amlx._mlx import memory as _memory

    return _memory.counters()


__all__ = ["load", "load_sync", "Model", "ModelInfo", "TokenStream", "Token", "Completion", "ToolCall", "Usage",
           "GenerationOptions", "AmlxError", "ClosedError", "ContextLengthError", "MLXError", "ModelLoadError", "memory",
           "convert"]
