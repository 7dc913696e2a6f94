"""`Model.prompt_logprobs` against transformers (float32 CPU), and the server's `echo` on
/v1/completions through the official openai client (what lm-evaluation-harness's
loglikelihood requests send: token ids, echo, logprobs, one generated token).
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
from pathlib import Path

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx
from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_logits
from tests.helpers.serving import ServerProcess, serve_checkpoint


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="amlx-prompt-lp-"))
    import atexit

    atexit.register(shutil.rmtree, root, True)
    return make_checkpoint(root / arch, arch, seed=4)


def _reference(ref, ids: list[int]) -> np.ndarray:
    """log_softmax of transformers' logits (float64), (len(ids), V)."""
    logits = reference_logits(ref, ids).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])  # Gemma: a sliding window of 8 positions crossed
def test_prompt_logprobs_match_transformers(arch):
    path = checkpoint(arch)
    ref = load_reference(path)
    model = amlx.load_sync(path)
    try:
        vocab = model.engine.vocab_size

        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(ids=st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40), chunk=st.integers(1, 16),
               top=st.integers(0, 5))
        def check(ids, chunk, top):
            model.engine.scheduler.prefill_chunk = chunk  # (steps of `chunk` positions)
            toks = anyio.run(functools.partial(model.prompt_logprobs, ids, top_logprobs=top))
            assert [t.id for t in toks] == ids
            assert "".join(t.text for t in toks) == model.tokenizer.decode(ids)
            assert toks[0].logprob is None and toks[0].top_logprobs is None
            assert all(t.finish_reason is None for t in toks)
            lsm = _reference(ref, ids)
            for i, tok in enumerate(toks[1:]):
                want = lsm[i, ids[i + 1]]
                assert abs(tok.logprob - want) <= 1e-4 * max(1.0, abs(want)), (i, tok.logprob, want)
                if top:
                    got = [lp for _, lp in tok.top_logprobs]
                    assert len(got) == top and got == sorted(got, reverse=True)
                    best = np.sort(lsm[i])[::-1][:top]
                    assert np.allclose(got, best, atol=1e-4)
                    for t_id, lp in tok.top_logprobs:  # each pair names its own token's logprob
                        assert abs(lsm[i, t_id] - lp) <= 1e-4 * max(1.0, abs(lp))
                else:
                    assert tok.top_logprobs is None

        check()
    finally:
        model.close()


def test_prompt_logprobs_refuses_bad_input():
    async def body():
        model = await amlx.load(checkpoint("qwen3"), max_context=64)
        for bad in (-1, 21, True, 2.0, "3"):
            with pytest.raises(ValueError, match="top_logprobs"):
                await model.prompt_logprobs([1, 2, 3], top_logprobs=bad)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await model.prompt_logprobs([1, model.engine.vocab_size])
        with pytest.raises(amlx.ContextLengthError):
            await model.prompt_logprobs(list(range(3, 80)))
        one = await model.prompt_logprobs([7], top_logprobs=2)
        assert len(one) == 1 and one[0].logprob is None
        await model.aclose()
        with pytest.raises(amlx.ClosedError):
            await model.prompt_logprobs([1, 2, 3])

    anyio.run(body)


# -- the server's echo ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    ckpt = serve_checkpoint(tmp_path_factory.mktemp("echo-ckpt"))
    with ServerProcess(ckpt, "--model-name", "tiny", "--max-context", "512") as srv, \
            amlx.load_sync(ckpt, max_context=512) as model:
        yield srv, model


def _check_offsets(text: str, logprobs) -> None:
    offsets = logprobs.text_offset
    assert offsets[0] == 0 and offsets == sorted(offsets)
    joined = "".join(logprobs.tokens)
    assert [len(joined[:k]) for k in np.cumsum([0] + [len(t) for t in logprobs.tokens[:-1]])] == offsets
    assert text.startswith(joined[:len(text)]) or joined.startswith(text)


async def test_echo_with_logprobs_gives_the_prompts_logprobs_then_the_reply(served):
    """lm-evaluation-harness's loglikelihood request: token ids, echo, logprobs=1, max_tokens=1.
    The prompt's tokens come first with their log-probabilities (the first null), equal to
    `Model.prompt_logprobs`; the generated token follows, as without echo."""
    srv, model = served
    client = srv.client()
    ids = model.tokenizer.encode("The quick brown fox jumps over the lazy dog")
    r = await client.completions.create(model="tiny", prompt=ids, echo=True, logprobs=1, max_tokens=1,
                                        temperature=0)
    plain = await client.completions.create(model="tiny", prompt=ids, logprobs=1, max_tokens=1, temperature=0)
    want = await model.prompt_logprobs(ids, top_logprobs=1)
    choice, lp = r.choices[0], r.choices[0].logprobs
    assert choice.text == model.tokenizer.decode(ids) + plain.choices[0].text
    assert len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for k, tok in enumerate(want[1:], start=1):
        assert math.isclose(lp.token_logprobs[k], tok.logprob, rel_tol=1e-5, abs_tol=1e-5)
        assert lp.tokens[k] == model.tokenizer.decode([ids[k]])
        top = lp.top_logprobs[k]
        assert lp.tokens[k] in top and len(top) <= 2
    # (the second request's prompt is served from the prefix cache: float noise apart)
    assert math.isclose(lp.token_logprobs[-1], plain.choices[0].logprobs.token_logprobs[0], abs_tol=1e-4)
    _check_offsets(choice.text, lp)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 1
    # the sum lm-evaluation-harness takes for a continuation: its tokens' logprobs
    cont = model.tokenizer.encode(" over the lazy dog", add_special_tokens=False)
    start = len(ids) - len(cont)
    scored = (await model.score(ids[:start], [ids[start:]]))[0]
    assert math.isclose(sum(lp.token_logprobs[start:len(ids)]), scored, rel_tol=1e-4, abs_tol=1e-4)


async def test_echo_of_a_text_prompt_streamed_and_whole(served):
    srv, model = served
    client = srv.client()
    prompt = "Once upon a time"
    whole = await client.completions.create(model="tiny", prompt=prompt, echo=True, max_tokens=6, temperature=0)
    ref = await model.complete(prompt, max_tokens=6)
    assert whole.choices[0].text == prompt + ref.text and whole.choices[0].logprobs is None
    stream = await client.completions.create(model="tiny", prompt=prompt, echo=True, max_tokens=6, temperature=0,
                                             stream=True)
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].text == prompt
    assert "".join(c.choices[0].text for c in chunks) == prompt + ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["length"]


async def test_echo_with_n_and_several_prompts(served):
    srv, model = served
    client = srv.client()
    prompts = ["Red", "Blue sky"]
    r = await client.completions.create(model="tiny", prompt=prompts, echo=True, n=2, max_tokens=3,
                                        temperature=0.9, seed=1, logprobs=0)
    assert len(r.choices) == 4
    for c in r.choices:
        prompt = prompts[c.index // 2]
        assert c.text.startswith(prompt)
        ids = model.tokenizer.encode(prompt)
        assert len(c.logprobs.tokens) == len(ids) + 3
        assert c.logprobs.token_logprobs[0] is None
        assert all(len(t) == 1 for t in c.logprobs.top_logprobs[1:])  # logprobs 0: the token itself
        _check_offsets(c.text, c.logprobs)
