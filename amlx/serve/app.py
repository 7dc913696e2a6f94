"""The FastAPI application: `create_app(model, ...)` serves one loaded amlx model.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models(/{id}),
GET /metrics (API key needed when keys are set), GET /health (always open), and the
chat page at GET / with its files under /static (open: the page asks for the key and
sends it with its API calls).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

import amlx
from amlx.prompt import PromptEncoder
from amlx.serve import prompts, tool_choice
from amlx.serve.auth import KeyCheck
from amlx.serve.errors import APIError, ErrorRoute, about_field, install_handlers
from amlx.serve.generation import Admission, Generation
from amlx.serve.metrics import CONTENT_TYPE, Metrics
from amlx.serve.options import check_completion_fields, generation_options
from amlx.serve.responses import ChatShape, CompletionShape
from amlx.serve.schemas import ChatRequest, CompletionRequest
from amlx.serve.streaming import EventStreamResponse, collect, sse_body, unless_gone
from amlx.toolcalls import detect_format

_STATIC = resources.files("amlx.serve") / "static"


@dataclass
class Settings:
    model_name: str
    api_keys: tuple[str, ...] = ()
    max_batch_size: int = 32
    max_queue: int = 256
    keepalive: float = 1.0  # seconds without a token before an SSE keep-alive comment
    request_log: Path | None = None  # append every generation request's body (JSON lines), for debugging


class Server:
    """What the routes share: the model, its settings, metrics and admission control."""

    def __init__(self, model: "amlx.Model", settings: Settings):
        self.model = model
        self.settings = settings
        self.metrics = Metrics(model)
        self.admission = Admission(settings.max_batch_size, settings.max_queue, self.metrics)
        self.tool_format = detect_format(model.tokenizer.chat_template)
        self.prompts = PromptEncoder(model.tokenizer, model.info.context_length)  # (its early length check)
        self.created = int(time.time())

    def received(self, endpoint: str, req: ChatRequest | CompletionRequest) -> float:
        """Counts a generation request, checks its model; returns the arrival time."""
        arrived = time.perf_counter()
        self.metrics.requests.labels(endpoint).inc()
        self.check_model(req.model)
        return arrived

    async def log_body(self, request: Request) -> None:
        """With --log-requests: appends a generation request's body, the JSON object as the client
        sent it, to the log, before it is validated, so that a request refused with a 400 is there
        too (a body that is no JSON object is not: the client gets a 400 saying so). The log held
        the request as parsed, the defaults of fields the client left out filled in (a
        "temperature": 1.0 nobody sent) and its nulls dropped, and nothing of a refused one."""
        if self.settings.request_log is None or request.method != "POST":
            return
        try:
            raw = await request.body()
        except Exception as exc:  # noqa: BLE001 - as FastAPI's own read of it answers (a client gone: 499)
            raise StarletteHTTPException(400, "There was an error parsing the body") from exc
        try:
            body: Any = json.loads(raw)
        except (ValueError, RecursionError):  # (not JSON, or nested past Python's parser)
            return
        if not isinstance(body, dict):
            return
        endpoint = "chat" if request.url.path.endswith("/chat/completions") else "completions"
        with self.settings.request_log.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"endpoint": endpoint, "body": body}) + "\n")

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server has {self.settings.model_name!r}",
                           param="model", code="model_not_found")

    async def answer(self, request: Request, req: ChatRequest | CompletionRequest, shape: Any,
                     prompt_ids: list[list[int]], tool_format: str | None, arrived: float,
                     echo_texts: list[str] | None = None) -> Response:
        """Starts the generations and answers: SSE, or one JSON body once all are done.
        `echo_texts`: the prompts' texts, shown before their choices (/v1/completions `echo`)."""
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options",
                           code="invalid_value")
        # More generations than the server ever runs at once can never be admitted: a 400, not
        # the 429 of a full queue, whose Retry-After would have a client retry forever.
        count = len(prompt_ids) * req.n
        if count > self.admission.capacity:
            asked = f"n={req.n}" if len(prompt_ids) == 1 else f"{len(prompt_ids)} prompts × n={req.n} = {count}"
            raise APIError(400, f"this request asks for {asked} generations; this server runs at most "
                           f"{self.admission.capacity} at once (--max-batch-size + --max-queue)",
                           param="n" if len(prompt_ids) == 1 else "prompt", code="invalid_value")
        info = self.model.info
        opts = generation_options(req, prompt_len=max(len(p) for p in prompt_ids), context=info.context_length,
                                  vocab=self.model.tokenizer.vocab_size)
        gen = Generation(self.model, self.metrics, self.admission, tool_format=tool_format,
                         want_logprobs=bool(opts.get("logprobs")), keepalive=self.settings.keepalive, arrived=arrived)
        # on a thread: checking a constraint the first time runs llguidance's check of its grammar,
        # about a second for a schema of thousands of optional properties, which the event loop
        # (every other client's stream) would wait out
        await anyio.to_thread.run_sync(functools.partial(
            gen.check, prompt_ids, opts, req.n, "messages" if isinstance(req, ChatRequest) else "prompt"))
        echo = None
        if echo_texts is not None:  # (with logprobs, the prompts' own logprobs first: a prefill each)
            # Admitted first: a request past the queue is a 429 before its prompts' logprobs are
            # computed on the engine (they were, outside admission control, and then refused).
            gen.admit(count)
            top_n = opts.get("top_logprobs", 0) if opts.get("logprobs") else None
            try:
                # (a client gone meanwhile stops it, as one gone during a prefill stops that)
                here, echo = await unless_gone(request, lambda: gen.echo(prompt_ids, echo_texts, top_n))
            finally:
                if echo is None:
                    gen.close()  # (gives the slots back)
            if not here:
                return Response(status_code=499)  # nobody is listening
        gen.start(prompt_ids, opts, req.n, echo)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return EventStreamResponse(sse_body(gen, shape, include_usage), on_close=gen.close)
        if not await collect(gen, request):
            return Response(status_code=499)  # nobody is listening; the generations were cancelled
        return JSONResponse(shape.whole(gen, bool(opts.get("logprobs"))))


