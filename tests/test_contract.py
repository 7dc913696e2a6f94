"""The public contract of /work/shared/DESIGN.md ("Public API", "Server", "Checkpoints"),
clause by clause, black-box: only what an outside tester would call (the `amlx` names the
contract fixes, the `amlx serve` command through the official openai client and plain
HTTP). Each test names the clause it holds. Small random checkpoints come from
tests/helpers/checkpoints.py; the references are transformers on PyTorch CPU.

Clauses asserted elsewhere in depth (continuous batching's bit-exactness, backpressure,
prefix-cache reuse, constraints, speculative decoding, the server's failure paths) get
one plain check here each, so that this file alone reads as the contract's test.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import shutil

import httpx
import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx
from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_logits
from tests.helpers.serving import ServerProcess, serve_checkpoint

MAX_CONTEXT = 512
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # EOS never wins greedily (its lm_head rows are zero): streams run to max_tokens or a stop
    return serve_checkpoint(tmp_path_factory.mktemp("contract") / "qwen3", seed=1)


@pytest.fixture(scope="module")
def model(ckpt):
    with amlx.load_sync(ckpt, max_context=MAX_CONTEXT) as m:
        yield m


def _wait_idle(model, seconds: float = 20.0) -> dict:
    import time

    deadline = time.monotonic() + seconds
    while True:
        s = model.stats()
        if s["active_requests"] == 0 and s["waiting_requests"] == 0:
            return s
        assert time.monotonic() < deadline, s
        time.sleep(0.01)


# -- load: names, options and their defaults ------------------------------------------------

LOAD_DEFAULTS = dict(device="auto", dtype=None, max_batch_size=32, max_context=None, adapter=None,
                     kv_cache_memory=None, prefix_cache=True, kv_bits=None, draft=None, num_draft_tokens=4,
                     tensor_parallel=1)


@pytest.mark.parametrize("load", [amlx.load, amlx.load_sync])
def test_load_takes_the_documented_keyword_options_and_defaults(load):
    params = inspect.signature(load).parameters
    assert list(params)[0] == "path"
    # (more options would be an extension: the documented ones, with their defaults, are the contract)
    assert {n: params[n].default for n in LOAD_DEFAULTS if n in params} == LOAD_DEFAULTS
    assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in LOAD_DEFAULTS)
    assert inspect.iscoroutinefunction(amlx.load) and not inspect.iscoroutinefunction(amlx.load_sync)


@pytest.mark.parametrize("bad", [
    dict(device="tpu"), dict(device=None), dict(dtype="int8"), dict(max_batch_size=0), dict(max_batch_size=1.5),
    dict(max_batch_size=True), dict(max_context=0), dict(max_context=-3), dict(max_context="64"),
    dict(kv_cache_memory=-1), dict(kv_cache_memory=0), dict(kv_cache_memory=float("nan")),
    dict(prefix_cache=None), dict(prefix_cache=1), dict(kv_bits=3), dict(kv_bits=16), dict(num_draft_tokens=0),
    dict(num_draft_tokens=17, draft="prompt_lookup"), dict(tensor_parallel=0), dict(tensor_parallel=1.5),
    dict(adapter=5)])
def test_bad_load_options_raise_value_error(ckpt, bad):
    with pytest.raises(ValueError):
        amlx.load_sync(ckpt, **bad).close()


async def test_load_options_that_change_the_model(ckpt):
    """dtype, max_context, prefix_cache=False, draft="prompt_lookup", kv_cache_memory (bytes
    and fraction), max_batch_size, device="cpu": each loads and serves the same greedy tokens
    (float types up to their rounding)."""
    async with await amlx.load(ckpt, max_context=MAX_CONTEXT) as ref_model:
        ref = await ref_model.complete("The same words once more", max_tokens=6)
    for kw in (dict(dtype="bfloat16"), dict(prefix_cache=False), dict(draft="prompt_lookup", num_draft_tokens=2),
               dict(kv_cache_memory=10**6), dict(kv_cache_memory=0.01), dict(max_batch_size=1), dict(device="cpu")):
        async with await amlx.load(ckpt, max_context=MAX_CONTEXT, **kw) as m:
            assert m.info.context_length <= MAX_CONTEXT
            got = await m.complete("The same words once more", max_tokens=6)
            again = await m.complete("The same words once more", max_tokens=6)
            if "dtype" in kw:
                assert m.info.dtype == "bfloat16"
            else:
                assert got.token_ids == ref.token_ids, kw
            assert again.token_ids == got.token_ids
            if kw.get("prefix_cache") is False:
                assert again.usage.cached_tokens == 0
    async with await amlx.load(ckpt, max_context=32) as m:
        assert m.info.context_length == 32


PROMPT40 = [(7 * i) % 300 + 1 for i in range(40)]


@pytest.fixture(scope="module")
def ckpt32(tmp_path_factory):
    """head_dim 32 (kv_bits groups a head's values by 32 at least, MLX's smallest group), and
    its greedy tokens after PROMPT40 with the default options."""
    path = make_checkpoint(tmp_path_factory.mktemp("contract32") / "qwen3", "qwen3", seed=1, head_dim=32)
    with amlx.load_sync(path) as plain:
        return path, plain.complete_sync(PROMPT40, max_tokens=10).token_ids


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=st.fixed_dictionaries({}, optional=dict(
    dtype=st.sampled_from([None, "float32", "bfloat16"]), max_batch_size=st.integers(1, 4),
    max_context=st.one_of(st.none(), st.integers(2, 200)),
    kv_cache_memory=st.one_of(st.none(), st.integers(1, 10**6), st.floats(1e-9, 1.0)),
    prefix_cache=st.booleans(), kv_bits=st.sampled_from([None, 8, 4]),
    draft=st.sampled_from([None, "prompt_lookup"]), num_draft_tokens=st.integers(1, 16))))
def test_any_combination_of_load_options_serves(ckpt32, kw):
    """Every combination of valid load options loads and serves concurrent requests, the
    same tokens for the same request, the checkpoint's greedy tokens where the numbers are
    unchanged (float32, no kv_bits), and closing gives MLX's active memory back."""
    import gc

    path, greedy = ckpt32
    prompt = PROMPT40
    gc.collect()
    before = amlx.memory()["active"]
    with amlx.load_sync(path, **kw) as m:
        ctx = m.info.context_length
        assert 1 <= ctx <= (kw.get("max_context") or ctx)

        async def requests():
            return await asyncio.gather(*(m.complete(prompt, max_tokens=10) for _ in range(3)),
                                        m.complete(CHAT, max_tokens=4), return_exceptions=True)

        results = asyncio.run(requests())
        if ctx >= len(prompt) + 10:
            assert not any(isinstance(r, BaseException) for r in results), results
            assert len({tuple(r.token_ids) for r in results[:3]}) == 1
            if kw.get("dtype") in (None, "float32") and kw.get("kv_bits") is None:
                assert results[0].token_ids == greedy
        else:  # a prompt longer than the context
            assert all(isinstance(r, (amlx.ContextLengthError, amlx.Completion)) for r in results), results
    gc.collect()
    assert amlx.memory()["active"] == before


