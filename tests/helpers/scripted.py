"""A loaded model whose replies are scripted, for the server's tool-call parsing: the server
picks the tool-call format by the tokenizer's chat template, and a reply given token by token
shows what it makes of each piece, streamed and not."""

from __future__ import annotations

import asyncio

from amlx.types import Token


class TemplateTokenizer:
    """The real tokenizer with a chat_template naming another family's markup (the server picks
    the tool-call format by it); prompts still render with the real one."""

    def __init__(self, tokenizer, template: str | None):
        self.tokenizer, self.chat_template = tokenizer, template or tokenizer.chat_template

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


class ScriptedStream:
    """The tokens of a scripted reply (`pieces`, the last one ending with `finish`)."""

    def __init__(self, pieces: list[str], finish: str):
        self.tokens = [Token(id=0, text=p, finish_reason=finish if k == len(pieces) - 1 else None)
                       for k, p in enumerate(pieces)]

    def __aiter__(self):
        return self

    async def __anext__(self) -> Token:
        if not self.tokens:
            raise StopAsyncIteration
        await asyncio.sleep(0)
        return self.tokens.pop(0)

    def close(self) -> None:
        self.tokens = []


class ScriptedModel:
    """A loaded model whose `generate` writes `scripts[seed]` ((pieces, finish)) for the request's
    seed; everything else is the model's."""

    def __init__(self, model, template: str | None, scripts: dict):
        self.model, self.scripts = model, scripts
        self.tokenizer = TemplateTokenizer(model.tokenizer, template)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def generate(self, prompt, **options):
        return ScriptedStream(*self.scripts[options["seed"]])


def chat_replies(client, **args) -> list[tuple]:
    """(content, [(name, arguments)], finish_reason) of one chat completion through the openai
    client, asked whole and then streamed. The whole reply's content is as the server gave it
    (None possibly); the streamed one is its deltas joined ("" where there were none)."""
    out = []
    choice = client.chat.completions.create(**args).choices[0]
    out.append((choice.message.content,
                [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []],
                choice.finish_reason))
    content, calls, reason = "", [], None
    for chunk in client.chat.completions.create(stream=True, **args):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            calls += [(d.function.name, d.function.arguments) for d in ch.delta.tool_calls or []]
            reason = ch.finish_reason or reason
    out.append((content, calls, reason))
    return out
