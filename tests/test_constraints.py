"""amlx.constrain on its own: option validation, llguidance's tokenizer built from tokenizer.json
(byte-level BPE and SentencePiece byte fallback), matchers and batched masks.

Generation here is a numpy loop over random logits: the logits say nothing, so only the mask can
make the text valid. Each check uses the format's own oracle: jsonschema, re.fullmatch, set
membership, a Lark parser.
"""

from __future__ import annotations

import json
import re

import jsonschema
import lark
import llguidance
import llguidance.numpy as llnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amlx.constrain import (Constraint, GrammarVocab, MaskJob, MatcherFactory, masked_logits, parse_constraint,
                            step_masks, unpack_mask)
from amlx.tokenizer import Tokenizer

try:
    from tests.helpers.tokenizers import write_tokenizer
except ImportError:  # tests/ itself on sys.path
    from helpers.tokenizers import write_tokenizer

KINDS = ("bpe", "spm")
PADDING = 13  # logits wider than the tokenizer, as with padded embeddings

SCHEMA = {
    "$defs": {
        "point": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": -50, "maximum": 50},
                "y": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "required": ["x", "y"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "origin": {"$ref": "#/$defs/point"},
        "path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 2},
        "meta": {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 4}},
            "required": ["ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "origin", "meta"],
    "additionalProperties": False,
}

REGEXES = (
    r"(?:[A-Z][a-z]{1,5} ){1,3}[0-9]{2,4}(?:\.[0-9]{1,2})?",
    r"[a-z]{1,8}@[a-z]{1,6}\.(?:com|org|net)",
    r"(?:yes|no|maybe)!?",
)

LARK = r"""
start: call (";" call)~0..2
call: NAME "(" [args] ")"
args: arg ("," arg)~0..2
arg: NUMBER | STRING | NAME "()"
NAME: /[a-z]{1,6}/
NUMBER: /-?[0-9]{1,4}/
STRING: /"[a-z ]{0,6}"/
"""

CHOICES = ["sports", "politics", "science", "he said \"hi\"", "back\\slash", "new\nline", "café ☕ 😀", "cat", "category"]


@pytest.fixture(scope="module", params=KINDS)
def family(request, tmp_path_factory):
    """(amlx tokenizer, GrammarVocab) of one tokenizer family."""
    path = tmp_path_factory.mktemp(f"tok_{request.param}")
    n = write_tokenizer(path, request.param)
    tok = Tokenizer.from_dir(path)
    return tok, GrammarVocab.from_tokenizer(tok, n + PADDING)


def _draw(logits: np.ndarray, rng: np.random.Generator, temperature: float) -> int:
    if temperature == 0:
        return int(np.argmax(logits))
    z = logits / temperature
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def generate_batch(vocab: GrammarVocab, constraints: list[Constraint], *, seed: int, temperature: float,
                   max_steps: int = 300, must_finish: bool = True):
    """Decodes all constraints in lockstep, one shared mask array filled in parallel per step.
    Returns the token ids of each row (EOS left out); with must_finish=False, also which rows ended."""
    rng = np.random.default_rng(seed)
    matchers = [vocab.matcher(c) for c in constraints]
    outputs: list[list[int]] = [[] for _ in constraints]
    live = list(range(len(constraints)))
    masks = vocab.new_masks(len(constraints))
    for _ in range(max_steps):
        live = [i for i in live if not matchers[i].finished]
        if not live:
            break
        vocab.fill_masks([(matchers[i], i) for i in live], masks)
        allowed = unpack_mask(masks, vocab.vocab_size)
        for i in live:
            logits = np.where(allowed[i], 3.0 * rng.standard_normal(vocab.vocab_size), -np.inf)
            token = _draw(logits, rng, temperature)
            assert matchers[i].consume(token), matchers[i].error
            if token in vocab.eos_ids:
                assert matchers[i].finished
            else:
                outputs[i].append(token)
    finished = [m.finished for m in matchers]
    if not must_finish:
        return outputs, finished
    assert all(finished), f"{finished.count(False)} rows did not finish in {max_steps} steps"
    return outputs


def _texts(family, constraint, n, temperature, seed=0) -> list[str]:
    tok, vocab = family
    return [tok.decode(ids) for ids in generate_batch(vocab, [constraint] * n, seed=seed, temperature=temperature)]


# ---------------------------------------------------------------------------------------------
# generation under each kind of constraint


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(family, temperature):
    c = parse_constraint(response_format={"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}})
    texts = _texts(family, c, 24, temperature)
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 1  # the random logits do vary the output


def test_json_object_outputs_are_objects(family):
    tok, vocab = family
    # any object may run long under random logits: the rows that end within the budget are checked
    c = parse_constraint(response_format={"type": "json_object"})
    outputs, finished = generate_batch(vocab, [c] * 16, seed=1, temperature=0.0, max_steps=60, must_finish=False)
    assert any(finished)
    for ids, done in zip(outputs, finished):
        if done:
            assert isinstance(json.loads(tok.decode(ids)), dict)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_outputs_fullmatch(family, pattern, temperature):
    for text in _texts(family, parse_constraint(regex=pattern), 16, temperature):
        assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_choice_outputs_are_members(family, temperature):
    texts = _texts(family, parse_constraint(choice=CHOICES), 40, temperature)
    assert set(texts) <= set(CHOICES)
    assert len(set(texts)) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_lark_grammar_outputs_parse(family, temperature):
    parser = lark.Lark(LARK, parser="earley")
    for text in _texts(family, parse_constraint(grammar=LARK), 16, temperature):
        parser.parse(text)  # raises on a mismatch


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(choices=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_any_choice_list_is_escaped_exactly(family, choices, seed):
    """Quotes, backslashes, control characters, astral characters: the alternation keeps them."""
    tok, vocab = family
    constraint = parse_constraint(choice=choices)
    for ids in generate_batch(vocab, [constraint] * 4, seed=seed, temperature=1.0):
        assert tok.decode(ids) in choices
    for c in choices:  # each choice, spelled by any tokenization, is a complete match
        m = vocab.matcher(constraint)
        ids = tok.encode(c, add_special_tokens=False)
        if tok.decode(ids) != c:  # the BPE normalizes to NFC; such a choice is spelled otherwise
            continue
        assert all(m.consume(i) for i in ids), m.error
        assert m.accepting


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_choices_that_unicode_normalization_changes_come_out_exactly(family, temperature):
    """Qwen's tokenizer normalizes to NFC; a choice is exact text all the same. Found by the test
    above: U+2F800 (NFC: U+4E3D) failed the request inside llguidance ("forced bytes: got 'ð';
    applying 'ä'"), as llguidance tokenized the forced text through the normalizer."""
    tok, vocab = family
    choices = ["\U0002F800", "e\u0301", "A\u030a!", "\ufb01x", "\U0001F600 \\u1234"]
    constraint = parse_constraint(choice=choices)
    for seed in range(6):
        for ids in generate_batch(vocab, [constraint] * 4, seed=seed, temperature=temperature):
            assert tok.decode(ids) in choices
    for c in choices:  # each one alone, forced from its first byte
        ids = generate_batch(vocab, [parse_constraint(choice=[c])], seed=0, temperature=temperature)[0]
        assert tok.decode(ids) == c


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_long_choice_list(family, temperature):
    """2,500 choices, some prefixes of others. Each choice was an alternative of the Lark start
    rule, so llguidance's Earley parser held one item per choice in a row: from 2,000 choices on,
    the request failed at its second token ("Current row has 2001 items; max is 2000")."""
    choices = [f"item {i}" for i in range(2500)]
    constraint = parse_constraint(choice=choices)
    for seed in range(3):
        assert set(_texts(family, constraint, 8, temperature, seed=seed)) <= set(choices)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_sentencepiece_space_symbol_as_text(family, temperature):
    """U+2581 ("▁"), SentencePiece's symbol for a space, as constrained text. Gemma's tokenizer
    maps " " to "▁", so llguidance tokenized forced "▁" as the token "▁", whose bytes are " ",
    and the request failed ("forced bytes: got 'â'; applying ' '"): a choice, a regex, a JSON
    key or const with "▁" in it."""
    tok, vocab = family
    schema = {"type": "object", "properties": {"▁k": {"const": "x▁y"}}, "required": ["▁k"], "additionalProperties": False}
    kinds = {"choice": parse_constraint(choice=["a▁b", "a▁c"]), "alone": parse_constraint(choice=["▁"]),
             "regex": parse_constraint(regex="▁{1,3}x"),
             "json": parse_constraint(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})}
    for seed in range(3):
        for (kind, _), ids in zip(kinds.items(), generate_batch(vocab, list(kinds.values()), seed=seed,
                                                                temperature=temperature)):
            text = tok.decode(ids)
            if kind == "json":
                assert json.loads(text) == {"▁k": "x▁y"}
            elif kind == "regex":
                assert re.fullmatch("▁{1,3}x", text), text
            else:
                assert text in ("a▁b", "a▁c", "▁"), (kind, text)


# ---------------------------------------------------------------------------------------------
# the matcher and the masks


def test_mask_is_exactly_what_the_matcher_takes(family):
    tok, vocab = family
    c = parse_constraint(regex=r"[a-c]{2}(?:x|yz)?")
    prefix = tok.encode("a", add_special_tokens=False)
    m = vocab.matcher(c)
    assert all(m.consume(t) for t in prefix)
    masks = vocab.new_masks(3)
    vocab.fill_masks([(m, 1)], masks)
    rows = unpack_mask(masks, vocab.vocab_size)
    assert rows[0].all() and rows[2].all()  # rows not named are left alone
    allowed = rows[1]
    assert allowed.any() and not allowed.all()
    for t in range(vocab.vocab_size):
        probe = vocab.matcher(c)
        assert all(probe.consume(p) for p in prefix)
        assert probe.consume(t) == allowed[t], t
        if not allowed[t]:  # a refused token leaves the matcher in its error state
            assert probe.error and probe.finished


STRING_SCHEMA = {  # strings of every length bound around the slices' (tests the slices where they apply)
    "type": "object",
    "properties": {"a": {"type": "string", "maxLength": 3}, "b": {"type": "string", "maxLength": 9},
                   "c": {"type": "string", "maxLength": 24}, "d": {"type": "string"},
                   "e": {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 7}}},
    "required": ["a", "b", "c", "d", "e"], "additionalProperties": False,
}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 16), temperature=st.sampled_from([0.0, 1.0]))
def test_the_mask_slices_change_no_mask(family, seed, temperature):
    """GrammarVocab's extra slices (short JSON strings, `mask_slices`) only let llguidance skip
    walking tokens: along random constrained walks every mask equals the one computed with no
    slices at all (each token walked), for schema strings with and without length bounds."""
    tok, vocab = family
    plain = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=vocab.vocab_size,
                                   eos_token=sorted(vocab.eos_ids) or None, slices=[])
    c = parse_constraint(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": STRING_SCHEMA}})
    m, ref = vocab.matcher(c), llguidance.LLMatcher(plain, c.grammar, log_level=0)
    rng = np.random.default_rng(seed)
    masks, want = vocab.new_masks(1), vocab.new_masks(1)
    for _ in range(120):
        if m.finished:
            break
        m.fill_mask(masks)
        llnp.fill_next_token_bitmask(ref, want, 0)
        np.testing.assert_array_equal(masks, want)
        allowed = unpack_mask(masks, vocab.vocab_size)[0]
        logits = np.where(allowed, 3.0 * rng.standard_normal(vocab.vocab_size), -np.inf)
        token = _draw(logits, rng, temperature)
        assert m.consume(token) and ref.consume_token(token)


def test_mask_slices_never_repeat_one_of_llguidances(family, monkeypatch):
    """A short-string slice llguidance already has (its 10 characters) is not given twice: a
    repeated slice failed every grammar's compile ("panic: repeating slices?")."""
    from amlx.constrain import matcher as matcher_module

    monkeypatch.setattr(matcher_module, "_SHORT_STRINGS", (2, 10))
    slices = matcher_module.mask_slices()
    assert len(slices) == len(set(slices)) and f"{matcher_module._STRING_CHARS}{{1,2}}" in slices
    tok, _ = family
    vocab = GrammarVocab.from_tokenizer(tok, tok.vocab_size + PADDING)
    m = vocab.matcher(parse_constraint(response_format={"type": "json_schema",
                                                        "json_schema": {"name": "s", "schema": STRING_SCHEMA}}))
    masks = vocab.new_masks(1)
    m.fill_mask(masks)
    assert not m.failed and unpack_mask(masks, vocab.vocab_size)[0].any()


def test_rollback_restores_the_mask(family):
    tok, vocab = family
    m = vocab.matcher(parse_constraint(regex=r"[a-c]{2}(?:x|yz)?"))
    masks = vocab.new_masks(1)
    m.fill_mask(masks)
    before = masks.copy()
    ids = tok.encode("ab", add_special_tokens=False)
    assert all(m.consume(t) for t in ids)
    m.fill_mask(masks)
    assert not np.array_equal(masks, before)
    assert m.rollback(len(ids))
    m.fill_mask(masks)
    np.testing.assert_array_equal(masks, before)


def test_eos_allowed_exactly_where_the_text_may_end(family):
    tok, vocab = family
    m = vocab.matcher(parse_constraint(choice=["cat", "category"]))
    masks = vocab.new_masks(1)
    eos = sorted(vocab.eos_ids)

    def eos_allowed() -> bool:
        m.fill_mask(masks)
        return bool(unpack_mask(masks, vocab.vocab_size)[0][eos].all())

    assert not eos_allowed()
    for t in tok.encode("cat", add_special_tokens=False):
        assert m.consume(t)
    assert m.accepting and not m.finished and eos_allowed()
    assert m.consume(eos[0]) and m.finished


def test_eos_ids_and_padding(family):
    tok, vocab = family
    assert vocab.eos_ids == tok.eos_token_ids and vocab.eos_ids
    m = vocab.matcher(parse_constraint(regex=".{1,3}"))
    masks = vocab.new_masks(1)
    m.fill_mask(masks)
    allowed = unpack_mask(masks, vocab.vocab_size)[0]
    assert not allowed[tok.vocab_size:].any()  # padding ids have no text
    assert not allowed[sorted(tok.special_token_ids - tok.eos_token_ids)].any()


def _added_names(tok: Tokenizer) -> dict[int, str]:
    """The ids llguidance takes as special (flagged so, or an added `<...>`) and their names."""
    added = tok.backend.get_added_tokens_decoder()
    return {i: t.content for i, t in added.items()
            if t.special or (t.content.startswith("<") and t.content.endswith(">"))}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_text_that_names_a_special_token_is_spelled_in_text(family, temperature):
    """A constraint whose text is a special token's name ("<|im_end|>", "<start_of_turn>", an added
    "<think>"): that text, in ordinary tokens. (llguidance tokenized such forced text into the
    special token, allowed it in the mask and then refused it: the request failed.)"""
    tok, vocab = family
    names = _added_names(tok)
    assert names
    for i, name in enumerate(names.values()):
        kinds = {"choice": parse_constraint(choice=[name]), "regex": parse_constraint(regex=re.escape(name)),
                 "prefixed": parse_constraint(choice=["ok " + name]),
                 "json": parse_constraint(response_format={"type": "json_schema", "json_schema": {
                     "name": "n", "schema": {"type": "object", "properties": {"t": {"const": name}},
                                             "required": ["t"], "additionalProperties": False}}})}
        outputs = generate_batch(vocab, list(kinds.values()), seed=i, temperature=temperature)
        for (kind, _), ids in zip(kinds.items(), outputs):
            assert not set(ids) & set(names), (name, kind, ids)
            text = tok.decode(ids)
            if kind == "json":
                assert json.loads(text) == {"t": name}
            else:
                assert text == ("ok " + name if kind == "prefixed" else name), (kind, text)


def test_a_lark_grammar_still_names_special_tokens(family):
    """llguidance's Lark names a special token by its name, outside quotes: that one token."""
    tok, vocab = family
    for token_id, name in _added_names(tok).items():
        if token_id in vocab.eos_ids:
            continue
        for grammar in (f'start: "ab" {name}', f'start: "ab" <[{token_id}]>'):
            (ids,) = generate_batch(vocab, [parse_constraint(grammar=grammar)], seed=0, temperature=1.0)
            assert ids[-1] == token_id and tok.decode(ids[:-1]) == "ab", (grammar, ids)


def _expected_bytes(tok: Tokenizer, token_id: int) -> bytes:
    """A token's bytes from its vocabulary string: the byte-level alphabet, or "▁" = space and
    "<0xNN>" pieces."""
    piece = tok.id_to_token(token_id)
    if re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
        return bytes([int(piece[3:5], 16)])
    if "▁" in tok.backend.to_str():  # SentencePiece style
        return piece.replace("▁", " ").encode()
    return bytes(_BYTE_LEVEL[ch] for ch in piece)


def _byte_level_alphabet() -> dict[str, int]:
    # GPT-2's table: printable bytes map to themselves, the others to U+0100 onwards.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_LEVEL = _byte_level_alphabet()


def test_token_bytes_match_the_vocabulary(family):
    """llguidance reads each id's bytes right from tokenizer.json, for both families."""
    tok, vocab = family
    for t in range(tok.vocab_size):
        if t in tok.special_token_ids or tok.id_to_token(t) in ("<unk>", "<mask>"):
            continue
        expected = _expected_bytes(tok, t)
        if b"\xff" in expected:  # never in UTF-8 text; llguidance uses the byte to mark special tokens
            continue
        assert vocab.token_bytes(t) == expected, (t, tok.id_to_token(t))


def test_compiled_grammars_are_shared_but_matchers_are_not(family):
    _, vocab = family
    c = parse_constraint(choice=["x", "y"])
    a, b = vocab.matcher(c), vocab.matcher(c)
    masks = vocab.new_masks(2)
    t = vocab._tokenizer.tokenize_str("x")[0]
    assert a.consume(t)
    vocab.fill_masks([(a, 0), (b, 1)], masks)
    assert not np.array_equal(masks[0], masks[1])


def test_step_masks_one_call_for_every_group(family):
    tok, vocab = family
    a = vocab.matcher(parse_constraint(choice=["x", "yy"]))
    b = vocab.matcher(parse_constraint(regex=r"[0-9]+"))
    c = vocab.matcher(parse_constraint(regex=r"[0-9]+"))
    assert c.consume(tok.encode("7", add_special_tokens=False)[0])
    failed = vocab.matcher(parse_constraint(regex="a"))
    assert not failed.consume(tok.encode("b", add_special_tokens=False)[0])
    first, none, last = step_masks([[None, a], [None, None], [b, None, c, failed]])
    assert none is None
    assert first.shape == (2, vocab.mask_words) and last.shape == (4, vocab.mask_words)
    everything = np.full(vocab.mask_words, -1, np.int32)
    np.testing.assert_array_equal(first[0], everything)
    np.testing.assert_array_equal(last[1], everything)
    np.testing.assert_array_equal(last[3], everything)  # a failed matcher constrains nothing
    for got, m in ((first[1], a), (last[0], b), (last[2], c)):
        one = vocab.new_masks(1)
        m.fill_mask(one)
        np.testing.assert_array_equal(got, one[0])
    assert not np.array_equal(last[0], last[2])  # c may end (EOS), b may not
    assert step_masks([[None], []]) == [None, None]


def test_mask_job_fills_what_step_masks_fills_on_any_thread(family):
    """A MaskJob set up on one thread and run on another gives step_masks' masks, and says how
    long llguidance took; one with no constrained row calls nothing."""
    import threading

    tok, vocab = family
    matchers = [vocab.matcher(parse_constraint(regex=r"[0-9]{1,3}")) for _ in range(5)]
    for i, m in enumerate(matchers[:3]):
        assert m.consume(tok.encode(str(i + 1), add_special_tokens=False)[0])
    groups = [[matchers[0], None, matchers[1]], [None], matchers[2:]]
    expected = step_masks(groups)
    job = MaskJob(groups)
    got = []
    worker = threading.Thread(target=lambda: got.append(job.run()))
    worker.start()
    worker.join()
    assert got[0][1] is None and expected[1] is None
    for a, b in ((got[0][0], expected[0]), (got[0][2], expected[2])):
        np.testing.assert_array_equal(a, b)
    assert job.seconds > 0
    empty = MaskJob([[None, None]])
    assert empty.run() == [None] and empty.seconds == 0


def test_mask_job_in_reused_host_buffers_fills_what_step_masks_fills(family):
    """Filled in an array taken from HostBuffers (page-locked on CUDA) and uploaded, a step's
    masks are step_masks' masks, rows without a matcher allowing every token although the
    reused buffer held something else; the buffer is given back once uploaded and taken again."""
    from amlx._mlx.pinned import HostBuffers

    tok, vocab = family
    matchers = [vocab.matcher(parse_constraint(regex=r"[0-9]{1,3}")) for _ in range(3)]
    assert matchers[0].consume(tok.encode("7", add_special_tokens=False)[0])
    groups = [[matchers[0], None], [None], [None, matchers[1], matchers[2]]]
    expected = step_masks(groups)
    buffers = HostBuffers()
    for _ in range(3):
        dirty = buffers.take((5, vocab.mask_words))
        dirty[...] = 0  # (forbids every token: what a reused buffer must not leak)
        buffers.give(dirty)
        job = MaskJob(groups, upload=np.array, buffers=buffers)
        got = job.run()
        assert got[1] is None
        for a, b in ((got[0], expected[0]), (got[2], expected[2])):
            np.testing.assert_array_equal(a, b)
        assert (got[0][1] == -1).all() and (got[2][0] == -1).all()
    again = buffers.take((5, vocab.mask_words))
    assert again.ctypes.data == dirty.ctypes.data  # one buffer, reused every time


def test_host_buffers_lend_each_buffer_once():
    """HostBuffers: arrays taken and not given back never share memory; a given-back buffer
    serves any later take it can hold; arrays not from it are ignored when given."""
    from amlx._mlx.pinned import HostBuffers

    buffers = HostBuffers()
    a, b = buffers.take((4, 8)), buffers.take((2, 3), np.float32)
    assert a.shape == (4, 8) and a.dtype == np.int32 and a.flags.c_contiguous and a.flags.writeable
    assert b.shape == (2, 3) and b.dtype == np.float32
    a[...], b[...] = 1, 2.0
    assert (a == 1).all() and (b == 2.0).all()  # disjoint
    buffers.give(a)
    c = buffers.take((2, 8))  # fits a's buffer
    assert c.ctypes.data == a.ctypes.data
    d = buffers.take((16, 8))  # fits none kept: a new one
    assert d.ctypes.data not in (a.ctypes.data, b.ctypes.data)
    buffers.give(np.zeros(3))  # not lent: ignored
    for x in (b, c, d):
        buffers.give(x)
    e = buffers.take((8, 8))  # the smallest kept buffer that holds it: d's
    assert e.ctypes.data == d.ctypes.data


def test_cached_matcher_only_once_compiled(family):
    """cached_matcher gives nothing for a grammar not compiled yet (compiling may be slow: it
    belongs on the factory's thread), then fresh, independent matchers at its start."""
    tok, vocab = family
    c = parse_constraint(regex=r"q[0-9]{2}z")
    assert vocab.cached_matcher(c) is None
    first = vocab.matcher(c)
    assert first.consume(tok.encode("q", add_special_tokens=False)[0])
    a, b = vocab.cached_matcher(c), vocab.cached_matcher(c)
    assert a is not None and b is not None and a is not b
    masks, fresh = vocab.new_masks(3), vocab.new_masks(1)
    vocab.fill_masks([(first, 0), (a, 1), (b, 2)], masks)
    vocab.matcher(c).fill_mask(fresh)
    np.testing.assert_array_equal(masks[1], fresh[0])
    np.testing.assert_array_equal(masks[2], fresh[0])
    assert not np.array_equal(masks[0], masks[1])


def test_factory_ready_matcher_after_the_first(family):
    """MatcherFactory.ready_matcher: None until the vocabulary is built and the grammar compiled
    (by submit's thread), then a matcher at once."""
    tok, _ = family
    factory = MatcherFactory(tok, tok.vocab_size)
    try:
        c = parse_constraint(choice=["left", "right"])
        assert factory.ready_matcher(c) is None
        factory.submit(c).result(timeout=60)
        m = factory.ready_matcher(c)
        assert m is not None and not m.finished
        assert factory.ready_matcher(parse_constraint(choice=["up"])) is None
    finally:
        factory.close()


def test_grammar_that_needs_the_vocabulary_fails_at_matcher(family):
    _, vocab = family
    c = parse_constraint(grammar='start: "a" <[999999]>')
    with pytest.raises(ValueError, match="invalid grammar constraint"):
        vocab.matcher(c)


# ---------------------------------------------------------------------------------------------
# option validation


def test_no_constraint():
    assert parse_constraint() is None
    assert parse_constraint(response_format={"type": "text"}) is None
    assert parse_constraint(response_format={"type": "text"}, regex="a").kind == "regex"


def test_kinds():
    assert parse_constraint(response_format={"type": "json_object"}).kind == "json"
    assert parse_constraint(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}).kind == "json"
    assert parse_constraint(regex="a+").kind == "regex"
    assert parse_constraint(choice=("a", "b")).kind == "choice"
    assert parse_constraint(grammar=LARK).kind == "grammar"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(regex="a", choice=["a"]), "at most one constraint per request, got regex and choice"),
        (dict(response_format={"type": "json_object"}, grammar=LARK), "at most one constraint"),
        (dict(regex="a(b"), "(?s)invalid regex: .*unclosed group"),
        (dict(regex=""), "regex must be a non-empty string"),
        (dict(regex=3), "regex must be a non-empty string"),
        (dict(choice=[]), "non-empty list of non-empty strings"),
        (dict(choice=["a", ""]), "non-empty list of non-empty strings"),
        (dict(choice=["a", 1]), "non-empty list of non-empty strings"),
        (dict(choice="abc"), "choice must be a list of strings"),
        (dict(grammar="start: foo"), "(?s)invalid grammar: .*unknown name"),
        (dict(grammar="  "), "grammar must be a non-empty Lark grammar"),
        (dict(response_format="json"), "response_format must be a dict"),
        (dict(response_format={"type": "xml"}), "response_format.type must be"),
        (dict(response_format={"type": "json_schema"}), "needs a 'json_schema' dict"),
        (dict(response_format={"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}), "name must be a string"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": "{}"}}), "schema must be a JSON schema object"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "foo"}}}), "invalid response_format: .*foo"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/nope"}}}), "invalid response_format: .*nope"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(("}}}), "(?s)invalid response_format: .*unclosed group"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"enum": [object()]}}}), "not JSON-serializable"),
        # llguidance reads JSON numbers as 64-bit floats (and integer bounds as 64-bit integers):
        # such schemas compiled, and their outputs broke them (2**53 + 1 came out 2**53; with
        # minimum 2**70, 9223372036854775807)
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"const": 2**53 + 1}}}), "cannot follow"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"enum": ["a", 2**70]}}}), "cannot follow"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "array", "items": {
            "enum": [1, [2, -2**60 - 1]]}}}}), r"items\.enum\[1\]\[1\] is .*cannot follow"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {
            "type": "integer", "minimum": 2**70, "maximum": 2**70 + 3}}}), "minimum is .*cannot follow"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {
            "n": {"type": ["integer", "null"], "exclusiveMaximum": -1e19}}}}}), "exclusiveMaximum is .*cannot follow"),
    ],
)
def test_bad_options_raise_value_error(options, message):
    for _ in range(2):  # (the second time from the remembered check: the same error)
        with pytest.raises(ValueError, match=message):
            parse_constraint(**options)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_numbers_within_the_exact_range_come_out_exactly(family, temperature):
    """Integers exact as 64-bit floats and float bounds of number schemas are followed exactly
    (the check above refuses only what llguidance would change)."""
    schema = {"type": "object", "properties": {
        "c": {"const": 2**53}, "e": {"enum": [-2**60, 7]}, "i": {"type": "integer", "minimum": 2**53 - 3, "maximum": 2**53},
        "j": {"type": "integer", "minimum": 2**62, "maximum": 2**62 + 1024},
        "f": {"type": "number", "minimum": 1e20, "maximum": 1e20}},
        "required": ["c", "e", "i", "j", "f"], "additionalProperties": False}
    c = parse_constraint(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    for text in _texts(family, c, 8, temperature):
        value = json.loads(text)
        jsonschema.validate(value, schema)
        assert value["f"] == 10**20


def test_a_grammar_is_checked_once(monkeypatch):
    """Requests with one schema (a server's usual load) have llguidance check it once: the
    check compiles the grammar on the event loop's thread, and 64 such requests submitted
    together were slow enough to reach the worker in two groups."""
    import llguidance

    from amlx.constrain import spec

    calls = []
    real = llguidance.LLMatcher.validate_grammar_with_warnings
    monkeypatch.setattr(spec.llguidance.LLMatcher, "validate_grammar_with_warnings",
                        lambda g: calls.append(g) or real(g))
    spec._grammar_problem.cache_clear()
    fmt = {"type": "json_schema", "json_schema": {"schema": {"type": "object", "properties": {"n": {"type": "integer"}}}}}
    first = [parse_constraint(response_format=fmt) for _ in range(5)]
    assert len(calls) == 1 and len({c.grammar for c in first}) == 1
    parse_constraint(regex="[a-z]+")
    assert len(calls) == 2  # another grammar is checked


# ---------------------------------------------------------------------------------------------
# the mask on the device


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 5), vocab=st.integers(1, 200), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(["float32", "bfloat16", "float16"]))
def test_masked_logits_on_device_match_numpy(rows, vocab, seed, dtype):
    from amlx._mlx import array, dtypes

    rng = np.random.default_rng(seed)
    words = (vocab + 31) // 32
    masks = rng.integers(-(2**31), 2**31, size=(rows, words), dtype=np.int64).astype(np.int32)
    masks[0] = -1  # an unconstrained row
    logits = rng.standard_normal((rows, vocab)).astype(np.float32)
    device_logits = array(logits).astype(getattr(dtypes, dtype))
    out = masked_logits(device_logits, masks)
    assert out.dtype is device_logits.dtype and out.shape == (rows, vocab)
    got = out.astype(dtypes.float32).numpy()
    expected = np.where(unpack_mask(masks, vocab), device_logits.astype(dtypes.float32).numpy(), -np.inf)
    np.testing.assert_array_equal(got, expected)


