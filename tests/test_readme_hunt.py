"""What README.md promises a user, checked example by example and claim by claim.

Every Python example of the README runs here as written, with only the model path changed (the
embedded demo model, `amlx.demo.default_model_dir()`, or a tiny random checkpoint built as the other
tests build them); the server examples run against the in-process app (tests.helpers.serving's
MountedApps) through the official openai client. Tests that guard a fix say what was wrong.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import inspect
import io
import json
import os
import warnings
from pathlib import Path

import httpx
import pytest

import amlx
from amlx.demo import default_model_dir
from tests.helpers.cli import main_in_process

EMBEDDED = str(default_model_dir())
ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


# -- the first example and "Using it" -------------------------------------------------------------------

async def test_the_opening_example_streams_tokens_with_text(capsys):
    async def main():
        async with await amlx.load(EMBEDDED) as model:
            async for tok in model.generate("Why is the sky blue?", max_tokens=128, temperature=0.7):
                print(tok.text, end="", flush=True)

    await main()
    assert capsys.readouterr().out.strip()


def test_load_and_load_sync_take_the_documented_options_with_their_defaults():
    documented = dict(device="auto", dtype=None, max_batch_size=32, max_context=None, adapter=None,
                      kv_cache_memory=None, prefix_cache=True, kv_bits=None, draft=None, num_draft_tokens=4,
                      tensor_parallel=1)
    for fn in (amlx.load, amlx.load_sync):
        params = inspect.signature(fn).parameters
        assert list(params)[0] == "path"
        assert {name: params[name].default for name in documented} == documented, fn


def test_the_generate_options_have_the_documented_defaults():
    documented = dict(max_tokens=256, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                      seed=None, logprobs=False, max_buffer=16, presence_penalty=0.0, frequency_penalty=0.0,
                      logit_bias=None, top_logprobs=0, response_format=None, regex=None, choice=None, grammar=None)
    options = amlx.GenerationOptions()
    assert {name: getattr(options, name) for name in documented} == documented
    assert tuple(options.stop) == ()
    assert set(documented) | {"stop"} == set(amlx.GenerateOptions.__annotations__)


async def test_the_using_it_block_has_the_documented_results():
    async with await amlx.load(EMBEDDED) as model:
        tokens = [tok async for tok in model.generate("Hi", max_tokens=4)]
        for tok in tokens:
            assert isinstance(tok, amlx.Token)
            assert isinstance(tok.id, int) and isinstance(tok.text, str)
        assert [t.finish_reason for t in tokens[:-1]] == [None] * (len(tokens) - 1)
        assert tokens[-1].finish_reason in ("stop", "length")
        result = await model.complete("Hi", max_tokens=64)
        assert isinstance(result, amlx.Completion)
        for field in ("text", "token_ids", "finish_reason", "usage", "tool_calls"):
            assert hasattr(result, field), field
        assert result.usage.prompt_tokens >= 1 and result.usage.completion_tokens == len(result.token_ids)
        assert isinstance(result.usage.cached_tokens, int)
        ids = model.tokenizer.encode("hello world")
        assert model.tokenizer.decode(ids) == "hello world"
        assert isinstance(model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}]), str)
        info = model.info
        for field in ("architecture", "parameters", "dtype", "device", "context_length", "quantization"):
            assert hasattr(info, field), field
        assert info.architecture == "qwen3" and info.device in ("cpu", "gpu") and info.quantization is None
        stats = model.stats()
        for key in ("active_requests", "waiting_requests", "tokens_generated", "tokens_per_second", "memory",
                    "kv_cache"):
            assert key in stats, key
        assert set(amlx.memory()) == {"active", "peak", "cache"}
        assert all(isinstance(v, int) for v in amlx.memory().values())


def test_generate_sync_is_a_blocking_iterator_over_the_same_engine():
    model = amlx.load_sync(EMBEDDED)
    try:
        tokens = list(model.generate_sync("Hi", max_tokens=5))
        assert tokens and all(isinstance(t, amlx.Token) for t in tokens)
        assert tokens[-1].finish_reason in ("stop", "length")
    finally:
        model.close()


async def test_aclose_ends_pending_streams_with_closed_error():
    model = await amlx.load(EMBEDDED)
    stream = model.generate("Hi", max_tokens=100)
    await model.aclose()
    with pytest.raises(amlx.ClosedError):
        async for _ in stream:
            pass


async def test_a_model_dropped_while_open_warns_with_a_resource_warning():
    model = await amlx.load(EMBEDDED)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del model
        gc.collect()
    assert any(issubclass(w.category, ResourceWarning) for w in caught)


# -- First run --------------------------------------------------------------------------------------------

def test_no_compile_notice_when_mlx_disable_compile_is_set(tmp_path, monkeypatch):
    """README: with a cold kernel cache the command line says it compiles MLX's CPU kernels, and
    MLX_DISABLE_COMPILE=1 skips compilation altogether. With the variable set (MLX reads it as set
    at all, whatever its value) the notice still said "compiling ... about a minute" before a first
    token that came at once."""
    from amlx.kernel_cache import NOTICE, first_run_notice

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a cold cache
    monkeypatch.delenv("MLX_DISABLE_COMPILE", raising=False)
    out = io.StringIO()
    assert first_run_notice("cpu", out=out) and out.getvalue() == NOTICE + "\n"
    for value in ("1", "0", ""):
        monkeypatch.setenv("MLX_DISABLE_COMPILE", value)
        out = io.StringIO()
        assert not first_run_notice("cpu", out=out) and out.getvalue() == "", value


# -- options -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    """The embedded demo model, shared by the synchronous tests of this module."""
    m = amlx.load_sync(EMBEDDED)
    yield m
    m.close()


def _tokens(model, prompt="Hi", **options) -> list:
    return list(model.generate_sync(prompt, **options))


@pytest.mark.parametrize("option, bad, edge", [
    ("max_tokens", 0, 1), ("temperature", -0.5, 0.0), ("top_p", 1.5, 1.0), ("top_k", -1, 0), ("min_p", 1.5, 1.0),
    ("presence_penalty", 2.01, 2.0), ("presence_penalty", -2.01, -2.0), ("frequency_penalty", 2.01, 2.0),
    ("frequency_penalty", -2.01, -2.0), ("logit_bias", {5: 100.5}, {5: 100}), ("logit_bias", {5: -100.5}, {5: -100}),
    ("logit_bias", {10**6: 1.0}, {1023: 1.0}), ("top_logprobs", 21, 20), ("top_logprobs", -1, 0), ("max_buffer", 0, 1),
])
def test_options_are_validated_up_front_with_the_documented_bounds(model, option, bad, edge):
    with pytest.raises(ValueError):
        model.generate("Hi", **{option: bad})  # at the call, before anything runs
    assert _tokens(model, **{"max_tokens": 2, option: edge})


def test_top_logprobs_turns_logprobs_on_and_lists_the_best_first(model):
    tokens = _tokens(model, max_tokens=4, top_logprobs=3)
    for tok in tokens:
        assert tok.logprob is not None and len(tok.top_logprobs) == 3
        values = [lp for _, lp in tok.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert tok.top_logprobs[0] == (tok.id, tok.logprob)  # greedy: the best is the token taken


def test_logprobs_are_the_models_own_before_penalties_bias_temperature_and_filters(model):
    chat = [{"role": "user", "content": "Tell me a story about a fox."}]
    plain = _tokens(model, chat, max_tokens=16, logprobs=True)
    # top_k=1 keeps the greedy token whatever the temperature: the same tokens, sampled through every knob
    other = _tokens(model, chat, max_tokens=16, logprobs=True, temperature=0.5, top_k=1, min_p=0.05,
                    presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={7: -5.0})
    assert [t.id for t in other] == [t.id for t in plain]
    assert [t.logprob for t in other] == pytest.approx([t.logprob for t in plain], abs=1e-5)


def test_stop_strings_end_the_stream_and_are_not_emitted(model):
    chat = [{"role": "user", "content": "Tell me a story about a fox."}]
    full = "".join(t.text for t in _tokens(model, chat, max_tokens=40))
    stop = full[12:17]
    assert stop.strip() and len(full) > 20
    tokens = _tokens(model, chat, max_tokens=40, stop=[stop])
    text = "".join(t.text for t in tokens)
    assert stop not in text and full.startswith(text) and tokens[-1].finish_reason == "stop"


def test_an_unpaired_surrogate_is_a_value_error_naming_its_position(model):
    with pytest.raises(ValueError, match="character 4"):
        _tokens(model, "bad \ud800 text", max_tokens=1)


def test_the_error_classes_are_as_documented():
    for cls in (amlx.ModelLoadError, amlx.MLXError, amlx.ClosedError, amlx.ContextLengthError,
                amlx.ChatTemplateError, amlx.ConstraintError):
        assert issubclass(cls, amlx.AmlxError), cls
    for cls in (amlx.ContextLengthError, amlx.ChatTemplateError, amlx.ConstraintError):
        assert issubclass(cls, ValueError), cls
    from amlx import train

    assert issubclass(train.NonFiniteLossError, amlx.AmlxError)
    assert issubclass(train.DataError, amlx.AmlxError)


def _copy_embedded(tmp_path, name="ckpt") -> Path:
    import shutil

    return Path(shutil.copytree(EMBEDDED, tmp_path / name))


@pytest.mark.parametrize("template", ["{% for i in range(10**9) %}x{% endfor %}", "{{ 'x' * 10**9 }}",
                                      "{{ cycler.__init__.__globals__ }}"])
def test_chat_templates_past_the_sandboxs_limits_raise_chat_template_error(tmp_path, template):
    path = _copy_embedded(tmp_path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    m = amlx.load_sync(path)
    try:
        with pytest.raises(amlx.ChatTemplateError):
            m.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        with pytest.raises(amlx.ChatTemplateError):
            _tokens(m, [{"role": "user", "content": "hi"}], max_tokens=1)
    finally:
        m.close()


# -- KV cache and prefix caching ------------------------------------------------------------------------------

def test_context_length_is_what_the_kv_cache_memory_holds_and_a_prompt_past_it_says_what_it_needs():
    m = amlx.load_sync(EMBEDDED, kv_cache_memory=20_000)
    try:
        assert m.stats()["kv_cache"]["block_size"] == 16
        assert m.info.context_length == 16  # one block: what one request can hold
        with pytest.raises(amlx.ContextLengthError, match="MiB"):
            _tokens(m, "x " * 100, max_tokens=1)
        tokens = _tokens(m, "Hi", max_tokens=256)  # a reply stops at the context's end
        assert len(tokens) == 15 and tokens[-1].finish_reason == "length"
    finally:
        m.close()


async def test_leaving_the_async_for_gives_the_kv_blocks_back():
    async with await amlx.load(EMBEDDED) as m:
        async for _ in m.generate("x " * 100, max_tokens=50):
            assert m.stats()["kv_cache"]["blocks_used"] > 0
            break
        for _ in range(200):  # (the worker frees them before its next step)
            if m.stats()["kv_cache"]["blocks_used"] == 0:
                break
            await asyncio.sleep(0.01)
        assert m.stats()["kv_cache"]["blocks_used"] == 0
        async with m.generate("Hi", max_tokens=30) as stream:  # the explicit form
            async for _ in stream:
                break


@pytest.mark.parametrize("options, reuses_reply", [({}, True), ({"kv_bits": 8}, False), ({"prefix_cache": False}, None)])
async def test_a_chats_next_turn_reuses_the_cached_blocks(options, reuses_reply):
    """Full blocks of earlier prompts and replies are reused (cached_tokens); with kv_bits only
    the prompt's; with prefix_cache=False none."""
    async with await amlx.load(EMBEDDED, **options) as m:
        chat = [{"role": "system", "content": "You are a helpful assistant who answers every question about "
                                              "animals and colours briefly and kindly."},
                {"role": "user", "content": "Tell me a story about a fox."}]
        first = await m.complete(chat, max_tokens=60)
        chat += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a horse?"}]
        second = await m.complete(chat, max_tokens=5)
        cached = second.usage.cached_tokens
        assert cached % 16 == 0
        if reuses_reply is None:
            assert cached == 0
        elif reuses_reply:
            assert cached > first.usage.prompt_tokens
        else:
            assert 0 < cached <= first.usage.prompt_tokens


