"""llguidance's view of a checkpoint's tokenizer, per-request matchers and the step's token bitmasks.

A mask is llguidance's bitmask: one int32 word per 32 token ids, bit `i % 32` of word `i // 32`
set when token `i` may come next. A step's constrained rows share one (rows, words) array,
filled by `GrammarVocab.fill_masks` in one call that computes the rows in parallel on
llguidance's thread pool, without holding the GIL.
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import llguidance
import llguidance.numpy as llnp
import numpy as np

from amlx.constrain.limits import check_definitions, on_deep_stack
from amlx.constrain.spec import Constraint
from amlx.env import env_int

if TYPE_CHECKING:
    from amlx._mlx.pinned import HostBuffers
    from amlx.tokenizer import Tokenizer

__all__ = ["GrammarVocab", "Matcher", "MaskJob", "step_masks", "unpack_mask"]

# Compiled grammars kept per vocabulary: requests with the same constraint (a server's one
# schema) copy a compiled matcher in microseconds instead of compiling it again.
_CACHED_GRAMMARS = 64
# Compiled matchers kept per vocabulary, the copies of a grammar's lexer (`mask_lexers`) included:
# the extra copies of the least recently used grammars go first.
_CACHED_TEMPLATES = 96
# Lark's string literals ("...", with escapes) and regular expressions (/.../flags), and its comments
_LARK_LITERALS = re.compile(r'"(?:[^"\\\n]|\\.)*"i?|/(?![/*])(?:[^/\\\n]|\\.)+/[imslux]*|//[^\n]*')

# llguidance's "slices": token subsets (by the regex each token matches first) that a mask takes
# whole, without walking their tokens, wherever the grammar's lexer allows all of a slice there.
# Its defaults cover JSON string contents of any length, up to 30 and up to 10 characters, so in
# a string with a maxLength and fewer than 10 characters left every token was walked (Qwen3's
# 151,936: ~0.5 ms a row). Slices of 1-8 characters let those masks take the short tokens whole:
# benchmarks/mask_fill.py, schema strings with maxLength, 46 -> 25 us a row on average, the
# slowest row 1.5 -> 0.5 ms, the masks the same (tests/test_constraints.py).
_STRING_CHARS = r'[^"\\\x00-\x1F\x7F]'  # a JSON string's plain characters, as llguidance writes them
_SHORT_STRINGS = (1, 2, 3, 4, 6, 8)


def mask_slices() -> list[str]:
    """llguidance's general slices, with JSON-string slices of `_SHORT_STRINGS` characters
    before its own string slices (a token goes to the first slice it matches)."""
    general = llguidance.LLTokenizer.general_slices()
    strings = [s for s in general if s.startswith(_STRING_CHARS)]
    others = [s for s in general if not s.startswith(_STRING_CHARS)]
    # (a slice given twice failed every grammar's compile, llguidance's "panic: repeating
    # slices?": one llguidance already has is not added again)
    short = [f"{_STRING_CHARS}{{1,{k}}}" for k in _SHORT_STRINGS]
    return [*others, *(s for s in short if s not in general), *strings]

# Marks a special token's name in the tokenizer.json handed to llguidance (after its "<").
_SPECIAL_MARK = "\ue000"  # a private-use character: in no real prompt or grammar


_UNICODE_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}


def _drop_unicode_normalization(data: dict) -> bool:
    """Removes the tokenizer.json's Unicode normalization (NFC, NFKC...; other normalizers,
    such as SentencePiece's space to "▁", stay); whether it had one.

    Why: where a grammar forces text, llguidance tokenizes the forced bytes with the Hugging
    Face tokenizer, normalizer included, and then checks the tokens against those bytes. Qwen's
    tokenizer normalizes to NFC, so forced text that NFC changes (U+2F800, a CJK compatibility
    ideograph, becomes U+4E3D; "e" + a combining accent becomes one character) came back as
    other bytes and the request failed ("forced bytes: got ...; applying ..."). A grammar's
    text is exact bytes: it is tokenized as it is."""
    norm = data.get("normalizer")
    if not isinstance(norm, dict):
        return False
    if norm.get("type") in _UNICODE_FORMS:
        data["normalizer"] = None
        return True
    if norm.get("type") == "Sequence" and isinstance(norm.get("normalizers"), list):
        kept = [n for n in norm["normalizers"] if not (isinstance(n, dict) and n.get("type") in _UNICODE_FORMS)]
        if len(kept) == len(norm["normalizers"]):
            return False
        data["normalizer"] = {**norm, "normalizers": kept} if kept else None
        return True
    return False


# Stands in for SentencePiece's space symbol "▁" in the tokenizer.json handed to llguidance: a
# noncharacter (reserved for internal use, in no real text).
_SPACE_STAND_IN = "\ufdd0"


def _space_symbol(decoder: object) -> str | None:
    """The character a SentencePiece-style decoder turns into " " (a Replace of one character
    by " ", as llguidance finds it), else None."""
    if not isinstance(decoder, dict):
        return None
    if decoder.get("type") == "Sequence":
        found = [_space_symbol(d) for d in decoder.get("decoders") or ()]
        return next((c for c in reversed(found) if c is not None), None)
    pattern = decoder.get("pattern")
    if decoder.get("type") == "Replace" and decoder.get("content") == " " and isinstance(pattern, dict):
        symbol = pattern.get("String")
        return symbol if isinstance(symbol, str) and len(symbol) == 1 and symbol != " " else None
    return None


def _rename_space_symbol(data: dict) -> bool:
    """Renames SentencePiece's space symbol ("▁") `_SPACE_STAND_IN` in the tokenizer.json's
    vocabulary, merges, normalizer, pre-tokenizer and decoder (the same tokens for any text but
    one with "▁" in it, and the same bytes per token); whether it did.

    Why: llguidance takes a token's "▁" for a space, and where a grammar forces text it
    tokenizes the text with the Hugging Face tokenizer and checks the tokens against its bytes.
    Text with a "▁" of its own (a choice, a JSON key or const, a regex literal) came out as the
    token "▁" or "▁b", a space to llguidance, and the request failed ("forced bytes: got 'â';
    applying ' '"). Renamed, that "▁" is in no token: it is spelled in byte-fallback tokens,
    its own bytes (as it is by the model when it samples those)."""
    symbol = _space_symbol(data.get("decoder"))
    model = data.get("model")
    if symbol is None or not isinstance(model, dict):
        return False

    def renamed(value):
        if isinstance(value, str):
            return value.replace(symbol, _SPACE_STAND_IN)
        if isinstance(value, list):
            return [renamed(v) for v in value]
        if isinstance(value, dict):
            return {k: renamed(v) for k, v in value.items()}
        return value

    for key in ("normalizer", "pre_tokenizer", "decoder"):
        data[key] = renamed(data.get(key))
    vocab = model.get("vocab")
    if isinstance(vocab, dict):  # BPE, WordPiece, WordLevel: name -> id
        model["vocab"] = {renamed(k): v for k, v in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [piece, score] by id
        model["vocab"] = [[renamed(p[0]), *p[1:]] if isinstance(p, list) and p else p for p in vocab]
    if "merges" in model:
        model["merges"] = renamed(model["merges"])
    return True


def _metaspace_as_replace(data: dict) -> bool:
    """Rewrites the tokenizer.json's Metaspace decoders as the Replace of their space symbol by
    " " (what they do to every token; the first one's leading space they also drop); whether
    it had one.

    Why: llguidance reads a token's bytes through the decoder and knows SentencePiece's space
    symbol only from such a Replace. Under a Metaspace decoder it took "▁y" for the bytes of
    "▁y", yet tokenized forced text " y" to that token: any constraint with a space in it
    failed the request ("forced bytes: got ' '; applying 'â'") or panicked inside llguidance.
    The first token's dropped space is no matter to it: llguidance reads every token as
    continuing text (and amlx decodes a constrained reply so, see TextAssembler)."""

    def rewritten(node):
        if not isinstance(node, dict):
            return node
        if node.get("type") == "Metaspace":
            symbol = node.get("replacement", "\u2581")
            return {"type": "Replace", "pattern": {"String": symbol}, "content": " "}
        if node.get("type") == "Sequence" and isinstance(node.get("decoders"), list):
            return {**node, "decoders": [rewritten(d) for d in node["decoders"]]}
        return node

    decoder = rewritten(data.get("decoder"))
    if decoder == data.get("decoder"):
        return False
    data["decoder"] = decoder
    return True


def _for_llguidance(tokenizer_json: str) -> str:
    """The tokenizer.json as llguidance gets it: without Unicode normalization, Metaspace
    decoders as Replace ones, and with the space symbol renamed (unless the stand-in is in it
    already), parsed and written once."""
    data = json.loads(tokenizer_json)
    changed = _drop_unicode_normalization(data)
    changed = _metaspace_as_replace(data) or changed
    if _SPACE_STAND_IN not in tokenizer_json:
        changed = _rename_space_symbol(data) or changed
    return json.dumps(data) if changed else tokenizer_json


def _mark_special_tokens(tokenizer_json: str) -> tuple[str, dict[int, str]]:
    """The tokenizer.json with the names of the tokens llguidance takes as special (flagged
    special, or any added `<...>`) marked, ids unchanged, and those ids' names as they were.

    Why: where a grammar forces text, llguidance tokenizes it with the Hugging Face tokenizer,
    which matches added tokens' names in any text: forced "<|im_end|>" became the one special
    token, which llguidance's mask then allowed and its parser refused (a special token is not
    text to it), failing the request. With the names marked, such text is spelled in ordinary
    tokens, and the ids stay special. A name the model's vocabulary also holds (SentencePiece's
    `<start_of_turn>`) is marked there too, as the tokenizer matches an added token to its id
    by name; one that a BPE merge builds is left alone (no real vocabulary has one)."""
    data = json.loads(tokenizer_json)
    model = data.get("model") or {}
    vocab = model.get("vocab")
    built = {a + b for a, b in (m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges") or ())
             } if isinstance(vocab, dict) else set()
    names: dict[int, str] = {}
    for added in data.get("added_tokens") or ():
        name, token_id = added.get("content"), added.get("id")
        if not isinstance(name, str) or not (added.get("special") or (name.startswith("<") and name.endswith(">"))):
            continue
        marked = name[:1] + _SPECIAL_MARK + name[1:]
        if isinstance(vocab, dict) and name in vocab:  # BPE, WordPiece, WordLevel: name -> id
            if name in built or vocab[name] != token_id:
                continue
            vocab[marked] = vocab.pop(name)
            if model.get("unk_token") == name:
                model["unk_token"] = marked
        elif isinstance(vocab, list) and isinstance(token_id, int) and 0 <= token_id < len(vocab) \
                and vocab[token_id][0] == name:  # Unigram: [piece, score] by id
            vocab[token_id] = [marked, *vocab[token_id][1:]]
        added["content"] = marked
        names[token_id] = name
    return json.dumps(data), names


_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()


def mask_threads() -> int | None:
    """The threads of llguidance's pool: AMLX_MASK_THREADS, else None, llguidance's default
    (80% of the cores, at most 32). One step's masks are a few dozen rows of 10-100 us each:
    more threads than rows' worth of work cost wake-ups."""
    return env_int("AMLX_MASK_THREADS")