def test_masked_logits_shape_mismatch():
    from amlx._mlx import array

    with pytest.raises(ValueError, match="does not cover"):
        masked_logits(array(np.zeros((2, 65), np.float32)), np.full((2, 2), -1, np.int32))


@settings(max_examples=10, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(1, 130), seed=st.integers(0, 2**16))
def test_token_mask_in_a_compiled_function_matches_numpy(rows, vocab, seed):
    """The unpacking the compiled sampling step traces (padded words past the vocabulary cut off)."""
    from amlx._mlx import array, transforms
    from amlx.constrain.apply import token_mask

    rng = np.random.default_rng(seed)
    words = (vocab + 31) // 32 + int(rng.integers(0, 2))  # a mask may be wider than the logits
    masks = rng.integers(-(2**31), 2**31, size=(rows, words), dtype=np.int64).astype(np.int32)
    fn = transforms.compile(lambda m: token_mask(m, vocab))
    got = fn(array(masks)).numpy()
    np.testing.assert_array_equal(got, unpack_mask(masks, vocab))


def _random_masks(rng, rows: int, vocab: int, free_rows=()) -> np.ndarray:
    """Packed masks allowing a random ~third of the tokens (at least one) per row; rows in
    `free_rows` allow everything (an unconstrained row beside constrained ones)."""
    allowed = rng.random((rows, vocab)) < 0.3
    allowed[np.arange(rows), rng.integers(0, vocab, size=rows)] = True
    allowed[list(free_rows)] = True
    padded = np.zeros((rows, (vocab + 31) // 32 * 32), dtype=bool)
    padded[:, :vocab] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view(np.int32)


@pytest.mark.parametrize("options", [
    dict(),  # greedy
    dict(temperature=0.8, top_p=0.9, logprobs=True, top_logprobs=3),
    dict(temperature=1.2, top_k=5, repetition_penalty=1.3, presence_penalty=0.5, logprobs=True),
    dict(temperature=0.7, min_p=0.05, logit_bias={3: 5.0, 7: -2.0}, frequency_penalty=0.4),
])
@pytest.mark.parametrize("compile", [True, False])
@pytest.mark.parametrize("vocab", [97, 96])  # 96: whole mask words (the select on the packed layout)
def test_sampling_with_masks_is_sampling_masked_logits(options, compile, vocab):
    """The masks applied inside the (compiled) sampling step give the tokens, log-probabilities
    and next keys of sampling the masked logits, every row from its allowed set; a row whose
    mask is all ones samples exactly what it samples with no masks at all."""
    from amlx._mlx import array, dtypes
    from amlx.sample import BatchParams, SamplingParams, make_counts, make_history, make_keys, sample

    rng = np.random.default_rng(5)
    rows = 6
    logits = array(rng.standard_normal((rows, vocab)).astype(np.float32) * 3).astype(dtypes.bfloat16)
    params = BatchParams.build([SamplingParams(seed=i, **options) for i in range(rows)])
    history = make_history([[1, 2, 3]] * rows, vocab) if params.any_penalty else None
    counts = make_counts([[3, 3, 7]] * rows, vocab) if params.any_counts else None
    keys = make_keys(list(range(rows)))
    masks = _random_masks(rng, rows, vocab, free_rows=(0, 4))
    for step in range(3):
        got = sample(logits, params, keys, history, counts, compile=compile, masks=array(masks))
        want = sample(masked_logits(logits, masks), params, keys, history, counts, compile=compile)
        free = sample(logits, params, keys, history, counts, compile=compile)
        for a, b in zip(got, want):
            if a is not None:
                np.testing.assert_array_equal(a.numpy(), b.numpy())
        tokens = got.tokens.numpy()
        assert unpack_mask(masks, vocab)[np.arange(rows), tokens].all()
        for row in (0, 4):
            assert tokens[row] == free.tokens.numpy()[row]
            np.testing.assert_array_equal(got.logprobs.numpy()[row], free.logprobs.numpy()[row])
        keys, history, counts = got.keys, got.history, got.counts
        masks = _random_masks(rng, rows, vocab, free_rows=(0, 4))


def test_mask_threads_option(monkeypatch):
    from amlx.constrain.matcher import mask_threads

    monkeypatch.delenv("AMLX_MASK_THREADS", raising=False)
    assert mask_threads() is None  # llguidance's default
    monkeypatch.setenv("AMLX_MASK_THREADS", "3")
    assert mask_threads() == 3
    for bad in ("0", "-1", "two"):
        monkeypatch.setenv("AMLX_MASK_THREADS", bad)
        with pytest.raises(ValueError, match="AMLX_MASK_THREADS"):
            mask_threads()
