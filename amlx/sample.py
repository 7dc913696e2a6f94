"""Batched token sampling on the device.

One decode step samples one token for each of B concurrent requests from
logits of shape (B, V), each row with its own parameters, without reading
anything back to the host. The pieces:

- `SamplingParams`: one request's options (validated on construction).
- `BatchParams`: the per-row parameter arrays of a batch plus host-side flags
  saying which filters any row needs. Built once when the batch composition
  changes, not per step; the flags pick which work the step graph contains.
- `make_keys`: per-row PRNG keys, (B, 2) uint32, from the requests' seeds.
- `make_history`: the repetition-penalty history, a (B, V) bool presence mask.
- `sample(logits, params, keys, history)`: one step. Returns the tokens, their
  log-probabilities, the advanced keys and the updated history, all as device
  arrays (`SampleOutput`).

Processing order is Hugging Face's: repetition penalty -> temperature ->
top-k -> top-p -> min-p, then a draw from the remaining distribution.

Randomness (why not `mx.random`): MLX's generator takes a single key of shape
(2,), so it cannot give every row of a batch its own stream in one op. A
request's tokens must depend only on its own seed, not on which other
requests share the batch, so each row's random numbers are derived from that
row's key alone, with uint32 array ops that run for all rows at once:

- keys: row b holds a 64-bit key (2 uint32 words), made from its seed by
  splitmix64 on the host.
- noise: u[b, j] = H(key[b], j) for the V tokens, with the keyed hash
  H(k, c) = mix(mix(c * phi + k0) ^ k1) and a strong 32-bit mixer
  (`_lowbias32`); it fuses into 2 kernels over (B, V).
- advance: after each step a row's key becomes (H(key, 2**32 - 1),
  H(key, 2**32 - 2)), counters the noise never uses; so a row's key depends
  only on its seed and on how many steps it has been sampled in.
- draw: the Gumbel-max trick, argmax_j(x[b, j] + G[b, j]) with
  G = -log(-log(1 - u)): exact sampling from softmax(x) with no sort, no
  cumulative sum and no host sync.

Keys and history are per-row state the caller carries from step to step (the
outputs of one step are the inputs of the next); when the batch composition
changes, gather the surviving rows (e.g. `ops.take(keys, rows, axis=0)`) and
append new rows from `key_from_seed` / `make_history`. A batch of greedy rows
only returns its keys unchanged (no row draws).

Log-probabilities are log_softmax of the raw logits (before penalty,
temperature and filters) at the chosen token: the model's own view of the
token, comparable across sampling settings and defined for greedy rows too.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import numpy as np

from amlx import _mlx as mx
from amlx._mlx import Array
from amlx._mlx import ops as _ops

__all__ = ["SamplingParams", "BatchParams", "SampleOutput", "sample", "make_keys", "key_from_seed",
           "make_history", "apply_repetition_penalty", "keyed_hash", "advance_keys"]


# -- per-request parameters ---------------------------------------------------

def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling options (the public `generate` options).

    - temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    - top_k: keep the k most likely tokens (0 = off; k >= vocabulary = off).
      Tokens tied with the k-th value are kept too, as in Hugging Face.
    - top_p: nucleus sampling, keep the smallest set of most likely tokens
      whose probability reaches top_p (1.0 = off); at least one token is kept.
    - min_p: keep tokens with probability >= min_p * (the top probability)
      (0.0 = off).
    - repetition_penalty: CTRL / Hugging Face penalty on tokens already in the
      prompt or the output: logit / p if the logit is >= 0 else logit * p
      (1.0 = off).
    - seed: an int makes the request's samples reproducible, also when it is
      batched with other requests; None draws a fresh seed.
    - logprobs: report the chosen token's log-probability.

    Values are checked on construction (`ValueError` with the reason).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    logprobs: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "SamplingParams":
        """Raises `ValueError` naming the first bad option; returns self."""
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        p = self.top_p
        if not _is_real(p) or not 0 < p <= 1:  # also rejects NaN
            raise ValueError(f"top_p must be a number in (0, 1] (1 disables it), got {p!r}")
        k = self.top_k
        if not _is_int(k) or k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {k!r}")
        m = self.min_p
        if not _is_real(m) or not 0 <= m <= 1:
            raise ValueError(f"min_p must be a number in [0, 1] (0 disables it), got {m!r}")
        r = self.repetition_penalty
        if not _is_real(r) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 disables it), got {r!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if not isinstance(self.logprobs, (bool, np.bool_)):
            raise ValueError(f"logprobs must be True or False, got {self.logprobs!r}")
        return self

    @property
    def is_greedy(self) -> bool:
        """True when the token is the argmax (temperature 0): no randomness."""
        return self.temperature == 0


# -- per-batch parameters ------------------------------------------------------

@dataclass(frozen=True, eq=False)
class BatchParams:
    """Per-row parameter arrays for a batch, and host flags for the step graph.

    Build it with `BatchParams.build(params)` whenever the batch composition
    changes; reuse it for every step in between. Row i of every array belongs
    to params[i]. The flags are plain Python values read on the host, so
    deciding which filters to run costs no device sync.
    """

    temperature: Array  # (B,) float32; 0 = greedy row
    top_k: Array  # (B,) int32; 0 = off
    top_p: Array  # (B,) float32; 1 = off
    min_p: Array  # (B,) float32; 0 = off
    repetition_penalty: Array  # (B,) float32; 1 = off
    size: int
    all_greedy: bool
    any_greedy: bool
    any_top_p: bool
    any_min_p: bool
    any_penalty: bool
    any_logprobs: bool
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

        return cls(
            temperature=mx.array(np.array([p.temperature for p in params], f32)),
            top_k=mx.array(np.array([p.top_k if s else 0 for s, p in zip(sampling, params)], np.int32)),
            top_p=mx.array(np.array([p.top_p if s else 1.0 for s, p in zip(sampling, params)], f32)),
            min_p=mx.array(np.array([p.min_p if s else 0.0 for s, p in zip(sampling, params)], f32)),
            repetition_penalty=mx.array(np.array([p.repetition_penalty for p in params], f32)),
            size=len(params),
            all_greedy=not any(sampling),
            any_greedy=not all(sampling),
            any_top_p=on(lambda p: p.top_p < 1.0),
            any_min_p=on(lambda p: p.min_p > 0.0),
            any_penalty=any(p.repetition_penalty != 1.0 for p in params),
            any_logprobs=any(p.logprobs for p in params),
            top_k_values=tuple(p.top_k if s else 0 for s, p in zip(sampling, params)),
        )

    def kmax(self, vocab_size: int) -> int:
        """The largest top_k in force (0 if none) for this vocabulary size."""
        k = self._kmax.get(vocab_size)
        if k is None:
            k = max((v for v in self.top_k_values if 0 < v < vocab_size), default=0)
            self._kmax[vocab_size] = k
        return k


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


# -- history --------------------------------------------------------------------

def make_history(token_ids: Sequence[Sequence[int]], vocab_size: int) -> Array:
    """The repetition-penalty history: a (B, V) bool mask, True where row b's
    prompt or output contains the token.

    Why a mask and not (B, H) padded ids: the penalty only asks "was this token
    seen?", so a mask makes it one fused elementwise `where` per step, with a
    fixed shape (no retrace as the history grows, no gather/scatter with
    duplicate or padding ids); the per-step update is a scatter of B values,
    done by `sample` itself. It costs B*V bytes (32 rows x 152k = 4.9 MB)."""
    mask = np.zeros((len(token_ids), int(vocab_size)), dtype=np.bool_)
    for i, ids in enumerate(token_ids):
        ids = np.asarray(list(ids), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"history row {i} has token ids outside [0, {vocab_size})")
        mask[i, ids] = True
    return mx.array(mask)


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


def _make_step(sampling: bool, greedy_on: bool, kmode: str, kmax: int, top_p_on: bool, min_p_on: bool,
               penalty_on: bool, has_history: bool, logprobs_on: bool):
    """The step function for one combination of host flags (all static)."""

    def step(logits, keys, temperature, top_k, top_p, min_p, penalty, history):
        raw = logits.astype(mx.float32)
        b, vocab = raw.shape
        x = raw
        if penalty_on:
            x = apply_repetition_penalty(x, history, penalty)
        greedy_tok = _ops.argmax(x, axis=-1) if greedy_on else None
        if sampling:
            greedy_row = temperature <= 0.0
            # Greedy rows divide by 1 (their draw is discarded). Temperatures
            # below 1e-6 act as 1e-6, so x / t stays finite (and near-greedy).
            t = _ops.where(greedy_row, mx.array(1.0, mx.float32), _ops.maximum(temperature, 1e-6))
            x = x / t[:, None]
            if kmode != "none":
                tau = _filter_mask_threshold(x, top_k, top_p if top_p_on else None, kmode, kmax)
                x = _ops.where(x >= tau, x, _neg_inf(x))
            if min_p_on:
                # p_j >= min_p * p_max  <=>  x_j - x_max >= log(min_p); log(0) = -inf keeps all.
                x_max = _ops.max(x, axis=-1, keepdims=True)
                x = _ops.where(x - x_max >= _ops.log(min_p)[:, None], x, _neg_inf(x))
            drawn = _ops.argmax(x + _gumbel(keys, vocab), axis=-1)
            tok = drawn if greedy_tok is None else _ops.where(greedy_row, greedy_tok, drawn)
            next_keys = advance_keys(keys)
        else:
            tok = greedy_tok
            next_keys = keys  # no row draws: keys only matter to sampling rows
        tok = tok.astype(mx.int32)
        if logprobs_on:
            # The model's distribution (log_softmax of the raw logits), not the
            # penalised/filtered one the token was drawn from: that is what the
            # model "thinks" of the token, comparable across sampling settings.
            lse = _ops.logsumexp(raw, axis=-1)
            lp = _ops.take_along_axis(raw, tok[:, None], -1)[:, 0] - lse
        else:
            lp = _ops.zeros((b,), mx.float32)
        if has_history:
            history = _ops.put_along_axis(history, tok[:, None], mx.array(True), -1)
        return tok, lp, next_keys, history

    return step


_STEPS: dict = {}


class SampleOutput(NamedTuple):
    """The results of one step, all device arrays (nothing is evaluated)."""

    tokens: Array  # (B,) int32
    logprobs: Array  # (B,) float32; zeros unless some row asked for logprobs
    keys: Array  # (B, 2) uint32: the keys for the next step
    history: Array | None  # the history with this step's tokens added (None if none given)


def sample(logits: Array, params: BatchParams, keys: Array, history: Array | None = None, *,
           compile: bool = True) -> SampleOutput:
    """Samples one token per row of `logits` (B, V), float32 or bfloat16.

    `params` holds row i's options; `keys` (B, 2) uint32 row i's PRNG key (see
    `make_keys`); `history` an optional (B, V) bool mask of tokens seen so far
    (see `make_history`), needed when a row has a repetition penalty. Returns
    the tokens, their log-probabilities under the raw logits, the keys to pass
    next step and the updated history. Greedy rows (temperature 0) take the
    argmax of the penalised logits.

    Nothing is read back: the work is a handful of batched ops. Which filters
    run is decided on the host from `params` (no sort at all unless a row
    uses top-k or top-p; a top_k-only batch sorts just the max(top_k) largest
    values). With `compile` (the default) the step is compiled once per
    combination of the batch's flags (and per shape) and replayed as a few
    fused kernels; compiled and eager steps give the same tokens. (On MLX's
    CPU backend the first use of a new graph runs the system C++ compiler
    for its fused kernels, seconds, then cached on disk by MLX; the compiled
    step is ~1.5x faster there than the eager one.)"""
    shape = logits.shape
    if len(shape) != 2:
        raise ValueError(f"logits must have shape (batch, vocab), got {shape}")
    b, vocab = shape
    if b != params.size:
        raise ValueError(f"logits have {b} rows but the BatchParams has {params.size}")
    if keys.shape != (b, 2):
        raise ValueError(f"keys must have shape ({b}, 2), got {keys.shape}")
    if params.any_penalty and history is None:
        raise ValueError("a row has a repetition penalty: pass its history (see make_history)")
    if history is not None and history.shape != (b, vocab):
        raise ValueError(f"history must have shape ({b}, {vocab}), got {history.shape}")

    sampling = not params.all_greedy
    kmax = params.kmax(vocab) if sampling else 0
    top_p_on = sampling and params.any_top_p
    if top_p_on or (kmax and 2 * kmax > vocab):
        kmode = "sort"
    elif kmax:
        kmode = "topk"
    else:
        kmode = "none"
    config = (sampling, params.any_greedy, kmode, kmax if kmode == "topk" else 0, top_p_on,
              sampling and params.any_min_p, params.any_penalty, history is not None, params.any_logprobs)
    args = (logits, keys, params.temperature, params.top_k, params.top_p, params.min_p,
            params.repetition_penalty, history)
    if not compile:
        return SampleOutput(*_make_step(*config)(*args))
    fn = _STEPS.get(config)
    if fn is None:
        fn = _STEPS[config] = mx.transforms.compile(_make_step(*config))
    return SampleOutput(*fn(*args))
