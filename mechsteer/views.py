"""Views to look at: attention patterns, and scores drawn on the prompt's tokens.

- ``attention_patterns(model, prompt, layer)``: one forward through the run layer
  (``runs.cache_at`` at the ``pattern`` site), drawn as a query x key heatmap per head with
  token labels and a head selector. The causal mask's upper triangle is left blank, and the
  colour scale is fixed to [0, 1] so heads compare by colour. ``attention_figure`` draws a
  pattern you already have; ``circuitsvis_attention`` gives circuitsvis' interactive viewer
  (``pip install -e ".[viz]"``; its JavaScript comes from a CDN, so it needs the network).
- ``token_html(scores, tokens)``: a prompt's tokens coloured by score on a diverging scale
  centred at zero (red > 0, blue < 0, white = 0), the value on hover: how inseq and lxt show
  token-level relevance. Rows of a 2-D grid (layer x pos, prompt x pos) become lines of
  tokens; a grid without a ``pos`` axis becomes a table of coloured cells.
  ``result_html(result)`` is what ``AttributionResult._repr_html_`` shows in Jupyter.

Everything here draws what it is given; only ``attention_patterns`` runs the model (one
forward, to read the patterns it draws).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import plotly.graph_objects as go

__all__ = ["HTML", "attention_patterns", "attention_figure", "circuitsvis_attention", "token_html", "grid_html", "result_html"]

_STYLE = (
    "<style>.ms-tok{white-space:pre;padding:1px 1px;margin:0 1px 2px 0;border-radius:3px;display:inline-block;"
    "font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;line-height:1.5}"
    ".ms-row{margin:1px 0}.ms-lab{display:inline-block;min-width:6em;color:#555;font-size:12px;"
    "font-family:system-ui,sans-serif}.ms-grid td{padding:1px 4px;text-align:right;font-size:11px;"
    "font-family:ui-monospace,monospace}.ms-grid th{font-size:11px;font-weight:normal;color:#555;padding:1px 4px}"
    ".ms-cap{font-family:system-ui,sans-serif;font-size:13px;margin:4px 0}</style>"
)


@dataclass(frozen=True)
class HTML:
    """An HTML fragment that Jupyter displays (``_repr_html_``); ``str()`` gives the markup."""

    html: str

    def _repr_html_(self) -> str:
        return self.html

    def __str__(self) -> str:
        return self.html


# ---- colours -------------------------------------------------------------------------------
def _colour(value: float, zmax: float) -> tuple[str, str]:
    """(background, text colour) of ``value`` on plotly's RdBu_r, centred at 0, range [-zmax, zmax]."""
    from plotly.colors import sample_colorscale

    if not np.isfinite(value):
        return "#dddddd", "#000"
    t = float(np.clip(value / zmax, -1.0, 1.0)) if zmax > 0 else 0.0
    bg = sample_colorscale("RdBu_r", [(t + 1) / 2])[0]
    return bg, ("#fff" if abs(t) > 0.6 else "#000")


