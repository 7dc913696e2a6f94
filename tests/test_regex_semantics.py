"""A regex constraint and a JSON schema's patterns mean what Python's `re` means by them.

amlx's oracle for structured outputs is Python: a `regex` constraint's text satisfies
`re.fullmatch`, a schema's strings `jsonschema` (which checks "pattern" with `re.search`).
llguidance reads patterns with Rust's regex-syntax, which differs from `re` on some constructs
(Unicode tables of `\\w \\d \\s`, case folding, `x{1,3}+`, `a{ 1 }`, verbose classes...);
handed over as written, such patterns let the model write text its own pattern rejects.
amlx.constrain.pyregex rewrites them from Python's parse, or refuses what llguidance cannot
follow. Here each construct is checked both ways the model meets it:

- whether the matcher takes a text (its bytes, one byte token at a time, which a model could
  sample as well): every text the matcher accepts satisfies `re`, and for a regex constraint,
  every text `re` accepts is taken (the rewriting narrows nothing there but `$`);
- text sampled under the masks from random logits leaning to non-ASCII tokens: it satisfies `re`.

Refused constructs raise ValueError naming the construct and the pattern, also through
`Model.generate` (and so a 400 from the server).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import tempfile
from pathlib import Path

import anyio
import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import amlx
from amlx.constrain import Constraint, GrammarVocab, parse_constraint, unpack_mask
from amlx.tokenizer import Tokenizer

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.tokenizers import write_tokenizer
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from helpers.tokenizers import write_tokenizer

# Characters where Python's `re` and Rust's regex-syntax disagree, and some neighbours: combining
# marks, U+203F (Pc), ZWJ, digits newer than Python 3.11's Unicode tables, numerics that are
# words to Python ("½", "²"), U+001C-U+001F (blanks to Python), U+FEFF (a blank to ECMA-262),
# the characters Python's case folding pairs with i, k and s, and some ASCII.
TRICKY = ("a", "b", "k", "s", "x", "z", "A", "K", "S", "0", "9", "_", " ", "-", "{", "}", ",", "\n", "\r", "\t",
          "\x0b", "\x1c", "\x1f", "\x85", "\xa0", "\u2028", "\ufeff", "\u0301", "\u0903", "\u203f", "\u200d",
          "é", "ß", "½", "²", "٣", "\U00011f50", "\U00016d77", "\U0001ccf0", "ı", "İ", "\u212a", "ſ", "Σ", "ς",
          "中", "😀")

# (pattern, texts that llguidance took for the pattern as written and `re.fullmatch` rejects)
REGEX_CASES = [
    (r"\w+", ["a\u0301", "\u203f", "\u200d", "\U00011f50"]),  # marks, Pc, ZWJ, newer letters/digits
    (r"[\w]{1,3}", ["\u0903", "x\u0301"]),
    (r"\d+", ["\U00011f50", "\U00016d77", "\U0001ccf0"]),  # digits of Unicode 15/16 (Python 3.11: 14)
    (r"\W", ["½", "²"]),  # numerics: words to Python
    (r"[^\w]", ["½"]),
    (r"\S+", ["\x1c", "\x1f"]),  # blanks to Python
    (r"[^\d\s]", ["\x1c"]),
    (r"(?i)[^a-z]", ["ı", "İ"]),  # Python's case folding pairs them with i
    (r"a{ 1 }", ["a"]),  # literal text to Python, a counted repetition to Rust
    (r"a{1, 2}", ["a", "aa"]),
    (r"(?x)[^ a]", [" "]),  # whitespace counts inside a class in Python's verbose mode
]

# (pattern, strings that llguidance took for a schema's pattern as written and `re.search` rejects)
SCHEMA_CASES = [
    (r"^\W+$", ["é", "K"]),  # llguidance's ASCII \w made \W take letters
    (r"^\D+$", ["٣"]),
    (r"^[^\w]$", ["é"]),
    (r"\S", ["\x1c", "\x1f"]),
    (r"^[^\d\s]+$", ["٣"]),
    (r"(?i)^[^a-z]+$", ["ı", "İ"]),
    (r"^a{1, 2}$", ["a"]),
    (r"(?x)^[^ a]$", [" "]),
]

REFUSED = [
    (r"x{1,3}+", "possessive quantifiers"),
    (r"x?+y", "possessive quantifiers"),
    (r"(?>ab|a)b", "atomic groups"),
    (r"a(?=b)b", "lookahead and lookbehind"),
    (r"(?<=a)b", "lookahead and lookbehind"),
    (r"a(?!c)b", "negative lookahead"),
    (r"(a)\1", "backreferences"),
    (r"(?P<x>a)(?P=x)", "backreferences"),
    (r"(a)?(?(1)b|c)", "conditional groups"),
    (r"a\b", r"word boundaries \(\\b, \\B\)"),
    (r"\Ba", "word boundaries"),
    (r"(?m)^a$", "MULTILINE"),
    (r"a^b", r"'\^' and '\\A' are supported only at the start"),
    (r"a$b", r"'\$' and '\\Z' are supported only at the end"),
    (r"(?:^a)*", "only at the start"),
    (r"[[:alpha:]]", r"'\[\[' \(a nested or POSIX class to Rust\) in a class: Python's re reads it as plain"),
    (r"[a-z&&[^b]]", r"'&&' \(a set operation to Rust\) in a class: Python's re reads it as plain characters"),
    (r"[a-c--b]", r"'--' \(a set operation to Rust\)"),
    (r"[a-c~~b]", r"'~~' \(a set operation to Rust\)"),
    (r"[ab||c]", r"'\|\|' in a class"),
    (r"\p{L}", r"not a regular expression Python's re can read \(bad escape \\p"),
    (r"\P{Lu}", r"bad escape \\P"),
    (r"a\z", r"bad escape \\z"),
    (r"\x{41}", r"incomplete escape \\x"),
    (r"(?<n>a)", r"unknown extension \?<n"),
    (r"(?U)a+", r"unknown extension \?U"),
    (r"a**", "multiple repeat"),
]


# ---------------------------------------------------------------------------------------------
# the matcher, fed byte by byte


@pytest.fixture(scope="module", params=("bpe", "spm"))
def family(request, tmp_path_factory):
    """(GrammarVocab, {byte: a token id of exactly that byte}) of one tokenizer family."""
    path = tmp_path_factory.mktemp(f"tok_{request.param}")
    n = write_tokenizer(path, request.param)
    tok = Tokenizer.from_dir(path)
    vocab = GrammarVocab.from_tokenizer(tok, n)
    byte_ids: dict[int, int] = {}
    for t in range(n):
        if t not in tok.special_token_ids and len(vocab.token_bytes(t)) == 1:
            byte_ids.setdefault(vocab.token_bytes(t)[0], t)
    assert set(byte_ids) >= set(range(0xF5)) - {0xC0, 0xC1}, "a byte of UTF-8 text has no token of its own"
    return vocab, byte_ids


def takes(family, constraint: Constraint, text: str) -> bool:
    """Whether the constraint lets a model write exactly `text` (and end there)."""
    vocab, byte_ids = family
    matcher = vocab.matcher(constraint)
    return all(matcher.consume(byte_ids[b]) for b in text.encode()) and matcher.accepting


def sample(family, constraint: Constraint, n: int, seed: int, max_steps: int = 32) -> list[str]:
    """n texts decoded under the masks from random logits that lean to non-ASCII tokens (where
    the engines disagree), and to EOS and a closing quote (so that texts end); those that
    ended within max_steps."""
    vocab, _ = family
    rng = np.random.default_rng(seed)
    lean = np.array([2.0 if any(b >= 0x80 for b in vocab.token_bytes(t)) else
                     4.0 if vocab.token_bytes(t).endswith(b'"') else 0.0 for t in range(vocab.vocab_size)])
    lean[list(vocab.eos_ids)] = 6.0
    texts = []
    for _ in range(n):
        matcher, out = vocab.matcher(constraint), b""
        masks = vocab.new_masks(1)
        for _ in range(max_steps):
            if matcher.finished:
                break
            vocab.fill_masks([(matcher, 0)], masks)
            logits = np.where(unpack_mask(masks, vocab.vocab_size)[0], lean + rng.standard_normal(vocab.vocab_size),
                              -np.inf)
            p = np.exp(logits - logits.max())
            token = int(rng.choice(vocab.vocab_size, p=p / p.sum()))
            assert matcher.consume(token), matcher.error
            if token not in vocab.eos_ids:
                out += vocab.token_bytes(token)
        if matcher.finished:
            texts.append(out.decode())
    return texts


def schema_of(pattern: str) -> dict:
    return {"type": "string", "pattern": pattern}


def as_format(schema: dict) -> dict:
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}


# ---------------------------------------------------------------------------------------------
# constructs where the engines differ


@pytest.mark.parametrize("pattern, texts", REGEX_CASES)
def test_regex_takes_no_text_that_re_rejects(family, pattern, texts):
    constraint = parse_constraint(regex=pattern)
    for text in texts:
        assert not re.fullmatch(pattern, text)  # (the oracle's verdict, for the record)
        assert not takes(family, constraint, text), (pattern, text)


@pytest.mark.parametrize("pattern, texts", REGEX_CASES)
def test_regex_samples_fullmatch(family, pattern, texts):
    outputs = sample(family, parse_constraint(regex=pattern), 24, seed=len(pattern))
    assert outputs
    for text in outputs:
        assert re.fullmatch(pattern, text), (pattern, text)


@pytest.mark.parametrize("pattern, texts", SCHEMA_CASES)
def test_schema_pattern_takes_no_string_that_re_search_rejects(family, pattern, texts):
    constraint = parse_constraint(**as_format(schema_of(pattern)))
    for text in texts:
        assert not re.search(pattern, text)
        assert not takes(family, constraint, json.dumps(text, ensure_ascii=False)), (pattern, text)
        assert not takes(family, constraint, json.dumps(text)), (pattern, text)


@pytest.mark.parametrize("pattern, texts", SCHEMA_CASES)
def test_schema_pattern_samples_validate(family, pattern, texts):
    outputs = sample(family, parse_constraint(**as_format(schema_of(pattern))), 24, seed=len(pattern))
    assert outputs
    for text in outputs:
        jsonschema.validate(json.loads(text), schema_of(pattern))


def test_pattern_properties_names_follow_python(family):
    """patternProperties' names are patterns too: llguidance's ASCII \\w let "é" pass as a name
    that is not \\w (Python's \\w takes é), so the additionalProperties: false held it."""
    schema = {"type": "object", "patternProperties": {r"^\W+$": {"type": "integer"}},
              "additionalProperties": False}
    constraint = parse_constraint(**as_format(schema))
    assert takes(family, constraint, '{"-": 1}')
    assert not takes(family, constraint, '{"é": 1}')
    for text in sample(family, constraint, 16, seed=1):
        jsonschema.validate(json.loads(text), schema)


def test_ecma_classes_in_a_schema_and_python_classes_in_a_regex(family):
    """A schema's \\d and \\w are ASCII (what both `re` and ECMA-262, JSON Schema's dialect,
    take), as llguidance's schema compiler had them; a regex constraint's are Python's."""
    assert takes(family, parse_constraint(regex=r"\d\w"), "٣é")
    assert takes(family, parse_constraint(**as_format(schema_of(r"^\d\w$"))), '"7x"')
    assert not takes(family, parse_constraint(**as_format(schema_of(r"^\d\w$"))), '"٣é"')


def test_what_python_reads_literally_is_text(family):
    """Braces that are no quantifier to Python, and escapes Rust lacks, mean what Python says
    (llguidance refused some of them as written)."""
    for pattern, text in [("a{", "a{"), ("{", "{"), ("a{x}", "a{x}"), ("a{1", "a{1"), ("a{1,x}", "a{1,x}"),
                          (r"\N{LATIN SMALL LETTER E WITH ACUTE}\0\101", "é\x00A"), (r"(?#[[)x", "x")]:
        assert re.fullmatch(pattern, text)
        assert takes(family, parse_constraint(regex=pattern), text), pattern


# ---------------------------------------------------------------------------------------------
# any pattern built of the constructs


_ATOMS = st.sampled_from([r"\w", r"\W", r"\d", r"\D", r"\s", r"\S", ".", "a", "k", "s", "é", "ı", r"\.", r"\{",
                          "[a-z]", "[^a-z]", r"[^\w\s]", r"[\d_-]", "[ -~]", r"[^\W\d]", "[ka-c]", "[^ks]"])


def _group(body: str, kind: str) -> str:
    return {"": f"({body})", "nc": f"(?:{body})", "i": f"(?i:{body})", "s": f"(?s:{body})",
            "-i": f"(?-i:{body})"}[kind]


_PATTERNS = st.recursive(
    _ATOMS,
    lambda inner: st.one_of(
        st.lists(inner, min_size=2, max_size=3).map("".join),
        st.tuples(inner, inner).map("|".join),
        st.tuples(inner, st.sampled_from(["", "nc", "i", "s", "-i"])).map(lambda t: _group(*t)),
        st.tuples(inner, st.sampled_from(["*", "+", "?", "{2}", "{0,2}", "{1,3}", "{2,}", "{,2}", "+?"]))
          .map(lambda t: f"(?:{t[0]}){t[1]}"),
    ),
    max_leaves=6,
)
_FLAGS = st.sampled_from(["", "(?i)", "(?s)", "(?a)", "(?ia)", "(?x)"])


@given(flags=_FLAGS, body=_PATTERNS, texts=st.lists(st.text(st.sampled_from(TRICKY), max_size=4), max_size=20),
       seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_regex_matches_exactly_what_re_fullmatch_does(family, flags, body, texts, seed):
    pattern = flags + body
    constraint = parse_constraint(regex=pattern)
    oracle = re.compile(pattern)
    for text in texts + sample(family, constraint, 2, seed):
        assert takes(family, constraint, text) == bool(oracle.fullmatch(text)), (pattern, text)


@given(flags=_FLAGS, body=_PATTERNS, anchors=st.sampled_from(["", "^", "$", "^$"]),
       texts=st.lists(st.text(st.sampled_from(TRICKY), max_size=4), max_size=12), seed=st.integers(0, 2**16))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_any_schema_pattern_takes_only_what_re_search_does(family, flags, body, anchors, texts, seed):
    pattern = flags + ("^" if "^" in anchors else "") + body + ("$" if "$" in anchors else "")
    schema = schema_of(pattern)
    try:
        constraint = parse_constraint(**as_format(schema))
    except ValueError as e:  # only a pattern that can match nothing (in ECMA's classes: `[^\W\d]`)
        assert "Unsatisfiable schema: Regex is empty" in str(e), str(e)
        assume(False)
    oracle = re.compile(pattern)
    for text in texts:
        if takes(family, constraint, json.dumps(text, ensure_ascii=False)):
            assert oracle.search(text), (pattern, text)
    for text in sample(family, constraint, 2, seed):
        jsonschema.validate(json.loads(text), schema)


# ---------------------------------------------------------------------------------------------
# refusals


@pytest.mark.parametrize("pattern, message", REFUSED)
def test_constructs_llguidance_cannot_follow_are_refused(pattern, message):
    with pytest.raises(ValueError, match=f"invalid regex:? {re.escape(repr(pattern))}:? .*{message}"):
        parse_constraint(regex=pattern)


@pytest.mark.parametrize("pattern, message", REFUSED)
def test_schema_patterns_are_refused_with_where_they_are(pattern, message):
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": pattern}}}
    with pytest.raises(ValueError, match=f"invalid response_format: the pattern {re.escape(repr(pattern))} at "
                                         rf"schema\.properties\.code\.pattern:? .*{message}"):
        parse_constraint(**as_format(schema))
    names = {"type": "object", "patternProperties": {pattern: {"type": "integer"}}}
    with pytest.raises(ValueError, match=rf"at schema\.patternProperties\[.*\]:? .*{message}"):
        parse_constraint(**as_format(names))


def test_pattern_as_data_is_left_alone():
    """Only schema keywords are patterns: a property named "pattern", a const holding one."""
    schema = {"type": "object", "properties": {"pattern": {"const": {"pattern": "x{1,3}+"}}},
              "required": ["pattern"]}
    assert parse_constraint(**as_format(schema)).kind == "json"


def test_refusals_reach_the_caller_of_generate_and_the_server():
    pattern = r"(?i)[^a-z]\w{2}\S"

    async def body():
        async with await amlx.load(_checkpoint()) as model:
            for options in (dict(regex=r"x{1,3}+"), as_format(schema_of(r"\p{L}"))):
                with pytest.raises(ValueError, match="invalid"):
                    model.generate("hi", **options)
            return [await model.complete("hi", regex=pattern, max_tokens=32, temperature=1.0, seed=s)
                    for s in range(6)]

    results = anyio.run(body)
    assert any(r.finish_reason == "stop" for r in results)
    for r in results:
        assert r.finish_reason != "stop" or re.fullmatch(pattern, r.text), r.text
    from amlx.serve.errors import from_engine

    with pytest.raises(ValueError) as refused:
        parse_constraint(regex=r"(?<=a)b")
    error = from_engine(refused.value)
    assert error.status == 400 and "lookahead and lookbehind" in error.message


@functools.lru_cache(maxsize=None)
def _checkpoint() -> Path:
    root = Path(tempfile.mkdtemp(prefix="amlx-regex-"))
    import atexit

    atexit.register(shutil.rmtree, root, True)
    return make_checkpoint(root / "qwen3", "qwen3", seed=3)


# -- case-insensitive classes: computed over the cased characters only -------------------------

_CODE_POINTS = st.one_of(st.integers(0, 0x24F), st.integers(0x250, 0x2FFF), st.integers(0xE000, 0x10FFFF))


@settings(max_examples=40, deadline=None)
@given(lo=_CODE_POINTS, width=st.sampled_from([0, 0, 1, 5, 40, 400]), ascii_only=st.booleans())
def test_case_insensitive_range_equals_python_over_every_character(lo, width, ascii_only):
    """`_folded` tries only the cased characters; the full scan tries all 1.1 million. They must
    agree: a character outside the cased set that (?i) paired with a range would be lost."""
    from amlx.constrain import pyregex

    hi = min(lo + width, 0x10FFFF)
    assume(hi < 0xD800 or lo > 0xDFFF)
    flags = re.IGNORECASE | (re.ASCII if ascii_only else 0)
    full = pyregex._python_set(f"[{pyregex._py_char(lo)}-{pyregex._py_char(hi)}]", flags)
    assert pyregex._folded(lo, hi, flags) == full


def test_case_insensitive_classes_try_the_cased_characters_only():
    """A pattern of hundreds of distinct case-insensitive classes (a hostile client's) is converted
    on the event loop: each class tries the cased characters (a few thousand), not all 1.1
    million, and still finds pairs outside ASCII (the Kelvin sign for k)."""
    from amlx.constrain import pyregex

    assert 1000 < len(pyregex._cased()) < 20_000
    pattern = "(?i)" + "".join(f"[{chr(a)}-{chr(b)}]" for a in range(0x41, 0x5A) for b in range(a, 0x5B, 3))
    rewritten = pyregex.to_llguidance(pattern)
    assert "\\x{212a}" in rewritten  # [J-K] and the like take U+212A KELVIN SIGN under (?i)
