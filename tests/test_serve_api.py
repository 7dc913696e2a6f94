"""`amlx serve` through the official openai client (AsyncOpenAI), the server a subprocess.

Greedy results are compared with the same checkpoint run in-process through the public
API (`model.complete`), so the server adds nothing and drops nothing. Options the engine
has not got yet in this branch are tested in test_serve_engine_options.py.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

import amlx
from tests.helpers.serving import TOOL_CALL_JSON, ServerProcess, serve_checkpoint, tool_checkpoint

KEY = "test-key-123"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return serve_checkpoint(tmp_path_factory.mktemp("serve-ckpt"))


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "requests.jsonl"
    with ServerProcess(ckpt, "--model-name", "tiny", "--keepalive", "0.2", "--max-context", "512",
                       "--log-requests", str(log), api_key=KEY) as srv:
        srv.request_log = log
        yield srv


@pytest.fixture(scope="module")
def model(ckpt):
    with amlx.load_sync(ckpt, max_context=512) as m:
        yield m


@pytest.fixture
def client(server):
    return server.client()


async def _stream_chat(client, **kw):
    stream = await client.chat.completions.create(model="tiny", stream=True, **kw)
    texts: dict[int, str] = {}
    finishes: dict[int, list] = {}
    async for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason is not None:
                finishes.setdefault(ch.index, []).append(ch.finish_reason)
    return texts, finishes


async def test_models_list(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert (await client.models.retrieve("tiny")).id == "tiny"


async def test_chat_matches_in_process_and_stream(client, model):
    ref = await model.complete(CHAT, max_tokens=24)
    r = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == ref.usage.prompt_tokens and r.usage.completion_tokens == 24
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    texts, finishes = await _stream_chat(client, messages=CHAT, max_tokens=24, temperature=0)
    assert texts == {0: ref.text}
    assert finishes == {0: ["length"]}  # exactly once


async def test_completions_match_in_process_and_stream(client, model):
    ref = await model.complete("The quick brown fox", max_tokens=20)
    r = await client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=20, temperature=0)
    assert r.choices[0].text == ref.text and r.choices[0].finish_reason == "length"
    stream = await client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=20,
                                             temperature=0, stream=True)
    text, finishes = "", []
    async for chunk in stream:
        text += chunk.choices[0].text
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert text == ref.text and finishes == ["length"]
    ids = model.tokenizer.encode("Hello world")
    r = await client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == (await model.complete(ids, max_tokens=8)).text


async def test_n3_seeds_and_reproducibility(client, model):
    kw = dict(messages=CHAT, max_tokens=16, temperature=1.0, seed=7, n=3)
    r1 = await client.chat.completions.create(model="tiny", **kw)
    r2 = await client.chat.completions.create(model="tiny", **kw)
    texts = [c.message.content for c in sorted(r1.choices, key=lambda c: c.index)]
    assert [c.index for c in r1.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in sorted(r2.choices, key=lambda c: c.index)]
    for i, text in enumerate(texts):  # choice i samples with seed + i
        assert text == (await model.complete(CHAT, max_tokens=16, temperature=1.0, seed=7 + i)).text
    assert len(set(texts)) == 3
    assert r1.usage.completion_tokens == 48
    streamed, finishes = await _stream_chat(client, **kw)
    assert [streamed[i] for i in range(3)] == texts
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}


async def test_stop(client, model):
    ref = (await model.complete(CHAT, max_tokens=30)).text
    k = next(k for k in range(4, len(ref) - 3) if ref.find(ref[k:k + 2]) == k and ref[k:k + 2].strip())
    stop = ref[k:k + 2]
    r = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].message.content == ref[:k] and r.choices[0].finish_reason == "stop"
    texts, finishes = await _stream_chat(client, messages=CHAT, max_tokens=30, temperature=0, stop=stop)
    assert texts == {0: ref[:k]} and finishes == {0: ["stop"]}


async def test_logprobs_match_in_process(client, model):
    ref = await model.complete(CHAT, max_tokens=12, logprobs=True)
    r = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0,
                                             logprobs=True)
    got = [e.logprob for e in r.choices[0].logprobs.content]
    assert got == pytest.approx(ref.logprobs, abs=1e-4)
    assert [e.token for e in r.choices[0].logprobs.content] == [model.tokenizer.decode([i]) for i in ref.token_ids]
    c = await client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0, logprobs=0)
    ref = await model.complete("Hello", max_tokens=6, logprobs=True)
    assert c.choices[0].logprobs.token_logprobs == pytest.approx(ref.logprobs, abs=1e-4)


async def test_usage_chunk(client):
    stream = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0,
                                                  stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 5
    assert all(c.usage is None for c in chunks[:-1])


async def test_raw_sse_ends_with_done(server):
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "stream": True}
    async with httpx.AsyncClient() as h:
        async with h.stream("POST", server.base_url + "/chat/completions", json=body,
                            headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert sum(json.loads(e[6:])["choices"][0]["finish_reason"] is not None for e in events[:-1]) == 1


async def _expect_error(coro, status: int, code: str | None = None):
    with pytest.raises(openai.APIStatusError) as info:
        await coro
    assert info.value.status_code == status, info.value
    err = info.value.body if "message" in (info.value.body or {}) else (info.value.body or {}).get("error", {})
    assert set(err) >= {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code
    return err


async def _still_serving(client):
    r = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length"


async def test_stream_options_without_stream(client):
    await _expect_error(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2,
                                                       stream_options={"include_usage": True}), 400)
    await _still_serving(client)


async def test_errors_keep_the_server_serving(server, client):
    bad = server.client(api_key="wrong")
    await _expect_error(bad.models.list(), 401, "invalid_api_key")
    await _expect_error(bad.chat.completions.create(model="tiny", messages=CHAT), 401)
    await _expect_error(client.chat.completions.create(model="nope", messages=CHAT, max_tokens=2), 404,
                        "model_not_found")
    await _expect_error(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=-1), 400)
    await _expect_error(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2,
                                                       temperature="hot"), 400)
    await _expect_error(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2,
                                                       extra_body={"no_such_field": 1}), 400, "unsupported_parameter")
    long = [{"role": "user", "content": "hello world " * 400}]
    err = await _expect_error(client.chat.completions.create(model="tiny", messages=long, max_tokens=2), 400,
                              "context_length_exceeded")
    assert "context" in err["message"]
    await _still_serving(client)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=server.url) as h:
        r = await h.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers=headers)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        for body in (b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                     b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}',
                     b'{"model": "tiny", "messages": [], "seed": ' + b"9" * 5000 + b"}"):
            r = await h.post("/v1/chat/completions", content=body, headers=headers)
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json", r.text
            assert "not JSON that can be read" in r.json()["error"]["message"]
        r = await h.get("/v1/nothing-here", headers=headers)
        assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert (await h.get("/metrics")).status_code == 401
        assert (await h.get("/health")).status_code == 200  # open without a key
        assert (await h.get("/")).status_code == 200  # the page loads; its API calls carry the key
    await _still_serving(client)
    assert server.alive()
    m = server.metrics({"Authorization": f"Bearer {KEY}"})
    assert m['amlx_request_errors_total{status="401"}'] >= 3 and m['amlx_request_errors_total{status="400"}'] >= 5
    assert m['amlx_request_errors_total{status="404"}'] >= 2


async def test_bad_input_inside_a_route_keeps_the_connection(server):
    """Input the endpoint itself refuses (after the body's validation) is a 400 naming the cause,
    answered on a connection that stays open: a lone surrogate (JSON "\\ud800": no tokenizer
    takes it), a regex llguidance gives up on while decoding. Before, such errors went through
    Starlette's last-resort handler, which answered 400 but re-raised, so uvicorn logged a
    traceback and closed the connection under a kept-alive client's next request."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    logged = server.log.read_text(errors="replace").count("Exception in ASGI application")
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)  # (one connection for all)
    async with httpx.AsyncClient(base_url=server.url, headers=headers, limits=limits, timeout=60) as h:
        for path, body, words in [
                ("/v1/chat/completions", b'{"model": "tiny", "max_tokens": 2, "messages": '
                                         b'[{"role": "user", "content": "hi \\ud800"}]}', "unpaired surrogate, U+D800"),
                ("/v1/completions", b'{"model": "tiny", "max_tokens": 2, "prompt": "\\udc00"}', "U+DC00, at character 0"),
                ("/v1/completions", b'{"model": "tiny", "max_tokens": 2, "prompt": "x", "regex": "(a{1000}){1000}"}',
                 "regex constraint cannot be followed")]:
            r = await h.post(path, content=body)
            assert r.status_code == 400, r.text
            assert words in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"
            r = await h.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
    assert server.log.read_text(errors="replace").count("Exception in ASGI application") == logged
    assert server.alive()


