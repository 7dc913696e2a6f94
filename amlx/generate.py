"""Generation for one request at a time, and the pieces the engine shares with it.

`TextAssembler` turns sampled ids into `Token`s: streaming detokenization, EOS,
stop strings (held back until they can no longer start a stop string, never
emitted), and max_tokens. `generate_tokens` is the synchronous single-request
loop (prefill in chunks, then decode step by step); the engine batches the same
steps for many requests.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from amlx._mlx import Array, array, ops
from amlx._mlx import int32 as _int32
from amlx.errors import ContextLengthError
from amlx.tokenizer import Tokenizer
from amlx.types import GenerationOptions, Token

PREFILL_CHUNK = 2048


class TextAssembler:
    """Per request: ids in, `Token`s out, deciding when the stream ends."""

    def __init__(self, tokenizer: Tokenizer, options: GenerationOptions, eos_ids: frozenset[int],
                 max_new: int | None = None):
        self._detok = tokenizer.detokenizer()
        self._stop = options.stop
        self._eos = eos_ids
        self._max = options.max_tokens if max_new is None else min(options.max_tokens, max_new)
        self._held = ""  # text that may be the start of a stop string
        self.count = 0
        self.finished = False

    def _holdback(self, text: str) -> int:
        """Length of the longest suffix of `text` that starts some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def push(self, token_id: int, logprob: float | None = None) -> Token:
        """The Token for the next sampled id (the last one has finish_reason set)."""
        self.count += 1
        if token_id in self._eos:
            self.finished = True
            return Token(token_id, self._held + self._detok.finalize(), logprob, "stop")
        text = self._held + self._detok.add(token_id)
        if self._stop:
            cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.finished = True
                return Token(token_id, text[:cut], logprob, "stop")
        if self.count >= self._max:
            self.finished = True
            rest = text + self._detok.finalize()
            if self._stop:
                cut = min((i for i in (rest.find(s) for s in self._stop) if i >= 0), default=-1)
                if cut >= 0:
                    return Token(token_id, rest[:cut], logprob, "stop")
            return Token(token_id, rest, logprob, "length")
        keep = self._holdback(text) if self._stop else 0
        self._held = text[len(text) - keep:] if keep else ""
        return Token(token_id, text[:len(text) - keep], logprob, None)


def check_context(prompt_len: int, max_context: int) -> int:
    """Room left for generation; raises ContextLengthError when the prompt does not fit."""
    if prompt_len == 0:
        raise ValueError("the prompt is empty")
    if prompt_len >= max_context:
        raise ContextLengthError(f"the prompt has {prompt_len} tokens but the context holds {max_context} "
                                 f"(including at least one generated token)")
    return max_context - prompt_len


def prefill(model, cache, ids: Sequence[int], start: int = 0, chunk: int = PREFILL_CHUNK) -> Array:
    """Runs the prompt through the model in chunks; returns the last position's logits (1, V)."""
    logits = None
    for i in range(0, len(ids), chunk):
        part = ids[i:i + chunk]
        if i + chunk < len(ids):
            model(array(np.asarray([part], dtype=np.int32)), cache, start + i)
            ops.eval(*[a for c in cache for a in c.state()])
            continue
        out = model(array(np.asarray([part], dtype=np.int32)), cache, start + i,
                    last=array(np.asarray([len(part) - 1], dtype=np.int32)))
        logits = ops.reshape(out, (1, out.shape[2]))
    return logits


def generate_tokens(model, tokenizer: Tokenizer, prompt_ids: Sequence[int], options: GenerationOptions,
                    max_context: int, eos_ids: frozenset[int] | None = None) -> Iterator[Token]:
    """Generates for one request, synchronously, on the calling thread."""
    from amlx.sample import BatchSampling, RowSampling

    room = check_context(len(prompt_ids), max_context)
    eos = tokenizer.eos_token_ids if eos_ids is None else eos_ids
    out = TextAssembler(tokenizer, options, eos, max_new=room)
    sampler = BatchSampling([RowSampling(options, list(prompt_ids))])
    cache = model.make_cache()
    try:
        logits = prefill(model, cache, prompt_ids)
        pos = len(prompt_ids)
        while True:
            step = sampler(logits)
            tokens, logprobs = step.tokens, step.logprobs
            for c in cache:
                c.reserve(pos + 1)
            ops.async_eval(tokens, logprobs, *sampler.state())
            tid = int(tokens.item())
            lp = float(logprobs.item()) if options.logprobs else None
            tok = out.push(tid, lp)
            yield tok
            if out.finished:
                return
            logits = model(ops.reshape(tokens.astype(_int32), (1, 1)), cache, array(np.array([pos], np.int32)))
            logits = ops.reshape(logits, (1, logits.shape[2]))
            pos += 1
    finally:
        sampler.close()
        for c in cache:
            c.close()
