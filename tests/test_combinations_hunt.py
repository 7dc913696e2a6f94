"""Features where they meet, combinations no other file draws: a draft model or prompt-lookup
drafting with `kv_bits` and a LoRA adapter; constraints with stop strings, penalties, logit
bias and (top) logprobs under drafting; seeded sampling across batch compositions under each
load option; `score` / `prompt_logprobs` on models loaded with a draft, `kv_bits` or an adapter;
`train_lora` on such a model. The contract each time: greedy output equals the same request on
the plain model wherever the option must not change tokens (drafting, the prefix cache,
batching: without `kv_bits`, whose near-ties drafting may break as README says), a constrained
reply matches its constraint, logprobs are finite, and every block goes back to the pool.
Hypothesis draws the combinations (derandomized, few examples: the whole file runs in about a
minute on two cores)."""

from __future__ import annotations

import functools
import json
import math
import re

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint

WORDS = "the cat sat on a mat and then it ran far away to see big red dogs playing in snow".split()
CHOICES = ["cat sat", "the dog ran far away", "mat"]
REGEX = "(the |cat |sat |on )+mat"
RECORDS = [{"prompt": "the cat sat", "completion": " on a mat"}] * 8


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("combos")
    paths = {
        "qwen3": make_checkpoint(root / "qwen3", "qwen3", seed=5, head_dim=32),
        "gemma3_text": make_checkpoint(root / "gemma3", "gemma3_text", seed=5, head_dim=32, sliding_window=16),
        "draft": make_checkpoint(root / "draft", "qwen3", seed=1, head_dim=32, num_hidden_layers=1),
    }

    async def train() -> None:
        async with await amlx.load(paths["qwen3"]) as m:
            async for _ in m.train_lora(RECORDS, iters=3, batch_size=2, learning_rate=0.05,
                                        adapter_path=str(root / "adapter"), save_every=3):
                pass

    anyio.run(train)
    paths["adapter"] = root / "adapter"
    return paths


def _load_options(ckpts, load: dict) -> tuple[str, dict, dict]:
    """(checkpoint, the plain model's options, the variant's options)."""
    arch = "qwen3" if load["draft"] == "model" or load["adapter"] else load["arch"]
    plain = {"kv_bits": load["kv_bits"], "prefix_cache": False}
    if load["adapter"]:
        plain["adapter"] = str(ckpts["adapter"])
    variant = dict(plain, prefix_cache=load["prefix_cache"], max_batch_size=load["max_batch_size"])
    if load["draft"]:
        # ("self": the target drafts for itself, every draft accepted: the longest verify
        # windows, longer than Gemma's sliding window)
        variant["draft"] = {"model": str(ckpts["draft"]), "self": str(ckpts[arch])}.get(load["draft"], "prompt_lookup")
        variant["num_draft_tokens"] = load["num_draft_tokens"]
    return str(ckpts[arch]), plain, variant


def _with_draft(ckpts, load: dict) -> dict:
    """A parametrized load's options, its draft "model" named by the draft checkpoint's path
    (a new dict: pytest's parameters are shared between runs)."""
    return {**load, "draft": str(ckpts["draft"])} if load.get("draft") == "model" else dict(load)


_LOAD = st.fixed_dictionaries({
    "arch": st.sampled_from(["qwen3", "gemma3_text"]),
    "kv_bits": st.sampled_from([None, 8, 4]),
    "adapter": st.booleans(),
    "prefix_cache": st.booleans(),
    "draft": st.sampled_from([None, "prompt_lookup", "model", "self"]),
    "num_draft_tokens": st.sampled_from([1, 4, 7, 16]),
    "max_batch_size": st.sampled_from([1, 3, 8]),
})

_REQUEST = st.fixed_dictionaries({
    "words": st.lists(st.sampled_from(WORDS), min_size=1, max_size=24),
    "repeat": st.integers(1, 3),  # repeats: prompt lookup drafts from them
    "max_tokens": st.integers(1, 20),
    "constraint": st.sampled_from([None, "choice", "regex", "json"]),
    "stop": st.one_of(st.none(), st.sampled_from(WORDS + ["at", "a"])),
    "penalty": st.sampled_from([None, "repetition", "presence", "frequency"]),
    "bias": st.booleans(),
    "top_logprobs": st.sampled_from([0, 0, 3]),
    "logprobs": st.booleans(),
    "max_buffer": st.sampled_from([16, 1]),
    "cancel_after": st.one_of(st.none(), st.none(), st.integers(1, 5)),
})