def test_kv_bits_refuses_a_head_dimension_not_a_multiple_of_32_before_the_weights_are_read(tmp_path):
    path = _copy_embedded(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(head_dim=16, num_attention_heads=8, num_key_value_heads=4)  # (weights of head_dim 32 stay)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="divisible by 32") as caught:
        amlx.load_sync(path, kv_bits=8)
    assert not isinstance(caught.value, amlx.ModelLoadError)
    with pytest.raises(amlx.ModelLoadError):  # without kv_bits the weights are read, and do not fit
        amlx.load_sync(path)


# -- speculative decoding ----------------------------------------------------------------------------------

@pytest.mark.parametrize("draft", ["prompt_lookup", EMBEDDED])
async def test_greedy_output_with_a_draft_is_what_it_is_without(draft):
    prompts = [[{"role": "user", "content": p}] for p in ("Tell me a story about a fox.", "Hello!")]
    async with await amlx.load(EMBEDDED) as m:
        plain = [(await m.complete(p, max_tokens=40)).token_ids for p in prompts]
    async with await amlx.load(EMBEDDED, draft=draft, num_draft_tokens=3) as m:
        drafted = await asyncio.gather(*(m.complete(p, max_tokens=40) for p in prompts))
        counters = m.stats()["speculative"]
    assert [r.token_ids for r in drafted] == plain
    assert counters["drafted_tokens"] > 0 and "accepted_tokens" in counters


def test_a_draft_model_of_another_tokenizer_is_refused_at_load(tmp_path):
    draft = _copy_embedded(tmp_path, "draft")
    config = json.loads((draft / "tokenizer_config.json").read_text())
    config["eos_token"] = config["pad_token"]  # the same vocabulary, another EOS
    (draft / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(amlx.ModelLoadError) as caught:
        amlx.load_sync(EMBEDDED, draft=str(draft))
    assert isinstance(caught.value, ValueError)


# -- structured outputs and scoring ----------------------------------------------------------------------------

async def test_the_structured_output_examples_run_and_match_their_constraints():
    import re

    schema = {"type": "object", "properties": {"mood": {"enum": ["good", "bad"]}, "score": {"type": "boolean"}},
              "required": ["mood", "score"], "additionalProperties": False}
    lark_text = 'start: "yes" | "no"'
    prompt = "Hi"
    async with await amlx.load(EMBEDDED) as model:
        anything = await model.complete(prompt, response_format={"type": "json_object"})          # any JSON object
        person = await model.complete(prompt, response_format={"type": "json_schema",
                                      "json_schema": {"name": "person", "schema": schema}})
        phone = await model.complete(prompt, regex=r"\d{3}-\d{4}")                              # the whole text matches
        label = await model.complete(prompt, choice=["positive", "negative", "neutral"])       # exactly one of them
        answer = await model.complete(prompt, grammar=lark_text)                                # a Lark grammar
    assert anything.text.startswith("{")
    assert anything.finish_reason == "length" or isinstance(json.loads(anything.text), dict)
    assert person.finish_reason == "stop"
    value = json.loads(person.text)
    assert value["mood"] in ("good", "bad") and isinstance(value["score"], bool)
    assert person.text == json.dumps(value)  # as json.dumps writes it
    assert phone.finish_reason == "stop" and re.fullmatch(r"\d{3}-\d{4}", phone.text)
    assert label.text in ("positive", "negative", "neutral")
    assert answer.text in ("yes", "no")


def test_constraints_refused_up_front_and_their_documented_bounds(model):
    from amlx.types import INLINE_CONSTRAINT_CHARS

    assert INLINE_CONSTRAINT_CHARS == 4096
    with pytest.raises(ValueError, match="at most one constraint"):
        model.generate("Hi", regex="a", choice=["a"])
    for bad in ({"regex": "(?=a)b"}, {"regex": r"\bfoo"}, {"regex": "("}, {"grammar": "start: ("}):
        with pytest.raises(ValueError):
            model.generate("Hi", **bad)
    # longer than 64 KiB: refused (at the stream's first read, as any constraint past 4,096 characters)
    with pytest.raises(ValueError, match="at most 65536"):
        _tokens(model, regex="a" * (64 * 1024 + 1), max_tokens=1)
    assert _tokens(model, regex="a" * 5000, max_tokens=2)  # past 4,096, under 64 KiB: taken


def test_a_constraint_the_engine_gives_up_on_fails_with_constraint_error(model):
    with pytest.raises(amlx.ConstraintError):
        _tokens(model, regex="(a{1000}){1000}", max_tokens=4)


async def test_the_domain_classification_example_runs_both_ways():
    DOMAINS = ["sports", "politics", "science", "finance", "health"]

    def question(sentence: str) -> list[dict]:
        return [{"role": "user", "content": f"Which domain is this sentence about ({', '.join(DOMAINS)})?\n"
                                            f"{sentence}\nAnswer with the domain only."}]

    async def classify(model: amlx.Model, sentence: str) -> str:
        result = await model.complete(question(sentence), choice=DOMAINS, max_tokens=8)
        return result.text

    async def classify_by_score(model: amlx.Model, sentence: str) -> dict[str, float]:
        scores = await model.score(question(sentence), DOMAINS)
        return dict(zip(DOMAINS, scores))

    async with await amlx.load(EMBEDDED) as model:
        sentences = ["The striker scored twice in the derby.", "The central bank raised rates again."]
        labels = await asyncio.gather(*(classify(model, s) for s in sentences))   # batched together
        ranked = await classify_by_score(model, sentences[0])
        # score: each continuation's total log-probability right after the prompt
        prompt_ids = model.tokenizer.encode(model.tokenizer.apply_chat_template(question(sentences[0])))
        by_hand = []
        for label in DOMAINS:
            ids = prompt_ids + model.tokenizer.encode(label)
            steps = await model.prompt_logprobs(ids)
            by_hand.append(sum(t.logprob for t in steps[len(prompt_ids):]))
    assert all(label in DOMAINS for label in labels)
    assert set(ranked) == set(DOMAINS) and all(isinstance(v, float) and v < 0 for v in ranked.values())
    assert [ranked[d] for d in DOMAINS] == pytest.approx(by_hand, abs=1e-3)


async def test_prompt_logprobs_gives_each_prompt_tokens_logprob_the_first_none():
    async with await amlx.load(EMBEDDED) as model:
        steps = await model.prompt_logprobs("Hello there, friend", top_logprobs=2)
    assert steps[0].logprob is None
    assert all(t.logprob is not None and len(t.top_logprobs) == 2 for t in steps[1:])


# -- checkpoints -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit, cause", [
    ({"post_processor": {"type": "TemplateProcessing", "pair": [{"Sequence": {"id": "A", "type_id": 0}}],
                         "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                         "special_tokens": {}}}, "post-processor"),
    ({"normalizer": {"type": "Replace", "pattern": {"String": "a"}, "content": "b" * 200}}, "normalizer"),
])
def test_a_tokenizer_that_multiplies_text_is_refused_at_load_naming_the_cause(tmp_path, edit, cause):
    path = _copy_embedded(tmp_path)
    data = json.loads((path / "tokenizer.json").read_text())
    data.update(edit)
    (path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(amlx.ModelLoadError, match=cause):
        amlx.load_sync(path)


def test_an_unsupported_architecture_names_the_file(tmp_path):
    path = _copy_embedded(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(amlx.ModelLoadError, match="config.json.*gpt2"):
        amlx.load_sync(path)


def test_an_id_neither_cached_nor_downloadable_says_exactly_that(tmp_path, monkeypatch):
    from huggingface_hub import constants  # (which reads HF_HUB_CACHE and HF_HUB_OFFLINE at its import)

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(amlx.ModelLoadError,
                       match=f"not found in the local Hugging Face cache at {tmp_path / 'hub'}, and downloading failed: "):
        amlx.load_sync("nobody/nothing-here")
    # a directory that exists wins over an id of the same spelling
    _copy_embedded(tmp_path, "nobody")
    (tmp_path / "nobody").rename(tmp_path / "nothing-here")
    (tmp_path / "nobody").mkdir()
    (tmp_path / "nothing-here").rename(tmp_path / "nobody" / "nothing-here")
    m = amlx.load_sync("nobody/nothing-here")
    m.close()


def test_trio_runs_the_api():
    trio = pytest.importorskip("trio")

    async def main():
        async with await amlx.load(EMBEDDED) as model:
            text = [t.text async for t in model.generate("Hi", max_tokens=3)]
            result = await model.complete("Hi", max_tokens=3)
        return text, result

    text, result = trio.run(main)
    assert "".join(text) == result.text


# -- the command line ------------------------------------------------------------------------------------------

@pytest.fixture
def help_of(capsys):
    def run(*command: str) -> str:
        from amlx.cli import main

        with pytest.raises(SystemExit) as caught:
            main([*command, "--help"])
        assert caught.value.code == 0
        return " ".join(capsys.readouterr().out.split())  # (argparse wraps lines)
    return run


@pytest.mark.parametrize("command, flags", [
    ("generate", {"--max-tokens": "256", "--temperature": "0.0", "--top-p": "1.0", "--top-k": "0", "--min-p": "0.0",
                  "--repetition-penalty": "1.0", "--raw": None, "-v": None, "--adapter": None, "--stop": None,
                  "--tensor-parallel": "1", "--draft": "off", "--num-draft-tokens": "4", "--device": "auto"}),
    ("chat", {"--system": None, "--max-tokens": "256", "--adapter": None, "--tensor-parallel": "1",
              "--draft": "off", "--num-draft-tokens": "4"}),
    ("demo", {"--tokens": "96"}),
    ("convert", {"-q": None, "--group-size": "64"}),
    ("lora", {"--data": None, "--iters": "1000", "--learning-rate": "1e-05", "--adapter-path": "adapters",
              "--save-every": "100", "--resume": None, "--fuse": None, "--full": None, "--save-path": None,
              "--max-seq-len": "2048", "--no-progress": None, "--rank": "8", "--alpha": "16.0", "--dropout": "0.0",
              "--lr-schedule": "constant", "--warmup": "0", "--weight-decay": "0.0", "--grad-clip": "no clipping",
              "--seed": "0", "--batch-size": "4"}),
    ("serve", {"--host": "127.0.0.1", "--port": "8000", "--api-key": "no key", "--api-key-file": None,
               "--max-batch-size": "32", "--max-queue": "256", "--model-name": None, "--kv-cache-memory": None,
               "--kv-bits": "full precision", "--no-prefix-cache": None, "--keepalive": "1.0", "--log-requests": None,
               "--draft": "off", "--num-draft-tokens": "4", "--tensor-parallel": "1"}),
])
def test_every_command_help_lists_the_readmes_flags_with_defaults_and_an_example(help_of, command, flags):
    import re

    text = help_of(command)
    assert "Example:" in text
    for flag, default in flags.items():
        assert re.search(rf"(^|[\s\[,]){re.escape(flag)}[\s\]=,]", text), (command, flag)
        if default is not None:
            # the option's own help (up to the next option) names its default
            part = text[text.index(f" {flag} "):][:400]
            assert f"default: {default}" in part, (command, flag, part)


def test_amlx_version_names_amlx_and_mlx(capsys):
    from amlx._mlx import version
    from amlx.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    out = capsys.readouterr().out
    assert caught.value.code == 0 and amlx.__version__ in out and f"MLX {version()}" in out, out


def test_generate_streams_with_v_statistics_and_reads_a_dash_from_stdin(capsys, monkeypatch):
    rc, err = main_in_process(capsys, "generate", EMBEDDED, "Why is the sky blue?", "--max-tokens", "8", "-v")
    assert rc in (0, None), err
    for word in ("prompt:", "time to first token", "tokens/s", "peak memory"):
        assert word in err, err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("\ufeffSummarise this: ...\r\n".encode()),
                                                      encoding="utf-8"))
    rc, err = main_in_process(capsys, "generate", EMBEDDED, "-", "--max-tokens", "4")
    assert rc in (0, None), err


def test_sampling_values_are_checked_before_the_model_loads(capsys, tmp_path):
    missing = str(tmp_path / "no-such-model")
    for flag, value, name in (("--temperature", "-1", "--temperature"), ("--top-p", "0", "--top-p")):
        rc, err = main_in_process(capsys, "generate", missing, "hi", flag, value)
        assert rc != 0 and name in err and "no-such-model" not in err, err


def test_lora_full_refuses_lora_only_flags_and_needs_a_save_path(capsys, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "The whole text is learned."}\n')
    rc, err = main_in_process(capsys, "lora", EMBEDDED, "--data", str(data), "--full", "--save-path",
                              str(tmp_path / "out"), "--rank", "4")
    assert rc != 0 and "--rank" in err
    rc, err = main_in_process(capsys, "lora", EMBEDDED, "--data", str(data), "--full")
    assert rc != 0 and "--save-path" in err


# -- settings ----------------------------------------------------------------------------------------------------

def test_every_amlx_variable_the_docs_name_is_read_by_the_code():
    import re

    docs = README + "".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").glob("*.md"))
    names = set(re.findall(r"\bAMLX_[A-Z0-9_]*[A-Z0-9]\b", docs))
    assert {"AMLX_PREFILL_MEMORY", "AMLX_CPU_SPIN", "AMLX_API_KEY", "AMLX_TP_HOSTFILE"} <= names
    sources = [ROOT / "build_ffi.py", *(ROOT / "amlx").rglob("*.py"),
               *(p for p in (ROOT / "vendor" / "mlxc").rglob("*") if p.suffix in (".cpp", ".c", ".h"))]
    code = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sources)
    unread = sorted(n for n in names if f'"{n}"' not in code and f"'{n}'" not in code)
    assert not unread, unread


def test_the_documented_defaults_of_the_prefill_and_mask_settings(monkeypatch):
    from amlx.constrain.matcher import mask_lexers
    from amlx.engine.pacing import segment_setting
    from amlx.engine.prefill_budget import prefill_memory
    from amlx.model import extend_warmup_budget

    for name in ("AMLX_PREFILL_MEMORY", "AMLX_PREFILL_SEGMENT", "AMLX_EXTEND_WARMUP_S", "AMLX_MASK_LEXERS",
                 "AMLX_MASK_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert prefill_memory(0) == 256 << 20 and prefill_memory(8 << 30) == 1 << 30  # 256 MiB, or an eighth
    monkeypatch.setenv("AMLX_PREFILL_MEMORY", "64M")
    assert prefill_memory(8 << 30) == 64 << 20
    assert segment_setting() == 64 << 20
    monkeypatch.setenv("AMLX_PREFILL_SEGMENT", "0")
    assert segment_setting() == 0
    assert extend_warmup_budget() == 30
    assert 1 <= mask_lexers() <= 16


def test_step_timing_adds_its_phases_to_the_stats(monkeypatch):
    monkeypatch.setenv("AMLX_STEP_TIMING", "1")
    m = amlx.load_sync(EMBEDDED)
    try:
        _tokens(m, max_tokens=4)
        assert "step_timing" in m.stats()
    finally:
        m.close()
    monkeypatch.delenv("AMLX_STEP_TIMING")
    m = amlx.load_sync(EMBEDDED)
    try:
        assert "step_timing" not in m.stats()
    finally:
        m.close()


# -- serving -------------------------------------------------------------------------------------------------------

KEY = "sk-local"
CHAT = [{"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def server():
    """The app `amlx serve` runs, in this process: /readme as the README's example configures it
    (--api-key sk-local, the model named Qwen3-0.6B), /short with a 24-token context and room for
    at most 3 generations at once (--max-batch-size 1 --max-queue 2)."""
    from amlx.serve.app import Settings, create_app
    from tests.helpers.serving import MountedApps

    models = {"readme": amlx.load_sync(EMBEDDED), "short": amlx.load_sync(EMBEDDED, max_context=24)}
    srv = MountedApps({
        "readme": create_app(models["readme"], Settings(model_name="Qwen3-0.6B", api_keys=(KEY,))),
        "short": create_app(models["short"], Settings(model_name="m", max_batch_size=1, max_queue=2)),
    })
    try:
        yield srv
    finally:
        srv.stop()
        for m in models.values():
            m.close()


def _post(server, app: str, path: str, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/{app}/v1/{path}", json=body, headers=headers, timeout=60)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_the_readmes_openai_client_example_streams_a_reply(server, capsys):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{server.url}/readme/v1", api_key="sk-local")
    stream = await client.chat.completions.create(model="Qwen3-0.6B", stream=True,
                                                  messages=[{"role": "user", "content": "Hi!"}])
    async for chunk in stream:
        print(chunk.choices[0].delta.content or "", end="")
    await client.close()
    assert capsys.readouterr().out.strip()


def test_the_readmes_curl_example_streams_sse_ending_in_done(server):
    body = {"model": "Qwen3-0.6B", "messages": [{"role": "user", "content": "Hi!"}], "stream": True}
    r = _post(server, "readme", "chat/completions", body, KEY)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["stop"]
    assert _error(_post(server, "readme", "chat/completions", body), 401)["code"] == "invalid_api_key"


def test_the_servers_temperature_defaults_to_1_and_choice_i_samples_with_seed_plus_i(server):
    client = server.client("short")
    both = client.chat.completions.create(model="m", messages=CHAT, n=2, seed=5, max_tokens=6)
    one = client.chat.completions.create(model="m", messages=CHAT, seed=6, max_tokens=6, temperature=1.0)
    default = client.chat.completions.create(model="m", messages=CHAT, seed=5, max_tokens=6, temperature=None)
    hot = client.chat.completions.create(model="m", messages=CHAT, seed=5, max_tokens=6, temperature=1.0)
    assert both.choices[1].message.content == one.choices[0].message.content
    assert both.choices[0].message.content == default.choices[0].message.content == hot.choices[0].message.content


def test_max_tokens_defaults_to_and_is_capped_at_the_rest_of_the_context(server):
    client = server.client("short")
    for extra in ({}, {"max_tokens": 100_000}, {"max_completion_tokens": 100_000}):
        reply = client.chat.completions.create(model="m", messages=CHAT, temperature=0, **extra)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.prompt_tokens + reply.usage.completion_tokens == 24, extra


def test_the_documented_400s(server):
    e = _error(_post(server, "short", "chat/completions", {"model": "m", "messages": CHAT, "n": 4}), 400)
    assert e["param"] == "n"  # more than --max-batch-size + --max-queue on its own
    e = _error(_post(server, "short", "chat/completions", {"model": "m", "messages": CHAT, "tool_choice": "auto"}), 400)
    assert e["param"] == "tool_choice"
    e = _error(_post(server, "short", "chat/completions",
                     {"model": "m", "messages": [{"role": "user", "content": "x " * 50}]}), 400)
    assert e["code"] == "context_length_exceeded"
    e = _error(_post(server, "short", "chat/completions", {"model": "m", "messages": CHAT, "bogus": 1}), 400)
    assert e["param"] == "bogus"
    assert _error(_post(server, "short", "chat/completions", {"model": "nope", "messages": CHAT}), 404)


def test_a_known_field_sent_as_null_means_its_default(server):
    body = {"model": "m", "messages": CHAT, "temperature": None, "top_p": None, "n": None, "stop": None,
            "max_tokens": None, "seed": None, "logprobs": None, "presence_penalty": None}
    r = _post(server, "short", "chat/completions", body)
    assert r.status_code == 200, r.text


def test_top_p_0_keeps_the_most_likely_token_alone(server):
    client = server.client("short")
    greedy = client.chat.completions.create(model="m", messages=CHAT, temperature=0, max_tokens=6)
    for seed in (1, 2):
        r = client.chat.completions.create(model="m", messages=CHAT, top_p=0, seed=seed, max_tokens=6)
        assert r.choices[0].message.content == greedy.choices[0].message.content


def test_include_usage_adds_a_last_chunk_and_every_other_has_usage_null(server):
    client = server.client("short")
    chunks = list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=4, stream=True, n=2,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert all(c.usage is None for c in chunks[:-1])
    finished = sorted(c.choices[0].index for c in chunks[:-1] if c.choices[0].finish_reason)
    assert finished == [0, 1]  # finish_reason once per choice


def test_echo_with_logprobs_puts_the_prompt_first_with_a_null_logprob(server):
    client = server.client("short")
    r = client.completions.create(model="m", prompt="Hello there", max_tokens=1, echo=True, logprobs=1)
    choice = r.choices[0]
    assert choice.text.startswith("Hello there")
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and all(v is not None for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == 3  # 'Hello', ' there' and the generated token
    assert lp.tokens[-1] in lp.top_logprobs[-1]  # top_logprobs always hold the sampled token


def test_a_token_a_constraint_rules_out_has_logprob_minus_9999(server):
    client = server.client("short")
    r = client.chat.completions.create(model="m", messages=CHAT, max_tokens=4, logprobs=True, top_logprobs=5,
                                       extra_body={"choice": ["ab", "cd"]})
    assert r.choices[0].message.content in ("ab", "cd")
    values = [t.logprob for step in r.choices[0].logprobs.content for t in step.top_logprobs]
    assert -9999.0 in values and all(v == -9999.0 or v > -1000 for v in values)


def test_health_is_open_and_metrics_carry_the_documented_series(server):
    health = httpx.get(f"{server.url}/readme/health", timeout=30)
    assert health.status_code == 200 and {"running", "waiting", "memory"} <= set(health.json())
    assert httpx.get(f"{server.url}/readme/metrics", timeout=30).status_code == 401
    text = httpx.get(f"{server.url}/readme/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    for series in ("amlx_generation_tokens_total", "amlx_engine_generated_tokens_total",
                   'amlx_kv_cache{field="blocks_used"}', 'amlx_kv_cache{field="blocks_cached"}',
                   'amlx_kv_cache{field="blocks_free"}', 'amlx_kv_cache{field="blocks_allocated"}',
                   'amlx_kv_cache{field="prefix_hits"}', 'amlx_kv_cache{field="prefix_misses"}',
                   'amlx_kv_cache{field="preemptions"}'):
        assert series in text, series
    models = httpx.get(f"{server.url}/readme/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert [m["id"] for m in models.json()["data"]] == ["Qwen3-0.6B"]


# -- fine-tuning and conversion ------------------------------------------------------------------------------------

RECORDS = [{"text": "The whole text is learned."},
           {"prompt": "Q: What is MLX?\nA:", "completion": " Apple's array framework."},
           {"messages": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello!"}]}]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A --data directory of the README's three record shapes: train.jsonl and valid.jsonl."""
    d = tmp_path / "data"
    d.mkdir()
    lines = "".join(json.dumps(r) + "\n" for r in RECORDS * 4)
    (d / "train.jsonl").write_text(lines)
    (d / "valid.jsonl").write_text(lines)
    return d


def test_amlx_lora_writes_the_documented_files_and_chat_applies_the_adapter(capsys, tmp_path, data_dir):
    adapters = tmp_path / "adapters"
    rc, err = main_in_process(capsys, "lora", EMBEDDED, "--data", str(data_dir), "--iters", "2", "--learning-rate",
                              "1e-4", "--adapter-path", str(adapters), "--save-every", "1", "--batch-size", "2",
                              "--no-progress")
    assert rc in (0, None), err
    names = {p.name for p in adapters.iterdir()}
    assert {"0000001_adapters.safetensors", "adapters.safetensors", "adapter_config.json", "optimizer.safetensors",
            "optimizer.json"} <= names, names
    rc, err = main_in_process(capsys, "generate", EMBEDDED, "Hi!", "--adapter", str(adapters), "--max-tokens", "4")
    assert rc in (0, None), err
    fused = tmp_path / "fused"
    rc, err = main_in_process(capsys, "lora", EMBEDDED, "--data", str(data_dir), "--iters", "1", "--batch-size", "2",
                              "--adapter-path", str(tmp_path / "a2"), "--fuse", str(fused), "--no-progress")
    assert rc in (0, None), err
    amlx.load_sync(fused).close()


async def test_the_train_lora_example_yields_the_documented_events(tmp_path, data_dir, capsys):
    adapters = tmp_path / "adapters"
    kinds = []
    async with await amlx.load(EMBEDDED) as model:
        async for ev in model.train_lora(str(data_dir), iters=2, learning_rate=1e-4, adapter_path=str(adapters),
                                         batch_size=2, steps_per_eval=1):
            kinds.append(ev.kind)
            if ev.kind == "step":
                print(ev.step, ev.loss, ev.tokens_per_second)
            elif ev.kind == "eval":
                assert ev.val_loss > 0
            elif ev.kind == "save":
                assert Path(ev.path).exists()
        print((await model.complete("Hi!")).text)   # generation uses the adapter as trained so far
    assert kinds.count("step") == 2 and "eval" in kinds and "save" in kinds and kinds[-1] == "done"
    model = await amlx.load(EMBEDDED, adapter=str(adapters))
    await model.aclose()


async def test_the_full_fine_tuning_example_writes_a_checkpoint_amlx_loads(tmp_path, data_dir):
    save = tmp_path / "qwen3-tuned"
    async with await amlx.load(EMBEDDED) as model:
        async for ev in model.train(str(data_dir / "train.jsonl"), iters=2, batch_size=4, learning_rate=1e-5,
                                    lr_schedule="cosine", save_path=str(save)):
            if ev.kind == "step":
                assert ev.loss > 0
    model = await amlx.load(str(save))
    assert model.info.architecture == "qwen3"
    await model.aclose()


async def test_bad_records_raise_data_error_naming_the_file_and_line_before_training(tmp_path):
    from amlx.train import DataError

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"prompt": "x", "completion": 3}) + "\n")
    async with await amlx.load(EMBEDDED) as model:
        with pytest.raises(DataError, match=r"train\.jsonl.*2") as caught:
            async for _ in model.train_lora(str(data), iters=1, batch_size=1, adapter_path=str(tmp_path / "a")):
                pass
        assert "completion" in str(caught.value)


def test_amlx_convert_writes_a_quantized_checkpoint(capsys, tmp_path):
    rc, err = main_in_process(capsys, "convert", EMBEDDED, str(tmp_path / "q4"), "-q", "4")
    assert rc in (0, None), err
    m = amlx.load_sync(tmp_path / "q4")
    try:
        assert m.info.quantization is not None and m.info.quantization.get("bits", 4) == 4
        assert _tokens(m, max_tokens=3)
    finally:
        m.close()


def test_log_requests_appends_each_body_as_the_client_sent_it(tmp_path):
    """README: `--log-requests FILE` appends every generation request's body to FILE (JSON lines)
    for debugging clients. It logged the request as the server parsed it: the defaults of the
    fields the client left out filled in ("temperature": 1.0 that nobody sent), the fields sent
    as null dropped, and a request that validation refused (an unknown field, a bad value: what
    one debugs a client for) not at all. (A body that is no JSON object is not logged.)"""
    from amlx.serve.app import Settings, create_app
    from tests.helpers.serving import MountedApps

    log = tmp_path / "requests.jsonl"
    m = amlx.load_sync(EMBEDDED)
    srv = MountedApps({"a": create_app(m, Settings(model_name="m", api_keys=(KEY,), request_log=log))})
    try:
        sent = [
            ("chat/completions", {"model": "m", "messages": CHAT, "max_tokens": 2}),
            ("chat/completions", {"model": "m", "messages": CHAT, "max_tokens": 2, "temperature": None}),
            ("chat/completions", {"model": "m", "messages": CHAT, "bogus": 1}),
            ("completions", {"model": "m", "prompt": "Hi", "max_tokens": 0}),
        ]
        statuses = [_post(srv, "a", path, body, KEY).status_code for path, body in sent]
        assert statuses == [200, 200, 400, 400]
        r = httpx.post(f"{srv.url}/a/v1/completions", content=b'{"model": "m", "prompt": ', timeout=30,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert r.status_code == 400
        assert _post(srv, "a", "completions", {"model": "m", "prompt": "unkeyed"}).status_code == 401
        records = [json.loads(line) for line in log.read_text().splitlines()]
    finally:
        srv.stop()
        m.close()
    assert records == [{"endpoint": "chat" if path.startswith("chat") else "completions", "body": body}
                       for path, body in sent]


@pytest.mark.parametrize("draft", [None, "prompt_lookup"])
def test_equal_top_logprobs_are_listed_by_the_lower_id_as_greedy_picks(tmp_path, draft):
    """README: top_logprobs best first, equal ones by the lower id, as greedy picks. The embedded
    model with tied embeddings, rows copied so that tokens 3, 700 and 1000 (the greedy first
    token after "Hi") and 200, 319 and 900 (the second: 319 before) have equal logits."""
    from safetensors.numpy import load_file, save_file

    path = _copy_embedded(tmp_path)
    tensors = load_file(str(path / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]
    embed[700] = embed[1000] = embed[3]
    embed[200] = embed[900] = embed[319]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    m = amlx.load_sync(path, draft=draft)
    try:
        first, second = _tokens(m, max_tokens=2, top_logprobs=4)
    finally:
        m.close()
    assert first.id == 3 and [i for i, _ in first.top_logprobs[:3]] == [3, 700, 1000]
    assert second.id == 200 and [i for i, _ in second.top_logprobs[:3]] == [200, 319, 900]
    assert len({lp for _, lp in second.top_logprobs[:3]}) == 1


def test_a_device_the_machine_lacks_is_named_with_its_value(capsys):
    """`amlx generate --device gpu` on a machine without a GPU said "--device was asked for but MLX
    sees no GPU": the library's "device='gpu' was asked for" lost its value when the option's
    name was put as typed."""
    from amlx._mlx import device

    if device.gpu_available():
        pytest.skip("this machine has a GPU")
    rc, err = main_in_process(capsys, "generate", EMBEDDED, "hi", "--device", "gpu")
    assert rc == 1 and err.splitlines()[-1] == "amlx: error: --device gpu was asked for but MLX sees no GPU on " \
                                               "this machine", err


def test_a_prompt_on_stdin_loses_its_byte_order_mark_and_every_lines_carriage_return(capsys, monkeypatch):
    """README: a prompt on stdin or in a file loses a leading byte order mark and its lines' \\r
    (Windows files). Only the last line's was dropped: a Windows file of several lines reached
    the model with "\\r\\n" inside (more prompt tokens than the same text with "\\n")."""
    from amlx.cli_streams import read_prompt

    def stdin(data: bytes):
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))

    stdin(b"\xef\xbb\xbfline one\r\nline two\r\n")
    assert read_prompt("-") == "line one\nline two"
    counts = []
    for data in (b"first line\nsecond line\nthird\n", b"\xef\xbb\xbffirst line\r\nsecond line\r\nthird\r\n"):
        stdin(data)
        rc, err = main_in_process(capsys, "generate", EMBEDDED, "-", "--raw", "--max-tokens", "1", "-v")
        assert rc in (0, None), err
        counts.append(next(line for line in err.splitlines() if "prompt:" in line).split(",")[0])
    assert counts[0] == counts[1] and counts[0].endswith("prompt: 15 tokens"), counts


def test_a_record_past_max_seq_len_is_an_error_naming_the_file_line_and_the_flags(capsys, tmp_path):
    """README: a record longer than --max-seq-len is an error naming the file and line. The
    command's advice named the library's options: "more than max_seq_len=4 (raise max_seq_len,
    shorten the record, or pass truncate=True)"."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"text": "a much longer record " * 4}) + "\n")
    rc, err = main_in_process(capsys, "lora", EMBEDDED, "--data", str(data), "--max-seq-len", "16", "--iters", "1",
                              "--adapter-path", str(tmp_path / "a"), "--no-progress")
    last = err.splitlines()[-1]
    assert rc == 1 and f"{data}:2: the record has" in last, err
    assert "more than --max-seq-len 16 (raise --max-seq-len, shorten the record, or pass --truncate)" in last, last
    rc, err = main_in_process(capsys, "lora", EMBEDDED, "--data", str(data), "--max-seq-len", "16", "--iters", "1",
                              "--batch-size", "1", "--adapter-path", str(tmp_path / "a"), "--no-progress", "--truncate")
    assert rc in (0, None), err


def test_a_constrained_requests_logprobs_are_its_renormalized_distribution(model):
    """README: logprobs and top_logprobs of a constrained request are those of the constrained
    distribution (the model's, renormalized over the allowed tokens)."""
    import math

    for options in ({"choice": ["yes", "no"]}, {"regex": "[ab]{3}"}, {"choice": ["yes", "no"], "temperature": 0.7,
                                                                      "seed": 3}):
        tokens = _tokens(model, top_logprobs=20, **options)
        assert tokens[-1].finish_reason == "stop"
        for tok in tokens:
            allowed = [lp for _, lp in tok.top_logprobs if lp > -1000]
            assert 0 < len(allowed) < 20, options  # (all of them listed: the mass is whole)
            assert sum(math.exp(lp) for lp in allowed) == pytest.approx(1.0, abs=1e-4), options
            assert tok.logprob in allowed


def test_a_stop_string_cuts_a_constrained_reply_which_then_need_not_match(model):
    full = "".join(t.text for t in _tokens(model, regex="[ab]{12}"))
    assert len(full) == 12
    stop = full[4:6]
    tokens = _tokens(model, regex="[ab]{12}", stop=[stop])
    text = "".join(t.text for t in tokens)
    assert tokens[-1].finish_reason == "stop" and full.startswith(text) and stop not in text and len(text) < 12


def test_amlx_serve_with_the_readmes_flags_keys_from_a_file_and_the_environment(tmp_path):
    """`amlx serve MODEL --api-key sk-local --max-batch-size 64 --max-queue 128 --model-name qwen3`,
    with --api-key-file (one key per line) and $AMLX_API_KEY beside it, --no-prefix-cache,
    --kv-cache-memory 8GB and --kv-bits 8: every key opens the API, the model has the name given,
    and a repeated prompt reuses nothing."""
    from tests.helpers.serving import ServerProcess

    keys = tmp_path / "keys.txt"
    keys.write_text("file-key-1\nfile-key-2\n")
    with ServerProcess(EMBEDDED, "--api-key", "sk-local", "--max-batch-size", "64", "--max-queue", "128",
                       "--model-name", "qwen3", "--api-key-file", str(keys), "--no-prefix-cache",
                       "--kv-cache-memory", "8GB", "--kv-bits", "8", env={"AMLX_API_KEY": "env-key"}) as srv:
        long = [{"role": "user", "content": "Tell me a story about a fox and a horse and a bird and a tree."}]
        for key in ("sk-local", "file-key-1", "file-key-2", "env-key"):
            r = httpx.post(srv.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                           json={"model": "qwen3", "messages": long, "max_tokens": 2})
            assert r.status_code == 200, (key, r.text)
            assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert httpx.get(srv.url + "/v1/models", timeout=30).status_code == 401
        assert httpx.get(srv.url + "/", timeout=30).status_code == 200  # the chat page: open


def test_presence_and_frequency_penalties_count_generated_tokens_only(model):
    """README: they follow OpenAI, counting generated tokens only (repetition_penalty, as in
    transformers and mlx-lm, counts the prompt's too). After "is !" the greedy token is one of
    the prompt's, ahead by less than the penalty."""
    ids = model.tokenizer.encode("is !")
    first = _tokens(model, ids, max_tokens=1, top_logprobs=2)[0]
    assert first.id in ids and first.top_logprobs[0][1] - first.top_logprobs[1][1] < 2.0
    assert _tokens(model, ids, max_tokens=1, presence_penalty=2.0, frequency_penalty=2.0)[0].id == first.id
    assert _tokens(model, ids, max_tokens=1, repetition_penalty=2.0)[0].id != first.id


def test_a_failed_requests_error_keeps_its_worker_traceback_on_python_3_10():
    """README: Python >= 3.10. The worker's traceback of a failed request went on the error with
    `add_note`, which Python 3.10's exceptions lack (PEP 678, 3.11): there every failed request's
    error (a ConstraintError, an MLXError) became an AttributeError inside the worker's close of
    the request's channel, which then never ended. Here an error without add_note stands in for
    3.10's."""
    from amlx.engine.channel import detach_frames

    class Py310Error(ValueError):
        def __getattribute__(self, name):
            if name == "add_note":
                raise AttributeError(name)
            return super().__getattribute__(name)

    def fail():
        raise Py310Error("the request failed")

    try:
        fail()
    except Py310Error as exc:
        error = exc
    detach_frames(error)
    assert error.__traceback__ is None
    assert any("worker traceback" in note and "fail" in note for note in error.__notes__)


def test_chat_keeps_the_history_and_reset_keeps_the_system_prompt(capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"hi\nhi\n/reset\nhi\n/exit\n"), encoding="utf-8"))
    rc, err = main_in_process(capsys, "chat", EMBEDDED, "--system", "Answer briefly.", "-v", "--max-tokens", "3")
    assert rc in (0, None), err
    prompts = [int(line.split("prompt: ")[1].split()[0]) for line in err.splitlines() if "prompt: " in line]
    assert len(prompts) == 3
    assert prompts[1] > prompts[0]  # the second turn carries the first
    assert prompts[2] == prompts[0]  # afresh, with the system prompt


@pytest.mark.parametrize("damage, names", [
    ("truncate", ["model.safetensors", "tensor '"]), ("tokenizer.json", ["tokenizer.json"]),
    ("config.json", ["config.json"]),
])
def test_missing_or_corrupt_files_are_model_load_errors_naming_the_file_and_tensor(tmp_path, damage, names):
    path = _copy_embedded(tmp_path)
    if damage == "truncate":
        weights = path / "model.safetensors"
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size - 1000)
    else:
        (path / damage).unlink()
    with pytest.raises(amlx.ModelLoadError) as caught:
        amlx.load_sync(path)
    for name in names:
        assert name in str(caught.value), caught.value


def test_an_api_key_file_written_by_a_windows_editor_gives_its_keys(tmp_path):
    """--api-key-file FILE (one key per line): a file with a byte order mark and CRLF line ends
    (Notepad's) gives the keys as typed. The mark stayed on the first key, which `amlx serve`
    then refused at start as not printable ASCII."""
    from amlx.serve.auth import collect_keys

    keys = tmp_path / "keys.txt"
    keys.write_bytes(b"\xef\xbb\xbfsk-first\r\nsk-second\r\n")
    assert collect_keys((), keys, environ={}) == ["sk-first", "sk-second"]


async def test_a_full_pool_sets_the_youngest_aside_and_its_stream_goes_on_without_a_gap():
    """README: when the running requests outgrow the pool, the youngest is set aside and
    recomputed later; nothing fails for want of memory. Three requests of 50 positions each in a
    pool of 4 blocks (64 positions): the same tokens as alone, with preemptions counted."""
    prompts = ["Tell me a story about a fox and a bird.", "What color is the sky at night and day?",
               "Hello there my friend"]
    options = dict(max_tokens=40, logit_bias={2: -100}, logprobs=True)  # (no EOS: every reply is 40 tokens)
    async with await amlx.load(EMBEDDED) as m:
        alone = [await m.complete(p, **options) for p in prompts]
    block_bytes = 16 * 4 * 2 * 32 * 2 * 4  # positions x layers x kv heads x head dim x (k, v) x float32
    async with await amlx.load(EMBEDDED, kv_cache_memory=4 * block_bytes) as m:
        assert m.info.context_length == 64
        together = await asyncio.gather(*(m.complete(p, **options) for p in prompts))
        assert m.stats()["kv_cache"]["preemptions"] > 0
    for a, t in zip(alone, together):
        assert len(a.token_ids) == 40 and t.token_ids == a.token_ids
        assert t.logprobs == pytest.approx(a.logprobs, abs=1e-4)


def test_uvloop_runs_the_api():
    uvloop = pytest.importorskip("uvloop")

    async def main():
        async with await amlx.load(EMBEDDED) as model:
            return [t.text async for t in model.generate("Hi", max_tokens=3)], await model.complete("Hi", max_tokens=3)

    text, result = uvloop.run(main())
    assert "".join(text) == result.text


async def _idle(m) -> bool:
    """Whether `m` comes to hold no request and no KV block (polled; the worker retires them)."""
    for _ in range(500):
        stats = m.stats()
        if stats["active_requests"] == 0 and stats["kv_cache"]["blocks_used"] == 0:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.parametrize("how", ["drop", "aclose", "cancel", "timeout"])
async def test_every_documented_way_of_leaving_a_stream_removes_its_request(how):
    """README, Cancellation: leaving the async for, aclose(), cancelling the task or a timeout
    removes the request and gives its KV blocks back; a stream you keep is cancelled when you
    aclose() it or drop it."""
    async with await amlx.load(EMBEDDED) as m:
        def stream():  # (a constraint that keeps it going for 900 tokens)
            return m.generate("x " * 100, max_tokens=900, regex="a{900}")

        async def consume():
            async for _ in stream():
                await asyncio.sleep(0)

        if how in ("drop", "aclose"):
            s = stream()
            await s.__anext__()
            if how == "drop":
                del s
                gc.collect()
            else:
                await s.aclose()
        elif how == "cancel":
            task = asyncio.ensure_future(consume())
            while m.stats()["tokens_generated"] < 2:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(consume(), 0.05)
        assert await _idle(m)
        assert m.stats()["tokens_generated"] < 900


def test_the_readmes_test_instructions_name_what_the_suite_needs_beyond_pip():
    """The test command alone failed the chat page's tests on a fresh machine: they need headless
    Chromium and its driver (Debian packages, installed by .ci/run), which the README did not say."""
    page_tests = (ROOT / "tests" / "test_serve_page.py").read_text()
    if "chromedriver" in page_tests and "pytest.fail" in page_tests:
        section = README[README.index("Run the tests"):README.index("`pip install -e .` compiles")]
        assert "chromium chromium-driver" in section


def test_the_files_the_readme_names_exist():
    import re

    layout = README[README.index("## Layout"):README.index("## Development")]
    named = re.findall(r"^(\S+?)/?\s", layout.split("```")[1], flags=re.M)
    named += re.findall(r"`((?:amlx|benchmarks|tests|scripts|vendor|docs)/[\w./-]+?)`", README)
    missing = [p for p in named if not (ROOT / p.rstrip("/")).exists()]
    assert named and not missing, missing


async def test_what_tensor_parallelism_does_not_support_yet_is_a_value_error(tmp_path, data_dir):
    """docs/scaling.md: with tensor_parallel > 1, score(), prompt_logprobs() (which the docs left
    out: the server's echo with logprobs uses it), training, LoRA adapters and speculative decoding
    are refused with a ValueError; generation runs and matches one process's."""
    chat = [{"role": "user", "content": "Tell me a story about a fox."}]
    async with await amlx.load(EMBEDDED, device="cpu") as m:
        alone = (await m.complete(chat, max_tokens=12)).token_ids
    async with await amlx.load(EMBEDDED, device="cpu", tensor_parallel=2) as m:  # (CPU ranks over MLX's ring)
        assert (await m.complete(chat, max_tokens=12)).token_ids == alone
        with pytest.raises(ValueError):
            await m.score("x", [" a"])
        with pytest.raises(ValueError):
            await m.prompt_logprobs("hello there")
        with pytest.raises(ValueError):
            async for _ in m.train_lora(str(data_dir), iters=1, adapter_path=str(tmp_path / "a")):
                pass
        with pytest.raises(ValueError):
            async for _ in m.train(str(data_dir), iters=1, save_path=str(tmp_path / "f")):
                pass
    with pytest.raises(ValueError):
        await amlx.load(EMBEDDED, device="cpu", tensor_parallel=2, draft="prompt_lookup")


def test_amlx_cpu_bf16_is_read_at_import():
    """README said AMLX_CPU_BF16 was read at load; the C layer reads it once, when amlx's library
    loads (at import): a value set after `import amlx`, before amlx.load, changed nothing."""
    import subprocess
    import sys

    from amlx._mlx import cpu_kernels

    if not cpu_kernels.bf16_kernels():
        pytest.skip("this CPU has no bf16 kernel: AMLX_CPU_BF16 changes nothing here")
    script = ("import os, amlx\nfrom amlx._mlx import cpu_kernels as c\nbefore = c.bf16_kernel()\n"
              "os.environ['AMLX_CPU_BF16'] = 'off'\namlx.load_sync(amlx.demo.default_model_dir()).close()\n"
              "print(before, c.bf16_kernel())\n")
    env = {k: v for k, v in os.environ.items() if k != "AMLX_CPU_BF16"}
    out = subprocess.run([sys.executable, "-c", "import amlx.demo\n" + script], env=env, capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    before, after = out.stdout.split()
    assert before == after != "off"
    assert "(read at import; or `amx`, `avx512bf16`)" in README


def test_serve_help_names_model_as_the_readme_does(help_of):
    """README: MODEL (`amlx serve MODEL`) is a checkpoint directory or a Hugging Face model id, for
    serve as for generate and chat. serve's help said `model`: "checkpoint directory" only."""
    text = help_of("serve")
    assert "[MODEL]" in text and "Hugging Face model id" in text and "default: the embedded demo model" in text


def test_adaptive_draft_length_stops_a_useless_draft_and_amlx_adaptive_draft_0_keeps_it(tmp_path, monkeypatch):
    """README: each request's draft length adapts to how often its drafts are accepted;
    AMLX_ADAPTIVE_DRAFT=0 drafts num_draft_tokens every round. A draft of the same tokenizer with
    its embeddings shuffled: none of its drafts is accepted."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    draft = _copy_embedded(tmp_path, "draft")
    tensors = load_file(str(draft / "model.safetensors"))
    embed = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = embed[np.random.default_rng(0).permutation(len(embed))].copy()
    save_file(tensors, str(draft / "model.safetensors"), metadata={"format": "pt"})
    chat = [{"role": "user", "content": "Tell me a story about a fox."}]
    counters = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("AMLX_ADAPTIVE_DRAFT", setting)
        m = amlx.load_sync(EMBEDDED, draft=str(draft), num_draft_tokens=3)
        try:
            assert len(_tokens(m, chat, max_tokens=60, logit_bias={2: -100})) == 60
            counters[setting] = m.stats()["speculative"]
        finally:
            m.close()
    assert counters["1"]["accepted_tokens"] == counters["0"]["accepted_tokens"] == 0
    assert counters["1"]["drafted_tokens"] < 20  # it stopped drafting
    assert counters["0"]["drafted_tokens"] >= 3 * (counters["0"]["verified_rows"] - 1)  # 3 a round (the last: fewer)


def test_generations_past_batch_plus_queue_get_429_with_retry_after():
    """README: more than --max-batch-size + --max-queue generations at once get 429 with
    Retry-After. One slot and no queue: a second request while a long one streams."""
    from amlx.serve.app import Settings, create_app
    from tests.helpers.serving import MountedApps

    m = amlx.load_sync(EMBEDDED)
    srv = MountedApps({"one": create_app(m, Settings(model_name="m", max_batch_size=1, max_queue=0))})
    try:
        long = {"model": "m", "prompt": "Hi", "max_tokens": 900, "regex": "a{900}", "stream": True}
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", f"{srv.url}/one/v1/completions", json=long) as first:
                assert first.status_code == 200
                lines = first.iter_lines()  # (kept: a dropped iterator closes the response)
                assert next(lines).startswith("data: ")  # (it runs)
                r = client.post(f"{srv.url}/one/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2})
                assert _error(r, 429) and int(r.headers["retry-after"]) >= 1
            r = client.post(f"{srv.url}/one/v1/completions", json={"model": "m", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200  # the slot is free again (the first stream was left: cancelled)
    finally:
        srv.stop()
        m.close()


def test_a_queued_stream_gets_keep_alive_comments_before_its_first_token():
    """README: while a prompt is still being prefilled (or queued) the server sends a
    `: keep-alive` comment every --keepalive seconds. One batch slot (--max-batch-size 1 loads the
    engine with one too), taken by a long stream; a second stream waits in the queue."""
    from amlx.serve.app import Settings, create_app
    from tests.helpers.serving import MountedApps

    m = amlx.load_sync(EMBEDDED, max_batch_size=1)
    srv = MountedApps({"one": create_app(m, Settings(model_name="m", max_batch_size=1, max_queue=1, keepalive=0.05))})
    try:
        long = {"model": "m", "prompt": "Hi", "max_tokens": 900, "regex": "a{900}", "stream": True}
        waiting = {"model": "m", "messages": CHAT, "max_tokens": 2, "stream": True}
        with httpx.Client(timeout=60) as a, httpx.Client(timeout=60) as b:
            with a.stream("POST", f"{srv.url}/one/v1/completions", json=long) as first:
                first_lines = first.iter_lines()
                assert next(first_lines).startswith("data: ")
                with b.stream("POST", f"{srv.url}/one/v1/chat/completions", json=waiting) as second:
                    seen = []
                    for line in second.iter_lines():
                        seen.append(line)
                        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                            break
                        if len(seen) > 10_000:
                            break
        assert ": keep-alive" in seen, seen[:5]
    finally:
        srv.stop()
        m.close()


async def test_closing_is_idempotent_and_use_after_close_is_closed_error():
    m = await amlx.load(EMBEDDED)
    await m.aclose()
    await m.aclose()
    m.close()
    with pytest.raises(amlx.ClosedError):
        await m.complete("x")
    with pytest.raises(amlx.ClosedError):
        await m.score("x", [" a"])


def _python_blocks() -> list[str]:
    import re

    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_the_readmes_complete_programs_compile_as_scripts():
    """A README block that starts with its imports is a program a user saves and runs. The
    classification example and the openai client's used `async with` / `await` at the top level
    (valid only in an async REPL): as a script, a SyntaxError."""
    programs = [b for b in _python_blocks() if b.startswith(("import ", "from "))]
    assert len(programs) >= 3
    for block in programs:
        compile(block, "README.md", "exec")  # SyntaxError: 'async with' outside async function


def test_the_readmes_programs_run_as_written_with_the_model_path_changed(server, capsys, monkeypatch):
    """The intro, the classification example and the openai client's, run as the README writes
    them: only the model path (the embedded model) and the server's address change."""
    import re

    programs = [b for b in _python_blocks() if b.startswith(("import ", "from "))]
    ran = 0
    for block in programs:
        code = re.sub(r'amlx\.load\("[^"]+"', f"amlx.load({EMBEDDED!r}", block)
        code = code.replace("http://127.0.0.1:8000/v1", f"{server.url}/readme/v1")
        exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
        ran += 1
        assert capsys.readouterr().out.strip(), block[:80]
    assert ran >= 3


@pytest.mark.parametrize("heading", ["## Fine-tuning with LoRA", "## Full fine-tuning"])
async def test_the_fine_tuning_snippets_run_as_written(tmp_path, monkeypatch, capsys, heading):
    """The README's fine-tuning snippets (top-level await, as in an async REPL), run in an async
    function: only the model id changes (the embedded model), train.jsonl is the README's three
    record shapes, and the working directory is a fresh one."""
    import re
    import textwrap

    section = README[README.index(heading):]
    block = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    code = re.sub(r'amlx\.load\("(?:Qwen/)?Qwen3-0\.6B"', f"amlx.load({EMBEDDED!r}", block)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 4))
    namespace: dict = {"amlx": amlx}
    exec(compile("async def snippet():\n" + textwrap.indent(code, "    ") + "\n    return model\n", "README.md",
                 "exec"), namespace)
    model = await namespace["snippet"]()
    try:
        assert isinstance(model, amlx.Model)
        steps = [line for line in capsys.readouterr().out.splitlines() if line[:1].isdigit()]
        assert len(steps) == 200  # a line per step
    finally:
        await model.aclose()
