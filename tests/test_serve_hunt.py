"""A bug hunt of `amlx serve` through the official openai client and raw HTTP: what the other
server tests leave out. Each test that guards a fix says what was wrong before it.

One server (a subprocess, with an API key) over a tiny random Qwen3 whose greedy replies never
end early (tests.helpers.serving.serve_checkpoint): streamed and whole replies of one greedy
request must agree token for token, and replies are compared with each other, not with text.
"""

from __future__ import annotations

import asyncio
import json
import socket

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.serving import ServerProcess, serve_checkpoint

KEY = "hunt-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = serve_checkpoint(tmp_path_factory.mktemp("hunt-ckpt"), seed=3)
    with ServerProcess(ckpt, "--model-name", "tiny", "--max-context", "512", "--keepalive", "0.2",
                       api_key=KEY) as srv:
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as client:
        yield client


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


# -- auth comes before the body ---------------------------------------------------------------

def _raw_request(server, head: bytes, body: bytes = b"") -> bytes:
    """Sends a request's head (and part of a body) on a raw socket; the reply's head and body as
    they come (the socket is read until the server ends the reply or 30 s pass: a hang guard)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
                dict(line.split(b": ", 1) for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]).get(
                    b"content-length", b"0")):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data


def test_a_request_without_the_key_is_a_401_before_its_body_is_read(server):
    """The key was checked as a FastAPI dependency, which runs after the body is read and parsed:
    a body that was not JSON got a 400 without a key (the key mattered for every other body), and
    a client without a key had its whole body read, of any size, before it was refused."""
    for path in ("/v1/chat/completions", "/v1/completions"):
        with httpx.Client(base_url=server.url, timeout=60) as anon:
            r = anon.post(path, content=b'{"model": "tiny", "messages": [', headers={"Content-Type": "application/json"})
            assert _error(r, 401)["code"] == "invalid_api_key"
            r = anon.post(path, content=b'{bad', headers={"Content-Type": "application/json",
                                                           "Authorization": "Bearer wrong"})
            assert _error(r, 401)["code"] == "invalid_api_key"
        with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as keyed:  # with the key: the body's 400
            r = keyed.post(path, content=b'{bad', headers={"Content-Type": "application/json"})
            assert _error(r, 400)["code"] == "invalid_json"
        # a body announced as a gigabyte, of which nothing is sent: refused at once, unread
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: 1000000000\r\n\r\n").encode()
        reply = _raw_request(server, head, b'{"model": "tiny", ')
        assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
        assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "invalid_api_key"
    # refused unread, a whole body does not spoil a kept-alive connection's next request
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    with httpx.Client(base_url=server.url, timeout=60, limits=limits) as one:
        big = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "x" * 200_000}]}
        for _ in range(2):
            assert one.post("/v1/chat/completions", json=big, headers={"Authorization": "Bearer no"}).status_code == 401
            r = one.post("/v1/chat/completions", json={**big, "messages": CHAT}, headers=AUTH)
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
    assert server.alive()


def test_every_route_but_health_and_the_page_needs_the_key(server):
    """The key guards every API route (a wrong or missing key, or another scheme: 401 in
    OpenAI's shape with WWW-Authenticate); /health and the chat page's files are open."""
    chat = {"model": "tiny", "messages": CHAT, "max_tokens": 1}
    calls = [("GET", "/v1/models", None), ("GET", "/v1/models/tiny", None), ("GET", "/v1/models/nope", None),
             ("GET", "/metrics", None), ("POST", "/v1/chat/completions", chat),
             ("POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1})]
    with httpx.Client(base_url=server.url, timeout=60) as h:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
            for method, path, body in calls:
                r = h.request(method, path, json=body, headers=headers)
                assert _error(r, 401)["code"] == "invalid_api_key", (method, path, headers)
                assert r.headers["www-authenticate"] == "Bearer"
        for method, path, body in calls:
            r = h.request(method, path, json=body, headers=AUTH)
            assert r.status_code == (404 if path.endswith("nope") else 200), (path, r.text)
        for path in ("/health", "/", "/static/chat.js"):
            assert h.get(path).status_code == 200, path


# -- completions top_logprobs: texts that several tokens share -------------------------------------

def test_completion_top_logprobs_keep_the_sampled_tokens_own_logprob(http):
    """top_logprobs of /v1/completions is a dict keyed by text, and tokens can share a text:
    every token holding part of a character reads U+FFFD. Built as {text: logprob}, the last
    (least likely) such token won, so a greedy token's own text showed a lower logprob than
    its token_logprobs entry, and the best alternative looked worse than it was."""
    collided = 0
    for prompt in ("Hello", "日本語", "😀 x"):
        for stream in (False, True):
            r = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 30,
                                                   "temperature": 0, "logprobs": 5, "stream": stream})
            assert r.status_code == 200, r.text
            if stream:
                events = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
                parts = [c["logprobs"] for e in events for c in e["choices"] if c["logprobs"]]
            else:
                parts = [r.json()["choices"][0]["logprobs"]]
            tokens = [t for p in parts for t in p["tokens"]]
            logprobs = [lp for p in parts for lp in p["token_logprobs"]]
            tops = [d for p in parts for d in p["top_logprobs"]]
            assert len(tokens) == len(logprobs) == len(tops) == 30
            for token, logprob, top in zip(tokens, logprobs, tops):
                assert top[token] == logprob, (token, logprob, top)
                # greedy: the chosen token is the likeliest, its text first
                assert max(top.values()) == logprob and next(iter(top)) == token, (token, logprob, top)
                collided += len(top) < 5
    assert collided  # (the tiny model's replies hold byte tokens that share the text U+FFFD)


# -- streamed and whole replies agree -----------------------------------------------------------

def _stream_events(text: str) -> list[dict]:
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


def _same(a, b) -> bool:
    """Equal, but for floats (logprobs) within 1e-3: the two requests ran in other batches and
    the second on the prefix cache, which change logprobs by floating-point noise (DESIGN.md)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-3
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


STOP_POOL = ["e", "an", "o ", "日", "\ufffd", "th", "x\n", "zz"]


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(chat=st.booleans(), n=st.integers(1, 3), seed=st.integers(0, 2**31), temperature=st.sampled_from([0.0, 0.8]),
       stop=st.lists(st.sampled_from(STOP_POOL), max_size=3, unique=True), top=st.sampled_from([None, 0, 2]),
       prompt=st.sampled_from(["Hello", "日本語のテキスト", "Count the owls 😀"]))
def test_streamed_and_whole_replies_agree(server, chat, n, seed, temperature, stop, top, prompt):
    """One request, sent whole and streamed (with include_usage): each choice's text, finish
    reason, logprob entries and the usage agree; the streamed text only grows (no chunk ever
    shows text, say a stop string's first part, that the end takes back) and holds no stop
    string; the usage chunk comes last, counting every token."""
    body: dict = {"model": "tiny", "max_tokens": 12, "n": n, "seed": seed, "temperature": temperature}
    if stop:
        body["stop"] = stop
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
        if top is not None:
            body.update(logprobs=True, top_logprobs=top)
    else:
        path, body["prompt"] = "/v1/completions", prompt
        if top is not None:
            body["logprobs"] = top
    with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as http:
        whole = http.post(path, json=body)
        streamed = http.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
        # the same without stop strings (and so long that it passes the first stop string): each
        # choice's text must be this one's up to the first stop string, which nothing shows
        raw = http.post(path, json={**{k: v for k, v in body.items() if k != "stop"}, "max_tokens": 24}) \
            if stop else None
    assert whole.status_code == 200 and streamed.status_code == 200, (whole.text, streamed.text)
    if raw is not None:
        assert raw.status_code == 200, raw.text
        for c, r in zip(whole.json()["choices"], raw.json()["choices"]):
            text, full = (c["message"]["content"], r["message"]["content"]) if chat else (c["text"], r["text"])
            cut = min((k for k in (full.find(s) for s in stop) if k >= 0), default=-1)
            if c["finish_reason"] == "stop":
                assert cut >= 0 and text == full[:cut], (text, full, stop)
            else:  # max_tokens came first (maybe inside a character: its bytes so far read U+FFFD)
                text = text.rstrip("\ufffd")
                assert full.startswith(text) and (cut < 0 or cut >= len(text)), (text, full, stop)
    whole, events = whole.json(), _stream_events(streamed.text)
    # (the second of the two requests finds the prompt in the prefix cache)
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert events[-1]["choices"] == [] and [events[-1]["usage"][k] for k in counts] == [whole["usage"][k] for k in counts]
    assert all(e["usage"] is None for e in events[:-1])
    texts, finishes, entries = {}, {}, {}
    for e in events[:-1]:
        [c] = e["choices"]
        i = c["index"]
        piece = c["delta"].get("content") or "" if chat else c["text"]
        texts[i] = texts.get(i, "") + piece
        assert not any(s in texts[i] for s in stop), (texts[i], stop)
        if c["finish_reason"] is not None:
            assert i not in finishes
            finishes[i] = c["finish_reason"]
        if c["logprobs"]:
            lp = c["logprobs"]
            entries.setdefault(i, []).extend(lp["content"] if chat else zip(lp["tokens"], lp["token_logprobs"],
                                                                             lp["top_logprobs"], lp["text_offset"]))
    assert [c["index"] for c in whole["choices"]] == list(range(n))
    for c in whole["choices"]:
        i = c["index"]
        text = c["message"]["content"] if chat else c["text"]
        assert texts[i] == text and finishes[i] == c["finish_reason"]
        assert c["finish_reason"] == "stop" or not stop or c["finish_reason"] == "length"
        if top is None:
            assert c["logprobs"] is None and i not in entries
        elif chat:
            assert _same(entries[i], c["logprobs"]["content"]), (entries[i], c["logprobs"]["content"])
            assert all(len(e["top_logprobs"]) == top for e in entries[i])
        else:
            lp = c["logprobs"]
            expected = list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]))
            assert _same(entries[i], expected), (entries[i], expected)
    if top is not None:  # a logprob entry per token
        assert whole["usage"]["completion_tokens"] == sum(len(entries[i]) for i in range(n))


