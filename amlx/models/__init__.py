"""Model architectures and checkpoint loading.

`load_model(path)` reads a Hugging Face or MLX checkpoint directory and returns
the model (an `amlx.models.base.CausalLM`) with its normalised config.
"""

from amlx.models.loader import ARCHITECTURES, LoadedModel, load_model

__all__ = ["ARCHITECTURES", "LoadedModel", "load_model"]
