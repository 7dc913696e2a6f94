"""Function transformations over Python functions of arrays: grad, value_and_grad, vjp, compile.

Functions may take and return pytrees: arrays nested in lists, tuples and dicts.
MLX calls the Python function back through one cffi trampoline; an exception
raised inside it aborts the transformation and is re-raised (as the cause of an
MLXError) to the caller.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

from amlx._mlx._lib import check, error, ffi, lib, set_pending
from amlx._mlx.array import Array, _call
from amlx._mlx.ops import _Vec, _handle_array


# -- pytrees ---------------------------------------------------------------

def tree_flatten(tree) -> tuple[list[Array], Any]:
    """Flattens nested lists/tuples/dicts of arrays: (leaves, structure)."""
    leaves: list[Array] = []
    return leaves, _flatten(tree, leaves)


# Module-level recursion: a nested recursive function is a reference cycle
# (it holds itself through its closure), which would keep every leaf array
# alive until the garbage collector runs.
def _flatten(t, leaves: list[Array]):
    if isinstance(t, Array):
        leaves.append(t)
        return None
    if isinstance(t, dict):
        return ("dict", [(k, _flatten(v, leaves)) for k, v in t.items()])
    if isinstance(t, (list, tuple)):
        return (type(t).__name__, [_flatten(v, leaves) for v in t])
    if t is None or isinstance(t, (numbers.Number, str)):
        return ("const", t)
    raise TypeError(f"expected arrays (or lists, tuples, dicts of arrays), got {type(t).__name__}")


def tree_unflatten(structure, leaves) -> Any:
    return _build(structure, iter(leaves))


def _build(s, it):
    if s is None:
        return next(it)
    kind, body = s
    if kind == "dict":
        return {k: _build(v, it) for k, v in body}
    if kind == "const":
        return body
    items = [_build(v, it) for v in body]
    return tuple(items) if kind == "tuple" else items


# -- the trampoline ----------------------------------------------------------

@ffi.def_extern()
def amlx_call_python(payload, inputs, outputs):
    try:
        fn = ffi.from_handle(payload)
        args = [_call(lib.mlxc_vec_get, "vec", inputs, i) for i in range(lib.mlxc_vec_size(inputs))]
        for r in fn(args):
            if lib.mlxc_vec_push(outputs, r.handle):
                raise error("vec")
        return 0
    except BaseException as exc:  # noqa: BLE001 - handed back to the caller
        set_pending(exc)
        return 1


class _Flat:
    """Adapts a pytree function to the flat list-of-arrays form MLX calls."""

    def __init__(self, fn: Callable, in_structure):
        self.fn = fn
        self.in_structure = in_structure
        self.out_structure = None

    def __call__(self, flat_args: list[Array]) -> list[Array]:
        args = tree_unflatten(self.in_structure, flat_args)
        result = self.fn(*args)
        leaves, self.out_structure = tree_flatten(result)
        return leaves


# -- value_and_grad / grad / vjp --------------------------------------------

def value_and_grad(fn: Callable, argnums: int | tuple[int, ...] = 0) -> Callable:
    """Returns f(*args) -> (value, grads).

    `fn` returns a scalar array, or a tuple whose first element is the scalar to
    differentiate (the rest rides along as in MLX). `grads` mirrors
    args[argnums] (a tuple of them when argnums is a tuple); args may be pytrees."""
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)

    def checked(*args):
        # MLX differentiates the first output; without an array there it would
        # silently return zero gradients.
        out = fn(*args)
        head = out[0] if isinstance(out, (tuple, list)) and out else out
        if not isinstance(head, Array):
            raise TypeError("the function given to value_and_grad must return a scalar array, or a tuple "
                            f"whose first element is one; it returned {type(out).__name__}")
        return out

    def wrapped(*args):
        leaves, structure = tree_flatten(args)
        # Flat leaf positions of each differentiated argument.
        spans, pos = [], 0
        for i, a in enumerate(args):
            n = len(tree_flatten(a)[0])
            spans.append((pos, pos + n))
            pos += n
        for i in nums:
            if not 0 <= i < len(args):
                raise ValueError(f"argnums {i} is out of range for {len(args)} arguments")
        flat_nums = [j for i in nums for j in range(*spans[i])]
        flat = _Flat(checked, structure)
        handle = ffi.new_handle(flat)
        with _Vec(leaves) as vin, _Vec() as vals, _Vec() as grads:
            argn = ffi.new("int[]", flat_nums or [0])
            check(lib.mlxc_value_and_grad(lib.amlx_call_python, handle, vin.h, argn, len(flat_nums), vals.h,
                                          grads.h), "value_and_grad")
            values = tree_unflatten(flat.out_structure, vals.arrays())
            g = grads.arrays()
        grad_trees, k = [], 0
        for i in nums:
            n = spans[i][1] - spans[i][0]
            grad_trees.append(tree_unflatten(tree_flatten(args[i])[1], g[k:k + n]))
            k += n
        return values, (grad_trees[0] if single else tuple(grad_trees))

    return wrapped


def grad(fn: Callable, argnums: int | tuple[int, ...] = 0) -> Callable:
    """Returns f(*args) -> grads of fn's scalar output (see value_and_grad)."""
    vg = value_and_grad(fn, argnums)
    return lambda *args: vg(*args)[1]


def vjp(fn: Callable, primals: list[Array], cotangents: list[Array]) -> tuple[list[Array], list[Array]]:
    """(fn(*primals) as a list, the vector-Jacobian products for each primal)."""

    def flat_fn(args):
        out = fn(*args)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    handle = ffi.new_handle(flat_fn)
    with _Vec(primals) as p, _Vec(cotangents) as c, _Vec() as outs, _Vec() as vjps:
        check(lib.mlxc_vjp(lib.amlx_call_python, handle, p.h, c.h, outs.h, vjps.h), "vjp")
        return outs.arrays(), vjps.arrays()


# -- compile -------------------------------------------------------------------

class Compiled:
    """A compiled function: traced once per input shape/dtype signature, then
    replayed without calling Python. `close()` drops MLX's cached graphs."""

    def __init__(self, fn: Callable, shapeless: bool = False):
        self._fn = fn
        self._flat = None
        self._in_structure = None
        self._handle = None
        self._closure = None
        self._shapeless = shapeless

    def _build(self, structure):
        self._flat = _Flat(self._fn, structure)
        self._in_structure = structure
        self._handle = ffi.new_handle(self._flat)
        out = ffi.new("mlxc_closure*")
        check(lib.mlxc_compile(lib.amlx_call_python, self._handle, int(self._shapeless), out), "compile")
        self._closure = out[0]

    def __call__(self, *args):
        leaves, structure = tree_flatten(args)
        if self._closure is None:
            self._build(structure)
        elif structure != self._in_structure:
            raise TypeError("a compiled function must be called with the same argument structure each time")
        # the inputs as one array of handles and the outputs taken in one call: a C call per
        # array each way was most of a call's cost (a decode step: ~60 in, ~30 out)
        with _Vec() as vout:
            check(lib.mlxc_closure_call(self._closure, _handle_array(leaves), len(leaves), vout.h), "compile")
            return tree_unflatten(self._flat.out_structure, vout.arrays())

    def close(self) -> None:
        if self._closure is not None:
            lib.mlxc_closure_free(self._closure)
            self._closure = None
            self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def compile(fn: Callable, shapeless: bool = False) -> Compiled:
    """Compiles a function of arrays (pytrees allowed) into a replayable graph."""
    return Compiled(fn, shapeless)