# -- a streamed request that fails is counted ----------------------------------------------------

async def test_a_streamed_request_that_fails_midway_is_counted(tmp_path):
    """A streamed request that fails after its 200 gets its error as an SSE event, and no status
    is answered: amlx_request_errors_total (by status) never counted it, and its generation is
    neither finished nor cancelled, so a failing streamed request showed in no metric at all.
    tests.helpers.failing_server fails a request of seed 666 (MLX out of memory: 503) or 667
    (a bug: 500) after two tokens."""
    ckpt = serve_checkpoint(tmp_path / "ckpt", seed=4)
    with ServerProcess(ckpt, module="tests.helpers.failing_server") as srv:
        client = srv.client()
        for seed in (666, 667, 666):
            stream = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, seed=seed,
                                                          stream=True)
            with pytest.raises(openai.APIError):
                async for _ in stream:
                    pass
        with pytest.raises(openai.APIStatusError) as info:  # whole: answered with its status, counted as such
            await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, seed=666)
        assert info.value.status_code == 503
        m = srv.metrics()
        assert m['amlx_stream_errors_total{status="503"}'] == 2 and m['amlx_stream_errors_total{status="500"}'] == 1
        assert m['amlx_request_errors_total{status="503"}'] == 1 and 'amlx_request_errors_total{status="500"}' not in m


