"""What every architecture shares: weight bookkeeping, rotary embeddings,
attention over a KV cache, and the causal-LM shell.

Each architecture file builds its module tree from a `Weights` source, which
checks every tensor's shape as it is taken and reports, by name, what is
missing, misshaped or left over.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from amlx._mlx import Array, array, cpu_kernels, fast, ops
from amlx._mlx import float32 as _f32
from amlx._mlx import int32 as _i32
from amlx._mlx import uint32
from amlx.cache import BLOCK, KVCache, memoized
from amlx.models import cpu_matmul, decode_attention, dense_rows, rope, step_kernels
from amlx.errors import ModelLoadError
from amlx.models.nn import (AllSum, Embedding, Linear, Module, QuantizedEmbedding, QuantizedLinear, RMSNorm,
                            input_slice, output_slice, split_outputs)


class Weights:
    """The checkpoint's tensors by name, handed out once each with shape checks."""

    def __init__(self, tensors: dict[str, Array], quantization: dict | None, where: str, dtype=None,
                 origin: dict[str, str] | None = None):
        self._tensors = tensors
        self._quant = quantization or {}
        self._where = where
        self._origin = origin or {}  # tensor name -> the file holding it, for error messages
        self._dtype = dtype
        self.taken: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self._tensors

    def _get(self, name: str, shape: tuple | None, packed: bool = False) -> Array:
        """The tensor, its shape and dtype checked: floating point, or uint32 for
        the `packed` weights of quantized layers. A mislabelled tensor (a float
        weight stored as I32: same bytes, wrong numbers) is refused, not run."""
        if name not in self._tensors:
            raise ModelLoadError(f"{self._where}: tensor {name!r} is missing")
        a = self._tensors[name]
        if shape is not None and tuple(a.shape) != tuple(shape):
            raise ModelLoadError(f"{self.origin(name)}: tensor {name!r} has shape {tuple(a.shape)}, expected "
                                 f"{tuple(shape)}")
        if (a.dtype is not uint32) if packed else not a.dtype.is_floating:
            raise ModelLoadError(f"{self.origin(name)}: tensor {name!r} has dtype {a.dtype.name}, expected "
                                 f"{'uint32 (packed quantized weights)' if packed else 'a floating-point type'}")
        self.taken.add(name)
        if not packed and self._dtype is not None and a.dtype is not self._dtype:
            a = a.astype(self._dtype)
        return a

    def tensor(self, name: str, shape: tuple | None = None) -> Array:
        return self._get(name, shape)

    def quant_params(self, prefix: str) -> tuple[int, int] | None:
        """(group_size, bits) when `prefix` is stored quantized, else None."""
        if not self.has(f"{prefix}.scales"):
            return None
        if not self._quant:
            raise ModelLoadError(f"{self._where}: {prefix} is quantized (has .scales) but config.json has no "
                                 f"'quantization' entry")
        override = self._quant.get(prefix, {})
        if override is False:
            raise ModelLoadError(f"{self._where}: {prefix} has .scales but config.json marks it unquantized")
        override = override if isinstance(override, dict) else {}
        return (int(override.get("group_size", self._quant.get("group_size", 64))),
                int(override.get("bits", self._quant.get("bits", 4))))

    def _quantized(self, prefix: str, out_dim: int, in_dim: int, q: tuple[int, int]):
        group, bits = q
        if in_dim % group or (in_dim * bits) % 32:
            raise ModelLoadError(f"{self._where}: {prefix} cannot be quantized with group size {group} and "
                                 f"{bits} bits (input size {in_dim})")
        w = self._get(f"{prefix}.weight", (out_dim, in_dim * bits // 32), packed=True)
        scales = self._get(f"{prefix}.scales", (out_dim, in_dim // group))
        biases = self._get(f"{prefix}.biases", (out_dim, in_dim // group))
        return w, scales, biases, group, bits

    def linear(self, prefix: str, out_dim: int, in_dim: int, bias: bool = False) -> Module:
        b = self.tensor(f"{prefix}.bias", (out_dim,)) if bias else None
        q = self.quant_params(prefix)
        if q is None:
            return Linear(self.tensor(f"{prefix}.weight", (out_dim, in_dim)), b)
        return QuantizedLinear(*self._quantized(prefix, out_dim, in_dim, q), bias=b)

    def embedding(self, prefix: str, vocab: int, dim: int) -> Module:
        q = self.quant_params(prefix)
        if q is None:
            return Embedding(self.tensor(f"{prefix}.weight", (vocab, dim)))
        return QuantizedEmbedding(*self._quantized(prefix, vocab, dim, q))

    def norm(self, prefix: str, dim: int, eps: float, cls=RMSNorm) -> Module:
        return cls(self.tensor(f"{prefix}.weight", (dim,)), eps)

    def origin(self, name: str) -> str:
        """The file holding tensor `name` (the checkpoint directory when unknown)."""
        return self._origin.get(name, self._where)

    def leftover(self, ignore: Callable[[str], bool] = lambda n: False) -> list[str]:
        return sorted(n for n in self._tensors if n not in self.taken and not ignore(n))


class RoPE:
    """Rotary position embedding in the rotate-half convention of HF checkpoints.

    Plain and linear rope run on MLX's base/scale form; llama3 and yarn pass
    their per-pair frequencies (`amlx.models.rope`). YaRN also multiplies cos
    and sin by `attention_factor`, i.e. queries and keys both: `Attention`
    folds its square into the attention scale."""

    def __init__(self, dims: int, base: float, scaling: dict | None = None):
        self.dims = dims
        self.base: float | None = base
        self.scale = 1.0
        self.attention_factor = 1.0
        self.freqs: Array | None = None
        self._periods = np.asarray(base, np.float64) ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
        self._inv_freq: Array | None = None
        kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if kind in (None, "default"):
            return
        if kind == "linear":
            self.scale = 1.0 / float(scaling["factor"])
            return
        if kind == "llama3":
            inv = rope.llama3_inv_freqs(dims, base, scaling)
        elif kind == "yarn":
            inv = rope.yarn_inv_freqs(dims, base, scaling)
            self.attention_factor = rope.yarn_attention_factor(scaling)
        else:
            raise ModelLoadError(f"rope scaling type {kind!r} is not supported (supported: "
                                 f"{', '.join(rope.ROPE_TYPES)})")
        # MLX's rope takes the period of each pair (1 / inverse frequency).
        self._periods = 1.0 / np.asarray(inv, dtype=np.float64)
        self.freqs = array(self._periods.astype(np.float32), _f32)
        self.base = None

    def close(self) -> None:
        for a in (self.freqs, self._inv_freq):
            if a is not None:
                a.close()
        self.freqs = self._inv_freq = None

    def inv_freq(self) -> Array:
        """(dims/2,) float32: the angle per position of each rotated pair, the
        position scale included (for kernels that rotate by themselves)."""
        if self._inv_freq is None:
            self._inv_freq = array((self.scale / self._periods).astype(np.float32), _f32)
        return self._inv_freq

    def __call__(self, x: Array, offset: int | Array) -> Array:
        return fast.rope(x, self.dims, traditional=False, base=self.base, scale=self.scale, offset=offset,
                         freqs=self.freqs)


def causal_mask(length: int, window: int | None) -> str | Array:
    """The attention mask of a full sequence without cache (training, scoring)."""
    if window is None or length <= window:
        return "causal"
    q = np.arange(length)[:, None]
    k = np.arange(length)[None, :]
    return array((k <= q) & (k > q - window))


class Step:
    """What every layer of one forward pass shares: the batch and sequence
    length, where the tokens go (`pos`: one int start for every row, or per-row
    positions as a (B,) int32 array: one token per row, or several in a
    speculative verify pass, `PagedLayer.update_verify`), and values
    all layers use, made once per pass instead of once per layer (masks,
    cache-write indices)."""

    def __init__(self, batch: int, length: int, pos: int | Array, decode_kernel: bool = False,
                 engine_pass: bool = False):
        self.batch, self.length, self.pos = batch, length, pos
        self.memo: dict = {}
        # the fused decode kernels (CUDA or CPU), where the engine chose them (CausalLM.use_decode_kernel)
        self.decode_kernel = decode_kernel and length == 1 and not isinstance(pos, int)
        # On the CPU the gated activation's kernel serves an engine's every pass (prompts, verify
        # passes), not only its decode steps: a prompt's MLP then rounds where a decode step's
        # does (once, not after each of three ops), and skips MLX's CPU exp (scalar, a libm
        # fmaf call per step: a fifth of a bf16 prompt's time on a Zen 5). Never a training
        # pass (no cache): the kernel has no gradient.
        self.row_kernels = decode_kernel and engine_pass and step_kernels.on_cpu()

    def causal_mask(self, window: int | None) -> str | Array:
        return memoized(self.memo, ("causal", window), lambda: causal_mask(self.length, window))


class Attention(Module):
    """Multi-head attention with grouped KV heads, optional q/k norms and a KV cache.

    Takes and returns activations flattened to (B*L, hidden)."""

    def __init__(self, w: Weights, prefix: str, hidden: int, n_heads: int, n_kv: int, head_dim: int,
                 scale: float, rope: RoPE, *, qkv_bias: bool = False, qk_norm: Callable | None = None,
                 window: int | None = None):
        self.q_proj = w.linear(f"{prefix}.q_proj", n_heads * head_dim, hidden, qkv_bias)
        self.k_proj = w.linear(f"{prefix}.k_proj", n_kv * head_dim, hidden, qkv_bias)
        self.v_proj = w.linear(f"{prefix}.v_proj", n_kv * head_dim, hidden, qkv_bias)
        self.o_proj = w.linear(f"{prefix}.o_proj", hidden, n_heads * head_dim)
        if qk_norm is not None:
            self.q_norm = qk_norm(f"{prefix}.q_norm", head_dim)
            self.k_norm = qk_norm(f"{prefix}.k_norm", head_dim)
        self._n_heads, self._n_kv, self._head_dim = n_heads, n_kv, head_dim
        # YaRN scales queries and keys by its attention factor: the same as scaling q.k by its square
        self._scale, self._rope, self.window = scale * rope.attention_factor ** 2, rope, window

    def kv_shape(self) -> tuple[int, int]:
        """(kv_heads, head_dim): the shape of one position's keys (or values)."""
        return self._n_kv, self._head_dim

    def shard_problem(self, size: int) -> str | None:
        """Why this layer cannot be split over `size` ranks (see `shard`), or None."""
        if self._n_kv % size:
            return f"{self._n_kv} key-value heads do not divide over {size} ranks"
        return None

    def shard(self, rank: int, size: int, reduce: Callable[[Array], Array]) -> None:
        """Keeps rank `rank`'s part of `size` (Megatron-style tensor parallelism):
        its key-value heads and the query heads that read them (GQA groups stay
        whole), q/k/v split by output columns, o by input rows and followed by
        `reduce` (the all_sum over the ranks), the o bias on rank 0 only."""
        problem = self.shard_problem(size)
        if problem is not None:
            raise ValueError(problem)
        self.release_derived()
        hq, hk, d = self._n_heads // size, self._n_kv // size, self._head_dim
        self.q_proj = output_slice(self.q_proj, rank * hq * d, (rank + 1) * hq * d)
        self.k_proj = output_slice(self.k_proj, rank * hk * d, (rank + 1) * hk * d)
        self.v_proj = output_slice(self.v_proj, rank * hk * d, (rank + 1) * hk * d)
        o = input_slice(self.o_proj, rank * hq * d, (rank + 1) * hq * d, keep_bias=rank == 0)
        self.o_proj = AllSum(o, reduce)
        self._n_heads, self._n_kv = hq, hk

    def _heads(self, y: Array, step: Step, n: int) -> Array:
        """(B*L, n*D) -> (B, n, L, D). With one token per row the two layouts
        are the same memory, so a reshape does without the transpose."""
        if step.length == 1:
            return ops.reshape(y, (step.batch, n, 1, self._head_dim))
        return ops.transpose(ops.reshape(y, (step.batch, step.length, n, self._head_dim)), (0, 2, 1, 3))

    def _projections(self) -> list[Module]:
        return [self.q_proj, self.k_proj, self.v_proj]

    def derived_arrays(self) -> list[Array]:
        return self._fuse("qkv", self._projections()) + [self._rope.inv_freq()]

    def _qkv_rows(self, x: Array) -> Array:
        """(B*L, (H + 2*KVH) * D): [q heads | k heads | v heads] per position."""
        layers = self._projections()
        fused = self._fused("qkv", layers)
        if fused is None:
            return ops.concatenate([m(x) for m in layers], axis=1)
        return fused(x)

    def _qkv(self, rows: Array, step: Step) -> tuple[Array, Array, Array]:
        """q (B, H, L, D) and k, v (B, KVH, L, D) from `_qkv_rows`: one reshape to
        heads, then one split, instead of a split and three reshapes."""
        y = self._heads(rows, step, self._n_heads + 2 * self._n_kv)
        q, k, v = ops.split(y, [self._n_heads, self._n_heads + self._n_kv], axis=1)
        return q, k, v

    def _decode_kernel(self, qkv: Array, cache: KVCache, step: Step) -> Array | None:
        """The decode step as one kernel (norms, rotation, attention; see
        `decode_attention`) plus the cache write; None where it does not apply."""
        norms = [getattr(self, "q_norm", None), getattr(self, "k_norm", None)]
        if norms[0] is not None and not all(isinstance(n, RMSNorm) and n.eps == norms[0].eps for n in norms):
            return None
        # a contiguous cache, or a block pool and its table (quantized: with its scales and biases)
        kv, table, quant = cache.kernel_input()
        if kv is None or not decode_attention.supports(qkv, kv, self._n_heads, paged=table is not None,
                                                       quant=quant) or self._rope.dims != self._head_dim:
            return None
        q_w, k_w = (None, None) if norms[0] is None else (n.norm_weight() for n in norms)
        o, kv_new = decode_attention.decode_attention(
            qkv, kv, step.pos, heads=self._n_heads, scale=self._scale, window=self.window,
            inv_freq=self._rope.inv_freq(), q_norm=q_w, k_norm=k_w, eps=0.0 if norms[0] is None else norms[0].eps,
            table=table, quant=quant, write_pool=cache.kernel_may_write())
        if kv_new is not None:  # (None: the kernel wrote them into the pool itself)
            cache.write_decode(kv_new, step.pos, step.memo)  # (quantized by the cache, as in the other paths)
        return o

    def __call__(self, x: Array, cache: KVCache | None, step: Step) -> Array:
        rows = self._qkv_rows(x)
        if step.decode_kernel and cache is not None:
            o = self._decode_kernel(rows, cache, step)
            if o is not None:
                return self.o_proj(o)
        q, k, v = self._qkv(rows, step)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self._rope(q, step.pos), self._rope(k, step.pos)
        if cache is None:
            keys, values, mask = k, v, step.causal_mask(self.window)
        elif isinstance(step.pos, int):
            keys, values, mask = cache.update_prefill(k, v, step.pos, step.memo)
        elif step.length > 1:  # several new tokens per row at per-row positions: a verify pass
            keys, values, mask = cache.update_verify(k, v, step.pos, step.memo)
        else:
            keys, values, mask = cache.update_decode(k, v, step.pos, step.memo)
        if getattr(cache, "bits", None) and step.length > 1 and not isinstance(step.pos, int) and not getattr(
                cache, "as_stored", False):
            # a verify pass over a quantized pool: each new token attends its own key and value as
            # computed, as the decode kernel does (a decode step's pool hands them back so itself:
            # `PagedLayer.update_decode`), so that every path decodes alike: the kernel or the ops,
            # one process or tensor-parallel ranks, drafts checked or not. (Not a prompt's extend
            # pass, `PagedLayer.as_stored`: a prefill attends every position as the pool holds it.)
            o = attend_own_unquantized(q, k, v, keys, values, mask, self._scale)
            return self.o_proj(ops.reshape(ops.transpose(o, (0, 2, 1, 3)),
                                           (step.batch * step.length, self._n_heads * self._head_dim)))
        if step.row_kernels and isinstance(step.pos, int) and self._head_dim <= cpu_kernels.PREFILL_HEAD_DIM and (
                isinstance(mask, str) or self.window is not None):
            # a prompt's pass on the CPU: attention as one kernel (cpu_attention.cpp), its
            # output already in the layout o_proj takes; the kernel makes the mask itself, causal
            # and at most a window back, which is all a prompt's cache hands back ("causal" or
            # `window_mask`)
            o = cpu_kernels.prefill_attention(q, keys, values, self._scale, self.window)
            return self.o_proj(ops.reshape(o, (step.batch * step.length, self._n_heads * self._head_dim)))
        if cpu_matmul.widen_attention(q, step.length):
            dtype = q.dtype
            q, keys, values = (ops.astype(a, _f32) for a in (q, keys, values))
            o = ops.astype(fast.scaled_dot_product_attention(q, keys, values, scale=self._scale, mask=mask), dtype)
        else:
            o = fast.scaled_dot_product_attention(q, keys, values, scale=self._scale, mask=mask)
        if step.length > 1:
            o = ops.transpose(o, (0, 2, 1, 3))
        return self.o_proj(ops.reshape(o, (step.batch * step.length, self._n_heads * self._head_dim)))


def own_slots(mask: Array) -> Array:
    """Where each new token's own slot is, as a boolean array of `mask`'s shape (..., span):
    the last slot the causal mask shows it."""
    span = mask.shape[-1]
    slots = ops.reshape(ops.arange(span, dtype=_i32), (1,) * (mask.ndim - 1) + (span,))
    return slots == ops.max(ops.where(mask, slots, -1), axis=-1, keepdims=True)


def attend_own_unquantized(q: Array, k: Array, v: Array, keys: Array, values: Array, mask: Array,
                           scale: float) -> Array:
    """Attention of W new tokens a row (q (B, H, W, D), their keys and values k, v (B, KVH, W, D))
    over a quantized pool's `keys`, `values` (B, KVH, span, D, dequantized, the new tokens'
    included) under `mask` (B, 1, W, span), as the decode kernel computes it: new token j sees
    the earlier slots as the pool holds them and its own key and value unquantized. Its own
    slot is the last one the mask shows it (causal: nothing after it). In float32; (B, H, W, D)
    in q's dtype."""
    b, h, w, d = q.shape
    kvh, span = keys.shape[1], keys.shape[2]
    mask = ops.reshape(mask, (b, 1, 1, w, span))
    is_own = ops.reshape(own_slots(mask), (b, 1, 1, w, span))
    q5 = ops.reshape(ops.astype(q, _f32), (b, kvh, h // kvh, w, d))
    scores = ops.matmul(q5, ops.reshape(ops.swapaxes(ops.astype(keys, _f32), 2, 3), (b, kvh, 1, d, span))) * scale
    own = ops.sum(q5 * ops.reshape(ops.astype(k, _f32), (b, kvh, 1, w, d)), axis=-1, keepdims=True) * scale
    scores = ops.where(mask, ops.where(is_own, own, scores), float("-inf"))
    weights = ops.softmax(scores, axis=-1, precise=True)
    o = ops.matmul(ops.where(is_own, 0.0, weights), ops.reshape(ops.astype(values, _f32), (b, kvh, 1, span, d)))
    o = o + ops.sum(ops.where(is_own, weights, 0.0), axis=-1, keepdims=True) * ops.reshape(
        ops.astype(v, _f32), (b, kvh, 1, w, d))
    return ops.astype(ops.reshape(o, (b, h, w, d)), q.dtype)


class GatedMLP(Module):
    """down(act(gate(x)) * up(x))."""

    def __init__(self, w: Weights, prefix: str, hidden: int, intermediate: int, act: Callable[[Array], Array]):
        self.gate_proj = w.linear(f"{prefix}.gate_proj", intermediate, hidden)
        self.up_proj = w.linear(f"{prefix}.up_proj", intermediate, hidden)
        self.down_proj = w.linear(f"{prefix}.down_proj", hidden, intermediate)
        self._act = act

    def shard_problem(self, size: int) -> str | None:
        """Why this MLP cannot be split over `size` ranks, or None."""
        inter = self.gate_proj.out_features
        return f"the MLP's {inter} intermediate features do not divide over {size} ranks" if inter % size else None

    def shard(self, rank: int, size: int, reduce: Callable[[Array], Array]) -> None:
        """Keeps rank `rank`'s part of `size`: gate/up split by output columns,
        down by input rows and followed by `reduce`, its bias on rank 0 only."""
        problem = self.shard_problem(size)
        if problem is not None:
            raise ValueError(problem)
        self.release_derived()
        part = self.gate_proj.out_features // size
        lo, hi = rank * part, (rank + 1) * part
        self.gate_proj = output_slice(self.gate_proj, lo, hi)
        self.up_proj = output_slice(self.up_proj, lo, hi)
        self.down_proj = AllSum(input_slice(self.down_proj, lo, hi, keep_bias=rank == 0), reduce)

    def derived_arrays(self) -> list[Array]:
        return self._fuse("gate_up", [self.gate_proj, self.up_proj])

    def __call__(self, x: Array, step: Step | None = None) -> Array:
        layers = [self.gate_proj, self.up_proj]
        fused = self._fused("gate_up", layers)
        act = _KERNEL_ACTIVATIONS.get(self._act)
        if fused is not None and act is not None and step is not None and (
                step.decode_kernel or step.row_kernels) and step_kernels.supports(x):
            return self.down_proj(step_kernels.gated_activation(fused(x), act))
        if fused is not None:
            gate, up = split_outputs(fused(x), layers)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self._act(gate) * up)


def silu(x: Array) -> Array:
    return x * ops.sigmoid(x)


def gelu_tanh(x: Array) -> Array:
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + ops.tanh(c * (x + 0.044715 * (x * x * x))))


# the activations step_kernels.gated_activation computes, by its names
_KERNEL_ACTIVATIONS = {silu: "silu", gelu_tanh: "gelu_tanh"}


def residual(step: Step, x: Array, y: Array, norm: Module, pre: Module | None = None) -> tuple[Array, Array]:
    """The residual stream after adding y (or pre(y), a norm of it) to x, and
    `norm` of it: one kernel in decode steps on CUDA, where it applies."""
    norms = [norm] if pre is None else [pre, norm]
    if step.decode_kernel and all(isinstance(n, RMSNorm) for n in norms) and step_kernels.supports(
            x, *(n.norm_weight() for n in norms)):
        if pre is None:
            return step_kernels.residual_norm(x, y, norm.norm_weight(), norm.eps)
        return step_kernels.residual_norm(x, y, norm.norm_weight(), norm.eps, pre.norm_weight(), pre.eps)
    total = x + (y if pre is None else pre(y))
    return total, norm(total)


class Decoder(Module):
    """`model.*` of a checkpoint: embed_tokens, layers, norm."""

    decode_kernel = False  # see CausalLM.use_decode_kernel

    def __init__(self, embed_tokens: Module, layers: list, norm: Module, embed_scale: float | None = None):
        self.embed_tokens, self.layers, self.norm = embed_tokens, layers, norm
        self._embed_scale = embed_scale

    def __call__(self, ids: Array, cache: list[KVCache] | None, pos: int | Array,
                 pace: Callable[..., None] | None = None) -> Array:
        """Final hidden states (B*L, hidden) of token ids (B, L): activations stay
        two-dimensional between layers, so every projection is one plain matmul.
        `pace(i, normed, h)` is called after layer i (amlx.engine.pacing)."""
        b, length = ids.shape
        step = Step(b, length, pos, self.decode_kernel, engine_pass=cache is not None)
        h = self.embed_tokens(ops.reshape(ids, (b * length,)))
        if self._embed_scale is not None:
            # Rounded to the activation dtype first, as the reference does.
            h = h * array(self._embed_scale, _f32).astype(h.dtype)
        if not self.layers:
            return self.norm(h)
        # Each layer hands on its output together with the next layer's input
        # norm of it (the final norm after the last), so that the residual add
        # and that norm can run as one kernel.
        normed = self.layers[0].input_layernorm(h)
        for i, layer in enumerate(self.layers):
            after = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else self.norm
            h, normed = layer(h, normed, None if cache is None else cache[i], step, after)
            if pace is not None:
                pace(i, normed, h)
        return normed


class CausalLM(Module):
    """A decoder plus output projection; parameter names follow the checkpoint
    (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`)."""

    model_type = ""

    def __init__(self, model: Decoder, lm_head: Module | None, final_softcap: float | None = None):
        self.model = model
        if lm_head is not None:
            self.lm_head = lm_head
        self._final_softcap = final_softcap
        self._unused: list[Array] = []

    def __call__(self, ids: Array, cache: list[KVCache] | None = None, pos: int | Array = 0,
                 last: Array | None = None, pace: Callable[..., None] | None = None) -> Array:
        """Logits (B, L, V) for token ids (B, L) written at position `pos`
        (an int for every row, or a (B,) int32 array of per-row positions).

        With `last` ((B,) int32 indices into L), only those positions get logits:
        (B, 1, V). Prompt processing needs one position, and skipping the output
        projection for the rest saves its largest matmul. `pace`: see Decoder."""
        b, length = ids.shape
        # an engine's pass (it has a cache) with the kernels on: on CUDA its matmuls of a few
        # rows by small weights go to dense_rows (`applies`); never a training pass (no cache),
        # which needs gradients, which a custom kernel has none of
        # (a prompt's extend pass has per-row positions too, but it is a prefill: its rows take
        # the prefill's products, not the int8 ones; its views say so, `PagedLayer.as_stored`)
        prompt = bool(cache) and getattr(cache[0], "as_stored", False)
        with dense_rows.within(cache is not None and self.model.decode_kernel), \
                cpu_matmul.decode_pass(cache is not None and not isinstance(pos, int) and not prompt):
            h = self.model(ids, cache, pos, pace)
            if last is not None:
                if length > 1:
                    d = h.shape[1]
                    rows = ops.reshape(last, (b, 1, 1))
                    h = ops.take_along_axis(ops.reshape(h, (b, length, d)), ops.broadcast_to(rows, (b, 1, d)), 1)
                    h = ops.reshape(h, (b, d))
                length = 1
            out = self.lm_head(h) if hasattr(self, "lm_head") else self.model.embed_tokens.as_linear(h)
        if self._final_softcap:
            out = ops.tanh(out / self._final_softcap) * self._final_softcap
        return ops.reshape(out, (b, length, out.shape[1]))

    @property
    def layers(self) -> list:
        return self.model.layers

    def use_decode_kernel(self, on: bool) -> None:
        """Whether decode steps use the fused decode kernels, CUDA or CPU (decode_attention,
        step_kernels): a choice the engine makes once when it is built."""
        self.model.decode_kernel = bool(on)

    def make_cache(self, block: int = BLOCK) -> list[KVCache]:
        return [KVCache(window=layer.self_attn.window, block=block) for layer in self.model.layers]

    def kv_layout(self) -> list[tuple[int, int]]:
        """(kv_heads, head_dim) of each layer's keys and values (KV block pools)."""
        return [layer.self_attn.kv_shape() for layer in self.model.layers]

    def windows(self) -> list[int | None]:
        """Each layer's sliding window (None: full attention)."""
        return [layer.self_attn.window for layer in self.model.layers]

    def activation_dtype(self):
        """The float type of activations, keys and values: the embedding's
        (its scales' for a quantized embedding)."""
        embed = self.model.embed_tokens
        return embed.scales.dtype if hasattr(embed, "scales") else embed.weight.dtype

    def close(self) -> None:
        """Releases every weight (and tensors of the checkpoint that went unused)."""
        self.release_derived()
        for _, p in self.named_parameters():
            p.close()
        for extra in self._unused:
            extra.close()
        self._unused = []
        for layer in self.model.layers:
            layer.self_attn._rope.close()
