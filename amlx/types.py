"""Public result types, generation options and the typed dictionaries of the API.

`GenerateOptions` (a TypedDict) is what `Model.generate(prompt, **options)` and
friends accept, so a type checker flags a misspelled option; `GenerationOptions`
is the same set validated at run time (`ValueError` naming the option), the
form the engine works with. `EngineStats` / `MemoryStats` type `stats()` and
`amlx.memory()`.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

import numpy as np
from typing_extensions import NotRequired, TypedDict

from amlx.constrain.spec import Constraint, parse_constraint

# Bounds of the options that are not sampling parameters (those live in amlx.sample).
MAX_TOKENS_LIMIT = 2**31 - 1  # token counts are int32 on the device
MAX_BUFFER_LIMIT = 1 << 16  # tokens a request may hold unread before it is paused
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters; stop matching rescans this much text per token


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token. `finish_reason` is None, except on the last token of
    a stream: "stop" (EOS or a stop string) or "length" (max_tokens or context).
    `logprob` is set when the request asked for `logprobs`; `top_logprobs`, when
    it asked for `top_logprobs=n`, holds the n most likely (id, logprob) pairs
    of the model's distribution at this step, best first."""

    id: int
    text: str
    logprob: float | None = None
    finish_reason: str | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float  # seconds from the call to the first token
    tokens_per_second: float  # completion tokens after the first, per second
    # prompt tokens served from the prefix cache (load option prefix_cache; amlx.kv.prefix)
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call the model wrote (see amlx.toolcalls): `arguments` is a JSON object as text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per token, when asked for
    # the calls in `text` when the chat template's tool-call format produced any (text keeps them too)
    tool_calls: list[ToolCall] | None = None


# What `generate` / `complete` take as a prompt: text, token ids, or chat messages.
Prompt = Union[str, Sequence[int], Sequence[Mapping[str, Any]]]


