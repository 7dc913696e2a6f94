"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Validation is strict (a string is not a number, unknown fields are refused), so a
request that amlx would misread gets a 400 naming the field instead; null in an optional
field means its default, as in OpenAI's API. Fields that are accepted but change nothing
are listed as such (`user`, `parallel_tool_calls`).
Responses are built as plain dicts in OpenAI's shapes (responses.py): a streamed
reply sends one chunk per token, which should not pay for validation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

MAX_N = 16  # choices per request: each is a concurrent generation

Float = Annotated[float, Field(strict=True)]  # accepts JSON numbers (ints too), never strings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """OpenAI documents its optional fields as nullable ("number or null"), null meaning the
        default, and the openai client sends null for an argument given as None: a null optional
        field is read as absent (a null unknown field is still refused, a required one still missing)."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
        return data


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class FunctionDef(_Strict):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionCall(_Strict):
    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class ToolCallIn(_Strict):
    index: StrictInt | None = None  # present when a client echoes calls it assembled from a stream
    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # image parts etc. are refused later, by name
    type: StrictStr
    text: StrictStr | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: StrictStr | None = None
    reasoning_content: StrictStr | None = None
    # Fields of the assistant messages that OpenAI's replies carry, which clients echo back as
    # they came (`reply.model_dump()`): accepted, unused. audio and function_call only as null.
    refusal: StrictStr | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: None = None
    function_call: None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: dict[str, StrictStr]


class _Sampling(_Strict):
    """Fields both endpoints share."""

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] = 1.0  # OpenAI's default
    top_p: Annotated[Float, Field(ge=0, le=1)] = 1.0  # OpenAI's range; 0 keeps the top token (options.py)
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=4)] | None = None
    seed: StrictInt | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] = 0.0
    logit_bias: dict[StrictStr, Annotated[Float, Field(ge=-100, le=100)]] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None  # accepted, unused (OpenAI's abuse-monitoring tag)
    # Sampling options beyond OpenAI's, as vLLM and mlx-lm's server accept them:
    top_k: Annotated[StrictInt, Field(ge=0)] = 0
    min_p: Annotated[Float, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[Float, Field(gt=0)] = 1.0
    # amlx's constraints beyond response_format (DESIGN.md; at most one per request):
    regex: StrictStr | None = None
    choice: Annotated[list[StrictStr], Field(min_length=1)] | None = None
    grammar: StrictStr | None = None  # Lark


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None  # accepted: every call the model writes is returned
    response_format: ResponseFormat | None = None
    # How the conversation is rendered, as vLLM accepts them: a last assistant message continued
    # (a reply begun for the model) instead of a new reply after it
    add_generation_prompt: StrictBool = True
    continue_final_message: StrictBool = False


PromptIds = Annotated[list[StrictInt], Field(min_length=1)]


class CompletionRequest(_Sampling):
    prompt: StrictStr | PromptIds | Annotated[list[Union[StrictStr, PromptIds]], Field(min_length=1)]
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None  # the legacy API: top-k count
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
