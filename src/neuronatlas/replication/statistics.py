"""The statistics of the replication report: seeded bootstrap intervals (one sample, two independent samples,
paired differences, regression slopes) and the verdict of a claim from its interval.

Every interval is a percentile bootstrap with `resamples` draws from `numpy.random.default_rng(seed)`, so a
report is deterministic; the tests check the intervals against scipy.stats (bootstrap, linregress).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

REPRODUCED = "reproduced"
NOT_REPRODUCED = "not reproduced"
INCONCLUSIVE = "inconclusive"
VERDICTS = (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)


@dataclass(frozen=True)
class Estimate:
    """A statistic with its interval and the number of units it rests on."""

    value: float
    low: float
    high: float
    n: int


def _finite(values: Sequence[float] | np.ndarray) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def _percentile_interval(draws: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return float("nan"), float("nan")
    return float(np.quantile(finite, alpha)), float(np.quantile(finite, 1.0 - alpha))


def bootstrap(
    values: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """The statistic of one sample (non-finite values dropped) with a percentile bootstrap interval."""
    data = _finite(values)
    if data.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    value = float(statistic(data))
    if data.size < 2:
        return Estimate(value, float("nan"), float("nan"), int(data.size))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, data.size, size=(resamples, data.size))
    draws = np.array([statistic(data[row]) for row in index])
    return Estimate(value, *_percentile_interval(draws, confidence), int(data.size))


def difference(
    first: Sequence[float] | np.ndarray,
    second: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """statistic(first) − statistic(second) of two independent samples, each resampled on its own; n = the smaller."""
    a, b = _finite(first), _finite(second)
    if a.size == 0 or b.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), int(min(a.size, b.size)))
    value = float(statistic(a) - statistic(b))
    if min(a.size, b.size) < 2:
        return Estimate(value, float("nan"), float("nan"), int(min(a.size, b.size)))
    rng = np.random.default_rng(seed)
    draws = np.array(
        [statistic(a[rng.integers(0, a.size, a.size)]) - statistic(b[rng.integers(0, b.size, b.size)]) for _ in range(resamples)]
    )
    return Estimate(value, *_percentile_interval(draws, confidence), int(min(a.size, b.size)))


def paired(
    first: Sequence[float] | np.ndarray,
    second: Sequence[float] | np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """statistic of the paired differences first − second (pairs with a non-finite member dropped)."""
    a, b = np.asarray(first, dtype=np.float64).ravel(), np.asarray(second, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    return bootstrap(a[keep] - b[keep], statistic, confidence=confidence, resamples=resamples, seed=seed)


def slope(
    x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0
) -> Estimate:
    """Ordinary least-squares slope of y on x, with a bootstrap interval over the (x, y) units."""
    xs, ys = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if xs.size < 2 or np.ptp(xs) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), int(xs.size))

    def fit(ix: np.ndarray) -> float:
        xi, yi = xs[ix], ys[ix]
        spread = xi - xi.mean()
        denominator = float(spread @ spread)
        return float(spread @ (yi - yi.mean()) / denominator) if denominator > 0 else float("nan")

    value = fit(np.arange(xs.size))
    rng = np.random.default_rng(seed)
    draws = np.array([fit(rng.integers(0, xs.size, xs.size)) for _ in range(resamples)])
    return Estimate(value, *_percentile_interval(draws, confidence), int(xs.size))


def verdict(estimate: Estimate, rule: str, threshold: float, min_n: int, upper: float | None = None) -> str:
    """The verdict of a claim from its interval: reproduced when the whole interval satisfies the rule, not
    reproduced when the whole interval contradicts it, inconclusive when it straddles the threshold or when
    fewer than `min_n` units (or no interval) back it.

    Rules: `greater` (the statistic exceeds `threshold`), `less` (below it), `within` (inside [threshold, upper]).
    """
    if estimate.n < min_n or not (np.isfinite(estimate.low) and np.isfinite(estimate.high)):
        return INCONCLUSIVE
    low, high = estimate.low, estimate.high
    if rule == "greater":
        return REPRODUCED if low > threshold else NOT_REPRODUCED if high < threshold else INCONCLUSIVE
    if rule == "less":
        return REPRODUCED if high < threshold else NOT_REPRODUCED if low > threshold else INCONCLUSIVE
    if rule == "within":
        if upper is None:
            raise ValueError("rule `within` needs an upper bound")
        if threshold <= low and high <= upper:
            return REPRODUCED
        return NOT_REPRODUCED if high < threshold or low > upper else INCONCLUSIVE
    raise ValueError(f"unknown decision rule {rule!r}; allowed: greater, less, within")


def ratio_of_sums(
    numerators: Sequence[float] | np.ndarray,
    denominators: Sequence[float] | np.ndarray,
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> Estimate:
    """sum(numerators) / sum(denominators) over units (e.g. a share pooled over clusters), resampling units."""
    top, bottom = np.asarray(numerators, dtype=np.float64).ravel(), np.asarray(denominators, dtype=np.float64).ravel()
    keep = np.isfinite(top) & np.isfinite(bottom)
    top, bottom = top[keep], bottom[keep]
    if top.size == 0 or bottom.sum() == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), int(top.size))
    value = float(top.sum() / bottom.sum())
    if top.size < 2:
        return Estimate(value, float("nan"), float("nan"), int(top.size))
    rng = np.random.default_rng(seed)
    index = rng.integers(0, top.size, size=(resamples, top.size))
    totals = bottom[index].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = top[index].sum(axis=1) / totals
    return Estimate(value, *_percentile_interval(draws, confidence), int(top.size))


def shifted(estimate: Estimate, offset: float) -> Estimate:
    """The estimate and its interval minus a constant (e.g. a baseline measured without sampling error)."""
    return Estimate(estimate.value - offset, estimate.low - offset, estimate.high - offset, estimate.n)
