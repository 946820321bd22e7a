"""stats.py: confidence intervals and verdicts for the findings study (`arena.py findings`).

The paper reports single runs (PEFT-Arena §10); a toy arena that trains in minutes can repeat each
cell over seeds and say, for every claim, whether the difference it rests on is larger than the
noise. Everything here is plain arithmetic on lists of numbers, written out so a reader can check it:

  - mean_ci:           mean over seeds with a Student-t 95% interval  (mean +- t_{n-1} s / sqrt(n))
  - paired_bootstrap:  interval of mean(a - b) over items both methods were scored on (Efron 1979;
                       percentile bootstrap, resampling items, so item difficulty cancels)
  - pearson_ci:        Pearson r with the Fisher-z interval  tanh(atanh r +- z_{.975} / sqrt(n - 3))
  - verdict:           "holds" when the interval of the claimed difference excludes 0 on the claimed
                       side, "does not hold" when it excludes 0 on the other side, otherwise
                       "inconclusive" (including too few samples to form an interval)

No scipy at run time: the t quantile is found by bisection on the t CDF, which is the regularised
incomplete beta function evaluated by its continued fraction (Numerical Recipes §6.4); the tests
check both against scipy.
"""
from __future__ import annotations

import math
import random
from statistics import NormalDist

HOLDS, FAILS, INCONCLUSIVE = "holds", "does not hold", "inconclusive"


# -----------------------------------------------------------------------------
# 1. The t distribution without scipy
# -----------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float, iters: int = 300, eps: float = 1e-15) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes §6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iters + 1):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),            # even step
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # odd step
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):                 # the fraction converges fast on this side
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom: 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t > 0."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with t_cdf(t, df) = p, by bisection on [0, 1e6] (the CDF is monotone and symmetric)."""
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1e6
    for _ in range(200):                              # 1e6 / 2^200: far below double precision
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


# -----------------------------------------------------------------------------
# 2. Intervals
# -----------------------------------------------------------------------------

def mean_ci(values, conf: float = 0.95) -> dict:
    """{"mean", "lo", "hi", "n", "sd"}: the mean and its Student-t interval over independent runs.

    With one value there is no spread to estimate: lo = hi = None, and a verdict is "inconclusive".
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "sd": None}
    mean = sum(xs) / n
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "sd": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))           # sample standard deviation
    half = t_quantile(0.5 + conf / 2.0, n - 1) * sd / math.sqrt(n)        # t_{n-1, .975} s / sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "sd": sd}


def paired_bootstrap(a, b, n_boot: int = 2000, seed: int = 0, conf: float = 0.95) -> dict:
    """Percentile-bootstrap interval of mean(a_i - b_i) over paired items (same items, two systems)."""
    if len(a) != len(b):
        raise ValueError(f"paired_bootstrap: {len(a)} scores for a but {len(b)} for b (the items must pair)")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return {"mean": d[0] if d else None, "lo": None, "hi": None, "n": n}
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    k = int(round((1.0 - conf) / 2.0 * (n_boot - 1)))
    return {"mean": sum(d) / n, "lo": means[k], "hi": means[n_boot - 1 - k], "n": n}


def pearson(x, y) -> float:
    """Pearson's r of two equal-length lists (nan when either is constant)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def pearson_ci(x, y, conf: float = 0.95) -> dict:
    """{"r", "lo", "hi", "n"}: r with the Fisher-z interval (needs n >= 4; else lo = hi = None)."""
    if len(x) != len(y):
        raise ValueError(f"pearson_ci: {len(x)} x values but {len(y)} y values")
    n = len(x)
    r = pearson(x, y) if n >= 2 else float("nan")
    if n < 4 or math.isnan(r) or abs(r) >= 1.0:
        return {"r": r, "lo": None, "hi": None, "n": n}
    z, se = math.atanh(r), 1.0 / math.sqrt(n - 3)
    q = NormalDist().inv_cdf(0.5 + conf / 2.0)
    return {"r": r, "lo": math.tanh(z - q * se), "hi": math.tanh(z + q * se), "n": n}


# -----------------------------------------------------------------------------
# 3. Verdicts
# -----------------------------------------------------------------------------

def verdict(interval: dict, direction: int = 1, threshold: float = 0.0) -> str:
    """The claim "the quantity is > threshold" (direction=+1) or "< threshold" (direction=-1), read
    off its interval.

    `interval` has "lo" and "hi" (None when the sample was too small). A difference is called only
    when its interval excludes the threshold (0: the two sides are equal).
    """
    lo, hi = interval.get("lo"), interval.get("hi")
    if lo is None or hi is None:
        return INCONCLUSIVE
    lo, hi = lo - threshold, hi - threshold
    if direction < 0:
        lo, hi = -hi, -lo
    if lo > 0:
        return HOLDS
    if hi < 0:
        return FAILS
    return INCONCLUSIVE


def all_of(verdicts) -> str:
    """A claim made of several parts holds when every part holds, fails when any part fails."""
    vs = list(verdicts)
    if vs and all(v == HOLDS for v in vs):
        return HOLDS
    if any(v == FAILS for v in vs):
        return FAILS
    return INCONCLUSIVE


def fmt_ci(iv: dict, scale: float = 1.0, digits: int = 1) -> str:
    """'+3.2 [+1.0, +5.4]' (or '+3.2 [n=1]' without an interval) for a findings table."""
    key = "r" if "r" in iv else "mean"
    if iv.get(key) is None:
        return "-"
    m = f"{iv[key] * scale:+.{digits}f}"
    if iv.get("lo") is None:
        return f"{m} [n={iv.get('n', 0)}]"
    return f"{m} [{iv['lo'] * scale:+.{digits}f}, {iv['hi'] * scale:+.{digits}f}]"
