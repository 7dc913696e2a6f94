"""Many requests at once through a model's public API, and the settled state after them
(the speculative decoding tests), and one read slowly."""

from __future__ import annotations

from typing import Any, Callable

import anyio


async def complete_all(model, requests: list[tuple[Any, dict]]) -> list:
    """The requests' completions ((prompt, options) each), all submitted at once."""
    out: list = [None] * len(requests)

    async def one(i: int, prompt, options: dict) -> None:
        out[i] = await model.complete(prompt, **options)

    async with anyio.create_task_group() as tg:
        for i, (prompt, options) in enumerate(requests):
            tg.start_soon(one, i, prompt, options)
    return out


async def settled(model) -> dict:
    """The model's stats once the worker has dropped the finished requests (a request's
    stream ends at its last token; its row leaves at the worker's next round)."""
    for _ in range(500):
        stats = model.stats()
        if stats["active_requests"] == 0 and stats["kv_cache"]["blocks_used"] == 0:
            break
        await anyio.sleep(0.01)
    return stats


def with_stops_from_plain(run: Callable, plain, requests: list[tuple[Any, dict]]) -> tuple[list, list]:
    """Drawn greedy requests made concrete: options' `stop_at` (where in the plain output, as a
    fraction, and how long) becomes a stop string cut from `plain`'s own output, and
    `top_logprobs` turns `logprobs` on. Returns (the requests, `plain`'s completions of them)."""
    reqs = []
    for prompt, options in requests:
        options = dict(options)
        stop_at = options.pop("stop_at", None)
        if options.get("top_logprobs"):
            options["logprobs"] = True
        reqs.append((prompt, options, stop_at))
    first = run(complete_all, plain, [(p, o) for p, o, _ in reqs])
    final = []
    for (prompt, options, stop_at), c in zip(reqs, first):
        if stop_at is not None and c.text:
            i = int(stop_at[0] * (len(c.text) - 1))
            options = {**options, "stop": [c.text[i:i + stop_at[1]]]}
        final.append((prompt, options))
    return final, run(complete_all, plain, final)


async def read_slowly(model, prompt, options: dict, delay: float) -> list[int]:
    """The request's token ids, read with a pause after each (its buffer fills up)."""
    ids = []
    async with model.generate(prompt, **options) as stream:
        async for tok in stream:
            ids.append(tok.id)
            await anyio.sleep(delay)
    return ids
