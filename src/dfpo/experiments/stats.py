"""Small-sample statistics for results over a few seeds: Student-t intervals and paired differences.

Pure Python (``math`` only): the t quantile is found by bisection on the t distribution's CDF, which is the
regularised incomplete beta function evaluated with its continued fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz), converges for x < (a+1)/(a+b+2)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """CDF of Student's t distribution with ``df`` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``t_quantile(0.975, 2)`` = 4.303)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return 0.5 * (low + high)


def fixed(value: float, digits: int = 1, sign: bool = False) -> str:
    """``value`` with ``digits`` decimals (and its sign, with ``sign``), first rounded to 9 so that a mean's float
    noise (24.250000000000004 against 24.25) cannot print two equal values differently."""
    return f"{round(value, 9):{'+' if sign else ''}.{digits}f}"


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with the half-width of its two-sided ``level`` Student-t interval (nan for n < 2)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def show(self, scale: float = 100.0, digits: int = 1) -> str:
        """``"61.2 ± 3.4"`` (values times ``scale``); the interval is left out when it cannot be computed."""
        if self.n == 0:
            return "-"
        if math.isnan(self.half_width):
            return fixed(self.mean * scale, digits)
        return f"{fixed(self.mean * scale, digits)} ± {fixed(self.half_width * scale, digits)}"


def mean_interval(values: list[float], level: float = 0.95) -> Interval:
    """The mean and its Student-t confidence interval over independent values (seeds)."""
    n = len(values)
    if n == 0:
        return Interval(float("nan"), float("nan"), 0)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, float("nan"), n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n), n)


@dataclass(frozen=True)
class Paired:
    """``a - b`` over matched pairs: the mean difference with its interval, and how many pairs ``a`` won, tied
    (equal to ``tie`` or closer) and lost."""

    difference: Interval
    wins: int
    ties: int
    losses: int


def paired(a: list[float], b: list[float], level: float = 0.95, tie: float = 0.0) -> Paired:
    """Paired comparison of two equally long lists matched by position (same seed, noise and domain)."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison needs lists of equal length, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    return Paired(
        mean_interval(diffs, level),
        wins=sum(d > tie for d in diffs),
        ties=sum(abs(d) <= tie for d in diffs),
        losses=sum(d < -tie for d in diffs),
    )
