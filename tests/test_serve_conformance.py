"""`amlx serve` against the OpenAI API's documented behaviour, field by field, the way a user's
openai-client code sends requests: nulls, edge values, malformed bodies, n > 1, streaming
framing, client disconnects.

Each test was written for a difference found by probing the server (see the commit that added
it), except the disconnect test and the last one, which guard behaviour the probing found right.
The hypothesis test sends generated bodies, valid and invalid (nulls and junk among them), and
checks every answer's shape: a 200 in OpenAI's form, or an OpenAI-shaped 400 naming a field.
"""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.serving import ServerProcess, serve_checkpoint

CHAT = [{"role": "user", "content": "Name a colour."}]
CAPACITY = 8  # --max-batch-size 4 + --max-queue 4: generations at once


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = serve_checkpoint(tmp_path_factory.mktemp("conformance-ckpt"), seed=5)
    with ServerProcess(ckpt, "--model-name", "tiny", "--max-context", "4096", "--max-batch-size", "4",
                       "--max-queue", "4", "--keepalive", "0.2") as srv:
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _chat(http, **body):
    return http.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT, "max_tokens": 4, **body})


def _completion(http, **body):
    return http.post("/v1/completions", json={"model": "tiny", "prompt": "Hello", "max_tokens": 4, **body})


def _error(response, status: int = 400, param: str | None = "?") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param != "?":
        assert error["param"] == param, error
    return error


