"""Megatron-style sharding of a loaded decoder over the ranks of a
tensor-parallel group.

Each rank keeps, per layer: its share of the key-value heads and the query
heads that read them (GQA groups stay whole), q/k/v and gate/up split by output
columns, o and down split by input rows and followed by one all_sum each (two
collectives per layer). Norms, the embedding and the output projection are
replicated by default: every rank computes the same logits, so no collective
is needed after the head and rank 0 samples from its own copy.
AMLX_TP_HEAD=vocab (read once, when the model loads) shards the output head by
vocabulary instead: each rank projects onto its rows [r*P, (r+1)*P) of the
head, P = ceil(V/N) (the last rank's block zero-padded), and one all_gather
per step assembles the full logits on every rank. That saves each rank
(N-1)/N of the head's weight reads for one gather of B*N*P logits; the
embedding stays whole (a lookup reads B rows). docs/scaling.md has the
measurement behind the default.

Quantized layers are cut on their quantization groups. Rank 0's token ids
reach the other ranks inside the forward itself: the embedding's input is
all_summed, and the other ranks feed zeros.
"""

from __future__ import annotations

from typing import Callable

import os

from amlx._mlx import Array, ops
from amlx.models.base import Attention, CausalLM, GatedMLP
from amlx.models.nn import Module, input_split_problem, vocab_rows

HEADS = ("replicated", "vocab")


def head_mode() -> str:
    """How the output head is split (AMLX_TP_HEAD: replicated or vocab)."""
    mode = os.environ.get("AMLX_TP_HEAD") or "replicated"
    if mode not in HEADS:
        raise ValueError(f"AMLX_TP_HEAD must be one of {', '.join(HEADS)}, not {mode!r}")
    return mode


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


class VocabShardedHead(Module):
    """One rank's rows of the output head (`part`: P rows), whose slices of the
    logits every rank gathers (`gather`: the group's all_gather, rank order
    along axis 0) into the full (rows, vocab) logits."""

    def __init__(self, part: Module, vocab: int, size: int, gather: Callable[[Array], Array]):
        self.part = part
        self._vocab, self._size, self._gather = vocab, size, gather

    def __call__(self, h: Array) -> Array:
        mine = self.part(h)  # (rows, P)
        rows, per = mine.shape
        every = ops.reshape(self._gather(mine), (self._size, rows, per))
        full = ops.reshape(ops.transpose(every, (1, 0, 2)), (rows, self._size * per))
        return full if self._size * per == self._vocab else ops.slice(full, (0, 0), (rows, self._vocab))


def shard_head(model: CausalLM, rank: int, size: int, gather: Callable[[Array], Array]) -> None:
    """Replaces the output head (or the tied embedding's projection) by rank
    `rank`'s vocabulary rows of it; an untied head's full arrays are closed."""
    own = getattr(model, "lm_head", None)
    source = own if own is not None else model.model.embed_tokens
    vocab = source.weight.shape[0]
    per = -(-vocab // size)
    lo, hi = min(rank * per, vocab), min((rank + 1) * per, vocab)
    source.release_derived()
    model.lm_head = VocabShardedHead(vocab_rows(source, lo, hi, per), vocab, size, gather)
    if own is not None:
        for _, a in own.named_parameters():
            a.close()


def shard_problems(model: CausalLM, size: int) -> list[str]:
    """Why `model` cannot be split over `size` ranks (empty: it can)."""
    problems = []
    for i, layer in enumerate(model.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if not isinstance(attn, Attention) or not isinstance(mlp, GatedMLP):
            problems.append(f"layer {i} is not an attention block with a gated MLP")
            continue
        found = [p for p in (attn.shard_problem(size), mlp.shard_problem(size)) if p]
        if not found:  # (the widths divide: does each rank's part start on a quantization group?)
            found = [p for p in (_group_problem(attn.o_proj, size, "attention output"),
                                 _group_problem(mlp.down_proj, size, "MLP down")) if p]
        problems += [f"layer {i}: {p}" for p in found]
    return problems


def _group_problem(layer: Module, size: int, what: str) -> str | None:
    """Why a row-parallel (input-split) layer cannot be cut into `size` parts, or None. Found
    here, before any layer changes: amlx.models.nn.input_slice refused it only mid-way through
    the model, with an error that named neither the layer nor tensor parallelism."""
    problem = input_split_problem(layer, size)
    return None if problem is None else f"the {what} projection's {problem}"


def shard_model(model: CausalLM, rank: int, size: int, reduce: Callable[[Array], Array],
                gather: Callable[[Array], Array] | None = None) -> None:
    """Keeps rank `rank`'s part of every layer (ValueError, before any change,
    when the model does not divide over `size` ranks). With `gather` (the
    group's all_gather) the output head is sharded by vocabulary too."""
    problems = shard_problems(model, size)
    if problems:
        raise ValueError(f"{model.model_type or 'the model'} cannot be split over tensor_parallel={size} ranks: "
                         + "; ".join(problems[:3]))
    model.release_derived()
    for layer in model.layers:
        layer.self_attn.shard(rank, size, reduce)
        layer.mlp.shard(rank, size, reduce)
    if gather is not None:
        shard_head(model, rank, size, gather)
    model.model.embed_tokens = IdsFromRankZero(model.model.embed_tokens, reduce)
