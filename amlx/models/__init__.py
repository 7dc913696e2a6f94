"""Model architectures and checkpoint loading.

`load_model(path)` reads a Hugging Face or MLX checkpoint directory and returns
the model (an `amlx.models.base.CausalLM`) with its normalised config; it is
`prepare` (the host phase: `amlx.checkpoint.read_checkpoint`, no MLX, any
thread) followed by `build_model` (the MLX phase, on the engine's worker).
Architectures are registered in `amlx.models.registry`, one file each.
"""

from amlx.models.loader import LoadedModel, build_model, load_model, prepare
from amlx.models.registry import Architecture, architecture, architectures

__all__ = ["Architecture", "LoadedModel", "architecture", "architectures", "build_model", "load_model", "prepare"]
