"""Structured outputs, hunted for bugs through the public API and `parse_constraint`: option
edge cases (boolean schemas, unpaired surrogates, pathological nesting), and what the tiny
random Qwen3 and Gemma 3 checkpoints produce under each constraint (their free text is
gibberish: only the constraint can make it valid). tests/test_constraints.py and
tests/test_constraints_engine.py hold the main cases; these are the ones found since.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import anyio
import jsonschema
import pytest

import amlx
from amlx.constrain import parse_constraint

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint

ARCHS = ("qwen3", "gemma3_text")


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="amlx-constrain-hunt-"))
    import atexit

    atexit.register(shutil.rmtree, root, True)
    return make_checkpoint(root / arch, arch, seed=3)


def schema_format(schema) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}


# ---------------------------------------------------------------------------------------------
# options refused (or not) before anything is queued


def test_boolean_schemas():
    """JSON Schema's `true` (any value) is a schema like `{}`; `false` allows nothing. Both
    failed with llguidance's "Expecting object schema to apply options", which named no option,
    though spec.py let booleans through as schemas."""
    assert parse_constraint(response_format=schema_format(True)) == parse_constraint(response_format=schema_format({}))
    with pytest.raises(ValueError, match="response_format.*false allows no value"):
        parse_constraint(response_format=schema_format(False))


@pytest.mark.parametrize("options, where", [
    (dict(regex="a\ud800"), r"regex .*U\+D800, at character 1"),
    (dict(choice=["ok", "x\udfff"]), r"choice\[1\] .*U\+DFFF"),
    (dict(grammar='start: "\ud800"'), r"grammar .*U\+D800, at character 8"),
    (dict(response_format=schema_format({"const": "\ud800"})), r"response_format.*U\+D800"),
    (dict(response_format=schema_format({"properties": {"\udc00": {}}})), r"response_format.*U\+DC00"),
])
def test_unpaired_surrogates_are_refused_naming_the_option(options, where):
    """No output (UTF-8) can hold an unpaired surrogate (what JSON's "\\ud800" decodes to). A
    regex with one compiled to a regex that matches nothing and failed its request once queued
    (ConstraintError "NoExtensionBias"); a grammar raised UnicodeEncodeError; a schema's const
    failed in llguidance's JSON parser with a message that named no option."""
    with pytest.raises(ValueError, match=where):
        parse_constraint(**options)


def _nested(depth: int, wrap) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = wrap(schema)
    return schema


@pytest.mark.parametrize("wrap", [
    lambda s: {"type": "array", "items": s},
    lambda s: {"type": "object", "properties": {"a": s}, "required": ["a"]},
    lambda s: {"anyOf": [s, {"type": "string"}]},
], ids=["array", "object", "anyOf"])
@pytest.mark.parametrize("depth", [200, 5000])
def test_deeply_nested_schemas_are_a_value_error_naming_the_option(wrap, depth):
    """Nested past Python's recursion limit, a schema raised RecursionError (json.dumps; no
    ValueError, a server's 500); past llguidance's JSON parser's (128 levels), a ValueError
    that named no option ("recursion limit exceeded at line 1 column 3430")."""
    with pytest.raises(ValueError, match="^invalid response_format: .*(nested too deeply|recursion limit)"):
        parse_constraint(response_format=schema_format(_nested(depth, wrap)))


# Builds the grammars of `_DEEP` in a child process (a crash there is a failed test, not a dead
# pytest): parse_constraint, then a matcher against a small BPE vocabulary, as the engine does.
_DEEP_CHILD = r"""
import json, sys
from amlx.constrain import GrammarVocab, parse_constraint
from amlx.tokenizer import Tokenizer
from tests.helpers.tokenizers import write_tokenizer
write_tokenizer(sys.argv[1], "bpe")
tok = Tokenizer.from_dir(sys.argv[1])
vocab = GrammarVocab.from_tokenizer(tok, len(tok))
for options in json.loads(sys.stdin.read()):
    try:
        constraint = parse_constraint(**options)
        matcher = vocab.matcher(constraint)
        masks = vocab.new_masks(1)
        matcher.fill_mask(masks)
        print("ok", flush=True)
    except ValueError as e:
        print("ValueError", str(e)[:200].replace("\n", " "), flush=True)
"""


def _ref_chain(levels: int) -> dict:
    defs = {f"d{i}": {"prefixItems": [{"$ref": f"#/$defs/d{i + 1}"}]} for i in range(levels)}
    defs[f"d{levels}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def _rule_chain(rules: int) -> str:
    """Lark terminals, each "a" and the next (written tight: 64 KiB of grammar hold 4,500)."""
    return "start: R0\n" + "".join(f'R{i}:"a"R{i + 1}\n' for i in range(rules)) + f'R{rules}: "b"\n'


def test_long_chains_of_definitions_neither_crash_nor_pass_unbounded(tmp_path):
    """A chain of 3,000 `$ref`s or of 4,500 Lark terminals overflowed the 8 MB stack of the
    thread that checked it (parse_constraint, on the event loop) or compiled it (the grammar
    thread): a segmentation fault, the process gone. They compile now (on a thread with a deep
    stack), and a schema with more definitions than that stack surely holds is a ValueError."""
    grammar = _rule_chain(4500)
    assert len(grammar) <= 64 * 1024  # (a longer one is refused for its length)
    cases = [dict(response_format=schema_format(_ref_chain(3000))), dict(grammar=grammar),
             dict(response_format=schema_format(_ref_chain(12_000)))]
    root = Path(__file__).resolve().parent.parent
    child = subprocess.run([sys.executable, "-c", _DEEP_CHILD, str(tmp_path)], input=json.dumps(cases), cwd=root,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    lines = child.stdout.splitlines()
    assert lines[:2] == ["ok", "ok"], lines
    assert re.match(r"ValueError invalid response_format: too large for the grammar engine \(36014 ':'", lines[2]), lines


@pytest.mark.parametrize("option, text", [
    ("regex", "|".join(f"w{i}" for i in range(12_000))),
    ("grammar", "start: " + " | ".join(f'"t{i}"' for i in range(12_000))),
])
def test_a_regex_or_grammar_past_the_length_limit_is_refused_at_once(option, text):
    """Reading a regex and checking a Lark grammar run on the caller's thread (the event
    loop's), at a cost growing faster than the text: 200,000 alternatives took 20 s (regex)
    and 67 s, then 5 minutes on the grammar thread and a panic (Lark). Past 64 KiB they are
    refused before any of that; at the limit they are taken."""
    from amlx.constrain.spec import MAX_PATTERN_CHARS

    assert len(text) > MAX_PATTERN_CHARS
    with pytest.raises(ValueError, match=f"^{option} is too long: {len(text)} characters.*use choice"):
        parse_constraint(**{option: text})
    cut = text[:MAX_PATTERN_CHARS]
    cut = cut[:cut.rindex("|")].rstrip()
    assert parse_constraint(**{option: cut}).kind == option


# ---------------------------------------------------------------------------------------------
# through the engine


async def _boolean_schema_body(arch: str) -> None:
    async with await amlx.load(checkpoint(arch)) as model:
        for temperature in (0.0, 1.0):
            for seed in range(3):
                out = await model.complete("value:", response_format=schema_format(True), max_tokens=48,
                                           temperature=temperature, seed=seed)
                if out.finish_reason == "stop":
                    json.loads(out.text)  # any JSON value at all


@pytest.mark.parametrize("arch", ARCHS)
def test_a_boolean_true_schema_generates_json(arch):
    anyio.run(_boolean_schema_body, arch)


async def _parser_limit_body() -> None:
    # right-recursive, 1,500 alternatives deep: the Earley row past "a" holds 3,000 items
    grammar = "start: r0\n" + "".join(f'r{i}: r{i + 1} | "a"\n' for i in range(1500)) + 'r1500: "b"\n'
    async with await amlx.load(checkpoint("qwen3")) as model:
        out: dict = {}

        async def one(key, **options):
            try:
                out[key] = await model.complete("x", max_tokens=6, logit_bias=options.pop("bias", None), **options)
            except amlx.AmlxError as e:
                out[key] = e

        a = model.tokenizer.encode("a", add_special_tokens=False)[0]
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(one, "deep", grammar=grammar, bias={a: 100.0}))  # "a" first
            tg.start_soon(functools.partial(one, "free"))
        assert isinstance(out["deep"], amlx.ConstraintError) and isinstance(out["deep"], ValueError), out["deep"]
        assert "grammar constraint cannot be followed" in str(out["deep"]) and "max is 2000" in str(out["deep"])
        assert len(out["free"].token_ids) == 6
        assert (await model.complete("w", choice=["up", "down"])).text in ("up", "down")


def test_a_grammar_past_the_parsers_row_limit_is_a_constraint_error():
    """llguidance's Earley parser gives up past 2,000 items in a row ("Current row has 3000
    items; max is 2000"), after taking a token its mask allowed. That is the grammar past the
    engine's limits (ConstraintError, a ValueError: a 400 when served), but the request failed
    as a refused token, a plain AmlxError (a 500)."""
    anyio.run(_parser_limit_body)


# ---------------------------------------------------------------------------------------------
# what comes out, by each kind's own oracle: a finished text matches, a cut one is a prefix the
# grammar still takes (hypothesis draws the options; one model per checkpoint, blocking calls)

TRICKY_CHOICES = ["cat", "category", "cat ", " cat", "a", "ab", "abc", "日本語", "😀!", "é", "e\u0301", "\t", "  ",
                  "x\ny", "<|im_end|>", "<end_of_turn>", "<bos>x", "</s>", "{\"k\": 1}", "a\\b", "\u2581b"]

REGEXES = [r"^[a-z]{2,5}$", r"\Acat(?:egory)?\Z", r"(?:cat|category|ca)[0-9]?", r"\w{1,4} \d", r"[^\W\d_]{2}",
           r"(?i)ab[c-e]", r"[α-ω]{1,3}|[а-я]{2}", r".{1,3}x", r"\s?[A-F0-9]{4}", r"(?:ab|cd){1,3}(?:ef)?", r"a*"]

SCHEMAS = [
    {"oneOf": [{"type": "integer", "minimum": 5, "maximum": 9}, {"type": "string", "maxLength": 3}]},
    {"anyOf": [{"type": "object", "properties": {"a": {"const": 1}}, "required": ["a"], "additionalProperties": False},
               {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2}]},
    {"enum": ["x", 1, None, True, 2.5, {"k": [1]}, [1, "a"]]},
    {"const": {"a": [1, 2, {"b": "c"}], "d": None}},
    {"type": "array", "minItems": 1, "maxItems": 2,
     "items": {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "integer", "minimum": -3, "maximum": 3}}},
    {"type": "object", "properties": {"a": {"type": "string", "minLength": 2, "maxLength": 4},
                                      "b": {"type": "string", "pattern": "^x+y?$"}},
     "required": ["a", "b"], "additionalProperties": False},
    {"type": "object", "properties": {"i": {"type": "integer", "exclusiveMinimum": -2, "exclusiveMaximum": 2},
                                      "n": {"type": "number", "minimum": 0.5, "maximum": 1.5}},
     "required": ["i", "n"], "additionalProperties": False},
    {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "kids": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}},
        "required": ["v"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
    {"definitions": {"p": {"type": "integer", "minimum": 3, "maximum": 4}}, "type": "array",
     "items": {"$ref": "#/definitions/p"}, "minItems": 1, "maxItems": 2},
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}, "c": {"type": "null"}},
     "additionalProperties": False},
    {"type": "integer", "multipleOf": 7, "minimum": 0, "maximum": 100},
    {"type": "object", "properties": {"q\"k\\ey\n": {"const": "v\"\u0001\\"}}, "required": ["q\"k\\ey\n"],
     "additionalProperties": False},
    True,
]

