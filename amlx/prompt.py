"""Prompts to token ids: text, chat messages (rendered with the checkpoint's
chat template) or ids; which prompts are worked off the event loop; and the
earliest context-length check a text allows.

Tokenizing a few megabytes of text, or rendering a template over thousands of
messages, takes seconds. `Model.generate` hands such prompts ("heavy" ones) to a
thread as the stream's first awaited step, so the event loop goes on meanwhile
(the tokenizer releases the GIL for long texts, see `Tokenizer.encode`).
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np

from amlx.errors import ChatTemplateError, ContextLengthError

INLINE_CHARS = 16384  # text up to this many characters is tokenized at once, on the caller's thread

# A text has at least len(text) / (SHRINK * longest vocabulary piece) tokens. The factor
# leaves room for normalizers that shorten text before it is split (NFKC composition).
SHRINK = 2


# Chat messages and tools are copied into plain data (and written out by the template's tojson)
# by recursion: deeper nesting raised RecursionError, a structure that holds itself recursed
# without end, and one that holds a part many times over was copied once per reference.
MAX_DEPTH = 128  # real messages nest a few levels, tool schemas a few dozen
MAX_ITEMS = 1 << 22  # values written out (a shared part counts once per reference)


def check_structure(value: Any, what: str) -> None:
    """ChatTemplateError (a ValueError) when `value` (a message, a tool, ...) nests more than
    MAX_DEPTH levels deep, holds itself, or holds more than MAX_ITEMS values written out."""
    _measure(value, 0, {}, set(), what)


def _measure(value: Any, depth: int, memo: dict[int, tuple[int, int]], path: set[int],
             what: str) -> tuple[int, int]:
    """(levels below `value`, values in it written out), each container walked once."""
    if isinstance(value, Mapping):
        children: Any = itertools.chain(value.keys(), value.values())  # (tuples can be keys)
    elif isinstance(value, (list, tuple)):
        children = value
    else:
        return 0, 1
    key = id(value)
    if key in path:
        raise ChatTemplateError(f"{what} contains itself, so it cannot be written out")
    below, items = memo.get(key) or (0, 0)
    if not items:
        if depth >= MAX_DEPTH:
            raise ChatTemplateError(f"{what} nests more than {MAX_DEPTH} levels deep")
        path.add(key)
        items = 1
        for child in children:
            child_below, child_items = _measure(child, depth + 1, memo, path, what)
            below, items = max(below, child_below + 1), items + child_items
            if items > MAX_ITEMS:
                raise ChatTemplateError(f"{what} holds more than {MAX_ITEMS} values (written out)")
        path.discard(key)
        memo[key] = below, items
    if depth + below > MAX_DEPTH:
        raise ChatTemplateError(f"{what} nests more than {MAX_DEPTH} levels deep")
    return below, items


def check_rendered(text: str) -> None:
    """ChatTemplateError when a chat template rendered nothing at all (no prompt to continue)."""
    if not text:
        raise ChatTemplateError("the chat template rendered nothing for these messages (an empty prompt)")


def is_token_id(value: Any) -> bool:
    """Whether `value` is a token id by type: any integer (numpy's too, as the options take
    them; they raised TypeError), not a bool. (The engine checks the range.)"""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_messages(prompt: Any) -> bool:
    """Chat messages: a non-empty list of mappings (`Prompt`'s `Sequence[Mapping]`: a
    MappingProxyType or another Mapping than a dict was refused as no prompt at all, where
    the tokenizer's template takes any Mapping)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and all(isinstance(m, Mapping) for m in prompt)


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
            check_rendered(text)
            self.check_text(text)
            return self._tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, (list, tuple)) and all(is_token_id(t) for t in prompt):
            return [int(t) for t in prompt]
        raise TypeError("prompt must be a string, a list of token ids, or a list of chat messages (dicts)")

    def least_tokens(self, text: str) -> int:
        """Tokens `text` has at least (no token covers more characters than the longest
        vocabulary piece); 0 for a text up to INLINE_CHARS, where tokenizing it is as cheap
        as the bound."""
        return 0 if len(text) <= INLINE_CHARS else len(text) // (SHRINK * self.longest_piece())

    def check_text(self, text: str) -> None:
        """ContextLengthError if `text` has more tokens than the context holds for
        sure (`least_tokens`)."""
        least = self.least_tokens(text)
        if len(text) > INLINE_CHARS and least >= self._max_context:
            raise ContextLengthError(f"the prompt has at least {least} tokens ({len(text)} characters) but the "
                                     f"context holds {self._max_context} (including at least one generated token)")

    def longest_piece(self) -> int:
        """Characters of the longest vocabulary entry (found once, on first use)."""
        if self._longest is None:
            tok = self._tokenizer
            self._longest = max(1, max(len(tok.id_to_token(i) or "") for i in range(tok.vocab_size)))
        return self._longest
