"""Rotary embedding frequencies for each rope type a config may name.

Pure numpy, computed once per model: `base.RoPE` turns them into what MLX's
rope kernel and the decode kernels take. Each function equals the one of the
same rope type in transformers' ``modeling_rope_utils`` (the tests compare).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = ["ROPE_TYPES", "default_inv_freqs", "llama3_inv_freqs", "yarn_inv_freqs", "yarn_attention_factor"]

# rope types amlx runs (normalised configs name one of these, or None for "default")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def default_inv_freqs(head_dim: int, base: float) -> np.ndarray:
    """Inverse frequency of each rotated pair, float64 of shape [head_dim // 2]."""
    return 1.0 / (float(base) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def llama3_inv_freqs(head_dim: int, base: float, scaling: Mapping) -> np.ndarray:
    """Llama 3.1-style scaled inverse frequencies, float32 of shape [head_dim // 2].

    ``scaling`` holds factor, low_freq_factor, high_freq_factor and
    original_max_position_embeddings. Long wavelengths are slowed down by
    ``factor``, short ones kept, the band between blended."""
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    inv = default_inv_freqs(head_dim, base)
    wavelen = 2 * math.pi / inv
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv / factor + smooth * inv
    out = np.where(wavelen > old_len / low, inv / factor, inv)
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, blended, out).astype(np.float32)


def yarn_inv_freqs(head_dim: int, base: float, scaling: Mapping) -> np.ndarray:
    """YaRN inverse frequencies, float32 of shape [head_dim // 2]: pairs that turn
    many times over the original context keep their frequency (extrapolation),
    slow ones are divided by ``factor`` (interpolation), with a linear ramp
    between the ``beta_fast`` and ``beta_slow`` rotation counts."""
    factor = float(scaling["factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    # transformers computes these in float32; so do we, to match it bit for bit
    pos = (float(base) ** (np.arange(0, head_dim, 2).astype(np.float32) / np.float32(head_dim))).astype(np.float32)
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = (1 - ramp).astype(np.float32)
    inv = (1.0 / (factor * pos)) * (1 - extrapolation) + (1.0 / pos) * extrapolation
    return inv.astype(np.float32)


def yarn_attention_factor(scaling: Mapping) -> float:
    """The factor YaRN multiplies cos and sin by (so queries and keys both):
    ``attention_factor`` when given, else from ``factor`` (and ``mscale`` /
    ``mscale_all_dim`` when both are set)."""
    given = scaling.get("attention_factor")
    if given is not None:
        return float(given)
    factor = float(scaling["factor"])

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return mscale(float(m)) / mscale(float(m_all))
    return mscale()
