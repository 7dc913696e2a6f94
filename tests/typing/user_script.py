"""A user's script of the public API, checked by `mypy --strict` (tests/test_typing.py).

It is never run: it only has to type-check against amlx as installed. A copy
with one option misspelled must fail, naming it.
"""

from __future__ import annotations

import asyncio

import amlx


async def chat(path: str) -> str:
    async with await amlx.load(path, max_batch_size=8) as model:
        parts: list[str] = []
        async for tok in model.generate("Hello", max_tokens=32, temperature=0.7, top_p=0.9, seed=1):
            parts.append(tok.text)
            if tok.finish_reason is not None:
                break
        messages = [{"role": "user", "content": "What is MLX?"}]
        result: amlx.Completion = await model.complete(
            messages, max_tokens=16, temperature=0.0, stop=["\n"], logprobs=True, top_logprobs=2,
            presence_penalty=0.5, frequency_penalty=0.25, logit_bias={7: -100.0})
        if result.top_logprobs is not None:
            best: list[tuple[int, float]] = result.top_logprobs[0]
            parts.append(str(best[0][0]))
        stats: amlx.EngineStats = model.stats()
        active: int = stats["active_requests"] + stats["memory"]["active"]
        parts.append(f"{active} {result.usage.total_tokens} {result.finish_reason}")
        return "".join(parts)


def blocking(path: str) -> int:
    model = amlx.load_sync(path)
    try:
        ids = [tok.id for tok in model.generate_sync([1, 2, 3], max_tokens=4, top_k=5, min_p=0.1)]
        done = model.complete_sync("hi", max_tokens=2, repetition_penalty=1.1, max_buffer=4)
        memory: amlx.MemoryStats = amlx.memory()
        return len(ids) + len(done.token_ids) + memory["peak"]
    finally:
        model.close()


if __name__ == "__main__":
    print(asyncio.run(chat("model")), blocking("model"))
