"""Intervals and verdicts of the replication report.

- Accuracies (k correct of n) get the Wilson score interval (``wilson``), the binomial
  interval that keeps its coverage at small n and at rates near 0 or 1, where the normal
  approximation's interval leaves [0, 1] (scipy's ``binomtest(...).proportion_ci`` with
  ``method="wilson"`` computes the same; a test checks it).
- Every other measure is a mean over prompts (or seeds): a percentile bootstrap over the
  prompts (``bootstrap``, 2000 resamples, numpy's seeded generator). Differences of two
  measures on the same prompts resample the prompt *pairs* (``paired``), so the
  interval is that of the difference, not of two independent means.

>>> [round(x, 4) for x in wilson(8, 10)]
[0.8, 0.4902, 0.9433]
>>> m, lo, hi = bootstrap([1.0, 2.0, 3.0, 4.0])
>>> m, lo <= m <= hi
(2.5, True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from mechsteer.fv import stats as fv_stats

Z95 = fv_stats.Z95  # the standard normal's 97.5% quantile
N_BOOT = 2000


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """(k/n, lower, upper): the Wilson score interval of a binomial proportion
    (``fv.stats.wilson``, the one implementation)."""
    lo, hi = fv_stats.wilson(k, n, z)
    return k / n, lo, hi


def _values(values: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=float).reshape(-1)
    if x.size == 0:
        raise ValueError(f"{what}: no values to summarise.")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: {int((~np.isfinite(x)).sum())} non-finite value(s); refusing to report a NaN.")
    return x


def bootstrap(values, stat: Callable[[np.ndarray], float] = np.mean, *, n_boot: int = N_BOOT,
              seed: int = 0, what: str = "bootstrap") -> tuple[float, float, float]:
    """(stat(values), 2.5% and 97.5% percentiles of stat over ``n_boot`` resamples)."""
    x = _values(values, what)
    if x.size == 1:
        return float(stat(x)), float(stat(x)), float(stat(x))
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    boots = np.array([stat(x[i]) for i in idx])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(stat(x)), float(lo), float(hi)


def paired(a, b, *, n_boot: int = N_BOOT, seed: int = 0, what: str = "paired") -> tuple[float, float, float]:
    """Mean of a - b over the same prompts, with the bootstrap interval of the pairs."""
    a, b = _values(a, what), _values(b, what)
    if a.shape != b.shape:
        raise ValueError(f"{what}: paired values must have the same length, got {a.size} and {b.size}.")
    return bootstrap(a - b, n_boot=n_boot, seed=seed, what=what)


def above(lo: float, threshold: float = 0.0) -> bool:
    """The interval lies above ``threshold`` (the claim's direction is shown)."""
    return lo > threshold
