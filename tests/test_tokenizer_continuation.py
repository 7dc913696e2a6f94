"""Text that goes on after earlier text: `Tokenizer.continuation_ids` (score's string
continuations) and `Tokenizer.token_text` (the server's logprob tokens), against transformers,
for byte-level BPE (Qwen), SentencePiece byte fallback (Gemma) and the two Llama-2-style
pipelines whose decoders drop a text's leading space (a Strip or a Metaspace decoder).

The oracle is how transformers tokenizes a prompt and its continuation written together:
`encode(prompt + continuation)` is `encode(prompt)` followed by the continuation's ids
wherever the prompt ends in a character that does not join the next (here ":").
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx
from tests.helpers.checkpoints import make_checkpoint
from tests import test_text_streams_fuzz as streams

# the four tokenizer pipelines, and their fixture (kind -> amlx's, transformers', hard ids)
KINDS, pairs, _write_llama_style = streams.KINDS, streams.pairs, streams._write_llama_style

WORDS = ["sports", "the", "cat", "é", "日本", "😀", "a", "x1", "Politics", "ok!"]


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=4), prompt=st.sampled_from(["Answer:", "Q: a?\nA:"]))
def test_a_continuation_tokenizes_as_it_does_after_its_prompt(pairs, kind, words, prompt):
    ours, hf, _ = pairs[kind]
    text = "".join(" " + w for w in words)
    together = hf.encode(prompt + text, add_special_tokens=False)
    alone = hf.encode(prompt, add_special_tokens=False)
    assert together[:len(alone)] == alone  # (the oracle's premise: ":" joins nothing after it)
    assert ours.continuation_ids(text) == together[len(alone):]


def test_the_old_reading_differed_on_llama2(pairs):
    """What continuation_ids fixes: a Llama-2-style tokenizer puts "▁" before a text of its
    own, so " sports" alone is "▁", "▁sp"... (two spaces), not what follows a prompt."""
    ours, _, _ = pairs["llama2"]
    assert ours.encode(" sports", add_special_tokens=False) != ours.continuation_ids(" sports")
    assert ours.decode(ours.continuation_ids(" sports")) == "sports"  # (a text's first "▁" dropped)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(words=st.lists(st.sampled_from([w for w in WORDS if w.isascii()]), min_size=1, max_size=5))
def test_token_texts_join_to_the_text_they_continue(pairs, kind, words):
    """Each token's text as it reads after earlier text: joined, the tokens of an ASCII
    continuation give it back, space included (decoded alone, "▁the" is "the" on Llama 2)."""
    ours, hf, _ = pairs[kind]
    text = "".join(" " + w for w in words)
    ids = ours.continuation_ids(text)
    assert "".join(ours.token_text(i) for i in ids) == text
    lead = hf.encode("Answer:", add_special_tokens=False)
    assert hf.decode(lead + ids) == hf.decode(lead) + text


def test_score_reads_a_string_continuation_as_the_prompt_goes_on(tmp_path):
    """On a Llama-2-style tokenizer, score(prompt, [" sports"]) scores the ids that follow the
    prompt in the text, not "▁" then "▁sports"."""
    path = make_checkpoint(tmp_path / "llama2", "llama", seed=3, tokenizer="spm")
    _write_llama_style(path, "llama2")
    with amlx.load_sync(path) as model:
        tok = model.tokenizer
        prompt = tok.encode("Topic:")
        cont = tok.continuation_ids(" sports")
        assert cont != tok.encode(" sports", add_special_tokens=False)

        async def both():
            return await model.score(prompt, [" sports", cont])

        import anyio

        by_text, by_ids = anyio.run(both)
        assert by_text == by_ids
