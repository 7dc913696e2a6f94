"""Generation options: validation bounds (property-tested against the real sampler)
and the sampling options end to end through the engine.

- Validation: any options `GenerationOptions.from_kwargs` accepts sample without
  error in the batched sampler on random logits, with results the numpy
  reference allows; any value out of its bound raises ValueError (an unknown
  name TypeError) when the request is made, so a bad request never reaches the
  worker (issue 12.1: `top_k=2**31` used to fail inside the worker and take
  the batch down).
- Engine: `top_logprobs` (checked against transformers' log_softmax),
  `logit_bias`, presence/frequency penalties (greedy, against a numpy reference
  applied to transformers' logits), batch independence of a row using them, and
  the vocabulary checks at `generate()`.
"""

from __future__ import annotations

import asyncio
import functools
import math
import shutil
import tempfile
import atexit
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx
from amlx import _mlx as mx
from amlx.sample import (BatchParams, BatchSampling, RowSampling, SamplingParams, StepSample, make_counts,
                         make_history, make_keys, sample)
from amlx.types import GenerationOptions

try:
    from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_logits
    from tests.test_sample import allowed_set, log_softmax, penalised_np
except ImportError:  # run from inside tests/
    from helpers.checkpoints import load_reference, make_checkpoint, reference_logits
    from test_sample import allowed_set, log_softmax, penalised_np

VOCAB = 48

# -- option values: valid ones, and invalid ones per option ------------------------------------

VALID = {
    "max_tokens": st.one_of(st.integers(1, 64), st.just(2**31 - 1)),
    "temperature": st.one_of(st.just(0.0), st.floats(1e-30, 100.0)),
    "top_p": st.one_of(st.just(1.0), st.floats(1e-320, 1.0, exclude_min=False).filter(lambda v: v > 0)),
    "top_k": st.integers(0, VOCAB),
    "min_p": st.floats(0.0, 1.0),
    "repetition_penalty": st.floats(0.01, 100.0),
    "presence_penalty": st.floats(-2.0, 2.0),
    "frequency_penalty": st.floats(-2.0, 2.0),
    "logit_bias": st.one_of(st.none(), st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100.0, 100.0),
                                                       max_size=6)),
    "stop": st.one_of(st.text(min_size=1, max_size=5), st.lists(st.text(min_size=1, max_size=8), max_size=4)),
    "seed": st.one_of(st.none(), st.integers(-2**70, 2**70)),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "max_buffer": st.integers(1, 1 << 16),
    # constraints (amlx.constrain; at most one per request, see option_sets)
    "response_format": st.sampled_from([None, {"type": "text"}, {"type": "json_object"},
                                        {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                                            "type": "object", "properties": {"a": {"type": "integer"}}}}}]),
    "regex": st.sampled_from([None, "[a-z]+", r"[0-9]{1,3}"]),
    "choice": st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=4)),
    "grammar": st.sampled_from([None, 'start: "a" | "b" x\nx: /[0-9]/']),
}
CONSTRAINTS = ("response_format", "regex", "choice", "grammar")
NAN, INF = float("nan"), float("inf")
INVALID = {
    "max_tokens": st.sampled_from([0, -1, 2**31, 1.5, True, "8", None]),
    "temperature": st.sampled_from([-1e-9, NAN, INF, 100.5, 1e300, "1", None]),
    "top_p": st.sampled_from([0.0, -0.5, 1.0000001, NAN, INF, None]),
    "top_k": st.sampled_from([-1, VOCAB + 1, 2**31, 2**63, 2.0, True]),
    "min_p": st.sampled_from([-1e-9, 1.01, NAN, "0"]),
    "repetition_penalty": st.sampled_from([0.0, -1.0, 1e-30, 0.0099, 100.5, NAN, INF]),
    "presence_penalty": st.sampled_from([2.01, -2.01, NAN, INF, "0"]),
    "frequency_penalty": st.sampled_from([2.01, -2.01, NAN, -INF, None]),
    "logit_bias": st.sampled_from([{VOCAB: 1.0}, {-1: 1.0}, {1: 100.5}, {1: NAN}, {"1": 1.0}, {1.0: 1.0},
                                   {True: 1.0}, [3], 7, "x", {2**40: 1.0}]),
    "stop": st.sampled_from([[""], 5, ["ok", 3], ["x" * 257], ["s"] * 17, None]),
    "seed": st.sampled_from([1.0, "7", True, [1]]),
    "logprobs": st.sampled_from([1, "yes", None]),
    "top_logprobs": st.sampled_from([21, -1, 2.0, True, 2**31]),
    "max_buffer": st.sampled_from([0, (1 << 16) + 1, 2.0, None]),
    "response_format": st.sampled_from([{"type": "xml"}, "json", {"type": "json_schema"},
                                        {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}]),
    "regex": st.sampled_from(["(", "", 3]),
    "choice": st.sampled_from([[], [""], "ab", [1]]),
    "grammar": st.sampled_from(["start: nothing", "", 7]),
}


