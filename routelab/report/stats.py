"""Statistics over seeds: a mean with its 95% confidence interval, the paired difference of a variant
to the reference, and the verdict a reader may draw from it.

A comparison trains every variant with seeds 0..N-1; seed s gives every variant the same
initialisation stream and the same batches, so the per-seed differences ``d_s = x_s - r_s`` of a
variant's metric ``x`` to the reference's ``r`` are paired observations (Student 1908; e.g. Dror et
al. 2018, "The Hitchhiker's Guide to Testing Statistical Significance in NLP"). The interval of a
mean of n values is

    mean +- t_{0.975, n-1} * s / sqrt(n)          (s: the sample standard deviation, ddof = 1)

and a difference whose interval excludes 0 is reported as better or worse; one whose interval holds
0 as "no detectable difference" at this budget. With one seed there is no interval and no verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Student's t quantile t_{0.975, df}: the two-sided 95% critical value, df = 1..30, then a few more
# (printed tables, e.g. Abramowitz & Stegun 1964, table 26.10); between listed df it is interpolated
# in 1/df: within 1e-4 of the exact quantile for every df (tests/report/test_stats.py)
_T975 = {
    1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.3060, 9: 2.2622, 10: 2.2281,
    11: 2.2010, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314, 16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.0930,
    20: 2.0860, 21: 2.0796, 22: 2.0739, 23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484,
    29: 2.0452, 30: 2.0423, 40: 2.0211, 60: 2.0003, 120: 1.9799,
}
_Z975 = 1.959964  # the normal quantile: df -> infinity

BETTER, WORSE, SAME, ONE_SEED = "better", "worse", "no detectable difference", "one seed: not judged"


def t_quantile_975(df: int) -> float:
    """t_{0.975, df} for df >= 1 (the table above; beyond 120, interpolated towards the normal's)."""
    if df < 1:
        raise ValueError(f"df={df} is invalid; allowed: 1 or more")
    if df in _T975:
        return _T975[df]
    keys = sorted(_T975)
    lo = max(k for k in keys if k < df)
    hi = min((k for k in keys if k > df), default=None)
    x_lo, y_lo = 1 / lo, _T975[lo]
    x_hi, y_hi = (1 / hi, _T975[hi]) if hi is not None else (0.0, _Z975)
    return y_lo + (1 / df - x_lo) * (y_hi - y_lo) / (x_hi - x_lo)


@dataclass(frozen=True)
class Estimate:
    """The mean of ``n`` values and the half-width of its 95% interval (None with one value)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width

    def format(self, spec: str = "{:.4f}") -> str:
        """``1.8065 ± 0.0123`` (or the mean alone with one value)."""
        text = spec.format(self.mean)
        return text if self.half_width is None else f"{text} ± {spec.format(self.half_width)}"


def mean_interval(values: Sequence[float]) -> Estimate:
    """Mean and 95% t-interval half-width of ``values`` (at least one)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values: at least one seed is needed")
    mean = math.fsum(values) / n
    if n == 1:
        return Estimate(mean, None, 1)
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean, t_quantile_975(n - 1) * sd / math.sqrt(n), n)


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> Estimate | None:
    """Mean and interval of ``values[s] - reference[s]`` over the seeds both have (None if none)."""
    seeds = sorted(set(values) & set(reference))
    return mean_interval([values[s] - reference[s] for s in seeds]) if seeds else None


def verdict(diff: Estimate | None, lower_is_better: bool = True) -> str | None:
    """``better`` / ``worse`` when the difference's interval excludes 0, ``no detectable difference``
    when it holds 0, ``one seed: not judged`` without an interval; None without a difference."""
    if diff is None:
        return None
    if diff.half_width is None:
        return ONE_SEED
    if diff.low <= 0.0 <= diff.high:
        return SAME
    improved = diff.mean < 0 if lower_is_better else diff.mean > 0
    return BETTER if improved else WORSE
