"""Figures of the function-vector pipeline: head scores, accuracy per task and injection,
FV layer sweep (``FVRun.figures()``, saved by ``FVRun.write`` as ``figures.html``).

The head heatmaps side by side are ``mechsteer.attribution.compare`` of the global
(layer, head) scores, so they share one colour scale and report top-k overlaps.

>>> import pandas as pd
>>> acc = pd.DataFrame({"task": ["a", "a"], "name": ["baseline", "dfv/lrp"], "heads": ["none", "global"],
...                     "top1": [0.1, 0.6], "top3": [0.2, 0.8]})
>>> len(accuracy_figure(acc).data)
2
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from mechsteer.attribution.compare import compare
from mechsteer.attribution.result import AttributionResult


def accuracy_figure(accuracy: pd.DataFrame, heads: str = "global", metric: str = "top1") -> go.Figure:
    """Grouped bars: zero-shot ``metric`` per task for baseline, FV and DFV of each method
    (``heads`` "global" or "task" selects which head sets; baseline is always shown), with
    95% Wilson error bars when the table has ``{metric}_lo`` / ``{metric}_hi``."""
    df = accuracy[accuracy["heads"].isin([heads, "none"])]
    fig = go.Figure()
    for name, g in df.groupby("name", sort=False):
        fig.add_bar(x=g["task"], y=g[metric], name=name, error_y=_error_bars(g, metric),
                    hovertemplate="%{x}<br>" + name + ": %{y:.2f}<extra></extra>")
    fig.update_layout(
        barmode="group", title=f"Zero-shot {metric} accuracy per task ({heads} heads)",
        yaxis=dict(title=metric, range=[0, 1]), height=420, legend_title="injection", template="plotly_white",
    )
    return fig


def _error_bars(g: pd.DataFrame, metric: str) -> dict | None:
    """Asymmetric error bars from the ``{metric}_lo`` / ``{metric}_hi`` columns (95% intervals), if any."""
    if f"{metric}_lo" not in g or f"{metric}_hi" not in g:
        return None
    return dict(type="data", symmetric=False, array=(g[f"{metric}_hi"] - g[metric]).tolist(),
                arrayminus=(g[metric] - g[f"{metric}_lo"]).tolist(), thickness=1)


def sweep_figure(sweep: pd.DataFrame, metric: str = "top1") -> go.Figure:
    """FV layer sweep: validation ``metric`` (pooled over tasks) per injection layer, per
    method, with 95% Wilson error bars when the sweep has ``{metric}_lo`` / ``{metric}_hi``."""
    fig = go.Figure()
    for method, g in sweep.groupby("method", sort=False):
        fig.add_scatter(x=g["layer"], y=g[metric], mode="lines+markers", name=method, error_y=_error_bars(g, metric))
    n = f", n = {int(sweep['n'].iloc[0])} items" if "n" in sweep else ""
    fig.update_layout(title=f"FV injection layer sweep (validation {metric} pooled over tasks{n}; bars: 95% Wilson)",
                      xaxis=dict(title="injection layer", tickmode="linear", dtick=1 if sweep["layer"].nunique() <= 12 else 2),
                      yaxis=dict(title=metric, range=[0, 1]), height=380, template="plotly_white")
    return fig


def head_scores_figure(scores: dict[str, AttributionResult], k: int, n_tasks: int) -> go.Figure:
    """The (layer, head) scores of each selection method side by side (one colour scale);
    one method alone is drawn on its own."""
    names = list(scores)
    if len(names) == 1:
        return scores[names[0]].plot(title=f"Global {names[0]} head scores over {n_tasks} tasks")
    title = f"Global head scores over {n_tasks} tasks (top-{k} overlap in head_agreement.csv)"
    return compare([scores[m] for m in names], k=k, names=names, title=title).figure