@st.composite
def option_sets(draw):
    """(kwargs, valid): a random subset of options, each valid or (sometimes) not."""
    names = draw(st.lists(st.sampled_from(sorted(VALID)), unique=True, max_size=8))
    kwargs, valid = {}, True
    for name in names:
        if draw(st.integers(0, 9)) == 0:
            kwargs[name] = draw(INVALID[name])
            valid = False
        else:
            kwargs[name] = draw(VALID[name])
    # (top_logprobs > 0 turns logprobs on: DESIGN.md's 0..20 are all valid on their own)
    given = [n for n in CONSTRAINTS if kwargs.get(n) not in (None, {"type": "text"})]
    if len(given) > 1:
        valid = False  # at most one constraint per request
    return kwargs, valid


def test_typed_options_and_validated_options_name_the_same_options():
    from dataclasses import fields

    from amlx.types import GenerateOptions

    assert set(GenerateOptions.__annotations__) == {f.name for f in fields(GenerationOptions)} == set(VALID)


def validate_and_sample(rows, data_seed: int, *, compiled: bool) -> None:
    """Every option set either raises ValueError when made, or samples (batched with the
    other rows) to results the numpy reference allows. `compiled`: through the engine's
    `BatchSampling` (compiled steps); else the same step function run eagerly."""
    accepted = []
    for kwargs, valid in rows:
        if not valid:
            with pytest.raises(ValueError):
                GenerationOptions.from_kwargs(VOCAB, **kwargs)
            continue
        accepted.append(GenerationOptions.from_kwargs(VOCAB, **kwargs))
    if not accepted:
        return
    params = [SamplingParams.from_options(o) for o in accepted]
    rng = np.random.default_rng(data_seed)
    x = (rng.normal(size=(len(accepted), VOCAB)) * rng.choice([0.1, 3.0, 30.0])).astype(np.float32)
    prompts = [rng.integers(0, VOCAB, size=3).tolist() for _ in accepted]
    generated = [rng.integers(0, VOCAB, size=4).tolist() for _ in accepted]
    if compiled:
        samplers = [RowSampling(o, prompt) for o, prompt in zip(accepted, prompts)]
        for row, ids in zip(samplers, generated):
            for t in ids:
                row.observe(t)
        batch = BatchSampling(samplers)
        try:
            toks, lps, tops = batch(mx.array(x)).read()
        finally:
            batch.close()
    else:
        out = sample(mx.array(x), BatchParams.build(params), make_keys([p.seed for p in params]),
                     make_history([p + g for p, g in zip(prompts, generated)], VOCAB), make_counts(generated, VOCAB),
                     compile=False)
        toks, lps, tops = StepSample(out.tokens, out.logprobs, out.top_ids, out.top_logprobs).read()
    ref = log_softmax(x)
    for b, p in enumerate(params):
        processed = penalised_np(x[b], p, prompts[b], generated[b])
        assert 0 <= toks[b] < VOCAB and np.isfinite(processed).all()
        if p.is_greedy:
            best = processed.max()
            assert processed[toks[b]] >= best - 1e-4 * max(1.0, abs(best)), (p, toks[b])
        else:
            assert allowed_set(processed, SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                                         min_p=p.min_p), None)[toks[b]], p
        if p.logprobs:
            assert math.isclose(lps[b], ref[b, toks[b]], abs_tol=1e-4)
        if p.top_logprobs:
            ids, vals = zip(*tops[b][:p.top_logprobs])
            assert list(vals) == sorted(vals, reverse=True)
            assert len(set(ids)) == len(ids) == min(p.top_logprobs, VOCAB)
            np.testing.assert_allclose(vals, ref[b, list(ids)], atol=1e-4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(option_sets(), min_size=1, max_size=3), data_seed=st.integers(0, 2**32 - 1))
