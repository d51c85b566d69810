"""Side-by-side comparison of attribution methods on the same grid.

``compare(results)`` draws the methods in one plotly figure (shared axes, one colour
scale centred at zero) and measures how much they agree:

- Spearman rank correlation of the scores over all locations, for every pair of methods;
- Jaccard overlap |A ∩ B| / |A ∪ B| of their top-k locations (by absolute score).

Methods report on different scales (patching: fraction of the effect recovered; DLA:
logits; AttnLRP: relevance), so each panel is divided by its largest absolute score before
plotting (``normalize=True``); correlations and overlaps are scale-free anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations
from typing import Sequence

import pandas as pd
import torch
from torch import Tensor

from mechsteer._validate import check_finite, positive_int
from mechsteer.attribution.result import AttributionResult


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two equal-length vectors (average ranks for ties).

    >>> spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 15.0]))
    0.5
    """
    if a.shape != b.shape:
        raise ValueError(f"Cannot correlate scores of shapes {tuple(a.shape)} and {tuple(b.shape)}.")
    ra, rb = _rank(a.double()), _rank(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float("nan") if denom == 0 else round((ra @ rb).item() / denom, 12)


def _rank(x: Tensor) -> Tensor:
    """Ranks 0..n-1 with ties given their average rank."""
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype, device=x.device)
    for v in x.unique():  # average tied ranks (small grids: a loop is fine)
        tied = x == v
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def top_k_set(result: AttributionResult, k: int) -> set[int]:
    """Flat indices of the ``k`` locations with the largest absolute score."""
    k = positive_int("k", k)
    return set(result.flat().abs().topk(min(k, result.flat().numel())).indices.tolist())


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    return 1.0 if not a and not b else len(a & b) / len(a | b)


@dataclass
class Comparison:
    """What ``compare`` returns: the figure and the agreement tables."""

    figure: object
    spearman: pd.DataFrame  # method x method
    jaccard: pd.DataFrame  # method x method, top-k overlap
    pairs: pd.DataFrame  # one row per pair: method_a, method_b, spearman, jaccard_top_k
    k: int

    def _repr_html_(self) -> str:  # Jupyter shows the pair table
        return self.pairs.to_html(index=False)

    def _ipython_display_(self) -> None:  # Jupyter: the pair table, then the figure
        from IPython.display import HTML, display

        display(HTML(self._repr_html_()))
        display(self.figure)


def compare(
    results: Sequence[AttributionResult],
    *,
    k: int = 10,
    names: Sequence[str] | None = None,
    normalize: bool = True,
    title: str | None = None,
) -> Comparison:
    """Compare attribution results on the same grid (same axes and shape).

    >>> a = AttributionResult(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), ("layer", "pos"), "a")
    >>> b = AttributionResult(torch.tensor([[2.0, 1.0], [3.0, 5.0]]), ("layer", "pos"), "b")
    >>> compare([a, b], k=2).pairs[["method_a", "method_b", "spearman", "jaccard_top_k"]].values.tolist()
    [['a', 'b', 0.8, 1.0]]
    """
    from mechsteer.plots import facet_heatmaps

    k = positive_int("k", k)
    if len(results) < 2:
        raise ValueError(f"compare needs at least two results, got {len(results)}.")
    bad = [type(r).__name__ for r in results if not isinstance(r, AttributionResult)]
    if bad:
        raise TypeError(f"results must be AttributionResults, got {bad}.")
    names = list(names) if names is not None else [r.method for r in results]
    if len(names) != len(results):
        raise ValueError(f"names has {len(names)} entries ({names}) for {len(results)} results; give one per result.")
    if len(set(names)) != len(names):
        raise ValueError(f"Method names must be unique to compare them; got {names}. Pass names=[...].")
    for r, n in zip(results, names):
        check_finite(f"compare: scores of {n!r}", r.scores)
    first = results[0]
    for r, n in zip(results[1:], names[1:]):
        if r.axes != first.axes or r.scores.shape != first.scores.shape:
            raise ValueError(
                f"{n!r} has axes {r.axes} and shape {tuple(r.scores.shape)}, but {names[0]!r} has "
                f"{first.axes} and {tuple(first.scores.shape)}: compare results on the same grid."
            )
    rho = pd.DataFrame(1.0, index=names, columns=names)
    jac = pd.DataFrame(1.0, index=names, columns=names)
    rows = []
    for (i, a), (j, b) in combinations(enumerate(results), 2):
        s = spearman(a.flat(), b.flat())
        jk = jaccard(top_k_set(a, k), top_k_set(b, k))
        rho.iloc[i, j] = rho.iloc[j, i] = s
        jac.iloc[i, j] = jac.iloc[j, i] = jk
        rows.append({"method_a": names[i], "method_b": names[j], "spearman": s, "jaccard_top_k": jk, "k": k})
    panels = []
    for r in results:
        p = r
        if normalize:
            m = r.scores.abs().max()
            p = replace(r, scores=r.scores / m if m > 0 else r.scores, per_prompt=None)
        if "site" in p.axes and len(p.axes) == 3:
            raise ValueError("Compare one site at a time: use result.select(site=...) first.")
        panels.append(p)
    fig = facet_heatmaps(
        panels,
        titles=names,
        title=title or f"{first.metric}: methods side by side" + (" (each divided by its max |score|)" if normalize else ""),
        zmax=1.0 if normalize else None,
    )
    return Comparison(figure=fig, spearman=rho, jaccard=jac, pairs=pd.DataFrame(rows), k=k)
