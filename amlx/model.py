"""The public API: `load`, `load_sync`, `Model` and `TokenStream`."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator

from amlx.engine.channel import Channel
from amlx.engine.scheduler import Request, Scheduler
from amlx.engine.sampling import RowSampling
from amlx.engine.worker import Worker
from amlx.errors import ClosedError
from amlx.generate import TextAssembler, check_context
from amlx.types import Completion, GenerationOptions, Token, Usage


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
    timeout cancels the request; dropping an unfinished stream cancels it too."""

    def __init__(self, model: "Model", request: Request):
        self._model = model
        self._request = request
        self._channel = request.channel
        self._finished = False

    @property
    def prompt_tokens(self) -> int:
        return len(self._request.prompt)

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> Token:
        if self._finished:
            raise StopAsyncIteration
        try:
            tok = await self._channel.get()
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
            tok = self._channel.get_sync()
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
        self._finished = True
        if not self._channel.done:
            self._channel.cancel()

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
            if not self._channel.done:
                self._channel.cancel()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class Model:
    """A loaded model serving any number of concurrent requests.

    Create it with `await amlx.load(path)` (or `amlx.load_sync`). All MLX work
    runs on amlx's worker thread; every method here is safe to call from the
    event loop (it never blocks on MLX) and from other threads."""

    def __init__(self, loaded, tokenizer, worker: Worker, device: str, max_batch_size: int, max_context: int):
        self._loaded = loaded
        self._worker = worker
        self.tokenizer = tokenizer
        self._eos = frozenset(tokenizer.eos_token_ids) | frozenset(loaded.config["eos_token_ids"])
        self._max_context = max_context
        self._scheduler = Scheduler(loaded.model, tokenizer, self._eos, max_batch_size, max_context, worker.wake)
        self._closed = False
        self._close_lock = threading.Lock()
        cfg = loaded.config
        self.info = ModelInfo(
            architecture=cfg["arch"], parameters=_count_parameters(loaded.model), dtype=loaded.dtype, device=device,
            context_length=max_context, quantization=cfg["quantization"], path=str(loaded.path))
        worker.add_scheduler(self._scheduler)

    # -- requests ---------------------------------------------------------------
    def _prompt_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self._loaded.config["vocab_size"]
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
            return list(prompt)
        raise TypeError("prompt must be a string, a list of token ids, or a list of chat messages (dicts)")

    def _submit(self, prompt, options: dict) -> TokenStream:
        if self._closed:
            raise ClosedError("the model is closed")
        opts = GenerationOptions.from_kwargs(**options)
        ids = self._prompt_ids(prompt)
        room = check_context(len(ids), self._max_context)
        channel = Channel(opts.max_buffer, self._worker.wake)
        req = Request(ids, opts, channel, TextAssembler(self.tokenizer, opts, self._eos, max_new=room),
                      RowSampling(opts, ids))
        self._scheduler.add(req)
        return TokenStream(self, req)

    def generate(self, prompt, **options) -> TokenStream:
        """Starts a request and returns its stream of `Token`s.

        `prompt`: text, a list of token ids, or chat messages (rendered with the
        checkpoint's chat template). Options: max_tokens=256, temperature=0.0,
        top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, stop=(),
        seed=None, logprobs=False, max_buffer=16 (ValueError on bad values)."""
        return self._submit(prompt, options)

    def generate_sync(self, prompt, **options) -> Iterator[Token]:
        """`generate` for blocking code (not for use on an event loop's thread)."""
        return self._submit(prompt, options)

    async def complete(self, prompt, **options) -> Completion:
        """Runs a request to its end and returns the whole `Completion`."""
        start = time.perf_counter()
        stream = self._submit(prompt, options)
        tokens = [tok async for tok in stream]
        return _completion(stream, tokens, start)

    def complete_sync(self, prompt, **options) -> Completion:
        start = time.perf_counter()
        stream = self._submit(prompt, options)
        return _completion(stream, list(stream), start)

    def stats(self) -> dict:
        """Requests, token counters and MLX memory (bytes)."""
        from amlx import memory

        s = self._scheduler
        elapsed = max(time.perf_counter() - s._started, 1e-9)
        counts = s.counts()
        return {"active_requests": counts["active"], "waiting_requests": counts["waiting"],
                "tokens_generated": s.tokens_generated, "decode_steps": s.decode_steps,
                "tokens_per_second": s.tokens_generated / elapsed, "memory": memory()}

    def train_lora(self, data, **options):
        """Fine-tunes a LoRA adapter on this model; returns an async iterator of
        `amlx.train.TrainingEvent`s (step, loss, learning rate, tokens/s, memory).
        `data`: a JSONL file, a directory with train.jsonl (and valid.jsonl), or a
        list of records. Options: see `amlx.train.trainer.TrainOptions`."""
        from amlx.train.trainer import train_lora

        return train_lora(self, data, **options)

    def train(self, data, **options):
        """Fine-tunes every float weight of this model with AdamW (full fine-tuning);
        returns an async iterator of `amlx.train.TrainingEvent`s, as `train_lora`.
        `save_path=DIR` writes a complete checkpoint there (every `save_every`
        steps and at the end) that `amlx.load(DIR)` loads. Quantized models refuse
        (ValueError). Options: see `amlx.train.full.train_full`."""
        from amlx.train.full import train_full

        return train_full(self, data, **options)

    # -- lifetime -------------------------------------------------------------
    def _shutdown(self) -> None:
        """On the worker: end every request, free caches and weights."""
        self._scheduler.shutdown()
        self._worker.remove_scheduler(self._scheduler)
        self._loaded.model.close()

    def _begin_close(self) -> bool:
        with self._close_lock:
            if self._closed:
                return False
            self._closed = True
            return True

    async def aclose(self) -> None:
        """Ends pending streams with ClosedError and frees the model (idempotent)."""
        if self._begin_close():
            await self._worker.run(self._shutdown)

    def close(self) -> None:
        if self._begin_close():
            self._worker.run_sync(self._shutdown)

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> "Model":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.info.device
        return f"<amlx.Model {self.info.architecture} {self.info.dtype} {state} {self.info.path}>"


