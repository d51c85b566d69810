"""False negatives of a cheap attribution estimate, measured against exact patching.

The AtP* paper (Kramár et al. 2024) evaluates estimates by what they would make a user
miss: sort locations by the estimate's |score|, verify them by real patching in that order,
and see how late the truly important ones come. ``false_negatives`` reports that for the
true top-k locations (by |exact score|): how many the estimate leaves out of its own top-k,
and the rank (1 = first) it gives each of them. A method that ranks all true top-k within
its own top-k has no false negatives at that k.
"""

from __future__ import annotations

from typing import Sequence

import torch

from mechsteer._validate import positive_int
from mechsteer.attribution.result import AttributionResult


def ranks_by_magnitude(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry by |score|, 1 = largest (ties in index order).

    >>> ranks_by_magnitude(torch.tensor([0.5, -3.0, 1.0])).tolist()
    [3, 1, 2]
    """
    order = scores.abs().argsort(descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1, device=order.device)
    return ranks


def false_negatives(exact: AttributionResult, estimate: AttributionResult, *, ks: Sequence[int] = (10, 20)):
    """One row per k: ``missed`` (true top-k locations outside the estimate's top-k),
    ``worst_rank`` (the latest rank the estimate gives one of them: how many verifications
    find them all), ``ranks`` (the estimate's rank of each true top-k location, in exact
    order) and ``locations`` (their flat indices). Both results must share one grid.

    >>> exact = AttributionResult(torch.tensor([[4.0, 3.0], [0.0, 1.0]]), ("layer", "pos"), "patching")
    >>> est = AttributionResult(torch.tensor([[0.1, 3.0], [2.0, 1.0]]), ("layer", "pos"), "atp")
    >>> false_negatives(exact, est, ks=(2,))[["k", "missed", "worst_rank", "ranks"]].values.tolist()
    [[2, 1, 4, [4, 1]]]
    """
    import pandas as pd

    for r, what in ((exact, "exact"), (estimate, "estimate")):
        if not isinstance(r, AttributionResult):
            raise TypeError(f"{what} must be an AttributionResult, got {type(r).__name__}.")
    if exact.axes != estimate.axes or exact.scores.shape != estimate.scores.shape:
        raise ValueError(
            f"exact has axes {exact.axes} and shape {tuple(exact.scores.shape)}, the estimate "
            f"{estimate.axes} and {tuple(estimate.scores.shape)}: compare them on the same grid."
        )
    e, a = exact.flat(), estimate.flat()
    est_rank = ranks_by_magnitude(a)
    true_order = e.abs().argsort(descending=True, stable=True)
    rows = []
    for k in ks:
        k = min(positive_int("k", k), len(e))
        top = true_order[:k]
        ranks = est_rank[top]
        rows.append({"k": k, "missed": int((ranks > k).sum()), "worst_rank": int(ranks.max()),
                     "ranks": ranks.tolist(), "locations": top.tolist()})
    return pd.DataFrame(rows)
