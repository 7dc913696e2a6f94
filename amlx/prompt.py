"""Prompts to token ids: text, chat messages (rendered with the checkpoint's
chat template) or ids; which prompts are worked off the event loop; and the
earliest context-length check a text allows.

Tokenizing a few megabytes of text, or rendering a template over thousands of
messages, takes seconds. `Model.generate` hands such prompts ("heavy" ones) to a
thread as the stream's first awaited step, so the event loop goes on meanwhile
(the tokenizer releases the GIL for long texts, see `Tokenizer.encode`).
"""

from __future__ import annotations

from typing import Any

from amlx.errors import ContextLengthError

INLINE_CHARS = 16384  # text up to this many characters is tokenized at once, on the caller's thread

# A text has at least len(text) / (SHRINK * longest vocabulary piece) tokens. The factor
# leaves room for normalizers that shorten text before it is split (NFKC composition).
SHRINK = 2


def is_messages(prompt: Any) -> bool:
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, dict) for m in prompt)


def is_heavy(prompt: Any) -> bool:
    """Whether making the prompt's ids may take long: chat messages (a template
    renders them), text longer than INLINE_CHARS."""
    if isinstance(prompt, str):
        return len(prompt) > INLINE_CHARS
    return is_messages(prompt)


class PromptEncoder:
    """Turns prompts into token ids for one model (any thread)."""

    def __init__(self, tokenizer, max_context: int):
        self._tokenizer = tokenizer
        self._max_context = max_context
        self._longest: int | None = None

    def ids(self, prompt: Any) -> list[int]:
        """The prompt's token ids. TypeError for a prompt of another kind; a text
        that cannot fit the context whatever its tokens raises ContextLengthError
        before it is tokenized. (The engine checks the ids' count and range.)"""
        if isinstance(prompt, str):
            self.check_text(prompt)
            return self._tokenizer.encode(prompt)
        if is_messages(prompt):
            text = self._tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
            self.check_text(text)
            return self._tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise TypeError("prompt must be a string, a list of token ids, or a list of chat messages (dicts)")

    def check_text(self, text: str) -> None:
        """ContextLengthError if `text` has more tokens than the context holds for
        sure: no token covers more characters than the longest vocabulary piece."""
        if len(text) <= INLINE_CHARS:
            return  # tokenizing it is as cheap as the bound
        least = len(text) // (SHRINK * self.longest_piece())
        if least >= self._max_context:
            raise ContextLengthError(f"the prompt has at least {least} tokens ({len(text)} characters) but the "
                                     f"context holds {self._max_context} (including at least one generated token)")

    def longest_piece(self) -> int:
        """Characters of the longest vocabulary entry (found once, on first use)."""
        if self._longest is None:
            tok = self._tokenizer
            self._longest = max(1, max(len(tok.id_to_token(i) or "") for i in range(tok.vocab_size)))
        return self._longest
