"""Minimal neural-network modules over the array layer.

A `Module` holds arrays and sub-modules as attributes; parameters are named by
their dotted path, which matches the Hugging Face tensor names of the
checkpoint (``model.layers.0.self_attn.q_proj.weight``), so loading is a walk
over the checkpoint's names.
"""

from __future__ import annotations

import copy
from typing import Iterator

from amlx._mlx import Array, device, fast, float32, ops
from amlx.models import cpu_matmul, dense_rows, qmm_split, quantized_gemv


class Module:
    """A container of parameters (Arrays) and child modules (also in lists)."""

    def children(self) -> Iterator[tuple[str, object]]:
        for name, value in vars(self).items():
            if name.startswith("_"):
                continue
            if isinstance(value, (Array, Module)) or (
                    isinstance(value, list) and value and isinstance(value[0], Module)):
                yield name, value

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Array]]:
        for name, value in self.children():
            path = f"{prefix}{name}"
            if isinstance(value, Array):
                yield path, value
            elif isinstance(value, Module):
                yield from value.named_parameters(path + ".")
            else:
                for i, m in enumerate(value):
                    yield from m.named_parameters(f"{path}.{i}.")

    def parameters(self) -> dict[str, Array]:
        return dict(self.named_parameters())

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix.rstrip("."), self
        for name, value in self.children():
            if isinstance(value, Module):
                yield from value.named_modules(f"{prefix}{name}.")
            elif isinstance(value, list):
                for i, m in enumerate(value):
                    yield from m.named_modules(f"{prefix}{name}.{i}.")

    def _resolve(self, path: str) -> tuple[object, str]:
        *parents, leaf = path.split(".")
        obj: object = self
        for p in parents:
            obj = obj[int(p)] if isinstance(obj, list) else getattr(obj, p)
        return obj, leaf

    def set_parameter(self, path: str, value: Array) -> None:
        owner, leaf = self._resolve(path)
        setattr(owner, leaf, value)

    def get_module(self, path: str) -> "Module":
        owner, leaf = self._resolve(path)
        return owner[int(leaf)] if isinstance(owner, list) else getattr(owner, leaf)

    def set_module(self, path: str, module: "Module") -> None:
        """Puts `module` at `path`; the module it replaces gives back its derived arrays.
        (A replaced layer may live on where a fused layer's key names it, as a LoRA-wrapped
        q_proj does in its attention's stale "qkv" entry: its transposed weight, a view that
        holds the whole fused weight, then outlived the model's close, which frees only the
        derived arrays of the modules in the tree.)"""
        owner, leaf = self._resolve(path)
        old = owner[int(leaf)] if isinstance(owner, list) else getattr(owner, leaf, None)
        if isinstance(owner, list):
            owner[int(leaf)] = module
        else:
            setattr(owner, leaf, module)
        if isinstance(old, Module) and old is not module:
            # (not what the new module still holds: a module of both trees, or a shallow copy's memo)
            kept = {id(m) for _, m in module.named_modules()}
            kept |= {id(m.__dict__["_memo"]) for _, m in module.named_modules() if "_memo" in m.__dict__}
            for _, m in old.named_modules():
                memo = m.__dict__.get("_memo")
                if id(m) not in kept and memo is not None and id(memo) not in kept:
                    del m.__dict__["_memo"]
                    for _, value in memo.values():
                        _release(value)

    def update(self, params: dict[str, Array]) -> None:
        """Replaces parameters by dotted name (e.g. with trained values)."""
        for path, value in params.items():
            self.set_parameter(path, value)

    # -- derived arrays ---------------------------------------------------------
    # Some modules use an array computed from a parameter (a transposed weight
    # view, Gemma's 1 + w norm scale). Computing it once, not at every call,
    # takes a node per use out of every traced graph; it must be evaluated
    # before a compiled step traces it, or the step would replay its computation.

    def derived_arrays(self) -> list[Array]:
        """This module's derived arrays, built if needed (see `prepare`)."""
        return []

    def derive(self, name: str, source: Array, build) -> Array:
        """Derived array `name`: `build(source)`, made once while `source` is the same array
        (a new source releases the old value); `prepare` evaluates the tree's, outside any trace."""
        memo = self.__dict__.setdefault("_memo", {})
        hit = memo.get(name)
        if hit is not None and hit[0] is source:
            return hit[1]
        if hit is not None:
            _release(hit[1])
        value = build(source)
        memo[name] = (source, value)
        return value

    def has_derived(self, name: str, source: Array) -> bool:
        """Whether derived array `name` was built from `source` (and is still held)."""
        hit = self.__dict__.get("_memo", {}).get(name)
        return hit is not None and hit[0] is source

    def _fused(self, name: str, layers: list["Module"]) -> "Module | None":
        """The layer `prepare` fused from `layers`, if they are unchanged since
        (same modules, same arrays); None otherwise."""
        hit = self.__dict__.get("_memo", {}).get(name)
        if hit is None:
            return None
        key = _fusion_key(layers)
        if len(key) != len(hit[0]) or any(a is not b for a, b in zip(key, hit[0])):
            return None
        return hit[1]

    def _fuse(self, name: str, layers: list["Module"]) -> list[Array]:
        """Fuses `layers` (see `fuse_outputs`) unless done already or not
        possible; returns the fused layer's derived arrays."""
        fused = self._fused(name, layers)
        if fused is None:
            if not fusable(layers):
                return []
            memo = self.__dict__.setdefault("_memo", {})
            if name in memo:
                _release(memo.pop(name)[1])
            fused = fuse_outputs(layers)
            memo[name] = (_fusion_key(layers), fused)
        return fused.derived_arrays()

    def prepare(self) -> None:
        """Builds and evaluates every derived array of the tree (after loading,
        or after parameters were replaced); cheap when nothing changed. Never
        called inside a transformation (compile, grad): it evaluates."""
        pending = [a for _, m in self.named_modules() for a in m.derived_arrays()]
        if pending:
            ops.eval(*pending)

    def release_derived(self) -> None:
        """Frees every derived array and fused layer of the tree (they share
        parameters' memory)."""
        for _, m in self.named_modules():
            for _, value in m.__dict__.pop("_memo", {}).values():
                _release(value)