def _strict_json(text: str):
    """json.loads that refuses NaN and ±Infinity, which are no JSON (Python's json reads them)."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def _events(text: str) -> list:
    """The data of each SSE event, JSON-decoded ("[DONE]" as is); comments skipped."""
    assert text.endswith("data: [DONE]\n\n"), text[-300:]
    out = []
    for event in text.split("\n\n"):
        if event.startswith("data: "):
            out.append("[DONE]" if event == "data: [DONE]" else _strict_json(event[6:]))
    return out


# -- null means the default ------------------------------------------------------------------

async def test_null_fields_mean_their_defaults(server, http):
    """OpenAI documents its optional fields as nullable ("number or null", null meaning the
    default), and the openai client sends null for an argument given as None
    (`temperature=args.temperature`). temperature, top_p, n, stream, logprobs, the penalties,
    echo... each was a 400 ("Input should be a valid number") when null."""
    client = server.client()
    base = dict(model="tiny", messages=CHAT, max_tokens=6, seed=3)
    ref = (await client.chat.completions.create(**base)).choices[0].message.content  # temperature 1 (the default)
    nulls = dict(temperature=None, top_p=None, n=None, stream=None, logprobs=None, top_logprobs=None, stop=None,
                 presence_penalty=None, frequency_penalty=None, max_completion_tokens=None, logit_bias=None,
                 stream_options=None, response_format=None, tools=None, tool_choice=None, user=None)
    r = await client.chat.completions.create(**base, **nulls)
    assert r.choices[0].message.content == ref and len(r.choices) == 1
    extensions = {"top_k": None, "min_p": None, "repetition_penalty": None, "regex": None}
    r = _chat(http, max_tokens=6, seed=3, **nulls, **extensions)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == ref, r.text
    ref = _completion(http, seed=3).json()["choices"][0]["text"]
    r = _completion(http, seed=3, echo=None, suffix=None, best_of=None, logprobs=None, temperature=None, n=None,
                    stream=None, top_p=None)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == ref, r.text
    r = _chat(http, stream=True, stream_options={"include_usage": None})
    events = _events(r.text)
    assert "usage" not in events[-2] or events[-2]["choices"]  # include_usage null: no usage chunk


# -- top_p = 0 ---------------------------------------------------------------------------------

def test_top_p_0_is_accepted_and_keeps_the_top_token(http):
    """OpenAI's top_p lies in [0, 1]; 0 was a 400 ("greater than 0"). Nucleus sampling with
    top_p 0 keeps the smallest set of tokens reaching it, the top token alone: greedy."""
    greedy = _chat(http, max_tokens=12, temperature=0).json()["choices"][0]["message"]["content"]
    r = _chat(http, max_tokens=12, temperature=1.5, top_p=0, seed=9, n=2)
    assert r.status_code == 200, r.text
    assert [c["message"]["content"] for c in r.json()["choices"]] == [greedy, greedy]
    greedy = _completion(http, max_tokens=12, temperature=0).json()["choices"][0]["text"]
    r = _completion(http, max_tokens=12, temperature=1.0, top_p=0)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, r.text


# -- a request bigger than the server ------------------------------------------------------------

def test_a_request_larger_than_the_server_is_a_400_not_a_retryable_429(http):
    """n (times the prompts of a completions request) above what the server runs at once
    (--max-batch-size + --max-queue) was answered 429 with Retry-After: 1, "retry shortly", with
    nothing running: a client that retries as told loops forever. It is a 400 naming the field."""
    r = _chat(http, n=CAPACITY + 1)
    error = _error(r, 400, "n")
    assert str(CAPACITY) in error["message"] and "retry-after" not in r.headers
    r = _completion(http, prompt=["a", "b", "c"], n=3)
    error = _error(r, 400, "prompt")
    assert "9" in error["message"] and "retry-after" not in r.headers
    r = _chat(http, n=CAPACITY)  # as many as fit: answered
    assert r.status_code == 200 and [c["index"] for c in r.json()["choices"]] == list(range(CAPACITY))


# -- validation errors name the request's field --------------------------------------------------

def test_validation_errors_name_the_field_not_pydantics_union_member(http):
    """A field whose type is a union (stop, prompt, tool_choice, content) reported the error of
    its first member, with pydantic's label for that member in `param` ("stop.str",
    "tool_choice.literal['none','auto','required']"), often the wrong error: five stop strings
    were "stop.str: Input should be a valid string"."""
    error = _error(_chat(http, stop=["a", "b", "c", "d", "e"]), 400, "stop")
    assert "at most 4" in error["message"]
    error = _error(_chat(http, tool_choice="bogus", tools=[{"type": "function", "function": {"name": "f"}}]), 400,
                   "tool_choice")
    assert "'none', 'auto' or 'required'" in error["message"]
    error = _error(_chat(http, tools=[{"type": "function", "function": {"name": "f"}}],
                         tool_choice={"type": "function"}), 400, "tool_choice.function")
    assert "required" in error["message"]
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": [
        {"role": "user", "content": [{"text": "no type"}]}]})
    assert "required" in _error(r, 400, "messages.0.content.0.type")["message"]
    assert "at least 1 item" in _error(_completion(http, prompt=[]), 400, "prompt")["message"]
    assert _error(_completion(http, prompt=[[1, 2], 3.5]), 400)["param"].startswith("prompt.1")
    # a JSON body sent as another content type (curl -d sends a form's): told what to send
    body = json.dumps({"model": "tiny", "messages": CHAT, "max_tokens": 2})
    for headers in ({"Content-Type": "text/plain"}, {"Content-Type": "application/x-www-form-urlencoded"}):
        error = _error(http.post("/v1/chat/completions", content=body, headers=headers), 400, None)
        assert "Content-Type: application/json" in error["message"], error


# -- engine errors name the field ----------------------------------------------------------------

def test_errors_from_the_engine_name_the_field(http):
    """Values the engine refuses (its ValueError) came back with `param: null`; OpenAI names the
    field that was wrong."""
    for body, param in [({"stop": [""]}, "stop"), ({"stop": "x" * 300}, "stop"), ({"top_k": 100_000}, "top_k"),
                        ({"regex": "(("}, "regex"), ({"choice": [""]}, "choice"),
                        ({"response_format": {"type": "json_schema"}}, "response_format"),
                        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
                         "response_format")]:
        _error(_chat(http, **body), 400, param)


# -- logit_bias keys -----------------------------------------------------------------------------

def test_logit_bias_keys_are_decimal_token_ids(http):
    """Keys went through int(), which reads "5_0" as 50, "٣" (an Arabic-Indic three) as 3, and
    " 5" or "+5" as 5; and "05" and "5" named one token twice, the second bias silently
    replacing the first."""
    for key in ("5_0", "\u0663", " 5", "+5", "5.0", "0x5"):
        _error(_chat(http, logit_bias={key: 1}), 400, "logit_bias")
    error = _error(_chat(http, logit_bias={"05": 1, "5": -1}), 400, "logit_bias")
    assert "twice" in error["message"]
    assert _chat(http, logit_bias={"5": 1, "7": -100}).status_code == 200


# -- streaming: usage null with include_usage ---------------------------------------------------

def test_include_usage_gives_every_other_chunk_usage_null(http):
    """OpenAI: with stream_options.include_usage "all other chunks will also include a usage
    field, but with a null value"; they had no usage field."""
    for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/completions", {"prompt": "Hello"})):
        # (greedy: sampled at temperature 1, a choice could draw its end-of-sequence token
        # before max_tokens, and the 6 below was then 4 or 5 - seen once in a combined run)
        r = http.post(path, json={"model": "tiny", "max_tokens": 3, "n": 2, "stream": True, "temperature": 0.0,
                                  "stream_options": {"include_usage": True}, **body})
        events = _events(r.text)
        assert events[-1] == "[DONE]" and events[-2]["choices"] == []
        assert events[-2]["usage"]["completion_tokens"] == 6
        assert all("usage" in e and e["usage"] is None for e in events[:-2]), events