# -- generation options: defaults and validation ------------------------------------------

GENERATE_DEFAULTS = dict(max_tokens=256, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                         stop=(), seed=None, logprobs=False, max_buffer=16, presence_penalty=0.0,
                         frequency_penalty=0.0, logit_bias=None, top_logprobs=0, response_format=None, regex=None,
                         choice=None, grammar=None)


def test_generate_option_defaults_are_the_documented_ones(model):
    from dataclasses import asdict

    defaults = asdict(amlx.GenerationOptions())
    assert {n: defaults[n] for n in GENERATE_DEFAULTS if n in defaults} == GENERATE_DEFAULTS
    toks = list(model.generate_sync([5, 6, 7]))  # max_tokens=256 by default (this model never says EOS)
    assert len(toks) == 256 and toks[-1].finish_reason == "length"
    assert all(t.logprob is None and t.top_logprobs is None for t in toks)  # logprobs=False, top_logprobs=0
    # temperature 0: greedy, the same again
    assert [t.id for t in model.generate_sync([5, 6, 7], max_tokens=20)] == [t.id for t in toks[:20]]


NAN, INF = float("nan"), float("inf")
BAD_OPTIONS = {
    "max_tokens": [0, -1, 1.5, True, "8", None, 2**31],
    "temperature": [-0.1, NAN, INF, "1", None],
    "top_p": [0.0, -0.5, 1.5, NAN, None],
    "top_k": [-1, 1.5, True, 10**9],
    "min_p": [-0.1, 1.1, NAN],
    "repetition_penalty": [0.0, -1.0, NAN, INF],
    "stop": [[""], 5, ["ok", 3], [None], "\ud800", ["ok", "a\udfffb"]],  # (lone surrogates: never matched)
    "seed": [1.5, "7", True],
    "logprobs": ["yes", 1, None],
    "max_buffer": [0, -1, 2.0, None],
    "presence_penalty": [2.5, -2.5, NAN, INF],
    "frequency_penalty": [2.5, -2.5, NAN, -INF],
    "logit_bias": [{-1: 1.0}, {10**9: 1.0}, {1: NAN}, {1: 101.0}, {"a": 1.0}, [1, 2], 7],
    "top_logprobs": [-1, 21, 2.0, True],
    "response_format": [{"type": "bogus"}, "json", {"type": "json_schema"}],
    "regex": ["(", 3],
    "choice": [[], [""], "abc", [1]],
    "grammar": ["???", 7],
}
VALID_OPTIONS = {
    "max_tokens": st.integers(1, 4),
    "temperature": st.floats(0.0, 2.0),
    "top_p": st.floats(0.05, 1.0),
    "top_k": st.integers(0, 50),
    "min_p": st.floats(0.0, 0.5),
    "repetition_penalty": st.floats(0.5, 2.0),
    "stop": st.lists(st.text(min_size=1, max_size=4), max_size=3),
    "seed": st.one_of(st.none(), st.integers(-2**40, 2**40)),
    "logprobs": st.booleans(),
    "max_buffer": st.integers(1, 64),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "logit_bias": st.dictionaries(st.integers(0, 300), st.floats(-100.0, 100.0), max_size=3),
    "top_logprobs": st.integers(0, 20),
}
CONSTRAINTS = {"response_format": {"type": "json_object"}, "regex": "[a-z]{1,3}", "choice": ["yes", "no"],
               "grammar": 'start: "a" | "b"'}


@st.composite
def bad_option_sets(draw):
    """Options of which at least one is bad: an out-of-bound value, or two constraints."""
    kwargs = draw(st.fixed_dictionaries({}, optional=VALID_OPTIONS))
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(BAD_OPTIONS)))
        kwargs[name] = draw(st.sampled_from(BAD_OPTIONS[name]))
    else:  # "at most one constraint"
        for name in draw(st.lists(st.sampled_from(sorted(CONSTRAINTS)), min_size=2, max_size=4, unique=True)):
            kwargs[name] = CONSTRAINTS[name]
    return kwargs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=bad_option_sets(), chat=st.booleans())
def test_bad_generation_options_raise_value_error_up_front_and_the_model_keeps_serving(model, kwargs, chat):
    """"validated up front, ValueError on bad values": at the call, before anything is queued
    (for chat prompts too, whose tokenizing waits for the first read), and the model serves on."""
    before = _wait_idle(model)["tokens_generated"]
    prompt = CHAT if chat else "Hello there"
    for call in (model.generate, model.generate_sync):
        with pytest.raises(ValueError):
            call(prompt, **kwargs)
    after = model.stats()
    assert after["active_requests"] == after["waiting_requests"] == 0
    assert after["tokens_generated"] == before
    assert len(model.complete_sync("Hello there", max_tokens=2).token_ids) == 2


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=st.fixed_dictionaries({}, optional=VALID_OPTIONS),
       constraint=st.one_of(st.none(), st.sampled_from(sorted(CONSTRAINTS))))
def test_valid_generation_options_are_accepted(model, kwargs, constraint):
    """Every value inside the documented ranges is accepted, with at most one constraint;
    `top_logprobs=n` (0..20) gives n (id, logprob) pairs, best first, on every token."""
    if constraint is not None:
        kwargs[constraint] = CONSTRAINTS[constraint]
    kwargs.setdefault("max_tokens", 6)
    if kwargs.get("seed") is None:
        kwargs["seed"] = 5  # (so that the stream and the Completion below are the same request)
    toks = list(model.generate_sync("Hello there", **kwargs))
    assert 1 <= len(toks) <= kwargs["max_tokens"]
    assert toks[-1].finish_reason in ("stop", "length")
    assert all(t.finish_reason is None for t in toks[:-1])
    if toks[-1].finish_reason == "length":
        assert len(toks) == kwargs["max_tokens"]
    text = "".join(t.text for t in toks)
    assert not any(s in text for s in kwargs.get("stop", ()))
    result = model.complete_sync("Hello there", **kwargs)
    assert result.token_ids == [t.id for t in toks] and result.text == text
    assert result.finish_reason == toks[-1].finish_reason and result.usage.completion_tokens == len(toks)
    n = kwargs.get("top_logprobs", 0)
    for t in toks:
        if n:
            assert len(t.top_logprobs) == n
            assert all(isinstance(i, int) and isinstance(lp, float) for i, lp in t.top_logprobs)
            values = [lp for _, lp in t.top_logprobs]
            assert values == sorted(values, reverse=True)
        else:
            assert t.top_logprobs is None
        if kwargs.get("logprobs") or n:
            assert isinstance(t.logprob, float) and t.logprob <= 0.0
    if constraint == "choice":
        # the whole choice, unless max_tokens or one of the request's stop strings cut it short
        if toks[-1].finish_reason == "stop" and not kwargs.get("stop"):
            assert text in CONSTRAINTS["choice"]
        else:
            assert any(c.startswith(text) for c in CONSTRAINTS["choice"])


