"""Speculative decoding over real KV caches, one row: rollback is a position, and the draft
model's cache follows docs/speculative.md ("The draft model's cache").

Each round writes the row's last token and its drafts into the target's cache (a pass of
k + 1 tokens from the row's position), accepts with `verify`, and moves the position on by
accepted + 1: the rejected drafts' slots stay in the cache, unseen, until the next pass
writes over them. The draft model keeps its own cache; after a round that accepted all k
drafts it has not seen d_k, so its next pass feeds [d_k, last]. Greedy output must be
plain greedy decoding's, and the target as its own draft must have every draft accepted
(a draft cache off by one position would not).
"""

from __future__ import annotations

import numpy as np
import pytest

from amlx import _mlx as mx
from amlx.models import load_model
from amlx.sample import BatchParams, SamplingParams, make_keys
from amlx.speculative.draft_sampling import draft_keys, draft_step
from amlx.speculative.prompt_lookup import PromptLookup
from amlx.speculative.verify import Drafts, VerifyParams, verify
from amlx.tokenizer import Tokenizer

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # run from inside tests/
    from helpers.checkpoints import make_checkpoint

N_NEW = 20
TEXTS = ["the cat sat on the mat. the cat sat on the mat. the cat sat", "one two three four one two three"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_cache")
    paths = {"target": make_checkpoint(root / "target", "qwen3", seed=0),
             "small": make_checkpoint(root / "small", "qwen3", seed=1, num_hidden_layers=1)}
    loaded = {name: load_model(path).model for name, path in paths.items()}
    tok = Tokenizer.from_dir(paths["target"])
    yield loaded, [tok.encode(t) for t in TEXTS]
    for m in loaded.values():
        m.close()


def cached(model, cache, ids: list[int], pos: int) -> np.ndarray:
    """Writes `ids` at positions pos.. of the cache; their logits (L, V)."""
    with mx.array(np.asarray([ids], np.int32)) as x, model(x, cache, pos) as out:
        return out.astype(mx.float32).numpy()[0]


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    cache = model.make_cache()
    out = [int(np.argmax(cached(model, cache, prompt, 0)[-1]))]
    while len(out) < n:
        out.append(int(np.argmax(cached(model, cache, [out[-1]], len(prompt) + len(out) - 1)[-1])))
    return out


class DraftCache:
    """The draft model's cache for one row: `pos` positions hold the row's tokens,
    `pending` the accepted tokens it has not seen yet (besides the last one)."""

    def __init__(self, model, prompt: list[int]):
        self.model, self.cache = model, model.make_cache()
        cached(model, self.cache, prompt, 0)
        self.pos, self.pending = len(prompt), []

    def propose(self, last: int, k: int, keys) -> list[int]:
        params = BatchParams.build([SamplingParams()])
        feed, drafts, dkeys = self.pending + [last], [], draft_keys(keys)
        for _ in range(k):
            logits = cached(self.model, self.cache, feed, self.pos)[-1:]
            self.pos += len(feed)
            step = draft_step(mx.array(logits), params, dkeys)
            dkeys, feed = step.keys, [int(step.tokens.numpy()[0])]
            drafts.append(feed[0])
        return drafts

    def settle(self, new_pos: int, accepted: int, drafts: list[int]) -> None:
        """After the verify: the cache is right up to the row's new position, but for d_k
        when every draft was accepted; the rest is rolled back by position alone."""
        if drafts and accepted == len(drafts):
            self.pos, self.pending = new_pos - 1, [drafts[-1]]
        else:
            self.pos, self.pending = new_pos, []


def speculative_greedy(target, prompt: list[int], draft_model=None, k: int = 3) -> tuple[list[int], int, int]:
    cache = target.make_cache()
    out = [int(np.argmax(cached(target, cache, prompt, 0)[-1]))]
    pos, drafted, accepted = len(prompt), 0, 0  # the cache holds [0, pos); out[-1] goes at pos
    lookup = PromptLookup(prompt + out)
    draft = None if draft_model is None else DraftCache(draft_model, prompt)
    keys = make_keys([0])
    while len(out) < N_NEW:
        d = lookup.propose(k) if draft is None else draft.propose(out[-1], k, keys)
        logits = cached(target, cache, [out[-1]] + d, pos)
        res = verify(mx.array(logits[None]), Drafts(mx.array(np.asarray([d], np.int32).reshape(1, len(d))),
                                                    mx.array(np.asarray([len(d)], np.int32))),
                     VerifyParams.build(BatchParams.build([SamplingParams()]), len(d) + 1), keys).read()[0]
        out += res.tokens
        pos += res.accepted + 1  # rollback: the rejected drafts' slots are past the position
        lookup.extend(res.tokens)
        if draft is not None:
            draft.settle(pos, res.accepted, d)
        drafted, accepted = drafted + len(d), accepted + res.accepted
    return out[:N_NEW], drafted, accepted


@pytest.mark.parametrize("drafter", ["lookup", "small", "self"])
def test_speculative_decoding_over_the_caches_is_plain_greedy(models, drafter):
    loaded, prompts = models
    target = loaded["target"]
    draft_model = {"lookup": None, "small": loaded["small"], "self": target}[drafter]
    for prompt in prompts:
        out, drafted, accepted = speculative_greedy(target, prompt, draft_model)
        assert out == plain_greedy(target, prompt, N_NEW)
        assert drafted > 0
        if drafter == "self":
            assert accepted == drafted
