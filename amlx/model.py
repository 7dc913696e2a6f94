"""The public API: `load`, `load_sync`, `Model` and `TokenStream`."""

from __future__ import annotations

import os
import threading
import time
import warnings
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Iterator

import anyio
from typing_extensions import Unpack

from amlx.engine.engine import Engine
from amlx.engine.request import RequestStream
from amlx.engine.worker import Worker
from amlx.errors import ClosedError
from amlx.prompt import PromptEncoder, is_heavy
from amlx.hub import resolve_model
from amlx.types import Completion, EngineStats, GenerateOptions, GenerationOptions, Prompt, Token, Usage


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is."""

    architecture: str
    parameters: int
    dtype: str
    device: str
    context_length: int
    quantization: dict | None
    path: str


class TokenStream:
    """The tokens of one request: `async for tok in stream` (or plain `for` in
    blocking code). Leaving early, `aclose()`, cancelling the consuming task or a
    timeout cancels the request; dropping an unfinished stream cancels it too.

    A prompt that takes long to tokenize (chat messages, long text) is tokenized
    and submitted on a thread as the first step of the first `async for` read,
    so the event loop goes on meanwhile; cancelling that read stops waiting at
    once (the request, once made, is cancelled)."""

    def __init__(self, stream: RequestStream | None = None, start: Callable[[], RequestStream] | None = None):
        self._stream = stream
        self._start = start  # makes the request (tokenizes and submits) when `stream` is None
        self._finished = False
        self._lock = threading.Lock()

    @property
    def prompt_tokens(self) -> int | None:
        """The prompt's length in tokens (None while a prompt worked off the loop is
        not yet tokenized)."""
        stream = self._stream
        return None if stream is None else stream.prompt_tokens

    async def _started(self) -> RequestStream:
        await anyio.to_thread.run_sync(self._begin, abandon_on_cancel=True)
        return self._stream

    def _begin(self) -> None:
        """Makes the request (any thread); cancels it if the stream was closed meanwhile."""
        stream = self._start()
        with self._lock:
            self._stream = stream
            gone = self._finished
        if gone:
            stream.cancel()

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> Token:
        if self._finished:
            raise StopAsyncIteration
        try:
            tok = await (self._stream or await self._started()).get()
        except BaseException:
            self._finish()
            raise
        if tok is None:
            self._finish()
            raise StopAsyncIteration
        if tok.finish_reason is not None:
            self._finished = True
        return tok

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Token:
        if self._finished:
            raise StopIteration
        try:
            if self._stream is None:
                self._begin()
            tok = self._stream.get_sync()
        except BaseException:
            self._finish()
            raise
        if tok is None:
            self._finish()
            raise StopIteration
        if tok.finish_reason is not None:
            self._finished = True
        return tok

    def _finish(self) -> None:
        with self._lock:
            self._finished = True
            stream = self._stream
        if stream is not None:
            stream.cancel()

    async def aclose(self) -> None:
        """Cancels the request if it is still running (idempotent)."""
        self._finish()

    def close(self) -> None:
        self._finish()

    async def __aenter__(self) -> "TokenStream":
        return self

    async def __aexit__(self, *exc) -> None:
        self._finish()

    def __enter__(self) -> "TokenStream":
        return self

    def __exit__(self, *exc) -> None:
        self._finish()

    def __del__(self):
        try:
            if self._stream is not None:
                self._stream.cancel()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Model:
    """A loaded model serving any number of concurrent requests.

    Create it with `await amlx.load(path)` (or `amlx.load_sync`). All MLX work
    runs on amlx's worker thread; every method here is safe to call from the
    event loop (it never blocks on MLX) and from other threads."""

    def __init__(self, engine: Engine, tokenizer, info: ModelInfo, config: dict):
        self._engine = engine
        self.tokenizer = tokenizer
        self.info = info
        self._config = config
        self._prompts = PromptEncoder(tokenizer, engine.max_context)

    @property
    def engine(self) -> Engine:
        """The engine serving this model (for training and other advanced use)."""
        return self._engine

    @property
    def config(self) -> dict:
        """The checkpoint's normalised configuration (read it, do not change it)."""
        return self._config

    # -- requests ---------------------------------------------------------------
    def _open(self, prompt: Prompt, options: Mapping[str, Any], inline: bool = False) -> TokenStream:
        """A request's stream; a heavy prompt (see amlx.prompt) is tokenized by the
        stream's first async read, on a thread, unless `inline` (blocking callers)."""
        if self._engine.closed:
            raise ClosedError("the model is closed")
        opts = GenerationOptions.from_kwargs(self._engine.vocab_size, **options)
        if not inline and is_heavy(prompt):
            return TokenStream(start=lambda: self._engine.submit(self._prompts.ids(prompt), opts))
        return TokenStream(self._engine.submit(self._prompts.ids(prompt), opts))

    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> TokenStream:
        """Starts a request and returns its stream of `Token`s.

        `prompt`: text, a list of token ids, or chat messages (rendered with the
        checkpoint's chat template). Options: max_tokens=256, temperature=0.0,
        top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, stop=(),
        seed=None, logprobs=False, max_buffer=16, presence_penalty=0.0,
        frequency_penalty=0.0, logit_bias=None, top_logprobs=0 (typed by
        `amlx.GenerateOptions`; bounds in `amlx.sample`; ValueError on bad values).
        Chat messages and long texts are tokenized off the event loop when the
        stream is first read: their errors (ChatTemplateError, ContextLengthError)
        are raised there."""
        return self._open(prompt, options)

    def generate_sync(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Iterator[Token]:
        """`generate` for blocking code (not for use on an event loop's thread)."""
        return self._open(prompt, options, inline=True)

    async def complete(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        """Runs a request to its end and returns the whole `Completion`."""
        stream = self._open(prompt, options)
        tokens = [tok async for tok in stream]
        return _completion(stream._stream, tokens)

    def complete_sync(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        stream = self._open(prompt, options, inline=True)
        return _completion(stream._stream, list(stream))

    def stats(self) -> EngineStats:
        """Active and waiting requests, tokens generated, decode steps, the recent
        tokens per second (busy time of the last 10 s) and MLX memory (bytes)."""
        return self._engine.stats()

    def train_lora(self, data, **options):
        """Fine-tunes a LoRA adapter on this model; returns an async iterator of
        `amlx.train.TrainingEvent`s (step, loss, learning rate, tokens/s, memory).
        `data`: a JSONL file, a directory with train.jsonl (and valid.jsonl), or a
        list of records. Options: see `amlx.train.trainer.TrainOptions`."""
        from amlx.train.trainer import train_lora

        return train_lora(self, data, **options)

    # -- lifetime -------------------------------------------------------------
    async def aclose(self) -> None:
        """Ends pending streams with ClosedError and frees the model (idempotent)."""
        await self._engine.aclose()

    def close(self) -> None:
        self._engine.close()

    @property
    def closed(self) -> bool:
        return self._engine.closed

    async def __aenter__(self) -> "Model":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # A safety net, as httpx's clients have: an open model holds native memory and a
        # place in the worker's rounds. Warn, and close it on the worker without waiting
        # here (a finalizer must never block).
        engine = getattr(self, "_engine", None)  # None: __init__ did not finish
        if engine is None or engine.closed:
            return
        try:
            warnings.warn(f"unclosed {self!r}: close it with `await model.aclose()`, `model.close()` or "
                          f"`async with`", ResourceWarning, source=self)
            engine.submit_job(engine.close)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.info.device
        return f"<amlx.Model {self.info.architecture} {self.info.dtype} {state} {self.info.path}>"

def _completion(stream: RequestStream, tokens: list[Token]) -> Completion:
    first_at = stream.first_token_at
    first = (first_at or time.perf_counter()) - stream.created
    end = stream.done_at or time.perf_counter()
    rate = (len(tokens) - 1) / (end - first_at) if len(tokens) > 1 and first_at and end > first_at else 0.0
    logprobs = [t.logprob for t in tokens] if stream.options.logprobs else None
    top = [t.top_logprobs for t in tokens] if stream.options.top_logprobs else None
    return Completion("".join(t.text for t in tokens), [t.id for t in tokens],
                      tokens[-1].finish_reason if tokens else "stop",
                      Usage(stream.prompt_tokens, len(tokens), first, rate), logprobs, top)


def _count_parameters(model) -> int:
    total = 0
    for name, p in model.named_parameters():
        if name.endswith((".scales", ".biases")):
            continue
        n = p.size
        if p.dtype.name == "uint32" and name.endswith(".weight"):
            bits = _bits_of(model, name)
            n = n * 32 // bits
        total += n
    return total


def _bits_of(model, weight_name: str) -> int:
    module = model.get_module(weight_name.rsplit(".", 1)[0])
    return getattr(module, "_bits", 32)


def _resolve_device(device: str) -> str:
    from amlx._mlx import device as mxdevice

    if device not in ("auto", "gpu", "cpu"):
        raise ValueError(f"device must be 'auto', 'gpu' or 'cpu', not {device!r}")
    if device == "auto":
        return "gpu" if mxdevice.gpu_available() else "cpu"
    if device == "gpu" and not mxdevice.gpu_available():
        raise ValueError("device='gpu' was asked for but MLX sees no GPU on this machine")
    return device


def _check_load_args(max_batch_size, max_context, adapter) -> None:
    if not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool) or max_batch_size < 1:
        raise ValueError("max_batch_size must be an integer >= 1")
    if max_context is not None and (not isinstance(max_context, int) or isinstance(max_context, bool)
                                    or max_context < 2):
        raise ValueError("max_context must be an integer >= 2 or None")
    if adapter is not None and not isinstance(adapter, (str, os.PathLike)):
        raise ValueError(f"adapter must be the path of an adapter directory, not {type(adapter).__name__}")


def _load_on_worker(path, device, dtype, max_batch_size, max_context, worker: Worker, adapter=None) -> Model:
    from amlx.engine.placement import EngineOptions, Placement
    from amlx.models import load_model
    from amlx.tokenizer import Tokenizer

    # The engine's own device and streams: the weights load on them (nothing
    # changes the process's default device; see amlx/engine/placement.py).
    options = EngineOptions(device=_resolve_device(device)).resolved()
    placement = Placement(options)
    dev = options.device
    tokenizer = Tokenizer.from_dir(path)
    with placement.on():
        loaded = load_model(path, dtype=dtype)
        if adapter is not None:
            from amlx.train.lora import apply_adapter

            apply_adapter(loaded, adapter)  # closes the model if the adapter does not apply
    limit = loaded.config["max_position_embeddings"]
    ctx = limit if max_context is None else min(max_context, limit)
    cfg = loaded.config
    info = ModelInfo(architecture=cfg["arch"], parameters=_count_parameters(loaded.model), dtype=loaded.dtype,
                     device=dev, context_length=ctx, quantization=cfg["quantization"], path=str(loaded.path))
    eos = frozenset(tokenizer.eos_token_ids) | frozenset(cfg["eos_token_ids"])
    engine = Engine(loaded.model, tokenizer, eos_ids=eos, vocab_size=cfg["vocab_size"],
                    max_batch_size=max_batch_size, max_context=ctx, worker=worker, options=options,
                    placement=placement)
    return Model(engine, tokenizer, info, cfg)


async def load(path: str | os.PathLike, *, device: str = "auto", dtype=None, max_batch_size: int = 32,
               max_context: int | None = None, adapter: Any = None) -> Model:
    """Loads a Hugging Face or MLX checkpoint: a directory, or a Hugging Face model
    id ("org/name") found in the local Hugging Face cache or downloaded into it
    (`amlx.hub.resolve_model`; a directory that exists wins).

    device: "auto" (GPU when MLX has one), "gpu" or "cpu". dtype: override the
    checkpoint's float type ("float32", "bfloat16", "float16"). max_batch_size:
    requests decoded together (the rest wait in arrival order). max_context: cap
    on prompt plus generation (default: the model's). Raises ModelLoadError for
    bad checkpoints. Use as `async with await amlx.load(path) as model:`."""
    _check_load_args(max_batch_size, max_context, adapter)
    path = await anyio.to_thread.run_sync(resolve_model, path)  # an id may download
    worker = Worker.get()
    return await worker.run(
        lambda: _load_on_worker(path, device, dtype, max_batch_size, max_context, worker, adapter))


def load_sync(path: str | os.PathLike, *, device: str = "auto", dtype=None, max_batch_size: int = 32,
              max_context: int | None = None, adapter: Any = None) -> Model:
    """`load` for scripts and blocking code."""
    _check_load_args(max_batch_size, max_context, adapter)
    path = resolve_model(path)
    worker = Worker.get()
    return worker.run_sync(
        lambda: _load_on_worker(path, device, dtype, max_batch_size, max_context, worker, adapter))
