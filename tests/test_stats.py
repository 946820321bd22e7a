"""stats.py: the interval and verdict logic of the findings study, on inputs with known answers.

scipy is the oracle for the t distribution (test-only; stats.py does not import it).
"""
import math
import random

import pytest

import stats

scipy_stats = pytest.importorskip("scipy.stats")
scipy_special = pytest.importorskip("scipy.special")


@pytest.mark.parametrize("a,b,x", [(0.5, 0.5, 0.3), (2.0, 0.5, 0.9), (10.0, 0.5, 0.05), (1.5, 7.0, 0.6),
                                   (50.0, 0.5, 0.99)])
def test_betainc_matches_scipy(a, b, x):
    assert stats.betainc(a, b, x) == pytest.approx(scipy_special.betainc(a, b, x), abs=1e-12)


@pytest.mark.parametrize("df", [1, 2, 3, 5, 9, 29, 200])
def test_t_quantile_and_cdf_match_scipy(df):
    for p in (0.025, 0.5, 0.9, 0.975, 0.995):
        assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), abs=1e-8)
    for t in (-3.0, -0.4, 0.0, 1.1, 4.2):
        assert stats.t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), abs=1e-12)


def test_mean_ci_hand_computed_and_scipy():
    # three seeds 1, 2, 3: mean 2, s = 1, t_{2,.975} = 4.302653, half-width 4.302653 / sqrt(3) = 2.484138
    iv = stats.mean_ci([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["sd"] == pytest.approx(1.0) and iv["n"] == 3
    assert (iv["lo"], iv["hi"]) == pytest.approx((2 - 2.4841377, 2 + 2.4841377), abs=1e-6)
    xs = [0.3, 0.1, 0.7, 0.4, 0.55]
    lo, hi = scipy_stats.t.interval(0.95, len(xs) - 1, loc=sum(xs) / 5, scale=scipy_stats.sem(xs))
    iv = stats.mean_ci(xs)
    assert (iv["lo"], iv["hi"]) == pytest.approx((lo, hi), abs=1e-9)


def test_too_small_sample_gives_no_interval_and_no_verdict():
    assert stats.mean_ci([4.0]) == {"mean": 4.0, "lo": None, "hi": None, "n": 1, "sd": None}
    assert stats.verdict(stats.mean_ci([4.0])) == stats.INCONCLUSIVE
    assert stats.verdict(stats.mean_ci([])) == stats.INCONCLUSIVE
    assert stats.verdict(stats.pearson_ci([1, 2, 3], [2, 4, 7])) == stats.INCONCLUSIVE   # n < 4


def test_a_true_difference_holds_and_its_opposite_fails():
    rng = random.Random(0)
    diffs = [5.0 + rng.gauss(0, 1) for _ in range(5)]          # a gap of 5 points, noise 1
    iv = stats.mean_ci(diffs)
    assert iv["lo"] > 0
    assert stats.verdict(iv, +1) == stats.HOLDS
    assert stats.verdict(iv, -1) == stats.FAILS


def test_no_difference_is_inconclusive():
    rng = random.Random(1)
    diffs = [rng.gauss(0, 1) for _ in range(30)]
    iv = stats.mean_ci(diffs)
    assert iv["lo"] < 0 < iv["hi"]
    assert stats.verdict(iv, +1) == stats.verdict(iv, -1) == stats.INCONCLUSIVE


def test_noisy_small_difference_is_inconclusive_but_more_seeds_resolve_it():
    rng = random.Random(2)
    few = [0.5 + rng.gauss(0, 2) for _ in range(3)]
    many = [0.5 + rng.gauss(0, 2) for _ in range(2000)]
    assert stats.verdict(stats.mean_ci(few)) == stats.INCONCLUSIVE
    assert stats.verdict(stats.mean_ci(many)) == stats.HOLDS


def test_paired_bootstrap_known_answers_and_determinism():
    b = [0, 1, 0, 1, 1, 0, 0, 1] * 10
    a = [x + 0.1 for x in b]                                  # a constant gap: the interval is a point
    iv = stats.paired_bootstrap(a, b, n_boot=500, seed=3)
    assert iv["mean"] == pytest.approx(0.1) and iv["lo"] == pytest.approx(0.1) and iv["hi"] == pytest.approx(0.1)
    assert stats.verdict(iv) == stats.HOLDS
    rng = random.Random(4)
    x = [rng.random() < 0.6 for _ in range(400)]
    y = [rng.random() < 0.6 for _ in range(400)]              # two systems of equal skill
    iv1 = stats.paired_bootstrap(x, y, seed=5)
    assert iv1["lo"] < 0 < iv1["hi"] and stats.verdict(iv1) == stats.INCONCLUSIVE
    assert stats.paired_bootstrap(x, y, seed=5) == iv1        # same seed, same interval
    assert stats.paired_bootstrap(x, y, seed=6) != iv1        # another seed, another resample
    with pytest.raises(ValueError, match="must pair"):
        stats.paired_bootstrap([1, 2], [1])


def test_pearson_ci_fisher_z():
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    y = [1.2, 1.9, 3.4, 3.8, 5.3, 5.9, 7.4]
    iv = stats.pearson_ci(x, y)
    r = scipy_stats.pearsonr(x, y)[0]
    half = 1.959963985 / math.sqrt(len(x) - 3)
    assert iv["r"] == pytest.approx(r, abs=1e-12)
    assert (iv["lo"], iv["hi"]) == pytest.approx((math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)))
    assert stats.verdict(iv) == stats.HOLDS
    assert stats.verdict(stats.pearson_ci(x, [0.3, -1, 2, 0.1, -0.5, 1.2, 0.4])) == stats.INCONCLUSIVE


def test_all_of_and_formatting():
    assert stats.all_of([stats.HOLDS, stats.HOLDS]) == stats.HOLDS
    assert stats.all_of([stats.HOLDS, stats.INCONCLUSIVE]) == stats.INCONCLUSIVE
    assert stats.all_of([stats.INCONCLUSIVE, stats.FAILS]) == stats.FAILS
    assert stats.all_of([]) == stats.INCONCLUSIVE
    assert stats.fmt_ci({"mean": 0.032, "lo": 0.01, "hi": 0.054}, scale=100) == "+3.2 [+1.0, +5.4]"
    assert stats.fmt_ci({"mean": 0.5, "lo": None, "hi": None, "n": 1}) == "+0.5 [n=1]"
    assert stats.fmt_ci({"r": 0.71, "lo": 0.2, "hi": 0.9, "n": 14}, digits=2) == "+0.71 [+0.20, +0.90]"