# -- errors name the field ---------------------------------------------------------------------

def test_errors_about_the_prompt_or_a_constraint_name_the_field(http):
    """A token id outside the vocabulary, a prompt over the context (OpenAI's
    context_length_exceeded names "messages") and a constraint llguidance gives up on ("the
    regex constraint cannot be followed: ...") came back with param null."""
    long_chat = [{"role": "user", "content": "hello world " * 400}]
    for path, body, param in [
            ("/v1/completions", {"prompt": [-1]}, "prompt"),
            ("/v1/completions", {"prompt": ["hi", [3, 10**6]]}, "prompt"),
            ("/v1/completions", {"prompt": "hello world " * 400}, "prompt"),
            ("/v1/completions", {"prompt": [5] * 600}, "prompt"),
            ("/v1/chat/completions", {"messages": long_chat}, "messages"),
            ("/v1/completions", {"prompt": "x", "regex": "(a{1000}){1000}"}, "regex"),
            ("/v1/chat/completions", {"messages": CHAT, "grammar": "start: start"}, "grammar")]:
        r = http.post(path, json={"model": "tiny", "max_tokens": 2, **body})
        assert _error(r, 400)["param"] == param, (body, r.text)
    r = http.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 2, "messages": long_chat})
    assert r.json()["error"]["code"] == "context_length_exceeded"


# -- structured outputs through the client's helpers -----------------------------------------------

