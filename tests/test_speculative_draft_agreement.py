"""A draft model's acceptance in the engine is what its greedy agreement with the target says.

A draft made from the target itself by `amlx.convert` (a float copy, an 8-bit and a
4-bit quantized copy) is scored two ways: directly, teacher-forced (the draft's
argmax after each prefix of the target's own greedy output, one forward without a
cache, against the target's next token), and by the engine
(`amlx.load(target, draft=copy)`, greedy, `stats()["speculative"]`). With the draft
length held at `num_draft_tokens` (AMLX_ADAPTIVE_DRAFT=0), a
round at the target's position n drafts k tokens and the target accepts them up to
the first whose teacher-forced argmax disagrees: greedy drafting along accepted
drafts is the draft run on the target's own tokens. So the engine's drafted and
accepted counts follow from the agreement alone, exactly (float32: no near-ties).
A draft fed other tokens or positions than the target's, a draft cache out of step
by one position, a vocabulary cut wrongly or a copy that loads differently from
its source all break the equality; a float copy of the same weights must be
accepted every time.
"""

from __future__ import annotations

import numpy as np
import pytest

import amlx
from amlx import _mlx as mx
from amlx.convert import convert
from amlx.models import cpu_matmul, load_model

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # run from inside tests/
    from helpers.checkpoints import make_checkpoint

N_NEW = 40
K = 4
PROMPT = "the cat sat on the mat. one two three four five"
# untied output head, as the Qwen3-8B the GPU benchmark drafts for; deep and wide enough
# that 4-bit rounding changes some argmaxes (hidden 128: groups of 64 quantize)
SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft_agreement")
    target = make_checkpoint(root / "target", "qwen3", seed=0, **SHAPE)
    copies = {bits: convert(target, root / f"copy-{bits or 'float'}", quantize=bits, progress=False)
              for bits in (None, 8, 4)}
    return target, copies


def _argmax_after_each_prefix(path, ids: list[int]) -> np.ndarray:
    """The model's argmax at every position of `ids`, one forward without a cache."""
    loaded = load_model(path)
    try:
        logits = loaded.model(mx.array(np.asarray([ids], np.int32))).astype(mx.float32).numpy()[0]
    finally:
        loaded.model.close()
    return logits.argmax(-1)


def _expected_counts(agree: np.ndarray, max_tokens: int, k: int) -> tuple[int, int]:
    """(drafted, accepted) of a greedy run whose rows always draft min(k, remaining - 1):
    agree[i] says whether the draft's argmax after the target's first i output tokens is
    the target's token i (token 0 comes from the prefill, never drafted)."""
    n = drafted = accepted = 0
    n = 1
    while n < max_tokens:
        kk = min(k, max_tokens - n - 1)
        if kk == 0:  # the last token: a plain step
            n += 1
            continue
        a = 0
        while a < kk and agree[n + a]:
            a += 1
        drafted, accepted = drafted + kk, accepted + a
        n += a + 1
    return drafted, accepted


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_engine_acceptance_equals_teacher_forced_agreement(pair, bits, monkeypatch):
    # no adaptive length: rows always draft num_draft_tokens (capped by what is left to emit)
    monkeypatch.setenv("AMLX_ADAPTIVE_DRAFT", "0")
    # The CPU's exact float kernels for the quantized copies: their int8 path (the default)
    # rounds x in one-row steps only, so the engine's drafts and the many-row teacher-forced
    # pass below would be different computations (tests/test_cpu_int8_kernels.py covers it).
    monkeypatch.setattr(cpu_matmul, "INT8", False)
    target, copies = pair
    options = {"max_tokens": N_NEW, "temperature": 0.0, "max_buffer": 2 * N_NEW}
    with amlx.load_sync(target, device="cpu") as plain:
        prompt = plain.tokenizer.encode(PROMPT)
        ids = [t.id for t in plain.generate_sync(prompt, **options)]
    assert len(ids) == N_NEW  # (no EOS: the counts below assume every round runs)
    seq = prompt + ids
    p = len(prompt)
    assert _argmax_after_each_prefix(target, seq)[p - 1:-1].tolist() == ids
    agree = _argmax_after_each_prefix(copies[bits], seq)[p - 1:-1] == np.asarray(ids)
    with amlx.load_sync(target, device="cpu", draft=str(copies[bits]), num_draft_tokens=K) as spec:
        got = [t.id for t in spec.generate_sync(prompt, **options)]
        counters = spec.stats()["speculative"]
    assert got == ids
    drafted, accepted = _expected_counts(agree, N_NEW, K)
    assert (counters["drafted_tokens"], counters["accepted_tokens"]) == (drafted, accepted)
    if bits is None:
        assert agree.all() and counters["acceptance_rate"] == 1.0
    elif bits == 4:
        assert not agree.all()  # (the test can tell a rejected draft from an accepted one)
