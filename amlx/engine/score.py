"""`Model.score`: each continuation's total log-probability after one prompt (worker thread).

The prompt is prefilled once, in chunks, into a cache of its own. Its last position gives
the distribution of every continuation's first token. For the rest, the prompt's cache rows
are copied once per continuation and the continuations run as one right-padded batch at the
prompt's offset (exact: causal attention never lets a real position see a padded one). Log-
probabilities are computed in float32 on the device; only one float per continuation comes back.

The work is cut into steps (`Scorer.step`: one prefill chunk, or one batch of continuations
over at most a chunk of their positions), each a job of its own on the worker, so that the
engine's decode rounds run between them: a long prompt or a long continuation scored never
holds up the streams decoding beside it for more than a chunk, and a caller that is cancelled
stops the work at the next step instead of at its end.

`PromptLogprobs` (`Model.prompt_logprobs`, the server's `echo`) runs the same way: each prompt
token's log-probability after the tokens before it, and the most likely alternatives, from
logits computed at every position of each chunk.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import numpy as np

from amlx._mlx import Array, array, ops
from amlx._mlx import float32 as _float32
from amlx.cache import KVCache
from amlx.models.base import CausalLM
from amlx.sample import token_logprobs

__all__ = ["PromptLogprobs", "Scorer", "score_continuations"]

# The logits of one scoring step, rows * positions * vocabulary float32 values, stay under this
# (256 MB); more continuations are scored in several batches that share the prompt's cache, and
# a batch's positions run in several steps (a single 8,000-token continuation took all its logits
# at once: 4.8 GB of float32 at Qwen3's 152k vocabulary, whatever the budget said).
LOGITS_BUDGET = 64 * 1024 * 1024
# Each row of a scoring batch holds a copy of the prompt's cache: a batch's copies stay under this
# (bytes; at least one row). Without it 400 two-token continuations after a 2,000-token prompt took
# 400 copies at once: 90 GB at Qwen3-0.6B's 229 MB a copy.
COPIES_BUDGET = 1 << 30
# Times a score call starts again because the weights changed under it (an adapter trained a
# step between two of its steps) before it runs its remaining steps as one job, where they
# cannot change: the scores are then all of one set of weights, and the call ends.
RESTARTS = 2


class _Steps:
    """A call run as steps on the worker (`step()` until it returns True), over a cache of its
    own that `close()` frees (a job queued behind the last step, at any point).

    `version` (optional) says which weights the model has: a step that finds them changed
    since the call began starts the call again, so that no result mixes two sets of weights;
    after RESTARTS of those it runs its remaining steps as one job."""

    def __init__(self, model: CausalLM, version: Callable[[], int] | None):
        self.model, self._version = model, version
        self.steps = 0  # steps run (restarts included)
        self.restarts = 0
        self.done = False
        self._cache: list[KVCache] | None = None
        self._weights = None

    def _reset(self) -> None:
        """Forgets the work so far (the cache is freed by `close`)."""
        self._weights = self._version() if self._version is not None else None

    def step(self) -> bool:
        """Runs one step (MLX: on the worker thread); True once the call's result is known."""
        if self.done:
            return True
        if self._version is not None and self._version() != self._weights:
            self.close()
            self.restarts += 1
            if self.restarts > RESTARTS:
                while not self._counted_step():
                    pass
                return True
        return self._counted_step()

    def _counted_step(self) -> bool:
        self.steps += 1
        if self._cache is None:
            self._cache = self.model.make_cache()
        return self._step()

    def _step(self) -> bool:
        raise NotImplementedError

    def _finish(self) -> bool:
        self.done = True
        self._free()
        return True

    def _free(self) -> None:
        cache, self._cache = self._cache, None
        for c in cache or ():
            c.close()

    def close(self) -> None:
        """Frees the cache (idempotent); unless the call is done, its work so far is
        forgotten, and a step after this starts it again."""
        self._free()
        if not self.done:
            self._reset()


