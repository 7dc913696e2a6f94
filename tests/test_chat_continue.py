"""`apply_chat_template(..., continue_final_message=True)`: the rendered chat ends with the last
message's content, left open for the model to go on, exactly as transformers renders it
(Qwen-style and Gemma-style templates; hypothesis over the reply begun, spaces included)."""

from __future__ import annotations


import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amlx.tokenizer import ChatTemplateError
from tests.helpers.tokenizers import tokenizer_pairs

KINDS = ("bpe", "spm")  # the Qwen 3 and Gemma 3 templates of the test tokenizers


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return tokenizer_pairs(tmp_path_factory, "continue", KINDS)


_TEXT = st.text(st.sampled_from(list("ab \n{}é:")), min_size=1, max_size=12).filter(lambda t: t.strip())


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(begun=_TEXT, lead=st.sampled_from(["", " ", "\n"]), trail=st.sampled_from(["", " ", "  ", "\n"]),
       system=st.booleans(), blocks=st.booleans())
def test_continue_final_message_renders_as_transformers(pairs, kind, begun, lead, trail, system, blocks):
    ours, hf = pairs[kind]
    content = lead + begun + trail
    final = {"role": "assistant", "content": [{"type": "text", "text": content}] if blocks else content}
    messages = ([{"role": "system", "content": "Be brief."}] if system else []) + [
        {"role": "user", "content": "Say something."}, final]
    try:
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                      continue_final_message=True)
    except Exception:  # noqa: BLE001 - transformers refuses: so must amlx
        with pytest.raises(ChatTemplateError):
            ours.apply_chat_template(messages, continue_final_message=True)
        return
    assert ours.apply_chat_template(messages, continue_final_message=True) == want
    assert want.rstrip().endswith(begun.strip())  # (the oracle's point: the reply is left open)


def test_continue_final_message_needs_text_the_template_shows(pairs):
    ours, _ = pairs["bpe"]
    with pytest.raises(ChatTemplateError, match="text content"):
        ours.apply_chat_template([{"role": "user", "content": "Hi"},
                                  {"role": "assistant", "content": [{"type": "image"}]}], continue_final_message=True)
    ignores = "{% for m in messages %}<{{ m.role }}>{% endfor %}"  # never reads the content
    with pytest.raises(ChatTemplateError, match="never reads 'content'"):
        ours.apply_chat_template([{"role": "assistant", "content": "Sure"}], continue_final_message=True,
                                 chat_template=ignores)
    hides = "{% for m in messages %}<{{ m.role }}>{% if false %}{{ m.content }}{% endif %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="cannot be continued"):
        ours.apply_chat_template([{"role": "assistant", "content": "Sure"}], continue_final_message=True,
                                 chat_template=hides)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(begun=_TEXT, trail=st.sampled_from(["", " ", "\n"]))
def test_continuing_the_reasoning_renders_as_transformers(pairs, begun, trail):
    """continue_final_message naming a field: the Qwen 3 template's reasoning, left open."""
    ours, hf = pairs["bpe"]
    messages = [{"role": "user", "content": "Think."},
                {"role": "assistant", "content": "", "reasoning_content": begun + trail}]
    try:
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                      continue_final_message="reasoning_content")
    except Exception:  # noqa: BLE001 - transformers refuses: so must amlx
        with pytest.raises(ChatTemplateError):
            ours.apply_chat_template(messages, continue_final_message="reasoning_content")
        return
    assert ours.apply_chat_template(messages, continue_final_message="reasoning_content") == want


async def test_the_server_continues_a_begun_reply(tmp_path):
    """/v1/chat/completions with vLLM's `continue_final_message` (and `add_generation_prompt:
    false`) goes on with the last assistant message: the same tokens as the library given the
    rendered conversation; with the generation prompt still on it is a 400 naming the field."""
    import openai

    import amlx
    from tests.helpers.serving import ServerProcess, serve_checkpoint

    ckpt = serve_checkpoint(tmp_path / "ckpt")
    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "The colour is"}]
    with amlx.load_sync(ckpt, max_context=512) as model:
        text = model.tokenizer.apply_chat_template(messages, continue_final_message=True)
        assert text.endswith("The colour is")
        want = model.complete_sync(model.tokenizer.encode(text, add_special_tokens=False), max_tokens=8)
    with ServerProcess(ckpt, "--model-name", "tiny", "--max-context", "512") as srv:
        client = srv.client()
        r = await client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0,
            extra_body={"continue_final_message": True, "add_generation_prompt": False})
        assert r.choices[0].message.content == want.text
        assert r.usage.prompt_tokens == want.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="tiny", messages=messages, max_tokens=2,
                                                 extra_body={"continue_final_message": True})
        assert err.value.body["param"] == "continue_final_message"
