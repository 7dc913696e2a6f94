"""A correctness hunt of the quantized KV cache (`kv_bits=8` / `4`) and of the KV block
pool's sizing (`kv_cache_memory`), on the CPU.

The oracle is transformers (PyTorch, float32) with its attention function replaced by
one that reads keys and values through the numpy reference of MLX's affine quantization
(tests/helpers/kv_reference.py), with the library's documented semantics (README's kv_bits
paragraph, docs/architecture.md "Quantized KV"): a prefill position attends every key and
value as the pool holds them, its own included; a decode step attends the earlier ones as
the pool holds them and its own as computed. Against that reference the quantization
itself drops out: what is left is float32 noise, which, where a key or value lies within
~1e-6 of a half step, moves it to the neighbouring level (one level of one value of one
head; the numpy reference and the library agree bit for bit on identical inputs:
tests/test_kv_bits.py). The bounds below are what that leaves, measured here, and stated
next to the quantization error itself, which they are a small share of.

tests/test_kv_bits.py measures the quantization's error against full precision and holds
the layout bit for bit; tests/test_prefix_cache_hunt.py hunts the prefix cache (kv_bits=8
included); this file adds the model-level reference above (GQA and MQA, head dims 32 to 128,
Gemma 3's sliding windows, prefills cut anywhere within blocks), the engine against it
(batched, solo, chunked prefill, a prefix from the cache, a pool too small for all rows at
once), and the options: the values refused, and the longest context each bit width gets
from the same bytes.
"""

from __future__ import annotations

import asyncio
import gc
import math
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import amlx
from amlx._mlx import array, ops
from amlx.kv import BlockPool, ShardKV, layer_views, written
from amlx.kv.pool import block_bytes, quant_group
from amlx.kv.sizing import check_kv_bits, check_kv_cache_memory, device_memory, kv_cache_bytes
from tests.helpers.checkpoints import load_reference, make_checkpoint
from tests.helpers.kv_reference import dequantize, quantize

# ---------------------------------------------------------------------------
# the reference: transformers' eager attention reading quantized keys and values

# (arch, head_dim, kv heads): 4 query heads each, so GQA 2 and MQA (one kv head);
# head dims 32 and 96 take groups of 32 (64 does not divide them), 64 and 128 groups of 64;
# Mistral: every layer within a sliding window of 8 (one pool, not split); Qwen2: biased keys
CONFIGS = [("qwen3", 64, 2), ("qwen3", 32, 1), ("qwen3", 96, 2), ("gemma3_text", 64, 2), ("gemma3_text", 128, 1),
           ("mistral", 64, 1), ("qwen2", 128, 2)]


def _qdq(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x (..., D) through MLX's CPU quantize and dequantize (the numpy reference)."""
    a = x.detach().numpy().astype(np.float64)
    group = quant_group(a.shape[-1])
    return torch.from_numpy(dequantize(*quantize(a, group, bits, "float32"), group, bits, "float32")
                            .astype(np.float32))


def _attention(bits: int | None, prompt: int):
    """An eager attention function (transformers' signature, Qwen3's and Gemma 3's) whose
    queries before `prompt` (prefill) read every key and value quantized and whose later
    queries (decode steps) read their own key and value unquantized."""
    from transformers.models.qwen3.modeling_qwen3 import repeat_kv

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **_):
        scaling = module.head_dim ** -0.5 if scaling is None else scaling
        kq, vq = (key, value) if bits is None else (_qdq(key, bits), _qdq(value, bits))
        k, v, kq, vq = (repeat_kv(t, module.num_key_value_groups) for t in (key, value, kq, vq))
        length = query.shape[2]
        idx = torch.arange(length)
        decode = idx >= prompt
        scores = torch.matmul(query, kq.transpose(2, 3)) * scaling
        own = (query * k[:, :, :length]).sum(-1) * scaling  # each query against its own key as computed
        scores[:, :, idx[decode], idx[decode]] = own[:, :, decode]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        out = torch.matmul(weights, vq)
        # a decode query's own value as computed: its weight times (v - quantized v) added back
        out = out + (v - vq)[:, :, :length] * (weights[:, :, idx, idx] * decode.float())[..., None]
        return out.transpose(1, 2).contiguous(), weights

    return attention