# read at import, so that a bad value fails there (naming the variable) and not inside a
# decode step, where the pool is made
MASK_THREADS = mask_threads()


def mask_lexers() -> int:
    """How many separately compiled copies of a grammar its requests' matchers are spread over:
    AMLX_MASK_LEXERS (at most 32), else one per thread of llguidance's pool, at most 16.

    A matcher copied from a compiled one shares that one's lexer, and the lexer is behind a
    lock that every mask of every copy takes: a step's rows of one schema filled one after
    another whatever the pool's size. Separately compiled copies have lexers of their own, so
    their rows fill in parallel (benchmarks/README.md: 64 rows on a 16-core host, 2.5 ms a step
    from one compiled grammar, 0.9 ms from 16)."""
    configured = env_int("AMLX_MASK_LEXERS")
    if configured is not None:
        return min(configured, 32)  # (the cache holds _CACHED_TEMPLATES in all)
    threads = MASK_THREADS or max(1, int(0.8 * len(os.sched_getaffinity(0))))  # (llguidance's default)
    return min(16, threads)


MASK_LEXERS = mask_lexers()


class _Compiled:
    """The compiled copies of one grammar, handed out in turn."""

    __slots__ = ("templates", "turn", "compiling")

    def __init__(self, template: llguidance.LLMatcher):
        self.templates = [template]
        self.turn = 0
        self.compiling = False  # a further copy is being compiled (`GrammarVocab.claim_copy`)

    def next(self) -> llguidance.LLMatcher:
        template = self.templates[self.turn % len(self.templates)]
        self.turn += 1
        return template


