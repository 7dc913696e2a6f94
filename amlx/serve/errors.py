"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with a fitting status.

`APIError` is raised by the endpoints; `from_engine` translates what amlx raises for
one request (bad options, a prompt over the context, MLX failures) into the error
that request gets. The handlers installed by `install_handlers` make every other
failure (validation, unknown routes, bugs) take the same shape, and never end the
server. Routes of `ErrorRoute` turn whatever their endpoint raises into an APIError
before it leaves the route (see there).
"""

from __future__ import annotations

import logging
import re
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

import amlx

log = logging.getLogger("amlx.serve")

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}

# Generation options that are request fields of the same name (options.py), for the param of
# the engine's errors about them.
_OPTION_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
                  "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
                  "response_format", "regex", "choice", "grammar"}

# Engine option names -> the request field that set them, for "not available" messages.
_FIELD_OF_OPTION = {"presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
                    "logit_bias": "logit_bias", "top_logprobs": "top_logprobs", "response_format": "response_format",
                    "regex": "regex", "choice": "choice", "grammar": "grammar"}


# Constraint kinds (ConstraintError: "the json_schema constraint cannot be followed ...") whose
# request field has another name.
_FIELD_OF_CONSTRAINT = {"json_schema": "response_format", "json_object": "response_format"}


def _option_named(message: str) -> str | None:
    """The request field an engine's ValueError is about: its messages begin with the option's
    name ("stop must be ...", "top_k must be ...", "invalid regex: ...", "response_format of
    type ...", "the regex constraint cannot be followed: ...", "a stop string holds an unpaired
    surrogate ...": that one was a 400 with param null)."""
    match = re.match(r"(?:invalid |the |an? )?([a-z_]+)\b", message)
    name = _FIELD_OF_CONSTRAINT.get(match.group(1), match.group(1)) if match else None
    return name if name in _OPTION_FIELDS else None


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_engine(exc: BaseException) -> APIError:
    """The error one request gets for an exception amlx raised while starting or running it."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, amlx.ContextLengthError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, TypeError) and "unknown generation option" in str(exc):
        names = re.findall(r"option\(s\): ([\w, ]+?) \(", str(exc))
        options = [n.strip() for n in names[0].split(",")] if names else []
        fields = ", ".join(_FIELD_OF_OPTION.get(o, o) for o in options) or str(exc)
        return APIError(400, f"{fields}: not available in this amlx build (the engine has no such option yet)",
                        param=fields.split(", ")[0], code="unsupported_parameter")
    if isinstance(exc, amlx.ClosedError):
        return APIError(503, "the model is shutting down", code="model_closed")
    if isinstance(exc, (ValueError, TypeError)):
        return APIError(400, str(exc), param=_option_named(str(exc)), code="invalid_value")
    if isinstance(exc, MemoryError) or (isinstance(exc, amlx.MLXError) and "memory" in str(exc).lower()):
        return APIError(503, f"out of memory: {exc}", code="out_of_memory")
    log.error("request failed", exc_info=exc)
    return APIError(500, f"the request failed: {type(exc).__name__}: {exc}", code="internal_error")


def about_field(exc: BaseException, param: str) -> APIError:
    """`from_engine(exc)`, naming `param` where it is a 400 that names no field: errors about a
    request's prompt (a token id outside the vocabulary, a prompt over the context) name the
    field that holds it, "messages" or "prompt", as OpenAI's context_length_exceeded does."""
    error = from_engine(exc)
    if error.status == 400 and error.param is None:
        error.param = param
    return error


class ErrorRoute(APIRoute):
    """A route whose endpoint's exceptions become APIErrors (`from_engine`) inside the route.

    An exception that leaves the route reaches Starlette's outermost handler, the one
    `install_handlers` registers for Exception: it answers in the same shape, but then
    re-raises, so that uvicorn logs a traceback and closes the connection, and a client's
    next request on that kept-alive connection fails. A request's bad input (a ValueError
    from the tokenizer, say) is no reason to drop the connection.

    `before(request)`, where a subclass sets it, runs ahead of FastAPI's handler, i.e. before
    the body is read and parsed: the API key check (app.py). As a FastAPI dependency it ran
    after the body was read, so a client without a key had its whole body (of any size) read
    and got a 400 for a body that was not JSON, not the 401 every other request gets.

    `received(request)`, where a subclass sets it, is awaited after `before` and ahead of
    FastAPI's handler: it may read the body (which the handler then finds read), as the
    --log-requests log does, so that a request its validation refuses is logged too."""

    before: Callable[[Request], None] | None = None
    received: Callable[[Request], Awaitable[None]] | None = None

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        before, received = type(self).before, type(self).received

        async def guarded(request: Request) -> Response:
            try:
                if before is not None:
                    before(request)
                if received is not None:
                    await received(request)
                return await handler(request)
            except (APIError, RequestValidationError, StarletteHTTPException):
                raise  # (each has its own handler, which answers without re-raising)
            except Exception as exc:  # noqa: BLE001 - answered as the request's error, the connection kept
                raise from_engine(exc) from exc

        return guarded


def _is_union_label(part: object) -> bool:
    """Whether a part of a pydantic error's loc is the label of a union's member ("str",
    "list[int]", "literal['none','auto']", "NamedToolChoice"), not a field name, index or key:
    field names here are lower-case words, and no dict key of a request is validated per key
    but logit_bias's, whose keys are digits."""
    if not isinstance(part, str):
        return False
    return part in ("str", "int", "float", "bool", "none") or "[" in part or part[:1].isupper()


def _worst(errors: list[dict]) -> dict:
    """The error to report. A union field (stop, prompt, tool_choice, content) fails once per
    member, and the first is often the wrong one (five stop strings: "Input should be a valid
    string"): of the errors of the first error's value (its loc up to a union label), prefer
    one other than a type mismatch, then the one deepest in the body, i.e. of the member the
    value got furthest into."""
    loc = tuple(errors[0].get("loc", ()))
    value = next((loc[:k] for k, part in enumerate(loc) if _is_union_label(part)), loc)
    same = [e for e in errors if tuple(e.get("loc", ()))[:len(value)] == value]
    return min(same, key=lambda e: (_type_mismatch(e), -len(e.get("loc", ()))))


def _type_mismatch(error: dict) -> bool:
    """A value of the wrong type: also a literal's mismatch for a value that is no string (an
    object for tool_choice is a named function's, not a misspelled "required")."""
    kind = str(error.get("type", ""))
    return kind.endswith("_type") or (kind == "literal_error" and not isinstance(error.get("input"), str))


def _validation_error(exc: RequestValidationError) -> APIError:
    first = _worst(exc.errors()) if exc.errors() else {}
    # The param names the request's field: pydantic's union-member labels are left out of it.
    loc = [str(part) for part in first.get("loc", ()) if part != "body" and not _is_union_label(part)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(),
                        code="invalid_json")
    if kind == "extra_forbidden":
        return APIError(400, f"unsupported field {param!r} (amlx does not implement it)", param=param,
                        code="unsupported_parameter")
    if kind == "missing" and not loc:
        return APIError(400, "the body must be a JSON object", code="invalid_json")
    if not loc and isinstance(first.get("input"), (bytes, bytearray)):
        # FastAPI reads a body as JSON only under a JSON content type (as OpenAI does); curl -d
        # without -H sends application/x-www-form-urlencoded.
        return APIError(400, "the body must be a JSON object sent with Content-Type: application/json",
                        code="invalid_json")
    return APIError(400, f"{param or 'body'}: {first.get('msg', 'invalid value')}", param=param,
                    code="invalid_value")


def install_handlers(app: FastAPI, on_error: Callable[[int], None] = lambda status: None) -> None:
    """Every error becomes an OpenAI-shaped JSON response; `on_error(status)` counts it."""

    def answer(error: APIError) -> JSONResponse:
        on_error(error.status)
        return error.response()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return answer(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.__cause__, ClientDisconnect):
            # The client went away while sending its body, which FastAPI reports as a 400 "error
            # parsing the body": nobody listens, and no error of a request to count (it was
            # answered "the body is not JSON that can be read" and counted as a 400).
            return Response(status_code=499)
        code = "not_found" if exc.status_code == 404 else None
        message = f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        if exc.status_code == 400:  # (FastAPI's, for a body its JSON decoder raised on with no JSONDecodeError)
            code = "invalid_json"
            message = ("the body is not JSON that can be read: invalid UTF-8, nesting too deep, or a number with "
                       f"too many digits ({exc.detail})")
        return answer(APIError(exc.status_code, message, code=code, type="invalid_request_error",
                               headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return answer(from_engine(exc))