# -- streaming: line breaks inside events ----------------------------------------------------------

def test_sse_lines_survive_clients_that_split_like_splitlines(server):
    """SSE ends lines at CR and LF only; httpx's iter_lines (how many clients read SSE by hand)
    also ends them at U+0085, U+2028 and U+2029, as str.splitlines does, so a token holding one
    cut its event in two, and the second half was no event at all. They are escaped in the JSON."""
    text = "a\u2028b\x85c\u2029d"
    for path, body, key in (("/v1/completions", {"prompt": "Hi"}, "text"),
                            ("/v1/chat/completions", {"messages": CHAT}, "delta")):
        with httpx.Client(base_url=server.url, timeout=60) as http:
            with http.stream("POST", path, json={"model": "tiny", "max_tokens": 12, "stream": True, "regex": text,
                                                 **body}) as r:
                lines = [line for line in r.iter_lines() if line]
        assert all(line.startswith("data: ") for line in lines), lines
        chunks = [_strict_json(line[6:])["choices"][0] for line in lines[:-1]]
        got = "".join(c["text"] if key == "text" else c["delta"].get("content") or "" for c in chunks)
        assert got == text


# -- completions logprobs: the sampled token is in top_logprobs ---------------------------------

def test_completion_top_logprobs_hold_the_sampled_token(http):
    """The legacy completions API "will always return the logprob of the sampled token, so there
    may be up to logprobs+1 elements" in each top_logprobs entry; a sampled token outside the
    top k was missing (with logprobs 0 every entry was {})."""
    for stream in (False, True):
        for k in (0, 1):
            r = _completion(http, max_tokens=10, temperature=2.0, seed=4, logprobs=k, stream=stream)
            if stream:
                entries = [e["choices"][0]["logprobs"] for e in _events(r.text)[:-1]]
                tokens = [t for e in entries for t in e["tokens"]]
                lps = [lp for e in entries for lp in e["token_logprobs"]]
                tops = [d for e in entries for d in e["top_logprobs"]]
            else:
                lp = r.json()["choices"][0]["logprobs"]
                tokens, lps, tops = lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]
            assert len(tokens) == len(tops) == 10
            for token, logprob, top in zip(tokens, lps, tops):
                assert token in top and len(top) <= k + 1, (token, top)
                if k == 0:
                    assert top == {token: logprob}
            if k == 1:
                assert any(len(top) == 2 for top in tops)  # at temperature 2 some token is not the top one


# -- logprobs of a constrained request ------------------------------------------------------------

