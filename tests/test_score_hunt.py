"""`Model.score` hunted against transformers (PyTorch CPU, float32, 1e-4 relative) on tiny random
Qwen3, Gemma 3 (sliding windows of 8 positions, shorter than the prompts here) and Llama
checkpoints: long continuations run in bounded steps, the prompt/continuation boundary of
string continuations, hundreds of continuations with duplicates, the context limit, a LoRA
adapter, kv_bits, scoring beside generation and with the prompt in the prefix cache, a call
cancelled or whose weights change in the middle of a continuation, and bad input.

Nothing here is timed; steps are counted and shapes recorded."""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import warnings

import anyio
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx
import amlx.engine.engine as engine_module
from amlx._mlx import array, ops
from amlx.engine.score import Scorer, score_continuations
from amlx.errors import ContextLengthError
from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_logits

ARCHS = ("qwen3", "gemma3_text", "llama")
GUARD = 120  # seconds: only a guard against a hang, never a timing


@pytest.fixture(scope="module")
def root():
    d = tempfile.mkdtemp(prefix="amlx-score-hunt-")
    yield d
    shutil.rmtree(d, True)


@pytest.fixture(scope="module")
def ckpts(root):
    """arch -> (checkpoint path, transformers model)."""
    out = {}
    for arch in ARCHS:
        path = make_checkpoint(f"{root}/{arch}", arch, seed=11)
        out[arch] = (path, load_reference(path))
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _reference(ref, prompt: list[int], cont: list[int]) -> float:
    """Sum of transformers' log-probabilities of `cont`'s tokens after `prompt` (float64)."""
    if not cont:
        return 0.0
    lsm = _log_softmax(reference_logits(ref, prompt + cont))
    return float(sum(lsm[len(prompt) - 1 + j, t] for j, t in enumerate(cont)))


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= 1e-4 * max(abs(want), 1e-2)


class _Shapes:
    """A model that records the shape of the ids of each forward pass."""

    def __init__(self, lm):
        self.lm, self.seen = lm, []

    def make_cache(self):
        return self.lm.make_cache()

    def __call__(self, ids, cache, offset, **kw):
        self.seen.append(tuple(ids.shape))
        return self.lm(ids, cache, offset, **kw)


