"""Batched token sampling on the device, and the sampling state of a batch.

One decode step samples one token for each of B concurrent requests from
logits of shape (B, V), each row with its own parameters, without reading
anything back to the host. The pieces:

- `SamplingParams`: one request's options (validated on construction).
- `BatchParams`: the per-row parameter arrays of a batch plus host-side flags
  saying which processors any row needs. Built once when the batch composition
  changes, not per step; the flags pick which work the step graph contains, so
  rows without an option pay nothing for it unless another row uses it.
- `make_keys`: per-row PRNG keys, (B, 2) uint32, from the requests' seeds.
- `make_history`: the repetition-penalty history, a (B, V) bool presence mask.
- `make_counts`: the presence/frequency-penalty counts, (B, V) int32.
- `sample(logits, params, keys, history, counts, masks=...)`: one step. Returns the
  tokens, their log-probabilities, the top log-probabilities, the advanced
  keys and the updated history and counts, all as device arrays
  (`SampleOutput`). `masks`: a constrained batch's packed token bitmasks,
  applied inside the compiled step (amlx.constrain.apply).
- `RowSampling` / `BatchSampling`: what the engine keeps per request (on the
  host) and per running batch (on the device), built on the above.

Processing order (vLLM's, which extends Hugging Face's): logit_bias ->
repetition penalty (prompt and output tokens) -> presence and frequency
penalties (output tokens only) -> greedy argmax, or temperature -> top-k ->
top-p -> min-p and a draw from the remaining distribution.

Presence and frequency penalties follow OpenAI's definition, as vLLM does:
logits[t] -= presence * (count[t] > 0) + frequency * count[t], where count[t]
is how often t was *generated* so far in this request (prompt tokens do not
count; the repetition penalty is the one that sees the prompt).

Randomness (why not `mx.random`): MLX's generator takes a single key of shape
(2,), so it cannot give every row of a batch its own stream in one op. A
request's tokens must depend only on its own seed, not on which other
requests share the batch, so each row's random numbers are derived from that
row's key alone, with uint32 array ops that run for all rows at once:

- keys: row b holds a 64-bit key (2 uint32 words), made from its seed by
  splitmix64 on the host (any int seed, taken modulo 2**64).
- noise: u[b, j] = H(key[b], j) for the V tokens, with the keyed hash
  H(k, c) = mix(mix(c * phi + k0) ^ k1) and a strong 32-bit mixer
  (`_lowbias32`); it fuses into 2 kernels over (B, V).
- advance: after each step a row's key becomes (H(key, 2**32 - 1),
  H(key, 2**32 - 2)), counters the noise never uses; so a row's key depends
  only on its seed and on how many steps it has been sampled in.
- draw: the Gumbel-max trick, argmax_j(x[b, j] + G[b, j]) with
  G = -log(-log(1 - u)): exact sampling from softmax(x) with no sort, no
  cumulative sum and no host sync.

Keys, history and counts are per-row state the caller carries from step to
step (the outputs of one step are the inputs of the next); when the batch
composition changes, gather the surviving rows (e.g. `ops.take(keys, rows,
axis=0)`) and append new rows from `key_from_seed` / `make_history` /
`make_counts` (`BatchSampling` does this by rebuilding from its rows). A batch
of greedy rows only returns its keys unchanged (no row draws).

Log-probabilities (`logprob` and `top_logprobs`) are log_softmax of the raw
logits (before bias, penalties, temperature and filters): the model's own
view of the token, comparable across sampling settings and defined for greedy
rows too. OpenAI reports the model's distribution the same way, and so does
vLLM by default (its "raw_logprobs" mode). `top_logprobs` are the n most
likely tokens under that distribution, best first, tied values by the lower id
(as the greedy argmax takes them), so a row's list does not depend on its batch.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from amlx import _mlx as mx
from amlx._mlx import Array
from amlx._mlx.array import upload
from amlx.constrain.apply import apply_token_mask, check_mask_shape
from amlx._mlx import ops as _ops

if TYPE_CHECKING:
    from amlx.types import GenerationOptions

__all__ = ["SamplingParams", "BatchParams", "SampleOutput", "sample", "make_keys", "key_from_seed",
           "make_history", "make_counts", "apply_repetition_penalty", "keyed_hash", "advance_keys",
           "RowSampling", "BatchSampling", "StepSample", "MAX_TOP_LOGPROBS", "LOGIT_BIAS_LIMIT",
           "PENALTY_LIMIT", "MAX_TEMPERATURE", "sampling_logits", "gumbel_noise",
           "token_logprobs", "upload_masks"]

# Bounds of the options (OpenAI's where it has one). Every value inside them samples without error.
MAX_TOP_LOGPROBS = 20
LOGIT_BIAS_LIMIT = 100.0  # |bias| <= 100, as OpenAI
PENALTY_LIMIT = 2.0  # presence / frequency penalties in [-2, 2], as OpenAI
MAX_TEMPERATURE = 100.0  # beyond it every distribution is uniform to float32 anyway
REPETITION_RANGE = (0.01, 100.0)  # x / p and x * p stay finite in float32 for any logit MLX gives
MAX_INDEX = 2**31 - 1  # token ids and k are int32 on the device
# top_p below this is rounded up: float32 would flush it to 0 (keep nothing, always token 0);
# any top_p below 1 / V already keeps only the top token, so the clamp changes no result.
TOP_P_FLOOR = float(np.finfo(np.float32).tiny)


# -- per-request parameters ---------------------------------------------------

def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


def _in(v, lo: float, hi: float) -> bool:
    return _is_real(v) and lo <= v <= hi  # also rejects NaN


def _bias_pairs(bias) -> tuple[tuple[int, float], ...]:
    """logit_bias (a mapping id -> bias, or pairs) as sorted (id, bias) pairs, checked."""
    if bias is None:
        return ()
    items = bias.items() if isinstance(bias, Mapping) else bias
    try:
        pairs = [(k, v) for k, v in items]
    except (TypeError, ValueError):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}") from None
    for k, v in pairs:
        if not _is_int(k) or not 0 <= k <= MAX_INDEX:
            raise ValueError(f"logit_bias keys must be token ids (ints >= 0), got {k!r}")
        if not _in(v, -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT):
            raise ValueError(f"logit_bias values must be numbers in [-{LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}], "
                             f"got {v!r} for token {k}")
    if len({int(k) for k, _ in pairs}) != len(pairs):
        raise ValueError("logit_bias names a token id twice")
    return tuple(sorted((int(k), float(v)) for k, v in pairs))


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling options (the public `generate` options).

    - temperature: 0 means greedy (argmax); otherwise logits are divided by it
      (at most MAX_TEMPERATURE).
    - top_k: keep the k most likely tokens (0 = off; k >= vocabulary = off).
      Tokens tied with the k-th value are kept too, as in Hugging Face.
    - top_p: nucleus sampling, keep the smallest set of most likely tokens
      whose probability reaches top_p (1.0 = off); at least one token is kept.
    - min_p: keep tokens with probability >= min_p * (the top probability)
      (0.0 = off).
    - repetition_penalty: CTRL / Hugging Face penalty on tokens already in the
      prompt or the output: logit / p if the logit is >= 0 else logit * p
      (1.0 = off).
    - presence_penalty, frequency_penalty: OpenAI's, in [-2, 2], on generated
      tokens only: logit -= presence * (count > 0) + frequency * count.
    - logit_bias: token id -> bias in [-100, 100], added to the logits first
      (a mapping, stored as sorted (id, bias) pairs).
    - seed: an int makes the request's samples reproducible, also when it is
      batched with other requests (taken modulo 2**64); None draws a fresh seed.
    - logprobs: report the chosen token's log-probability.
    - top_logprobs: report the n (0..20) most likely tokens' log-probabilities
      (needs logprobs, as in OpenAI's API).

    Values are checked on construction (`ValueError` with the reason);
    `check_vocab` adds the checks that need the vocabulary size.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        self.validate()

    @classmethod
    def from_options(cls, options: "GenerationOptions") -> "SamplingParams":
        """The sampling part of a request's `GenerationOptions`."""
        return cls(temperature=options.temperature, top_p=options.top_p, top_k=options.top_k,
                   min_p=options.min_p, repetition_penalty=options.repetition_penalty, seed=options.seed,
                   logprobs=options.logprobs, presence_penalty=options.presence_penalty,
                   frequency_penalty=options.frequency_penalty, logit_bias=options.logit_bias,
                   top_logprobs=options.top_logprobs)

    def validate(self) -> "SamplingParams":
        """Raises `ValueError` naming the first bad option; returns self."""
        lo, hi = REPETITION_RANGE
        checks = [
            (_in(self.temperature, 0, MAX_TEMPERATURE),
             f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 means greedy)", self.temperature),
            (_in(self.top_p, 0, 1) and self.top_p > 0, "top_p must be a number in (0, 1] (1 disables it)",
             self.top_p),
            (_is_int(self.top_k) and 0 <= self.top_k <= MAX_INDEX,
             "top_k must be an integer >= 0 (0 disables it) within the vocabulary", self.top_k),
            (_in(self.min_p, 0, 1), "min_p must be a number in [0, 1] (0 disables it)", self.min_p),
            (_in(self.repetition_penalty, lo, hi),
             f"repetition_penalty must be a number in [{lo:g}, {hi:g}] (1 disables it)", self.repetition_penalty),
            (_in(self.presence_penalty, -PENALTY_LIMIT, PENALTY_LIMIT),
             f"presence_penalty must be a number in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}]", self.presence_penalty),
            (_in(self.frequency_penalty, -PENALTY_LIMIT, PENALTY_LIMIT),
             f"frequency_penalty must be a number in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}]",
             self.frequency_penalty),
            (self.seed is None or _is_int(self.seed), "seed must be an int or None", self.seed),
            (isinstance(self.logprobs, (bool, np.bool_)), "logprobs must be True or False", self.logprobs),
            (_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
             f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]", self.top_logprobs),
            (not self.top_logprobs or self.logprobs, "top_logprobs needs logprobs=True", self.top_logprobs),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ValueError(f"{message}, got {value!r}")
        return self

    def check_vocab(self, vocab_size: int) -> "SamplingParams":
        """The checks that need the model's vocabulary size (ValueError); returns self."""
        if self.top_k > vocab_size:
            raise ValueError(f"top_k must be at most the vocabulary size ({vocab_size}), got {self.top_k}")
        bad = [k for k, _ in self.logit_bias if k >= vocab_size]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        return self

    @property
    def is_greedy(self) -> bool:
        """True when the token is the argmax (temperature 0): no randomness."""
        return self.temperature == 0

    @property
    def counts_generated(self) -> bool:
        """True when the row needs the counts of its generated tokens (presence/frequency)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def any_history(self) -> bool:
        """True when the row's sampling reads its token history or counts (penalties)."""
        return self.repetition_penalty != 1.0 or self.counts_generated


# -- per-batch parameters ------------------------------------------------------

@dataclass(frozen=True, eq=False)
class BatchParams:
    """Per-row parameter arrays for a batch, and host flags for the step graph.

    Build it with `BatchParams.build(params)` whenever the batch composition
    changes; reuse it for every step in between. Row i of every array belongs
    to params[i]. The flags are plain Python values read on the host, so
    deciding which processors to run costs no device sync.
    """

    temperature: Array  # (B,) float32; 0 = greedy row
    top_k: Array  # (B,) int32; 0 = off
    top_p: Array  # (B,) float32; 1 = off
    min_p: Array  # (B,) float32; 0 = off
    repetition_penalty: Array  # (B,) float32; 1 = off
    presence_penalty: Array  # (B,) float32; 0 = off
    frequency_penalty: Array  # (B,) float32; 0 = off
    bias_ids: Array  # (B, W) int32: each row's logit_bias ids, padded by repeating an entry
    bias_values: Array  # (B, W) float32: the biases (padding adds 0 to token 0 or repeats an entry)
    size: int
    all_greedy: bool
    any_greedy: bool
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool
    any_counts: bool  # some row has a presence or frequency penalty
    any_logprobs: bool
    bias_width: int  # W where some row has a logit_bias, else 0
    top_n: int  # the largest top_logprobs of the batch (0 = none)
    top_k_values: tuple[int, ...]  # host copy, to size the top-k work once V is known
    _kmax: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, params: Sequence[SamplingParams]) -> "BatchParams":
        """Stacks the rows' parameters into device arrays (one upload each)."""
        params = list(params)
        if not params:
            raise ValueError("a batch needs at least one row")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise TypeError(f"expected SamplingParams, got {type(p).__name__}")
        f32 = np.float32
        sampling = [not p.is_greedy for p in params]

        # Filters only matter on rows that sample; a greedy row's filters are
        # ignored so they never switch on the sort for the whole batch.
        def on(pred):
            return any(s and pred(p) for s, p in zip(sampling, params))

        def col(values, dtype=f32):
            return mx.array(np.array(list(values), dtype))

        top_k = tuple(min(p.top_k, MAX_INDEX) if s else 0 for s, p in zip(sampling, params))
        bias_ids, bias_values = _bias_table(params)
        return cls(
            temperature=col(p.temperature for p in params),
            top_k=col(top_k, np.int32),
            top_p=col(max(p.top_p, TOP_P_FLOOR) if s else 1.0 for s, p in zip(sampling, params)),
            min_p=col(p.min_p if s else 0.0 for s, p in zip(sampling, params)),
            repetition_penalty=col(p.repetition_penalty for p in params),
            presence_penalty=col(p.presence_penalty for p in params),
            frequency_penalty=col(p.frequency_penalty for p in params),
            bias_ids=mx.array(bias_ids), bias_values=mx.array(bias_values),
            size=len(params),
            all_greedy=not any(sampling),
            any_greedy=not all(sampling),
            any_top_p=on(lambda p: p.top_p < 1.0),
            any_min_p=on(lambda p: p.min_p > 0.0),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
            any_counts=any(p.counts_generated for p in params),
            any_logprobs=any(p.logprobs for p in params),
            bias_width=bias_ids.shape[1] if any(p.logit_bias for p in params) else 0,
            top_n=max(p.top_logprobs for p in params),
            top_k_values=top_k,
        )

    def kmax(self, vocab_size: int) -> int:
        """The largest top_k in force (0 if none) for this vocabulary size."""
        k = self._kmax.get(vocab_size)
        if k is None:
            k = max((v for v in self.top_k_values if 0 < v < vocab_size), default=0)
            self._kmax[vocab_size] = k
        return k

    def arrays(self) -> tuple[Array, ...]:
        """The per-row arrays, in the order the step function takes them."""
        return (self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                self.presence_penalty, self.frequency_penalty, self.bias_ids, self.bias_values)

    def close(self) -> None:
        for a in self.arrays():
            a.close()


