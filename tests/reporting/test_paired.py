"""Paired differences on hand-computed cases: the t-interval, the exact signed-rank p-value, the detectable size."""

import itertools
import math

import pytest

from fedexperts.reporting import paired_difference

T_975_4 = 2.7764451  # Student t, 97.5% quantile, 4 degrees of freedom (tables)
T_80_4 = 0.9409646  # Student t, 80% quantile, 4 degrees of freedom (tables)


def _exact_signed_rank_p(values):
    """Two-sided exact p of Wilcoxon's signed-rank statistic by enumerating every sign assignment (no ties)."""
    ranks = {abs(value): rank for rank, value in enumerate(sorted(values, key=abs), start=1)}
    observed = sum(ranks[abs(value)] for value in values if value > 0)
    total = len(values) * (len(values) + 1) / 2
    extreme = min(observed, total - observed)
    count = 0
    for signs in itertools.product((0, 1), repeat=len(values)):
        positive = sum(rank for rank, sign in zip(range(1, len(values) + 1), signs, strict=True) if sign)
        count += min(positive, total - positive) <= extreme
    return count / 2 ** len(values)


def test_all_positive_differences_over_five_seeds_by_hand():
    result = paired_difference(range(5), [1.0, 2.0, 3.0, 4.0, 5.0])
    assert result.mean == pytest.approx(3.0)
    deviation = math.sqrt(2.5)  # sample standard deviation of 1..5
    assert result.ci == pytest.approx(T_975_4 * deviation / math.sqrt(5), rel=1e-6)
    assert result.interval == pytest.approx((3.0 - result.ci, 3.0 + result.ci))
    # every sign positive: only the all-positive and all-negative assignments are as extreme, 2 of 32
    assert result.p_value == pytest.approx(2 / 32)
    assert result.smallest_p == pytest.approx(0.0625)
    assert result.detectable == pytest.approx((T_975_4 + T_80_4) * deviation / math.sqrt(5), rel=1e-6)
    assert result.excludes_zero


def test_mixed_signs_match_the_enumerated_exact_p_value():
    values = [0.12, -0.05, 0.31, 0.08, -0.21, 0.27]
    result = paired_difference(range(6), values)
    assert result.p_value == pytest.approx(_exact_signed_rank_p(values), rel=1e-9)
    assert result.mean == pytest.approx(sum(values) / 6)
    assert not result.excludes_zero  # the interval crosses 0 for these spreads


def test_no_difference_at_all_has_p_one_and_a_zero_width_interval():
    result = paired_difference((0, 1, 2), [0.0, 0.0, 0.0])
    assert result.mean == 0.0 and result.ci == 0.0 and result.p_value == 1.0 and result.detectable == 0.0
    assert not result.excludes_zero


def test_below_two_seeds_nothing_is_inferred():
    one = paired_difference((3,), [0.1])
    assert one.mean == 0.1 and one.ci is None and one.p_value is None and one.detectable is None
    assert one.interval is None and one.smallest_p is None and not one.excludes_zero
    none = paired_difference((), [])
    assert none.mean is None and none.n == 0