def test_options_that_validate_sample_and_others_raise(rows, data_seed):
    validate_and_sample(rows, data_seed, compiled=False)


# Few examples: on MLX's CPU backend each new combination of the batch's flags compiles
# fused kernels with the system C++ compiler once (seconds; MLX caches them on disk).
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(option_sets(), min_size=1, max_size=3), data_seed=st.integers(0, 2**32 - 1))
def test_options_that_validate_sample_in_the_engines_compiled_sampler(rows, data_seed):
    validate_and_sample(rows, data_seed, compiled=True)


def test_unknown_and_vocabulary_dependent_options():
    with pytest.raises(TypeError, match="temperatur"):
        GenerationOptions.from_kwargs(temperatur=0.5)
    with pytest.raises(TypeError, match="vocab_size"):
        GenerationOptions.from_kwargs(vocab_size=5)  # the vocabulary size is positional only
    GenerationOptions.from_kwargs(10, top_k=10, logit_bias={9: 1.0})
    for bad in (dict(top_k=11), dict(logit_bias={10: 1.0})):
        GenerationOptions.from_kwargs(**bad)  # fine until the vocabulary is known
        with pytest.raises(ValueError):
            GenerationOptions.from_kwargs(10, **bad)
        with pytest.raises(ValueError):
            GenerationOptions.from_kwargs(**bad).check_vocab(10)
    bias = {1: 2.0}
    opts = GenerationOptions.from_kwargs(logit_bias=bias)
    bias[2] = 3.0
    assert opts.logit_bias == {1: 2.0}  # a copy: the caller's dict may change


# -- through the engine -----------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def checkpoint() -> Path:
    root = Path(tempfile.mkdtemp(prefix="amlx-options-"))
    atexit.register(shutil.rmtree, root, True)
    return make_checkpoint(root / "qwen3", "qwen3", seed=0)


@pytest.fixture(scope="module")
def model():
    m = amlx.load_sync(checkpoint())
    yield m
    m.close()


@functools.lru_cache(maxsize=None)
def hf_model():
    return load_reference(checkpoint())


def hf_last_logits(ids: list[int]) -> np.ndarray:
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return reference_logits(hf_model(), ids)[-1].astype(np.float32)
    finally:
        torch.set_num_threads(n)


PROMPT = [11, 42, 97, 5, 300, 17]


def test_top_logprobs_match_transformers(model):
    comp = model.complete_sync(PROMPT, max_tokens=4, logprobs=True, top_logprobs=5)
    stream = list(model.generate_sync(PROMPT, max_tokens=4, logprobs=True, top_logprobs=5))
    assert comp.top_logprobs == [t.top_logprobs for t in stream]
    assert comp.token_ids == [t.id for t in stream]
    ids = list(PROMPT)
    for tok in stream:
        ref = log_softmax(hf_last_logits(ids)[None])[0]
        order = np.argsort(-ref)[:5]
        assert len(tok.top_logprobs) == 5 and tok.top_logprobs[0][0] == tok.id  # greedy: the best one
        assert [i for i, _ in tok.top_logprobs] == order.tolist()
        np.testing.assert_allclose([v for _, v in tok.top_logprobs], ref[order], atol=2e-4)
        assert tok.logprob == tok.top_logprobs[0][1]
        ids.append(tok.id)
    plain = model.complete_sync(PROMPT, max_tokens=2, logprobs=True)
    assert plain.top_logprobs is None and all(t.top_logprobs is None for t in model.generate_sync(PROMPT, max_tokens=2))


