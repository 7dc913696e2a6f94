"""Many HTTP clients against one in-process `amlx serve` app at once, in a random interleaving
drawn by hypothesis: streamed and whole /v1/chat/completions and /v1/completions with n > 1,
several prompts, echo, stop strings, max_tokens (or none: the rest of the context),
logprobs / top_logprobs, constraints (response_format json_schema and json_object, regex,
choice, a regex that writes a tool call with tools given), greedy and seeded sampling;
clients that leave mid-stream or before a whole reply comes, clients that never read their
stream (and leave, or read it all at the end); requests whose first choice fails in the
engine (an MLX out-of-memory injected around `model.generate`, FAIL_SEED); malformed bodies
and /health, /v1/models, /metrics calls taking turns on one kept-alive connection; raw
connections that send part of a request and go away.

The app runs under a real uvicorn on a socket of its own in the test's event loop (one per
example), over a freshly loaded model, so that disconnects are real connection closes and the
engine can be looked at afterwards. The model's `generate` is wrapped to record what the server
did with each generation (tokens read from it, whether it was closed before its end).

Checked (behaviour, never timing; anyio.fail_after only guards against a hang):
- a streamed reply read to its end is well-formed SSE: JSON events (no NaN), then `data: [DONE]`
  and nothing after; one id, `created` and model; each chunk one choice whose index lies in
  range; chat opens each choice with the role; one finish_reason per choice, on its last chunk;
  usage (with include_usage) only on the last chunk, null on the others;
- usage equals the tokens the server read from the engine for that request, and the logprob
  entries delivered (one per token; chat's `bytes` make up the text); "length" means
  max_tokens tokens; top_logprobs have the size asked; completions' text_offset locates each
  token in the text; echo puts the prompt (and its tokens' logprobs, the first null) first;
- a greedy or seeded request's choices (text, finish_reason, token count) equal the same request
  sent alone afterwards, and its logprobs agree;
- a finished constrained choice matches its constraint (jsonschema, regex, choice, the call);
  finish_reason is "tool_calls" exactly when a reply that stopped holds calls;
- malformed bodies get a 4xx OpenAI-shaped error, a request beyond the queue a 429 with
  Retry-After, a failed one a 503 or a last error event; nothing else breaks (no error logged);
- a client that left mid-stream or before its whole reply had its generations closed before
  they ran to their (large) max_tokens; every generation ends: finished, closed or failed;
- afterwards: the engine holds no request, every KV block is free or cached, the admission
  slots are all back; the metrics count as finished each generation whose last token the
  server read and as cancelled each other one (but those of failed or refused requests), the
  errors answered, and the tokens read; after shutdown no asyncio task is left.

AMLX_SERVE_STATEFUL_EXAMPLES raises the number of examples for a longer hunt;
AMLX_SERVE_STATEFUL_SHRINK=0 skips shrinking a failure (each step replays whole examples).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import jsonschema
import pytest
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import amlx
from amlx.serve.app import Settings, create_app
from tests.helpers.serving import parse_metrics, serve_checkpoint

MODEL = "tiny"
BATCH = 4
CONTEXT = 4096
LONG = 1500  # max_tokens of a client that leaves: far more than it can see before it goes
GUARD = 60.0  # seconds: a guard against a hang only
# A request whose seed is 100 k + FAIL_SEED fails in its first choice after two tokens, as an
# engine failure (MLX out of memory), injected around `model.generate`: its other choices are
# closed, the client gets a 503 or an error event.
FAIL_SEED = 50

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
          "required": ["ok", "n"], "additionalProperties": False}
CHOICES = ["alpha", "beta", "gamma delta"]
REGEX = "[a-c]{2,5}( [x-z]+)?"
STOPS = ["e", "o ", "\n", "Hel", "an", "日"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CITIES = ["Paris", "Rome", "Oslo"]
# a regex that makes the random model write one Qwen tool call (maybe after a few words)
TOOL_REGEX = r'(Sure\. )?<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome|Oslo)"\}\}\n</tool_call>'
CHATS = [[{"role": "user", "content": "Name a colour."}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
         [{"role": "user", "content": "Count the owls in the barn, please."}]]
PROMPTS = ["Once upon a time", "Once upon a time there was", "The river is called", "日本語のテキスト"]
PROMPT_IDS = [[17, 250, 301, 44], [17, 250, 301, 44, 590, 12], [333, 48]]  # token-id prompts (no echo drawn)

EXAMPLES = int(os.environ.get("AMLX_SERVE_STATEFUL_EXAMPLES", "20"))

MALFORMED = [  # (path, raw body or JSON, content type) -> a 4xx
    ("/v1/chat/completions", b"{not json", "application/json"),
    ("/v1/chat/completions", b"[1, 2]", "application/json"),
    ("/v1/chat/completions", b"\xff\xfe{}", "application/json"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, None),
    ("/v1/chat/completions", {"model": "nope", "messages": CHATS[0]}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHATS[0], "regex": "(("}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHATS[0], "top_logprobs": 3}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHATS[0], "stream": True, "stop": [""]}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHATS[0], "stream_options": {"include_usage": True}}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}],
                              "stream": True}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHATS[0], "bogus": 1}, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHATS[0], "regex": "a", "choice": ["b"]}, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, None),
    ("/v1/completions", {"model": MODEL, "prompt": [10 ** 9]}, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hello " * 5000, "stream": True}, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 17}, None),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, None),
    # the second prompt is over the context: its generation fails to start, the first one's stops
    ("/v1/completions", {"model": MODEL, "prompt": ["Hi", "hello world " * 2100], "n": 2}, None),
    ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x"}).encode(), "text/plain"),
]


# -- what a client does ----------------------------------------------------------------------------

@dataclass
class Client:
    kind: str  # "gen", "malformed", "probe"
    delay: int  # ms before it starts
    path: str = ""
    body: Any = None
    content_type: str | None = None
    # read | drop (after `after` stream lines) | stall (never reads, leaves at the end) | stall_read (reads
    # nothing until the others are done, then all) | leave (a whole reply, left after `after` * 10 ms)
    behaviour: str = "read"
    after: int = 0
    sampling: str = "greedy"
    constraint: str | None = None
    fail: bool = False  # its first choice fails (FAIL_SEED)
    # results
    status: int | None = None
    text: str = ""
    headers: dict = field(default_factory=dict)
    done_reading: bool = False  # read its whole answer
    recs: list = field(default_factory=list)  # the server's generations for it (Recorded)
    capacity: int = 0  # generations the server runs at once

    @property
    def count(self) -> int:
        prompt = self.body.get("prompt") if isinstance(self.body, dict) else None
        prompts = len(prompt) if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else 1
        return self.body.get("n", 1) * prompts


@st.composite
def generation(draw, number: int) -> Client:
    chat = draw(st.booleans())
    body: dict[str, Any] = {"model": MODEL}
    if chat:
        body["messages"] = draw(st.sampled_from(CHATS))
    else:
        body["prompt"] = draw(st.one_of(st.sampled_from(PROMPTS), st.lists(st.sampled_from(PROMPTS), min_size=2,
                                                                             max_size=2),
                                        st.sampled_from(PROMPT_IDS), st.lists(st.sampled_from(PROMPT_IDS), min_size=2,
                                                                              max_size=2)))
    stream = draw(st.booleans())
    behaviour = draw(st.sampled_from(["read"] * 6 + (["drop", "drop", "stall", "stall_read"] if stream else
                                                     ["leave", "leave"])))
    body["n"] = draw(st.sampled_from([1, 1, 1, 2, 3]))
    if behaviour == "stall_read":
        body["max_tokens"] = 300
    elif behaviour != "read":  # (none: the rest of the context)
        body["max_tokens"] = draw(st.sampled_from([LONG, None]))
    else:
        body["max_tokens"] = draw(st.integers(1, 20))
    sampling = draw(st.sampled_from(["greedy", "greedy", "seeded", "free"]))
    if sampling == "greedy":
        body["temperature"] = 0
    else:
        body["temperature"] = draw(st.sampled_from([0.7, 1.0, 1.5]))
    # every request gets its own seed (greedy ones ignore it): the server passes seed + j to choice
    # j, which tells the recorded generations apart
    body["seed"] = 100 * number
    constraint = draw(st.sampled_from([None, None, None, "regex", "choice"] + (["json_schema", "json_object", "tool"]
                                                                                if chat else [])))
    if chat and (constraint == "tool" or (constraint is None and draw(st.booleans()))):
        body["tools"] = TOOLS
        if draw(st.booleans()):
            body["tool_choice"] = "auto"
    if constraint == "tool":
        body["regex"] = TOOL_REGEX
    if constraint == "regex":
        body["regex"] = REGEX
    elif constraint == "choice":
        body["choice"] = CHOICES
    elif constraint == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    elif constraint == "json_object":
        body["response_format"] = {"type": "json_object"}
    if constraint is None and draw(st.booleans()):
        stop = draw(st.lists(st.sampled_from(STOPS), min_size=1, max_size=3, unique=True))
        body["stop"] = stop[0] if len(stop) == 1 and draw(st.booleans()) else stop
    top = draw(st.sampled_from([None, None, 0, 1, 3, 20 if behaviour.startswith("stall") else 2]))
    if top is not None:
        if chat:
            body["logprobs"] = True
            if top:
                body["top_logprobs"] = top
        else:
            body["logprobs"] = top
    texts = not chat and (isinstance(body["prompt"], str) or all(isinstance(x, str) for x in body["prompt"]))
    if texts and draw(st.booleans()):
        body["echo"] = True  # (text prompts: the echo is checked against them)
    if stream:
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    fail = behaviour == "read" and draw(st.integers(0, 9)) == 0
    if fail:  # (nothing that could end the first choice before its third token)
        for key in ("stop", "regex", "choice", "response_format", "tools", "tool_choice", "echo"):
            body.pop(key, None)
        constraint = None
        body["max_tokens"] = max(body["max_tokens"], 3)
        body["seed"] += FAIL_SEED
    return Client("gen", draw(st.integers(0, 30)), path, body, behaviour=behaviour, after=draw(st.integers(0, 6)),
                  sampling=sampling, constraint=constraint, fail=fail)


def malformed(number: int):
    return st.builds(lambda m, delay: Client("malformed", delay, m[0], m[1], m[2]), st.sampled_from(MALFORMED),
                     st.integers(0, 30))


def probe(number: int):
    return st.builds(lambda p, delay: Client("probe", delay, p), st.sampled_from(
        ["/health", "/v1/models", "/v1/models/" + MODEL, "/metrics", "/v1/nothing"]), st.integers(0, 30))


# (seed 99: no client's; its generation, when it gets one, counts as cancelled if unfinished)
_TRUNCATED = json.dumps({"model": MODEL, "messages": CHATS[0], "max_tokens": 5, "seed": 99}).encode()
RAW = {  # raw connections: what is sent, and whether the client then waits for the others
    "truncated body": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n" % len(_TRUNCATED) + _TRUNCATED[:20], False),
    "truncated body, held": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 500\r\n\r\n{\"model\": ", True),
    "headers only, held": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", True),
    "nothing, held": (b"", True),
    "request, gone": (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(_TRUNCATED) + _TRUNCATED, False),
}


def raw(number: int):
    """A connection that sends part of a request (or a whole one) and goes away unanswered."""
    return st.builds(lambda name, delay: Client("raw", delay, name), st.sampled_from(sorted(RAW)), st.integers(0, 30))


@st.composite
def scripts(draw) -> tuple[int, list[Client]]:
    queue = draw(st.sampled_from([0, 3, 32]))  # --max-queue: capacity BATCH + queue generations
    clients = []
    for number in range(1, draw(st.integers(2, 9)) + 1):
        make = draw(st.sampled_from([generation] * 6 + [malformed, probe, raw]))
        clients.append(draw(make(number)))
    return queue, clients


# -- the server's generations, recorded ------------------------------------------------------------

class Recorded:
    """A TokenStream the server got from `model.generate`, with what the server did with it."""

    def __init__(self, stream, ids: list[int], options: dict):
        self.stream = stream
        self.ids = ids
        self.options = options
        self.tokens: list = []
        self.finished = False  # the server read its last token
        self.ended = False  # the stream ended (StopAsyncIteration)
        self.closed_early = False  # closed before its last token
        self.closed = False  # closed by the server (which closes only a choice it has not seen end)
        self.failed = False  # failed on purpose (see FAIL_SEED)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.options.get("seed") is not None and self.options["seed"] % 100 == FAIL_SEED and len(self.tokens) == 2:
            self.failed = True
            self.stream.close()
            raise amlx.MLXError("malloc", "[malloc] out of memory allocating 4096 bytes")
        try:
            tok = await self.stream.__anext__()
        except StopAsyncIteration:
            self.ended = True
            raise
        self.tokens.append(tok)
        if tok.finish_reason is not None:
            self.finished = True
        return tok

    def close(self) -> None:
        self.closed = True
        if not self.finished:
            self.closed_early = True
        self.stream.close()

    async def aclose(self) -> None:
        self.close()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _record(model, recs: list[Recorded]) -> None:
    generate = model.generate

    def recording(prompt, **options):
        rec = Recorded(generate(prompt, **options), list(prompt), options)
        recs.append(rec)
        return rec

    model.generate = recording  # (this instance only: the server calls model.generate)


# -- checks of one answer --------------------------------------------------------------------------

def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _error_shape(c: Client) -> dict:
    assert c.headers.get("content-type", "").startswith("application/json"), (c.path, c.body, c.headers)
    error = _strict_json(c.text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


def _sse(c: Client) -> list:
    """The events of a streamed answer read to its end, checked for framing."""
    assert c.text.endswith("data: [DONE]\n\n"), c.text[-300:]
    events = []
    for block in c.text.split("\n\n")[:-1]:
        assert block, c.text[-500:]
        if block.startswith(":"):
            continue  # a keep-alive comment
        assert block.startswith("data: ") and "\n" not in block, block
        events.append("[DONE]" if block == "data: [DONE]" else _strict_json(block[6:]))
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]"
    return events[:-1]


def _check_stream(c: Client) -> tuple[list[dict], dict | None]:
    """Per choice: {"text", "finish_reason", "logprobs": [...]}; and the usage chunk's usage."""
    body, count = c.body, c.count
    chat = "messages" in body
    events = _sse(c)
    assert not any("error" in e for e in events), events
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    usage = None
    if include_usage:
        assert events and events[-1]["choices"] == [] and events[-1]["usage"] is not None, events[-3:]
        usage = events.pop()["usage"]
    assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
    out = [{"text": "", "finish_reason": None, "logprobs": [], "role": False, "offsets": [], "calls": []}
           for _ in range(count)]
    for e in events:
        assert e["model"] == MODEL and e["object"] == ("chat.completion.chunk" if chat else "text_completion"), e
        assert ("usage" in e and e["usage"] is None) if include_usage else "usage" not in e, e
        assert len(e["choices"]) == 1, e
        ch = e["choices"][0]
        i = ch["index"]
        assert 0 <= i < count, e
        o = out[i]
        assert o["finish_reason"] is None, f"choice {i} has a chunk after its finish_reason: {e}"
        if chat:
            delta = ch["delta"]
            if delta.get("role") is not None:
                assert not o["role"] and delta["role"] == "assistant" and not o["text"], e
                o["role"] = True
            assert o["role"], f"choice {i}: content before its role chunk {e}"
            o["text"] += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                assert call["index"] == len(o["calls"]) and call["type"] == "function" and call["id"], delta
                o["calls"].append((call["function"]["name"], call["function"]["arguments"]))
            if ch.get("logprobs"):
                o["logprobs"] += ch["logprobs"]["content"]
        else:
            o["text"] += ch["text"]
            if ch.get("logprobs"):
                lp = ch["logprobs"]
                assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == \
                    len(lp["text_offset"])
                o["logprobs"] += [{"token": t, "logprob": v, "top": top} for t, v, top in
                                  zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]
                o["offsets"] += lp["text_offset"]
        if ch["finish_reason"] is not None:
            o["finish_reason"] = ch["finish_reason"]
    assert all(o["finish_reason"] for o in out), out
    return out, usage