def _routes(server: Server) -> APIRouter:
    # Every route here needs the API key (when keys are set), checked before the body is read.
    keyed = type("KeyedRoute", (ErrorRoute,), {"before": staticmethod(KeyCheck(server.settings.api_keys)),
                                               "received": staticmethod(server.log_body)})
    api = APIRouter(route_class=keyed)
    metrics = server.metrics

    @api.post("/v1/chat/completions")
    async def chat(request: Request, req: ChatRequest) -> Response:
        arrived = server.received("chat", req)
        messages, tools = prompts.chat_messages(req), prompts.chat_tools(req, server.tool_format)
        if tools and server.tool_format is None:
            raise APIError(400, "tools are not supported: this model's chat template has no tool-call format amlx "
                           "knows (Qwen/Hermes, Llama 3.1, Mistral)", param="tools", code="unsupported_parameter")
        try:
            ids = await anyio.to_thread.run_sync(functools.partial(
                prompts.render_chat, server.model.tokenizer, messages, tools, server.prompts.check_text,
                add_generation_prompt=req.add_generation_prompt, continue_final_message=req.continue_final_message))
        except amlx.ContextLengthError as exc:
            raise about_field(exc, "messages") from exc
        # tool_choice "required" or a named function: the calls become the request's grammar
        req = await anyio.to_thread.run_sync(tool_choice.with_forced_calls, req, server.tool_format,
                                             server.model.tokenizer, ids)
        tool_format = server.tool_format if tools else None
        return await server.answer(request, req, ChatShape(server.settings.model_name), [ids], tool_format, arrived)

    @api.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest) -> Response:
        arrived = server.received("completions", req)
        check_completion_fields(req)
        try:
            ids = await anyio.to_thread.run_sync(prompts.completion_prompts, server.model.tokenizer, req,
                                                 server.prompts.check_text)
        except amlx.ContextLengthError as exc:
            raise about_field(exc, "prompt") from exc
        texts = prompts.completion_texts(server.model.tokenizer, req, ids) if req.echo else None
        return await server.answer(request, req, CompletionShape(server.settings.model_name), ids, None, arrived,
                                   texts)

    def model_card() -> dict[str, Any]:
        info = server.model.info
        return {"id": server.settings.model_name, "object": "model", "created": server.created, "owned_by": "amlx",
                "context_length": info.context_length, "architecture": info.architecture}

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @api.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return model_card()

    @api.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return api


def create_app(model: "amlx.Model", settings: Settings) -> FastAPI:
    """An ASGI app serving `model` (which the caller loads and closes)."""
    server = Server(model, settings)
    app = FastAPI(title="amlx", version=amlx.__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    install_handlers(app, on_error=lambda status: server.metrics.errors.labels(str(status)).inc())
    app.include_router(_routes(server))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = model.stats()
        return {"status": "ok", "model": settings.model_name, "running": stats["active_requests"],
                "waiting": stats["waiting_requests"], "memory": stats["memory"],
                "auth": bool(settings.api_keys)}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(_STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(_STATIC)), name="static")
    return app