def _options(r: dict, *, sampled: dict | None = None) -> dict:
    o: dict = {"max_tokens": r["max_tokens"], "max_buffer": r["max_buffer"], "logprobs": r["logprobs"],
               "top_logprobs": r["top_logprobs"]}
    if r["constraint"] == "choice":
        o["choice"] = CHOICES
    elif r["constraint"] == "regex":
        o["regex"] = REGEX
    elif r["constraint"] == "json":
        o["response_format"] = {"type": "json_object"}
    if r["stop"]:
        o["stop"] = [r["stop"]]
    if r["penalty"] == "repetition":
        o["repetition_penalty"] = 1.4
    elif r["penalty"] == "presence":
        o["presence_penalty"] = 1.0
    elif r["penalty"] == "frequency":
        o["frequency_penalty"] = 0.7
    if r["bias"]:
        o["logit_bias"] = {7: -100.0, 11: 3.0}
    o.update(sampled or {})
    return o


def _prompt(r: dict) -> str:
    return " ".join(r["words"] * r["repeat"])


async def _run_all(path: str, load: dict, reqs: list[tuple[str, dict]], *, together: bool,
                   cancels: list | None = None) -> list:
    """Each request's (ids, finish_reason, text, logprobs, top_logprobs): all at once, or one
    after another (`cancels[i]`: request i's reader leaves after that many tokens); every
    block is back at the end."""
    out: list = [None] * len(reqs)
    async with await amlx.load(path, **load) as model:
        async def one(i: int) -> None:
            prompt, o = reqs[i]
            ids, lps, tops, finish, text = [], [], [], None, ""
            async with model.generate(prompt, **o) as stream:
                async for tok in stream:
                    ids.append(tok.id)
                    lps.append(tok.logprob)
                    tops.append(tok.top_logprobs)
                    finish = tok.finish_reason
                    text += tok.text
                    if o["max_buffer"] == 1:
                        await anyio.sleep(0.002)  # a slow reader: paused, rejoins
                    if cancels and cancels[i] is not None and len(ids) >= cancels[i]:
                        break
            out[i] = (ids, finish, text, lps, tops)

        if together:
            async with anyio.create_task_group() as tg:
                for i in range(len(reqs)):
                    tg.start_soon(one, i)
        else:
            for i in range(len(reqs)):
                await one(i)
        with anyio.fail_after(60):
            while model.stats()["active_requests"]:
                await anyio.sleep(0.01)
        assert model.stats()["kv_cache"]["blocks_used"] == 0
    return out


def _check_contract(o: dict, got: tuple) -> None:
    """What holds of any reply whatever the load options: the constraint, finite logprobs."""
    ids, finish, text, lps, tops = got
    assert finish in ("stop", "length")
    assert 1 <= len(ids) <= o["max_tokens"] or (finish == "stop" and len(ids) <= o["max_tokens"])
    wants_lp = o["logprobs"] or o["top_logprobs"]
    for lp, top in zip(lps, tops):
        if wants_lp:
            assert lp is not None and math.isfinite(lp) and lp <= 1e-4
        if o["top_logprobs"]:
            assert top is not None and len(top) == o["top_logprobs"]
            vals = [v for _, v in top]
            # (a token a constraint rules out has logprob -inf: README's constrained output)
            constrained = any(k in o for k in ("choice", "regex", "response_format"))
            assert all(math.isfinite(v) or (constrained and v == -math.inf) for v in vals), top
            assert vals == sorted(vals, reverse=True) and vals[0] <= 1e-4 and top[0][1] >= lp - 1e-4
    if finish == "stop" and not o.get("stop") and len(ids) < o["max_tokens"]:
        # ended by the constraint's end (or EOS, which a constraint only allows at its end)
        if "choice" in o:
            assert text in CHOICES
        elif "regex" in o:
            assert re.fullmatch(o["regex"], text), text
        elif "response_format" in o:
            json.loads(text)
    if "choice" in o:
        assert any(c.startswith(text) for c in CHOICES) or any(text.startswith(c) for c in CHOICES) \
            or o.get("stop"), text


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(load=_LOAD, requests=st.lists(_REQUEST, min_size=2, max_size=5))
def test_greedy_requests_of_every_kind_decode_as_on_the_plain_model(ckpts, load, requests):
    path, plain, variant = _load_options(ckpts, load)
    reqs = [(_prompt(r), _options(r)) for r in requests]
    want = anyio.run(functools.partial(_run_all, path, plain, reqs, together=False))
    cancels = [r["cancel_after"] for r in requests]
    got = anyio.run(functools.partial(_run_all, path, variant, reqs, together=True, cancels=cancels))
    for (_, o), w, g, cut in zip(reqs, want, got, cancels):
        if cut is not None and len(g[0]) >= cut and g[1] is None:  # left early: a prefix
            n = len(g[0])
            assert g[0] == w[0][:n] or (load["kv_bits"] and load["draft"]), o
            continue
        _check_contract(o, g)
        if load["kv_bits"] and load["draft"]:
            continue  # (a near-tie may go the other way: README's speculative paragraph)
        assert g[:3] == w[:3], o
        for a, b in zip(g[3], w[3]):
            assert (a is None) == (b is None) and (a is None or abs(a - b) < 1e-3)
        for a, b in zip(g[4], w[4]):  # top_logprobs: the same ids (up to near-ties), values
            assert (a is None) == (b is None)
            if a is not None:
                assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=1e-3)
                assert {i for i, v in a if v > a[-1][1] + 1e-3} <= {i for i, _ in b}


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(load=_LOAD, requests=st.lists(_REQUEST, min_size=2, max_size=4),
       temperature=st.sampled_from([0.6, 1.0, 1.5]), top_k=st.sampled_from([0, 5]),
       min_p=st.sampled_from([0.0, 0.1]))
