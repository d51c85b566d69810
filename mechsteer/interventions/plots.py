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
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechsteer.interventions.base import Intervention
from mechsteer.interventions.scalars import ActivScalar, DynScalar
from mechsteer.interventions.vectors import SteerVec
from mechsteer.plots import Panel, heatmap_grid
from mechsteer.sites import hook_name, hooked
from mechsteer.tasks.base import ContrastiveDataset

DEFAULT_BETAS = torch.arange(-10, 11) / 5  # beta in [-2, 2] in steps of 0.2, with an exact 0
SWEEP_COLUMNS = ["beta", "logit_diff", "logit_diff_std", "accuracy", "logit_correct", "logit_wrong"]


def _positions(iv: Intervention, n_pos: int | None) -> list[int] | None:
    """Token positions of the intervention's parameters/edits (None: 'last' of unknown length)."""
    if iv.positions == "all":
        return list(range(n_pos))
    if iv.positions == "last":
        return [n_pos - 1] if n_pos is not None else None
    return list(iv.positions)


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
    ``"{pos}:{token}"``. Site ``z``: one layer x head panel per position of ``z_positions``
    (``"last"``, ``"all"`` or token positions among the selected ones).
    """
    if isinstance(z_positions, str) and z_positions not in ("last", "all"):
        raise ValueError(f"z_positions={z_positions!r}: use 'last', 'all' or a list of token positions.")
    if not isinstance(intervention, ActivScalar):
        raise TypeError(
            f"alpha_heatmap reads ActivScalar alphas; got {type(intervention).__name__} (DynScalar: dynscalar_figure)."
        )
    n_pos = (
        intervention.n_pos
        if intervention.n_pos is not None
        else (labels.n_pos if isinstance(labels, ContrastiveDataset) else None)
    )
    tok = _token_labels(labels, n_pos)
    pos = _positions(intervention, n_pos)
    x = ["last"] if pos is None else [tok[p] if tok else str(p) for p in pos]
    y = [str(l) for l in intervention.layers]
    panels = []
    for site in intervention.sites:
        a = intervention.alpha(site).detach().float().cpu()  # (L, P) or (L, P, H)
        if site != "z":
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
        panels += [Panel(a[:, j].numpy(), heads, y, title=f"z @ {x[j]}", x_title="head") for j in picks]
    fig = heatmap_grid(
        [panels], title=title or "ActivScalar alphas (h~ = h (1 + beta alpha))", zmax=zmax, colorbar_titles=["alpha"]
    )
    for p, t in zip(panels, fig.data):
        t.name = p.title
    return fig


@torch.no_grad()
def beta_sweep(
    model,
    intervention: Intervention,
    ds: ContrastiveDataset,
    betas: Float[Tensor, " n_beta"] | Sequence[float | int] = DEFAULT_BETAS,
    batch_size: int = 32,
    progress: bool = True,
) -> pd.DataFrame:
    """Mean (and sample std) of f_c - f_w over ``ds`` at each beta, the accuracy (share of
    prompts with f_c > f_w) and the mean logits f_c, f_w. beta = 0 is the clean model.

    >>> from mechsteer.tasks import ccc
    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2"); ds = ccc(model, n=4)
    >>> iv = DynScalar.for_model(model, sites=["mlp_out"])
    >>> beta_sweep(model, iv, ds, betas=[-1, 0, 1], progress=False).shape
    (3, 6)
    """
    betas = torch.as_tensor(betas, dtype=torch.float32).flatten()
    if betas.numel() == 0 or batch_size < 1:
        raise ValueError(f"beta_sweep needs at least one beta and batch_size >= 1 (got {betas.numel()}, {batch_size}).")
    device = next(model.parameters()).device
    intervention.to(device)
    n, k = len(ds), betas.numel()
    tokens = ds.tokens.to(device).repeat(k, 1)  # (k N, T): every prompt at every beta
    beta_all = betas.to(device).repeat_interleave(n)  # (k N,)
    correct, wrong = ds.correct.to(device).repeat(k), ds.wrong.to(device).repeat(k)
    fc, fw = [], []
    for i in tqdm(range(0, k * n, batch_size), desc="beta sweep", disable=not progress):
        sl = slice(i, i + batch_size)
        logits = intervention(model, tokens[sl], beta_all[sl])[:, -1]  # (b, V)
        fc.append(logits.gather(-1, correct[sl, None])[:, 0].float().cpu())
        fw.append(logits.gather(-1, wrong[sl, None])[:, 0].float().cpu())
    fc, fw = torch.cat(fc).view(k, n), torch.cat(fw).view(k, n)
    ld = fc - fw  # (k, N)
    return pd.DataFrame(
        {
            "beta": betas.tolist(),
            "logit_diff": ld.mean(1).tolist(),
            "logit_diff_std": ld.std(1, correction=1 if n > 1 else 0).tolist(),
            "accuracy": (ld > 0).float().mean(1).tolist(),
            "logit_correct": fc.mean(1).tolist(),
            "logit_wrong": fw.mean(1).tolist(),
        },
        columns=SWEEP_COLUMNS,
    )


def flip_beta(df: pd.DataFrame) -> float:
    """The beta where the mean logit difference crosses zero (linear interpolation between
    the sweep's betas; the crossing nearest beta = 0 if several), NaN if it never does."""
    d = df.sort_values("beta")
    b, y = d["beta"].to_numpy(float), d["logit_diff"].to_numpy(float)
    hits = [b[i] for i in range(len(b)) if y[i] == 0]
    for i in range(len(b) - 1):
        if y[i] * y[i + 1] < 0:
            hits.append(b[i] - y[i] * (b[i + 1] - b[i]) / (y[i + 1] - y[i]))
    return float(min(hits, key=abs)) if hits else float("nan")


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


def _order(iv: Intervention) -> list[tuple[str, int]]:
    """(site, layer index) keys in the intervention's order (hooks fire in model order)."""
    return [(s, li) for s in iv.sites for li in range(len(iv.layers))]


def _clean_acts(model, iv: Intervention, tokens) -> dict[tuple[str, int], Tensor]:
    """Clean activations at every (site, layer index) the intervention edits, recorded by
    hooks that return nothing (the forward pass is unchanged)."""
    acts: dict[tuple[str, int], Tensor] = {}

    def record(key):
        def fn(x: Tensor, hook) -> None:
            acts[key] = x.detach()

        return fn

    hooks = [(hook_name(s, l, model), record((s, li))) for s in iv.sites for li, l in enumerate(iv.layers)]
    with hooked(model, hooks):
        model(tokens)
    return acts


def _frame(site: str, layer: int, pos: list[int], labels: list[str], values: dict[str, np.ndarray]) -> pd.DataFrame:
    """Rows (site, layer, pos[, head]) from (P,) or (P, H) arrays; head is <NA> off ``z``."""
    first = next(iter(values.values()))
    n_heads = first.shape[1] if first.ndim == 2 else 1
    p = np.repeat(np.asarray(pos), n_heads)
    head = pd.array(np.tile(np.arange(n_heads), len(pos)) if first.ndim == 2 else [pd.NA] * len(pos), dtype="Int64")
    out = {"site": site, "layer": layer, "pos": p, "head": head, "token": [labels[i] for i in p]}
    return pd.DataFrame({**out, **{k: v.reshape(-1) for k, v in values.items()}})


@torch.no_grad()
def steervec_geometry(
    model,
    intervention: SteerVec,
    ds: ContrastiveDataset,
    beta: float | int = 1.0,
    batch_size: int = 32,
    progress: bool = True,
) -> pd.DataFrame:
    """Fig. 4: per location (site, layer, pos[, head]) the mean over prompts of
    ||h~||/||h|| - 1 (``norm_change``) and 1 - cos(h, h~) (``cos_change``), h~ = h + beta v
    on the clean h. 1 - cos is computed as ||h/||h|| - h~/||h~||||^2 / 2 (exact 0 when h~ = h).

    >>> from mechsteer.tasks import ccc
    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2"); ds = ccc(model, n=4)
    >>> iv = SteerVec.for_model(model, sites=["mlp_out"], positions="last", n_pos=ds.n_pos)
    >>> steervec_geometry(model, iv, ds, progress=False).columns.tolist()
    ['site', 'layer', 'pos', 'head', 'token', 'norm_change', 'cos_change']
    """
    if not isinstance(intervention, SteerVec):
        raise TypeError(f"steervec_geometry reads SteerVec vectors; got {type(intervention).__name__}.")
    if intervention.n_pos is not None and intervention.n_pos != ds.n_pos:
        raise ValueError(f"The SteerVec was built for {intervention.n_pos} tokens; ds has n_pos={ds.n_pos}.")
    intervention.check_model(model)
    device = next(model.parameters()).device
    intervention.to(device)
    pos = _positions(intervention, ds.n_pos)
    sums: dict[tuple[str, int], list[Tensor]] = {}
    for i in tqdm(range(0, len(ds), batch_size), desc="steervec geometry", disable=not progress):
        acts = _clean_acts(model, intervention, ds.tokens[i : i + batch_size].to(device))
        for (s, li), h in acts.items():
            h = h[:, pos].double()  # (B, P, *tail)
            ht = intervention.edit(s, li, h, torch.full((h.shape[0],), float(beta), dtype=h.dtype, device=h.device))
            n0, n1 = h.norm(dim=-1, keepdim=True), ht.norm(dim=-1, keepdim=True)  # (B, P[, H], 1)
            tiny = torch.finfo(h.dtype).tiny
            norm = (n1 / n0.clamp_min(tiny) - 1)[..., 0]
            cos = (h / n0.clamp_min(tiny) - ht / n1.clamp_min(tiny)).pow(2).sum(-1) / 2
            acc = sums.setdefault((s, li), [0, 0])
            acc[0], acc[1] = acc[0] + norm.sum(0), acc[1] + cos.sum(0)
    frames = [
        _frame(
            s,
            intervention.layers[li],
            pos,
            ds.labels,
            {"norm_change": (a[0] / len(ds)).cpu().numpy(), "cos_change": (a[1] / len(ds)).cpu().numpy()},
        )
        for (s, li), a in ((key, sums[key]) for key in _order(intervention))
    ]
    return pd.concat(frames, ignore_index=True)


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


@torch.no_grad()
def dynscalar_alphas(
    model, intervention: DynScalar, prompts: Sequence[str], progress: bool = True
) -> list[pd.DataFrame]:
    """Fig. 5: alpha_{l,i} = g_l^T h_{l,i}/||h_{l,i}|| on each prompt's clean activations,
    one DataFrame per prompt (columns prompt, site, layer, pos, head, token, alpha).

    >>> from mechsteer.tiny import tiny_model
    >>> model = tiny_model("gpt2")
    >>> iv = DynScalar.for_model(model, sites=["attn_out", "z"])
    >>> frames = dynscalar_alphas(model, iv, ["The capital of", " Paris"], progress=False)
    >>> [f["pos"].nunique() for f in frames], frames[1].columns.tolist()
    ([4, 2], ['prompt', 'site', 'layer', 'pos', 'head', 'token', 'alpha'])
    """
    if not isinstance(intervention, DynScalar):
        raise TypeError(f"dynscalar_alphas reads DynScalar probes; got {type(intervention).__name__}.")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, got one string; wrap it in a list.")
    intervention.check_model(model)
    device = next(model.parameters()).device
    intervention.to(device)
    out = []
    for k, prompt in enumerate(tqdm(prompts, desc="dynscalar alphas", disable=not progress)):
        tokens = model.to_tokens(prompt).to(device)  # (1, T)
        labels = [f"{i}:{model.tokenizer.decode([t])}" for i, t in enumerate(tokens[0].tolist())]
        pos = _positions(intervention, tokens.shape[1])
        acts = _clean_acts(model, intervention, tokens)
        frames = [
            _frame(
                s,
                intervention.layers[li],
                pos,
                labels,
                {"alpha": intervention.alpha(s, li, h[0, pos]).float().cpu().numpy()},
            )
            for (s, li), h in ((key, acts[key]) for key in _order(intervention))
        ]
        df = pd.concat(frames, ignore_index=True)
        df.insert(0, "prompt", k)
        out.append(df)
    return out


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