def _check_offsets(o: dict, stops: bool) -> None:
    """Completions' text_offset: each token's offset in the choice's text (echo included), the
    tokens end to end; where the tokens spell the text (up to a token that is part of a
    character or a special token, and without stop strings, which cut it) it is found there."""
    at, spelled = 0, not stops
    assert len(o["offsets"]) == len(o["logprobs"])
    for e, off in zip(o["logprobs"], o["offsets"]):
        assert off == at, o
        token = e["token"]
        spelled = spelled and "\ufffd" not in token and not re.fullmatch(r"<\|[a-z_]+\|>", token)
        if spelled:
            assert o["text"][off:off + len(token)] == token, (off, token, o["text"])
        at += len(token)


def _check_whole(c: Client) -> tuple[list[dict], dict]:
    body, count = c.body, c.count
    chat = "messages" in body
    reply = _strict_json(c.text)
    assert reply["object"] == ("chat.completion" if chat else "text_completion") and reply["model"] == MODEL
    assert [ch["index"] for ch in reply["choices"]] == list(range(count)), reply
    out = []
    for ch in reply["choices"]:
        if chat:
            assert ch["message"]["role"] == "assistant"
            o = {"text": ch["message"]["content"] or "", "finish_reason": ch["finish_reason"], "logprobs": [],
                 "calls": [(t["function"]["name"], t["function"]["arguments"])
                           for t in ch["message"].get("tool_calls") or []]}
            assert all(t["id"] and t["type"] == "function" for t in ch["message"].get("tool_calls") or [])
            if body.get("logprobs"):
                o["logprobs"] = ch["logprobs"]["content"]
            else:
                assert ch["logprobs"] is None
        else:
            o = {"text": ch["text"], "finish_reason": ch["finish_reason"], "logprobs": [], "calls": []}
            if body.get("logprobs") is not None:
                lp = ch["logprobs"]
                o["logprobs"] = [{"token": t, "logprob": v, "top": top} for t, v, top in
                                 zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"])]
                o["offsets"] = lp["text_offset"]
            else:
                assert ch["logprobs"] is None
        out.append(o)
    return out, reply["usage"]


def _check_generation(c: Client) -> list[dict] | None:
    """Checks a generation request's answer; its choices if it was read to its end with a 200."""
    if c.status != 200:
        error = _error_shape(c)
        if c.status == 429:
            assert c.headers.get("retry-after") == "1" and error["code"] == "queue_full", (c.headers, error)
            return None
        if c.status == 400 and c.count > c.capacity:  # more than the server ever runs at once
            assert error["param"] in ("n", "prompt") and error["code"] == "invalid_value", error
            return None
        raise AssertionError(f"{c.status} for a valid request {c.body}: {c.text}")
    if not c.done_reading:
        return None
    body = c.body
    out, usage = (_check_stream if body.get("stream") else _check_whole)(c)
    assert len(c.recs) == c.count, (len(c.recs), c.body)
    chat = "messages" in body
    want_logprobs = body.get("logprobs") is not None and body.get("logprobs") is not False  # (0 asks for them)
    k = body.get("top_logprobs", 0) if chat else body.get("logprobs")
    for i, o in enumerate(out):
        rec = _rec_of_choice(c, i)
        if not chat and want_logprobs:
            _check_offsets(o, "stop" in body)
        if body.get("echo"):  # each choice opens with its prompt, and with logprobs its prompt's tokens
            prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][i // body["n"]]
            assert o["text"].startswith(prompt), (prompt, o["text"])
            o["text"] = o["text"][len(prompt):]
            if want_logprobs:
                echoed, o["logprobs"] = o["logprobs"][:len(rec.ids)], o["logprobs"][len(rec.ids):]
                assert len(echoed) == len(rec.ids) and echoed[0]["logprob"] is None and echoed[0]["top"] is None
                assert all(e["logprob"] <= 0 and e["token"] in e["top"] for e in echoed[1:]), echoed
        limit = rec.options["max_tokens"]
        assert rec.finished and not rec.closed_early, (i, c.body)
        tokens = len(rec.tokens)
        ended = rec.tokens[-1].finish_reason
        # OpenAI: "tool_calls" when the model ended a reply holding calls; "length" still when cut
        assert o["finish_reason"] == ("tool_calls" if o["calls"] and ended == "stop" else ended), (o, ended)
        if not body.get("tools"):
            assert not o["calls"], o
        if o["finish_reason"] == "length":
            assert tokens == limit, (tokens, limit, body)
        assert tokens <= limit
        o["tokens"] = tokens
        if want_logprobs:
            assert len(o["logprobs"]) == tokens, (len(o["logprobs"]), tokens, body)
            for entry, tok in zip(o["logprobs"], rec.tokens):
                assert math.isclose(entry["logprob"], max(tok.logprob, -9999.0), rel_tol=1e-6, abs_tol=1e-6)
            if chat and "stop" not in body and not o["calls"]:
                # the tokens' bytes make up the text (bytes that are no UTF-8 alone too); a reply
                # that stopped ends in its end-of-sequence token, which is no text
                entries = o["logprobs"]
                if ended == "stop" and re.fullmatch(r"<\|[a-z_]+\|>", entries[-1]["token"]):
                    entries = entries[:-1]
                raw = b"".join(bytes(e["bytes"]) for e in entries)
                assert raw.decode("utf-8", errors="replace") == o["text"], (raw, o["text"])
                if chat:
                    assert len(entry["top_logprobs"]) == k, (entry, k)
                else:
                    assert entry["token"] in entry["top"] and len(entry["top"]) <= k + 1, entry
        else:
            assert not o["logprobs"]
        if ended == "stop" and "stop" not in body:
            _check_constraint(c, o)
    if usage is not None:
        completion = sum(o["tokens"] for o in out)
        assert usage["completion_tokens"] == completion, (usage, completion)
        assert usage["total_tokens"] == usage["prompt_tokens"] + completion
        prompt_tokens = sum(len(_rec_of_choice(c, i).ids) for i in range(0, c.count, body["n"]))
        assert usage["prompt_tokens"] == prompt_tokens, (usage, prompt_tokens)
    return out


def _check_failed(c: Client) -> None:
    """A request whose first choice failed: a 503, or in a stream an error event last; every other
    choice finished or closed."""
    if c.status != 200 or not c.body.get("stream"):
        error = _error_shape(c)
        if c.status == 429:
            return
        assert c.status == 503 and error["code"] == "out_of_memory", (c.status, error)
    elif c.done_reading:
        events = _sse(c)
        assert events and set(events[-1]) == {"error"}, events[-2:]
        assert not any("error" in e for e in events[:-1])
        assert all(len(e["choices"]) == 1 and e["choices"][0]["finish_reason"] != "error" for e in events[:-1])
        error = events[-1]["error"]
        assert error["code"] == "out_of_memory" and set(error) == {"message", "type", "param", "code"}, error
    assert all(r.finished or r.closed_early or r.failed for r in c.recs)


def _rec_of_choice(c: Client, i: int) -> Recorded:
    """Choice i is prompt i // n with seed + i % n."""
    n = c.body["n"]
    seed = c.body["seed"] + i % n
    recs = [r for r in c.recs if r.options.get("seed") == seed]
    return recs[i // n]


def _check_constraint(c: Client, o: dict) -> None:
    body, text = c.body, o["text"]
    if c.constraint == "tool":  # the call is parsed out of the text, words before it stay
        assert text in ("", "Sure. ") and len(o["calls"]) == 1, o
        name, arguments = o["calls"][0]
        assert name == "get_weather" and json.loads(arguments)["city"] in CITIES, o
    elif c.constraint == "regex":
        assert re.fullmatch(REGEX, text), text
    elif c.constraint == "choice":
        assert text in CHOICES, text
    elif c.constraint == "json_schema":
        jsonschema.validate(json.loads(text), SCHEMA)
    elif c.constraint == "json_object":
        assert isinstance(json.loads(text), dict), text
    else:
        assert body.get("regex") is None and body.get("choice") is None
        if not body.get("tools"):
            assert not o["calls"]


# -- one example -----------------------------------------------------------------------------------

class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        # asyncio's note that a socket's peer went away while a write was under way (the server
        # learns of it on the loop's next turn): a client leaving, no failure
        if record.name == "asyncio" and record.getMessage() == "socket.send() raised exception.":
            return
        # (an earlier test's object collected now, whose loop is gone: not this server's)
        if record.exc_info and "Event loop is closed" in str(record.exc_info[1]):
            return
        self.records.append(record)


async def _send(http: httpx.AsyncClient, c: Client, release: asyncio.Event) -> None:
    await asyncio.sleep(c.delay / 1000)
    if c.kind == "raw":
        data, held = RAW[c.path]
        reader, writer = await asyncio.open_connection(http.base_url.host, http.base_url.port)
        writer.write(data)
        await writer.drain()
        if held:
            await release.wait()
        writer.close()
        await writer.wait_closed()
        return
    if c.kind == "probe":
        r = await http.get(c.path)
        c.status, c.text, c.headers, c.done_reading = r.status_code, r.text, dict(r.headers), True
        return
    if isinstance(c.body, bytes):
        content, ctype = c.body, c.content_type
    else:
        content, ctype = json.dumps(c.body).encode(), "application/json"
    headers = {"Content-Type": ctype}
    if c.behaviour == "leave":
        task = asyncio.ensure_future(http.post(c.path, content=content, headers=headers))
        await asyncio.wait([task], timeout=c.after * 0.01)
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return
        r = task.result()
        c.status, c.text, c.headers, c.done_reading = r.status_code, r.text, dict(r.headers), True
        return
    async with http.stream("POST", c.path, content=content, headers=headers) as r:
        c.status, c.headers = r.status_code, dict(r.headers)
        if r.status_code != 200 or c.behaviour == "read":
            c.text = (await r.aread()).decode()
            c.done_reading = True
            return
        if c.behaviour.startswith("stall"):
            await release.wait()  # reads nothing until everyone else is done
            if c.behaviour == "stall":
                return  # and leaves
            c.text = (await r.aread()).decode()
            c.done_reading = True
            return
        lines = 0
        async for line in r.aiter_lines():  # drop: leaves after a few lines
            c.text += line + "\n"
            lines += 1
            if lines > c.after:
                return


async def _until(check, what: str) -> None:
    """Polls `check()` until true (anyio.fail_after: a hang guard, not a timing assertion)."""
    try:
        with anyio.fail_after(GUARD):
            while not check():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


def _idle(stats: dict) -> bool:
    return stats["active_requests"] == 0 and stats["waiting_requests"] == 0 and stats["kv_cache"]["blocks_used"] == 0




def _sum(metrics: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in metrics.items() if k.startswith(prefix + "{") or k == prefix)


REFERENCES: dict[str, list[dict]] = {}  # a request's body -> its choices, sent alone


async def _alone(http: httpx.AsyncClient, c: Client, recs: list[Recorded]) -> list[dict]:
    body = {k: v for k, v in c.body.items() if k not in ("stream", "stream_options") and v is not None}
    key = json.dumps([c.path, body], sort_keys=True)
    if key not in REFERENCES:
        before = len(recs)
        r = await http.post(c.path, json=body)
        alone = Client("gen", 0, c.path, body, sampling=c.sampling, constraint=c.constraint, status=r.status_code,
                       text=r.text, headers=dict(r.headers), done_reading=True, recs=recs[before:],
                       capacity=c.capacity)
        REFERENCES[key] = _check_generation(alone)
    return REFERENCES[key]


@dataclass
class Served:
    model: Any
    app: Any
    url: str
    recs: list  # every generation the server started (Recorded)
    server: Any  # the uvicorn.Server


@contextlib.asynccontextmanager
async def _serving(ckpt, queue: int):
    """A fresh model served by uvicorn in this event loop, on a socket of its own; afterwards:
    no error logged, and (once the server has shut down) no asyncio task left."""
    model = amlx.load_sync(ckpt, max_batch_size=BATCH, max_context=CONTEXT)
    recs: list[Recorded] = []
    _record(model, recs)
    app = create_app(model, Settings(model_name=MODEL, max_batch_size=BATCH, max_queue=queue, keepalive=0.05))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d" % sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5))
    gc.collect()  # (what earlier tests left, before listening for errors)
    errors = _Errors()
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "amlx", "asyncio")]
    for log in loggers:
        log.addHandler(errors)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await _until(lambda: server.started or serving.done(), "the server started")
        yield Served(model, app, url, recs, server)
    finally:
        server.should_exit = True
        with anyio.fail_after(GUARD):
            await serving
        for log in loggers:
            log.removeHandler(errors)
        model.close()
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()], asyncio.all_tasks()
    assert not errors.records, [(r.name, r.getMessage(), r.exc_info) for r in errors.records]