NUMPY_TYPES = {int: (np.int32, np.int64, np.uint16), float: (np.float32, np.float64)}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kwargs=st.fixed_dictionaries({}, optional={k: v for k, v in VALID_OPTIONS.items()
                                                  if k not in ("stop", "logprobs", "logit_bias")}),
       data=st.data())
def test_numpy_scalar_option_values_act_as_the_python_numbers(model, kwargs, data):
    """Validation takes any integer or real number (numbers.Integral / numbers.Real), so a
    numpy scalar is a valid value and must act as the same Python number. `top_k=np.int64(5)`
    used to pass validation and then fail the request inside the worker (MLXError: the
    sampler's compiled step met a numpy integer)."""
    kwargs.setdefault("max_tokens", 4)
    if kwargs.get("seed") is None:
        kwargs["seed"] = 11  # (None draws a fresh seed each time)
    kwargs.setdefault("temperature", 0.9)
    as_numpy = {}
    for name, value in kwargs.items():
        if value is None:
            as_numpy[name] = value
            continue
        kind = int if isinstance(value, int) else float
        np_type = data.draw(st.sampled_from(NUMPY_TYPES[kind]), label=name)
        if kind is int and not np.iinfo(np_type).min <= value <= np.iinfo(np_type).max:
            np_type = np.int64
        if np_type is np.float32 and kind is float:
            value = float(np.float32(value))  # the same number in both runs
            kwargs[name] = value
        as_numpy[name] = np_type(value)
    # (numpy first: a compiled sampling step is traced by the first request of its kind, and
    # one traced with numpy values failed that request and every later one of its kind)
    got = model.complete_sync("Hello there", **as_numpy)
    expected = model.complete_sync("Hello there", **kwargs)
    assert got.token_ids == expected.token_ids
    assert got.top_logprobs == expected.top_logprobs


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
GRAMMAR = 'start: "say " WORD ("," WORD)?\nWORD: /[a-z]{1,5}/'


@pytest.mark.parametrize("constraint", [
    dict(response_format={"type": "json_object"}),
    dict(response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}),
    dict(regex=r"[0-9]{2,4}-[a-c]{1,6}"), dict(choice=["alpha", "beta", "gamma delta"]), dict(grammar=GRAMMAR)])
def test_a_constrained_requests_text_matches_its_constraint(model, constraint):
    import re

    import jsonschema
    import lark

    for sampling in (dict(), dict(temperature=1.0, seed=3), dict(temperature=1.5, top_p=0.9, seed=4)):
        result = model.complete_sync("Answer:", max_tokens=120, **constraint, **sampling)
        if result.finish_reason == "length":  # cut short: a prefix of a match (only a JSON object may run long)
            assert "response_format" in constraint, result
            continue
        text = result.text
        if "regex" in constraint:
            assert re.fullmatch(constraint["regex"], text), text
        elif "choice" in constraint:
            assert text in constraint["choice"]
        elif "grammar" in constraint:
            lark.Lark(GRAMMAR, parser="lalr").parse(text)
        else:
            value = json.loads(text)
            assert isinstance(value, dict)
            if constraint["response_format"]["type"] == "json_schema":
                jsonschema.validate(value, SCHEMA)


def test_top_logprobs_alone_gives_top_logprobs(model):
    """DESIGN: `top_logprobs=0` (0..20; `tok.top_logprobs` is then a list of (id, logprob) pairs,
    best first). It used to raise ValueError unless logprobs=True was passed too (OpenAI's
    rule for its HTTP API, which the server still applies)."""
    toks = list(model.generate_sync([5, 6, 7], max_tokens=3, top_logprobs=4))
    assert [len(t.top_logprobs) for t in toks] == [4, 4, 4]
    assert all(t.top_logprobs[0][0] == t.id for t in toks)  # greedy: the chosen token is the best
    result = model.complete_sync([5, 6, 7], max_tokens=3, top_logprobs=4)
    assert result.top_logprobs == [t.top_logprobs for t in toks]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_prompt_token_ids_must_lie_inside_the_vocabulary(model, data):
    vocab = model.config["vocab_size"]
    bad = data.draw(st.one_of(st.integers(vocab, 2**64), st.integers(-2**64, -1)))
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=5))
    ids.insert(data.draw(st.integers(0, len(ids))), bad)
    with pytest.raises(ValueError):
        model.generate(ids, max_tokens=2)
    with pytest.raises(ValueError):
        model.generate([1], logit_bias={bad: 1.0})
    ok = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=5))
    assert len(model.complete_sync(ok, max_tokens=1).token_ids) == 1


# -- tokens, completions, stop strings, chat prompts --------------------------------------

async def test_token_and_completion_shapes(model):
    """tok.id / text / logprob / finish_reason (None, then "stop" | "length" on the last);
    Completion: text, token_ids, finish_reason, usage.prompt_tokens / completion_tokens /
    cached_tokens, logprobs, tool_calls (None without any)."""
    prompt = model.tokenizer.encode("The quick brown fox")
    toks = [t async for t in model.generate(prompt, max_tokens=12, logprobs=True)]
    assert isinstance(toks[0], amlx.Token) and len(toks) == 12
    assert all(type(t.id) is int and 0 <= t.id < model.config["vocab_size"] for t in toks)
    assert all(isinstance(t.text, str) for t in toks)
    assert all(isinstance(t.logprob, float) and t.logprob <= 0.0 for t in toks)
    assert [t.finish_reason for t in toks] == [None] * 11 + ["length"]
    result = await model.complete(prompt, max_tokens=12, logprobs=True)
    assert isinstance(result, amlx.Completion)
    assert result.text == "".join(t.text for t in toks) == model.tokenizer.decode(result.token_ids)
    assert result.token_ids == [t.id for t in toks] and result.finish_reason == "length"
    assert result.logprobs == pytest.approx([t.logprob for t in toks], abs=1e-5)
    assert result.usage.prompt_tokens == len(prompt) and result.usage.completion_tokens == 12
    assert type(result.usage.cached_tokens) is int and 0 <= result.usage.cached_tokens < len(prompt)
    assert result.tool_calls is None
    plain = [t async for t in model.generate(prompt, max_tokens=2)]
    assert all(t.logprob is None and t.top_logprobs is None for t in plain)
    # the prompt as text: the same tokens
    assert (await model.complete("The quick brown fox", max_tokens=12)).token_ids == result.token_ids


