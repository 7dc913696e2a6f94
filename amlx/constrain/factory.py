"""Matchers for one engine, made on a background thread.

Building llguidance's view of a vocabulary takes seconds for a 150k-token one, and compiling a
large schema can take a while too: neither may run on the event loop (which submits requests)
nor on the worker (which decodes everybody else). So a `MatcherFactory` does both on a thread of
its own, the vocabulary once, on first use; a constrained request joins the scheduler's queue
when its matcher is ready. Once a grammar is compiled, the next requests with the same
constraint (a server's one schema) get theirs at once (`ready_matcher`, a copy in microseconds)
and are queued in the same call, as an unconstrained request is: they no longer reach the
scheduler one by one, each in a round of its own. Malformed constraints never get here: `GenerationOptions` has
already had llguidance check them (a ValueError before anything is queued).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from amlx.constrain.matcher import GrammarVocab, Matcher
from amlx.constrain.spec import Constraint

if TYPE_CHECKING:
    from amlx.tokenizer import Tokenizer

__all__ = ["MatcherFactory"]


class MatcherFactory:
    """Makes `Matcher`s for requests to one model (`tokenizer`, logits `vocab_size` wide)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._vocab: GrammarVocab | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self._lock = threading.Lock()

    def submit(self, constraint: Constraint) -> Future[Matcher]:
        """A future matcher for `constraint` (its exception: ValueError if llguidance rejects
        the grammar for this vocabulary). Any thread. Once closed, the future is cancelled (a
        request submitted as the model closes starts no thread that nobody would stop)."""
        with self._lock:
            if self._closed:
                future: Future[Matcher] = Future()
                future.cancel()
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="amlx-grammar")
            return self._pool.submit(self._make, constraint)

    def ready_matcher(self, constraint: Constraint) -> Matcher | None:
        """A matcher for `constraint` at once if the vocabulary is built and the grammar
        compiled already (a copy: microseconds, any thread), else None (use `submit`)."""
        vocab = self._vocab
        matcher = vocab.cached_matcher(constraint) if vocab is not None else None
        if matcher is not None:
            self._more_copies(vocab, constraint)
        return matcher

    @property
    def vocab(self) -> GrammarVocab | None:
        """The grammar vocabulary, once a matcher has been made (None before)."""
        return self._vocab

    def _make(self, constraint: Constraint) -> Matcher:
        if self._vocab is None:  # only this thread sets it
            self._vocab = GrammarVocab.from_tokenizer(self._tokenizer, self._vocab_size)
        matcher = self._vocab.matcher(constraint)
        self._more_copies(self._vocab, constraint)
        return matcher

    def _more_copies(self, vocab: GrammarVocab, constraint: Constraint) -> None:
        """A grammar whose requests keep coming gets another compiled copy on this factory's
        thread, up to `MASK_LEXERS` (its rows' masks then fill in parallel: matcher.mask_lexers),
        one at a time, so that a new grammar's first compile waits for one copy at most."""
        if not vocab.claim_copy(constraint):
            return
        with self._lock:
            pool = self._pool
            if pool is not None:
                try:
                    pool.submit(vocab.add_copy, constraint)
                    return
                except RuntimeError:  # (shut down meanwhile)
                    pass
        vocab.release_copy(constraint)

    def close(self) -> None:
        """Stops the thread once queued work is done (idempotent)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
