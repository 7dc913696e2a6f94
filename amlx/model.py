"""The public API: `load`, `load_sync`, `Model` and `TokenStream`."""

from __future__ import annotations

import numbers
import os
import threading
import time
import warnings
from dataclasses import dataclass
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable, Iterator

import anyio
from typing_extensions import Unpack

from amlx.engine.engine import Engine
from amlx.engine.request import RequestStream
from amlx.engine.worker import Worker
from amlx.errors import ContextLengthError
from amlx.hub import resolve_model
from amlx.notices import notice
from amlx.prompt import INLINE_CHARS, PromptEncoder, is_heavy, is_token_id
from amlx.toolcalls import detect_format, parse_tool_calls, prompt_opens_reasoning
from amlx.types import (CONSTRAINT_OPTIONS, Completion, EngineStats, GenerateOptions, GenerationOptions, Prompt, Token,
                        Usage, is_heavy_constraint)

if TYPE_CHECKING:
    from amlx.tokenizer import Tokenizer


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

    A prompt that takes long to tokenize (chat messages, long text) is tokenized,
    and a large constraint checked, on a thread as the first step of the first
    `async for` read (which submits the request there), so the event loop goes on
    meanwhile; cancelling that read stops waiting at once (the request, once made,
    is cancelled)."""

    def __init__(self, stream: RequestStream | None = None, start: Callable[[], RequestStream] | None = None):
        self._stream = stream
        self._start = start  # makes the request (tokenizes and submits) when `stream` is None
        self._finished = False
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()  # held while `start` runs: it makes one request

    @property
    def prompt_tokens(self) -> int | None:
        """The prompt's length in tokens (None while a prompt worked off the loop is
        not yet tokenized)."""
        stream = self._stream
        return None if stream is None else stream.prompt_tokens

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (0 until the request is admitted)."""
        stream = self._stream
        return 0 if stream is None else stream.cached_tokens

    async def _started(self) -> RequestStream:
        await anyio.to_thread.run_sync(self._begin, abandon_on_cancel=True)
        return self._stream

    def _begin(self) -> None:
        """Makes the request (any thread), once however many reads start it at the same time
        (two made two requests: both read the same first token, and the one the stream then
        dropped held its place and KV blocks for good); cancels it if the stream was closed
        meanwhile."""
        with self._start_lock:
            if self._stream is not None:
                return
            stream = self._start()
            with self._lock:
                self._stream = stream
                gone = self._finished
        if gone:
            stream.cancel()

    def __aiter__(self) -> "TokenStream":
        return self

    async def __anext__(self) -> Token:
        if not self._finished:
            try:
                tok = await (self._stream or await self._started()).get()
            except BaseException:
                self._finish()
                raise
            if self._took(tok):
                return tok
        raise StopAsyncIteration

    def __iter__(self) -> "TokenStream":
        return self

    def __next__(self) -> Token:
        if not self._finished:
            try:
                if self._stream is None:
                    self._begin()
                tok = self._stream.get_sync()
            except BaseException:
                self._finish()
                raise
            if self._took(tok):
                return tok
        raise StopIteration

    def _took(self, tok: Token | None) -> bool:
        """Whether `tok` goes to the consumer (None: the stream has ended)."""
        if tok is None:
            self._finish()
            return False
        if tok.finish_reason is not None:
            self._finished = True
        return True

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
        """A request's stream; a heavy prompt (see amlx.prompt) is tokenized, and a heavy
        constraint (`is_heavy_constraint`) checked, by the stream's first async read, on a
        thread, unless `inline` (blocking callers)."""
        if self._engine.closed:
            raise self._engine.closed_error()
        vocab = self._engine.vocab_size
        if not inline and is_heavy_constraint(options):
            # llguidance's first check of a large grammar held the event loop for up to a second;
            # the other options are still checked here, at the call
            GenerationOptions.from_kwargs(vocab, **{k: v for k, v in options.items() if k not in CONSTRAINT_OPTIONS})
            return TokenStream(start=lambda: self._engine.submit(
                self._prompts.ids(prompt), GenerationOptions.from_kwargs(vocab, **options)))
        opts = GenerationOptions.from_kwargs(vocab, **options)
        if not inline and is_heavy(prompt):
            return TokenStream(start=lambda: self._engine.submit(self._prompts.ids(prompt), opts))
        return TokenStream(self._engine.submit(self._prompts.ids(prompt), opts))

    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> TokenStream:
        """Starts a request and returns its stream of `Token`s.

        `prompt`: text, a list of token ids, or chat messages (rendered with the
        checkpoint's chat template). Options: max_tokens=256, temperature=0.0,
        top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0, stop=(),
        seed=None, logprobs=False, max_buffer=16, presence_penalty=0.0,
        frequency_penalty=0.0, logit_bias=None, top_logprobs=0 (0..20; turns logprobs on) (typed by
        `amlx.GenerateOptions`; bounds in `amlx.sample`; ValueError on bad values),
        and at most one constraint, response_format / regex / choice / grammar (the
        text then matches it; see amlx.constrain).
        Chat messages and long texts are tokenized off the event loop when the
        stream is first read: their errors (ChatTemplateError, ContextLengthError)
        are raised there; so is a large constraint's ValueError (one of more than
        `amlx.types.INLINE_CONSTRAINT_CHARS` characters is checked there, on a thread:
        llguidance's first check of it may take a second)."""
        return self._open(prompt, options)

    def generate_sync(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Iterator[Token]:
        """`generate` for blocking code (not for use on an event loop's thread)."""
        return self._open(prompt, options, inline=True)

    async def complete(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        """Runs a request to its end and returns the whole `Completion`."""
        stream = self._open(prompt, options)
        tokens = [tok async for tok in stream]
        return _completion(stream._stream, tokens, self.tokenizer)

    def complete_sync(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        stream = self._open(prompt, options, inline=True)
        return _completion(stream._stream, list(stream), self.tokenizer)

    async def _prompt_ids(self, prompt: Prompt) -> list[int]:
        """A prompt's ids; chat messages and long texts are tokenized off the event loop."""
        if is_heavy(prompt):
            return await anyio.to_thread.run_sync(self._prompts.ids, prompt)
        return self._prompts.ids(prompt)

    async def score(self, prompt: Prompt, continuations: Sequence[str | Sequence[int]]) -> list[float]:
        """The total log-probability of each continuation right after `prompt` (float32).

        `prompt` is what `generate` takes; a string continuation is tokenized as text that
        goes on after the prompt (no special tokens; `Tokenizer.continuation_ids`) and
        appended to the prompt's tokens, so spell the space a word starts with (" sports").
        The prompt is prefilled once and shared; the work runs on the engine's worker like
        generation. An empty continuation scores 0.0."""
        if self._engine.closed:
            raise self._engine.closed_error()
        ids = await self._prompt_ids(prompt)
        if isinstance(continuations, (str, bytes, Mapping)) or not isinstance(continuations, Iterable):
            # (a string would score each of its characters)
            raise TypeError(f"continuations must be a list of strings or of token-id lists, "
                            f"not {type(continuations).__name__}")
        items: list[str | list[int]] = []
        for c in continuations:
            if isinstance(c, str):
                items.append(c)
            elif isinstance(c, (list, tuple)) and all(is_token_id(t) for t in c):
                items.append([int(t) for t in c])
            else:
                raise TypeError("each continuation must be a string or a list of token ids")
        # Long string continuations are treated as long prompts are: one that cannot fit the
        # context whatever its tokens is refused before it is tokenized, and the tokenizing
        # runs on a thread (a 10 MB continuation held the event loop for 10 s, then failed).
        if sum(len(c) for c in items if isinstance(c, str)) > INLINE_CHARS:
            conts = await anyio.to_thread.run_sync(self._continuation_ids, len(ids), items)
        else:
            conts = self._continuation_ids(len(ids), items)
        return await self._engine.score(ids, conts)

    async def prompt_logprobs(self, prompt: Prompt, top_logprobs: int = 0) -> list[Token]:
        """Each token of `prompt` as a `Token`: its id, its text (the pieces join into the
        prompt's decoded text), and for every token after the first its `logprob` given the
        tokens before it and, with `top_logprobs=n` (0..20), the n likeliest tokens at that
        position, best first. The first token has no logprob (nothing comes before it) and
        every `finish_reason` is None. Log-probabilities are the model's own (log_softmax of
        the raw logits, float32), as a generated token's are. The prompt is prefilled once,
        in chunks, on the engine's worker like generation (the server's `echo` uses this)."""
        if self._engine.closed:
            raise self._engine.closed_error()
        # checked and made a plain int as generate's option is (a numpy integer was refused as
        # "must be an integer")
        top_logprobs = GenerationOptions(top_logprobs=top_logprobs).top_logprobs
        ids = await self._prompt_ids(prompt)
        if not ids:
            raise ValueError("prompt_logprobs needs a prompt of at least one token")
        result = await self._engine.prompt_logprobs(ids, top_logprobs)
        detok = self.tokenizer.detokenizer()
        pieces = [detok.add(t) for t in ids]
        pieces[-1] += detok.finalize()
        tokens = [Token(ids[0], pieces[0])]
        for k, (t, text) in enumerate(zip(ids[1:], pieces[1:])):
            top = [(int(i), float(lp)) for i, lp in zip(result.top_ids[k], result.top_logprobs[k])] \
                if top_logprobs else None
            tokens.append(Token(t, text, result.logprobs[k], None, top))
        return tokens

    def _continuation_ids(self, prompt_len: int, items: list) -> list[list[int]]:
        """Token ids of `score`'s continuations (strings as text that goes on after the prompt,
        `Tokenizer.continuation_ids`, no special tokens); ContextLengthError before tokenizing
        a text too long to fit after the prompt."""
        max_context = self._engine.max_context
        for c in items:
            if isinstance(c, str) and len(c) > INLINE_CHARS:
                least = self._prompts.least_tokens(c)
                if prompt_len + least > max_context:
                    raise ContextLengthError(f"the prompt and a continuation have at least {prompt_len + least} "
                                             f"tokens but the context holds {max_context}")
        return [self.tokenizer.continuation_ids(c) if isinstance(c, str) else c for c in items]

    def stats(self) -> EngineStats:
        """Active and waiting requests, tokens generated, decode steps, the recent
        tokens per second (busy time of the last 10 s) and MLX memory (bytes).

        A request counts as active until the engine has given its KV blocks back, which
        happens in the worker's round after its last token (or its cancellation): for
        about a step after `complete()` returns it may still count. `active_requests`
        and `waiting_requests` both 0 means every request's blocks are back."""
        return self._engine.stats()

    def train_lora(self, data, **options):
        """Fine-tunes a LoRA adapter on this model; returns an async iterator of
        `amlx.train.TrainingEvent`s (step, loss, learning rate, tokens/s, memory).
        `data`: a JSONL file, a directory with train.jsonl (and valid.jsonl), or a
        list of records. Options: see `amlx.train.trainer.TrainOptions`."""
        from amlx.train.trainer import train_lora

        self._no_tensor_parallel("train_lora")
        return train_lora(self, data, **options)

    def train(self, data, **options):
        """Fine-tunes every float weight of this model with AdamW (full fine-tuning);
        returns an async iterator of `amlx.train.TrainingEvent`s, as `train_lora`.
        `save_path=DIR` writes a complete checkpoint there (every `save_every`
        steps and at the end) that `amlx.load(DIR)` loads. Quantized models refuse
        (ValueError). Options: see `amlx.train.full.train_full`."""
        from amlx.train.full import train_full

        self._no_tensor_parallel("train")
        return train_full(self, data, **options)

    def _no_tensor_parallel(self, what: str) -> None:
        if self._engine.tensor_parallel > 1:
            raise ValueError(f"{what}() does not support a model loaded with tensor_parallel > 1")

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

def _completion(stream: RequestStream, tokens: list[Token], tokenizer: Tokenizer) -> Completion:
    first_at = stream.first_token_at
    first = (first_at or time.perf_counter()) - stream.created
    end = stream.done_at or time.perf_counter()
    rate = (len(tokens) - 1) / (end - first_at) if len(tokens) > 1 and first_at and end > first_at else 0.0
    logprobs = [t.logprob for t in tokens] if stream.options.logprobs else None
    top = [t.top_logprobs for t in tokens] if stream.options.top_logprobs else None
    text = "".join(t.text for t in tokens)
    fmt = detect_format(tokenizer.chat_template)
    # a prompt that leaves a reasoning section open: the reply's calls before its `</think>` are reasoning
    thinking = prompt_opens_reasoning(tokenizer, stream.request.prompt, fmt)
    calls = parse_tool_calls(text, fmt, thinking=thinking)[1]
    return Completion(text, [t.id for t in tokens], tokens[-1].finish_reason if tokens else "stop",
                      Usage(stream.prompt_tokens, len(tokens), first, rate, stream.cached_tokens), logprobs, top,
                      calls or None)


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


def _check_path(path) -> None:
    """TypeError naming `path` for what is no path (None, bytes, a number): the error came
    from pathlib ("expected str, bytes or os.PathLike object, not NoneType")."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a checkpoint directory or a Hugging Face model id (a str or an "
                        f"os.PathLike), not {type(path).__name__}")


def _check_load_args(max_batch_size, max_context, adapter, kv_cache_memory=None, prefix_cache=True,
                     kv_bits=None, tensor_parallel: int = 1, draft=None, dtype=None) -> tuple[int, int | None]:
    """ValueError (TypeError, ModelLoadError) for a bad load option, before anything is read;
    returns max_batch_size and max_context as plain ints."""
    from amlx.models.loader import check_dtype
    from amlx.tp.load import check_tensor_parallel

    check_dtype(dtype)  # (here too: before a Hugging Face id is downloaded)
    check_tensor_parallel(tensor_parallel)
    if tensor_parallel > 1 and adapter is not None:
        raise ValueError("an adapter cannot be applied to a tensor_parallel model yet")
    if tensor_parallel > 1 and draft is not None:
        # (its verify and draft passes would need describing to the other ranks too)
        raise ValueError("speculative decoding (draft) is not supported with tensor_parallel > 1 yet")
    max_batch_size = _plain_int(max_batch_size, 1, "max_batch_size must be an integer >= 1")
    if max_context is not None:
        max_context = _plain_int(max_context, 2, "max_context must be an integer >= 2 or None")
    if adapter is not None and not isinstance(adapter, (str, os.PathLike)):
        raise ValueError(f"adapter must be the path of an adapter directory, not {type(adapter).__name__}")
    from amlx.kv.sizing import check_kv_bits, check_kv_cache_memory

    check_kv_cache_memory(kv_cache_memory)
    check_kv_bits(kv_bits)
    if not isinstance(prefix_cache, bool):
        raise ValueError(f"prefix_cache must be True or False, not {prefix_cache!r}")
    return max_batch_size, max_context


def _plain_int(value: Any, least: int, message: str) -> int:
    """`value` as a plain int: any integer (numbers.Integral, not a bool) >= `least`, as
    kv_cache_memory and the generate options take numpy's; ValueError(`message`) otherwise.
    (A numpy integer was refused as "must be an integer"; plain, it sizes the engine's
    arrays and compiled passes as an int does.)"""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
        raise ValueError(message)
    return int(value)


def _engine_options(kv_cache_memory, prefix_cache, kv_bits, draft, num_draft_tokens) -> dict:
    """The load options the engine takes (EngineOptions), the speculative ones checked."""
    from amlx.speculative.draft import DraftSpec

    spec = DraftSpec.from_options(draft, num_draft_tokens)  # ValueError on bad values
    return {"kv_cache_memory": kv_cache_memory, "prefix_cache": prefix_cache, "kv_bits": kv_bits,
            "draft": None if spec is None else (spec.kind if spec.path is None else str(spec.path)),
            "num_draft_tokens": num_draft_tokens}


def _read_on_host(path, dtype, draft: str | None = None, kv_bits: int | None = None) -> tuple[Any, Any, Any]:
    """The host phase of loading (pure Python, no MLX; any thread but the worker):
    the checkpoint's files checked and read (`amlx.models.prepare`), then the
    tokenizer, and a draft model's tokenizer checked against it before its files
    are read (the third item: its prepared checkpoint, or None). Nothing in a
    checkpoint can make it block (docs/architecture.md). A head dimension that
    `kv_bits` cannot group is refused from the config here, before any weight is
    read (the engine's pool refused it only once the whole model had loaded)."""
    from amlx.kv.sizing import check_kv_head_dim
    from amlx.models import prepare
    from amlx.speculative.draft import PROMPT_LOOKUP, check_draft_tokenizer
    from amlx.tokenizer import Tokenizer

    path = resolve_model(path)  # a Hugging Face id: from the local cache, or downloaded
    spec = prepare(path, dtype)
    check_kv_head_dim(kv_bits, spec.args.head_dim)
    tokenizer = Tokenizer.from_dir(path)
    draft_spec = None
    if draft is not None and draft != PROMPT_LOOKUP:
        check_draft_tokenizer(tokenizer, Tokenizer.from_dir(draft), path, draft)  # DraftTokenizerError
        draft_spec = prepare(draft, dtype)
        try:
            check_kv_head_dim(kv_bits, draft_spec.args.head_dim)
        except ValueError as exc:  # (worded as the draft's pool words it: amlx.engine.draft_model)
            raise ValueError(f"the draft model (draft={draft}): {exc}") from None
    return spec, tokenizer, draft_spec


def _warm_up(model, device: str, max_rows: int) -> None:
    """Compiles MLX's quantized-matmul kernels at load on CUDA (once per machine),
    so a missing CUDA header fails the load with its fix, not a request later."""
    from amlx.models.warmup import needs_warmup, warm_quantized_matmuls

    if not needs_warmup(model, device):
        return
    try:
        warm_quantized_matmuls(model, max_rows, parallel=True)
    except BaseException:
        model.close()
        raise


EXTEND_NOTICE = ("amlx: compiling GPU kernels for prompts behind a cached prefix, once (MLX keeps them in "
                 "MLX_PTX_CACHE_DIR)")


EXTEND_WARMUP_S = 30.0  # the extend pass's load-time warm-up stops after the width that passes this


def extend_warmup_budget() -> float:
    """Seconds the extend pass's load-time warm-up may take before it leaves the larger
    widths cold (Scheduler.warm_extend's `budget_s`): AMLX_EXTEND_WARMUP_S, default 30."""
    raw = os.environ.get("AMLX_EXTEND_WARMUP_S", "").strip()
    if not raw:
        return EXTEND_WARMUP_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:  # (NaN too)
        raise ValueError(f"AMLX_EXTEND_WARMUP_S must be a number of seconds >= 0, not {raw!r}")
    return value


def _warm_extend(engine) -> None:
    """Compiles the kernels of the compiled extend pass (a short prefill behind a cached
    prefix) at load on a GPU (Scheduler.warm_extend); a notice goes to stderr only if it
    takes a while (something was compiled), and another if it ran out of its budget
    (extend_warmup_budget) and left longer prompts to the plain pass. If it fails, the
    engine keeps the plain pass."""
    from amlx.models.warmup import NOTICE_AFTER_S, SlowNotice, warmup_enabled

    if engine.placement.device != "gpu" or not warmup_enabled():
        return
    scheduler = engine.scheduler
    before = scheduler.extend_max
    try:
        budget = extend_warmup_budget()  # (a bad value fails the warm-up: the plain pass serves)
        with SlowNotice(notice, NOTICE_AFTER_S, EXTEND_NOTICE):
            scheduler.warm_extend(budget_s=budget)
    except Exception as exc:  # noqa: BLE001 - the plain prefill pass still serves
        scheduler.extend_max = 0
        warnings.warn(f"amlx: the compiled extend pass is off for this model: its warm-up failed ({exc})",
                      RuntimeWarning, stacklevel=2)
        return
    if 0 < scheduler.extend_max < before:
        notice(f"amlx: kernels compiled for up to {scheduler.extend_max} new tokens behind a cached prefix "
               f"(AMLX_EXTEND_WARMUP_S={budget:g} s); longer ones take the plain pass in "
               "this process, and the next load compiles more")


FIRST_REQUESTS_NOTICE = "amlx: running the first requests' one-time GPU setup while the model loads"


def _warm_first_requests(engine) -> None:
    """Runs a short request, then a few at once, at load on a GPU (amlx.engine.warm), so the
    one-time cost of a process's first passes (7.6 s and 2.7 s with Qwen3-8B 4-bit on an
    H200, every kernel cached) is not the user's. Not with tensor parallelism (every rank
    would have to take part) nor AMLX_WARMUP=0. If it fails, the load goes on, with a warning."""
    from amlx.engine.warm import warm_requests
    from amlx.models.warmup import NOTICE_AFTER_S, SlowNotice, warmup_enabled

    if engine.placement.device != "gpu" or engine.mirror is not None or not warmup_enabled():
        return
    try:
        with SlowNotice(notice, NOTICE_AFTER_S, FIRST_REQUESTS_NOTICE):
            warm_requests(engine)
    except Exception as exc:  # noqa: BLE001 - the user's requests will meet the same error, if any
        engine.scheduler.reset_counters()
        warnings.warn(f"amlx: the load-time warm-up requests failed ({exc}); the first request pays its setup",
                      RuntimeWarning, stacklevel=2)


def _load_draft(target, draft_spec, dtype):
    """The draft model's CausalLM (load option draft=PATH), on the engine's stream; None without."""
    from amlx.models import build_model

    if draft_spec is None:
        return None
    try:
        return build_model(draft_spec, dtype=dtype).model
    except BaseException:
        target.close()
        raise


def _load_on_worker(host, device, dtype, max_batch_size, max_context, worker: Worker, adapter=None,
                    kv: dict | None = None, tensor_parallel: int = 1) -> Model:
    try:
        return _build_on_worker(host, device, dtype, max_batch_size, max_context, worker, adapter, kv or {},
                                tensor_parallel)
    except BaseException:
        if tensor_parallel > 1:
            worker.stop()  # the model's own worker (see _worker_for): it ends after this job
        raise


def _build_on_worker(host, device, dtype, max_batch_size, max_context, worker: Worker, adapter, kv: dict,
                     tensor_parallel: int) -> Model:
    from amlx.engine.placement import EngineOptions, Placement
    from amlx.kernel_cache import check_kernel_cache
    from amlx.models import build_model

    # The engine's own device and streams: the weights load on them (nothing
    # changes the process's default device; see amlx/engine/placement.py).
    # A tensor-parallel rank runs on one stream: every rank must evaluate the
    # same collectives in the same order (amlx.tp).
    options = EngineOptions(device=_resolve_device(device), **kv).resolved()
    check_kernel_cache(options.device)  # (else the load succeeded and every request failed in MLX)
    if tensor_parallel > 1:
        options = options.for_rank()
    placement = Placement(options)
    dev = options.device
    spec, tokenizer, draft_spec = host
    tp = _start_ranks(spec.path, tensor_parallel, dev, dtype, options.kv_bits)
    leader, counted = None, []  # counted: the whole model's parameters, before rank 0 keeps its part

    def shard(model) -> None:
        counted.append(_count_parameters(model))
        tp.shard(model)
    try:
        with placement.on():
            loaded = build_model(spec, dtype=dtype, shard=None if tp is None else shard)
            if adapter is not None:
                from amlx.train.lora import apply_adapter

                apply_adapter(loaded, adapter)  # closes the model if the adapter does not apply
            _warm_up(loaded.model, dev, max(max_batch_size, options.prefill_chunk))
            draft = _load_draft(loaded.model, draft_spec, dtype)  # (None with tensor_parallel: refused)
        if tp is not None:
            leader = tp.connect()
    except BaseException:
        if tp is not None:
            tp.abort()
        raise
    limit = loaded.config["max_position_embeddings"]
    ctx = limit if max_context is None else min(max_context, limit)
    cfg = loaded.config
    params = counted[0] if counted else _count_parameters(loaded.model)
    engine = _make_engine(loaded, tokenizer, placement, dict(max_batch_size=max_batch_size, max_context=ctx,
                                                             worker=worker, options=options, draft_model=draft,
                                                             mirror=leader))
    _warm_extend(engine)
    _warm_first_requests(engine)
    # (the engine's context: also at most what one request can hold in the KV cache pool)
    info = ModelInfo(architecture=cfg["arch"], parameters=params, dtype=loaded.dtype, device=dev,
                     context_length=engine.max_context, quantization=cfg["quantization"], path=str(loaded.path))
    return Model(engine, tokenizer, info, cfg)


def _make_engine(loaded, tokenizer, placement, args: dict) -> Engine:
    """The engine over a loaded model (`args`: Engine's other keywords); on failure
    the model, its draft and the other ranks are freed."""
    cfg = loaded.config
    eos = frozenset(tokenizer.eos_token_ids) | frozenset(cfg["eos_token_ids"])
    try:
        return Engine(loaded.model, tokenizer, eos_ids=eos, vocab_size=cfg["vocab_size"], placement=placement,
                      **args)
    except BaseException:  # e.g. a KV block that cannot fit the device's memory
        with placement.on():
            loaded.model.close()
            if args["draft_model"] is not None:
                args["draft_model"].close()
        placement.release()
        if args["mirror"] is not None:
            args["mirror"].close()
        raise


def _start_ranks(path, tensor_parallel: int, device: str, dtype, kv_bits: int | None):
    """The other ranks of a tensor-parallel load, started (None for one rank)."""
    if tensor_parallel == 1:
        return None
    from amlx.tp.load import TensorParallelLoad

    return TensorParallelLoad(path, tensor_parallel, device, dtype, kv_bits)


async def load(path: str | os.PathLike, *, device: str = "auto", dtype=None, max_batch_size: int = 32,
               max_context: int | None = None, adapter: Any = None, kv_cache_memory: int | float | None = None,
               prefix_cache: bool = True, kv_bits: int | None = None, draft: str | os.PathLike | None = None,
               num_draft_tokens: int = 4, tensor_parallel: int = 1) -> Model:
    """Loads a Hugging Face or MLX checkpoint: a directory, or a Hugging Face model
    id ("org/name") found in the local Hugging Face cache or downloaded into it
    (`amlx.hub.resolve_model`; a directory that exists wins).

    device: "auto" (GPU when MLX has one), "gpu" or "cpu". dtype: override the
    checkpoint's float type ("float32", "bfloat16", "float16"). max_batch_size:
    requests decoded together (the rest wait in arrival order). max_context: cap
    on prompt plus generation (default: the model's). kv_cache_memory: the
    most memory the KV cache (a pool of blocks, grown as requests need them)
    may take, in bytes (int) or as a fraction of the device's memory (float);
    default: a quarter of the RAM on the CPU, half of MLX's memory limit on a
    GPU; the context (model.info.context_length) is at most what one request
    can hold in it. Requests wait while it is full, and a prompt that alone
    cannot fit gets ContextLengthError. prefix_cache: reuse the KV blocks of earlier
    prompts that start the same way (Completion.usage.cached_tokens says how
    many tokens were reused). kv_bits: 8 or 4 stores the KV cache quantized
    (MLX's affine quantization per group of 64 values), for about 1/2 or 1/4 of
    the memory (see docs/architecture.md for its measured error). draft:
    speculative decoding: "prompt_lookup" drafts each row's next tokens from
    earlier occurrences of its last tokens in its prompt and output, and the
    model verifies them in one batched step (greedy output is unchanged;
    sampled output keeps its distribution); or a draft model's path (a
    smaller model of the same tokenizer, loaded beside it on the same device
    with a KV cache of its own), whose tokenizer is checked against the
    target's first (DraftTokenizerError). num_draft_tokens: the most tokens a row drafts per step
    (1..16). Model.stats()["speculative"] counts drafted and accepted tokens.
    Raises ModelLoadError for bad checkpoints. Use
    as `async with await amlx.load(path) as model:`.

    tensor_parallel: run the model split over this many processes (Megatron-style
    tensor parallelism over MLX's distributed layer, docs/scaling.md): amlx starts
    the other N-1 ranks itself, one per GPU over NCCL on CUDA, or CPU processes
    over MLX's ring backend (AMLX_TP_BACKEND overrides; AMLX_TP_HOSTFILE names
    a ring hostfile whose ranks may live on other hosts). Heads, key-value heads
    and the MLP width must divide by N (ValueError). TensorParallelError when a
    rank fails to start; a rank that dies later fails every request with it and
    closes the model. score(), prompt_logprobs(), training, adapters and speculative
    decoding (draft) are not supported with N > 1 (ValueError)."""
    _check_path(path)
    max_batch_size, max_context = _check_load_args(max_batch_size, max_context, adapter, kv_cache_memory,
                                                   prefix_cache, kv_bits, tensor_parallel, draft, dtype)
    kv = _engine_options(kv_cache_memory, prefix_cache, kv_bits, draft, num_draft_tokens)
    # Files are read on a thread of their own, not on the worker that every model
    # shares; a cancelled load stops waiting for it at once.
    host = await anyio.to_thread.run_sync(_read_on_host, path, dtype, kv["draft"], kv_bits, abandon_on_cancel=True)
    worker = _worker_for(tensor_parallel)
    handover = _Handover()
    try:
        return await worker.run(handover.job(
            lambda: _load_on_worker(host, device, dtype, max_batch_size, max_context, worker, adapter, kv,
                                    tensor_parallel)))
    except BaseException:
        handover.abandon()
        raise


def load_sync(path: str | os.PathLike, *, device: str = "auto", dtype=None, max_batch_size: int = 32,
              max_context: int | None = None, adapter: Any = None, kv_cache_memory: int | float | None = None,
              prefix_cache: bool = True, kv_bits: int | None = None, draft: str | os.PathLike | None = None,
              num_draft_tokens: int = 4, tensor_parallel: int = 1) -> Model:
    """`load` for scripts and blocking code."""
    _check_path(path)
    max_batch_size, max_context = _check_load_args(max_batch_size, max_context, adapter, kv_cache_memory,
                                                   prefix_cache, kv_bits, tensor_parallel, draft, dtype)
    kv = _engine_options(kv_cache_memory, prefix_cache, kv_bits, draft, num_draft_tokens)
    host = _read_on_host(path, dtype, kv["draft"], kv_bits)
    worker = _worker_for(tensor_parallel)
    handover = _Handover()
    try:
        return worker.run_sync(handover.job(
            lambda: _load_on_worker(host, device, dtype, max_batch_size, max_context, worker, adapter, kv,
                                    tensor_parallel)))
    except BaseException:
        handover.abandon()
        raise


class _Handover:
    """The model a load's worker job makes, for a caller that may be gone by then (cancelled,
    timed out, Ctrl-C): such a model is closed on the worker. (It was dropped open: its
    finalizer freed it, warning of an "unclosed" model that nobody had been given.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gone = False
        self._model: Model | None = None

    def job(self, load: Callable[[], Model]) -> Callable[[], Model | None]:
        """`load` as the worker job: its model, kept for `abandon`, or closed at once if the
        caller has gone already."""
        def run() -> Model | None:
            model = load()
            with self._lock:
                if not self._gone:
                    self._model = model
                    return model
            model.close()  # (on the worker: at once)
            return None
        return run

    def abandon(self) -> None:
        """The caller is gone: a model made already is closed on the worker, without waiting."""
        with self._lock:
            self._gone = True
            model, self._model = self._model, None
        if model is not None:
            model.engine.submit_job(model.close)


def _worker_for(tensor_parallel: int) -> Worker:
    """The process's worker; a tensor-parallel model gets one of its own (see Engine)."""
    return Worker.get() if tensor_parallel == 1 else Worker()