def _release(value) -> None:
    if isinstance(value, Module):
        value.release_derived()
        for _, p in value.named_parameters():
            p.close()
    else:
        value.close()


def _fusion_key(layers: list[Module]) -> tuple:
    return tuple(layers) + tuple(a for m in layers for _, a in m.named_parameters())


def fusable(layers: list[Module]) -> bool:
    """Whether `fuse_outputs` can join these layers: all plain Linear, or all
    QuantizedLinear of one format, with biases on all or none."""
    kind = type(layers[0])
    if kind not in (Linear, QuantizedLinear) or any(type(m) is not kind for m in layers):
        return False
    if len({hasattr(m, "bias") for m in layers}) != 1:
        return False
    if kind is QuantizedLinear and len({(m._group_size, m._bits) for m in layers}) != 1:
        return False
    return len({m.weight.dtype for m in layers}) == 1


def fuse_outputs(layers: list[Module]) -> Module:
    """One layer computing the concatenated outputs of `layers` that read the
    same input (q/k/v, gate/up): one matmul instead of several. Each layer's
    arrays become views into the fused layer's (the values are unchanged and
    memory is not doubled); the layers keep working on their own."""
    names = [n for n in ("weight", "scales", "biases", "bias") if hasattr(layers[0], n)]
    joined = {n: ops.concatenate([getattr(m, n) for m in layers], axis=0) for n in names}
    ops.eval(*joined.values())
    views = []
    for n, full in joined.items():
        start = 0
        for m in layers:
            part = getattr(m, n)
            stop = start + part.shape[0]
            lo, hi = [0] * full.ndim, list(full.shape)
            lo[0], hi[0] = start, stop
            view = ops.slice(full, lo, hi)
            setattr(m, n, view)
            views.append(view)
            start = stop
    ops.eval(*views)
    for m in layers:  # (their own derived arrays would go unused: the fused layer computes them)
        m._fused_member = True
    bias = joined.get("bias")
    if isinstance(layers[0], QuantizedLinear):
        q = layers[0]
        return QuantizedLinear(joined["weight"], joined["scales"], joined["biases"], q._group_size, q._bits, bias=bias)
    return Linear(joined["weight"], bias)


