"""Statistics for the sampling tests' distribution checks."""

from __future__ import annotations

import math


def chi2_sf(stat: float, df: int) -> float:
    """P(chi2_df >= stat): the regularized upper incomplete gamma Q(df/2, stat/2) by its series."""
    s, z = df / 2.0, stat / 2.0
    if z <= 0:
        return 1.0
    term = total = 1.0 / s
    n = 1
    while term > total * 1e-17:
        term *= z / (s + n)
        total += term
        n += 1
    return max(0.0, 1.0 - total * math.exp(-z + s * math.log(z) - math.lgamma(s)))
