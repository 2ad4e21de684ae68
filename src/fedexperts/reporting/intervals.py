"""Estimates over seeds: a metric's mean and 95% Student-t interval, and the paired difference of two methods.

A seed is one sample. The interval's half-width is ``t(0.975, n - 1) * s / sqrt(n)`` with ``s`` the sample
standard deviation (``ddof=1``); with one seed it is undefined (``None``), never zero.

Paired differences between two methods over the seeds both ran are the quantity that tells methods apart.

Every method of a study runs on the same data, partition and client sampling for a given seed, so
the per-seed difference removes the seeds' shared swing; its interval is usually far narrower than
the two per-method intervals. For differences ``d_1 .. d_n`` this module reports:

- the mean and the two-sided 95% Student-t interval half-width ``t(0.975, n-1) * s_d / sqrt(n)``;
- the two-sided Wilcoxon signed-rank p-value (scipy's ``wilcoxon``: exact below 50 seeds without
  ties, zeros dropped as Wilcoxon's own method does; all differences zero gives p = 1). Its smallest
  possible value is ``2 / 2**n``: with 5 seeds it can never go below 0.0625, which the report says;
- the smallest difference the seeds could have detected: the paired t-test's minimum detectable
  effect at alpha 0.05 (two-sided) and 80% power for the spread observed,
  ``(t(0.975, n-1) + t(0.80, n-1)) * s_d / sqrt(n)`` (the usual noncentral approximation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
POWER = 0.80


@dataclass(frozen=True)
class Estimate:
    """A metric over seeds: the values, their mean and the CI half-width (``None`` below two values)."""

    values: tuple[float, ...]
    mean: float | None
    ci: float | None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.mean is None or self.ci is None:
            return None
        return self.mean - self.ci, self.mean + self.ci


def estimate(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """Mean and two-sided Student-t CI half-width of ``values`` (a small sample of seeds)."""
    from scipy.stats import t

    sample = tuple(float(value) for value in values)
    n = len(sample)
    if n == 0:
        return Estimate(sample, None, None)
    mean = math.fsum(sample) / n
    if n == 1:
        return Estimate(sample, mean, None)
    deviation = math.sqrt(math.fsum((value - mean) ** 2 for value in sample) / (n - 1))
    quantile = float(t.ppf(0.5 + confidence / 2, n - 1))
    return Estimate(sample, mean, quantile * deviation / math.sqrt(n))


@dataclass(frozen=True)
class PairedDifference(Estimate):
    """Per-seed differences ``first - second`` of one metric (``values``, in ``seeds`` order) and what they show."""

    seeds: tuple[int, ...] = ()
    p_value: float | None = None
    """Two-sided Wilcoxon signed-rank p-value (``None`` below two seeds)."""
    detectable: float | None = None
    """Smallest difference detectable at alpha 0.05 with 80% power for this spread (``None`` below two seeds)."""

    @property
    def smallest_p(self) -> float | None:
        """The smallest two-sided p-value the signed-rank test can give at this many seeds."""
        return None if self.n < 2 else 2.0 / 2.0**self.n

    @property
    def excludes_zero(self) -> bool:
        interval = self.interval
        return interval is not None and (interval[0] > 0 or interval[1] < 0)


def paired_difference(seeds: Sequence[int], values: Sequence[float]) -> PairedDifference:
    """Mean, t-interval, signed-rank p-value and detectable difference of per-seed differences."""
    from scipy.stats import t, wilcoxon

    base = estimate(values)
    if base.ci is None:
        return PairedDifference(base.values, base.mean, None, tuple(seeds))
    n = base.n
    if all(value == 0 for value in base.values):
        p_value = 1.0
    else:
        p_value = float(wilcoxon(base.values, zero_method="wilcox", alternative="two-sided").pvalue)
    critical = float(t.ppf(0.5 + CONFIDENCE / 2, n - 1))
    detectable = base.ci * (critical + float(t.ppf(POWER, n - 1))) / critical
    return PairedDifference(base.values, base.mean, base.ci, tuple(seeds), p_value, detectable)