def test_logprobs_of_a_constrained_request_are_json(http):
    """A constraint masks the tokens it forbids, whose logprob is then -inf: a whole reply with
    logprobs failed to serialize and came back as a 400 "Out of range float values are not JSON
    compliant", a streamed one sent `-Infinity`, which is no JSON. OpenAI reports -9999.0."""
    for body in ({"regex": "ab"}, {"choice": ["red", "blue"]}, {"response_format": {"type": "json_object"}}):
        r = _chat(http, logprobs=True, top_logprobs=5, **body)
        assert r.status_code == 200, r.text
        entries = _strict_json(r.text)["choices"][0]["logprobs"]["content"]
        assert entries and all(t["logprob"] >= -9999.0 for e in entries for t in e["top_logprobs"])
        assert any(t["logprob"] == -9999.0 for e in entries for t in e["top_logprobs"])
        events = _events(_chat(http, logprobs=True, top_logprobs=5, stream=True, **body).text)
        assert any(c.get("logprobs") for e in events[:-1] for c in e["choices"])
        if "response_format" not in body:  # (a chat field only, as in OpenAI's API)
            r = _completion(http, logprobs=5, **body)
            assert r.status_code == 200 and _strict_json(r.text)["choices"][0]["logprobs"]["token_logprobs"], r.text
            _events(_completion(http, logprobs=5, stream=True, **body).text)


# -- disconnects with n > 1 -----------------------------------------------------------------------

def _cancelled(server) -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("amlx_requests_cancelled_total"))


async def _idle(server) -> None:
    for _ in range(600):  # (a bound on the wait, not a timing assertion)
        h = server.health()
        if h["running"] == 0 and h["waiting"] == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the server did not go idle: {server.health()}")


async def test_a_client_gone_cancels_every_choice(server):
    """A client that goes away (streaming or not) cancels each of its n choices in the engine;
    the admission slots come back (a request for all of them is answered after)."""
    client = server.client()
    before = _cancelled(server)
    # (greedy: this checkpoint never picks EOS then, so every choice runs until it is cancelled)
    stream = await client.chat.completions.create(model="tiny", messages=CHAT, n=3, stream=True, max_tokens=4000,
                                                  temperature=0)
    seen = 0
    async for chunk in stream:
        seen += 1
        if seen == 8:
            break
    await stream.close()
    with pytest.raises(openai.APITimeoutError):  # the client gives up and closes the connection
        await server.client(timeout=0.5).completions.create(model="tiny", prompt=["a", "b"], n=2, max_tokens=4000,
                                                          temperature=0)
    await _idle(server)
    assert _cancelled(server) - before == 3 + 4
    r = await client.chat.completions.create(model="tiny", messages=CHAT, n=CAPACITY, max_tokens=2)
    assert len(r.choices) == CAPACITY


# -- generated bodies ---------------------------------------------------------------------------

JUNK = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) |
                    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=2),
                    max_leaves=5)


def _maybe(valid):
    """Mostly a valid value, sometimes null (the default) or junk."""
    return st.one_of(valid, valid, valid, st.none(), JUNK)


def _number(lo: float, hi: float):
    return st.one_of(st.floats(lo, hi), st.integers(int(lo), int(hi)), st.sampled_from([lo, hi, 1e-300, 5e-324]))


COMMON = {
    "max_tokens": _maybe(st.integers(1, 5)), "temperature": _maybe(_number(0, 2)), "top_p": _maybe(_number(0, 1)),
    "n": _maybe(st.integers(1, 3)), "seed": _maybe(st.integers(-(2**70), 2**70)),
    "stop": _maybe(st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=5))),
    "presence_penalty": _maybe(_number(-2, 2)), "frequency_penalty": _maybe(_number(-2, 2)),
    "logit_bias": _maybe(st.dictionaries(st.one_of(st.integers(-2, 800).map(str), st.text(max_size=3)),
                                         _number(-100, 100), max_size=2)),
    "stream": _maybe(st.booleans()), "stream_options": _maybe(st.fixed_dictionaries({}, optional={
        "include_usage": st.one_of(st.booleans(), st.none())})),
    "user": _maybe(st.text(max_size=4)), "top_k": _maybe(st.integers(0, 800)),
    "regex": st.sampled_from(["[a-z]+", "x|yz", "(("]), "choice": _maybe(st.lists(st.text(max_size=3), max_size=2)),
}
CONTENT = st.one_of(st.text(max_size=12), st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url"])}, optional={"text": st.one_of(st.text(max_size=5), JUNK)}),
    max_size=2), JUNK)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "developer", "assistant", "system", "bogus"])},
                                optional={"content": CONTENT})
