"""Paired-seed statistics: mean ± sd, the paired t test with its 95 % interval, Holm's step-down
adjustment, and the minimum detectable effect of a paired t test (scipy, which scikit-learn needs).

Minimum detectable effect (MDE): the smallest true mean difference that a two-sided paired t test
at level ``alpha`` with ``n`` seeds would detect with probability ``power``, taking the observed
sd of the paired differences as the true one: the ``δ`` solving
``P(|T| > t_{1-alpha/2, n-1}) = power`` for ``T ~ noncentral t(n-1, δ √n / sd)``. "No detectable
difference" with an MDE of ``m`` says: an effect of size ``m`` or more would very likely have been
seen; smaller ones could hide in the noise.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

from scipy import optimize
from scipy import stats as sps

ALPHA = 0.05
POWER = 0.8


def mean_sd(values: Sequence[float]):
    n = len(values)
    mean = sum(values) / n if n else math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan
    return mean, sd


def t_quantile(p: float, df: int) -> float:
    return float(sps.t.ppf(p, df)) if df >= 1 else math.nan


def paired_test(a: Sequence[float], b: Sequence[float], alpha: float = ALPHA) -> Dict[str, float]:
    """Mean of ``a - b`` over paired seeds, its sd, the two-sided ``1 - alpha`` t interval and p-value."""
    if len(a) != len(b):
        raise ValueError(f"paired_test: {len(a)} vs {len(b)} values")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    mean, sd = mean_sd(diffs)
    if n < 2:
        return {"n": n, "mean": mean, "sd": sd, "lo": math.nan, "hi": math.nan, "p": math.nan}
    se = sd / math.sqrt(n)
    half = t_quantile(1 - alpha / 2, n - 1) * se
    if se > 0:
        p = float(2 * sps.t.sf(abs(mean) / se, n - 1))
    else:
        p = 1.0 if mean == 0 else 0.0
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "p": p}


def holm(p_values: Sequence[float]) -> List[float]:
    """Holm-adjusted p-values (step-down, monotone, capped at 1), in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [math.nan] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def power_paired(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t test for a true mean difference ``effect``."""
    if n < 2 or not sd > 0:
        return math.nan
    df = n - 1
    crit = t_quantile(1 - alpha / 2, df)
    nc = effect * math.sqrt(n) / sd
    upper = float(sps.nct.sf(crit, df, nc))
    lower = float(sps.nct.cdf(-crit, df, nc))  # the wrong-sign rejection: negligible, and NaN far in the tail
    return upper + (lower if math.isfinite(lower) else 0.0)


def mde_paired(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect (see the module docstring); NaN below 2 seeds, 0 for sd = 0."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    se = sd / math.sqrt(n)
    hi = se
    while power_paired(hi, sd, n, alpha) < power:
        hi *= 2
    return float(optimize.brentq(lambda d: power_paired(d, sd, n, alpha) - power, 0.0, hi, xtol=1e-12 * se))