LARKS = [
    'start: item ("," item)~0..2\nitem: WORD | NUM\nWORD: /[a-z]{1,3}/\nNUM: /[0-9]{1,2}/\n',
    'start: "(" start ")" | "x"\n',
    'start: greeting name\ngreeting: "hi " | "hello "\nname: /[A-Z][a-z]{0,3}/\n',
]


@pytest.fixture(scope="module", params=ARCHS)
def loaded(request):
    """(model, GrammarVocab of its tokenizer) for one checkpoint, kept open for the module."""
    from amlx.constrain import GrammarVocab

    model = amlx.load_sync(checkpoint(request.param), max_batch_size=8)
    try:
        yield model, GrammarVocab.from_tokenizer(model.tokenizer, model._engine.vocab_size)
    finally:
        model.close()


def _check_output(loaded, options: dict, out: amlx.Completion) -> None:
    """A finished text by the kind's oracle; every output's tokens taken by a fresh matcher."""
    model, vocab = loaded
    constraint = parse_constraint(**{k: v for k, v in options.items()
                                     if k in ("response_format", "regex", "choice", "grammar")})
    matcher = vocab.matcher(constraint)
    for t in out.token_ids:
        assert matcher.consume(t), (options, out.text, matcher.error[:300])
    if out.finish_reason == "length":
        assert len(out.token_ids) == options["max_tokens"]
        return
    assert out.finish_reason == "stop" and matcher.finished, (options, out)
    if "choice" in options:
        assert out.text in options["choice"], (options, out.text)
    elif "regex" in options:
        assert re.fullmatch(options["regex"], out.text), (options, out.text)
    elif "grammar" in options:
        import lark

        lark.Lark(options["grammar"], parser="earley").parse(out.text)
    else:
        schema = options["response_format"]["json_schema"]["schema"]
        jsonschema.validate(json.loads(out.text), schema)


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SAMPLING = dict(temperature=st.sampled_from([0.0, 1.0]), seed=st.integers(0, 2**16), max_tokens=st.integers(1, 40))
_HYPOTHESIS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_HYPOTHESIS
@given(choices=st.lists(st.sampled_from(TRICKY_CHOICES) | st.text(min_size=1, max_size=5), min_size=1, max_size=5),
       **_SAMPLING)