class Scorer(_Steps):
    """One score call: `step()` until it returns True, then `scores`."""

    def __init__(self, model: CausalLM, prompt: Sequence[int], continuations: Sequence[Sequence[int]], *,
                 chunk: int = 512, budget: int = LOGITS_BUDGET, copies_budget: int = COPIES_BUDGET,
                 version: Callable[[], int] | None = None):
        if not prompt:
            raise ValueError("score needs a prompt of at least one token")
        super().__init__(model, version)
        self.prompt, self.continuations = list(prompt), continuations
        self.chunk, self.budget, self.copies_budget = chunk, budget, copies_budget
        self.scores = [0.0] * len(continuations)
        self._todo = [i for i, c in enumerate(continuations) if len(c)]
        self.done = not self._todo  # every score known
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self._filled = 0  # prompt tokens in the cache
        self._first: Array | None = None  # log-probabilities of the token after the prompt
        self._groups: list[list[int]] | None = None
        self._batch: _Batch | None = None  # the batch under way (its rows' caches held between steps)
        self._group: list[int] = []  # its continuations' indices

    def _step(self) -> bool:
        if self._first is None:
            self._prefill_chunk()
            return False
        vocab = self._first.shape[-1]
        if self._groups is None:
            row_bytes = sum(a.nbytes for c in self._cache for a in c.state())
            self._groups = _groups(self._todo, self.continuations, vocab, self.budget, row_bytes,
                                   self.copies_budget, self.chunk)
        if self._batch is None:
            self._group = self._groups.pop(0)
            # positions a step: at most a chunk, and at most `budget` logits over the batch's rows
            cols = max(1, min(self.chunk, self.budget // (len(self._group) * vocab)))
            self._batch = _Batch(self._cache, len(self.prompt), self._first,
                                 [list(self.continuations[i]) for i in self._group], cols)
        values = self._batch.step(self.model)
        if values is None:
            return False
        self._batch.close()
        self._batch = None
        for i, v in zip(self._group, values):
            self.scores[i] = float(v)
        return self._finish() if not self._groups else False

    def _free(self) -> None:
        batch, self._batch = getattr(self, "_batch", None), None
        if batch is not None:
            batch.close()
        super()._free()

    def _prefill_chunk(self) -> None:
        """Writes the prompt's next chunk into the cache; after its last, `_first`."""
        start = self._filled
        part = self.prompt[start:start + self.chunk]
        ids = array(np.asarray([part], dtype=np.int32))
        self._filled += len(part)
        if self._filled < len(self.prompt):
            self.model(ids, self._cache, start)
            ops.eval(*[a for c in self._cache for a in c.state()])
            return
        logits = self.model(ids, self._cache, start, last=array(np.asarray([len(part) - 1], dtype=np.int32)))
        logits = ops.astype(ops.reshape(logits, (-1,)), _float32)
        self._first = ops.subtract(logits, ops.logsumexp(logits, axis=-1, keepdims=True))
        ops.eval(self._first, *[a for c in self._cache for a in c.state()])


class PromptLogprobs(_Steps):
    """Each token of a prompt after the first: its log-probability given the tokens before it
    and the `top_n` likeliest tokens there (ids, log-probabilities, best first), under the
    model's distribution (log_softmax of the raw logits, float32, as a generated token's
    `logprob`). A step prefills one chunk, with logits at each of its positions (at most
    `budget` logits a step). `step()` until it returns True, then `logprobs`, `top_ids`,
    `top_logprobs` (one entry per prompt token after the first)."""

    def __init__(self, model: CausalLM, prompt: Sequence[int], top_n: int = 0, *, chunk: int = 512,
                 budget: int = LOGITS_BUDGET, vocab: int, version: Callable[[], int] | None = None):
        if not prompt:
            raise ValueError("prompt_logprobs needs a prompt of at least one token")
        super().__init__(model, version)
        self.prompt, self.top_n = list(prompt), top_n
        self.chunk = max(1, min(chunk, budget // max(vocab, 1)))
        self.done = len(self.prompt) == 1  # (nothing before the only token)
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        self._filled = 0
        self.logprobs: list[float] = []
        self.top_ids: list[list[int]] = []
        self.top_logprobs: list[list[float]] = []

    def _step(self) -> bool:
        start, n = self._filled, len(self.prompt)
        part = self.prompt[start:start + self.chunk]
        self._filled += len(part)
        logits = self.model(array(np.asarray([part], dtype=np.int32)), self._cache, start)
        # position i's logits are the distribution of token i + 1; the prompt's last position
        # predicts what follows it, no prompt token
        scored = min(len(part), n - 1 - start)
        raw = ops.astype(ops.reshape(logits, (len(part), -1))[:scored], _float32)
        targets = array(np.asarray(self.prompt[start + 1:start + 1 + scored], dtype=np.int32))
        lp, ids, tops = token_logprobs(raw, targets, self.top_n)
        ops.eval(lp, *([] if ids is None else [ids, tops]), *[a for c in self._cache for a in c.state()])
        self.logprobs += [float(v) for v in lp.numpy()]
        if ids is not None:
            self.top_ids += ids.numpy().tolist()
            self.top_logprobs += tops.numpy().tolist()
        return self._finish() if self._filled >= n - 1 else False


def score_continuations(model: CausalLM, prompt: Sequence[int], continuations: Sequence[Sequence[int]], *,
                        chunk: int = 512, budget: int = LOGITS_BUDGET, copies_budget: int = COPIES_BUDGET
                        ) -> list[float]:
    """Sum over each continuation's tokens of log p(token | prompt, earlier tokens), float32.

    `model` is a CausalLM; `prompt` holds at least one id; an empty continuation scores 0.0.
    Runs MLX: call it on the engine's worker thread (all steps at once)."""
    scorer = Scorer(model, prompt, continuations, chunk=chunk, budget=budget, copies_budget=copies_budget)
    try:
        while not scorer.step():
            pass
        return scorer.scores
    finally:
        scorer.close()


def _groups(todo: list[int], continuations: Sequence[Sequence[int]], vocab: int, budget: int,
            row_bytes: int = 0, copies_budget: int = COPIES_BUDGET, chunk: int | None = None) -> list[list[int]]:
    """Batches of continuation indices, shortest first (so each batch pads to its last, longest
    member). Continuations of one token need only the prompt's last logits: they form batches of
    their own, which run no forward. In the others, each row is a copy of the prompt's cache
    (`row_bytes`) and its padded logits: at most `copies_budget` bytes of copies and `budget`
    logits a step (at least one row), a step running at most `chunk` positions of the batch."""
    rows_cap = max(1, copies_budget // row_bytes) if row_bytes else len(todo) + 1
    groups: list[list[int]] = [[]]
    for i in sorted(todo, key=lambda i: len(continuations[i])):
        width = max(len(continuations[i]) - 1, 1)
        if chunk is not None:
            width = min(width, max(chunk, 1))
        group = groups[-1]
        single = len(continuations[i]) == 1
        if group and not single and (len(continuations[group[-1]]) == 1 or len(group) + 1 > rows_cap
                                     or (len(group) + 1) * width * vocab > budget):
            groups.append([])
        groups[-1].append(i)
    return groups


class _Batch:
    """Continuations (each at least one token) after the prompt in `cache`, as one right-padded
    batch (exact: causal attention never lets a real position see a padded one, which all come
    after a row's real ones). The prompt's cache is copied once per row; `step` runs the next
    `cols` positions of every row, and gives the scores after the last (None before)."""

    def __init__(self, cache: list[KVCache], offset: int, first: Array, conts: list[list[int]], cols: int):
        n = len(conts)
        self.offset, self.cols, self.at = offset, cols, 0
        self.total = ops.take(first, array(np.asarray([c[0] for c in conts], dtype=np.int32)))
        self.longest = max(len(c) for c in conts) - 1
        self.inputs = np.zeros((n, self.longest), dtype=np.int32)
        self.targets = np.zeros((n, self.longest), dtype=np.int32)
        self.valid = np.zeros((n, self.longest), dtype=np.bool_)
        for i, ids in enumerate(conts):
            self.inputs[i, :len(ids) - 1] = ids[:-1]
            self.targets[i, :len(ids) - 1] = ids[1:]
            self.valid[i, :len(ids) - 1] = True
        self.rows: list[KVCache] = []
        try:
            for layer in cache if self.longest else ():
                row = copy.copy(layer)  # the prompt's buffers until take_rows copies them out,
                row.take_rows([0] * n)  # so only a row that took its copy may be closed
                self.rows.append(row)
        except BaseException:
            self.close()
            raise

    def step(self, model: CausalLM) -> list[float] | None:
        if self.at < self.longest:
            start, end = self.at, min(self.at + self.cols, self.longest)
            n = self.inputs.shape[0]
            logits = ops.astype(model(array(self.inputs[:, start:end]), self.rows, self.offset + start), _float32)
            width = end - start
            targets = array(self.targets[:, start:end].reshape(n, width, 1))
            picked = ops.reshape(ops.take_along_axis(logits, targets, -1), (n, width))
            logprobs = ops.subtract(picked, ops.logsumexp(logits, axis=-1))
            rest = ops.sum(ops.where(array(self.valid[:, start:end]), logprobs, array(0.0, _float32)), axis=-1)
            self.total = ops.add(self.total, rest)
            self.at = end
            ops.eval(self.total, *[a for c in self.rows for a in c.state()])
            if self.at < self.longest:
                return None
        ops.eval(self.total)
        return [float(v) for v in self.total.numpy()]

    def close(self) -> None:
        rows, self.rows = self.rows, []
        for layer in rows:
            layer.close()
