"""Plotly figures. Functions here only present results; they compute nothing new.

Heatmaps use a diverging colour scale centred at zero (``zmid=0``), so the sign of a
score reads at a glance and two panels of one comparison share their meaning of colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go


AXIS_TITLES = {"pos": "position", "layer": "layer", "head": "head", "site": "site"}


def axis_title(axis: str) -> str:
    """What an axis of the one vocabulary (``layer, pos, head``) is called on a figure."""
    return AXIS_TITLES.get(axis, axis)


def _every_tick(fig: go.Figure, x_labels: Sequence[str], **where) -> None:
    """Show every category tick (plotly hides every other token once labels crowd, and a
    reader needs each token); token labels are slanted, in a smaller font on long prompts."""
    slant = max((len(str(x)) for x in x_labels), default=0) > 3
    fig.update_xaxes(type="category", dtick=1, tickangle=-60 if slant else 0, tickfont_size=10 if len(x_labels) > 20 else 11, **where)
    fig.update_yaxes(type="category", dtick=1, tickfont_size=10, **where)


def _height(n_rows: int) -> int:
    """Height that gives each of ``n_rows`` rows (layers) about 18 px: 30 layers -> 700."""
    return max(420, 18 * n_rows + 160)


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
    colorbar_title: str = "score",
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
    fig.update_layout(title=title, xaxis_title=axis_title(x_title), yaxis_title=axis_title(y_title), template="plotly_white", height=_height(len(y)))
    _every_tick(fig, x)
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


def facet_heatmaps(
    panels, *, titles: Sequence[str], title: str = "", zmax: float | None = None, colorbar_title: str = "score",
) -> go.Figure:
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
                colorbar={"title": colorbar_title},
                hovertemplate=f"{titles[i - 1]}<br>{rows} %{{y}}<br>{cols} %{{x}}<br>%{{z:.4g}}<extra></extra>",
            ),
            row=1,
            col=i,
        )
        fig.update_xaxes(title_text=axis_title(cols), row=1, col=i)
        _every_tick(fig, panel.axis_labels(cols), row=1, col=i)
    fig.update_yaxes(title_text=axis_title(grids[0][1]), row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", height=_height(grids[0][0].shape[0]))
    return fig


@dataclass(frozen=True)
class Panel:
    """One heatmap of a ``heatmap_grid``: a 2-D array with its tick labels."""

    z: Any  # 2-D array-like (rows = y_labels)
    x_labels: Sequence[str]
    y_labels: Sequence[str]
    title: str = ""
    x_title: str = "position"
    y_title: str = "layer"


def heatmap_grid(
    rows: Sequence[Sequence[Panel | None]],
    *,
    title: str = "",
    row_titles: Sequence[str] | None = None,
    scale: str = "shared",
    zmid: float | None = 0.0,
    zmax: float | Sequence[float] | None = None,
    colorbar_titles: Sequence[str] | None = None,
) -> go.Figure:
    """A grid of heatmaps (rows of ``Panel``s; ``None`` leaves a cell empty).

    Panels may have different axes (e.g. prompts of different lengths: column widths
    follow the number of x labels). ``scale="shared"``: one colour range over all panels
    and one colour bar; ``"row"``: one range and colour bar per row (rows of different
    quantities), and then ``colorbar_titles`` has one title per row. ``zmid=0`` gives a
    diverging scale centred at zero with a symmetric range ``[-zmax, zmax]`` (``zmax``
    defaults to the largest |z|, per row with ``"row"``); ``zmid=None`` a sequential one.

    >>> import numpy as np
    >>> p = Panel(np.ones((2, 3)), ["a", "b", "c"], ["0", "1"], title="attn_out")
    >>> fig = heatmap_grid([[p, p], [p, None]], scale="row")
    >>> len(fig.data), fig.data[0].zmax
    (3, 1.0)
    """
    from plotly.subplots import make_subplots

    if scale not in ("shared", "row"):
        raise ValueError(f"scale must be 'shared' or 'row', got {scale!r}.")
    rows = [list(r) for r in rows]
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=0)
    if n_cols == 0 or all(p is None for r in rows for p in r):
        raise ValueError("heatmap_grid got no panels; pass rows holding at least one Panel.")
    rows = [r + [None] * (n_cols - len(r)) for r in rows]
    if colorbar_titles is not None and len(colorbar_titles) != (n_rows if scale == "row" else 1):
        raise ValueError(
            f"colorbar_titles has {len(colorbar_titles)} entries; give one per row with scale='row', else one."
        )
    zs = [[None if p is None else np.asarray(p.z, dtype=float) for p in r] for r in rows]
    for r in zs:
        for z in r:
            if z is not None and z.ndim != 2:
                raise ValueError(f"Each Panel.z must be 2-D, got shape {z.shape}.")

    def absmax(arrays) -> float:
        vals = [float(np.nanmax(np.abs(a))) for a in arrays if a is not None and np.isfinite(a).any()]
        return max(vals, default=0.0) or 1.0

    if zmax is None:
        ranges = [absmax([z for r in zs for z in r])] * n_rows if scale == "shared" else [absmax(r) for r in zs]
    elif isinstance(zmax, (int, float)):
        ranges = [float(zmax)] * n_rows
    else:
        ranges = [float(v) for v in zmax]
        if len(ranges) != n_rows:
            raise ValueError(f"zmax has {len(ranges)} values for {n_rows} rows; give one per row or one number.")
    widths = [max((len(r[c].x_labels) for r in rows if r[c] is not None), default=1) for c in range(n_cols)]
    fig = make_subplots(
        rows=n_rows,
        cols=n_cols,
        subplot_titles=[p.title if p is not None else "" for r in rows for p in r],
        row_titles=list(row_titles) if row_titles is not None else None,
        column_widths=[w / sum(widths) for w in widths],
        horizontal_spacing=min(0.06, 0.5 / max(n_cols - 1, 1)),
        vertical_spacing=min(0.12, 0.5 / max(n_rows - 1, 1)),
    )
    for i, (r, zr) in enumerate(zip(rows, zs)):
        last_in_row = max(c for c, p in enumerate(r) if p is not None) if any(p is not None for p in r) else -1
        domain = fig.layout[f"yaxis{'' if i * n_cols + 1 == 1 else i * n_cols + 1}"].domain
        for c, (p, z) in enumerate(zip(r, zr)):
            if p is None:
                continue
            show = c == last_in_row and (scale == "row" or i == 0)
            bar = {"title": colorbar_titles[i if scale == "row" else 0] if colorbar_titles else ""}
            if scale == "row":
                bar.update(y=(domain[0] + domain[1]) / 2, len=domain[1] - domain[0], yanchor="middle")
            lo, hi = (-ranges[i], ranges[i]) if zmid is not None else (None, None)
            fig.add_trace(
                go.Heatmap(
                    z=z,
                    x=list(p.x_labels),
                    y=list(p.y_labels),
                    zmid=zmid,
                    zmin=lo,
                    zmax=hi,
                    colorscale="RdBu_r" if zmid is not None else "Viridis",
                    showscale=show,
                    colorbar=bar,
                    hovertemplate=f"{p.title}<br>{p.y_title} %{{y}}<br>{p.x_title} %{{x}}<br>%{{z:.4g}}<extra></extra>",
                ),
                row=i + 1,
                col=c + 1,
            )
            fig.update_xaxes(title_text=p.x_title if i == n_rows - 1 else None, row=i + 1, col=c + 1)
            fig.update_yaxes(title_text=p.y_title if c == 0 else None, row=i + 1, col=c + 1)
            _every_tick(fig, list(p.x_labels), row=i + 1, col=c + 1)
    n_y = max((len(p.y_labels) for r in rows for p in r if p is not None), default=1)
    fig.update_layout(title=title, template="plotly_white", height=n_rows * max(300, 16 * n_y + 120) + 60)
    return fig


def attention_patterns(model, prompt, layer: int, heads: Sequence[int] | None = None, *, prompt_index: int = 0) -> go.Figure:
    """Attention patterns of ``layer`` on one prompt (query x key, token labels, head selector);
    runs one forward. See ``mechsteer.views.attention_patterns``."""
    from mechsteer.views import attention_patterns as draw

    return draw(model, prompt, layer, heads, prompt_index=prompt_index)


def figures_page(title: str, figures: Sequence[go.Figure]) -> str:
    """A standalone HTML page showing ``figures`` in order (plotly.js inlined once, so it
    opens offline): what a run's ``.write(out)`` saves as ``figures.html``."""
    import html

    from plotly.offline import get_plotlyjs

    divs = "".join(
        f'<div class="fig">{f.to_html(full_html=False, include_plotlyjs=False, div_id=f"fig-{i}")}</div>'
        for i, f in enumerate(figures)
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head>"
        f"<body style='font-family:system-ui,sans-serif'><h1>{html.escape(title)}</h1>{divs}</body></html>"
    )
