"""Plotly figures. Functions here only present results; they compute nothing new.

Heatmaps use a diverging colour scale centred at zero (``zmid=0``), so the sign of a
score reads at a glance and two panels of one comparison share their meaning of colour.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go


def heatmap(
    z,
    *,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    title: str = "",
    x_title: str = "position",
    y_title: str = "layer",
    zmid: float | None = 0.0,
    zmax: float | None = None,
    colorbar_title: str = "",
) -> go.Figure:
    """A layer x position (or layer x head) heatmap with hover values.

    ``z`` is 2-D (rows = ``y_labels``); labels default to indices. Layer 0 is at the bottom.
    ``zmax`` fixes a symmetric colour range [-zmax, zmax] (shared across compared panels).
    """
    z = np.asarray(z, dtype=float)
    if z.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D array, got shape {z.shape}.")
    x = list(x_labels) if x_labels is not None else [str(i) for i in range(z.shape[1])]
    y = list(y_labels) if y_labels is not None else [str(i) for i in range(z.shape[0])]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x,
            y=y,
            zmid=zmid,
            zmin=-zmax if zmax is not None else None,
            zmax=zmax,
            colorscale="RdBu_r" if zmid is not None else "Viridis",
            colorbar={"title": colorbar_title},
            hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>%{{z:.4g}}<extra></extra>",
        )
    )
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white")
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def logit_diff_strip(clean, corrupted, *, title: str = "Logit difference per prompt") -> go.Figure:
    """Per-prompt logit differences f_c - f_w on clean and corrupted prompts."""
    fig = go.Figure()
    for name, values in (("clean", clean), ("corrupted", corrupted)):
        v = np.asarray(values, dtype=float)
        fig.add_trace(go.Box(y=v, name=name, boxpoints="all", jitter=0.4, pointpos=0))
    fig.add_hline(y=0, line_dash="dot", line_color="grey")
    fig.update_layout(title=title, yaxis_title="logit(correct) - logit(wrong)", template="plotly_white", showlegend=False)
    return fig


def facet_heatmaps(panels, *, titles: Sequence[str], title: str = "", zmax: float | None = None) -> go.Figure:
    """Side-by-side heatmaps of 2-D ``AttributionResult`` panels, sharing axes and one colour
    scale centred at zero (``zmax`` defaults to the largest absolute score of any panel).

    Scores of different methods live on different scales; pass panels already normalised
    (e.g. divided by their max |score|) when the shared scale should compare shapes.
    """
    from plotly.subplots import make_subplots

    grids = [p.grid() for p in panels]
    if zmax is None:
        zmax = max(float(g[0].abs().max()) for g in grids) or 1.0
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=list(titles), shared_yaxes=True, horizontal_spacing=0.03)
    for i, (panel, (z, rows, cols)) in enumerate(zip(panels, grids), start=1):
        fig.add_trace(
            go.Heatmap(
                z=z.numpy(),
                x=panel.axis_labels(cols),
                y=panel.axis_labels(rows),
                zmid=0.0,
                zmin=-zmax,
                zmax=zmax,
                colorscale="RdBu_r",
                showscale=i == len(panels),
                hovertemplate=f"{titles[i - 1]}<br>{rows} %{{y}}<br>{cols} %{{x}}<br>%{{z:.4g}}<extra></extra>",
            ),
            row=1,
            col=i,
        )
        fig.update_xaxes(title_text=cols, type="category", row=1, col=i)
    fig.update_yaxes(title_text=grids[0][1], type="category", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=max(400, 18 * grids[0][0].shape[0] + 150))
    return fig