def test_choice_outputs(loaded, choices, temperature, seed, max_tokens):
    """One choice, prefixes of others, duplicates, blanks, unicode (composed or not), special
    tokens' names, SentencePiece's space symbol: a finished text is one of them."""
    choices = [c for c in choices if c.encode("utf-8", "surrogatepass") == c.encode("utf-8", "ignore")]
    if not choices:
        return
    options = dict(choice=choices, temperature=temperature, seed=seed, max_tokens=max_tokens)
    _check_output(loaded, options, loaded[0].complete_sync("pick one:", **options))


@_HYPOTHESIS
@given(kind=st.sampled_from(["regex", "json", "grammar"]), index=st.integers(0, 100), **_SAMPLING)
def test_regex_schema_and_grammar_outputs(loaded, kind, index, temperature, seed, max_tokens):
    if kind == "regex":
        options: dict = dict(regex=REGEXES[index % len(REGEXES)])
    elif kind == "json":
        options = dict(response_format=schema_format(SCHEMAS[index % len(SCHEMAS)]))
    else:
        options = dict(grammar=LARKS[index % len(LARKS)])
    options.update(temperature=temperature, seed=seed, max_tokens=max_tokens)
    _check_output(loaded, options, loaded[0].complete_sync("answer:", **options))


@pytest.mark.parametrize("options", [
    dict(choice=["alpha beta", "alphabet", "gamma"], presence_penalty=1.5, frequency_penalty=1.0,
         repetition_penalty=1.3),
    dict(regex="(?:ab|cd){4}", repetition_penalty=2.0, temperature=0.7, seed=4, top_p=0.5),
    dict(response_format=schema_format({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0,
                                                                               "maximum": 50}},
                                        "required": ["a"], "additionalProperties": False}),
         temperature=1.0, seed=3, min_p=0.2, top_k=3),
], ids=["choice-penalties", "regex-repetition", "json-filters"])
def test_logprobs_under_penalties_are_the_masked_models(loaded, options):
    """Each token's logprob and top_logprobs are those of the model's own distribution masked
    to what the constraint allows and renormalized (README), whatever penalties and filters
    chose the token: the reference is the checkpoint's raw logits (one prefill pass per step)
    with a fresh matcher's mask."""
    import math

    import numpy as np

    from amlx.constrain import unpack_mask

    try:
        from tests.helpers.decoding import prefill_logits
    except ImportError:
        from helpers.decoding import prefill_logits
    model, vocab = loaded
    prompt = model.tokenizer.encode("the answer is")
    tokens = list(model.generate_sync(prompt, max_tokens=16, top_logprobs=4, logit_bias={prompt[0]: 30.0}, **options))
    ids = [t.id for t in tokens]
    matcher = vocab.matcher(parse_constraint(**{k: v for k, v in options.items()
                                                 if k in ("response_format", "regex", "choice")}))
    masks = vocab.new_masks(1)
    path = model.info.path
    for j, tok in enumerate(tokens):
        logits = prefill_logits(path, prompt + ids[:j])[-1].astype(np.float64)
        matcher.fill_mask(masks)
        x = np.where(unpack_mask(masks, logits.shape[0])[0], logits, -np.inf)
        lp = x - (x.max() + math.log(np.exp(x - x.max()).sum()))
        assert abs(tok.logprob - lp[tok.id]) <= 1e-4, (j, tok)
        best = np.argsort(-lp, kind="stable")[:4]
        for (tid, got), want in zip(tok.top_logprobs, best):
            assert np.isneginf(got) and np.isneginf(lp[tid]) or abs(got - lp[tid]) <= 1e-4, (j, tok.top_logprobs)
            if np.isfinite(lp[want]):
                assert abs(got - lp[want]) <= 1e-4, (j, tok.top_logprobs, want)
        assert matcher.consume(tok.id)
    assert tokens[-1].finish_reason == "stop"


