"""Constraint masks of a verify step (amlx.speculative.constrained), against matchers walked
token by token, and composed with `verify`: constrained rows only ever emit allowed tokens."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amlx import _mlx as mx
from amlx.constrain import GrammarVocab, parse_constraint, unpack_mask
from amlx.sample import BatchParams, SamplingParams, make_keys
from amlx.speculative.constrained import draft_masks
from amlx.speculative.verify import Drafts, VerifyParams, verify
from amlx.tokenizer import Tokenizer

try:
    from tests.helpers.tokenizers import write_tokenizer
except ImportError:  # run from inside tests/
    from helpers.tokenizers import write_tokenizer

K = 4
PADDING = 13  # logits wider than the tokenizer, as with padded embeddings


@pytest.fixture(scope="module")
def grammar(tmp_path_factory):
    path = tmp_path_factory.mktemp("spec_constrained")
    write_tokenizer(path, "bpe")
    tok = Tokenizer.from_dir(path)
    vocab = GrammarVocab.from_tokenizer(tok, len(tok) + PADDING)
    constraint = parse_constraint(choice=["maybe later", "yes please", "no thanks"])
    return tok, vocab, constraint


def walked_masks(vocab, constraint, drafts, length):
    """A fresh matcher's masks at positions 0..length, consuming the drafts one by one
    (stopping at the first it refuses), and that cut length."""
    m = vocab.matcher(constraint)
    masks = vocab.new_masks(K + 1)
    for j in range(K + 1):
        m.fill_mask(masks, j)
        if j == length:
            return masks, length
        if not unpack_mask(masks[j:j + 1], vocab.vocab_size)[0, drafts[j]] or not m.consume(int(drafts[j])):
            return masks, j
    raise AssertionError("unreachable")


def row_drafts(tok, text: str) -> np.ndarray:
    ids = tok.encode(text, add_special_tokens=False)[:K]
    return np.asarray(ids + [0] * (K - len(ids)), np.int32), len(ids)


@pytest.mark.parametrize("texts", [("maybe later", None, "yes pl"), ("no th", "zzz", "maybe xx")])
def test_masks_are_those_of_a_matcher_walked_over_the_drafts(grammar, texts):
    tok, vocab, constraint = grammar
    rows = [row_drafts(tok, t if t is not None else "hello") for t in texts]
    drafts = np.stack([d for d, _ in rows])
    lengths = [n for _, n in rows]
    matchers = [None if t is None else vocab.matcher(constraint) for t in texts]
    before = vocab.new_masks(len(texts))
    for i, m in enumerate(matchers):
        if m is not None:
            m.fill_mask(before, i)
    masks, cut = draft_masks(vocab, matchers, drafts, lengths)
    allowed = unpack_mask(masks, vocab.vocab_size).reshape(len(texts), K + 1, -1)
    for i, t in enumerate(texts):
        if t is None:
            assert allowed[i].all() and cut[i] == lengths[i]
            continue
        want, n = walked_masks(vocab, constraint, drafts[i], lengths[i])
        assert cut[i] == n
        np.testing.assert_array_equal(allowed[i, :n + 1], unpack_mask(want[:n + 1], vocab.vocab_size))
        assert allowed[i, n + 1:].all()
    after = vocab.new_masks(len(texts))
    for i, m in enumerate(matchers):  # every matcher is back where it stood
        if m is not None:
            m.fill_mask(after, i)
    np.testing.assert_array_equal(after, before)


def test_no_matcher_no_masks(grammar):
    _, vocab, _ = grammar
    masks, cut = draft_masks(vocab, [None, None], np.zeros((2, K), np.int32), [2, 0])
    assert masks is None and cut == [2, 0]


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), prefix=st.sampled_from(["maybe later", "yes please", "no t", ""]))
def test_constrained_rows_only_emit_what_the_grammar_allows(grammar, seed, prefix):
    """Drafts that follow the grammar for a while, then random tokens; random logits; greedy and
    sampling rows: every emitted token is one the matcher accepts, in order."""
    tok, vocab, constraint = grammar
    rng = np.random.default_rng(seed)
    b = 3
    drafts = np.zeros((b, K), np.int32)
    lengths = []
    for i in range(b):
        d, n = row_drafts(tok, prefix)
        n = int(rng.integers(0, n + 1)) if n else 0
        drafts[i, :n] = d[:n]
        drafts[i, n:] = rng.integers(0, len(tok), K - n)
        lengths.append(K)
    matchers = [vocab.matcher(constraint) for _ in range(b)]
    masks, cut = draft_masks(vocab, matchers, drafts, lengths)
    params = [SamplingParams(), SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=5)]
    logits = rng.normal(0, 3, (b, K + 1, vocab.vocab_size)).astype(np.float32)
    out = verify(mx.array(logits), Drafts(mx.array(drafts), mx.array(np.asarray(cut, np.int32))),
                 VerifyParams.build(BatchParams.build(params), K + 1), make_keys([seed, seed + 1, seed + 2]),
                 masks=masks)
    for m, row in zip(matchers, out.read()):
        for token in row.tokens:
            assert m.consume(token), (row, m.error)
