"""Statistics over seeds (``routelab.report.stats``): intervals against hand-computed values and
scipy, paired differences, and the verdict on constructed cases."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from routelab.report.stats import (
    BETTER,
    ONE_SEED,
    SAME,
    WORSE,
    Estimate,
    mean_interval,
    paired_difference,
    t_quantile_975,
    verdict,
)


def test_interval_by_hand():
    # 1, 2, 3: mean 2, sample sd 1, t_{0.975,2} = 4.3027 -> half-width 4.3027 / sqrt(3) = 2.48417
    e = mean_interval([1.0, 2.0, 3.0])
    assert e.mean == 2.0 and e.n == 3
    assert e.half_width == pytest.approx(4.302653 / math.sqrt(3), abs=1e-4)
    assert (e.low, e.high) == pytest.approx((2.0 - 2.48416, 2.0 + 2.48416), abs=1e-4)
    assert e.format("{:.2f}") == "2.00 ± 2.48"


def test_one_value_has_no_interval():
    e = mean_interval([1.8065])
    assert e.half_width is None and e.low is None and e.format() == "1.8065"
    with pytest.raises(ValueError, match="at least one seed"):
        mean_interval([])


def test_t_quantiles_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 200), 250, 500, 1000, 10**5]:
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4), df
    with pytest.raises(ValueError):
        t_quantile_975(0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(min_value=-1e3, max_value=1e3, allow_nan=False), min_size=2, max_size=12))
def test_interval_against_scipy(values):
    stats = pytest.importorskip("scipy.stats")
    import numpy as np

    e = mean_interval(values)
    sem = stats.sem(values)
    assert e.mean == pytest.approx(np.mean(values), abs=1e-9)
    if sem > 0:
        low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sem)
        assert (e.low, e.high) == pytest.approx((low, high), rel=0, abs=1e-4 * sem + 1e-9)  # the quantile to 1e-4


def test_paired_difference_pairs_by_seed():
    variant = {0: 1.70, 1: 1.74, 2: 1.69, 3: 9.99}  # seed 3: the reference has none (not paired)
    reference = {0: 1.80, 1: 1.81, 2: 1.80}
    d = paired_difference(variant, reference)
    diffs = [-0.10, -0.07, -0.11]
    assert d.n == 3 and d.mean == pytest.approx(sum(diffs) / 3)
    assert d.half_width == pytest.approx(mean_interval(diffs).half_width)
    assert paired_difference({5: 1.0}, reference) is None


@pytest.mark.parametrize(("diff", "lower_is_better", "expected"), [
    (Estimate(-0.05, 0.01, 3), True, BETTER),  # clearly separated, lower loss
    (Estimate(0.05, 0.01, 3), True, WORSE),
    (Estimate(-0.005, 0.01, 3), True, SAME),  # the interval holds 0: overlapping
    (Estimate(0.0, 0.0, 3), True, SAME),  # identical runs
    (Estimate(0.02, 0.01, 3), False, BETTER),  # accuracy: higher is better
    (Estimate(-0.02, 0.01, 3), False, WORSE),
    (Estimate(-0.5, None, 1), True, ONE_SEED),  # one seed: nothing can be judged
])
def test_verdict(diff, lower_is_better, expected):
    assert verdict(diff, lower_is_better) == expected
    assert verdict(None) is None


def test_seed_noise_is_not_called_a_difference():
    """Variants whose seed-to-seed spread swamps a small mean shift get no verdict of better."""
    reference = {0: 1.80, 1: 1.85, 2: 1.78}
    variant = {0: 1.83, 1: 1.80, 2: 1.79}  # diffs +0.03, -0.05, +0.01
    assert verdict(paired_difference(variant, reference)) == SAME
