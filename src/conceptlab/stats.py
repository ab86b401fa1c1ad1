"""Intervals and null bands shared by every method: bootstrap over units, spread over seeds, permutation nulls.

Written here rather than taken from scipy.stats.bootstrap because the book resamples *nested* units
(images within seeds) and needs the same seeded resamples across methods, so differences are paired.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_interval(
    values: Sequence[float] | np.ndarray,
    stat: Callable[[np.ndarray], float] = np.mean,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over the first axis of ``values``."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        v = float(stat(values)) if len(values) else float("nan")
        return v, v
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_resamples, len(values)))
    boot = np.array([stat(values[i]) for i in idx])
    a = (1 - level) / 2
    return float(np.quantile(boot, a)), float(np.quantile(boot, 1 - a))


def paired_difference_interval(
    a: Sequence[float] | np.ndarray,
    b: Sequence[float] | np.ndarray,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean of a - b, low, high)`` for paired samples (the same units measured twice)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need the same shape, got {a.shape} and {b.shape}")
    d = a - b
    low, high = bootstrap_interval(d, n_resamples=n_resamples, level=level, seed=seed)
    return float(d.mean()), low, high


def seed_interval(values: Sequence[float] | np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` over independent seeds: a t interval (few seeds make a bootstrap too narrow)."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, mean, mean
    half = float(stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half


def permutation_band(
    statistic: Callable[[np.random.Generator], float], n_permutations: int = 200, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``statistic(rng)`` over random draws: the null a finding must clear."""
    rng = np.random.default_rng(seed)
    draws = np.array([statistic(rng) for _ in range(n_permutations)])
    a = (1 - level) / 2
    return float(draws.mean()), float(np.quantile(draws, a)), float(np.quantile(draws, 1 - a))


def excludes(low: float, high: float, value: float = 0.0) -> bool:
    """Whether the interval ``[low, high]`` leaves out ``value`` (a difference is a finding only then)."""
    return bool(low > value or high < value)


__all__ = ["bootstrap_interval", "excludes", "paired_difference_interval", "permutation_band", "seed_interval"]