def _bias_table(params: Sequence[SamplingParams]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's logit_bias as (B, W) ids and values, W a power of two (few compiled widths).

    A sparse table, not a dense (B, V) one: rebuilt whenever the batch changes,
    it costs B * W, not B * V. Padding repeats a row's first entry (the same
    value written twice) or adds 0 to token 0, so the scatter is exact."""
    width = 1 << max(0, max(len(p.logit_bias) for p in params) - 1).bit_length()
    ids = np.zeros((len(params), width), np.int32)
    values = np.zeros((len(params), width), np.float32)
    for i, p in enumerate(params):
        if p.logit_bias:
            pairs = list(p.logit_bias) + [p.logit_bias[0]] * (width - len(p.logit_bias))
            ids[i] = [k for k, _ in pairs]
            values[i] = [v for _, v in pairs]
    return ids, values


# -- keys -----------------------------------------------------------------------

_M64 = (1 << 64) - 1


def key_from_seed(seed: int | None = None) -> np.ndarray:
    """A (2,) uint32 key for one request. None draws a random seed.

    The seed (any int, taken modulo 2**64) goes through splitmix64 first so
    that nearby seeds (0, 1, 2, ...) start from unrelated keys."""
    if seed is None:
        seed = secrets.randbits(64)
    z = (int(seed) + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    z ^= z >> 31
    return np.array([z >> 32, z & 0xFFFFFFFF], dtype=np.uint32)


def make_keys(seeds: Sequence[int | None]) -> Array:
    """(B, 2) uint32 keys, row i from seeds[i] (None: a random seed)."""
    return mx.array(np.stack([key_from_seed(s) for s in seeds]).reshape(-1, 2))


# -- history and counts -------------------------------------------------------------

def _check_ids(token_ids: Sequence[Sequence[int]], vocab_size: int, what: str) -> list[np.ndarray]:
    rows = []
    for i, ids in enumerate(token_ids):
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"{what} row {i} has token ids outside [0, {vocab_size})")
        rows.append(ids)
    return rows


def make_history(token_ids: Sequence[Sequence[int]], vocab_size: int) -> Array:
    """The repetition-penalty history: a (B, V) bool mask, True where row b's
    prompt or output contains the token.

    Why a mask and not (B, H) padded ids: the penalty only asks "was this token
    seen?", so a mask makes it one fused elementwise `where` per step, with a
    fixed shape (no retrace as the history grows, no gather/scatter with
    duplicate or padding ids); the per-step update is a scatter of B values,
    done by `sample` itself. It costs B*V bytes (32 rows x 152k = 4.9 MB)."""
    mask = np.zeros((len(token_ids), int(vocab_size)), dtype=np.bool_)
    for i, ids in enumerate(_check_ids(token_ids, vocab_size, "history")):
        mask[i, ids] = True
    return mx.array(mask)


def make_counts(generated: Sequence[Sequence[int]], vocab_size: int) -> Array:
    """The presence/frequency-penalty state: (B, V) int32, how often row b has
    generated each token (a fixed shape, like the history; `sample` adds each
    step's tokens)."""
    counts = np.zeros((len(generated), int(vocab_size)), dtype=np.int32)
    for i, ids in enumerate(_check_ids(generated, vocab_size, "counts")):
        counts[i] = np.bincount(ids, minlength=int(vocab_size))
    return mx.array(counts)


# -- the math (traced by mx.transforms.compile) ---------------------------------

def _lowbias32(x: Array) -> Array:
    """A 32-bit integer mixer (Wellons' "lowbias32", from hash-prospector): a
    bijection with strong avalanche, 2 multiplies and 3 xor-shifts."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


# Counters the noise never uses (V < 2**32 - 2): they give the next step's key.
_ADVANCE_COUNTERS = (0xFFFFFFFF, 0xFFFFFFFE)


def keyed_hash(keys: Array, counters: Array) -> Array:
    """(B, N) uint32 words h[b, n] = mix(mix(counters[n] * phi + k0[b]) ^ k1[b]).

    keys: (B, 2) uint32, counters: (1, N) uint32. Every output word depends on
    its own row's key alone. For a fixed key, counter -> word is a bijection
    (distinct words within a row); the key enters before and after the first
    mix, so two keys give unrelated rows (not shifted copies) unless all 64
    key bits line up.

    Why not Threefry (as MLX and JAX use): MLX fuses at most 11 dependent
    elementwise ops per kernel, so Threefry's 20 rounds over (B, V) would run
    as ~10 kernels, each writing (B, V) words; this is 2."""
    x = _lowbias32(counters * 0x9E3779B9 + keys[:, 0:1])
    return _lowbias32(x ^ keys[:, 1:2])


def _gumbel(keys: Array, vocab: int) -> Array:
    """(B, V) float32 standard Gumbel noise, row b from keys[b] alone."""
    h = keyed_hash(keys, _ops.arange(0, vocab, dtype=mx.uint32)[None, :])
    # w = (h + 0.5) / 2**32 in (0, 1); the exponential variate is E = -log(1 - w)
    # and the Gumbel variate G = -log(E). G is largest for the smallest E, so
    # that end needs precision: near w = 0 float32 keeps ~24 bits of relative
    # precision, and there E comes from its series (log1p is exact too but
    # several times slower than log on MLX's CPU backend). The clamp avoids w
    # rounding to 1 (E = inf) for h >= 2**32 - 128.
    w = h.astype(mx.float32) * (2.0 ** -32) + (2.0 ** -33)
    w = _ops.minimum(w, 1.0 - 2.0 ** -24)
    return -_ops.log(_exponential(w))


def _exponential(w: Array) -> Array:
    """-log(1 - w) for w in (0, 1), accurate to ~1e-6 relative everywhere:
    w + w^2/2 + ... + w^5/5 below 1/16 (truncation < w^5/6 < 2e-7 relative),
    -log(1 - w) above (where 1 - w is exact to 2**-25, so < 5e-7 relative)."""
    series = w * (1.0 + w * (1.0 / 2 + w * (1.0 / 3 + w * (1.0 / 4 + w * (1.0 / 5)))))
    return _ops.where(w < 0.0625, series, -_ops.log(1.0 - w))


def advance_keys(keys: Array) -> Array:
    """The next step's (B, 2) keys: the same keyed hash at two reserved counters."""
    return keyed_hash(keys, mx.array(np.array([_ADVANCE_COUNTERS], dtype=np.uint32)))


def apply_repetition_penalty(x: Array, history: Array, penalty: Array) -> Array:
    """Hugging Face's RepetitionPenaltyLogitsProcessor for every row at once:
    for tokens with history[b, j], x / p if x >= 0 else x * p (p = penalty[b]).
    Rows with p = 1 are unchanged exactly (x / 1 == x * 1 == x)."""
    p = penalty[:, None]
    return _ops.where(history, _ops.where(x < 0, x * p, x / p), x)


def apply_presence_frequency(x: Array, counts: Array, presence: Array, frequency: Array) -> Array:
    """OpenAI's penalties for every row at once: x - presence * (count > 0) - frequency * count.
    Rows with both penalties 0 are unchanged exactly (x - 0 - 0 == x)."""
    c = counts.astype(mx.float32)
    return x - presence[:, None] * (c > 0).astype(mx.float32) - frequency[:, None] * c


def apply_logit_bias(x: Array, ids: Array, values: Array) -> Array:
    """Adds each row's biases at its ids ((B, W) tables from `BatchParams`)."""
    return _ops.put_along_axis(x, ids, _ops.take_along_axis(x, ids, -1) + values, -1)


def _neg_inf(x: Array) -> Array:
    return mx.array(-math.inf, x.dtype)


def _filter_mask_threshold(x: Array, top_k: Array, top_p: Array, kmode: str, kmax: int) -> Array:
    """Per-row threshold tau (B, 1): the top-k and top-p sets are {j: x[j] >= tau}.

    One threshold per row lets every row use its own k and p after a single
    batched sort, with no scatter back from sorted order. Ties with the
    boundary value are kept (so a set can exceed k, as in HF's top-k)."""
    vocab = x.shape[-1]
    ninf = _neg_inf(x)
    k_on = _ops.logical_and(top_k > 0, top_k < vocab)
    if kmode == "sort":
        s = _ops.sort(x, axis=-1)  # ascending: the k-th largest sits at V - k
        size = vocab
    else:  # "topk": only the kmax largest values, then a small sort
        s = _ops.sort(_ops.topk(x, kmax, axis=-1), axis=-1)
        size = kmax
    if kmode != "none":
        idx = _ops.clip(size - top_k, 0, size - 1)[:, None]
        tau = _ops.where(k_on[:, None], _ops.take_along_axis(s, idx, -1), ninf)
    else:
        tau = None
    if kmode == "sort" and top_p is not None:
        # Nucleus on the top-k-filtered distribution (HF applies top-p after top-k).
        kept = s if tau is None else _ops.where(s >= tau, s, ninf)
        p = _ops.softmax(kept, axis=-1)
        # Mass of the strictly higher-ranked tokens; a token is in the nucleus
        # while that is still < top_p (the top token always is: mass 0 < top_p).
        above = _ops.cumsum(p, axis=-1, reverse=True, inclusive=False)
        keep = above < top_p[:, None]
        tau_p = _ops.min(_ops.where(keep, s, mx.array(math.inf, x.dtype)), axis=-1, keepdims=True)
        # top_p = 1 must keep everything; rounding in the cumsum could otherwise drop the tail.
        tau_p = _ops.where((top_p >= 1.0)[:, None], ninf, tau_p)
        tau = tau_p if tau is None else _ops.maximum(tau, tau_p)
    return tau


class _Config(NamedTuple):
    """What a compiled step contains: host flags only (a new value, a new trace)."""

    sampling: bool  # some row draws
    greedy_on: bool  # some row takes the argmax
    kmode: str  # "none" | "topk" | "sort"
    kmax: int
    top_p_on: bool
    min_p_on: bool
    penalty_on: bool  # repetition penalty
    has_history: bool
    counts_on: bool  # presence / frequency penalties
    has_counts: bool
    bias_on: bool
    logprobs_on: bool
    top_n: int
    masked: bool = False  # a constrained batch: the step takes the rows' packed token masks


def _adjust(raw: Array, c: _Config, rows: tuple, history: Array | None, counts: Array | None) -> Array:
    """Bias, then the penalties: the logits every row (greedy or not) chooses from."""
    penalty, presence, frequency, bias_ids, bias_values = rows[4:]
    x = raw
    if c.bias_on:
        x = apply_logit_bias(x, bias_ids, bias_values)
    if c.penalty_on:
        x = apply_repetition_penalty(x, history, penalty)
    if c.counts_on:
        x = apply_presence_frequency(x, counts, presence, frequency)
    return x


def _temper_filter(x: Array, c: _Config, rows: tuple) -> Array:
    """Temperature and the filters: softmax of the result is a sampling row's distribution.
    Greedy rows are divided by 1 and their filters are off, so they come out unchanged."""
    temperature, top_k, top_p, min_p = rows[:4]
    greedy_row = temperature <= 0.0
    # Greedy rows divide by 1 (their draw is discarded). Temperatures
    # below 1e-6 act as 1e-6, so x / t stays finite (and near-greedy).
    t = _ops.where(greedy_row, mx.array(1.0, mx.float32), _ops.maximum(temperature, 1e-6))
    x = x / t[:, None]
    if c.kmode != "none":
        tau = _filter_mask_threshold(x, top_k, top_p if c.top_p_on else None, c.kmode, c.kmax)
        x = _ops.where(x >= tau, x, _neg_inf(x))
    if c.min_p_on:
        # p_j >= min_p * p_max  <=>  x_j - x_max >= log(min_p); log(0) = -inf keeps all.
        x_max = _ops.max(x, axis=-1, keepdims=True)
        x = _ops.where(x - x_max >= _ops.log(min_p)[:, None], x, _neg_inf(x))
    return x


def _draw(x: Array, keys: Array, c: _Config, rows: tuple, greedy_tok: Array | None) -> Array:
    """Temperature, the filters and a Gumbel-max draw per row; greedy rows keep their argmax."""
    x = _temper_filter(x, c, rows)
    drawn = _ops.argmax(x + _gumbel(keys, x.shape[1]), axis=-1)
    return drawn if greedy_tok is None else _ops.where(rows[0] <= 0.0, greedy_tok, drawn)


def _logprobs(raw: Array, tok: Array, c: _Config) -> tuple[Array, Array | None, Array | None]:
    if not c.logprobs_on:
        return _ops.zeros((raw.shape[0],), mx.float32), None, None
    return token_logprobs(raw, tok, c.top_n)


def token_logprobs(raw: Array, tok: Array, top_n: int = 0) -> tuple[Array, Array | None, Array | None]:
    """The chosen tokens' log-probabilities (B,) and the top_n (ids, log-probabilities),
    best first (None, None when top_n is 0), all under the model's distribution
    (log_softmax of the raw logits (B, V) float32, `tok` (B,) int32): what the model
    "thinks" of a token, comparable across sampling settings."""
    b, vocab = raw.shape
    lse = _ops.logsumexp(raw, axis=-1)
    lp = _ops.take_along_axis(raw, tok[:, None], -1)[:, 0] - lse
    if not top_n:
        return lp, None, None
    n = min(top_n, vocab)
    # The n best in the order (value descending, id ascending): tied values go to the lower id,
    # as the argmax does. argpartition alone picks among tied values arbitrarily, differently
    # for each n, so with ties (common in bf16 logits) a row's list changed with the widest
    # top_logprobs of its batch, and a greedy token could be missing from its list's head.
    # All O(V): argpartition for the n-th value, a cumsum to rank the ties at it by id, then
    # argpartition again on a key that is positive (and larger for lower ids) on the n chosen.
    part = _ops.take_along_axis(raw, _ops.argpartition(raw, vocab - n, axis=-1)[:, vocab - n:], -1)
    cut = _ops.min(part, axis=-1, keepdims=True)  # the n-th largest value
    tied = (raw == cut).astype(mx.int32)
    need = n - _ops.sum((raw > cut).astype(mx.int32), axis=-1, keepdims=True)
    chosen = _ops.logical_or(raw > cut, _ops.logical_and(tied > 0, _ops.cumsum(tied, axis=-1) <= need))
    key = _ops.where(chosen, vocab - _ops.arange(0, vocab, dtype=mx.int32)[None, :], mx.array(0, mx.int32))
    ids = _ops.argpartition(key, vocab - n, axis=-1)[:, vocab - n:]
    vals = _ops.take_along_axis(raw, ids, -1)
    # rank within the n (at most 20): how many of the others come first; a permutation of 0..n-1
    v_i, v_j = vals[:, :, None], vals[:, None, :]
    first = _ops.logical_or(v_j > v_i, _ops.logical_and(v_j == v_i, ids[:, None, :] < ids[:, :, None]))
    order = _ops.argsort(_ops.sum(first.astype(mx.int32), axis=-1), axis=-1)
    ids = _ops.take_along_axis(ids, order, -1).astype(mx.int32)
    return lp, ids, _ops.take_along_axis(vals, order, -1) - lse[:, None]


def _count(counts: Array, tok: Array) -> Array:
    col = tok[:, None]
    return _ops.put_along_axis(counts, col, _ops.take_along_axis(counts, col, -1) + 1, -1)


def _make_step(c: _Config):
    """The step function for one combination of host flags (all static)."""

    def step(logits, keys, rows, history, counts, masks):
        if c.masked:  # forbidden tokens at -inf first: everything below sees the constrained logits
            raw = apply_token_mask(logits, masks, mx.float32)
        else:
            raw = logits.astype(mx.float32)
        x = _adjust(raw, c, rows, history, counts)
        greedy_tok = _ops.argmax(x, axis=-1) if c.greedy_on else None
        if c.sampling:
            tok = _draw(x, keys, c, rows, greedy_tok)
            next_keys = advance_keys(keys)
        else:
            tok = greedy_tok
            next_keys = keys  # no row draws: keys only matter to sampling rows
        tok = tok.astype(mx.int32)
        lp, top_ids, top_lps = _logprobs(raw, tok, c)
        if c.has_history:
            history = _ops.put_along_axis(history, tok[:, None], mx.array(True), -1)
        if c.has_counts:
            counts = _count(counts, tok)
        return tok, lp, next_keys, history, counts, top_ids, top_lps

    return step


class CompiledSteps:
    """Compiled sampling steps, one per configuration, owned by one engine.

    MLX traces a compiled function once per shape and per stream, and each
    trace keeps a few bytes of constants until the function is closed. An
    engine samples on streams of its own, so it keeps its steps here and
    `close`s them when it shuts down: its traces go with it. (Without an
    owner, `sample` uses one process-wide table.)"""

    def __init__(self):
        self._fns: dict = {}

    def get(self, config):
        fn = self._fns.get(config)
        if fn is None:
            fn = self._fns[config] = mx.transforms.compile(_make_step(config))
        return fn

    def close(self) -> None:
        for fn in self._fns.values():
            fn.close()
        self._fns.clear()


_SHARED_STEPS = CompiledSteps()  # the steps of callers that own none


class SampleOutput(NamedTuple):
    """The results of one step, all device arrays (nothing is evaluated)."""

    tokens: Array  # (B,) int32
    logprobs: Array  # (B,) float32; zeros unless some row asked for logprobs
    keys: Array  # (B, 2) uint32: the keys for the next step
    history: Array | None  # the history with this step's tokens added (None if none given)
    counts: Array | None  # the counts with this step's tokens added (None if none given)
    top_ids: Array | None  # (B, n) int32, best first, n = min(params.top_n, V); None if top_n is 0
    top_logprobs: Array | None  # (B, n) float32, the log-probabilities of top_ids


def _check_shapes(logits: Array, params: BatchParams, keys: Array, history: Array | None,
                  counts: Array | None, masks: Array | None = None) -> None:
    shape = logits.shape
    if len(shape) != 2:
        raise ValueError(f"logits must have shape (batch, vocab), got {shape}")
    if masks is not None:
        check_mask_shape(masks.shape, shape)
    b, vocab = shape
    if b != params.size:
        raise ValueError(f"logits have {b} rows but the BatchParams has {params.size}")
    if keys.shape != (b, 2):
        raise ValueError(f"keys must have shape ({b}, 2), got {keys.shape}")
    if params.any_penalty and history is None:
        raise ValueError("a row has a repetition penalty: pass its history (see make_history)")
    if params.any_counts and counts is None:
        raise ValueError("a row has a presence or frequency penalty: pass its counts (see make_counts)")
    for name, a in (("history", history), ("counts", counts)):
        if a is not None and a.shape != (b, vocab):
            raise ValueError(f"{name} must have shape ({b}, {vocab}), got {a.shape}")


def _config(params: BatchParams, vocab: int, has_history: bool, has_counts: bool, masked: bool = False) -> _Config:
    sampling = not params.all_greedy
    kmax = params.kmax(vocab) if sampling else 0
    top_p_on = sampling and params.any_top_p
    if top_p_on or (kmax and 2 * kmax > vocab):
        kmode = "sort"
    elif kmax:
        kmode = "topk"
    else:
        kmode = "none"
    return _Config(sampling, params.any_greedy, kmode, kmax if kmode == "topk" else 0, top_p_on,
                   sampling and params.any_min_p, params.any_penalty, has_history, params.any_counts, has_counts,
                   params.bias_width > 0, params.any_logprobs or params.top_n > 0, params.top_n, masked)


def sample(logits: Array, params: BatchParams, keys: Array, history: Array | None = None,
           counts: Array | None = None, *, compile: bool = True,
           steps: CompiledSteps | None = None, masks: Array | None = None) -> SampleOutput:
    """Samples one token per row of `logits` (B, V), float32 or bfloat16.

    `params` holds row i's options; `keys` (B, 2) uint32 row i's PRNG key (see
    `make_keys`); `history` an optional (B, V) bool mask of tokens seen so far
    (see `make_history`), needed when a row has a repetition penalty; `counts`
    an optional (B, V) int32 count of generated tokens (see `make_counts`),
    needed when a row has a presence or frequency penalty. Returns the
    tokens, their log-probabilities under the raw logits, the top
    log-probabilities when a row asks for them, the keys to pass next step and
    the updated history and counts. Greedy rows (temperature 0) take the
    argmax of the biased and penalised logits.

    Nothing is read back: the work is a handful of batched ops. Which
    processors run is decided on the host from `params` (no sort at all unless
    a row uses top-k or top-p; a top_k-only batch sorts just the max(top_k)
    largest values; no bias, penalty or top-logprob work unless a row asks).
    With `compile` (the default) the step is compiled once per combination of
    the batch's flags (and per shape) and replayed as a few fused kernels;
    compiled and eager steps give the same tokens. (On MLX's CPU backend the
    first use of a new graph runs the system C++ compiler for its fused
    kernels, seconds, then cached on disk by MLX; the compiled step is ~1.5x
    faster there than the eager one.) `steps`: the compiled steps' owner
    (an engine's), else a process-wide table.

    `masks`: a constrained batch's (B, words) int32 token bitmasks on the device (llguidance's
    packing, amlx.constrain; an unconstrained row all ones). Forbidden tokens go to -inf
    inside the compiled step, before anything else, so the penalties, temperature and the
    filters act on the allowed tokens and the logprobs are those of the constrained
    distribution. A masked step is a trace of its own: batches without masks do no mask work."""
    _check_shapes(logits, params, keys, history, counts, masks)
    config = _config(params, logits.shape[1], history is not None, counts is not None, masks is not None)
    args = (logits, keys, params.arrays(), history, counts, masks)
    if not compile:
        return SampleOutput(*_make_step(config)(*args))
    return SampleOutput(*(steps or _SHARED_STEPS).get(config)(*args))


def sampling_logits(logits: Array, params: BatchParams, history: Array | None = None,
                    counts: Array | None = None) -> Array:
    """The logits (B, V) float32 each row of `sample` chooses from, eagerly: logit_bias,
    the penalties, then (on sampling rows) temperature, top-k, top-p and min-p, filtered
    tokens at -inf. A sampling row draws from softmax of its row; a greedy row (left
    untempered and unfiltered) takes its argmax. For callers that need the distribution
    itself, not just one draw (speculative decoding's acceptance test)."""
    config = _config(params, logits.shape[1], history is not None, counts is not None)
    rows = params.arrays()
    x = _adjust(logits.astype(mx.float32), config, rows, history, counts)
    return _temper_filter(x, config, rows) if config.sampling else x


def gumbel_noise(keys: Array, vocab: int) -> Array:
    """(B, V) float32 standard Gumbel noise, row b from keys[b] alone: the noise `sample`
    adds to a row's `sampling_logits` before its argmax (so argmax(x + noise) with the
    same keys draws the token `sample` draws)."""
    return _gumbel(keys, vocab)


# -- the engine's per-request and per-batch sampling state ---------------------------

class RowSampling:
    """One request's sampling state on the host: its options, its PRNG key and its
    token history (prompt, then generated ids), from which a batch's device state
    is rebuilt whenever the batch changes."""

    def __init__(self, options: "GenerationOptions", prompt: list[int]):
        self.params = SamplingParams.from_options(options)
        self.key = key_from_seed(options.seed)
        self.history = list(prompt)  # prompt and generated ids (repetition penalty)
        self.prompt_len = len(self.history)

    def observe(self, token_id: int) -> None:
        self.history.append(token_id)

    @property
    def generated(self) -> list[int]:
        """The ids generated so far (presence and frequency penalties count these)."""
        return self.history[self.prompt_len:]


def upload_masks(masks: np.ndarray, by_driver: bool = False) -> Array:
    """A step's packed token bitmasks (rows, words) as the int32 device array `sample` takes
    (one copy; any thread may make it: an array made from host data needs no stream).

    `by_driver`: the CUDA driver copies them (`_mlx.array.upload`) rather than MLX, which
    writes managed memory the GPU last held a page fault at a time (2 MB: 0.22 against 0.89 ms
    on an H100). From pageable memory the driver's copy held up the worker's launches running
    meanwhile, so the engine fills the masks in page-locked memory for it (`_mlx.pinned`,
    AMLX_MASK_COPY; benchmarks/README.md)."""
    masks = np.ascontiguousarray(masks, dtype=np.int32)
    return upload(masks) if by_driver else mx.array(masks)


class StepSample(NamedTuple):
    """One step's results for the rows of a `BatchSampling` (device arrays)."""

    tokens: Array  # (B,) int32
    logprobs: Array  # (B,) float32
    top_ids: Array | None  # (B, n) int32 best first, when some row asked for top_logprobs
    top_logprobs: Array | None  # (B, n) float32

    def arrays(self) -> list[Array]:
        """The arrays to evaluate."""
        return [a for a in self if a is not None]

    def read(self) -> tuple[list[int], list[float], list[list[tuple[int, float]]] | None]:
        """Reads the step back (waits for the device): ids, logprobs, and each row's
        (id, logprob) pairs best first (None when no row asked for top_logprobs).
        A row keeps its own `top_logprobs` first pairs of its list."""
        ids, lps = self.tokens.tolist(), self.logprobs.tolist()
        if self.top_ids is None:
            return ids, lps, None
        return ids, lps, [list(zip(i, p)) for i, p in zip(self.top_ids.tolist(), self.top_logprobs.tolist())]


class BatchSampling:
    """The device-side sampling state of an ordered list of rows.

    Each request owns a `RowSampling`; a `BatchSampling` stacks the rows' state
    into device arrays when the batch is formed and evolves it step by step on
    the device (keys advance, sampled tokens join the history and the counts)
    with no host sync; `sync_back` returns the keys to the rows before the batch
    changes, so a request's random stream depends only on its seed and how many
    tokens it has drawn, whatever it was batched with."""

    def __init__(self, rows: list[RowSampling], steps: CompiledSteps | None = None):
        self.rows = rows
        self._steps = steps  # the engine's compiled steps (see CompiledSteps)
        self.params = BatchParams.build([r.params for r in rows])
        self.keys = mx.array(np.stack([r.key for r in rows]))
        # made on the first step, when the vocabulary size is known
        self.history: Array | None = None
        self.counts: Array | None = None

    def __call__(self, logits: Array, selected: list[int] | None = None,
                 masks: np.ndarray | Array | None = None) -> StepSample:
        """Samples one token per row of logits (B, V). Rows not in `selected`
        (paused rows) keep their state; their tokens are to be ignored.

        `masks`: the rows' token bitmasks when some row is constrained (amlx.constrain);
        forbidden tokens go to -inf before anything else, so penalties, temperature and
        the filters act on the allowed tokens, and logprobs / top_logprobs are those of
        the constrained distribution. The masks go to the device packed, in one upload
        (`upload_masks`; given as an Array, they are there already), and are applied inside
        the compiled step. None (no constrained row) adds no work at all."""
        device_masks = None
        if masks is not None:
            check_mask_shape(masks.shape, logits.shape)
            device_masks = upload_masks(masks) if isinstance(masks, np.ndarray) else masks
        self.penalty_state(logits.shape[1])
        out = sample(logits, self.params, self.keys, self.history, self.counts, steps=self._steps,
                     masks=device_masks)
        new = [out.keys, out.history, out.counts]
        if selected is not None and len(selected) < len(self.rows):
            mask = np.zeros((len(self.rows), 1), dtype=np.bool_)
            mask[selected] = True
            m = mx.array(mask)
            old = [self.keys, self.history, self.counts]
            new = [None if a is None else _ops.where(m, a, b) for a, b in zip(new, old)]
        self.keys, self.history, self.counts = new
        return StepSample(out.tokens, out.logprobs, out.top_ids, out.top_logprobs)

    def penalty_state(self, vocab: int) -> tuple[Array | None, Array | None]:
        """The rows' history and counts (made on first use, where a row's penalties need them)."""
        if self.params.any_penalty and self.history is None:
            self.history = make_history([r.history for r in self.rows], vocab)
        if self.params.any_counts and self.counts is None:
            self.counts = make_counts([r.generated for r in self.rows], vocab)
        return self.history, self.counts

    def adopt(self, keys: Array, history: Array | None, counts: Array | None) -> None:
        """Takes the state a step computed elsewhere (a speculative verify step,
        amlx.speculative.verify) as the rows' state, every row having taken part."""
        self.keys, self.history, self.counts = keys, history, counts

    def _for_rows(self, rows: list[RowSampling]) -> "BatchSampling":
        """A state for `rows` with this one's steps and their parameters stacked; its
        device arrays (keys, history, counts) are the caller's to set."""
        state = object.__new__(BatchSampling)
        state.rows = rows
        state._steps = self._steps
        state.params = BatchParams.build([r.params for r in rows])
        return state

    def take(self, keep: list[int]) -> "BatchSampling":
        """The sampling state of rows `keep` (in that order), taken on the device: no
        sync, so it may follow a step still in flight (rows left the batch between two
        chained steps). The parameters are stacked again from the kept rows' own."""
        taken = self._for_rows([self.rows[i] for i in keep])
        index = mx.array(np.asarray(keep, dtype=np.int32))
        taken.keys, taken.history, taken.counts = [
            None if a is None else _ops.take(a, index, axis=0) for a in (self.keys, self.history, self.counts)]
        return taken

    def extend(self, rows: list[RowSampling]) -> "BatchSampling":
        """This state with `rows` appended (their own host state), joined on the device:
        no sync, so it may follow a step still in flight (rows joined between two chained
        steps). The appended rows must not need a history or counts this state lacks
        (`SamplingParams.any_history`): the other rows' host histories may lack the tokens
        still in flight, so they cannot be rebuilt from the host."""
        new_params = [r.params for r in rows]
        if (any(p.repetition_penalty != 1.0 for p in new_params) and self.history is None) or (
                any(p.counts_generated for p in new_params) and self.counts is None):
            raise ValueError("rows needing a token history join a batch state that has none")
        joined = self._for_rows(self.rows + list(rows))
        joined.keys = _ops.concatenate([self.keys, mx.array(np.stack([r.key for r in rows]))], axis=0)
        joined.history = None if self.history is None else _ops.concatenate(
            [self.history, make_history([r.history for r in rows], self.history.shape[1])], axis=0)
        joined.counts = None if self.counts is None else _ops.concatenate(
            [self.counts, make_counts([r.generated for r in rows], self.counts.shape[1])], axis=0)
        return joined

    def state(self) -> list[Array]:
        return [a for a in (self.keys, self.history, self.counts) if a is not None]

    def snapshot(self) -> tuple:
        """The state as it is now, for `rewind` (before a step that may fail to launch)."""
        return self.keys, self.history, self.counts

    def rewind(self, snapshot: tuple) -> None:
        """Back to a `snapshot`: a step that never ran must not advance the rows' keys."""
        self.keys, self.history, self.counts = snapshot

    def sync_back(self) -> None:
        """Stores each row's current key on its request (reads the device)."""
        for row, key in zip(self.rows, self.keys.numpy()):
            row.key = key

    def close(self) -> None:
        for a in self.state():
            a.close()
        self.params.close()
        self.history = self.counts = None
