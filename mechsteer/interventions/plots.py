"""Reading learned interventions (seed paper 003, Figs. 3-5).

- ``alpha_heatmap`` (Fig. 3): an ActivScalar's alphas, layer x position with token labels,
  one panel per site. alpha > 0 strengthens h at beta = +1 (the direction that makes the
  correct answer win), alpha < 0 weakens it. For per-head ``z`` a location is
  (layer, pos, head), so ``z`` panels are layer x head, one per position in
  ``z_positions`` (default: the last selected position, where heads decide the answer;
  pass ``"all"`` for every selected position).
- ``beta_sweep`` / ``beta_sweep_figure`` (Fig. 3, lines): the mean logit difference
  f_c - f_w as a function of beta. An effective intervention crosses zero between
  beta = -1 and +1; ``flip_beta`` interpolates where.
- ``steervec_geometry`` (Fig. 4): how a SteerVec moves each activation, as the relative
  change in norm ||h~||/||h|| - 1 and the cosine distance 1 - cos(h, h~), averaged over
  prompts. h is the *clean* activation (recorded at the intervened sites, no steering) and
  h~ = h + beta v: the geometry of each vector on its own, without the upstream edits
  that also move h in a steered run.
- ``dynscalar_alphas`` / ``dynscalar_figure`` (Fig. 5): a DynScalar's alpha = g^T h/||h||
  on each prompt's clean activations (the probe's reading on the unsteered model, any
  prompt length; in a steered run, later layers read h already moved by earlier edits).

The ``z`` rows of the geometry and DynScalar figures show the mean over heads; the
DataFrames keep every head.

>>> from mechsteer.interventions import ActivScalar
>>> from mechsteer.tasks import ccc
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> ds = ccc(model, n=4)
>>> iv = ActivScalar.for_model(model, sites=["attn_out", "mlp_out"], n_pos=ds.n_pos)
>>> fig = alpha_heatmap(iv, ds)
>>> [t.name for t in fig.data], list(fig.data[0].x[:2])
(['attn_out', 'mlp_out'], ['0:<|endoftext|>', '1:The'])
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from mechsteer.interventions.scalars import ActivScalar
from mechsteer.interventions.interpret import (  # noqa: F401 (re-exported: the numbers the figures draw)
    DEFAULT_BETAS,
    _positions,
    SWEEP_COLUMNS,
    beta_sweep,
    dynscalar_alphas,
    flip_beta,
    steervec_geometry,
)
from mechsteer.plots import Panel, heatmap_grid
from mechsteer.tasks.base import ContrastiveDataset



def _token_labels(labels, n_pos: int | None) -> list[str] | None:
    if labels is None:
        return None
    toks = labels.str_tokens[0] if isinstance(labels, ContrastiveDataset) else list(labels)
    if n_pos is not None and len(toks) != n_pos:
        raise ValueError(f"labels has {len(toks)} tokens but the intervention was built for n_pos={n_pos}.")
    return [f"{i}:{t}" for i, t in enumerate(toks)]


def alpha_heatmap(
    intervention: ActivScalar,
    labels: ContrastiveDataset | Sequence[str] | None = None,
    *,
    z_positions: str | Sequence[int] = "last",
    title: str | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """Fig. 3: alpha_{l,i}^(s) as layer x position heatmaps (one per site), zero-centred.

    ``labels``: a ContrastiveDataset or the prompt's tokens, for position labels
    ``"{pos}:{token}"`` (an intervention on slots is labelled by its slots: ``IO``, ``end-1``). Site ``z``: one layer x head panel per position of ``z_positions``
    (``"last"``, ``"all"`` or token positions among the selected ones).
    """
    if isinstance(z_positions, str) and z_positions not in ("last", "all"):
        raise ValueError(f"z_positions={z_positions!r}: use 'last', 'all' or a list of token positions.")
    if not isinstance(intervention, ActivScalar):
        raise TypeError(
            f"alpha_heatmap reads ActivScalar alphas; got {type(intervention).__name__} (DynScalar: dynscalar_figure)."
        )
    if isinstance(labels, ContrastiveDataset) and labels.is_padded:
        labels = None  # no one prompt's tokens name the positions of mixed-length prompts
    n_pos = (
        intervention.n_pos
        if intervention.n_pos is not None
        else (labels.n_pos if isinstance(labels, ContrastiveDataset) else None)
    )
    if intervention.slots is not None:  # named or end-relative slots name themselves
        x, pos = list(intervention.slots), list(range(len(intervention.slots)))
    else:
        tok = _token_labels(labels, n_pos)
        pos = _positions(intervention, n_pos)
        x = ["last"] if pos is None else [tok[p] if tok else str(p) for p in pos]
    y = [str(l) for l in intervention.layers]
    panels = []
    for site in intervention.sites:
        a = intervention.alpha(site).detach().float().cpu()  # (L, P) or (L, P, H)
        if site not in ("z", "v"):  # per head (z) or per KV head (v): layer x head panels
            panels.append(Panel(a.numpy(), x, y, title=site))
            continue
        if z_positions == "last":
            picks = [max(range(len(x)), key=lambda j: -1 if pos is None else pos[j])]
        elif z_positions == "all":
            picks = list(range(len(x)))
        else:
            want = [p % n_pos if n_pos else p for p in z_positions]
            if pos is None or any(p not in pos for p in want):
                raise ValueError(f"z_positions {list(z_positions)} must be among the intervened positions {pos}.")
            picks = [pos.index(p) for p in want]
        heads = [str(h) for h in range(a.shape[-1])]
        x_title = "KV head" if site == "v" else "head"
        panels += [Panel(a[:, j].numpy(), heads, y, title=f"{site} @ {x[j]}", x_title=x_title) for j in picks]
    fig = heatmap_grid(
        [panels], title=title or "ActivScalar alphas (h~ = h (1 + beta alpha))", zmax=zmax, colorbar_titles=["alpha"]
    )
    for p, t in zip(panels, fig.data):
        t.name = p.title
    return fig


def beta_sweep_figure(df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Fig. 3 (lines): mean f_c and f_w (top) and f_c - f_w +- std (bottom) against beta,
    with the zero line and the interpolated beta where the answer flips."""
    from plotly.subplots import make_subplots

    missing = [c for c in SWEEP_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"df lacks columns {missing}; pass the DataFrame from beta_sweep.")
    d = df.sort_values("beta")
    b = d["beta"].tolist()
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.4, 0.6],
        vertical_spacing=0.08,
        subplot_titles=("mean answer logits", "mean logit difference f_c - f_w"),
    )
    fig.add_trace(go.Scatter(x=b, y=d["logit_correct"], name="f_c (correct)", line={"color": "#1f77b4"}), row=1, col=1)
    fig.add_trace(go.Scatter(x=b, y=d["logit_wrong"], name="f_w (wrong)", line={"color": "#d62728"}), row=1, col=1)
    lo, hi = (d["logit_diff"] - d["logit_diff_std"]).tolist(), (d["logit_diff"] + d["logit_diff_std"]).tolist()
    fig.add_trace(
        go.Scatter(
            x=b + b[::-1],
            y=hi + lo[::-1],
            fill="toself",
            fillcolor="rgba(100,100,100,0.2)",
            line={"width": 0},
            name="+- std",
            hoverinfo="skip",
        ),
        row=2,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=b,
            y=d["logit_diff"],
            name="f_c - f_w",
            line={"color": "black"},
            customdata=d["accuracy"],
            hovertemplate="beta %{x:.3g}<br>f_c - f_w %{y:.4g}<br>accuracy %{customdata:.2f}<extra></extra>",
        ),
        row=2,
        col=1,
    )
    fig.add_hline(y=0, line_dash="dot", line_color="grey", row=2, col=1)
    for v in (-1, 1):
        fig.add_vline(x=v, line_dash="dot", line_color="lightgrey")
    flip = flip_beta(df)
    if np.isfinite(flip):
        fig.add_vline(x=flip, line_dash="dash", line_color="green")
        fig.add_trace(
            go.Scatter(
                x=[flip],
                y=[0.0],
                mode="markers+text",
                marker={"color": "green", "size": 10},
                text=[f"flips at beta = {flip:.3g}"],
                textposition="top right",
                name="answer flips",
            ),
            row=2,
            col=1,
        )
    fig.update_xaxes(title_text="beta", row=2, col=1)
    fig.update_layout(title=title or "Steering strength sweep", template="plotly_white", height=600)
    return fig