def reference_logits(model, ids: list[int], bits: int | None, prompt: int) -> np.ndarray:
    """(len(ids), V) float64 logits of transformers' model over ids, positions before
    `prompt` prefilled and the rest decoded, through a KV cache quantized with `bits`."""
    import importlib

    # (each architecture's modeling module looks its eager attention up when it runs)
    modules = [importlib.import_module(f"transformers.models.{name}.modeling_{name}")
               for name in ("qwen3", "gemma3", "llama", "qwen2", "mistral")]
    saved = [m.eager_attention_forward for m in modules]
    for m in modules:
        m.eager_attention_forward = _attention(bits, prompt)
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double().numpy()
    finally:
        for m, f in zip(modules, saved):
            m.eager_attention_forward = f


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per config: (checkpoint path, transformers' model, the amlx model), loaded once."""
    out, opened = {}, []
    try:
        for arch, dim, kv_heads in CONFIGS:
            path = make_checkpoint(tmp_path_factory.mktemp(f"{arch}{dim}"), arch, seed=3, head_dim=dim,
                                   num_key_value_heads=kv_heads)
            model = amlx.load_sync(path, prefix_cache=False)
            opened.append(model)
            out[(arch, dim)] = (path, load_reference(path), model)
        yield out
    finally:
        for m in opened:
            m.close()


def _pool_logits(lm, bits: int | None, ids: list[int], cuts: list[int], prompt: int, block: int) -> np.ndarray:
    """Logits (len(ids), V) through a block pool of `block` positions (quantized with `bits`):
    ids[:prompt] prefilled in passes ending at `cuts` (anywhere in a block), the rest fed one
    decode step each. Worker thread."""
    pool = BlockPool(lm.kv_layout(), lm.activation_dtype(), block, 64 * 16 // block + 2, prefix_cache=False,
                     bits=bits)
    kv = ShardKV(pool)
    row = SimpleNamespace(blocks=pool.allocate(-(-len(ids) // block)), pos=0, created=0.0)
    try:
        out, start = [], 0
        for end in [*cuts, prompt]:
            views = layer_views(pool.arrays, kv.prefill_tables([row], start, end - start, [end]),
                                lm.windows(), bits, pool.group)
            out.append(lm(array(np.asarray([ids[start:end]], np.int32)), views, start)[0])
            pool.arrays = written(views)
            start = end
        for t in range(prompt, len(ids)):
            row.pos = t
            views = layer_views(pool.arrays, kv.decode_tables([row]), lm.windows(), bits, pool.group)
            out.append(lm(array(np.asarray([[ids[t]]], np.int32)), views, array(np.asarray([t], np.int32)))[0])
            pool.arrays = written(views)
        logits = ops.concatenate(out, axis=0)
        ops.eval(logits)
        return np.asarray(logits.numpy(), np.float64)
    finally:
        kv.close()


# The largest logit error against the reference, as a share of the largest logit, that a
# level moved by float32 noise leaves (measured over 120 examples of this test: 8 bits up to
# 0.013 (Gemma 3, head dim 128), most examples 1e-6; 4 bits up to 8e-4, most 1e-6: its levels
# are 17x wider, so a value lies near a half step more rarely); and at most this share of the
# quantization's own error against full precision (measured: at most 0.078). Without the
# quantization modelled the error is the quantization's: 0.006-0.42 (8 bits), 0.13-0.84 (4).
REF_BOUND = 0.04
REF_SHARE = 0.25


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=st.sampled_from(CONFIGS), bits=st.sampled_from([8, 4]), block=st.sampled_from([4, 16, 7]),
       prompt=st.integers(1, 40), steps=st.integers(1, 10), cuts=st.lists(st.integers(1, 39), max_size=3),
       seed=st.integers(0, 2 ** 16))
def test_quantized_pool_logits_equal_a_reference_reading_dequantized_kv(models, config, bits, block, prompt, steps,
                                                                       cuts, seed):
    """The logits of a model over a quantized pool (prefilled in passes cut anywhere, blocks of
    4, 7 or 16 positions, then decode steps) equal transformers' reading the numpy reference's
    dequantized keys and values, but for float32 noise moving a value a level: within
    REF_BOUND of the largest logit, and a small share (REF_SHARE) of the quantization's error."""
    arch, dim, _ = config
    _, ref, model = models[(arch, dim)]
    lm = model.engine.model
    ids = [int(x) for x in np.random.default_rng(seed).integers(10, 200, prompt + steps)]
    cuts = sorted({c for c in cuts if c < prompt})
    got = model.engine.run_sync(lambda: _pool_logits(lm, bits, ids, cuts, prompt, block))
    want = reference_logits(ref, ids, bits, prompt)
    full = reference_logits(ref, ids, None, prompt)
    top = np.abs(full).max()
    err, quant = np.abs(got - want).max() / top, np.abs(want - full).max() / top
    assert quant > 0  # (it really was quantized)
    assert err < REF_BOUND and err <= REF_SHARE * quant, (arch, dim, bits, err, quant)


def test_the_reference_without_kv_bits_is_transformers(models):
    """(The reference's attention, without bits, is transformers' own: the harness holds.)"""
    path, ref, model = models[("gemma3_text", 64)]
    ids = [int(x) for x in np.random.default_rng(5).integers(10, 200, 30)]
    with torch.no_grad():
        plain = ref(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double().numpy()
    np.testing.assert_allclose(reference_logits(ref, ids, None, 20), plain, rtol=1e-4, atol=1e-4)
    lm = model.engine.model
    got = model.engine.run_sync(lambda: _pool_logits(lm, None, ids, [13], 20, 16))
    np.testing.assert_allclose(got, plain, atol=1e-4)


# ---------------------------------------------------------------------------
# the engine (scheduler, CPU decode kernel, windowed layers' own pool) against the reference

# log-probability error against the reference where a level moved (measured: 0.03, Gemma 3 at
# 8 bits; otherwise 1e-5), and the margin under which a greedy token may go the other way
LOGPROB_TOL = 0.06
NEAR_TIE = 0.1


def _check_against_reference(ref, prompt: list[int], tokens, bits: int) -> None:
    """A greedy request's tokens (amlx.Token, or (id, logprob) pairs) are the reference's
    argmax (but at a near-tie, after which nothing more is compared) and their
    log-probabilities the reference's."""
    pairs = [(t.id, t.logprob) if hasattr(t, "id") else t for t in tokens]
    lp = _log_softmax(reference_logits(ref, prompt + [i for i, _ in pairs], bits, len(prompt)))
    for i, (tok, logprob) in enumerate(pairs):
        row = lp[len(prompt) - 1 + i]
        assert abs(logprob - row[tok]) < LOGPROB_TOL, (i, logprob, row[tok])
        best = np.sort(row)[-2:]
        if best[1] - best[0] < NEAR_TIE:
            return
        assert tok == int(row.argmax()), i


@pytest.mark.parametrize("arch,dim,bits", [("qwen3", 96, 8), ("gemma3_text", 64, 8), ("gemma3_text", 128, 4),
                                           ("mistral", 64, 4)])
def test_engine_batched_and_solo_follow_the_reference(models, monkeypatch, arch, dim, bits):
    """Requests of several lengths (inside a block, on its end, past it, past Gemma's window
    of 8) decoded together and alone, prompts prefilled in chunks of 8 (a chunk ending inside
    a block): each follows the reference, and a row alone is the row in the batch up to a
    near-tie (float32 decode is not bitwise batch-invariant, and a last-bit difference may
    move a stored value a level)."""
    monkeypatch.setenv("AMLX_PREFILL_CHUNK", "8")
    path, ref, _ = models[(arch, dim)]
    rng = np.random.default_rng(dim + bits)
    prompts = [[int(x) for x in rng.integers(10, 200, n)] for n in (5, 16, 17, 35)]
    gc.collect()
    before = amlx.memory()["active"]
    with amlx.load_sync(path, kv_bits=bits, prefix_cache=False) as m:
        async def batch():
            async def one(p):
                return [t async for t in m.generate(p, max_tokens=10, logprobs=True)]
            return await asyncio.gather(*(one(p) for p in prompts))

        together = asyncio.run(batch())
        alone = [list(m.generate_sync(p, max_tokens=10, logprobs=True)) for p in prompts]
    gc.collect()
    assert amlx.memory()["active"] == before  # the quantized pools went with the model
    for p, a, b in zip(prompts, together, alone):
        assert len(a) == len(b) == 10
        _check_against_reference(ref, p, a, bits)
        _check_against_reference(ref, p, b, bits)


@pytest.mark.parametrize("arch,dim,bits", [("qwen3", 32, 4), ("gemma3_text", 64, 4)])
def test_a_cached_prefix_gives_what_recomputing_it_gives(models, arch, dim, bits):
    """With kv_bits and the prefix cache, a prompt behind a cached prefix (its blocks written by
    an earlier request's prefill) follows the same reference as the prompt computed whole: the
    cached blocks hold what a prefill of the prefix stores. (Gemma 3: prefix past its window.)"""
    path, ref, _ = models[(arch, dim)]
    rng = np.random.default_rng(7)
    base = [int(x) for x in rng.integers(10, 200, 37)]
    prompts = [base + [int(x) for x in rng.integers(10, 200, n)] for n in (1, 6, 20)]
    with amlx.load_sync(path, kv_bits=bits) as m:
        m.complete_sync(base, max_tokens=1)
        for p in prompts:
            got = m.complete_sync(p, max_tokens=8, logprobs=True)
            assert got.usage.cached_tokens == 32 and len(got.token_ids) == 8
            _check_against_reference(ref, p, list(zip(got.token_ids, got.logprobs)), bits)
        assert m.stats()["kv_cache"]["prefix_hits"] > 0


@pytest.mark.parametrize("arch,dim,bits", [("qwen3", 64, 8), ("qwen3", 64, 4), ("gemma3_text", 64, 4)])
def test_a_pool_too_small_for_every_row_makes_them_wait_not_fail(models, arch, dim, bits):
    """A quantized pool of 9 usable blocks and 5 requests of 4-5 blocks each: they wait (and
    the running ones outgrowing the pool are preempted and recomputed: once here), none
    fails, each gets all its tokens; at 8 bits they follow the reference up to a near-tie.
    A recomputed row's stored values are a prefill's, not its decode steps' (README's kv_bits
    paragraph): at 8 bits its log-probabilities moved up to 0.004 from its solo run's (6 rows,
    4 preemptions), but at 4 bits up to 0.08 (Qwen3) and 0.56 (Gemma 3), and greedy tokens
    parted in 3 and 4 of 6 rows, not at near-ties; so at 4 bits only the tokens' count is
    checked. Gemma 3's windowed layers have a pool of their own, with as many blocks."""
    path, ref, model = models[(arch, dim)]
    per_block = model.engine.scheduler.block_bytes()  # full precision
    with amlx.load_sync(path, kv_bits=bits) as m:
        block = m.engine.scheduler.block_bytes()
    assert block < per_block * (0.3 if bits == 8 else 0.17)
    rng = np.random.default_rng(bits)
    prompts = [[int(x) for x in rng.integers(10, 200, n)] for n in (30, 20, 33, 40, 25)]
    gc.collect()
    before = amlx.memory()["active"]
    with amlx.load_sync(path, kv_bits=bits, kv_cache_memory=9 * block, prefix_cache=False) as m:
        assert m.info.context_length == 9 * 16

        async def all_at_once():
            async def one(p):
                return [t async for t in m.generate(p, max_tokens=40, logprobs=True)]
            return await asyncio.gather(*(one(p) for p in prompts))

        results = asyncio.run(all_at_once())
        assert m.stats()["kv_cache"]["blocks_allocated"] <= 9  # (the ceiling held)
    gc.collect()
    assert amlx.memory()["active"] == before
    for p, toks in zip(prompts, results):
        # (all its tokens: 40, or up to an end-of-sequence token, which the reference also picks)
        assert (len(toks), toks[-1].finish_reason) == (40, "length") or toks[-1].finish_reason == "stop"
        if bits == 8:
            _check_against_reference(ref, p, toks, bits)


def test_a_small_quantized_pool_with_the_prefix_cache_keeps_serving(models):
    """Gemma 3 at 4 bits (its windowed layers' pool too), a pool of 10 blocks with the prefix
    cache: three waves of 12 requests sharing prefixes of every length: cached prefixes
    reused and evicted, rows preempted (14 times in runs here), none fails, each gets its
    tokens, and closing gives every byte back."""
    path, _, _ = models[("gemma3_text", 64)]
    rng = np.random.default_rng(5)
    base = [int(x) for x in rng.integers(10, 200, 40)]
    gc.collect()
    before = amlx.memory()["active"]
    with amlx.load_sync(path, kv_bits=4) as m:
        block = m.engine.scheduler.block_bytes()
    with amlx.load_sync(path, kv_bits=4, kv_cache_memory=10 * block) as m:
        for _ in range(3):
            tails = [[int(x) for x in rng.integers(10, 200, int(rng.integers(1, 30)))] for _ in range(12)]
            prompts = [base[:int(rng.integers(1, 41))] + tail for tail in tails]
            lengths = [int(x) for x in rng.integers(5, 60, 12)]

            async def wave():
                return await asyncio.gather(*(m.complete(p, max_tokens=n) for p, n in zip(prompts, lengths)))

            for n, r in zip(lengths, asyncio.run(wave())):
                assert len(r.token_ids) == n or r.finish_reason == "stop"
        stats = m.stats()["kv_cache"]
        assert stats["prefix_hits"] > 0 and stats["blocks_allocated"] <= 10
    gc.collect()
    assert amlx.memory()["active"] == before

# ---------------------------------------------------------------------------
# options and sizing


def _block_bytes_by_hand(layers: int, kv_heads: int, dim: int, bits: int | None, block: int, size: int = 4) -> int:
    """Bytes of one block: per layer, position and kv head, keys and values of `dim` values:
    `size` bytes each, or `bits` bits each plus a scale and a bias (`size` bytes each) per
    group of 64 values (32 where 64 does not divide dim)."""
    if bits is None:
        per_head = dim * size
    else:
        group = 64 if dim % 64 == 0 else 32
        per_head = dim * bits // 8 + 2 * (dim // group) * size
    return layers * block * kv_heads * 2 * per_head


@settings(max_examples=60, deadline=None)
@given(layers=st.integers(1, 40), kv_heads=st.integers(1, 16), dim=st.sampled_from([32, 64, 96, 128, 160, 256]),
       bits=st.sampled_from([None, 8, 4]), block=st.sampled_from([1, 16, 32]), size=st.sampled_from([2, 4]))
def test_block_bytes_follow_the_bit_width(layers, kv_heads, dim, bits, block, size):
    dtype = SimpleNamespace(size=size)
    want = _block_bytes_by_hand(layers, kv_heads, dim, bits, block, size)
    assert block_bytes([(kv_heads, dim)] * layers, dtype, block, bits) == want
    full = _block_bytes_by_hand(layers, kv_heads, dim, None, block, size)
    if bits:  # about bits / 32 (float32) or bits / 16 (16-bit) of full precision, plus the scales
        assert want < full * (bits / (8 * size) + 2 / 32 * (4 / size) + 1e-9)


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("dim", [32, 96, 128])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_pools_arrays_take_what_block_bytes_says(bits, dim, dtype):
    """What the sizing counts per block is what the arrays hold: their bytes (packed values,
    scales and biases with kv_bits) are the blocks they hold times block_bytes, and MLX's
    active memory grows by that (its buffer cache emptied first: a cached buffer somewhat
    larger than asked for is handed out whole) and is back after close."""
    from amlx import _mlx as mx

    gc.collect()
    mx.memory.clear_cache()
    before = amlx.memory()["active"]
    pool = BlockPool([(2, dim)] * 3, getattr(mx, dtype), 16, 40, prefix_cache=False, bits=bits)
    pool.allocate(20)
    held = sum(int(np.prod(a.shape)) * a.dtype.size for a in pool.arrays)
    assert len(pool.arrays) == 3 * pool.parts and held == pool.capacity * pool.bytes_per_block()
    assert amlx.memory()["active"] - before == held
    pool.close()
    gc.collect()
    assert amlx.memory()["active"] == before


@pytest.mark.parametrize("ceiling", [40_000, 327_680, 1_000_003, "fraction", "2 shards"])
def test_the_longest_context_follows_the_smaller_blocks(models, monkeypatch, ceiling):
    """The same kv_cache_memory (bytes, or a fraction of the machine's memory: here the one
    worth about 400 KB) holds about 3.6x (8 bits) or 6.4x (4 bits) the positions of a float32
    pool here: context_length is the usable blocks (the ceiling over a block's bytes, the null
    block besides) times the block size; a prompt one short of it runs, one of it is refused
    up front saying how much it needs."""
    path, _, _ = models[("qwen3", 64)]
    shards = 1
    if ceiling == "2 shards":  # (a CPU engine's shards each get an equal part; a request lives in one)
        monkeypatch.setenv("AMLX_SHARDS", "2")
        shards, ceiling = 2, 327_680
    option = 400_000 / device_memory("cpu") if ceiling == "fraction" else ceiling
    ceiling = kv_cache_bytes(option, "cpu")
    contexts = {}
    for bits in (None, 8, 4):
        with amlx.load_sync(path, kv_bits=bits, kv_cache_memory=option) as m:
            per_block = _block_bytes_by_hand(2, 2, 64, bits, 16)
            assert m.engine.scheduler.block_bytes() == per_block
            ctx = m.info.context_length
            assert m.engine.scheduler.options.shards == shards
            assert ctx == max(1, ceiling // shards // per_block) * 16
            contexts[bits] = ctx
            tokens = m.complete_sync([7] * (ctx - 1), max_tokens=4).token_ids
            assert len(tokens) == 1  # (the context's last position)
            with pytest.raises(amlx.ContextLengthError, match="kv_cache_memory"):
                m.complete_sync([7] * ctx, max_tokens=1)
    assert contexts[None] < contexts[8] < contexts[4]


def test_kv_cache_memory_as_a_fraction_of_the_machine():
    for fraction in (1e-6, 0.25, 1.0, Fraction(1, 3), np.float32(0.5)):
        assert kv_cache_bytes(fraction, "cpu") == int(device_memory("cpu") * float(fraction))
    assert kv_cache_bytes(None, "cpu") == int(device_memory("cpu") * 0.25)
    assert kv_cache_bytes(1, "cpu") == 1  # (an int is bytes: 1 byte, not the whole machine)


BAD_MEMORY = [0, -1, -(2 ** 70), 0.0, -0.5, 1.5, 1.0000001, math.nan, math.inf, -math.inf, "1GB", "0.5", b"1",
              [1], True, False, np.bool_(True), np.float64("nan")]
BAD_BITS = [0, 1, 2, 3, 6, 16, 32, -8, True, "8", 8.0, 4.0, np.float64(8), [8]]


@pytest.mark.parametrize("bad", BAD_MEMORY, ids=repr)
def test_bad_kv_cache_memory_is_refused_naming_the_option(bad):
    with pytest.raises(ValueError, match="kv_cache_memory"):
        check_kv_cache_memory(bad)
    with pytest.raises(ValueError, match="kv_cache_memory"):
        amlx.load_sync("/nonexistent", kv_cache_memory=bad)


@pytest.mark.parametrize("bad", BAD_BITS, ids=repr)
def test_bad_kv_bits_are_refused_naming_the_option(bad):
    """Only the integers 8 and 4: 8.0 compared equal to 8 and loaded, with a pool whose
    block bytes (and shapes, computed from them) were floats."""
    with pytest.raises(ValueError, match="kv_bits must be None, 8 or 4"):
        check_kv_bits(bad)
    with pytest.raises(ValueError, match="kv_bits"):
        amlx.load_sync("/nonexistent", kv_bits=bad)


def test_numpy_integers_are_byte_counts_and_bit_widths(models):
    """A numpy integer kv_cache_memory is bytes, as an int is (it was refused as a fraction over
    1: "must lie in (0, 1], not 327680"), and a numpy 8 or 4 is a bit width; each loads as its
    int does."""
    check_kv_cache_memory(np.int64(327_680))
    assert kv_cache_bytes(np.uint32(327_680), "cpu") == 327_680 and type(kv_cache_bytes(np.int64(5), "cpu")) is int
    path, _, _ = models[("qwen3", 64)]
    with amlx.load_sync(path, kv_bits=np.int32(8), kv_cache_memory=np.int64(327_680)) as m:
        assert m.info.context_length == 327_680 // _block_bytes_by_hand(2, 2, 64, 8, 16) * 16
        assert m.engine.scheduler.block_bytes() == _block_bytes_by_hand(2, 2, 64, 8, 16)
        assert m.complete_sync([5, 6, 7] * 10, max_tokens=3).finish_reason == "length"


def test_kv_bits_needs_head_dims_divisible_by_32_refused_at_load(tmp_path):
    """Head dims 16, 48 and 80 (no group of 32 or 64 divides them) are refused at load naming
    kv_bits and the head dimension; the weights go with the failed load."""
    for dim in (16, 48, 80):
        path = make_checkpoint(tmp_path / str(dim), "llama" if dim == 80 else "qwen3", seed=0, head_dim=dim)
        gc.collect()
        before = amlx.memory()["active"]
        with pytest.raises(ValueError, match=f"kv_bits needs a head dimension divisible by 32, not {dim}"):
            amlx.load_sync(path, kv_bits=4)
        gc.collect()
        assert amlx.memory()["active"] == before
        with amlx.load_sync(path) as m:  # (without kv_bits it loads)
            assert m.complete_sync([5, 6], max_tokens=1).token_ids


def test_rows_moved_between_shards_keep_their_quantized_cache(models, monkeypatch):
    """Two shards: when the rows of one finish, rows of the other move over, their blocks (the
    windowed layers' own pool's too) copied between quantized pools (`copy_blocks`: packed
    values, scales and biases); every request still follows the reference. (Which rows move
    depends on the rounds the requests joined in: in runs here one row each time, with
    copy_blocks spied on: a block of each pool.)

    At 8 bits: the copy does not depend on the width, and at 4 bits a key on a rounding
    boundary of its group goes up or down a level by float rounding alone (MLX's and torch's
    float32 differ in the last bit, and torch's by its thread count), which moved this test's
    150-token prompt's first logprob by 0.145 against the reference on one machine and not on
    another: more than the tolerance, so the reference could not tell a fault from that."""
    monkeypatch.setenv("AMLX_SHARDS", "2")
    path, ref, _ = models[("gemma3_text", 64)]
    rng = np.random.default_rng(11)
    prompts = [[int(x) for x in rng.integers(10, 200, n)] for n in (150, 5, 40, 90, 3, 70)]
    lengths = [40, 2, 40, 2, 40, 2]
    gc.collect()
    before = amlx.memory()["active"]
    with amlx.load_sync(path, kv_bits=8, prefix_cache=False) as m:
        assert m.engine.scheduler.options.shards == 2

        async def all_at_once():
            async def one(p, n):
                return [t async for t in m.generate(p, max_tokens=n, logprobs=True)]
            return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))

        results = asyncio.run(all_at_once())
    gc.collect()
    assert amlx.memory()["active"] == before  # (pools grown by copies in, given back)
    for p, n, toks in zip(prompts, lengths, results):
        assert len(toks) == n
        _check_against_reference(ref, p, toks, 8)


@pytest.mark.parametrize("arch,dim,bits", [("qwen3", 64, 8), ("gemma3_text", 64, 4)])
def test_drafted_tokens_verified_over_a_quantized_pool_follow_the_reference(models, arch, dim, bits):
    """Speculative decoding (prompt lookup) with kv_bits: a verify pass attends each new token's
    own key and value as computed and the earlier ones, its drafts' included, as stored, as
    decode steps do; the tokens accepted follow the same reference as plain decode steps."""
    path, ref, _ = models[(arch, dim)]
    rng = np.random.default_rng(2)
    with amlx.load_sync(path, kv_bits=bits, prefix_cache=False, draft="prompt_lookup") as m:
        for n in (20, 41):
            base = [int(x) for x in rng.integers(10, 200, n)]
            prompt = base + base[:15]  # (repeats: drafts to check)
            toks = list(m.generate_sync(prompt, max_tokens=30, logprobs=True))
            _check_against_reference(ref, prompt, toks, bits)
        assert m.stats()["speculative"]["accepted_tokens"] > 0


def test_a_reply_reused_through_the_prefix_cache_gives_what_recomputing_it_gives(models):
    """A chat's next turn (its prompt: the last prompt, the reply, new tokens) through the prefix
    cache must follow the reference of the prompt computed whole (what an engine without the
    cache computes, within 1e-5 of it here). The reply's blocks in the cache were written by
    decode steps, whose keys and values from the second layer on differ from a prefill's of the
    same tokens (README's kv_bits paragraph); Gemma 3 at 4 bits: the next turn's
    log-probabilities were 0.7-1.5 off (following instead, within 1e-4, a reference with the
    reply's positions decoded) and greedy tokens parted in 3 of 6 turns, not near-ties."""
    path, ref, _ = models[("gemma3_text", 64)]
    rng = np.random.default_rng(0)
    with amlx.load_sync(path, kv_bits=4) as m:
        for _ in range(3):
            prompt = [int(x) for x in rng.integers(10, 200, int(rng.integers(5, 40)))]
            reply = m.complete_sync(prompt, max_tokens=40).token_ids
            turn = prompt + reply + [int(x) for x in rng.integers(10, 200, 5)]
            got = m.complete_sync(turn, max_tokens=12, logprobs=True)
            assert got.usage.cached_tokens >= len(prompt) // 16 * 16
            _check_against_reference(ref, turn, list(zip(got.token_ids, got.logprobs)), 4)