async def test_token_ids_of_numpy_integer_types_are_token_ids(model):
    """Options take numpy integers (numbers.Integral); prompts and score continuations of
    token ids take them too, as the same ids (they raised TypeError)."""
    ids = [5, 6, 7, 8]
    ref = await model.complete(ids, max_tokens=5)
    for prompt in ([np.int64(i) for i in ids], tuple(np.int32(i) for i in ids), list(np.array(ids))):
        assert (await model.complete(prompt, max_tokens=5)).token_ids == ref.token_ids
        assert [t.id for t in model.generate_sync(prompt, max_tokens=5)] == ref.token_ids
    assert await model.score([np.int64(i) for i in ids], [[np.int64(9), np.int32(10)]]) == \
        await model.score(ids, [[9, 10]])
    with pytest.raises(ValueError):
        model.generate([np.int64(model.config["vocab_size"])])
    for bad in ([np.float32(5.0)], [True, 5], [np.bool_(True)]):
        with pytest.raises(TypeError):
            model.generate(bad)


async def test_eos_ends_the_stream_with_stop(model):
    eos = sorted(model.tokenizer.eos_token_ids)[0]
    toks = [t async for t in model.generate("Hi", max_tokens=5, logit_bias={eos: 100.0})]
    assert len(toks) == 1 and toks[0].finish_reason == "stop"
    result = await model.complete("Hi", max_tokens=5, logit_bias={eos: 100.0})
    assert result.finish_reason == "stop" and result.text == ""


@pytest.fixture(scope="module")
def reference_text(model):
    """A greedy reply of 48 tokens, cut before any incomplete character at its end."""
    text = model.complete_sync("Once upon a time", max_tokens=48).text
    return text.rstrip("\ufffd")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_stop_strings_end_the_stream_and_are_not_emitted(model, reference_text, data):
    """"Stop strings end the stream and are not emitted": the text is the greedy reply up to
    the first stop string to occur, in the stream and in the Completion alike."""
    ref = reference_text
    stops = []
    for _ in range(data.draw(st.integers(1, 3))):
        if data.draw(st.booleans()):
            i = data.draw(st.integers(0, len(ref) - 1))
            stops.append(ref[i:i + data.draw(st.integers(1, 4))])
        else:
            stops.append(data.draw(st.text(min_size=1, max_size=3)))
    # The stream ends at the first stop string to be complete (the least end), cut at its start
    # (a stop string that starts earlier but would end later never gets the chance).
    found = [(ref.find(s) + len(s), ref.find(s)) for s in stops if s in ref]
    cut = min(found)[1] if found else None
    toks = list(model.generate_sync("Once upon a time", max_tokens=48, stop=stops))
    text = "".join(t.text for t in toks)
    assert model.complete_sync("Once upon a time", max_tokens=48, stop=stops).text == text
    if cut is None:
        assert text.startswith(ref) and toks[-1].finish_reason == "length"
    else:
        assert text == ref[:cut] and toks[-1].finish_reason == "stop"
        assert not any(s in text for s in stops)
    single = stops[0]  # a plain string is one stop string
    text1 = model.complete_sync("Once upon a time", max_tokens=48, stop=single).text
    assert text1 == (ref[:ref.find(single)] if single in ref else text1)


async def test_chat_messages_are_rendered_with_the_chat_template(model):
    """A list-of-dicts prompt is rendered with the checkpoint's chat template,
    add_generation_prompt=True: the same request as the rendered text's tokens."""
    text = model.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tools=None)
    assert isinstance(text, str) and text.endswith("<|im_start|>assistant\n")
    assert model.tokenizer.apply_chat_template(CHAT) == text  # add_generation_prompt=True by default
    plain = model.tokenizer.apply_chat_template(CHAT, add_generation_prompt=False)
    assert text.startswith(plain) and len(plain) < len(text)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "The weather",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
    assert "get_weather" in model.tokenizer.apply_chat_template(CHAT, tools=[tool]) and "get_weather" not in text
    ids = model.tokenizer.encode(text)
    assert model.tokenizer.decode(ids) == text
    chat = await model.complete(CHAT, max_tokens=10)
    assert chat.usage.prompt_tokens == len(ids)
    assert chat.token_ids == (await model.complete(ids, max_tokens=10)).token_ids
    assert [t.id for t in model.generate_sync(CHAT, max_tokens=10)] == chat.token_ids
    # a tuple of dicts is a list of messages as well
    assert (await model.complete(tuple(CHAT), max_tokens=10)).token_ids == chat.token_ids


def test_tool_calls_are_parsed_from_the_templates_format(tmp_path):
    from tests.helpers.serving import TOOL_CALL_JSON, tool_checkpoint

    with amlx.load_sync(tool_checkpoint(tmp_path / "tool")) as m:
        result = m.complete_sync([{"role": "user", "content": "Weather in Paris?"}], max_tokens=8)
    call = json.loads(TOOL_CALL_JSON)
    assert result.finish_reason == "stop" and result.tool_calls is not None and len(result.tool_calls) == 1
    (tc,) = result.tool_calls
    assert isinstance(tc, amlx.ToolCall) and tc.name == call["name"] and tc.id
    assert json.loads(tc.arguments) == call["arguments"]


async def test_score_is_the_log_probability_of_each_continuation(model, ckpt):
    prompt = model.tokenizer.encode("The quick brown fox")
    conts = [" jumps", [7, 8, 9], ""]
    scores = await model.score(prompt, conts)
    assert isinstance(scores, list) and len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert scores[2] == 0.0
    ref = load_reference(ckpt)
    for cont, got in zip(conts[:2], scores[:2]):
        ids = model.tokenizer.encode(cont, add_special_tokens=False) if isinstance(cont, str) else cont
        logits = reference_logits(ref, prompt + ids)[len(prompt) - 1:-1].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        assert got == pytest.approx(sum(logp[k, t] for k, t in enumerate(ids)), abs=2e-3)
    with pytest.raises(ValueError):
        await model.score(prompt, [[model.config["vocab_size"]]])  # token ids inside the vocabulary
    for p in (prompt, CHAT):  # the same numbers as a generated token's logprob
        result = await model.complete(p, max_tokens=8, logprobs=True)
        scored = await model.score(p, [result.token_ids, result.token_ids[:3]])
        assert scored == pytest.approx([sum(result.logprobs), sum(result.logprobs[:3])], abs=1e-3)