# -- long continuations ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_a_long_continuation_runs_in_steps_of_a_chunk_within_the_logits_budget(ckpts, arch):
    """A batch of continuations ran all its positions in one forward pass, whatever the chunk
    and the logits budget said: one 8,000-token continuation took 4.8 GB of float32 logits at
    Qwen3's vocabulary in one step (and held up the streams beside it for all of it). Each step
    now runs at most a chunk of positions and at most `budget` logits; the scores do not change."""
    path, ref = ckpts[arch]
    with amlx.load_sync(path) as model:
        engine = model.engine
        vocab = engine.vocab_size
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, vocab, 12).tolist()
        conts = [rng.integers(0, vocab, 90).tolist(), rng.integers(0, vocab, 40).tolist(),
                 rng.integers(0, vocab, 3).tolist(), [5]]

        def run(chunk, budget):
            shapes = _Shapes(engine.model)

            def job():
                scorer = Scorer(shapes, prompt, conts, chunk=chunk, budget=budget)
                try:
                    while not scorer.step():
                        pass
                    return scorer.scores
                finally:
                    scorer.close()

            return engine.run_sync(job), shapes.seen

        whole, _ = run(512, 1 << 30)
        for chunk, budget in ((16, 1 << 30), (64, 10 * vocab), (7, 3 * vocab)):
            scores, seen = run(chunk, budget)
            prefill = -(-12 // chunk)  # the 12-token prompt's chunks
            assert [cols for _, cols in seen[:prefill]] == [min(chunk, 12 - k) for k in range(0, 12, chunk)]
            continuation_steps = seen[prefill:]
            assert all(cols <= chunk for _, cols in continuation_steps), (chunk, seen)
            assert all(rows * cols * vocab <= budget or rows * cols == 1 for rows, cols in continuation_steps), seen
            # each continuation's positions after its first token, all run
            assert sum(rows * cols for rows, cols in continuation_steps) >= 89 + 39 + 2
            assert np.allclose(scores, whole, rtol=1e-5, atol=1e-5)
        for cont, got in zip(conts, whole):
            assert _close(got, _reference(ref, prompt, cont))


@pytest.mark.parametrize("arch", ARCHS)
def test_score_fuzz_long_continuations_small_chunks(ckpts, arch):
    """Drawn prompts and continuations (duplicates among them) through small chunks and logits
    budgets: batches whose positions run in several steps, Gemma's window crossed inside them."""
    path, ref = ckpts[arch]
    with amlx.load_sync(path) as model:
        engine = model.engine
        vocab = engine.vocab_size
        tok = st.integers(0, vocab - 1)

        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(prompt=st.lists(tok, min_size=1, max_size=24), conts=st.lists(st.lists(tok, max_size=40), max_size=5),
               dup=st.booleans(), chunk=st.integers(1, 12), rows=st.integers(1, 40))
        def check(prompt, conts, dup, chunk, rows):
            if dup and conts:
                conts = conts + [list(conts[0])]
            got = engine.run_sync(
                lambda: score_continuations(engine.model, prompt, conts, chunk=chunk, budget=rows * vocab))
            for cont, value in zip(conts, got):
                assert _close(value, _reference(ref, prompt, cont)), (prompt, cont, chunk, rows)
            if dup and conts:
                assert abs(got[-1] - got[0]) <= 1e-5 * max(abs(got[0]), 1.0)

        check()


def test_continuations_up_to_the_context_limit_and_past_it(ckpts):
    path, ref = ckpts["gemma3_text"]

    async def body():
        async with await amlx.load(path, max_context=48) as model:
            model.engine.scheduler.prefill_chunk = 8
            vocab = model.engine.vocab_size
            rng = np.random.default_rng(4)
            for n in (1, 20, 47):
                prompt = rng.integers(0, vocab, n).tolist()
                cont = rng.integers(0, vocab, 48 - n).tolist()  # prompt and continuation fill the context
                (got,) = await model.score(prompt, [cont])
                assert _close(got, _reference(ref, prompt, cont)), n
                with pytest.raises(ContextLengthError, match="context holds 48"):
                    await model.score(prompt, [[3], cont + [3]])
            assert model.stats()["kv_cache"]["blocks_used"] == 0

    anyio.run(body)


# -- many continuations ------------------------------------------------------------------------

def test_hundreds_of_continuations_with_duplicates(ckpts):
    path, ref = ckpts["qwen3"]

    async def body():
        async with await amlx.load(path) as model:
            vocab = model.engine.vocab_size
            rng = np.random.default_rng(7)
            prompt = rng.integers(0, vocab, 30).tolist()
            distinct = [rng.integers(0, vocab, int(rng.integers(0, 7))).tolist() for _ in range(150)]
            conts = distinct + distinct[::-1]  # every one twice, in other batches' places
            scores = await model.score(prompt, conts)
            assert len(scores) == 300
            for i, cont in enumerate(distinct):
                again = scores[299 - i]
                assert abs(scores[i] - again) <= 1e-5 * max(abs(again), 1.0), i
                if not cont:
                    assert scores[i] == 0.0 == again
            for i in range(0, 150, 10):
                assert _close(scores[i], _reference(ref, prompt, distinct[i])), i
            alone = [await model.score(prompt, [distinct[i]]) for i in range(0, 150, 37)]
            assert np.allclose([a[0] for a in alone], scores[0:150:37], rtol=1e-5, atol=1e-5)

    anyio.run(body)


# -- text: prompts, string continuations, the boundary ---------------------------------------

@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_string_continuations_are_tokenized_apart_from_the_prompt(ckpts, arch):
    """The README's rule: a string continuation is tokenized as text that goes on after the
    prompt and appended to the prompt's tokens (never re-tokenized together with it). Checked
    against transformers' tokenizer, on texts where tokenizing together differs."""
    from transformers import AutoTokenizer

    path, ref = ckpts[arch]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoTokenizer.from_pretrained(path)

    async def body():
        async with await amlx.load(path) as model:
            cases = [("Hello", " world"), ("Hello ", "world"), ("Hello", "world"), ("Q: a?\nA:", " é"),
                     ("naïve caf", "é 😀"), ("x", "\n\nfoo"), ("Answer:", "日本"), ("", " x")]
            joint_differs = 0
            for prompt, cont in cases:
                p_ids = hf.encode(prompt)  # with the BOS where the checkpoint has one (Gemma)
                if not p_ids:
                    with pytest.raises(ValueError, match="empty"):  # no BOS, no prompt (Qwen)
                        await model.score(prompt, [cont])
                    continue
                c_ids = hf.encode(cont, add_special_tokens=False)  # (neither pipeline adds a "▁")
                joint = hf.encode(prompt + cont)
                joint_differs += joint != p_ids + c_ids
                (got,) = await model.score(prompt, [cont])
                assert _close(got, _reference(ref, p_ids, c_ids)), (prompt, cont)
                (by_ids,) = await model.score(p_ids, [c_ids])
                assert abs(got - by_ids) <= 1e-6 * abs(by_ids)
            assert joint_differs >= 2  # the cases do tell the two rules apart

    anyio.run(body)


# (amlx/tokenizer.py Tokenizer.continuation_ids: on a Llama-2-style tokenizer whose vocabulary
# merges the "\n" lead with the text's first characters ("\nw", "\n\n"), the lead check failed and
# the fallback encode(text) added the tokenizer's "▁": "world" was scored as "▁wor", ...)
def test_a_string_continuation_without_a_leading_space_gets_no_space_on_llama2(root):
    from transformers import AutoTokenizer

    from tests.test_text_streams_fuzz import _write_llama_style

    path = make_checkpoint(f"{root}/llama2", "llama", seed=3, tokenizer="spm")
    _write_llama_style(path, "llama2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoTokenizer.from_pretrained(path)
    with amlx.load_sync(path) as model:
        lead = hf.encode("Answer:", add_special_tokens=False)
        for text in ("world", "\n\nfoo"):
            ids = model.tokenizer.continuation_ids(text)
            assert hf.decode(lead + ids) == "Answer:" + text, (text, ids)


def test_an_empty_prompt_is_the_bos_alone_where_there_is_one(ckpts):
    path, ref = ckpts["gemma3_text"]

    async def body():
        async with await amlx.load(path) as model:
            bos = model.tokenizer.encode("")
            assert len(bos) == 1
            conts = [[7, 8, 9], [], [4]]
            got = await model.score("", conts)
            assert got[1] == 0.0
            for cont, value in zip(conts, got):
                assert _close(value, _reference(ref, bos, cont))
            assert await model.score("", [[], []]) == [0.0, 0.0]

    anyio.run(body)


# -- LoRA, kv_bits ---------------------------------------------------------------------------

def test_score_with_a_lora_adapter_is_the_merged_models(ckpts, root):
    from safetensors.numpy import load_file

    from amlx.train import lora

    path, _ = ckpts["llama"]
    adapter = f"{root}/adapter"
    with amlx.load_sync(path) as base:
        lm = base.engine.model

        def make():
            lora.apply_lora(lm, rank=4, targets=["q_proj", "v_proj", "down_proj"], seed=1)
            rng = np.random.default_rng(1)
            for m in lora.lora_modules(lm).values():  # (B starts at zero: the adapter would do nothing)
                m.lora_b = array((rng.standard_normal(m.lora_b.shape) * 0.3).astype(np.float32))
            lora.save_adapter(lm, adapter)

        base.engine.run_sync(make)
    merged = load_reference(path)
    modules = json.loads(open(f"{adapter}/adapter_config.json").read())["modules"]
    tensors = load_file(f"{adapter}/adapters.safetensors")
    weights = merged.state_dict()
    with torch.no_grad():
        for name, entry in modules.items():
            delta = entry["scale"] * (tensors[f"{name}.lora_b"] @ tensors[f"{name}.lora_a"])
            weights[f"{name}.weight"].add_(torch.from_numpy(delta.astype(np.float32)))

    async def body():
        async with await amlx.load(path, adapter=adapter) as model:
            vocab = model.engine.vocab_size
            rng = np.random.default_rng(2)
            prompt = rng.integers(0, vocab, 20).tolist()
            conts = [rng.integers(0, vocab, int(rng.integers(1, 9))).tolist() for _ in range(6)]
            for cont, got in zip(conts, await model.score(prompt, conts)):
                assert _close(got, _reference(merged, prompt, cont))

    anyio.run(body)


def test_score_with_kv_bits_is_the_models_own_distribution(root):
    """score keeps the prompt's keys and values in a cache of its own, unquantized: with kv_bits
    it gives transformers' numbers (the pool that kv_bits quantizes is the generating requests')."""
    path = make_checkpoint(f"{root}/gemma32", "gemma3_text", seed=2, head_dim=32)  # (kv_bits: 32 | head_dim)
    ref = load_reference(path)

    async def body():
        for bits in (8, 4):
            async with await amlx.load(path, kv_bits=bits) as model:
                vocab = model.engine.vocab_size
                rng = np.random.default_rng(bits)
                prompt = rng.integers(0, vocab, 30).tolist()  # (past the window of 8)
                conts = [rng.integers(0, vocab, n).tolist() for n in (1, 5, 17)]
                for cont, got in zip(conts, await model.score(prompt, conts)):
                    assert _close(got, _reference(ref, prompt, cont)), bits

    anyio.run(body)


# -- beside generation, the prefix cache -------------------------------------------------------

@pytest.mark.parametrize("arch", ["qwen3", "gemma3_text"])
def test_score_beside_generation_and_after_the_prefix_cache_holds_the_prompt(ckpts, arch):
    path, ref = ckpts[arch]

    async def body():
        async with await amlx.load(path) as model:
            model.engine.scheduler.prefill_chunk = 8  # (steps of the score calls between decode rounds)
            vocab = model.engine.vocab_size
            rng = np.random.default_rng(3)
            prompt = rng.integers(0, vocab, 40).tolist()
            conts = [rng.integers(0, vocab, int(rng.integers(1, 20))).tolist() for _ in range(12)]
            alone = await model.score(prompt, conts)
            want = await model.complete(prompt, max_tokens=24, logprobs=True)  # the prompt now cached
            assert await model.score(prompt, conts) == alone
            results: dict = {}
            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    async def generate(i):
                        results[i] = await model.complete(prompt, max_tokens=24, logprobs=True)

                    async def score(i):
                        results[("score", i)] = await model.score(prompt, conts)

                    for i in range(3):
                        tg.start_soon(generate, i)
                        tg.start_soon(score, i)
            for i in range(3):
                assert results[("score", i)] == alone
                assert results[i].token_ids == want.token_ids
                assert np.allclose(results[i].logprobs, want.logprobs, atol=1e-4)
            for cont, got in zip(conts, alone):
                assert _close(got, _reference(ref, prompt, cont))
            # the same numbers as the generated tokens' logprobs
            (scored,) = await model.score(prompt, [want.token_ids])
            assert abs(scored - sum(want.logprobs)) <= 1e-4 * abs(scored)
            assert model.stats()["kv_cache"]["blocks_used"] == 0

    anyio.run(body)


# -- cancelled, weights changed, in the middle of a continuation ------------------------------

class _Recorded(Scorer):
    """A Scorer whose `hook(self)` runs on the worker before each step."""

    hook = None
    made: list = []

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        _Recorded.made.append(self)

    def step(self) -> bool:
        if _Recorded.hook is not None:
            _Recorded.hook(self)
        return super().step()


@pytest.fixture
def recorded(monkeypatch):
    monkeypatch.setattr(engine_module, "Scorer", _Recorded)
    _Recorded.made, _Recorded.hook = [], None
    yield _Recorded
    _Recorded.hook = None


def test_a_score_call_cancelled_in_a_long_continuation_frees_its_rows(ckpts, recorded):
    path, _ = ckpts["qwen3"]

    async def body():
        async with await amlx.load(path) as model:
            engine = model.engine
            engine.scheduler.prefill_chunk = 4
            vocab = engine.vocab_size
            rng = np.random.default_rng(5)
            prompt, cont = rng.integers(0, vocab, 8).tolist(), rng.integers(0, vocab, 400).tolist()
            await model.score(prompt, [cont[:9], cont[:9]])  # warm: MLX's first-use memory
            await engine.run(gc.collect)
            before, kv = amlx.memory()["active"], model.stats()["kv_cache"]
            with anyio.fail_after(GUARD):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(model.score, prompt, [cont, cont[:200]])
                    while not recorded.made or recorded.made[-1].steps < 6:  # 2 prefill steps, then rows
                        await anyio.sleep(0.001)
                    tg.cancel_scope.cancel()
            scorer = recorded.made[-1]
            at_cancel = scorer.steps
            for _ in range(3):  # jobs run in order: the close, and any step, ran before these
                await engine.run(lambda: None)
            assert scorer.steps <= at_cancel + 1 and not scorer.done
            assert scorer._batch is None and scorer._cache is None
            await engine.run(gc.collect)
            assert amlx.memory()["active"] <= before
            assert model.stats()["kv_cache"] == kv
            assert (await model.complete(prompt, max_tokens=3)).usage.completion_tokens == 3

    anyio.run(body)


def test_weights_changed_in_the_middle_of_a_continuation_start_the_call_again(ckpts, recorded):
    path, _ = ckpts["gemma3_text"]

    async def body():
        async with await amlx.load(path) as model:
            engine = model.engine
            engine.scheduler.prefill_chunk = 4
            vocab = engine.vocab_size
            rng = np.random.default_rng(6)
            prompt = rng.integers(0, vocab, 10).tolist()
            conts = [rng.integers(0, vocab, 30).tolist(), [3], rng.integers(0, vocab, 5).tolist()]
            before = await model.score(prompt, conts)
            lm = engine.model
            name = "model.embed_tokens.weight"

            def change(scorer) -> None:
                # steps: 3 prefill, the one-token batch, then the 5- and 30-token batch, 4 positions a
                # step: step 7 is the middle of it
                if scorer.steps == 7 and scorer.restarts == 0:
                    assert scorer._batch is not None and 0 < scorer._batch.at < scorer._batch.longest
                    w = dict(lm.named_parameters())[name]
                    lm.update({name: ops.multiply(w, 1.25).astype(w.dtype)})
                    engine.weights_changed()  # (on the worker: at once)

            recorded.hook = change
            during = await model.score(prompt, conts)
            changed = recorded.made[-1]
            recorded.hook = None
            after = await model.score(prompt, conts)
            assert changed.restarts == 1 and changed.done
            assert during == after and during != before

    anyio.run(body)


# -- bad input ---------------------------------------------------------------------------------

def test_bad_input_is_refused_clearly(ckpts):
    path, _ = ckpts["qwen3"]

    async def body():
        async with await amlx.load(path, max_context=32) as model:
            vocab = model.engine.vocab_size
            for bad in ([[True]], [b"ab"], [None], [np.array([1, 2])], [[1, "2"]], [[1.0]], ["a", 5], [range(2)]):
                with pytest.raises(TypeError, match="each continuation must be"):
                    await model.score("hi", bad)
            for bad in ("abc", b"abc", {"a": 1}, None, 5):
                with pytest.raises(TypeError, match="continuations must be a list"):
                    await model.score("hi", bad)
            for prompt in (None, 3, [1.5], [[1, 2]], [True]):
                with pytest.raises(TypeError, match="prompt must be"):
                    await model.score(prompt, ["a"])
            for ids in ([-1], [vocab]):
                with pytest.raises(ValueError, match="outside the vocabulary"):
                    await model.score("hi", [[1], ids])
                with pytest.raises(ValueError, match="outside the vocabulary"):
                    await model.score(ids, [[1]])
            with pytest.raises(ValueError, match="empty"):
                await model.score([], [[1]])
            with pytest.raises(ContextLengthError):
                await model.score([1] * 32, [[]])
            # what is accepted: tuples, numpy integers, an iterator of continuations
            assert await model.score([1, 2], [(3, np.int64(4))]) == await model.score([1, 2], [[3, 4]])
            assert await model.score("hi", iter(["a", "b"])) == await model.score("hi", ["a", "b"])
            assert await model.score("hi", []) == []

    anyio.run(body)