def split_outputs(y: Array, layers: list[Module]) -> list[Array]:
    """Cuts a fused layer's output (..., sum of out_features) back into the
    outputs of `layers`."""
    cuts, total = [], 0
    for m in layers[:-1]:
        total += m.out_features
        cuts.append(total)
    return ops.split(y, cuts, axis=-1)


class Linear(Module):
    """y = x W^T (+ b), W stored (out, in) as in the checkpoint."""

    def __init__(self, weight: Array, bias: Array | None = None):
        self.weight = weight
        if bias is not None:
            self.bias = bias

    def __call__(self, x: Array) -> Array:
        return linear(x, self)

    def derived_arrays(self) -> list[Array]:
        return [weight_t(self)]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


def linear(x: Array, layer: Module, quantized: bool = False) -> Array:
    """x W^T (+ b) for a layer holding a dense `weight` (or, with `quantized`, MLX's
    packed weight, scales and biases) and an optional `bias`: the one computation
    of every linear layer (adapters wrapping a layer call it too, so that their
    base output is bit-identical to the plain layer's)."""
    bias = getattr(layer, "bias", None)
    if quantized:
        y = quantized_dense(x, layer)
    else:
        y = few_rows(x, layer)
        if y is None:
            return dense(x, weight_t(layer), bias, layer.__dict__.get("_split"))
    return y + bias if bias is not None else y


def few_rows(x: Array, layer: Module) -> Array | None:
    """x W^T for a dense layer through amlx's own kernels for a few rows of x: the CPU's
    (cpu_matmul) or, in an engine's pass on CUDA, the tensor-core one (dense_rows, which
    spares each matmul MLX's per-call cuBLAS setup); None where neither applies."""
    y = cpu_matmul.few_rows(x, layer)
    if y is None and dense_rows.applies(x, layer.weight):
        return dense_rows.dense_rows(x, layer.weight)
    return y


def weight_t(module: Module) -> Array:
    """`module.weight` (out, in) as an (in, out) view, made once per weight array."""
    return module.derive("weight_t", module.weight, ops.transpose)


def dense(x: Array, w_t: Array, bias: Array | None, split: "MatmulSplit | None" = None) -> Array:
    """x @ w_t (+ bias), w_t an (in, out) weight; with `split`, in column blocks
    on its streams."""
    if cpu_matmul.widen(x):
        return ops.astype(dense(ops.astype(x, float32), w_t, bias, split), x.dtype)
    if split is not None and split.parts(w_t.shape[1]):
        if bias is not None:
            return split.columns(w_t.shape[1], lambda lo, hi: ops.addmm(
                ops.slice(bias, (lo,), (hi,)), x, _columns(w_t, lo, hi)))
        return split.columns(w_t.shape[1], lambda lo, hi: ops.matmul(x, _columns(w_t, lo, hi)))
    if bias is not None:
        return ops.addmm(bias, x, w_t)
    return ops.matmul(x, w_t)


def _columns(w: Array, lo: int, hi: int) -> Array:
    return ops.slice(w, (0, lo), (w.shape[0], hi))


def _rows(w: Array, lo: int, hi: int) -> Array:
    return ops.slice(w, (lo, 0), (hi, w.shape[1]))


