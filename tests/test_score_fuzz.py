"""`Model.score` probed against transformers (float32 CPU) on the tiny random checkpoints:
hypothesis-drawn prompts and continuations through small prefill chunks and logits budgets
(many batches sharing one prompt cache, Gemma's sliding window crossed), and long string
continuations, which must be bounded and tokenized the way long prompts are."""

from __future__ import annotations

import functools
import shutil
import tempfile
import threading
from pathlib import Path

import anyio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx
from amlx.engine.score import score_continuations
from amlx.errors import ContextLengthError
from amlx.prompt import INLINE_CHARS

try:
    from tests.helpers.checkpoints import load_reference, make_checkpoint, reference_logits
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import load_reference, make_checkpoint, reference_logits


@functools.lru_cache(maxsize=None)
def checkpoint(arch: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix="amlx-score-"))
    import atexit

    atexit.register(shutil.rmtree, root, True)
    return make_checkpoint(root / arch, arch, seed=3)


def _reference_score(ref, prompt: list[int], cont: list[int]) -> float:
    if not cont:
        return 0.0
    logits = reference_logits(ref, prompt + cont).astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lsm = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    return float(sum(lsm[len(prompt) - 1 + j, t] for j, t in enumerate(cont)))


@pytest.mark.parametrize("arch", ["gemma3_text", "mistral"])  # sliding windows of 8 positions
def test_score_fuzz_chunks_and_batches(arch):
    path = checkpoint(arch)
    ref = load_reference(path)
    model = amlx.load_sync(path)
    try:
        engine = model._engine
        vocab = engine.vocab_size
        tok = st.integers(0, vocab - 1)

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(prompt=st.lists(tok, min_size=1, max_size=30), conts=st.lists(st.lists(tok, max_size=16), max_size=6),
               chunk=st.integers(1, 12), rows=st.integers(1, 20))
        def check(prompt, conts, chunk, rows):
            got = engine._worker.run_sync(
                lambda: score_continuations(engine.model, prompt, conts, chunk=chunk, budget=rows * vocab))
            for cont, value in zip(conts, got):
                expected = _reference_score(ref, prompt, cont)
                assert abs(value - expected) <= 1e-4 * max(abs(expected), 1e-2), (prompt, cont, chunk, rows)

        check()
    finally:
        model.close()


def test_score_long_string_continuations_are_bounded_and_off_the_loop():
    """A continuation string that cannot fit the context whatever its tokens is refused
    before it is tokenized (a 10 MB one took 10 s of the event loop), and a long one that
    may fit is tokenized on a thread, as long prompts are."""

    async def body():
        async with await amlx.load(checkpoint("qwen3"), max_context=4096) as model:
            tok = model.tokenizer
            encode, seen = tok.encode, []

            def spy(text, *args, **kwargs):
                seen.append((len(text), threading.current_thread() is threading.main_thread()))
                return encode(text, *args, **kwargs)

            tok.encode = spy
            try:
                with pytest.raises(ContextLengthError):
                    await model.score("hi", [" a", "x" * 2_000_000])
                assert all(n <= INLINE_CHARS for n, _ in seen), seen
                seen.clear()
                text = "ab " * (INLINE_CHARS // 3 + 1)  # long, and may fit 4096 tokens
                try:
                    await model.score("hi", [text])
                except ContextLengthError:
                    pass  # its tokens did not fit after all: only where it was tokenized matters
                assert [on_loop for n, on_loop in seen if n > INLINE_CHARS] == [False], seen
            finally:
                del tok.encode

    anyio.run(body)
