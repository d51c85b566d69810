"""95% intervals for zero-shot accuracies and for the gain of an injection over the baseline.

Accuracy (top-1 over n items, k correct) gets the **Wilson score interval** (Wilson 1927):

    centre = (p + z^2 / 2n) / (1 + z^2 / n),   half = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / 4n^2)

with p = k / n and z = 1.95996 (two-sided 95%). Unlike the normal (Wald) interval it stays
inside [0, 1] and is not empty at p = 0 or 1 (0 of 10 gives [0, 0.278]).

The gain (injected minus baseline accuracy) is *paired*: both are measured on the same
items. With a = items both get right, b = only the injection gets right (wins),
c = only the baseline gets right (losses), d = neither, the gain is (b - c) / n and its
interval is **Newcombe's hybrid score interval for paired proportions** (Newcombe 1998,
method 10): from the Wilson intervals [l1, u1] of p1 = (a + b) / n and [l2, u2] of
p2 = (a + c) / n, and phi the correlation of the paired outcomes,

    lower = D - sqrt((p1 - l1)^2 - 2 phi (p1 - l1)(u2 - p2) + (u2 - p2)^2)
    upper = D + sqrt((u1 - p1)^2 - 2 phi (u1 - p1)(p2 - l2) + (p2 - l2)^2)

with phi = C / sqrt((a+b)(c+d)(a+c)(b+d)), C = ad - bc - n/2 when ad - bc > n/2, ad - bc
when it is negative, else 0 (Newcombe's phi as in Altman et al., "Statistics with
confidence", 2000, Sec. 6; phi = 0 when a margin is 0). It needs only the four counts, so
pooling tasks is adding counts. Pure Python: scipy and statsmodels are not dependencies of
mechsteer (tests check the Wilson values against published ones and the paired interval
against its defining properties).

>>> lo, hi = wilson(5, 10)
>>> round(lo, 4), round(hi, 4)
(0.2366, 0.7634)
>>> [round(x, 4) for x in newcombe_paired(14, 5, 0, 22)]  # the counts of Altman et al. (2000), Table 6.2
[0.122, 0.0115, 0.2265]
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def _counts(**counts: int) -> None:
    for name, v in counts.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a count (int >= 0), got {v!r}.")


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (lo, hi) of a proportion of ``k`` successes in ``n`` trials.

    >>> [round(x, 4) for x in wilson(0, 10)]
    [0.0, 0.2775]
    """
    _counts(k=int(k), n=int(n))
    k, n = int(k), int(n)
    if n == 0 or k > n:
        raise ValueError(f"wilson needs 0 <= k <= n and n >= 1, got k={k}, n={n}.")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact ends (no rounding residue at 0 or n)


def newcombe_paired(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float, float]:
    """(gain, lo, hi): p1 - p2 = (b - c) / n and its Newcombe (1998, method 10) 95% interval,
    for paired outcomes a = both right, b = only the first (the injection) right, c = only
    the second (the baseline) right, d = neither.

    >>> [round(x, 4) for x in newcombe_paired(10, 0, 0, 0)]  # no discordant item, n = 10
    [0.0, -0.2775, 0.2775]
    """
    a, b, c, d = (int(x) for x in (a, b, c, d))
    _counts(a=a, b=b, c=c, d=d)
    n = a + b + c + d
    if n == 0:
        raise ValueError("newcombe_paired needs at least one item (a + b + c + d >= 1).")
    p1, p2 = (a + b) / n, (a + c) / n
    (l1, u1), (l2, u2) = wilson(a + b, n, z), wilson(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    ad_bc = a * d - b * c
    num = ad_bc - n / 2 if ad_bc > n / 2 else min(ad_bc, 0)
    phi = num / math.sqrt(margins) if margins else 0.0
    gain = p1 - p2
    lo = gain - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = gain + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return gain, max(-1.0, lo), min(1.0, hi)


def interval_columns(n: int, correct: int, wins: int | None = None, losses: int | None = None) -> dict[str, float]:
    """``top1, top1_lo, top1_hi`` (Wilson) from counts and, given the paired ``wins`` (items
    only this run gets right) and ``losses`` (only the baseline gets right), ``gain,
    gain_lo, gain_hi`` (Newcombe).

    >>> r = interval_columns(50, 30, wins=12, losses=2)
    >>> r["top1"], round(r["gain"], 3), r["gain_lo"] > 0
    (0.6, 0.2, True)
    """
    lo, hi = wilson(correct, n)
    out = {"top1": correct / n, "top1_lo": lo, "top1_hi": hi}
    if wins is not None and losses is not None:
        a = correct - wins
        g, glo, ghi = newcombe_paired(a, wins, losses, n - a - wins - losses)
        out.update(gain=g, gain_lo=glo, gain_hi=ghi)
    return out
