"""`amlx demo`: the embedded model answering several chats at once, and a live cancellation.

The embedded model (`default_model_dir()`, shipped inside the package) is a
tiny Qwen3 that amlx itself trained from random weights on a few hundred short
chat turns written for it (scripts/train_demo_model.py reproduces it). It knows
greetings, simple facts and a handful of short stories, so the demo runs right
after `pip install`, with no download, and its streams are readable English.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import TextIO

__all__ = ["default_model_dir", "run_demo"]


def default_model_dir() -> Path:
    """The directory of the embedded demo model (a Hugging Face-layout Qwen3 checkpoint)."""
    return Path(__file__).resolve().parent / "embedded"


# (name, user message, sampling options); the last stream is cancelled halfway.
_STREAMS = [
    ("hello", "Hello!", {}),
    ("story", "Tell me a story about a dragon.", {"temperature": 0.6, "seed": 1}),
    ("facts", "What color is the sky?", {}),
    ("poem", "Write a short poem about the moon.", {"temperature": 0.8, "top_p": 0.9, "seed": 2}),
    ("cancel", "Tell me a story about a robot.", {}),
]


class _Board:
    """The streams' texts, redrawn in place on a terminal, printed once at the end otherwise."""

    def __init__(self, out: TextIO):
        self.out = out
        self.live = out.isatty()
        self.texts = {name: "" for name, _, _ in _STREAMS}
        self.counts = {name: 0 for name, _, _ in _STREAMS}
        self.status = {name: "running" for name, _, _ in _STREAMS}
        self.drawn = False

    def _line(self, name: str, width: int | None) -> str:
        text = " ".join(self.texts[name].split())
        if width is not None and len(text) > width:
            text = "…" + text[-(width - 1):]
        return f"[{name:>6} {self.counts[name]:3d} {self.status[name]:>9}] {text}"

    def render(self, final: bool = False) -> None:
        if self.live:
            if self.drawn:
                self.out.write(f"\x1b[{len(_STREAMS)}F")
            for name, _, _ in _STREAMS:
                self.out.write("\x1b[2K" + self._line(name, 72) + "\n")
            self.drawn = True
        if final:
            self.out.write("\n")
            for name, prompt, _ in _STREAMS:
                self.out.write(f"{name} ({self.status[name]}, {self.counts[name]} tokens)\n"
                               f"  user:  {prompt}\n  model: {' '.join(self.texts[name].split())}\n")
        self.out.flush()


def _check_tokens(tokens: int) -> None:
    """ValueError naming `tokens` for a bad budget, before the model loads (it failed as
    max_tokens, an option the caller never named, once the model had loaded)."""
    from amlx.types import MAX_TOKENS_LIMIT

    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= MAX_TOKENS_LIMIT:
        raise ValueError(f"tokens must be an integer in [1, {MAX_TOKENS_LIMIT}], got {tokens!r}")


async def run_demo(out: TextIO = sys.stdout, tokens: int = 96, model_dir: str | Path | None = None) -> dict:
    """Loads the embedded model (or `model_dir`) and streams several chats
    concurrently; the last one is cancelled after a quarter of `tokens` (at least one),
    unless it ends first. Returns per-stream token counts."""
    import amlx

    _check_tokens(tokens)
    path = default_model_dir() if model_dir is None else Path(model_dir)
    board = _Board(out)
    async with await amlx.load(path) as model:
        out.write(f"amlx demo: {model.info.architecture}, {model.info.parameters:,} parameters, "
                  f"{model.info.dtype} on {model.info.device} ({path})\n\n")

        async def consume(name: str, prompt: str, opts: dict) -> None:
            limit = max(1, tokens // 4) if name == "cancel" else tokens
            async for tok in model.generate([{"role": "user", "content": prompt}], max_tokens=tokens, **opts):
                board.texts[name] += tok.text
                board.counts[name] += 1
                if tok.finish_reason:
                    board.status[name] = tok.finish_reason
                # (a stream that ended by itself is not cancelled: with a budget of 1 the
                # "cancel" stream's one token finished it, and it was reported "cancelled")
                if name == "cancel" and tok.finish_reason is None and board.counts[name] >= limit:
                    board.status[name] = "cancelled"
                    break  # leaving the loop cancels the request
                board.render()
                await asyncio.sleep(0.01)  # a client reading at its own pace

        start = time.perf_counter()
        await asyncio.gather(*(consume(*s) for s in _STREAMS))
        elapsed = time.perf_counter() - start
        board.render(final=True)
        stats = model.stats()
        out.write(f"\n{sum(board.counts.values())} tokens from {len(_STREAMS)} concurrent streams in {elapsed:.2f} s; "
                  f"'cancel' stopped after {board.counts['cancel']} tokens while the others ran on. "
                  f"MLX active memory: {stats['memory']['active']:,} bytes\n")
    return board.counts