def test_seeded_sampling_is_the_same_alone_and_batched_under_each_load_option(ckpts, load, requests, temperature,
                                                                              top_k, min_p):
    """A seeded request's tokens depend on its seed, not on what it is batched with, also with
    drafting (whose drafts are verified per request), kv_bits, an adapter, the prefix cache."""
    path, _, variant = _load_options(ckpts, load)
    reqs = [(_prompt(r), _options(r, sampled={"temperature": temperature, "top_k": top_k, "min_p": min_p,
                                              "seed": i})) for i, r in enumerate(requests)]
    alone = anyio.run(functools.partial(_run_all, path, variant, reqs, together=False))
    batched = anyio.run(functools.partial(_run_all, path, variant, reqs, together=True))
    for (_, o), a, b in zip(reqs, alone, batched):
        _check_contract(o, b)
        assert a[:3] == b[:3], o


@pytest.mark.parametrize("load", [
    {"draft": "prompt_lookup"}, {"draft": "model"}, {"kv_bits": 4, "draft": "model"},
    {"kv_bits": 8, "adapter": True, "draft": "prompt_lookup"}, {"max_batch_size": 1, "adapter": True},
])
def test_score_and_prompt_logprobs_ignore_drafting_and_the_kv_cache(ckpts, load):
    """score and prompt_logprobs run the model on the prompt without the KV pool: a draft or
    kv_bits change nothing there; the adapter applies as it does to generation."""
    path = str(ckpts["qwen3"])
    adapter = {"adapter": str(ckpts["adapter"])} if load.pop("adapter", False) else {}
    load = _with_draft(ckpts, load)
    prompt = "the cat sat on a mat and the cat sat on a mat then"
    conts = [" on a mat", [5, 6, 7], ""]

    async def measure(opts: dict):
        async with await amlx.load(path, **opts) as m:
            gen = (await m.complete(prompt, max_tokens=6)).token_ids
            return (await m.score(prompt, conts), await m.prompt_logprobs(prompt, top_logprobs=2), gen)

    want_s, want_p, _ = anyio.run(measure, adapter)
    got_s, got_p, _ = anyio.run(measure, dict(load, **adapter))
    assert got_s[2] == 0.0 and all(math.isfinite(s) for s in got_s)
    assert got_s == pytest.approx(want_s, abs=1e-4)
    assert [t.id for t in got_p] == [t.id for t in want_p]
    for a, b in zip(got_p[1:], want_p[1:]):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [i for i, _ in a.top_logprobs] == [i for i, _ in b.top_logprobs]


@pytest.mark.parametrize("load", [{"kv_bits": 8, "draft": "prompt_lookup"}, {"draft": "model"}])
def test_train_lora_on_a_drafting_quantized_kv_model_decodes_as_a_load_of_its_adapter(ckpts, tmp_path, load):
    """Training swaps the weights under a model with a prefix cache, a draft and kv_bits: what
    it decodes next (twice: the second from the prefix cache) is what a fresh load of the saved
    adapter decodes, and its scores are that model's."""
    path = str(ckpts["qwen3"])
    load = _with_draft(ckpts, load)
    prompt = "the cat sat on a mat and the cat sat on a mat then the cat"

    async def main():
        async with await amlx.load(path, **load) as m:
            await m.complete(prompt, max_tokens=8)  # fills the prefix cache with the old weights
            async for _ in m.train_lora(RECORDS, iters=2, batch_size=2, learning_rate=0.05,
                                        adapter_path=str(tmp_path / "a"), save_every=2):
                pass
            after = [(await m.complete(prompt, max_tokens=8)).token_ids for _ in range(2)]
            s = await m.score(prompt, [" on a mat"])
        async with await amlx.load(path, adapter=str(tmp_path / "a"), **load) as m:
            fresh = (await m.complete(prompt, max_tokens=8)).token_ids
            s2 = await m.score(prompt, [" on a mat"])
        assert after == [fresh, fresh]
        assert s == pytest.approx(s2, abs=1e-4)

    anyio.run(main)