def _absmax(z: np.ndarray) -> float:
    finite = np.abs(z[np.isfinite(z)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0


def _clean_token(label: str, i: int) -> str:
    """A position label without its ``"{i}:"`` prefix, with newlines and tabs visible."""
    prefix = f"{i}:"
    tok = label[len(prefix):] if label.startswith(prefix) else label
    return tok.replace("\n", "\\n").replace("\t", "\\t")


def _colourbar(zmax: float, caption: str) -> str:
    stops = ", ".join(_colour(v, 1.0)[0] for v in np.linspace(-1, 1, 11))
    return (
        f"<div class='ms-cap'>{html.escape(caption)} <span style='font-size:11px;color:#555'>"
        f"{-zmax:.3g} <span style='display:inline-block;width:120px;height:10px;vertical-align:middle;"
        f"background:linear-gradient(to right, {stops})'></span> {zmax:.3g}</span></div>"
    )


# ---- token and grid views ------------------------------------------------------------------
def token_html(
    scores: Any,
    tokens: Sequence[str],
    *,
    row_labels: Sequence[str] | None = None,
    zmax: float | None = None,
    title: str = "",
) -> HTML:
    """Tokens coloured by score: ``scores`` is ``(pos,)`` (one line) or ``(rows, pos)``.

    Zero is white, positive red, negative blue; ``zmax`` (default: the largest |score|)
    sets full colour. Hovering a token shows its position and value.

    >>> view = token_html([0.5, -1.0, 0.0], ["The", " cat", " sat"], title="relevance")
    >>> 'title="1: &#x27; cat&#x27; = -1"' in view.html, view.html.count("class='ms-tok'")
    (True, 3)
    """
    z = np.asarray(scores, dtype=float)
    if z.ndim == 1:
        z = z[None]
    if z.ndim != 2 or z.shape[1] != len(tokens):
        raise ValueError(f"token_html needs scores of shape (pos,) or (rows, pos) with pos = {len(tokens)} tokens; got {z.shape}.")
    if row_labels is not None and len(row_labels) != z.shape[0]:
        raise ValueError(f"row_labels has {len(row_labels)} entries for {z.shape[0]} rows.")
    zmax = float(zmax) if zmax is not None else _absmax(z)
    toks = [_clean_token(t, i) for i, t in enumerate(tokens)]
    lines = []
    for r, row in enumerate(z):
        spans = []
        for i, (tok, v) in enumerate(zip(toks, row)):
            bg, fg = _colour(v, zmax)
            tip = html.escape(f"{i}: {tok!r} = {v:.4g}", quote=True)
            spans.append(f"<span class='ms-tok' style='background:{bg};color:{fg}' title=\"{tip}\">{html.escape(tok) or '&nbsp;'}</span>")
        lab = f"<span class='ms-lab'>{html.escape(str(row_labels[r]))}</span>" if row_labels is not None else ""
        lines.append(f"<div class='ms-row'>{lab}{''.join(spans)}</div>")
    return HTML(f"<div class='ms-view'>{_STYLE}{_colourbar(zmax, title)}{''.join(lines)}</div>")


def grid_html(
    scores: Any,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    *,
    row_title: str = "",
    col_title: str = "",
    zmax: float | None = None,
    title: str = "",
) -> HTML:
    """A 2-D grid (e.g. layer x head) as a table of coloured cells with their values."""
    z = np.asarray(scores, dtype=float)
    if z.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"grid_html: scores of shape {z.shape} for {len(row_labels)} x {len(col_labels)} labels.")
    zmax = float(zmax) if zmax is not None else _absmax(z)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in col_labels)
    body = []
    for lab, row in zip(row_labels, z):
        cells = []
        for c, v in zip(col_labels, row):
            bg, fg = _colour(v, zmax)
            tip = html.escape(f"{row_title} {lab}, {col_title} {c} = {v:.4g}", quote=True)
            cells.append(f"<td style='background:{bg};color:{fg}' title=\"{tip}\">{v:.2g}</td>")
        body.append(f"<tr><th>{html.escape(str(lab))}</th>{''.join(cells)}</tr>")
    corner = html.escape(f"{row_title} \\ {col_title}")
    return HTML(
        f"<div class='ms-view'>{_STYLE}{_colourbar(zmax, title)}<table class='ms-grid'>"
        f"<tr><th>{corner}</th>{head}</tr>{''.join(body)}</table></div>"
    )


def result_html(result, *, zmax: float | None = None, max_rows: int = 64) -> str:
    """What Jupyter shows for an ``AttributionResult``: a one-line summary, then its scores
    on the tokens (results with a ``pos`` axis), or a coloured grid (``layer x head``),
    one block per site; results with three non-site axes show their top 10 locations."""
    shape = ", ".join(f"{a}={n}" for a, n in zip(result.axes, result.scores.shape))
    head = (
        f"<div class='ms-cap'><b>{html.escape(result.method)}</b> explaining <code>{html.escape(result.metric)}</code>"
        f" &middot; {html.escape(shape)} &middot; {result.seconds:.3g} s &middot; zero-centred colours, hover for values</div>"
    )
    if "site" in result.axes:
        parts = [result_block(result.select(site=s), zmax=zmax, max_rows=max_rows, title=f"site {s}") for s in result.axis_labels("site")]
    else:
        parts = [result_block(result, zmax=zmax, max_rows=max_rows)]
    return head + "".join(parts)


def result_block(result, *, zmax: float | None = None, max_rows: int = 64, title: str = "") -> str:
    """One site of ``result`` as HTML (see ``result_html``)."""
    axes, z = result.axes, result.scores.numpy()
    if z.ndim == 1:
        return token_html(z, result.axis_labels(axes[0]), zmax=zmax, title=title).html if axes == ("pos",) else grid_html(
            z[None], [""], result.axis_labels(axes[0]), col_title=axes[0], zmax=zmax, title=title).html
    if z.ndim == 2:
        rows, cols = axes
        if "pos" in axes:
            if rows == "pos":
                z, rows, cols = z.T, cols, rows
            labels = result.axis_labels(rows)[:max_rows]
            return token_html(z[:max_rows], result.axis_labels("pos"), row_labels=[f"{rows} {x}" for x in labels],
                              zmax=zmax, title=title).html
        return grid_html(z[:max_rows], result.axis_labels(rows)[:max_rows], result.axis_labels(cols),
                         row_title=rows, col_title=cols, zmax=zmax, title=title).html
    top = result.top_k(10).to_html(index=False, border=0)
    return f"<div class='ms-cap'>{html.escape(title)} top 10 locations by |score| (axes {axes}; select() or sum() for a view)</div>{top}"


# ---- attention -----------------------------------------------------------------------------
def _prompt_tokens(model, prompt, index: int):
    """(tokens (1, pos), string tokens) of a prompt string, a dataset's prompt ``index``, or token ids."""
    import torch

    if isinstance(prompt, str):
        tokens = model.to_tokens(prompt)
    elif hasattr(prompt, "tokens"):  # a ContrastiveDataset (or anything with .tokens)
        n = prompt.tokens.shape[0]
        if not -n <= index < n:
            raise ValueError(f"prompt_index={index} is out of range for a dataset of {n} prompts.")
        tokens = prompt.tokens[index : index + 1 if index != -1 else None]
    elif isinstance(prompt, torch.Tensor) and prompt.dtype in (torch.long, torch.int32, torch.int64):
        tokens = prompt if prompt.ndim == 2 else prompt[None]
        tokens = tokens[index : index + 1 if index != -1 else None]
    else:
        raise TypeError(f"prompt must be a str, a dataset with .tokens or integer token ids; got {type(prompt).__name__}.")
    strs = [model.tokenizer.decode([t]) for t in tokens[0].tolist()]
    return tokens, strs