def _panel(df: pd.DataFrame, value: str, title: str) -> Panel:
    """Layer x position panel of ``value`` (mean over heads where there are several)."""
    grid = df.groupby(["layer", "pos"])[value].mean().unstack("pos").sort_index()
    tokens = df.drop_duplicates("pos").set_index("pos")["token"]
    return Panel(grid.to_numpy(), [tokens[p] for p in grid.columns], [str(l) for l in grid.index], title=title)


def steervec_geometry_figure(df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """Fig. 4: layer x position heatmaps per site of the norm change (top row) and the
    cosine change (bottom row), one colour scale per row (``z``: mean over heads)."""
    sites = list(dict.fromkeys(df["site"]))
    rows = [[_panel(df[df["site"] == s], v, s) for s in sites] for v in ("norm_change", "cos_change")]
    return heatmap_grid(
        rows,
        scale="row",
        row_titles=["||h~||/||h|| - 1", "1 - cos(h, h~)"],
        colorbar_titles=["norm", "cosine"],
        title=title or "SteerVec: change of the activations (Fig. 4)",
    )


def dynscalar_figure(
    frames: Sequence[pd.DataFrame],
    titles: Sequence[str] | None = None,
    *,
    title: str | None = None,
    zmax: float | None = None,
) -> go.Figure:
    """Fig. 5: one layer x token heatmap per prompt (columns), one row per site, on one
    zero-centred scale (``z``: mean over heads)."""
    if not frames:
        raise ValueError("frames is empty; pass the list from dynscalar_alphas.")
    titles = list(titles) if titles is not None else [f"prompt {i}" for i in range(len(frames))]
    if len(titles) != len(frames):
        raise ValueError(f"{len(titles)} titles for {len(frames)} prompts.")
    sites = list(dict.fromkeys(s for f in frames for s in f["site"]))
    rows = [
        [_panel(f[f["site"] == s], "alpha", t) if (f["site"] == s).any() else None for f, t in zip(frames, titles)]
        for s in sites
    ]
    return heatmap_grid(
        rows,
        row_titles=sites,
        zmax=zmax,
        colorbar_titles=["alpha"],
        title=title or "DynScalar alphas = g^T h / ||h|| (Fig. 5)",
    )
