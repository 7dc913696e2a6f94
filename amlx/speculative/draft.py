"""Load-time checks of speculative decoding's options and of a draft model.

`DraftSpec.from_options` reads the load options `draft` (None, "prompt_lookup"
or a draft checkpoint's path) and `num_draft_tokens`. A draft model proposes
token ids that the target then judges, so both must mean the same thing by
every id: `check_draft_tokenizer` refuses a draft whose tokenizer maps any
token to another id than the target's (tokenizer.json's vocabulary with its
added tokens) or names another BOS or EOS token. Stop ids from
generation_config.json are the target's alone (the draft never decides that a
request ends), so they are not compared. The checks read tokenizer files only
(the loader's host phase), before any weight is loaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from amlx.errors import ModelLoadError
from amlx.tokenizer import Tokenizer

__all__ = ["DraftSpec", "DraftTokenizerError", "check_draft_tokenizer", "check_draft_checkpoint",
           "PROMPT_LOOKUP", "MAX_DRAFT_TOKENS"]

PROMPT_LOOKUP = "prompt_lookup"
MAX_DRAFT_TOKENS = 16  # a verify step of K + 1 positions per row; beyond this acceptance never pays


class DraftTokenizerError(ModelLoadError, ValueError):
    """A draft model whose tokenizer differs from its target's (names both paths and the difference)."""


@dataclass(frozen=True)
class DraftSpec:
    """What speculative decoding a model was loaded with."""

    kind: Literal["model", "prompt_lookup"]
    path: Path | None  # the draft checkpoint (kind "model")
    num_draft_tokens: int

    @classmethod
    def from_options(cls, draft: str | os.PathLike[str] | None, num_draft_tokens: int = 4) -> "DraftSpec | None":
        """The spec of the load options, None without `draft`; ValueError on bad values."""
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) \
                or not 1 <= num_draft_tokens <= MAX_DRAFT_TOKENS:
            raise ValueError(f"num_draft_tokens must be an integer in [1, {MAX_DRAFT_TOKENS}], "
                             f"got {num_draft_tokens!r}")
        if draft is None:
            return None
        if draft == PROMPT_LOOKUP:
            return cls("prompt_lookup", None, num_draft_tokens)
        if not isinstance(draft, (str, os.PathLike)) or not os.fspath(draft):
            raise ValueError(f"draft must be a draft model's path or {PROMPT_LOOKUP!r}, got {draft!r}")
        return cls("model", Path(os.fspath(draft)), num_draft_tokens)


def _first_difference(target: dict[str, int], draft: dict[str, int]) -> str | None:
    """The lowest id whose token differs between two token -> id maps, described; None if equal."""
    if target == draft:
        return None
    by_id_t = {i: t for t, i in target.items()}
    by_id_d = {i: t for t, i in draft.items()}
    for i in sorted(set(by_id_t) | set(by_id_d)):
        t, d = by_id_t.get(i), by_id_d.get(i)
        if t != d:
            return f"token id {i} is {t!r} in the target, {d!r} in the draft"
    return f"the vocabularies hold {len(target)} and {len(draft)} tokens"  # a token twice (not from one file)


def check_draft_tokenizer(target: Tokenizer, draft: Tokenizer, target_path: str | os.PathLike[str],
                          draft_path: str | os.PathLike[str]) -> None:
    """Raises `DraftTokenizerError` (a ValueError) naming both paths and the first
    difference unless the two tokenizers agree on every token's id and on BOS and EOS."""
    difference = _first_difference(target.backend.get_vocab(with_added_tokens=True),
                                   draft.backend.get_vocab(with_added_tokens=True))
    if difference is None:
        for name in ("bos_token_id", "eos_token_id"):
            t, d = getattr(target, name), getattr(draft, name)
            if t != d:
                difference = f"{name} is {t!r} in the target, {d!r} in the draft"
                break
    if difference is not None:
        raise DraftTokenizerError(f"the draft model {os.fspath(draft_path)} does not share the tokenizer of "
                                  f"the target {os.fspath(target_path)}: {difference}")


def check_draft_checkpoint(target_path: str | os.PathLike[str], draft_path: str | os.PathLike[str]) -> None:
    """Reads both checkpoints' tokenizers (ModelLoadError if one is unreadable) and checks
    them with `check_draft_tokenizer`."""
    check_draft_tokenizer(Tokenizer.from_dir(target_path), Tokenizer.from_dir(draft_path), target_path, draft_path)