def quantized_dense(x: Array, layer: Module) -> Array:
    """x @ W^T for a layer in MLX's packed quantized format (weight, scales and
    biases (out, ...)); with the layer's split, in column blocks: output column j
    is row j of each packed array, so row blocks are views. A few rows go to
    amlx's own kernels: on the CPU (cpu_matmul) and on CUDA (quantized_gemv)."""
    y = cpu_matmul.few_rows(x, layer)
    if y is not None:
        return y
    packed = (layer.weight, layer.scales, layer.biases, layer._group_size, layer._bits)
    if quantized_gemv.applies(x, *packed):
        return quantized_gemv.quantized_gemv(x, *packed)
    if qmm_split.applies(x, layer):
        return qmm_split.product(x, layer)
    q = (layer._group_size, layer._bits)
    if quantized_gemv.mlx_product_is_wrong(x, x.shape[-1], layer._group_size):
        w = ops.dequantize(layer.weight, layer.scales, layer.biases, *q, dtype=x.dtype)
        return dense(x, ops.transpose(w), None, layer.__dict__.get("_split"))
    if cpu_matmul.dequantize_first(x, layer):
        w_t = ops.transpose(cpu_matmul.dequantize(layer))
        y = dense(ops.astype(x, float32), w_t, None, layer.__dict__.get("_split"))
        return ops.astype(y, x.dtype if x.dtype == layer.scales.dtype else float32)
    split = layer.__dict__.get("_split")
    out = layer.weight.shape[0]
    if split is not None and split.parts(out):
        return split.columns(out, lambda lo, hi: ops.quantized_matmul(
            x, _rows(layer.weight, lo, hi), _rows(layer.scales, lo, hi), _rows(layer.biases, lo, hi), True, *q))
    return ops.quantized_matmul(x, layer.weight, layer.scales, layer.biases, True, *q)


