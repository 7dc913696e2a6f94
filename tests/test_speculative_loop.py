"""The speculative pieces composed into a decoding loop over real (small, random) models.

A reference for the scheduler's integration (docs/speculative.md) without the KV
cache: every forward runs over a row's whole sequence, so the loop shows the
algorithm -- drafting (prompt lookup, or a draft model through `draft_step`),
lengths (`AdaptiveLength`, `batch_width`), `verify`, the stats -- and that greedy
speculative decoding gives the tokens of plain greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from amlx import _mlx as mx
from amlx.models import load_model
from amlx.sample import BatchParams, SamplingParams, make_keys
from amlx.speculative.adaptive import AdaptiveLength, CostModel, batch_width
from amlx.speculative.draft_sampling import draft_keys, draft_step
from amlx.speculative.prompt_lookup import PromptLookup
from amlx.speculative.stats import SpeculativeStats
from amlx.speculative.verify import Drafts, VerifyParams, verify
from amlx.tokenizer import Tokenizer

try:
    from tests.helpers.checkpoints import make_checkpoint
except ImportError:  # run from inside tests/
    from helpers.checkpoints import make_checkpoint

K = 3
N_NEW = 14
TEXTS = ["the cat sat on the mat. the cat sat on the mat. the cat sat",
         "def add(a, b):\n    return a + b\n\ndef add(a, b):\n",
         "one two three four five six one two three"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec_loop")
    paths = {"target": make_checkpoint(root / "target", "qwen3", seed=0),
             "small": make_checkpoint(root / "small", "qwen3", seed=1, num_hidden_layers=1)}
    loaded = {name: load_model(path) for name, path in paths.items()}
    loaded["prompts"] = [Tokenizer.from_dir(paths["target"]).encode(t) for t in TEXTS]
    yield loaded
    for name in ("target", "small"):
        loaded[name].model.close()


def forward(model, ids: list[int]) -> np.ndarray:
    """Logits (L, V) float32 of one forward pass over `ids`, without cache."""
    with mx.array(np.asarray([ids], np.int32)) as x, model(x) as out:
        return out.astype(mx.float32).numpy()[0]


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(np.argmax(forward(model, prompt + out)[-1])))
    return out


@dataclass
class Row:
    prompt: list[int]
    adaptive: AdaptiveLength
    lookup: PromptLookup
    out: list[int] = field(default_factory=list)


def draft_tokens(rows: list[Row], width: int, lengths: list[int], draft_model, params: BatchParams,
                 keys: mx.Array) -> np.ndarray:
    """(B, width) drafts: prompt lookup on the host, or `width` draft-model steps."""
    drafts = np.zeros((len(rows), width), np.int32)
    if draft_model is None:
        for b, row in enumerate(rows):
            proposal = row.lookup.propose(lengths[b])
            lengths[b] = len(proposal)  # fewer, or none, without a match
            drafts[b, :len(proposal)] = proposal
        return drafts
    dkeys = draft_keys(keys)
    for j in range(width):
        logits = np.stack([forward(draft_model, r.prompt + r.out + list(drafts[b, :j]))[-1]
                           for b, r in enumerate(rows)])
        step = draft_step(mx.array(logits), params, dkeys)
        dkeys, drafts[:, j] = step.keys, step.tokens.numpy()
    return drafts


def speculative_greedy(target, prompts: list[list[int]], draft_model=None, cost: CostModel | None = None):
    cost = cost or CostModel.linear(K, 0.05)
    rows = [Row(p, AdaptiveLength(cost, K), PromptLookup(p)) for p in prompts]
    params = BatchParams.build([SamplingParams()] * len(rows))
    keys, stats, widths = make_keys([0] * len(rows)), SpeculativeStats(), []
    while min(len(r.out) for r in rows) < N_NEW:
        width = batch_width([r.adaptive for r in rows], cost)
        lengths = [min(r.adaptive.length, width) for r in rows]
        drafts = draft_tokens(rows, width, lengths, draft_model, params, keys)
        logits = np.stack([forward(target, r.prompt + r.out + list(drafts[b]))[-(width + 1):]
                           for b, r in enumerate(rows)])
        res = verify(mx.array(logits), Drafts(mx.array(drafts), mx.array(np.asarray(lengths, np.int32))),
                     VerifyParams.build(params, width + 1), keys)
        keys = res.keys
        results = res.read()
        for row, length, result in zip(rows, lengths, results):
            row.out += result.tokens
            row.lookup.extend(result.tokens)
            row.adaptive.observe(length, result.accepted)
        stats.record_batch(lengths, [r.accepted for r in results])
        widths.append(width)
    return [r.out[:N_NEW] for r in rows], stats.snapshot(), widths


def test_prompt_lookup_decodes_what_plain_greedy_decodes(models):
    target, prompts = models["target"].model, models["prompts"]
    out, stats, widths = speculative_greedy(target, prompts)
    assert out == [plain_greedy(target, p, N_NEW) for p in prompts]
    assert stats["drafted_tokens"] > 0 and max(widths) > 0  # it did speculate


def test_a_draft_model_decodes_what_plain_greedy_decodes(models):
    target, prompts = models["target"].model, models["prompts"]
    out, stats, _ = speculative_greedy(target, prompts, models["small"].model)
    assert out == [plain_greedy(target, p, N_NEW) for p in prompts]
    assert stats["drafted_tokens"] > 0


def test_the_target_as_its_own_draft_has_every_draft_accepted(models):
    target, prompts = models["target"].model, models["prompts"]
    out, stats, widths = speculative_greedy(target, prompts, target)
    assert out == [plain_greedy(target, p, N_NEW) for p in prompts]
    assert stats["acceptance_rate"] == 1.0 and widths[-1] == K
