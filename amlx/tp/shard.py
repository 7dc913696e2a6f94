"""Megatron-style sharding of a loaded decoder over the ranks of a
tensor-parallel group.

Each rank keeps, per layer: its share of the key-value heads and the query
heads that read them (GQA groups stay whole), q/k/v and gate/up split by output
columns, o and down split by input rows and followed by one all_sum each (two
collectives per layer). Norms, the embedding and the output projection are
replicated: every rank computes the same logits, so no collective is needed
after the head and rank 0 samples from its own copy. (Sharding the head by
vocabulary would save each rank (N-1)/N of the head's weight reads per step
-- about 1/60 of Qwen3-32B's -- for one all_gather of the logits per step;
benchmarks/tensor_parallel.py is where to measure whether it pays.)

Quantized layers are cut on their quantization groups. Rank 0's token ids
reach the other ranks inside the forward itself: the embedding's input is
all_summed, and the other ranks feed zeros.
"""

from __future__ import annotations

from typing import Callable

from amlx._mlx import Array
from amlx.models.base import Attention, CausalLM, GatedMLP
from amlx.models.nn import Module


class IdsFromRankZero(Module):
    """The embedding, fed the sum of every rank's ids: rank 0's real ids plus
    the zeros of the others, so all ranks embed the same tokens."""

    def __init__(self, embedding: Module, reduce: Callable[[Array], Array]):
        self.embedding = embedding
        self._reduce = reduce

    def __call__(self, ids: Array) -> Array:
        return self.embedding(self._reduce(ids))

    def as_linear(self, x: Array) -> Array:
        return self.embedding.as_linear(x)

    # what the model reads of its embedding for the activations' float type
    # (CausalLM.activation_dtype); `scales` raises AttributeError when not quantized
    @property
    def weight(self) -> Array:
        return self.embedding.weight

    @property
    def scales(self) -> Array:
        return self.embedding.scales


def shard_problems(model: CausalLM, size: int) -> list[str]:
    """Why `model` cannot be split over `size` ranks (empty: it can)."""
    problems = []
    for i, layer in enumerate(model.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not isinstance(attn, Attention) or not isinstance(mlp, GatedMLP):
            problems.append(f"layer {i} is not an attention block with a gated MLP")
            continue
        problems += [f"layer {i}: {p}" for p in (attn.shard_problem(size), mlp.shard_problem(size)) if p]
    return problems


def shard_model(model: CausalLM, rank: int, size: int, reduce: Callable[[Array], Array]) -> None:
    """Keeps rank `rank`'s part of every layer (ValueError, before any change,
    when the model does not divide over `size` ranks)."""
    problems = shard_problems(model, size)
    if problems:
        raise ValueError(f"{model.model_type or 'the model'} cannot be split over tensor_parallel={size} ranks: "
                         + "; ".join(problems[:3]))
    model.release_derived()
    for layer in model.layers:
        layer.self_attn.shard(rank, size, reduce)
        layer.mlp.shard(rank, size, reduce)
    model.model.embed_tokens = IdsFromRankZero(model.model.embed_tokens, reduce)