async def _example(ckpt, queue: int, clients: list[Client]) -> None:
    async with _serving(ckpt, queue) as served:
        await _run_clients(served, queue, clients)


async def _run_clients(served: Served, queue: int, clients: list[Client]) -> None:
    model, app, url, recs = served.model, served.app, served.url, served.recs
    release = asyncio.Event()
    for c in clients:
        c.capacity = BATCH + queue
    # probes and malformed bodies take turns on one kept-alive connection: an error answer
    # must leave it usable; each generation has a connection of its own (to leave by)
    shared = httpx.AsyncClient(base_url=url, timeout=GUARD, limits=httpx.Limits(max_connections=1))
    https = [shared if c.kind != "gen" else httpx.AsyncClient(base_url=url, timeout=GUARD) for c in clients]

    async def run(http, c):
        if http is shared:
            await _send(http, c, release)
            return
        async with http:
            await _send(http, c, release)

    with anyio.fail_after(GUARD):
        tasks = [asyncio.ensure_future(run(h, c)) for h, c in zip(https, clients)]
        others = [t for t, c in zip(tasks, clients)
                  if not c.behaviour.startswith("stall") and not (c.kind == "raw" and RAW[c.path][1])]
        if others:
            await asyncio.wait(others)
        release.set()
        await asyncio.gather(*tasks)
    await shared.aclose()
    for c in clients:  # (the recorded generations of each, by its seed, wherever they landed)
        if c.kind == "gen":
            c.recs = [r for r in recs if r.options.get("seed") is not None and
                      r.options["seed"] // 100 == c.body["seed"] // 100]

    # every generation ends: read to its last token, or closed by the server
    await _until(lambda: all(r.finished or r.closed_early or r.failed for r in recs),
                 "every generation finished or closed: "
                 + str([(len(r.tokens), r.options.get("max_tokens")) for r in recs
                        if not (r.finished or r.closed_early or r.failed)]))
    # (stats() read off the worker may catch a round in between: a row that ended leaves, and
    # gives its blocks back, on the round after)
    await _until(lambda: _idle(model.stats()), f"the engine idle with no KV block held: {model.stats()}")
    kv = model.stats()["kv_cache"]
    assert kv["blocks_free"] + kv["blocks_cached"] == kv["blocks_allocated"], kv
    assert app.state.server.admission.inflight == 0

    # the answers
    for c in clients:
        if c.kind == "probe":
            if c.path == "/v1/nothing":
                assert c.status == 404 and _error_shape(c)["code"] == "not_found"
            else:
                assert c.status == 200, (c.path, c.text)
                if c.path == "/health":
                    assert _strict_json(c.text)["status"] == "ok"
                elif c.path == "/metrics":
                    assert "amlx_requests_running" in c.text
                else:
                    assert MODEL in c.text
        elif c.kind == "raw":
            pass  # (only that nothing broke: no error logged, the engine idle, no task left)
        elif c.kind == "malformed":
            # (429: a body whose options only the engine refuses, sent with the queue full)
            assert c.status in (400, 404, 429), (c.status, c.body, c.text)
            _error_shape(c)
        elif c.behaviour in ("drop", "stall", "leave"):
            if c.status is not None and c.status != 200:
                _check_generation(c)  # (a 429)
            for r in c.recs:
                assert not r.finished or len(r.tokens) < r.options["max_tokens"], \
                    f"a client left, its generation ran on: {c.body}"
        elif c.fail and any(r.failed for r in c.recs):
            _check_failed(c)
        else:
            out = _check_generation(c)
            if out is not None and c.sampling != "free":
                async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
                    ref = await _alone(http, c, recs)
                for i, (got, want) in enumerate(zip(out, ref)):
                    assert (got["text"], got["finish_reason"], got["tokens"]) == \
                        (want["text"], want["finish_reason"], want["tokens"]), (i, got, want, c.body)
                    for a, b in zip(got["logprobs"], want["logprobs"]):
                        assert math.isclose(a["logprob"], b["logprob"], rel_tol=1e-4, abs_tol=1e-4), (a, b)

    # the server's books
    await _until(lambda: all(r.finished or r.closed_early or r.failed for r in recs), "reference generations ended")
    async with httpx.AsyncClient(base_url=url, timeout=GUARD) as http:
        m = parse_metrics((await http.get("/metrics")).text)
    # finished: each generation whose last token the server handled (it then never closes it; a
    # last token read but not yet handled when the request ended counts as closed); cancelled
    # ("because the client went away"): each one it closed, but those of a request refused or
    # failed (no client left)
    failed = {id(r) for c in clients if c.kind == "gen" and any(x.failed for x in c.recs) for r in c.recs}
    finished = sum(r.finished and not r.closed for r in recs)
    cancelled = sum(r.closed and r.options.get("seed") is not None and id(r) not in failed for r in recs)
    assert _sum(m, "amlx_generations_finished_total") == finished, (finished, m)
    assert _sum(m, "amlx_requests_cancelled_total") == cancelled, (cancelled, m)
    left = sum(c.count for c in clients if c.kind == "gen" and c.behaviour in ("drop", "stall", "leave")) + \
        sum(c.kind == "raw" and c.path == "request, gone" for c in clients)
    assert cancelled <= left
    # tokens: those read from the engine (less, for a generation closed or of a failed request,
    # any read but not yet handled when the request ended)
    counted, read = _sum(m, "amlx_generation_tokens_total"), sum(len(r.tokens) for r in recs)
    unsure = sum(len(r.tokens) for r in recs if r.closed or id(r) in failed)
    assert read - unsure <= counted <= read, (counted, read)
    statuses = [c.status for c in clients if c.status is not None and c.status >= 400]
    unseen = sum(c.status is None for c in clients)  # (left before the status line: a 429 maybe)
    for status in set(statuses) | {429}:
        counted = m.get(f'amlx_request_errors_total{{status="{status}"}}', 0)
        assert statuses.count(status) <= counted <= statuses.count(status) + unseen * (status == 429), (status, m)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return serve_checkpoint(tmp_path_factory.mktemp("serve-stateful-ckpt"), seed=3)


# (shrinking a failing script replays whole examples; AMLX_SERVE_STATEFUL_SHRINK=0 skips it)
_PHASES = [p for p in Phase if p is not Phase.shrink or os.environ.get("AMLX_SERVE_STATEFUL_SHRINK", "1") != "0"]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), phases=_PHASES)
@given(script=scripts())
def test_many_clients_at_once(ckpt, script):
    queue, clients = script
    asyncio.run(_example(ckpt, queue, clients))