class MatmulSplit:
    """A layer strategy for the CPU: a matmul by a 2-D weight is cut into blocks
    of output columns, each computed on its own stream (MLX computes a CPU
    matmul on one core: its stream's thread, with the single-threaded BLAS of
    the Linux wheels) and joined on the current one, so one request's forward
    pass uses several cores. The results are bitwise the same: each output
    element is computed from the same row and column as without the split.
    Layers use it once `split_layers` has given it to them."""

    MIN_COLUMNS = 256  # narrower blocks cost more in cross-stream waits than they save

    def __init__(self, streams: list[device.Stream]):
        self.streams = list(streams)

    def parts(self, columns: int) -> int:
        """Blocks to cut `columns` output columns into (0: no split)."""
        parts = min(len(self.streams), columns // self.MIN_COLUMNS)
        return parts if parts > 1 else 0

    def columns(self, columns: int, block) -> Array:
        """block(lo, hi) for column blocks [lo, hi), each on its stream, joined
        along the last axis on the current stream."""
        parts = self.parts(columns)
        cuts = [columns * j // parts for j in range(parts + 1)]
        outs = []
        for j in range(parts):
            with device.on_stream(self.streams[j]):
                outs.append(block(cuts[j], cuts[j + 1]))
        return ops.concatenate(outs, axis=-1)



def split_layers(root: Module, split: MatmulSplit) -> Module:
    """A twin of the module tree whose linear layers (and fused layers, and a
    tied output projection) compute with `split`: mlx-lm's way of swapping in
    sharded linear layers. The twin shares every array with `root` (and its
    derived arrays: call `root.prepare()` first); it holds no memory of its own
    and is simply dropped, never closed. Made again when `root`'s modules or
    parameters change."""
    twins: dict[int, Module] = {}

    def twin(m: Module) -> Module:
        if id(m) in twins:
            return twins[id(m)]
        t = copy.copy(m)
        twins[id(m)] = t
        for name, value in m.children():
            if isinstance(value, Module):
                setattr(t, name, twin(value))
            elif isinstance(value, list):
                setattr(t, name, [twin(v) for v in value])
        if isinstance(t, _SPLITTABLE):
            t._split = split
        memo = m.__dict__.get("_memo")
        if memo is not None:
            # derived arrays are shared; a fused layer is twinned, keyed by the twins
            t._memo = {name: ((tuple(twins.get(id(k), k) for k in key), twin(v)) if isinstance(v, Module)
                              else (key, v)) for name, (key, v) in memo.items()}
        return t

    return twin(root)


# -- tensor parallelism (amlx.tp): one rank's part of a layer ---------------------

def output_slice(layer: Module, lo: int, hi: int) -> Module:
    """A column-parallel shard: the layer computing only outputs [lo, hi) (rows
    [lo, hi) of every array, the bias too), in memory of its own: the full
    layer's arrays are closed."""
    return _resliced(layer, lambda name, a: (lo, hi, 0), keep_bias=True)


def input_split_problem(layer: Module, size: int) -> str | None:
    """Why `input_slice` cannot cut `layer`'s inputs into `size` equal parts (a quantized
    layer's parts must be whole quantization groups), or None."""
    if not isinstance(layer, QuantizedLinear):
        return None
    g = layer._group_size
    width = layer.scales.shape[-1] * g  # the layer's input features
    if width % size == 0 and (width // size) % g == 0:
        return None
    return f"{width} input features make parts of {width / size:g} per rank, not whole quantization groups of {g}"


def input_slice(layer: Module, lo: int, hi: int, keep_bias: bool) -> Module:
    """A row-parallel shard: the layer reading only inputs [lo, hi), whose
    outputs the ranks sum; the bias stays on one rank (`keep_bias`). A
    quantized layer is cut on its quantization groups (ValueError otherwise)."""
    if not isinstance(layer, QuantizedLinear):
        return _resliced(layer, lambda name, a: (lo, hi, 1), keep_bias)
    g, bits = layer._group_size, layer._bits
    if lo % g or hi % g:
        raise ValueError(f"inputs [{lo}, {hi}) do not start and end on quantization groups of {g}")
    per = {"weight": 32 // bits, "scales": g, "biases": g}  # inputs per packed word / per group
    return _resliced(layer, lambda name, a: (lo // per[name], hi // per[name], 1), keep_bias)


def _resliced(layer: Module, cut, keep_bias: bool) -> Module:
    """The layer rebuilt from cuts of its arrays: cut(name, array) -> (lo, hi,
    axis); the bias follows axis-0 cuts (outputs) and is otherwise kept whole."""
    if type(layer) not in (Linear, QuantizedLinear):
        raise ValueError(f"{type(layer).__name__} cannot be sharded (a Linear or QuantizedLinear can)")
    layer.release_derived()
    parts = {}
    for name in [n for n in ("weight", "scales", "biases") if hasattr(layer, n)]:
        a = getattr(layer, name)
        lo, hi, axis = cut(name, a)
        start, stop = [0] * a.ndim, list(a.shape)
        start[axis], stop[axis] = lo, hi
        parts[name] = ops.contiguous(ops.slice(a, start, stop))  # its own memory, not a view
    bias = getattr(layer, "bias", None)
    if bias is not None and keep_bias:
        lo, hi, axis = cut("weight", layer.weight)
        parts["bias"] = ops.contiguous(ops.slice(bias, (lo,), (hi,))) if axis == 0 else ops.contiguous(bias)
    ops.eval(*parts.values())
    for _, a in layer.named_parameters():
        a.close()
    if isinstance(layer, QuantizedLinear):
        return QuantizedLinear(parts["weight"], parts["scales"], parts["biases"], layer._group_size,
                               layer._bits, bias=parts.get("bias"))
    return Linear(parts["weight"], parts.get("bias"))


def vocab_rows(layer: Module, lo: int, hi: int, rows: int) -> Module:
    """A vocabulary-parallel shard of an output projection: rows [lo, hi) of a
    Linear / QuantizedLinear head, or of a (tied) Embedding / QuantizedEmbedding
    read as one, zero-padded to `rows` rows so that every rank's slice of the
    logits has the same width (the padding's logits are cut off after the
    gather). A new layer in memory of its own; `layer` is left as it is (a tied
    embedding still embeds)."""
    if type(layer) not in (Linear, QuantizedLinear, Embedding, QuantizedEmbedding):
        raise ValueError(f"{type(layer).__name__} cannot be sharded by vocabulary")
    parts = {}
    for name in [n for n in ("weight", "scales", "biases", "bias") if hasattr(layer, n)]:
        a = getattr(layer, name)
        block = ops.slice(a, [lo] + [0] * (a.ndim - 1), [hi] + list(a.shape[1:]))
        if hi - lo < rows:
            block = ops.concatenate([block, ops.zeros((rows - hi + lo, *a.shape[1:]), a.dtype)], axis=0)
        parts[name] = ops.contiguous(block)
    ops.eval(*parts.values())
    if "scales" in parts:
        return QuantizedLinear(parts["weight"], parts["scales"], parts["biases"], layer._group_size,
                               layer._bits, bias=parts.get("bias"))
    return Linear(parts["weight"], parts.get("bias"))


class AllSum(Module):
    """A row-parallel layer followed by the sum of its output over the ranks
    (`reduce`: the group's all_sum): Megatron's one collective per block half."""

    def __init__(self, layer: Module, reduce):
        self.layer = layer
        self._reduce = reduce

    def __call__(self, x: Array) -> Array:
        return self._reduce(self.layer(x))

    @property
    def out_features(self) -> int:
        return self.layer.out_features


class QuantizedLinear(Module):
    """A linear layer in MLX's affine quantized format (mlx-community checkpoints)."""

    def __init__(self, weight: Array, scales: Array, biases: Array, group_size: int, bits: int,
                 bias: Array | None = None):
        self.weight, self.scales, self.biases = weight, scales, biases
        self._group_size, self._bits = group_size, bits
        if bias is not None:
            self.bias = bias

    def __call__(self, x: Array) -> Array:
        return linear(x, self, quantized=True)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def derived_arrays(self) -> list[Array]:
        # (none unless AMLX_QMM_SPLIT=copy on CUDA; nor for a layer that a fused one computes)
        return [] if self.__dict__.get("_fused_member") else qmm_split.derived(self)

    def dequantized_weight(self) -> Array:
        return ops.dequantize(self.weight, self.scales, self.biases, self._group_size, self._bits)


class Embedding(Module):
    def __init__(self, weight: Array):
        self.weight = weight

    def __call__(self, ids: Array) -> Array:
        return ops.take(self.weight, ids, 0)

    def as_linear(self, x: Array) -> Array:
        """Tied output projection: x @ E^T."""
        y = few_rows(x, self)
        if y is not None:
            return y
        return dense(x, weight_t(self), None, self.__dict__.get("_split"))

    def derived_arrays(self) -> list[Array]:
        return [weight_t(self)]


class QuantizedEmbedding(Module):
    def __init__(self, weight: Array, scales: Array, biases: Array, group_size: int, bits: int):
        self.weight, self.scales, self.biases = weight, scales, biases
        self._group_size, self._bits = group_size, bits

    def __call__(self, ids: Array) -> Array:
        return ops.dequantize(ops.take(self.weight, ids, 0), ops.take(self.scales, ids, 0),
                              ops.take(self.biases, ids, 0), self._group_size, self._bits)

    def as_linear(self, x: Array) -> Array:
        return quantized_dense(x, self)


# layers that take a MatmulSplit (see split_layers)
_SPLITTABLE = (Linear, QuantizedLinear, Embedding, QuantizedEmbedding)


class RMSNorm(Module):
    def __init__(self, weight: Array, eps: float):
        self.weight = weight
        self._eps = eps

    def __call__(self, x: Array) -> Array:
        return fast.rms_norm(x, self.norm_weight(), self._eps)

    def norm_weight(self) -> Array:
        """The array the normalised values are multiplied by."""
        return self.weight

    @property
    def eps(self) -> float:
        return self._eps
