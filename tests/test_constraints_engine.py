"""Structured outputs and scoring through the public API, on tiny random Qwen3 (byte-level BPE)
and Gemma 3 (SentencePiece byte fallback) checkpoints.

Random weights make a good test: their free text is gibberish, so only the constraint can make
it valid. Each kind is checked by its own oracle (jsonschema, re.fullmatch, set membership, a
Lark parser), many requests at once together with unconstrained ones, which must produce
exactly what they produce alone. `score` is compared with transformers' log-probabilities.

Sizes: per checkpoint and temperature, 50 requests of each of the four kinds (200 of each kind
over the 4 runs) and 8 unconstrained ones, all submitted at once to a 64-row batch (the rest wait
and join as rows finish), max_tokens 128; the four runs take about a minute on 2 cores
(AMLX_STRUCTURED_REQUESTS sets the per-run count).
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import anyio
import jsonschema
import lark
import numpy as np
import pytest

import amlx
from amlx.constrain import GrammarVocab, parse_constraint, unpack_mask

try:
    from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_logits
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import load_reference, make_checkpoint, reference_logits

ARCHS = ("qwen3", "gemma3_text")
# 4 runs (2 checkpoints x 2 temperatures) x 50 = the 200 requests of each kind
REQUESTS_PER_KIND = int(os.environ.get("AMLX_STRUCTURED_REQUESTS", "50"))
FREE_REQUESTS = 8
MAX_TOKENS = 128

SCHEMA = {
    "$defs": {
        "point": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["x"],
            "additionalProperties": False,
        }
    },
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "emu"]},
        "id": {"type": "string", "pattern": "^[a-z]{2,3}$"},
        "at": {"$ref": "#/$defs/point"},
        "path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 2},
        "flag": {"type": "boolean"},
    },
    "required": ["kind", "id", "at", "path"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{1,4}-[0-9]{2,3}(?:\.[a-z]{1,2})?"
CHOICES = ["sports", "politics", "science", "art \"&\" music", "cat", "category"]
LARK = r"""
start: call (";" call)~0..1
call: NAME "(" [arg ("," arg)~0..2] ")"
arg: NUMBER | NAME
NAME: /[a-z]{1,4}/
NUMBER: /[0-9]{1,3}/
"""
KINDS = {
    "json": dict(response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}),
    "regex": dict(regex=REGEX),
    "choice": dict(choice=CHOICES),
    "grammar": dict(grammar=LARK),
}


def check(kind: str, text: str) -> None:
    """The kind's own oracle on a finished output."""
    if kind == "json":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif kind == "regex":
        assert re.fullmatch(REGEX, text), text
    elif kind == "choice":
        assert text in CHOICES, text
    else:
        lark.Lark(LARK, parser="earley").parse(text)


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="amlx-constrain-"))
    import atexit

    atexit.register(shutil.rmtree, root, True)
    return make_checkpoint(root / arch, arch, seed=3)


def prompts(n: int, seed: int) -> list[str]:
    words = "please answer in the format asked for about animals points music and code".split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=int(rng.integers(2, 9)))) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# many constrained requests of every kind, batched with free ones