async def test_usage_cached_tokens_counts_the_prefix_cache(model):
    """`result.usage.cached_tokens`: prompt tokens served from the prefix cache (on by
    default); the result is the same as without it."""
    prompt = [(13 * i) % 300 + 1 for i in range(70)]
    first = await model.complete(prompt, max_tokens=8)
    again = await model.complete(prompt, max_tokens=8)
    longer = await model.complete(prompt + first.token_ids + [5, 6, 7], max_tokens=8)
    assert 0 < again.usage.cached_tokens < len(prompt) and again.token_ids == first.token_ids
    assert again.usage.prompt_tokens == len(prompt)
    assert longer.usage.cached_tokens >= again.usage.cached_tokens


# -- info, stats, memory ------------------------------------------------------------------

def test_model_info(model, ckpt):
    info = model.info
    assert isinstance(info, amlx.ModelInfo)
    assert info.architecture == "qwen3" and info.dtype == "float32" and info.device in ("cpu", "gpu")
    assert info.context_length == MAX_CONTEXT and info.quantization is None
    ref = load_reference(ckpt)
    assert info.parameters == sum(p.numel() for p in ref.parameters())  # (tied weights counted once)


async def test_stats_and_memory(model):
    _wait_idle(model)
    s = model.stats()
    for key in ("active_requests", "waiting_requests", "tokens_generated"):
        assert type(s[key]) is int and s[key] >= 0
    assert isinstance(s["tokens_per_second"], float) and s["tokens_per_second"] >= 0
    assert set(s["memory"]) >= {"active", "peak", "cache"} and all(type(v) is int for v in s["memory"].values())
    stream = model.generate("Hello", max_tokens=40, max_buffer=1)
    await stream.__anext__()
    assert model.stats()["active_requests"] == 1
    await stream.aclose()
    before = _wait_idle(model)["tokens_generated"]
    await model.complete("Hello", max_tokens=7)
    assert model.stats()["tokens_generated"] == before + 7
    mem = amlx.memory()
    assert set(mem) == {"active", "peak", "cache"} and all(type(v) is int and v >= 0 for v in mem.values())
    assert mem["peak"] >= mem["active"] > 0


# -- lifetime: close, ClosedError, async with ---------------------------------------------

async def test_close_is_idempotent_and_use_after_close_raises_closed_error(ckpt):
    import gc

    gc.collect()
    memory_before = amlx.memory()["active"]
    model = await amlx.load(ckpt, max_context=64)
    reading = model.generate("Hello", max_tokens=50, max_buffer=1)  # partly read
    first = await reading.__anext__()
    assert first.finish_reason is None
    unread = model.generate([5, 6, 7], max_tokens=50)  # made, never read
    chat = model.generate(CHAT, max_tokens=50)  # chat prompt: tokenized at the first read
    await model.aclose()
    await model.aclose()
    model.close()
    assert model.closed
    for stream in (reading, unread, chat):  # "pending streams of a closed model raise it"
        with pytest.raises(amlx.ClosedError):
            async for _ in stream:
                pass
    with pytest.raises(amlx.ClosedError):
        model.generate("Hello")
    with pytest.raises(amlx.ClosedError):
        await model.complete("Hello")
    with pytest.raises(amlx.ClosedError):
        model.generate_sync("Hello")
    with pytest.raises(amlx.ClosedError):
        await model.score("Hello", [" there"])
    assert issubclass(amlx.ClosedError, amlx.AmlxError)
    model.close()
    del reading, unread, chat, stream
    gc.collect()
    assert amlx.memory()["active"] == memory_before  # "closing a model returns MLX active memory"


async def test_async_with_closes_on_exit_also_on_error(ckpt):
    async with await amlx.load(ckpt, max_context=64) as model:
        assert isinstance(model, amlx.Model) and not model.closed
    assert model.closed
    with pytest.raises(KeyError):
        async with await amlx.load(ckpt, max_context=64) as model:
            raise KeyError("x")
    assert model.closed
    blocking = amlx.load_sync(ckpt, max_context=64)
    assert [t.id for t in blocking.generate_sync([5, 6, 7], max_tokens=3)] == \
        blocking.complete_sync([5, 6, 7], max_tokens=3).token_ids
    blocking.close()
    blocking.close()
    await blocking.aclose()
    assert blocking.closed


def test_context_length_error(model):
    """A prompt that does not fit the context: ContextLengthError (an AmlxError), at the call
    for token ids, at the first read for chat messages; one that fits but leaves less room
    than max_tokens ends with "length" at the context."""
    vocab = model.config["vocab_size"]
    too_long = [(7 * i) % vocab for i in range(MAX_CONTEXT + 10)]
    with pytest.raises(amlx.ContextLengthError):
        list(model.generate_sync(too_long, max_tokens=1))
    with pytest.raises(amlx.ContextLengthError):
        model.complete_sync(model.tokenizer.decode(too_long) * 4, max_tokens=1)
    with pytest.raises(amlx.ContextLengthError):
        model.complete_sync([{"role": "user", "content": "word " * MAX_CONTEXT * 2}], max_tokens=1)
    assert issubclass(amlx.ContextLengthError, amlx.AmlxError)
    near = too_long[:MAX_CONTEXT - 5]
    toks = list(model.generate_sync(near, max_tokens=50))
    assert len(toks) == 5 and toks[-1].finish_reason == "length"
    assert len(model.complete_sync([1, 2, 3], max_tokens=2).token_ids) == 2  # still serving


def _break(path, how: str):
    """Breaks the checkpoint at `path` one way; returns the file the error must name."""
    cfg = path / "config.json"
    if how == "no config":
        cfg.unlink()
        return "config.json"
    if how == "bad json":
        cfg.write_text("{ not json")
        return "config.json"
    if how == "unsupported architecture":
        raw = json.loads(cfg.read_text())
        raw.update(model_type="bogus", architectures=["BogusForCausalLM"])
        cfg.write_text(json.dumps(raw))
        return "config.json"
    if how == "no weights":
        (path / "model.safetensors").unlink()
        return "model.safetensors"
    if how == "truncated weights":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:len(data) // 2])
        return "model.safetensors"
    if how == "no tokenizer":
        (path / "tokenizer.json").unlink()
        return "tokenizer.json"
    if how == "bad tokenizer":
        (path / "tokenizer.json").write_text("[]")
        return "tokenizer.json"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["no config", "bad json", "unsupported architecture", "no weights",
                                 "truncated weights", "no tokenizer", "bad tokenizer"])
