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
    """a[index] with numpy's semantics.

    Index arrays (and, next to one, plain ints) are advanced indices: they
    broadcast together to one block of dimensions, which takes the place of the
    first of them when they are adjacent and otherwise comes first, as in numpy."""
    shape = a.shape
    items = _expand(index, len(shape))
    has_array = any(isinstance(i, Array) for i in items)
    starts, stops, steps = [], [], []
    gathers = []  # (axis, positions): negative-step slices, applied after the static slice
    squeezes = []  # axes indexed by a plain int (without index arrays)
    advanced = []  # (axis, Array or int): index arrays, and ints when there are index arrays
    layout = []  # the result's dims in index order: ("axis", ax) | ("new",) | ("adv",)
    axis = 0
    for it in items:
        if it is None:
            layout.append(("new",))
            continue
        n = shape[axis]
        if isinstance(it, slice):
            start, stop, step = it.indices(n)
            if step > 0:
                starts.append(start), stops.append(max(stop, start)), steps.append(step)
            else:
                # Negative steps gather explicit positions: MLX slices only count up.
                starts.append(0), stops.append(n), steps.append(1)
                gathers.append((axis, list(range(start, stop, step))))
            layout.append(("axis", axis))
        elif isinstance(it, Array):
            starts.append(0), stops.append(n), steps.append(1)
            advanced.append((axis, it))
            layout.append(("adv",))
        elif isinstance(it, numbers.Integral):
            i = int(it)
            if not -n <= i < n:
                raise IndexError(f"index {i} is out of bounds for axis {axis} with size {n}")
            i %= n
            if has_array:
                starts.append(0), stops.append(n), steps.append(1)
                advanced.append((axis, i))
                layout.append(("adv",))
            else:
                starts.append(i), stops.append(i + 1), steps.append(1)
                squeezes.append(axis)
        else:
            raise IndexError(f"unsupported index {it!r}")
        axis += 1
    out = a
    if any(s != 0 for s in starts) or stops != list(shape) or any(s != 1 for s in steps):
        out = ops.slice(a, starts, stops, steps)
    out = _gather_positions(out, gathers)
    if not advanced:
        if squeezes:
            out = ops.squeeze(out, squeezes)
        new_axes = [k for k, d in enumerate(layout) if d[0] == "new"]
        return ops.expand_dims(out, new_axes) if new_axes else out
    # Adjacency counts in the index as written: an Ellipsis between two
    # advanced indices separates them even where it stands for no axis.
    written = index if isinstance(index, tuple) else (index,)
    pos = [k for k, it in enumerate(written) if isinstance(it, (Array, numbers.Integral))]
    return _advanced(out, advanced, layout, pos == list(range(pos[0], pos[0] + len(pos))))


def _gather_positions(out: Array, gathers: list) -> Array:
    """Takes the listed positions along each axis (negative-step slices)."""
    for ax, positions in gathers:
        if not positions:
            s = list(out.shape)
            s[ax] = 0
            out = ops.zeros(s, out.dtype)
        else:
            out = ops.take(out, ops.array(positions), ax)
    return out


def _advanced(out: Array, advanced: list, layout: list, adjacent: bool) -> Array:
    shape = out.shape
    adv_axes = [ax for ax, _ in advanced]
    rest = [ax for ax in range(len(shape)) if ax not in adv_axes]
    if len(advanced) == 1:
        (ax, idx), = advanced
        # One index array: a gather along its axis, then its dims moved into place.
        out = ops.take(out, idx, ax)
        if adjacent and not any(d[0] == "new" for d in layout):
            return out  # already in place
        nb = idx.ndim
        out = ops.transpose(out, list(range(ax, ax + nb)) + list(range(ax)) +
                            list(range(ax + nb, out.ndim))) if ax else out
    else:
        # Several: one gather over the advanced axes flattened, with their
        # indices (broadcast together) turned into one linear index.
        linear = None
        stride = 1
        for ax, idx in reversed(advanced):
            n = shape[ax]
            if isinstance(idx, Array):
                idx = ops.where(ops.less(idx, 0), ops.add(idx, n), idx)
            term = ops.multiply(idx, stride) if stride != 1 else idx
            linear = term if linear is None else ops.add(linear, term)
            stride *= n
        linear = _as_index(linear)
        out = ops.transpose(out, adv_axes + rest)
        out = ops.reshape(out, [stride] + [shape[ax] for ax in rest])
        out = ops.take(out, linear, 0)
        nb = linear.ndim
    # `out` is now (broadcast block, rest axes in order); add the new axes at the end and permute.
    n_new = sum(1 for d in layout if d[0] == "new")
    if n_new:
        out = ops.expand_dims(out, list(range(out.ndim, out.ndim + n_new)))
    block = list(range(nb))
    rest_pos = iter(range(nb, nb + len(rest)))
    new_pos = iter(range(nb + len(rest), nb + len(rest) + n_new))
    perm = [] if adjacent else list(block)
    for d in layout:
        if d[0] == "axis":
            perm.append(next(rest_pos))
        elif d[0] == "new":
            perm.append(next(new_pos))
        elif adjacent and (not block or block[0] not in perm):
            perm.extend(block)
    return ops.transpose(out, perm) if perm != list(range(len(perm))) else out


def _as_index(x) -> Array:
    return x if isinstance(x, Array) else ops.array(x)
