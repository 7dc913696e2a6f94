"""One request inside the engine, and the stream `Engine.submit` hands out for it.

A `Request` is the scheduler's record of a request (prompt, options, where it
stands in the cache, its channel, detokenizer and sampling state); only the
worker thread changes it. A `RequestStream` is the consumer's side: it reads
the request's tokens (async or blocking) and cancels it, from any thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from amlx.constrain import Matcher
from amlx.kv.prefix import KeyChain
from amlx.engine.assembler import TextAssembler
from amlx.engine.channel import Channel
from amlx.sample import RowSampling
from amlx.types import GenerationOptions, Token


@dataclass(eq=False)
class Request:
    prompt: list[int]
    options: GenerationOptions
    channel: Channel
    assembler: TextAssembler
    sampling: RowSampling
    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    done_at: float | None = None
    prefilled: int = 0  # positions of `fill` already in the cache
    blocks: list[int] = field(default_factory=list)  # its block table in its shard's pool (amlx.kv)
    local: list[int] = field(default_factory=list)  # its table in the windowed layers' pool, if any
    shard: int = -1  # the scheduler shard whose pool holds its blocks
    epoch: int = 0  # the scheduler's weights epoch when its blocks were filled
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    generated: list[int] = field(default_factory=list)  # tokens sent so far
    recompute: list[int] | None = None  # after a preemption: the tokens to prefill again
    keys: KeyChain | None = None  # its full blocks' prefix-cache keys, hashed once each
    pos: int = 0  # next cache position to write
    last: int = -1  # last sampled token (input of the next step)
    steps: int = 0  # decode steps computed for this request
    matcher: Matcher | None = None  # a constrained request's grammar state (amlx.constrain)
    parked_at: float = 0.0  # time.monotonic() when it was last parked (paused, out of the batch)

    @property
    def fill(self) -> list[int]:
        """The tokens its prefill writes: the prompt, or after a preemption the
        prompt and the tokens it produced, but the last."""
        return self.prompt if self.recompute is None else self.recompute

    @property
    def active(self) -> bool:
        return not (self.channel.cancelled or self.assembler.finished)


class RequestStream:
    """The tokens of one submitted request, as the engine delivers them.

    `get()` / `get_sync()` return the next `Token`, or None once the stream has
    ended, and raise the request's error (`MLXError`, `ClosedError`, ...) if it
    failed. `cancel()` removes the request before the engine's next step."""

    def __init__(self, request: Request):
        self._request = request
        self._channel = request.channel

    @property
    def request(self) -> Request:
        """The scheduler's record of the request (read it; only the worker changes it)."""
        return self._request

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (known once the request is admitted)."""
        return self._request.cached_tokens

    @property
    def options(self) -> GenerationOptions:
        return self._request.options

    async def get(self) -> Token | None:
        return await self._channel.get()

    def get_sync(self) -> Token | None:
        return self._channel.get_sync()

    def cancel(self) -> None:
        """The consumer is gone: the request leaves before the engine's next step (idempotent)."""
        if not self._channel.done:
            self._channel.cancel()

    @property
    def done(self) -> bool:
        """No further token will come (finished, failed or cancelled)."""
        return self._channel.done

    @property
    def created(self) -> float:
        """`time.perf_counter()` when the request was submitted."""
        return self._request.created

    @property
    def first_token_at(self) -> float | None:
        return self._request.first_token_at

    @property
    def done_at(self) -> float | None:
        return self._request.done_at