def test_a_request_refused_midway_cancels_nothing_a_client_left(ckpt):
    """A completions request whose second prompt is over the context is refused (400). It was
    refused after its first prompt's choices were submitted, which were closed as if their
    client had gone away and counted in amlx_requests_cancelled_total ("cancelled because the
    client went away"): a refused request showed up as clients leaving. Now its prompts are
    checked before anything starts (`Generation.check`): nothing is submitted, nothing counted."""
    async def body():
        async with _serving(ckpt, 4) as served:
            async with httpx.AsyncClient(base_url=served.url, timeout=GUARD) as http:
                r = await http.post("/v1/completions", json={"model": MODEL, "prompt": ["Hi", "hello world " * 2100],
                                                             "n": 2, "max_tokens": 50, "temperature": 0})
                assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
                assert served.recs == []  # (checked before any choice started)
                await _until(lambda: _idle(served.model.stats()), "the engine idle")
                m = parse_metrics((await http.get("/metrics")).text)
                assert _sum(m, "amlx_requests_cancelled_total") == 0, m
                assert m['amlx_request_errors_total{status="400"}'] == 1
                assert served.app.state.server.admission.inflight == 0
                r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
                assert r.status_code == 200

    asyncio.run(body())


def test_a_failed_choice_cancels_nothing_a_client_left(ckpt):
    """Of n = 3 choices the first fails after two tokens (MLX out of memory, injected): the
    request is a 503, or in a stream an error event. The other two were closed and counted in
    amlx_requests_cancelled_total as if their client had gone away; they are closed, not counted."""
    async def body():
        async with _serving(ckpt, 4) as served:
            async with httpx.AsyncClient(base_url=served.url, timeout=GUARD) as http:
                for stream in (False, True):
                    r = await http.post("/v1/chat/completions", json={
                        "model": MODEL, "messages": CHATS[0], "n": 3, "max_tokens": 40, "temperature": 0,
                        "seed": 100 + FAIL_SEED, "stream": stream})
                    if stream:
                        assert r.status_code == 200 and '"code":"out_of_memory"' in r.text.split("\n\n")[-3], r.text
                    else:
                        assert r.status_code == 503 and r.json()["error"]["code"] == "out_of_memory", r.text
                await _until(lambda: _idle(served.model.stats()), "the engine idle")
                assert len(served.recs) == 6 and sum(rec.failed for rec in served.recs) == 2
                assert all(rec.failed or rec.closed_early for rec in served.recs)
                m = parse_metrics((await http.get("/metrics")).text)
                assert _sum(m, "amlx_requests_cancelled_total") == 0, m
                assert served.app.state.server.admission.inflight == 0

    asyncio.run(body())