async def test_request_log_records_bodies(server, client):
    await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=1, temperature=0, user="log-me")
    records = [json.loads(line) for line in server.request_log.read_text().splitlines()]
    assert any(r["body"].get("user") == "log-me" and r["body"]["messages"][1]["content"] == CHAT[1]["content"]
               for r in records)


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory):
    with ServerProcess(tool_checkpoint(tmp_path_factory.mktemp("tool-ckpt")), "--model-name", "tools") as srv:
        yield srv


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}


async def test_tool_call_round_trip(tool_server):
    client = tool_server.client()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = await client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER_TOOL], temperature=0,
                                             max_tokens=10)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == json.loads(TOOL_CALL_JSON)["arguments"]
    # streamed: the call arrives as a delta.tool_calls, finish_reason once
    stream = await client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER_TOOL],
                                                  temperature=0, max_tokens=10, stream=True)
    calls, finishes, content = [], [], ""
    async for chunk in stream:
        for ch in chunk.choices:
            calls += ch.delta.tool_calls or []
            content += ch.delta.content or ""
            finishes += [ch.finish_reason] if ch.finish_reason else []
    assert finishes == ["tool_calls"] and content == ""
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == \
        [(0, "get_weather", {"city": "Paris", "unit": "celsius"})]
    # the round trip: the call and its result go back through the chat template
    messages += [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r2 = await client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER_TOOL],
                                              temperature=0, max_tokens=10)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens
    assert r2.choices[0].message.tool_calls[0].function.name == "get_weather"
    # without tools the same text stays content (nothing is parsed behind the client's back)
    r3 = await client.chat.completions.create(model="tools", messages=messages[:1], temperature=0, max_tokens=10)
    assert r3.choices[0].message.tool_calls is None and "<tool_call>" in r3.choices[0].message.content


