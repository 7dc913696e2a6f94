"""Minimal neural-network modules over the array layer.

A `Module` holds arrays and sub-modules as attributes; parameters are named by
their dotted path, which matches the Hugging Face tensor names of the
checkpoint (``model.layers.0.self_attn.q_proj.weight``), so loading is a walk
over the checkpoint's names.
"""

from __future__ import annotations

from typing import Iterator

from amlx._mlx import Array, fast, ops


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
        owner, leaf = self._resolve(path)
        if isinstance(owner, list):
            owner[int(leaf)] = module
        else:
            setattr(owner, leaf, module)

    def update(self, params: dict[str, Array]) -> None:
        """Replaces parameters by dotted name (e.g. with trained values)."""
        for path, value in params.items():
            self.set_parameter(path, value)


class Linear(Module):
    """y = x W^T (+ b), W stored (out, in) as in the checkpoint."""

    def __init__(self, weight: Array, bias: Array | None = None):
        self.weight = weight
        if bias is not None:
            self.bias = bias

    def __call__(self, x: Array) -> Array:
        bias = getattr(self, "bias", None)
        if bias is not None:
            return ops.addmm(bias, x, ops.transpose(self.weight))
        return x @ ops.transpose(self.weight)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]


class QuantizedLinear(Module):
    """A linear layer in MLX's affine quantized format (mlx-community checkpoints)."""

    def __init__(self, weight: Array, scales: Array, biases: Array, group_size: int, bits: int,
                 bias: Array | None = None):
        self.weight, self.scales, self.biases = weight, scales, biases
        self._group_size, self._bits = group_size, bits
        if bias is not None:
            self.bias = bias

    def __call__(self, x: Array) -> Array:
        y = ops.quantized_matmul(x, self.weight, self.scales, self.biases, True, self._group_size, self._bits)
        bias = getattr(self, "bias", None)
        return y + bias if bias is not None else y

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dequantized_weight(self) -> Array:
        return ops.dequantize(self.weight, self.scales, self.biases, self._group_size, self._bits)


class Embedding(Module):
    def __init__(self, weight: Array):
        self.weight = weight

    def __call__(self, ids: Array) -> Array:
        return ops.take(self.weight, ids, 0)

    def as_linear(self, x: Array) -> Array:
        """Tied output projection: x @ E^T."""
        return x @ ops.transpose(self.weight)


class QuantizedEmbedding(Module):
    def __init__(self, weight: Array, scales: Array, biases: Array, group_size: int, bits: int):
        self.weight, self.scales, self.biases = weight, scales, biases
        self._group_size, self._bits = group_size, bits

    def __call__(self, ids: Array) -> Array:
        return ops.dequantize(ops.take(self.weight, ids, 0), ops.take(self.scales, ids, 0),
                              ops.take(self.biases, ids, 0), self._group_size, self._bits)

    def as_linear(self, x: Array) -> Array:
        return ops.quantized_matmul(x, self.weight, self.scales, self.biases, True, self._group_size, self._bits)


class RMSNorm(Module):
    def __init__(self, weight: Array, eps: float):
        self.weight = weight
        self._eps = eps

    def __call__(self, x: Array) -> Array:
        return fast.rms_norm(x, self.weight, self._eps)
