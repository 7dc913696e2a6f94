"""A grammar's requests spread over separately compiled copies of it (amlx.constrain.matcher's
`MASK_LEXERS`), so that their masks fill in parallel: the copies give the same masks as one
compiled grammar, the factory compiles them off the event loop one at a time up to the bound,
and the cache's bounds hold with them (extra copies of the least recently used grammars go
first)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx.constrain.matcher as matcher_module
from amlx.constrain import GrammarVocab, MatcherFactory, parse_constraint, step_masks
from amlx.tokenizer import Tokenizer
from helpers.tokenizers import write_tokenizer

SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 6}, "n": {"type": "integer"}},
          "required": ["a", "n"], "additionalProperties": False}


@pytest.fixture(scope="module", params=("bpe", "spm"))
def tokenizer(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"tok_{request.param}")
    write_tokenizer(path, request.param)
    return Tokenizer.from_dir(path)


@pytest.fixture
def lexers(monkeypatch):
    monkeypatch.setattr(matcher_module, "MASK_LEXERS", 4)


def test_the_factory_compiles_copies_up_to_the_bound(tokenizer, lexers):
    factory = MatcherFactory(tokenizer, tokenizer.vocab_size)
    try:
        c = parse_constraint(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
        factory.submit(c).result(timeout=60)
        for _ in range(12):  # each request that finds the grammar compiled asks for one more copy
            assert factory.ready_matcher(c) is not None
            factory.submit(c).result(timeout=60)  # (queued behind the copy: it is done after this)
        assert len(factory.vocab._compiled[c.grammar].templates) == 4
        assert not factory.vocab.claim_copy(c)  # at the bound: no more
    finally:
        factory.close()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_matchers_from_every_copy_allow_the_same_tokens(tokenizer, lexers, seed):
    """Rows spread over four copies walk a random path the grammar allows: at every step each
    row's mask equals that of a matcher from the one grammar compiled once."""
    vocab = GrammarVocab.from_tokenizer(tokenizer, tokenizer.vocab_size)
    c = parse_constraint(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
    reference = vocab.matcher(c)
    while vocab.claim_copy(c):
        vocab.add_copy(c)
    rows = [vocab.cached_matcher(c) for _ in range(8)]
    assert len({id(t) for t in vocab._compiled[c.grammar].templates}) == 4
    rng = np.random.default_rng(seed)
    for _ in range(12):
        if reference.finished:
            break
        masks = step_masks([[reference, *rows]])[0]
        for row in masks[1:]:
            np.testing.assert_array_equal(row, masks[0])
        bits = np.unpackbits(masks[0].view(np.uint8), bitorder="little")[:tokenizer.vocab_size]
        token = int(rng.choice(np.flatnonzero(bits)))
        for m in (reference, *rows):
            assert m.consume(token)


def test_claim_copy_is_given_once_until_the_copy_is_done(tokenizer, lexers):
    vocab = GrammarVocab.from_tokenizer(tokenizer, tokenizer.vocab_size)
    c = parse_constraint(regex=r"[a-z]{2,5}")
    assert not vocab.claim_copy(c)  # not compiled: nothing to copy
    vocab.matcher(c)
    assert vocab.claim_copy(c) and not vocab.claim_copy(c)
    vocab.release_copy(c)
    assert vocab.claim_copy(c)
    vocab.add_copy(c)
    assert len(vocab._compiled[c.grammar].templates) == 2
    assert vocab.claim_copy(c)


def test_extra_copies_of_the_least_recent_grammars_go_first(tokenizer, lexers, monkeypatch):
    monkeypatch.setattr(matcher_module, "_CACHED_TEMPLATES", 6)
    monkeypatch.setattr(matcher_module, "_CACHED_GRAMMARS", 3)
    vocab = GrammarVocab.from_tokenizer(tokenizer, tokenizer.vocab_size)
    a, b, c, d = (parse_constraint(choice=[w, w + "x"]) for w in ("up", "down", "left", "right"))

    def copies(constraint) -> int:
        compiled = vocab._compiled.get(constraint.grammar)
        return 0 if compiled is None else len(compiled.templates)

    for g in (a, b):
        vocab.matcher(g)
        while vocab.claim_copy(g):
            vocab.add_copy(g)
    assert (copies(a), copies(b)) == (1, 4)  # b's third copy (7 in all) trimmed a's extra ones
    vocab.matcher(c)
    assert (copies(a), copies(b), copies(c)) == (1, 4, 1)
    vocab.matcher(d)  # a fourth grammar: the least recently used one goes, whole
    assert (copies(a), copies(b), copies(c), copies(d)) == (0, 4, 1, 1)
    assert vocab.cached_matcher(a) is None and vocab.cached_matcher(b) is not None
    vocab.matcher(a)  # (b was just used) a comes back: the least recent, c, goes; b keeps its copies
    assert (copies(a), copies(b), copies(c), copies(d)) == (1, 4, 0, 1)


def test_a_grammar_submitted_after_close_starts_no_thread(tokenizer):
    """A constrained request submitted as the model closes: its future is cancelled (the engine
    ends it with ClosedError) and no grammar thread is started that nobody would stop."""
    import threading

    factory = MatcherFactory(tokenizer, tokenizer.vocab_size)
    factory.close()
    before = set(threading.enumerate())
    future = factory.submit(parse_constraint(choice=["yes", "no"]))
    assert future.cancelled()
    assert set(threading.enumerate()) <= before