async def test_tool_call_cut_by_max_tokens_finishes_with_length(tool_server):
    """A reply cut by max_tokens finishes with "length" (OpenAI's reason for a cut reply) even
    when a whole call was parsed before the cut: "tool_calls" only when the model ended it.
    The reply is `<tool_call>`, the call's JSON, `</tool_call>`, then EOS (4 tokens). Cut
    before its `</tool_call>`, a call whose JSON is whole is a call too (README, Tool calls)."""
    client = tool_server.client()
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    # cut after the whole call / before its close tag / inside it
    for max_tokens, n_calls in ((3, 1), (2, 1), (1, 0)):
        r = await client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER_TOOL],
                                                 temperature=0, max_tokens=max_tokens)
        assert r.choices[0].finish_reason == "length"
        assert len(r.choices[0].message.tool_calls or []) == n_calls
        stream = await client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER_TOOL],
                                                      temperature=0, max_tokens=max_tokens, stream=True)
        calls, finishes = [], []
        async for chunk in stream:
            for ch in chunk.choices:
                calls += ch.delta.tool_calls or []
                finishes += [ch.finish_reason] if ch.finish_reason else []
        assert finishes == ["length"] and len(calls) == n_calls


async def test_tool_choice_without_tools_is_a_400(client):
    """OpenAI refuses tool_choice when no tools are given (missing or []); it was accepted."""
    for choice in ("auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        for tools in ({}, {"tools": []}):
            err = await _expect_error(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2,
                                                                     tool_choice=choice, **tools), 400)
            assert err["param"] == "tool_choice" and "tools" in err["message"], err
    # "none" asks for no calls, which no tools already means: accepted
    r = await client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=2, tool_choice="none")
    assert r.choices[0].finish_reason == "length"
    await _still_serving(client)


async def test_default_model_and_keys_from_file_and_env(tmp_path, monkeypatch):
    from amlx.demo import default_model_dir
    from amlx.tokenizer import Tokenizer
    from amlx.toolcalls import detect_format

    keys = tmp_path / "keys.txt"
    keys.write_text("# one key per line\nfile-key\n\n")
    env = {"AMLX_API_KEY": "env-key", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    monkeypatch.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
    default = default_model_dir()  # what the server will serve, named after its directory
    name = default.resolve().name
    with ServerProcess(None, "--api-key-file", str(keys), env=env) as srv:  # no MODEL: the embedded default
        for key in ("file-key", "env-key"):
            assert [m.id for m in (await srv.client(api_key=key).models.list()).data] == [name]
        await _expect_error(srv.client(api_key="file-key2").models.list(), 401, "invalid_api_key")
        client = srv.client(api_key="env-key")
        r = await client.chat.completions.create(model=name, messages=CHAT, max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3
        # tools with a chat template that knows no tool-call format get a 400, not silence
        with_tools = client.chat.completions.create(model=name, messages=CHAT, max_tokens=3, tools=[WEATHER_TOOL])
        if detect_format(Tokenizer.from_dir(default).chat_template) is None:
            await _expect_error(with_tools, 400, "unsupported_parameter")
        else:
            assert (await with_tools).usage.prompt_tokens > r.usage.prompt_tokens


async def test_logprob_bytes_rebuild_the_content(client):
    """OpenAI's logprobs `bytes` are each token's own UTF-8 bytes, so that tokens holding parts of
    one character join into it. A token holding part of a character decodes alone to U+FFFD, and
    its `bytes` used to be that character's UTF-8 (ef bf bd): joined, they did not give the text.
    (The greedy replies of the tiny checkpoint to these prompts have such tokens.)"""
    partial = 0
    for prompt in ("x" * 30, "Name a colour.", "日本語 😀"):
        messages = [{"role": "user", "content": prompt}]
        r = await client.chat.completions.create(model="tiny", messages=messages, max_tokens=27, temperature=0,
                                                 logprobs=True, top_logprobs=3)
        entries = r.choices[0].logprobs.content
        assert bytes(b for e in entries for b in e.bytes).decode("utf-8", "replace") == r.choices[0].message.content
        partial += sum(e.token == "\ufffd" and e.bytes != [0xEF, 0xBF, 0xBD] for e in entries)
        for e in entries:
            for top in e.top_logprobs:
                assert top.token == bytes(top.bytes).decode("utf-8", "replace")
        texts, _ = await _stream_chat(client, messages=messages, max_tokens=27, temperature=0)
        assert texts == {0: r.choices[0].message.content}
    assert partial > 0