async def _mixed_batch_body(arch: str, temperature: float) -> None:
    async with await amlx.load(checkpoint(arch), max_batch_size=64) as model:
        free_prompts = prompts(FREE_REQUESTS, seed=7)
        free_options = [dict(max_tokens=24, temperature=temperature, seed=100 + i, logprobs=True)
                        for i in range(FREE_REQUESTS)]
        alone = [await model.complete(p, **o) for p, o in zip(free_prompts, free_options)]

        jobs = [(kind, p, dict(options, max_tokens=MAX_TOKENS, temperature=temperature, seed=i))
                for k, (kind, options) in enumerate(KINDS.items())
                for i, p in enumerate(prompts(REQUESTS_PER_KIND, seed=k))]
        results: dict[int, amlx.Completion] = {}
        together: dict[int, amlx.Completion] = {}

        async def constrained(i: int, prompt: str, options: dict) -> None:
            results[i] = await model.complete(prompt, **options)

        async def free(i: int) -> None:
            together[i] = await model.complete(free_prompts[i], **free_options[i])

        async with anyio.create_task_group() as tg:
            for i, (_, prompt, options) in enumerate(jobs):
                tg.start_soon(constrained, i, prompt, options)
                if i % 6 == 0 and i // 6 < FREE_REQUESTS:
                    tg.start_soon(free, i // 6)

    for i, (kind, _, _) in enumerate(jobs):
        assert results[i].finish_reason == "stop", (kind, results[i].text)
        check(kind, results[i].text)
    for i in range(FREE_REQUESTS):
        assert together[i].token_ids == alone[i].token_ids
        assert together[i].text == alone[i].text
    # the outputs do depend on the prompts (the constraint leaves the model a choice)
    assert len({results[i].text for i, (kind, _, _) in enumerate(jobs) if kind == "json"}) > 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("arch", ARCHS)
def test_constrained_requests_match_beside_free_ones(arch, temperature):
    anyio.run(_mixed_batch_body, arch, temperature)


# ---------------------------------------------------------------------------------------------
# the order of a constrained step: forward after reading step t, or before


async def _order_body(fail_at: int | None = None) -> dict:
    """A few constrained requests of each kind beside free ones in one batch: each request's
    outcome (text and tokens, or its error). With `fail_at`, the matchers refuse the
    `fail_at`-th token they are given (all matchers counted together), so one request fails
    in the middle of a step's read."""
    from amlx.constrain.matcher import Matcher

    calls = {"n": 0}
    consume = Matcher.consume

    def refusing(self, token_id):
        calls["n"] += 1
        return False if calls["n"] == fail_at else consume(self, token_id)

    Matcher.consume = refusing
    try:
        async with await amlx.load(checkpoint("qwen3"), max_batch_size=16) as model:
            free_prompts = prompts(3, seed=11)
            free_options = [dict(max_tokens=20, temperature=1.0, seed=50 + i) for i in range(3)]
            alone = [(await model.complete(p, **o)).token_ids for p, o in zip(free_prompts, free_options)]
            jobs = [(kind, p, dict(options, max_tokens=MAX_TOKENS, temperature=1.0, seed=i))
                    for k, (kind, options) in enumerate(KINDS.items()) for i, p in enumerate(prompts(3, seed=20 + k))]
            out: dict = {}

            async def one(key, prompt, options):
                try:
                    out[key] = await model.complete(prompt, **options)
                except amlx.AmlxError as e:
                    out[key] = e

            async with anyio.create_task_group() as tg:
                for i, (_, prompt, options) in enumerate(jobs):
                    tg.start_soon(one, i, prompt, options)
                for i in range(3):
                    tg.start_soon(one, ("free", i), free_prompts[i], free_options[i])
            # the engine goes on after a failure
            assert (await model.complete("z", choice=["up", "down"])).text in ("up", "down")
    finally:
        Matcher.consume = consume
    for i in range(3):
        assert out[("free", i)].token_ids == alone[i]
    failed = [i for i, (kind, _, _) in enumerate(jobs) if isinstance(out[i], Exception)]
    assert len(failed) == (fail_at is not None)
    for i in failed:
        assert "refused" in str(out[i])
    for i, (kind, _, _) in enumerate(jobs):
        if i not in failed:
            assert out[i].finish_reason == "stop", (kind, out[i].text)
            check(kind, out[i].text)
    return {k: (v.token_ids if not isinstance(v, Exception) else "failed") for k, v in out.items()}


@pytest.mark.parametrize("mask_start", ["advance", "thread"])
@pytest.mark.parametrize("fail_at", [None, 40])
def test_constrained_steps_in_either_order(fail_at, mask_start, monkeypatch):
    """Constrained shards launch their forwards after reading step t (a device that waits for
    the host) or before it (a device that makes the host wait): the same tokens either way,
    free rows as alone, and a request whose token is refused in the middle of a step's read
    fails alone (in the read-first order its shard skips that step); also where the mask
    thread's matchers take the read tokens (AMLX_MASK_START=thread: refused there, failed here)."""
    from amlx.engine.scheduler import Scheduler

    monkeypatch.setenv("AMLX_MASK_START", mask_start)

    order = {"first": False}
    monkeypatch.setattr(Scheduler, "forward_first", property(lambda self: order["first"], lambda self, v: None),
                        raising=False)
    after = anyio.run(_order_body, fail_at)
    order["first"] = True
    before = anyio.run(_order_body, fail_at)
    # (which request's token is the one refused depends on the order requests were admitted)
    both = [k for k in after if after[k] != "failed" and before[k] != "failed"]
    assert len(both) >= len(after) - 2
    assert {k: after[k] for k in both} == {k: before[k] for k in both}


async def _timing_body() -> tuple[dict | None, dict]:
    async with await amlx.load(checkpoint("qwen3")) as model:
        results = [await model.complete("x", regex="[a-z]{12}", max_tokens=16),
                   await model.complete("y", max_tokens=8)]
        assert re.fullmatch("[a-z]{12}", results[0].text)
        return model.stats().get("step_timing"), model.stats()


def test_step_timing_is_reported_when_switched_on(monkeypatch):
    """AMLX_STEP_TIMING=1 (read when the engine is built): stats() reports host seconds per
    phase of the scheduler's rounds (constrained steps' phases among them); off, no key."""
    monkeypatch.delenv("AMLX_STEP_TIMING", raising=False)
    off, _ = anyio.run(_timing_body)
    assert off is None
    monkeypatch.setenv("AMLX_STEP_TIMING", "1")
    on, stats = anyio.run(_timing_body)
    assert on["decode_steps"] == stats["decode_steps"] > 0 and on["rounds"] >= on["decode_steps"]
    assert {"wait", "emit", "masks", "build_sample", "launch_sample"} <= set(on["seconds"])
    # a prefill pass's phases, the first tokens' masks apart (only the constrained request has one)
    assert {"prefill_masks", "prefill_tables", "prefill_build", "prefill_sample", "prefill_wait"} <= set(on["seconds"])
    assert all(v >= 0 for v in on["seconds"].values())
    assert on["background"]["mask_fill"] > 0  # llguidance's own time, beside the phases
    assert set(on["cpu"]) == set(on["seconds"]) and all(v >= 0 for v in on["cpu"].values())
    assert on["counts"]["prefill_groups"] >= 2
    # (the plain passes' rows and padded tokens: two prompts of one and two tokens, each alone)
    assert on["counts"]["prefill_rows"] == on["counts"]["prefill_groups"] == 2
    assert on["counts"]["prefill_tokens"] >= 2


async def _pinned_body() -> tuple[bool, list[str]]:
    async with await amlx.load(checkpoint("qwen3")) as model:
        results = [await model.complete(p, regex="[a-z]{6}[0-9]{2}", max_tokens=16) for p in ("x", "yy")]
        return model._engine.scheduler.forward_first, [r.text for r in results]


def test_mask_order_pinned_by_the_environment(monkeypatch):
    """AMLX_MASK_ORDER=forward / read (benchmarks) keeps the constrained shards' order whatever
    the scheduler measures; the tokens are the same either way."""
    texts = {}
    for order in ("forward", "read"):
        monkeypatch.setenv("AMLX_MASK_ORDER", order)
        first, texts[order] = anyio.run(_pinned_body)
        assert first is (order == "forward")
        assert all(re.fullmatch("[a-z]{6}[0-9]{2}", t) for t in texts[order])
    assert texts["forward"] == texts["read"]


async def _upload_body() -> tuple[list[str], dict]:
    async with await amlx.load(checkpoint("qwen3")) as model:
        prompts = ("x", "yy", "zzz")
        results = await asyncio.gather(*(model.complete(p, regex="[a-z]{6}[0-9]{2}", max_tokens=16, temperature=1.0,
                                                        seed=i) for i, p in enumerate(prompts)))
        return [r.text for r in results], model.stats()["step_timing"]


def test_masks_uploaded_on_the_mask_thread_sample_the_same(monkeypatch):
    """The mask thread also makes the masks' device arrays (the default, AMLX_MASK_UPLOAD=thread);
    the tokens are those of the worker's own upload (=worker), seeded sampling included."""
    monkeypatch.setenv("AMLX_MASK_ORDER", "read")  # (the masks are filled on the mask thread)
    monkeypatch.setenv("AMLX_STEP_TIMING", "1")
    texts, timing = {}, {}
    for mode in ("worker", "thread"):
        monkeypatch.setenv("AMLX_MASK_UPLOAD", mode)
        texts[mode], timing[mode] = anyio.run(_upload_body)
        assert all(re.fullmatch("[a-z]{6}[0-9]{2}", t) for t in texts[mode])
    assert texts["thread"] == texts["worker"]
    assert timing["thread"]["background"]["mask_upload"] > 0
    assert "mask_upload" not in timing["worker"]["background"]
    monkeypatch.setenv("AMLX_MASK_UPLOAD", "gpu")
    with pytest.raises(ValueError, match="AMLX_MASK_UPLOAD"):
        anyio.run(_upload_body)


def test_forwards_built_before_or_after_the_read_sample_the_same(monkeypatch):
    """Stepping after step t's read (AMLX_MASK_ORDER=read), constrained shards build their
    forwards before that read by default and launch them after it; AMLX_MASK_BUILD=after
    builds them after it. The tokens are the same, seeded sampling included."""
    from amlx.engine.scheduler import Scheduler

    prebuilt = []  # per constrained step: whether its forwards were built before the read (not launched)
    real = Scheduler._step_constrained

    def logged(self, plan, indices, parts, *args, launched=False, **kwargs):
        prebuilt.append(not launched and any(parts[i] is not None for i in indices))
        return real(self, plan, indices, parts, *args, launched=launched, **kwargs)

    monkeypatch.setattr(Scheduler, "_step_constrained", logged)
    monkeypatch.setenv("AMLX_MASK_ORDER", "read")
    monkeypatch.setenv("AMLX_STEP_TIMING", "1")  # (_upload_body reads the step timing)
    texts, orders = {}, {}
    for mode in ("after", "before"):
        monkeypatch.setenv("AMLX_MASK_BUILD", mode)
        prebuilt.clear()
        texts[mode], _ = anyio.run(_upload_body)
        assert all(re.fullmatch("[a-z]{6}[0-9]{2}", t) for t in texts[mode])
        orders[mode] = sum(prebuilt)
    assert texts["before"] == texts["after"]
    assert orders["before"] > 0 and orders["after"] == 0
    monkeypatch.setenv("AMLX_MASK_BUILD", "sometimes")
    with pytest.raises(ValueError, match="AMLX_MASK_BUILD"):
        anyio.run(_upload_body)


async def _mixed_body() -> list[tuple[str, str]]:
    """Constrained requests of different lengths beside free ones, seeded sampling."""
    async with await amlx.load(checkpoint("qwen3")) as model:
        constrained = [model.complete(p, regex=rx, max_tokens=24, temperature=1.0, seed=i)
                       for i, (p, rx) in enumerate((("x", "[a-z]{3}"), ("yy", "[0-9]{2}q{0,9}z"),
                                                    ("zzz", "[a-z]{6}[0-9]{2}")))]
        free = [model.complete(p, max_tokens=12, temperature=1.0, seed=10 + i) for i, p in enumerate(("a", "bb"))]
        results = await asyncio.gather(*constrained, *free)
        return [(r.text, r.finish_reason) for r in results]


def test_masks_started_once_the_matchers_advanced_sample_the_same(monkeypatch):
    """By default (AMLX_MASK_START=advance) a step's masks start on the mask thread once the
    matchers took step t's tokens, while the tokens still go out to their requests; =emit
    starts them after; =thread right after the read, the mask thread's matchers taking the
    tokens, which go out once the sampling is launched. Constrained and free requests get the
    same tokens and ends every way, and no request sees its matcher used by both threads at
    once."""
    import threading

    from amlx.constrain.matcher import Matcher
    from amlx.engine.scheduler import Scheduler

    takers = []  # the threads whose matchers took tokens
    consume = Matcher.consume

    def logged_consume(self, token_id):
        takers.append(threading.current_thread().name)
        return consume(self, token_id)

    monkeypatch.setattr(Matcher, "consume", logged_consume)

    early = []  # per constrained step: whether its masks were started during the read
    real = Scheduler._step_constrained

    def logged(self, *args, started=None, **kwargs):
        early.append(started is not None)
        return real(self, *args, started=started, **kwargs)

    monkeypatch.setattr(Scheduler, "_step_constrained", logged)
    monkeypatch.setenv("AMLX_MASK_ORDER", "read")
    outs, starts, on_thread = {}, {}, {}
    for mode in ("emit", "advance", "thread"):
        monkeypatch.setenv("AMLX_MASK_START", mode)
        early.clear()
        takers.clear()
        outs[mode] = anyio.run(_mixed_body)
        starts[mode] = sum(early)
        on_thread[mode] = sum(name.startswith("amlx-masks") for name in takers)
    assert outs["advance"] == outs["emit"] == outs["thread"]
    assert on_thread["thread"] > 0 and on_thread["advance"] == on_thread["emit"] == 0
    texts = [t for t, _ in outs["advance"]]
    assert re.fullmatch("[a-z]{3}", texts[0]) and re.fullmatch("[0-9]{2}q{0,9}z", texts[1])
    assert re.fullmatch("[a-z]{6}[0-9]{2}", texts[2])
    assert [r for _, r in outs["advance"][:3]] == ["stop"] * 3
    assert starts["advance"] > 0 and starts["thread"] > 0 and starts["emit"] == 0
    monkeypatch.setenv("AMLX_MASK_START", "never")
    with pytest.raises(ValueError, match="AMLX_MASK_START"):
        anyio.run(_mixed_body)


@pytest.mark.parametrize("mask_start", ["advance", "thread"])
def test_a_request_failing_while_its_token_goes_out_leaves_the_masks_and_others_alone(monkeypatch, mask_start):
    """With the masks started before the tokens go out, a request whose detokenizer raises
    then fails alone (its error names the cause); the constrained requests beside it complete
    their patterns, their matchers untouched by the failing hand-out."""
    monkeypatch.setenv("AMLX_MASK_START", mask_start)
    from amlx.engine import assembler as assembler_module

    real_push = assembler_module.TextAssembler.push

    def push(self, token_id, *args, **kwargs):
        if self._max == 15 and self.count >= 3:  # (the victim: the one request of max_tokens=15)
            raise RuntimeError("detokenizer broke")
        return real_push(self, token_id, *args, **kwargs)

    monkeypatch.setattr(assembler_module.TextAssembler, "push", push)
    monkeypatch.setenv("AMLX_MASK_ORDER", "read")

    async def body():
        async with await amlx.load(checkpoint("qwen3")) as model:
            good = [model.complete(p, regex="[a-z]{6}[0-9]{2}", max_tokens=16, temperature=1.0, seed=i)
                    for i, p in enumerate(("x", "yy"))]
            victim = model.complete("zzz", regex="[0-9]{12}", max_tokens=15)
            return await asyncio.gather(*good, victim, return_exceptions=True)

    *good, victim = anyio.run(body)
    assert isinstance(victim, amlx.AmlxError) and "detokenizer broke" in str(victim)
    assert all(re.fullmatch("[a-z]{6}[0-9]{2}", g.text) for g in good)


@pytest.mark.parametrize("copy", ["pinned", "mlx"])
def test_a_failed_mask_upload_on_the_mask_thread_is_a_failed_step(monkeypatch, copy):
    """An MLX error making the masks' device arrays on the mask thread is handled as a step
    that failed to build (the rows retried), not an engine failure: the requests complete
    (with the masks filled in reused buffers too: the failed step's buffer is reused after)."""
    from amlx.engine import scheduler as scheduler_module
    from amlx.errors import MLXError

    real, calls = scheduler_module.upload_masks, []

    def flaky(masks, **kwargs):
        calls.append(len(masks))
        if len(calls) == 3:
            raise MLXError("array", "out of memory (injected)")
        return real(masks, **kwargs)

    monkeypatch.setattr(scheduler_module, "upload_masks", flaky)
    monkeypatch.setenv("AMLX_MASK_COPY", copy)
    monkeypatch.setenv("AMLX_STEP_TIMING", "1")
    monkeypatch.setenv("AMLX_MASK_ORDER", "read")
    monkeypatch.setenv("AMLX_MASK_UPLOAD", "thread")
    texts, _ = anyio.run(_upload_body)
    assert len(calls) > 3 and all(re.fullmatch("[a-z]{6}[0-9]{2}", t) for t in texts)


async def _queued_body() -> None:
    async with await amlx.load(checkpoint("qwen3")) as model:
        pattern = "[a-z]{40}"
        await model.complete("x", regex=pattern, max_tokens=48)  # the grammar is compiled now
        held = model._engine.scheduler._held  # every request the scheduler holds, whatever its state
        while held:  # (the finished one leaves at the worker's next round)
            await anyio.sleep(0.01)
        streams = [model.generate(p, regex=pattern, max_tokens=48) for p in ("a", "b", "c", "d")]
        assert len(held) == 4  # (no await since: none can have ended)
        for stream in streams:
            assert re.fullmatch(pattern, "".join([t.text async for t in stream]))


def test_constrained_requests_with_a_compiled_grammar_queue_at_once():
    """A request whose grammar is compiled already gets its matcher in submit and is queued
    there (as an unconstrained one is), not later from the grammar thread: requests submitted
    together reach the scheduler together."""
    anyio.run(_queued_body)


# ---------------------------------------------------------------------------------------------
# how a constrained request ends, its log-probabilities, bad options


async def _endings_body(arch: str) -> None:
    async with await amlx.load(checkpoint(arch)) as model:
        eos = model.tokenizer.eos_token_ids
        # no continuation after the last choice: the request ends without an EOS token
        done = await model.complete("x", choice=["abc"], max_tokens=16)
        assert done.text == "abc" and done.finish_reason == "stop"
        assert not set(done.token_ids) & eos
        # "[a-z]+" may always go on: only EOS ends it, and only once a letter is out. A huge
        # bias on EOS cannot make it come first; right after, it wins.
        favour_eos = {min(eos): 100.0}
        open_ended = await model.complete("x", regex="[a-z]+", max_tokens=20, logit_bias=favour_eos)
        assert open_ended.finish_reason == "stop" and re.fullmatch("[a-z]+", open_ended.text)
        assert len(open_ended.token_ids) == 2 and open_ended.token_ids[-1] in eos
        # max_tokens first: "length", a prefix of a match
        cut = await model.complete("x", regex="[a-z]{50}", max_tokens=3)
        assert cut.finish_reason == "length" and re.fullmatch("[a-z]*", cut.text)
        # streaming gives the same tokens, the last one finished
        toks = [t async for t in model.generate("x", choice=["abc"], max_tokens=16)]
        assert "".join(t.text for t in toks) == "abc" and toks[-1].finish_reason == "stop"


@pytest.mark.parametrize("arch", ARCHS)
def test_constrained_request_endings(arch):
    anyio.run(_endings_body, arch)


async def _logprob_body(arch: str) -> None:
    path = checkpoint(arch)
    async with await amlx.load(path) as model:
        prompt_ids = model.tokenizer.encode("the answer is")
        result = await model.complete(prompt_ids, regex="[a-c]", max_tokens=4, logprobs=True)
        tokenizer = model.tokenizer
        vocab_size = model.info.vocab_size if hasattr(model.info, "vocab_size") else None
    first, lp = result.token_ids[0], result.logprobs[0]
    ref = load_reference(path)
    logits = reference_logits(ref, prompt_ids)[-1].astype(np.float64)
    vocab = GrammarVocab.from_tokenizer(tokenizer, vocab_size or logits.shape[0])
    matcher = vocab.matcher(parse_constraint(regex="[a-c]"))
    masks = vocab.new_masks(1)
    matcher.fill_mask(masks)
    allowed = unpack_mask(masks, logits.shape[0])[0]
    masked = np.where(allowed, logits, -np.inf)
    expected = masked[first] - (masked.max() + math.log(np.exp(masked - masked.max()).sum()))
    assert first == int(np.argmax(masked))
    assert abs(lp - expected) <= 1e-4 * max(1.0, abs(expected))


@pytest.mark.parametrize("arch", ARCHS)
def test_logprobs_are_those_of_the_constrained_distribution(arch):
    anyio.run(_logprob_body, arch)


async def _bad_options_body() -> None:
    async with await amlx.load(checkpoint("qwen3")) as model:
        bad = [
            dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
            dict(regex="(unclosed"),
            dict(grammar="start: missing_rule"),
            dict(regex="a", choice=["a"]),
            dict(choice=[]),
        ]
        for options in bad:
            with pytest.raises(ValueError):
                model.generate("hi", **options)
            with pytest.raises(ValueError):
                await model.complete("hi", **options)
        assert model.stats()["waiting_requests"] == 0
        # the model is fine afterwards
        assert (await model.complete("hi", choice=["yes", "no"])).text in ("yes", "no")


def test_bad_constraints_raise_before_queueing():
    anyio.run(_bad_options_body)


async def _gave_up_body() -> None:
    async with await amlx.load(checkpoint("qwen3")) as model:
        out: dict = {}

        async def one(key, prompt, **options):
            try:
                out[key] = await model.complete(prompt, max_tokens=6, **options)
            except amlx.AmlxError as e:
                out[key] = e

        async with anyio.create_task_group() as tg:
            # (compiles, but its lexer's limit is reached at the first token: llguidance gives up)
            tg.start_soon(functools.partial(one, "bomb", "x", regex="(a{1000}){1000}"))
            tg.start_soon(functools.partial(one, "regex", "y", regex="[a-z]{4}"))
            tg.start_soon(functools.partial(one, "free", "z"))
        # again, from the compiled grammar the first request left (where llguidance fails while
        # computing the first mask, allows EOS alone, and took EOS as a proper end: "" with
        # finish_reason "stop", a text the regex does not match)
        await one("again", "x", regex="(a{1000}){1000}")
        for bomb in (out["bomb"], out["again"]):
            assert isinstance(bomb, amlx.ConstraintError) and isinstance(bomb, ValueError), bomb
            assert "regex constraint cannot be followed" in str(bomb) and "too many" in str(bomb)
        assert re.fullmatch("[a-z]{4}", out["regex"].text) and len(out["free"].token_ids) == 6
        assert (await model.complete("w", choice=["up", "down"])).text in ("up", "down")


@pytest.mark.parametrize("mask_start", ["advance", "thread"])
def test_a_constraint_the_grammar_engine_gives_up_on_fails_its_request_alone(monkeypatch, mask_start):
    """A constraint llguidance accepts but gives up on part-way (past its lexer's limits) fails
    its own request with ConstraintError, a ValueError that says so (the server's 400), not as
    an engine failure; the requests beside it and the engine go on."""
    monkeypatch.setenv("AMLX_MASK_START", mask_start)
    anyio.run(_gave_up_body)


async def _special_names_body(arch: str, name: str) -> None:
    async with await amlx.load(checkpoint(arch)) as model:
        for options in (dict(choice=[name]), dict(regex=re.escape(name))):
            out = await model.complete("w", max_tokens=32, **options)
            assert (out.text, out.finish_reason) == (name, "stop"), (options, out)


@pytest.mark.parametrize("arch, name", [("qwen3", "<|im_end|>"), ("gemma3_text", "<start_of_turn>")])
def test_a_special_token_name_as_constrained_text(arch, name):
    """The text of a special token's name, asked for by a constraint, comes out as that text (it
    failed the request: llguidance's mask allowed the special token, its parser refused it)."""
    anyio.run(_special_names_body, arch, name)


async def _cancel_body() -> None:
    async with await amlx.load(checkpoint("qwen3")) as model:
        stream = model.generate("x", regex="[a-z]{40}", max_tokens=40, max_buffer=1)
        async for _ in stream:
            break
        await stream.aclose()
        other = await model.complete("y", choice=["left", "right"])
        assert other.text in ("left", "right")
        with anyio.fail_after(30):
            while model.stats()["active_requests"]:
                await anyio.sleep(0.01)


def test_cancelled_constrained_request_leaves():
    anyio.run(_cancel_body)


# ---------------------------------------------------------------------------------------------
# score


def _reference_score(ref, prompt_ids: list[int], cont: list[int]) -> float:
    logits = reference_logits(ref, prompt_ids + cont).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lsm = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(sum(lsm[len(prompt_ids) - 1 + j, t] for j, t in enumerate(cont)))


async def _score_body(arch: str) -> None:
    path = checkpoint(arch)
    ref = load_reference(path)
    async with await amlx.load(path) as model:
        tok = model.tokenizer
        prompt = "Classify the sentence: the team won the cup final. Domain:"
        labels = [" sports", " politics", " science", " a much longer label with many tokens in it", "x"]
        scores = await model.score(prompt, labels)
        prompt_ids = tok.encode(prompt)
        for label, got in zip(labels, scores):
            expected = _reference_score(ref, prompt_ids, tok.encode(label, add_special_tokens=False))
            assert abs(got - expected) <= 1e-4 * abs(expected), (label, got, expected)
        # token ids, a long prompt (chunked prefill, past Gemma's sliding window), an empty continuation
        long_ids = [int(i) for i in np.random.default_rng(0).integers(10, 300, size=90)]
        conts = [[5, 6, 7], [], [42]]
        scores = await model.score(long_ids, conts)
        assert scores[1] == 0.0
        for cont, got in zip(conts, scores):
            if cont:
                expected = _reference_score(ref, long_ids, cont)
                assert abs(got - expected) <= 1e-4 * abs(expected)
        with pytest.raises(ValueError):
            await model.score(prompt, [[10**9]])
        with pytest.raises(ValueError):
            await model.score([], ["a"])  # no prompt token
        with pytest.raises(TypeError):
            await model.score(prompt, [3.5])
        # a string, a dict or None is not a list of continuations (a string scored each character)
        for bad in ("sports", {"sports": 1}, None):
            with pytest.raises(TypeError, match="continuations must be a list"):
                await model.score(prompt, bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_score_matches_transformers(arch):
    anyio.run(_score_body, arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_tokenizer_larger_than_the_models_vocabulary(arch, tmp_path):
    """A fine-tune's tokenizer with a token past the model's embeddings (a pad token added
    without resizing them): constrained requests of every kind still match (llguidance sees
    every token; the mask past the logits is cut), and the extra id is never produced."""
    path = shutil.copytree(checkpoint(arch), tmp_path / arch)
    vocab = json.loads((path / "config.json").read_text()).get("vocab_size") \
        or json.loads((path / "config.json").read_text())["text_config"]["vocab_size"]
    data = json.loads((path / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": vocab, "content": "<|extra_pad|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (path / "tokenizer.json").write_text(json.dumps(data))

    async def body():
        async with await amlx.load(path) as model:
            assert model.tokenizer.vocab_size == vocab + 1
            for i, (kind, options) in enumerate(KINDS.items()):
                for temperature in (0.0, 1.0):
                    out = await model.complete(prompts(1, seed=i)[0], max_tokens=MAX_TOKENS, temperature=temperature,
                                               seed=i, **options)
                    assert out.finish_reason == "stop", (kind, out.text)
                    assert max(out.token_ids) < vocab
                    check(kind, out.text)

    anyio.run(body)


def test_masks_copied_by_the_driver_sample_the_same(monkeypatch):
    """AMLX_MASK_COPY=driver (the CUDA driver's copy; MLX's elsewhere) and =pinned (the
    driver's, from page-locked buffers reused step after step) sample what the default copy
    samples, seeded sampling included; anything else is refused by name."""
    monkeypatch.setenv("AMLX_MASK_ORDER", "read")
    monkeypatch.setenv("AMLX_MASK_UPLOAD", "thread")
    monkeypatch.setenv("AMLX_STEP_TIMING", "1")
    texts = {}
    for mode in ("mlx", "driver", "pinned"):
        monkeypatch.setenv("AMLX_MASK_COPY", mode)
        texts[mode], timing = anyio.run(_upload_body)
        assert all(re.fullmatch("[a-z]{6}[0-9]{2}", t) for t in texts[mode])
        assert timing["background"]["mask_upload"] > 0
    assert texts["driver"] == texts["mlx"] == texts["pinned"]
    monkeypatch.setenv("AMLX_MASK_COPY", "cuda")
    with pytest.raises(ValueError, match="AMLX_MASK_COPY"):
        anyio.run(_upload_body)