def test_a_client_gone_while_sending_its_body_is_no_error(ckpt):
    """A client that goes away while sending its body: FastAPI reports that as a 400 "There was
    an error parsing the body", which was answered (to nobody) as "the body is not JSON that can
    be read" and counted in amlx_request_errors_total{status="400"}, an error of a request that
    never came whole. It is answered as a request whose client left (499), not counted."""
    async def body():
        async with _serving(ckpt, 4) as served:
            host, port = served.url.rsplit(":", 1)
            for _ in range(2):
                reader, writer = await asyncio.open_connection(host[len("http://"):], int(port))
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 500\r\n\r\n{\"model\": ")
                await writer.drain()
                await _until(lambda: served.server.server_state.tasks, "the request read")
                writer.close()
                await writer.wait_closed()
                await _until(lambda: not served.server.server_state.tasks, "the request handled")
            async with httpx.AsyncClient(base_url=served.url, timeout=GUARD) as http:
                m = parse_metrics((await http.get("/metrics")).text)
            assert not [k for k in m if k.startswith("amlx_request_errors_total")], m

    asyncio.run(body())


def test_echo_logprobs_of_a_request_past_the_queue_are_not_computed(ckpt):
    """With every admission slot taken, a /v1/completions request with echo and logprobs is a
    429, as any request past the queue is; it first computed its prompt's logprobs (a prefill
    on the engine per prompt, outside admission control), then was refused."""
    async def body():
        async with _serving(ckpt, 0) as served:  # BATCH generations at once, no queue
            calls = []
            prompt_logprobs = served.model.prompt_logprobs

            async def recording(*args, **kwargs):
                calls.append(args)
                return await prompt_logprobs(*args, **kwargs)

            served.model.prompt_logprobs = recording
            async with httpx.AsyncClient(base_url=served.url, timeout=GUARD) as http:
                busy = {"model": MODEL, "prompt": "Once upon a time", "n": BATCH, "max_tokens": LONG, "stream": True,
                        "temperature": 0}
                async with http.stream("POST", "/v1/completions", json=busy) as held:
                    assert held.status_code == 200
                    await _until(lambda: len(served.recs) == BATCH, "the slots taken")
                    async with httpx.AsyncClient(base_url=served.url, timeout=GUARD) as other:
                        r = await other.post("/v1/completions", json={
                            "model": MODEL, "prompt": ["The river is called", "Once upon a time"], "echo": True,
                            "logprobs": 2, "max_tokens": 3})
                    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full", r.text
                    assert calls == []
                await _until(lambda: _idle(served.model.stats()), "the engine idle")
                r = await http.post("/v1/completions", json={"model": MODEL, "prompt": "The river is called",
                                                             "echo": True, "logprobs": 2, "max_tokens": 3})
                assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("The river is called")
                assert len(calls) == 1 and served.app.state.server.admission.inflight == 0

    asyncio.run(body())


