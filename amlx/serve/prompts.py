"""Request prompts -> token ids: chat messages (with tools) through the chat template, or
completion prompts as text or ids. The server renders prompts itself (rather than handing
messages to `model.generate`) because it must pass `tools` to the template and know the
prompt's length for the default `max_tokens`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from amlx.prompt import check_rendered, check_structure
from amlx.serve.errors import APIError
from amlx.serve.schemas import ChatRequest, CompletionRequest, Message
from amlx.serve.tool_choice import check_tool_choice
from amlx.tokenizer import check_encodable


def _text_of(message: Message) -> str | None:
    content = message.content
    if content is None or isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.type != "text":
            raise APIError(400, f"content parts of type {part.type!r} are not supported (text only)",
                           param="messages", code="unsupported_content")
        if part.text is None:
            raise APIError(400, "a content part of type 'text' has no 'text'", param="messages",
                           code="invalid_value")
        parts.append(part.text)
    return "".join(parts)


def _arguments(text: str) -> Any:
    """Tool-call arguments as the templates expect them: a dict (they apply `tojson`)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, an integer of over 4300 digits, nesting too deep
        return text
    return value if isinstance(value, dict) else text


def chat_messages(req: ChatRequest) -> list[dict]:
    """The request's messages as plain dicts for the chat template."""
    out = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": _text_of(m)}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.reasoning_content is not None:
            msg["reasoning_content"] = m.reasoning_content
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in m.tool_calls]
        out.append(msg)
    return out


def chat_tools(req: ChatRequest, fmt: str | None = None) -> list[dict] | None:
    """The tools to render, or None. tool_choice "none" renders none; "required" or a named
    function (forcing a call, see tool_choice.py) is checked against `fmt`, the checkpoint's
    tool-call format: a 400 where no call can be forced."""
    choice = req.tool_choice
    # OpenAI answers 400 for tool_choice without tools (missing or []); checked first so that
    # 'required' without tools is told what is wrong, not that the call cannot be forced.
    # "none" is let through: it asks for no calls, which no tools means anyway.
    if choice is not None and choice != "none" and not req.tools:
        raise APIError(400, "tool_choice is only allowed when tools are specified (tools is missing or empty)",
                       param="tool_choice", code="invalid_value")
    check_tool_choice(req, fmt)
    if not req.tools or choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in req.tools]


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None,
                check_text: Callable[[str], None], *, add_generation_prompt: bool = True,
                continue_final_message: bool = False) -> list[int]:
    """Prompt ids of a conversation (blocking: run it off the event loop). `check_text`
    (`PromptEncoder.check_text`) raises ContextLengthError for a text too long to fit
    whatever its tokens, before tokenizing it (megabytes take seconds). With
    `continue_final_message` the last message is left open for the model to go on."""
    if continue_final_message and add_generation_prompt:
        raise APIError(400, "continue_final_message continues the last message: set add_generation_prompt "
                       "to false with it", param="continue_final_message", code="invalid_value")
    for value, param in ((messages, "messages"), (tools, "tools")):
        try:  # tool-call arguments and tool schemas nested too deep for the template (ValueError)
            check_structure(value, param)
        except ValueError as exc:
            raise APIError(400, str(exc), param=param, code="invalid_value") from exc
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                             continue_final_message=continue_final_message)
        check_rendered(text)
    except ValueError as exc:  # ChatTemplateError: the template refused these messages
        raise APIError(400, str(exc), param="messages", code="invalid_messages") from exc
    check_text(text)
    return _encoded(tokenizer, text, ((messages, "messages"), (tools, "tools")), add_special_tokens=False)


def _encoded(tokenizer, text: str, sources: tuple[tuple[Any, str], ...], **options: Any) -> list[int]:
    """`tokenizer.encode(text, **options)`; for a text the tokenizer refuses as holding an
    unpaired surrogate (JSON's lone "\ud800" escape), at a character of a text the client may
    never have sent (the rendered prompt), the 400 names the field of `sources` ((value, its
    name)) that holds it, and where in it."""
    try:
        return tokenizer.encode(text, **options)
    except ValueError:
        for value, where in sources:
            problem = _unencodable(value, where)
            if problem is not None:
                raise APIError(400, problem, param=where.split("[")[0], code="invalid_value") from None
        raise


def _unencodable(value: Any, where: str) -> str | None:
    """What `check_encodable` says of the first text in `value` (plain dicts and lists; keys too)
    that holds an unpaired surrogate, `where` it is spelled as a path (messages[0].content), or
    None."""
    if isinstance(value, str):
        try:
            check_encodable(value, where)
        except ValueError as exc:
            return str(exc)
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            # (a key that holds the surrogate is written escaped: the message must be UTF-8)
            path = f"{where}.{key}" if key.isascii() else f"{where}[{json.dumps(key)}]"
            problem = _unencodable(key, f"{where} (a key)") or _unencodable(item, path)
            if problem is not None:
                return problem
    elif isinstance(value, list):
        for i, item in enumerate(value):
            problem = _unencodable(item, f"{where}[{i}]")
            if problem is not None:
                return problem
    return None


def completion_prompts(tokenizer, req: CompletionRequest, check_text: Callable[[str], None]) -> list[list[int]]:
    """Prompt ids of each prompt of a completions request (blocking; `check_text`: see
    `render_chat`)."""
    out = []
    prompts = _each_prompt(req)
    several = prompts is req.prompt  # (a list of prompts, not one made a list)
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            check_text(p)
        where = f"prompt[{i}]" if several else "prompt"
        ids = _encoded(tokenizer, p, ((p, where),)) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
        out.append(ids)
    return out


def completion_texts(tokenizer, req: CompletionRequest, ids: list[list[int]]) -> list[str]:
    """The text of each prompt of a completions request, for `echo`: a text prompt as sent,
    a token-id prompt decoded."""
    return [p if isinstance(p, str) else tokenizer.decode(list(p)) for p, _ in zip(_each_prompt(req), ids)]


def _each_prompt(req: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completions request: one text or one list of ids, or a list of them."""
    prompt = req.prompt
    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
        return [prompt]  # type: ignore[list-item]  # one prompt: text, or token ids
    return prompt  # type: ignore[return-value]