def test_model_load_error_names_the_file_and_the_reason(ckpt, tmp_path, how):
    path = tmp_path / "broken"
    shutil.copytree(ckpt, path)
    name = _break(path, how)
    with pytest.raises(amlx.ModelLoadError) as err:
        amlx.load_sync(path).close()
    message = str(err.value)
    assert name in message and len(message) > len(str(path / name)) + 5, message  # the file, then why
    assert isinstance(err.value, amlx.AmlxError)
    if how == "unsupported architecture":
        assert "bogus" in message


async def test_load_error_for_a_missing_directory(tmp_path):
    with pytest.raises(amlx.ModelLoadError, match="nothing-here"):
        await amlx.load(tmp_path / "nothing-here")


# -- concurrency, cancellation, trio ------------------------------------------------------

async def test_concurrent_requests_and_cancellation(model):
    """Any number of generate calls at once give their solo results; leaving an `async for`
    early, aclose() and task cancellation remove a request and free its KV memory."""
    prompts = [[5, 6, 7], "Hello there", CHAT, [100, 200, 300, 400], "Once upon a time"]
    solo = [(await model.complete(p, max_tokens=16)).token_ids for p in prompts]

    async def leave_early(p):
        async for tok in model.generate(p, max_tokens=200):
            break

    async def cancelled(p):
        task = asyncio.ensure_future(model.complete(p, max_tokens=400))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def closed_stream(p):
        stream = model.generate(p, max_tokens=300)
        await stream.__anext__()
        await stream.aclose()

    results = await asyncio.gather(*(model.complete(p, max_tokens=16) for p in prompts),
                                   leave_early("abc"), cancelled("def"), closed_stream("ghi"),
                                   asyncio.wait_for(model.complete("jkl", max_tokens=10**6), 0.05),
                                   return_exceptions=True)
    assert [r.token_ids for r in results[:len(prompts)]] == solo
    assert isinstance(results[-1], asyncio.TimeoutError)
    s = _wait_idle(model)
    assert s["kv_cache"]["blocks_used"] == 0, s


async def test_backpressure_pauses_an_unread_stream_without_holding_up_others(model):
    solo = (await model.complete([11, 12, 13], max_tokens=40)).token_ids
    before = _wait_idle(model)["tokens_generated"]
    paused = model.generate([11, 12, 13], max_tokens=40, max_buffer=2)
    first = await paused.__anext__()  # started; now left unread
    other = await model.complete([21, 22], max_tokens=30)
    assert other.usage.completion_tokens == 30
    await asyncio.sleep(0.1)
    produced = model.stats()["tokens_generated"] - before - 30
    assert produced <= 1 + 2 + 2, produced  # the token read, max_buffer unread (+ steps in flight)
    rest = [t.id async for t in paused]
    assert [first.id] + rest == solo  # a pause does not change the result


def test_generate_sync_from_several_threads_at_once(model):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [[5, 6, 7], "Hello there", CHAT, [9, 10]]
    solo = [model.complete_sync(p, max_tokens=12).token_ids for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: [t.id for t in model.generate_sync(p, max_tokens=12)], prompts * 2))
    assert together == solo * 2
    for tok in model.generate_sync([1, 2, 3], max_tokens=300):  # leaving a blocking loop early
        break
    assert _wait_idle(model)["kv_cache"]["blocks_used"] == 0


def test_runs_under_trio_and_uvloop(ckpt):
    import trio

    def trio_running() -> bool:
        try:
            trio.lowlevel.current_trio_token()
            return True
        except RuntimeError:
            return False

    async def main():
        async with await amlx.load(ckpt, max_context=64) as model:
            result = await model.complete([5, 6, 7], max_tokens=4)
            streamed = [t.id async for t in model.generate([5, 6, 7], max_tokens=4)]
            if trio_running():
                with trio.move_on_after(0.01):
                    async for _ in model.generate([5, 6, 7], max_tokens=10**6):
                        pass
            return result.token_ids, streamed

    ids, streamed = trio.run(main)
    assert ids == streamed and len(ids) == 4
    uvloop = pytest.importorskip("uvloop")
    assert uvloop.run(main()) == (ids, streamed)


# -- checkpoints: both config styles, MLX-quantized --------------------------------------

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _assert_matches_reference(model, ref, prompt: list[int], n: int = 10, atol: float = 2e-3,
                              decode_atol: float | None = None) -> None:
    """Greedy tokens and their logprobs from amlx agree with transformers' forward pass over
    the same tokens (a near-tie may pick either token). `decode_atol`: the tolerance of
    decode steps, where it differs (quantized weights on the CPU multiply activations
    rounded to int8, amlx.models.cpu_matmul); each position is then also checked as the first
    token after a prompt (a prefill pass, float kernels) at `atol`."""
    result = model.complete_sync(prompt, max_tokens=n, logprobs=True)
    logp = _log_softmax(reference_logits(ref, prompt + result.token_ids[:-1]))[len(prompt) - 1:]
    tol = atol if decode_atol is None else decode_atol
    for k, tok in enumerate(result.token_ids):
        assert logp[k, tok] >= logp[k].max() - tol, (k, tok)
        assert result.logprobs[k] == pytest.approx(logp[k, tok], abs=tol)
        if decode_atol is not None:
            first = model.complete_sync(prompt + result.token_ids[:k], max_tokens=1, logprobs=True)
            assert logp[k, first.token_ids[0]] >= logp[k].max() - atol, k
            assert first.logprobs[0] == pytest.approx(logp[k, first.token_ids[0]], abs=atol)


PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 21, 8, 77, 150]  # longer than Gemma's window of 8


@pytest.mark.parametrize("arch", ["gemma3_text", "llama"])
def test_old_and_new_config_styles_both_load(tmp_path, arch):
    """rope_theta / rope_scaling / sliding_window_pattern (older) and rope_parameters /
    layer_types (newer) configs load to the model transformers runs."""
    paths = {style: make_checkpoint(tmp_path / style, arch, config_style=style) for style in ("old", "new")}
    old_cfg = json.loads((paths["old"] / "config.json").read_text())
    new_cfg = json.loads((paths["new"] / "config.json").read_text())
    assert "rope_theta" in old_cfg and "rope_parameters" not in old_cfg
    assert "rope_parameters" in new_cfg and "rope_theta" not in new_cfg
    if arch == "gemma3_text":
        assert "sliding_window_pattern" in old_cfg and "layer_types" in new_cfg
    ref = load_reference(paths["new"])
    for style, path in paths.items():
        with amlx.load_sync(path) as m:
            assert m.info.architecture == arch.removesuffix("_text") or m.info.architecture == arch
            _assert_matches_reference(m, ref, PROMPT)


