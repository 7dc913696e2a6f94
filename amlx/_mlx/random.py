"""Random numbers from MLX's counter-based generator. `key=None` uses MLX's global key."""

from __future__ import annotations

from amlx._mlx import dtypes as _dt
from amlx._mlx._lib import check, lib
from amlx._mlx.array import Array, _call, array
from amlx._mlx.ops import _int_arr


def _key(key: Array | None):
    return 0 if key is None else key.handle


def seed(s: int) -> None:
    check(lib.mlxc_random_seed(int(s)), "random.seed")


def key(s: int) -> Array:
    return _call(lib.mlxc_random_key, "random.key", int(s))


def split(k: Array, num: int = 2) -> Array:
    """`num` new keys stacked along axis 0."""
    return _call(lib.mlxc_random_split, "random.split", k.handle, int(num))


def uniform(low=0.0, high=1.0, shape=(), dtype=_dt.float32, key: Array | None = None) -> Array:
    dt = _dt.as_dtype(dtype)
    s, n = _int_arr(shape)
    lo, hi = array(low, dt), array(high, dt)  # kept alive across the call
    return _call(lib.mlxc_random_uniform, "random.uniform", lo.handle, hi.handle, s, n, dt.code, _key(key))


def normal(shape=(), dtype=_dt.float32, loc: float = 0.0, scale: float = 1.0, key: Array | None = None) -> Array:
    s, n = _int_arr(shape)
    return _call(lib.mlxc_random_normal, "random.normal", s, n, _dt.as_dtype(dtype).code, float(loc),
                 float(scale), _key(key))


def randint(low, high, shape=(), dtype=_dt.int32, key: Array | None = None) -> Array:
    dt = _dt.as_dtype(dtype)
    s, n = _int_arr(shape)
    lo, hi = array(low, dt), array(high, dt)  # kept alive across the call
    return _call(lib.mlxc_random_randint, "random.randint", lo.handle, hi.handle, s, n, dt.code, _key(key))


def categorical(logits: Array, axis: int = -1, num_samples: int | None = None, key: Array | None = None) -> Array:
    """Samples indices with probabilities softmax(logits) along `axis`."""
    return _call(lib.mlxc_random_categorical, "random.categorical", logits.handle, int(axis),
                 int(num_samples or 0), _key(key))


def gumbel(shape=(), dtype=_dt.float32, key: Array | None = None) -> Array:
    s, n = _int_arr(shape)
    return _call(lib.mlxc_random_gumbel, "random.gumbel", s, n, _dt.as_dtype(dtype).code, _key(key))
