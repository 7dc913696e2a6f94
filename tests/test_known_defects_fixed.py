"""Regressions for defects once listed as known and left open: an adapter of another architecture
with layers of the same shapes loaded; the newline between Qwen tool calls came back as content; a
stop string with a lone surrogate was refused with ``param: null``; Llama 3 and Mistral tool calls
before one that max_tokens cut came back as content."""

from __future__ import annotations

import json

import pytest

from amlx.errors import ModelLoadError
from amlx.models import load_model
from amlx.train import lora

try:
    from tests.helpers.checkpoints import make_checkpoint
    from tests.test_train_lora import on_worker
except ImportError:  # tests/ itself on sys.path
    from helpers.checkpoints import make_checkpoint
    from test_train_lora import on_worker


# -- 1. an adapter of another architecture with identical shapes -------------------------------------

@pytest.fixture(scope="module")
def qwen_and_llama(tmp_path_factory):
    """A Qwen3 and a Llama checkpoint whose attention layers have the same names and shapes."""
    qwen = on_worker(lambda: load_model(make_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3"), progress=False))
    llama = on_worker(lambda: load_model(make_checkpoint(tmp_path_factory.mktemp("llama"), "llama"), progress=False))
    yield qwen, llama
    on_worker(qwen.model.close)
    on_worker(llama.model.close)


def _save(loaded, d, **kw):
    on_worker(lambda: lora.apply_lora(loaded.model, rank=2, targets=["q_proj", "v_proj"]))
    try:
        on_worker(lambda: lora.save_adapter(loaded.model, d, **kw))
    finally:
        on_worker(lambda: lora.remove_lora(loaded.model))
    return d


def test_an_adapter_of_another_architecture_is_refused_naming_both(qwen_and_llama, tmp_path):
    """A Qwen3 adapter loaded silently onto a Llama model whose layers had its shapes (and changed
    its output as noise would): refused, naming the adapter's file, its architecture and the model's."""
    qwen, llama = qwen_and_llama
    d = _save(qwen, tmp_path / "qwen-adapter")  # saved without base_model: the architecture is recorded anyway
    assert json.loads((d / lora.ADAPTER_CONFIG).read_text())["base_model"]["architecture"] == "qwen3"
    with pytest.raises(ModelLoadError) as info:
        on_worker(lambda: lora.load_adapter(llama.model, d, llama.config))
    msg = str(info.value)
    assert msg.startswith(f"{d / lora.ADAPTER_CONFIG}: ") and "qwen3" in msg and "llama" in msg, msg
    assert on_worker(lambda: lora.lora_modules(llama.model)) == {}  # the model is left as it was
    # the other way round too; and each adapter still loads onto its own architecture
    back = _save(llama, tmp_path / "llama-adapter", base_model={"path": "somewhere"})
    with pytest.raises(ModelLoadError, match="saved from a llama model"):
        on_worker(lambda: lora.load_adapter(qwen.model, back, qwen.config))
    on_worker(lambda: lora.load_adapter(qwen.model, d, qwen.config))
    on_worker(lambda: lora.remove_lora(qwen.model))
    on_worker(lambda: lora.load_adapter(llama.model, back, llama.config))
    on_worker(lambda: lora.remove_lora(llama.model))


@pytest.mark.parametrize("base_model", [None, {"path": "/somewhere"}, {"architecture": "Qwen3ForCausalLM"}])
def test_an_adapter_that_does_not_name_a_known_architecture_still_loads(qwen_and_llama, tmp_path, base_model):
    """Adapters of an older amlx (no base_model, or one without an architecture) and names amlx
    cannot judge load as before: only a known architecture that differs is refused."""
    qwen, llama = qwen_and_llama
    d = _save(qwen, tmp_path / "old")
    meta = json.loads((d / lora.ADAPTER_CONFIG).read_text())
    meta.pop("base_model", None)
    if base_model is not None:
        meta["base_model"] = base_model
    # as an older amlx wrote it: no copy of the config in the weights' metadata to pair it with
    from safetensors.numpy import load_file, save_file
    save_file(load_file(d / lora.ADAPTER_WEIGHTS), d / lora.ADAPTER_WEIGHTS, {"format": "mlx"})
    (d / lora.ADAPTER_CONFIG).write_text(json.dumps(meta))
    on_worker(lambda: lora.load_adapter(llama.model, d, llama.config))
    assert on_worker(lambda: sorted(lora.lora_modules(llama.model)))[0] == "model.layers.0.self_attn.q_proj"
    on_worker(lambda: lora.remove_lora(llama.model))


def test_mlx_lm_and_peft_adapters_load_as_before(qwen_and_llama, tmp_path):
    """mlx-lm's and PEFT's adapter configs name no amlx architecture: they load onto any model
    their layers fit."""
    qwen, llama = qwen_and_llama
    from safetensors.numpy import load_file, save_file
    d = _save(qwen, tmp_path / "src")
    tensors = load_file(d / lora.ADAPTER_WEIGHTS)
    mlx_lm = tmp_path / "mlx-lm"
    mlx_lm.mkdir()
    save_file({k: v.T.copy() for k, v in tensors.items()}, mlx_lm / lora.ADAPTER_WEIGHTS, {"format": "mlx"})
    (mlx_lm / lora.ADAPTER_CONFIG).write_text(json.dumps(
        {"model": "Qwen/Qwen3-0.6B", "fine_tune_type": "lora", "lora_parameters": {"rank": 2, "scale": 2.0}}))
    peft = tmp_path / "peft"
    peft.mkdir()
    save_file({f"base_model.model.{k[:-len('.lora_a')]}.lora_{'A' if k.endswith('_a') else 'B'}.weight": v
               for k, v in tensors.items()}, peft / lora.PEFT_WEIGHTS)
    (peft / lora.ADAPTER_CONFIG).write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"],
         "base_model_name_or_path": "Qwen/Qwen3-0.6B"}))
    for ad in (mlx_lm, peft):
        on_worker(lambda: lora.load_adapter(llama.model, ad, llama.config))
        assert len(on_worker(lambda: lora.lora_modules(llama.model))) == 2 * 2  # (2 layers x q, v)
        on_worker(lambda: lora.remove_lora(llama.model))


