"""The one registry of architectures: config ``model_type`` -> `Architecture`.

Each architecture file (``amlx/models/<name>.py``) defines its typed
arguments (a `ModelArgs` subclass), its builder and an ``ARCHITECTURE``
value; `ARCHITECTURE_MODULES` lists the files. Adding an architecture is one
file, its name here, and its parity test (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from amlx.errors import ModelLoadError

if TYPE_CHECKING:
    from amlx.models.base import CausalLM, Weights
    from amlx.models.config import ModelArgs

__all__ = ["ARCHITECTURE_MODULES", "Architecture", "architecture", "architectures"]

ARCHITECTURE_MODULES = ("qwen3", "qwen2", "llama", "mistral", "gemma3")


@dataclass(frozen=True)
class Architecture:
    """One architecture: the config ``model_type`` values it reads, its typed
    arguments and the function that builds the model from them and the weights."""

    name: str
    model_types: tuple[str, ...]
    args: type["ModelArgs"]
    build: Callable[[Any, "Weights"], "CausalLM"]


_by_model_type: dict[str, Architecture] = {}
_filling = threading.Lock()


def architectures() -> dict[str, Architecture]:
    """model_type -> Architecture, for every registered architecture (any thread)."""
    global _by_model_type
    if _by_model_type:
        return _by_model_type
    # Filled once, under a lock, and published whole: two loads on workers of their own (two
    # tensor-parallel models at once) filled it together, and the second found every type
    # "registered twice", or a reader saw it half filled ("unsupported architecture").
    with _filling:
        if not _by_model_type:
            found: dict[str, Architecture] = {}
            for name in ARCHITECTURE_MODULES:
                arch: Architecture = importlib.import_module(f"amlx.models.{name}").ARCHITECTURE
                for model_type in arch.model_types:
                    if model_type in found:
                        raise RuntimeError(f"model_type {model_type!r} is registered twice")
                    found[model_type] = arch
            _by_model_type = found
    return _by_model_type


def architecture(model_type: Any, path: Any = "config.json") -> Architecture:
    """The architecture reading configs of `model_type`; ModelLoadError naming
    `path` when amlx has none."""
    found = architectures().get(model_type) if isinstance(model_type, str) else None
    if found is None:
        supported = ", ".join(sorted(architectures()))
        raise ModelLoadError(f"{path}: unsupported architecture model_type={model_type!r} (supported: {supported})")
    return found