def attention_patterns(model, prompt, layer: int, heads: Sequence[int] | None = None, *, prompt_index: int = 0) -> go.Figure:
    """Attention patterns of ``layer`` on one prompt: query x key heatmaps with token labels
    and a selector over ``heads`` (default all). ``prompt`` is a string, a dataset (its
    prompt ``prompt_index``) or token ids.

    >>> from mechsteer.tiny import tiny_model
    >>> fig = attention_patterns(tiny_model("llama"), "When Mary and John went", layer=1)
    >>> len(fig.data), fig.data[0].visible, [b.label for b in fig.layout.updatemenus[0].buttons][:2]
    (4, True, ['head 0', 'head 1'])
    """
    from mechsteer.runs import cache_at

    tokens, strs = _prompt_tokens(model, prompt, prompt_index)
    _, store = cache_at(model, tokens, [("pattern", layer)])
    pattern = store[("pattern", layer)][0].float().cpu().numpy()  # (head, query_pos, key_pos)
    n_heads = pattern.shape[0]
    heads = list(range(n_heads)) if heads is None else [int(h) for h in heads]
    bad = [h for h in heads if not 0 <= h < n_heads]
    if bad or not heads:
        raise ValueError(f"heads {bad or heads} out of range: layer {layer} has heads 0..{n_heads - 1}.")
    name = getattr(model.cfg, "model_name", "")
    return attention_figure(pattern[heads], strs, head_labels=[str(h) for h in heads], title=f"{name}, layer {layer}")


def attention_figure(pattern: Any, tokens: Sequence[str], *, head_labels: Sequence[str] | None = None, title: str = "") -> go.Figure:
    """Draw attention weights ``pattern`` of shape ``(head, query_pos, key_pos)``: one heatmap
    per head (selector above the plot), query 0 at the top, keys after the query blank."""
    a = np.asarray(pattern, dtype=float)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[1] != len(tokens):
        raise ValueError(f"pattern must be (head, query_pos, key_pos) with pos = {len(tokens)} tokens; got {a.shape}.")
    heads = list(head_labels) if head_labels is not None else [str(h) for h in range(a.shape[0])]
    labels = [f"{i}:{_clean_token(t, i)}" for i, t in enumerate(tokens)]  # unique: category axes merge equal labels
    n = len(labels)
    future = np.triu(np.ones((n, n), dtype=bool), k=1)
    fig = go.Figure()
    for h, grid in zip(heads, a):
        fig.add_trace(go.Heatmap(
            z=np.where(future, np.nan, grid), x=labels, y=labels, zmin=0.0, zmax=1.0, colorscale="Blues",
            visible=h == heads[0], name=f"head {h}", colorbar={"title": "weight"}, hoverongaps=False,
            hovertemplate=f"head {h}<br>query %{{y}}<br>key %{{x}}<br>weight %{{z:.3f}}<extra></extra>",
        ))
    titles = [f"Attention pattern: {title}, head {h}" if title else f"Attention pattern, head {h}" for h in heads]
    buttons = [
        {"label": f"head {h}", "method": "update", "args": [{"visible": [j == i for j in range(len(heads))]}, {"title.text": t}]}
        for i, (h, t) in enumerate(zip(heads, titles))
    ]
    side = max(420, 22 * n + 220)
    fig.update_layout(
        title=titles[0], template="plotly_white", height=side, width=side + 120,
        updatemenus=[{"buttons": buttons, "x": 1.0, "xanchor": "right", "y": 1.08, "yanchor": "bottom"}] if len(heads) > 1 else [],
        xaxis={"title": "key token (attended to)", "type": "category", "tickangle": -60},
        yaxis={"title": "query token (attending)", "type": "category", "autorange": "reversed"},
    )
    return fig


def circuitsvis_attention(model, prompt, layer: int, *, prompt_index: int = 0):
    """circuitsvis' interactive attention viewer for every head of ``layer`` (needs the
    ``[viz]`` extra; the viewer loads its JavaScript from a CDN when displayed)."""
    try:
        import circuitsvis as cv
    except ImportError as e:  # optional dependency
        raise ImportError('circuitsvis_attention needs circuitsvis: pip install -e ".[viz]" (or pip install circuitsvis).') from e
    from mechsteer.runs import cache_at

    tokens, strs = _prompt_tokens(model, prompt, prompt_index)
    _, store = cache_at(model, tokens, [("pattern", layer)])
    labels = [_clean_token(t, i) for i, t in enumerate(strs)]
    return cv.attention.attention_patterns(tokens=labels, attention=store[("pattern", layer)][0].float().cpu())