async def test_structured_output_through_the_clients_parse_helpers(server):
    """`client.beta.chat.completions.parse` and `.stream` with a pydantic model: the client sends
    response_format json_schema (strict) and parses the reply into the model; whole and streamed
    give the same object, and n > 1 choices each parse."""
    from typing import Literal

    from pydantic import BaseModel

    class Answer(BaseModel):
        ok: bool
        colour: Literal["red", "green", "blue"]
        count: Literal[1, 2, 3]

    client = server.client()
    kw = dict(model="tiny", messages=CHAT, max_tokens=60, temperature=0)
    whole = await client.beta.chat.completions.parse(response_format=Answer, **kw)
    choice = whole.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Answer)
    async with client.beta.chat.completions.stream(response_format=Answer, **kw) as stream:
        streamed = await stream.get_final_completion()
    assert streamed.choices[0].message.parsed == choice.message.parsed
    assert streamed.choices[0].message.content == choice.message.content
    several = await client.beta.chat.completions.parse(response_format=Answer, **{**kw, "temperature": 1.0},
                                                       n=3, seed=11)
    assert [isinstance(c.message.parsed, Answer) and c.finish_reason == "stop" for c in several.choices] == [True] * 3


# -- a Lark grammar quoting a special token's text ----------------------------------------------------

def test_a_grammar_quoting_an_added_tokens_text_is_followed(http):
    """`"<tool_call>"` quoted in a Lark grammar is text (unquoted, `<tool_call>` names the token):
    the same text through a regex is followed. It took the tokenizer under which names resolve, the
    quoted text's forced bytes became that one token, and the parser refused it (a 500)."""
    for constraint in ({"regex": "<tool_call>x"}, {"grammar": 'start: "<tool_call>" "x"'}):
        r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 20, **constraint})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "<tool_call>x"


# -- tool calls through the client's helpers ---------------------------------------------------------

async def test_tool_calls_through_the_clients_stream_and_parse_helpers(tmp_path):
    """The client's own accumulator (`client.beta.chat.completions.stream`) assembles the streamed
    delta.tool_calls into the message the whole reply has, and `parse` reads the arguments into
    the tool's pydantic model (openai.pydantic_function_tool: a strict tool), n > 1 included.
    tests.helpers.serving.tool_checkpoint writes one get_weather call when tools are given."""
    from pydantic import BaseModel

    from tests.helpers.serving import tool_checkpoint

    class get_weather(BaseModel):  # noqa: N801 - the tool's name is the model's
        city: str
        unit: str

    tool = openai.pydantic_function_tool(get_weather)
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with ServerProcess(tool_checkpoint(tmp_path / "tools"), "--model-name", "tools") as srv:
        client = srv.client()
        kw = dict(model="tools", messages=messages, tools=[tool], temperature=0, max_tokens=10, n=2)
        whole = await client.beta.chat.completions.parse(**kw)
        async with client.beta.chat.completions.stream(**kw) as stream:
            streamed = await stream.get_final_completion()
        for a, b in zip(whole.choices, streamed.choices, strict=True):
            assert a.finish_reason == b.finish_reason == "tool_calls"
            [ca], [cb] = a.message.tool_calls, b.message.tool_calls
            assert (ca.function.name, ca.function.arguments) == (cb.function.name, cb.function.arguments)
            assert ca.function.parsed_arguments == cb.function.parsed_arguments == get_weather(city="Paris",
                                                                                                unit="celsius")
            assert not a.message.content and not b.message.content


# -- a request's checks leave the event loop free -------------------------------------------------

async def test_a_requests_checks_run_off_the_event_loop(tmp_path, monkeypatch):
    """The first check of a constraint runs llguidance's check of its grammar: about a second
    for a JSON schema of thousands of optional properties (3 s for 8,000), which every other
    client's request waited out on the event loop. Here the check of one request waits until
    another request has been answered: the second is served while the first is being checked."""
    import threading

    import anyio

    import amlx
    from amlx.serve.app import Settings, create_app
    from amlx.serve.generation import Generation

    checking, other_answered = threading.Event(), threading.Event()
    seen: dict = {}
    check = Generation.check

    def slow_check(self, *args, **kwargs):
        checking.set()
        seen["waited"] = other_answered.wait(20)  # (a bound: on the event loop it is never set)
        return check(self, *args, **kwargs)

    monkeypatch.setattr(Generation, "check", slow_check)
    model = await amlx.load(serve_checkpoint(tmp_path / "ckpt"))
    try:
        app = create_app(model, Settings(model_name="tiny"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://amlx") as client:
            async def first():
                return await client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT,
                                                                        "max_tokens": 3})

            async def second():
                r = await client.get("/v1/models")
                other_answered.set()
                return r

            slow = asyncio.ensure_future(first())
            await anyio.to_thread.run_sync(checking.wait, 20)  # (the first request is in its check)
            models = await second()
            reply = await slow
    finally:
        await model.aclose()
    assert models.status_code == 200 and reply.status_code == 200, reply.text
    assert seen["waited"]
