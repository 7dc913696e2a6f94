"""The causal-LM loss and its gradients with respect to a model's parameters.

A model's parameters live on its modules, so differentiating with respect to
some of them means: put the traced arrays into the model (`Module.update`),
run the forward pass, put the originals back. `value_and_grad` packages that
as a function of a dict of parameters, which MLX's `value_and_grad`
differentiates like any other pytree.

Runs on amlx's worker thread (or, in tests, on one thread of their own).
"""

from __future__ import annotations

from typing import Callable

from amlx._mlx import Array, ops, transforms
from amlx._mlx import float32 as _f32

__all__ = ["cross_entropy", "causal_lm_loss", "value_and_grad", "swap_parameters", "trainable_parameters"]


def cross_entropy(logits: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """(sum of the masked token losses, number of masked tokens), both float32 scalars.

    logits (B, L, V), targets (B, L) int32, mask (B, L) (nonzero: counted)."""
    logits = logits.astype(_f32)
    picked = ops.squeeze(ops.take_along_axis(logits, ops.expand_dims(targets, -1), -1), -1)
    token_loss = ops.logsumexp(logits, -1) - picked
    m = mask.astype(_f32)
    return ops.sum(token_loss * m), ops.sum(m)


def causal_lm_loss(model, inputs: Array, targets: Array, mask: Array) -> tuple[Array, Array]:
    """Mean next-token cross entropy over the masked tokens: (loss, token count).

    `inputs` (B, L) are the token ids fed to the model, `targets` (B, L) the ids
    each position must predict (the inputs shifted by one), `mask` (B, L) marks
    the positions that count (1) and padding or prompt tokens (0). The forward
    is the full causal one (no cache), as in training."""
    logits = model(inputs)
    total, count = cross_entropy(logits, targets, mask)
    return total / ops.maximum(count, 1.0), count


def trainable_parameters(model) -> dict[str, Array]:
    """The parameters a LoRA fine-tune trains (`lora_a` / `lora_b` of every adapted
    layer), by dotted name; empty when the model has no LoRA layers."""
    return {k: v for k, v in model.named_parameters() if k.endswith((".lora_a", ".lora_b"))}


class swap_parameters:
    """`with swap_parameters(model, params):` runs with `params` put into the model
    (by dotted name) and restores the previous arrays on exit, also on error."""

    def __init__(self, model, params: dict[str, Array]):
        self.model = model
        self.params = params
        self.saved: dict[str, Array] = {}

    def __enter__(self):
        current = dict(self.model.named_parameters())
        missing = [k for k in self.params if k not in current]
        if missing:
            raise KeyError(f"the model has no parameter {missing[0]!r}")
        self.saved = {k: current[k] for k in self.params}
        self.model.update(self.params)
        return self.model

    def __exit__(self, *exc):
        self.model.update(self.saved)
        self.saved = {}


def value_and_grad(model, loss_fn: Callable = causal_lm_loss) -> Callable:
    """Returns f(params, *batch) -> ((loss, *aux), grads).

    `params` is a dict {dotted name: array} of some of the model's parameters
    (e.g. `trainable_parameters(model)` or `model.parameters()`); `grads` has
    the same keys. `loss_fn(model, *batch)` returns the scalar loss or a tuple
    whose first element is it (the default: `causal_lm_loss`, whose batch is
    inputs, targets, mask)."""

    def fn(params, *batch):
        with swap_parameters(model, params):
            out = loss_fn(model, *batch)
        return out

    return transforms.value_and_grad(fn, 0)