def _quantize(w: np.ndarray, group: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MLX's affine quantization written out in numpy, as mlx-community checkpoints hold it:
    per group of `group` inputs a scale and a bias (w ~ q * scale + bias), q packed into
    uint32 words lowest bits first. Returns (packed, scales, biases, dequantized)."""
    out, inp = w.shape
    g = w.reshape(out, inp // group, group).astype(np.float64)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    scale = np.maximum((hi - lo) / (2**bits - 1), 1e-8)
    q = np.clip(np.rint((g - lo) / scale), 0, 2**bits - 1).astype(np.uint32)
    scale, lo = scale.astype(np.float32), lo.astype(np.float32)
    deq = (q * scale + lo).reshape(out, inp).astype(np.float32)
    per = 32 // bits
    words = q.reshape(out, inp // per, per) << (np.arange(per, dtype=np.uint32) * bits)
    return words.sum(-1, dtype=np.uint32), scale[..., 0], lo[..., 0], deq


def test_mlx_quantized_checkpoint_loads(tmp_path):
    """The mlx-community format: `quantization` (and `quantization_config`) in config.json,
    packed uint32 `weight` with `scales` and `biases` per Linear and for the embedding, with
    mlx-lm's per-layer entries; the model is the dequantized weights' model."""
    import torch
    from safetensors.numpy import load_file, save_file

    src = make_checkpoint(tmp_path / "float", "qwen3", seed=3)  # tied embeddings: the embedding is lm_head
    dst = tmp_path / "mlx-4bit"
    shutil.copytree(src, dst)
    special = "model.layers.0.mlp.down_proj"
    tensors = load_file(str(src / "model.safetensors"))
    out, dequantized = {}, {}
    for name, w in tensors.items():
        prefix = name.removesuffix(".weight")
        if name.endswith(".weight") and w.ndim == 2:
            group, bits = (32, 8) if prefix == special else (64, 4)
            packed, scales, biases, deq = _quantize(w, group, bits)
            out.update({name: packed, f"{prefix}.scales": scales, f"{prefix}.biases": biases})
            dequantized[name] = deq
        else:
            out[name] = w
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "mlx"})
    cfg = json.loads((dst / "config.json").read_text())
    q = {"group_size": 64, "bits": 4, special: {"group_size": 32, "bits": 8}}
    cfg.update(quantization=q, quantization_config=q)
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))

    ref = load_reference(src)
    with torch.no_grad():
        params = dict(ref.named_parameters())
        for name, deq in dequantized.items():
            params[name].copy_(torch.from_numpy(deq))
    # (prefix_cache=False: a block cached from a decode step holds keys and values of int8
    # activations, so a prompt behind it would not be the float prefill checked here)
    with amlx.load_sync(dst, prefix_cache=False) as m:
        assert m.info.quantization is not None
        assert m.info.quantization["group_size"] == 64 and m.info.quantization["bits"] == 4
        assert m.info.parameters == sum(p.numel() for p in ref.parameters())  # unpacked count
        _assert_matches_reference(m, ref, PROMPT, decode_atol=0.3)


# -- the server -----------------------------------------------------------------------------

KEYS = ("key-one", "key-two")


def test_serve_flags_and_their_defaults():
    from amlx.cli import parser

    args = parser().parse_args(["serve"])
    assert args.model is None  # no MODEL: the embedded demo model
    assert (args.host, args.port, args.api_key, args.max_batch_size, args.max_queue, args.model_name) == \
        ("127.0.0.1", 8000, [], 32, 256, None)
    args = parser().parse_args(["serve", "some/dir", "--host", "0.0.0.0", "--port", "9", "--api-key", "a",
                                "--api-key", "b", "--max-batch-size", "3", "--max-queue", "4", "--model-name", "m"])
    assert (args.model, args.host, args.port, args.api_key, args.max_batch_size, args.max_queue, args.model_name) == \
        ("some/dir", "0.0.0.0", 9, ["a", "b"], 3, 4, "m")


@pytest.fixture(scope="module")
def server():
    """The embedded demo model (no MODEL), two keys, one running request and one queued."""
    with ServerProcess(None, "--api-key", KEYS[0], "--api-key", KEYS[1], "--max-batch-size", "1",
                       "--max-queue", "1", "--model-name", "demo", "--keepalive", "0.2") as srv:
        yield srv


def _auth(key: str = KEYS[0]) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def _events(text: str) -> list:
    """The `data:` payloads of an SSE body, in order (keep-alive comments left out)."""
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


async def test_serve_embedded_model_with_repeatable_keys(server):
    from amlx.demo import default_model_dir

    for key in KEYS:
        client = server.client(api_key=key)
        assert [m.id for m in (await client.models.list()).data] == ["demo"]
        assert (await client.models.retrieve("demo")).id == "demo"
    reply = await server.client(api_key=KEYS[1]).chat.completions.create(model="demo", messages=CHAT, max_tokens=12, temperature=0)
    async with await amlx.load(default_model_dir()) as embedded:  # the same model in-process
        ref = await embedded.complete(CHAT, max_tokens=12)
    assert reply.choices[0].message.content == ref.text
    assert reply.usage.prompt_tokens == ref.usage.prompt_tokens
    assert reply.usage.completion_tokens == ref.usage.completion_tokens
    assert reply.choices[0].finish_reason == ref.finish_reason


def test_serve_routes_auth_and_error_shapes(server):
    url = server.url
    for headers in ({}, _auth("wrong"), {"Authorization": KEYS[0]}):
        assert _openai_error(httpx.get(url + "/v1/models", headers=headers), 401)
        assert _openai_error(httpx.post(url + "/v1/chat/completions", headers=headers,
                                        json={"model": "demo", "messages": CHAT}), 401)
    assert httpx.get(url + "/health").status_code == 200  # open, like the page
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<html" in page.text.lower()
    metrics = httpx.get(url + "/metrics", headers=_auth())
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert "# TYPE" in metrics.text
    from prometheus_client.parser import text_string_to_metric_families

    assert len(list(text_string_to_metric_families(metrics.text))) > 3  # valid Prometheus text
    assert _openai_error(httpx.get(url + "/v1/no-such-route", headers=_auth()), 404)
    err = _openai_error(httpx.post(url + "/v1/chat/completions", headers=_auth(),
                                   json={"model": "other", "messages": CHAT}), 404)
    assert err["param"] == "model"
    assert _openai_error(httpx.get(url + "/v1/models/other", headers=_auth()), 404)


BAD_BODIES = [
    dict(temperature=-1), dict(temperature="hot"), dict(top_p=1.5), dict(max_tokens=0), dict(max_tokens=-4),
    dict(n=0), dict(presence_penalty=3), dict(frequency_penalty=-3), dict(logit_bias={"99999999": 1}),
    dict(logit_bias={"1": 500}), dict(top_logprobs=21, logprobs=True), dict(top_logprobs=2),
    dict(stop=["a", "b", "c", "d", "e"]), dict(seed="x"), dict(response_format={"type": "bogus"}),
    dict(messages=[]), dict(messages=[{"role": "bogus", "content": "x"}]), dict(messages="hi"),
    dict(stream_options={"include_usage": True}), dict(no_such_field=1),
    dict(messages=[{"role": "user", "content": "word " * 3000}]),  # past the context
]
BAD_COMPLETIONS = [dict(prompt=[10**9]), dict(prompt=[-1]), dict(prompt=[]), dict(prompt=3.5), dict(echo="x")]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chat=st.integers(0, len(BAD_BODIES) - 1), completion=st.integers(0, len(BAD_COMPLETIONS) - 1))
def test_serve_bad_requests_get_an_openai_400_and_the_server_goes_on(server, chat, completion):
    body = dict(model="demo", messages=CHAT, max_tokens=2) | BAD_BODIES[chat]
    _openai_error(httpx.post(server.url + "/v1/chat/completions", headers=_auth(), json=body, timeout=60), 400)
    body = dict(model="demo", prompt="Hello", max_tokens=2) | BAD_COMPLETIONS[completion]
    _openai_error(httpx.post(server.url + "/v1/completions", headers=_auth(), json=body, timeout=60), 400)
    r = httpx.post(server.url + "/v1/completions", headers=_auth(), timeout=60,
                   json=dict(model="demo", prompt="Hello", max_tokens=2))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2


def test_serve_sse_ends_with_done_and_include_usage_adds_the_usage_chunk(server):
    for route, body in (("/v1/chat/completions", dict(messages=CHAT)), ("/v1/completions", dict(prompt="Hello"))):
        for include in (False, True):
            extra = {"stream_options": {"include_usage": True}} if include else {}
            with httpx.stream("POST", server.url + route, headers=_auth(), timeout=60,
                              json=dict(model="demo", max_tokens=5, temperature=0, stream=True, **body, **extra)) as r:
                assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
                events = _events(r.read().decode())
            assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
            chunks = [json.loads(e) for e in events[:-1]]
            usage = [c for c in chunks if c.get("usage")]
            if include:
                assert len(usage) == 1 and usage[0] is chunks[-1] and usage[0]["choices"] == []
                assert 1 <= usage[0]["usage"]["completion_tokens"] <= 5
            else:
                assert usage == []
            finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")]
            assert len(finishes) == 1 and finishes[0] in ("stop", "length")


async def test_serve_full_queue_is_429_and_a_gone_client_frees_its_slot(server):
    """--max-batch-size 1 --max-queue 1: a third request at once gets 429 (rate_limit_error);
    a client that disconnects cancels its request, so the slot comes back."""
    from amlx.demo import default_model_dir

    client = server.client(api_key=KEYS[0])
    eos = json.loads((default_model_dir() / "generation_config.json").read_text())["eos_token_id"]
    no_eos = {str(i): -100 for i in (eos if isinstance(eos, list) else [eos])}  # runs to max_tokens
    long = dict(model="demo", messages=CHAT, max_tokens=300, temperature=1.0, seed=1, logit_bias=no_eos)

    async def attempt():
        try:
            await client.chat.completions.create(**long)
            return 200
        except openai.APIStatusError as e:
            assert e.status_code == 429 and e.body["type"] == "rate_limit_error", e.body
            return 429

    statuses = await asyncio.gather(*(attempt() for _ in range(4)))
    assert 429 in statuses and statuses.count(200) >= 2

    def cancelled() -> float:
        return sum(v for k, v in server.metrics(_auth()).items() if k.startswith("amlx_requests_cancelled_total"))

    before = cancelled()
    for _ in range(2):  # disconnect mid-stream, twice: each frees the only running slot
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream("POST", server.url + "/v1/chat/completions", headers=_auth(),
                                   json=dict(long, max_tokens=10**5, stream=True)) as r:
                assert r.status_code == 200
                async for _ in r.aiter_lines():
                    break
    for _ in range(600):  # (a bound on the wait, not a timing assertion)
        if server.health()["running"] == 0 and server.health()["waiting"] == 0:
            break
        await asyncio.sleep(0.05)
    assert cancelled() - before == 2
    r = await client.chat.completions.create(model="demo", messages=CHAT, max_tokens=2)
    assert r.usage.completion_tokens <= 2


def test_no_code_from_a_checkpoint_runs(ckpt, tmp_path):
    """"Never execute code from a checkpoint; render chat templates in a sandboxed Jinja
    environment": auto_map modules are never imported, and a template that reaches for
    Python internals fails with ChatTemplateError (a ValueError) instead of running."""
    path = tmp_path / "evil"
    shutil.copytree(ckpt, path)
    marker = tmp_path / "ran"
    for module in ("modeling_evil.py", "tokenization_evil.py", "configuration_evil.py"):
        (path / module).write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_evil.C", "AutoModelForCausalLM": "modeling_evil.M"}
    (path / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.T", None]}
    for template in ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                     "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}",
                     "{% for x in range(10**9) %}{{ x }}{% endfor %}"):
        tok_cfg["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        with amlx.load_sync(path) as m:
            with pytest.raises(amlx.ChatTemplateError):
                m.complete_sync(CHAT, max_tokens=2)
            assert issubclass(amlx.ChatTemplateError, ValueError)
            assert len(m.complete_sync("plain text still works", max_tokens=2).token_ids) == 2
    assert not marker.exists()


@pytest.mark.parametrize("stop", ["\ud800", ["ok", "a\udfffb"]])
def test_a_stop_string_with_a_lone_surrogate_is_refused_by_name(stop):
    """A lone surrogate (a JSON "\\ud800" escape) can never occur in generated text, which is
    UTF-8: such a stop string was accepted and silently never matched."""
    with pytest.raises(ValueError, match="a stop string holds an unpaired surrogate"):
        amlx.GenerationOptions.from_kwargs(stop=stop)
