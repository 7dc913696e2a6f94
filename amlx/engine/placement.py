"""Where an engine computes: its device, its MLX streams, and the options read
once when the engine is built.

Each engine (one per loaded model) has a device of its own and streams of its
own on it; every MLX call of its model (loading the weights, prefill, decode
steps, sampling, closing) runs inside `on_stream` of one of them, so two models
on different devices, or with different shard counts, never move each other's
work. Nothing here sets the process-wide default device.
"""

from __future__ import annotations

import os
import threading
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

from amlx._mlx import device as mxdevice
from amlx.engine.admission import DEFAULT_JOIN_WAIT
from amlx.env import env_int
from amlx.kv.sizing import DEFAULT_BLOCK_SIZE, check_kv_bits, check_kv_cache_memory
from amlx.models import cpu_matmul, decode_attention
from amlx.models.nn import MatmulSplit
from amlx.speculative.draft import DraftSpec

MAX_SHARDS = 8  # more would leave each shard too few rows to use its core well
SHARDS_LIMIT = 256  # the most shards taken at all (a stream and KV pools each)
CPU_PREFILL_CHUNK = 256  # prompt tokens per prefill forward (see EngineOptions.prefill_chunk)
GPU_PREFILL_CHUNK = 2048


def cpu_streams() -> int:
    """Streams a CPU engine splits one pass's matmuls over: one per core (at most MAX_SHARDS)."""
    return max(1, min(mxdevice.cpu_cores(), MAX_SHARDS))


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings fixed when the engine is built (internal; `amlx.load`
    passes the device). None means "choose for the device"; `resolved` fills
    them in, reading the benchmark overrides AMLX_DECODE_KERNEL (0/1),
    AMLX_KV_BLOCK, AMLX_KV_BLOCK_SIZE and AMLX_SHARDS once, at that moment and never per call.

    - device: "cpu" or "gpu".
    - shards: the running batch is split into this many shards, each decoding
      on a stream of its own (default 1: on a GPU one stream already keeps it
      busy; on the CPU amlx's kernels spread a step's products over every core,
      and one shard reads each weight once a step for all rows: measured faster
      than a shard per core at 1 to 32 streams, benchmarks/README.md).
    - split_streams: on the CPU, the streams one shard's prefill matmuls are split
      over (MLX's BLAS runs one thread a call; default one per core, at most 8;
      at least `shards`); 1 elsewhere and for a tensor-parallel rank.
    - decode_kernel: decode steps use the fused decode kernels
      (models/decode_attention.py, step_kernels.py; default: on the CPU, where
      they are amlx's C++ primitives, and on the GPU where MLX runs on CUDA).
    - kv_block: the step, in positions, of the span a decode step attends over
      (its block tables' width; the step is traced again per width). Default:
      256 with the decode kernel, which reads only filled slots; 64 where
      attention reads the whole span.
    - kv_block_size: positions per block of the KV block pool (default 16;
      AMLX_KV_BLOCK_SIZE).
    - kv_cache_memory: the ceiling of the KV block pools, all shards together:
      bytes (int) or a fraction of the device's memory (float); None: a share
      of the device's (amlx.kv.sizing).
    - prefix_cache: full prompt blocks are cached and reused by later requests
      with the same prefix (amlx.kv.prefix).
    - kv_bits: 8 or 4 stores keys and values quantized (amlx.kv.pool); None:
      in the activations' precision.
    - pad_batches: a decode step runs at the batch size rounded up to a bucket
      (`padded_batch`), with rows that write only the null block, so the
      compiled step is traced (and MLX's kernels built) for a few sizes instead
      of every size a batch passes through as rows finish one by one. Default:
      on a GPU, where a new size costs a trace and kernel compiles worth many
      steps; off on the CPU, where the padded rows cost compute
      (AMLX_PAD_BATCHES=0/1).
    - extend_pass: a short prefill behind a cached prefix runs as a compiled pass
      (`Scheduler._extend_pass`) instead of the plain, uncompiled one. Default:
      on a GPU, off on the CPU (AMLX_EXTEND_PASS=0/1). On the H200 it cut the
      time to first token behind a cached 2,000-token prefix (Qwen3-0.6B shape
      22.0 -> 13.7 ms, Qwen3-8B 24.4 -> 16.7 ms). Its shapes are bucketed (tokens
      to powers of two, the batch as a decode step's, the attended span to two
      sizes per octave) and its kernels are compiled while the model loads
      (`Scheduler.warm_extend`, with a notice when that takes a while; widths
      beyond what 30 s compile, AMLX_EXTEND_WARMUP_S, stay on the plain pass), so a new
      shape costs a trace on the host, not the seconds of NVRTC compiles it cost
      before (a Gemma-3-1B prompt behind its own cached prefix: 20 s the first
      time). On the CPU the compiled pass measured no faster.
    - prefill_chunk: prompt tokens per prefill forward (AMLX_PREFILL_CHUNK).
      A round prefills at most one chunk before its decode step, so a long
      prompt holds the running streams up by one chunk's time per step, and
      a chunk's attention covers only the slots filled so far (a smaller chunk
      leaves out more of the causal triangle, which the CPU's attention, a
      plain matmul and softmax over every query-key pair, computes in full).
      Default: 256 on the CPU, 2048 on a GPU.
    - draft: speculative decoding: "prompt_lookup" drafts by n-gram lookup in each
      row's own tokens (amlx/engine/speculate.py), a path: a draft model drafts
      (amlx/engine/draft_model.py); None: off.
    - num_draft_tokens: the most tokens a row drafts per verify step (1..16).
    - measure_draft_costs: the adaptive draft length's cost model is measured:
      the first verify round of each padded batch size times a plain step, a
      verify pass of each width and a draft step over rows that write only the
      null block (amlx/engine/speculate.py); otherwise fixed constants. Default:
      on a GPU; off on the CPU, where tests need lengths that do not depend on
      a shared machine's timings (AMLX_MEASURE_DRAFT_COSTS=0/1).
    - adaptive_draft_length: each row's draft length follows its acceptance and
      the cost model (`AdaptiveLength`); off: every row drafts num_draft_tokens
      each round (within its buffer's size and the tokens it may still make), as
      mlx-lm does, for benchmarks that compare the two or measure a draft's
      acceptance at a fixed length (AMLX_ADAPTIVE_DRAFT=0/1; default on).
    - join_wait: while the batch is at least half full and a step is in flight, a waiting
      request may wait up to this many decode steps for others to join with it, so that
      one drained step and one prefill pass serve several joins (amlx/engine/admission.py;
      default 4, AMLX_JOIN_WAIT; 0: every request joins as soon as a slot is free).
    - chain_changes: rows that finish or are cancelled leave the batch, and requests
      join it, without draining the step in flight: the next step takes the rows that
      stay from it on the device (`Scheduler._compact`, `Scheduler._join`;
      AMLX_CHAIN_CHANGES=0/1, default on; off with speculative decoding or tensor
      parallelism, whose steps do not chain that way).
    - extend_fresh: with extend_pass, short prompts with no cached prefix (a new
      request's whole prompt, at most 256 tokens) run as the compiled extend pass too,
      so a join's prefill replays a graph instead of building the forward op by op
      (AMLX_EXTEND_FRESH=0/1; default off until measured on a GPU: a new padded batch
      size of such groups compiles its kernels at first use, which `warm_extend`
      covers only for batches of 1 and 2)."""

    device: str = "cpu"
    shards: int | None = None
    split_streams: int | None = None
    decode_kernel: bool | None = None
    kv_block: int | None = None
    prefill_chunk: int | None = None
    kv_block_size: int | None = None
    kv_cache_memory: int | float | None = None
    prefix_cache: bool = True
    kv_bits: int | None = None
    pad_batches: bool | None = None
    extend_pass: bool | None = None
    draft: str | None = None
    num_draft_tokens: int = 4
    measure_draft_costs: bool | None = None
    adaptive_draft_length: bool | None = None
    join_wait: int | None = None
    chain_changes: bool | None = None
    extend_fresh: bool | None = None

    def for_rank(self) -> "EngineOptions":
        """These (resolved) options for one rank of a tensor-parallel model: one stream
        (every rank must evaluate the same collectives in the same order), and on the
        CPU no fused decode kernels. With the CPU attention kernel on, a rank killed
        mid-step made rank 0 crash (a segfault in MLX's gather, in 4 of 5 runs of
        tests/helpers/tp_failure.py) after MLX's ring backend failed the step's
        collectives; the cause was not found, and the plain ops never crashed there."""
        return replace(self, shards=1, split_streams=1, decode_kernel=self.decode_kernel and self.device != "cpu")

    def resolved(self) -> "EngineOptions":
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', not {self.device!r}")
        available = decode_attention.available(self.device)
        kernel = self.decode_kernel
        env = os.environ.get("AMLX_DECODE_KERNEL")
        if env in ("0", "1"):
            kernel = env == "1"
        kernel = available if kernel is None else (kernel and available)
        shards = env_int("AMLX_SHARDS") or self.shards
        shards = 1 if shards is None else shards
        split = self.split_streams
        split = (cpu_streams() if self.device == "cpu" else 1) if split is None else split
        block = env_int("AMLX_KV_BLOCK") or self.kv_block or (256 if kernel else 64)
        chunk = env_int("AMLX_PREFILL_CHUNK") or self.prefill_chunk or (
            CPU_PREFILL_CHUNK if self.device == "cpu" else GPU_PREFILL_CHUNK)
        block_size = env_int("AMLX_KV_BLOCK_SIZE") or self.kv_block_size or DEFAULT_BLOCK_SIZE
        for name, value in (("shards", shards), ("split_streams", split), ("kv_block", block),
                            ("prefill_chunk", chunk), ("kv_block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
        if shards > SHARDS_LIMIT:  # (each a stream and pools of its own: a million hung the load)
            source = "AMLX_SHARDS" if env_int("AMLX_SHARDS") else "shards"
            raise ValueError(f"{source} must be at most {SHARDS_LIMIT}, not {shards}")
        split = max(split, shards) if self.device == "cpu" else 1
        check_kv_cache_memory(self.kv_cache_memory)
        check_kv_bits(self.kv_bits)
        DraftSpec.from_options(self.draft, self.num_draft_tokens)  # (ValueError on bad values)
        join_wait = env_int("AMLX_JOIN_WAIT", least=0)
        join_wait = join_wait if join_wait is not None else self.join_wait
        join_wait = DEFAULT_JOIN_WAIT if join_wait is None else join_wait
        if isinstance(join_wait, bool) or not isinstance(join_wait, int) or join_wait < 0:
            raise ValueError(f"join_wait must be an integer >= 0, not {join_wait!r}")
        gpu = self.device == "gpu"
        return replace(self, shards=shards, split_streams=split, decode_kernel=kernel, kv_block=block, prefill_chunk=chunk,
                       kv_block_size=block_size, prefix_cache=bool(self.prefix_cache),
                       pad_batches=_switch(self.pad_batches, "AMLX_PAD_BATCHES", gpu),
                       extend_pass=_switch(self.extend_pass, "AMLX_EXTEND_PASS", gpu),  # see extend_pass above
                       measure_draft_costs=_switch(self.measure_draft_costs, "AMLX_MEASURE_DRAFT_COSTS", gpu),
                       adaptive_draft_length=_switch(self.adaptive_draft_length, "AMLX_ADAPTIVE_DRAFT", True),
                       join_wait=join_wait, chain_changes=_switch(self.chain_changes, "AMLX_CHAIN_CHANGES", True),
                       extend_fresh=_switch(self.extend_fresh, "AMLX_EXTEND_FRESH", False))


def _switch(value: bool | None, env: str, default: bool) -> bool:
    """An on/off option: the environment variable `env` ("0" or "1") overrides
    `value`, which is `default` when None."""
    setting = os.environ.get(env)
    if setting in ("0", "1"):
        return setting == "1"
    return default if value is None else bool(value)


def padded_batch(rows: int) -> int:
    """The batch size a decode step of `rows` rows runs at when batches are padded:
    powers of two up to 8, then multiples of 8 up to 64, then of 16 (14 sizes up
    to 128; a step carries at most 7, or 15 beyond 64, rows of padding)."""
    if rows <= 8:
        return 1 << max(0, rows - 1).bit_length()
    step = 8 if rows <= 64 else 16
    return -(-rows // step) * step


class Placement:
    """An engine's device and streams: one per shard, the first the engine's
    home stream (prefill, sampling, loading and closing run there). Made on the
    thread that will use the streams (the worker), from resolved options."""

    def __init__(self, options: EngineOptions):
        self.device = options.device
        # shard i runs on streams[i]; streams past the shards only take split matmuls
        self.streams = [_take_stream(options.device) for _ in range(max(options.shards or 1,
                                                                        options.split_streams or 1))]
        self._released = False
        self.home = self.streams[0]
        # A lone prompt leaves the other cores idle: its matmuls can be split over the streams.
        self.split = MatmulSplit(self.streams) if options.device == "cpu" and len(self.streams) > 1 else None

    def split_decode(self) -> bool:
        """Whether a lone row's decode step splits its matmuls over the streams: only
        where the CPU's few-row kernels, which take every decode product, run on one
        thread (`cpu_matmul.threaded`; read per step, as `cpu_kernels.set_threads` may
        change it). Prefill passes, whose products go to MLX's single-threaded BLAS, split
        wherever `split` exists."""
        return self.split is not None and not cpu_matmul.threaded()

    def on(self, index: int = 0) -> AbstractContextManager[None]:
        """A block whose MLX work runs on stream `index` (default: home)."""
        return mxdevice.on_stream(self.streams[index])

    def release(self) -> None:
        """Hands the streams back for later engines (when this one has closed;
        idempotent). MLX caches compiled functions per stream, each entry keeping
        a few bytes of constants for the life of the process: engines that come
        and go reuse streams, so that cache stays as small as for one engine."""
        if not self._released:
            # (a closed engine's scheduler may still be asked for a round: it has no
            # work left, and only this thread queues on the streams, so they stay usable)
            self._released = True
            _free().setdefault(self.device, []).extend(reversed(self.streams))


# Streams of closed engines, per thread and device: streams belong to the thread
# that made them (engines are made and closed on their worker thread; a
# tensor-parallel engine has a worker of its own).
_POOL = threading.local()


def _free() -> dict[str, list[mxdevice.Stream]]:
    pool = getattr(_POOL, "streams", None)
    if pool is None:
        pool = _POOL.streams = {}
    return pool


def _take_stream(device: str) -> mxdevice.Stream:
    free = _free().get(device)
    return free.pop() if free else mxdevice.new_stream(device)