def _pool() -> llguidance.LLExecutor:
    """llguidance's thread pool, one per process (MASK_THREADS threads)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor(MASK_THREADS)
        return _executor


class Matcher:
    """One request's position in its grammar. Not thread-safe: one owner at a time."""

    __slots__ = ("_inner", "mask_words")

    def __init__(self, inner: llguidance.LLMatcher, mask_words: int):
        self._inner = inner
        self.mask_words = mask_words  # int32 words of this matcher's mask row

    def consume(self, token_id: int) -> bool:
        """Advances over `token_id`; False if the grammar does not allow it (the matcher then
        stays in its error state, see `error`). An EOS id is allowed where the grammar may end."""
        return self._inner.consume_token(int(token_id))

    def rollback(self, num_tokens: int) -> bool:
        """Undoes the last `num_tokens` consumed tokens (cheap: llguidance keeps the states)."""
        return self._inner.rollback(num_tokens)

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (the request may end here, with EOS)."""
        return self._inner.is_accepting()

    @property
    def finished(self) -> bool:
        """Nothing but EOS can follow: the request is complete (or the matcher failed)."""
        return self._inner.is_stopped()

    @property
    def failed(self) -> bool:
        """The matcher is in its error state: a token was refused, or computing its mask failed
        (llguidance then allows only EOS, and would take it as the end)."""
        return self._inner.is_error()

    @property
    def gave_up(self) -> bool:
        """llguidance failed on the grammar itself (past its lexer's or parser's limits), not on
        a token: the constraint cannot be followed, whatever the model samples."""
        # (llguidance 1.9's stop_reason() says "InternalError" then, and its state dump's "Stop:"
        # line said ParserTooComplex for a plainly refused token too; the error's first line names
        # a limit, e.g. "lexer error: too many expressions constructed")
        if self._inner.stop_reason() in ("LexerTooComplex", "ParserTooComplex"):
            return True
        # (its Earley parser's row limit reads "Parser Error: Current row has 2001 items; max is
        # 2000": a right-recursive grammar of 2,000 alternatives failed its request as a refused
        # token, an AmlxError, rather than the ConstraintError of a grammar past the limits)
        first = self._inner.get_error().split("\n", 1)[0].lower()
        return (first.startswith("lexer error") or "too many" in first or "too complex" in first
                or "too big" in first or ("items; max is" in first))

    @property
    def error(self) -> str:
        """llguidance's message once a token was refused, else ""."""
        return self._inner.get_error()

    def fill_mask(self, masks: np.ndarray, row: int = 0) -> None:
        """Writes the tokens allowed next into row `row` of `masks` (see `GrammarVocab.new_masks`)."""
        llnp.fill_next_token_bitmask(self._inner, masks, row)