def _completion(stream: TokenStream, tokens: list[Token], start: float) -> Completion:
    req = stream._request
    first = (req.first_token_at or time.perf_counter()) - req.created
    end = req.done_at or time.perf_counter()
    rate = (len(tokens) - 1) / (end - req.first_token_at) if len(tokens) > 1 and req.first_token_at and \
        end > req.first_token_at else 0.0
    logprobs = [t.logprob for t in tokens] if req.options.logprobs else None
    return Completion("".join(t.text for t in tokens), [t.id for t in tokens],
                      tokens[-1].finish_reason if tokens else "stop",
                      Usage(len(req.prompt), len(tokens), first, rate), logprobs)


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
    from amlx._mlx import device as mxdevice
    from amlx.models import load_model
    from amlx.tokenizer import Tokenizer

    dev = _resolve_device(device)
    mxdevice.set_default_device(dev)
    tokenizer = Tokenizer.from_dir(path)
    loaded = load_model(path, dtype=dtype)
    if adapter is not None:
        from amlx.train.lora import apply_adapter

        apply_adapter(loaded, adapter)  # closes the model if the adapter does not apply
    limit = loaded.config["max_position_embeddings"]
    ctx = limit if max_context is None else min(max_context, limit)
    return Model(loaded, tokenizer, worker, dev, max_batch_size, ctx)


async def load(path: str | os.PathLike, *, device: str = "auto", dtype=None, max_batch_size: int = 32,
               max_context: int | None = None, adapter: Any = None) -> Model:
    """Loads a Hugging Face or MLX checkpoint directory.

    device: "auto" (GPU when MLX has one), "gpu" or "cpu". dtype: override the
    checkpoint's float type ("float32", "bfloat16", "float16"). max_batch_size:
    requests decoded together (the rest wait in arrival order). max_context: cap
    on prompt plus generation (default: the model's). Raises ModelLoadError for
    bad checkpoints. Use as `async with await amlx.load(path) as model:`."""
    _check_load_args(max_batch_size, max_context, adapter)
    worker = Worker.get()
    return await worker.run(
        lambda: _load_on_worker(path, device, dtype, max_batch_size, max_context, worker, adapter))


def load_sync(path: str | os.PathLike, *, device: str = "auto", dtype=None, max_batch_size: int = 32,
              max_context: int | None = None, adapter: Any = None) -> Model:
    """`load` for scripts and blocking code."""
    _check_load_args(max_batch_size, max_context, adapter)
    worker = Worker.get()
    return worker.run_sync(
        lambda: _load_on_worker(path, device, dtype, max_batch_size, max_context, worker, adapter))
