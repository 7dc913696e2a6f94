"""The prefix cache through `amlx serve` and the official openai client: a second
chat sharing a long system prompt reports `usage.prompt_tokens_details.cached_tokens`
(also in the streamed usage chunk) and answers exactly as the first time; the
server's --kv-cache-memory flag sizes the pool."""

from __future__ import annotations

import pytest

from tests.helpers.serving import ServerProcess, serve_checkpoint

SYSTEM = ("You are a careful assistant. Answer in one short sentence, name your sources, avoid jargon, "
          "and never invent facts. Prefer plain words over long ones, and keep lists short. ") * 3


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = serve_checkpoint(tmp_path_factory.mktemp("serve-ckpt"))
    with ServerProcess(ckpt, "--model-name", "tiny", "--max-context", "512", "--kv-cache-memory", "64MB") as srv:
        yield srv


def _chat(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


async def test_a_shared_system_prompt_is_reported_as_cached(server):
    client = server.client()
    first = await client.chat.completions.create(model="tiny", messages=_chat("Name a colour."), max_tokens=8,
                                                 temperature=0)
    assert first.usage.prompt_tokens > 48
    again = await client.chat.completions.create(model="tiny", messages=_chat("Name a colour."), max_tokens=8,
                                                 temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 16 == 0 and cached < again.usage.prompt_tokens
    assert again.choices[0].message.content == first.choices[0].message.content
    stream = await client.chat.completions.create(model="tiny", messages=_chat("Name a fruit."), max_tokens=4,
                                                  temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 48  # the system prompt's blocks