async def _no_text_body() -> None:
    async with await amlx.load(checkpoint("qwen3")) as model:
        for options in (dict(regex="[^\x00-\U0010ffff]"), dict(grammar="start: A\nA: /[^\\x00-\\U0010ffff]/")):
            out: dict = {}

            async def one(key, **o):
                try:
                    out[key] = await model.complete("x", max_tokens=4, **o)
                except ValueError as e:
                    out[key] = e

            async with anyio.create_task_group() as tg:
                tg.start_soon(functools.partial(one, "empty", **options))
                tg.start_soon(functools.partial(one, "free"))
            assert isinstance(out["empty"], ValueError) and "no text matches it" in str(out["empty"]), out["empty"]
            assert len(out["free"].token_ids) == 4
        assert (await model.complete("w", regex="a{0}")).text == ""  # (the empty text is a text)


def test_a_constraint_no_text_matches_fails_saying_so():
    """A regex or grammar that no text matches (an empty class) compiles; its request failed
    once queued, with llguidance's "NoExtensionBias" as the reason. It is a ValueError saying
    so, the request beside it unharmed."""
    anyio.run(_no_text_body)


@pytest.mark.parametrize("options", [
    dict(regex="(?:ab|cd|a|c){6}", repetition_penalty=1.8),
    dict(choice=["aaaa", "abab", "abcd", "aab", "cccc"], presence_penalty=2.0, frequency_penalty=-1.5),
    dict(regex="[a-e]{8}", repetition_penalty=0.6, frequency_penalty=1.0, logit_bias={64: 3.0, 66: -2.0}),
], ids=["repetition", "presence-frequency", "all-with-bias"])
def test_greedy_penalties_act_on_the_allowed_tokens(loaded, options):
    """At temperature 0 each token is the argmax, over what the constraint allows, of the raw
    logits with logit_bias, the repetition penalty (prompt and output tokens) and presence and
    frequency penalties (output tokens only) applied: the reference is the checkpoint's logits,
    penalized in numpy as amlx.sample documents, and a fresh matcher's mask."""
    import numpy as np

    from amlx.constrain import unpack_mask

    try:
        from tests.helpers.decoding import prefill_logits
    except ImportError:
        from helpers.decoding import prefill_logits
    model, vocab = loaded
    prompt = model.tokenizer.encode("ab cd abcd")
    out = model.complete_sync(prompt, max_tokens=12, **options)
    matcher = vocab.matcher(parse_constraint(**{k: v for k, v in options.items() if k in ("regex", "choice")}))
    masks = vocab.new_masks(1)
    for j, tok in enumerate(out.token_ids):
        x = prefill_logits(model.info.path, prompt + out.token_ids[:j])[-1].astype(np.float64)
        for t, b in (options.get("logit_bias") or {}).items():
            x[t] += b
        rep = options.get("repetition_penalty", 1.0)
        seen = sorted(set(prompt + out.token_ids[:j]))
        x[seen] = np.where(x[seen] > 0, x[seen] / rep, x[seen] * rep)
        counts = np.bincount(out.token_ids[:j], minlength=x.shape[0])[:x.shape[0]]
        x -= options.get("presence_penalty", 0.0) * (counts > 0) + options.get("frequency_penalty", 0.0) * counts
        matcher.fill_mask(masks)
        x = np.where(unpack_mask(masks, x.shape[0])[0], x, -np.inf)
        top2 = np.sort(x)[-2:]
        if top2[1] - top2[0] > 1e-3:  # (a near tie may go either way in float32)
            assert tok == int(np.argmax(x)), (j, out.token_ids, int(np.argmax(x)))
        assert matcher.consume(tok)
    assert out.finish_reason == "stop"


async def _cancel_while_compiling_body() -> None:
    async with await amlx.load(checkpoint("qwen3")) as model:
        held = model._engine.scheduler._held  # every request the scheduler holds
        # closed while their grammars compile (each new), mid-generation, or by a
        # timeout: none may stay behind, matcher and all
        for i in range(3):
            await model.generate("x", choice=[f"opt{i} {j}" for j in range(300)], max_tokens=8).aclose()
        for i in range(3):
            stream = model.generate("x", regex=f"[a-z]{{30}}{i}", max_tokens=40, max_buffer=1)
            async for _ in stream:
                break
            await stream.aclose()
        for _ in range(3):
            with anyio.move_on_after(0.01):
                await model.complete("x", response_format={"type": "json_object"}, max_tokens=200)
        with anyio.fail_after(60):
            while held or model.stats()["active_requests"] or model.stats()["waiting_requests"]:
                await anyio.sleep(0.02)
        assert model.stats()["kv_cache"]["blocks_used"] == 0
        assert (await model.complete("y", choice=["left", "right"])).text in ("left", "right")


def test_cancelled_constrained_requests_leave_nothing_behind():
    anyio.run(_cancel_while_compiling_body)
