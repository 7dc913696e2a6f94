"""Sampled ids in, `Token`s out, for one request: streaming detokenization,
EOS, stop strings (held back until they can no longer start a stop string,
never emitted) and max_tokens; and the context-length check that decides how
many tokens a prompt leaves room for."""

from __future__ import annotations

from amlx.errors import ContextLengthError
from amlx.tokenizer import Tokenizer
from amlx.types import GenerationOptions, Token


class TextAssembler:
    """Per request: ids in, `Token`s out, deciding when the stream ends."""

    def __init__(self, tokenizer: Tokenizer, options: GenerationOptions, eos_ids: frozenset[int],
                 max_new: int | None = None):
        # A constrained reply reads each token as the constraint engine does: as text that goes
        # on from the prompt. Decoded as a text of its own, a first token "▁yes" of a Strip or
        # Metaspace decoder (Llama 2, Mistral) lost its space, so choice=[" yes"] gave "yes",
        # text that does not match the constraint.
        self._detok = tokenizer.detokenizer(continuing=options.constraint is not None)
        self._stop = options.stop
        self._eos = eos_ids
        self._max = options.max_tokens if max_new is None else min(options.max_tokens, max_new)
        self._held = ""  # text that may be the start of a stop string
        self._matched = [0] * len(self._stop)  # per stop string: how much of its start the text ends in
        self.count = 0
        self.finished = False

    def _holdback(self, text: str, added: int) -> int:
        """Length of the longest suffix of `text` (`added` characters after the held text) that
        starts some stop string. A stop's match grows by at most the added characters, so its
        lengths are tried from there down: work linear in the reply's length (trying each from
        the stop's own length, every token, was 1.4 ms a token for 16 stops of 256 characters)."""
        for k, s in enumerate(self._stop):
            n = min(len(s) - 1, len(text), self._matched[k] + added)
            while n and not text.endswith(s[:n]):
                n -= 1
            self._matched[k] = n
        return max(self._matched)

    @property
    def remaining(self) -> int:
        """Tokens it may still take before max_tokens (or the context) ends the request."""
        return max(0, self._max - self.count)

    def _first_stop(self, text: str) -> int:
        """Where the stop string that `text` completes first starts, or -1. First means the least
        end, as a reader going character by character meets it (at equal ends, the longer one):
        the cut then does not depend on how the text was split into tokens. "all" and the "l" in
        it, arriving as one token, cut before the "l", as they do arriving a character at a time."""
        found = [(i + len(s), i) for s in self._stop if (i := text.find(s)) >= 0]
        return min(found)[1] if found else -1

    def _last(self, token_id: int, logprob: float | None, text: str, reason: str) -> Token:
        """The stream's last Token: `text` (with what the detokenizer still held) cut before a
        stop string in it, which the held text and an incomplete last character (U+FFFD once
        final) may complete only now."""
        self.finished = True
        rest = text + self._detok.finalize()
        cut = self._first_stop(rest)
        return Token(token_id, rest[:cut], logprob, "stop") if cut >= 0 else Token(token_id, rest, logprob, reason)

    def push(self, token_id: int, logprob: float | None = None, complete: bool = False) -> Token:
        """The Token for the next sampled id (the last one has finish_reason set).
        `complete`: the request's constraint admits nothing after this token ("stop")."""
        self.count += 1
        if token_id in self._eos:
            return self._last(token_id, logprob, self._held, "stop")
        piece = self._detok.add(token_id)
        text = self._held + piece
        if complete or self.count >= self._max:
            # (before the stop check: what the detokenizer held becomes final with this id too,
            # and may complete a stop string that starts earlier than one in `text`)
            return self._last(token_id, logprob, text, "stop" if complete else "length")
        cut = self._first_stop(text)
        if cut >= 0:
            self.finished = True
            return Token(token_id, text[:cut], logprob, "stop")
        keep = self._holdback(text, len(piece)) if self._stop else 0
        self._held = text[len(text) - keep:] if keep else ""
        return Token(token_id, text[:len(text) - keep], logprob, None)


def check_context(prompt_len: int, max_context: int, generated: int = 1) -> int:
    """Room left for generation; raises ContextLengthError when the prompt and `generated`
    tokens after it (1: a request generates at least one; 0: prompt_logprobs) do not fit."""
    if prompt_len == 0:
        raise ValueError("the prompt is empty")
    if prompt_len + generated > max_context:
        including = " (including at least one generated token)" if generated else ""
        raise ContextLengthError(f"the prompt has {prompt_len} tokens but the context holds {max_context}{including}")
    return max_context - prompt_len