# -- a scripted model behind the OpenAI server -------------------------------------------------------
# The public `generate` of a real loaded model is replaced by one that yields the token texts
# scripted for the request's seed (the seam tests/test_toolcalls_hunt.py uses).

SCRIPTS: dict[int, tuple[list[str], str]] = {}  # seed -> (the reply's token texts, its finish reason)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "Weather?"}]
TEMPLATES = {"qwen": None, "llama3": "<|start_header_id|>{{ '<|python_tag|>' }}", "mistral": "{{ '[TOOL_CALLS]' }}"}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    import amlx
    from amlx.serve.app import Settings, create_app
    try:
        from tests.helpers.scripted import ScriptedModel
        from tests.helpers.serving import MountedApps, serve_checkpoint
    except ImportError:
        from helpers.scripted import ScriptedModel
        from helpers.serving import MountedApps, serve_checkpoint
    with amlx.load_sync(serve_checkpoint(tmp_path_factory.mktemp("ckpt")), max_context=512) as model:
        srv = MountedApps({fmt: create_app(ScriptedModel(model, tpl, SCRIPTS), Settings(model_name="m"))
                           for fmt, tpl in TEMPLATES.items()})
        try:
            yield srv
        finally:
            srv.stop()


def served(servers, fmt: str, pieces: list[str], finish: str) -> list[tuple]:
    """(content or None, [(name, arguments)], finish_reason) of a scripted reply, asked for whole and
    streamed (streamed: None when the chunks carried none but the role chunk's "")."""
    try:
        from tests.helpers.scripted import chat_replies
    except ImportError:
        from helpers.scripted import chat_replies
    seed = max(SCRIPTS, default=0) + 1
    SCRIPTS[seed] = (pieces, finish)
    whole, streamed = chat_replies(servers.client(fmt), model="m", messages=MESSAGES, tools=TOOLS, seed=seed,
                                   max_tokens=64)
    return [whole, (streamed[0] or None, *streamed[1:])]


# -- 2. the "\n" between Qwen tool calls -------------------------------------------------------------

def _qwen_call(city: str) -> str:
    return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s"}}\n</tool_call>' % city