class GenerateOptions(TypedDict, total=False):
    """The keyword options of `generate` / `complete` (all optional), for type checkers.

    Run-time validation and the defaults are `GenerationOptions`'s."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    logit_bias: Optional[Mapping[int, float]]
    stop: Union[str, Sequence[str]]
    seed: Optional[int]
    logprobs: bool
    top_logprobs: int
    max_buffer: int
    # structured outputs (at most one; see amlx.constrain)
    response_format: Optional[Mapping[str, Any]]
    regex: Optional[str]
    choice: Optional[Sequence[str]]
    grammar: Optional[str]


class MemoryStats(TypedDict):
    """MLX memory counters in bytes (`amlx.memory()`)."""

    active: int
    peak: int
    cache: int


class EngineStats(TypedDict):
    """`Model.stats()`: requests, counters, the recent decoding rate and MLX memory."""

    active_requests: int
    waiting_requests: int
    tokens_generated: int
    decode_steps: int
    tokens_per_second: float
    memory: MemoryStats
    kv_cache: dict[str, int]  # the KV block pools: blocks used/cached/free/allocated, prefix hits, preemptions
    # models loaded with `draft` (speculative decoding): drafted_tokens, accepted_tokens, verified_rows,
    # acceptance_rate, accepted_per_verify (amlx.speculative.stats.SpeculativeCounters)
    speculative: NotRequired[dict[str, float]]
    # with AMLX_STEP_TIMING=1 (a diagnostic): host seconds per phase of the scheduler's rounds,
    # cumulative, with the rounds and decode steps they cover (amlx.engine.timing)
    step_timing: NotRequired[dict[str, Any]]


# The options of one constraint (GenerateOptions: at most one per request).
CONSTRAINT_OPTIONS = ("response_format", "regex", "choice", "grammar")

# A constraint option bigger than this (characters of its strings, plus one per other value) is
# checked off the event loop by Model.generate / complete (at the stream's first read, on a thread):
# llguidance's first check of a grammar grows faster than its size (a schema of 400 optional
# properties, 11 KB, took 13 ms on one core; one of 3,000, 89 KB, 0.3 s, and about a second on
# slower ones), while a smaller one's costs a few milliseconds at most.
INLINE_CONSTRAINT_CHARS = 4096


def is_heavy_constraint(options: Mapping[str, Any]) -> bool:
    """Whether the constraint that generate's keyword `options` name is bigger than
    INLINE_CONSTRAINT_CHARS: counted until it is passed, so a huge one costs no more to measure
    (and one that holds itself ends the count)."""
    budget = INLINE_CONSTRAINT_CHARS
    stack = [options[name] for name in CONSTRAINT_OPTIONS if options.get(name) is not None]
    while stack and budget >= 0:
        value = stack.pop()
        text = isinstance(value, (str, bytes))
        container = not text and isinstance(value, (Mapping, Sequence))
        budget -= len(value) + container if text or container else 1
        if container and budget >= 0:  # (its items are walked only while within the budget)
            stack.extend([*value.keys(), *value.values()] if isinstance(value, Mapping) else value)
    return budget < 0


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class GenerationOptions:
    """The options of `generate`/`complete`, validated on construction (ValueError).

    The sampling options are checked by `amlx.sample.SamplingParams` (one place
    for their bounds); `check_vocab` adds the checks that need the model's
    vocabulary size (top_k, logit_bias ids), which the engine runs on submit."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int | None = None
    logprobs: bool = False
    max_buffer: int = 16
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None
    top_logprobs: int = 0
    # At most one constraint: the text then matches it (amlx.constrain; checked by llguidance
    # here, so a bad schema, regex or grammar is a ValueError before the request is queued).
    response_format: Mapping[str, Any] | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        self._plain_containers()
        self._plain_numbers()
        self._validate()
        # derived, not an option: kept beside the fields (a frozen dataclass's __dict__)
        self.__dict__["_constraint"] = parse_constraint(
            response_format=self.response_format, regex=self.regex, choice=self.choice, grammar=self.grammar)

    @property
    def constraint(self) -> Constraint | None:
        """The request's constraint as llguidance will run it (None without one)."""
        constraint: Constraint | None = self.__dict__["_constraint"]
        return constraint

    @classmethod
    def from_kwargs(cls, vocab_size: int | None = None, /, **kwargs: Any) -> "GenerationOptions":
        """Options from `generate`'s keyword arguments: TypeError for an unknown
        name, ValueError for a bad value. With `vocab_size`, also `check_vocab`."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        opts = cls(**kwargs)
        if vocab_size is not None:
            opts.check_vocab(vocab_size)
        return opts

    def _plain_containers(self) -> None:
        """`stop` as a tuple (one string, or a sequence of them) and `logit_bias` as a dict of its
        own (the caller's may change later), made here, not only by `from_kwargs`: the public
        class built directly refused stop="abc" as "stop must be a string ..., got 'abc'"."""
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, Sequence) and not isinstance(self.stop, (tuple, bytes, bytearray)):
            # (any sequence of strings, as the option is typed: a deque was refused as "stop must be
            # a string or a sequence of non-empty strings")
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.logit_bias, Mapping):
            object.__setattr__(self, "logit_bias", dict(self.logit_bias))

    def _plain_numbers(self) -> None:
        """Valid numbers of other types (numpy scalars: any numbers.Integral / numbers.Real the
        checks accept) become Python ints and floats, the types the engine is written for
        (and top_logprobs > 0 turns logprobs on).
        A numpy integer top_k passed validation, then failed its request inside the worker
        (the sampler's compiled step met it), and every later request sampled alike with it."""
        for name in _INT_OPTIONS:
            value = getattr(self, name)
            if _is_int(value) and type(value) is not int:
                object.__setattr__(self, name, int(value))
        for name in _REAL_OPTIONS:
            value = getattr(self, name)
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value) is not float:
                try:
                    object.__setattr__(self, name, float(value))
                except OverflowError:  # an int past float's range: the bounds refuse it as it is
                    pass
        if isinstance(self.logprobs, np.bool_):
            object.__setattr__(self, "logprobs", bool(self.logprobs))
        # DESIGN.md's contract: `top_logprobs` takes 0..20 and `tok.top_logprobs` is then the
        # list of pairs; it does not ask for `logprobs=True` as well (that is OpenAI's HTTP rule,
        # which amlx.serve applies itself). Asking for top_logprobs turns logprobs on.
        if _is_int(self.top_logprobs) and self.top_logprobs > 0 and self.logprobs is False:
            object.__setattr__(self, "logprobs", True)

    def _validate(self) -> None:
        from amlx.sample import SamplingParams  # the sampler owns the sampling bounds

        checks = [
            (_is_int(self.max_tokens) and 1 <= self.max_tokens <= MAX_TOKENS_LIMIT,
             f"max_tokens must be an integer in [1, {MAX_TOKENS_LIMIT}]", self.max_tokens),
            (_is_int(self.max_buffer) and 1 <= self.max_buffer <= MAX_BUFFER_LIMIT,
             f"max_buffer must be an integer in [1, {MAX_BUFFER_LIMIT}]", self.max_buffer),
            (isinstance(self.stop, tuple) and all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_LENGTH
                                                  for s in self.stop),
             f"stop must be a string or a sequence of non-empty strings of at most {MAX_STOP_LENGTH} characters",
             self.stop),
            (isinstance(self.stop, tuple) and len(self.stop) <= MAX_STOP_STRINGS,
             f"stop takes at most {MAX_STOP_STRINGS} strings", self.stop),
        ]
        for ok, message, value in checks:
            if not ok:
                raise ValueError(f"{message}, got {_short(value)}")
        from amlx.tokenizer import check_encodable  # (the generated text is UTF-8: a lone surrogate never matches)

        for s in self.stop:
            check_encodable(s, "a stop string")
        SamplingParams.from_options(self)

    def check_vocab(self, vocab_size: int) -> "GenerationOptions":
        """The checks that need the model's vocabulary size: top_k <= vocab_size and
        logit_bias ids inside the vocabulary (ValueError). Returns self."""
        from amlx.sample import SamplingParams

        SamplingParams.from_options(self).check_vocab(vocab_size)
        return self


_INT_OPTIONS = ("max_tokens", "top_k", "seed", "max_buffer", "top_logprobs")
_REAL_OPTIONS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
