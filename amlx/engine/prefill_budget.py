"""How many prompt tokens and rows one prefill pass may take, so that the pass's
temporaries stay under a bound (issue 15: a group of prompts admitted together
set the engine's peak memory).

A plain prefill pass holds, besides the weights and the KV pool, activations
that grow with its tokens (the MLP's gate and up products and their activation
are the widest; the residual stream, norms, attention's queries and outputs
are hidden-sized) and, per row, one position's logits over the vocabulary and
the sampler's temporaries of the same size. `PassBudget` estimates those bytes
from the model's shapes and says whether a pass of `tokens` tokens over `rows`
rows fits under `limit`. The scheduler splits an admitted group into several
passes where it does not. A lone prompt's pass always fits: its chunk stays
`EngineOptions.prefill_chunk`, so a long prompt's time to first token is as it
was (the bound is about many prompts taken at once).

The per-token factors were measured on the CPU (benchmarks/prefill_memory.py,
float32, a Gemma-3-shaped model: about 6 intermediate-sized and 8
hidden-sized values per token alive at the pass's peak); they are a bound on
what a pass's graph keeps, not a count of its ops.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

# The default bound on a pass's temporaries: this, or an eighth of the weights' bytes
# where that is more (a pass of a large model is slow enough that splitting it costs
# more, and its activations are small beside its weights). 256 MiB keeps a
# 2,048-token pass of Gemma-3-1B (about 100 KB per token in bf16) whole.
DEFAULT_PREFILL_MEMORY = 256 << 20
WEIGHTS_SHARE = 8
MIN_PASS_TOKENS = 16  # a pass is never capped below this (one block of positions by default)
INTERMEDIATE_VALUES = 6  # intermediate-sized values per token alive at a pass's peak (measured, see above)
HIDDEN_VALUES = 8  # hidden-sized values per token
ROW_LOGIT_COPIES = 2  # float32 (V,) arrays per row: the logits and the sampler's copy


def env_bytes(name: str, default: int) -> int:
    """A byte count from the environment variable `name` (bytes, or with a K/M/G
    suffix; 0 meaning none), or `default` where it is unset or empty."""
    text = os.environ.get(name, "").strip().upper()
    if not text:
        return default
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
    number = text[:-1] if scale > 1 else text
    try:
        value = int(float(number) * scale)
    except (ValueError, OverflowError):  # (OverflowError: "inf", "1e999": int() of an infinity)
        raise ValueError(f"{name} must be a byte count like 268435456 or 256M, not {text!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, not {text!r}")
    return value


def prefill_memory(weight_bytes: int = 0) -> int:
    """The bound in bytes: AMLX_PREFILL_MEMORY (bytes, or with a K/M/G suffix;
    0: no bound), else DEFAULT_PREFILL_MEMORY or an eighth of `weight_bytes`,
    whichever is more."""
    return env_bytes("AMLX_PREFILL_MEMORY", max(DEFAULT_PREFILL_MEMORY, weight_bytes // WEIGHTS_SHARE))


@dataclass(frozen=True)
class PassBudget:
    token_bytes: int  # estimated temporaries per prompt token of a pass
    row_bytes: int  # estimated temporaries per row (its last position's logits, sampling)
    limit: int  # bytes; 0: no bound

    def fits(self, tokens: int, rows: int) -> bool:
        """Whether a pass of `tokens` tokens (padding included) over `rows` rows
        stays under the bound (always, with no bound, for one row, or at
        MIN_PASS_TOKENS or less)."""
        if not self.limit or rows <= 1 or tokens <= MIN_PASS_TOKENS:
            return True
        return tokens * self.token_bytes + rows * self.row_bytes <= self.limit

    def max_tokens(self, rows: int) -> int | None:
        """The most tokens a pass over `rows` rows may take (None: no bound)."""
        if not self.limit or rows <= 1:
            return None
        return max(MIN_PASS_TOKENS, (self.limit - rows * self.row_bytes) // max(1, self.token_bytes))


def pass_budget(model, limit: int | None = None, vocab_size: int | None = None) -> PassBudget:
    """The budget of `model` (a CausalLM: its first layer's widest projection, the
    hidden size of its final norm, its vocabulary, activation type and weights)."""
    if not hasattr(model, "activation_dtype") or not getattr(model, "layers", None):
        return PassBudget(0, 0, 0)  # (not a CausalLM: no bound)
    if limit is None:
        limit = prefill_memory(sum(p.nbytes for _, p in model.named_parameters()))
    itemsize = int(model.activation_dtype().size)
    layer = model.layers[0]
    widths = [m.out_features for _, m in layer.named_modules() if hasattr(m, "out_features")]
    hidden = int(model.model.norm.norm_weight().shape[-1])
    widest = max(widths + [hidden])
    vocab = vocab_size or int(model.model.embed_tokens.weight.shape[0])
    return PassBudget(token_bytes=itemsize * (INTERMEDIATE_VALUES * widest + HIDDEN_VALUES * hidden),
                      row_bytes=4 * ROW_LOGIT_COPIES * vocab, limit=limit)