PARIS, ROME = ("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')


@pytest.mark.parametrize("pieces", [
    [_qwen_call("Paris"), "\n", _qwen_call("Rome")],
    [_qwen_call("Paris"), "\n", "\n", " ", _qwen_call("Rome"), "\n"],
    ["\n", _qwen_call("Paris") + "\n" + _qwen_call("Rome") + "\n\n"],
    [_qwen_call("Paris")[:7], _qwen_call("Paris")[7:] + "\n" + _qwen_call("Rome")[:3], _qwen_call("Rome")[3:]],
])
def test_the_blanks_between_qwen_tool_calls_are_no_content(servers, pieces):
    """Several Qwen calls come separated by "\\n": the server sent it as `content: "\\n"`
    (vLLM sends none), streamed and not. Blank text between and around calls is dropped."""
    for got in served(servers, "qwen", pieces, "stop"):
        assert got == (None, [PARIS, ROME], "tool_calls")


@pytest.mark.parametrize("pieces, content", [
    (["Let me check.\n", _qwen_call("Paris"), "\n", _qwen_call("Rome")], "Let me check.\n"),
    (["\n", "Let me", " check. ", _qwen_call("Paris"), "\n", _qwen_call("Rome"), "\n Done."], "\nLet me check. \n Done."),
    (["<think>", "\n", "Two cities.", "</think>", "\n\n", _qwen_call("Paris"), "\n", _qwen_call("Rome")],
     "<think>\nTwo cities.</think>\n\n"),
])
def test_text_the_model_wrote_around_qwen_calls_stays(servers, pieces, content):
    """Only the blanks are dropped: text before, between or after the calls comes as written,
    with the blanks that stand next to it."""
    for got in served(servers, "qwen", pieces, "stop"):
        assert got == (content, [PARIS, ROME], "tool_calls")


def test_a_blank_reply_without_calls_keeps_its_content(servers):
    for got in served(servers, "qwen", ["\n", " ", "\n"], "stop"):
        assert got == ("\n \n", [], "stop")


# -- 3. a stop string holding a lone surrogate -------------------------------------------------------

@pytest.mark.parametrize("path", ["chat/completions", "completions"])
@pytest.mark.parametrize("stop", ['"\\ud800"', '["ok", "a\\udfffb"]'])
def test_a_stop_string_with_a_lone_surrogate_names_the_stop_field(servers, path, stop):
    """JSON's lone "\\ud800" escape in a stop string: the 400 said so with `param: null`; it names
    "stop", as the server's other validation errors name their field."""
    import httpx
    prompt = '"messages": [{"role": "user", "content": "hi"}]' if path == "chat/completions" else '"prompt": "hi"'
    body = '{"model": "m", "max_tokens": 4, %s, "stop": %s}' % (prompt, stop)
    reply = httpx.post(f"{servers.url}/qwen/v1/{path}", headers={"content-type": "application/json"},
                       content=body.encode(), timeout=60)
    err = reply.json()["error"]
    assert reply.status_code == 400 and err["param"] == "stop", err
    assert "a stop string holds an unpaired surrogate" in err["message"] and err["code"] == "invalid_value", err


# -- 4. max_tokens cuts a later Llama 3 or Mistral call -------------------------------------------

_A = ("get_weather", '{"city": "Paris"}')
_CUT_REPLIES = [
    # (format, the reply's token texts, the content left: the cut call's text)
    ("llama3", ['{"name": "get_weather", "parameters": {"city": "Paris"}}', "; ",
                '{"name": "get_weather", "parameters": {"ci'], '{"name": "get_weather", "parameters": {"ci'),
    ("llama3", ["<|python_tag|>", '{"name": "get_weather", "parameters": {"city": "Paris"}};\n{"name": "get_w'],
     '{"name": "get_w'),
    ("mistral", ["[TOOL_CALLS]", '[{"name": "get_weather", "arguments": {"city": "Paris"}}, ',
                 '{"name": "get_weather", "arguments": {"city": "Ro'], '{"name": "get_weather", "arguments": {"city": "Ro'),
    ("mistral", ["[TOOL_CALLS]", 'get_weather[ARGS]{"city": "Paris"}', "[TOOL_CALLS]", 'get_weather[ARGS]{"city": '],
     '[TOOL_CALLS]get_weather[ARGS]{"city": '),
    ("mistral", ["[TOOL_CALLS]", 'get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}', "[TOOL_CALLS]", "get_wea"],
     "[TOOL_CALLS]get_wea"),
    ("qwen", ['<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>', "\n",
              '<tool_call>{"name": "get_weather", "arguments": {"ci'],
     '\n<tool_call>{"name": "get_weather", "arguments": {"ci'),  # (the blank before text stays: BlankAroundCalls)
]


@pytest.mark.parametrize("fmt, pieces, content", _CUT_REPLIES, ids=[f"{r[0]}-{i}" for i, r in enumerate(_CUT_REPLIES)])
def test_calls_before_one_max_tokens_cut_stay_calls_in_every_format(servers, fmt, pieces, content):
    """max_tokens cut the second of two calls: Qwen's parser kept the first as a call, Llama 3's
    and Mistral's gave both back as content. Now every format keeps the complete calls, and the
    cut one is no call (its text is content); finish_reason says "length", streamed and not."""
    for got in served(servers, fmt, pieces, "length"):
        assert got == (content, [_A], "length")


@pytest.mark.parametrize("fmt, pieces, content", _CUT_REPLIES, ids=[f"{r[0]}-{i}" for i, r in enumerate(_CUT_REPLIES)])
def test_the_library_parse_keeps_the_calls_before_a_cut_one(fmt, pieces, content):
    """The same through amlx.toolcalls (what Completion.tool_calls reads), whole and a character
    at a time."""
    from amlx.toolcalls import ToolCallParser, parse_tool_calls
    text = "".join(pieces)
    whole, calls = parse_tool_calls(text, fmt)
    assert [(c.name, c.arguments) for c in calls] == [_A]
    assert whole.strip() == content.strip()
    parser = ToolCallParser(fmt)
    events = [e for ch in text for e in parser.feed(ch)] + parser.finish()
    assert "".join(e for e in events if isinstance(e, str)) == whole
    assert [(c.name, c.arguments) for c in parser.calls] == [_A]


@pytest.mark.parametrize("fmt, text", [
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}} and then I would call it again'),
    ("llama3", '{"name": "get_weather", "parameters": {"ci'),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}] and more'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"} and more'),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Pa'),
])
def test_a_reply_that_is_no_calls_stays_content(fmt, text):
    """Only a cut call after complete ones leaves calls: text after a call that is no call, or a
    lone cut call, makes the whole reply content as before."""
    from amlx.toolcalls import parse_tool_calls
    assert parse_tool_calls(text, fmt) == (text, [])