@pytest.mark.parametrize("load", [{}, {"draft": "model"}, {"kv_bits": 8}, {"draft": "prompt_lookup"}])
def test_prompt_logprobs_of_a_prompt_that_fills_the_context(ckpts, load):
    """prompt_logprobs generates nothing, so a prompt of exactly max_context tokens fits, as
    score of a prompt and continuation of max_context tokens does; it was refused "including at
    least one generated token". One token more is refused, naming both counts."""
    load = _with_draft(ckpts, load)
    ids = list(range(5, 45))

    async def main():
        async with await amlx.load(str(ckpts["qwen3"]), max_context=40, **load) as m:
            full = await m.prompt_logprobs(ids)
            assert [t.id for t in full] == ids
            assert all(math.isfinite(t.logprob) for t in full[1:])
            short = await m.prompt_logprobs(ids[:39])
            assert [t.logprob for t in full[1:39]] == pytest.approx([t.logprob for t in short[1:]], abs=1e-4)
            [s] = await m.score(ids[:39], [ids[39:]])
            assert full[-1].logprob == pytest.approx(s, abs=1e-4)
            with pytest.raises(amlx.ContextLengthError, match="^the prompt has 41 tokens but the context holds 40$"):
                await m.prompt_logprobs(ids + [5])
            with pytest.raises(ValueError, match="outside the vocabulary"):
                await m.prompt_logprobs(ids[:39] + [10**6])
            with pytest.raises(ValueError):
                await m.prompt_logprobs([])

    anyio.run(main)


@pytest.mark.parametrize("load", [
    {"draft": "model", "kv_cache_memory": 150 << 10},
    {"draft": "prompt_lookup", "adapter": True, "kv_cache_memory": 150 << 10, "num_draft_tokens": 6},
    {"draft": "model", "max_batch_size": 2, "kv_cache_memory": 150 << 10, "kv_bits": None},
])
def test_preempted_drafting_rows_with_constraints_and_seeds_continue_exactly(ckpts, load):
    """A pool too small for every row preempts some (slow readers pause, others take their
    blocks): each stream, sampled with a seed or greedy, constrained or not, with penalties,
    is what it is alone on the same model."""
    load = dict(load)
    if load.pop("adapter", False):
        load["adapter"] = str(ckpts["adapter"])
    load = _with_draft(ckpts, load)
    rng = __import__("random").Random(7)
    reqs = []
    for i in range(8):
        o = {"max_tokens": rng.randint(10, 30), "temperature": rng.choice([0.0, 0.9]), "seed": i,
             "max_buffer": rng.choice([1, 16]), "logprobs": True, "top_logprobs": 0}
        if i % 3 == 0:
            o["regex"] = "[a-z ]{5,60}"
        if i % 2:
            o["frequency_penalty"] = 0.5
        reqs.append((" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30))) * 2, o))
    path = str(ckpts["qwen3"])
    alone = anyio.run(functools.partial(_run_all, path, load, reqs, together=False))
    batched = anyio.run(functools.partial(_run_all, path, load, reqs, together=True))
    for (_, o), a, b in zip(reqs, alone, batched):
        _check_contract(o, b)
        assert a[:3] == b[:3], o
        if "regex" in o and b[1] == "stop":
            assert re.fullmatch("[a-z ]{5,60}", b[2])


@pytest.mark.parametrize("load", [{"kv_bits": 8, "draft": "prompt_lookup"}, {"draft": "model"}])
def test_full_training_on_a_drafting_model_decodes_as_a_load_of_its_checkpoint(ckpts, tmp_path, load):
    """`train` changes every weight under a prefix cache filled before it, a draft and kv_bits:
    the model then decodes and scores as a fresh load of the checkpoint it saved."""
    path = str(ckpts["qwen3"])
    load = _with_draft(ckpts, load)
    prompt = "the cat sat on a mat and the cat sat on a mat then the cat sat on a mat then"

    async def main():
        async with await amlx.load(path, **load) as m:
            await m.complete(prompt, max_tokens=8)
            async for _ in m.train(RECORDS, iters=2, batch_size=2, learning_rate=0.01,
                                   save_path=str(tmp_path / "full"), save_every=2):
                pass
            after = [(await m.complete(prompt, max_tokens=8)).token_ids for _ in range(2)]
            s = await m.score(prompt, [" on a mat"])
        async with await amlx.load(tmp_path / "full", **load) as m:
            fresh = (await m.complete(prompt, max_tokens=8)).token_ids
            s2 = await m.score(prompt, [" on a mat"])
        assert after == [fresh, fresh]
        assert s == pytest.approx(s2, abs=1e-4)

    anyio.run(main)