def test_logit_bias_forces_and_bans_tokens(model):
    forced = model.complete_sync(PROMPT, max_tokens=5, logit_bias={123: 100.0})
    assert forced.token_ids == [123] * 5
    free = model.complete_sync(PROMPT, max_tokens=5)
    banned = model.complete_sync(PROMPT, max_tokens=5, logit_bias={t: -100.0 for t in set(free.token_ids)})
    assert not set(banned.token_ids) & set(free.token_ids)


def test_presence_and_frequency_penalties_match_a_numpy_reference(model):
    """Greedy with OpenAI's penalties, step by step against transformers' logits with
    the numpy penalties applied (generated tokens counted, the prompt not)."""
    opts = dict(presence_penalty=1.5, frequency_penalty=0.75, repetition_penalty=1.2, logit_bias={7: 0.5})
    comp = model.complete_sync(PROMPT, max_tokens=10, **opts)
    params = SamplingParams(**{k: v for k, v in opts.items()})
    generated: list[int] = []
    for tok in comp.token_ids:
        processed = penalised_np(hf_last_logits(PROMPT + generated), params, PROMPT, generated)
        assert processed[tok] >= processed.max() - 1e-3  # float noise may only swap near-ties
        generated.append(tok)
    plain = model.complete_sync(PROMPT, max_tokens=10)
    assert comp.token_ids != plain.token_ids  # the penalties did act


def test_a_row_with_the_new_options_is_batch_independent(model):
    mine = dict(temperature=0.9, seed=3, presence_penalty=1.0, frequency_penalty=0.5, logit_bias={9: 3.0},
                logprobs=True, top_logprobs=3, max_tokens=12)
    solo = model.complete_sync(PROMPT, **mine)

    async def together():
        others = [model.complete([5, 6, 7, 8], max_tokens=12), model.complete([1, 2], max_tokens=20, temperature=1.0),
                  model.complete(PROMPT, max_tokens=6, frequency_penalty=-1.0, logit_bias={1: 5.0})]
        return await asyncio.gather(model.complete(PROMPT, **mine), *others)

    batched = asyncio.run(together())[0]
    assert batched.token_ids == solo.token_ids
    np.testing.assert_allclose(batched.logprobs, solo.logprobs, atol=1e-4)
    assert [[i for i, _ in t] for t in batched.top_logprobs] == [[i for i, _ in t] for t in solo.top_logprobs]


def _wait_idle(model, seconds: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = model.stats()
        if s["waiting_requests"] == 0 and s["active_requests"] == 0:
            return
        time.sleep(0.01)
    raise AssertionError(f"the engine still holds requests after {seconds} s: {model.stats()}")


def test_out_of_range_options_fail_at_the_call(model):
    """Issue 12.1: these used to pass validation and fail inside the worker."""
    vocab = model.info.context_length and model.tokenizer.vocab_size
    _wait_idle(model)  # rows of an earlier test's requests leave at the worker's next round
    for bad in (dict(top_k=2**31), dict(top_k=10**6), dict(logit_bias={10**6: 1.0}), dict(max_tokens=2**40),
                dict(top_p=1e-50, temperature=float("inf")), dict(presence_penalty=float("nan"))):
        with pytest.raises(ValueError):
            model.generate(PROMPT, **bad)
    assert model.stats()["waiting_requests"] == 0 and model.stats()["active_requests"] == 0
    # the bounds themselves work
    assert len(model.complete_sync(PROMPT, max_tokens=2, top_k=vocab, temperature=1.0, seed=1).token_ids) == 2
    tiny = model.complete_sync(PROMPT, max_tokens=3, top_p=1e-46, temperature=1.0, seed=1)
    assert tiny.token_ids == model.complete_sync(PROMPT, max_tokens=3).token_ids  # issue 12.8: greedy, not token 0


def test_usage_reports_cached_prompt_tokens(model):
    """`Completion.usage.cached_tokens` exists (the public contract); with no prefix cache it is 0."""
    usage = model.complete_sync(PROMPT, max_tokens=2).usage
    assert usage.cached_tokens == 0 and usage.prompt_tokens > 0