def test_a_client_gone_during_echo_logprobs_stops_them(ckpt):
    """The prompt logprobs of an echo request (a prefill on the engine) ran on after its client
    had gone, holding its admission slots; nothing listened for the disconnect until the
    generations started. Here they never end by themselves (the wrapper waits for good): the
    client leaves, and they must be cancelled, the slots given back, nothing counted."""
    async def body():
        async with _serving(ckpt, 4) as served:
            state = {"called": 0, "cancelled": 0}

            async def stuck(*args, **kwargs):
                state["called"] += 1
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    state["cancelled"] += 1
                    raise

            served.model.prompt_logprobs = stuck
            for stream in (False, True):
                http = httpx.AsyncClient(base_url=served.url, timeout=GUARD)
                task = asyncio.ensure_future(http.post("/v1/completions", json={
                    "model": MODEL, "prompt": "Once upon a time", "echo": True, "logprobs": 1, "max_tokens": 3,
                    "stream": stream}))
                await _until(lambda: state["called"] == 1 + stream, "the prompt logprobs asked")
                task.cancel()  # the client gives up: its connection closes
                await asyncio.gather(task, return_exceptions=True)
                await http.aclose()
                try:
                    with anyio.fail_after(10):  # (a guard: without a watch they never end)
                        while state["cancelled"] < 1 + stream:
                            await asyncio.sleep(0.01)
                except TimeoutError:
                    raise AssertionError("the prompt logprobs of a request whose client left ran on") from None
            await _until(lambda: not served.server.server_state.tasks, "the requests handled")
            assert served.app.state.server.admission.inflight == 0 and not served.recs
            async with httpx.AsyncClient(base_url=served.url, timeout=GUARD) as http:
                m = parse_metrics((await http.get("/metrics")).text)
            assert not [k for k in m if k.startswith("amlx_request_errors_total")], m

    asyncio.run(body())