CHAT_FIELDS = {**COMMON, "messages": _maybe(st.lists(MESSAGE, min_size=1, max_size=3)),
               "max_completion_tokens": _maybe(st.integers(1, 5)), "logprobs": _maybe(st.booleans()),
               "top_logprobs": _maybe(st.integers(0, 21)),
               "response_format": _maybe(st.sampled_from([{"type": "json_object"}, {"type": "text"}])),
               "tool_choice": _maybe(st.sampled_from(["none", "auto", "required", {"type": "function"}]))}
PROMPT = st.one_of(st.text(max_size=8), st.lists(st.integers(-1, 800), max_size=3),
                   st.lists(st.one_of(st.text(max_size=5), st.lists(st.integers(0, 800), max_size=3)), max_size=3))
COMPLETION_FIELDS = {**COMMON, "prompt": _maybe(PROMPT), "logprobs": _maybe(st.integers(0, 21)),
                     "echo": _maybe(st.just(False)), "best_of": _maybe(st.just(1))}


def _bodies(fields: dict, required: str):
    return st.fixed_dictionaries({"model": st.just("tiny"), required: fields[required]},
                                 optional={k: v for k, v in fields.items() if k != required})


FIELD_NAMES = set(CHAT_FIELDS) | set(COMPLETION_FIELDS) | {"model", "body", "role", "content", "type", "text",
                                                          "function", "include_usage", "tools"}


def _check_reply(body: dict, r: httpx.Response) -> None:
    """An answer to a generated body: 200 in OpenAI's shape, or an OpenAI-shaped 400 whose param
    is a path through the request's own fields (never a pydantic type label)."""
    if r.status_code != 200:
        error = _error(r, 400)
        param = error["param"]
        assert param is None or all(part.isdigit() or part in FIELD_NAMES for part in param.split(".")[:1]), error
        if param is not None and not param.startswith("logit_bias."):  # (its keys are the client's text)
            assert not re.search(r"[\[\]']|\b(str|int|list)\b", param), error
        return
    n = body.get("n") or 1
    prompts = body["prompt"] if isinstance(body.get("prompt"), list) and body["prompt"] and \
        not isinstance(body["prompt"][0], int) else [None]
    count = n * len(prompts)
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or 5
    if body.get("stream"):
        events = _events(r.text)
        assert not any("error" in e for e in events[:-1]), events
        finishes = [c["index"] for e in events[:-1] for c in e["choices"] if c.get("finish_reason")]
        assert sorted(finishes) == list(range(count)), events  # one finish_reason per choice
        ids = {e["id"] for e in events[:-1]}
        assert len(ids) == 1
        return
    reply = _strict_json(r.text)
    assert [c["index"] for c in reply["choices"]] == list(range(count))
    assert all(c["finish_reason"] in ("stop", "length") for c in reply["choices"])
    usage = reply["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 0 < usage["completion_tokens"] <= count * limit


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(pb=st.one_of(_bodies(CHAT_FIELDS, "messages").map(lambda b: ("/v1/chat/completions", b)),
                    _bodies(COMPLETION_FIELDS, "prompt").map(lambda b: ("/v1/completions", b))))
def test_generated_bodies_get_200_or_an_openai_400(server, pb):
    path, body = pb
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        body["max_tokens"] = 5  # (the default, the rest of the context, is slow to generate)
    body["max_tokens"] = min(body["max_tokens"], 5)
    if isinstance(body.get("max_completion_tokens"), int) and body["max_completion_tokens"] > 5:
        body["max_completion_tokens"] = 5
    with httpx.Client(base_url=server.url, timeout=120) as http:
        _check_reply(body, http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"}))


def test_the_server_is_idle_and_clean_after_all_of_it(server):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.health()["running"]:
        time.sleep(0.05)
    h = server.health()
    assert h["running"] == 0 and h["waiting"] == 0
    assert "Traceback" not in server.output()
