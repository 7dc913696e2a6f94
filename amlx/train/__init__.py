"""Fine-tuning (LoRA adapters, and full: every weight): gradients, AdamW, adapters, data and the loop.

    async for event in model.train_lora("train.jsonl", iters=100, learning_rate=1e-4,
                                        adapter_path="adapters"):
        ...
    model = await amlx.load(path, adapter="adapters")

Modules: `grad` (causal-LM loss and gradients over a model's parameters),
`optim` (AdamW, learning-rate schedules), `lora` (LoRA layers, adapter files in
amlx / PEFT / mlx-lm formats, fusing), `data` (JSONL datasets and batches),
`trainer` (the loop as an async iterator of events), `full` (full fine-tuning,
`model.train(data, save_path=...)`: the same loop over every float weight, writing
whole checkpoints), `cli` (`amlx lora`, and `amlx lora --full`).
Submodules import MLX lazily through amlx._mlx; importing this package is cheap.
"""

from __future__ import annotations

__all__ = ["TrainingEvent", "TrainOptions", "DataError", "NonFiniteLossError", "fuse"]


def __getattr__(name: str):
    if name in ("TrainingEvent", "TrainOptions", "TrainingRun", "NonFiniteLossError"):
        from amlx.train import trainer

        return getattr(trainer, name)
    if name == "DataError":
        from amlx.train.data import DataError

        return DataError
    if name == "fuse":
        from amlx.train.lora import fuse

        return fuse
    raise AttributeError(f"module 'amlx.train' has no attribute {name!r}")
