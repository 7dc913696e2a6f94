"""OpenAI response bodies, as plain dicts: whole replies and streamed chunks of
`/v1/chat/completions` (ChatShape) and `/v1/completions` (CompletionShape)."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

from amlx.serve.generation import Choice, Echo, Generation, LogprobEntry, Piece


# Response ids: a random per-process prefix and a counter (os.urandom per request is slow on some hosts).
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count()


def _cached_tokens(gen: Generation) -> int:
    """Prompt tokens served from the prefix cache, once amlx reports them (until then 0): each
    distinct prompt's first choice, read from its stream's usage if the stream has one."""
    total = 0
    for choice in gen.choices[::gen.n]:
        usage = getattr(choice.stream, "usage", None)
        total += int(getattr(usage, "cached_tokens", 0) or getattr(choice.stream, "cached_tokens", 0) or 0)
    return total


def usage(gen: Generation) -> dict[str, Any]:
    completion = sum(c.tokens for c in gen.choices)
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": completion,
            "total_tokens": gen.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": _cached_tokens(gen)}}


def _token_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class _Shape:
    object_name = ""
    chunk_object = ""
    id_prefix = ""

    def __init__(self, model_name: str):
        self.id = f"{self.id_prefix}-{_ID_PREFIX}{next(_ID_COUNTER):012x}"
        self.created = int(time.time())
        self.model = model_name

    def _envelope(self, obj: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def usage_chunk(self, gen: Generation) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [], usage=usage(gen))


class ChatShape(_Shape):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    @staticmethod
    def _logprobs(entries: list[LogprobEntry]) -> dict[str, Any]:
        return {"content": [{"token": e.text, "logprob": e.logprob, "bytes": e.bytes or _token_bytes(e.text),
                             "top_logprobs": [{"token": t, "logprob": lp,
                                               "bytes": e.top_bytes[k] if k < len(e.top_bytes) else _token_bytes(t)}
                                              for k, (_, t, lp) in enumerate(e.top)]} for e in entries]}

    @staticmethod
    def _calls(calls, start: int | None = None) -> list[dict[str, Any]]:
        """message.tool_calls, or with `start` (the index of the first) delta.tool_calls."""
        out = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
               for c in calls]
        return out if start is None else [{"index": start + k, **call} for k, call in enumerate(out)]

    def first_chunks(self, gen: Generation) -> list[dict[str, Any]]:
        """OpenAI opens each choice with a delta carrying the role."""
        return [self._envelope(self.chunk_object, [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}])
                for c in gen.choices]

    def chunk(self, piece: Piece, choice: Choice) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if piece.content:
            delta["content"] = piece.content
        if piece.calls:
            call_tools = self._calls(piece.calls, start=len(choice.calls) - len(piece.calls))
            delta["tool_calls"] = call_tools
        logprobs = self._logprobs(piece.logprobs) if piece.logprobs else None
        return self._envelope(self.chunk_object, [{"index": piece.index, "delta": delta, "logprobs": logprobs,
                                                   "finish_reason": piece.finish_reason}])

    def whole(self, gen: Generation, want_logprobs: bool) -> dict[str, Any]:
        choices = []
        for c in gen.choices:
            message: dict[str, Any] = {"role": "assistant", "content": "".join(c.content) or None}
            if c.calls:
                message["tool_calls"] = self._calls(c.calls)
            elif message["content"] is None:
                message["content"] = ""
            choices.append({"index": c.index, "message": message, "finish_reason": c.finish_reason,
                            "logprobs": self._logprobs(c.logprobs) if want_logprobs else None})
        return self._envelope(self.object_name, choices, usage=usage(gen))


class CompletionShape(_Shape):
    object_name = "text_completion"
    chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, model_name: str):
        super().__init__(model_name)
        self._offsets: dict[int, int] = {}  # per choice: text length before its next logprob entry

    def _logprobs(self, index: int, entries: list[LogprobEntry]) -> dict[str, Any]:
        offsets = []
        for e in entries:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(e.text)
        return {"tokens": [e.text for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [self._top(e) for e in entries], "text_offset": offsets}

    @staticmethod
    def _top(e: LogprobEntry) -> dict[str, float] | None:
        """OpenAI's legacy API "will always return the logprob of the sampled token, so there may
        be up to logprobs+1 elements" in each top_logprobs entry (logprobs 0 gives just it). An
        echoed prompt's first token has none (null), as its logprob is null."""
        if e.logprob is None:
            return None
        # The dict is keyed by text, and tokens can share one: every token that holds part of a
        # character reads "\ufffd". Built as {t: lp for ...}, the last (least likely) of them
        # won, so a greedy token's own text showed another token's, lower, logprob. The sampled
        # token's text shows its own logprob (what the API promises), any other text the best
        # of its tokens'; best first.
        top: dict[str, float] = {}
        for _, t, lp in e.top:  # (best first)
            top.setdefault(t, lp)
        top[e.text] = e.logprob
        return dict(sorted(top.items(), key=lambda item: -item[1]))

    def first_chunks(self, gen: Generation) -> list[dict[str, Any]]:
        """With `echo`, each choice opens with its prompt (and the prompt's logprobs)."""
        return [self._envelope(self.chunk_object, [{
            "index": c.index, "text": c.echo.text,
            "logprobs": self._logprobs(c.index, c.echo.logprobs) if c.echo.logprobs else None,
            "finish_reason": None}]) for c in gen.choices if c.echo is not None]

    def chunk(self, piece: Piece, choice: Choice) -> dict[str, Any]:
        logprobs = self._logprobs(piece.index, piece.logprobs) if piece.logprobs else None
        return self._envelope(self.chunk_object, [{"index": piece.index, "text": piece.content, "logprobs": logprobs,
                                                   "finish_reason": piece.finish_reason}])

    def whole(self, gen: Generation, want_logprobs: bool) -> dict[str, Any]:
        choices = []
        for c in gen.choices:
            echo = c.echo or Echo("")
            choices.append({"index": c.index, "text": echo.text + "".join(c.content), "finish_reason": c.finish_reason,
                            "logprobs": self._logprobs(c.index, echo.logprobs + c.logprobs) if want_logprobs else None})
        return self._envelope(self.object_name, choices, usage=usage(gen))