class GrammarVocab:
    """llguidance's tokenizer for one checkpoint: makes matchers and fills their masks.

    `vocab_size` is the width of the model's logits. It may exceed the tokenizer's own count
    (padded embeddings; ids without text are never allowed) or fall short of it (a pad token
    added to the tokenizer of a fine-tune, with no row of the embeddings): llguidance then
    sees every token and the masks' bits past the logits are never read, so the model cannot
    produce those ids, constrained or not. `eos_ids` are the ids that end generation; a
    grammar allows them exactly where the text may end. Thread-safe.
    """

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids: Iterable[int] = ()):
        self.vocab_size = vocab_size
        self._tokens = max(vocab_size, _token_count(tokenizer_json))  # what llguidance is told
        self._eos = sorted({int(i) for i in eos_ids})
        # the tokenizer.json as given: for Lark grammars that name special tokens (made on first use)
        self._tokenizer_json = tokenizer_json
        self._named: llguidance.LLTokenizer | None = None
        if not self._eos:  # llguidance knows EOS by its name ("</s>", "<|endoftext|>"...) there
            self._named = self._llg_tokenizer(tokenizer_json)
            self._eos = list(self._named.eos_tokens)
        marked, self._special_names = _mark_special_tokens(tokenizer_json)
        self._tokenizer = self._llg_tokenizer(marked)
        self.eos_ids = frozenset(self._eos)
        self.mask_words = llnp.get_bitmask_shape(1, self._tokens)[1]
        self._compiled: OrderedDict[str, _Compiled] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self, tokenizer_json: str) -> llguidance.LLTokenizer:
        tokenizer_json = _for_llguidance(tokenizer_json)
        try:
            return llguidance.LLTokenizer(tokenizer_json, n_vocab=self._tokens, eos_token=self._eos or None,
                                          slices=mask_slices())
        except ValueError as e:
            raise ValueError(f"llguidance cannot use this tokenizer.json with a vocabulary of "
                             f"{self._tokens}: {e}") from e

    def _tokenizer_for(self, constraint: Constraint) -> llguidance.LLTokenizer:
        """The marked tokenizer, or for a Lark grammar that names a special token (`<|im_end|>`:
        llguidance's syntax for that one token) the tokenizer as given, where names resolve."""
        if constraint.kind != "grammar":
            return self._tokenizer
        # (only outside Lark's strings and regexes: quoted, `"<tool_call>"` is text, and under the
        # tokenizer as given its forced bytes became that one token, which the parser refused)
        bare = _LARK_LITERALS.sub(" ", constraint.grammar)
        if not any(n in bare for n in self._special_names.values()):
            return self._tokenizer
        with self._lock:
            if self._named is None:
                self._named = self._llg_tokenizer(self._tokenizer_json)
            return self._named

    @classmethod
    def from_tokenizer(cls, tokenizer: Tokenizer, vocab_size: int) -> GrammarVocab:
        """From an amlx tokenizer (its tokenizer.json with the added tokens the config declares,
        and its EOS ids); byte-level BPE and SentencePiece byte-fallback vocabularies both work."""
        return cls(tokenizer.backend.to_str(), vocab_size, tokenizer.eos_token_ids)

    def matcher(self, constraint: Constraint) -> Matcher:
        """A fresh matcher at the start of `constraint`'s grammar.

        Raises ValueError with llguidance's message if the grammar does not compile against this
        tokenizer (e.g. it names a special token the vocabulary lacks). Compiling can take long
        for big schemas (it releases the GIL); call it off the event loop.
        """
        matcher = self.cached_matcher(constraint)
        if matcher is not None:
            return matcher
        if constraint.kind in ("json", "grammar"):  # (as parse_constraint does: a Constraint may be made by hand)
            check_definitions(constraint.grammar, f"{constraint.kind} constraint")
        template = self._compile(constraint)
        if template.is_error():
            raise ValueError(f"invalid {constraint.kind} constraint: {template.get_error().strip()}")
        # A grammar that no text can start (a regex of an empty class such as [^\x00-\U0010ffff],
        # a Lark terminal of one) compiles, and its first mask failed the request once queued,
        # with llguidance's "NoExtensionBias" as the reason. One mask, once per compiled grammar,
        # tells it here, before the request is queued.
        probe = template.deep_copy()
        llnp.fill_next_token_bitmask(probe, self.new_masks(1), 0)
        if probe.is_error() and probe.get_error().startswith("NoExtensionBias"):
            raise ValueError(f"invalid {constraint.kind} constraint: no text matches it (nothing may come first)")
        with self._lock:
            self._compiled[constraint.grammar] = _Compiled(template)
            self._evict()
        return Matcher(template.deep_copy(), self.mask_words)

    def cached_matcher(self, constraint: Constraint) -> Matcher | None:
        """A fresh matcher for `constraint` if its grammar is compiled already (a copy of one
        of its compiled copies, in turn: microseconds, so any thread may ask, the event loop
        included), else None."""
        with self._lock:
            compiled = self._compiled.get(constraint.grammar)
            if compiled is None:
                return None
            self._compiled.move_to_end(constraint.grammar)
            return Matcher(compiled.next().deep_copy(), self.mask_words)

    def _compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        """llguidance's compiled matcher of `constraint` (slow for big grammars), on a deep stack:
        llguidance compiles recursively, a frame per definition (limits.py)."""
        return on_deep_stack(functools.partial(llguidance.LLMatcher, log_level=0), self._tokenizer_for(constraint),
                             constraint.grammar)

    def claim_copy(self, constraint: Constraint) -> bool:
        """True if `constraint`'s grammar is compiled, has fewer than `MASK_LEXERS` copies and
        none being compiled: the caller then calls `add_copy` (off the event loop), once."""
        with self._lock:
            compiled = self._compiled.get(constraint.grammar)
            if compiled is None or compiled.compiling or len(compiled.templates) >= MASK_LEXERS:
                return False
            compiled.compiling = True
            return True

    def release_copy(self, constraint: Constraint) -> None:
        """Gives back a `claim_copy` that will not be followed by `add_copy`."""
        with self._lock:
            compiled = self._compiled.get(constraint.grammar)
            if compiled is not None:
                compiled.compiling = False

    def add_copy(self, constraint: Constraint) -> None:
        """Compiles one more copy of a grammar `claim_copy` gave (as slow as its first compile;
        the grammar is known to compile)."""
        template = None
        try:
            template = self._compile(constraint)
        finally:
            with self._lock:
                compiled = self._compiled.get(constraint.grammar)
                if compiled is not None:
                    compiled.compiling = False
                    if template is not None and not template.is_error():
                        compiled.templates.append(template)
                        self._evict()

    def _evict(self) -> None:
        """Keeps the cache within its bounds (under the lock): at most _CACHED_GRAMMARS
        grammars, the least recently used going first; then at most _CACHED_TEMPLATES compiled
        matchers, the extra copies of the least recently used grammars going first, then whole
        grammars (never the most recent one)."""
        while len(self._compiled) > _CACHED_GRAMMARS:
            self._compiled.popitem(last=False)
        total = sum(len(c.templates) for c in self._compiled.values())
        for compiled in list(self._compiled.values())[:-1]:
            if total <= _CACHED_TEMPLATES:
                break
            total -= len(compiled.templates) - 1
            del compiled.templates[1:]
        while total > _CACHED_TEMPLATES and len(self._compiled) > 1:
            _, compiled = self._compiled.popitem(last=False)
            total -= len(compiled.templates)

    def new_masks(self, rows: int) -> np.ndarray:
        """A (rows, mask_words) int32 bitmask array, every token allowed."""
        return llnp.allocate_token_bitmask(rows, self._tokens)

    def fill_masks(self, rows: Sequence[tuple[Matcher, int]], masks: np.ndarray) -> None:
        """For each (matcher, row): the tokens the matcher allows next, into `masks[row]`.

        All rows are computed in one call on llguidance's thread pool (the GIL released)."""
        if masks.shape[1] != self.mask_words:
            raise ValueError(f"masks have {masks.shape[1]} words per row, this vocabulary needs {self.mask_words}")
        llnp.fill_next_token_bitmask_par(_pool(), [(m._inner, row) for m, row in rows], masks)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes llguidance assigns to a token id: a special token's name (as the
        tokenizer.json has it), b"" for padding ids."""
        name = self._special_names.get(int(token_id))
        return name.encode() if name is not None else self._tokenizer.decode_bytes([int(token_id)])


class MaskJob:
    """The masks of one step, set up on the calling thread (the arrays, which row of which
    matcher goes where; with `advance`, by `run`); `run` fills them with one call into
    llguidance, which computes the rows in parallel on its thread pool without the GIL.

    Split so that a thread running `run` needs the GIL only to enter and leave that call:
    another thread busy in Python (the worker building a step) then delays it least.
    For each group of rows (a shard's batch) the result is a (rows, words) int32 bitmask, or
    None where no row of the group has a matcher (such a batch applies no mask); rows without
    a matcher, or whose matcher failed, allow every token. The matchers must not move between
    construction and `run`, unless the job moves them itself (`advance`)."""

    __slots__ = ("out", "seconds", "upload_seconds", "start_delay", "advanced", "_jobs", "_masks", "_upload",
                 "_made", "_buffers", "_blank", "_groups", "_advance")

    def __init__(self, groups: Sequence[Sequence[Matcher | None]],
                 upload: Callable[[np.ndarray], object] | None = None,
                 buffers: HostBuffers | None = None, advance: Callable[[], object] | None = None):
        """`buffers`: with `upload`, the masks are filled in an array taken from them (page-
        locked on CUDA, so the driver's upload is a DMA) and given back once uploaded.
        `advance`: called first by `run` (its result in `advanced`), to move the matchers on
        the thread that runs the job; the masks are then set up there, after it."""
        self._buffers = buffers if upload is not None else None
        self._upload = upload
        self._groups, self._advance = groups, advance
        self.advanced: object = None
        self.out: list[np.ndarray | None] = []
        self.seconds = 0.0  # how long the fill took (llguidance's share of a step's host time)
        self.upload_seconds = 0.0  # how long `upload` took
        self.start_delay = 0.0  # from construction until `run` began (a hand-over to another thread)
        if advance is None:
            self._setup()
        self._made = time.perf_counter()

    def _setup(self) -> None:
        """The arrays, and which row of which matcher goes where (as the matchers are now)."""
        groups = self._groups
        words = next((m.mask_words for g in groups for m in g if m is not None), 0)
        sizes = [len(g) if any(m is not None for m in g) else 0 for g in groups]
        if self._buffers is not None:
            self._masks = masks = self._buffers.take((sum(sizes), words))
        else:
            self._masks = masks = llnp.allocate_token_bitmask(sum(sizes), words * 32)
        jobs, start = [], 0
        for group, size in zip(groups, sizes):
            if size:
                jobs += [(m._inner, start + i) for i, m in enumerate(group)
                         if m is not None and not m._inner.is_error()]
            self.out.append(masks[start:start + size] if size else None)
            start += size
        self._jobs = jobs
        # rows llguidance does not fill, to allow every token in a reused buffer
        self._blank = sorted(set(range(start)) - {row for _, row in jobs}) if self._buffers is not None else []

    def run(self) -> list:
        """Fills the masks (any thread, once) and returns them, one per group: each passed
        through `upload` where the job was given one (so that the copy to the device is made
        on the thread that runs the job), else the host arrays."""
        self.start_delay = time.perf_counter() - self._made
        if self._advance is not None:
            self.advanced = self._advance()
            self._setup()
        masks = self._masks
        if self._blank:
            masks[self._blank] = -1
        if self._jobs:
            start = time.perf_counter()
            # what llnp.fill_next_token_bitmask_par does after checking the array made above
            _pool().unsafe_compute_mask_ptr(self._jobs, masks.ctypes.data, masks.shape[1] * 4, masks.shape[0])
            self.seconds = time.perf_counter() - start
        if self._upload is not None:
            start = time.perf_counter()
            try:
                self.out = [None if m is None else self._upload(m) for m in self.out]
            finally:
                if self._buffers is not None:  # (the upload copied them: the buffer is free again)
                    self._buffers.give(masks)
            self.upload_seconds = time.perf_counter() - start
        return self.out


def step_masks(groups: Sequence[Sequence[Matcher | None]]) -> list[np.ndarray | None]:
    """The masks of one step, computed on the calling thread (see `MaskJob`): for each group
    of rows (a shard's batch), a (rows, words) int32 bitmask, or None where no row of the
    group has a matcher. Every constrained row of every group is computed in one llguidance
    call, in parallel on its thread pool."""
    return MaskJob(groups).run()


def _token_count(tokenizer_json: str) -> int:
    """1 + the largest token id a tokenizer.json defines (its model's vocabulary and its added
    tokens); 0 where it cannot tell (llguidance then reports what it lacks)."""
    try:
        data = json.loads(tokenizer_json)
        vocab = data.get("model", {}).get("vocab")
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1] if isinstance(vocab, list) else []
        ids += [t.get("id") for t in data.get("added_tokens") or [] if isinstance(t, dict)]
        return 1 + max((i for i in ids if isinstance(i, int)), default=-1)
    except (ValueError, AttributeError, TypeError):
        return 0


def unpack_mask(masks: np.ndarray, vocab_size: int) -> np.ndarray:
    """The bitmask as a (rows, vocab_size) bool array (host side; for tests and checks)."""
    words = np.ascontiguousarray(masks, dtype="<i4")
    bits = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    return bits[..., :vocab_size].astype(bool)
