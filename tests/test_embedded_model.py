"""The embedded demo model: shipped with the package, small, and readable.

`amlx.demo.default_model_dir()` holds a complete checkpoint of at most 8 MB;
greedy answers to five fixed chat prompts (three from the corpus, two it never
saw) are non-empty, end on their own, and at least 90% of their words occur in
the corpus the model was trained on (scripts/demo_corpus.jsonl); `amlx demo`
runs concurrent streams on it and cancels one of them.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

import amlx
from amlx.demo import default_model_dir, run_demo

CORPUS = Path(__file__).resolve().parent.parent / "scripts" / "demo_corpus.jsonl"
PROMPTS = ["Hello!", "Tell me a story about a fox.", "What color is the sky?",
           "What color is a banana?", "Tell me a story about a horse."]  # the last two are not in the corpus


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


@pytest.fixture(scope="module")
def corpus_words() -> set[str]:
    words: set[str] = set()
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        for m in json.loads(line)["messages"]:
            words.update(_words(m["content"]))
    return words


def test_the_model_directory_is_complete_and_small():
    d = default_model_dir()
    assert isinstance(d, Path) and d.is_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (d / name).is_file(), name
    assert sum(f.stat().st_size for f in d.iterdir() if f.is_file()) <= 8 * 1024 * 1024


async def test_greedy_answers_use_the_corpus_words(corpus_words):
    emitted: list[str] = []
    async with await amlx.load(default_model_dir()) as model:
        for prompt in PROMPTS:
            out = await model.complete([{"role": "user", "content": prompt}], max_tokens=120)
            words = _words(out.text)
            assert words, f"{prompt!r}: empty answer"
            assert out.finish_reason == "stop", f"{prompt!r}: {out.text!r}"
            emitted += words
    known = sum(w in corpus_words for w in emitted)
    assert known >= 0.9 * len(emitted), sorted(set(emitted) - corpus_words)


async def test_demo_streams_and_cancels():
    out = io.StringIO()
    counts = await run_demo(out=out, tokens=40)
    text = out.getvalue()
    assert counts["cancel"] == 10  # cancelled after a quarter of the budget
    assert all(n > 0 for n in counts.values())
    assert "cancelled" in text and "5 concurrent streams" in text
    assert "user:  Hello!" in text
