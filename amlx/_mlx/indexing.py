"""Basic indexing of arrays: ints, slices (any step), None, Ellipsis, index arrays."""

from __future__ import annotations

import numbers

from amlx._mlx import ops
from amlx._mlx.array import Array


def _expand(index, ndim: int) -> list:
    if not isinstance(index, tuple):
        index = (index,)
    n_ellipsis = sum(1 for i in index if i is Ellipsis)
    if n_ellipsis > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    if consumed > ndim:
        raise IndexError(f"too many indices: {consumed} for an array of {ndim} dimensions")
    out = []
    for i in index:
        if i is Ellipsis:
            out.extend([slice(None)] * (ndim - consumed))
        else:
            out.append(i)
    if n_ellipsis == 0:
        out.extend([slice(None)] * (ndim - consumed))
    return out


def getitem(a: Array, index) -> Array:
    shape = a.shape
    items = _expand(index, len(shape))
    starts, stops, steps = [], [], []
    per_axis = []  # (axis, kind, payload) applied after the static slice
    new_axes = []  # positions of None in the final result
    axis = final = 0
    for it in items:
        if it is None:
            new_axes.append(final)
            final += 1
            continue
        n = shape[axis]
        if isinstance(it, slice):
            start, stop, step = it.indices(n)
            if step > 0:
                starts.append(start), stops.append(max(stop, start)), steps.append(step)
            else:
                # Negative steps gather explicit positions: MLX slices only count up.
                starts.append(0), stops.append(n), steps.append(1)
                per_axis.append((axis, "take", list(range(start, stop, step))))
            final += 1
        elif isinstance(it, Array):
            starts.append(0), stops.append(n), steps.append(1)
            per_axis.append((axis, "take", it))
            final += it.ndim
        elif isinstance(it, numbers.Integral):
            i = int(it)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for axis {axis} with size {n}")
            i %= n
            starts.append(i), stops.append(i + 1), steps.append(1)
            per_axis.append((axis, "squeeze", None))
        else:
            raise IndexError(f"unsupported index {it!r}")
        axis += 1
    out = a
    if any(s != 0 for s in starts) or stops != list(shape) or any(s != 1 for s in steps):
        out = ops.slice(a, starts, stops, steps)
    # From the last axis to the first, so the axis numbers still to do stay valid.
    for ax, kind, payload in reversed(per_axis):
        if kind == "squeeze":
            out = ops.squeeze(out, ax)
        elif isinstance(payload, list) and not payload:
            s = list(out.shape)
            s[ax] = 0
            out = ops.zeros(s, out.dtype)
        else:
            out = ops.take(out, payload if isinstance(payload, Array) else ops.array(payload), ax)
    if new_axes:
        out = ops.expand_dims(out, new_axes)
    return out
