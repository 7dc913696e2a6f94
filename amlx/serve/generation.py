"""One HTTP request's generations: its choices over `model.generate`, read together.

`Generation.start` submits every choice (errors such as a prompt over the context
surface here, before any response is sent). `events()` yields each choice's tokens as
they arrive, turned into `Piece`s (content text, finished tool calls, logprob entries,
the finish reason exactly once), plus `KEEPALIVE` after a quiet interval. `close()`
cancels whatever is still running and records it: the request's owner calls it in a
`finally`, so a client that goes away cancels its generations at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import amlx
from amlx.serve.errors import APIError, about_field, from_engine
from amlx.serve.metrics import Metrics
from amlx.serve.options import choice_options
from amlx.toolcalls import BlankAroundCalls, ToolCallParser, prompt_opens_reasoning
from amlx.types import GenerationOptions, Token, ToolCall


class KeepAlive:
    """What events() yields when no token came for a while."""


KEEPALIVE = KeepAlive()


# A constraint (response_format, regex, choice, grammar) masks the tokens it forbids: their
# logprob is -inf, which JSON cannot hold (a whole reply failed to serialize, a stream sent
# `-Infinity`). OpenAI reports such a token's logprob as -9999.0.
_LEAST_LOGPROB = -9999.0


def _finite(logprob: float) -> float:
    value = float(logprob)
    return value if value >= _LEAST_LOGPROB else _LEAST_LOGPROB  # (NaN too, though none is expected)


@dataclass
class LogprobEntry:
    token_id: int
    text: str
    logprob: float | None  # None: an echoed prompt's first token (nothing before it)
    top: list[tuple[int, str, float]]  # (id, text, logprob), best first
    bytes: list[int] = field(default_factory=list)  # the token's own UTF-8 bytes (see TokenBytes)
    top_bytes: list[list[int]] = field(default_factory=list)  # those of each of `top`


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-level alphabet (tokenizers' ByteLevel): each byte's stand-in character -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(extra)}}


class TokenBytes:
    """The bytes of one token, as OpenAI's logprobs `bytes` give them: a token that holds part of
    a character (one byte of an emoji's four) decodes alone to U+FFFD, whose UTF-8 (ef bf bd) is
    not its bytes, so a client joining the tokens' `bytes` could not rebuild the text. Such a
    token's bytes come from its vocabulary piece: byte-level BPE (Qwen, Llama 3) or a <0xNN>
    byte-fallback piece (SentencePiece)."""

    _BYTE_LEVEL = _byte_level_chars()
    _FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer
        kinds: set[str] = set()
        try:
            decoder = tokenizer.backend.decoder
            stack = [json.loads(decoder.__getstate__())] if decoder is not None else []
        except Exception:  # noqa: BLE001 - a tokenizer without a readable decoder: text's own bytes
            stack = []
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                kinds.add(str(node.get("type")))
                stack.extend(node.get("decoders") or [])
        self._byte_level = "ByteLevel" in kinds
        self._fallback = "ByteFallback" in kinds

    def __call__(self, token_id: int, text: str) -> list[int]:
        if "\ufffd" in text:
            piece = self._tokenizer.id_to_token(token_id)
            if piece and self._byte_level and all(ch in self._BYTE_LEVEL for ch in piece):
                return [self._BYTE_LEVEL[ch] for ch in piece]
            match = self._FALLBACK.fullmatch(piece or "") if self._fallback else None
            if match:
                return [int(match.group(1), 16)]
        return list(text.encode("utf-8"))


@dataclass
class Piece:
    """What one token added to one choice."""

    index: int
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Echo:
    """An echoed prompt (/v1/completions `echo`): its text, and with logprobs an entry per token."""

    text: str
    logprobs: list[LogprobEntry] = field(default_factory=list)


@dataclass
class Choice:
    index: int
    stream: Any  # amlx.TokenStream
    prompt_tokens: int
    parser: ToolCallParser
    echo: Echo | None = None
    blanks: BlankAroundCalls = field(default_factory=BlankAroundCalls)  # (used with a tool-call format)
    content: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    tokens: int = 0
    finish_reason: str | None = None


class Admission:
    """At most `max_batch_size + max_queue` generations at once; past that, 429 with Retry-After."""

    def __init__(self, max_batch_size: int, max_queue: int, metrics: Metrics):
        self.capacity = max_batch_size + max_queue
        self.inflight = 0
        self._metrics = metrics

    def acquire(self, n: int) -> None:
        if self.inflight + n > self.capacity:
            self._metrics.rejected.inc()
            raise APIError(429, f"the server is busy: {self.inflight} generations running or queued "
                           f"(limit {self.capacity}); retry shortly", code="queue_full", headers={"Retry-After": "1"})
        self.inflight += n

    def release(self, n: int) -> None:
        self.inflight -= n


class Generation:
    def __init__(self, model: "amlx.Model", metrics: Metrics, admission: Admission, *, tool_format: str | None,
                 want_logprobs: bool, keepalive: float, arrived: float | None = None):
        """`arrived`: when the request came in (time.perf_counter()), for time-to-first-token."""
        self._model = model
        self._metrics = metrics
        self._admission = admission
        self._tool_format = tool_format
        self._want_logprobs = want_logprobs
        self._token_bytes = TokenBytes(model.tokenizer)
        self._keepalive = keepalive
        self.choices: list[Choice] = []
        self._admitted = 0
        self._started = time.perf_counter() if arrived is None else arrived
        self._first_token_seen = False
        self._closed = False
        # The request ended with an error (refused once some choices were submitted, or a
        # choice failed): its other unfinished choices are closed, but were not cancelled by a
        # client that went away, which amlx_requests_cancelled_total counts.
        self._failed = False
        self.prompt_tokens = 0
        self.n = 1  # choices per prompt
        self._pending: dict[asyncio.Future, Choice] = {}  # a read in flight per waiting choice

    async def echo(self, prompts: list[list[int]], texts: list[str], top_n: int | None) -> list[Echo]:
        """Each prompt echoed: its text, and where `top_n` is not None (logprobs asked) an entry
        per token, its log-probability after the tokens before it and the top_n likeliest there
        (`Model.prompt_logprobs`; the first token's logprob is None, as OpenAI's)."""
        out = []
        for ids, text in zip(prompts, texts):
            echo = Echo(text)
            if top_n is not None:
                try:
                    toks = await self._model.prompt_logprobs(ids, top_logprobs=top_n)
                except Exception as exc:
                    raise from_engine(exc) from exc
                decode = self._model.tokenizer.decode
                first = decode([toks[0].id])
                echo.logprobs.append(LogprobEntry(toks[0].id, first, None, [], self._token_bytes(toks[0].id, first)))
                echo.logprobs += [self._entry(tok, tok.logprob) for tok in toks[1:]]
            out.append(echo)
        return out

    def check(self, prompts: list[list[int]], options: dict[str, Any], n: int, prompt_param: str = "prompt") -> None:
        """Raises the APIError (a 400) the engine's own checks would give these generations at
        their start (prompt ids, option values, a constraint that does not parse), before
        admission: with the queue full such a request was a 429 first, whose Retry-After had
        the client send it again only to get its 400 later. `prompt_param`: the request field
        of the prompts ("messages" or "prompt"), which an error about them names."""
        engine = self._model.engine
        for ids in prompts:
            try:
                engine.check_prompt(ids)
            except Exception as exc:
                raise about_field(exc, prompt_param) from exc
        try:
            # (the n choices' options differ only in their seeds, seed + j: the last, the largest,
            # stands for all)
            GenerationOptions.from_kwargs(engine.vocab_size, **choice_options(options, n)[-1])
        except Exception as exc:
            raise from_engine(exc) from exc

    def admit(self, count: int) -> None:
        """Takes `count` admission slots (APIError 429 past the queue); close() gives them back.
        Called before any engine work for the request (echo's prompt logprobs too)."""
        if not self._admitted:
            self._admission.acquire(count)
            self._admitted = count

    def start(self, prompts: list[list[int]], options: dict[str, Any], n: int, echo: list[Echo] | None = None) -> None:
        """Submits n generations per prompt (choice p*n + j: prompt p, seed + j), admitted first
        unless `admit` was called; raises APIError with nothing left running. `echo`: each
        prompt's (see `echo`), shown before its choices."""
        self.n = n
        self.admit(len(prompts) * n)
        try:
            for p, ids in enumerate(prompts):
                # a prompt that leaves a reasoning section open (Qwen3 "Thinking" templates):
                # calls before the reply's `</think>` are reasoning, not calls
                thinking = prompt_opens_reasoning(self._model.tokenizer, ids, self._tool_format)
                for opts in choice_options(options, n):
                    stream = self._model.generate(ids, **opts)
                    parser = ToolCallParser(self._tool_format, thinking=thinking)
                    self.choices.append(Choice(len(self.choices), stream, len(ids), parser,
                                               None if echo is None else echo[p]))
        except Exception as exc:
            self._failed = True  # (a completions request whose later prompt is over the context)
            self.close()
            raise from_engine(exc) from exc
        self.prompt_tokens = sum(len(ids) for ids in prompts)  # n choices of one prompt count it once (OpenAI)
        self._metrics.prompt_tokens.inc(self.prompt_tokens)

    def _piece(self, choice: Choice, tok: Token) -> Piece:
        if not self._first_token_seen:
            self._first_token_seen = True
            self._metrics.ttft.observe(time.perf_counter() - self._started)
        choice.tokens += 1
        self._metrics.generation_tokens.inc()
        piece = Piece(choice.index)
        events = choice.parser.feed(tok.text)
        if tok.finish_reason is not None:
            events += choice.parser.finish()
        if choice.parser.format is not None:
            # the blanks between and around calls (Qwen's "\n" between two) are no content
            events = choice.blanks(events, end=tok.finish_reason is not None)
        for event in events:
            if isinstance(event, str):
                piece.content += event
            else:
                piece.calls.append(event)
        choice.content.append(piece.content)
        choice.calls.extend(piece.calls)
        if self._want_logprobs and tok.logprob is not None:
            piece.logprobs.append(self._entry(tok, tok.logprob))
            choice.logprobs.extend(piece.logprobs)
        if tok.finish_reason is not None:
            # OpenAI: "length" whenever max_tokens (or the context) cut the reply, even after a
            # whole call was parsed; "tool_calls" only when the model itself ended a reply with calls.
            ended = tok.finish_reason == "stop"
            choice.finish_reason = "tool_calls" if choice.calls and ended else tok.finish_reason
            piece.finish_reason = choice.finish_reason
            self._metrics.finished.labels(choice.finish_reason).inc()
        return piece

    def _entry(self, tok: Token, logprob: float) -> LogprobEntry:
        # each token's text as it reads inside the reply (after the prompt): decoded alone, a
        # Llama 2 / Mistral piece "▁the" lost its space (`Tokenizer.token_text`)
        text_of = self._model.tokenizer.token_text
        top = [(int(i), text_of(int(i)), _finite(lp)) for i, lp in (getattr(tok, "top_logprobs", None) or [])]
        text = text_of(tok.id)
        return LogprobEntry(tok.id, text, _finite(logprob), top, self._token_bytes(tok.id, text),
                            [self._token_bytes(i, t) for i, t, _ in top])

    async def events(self) -> AsyncIterator[Piece | KeepAlive]:
        """Every choice's pieces in arrival order, with KEEPALIVE after `keepalive` quiet seconds
        while choices wait for their first token (queued or prefilling). A lone choice's later
        tokens are read directly: no task per token once the stream flows."""
        pending = self._pending

        def ask(choice: Choice) -> None:
            pending[asyncio.ensure_future(choice.stream.__anext__())] = choice

        for choice in self.choices:
            ask(choice)
        try:
            while pending:
                done, _ = await asyncio.wait(pending, timeout=self._keepalive, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    yield KEEPALIVE
                    continue
                for fut in sorted(done, key=lambda f: pending[f].index):
                    choice = pending.pop(fut)
                    tok = self._result(choice, fut)
                    if tok is None:
                        continue
                    yield self._piece(choice, tok)
                    if tok.finish_reason is None and len(self.choices) == 1:
                        async for piece in self._rest(choice):
                            yield piece
                    elif tok.finish_reason is None:
                        ask(choice)
        finally:
            self._cancel_pending()

    def _cancel_pending(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()

    def _result(self, choice: Choice, fut: asyncio.Future) -> Token | None:
        try:
            return fut.result()
        except StopAsyncIteration:
            return None
        except Exception as exc:
            choice.finish_reason = "error"  # failed, not cancelled
            self._failed = True
            raise from_engine(exc) from exc

    async def _rest(self, choice: Choice) -> AsyncIterator[Piece]:
        try:
            async for tok in choice.stream:
                yield self._piece(choice, tok)
        except Exception as exc:
            choice.finish_reason = "error"
            self._failed = True
            raise from_engine(exc) from exc

    def stream_failed(self, status: int) -> None:
        """Counts a streamed request answered with an error event (its status long sent)."""
        self._metrics.stream_errors.labels(str(status)).inc()

    def close(self) -> None:
        """Cancels unfinished choices (counting them as cancelled unless the request failed) and
        frees the admission slots."""
        if self._closed:
            return
        self._closed = True
        self._cancel_pending()  # reads still waiting (close() may come before events() ends)
        for choice in self.choices:
            if choice.finish_reason is None:
                choice.stream.close()
                if not self._failed:
                    self._metrics.cancelled.labels("decode" if choice.tokens else "prefill").inc()
        self._admission.release(self._admitted)
