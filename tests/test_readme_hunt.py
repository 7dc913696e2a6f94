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
        assert info.architecture == "qwen3" and info.device == "cpu" and info.quantization is None
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
