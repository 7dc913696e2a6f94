"""Public result types and generation options."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields


@dataclass(frozen=True, slots=True)
class Token:
    """One generated token. `finish_reason` is None, except on the last token of
    a stream: "stop" (EOS or a stop string) or "length" (max_tokens or context)."""

    id: int
    text: str
    logprob: float | None = None
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float  # seconds from the call to the first token
    tokens_per_second: float  # completion tokens after the first, per second

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
    # the calls in `text` when the chat template's tool-call format produced any (text keeps them too)
    tool_calls: list[ToolCall] | None = None


@dataclass(frozen=True)
class GenerationOptions:
    """The options of `generate`/`complete`, validated up front (ValueError)."""

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

    @classmethod
    def from_kwargs(cls, **kwargs) -> "GenerationOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        stop = kwargs.get("stop", ())
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop must be a string or a sequence of non-empty strings")
        kwargs["stop"] = tuple(stop)
        opts = cls(**kwargs)
        opts._validate()
        return opts

    def _validate(self) -> None:
        def is_int(v):
            return isinstance(v, numbers.Integral) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, numbers.Real) and not isinstance(v, bool)

        checks = [
            (is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (is_num(self.temperature) and self.temperature >= 0, "temperature must be a number >= 0"),
            (is_num(self.top_p) and 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (is_int(self.top_k) and self.top_k >= 0, "top_k must be an integer >= 0 (0 disables it)"),
            (is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty must be > 0"),
            (self.seed is None or is_int(self.seed), "seed must be an integer or None"),
            (isinstance(self.logprobs, bool), "logprobs must be True or False"),
            (is_int(self.max_buffer) and self.max_buffer >= 1, "max_buffer must be an integer >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
