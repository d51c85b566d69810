"""The one result type every attribution method returns.

An ``AttributionResult`` holds scores over model locations with named axes, drawn from one
vocabulary: ``site``, ``layer``, ``head``, ``pos``. Examples:

- ``("layer", "pos")``: one site (``attn_out``) per layer and token position;
- ``("site", "layer", "pos")``: several sites stacked (``attn_out``, ``mlp_out``);
- ``("layer", "head")``: heads, summed over positions or read at one position;
- ``("layer", "head", "pos")``: heads per position.

Scores are averaged over the dataset; ``per_prompt`` keeps them per prompt
(``("prompt", *axes)``) when a method is asked to. The result carries the prompt's string
tokens (position labels), the method's name, the metric explained and the time it took,
converts to a tidy DataFrame, ranks its top-k locations and plots itself.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from mechsteer._validate import positive_int

AXES = ("site", "layer", "head", "pos")


@dataclass
class AttributionResult:
    """Scores over model locations. ``scores.shape`` matches ``axes``."""

    scores: Tensor
    axes: tuple[str, ...]
    method: str
    metric: str = "logit_diff"
    labels: dict[str, list[str]] = field(default_factory=dict)  # per-axis tick labels
    seconds: float = float("nan")
    per_prompt: Tensor | None = None  # ("prompt", *axes)
    forward_equivalents: float | None = None  # seconds / one plain forward of the same batch
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.scores, Tensor):
            raise TypeError(f"scores must be a tensor, got {type(self.scores).__name__}.")
        self.axes = tuple(self.axes)
        unknown = [a for a in self.axes if a not in AXES]
        if unknown:
            raise ValueError(f"Unknown axes {unknown}; axes come from {AXES}.")
        if self.scores.ndim != len(self.axes):
            raise ValueError(f"scores have shape {tuple(self.scores.shape)} but axes are {self.axes}.")
        if self.per_prompt is not None and tuple(self.per_prompt.shape[1:]) != tuple(self.scores.shape):
            raise ValueError(
                f"per_prompt has shape {tuple(self.per_prompt.shape)}; expected (prompt, {tuple(self.scores.shape)})."
            )
        self.scores = self.scores.detach().float().cpu()
        if self.per_prompt is not None:
            self.per_prompt = self.per_prompt.detach().float().cpu()
        for axis, labels in self.labels.items():
            if axis in self.axes and len(labels) != self.scores.shape[self.axes.index(axis)]:
                raise ValueError(f"{len(labels)} labels for axis {axis!r} of size {self.scores.shape[self.axes.index(axis)]}.")

    # ---- views -------------------------------------------------------------------------
    def _axis(self, axis: str, axes: Sequence[str] | None = None) -> int:
        """Position of ``axis`` in ``axes`` (default this result's); ValueError naming them otherwise."""
        axes = tuple(self.axes if axes is None else axes)
        if axis not in axes:
            raise ValueError(f"This result has no axis {axis!r}; its axes are {axes}.")
        return axes.index(axis)

    def axis_labels(self, axis: str) -> list[str]:
        """Tick labels of ``axis`` (given labels, else indices)."""
        self._axis(axis)
        if axis in self.labels:
            return list(self.labels[axis])
        return [str(i) for i in range(self.scores.shape[self.axes.index(axis)])]

    def select(self, **index: int | str) -> "AttributionResult":
        """Fix axes by index or label, e.g. ``result.select(site="attn_out")``."""
        scores, per_prompt, axes, labels = self.scores, self.per_prompt, list(self.axes), dict(self.labels)
        for axis, value in index.items():
            d = self._axis(axis, axes)
            names, size = self.axis_labels(axis), scores.shape[d]
            if isinstance(value, str):
                if value not in names:
                    raise ValueError(f"select({axis}={value!r}): no such label; {axis} labels are {names}.")
                i = names.index(value)
            elif isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"select({axis}=...) takes an int index or a str label, got {value!r} ({type(value).__name__}).")
            elif not -size <= value < size:
                raise ValueError(f"select({axis}={value}) is out of range: axis {axis!r} has {size} entries (0..{size - 1}).")
            else:
                i = int(value)
            scores = scores.select(d, i)
            per_prompt = per_prompt.select(d + 1, i) if per_prompt is not None else None
            axes.pop(d)
            labels.pop(axis, None)
        return replace(self, scores=scores, per_prompt=per_prompt, axes=tuple(axes), labels=labels)

    def sum(self, axis: str) -> "AttributionResult":
        """Sum over ``axis`` (e.g. heads per position -> heads summed over positions)."""
        d = self._axis(axis)
        labels = {k: v for k, v in self.labels.items() if k != axis}
        pp = self.per_prompt.sum(d + 1) if self.per_prompt is not None else None
        return replace(self, scores=self.scores.sum(d), per_prompt=pp, axes=self.axes[:d] + self.axes[d + 1 :], labels=labels)

    # ---- tables ------------------------------------------------------------------------
    def to_frame(self, per_prompt: bool = False):
        """Tidy table: one row per location (per prompt when asked), axis columns + ``score``."""
        import pandas as pd

        values = self.per_prompt if per_prompt else self.scores
        if values is None:
            raise ValueError("This result kept no per-prompt scores; rerun the method with per_prompt=True.")
        axes = (("prompt",) if per_prompt else ()) + self.axes
        grids = torch.meshgrid(*[torch.arange(n, device=values.device) for n in values.shape], indexing="ij")
        data = {}
        for axis, g in zip(axes, grids):
            idx = g.reshape(-1)
            data[axis] = idx.numpy()
            if axis == "site" or (axis == "pos" and "pos" in self.labels):
                data["token" if axis == "pos" else axis] = [self.axis_labels(axis)[i] for i in idx.tolist()]
        data["score"] = values.reshape(-1).numpy()
        df = pd.DataFrame(data)
        df.insert(0, "method", self.method)
        return df

    def top_k(self, k: int = 10, by: str = "abs"):
        """The ``k`` locations with the largest scores (``by="abs"``, ``"pos"`` or ``"neg"``)."""
        k = positive_int("k", k)
        df = self.to_frame()
        key = {"abs": df["score"].abs(), "pos": df["score"], "neg": -df["score"]}.get(by)
        if key is None:
            raise ValueError(f"by must be 'abs', 'pos' or 'neg', got {by!r}.")
        return df.loc[key.sort_values(ascending=False).index[:k]].reset_index(drop=True)

    def flat(self) -> Tensor:
        """Scores as one vector (for correlations between methods on the same grid)."""
        return self.scores.reshape(-1)

    # ---- plots -------------------------------------------------------------------------
    def grid(self) -> tuple[Tensor, str, str]:
        """The 2-D (rows, columns) view used for plotting, with the axis names."""
        if len(self.axes) != 2:
            raise ValueError(f"Plot a 2-D view: this result has axes {self.axes}; use select() or sum() first.")
        rows, cols = self.axes
        return self.scores, rows, cols

    def plot(self, title: str | None = None, zmax: float | None = None):
        """Plotly heatmap: layer x position (token labels) or layer x head; one panel per site."""
        from mechsteer.plots import facet_heatmaps, heatmap

        title = title or f"{self.method}: {self.metric}"
        if "site" in self.axes and len(self.axes) == 3:
            panels = [self.select(site=s) for s in self.axis_labels("site")]
            return facet_heatmaps(panels, titles=self.axis_labels("site"), title=title, zmax=zmax)
        z, rows, cols = self.grid()
        return heatmap(
            z.numpy(),
            x_labels=self.axis_labels(cols),
            y_labels=self.axis_labels(rows),
            x_title=cols,
            y_title=rows,
            title=title,
            zmax=zmax,
        )

    def token_view(self, *, prompt: int | None = None, tokens: Sequence[str] | None = None, zmax: float | None = None, title: str | None = None):
        """Scores drawn on the prompt's tokens (HTML, zero-centred, hover for the value).

        Needs a ``pos`` axis: ``("pos",)`` gives one coloured line, ``(X, "pos")`` one line per
        X (layer, head, site). ``prompt=i`` draws prompt i's own scores (results kept with
        ``per_prompt=True``); pass its ``tokens`` (``ds.str_tokens[i]``), since position labels
        are the first prompt's.

        >>> r = AttributionResult(torch.tensor([0.2, -1.0, 0.5]), ("pos",), "attnlrp", labels={"pos": ["0:A", "1: B", "2: C"]})
        >>> r.token_view().html.count("class='ms-tok'")
        3
        """
        from mechsteer.views import token_html

        self._axis("pos")
        values = self.scores
        if prompt is not None:
            if self.per_prompt is None:
                raise ValueError("token_view(prompt=...) needs per-prompt scores; rerun the method with per_prompt=True.")
            n = self.per_prompt.shape[0]
            if isinstance(prompt, bool) or not isinstance(prompt, numbers.Integral) or not -n <= prompt < n:
                raise ValueError(f"token_view(prompt={prompt!r}): give a prompt index in 0..{n - 1}.")
            values = self.per_prompt[int(prompt)]
        if len(self.axes) > 2:
            raise ValueError(f"token_view draws (pos,) or (X, pos) scores; this result has axes {self.axes}: select() or sum() first.")
        d = self.axes.index("pos")
        z = values.numpy() if d == len(self.axes) - 1 else values.numpy().T
        other = [a for a in self.axes if a != "pos"]
        rows = [f"{other[0]} {x}" for x in self.axis_labels(other[0])] if other else None
        toks = list(tokens) if tokens is not None else self.axis_labels("pos")
        return token_html(z, toks, row_labels=rows, zmax=zmax, title=title if title is not None else f"{self.method}: {self.metric}")

    def _repr_html_(self) -> str:  # Jupyter: the scores on the tokens, or a coloured grid
        from mechsteer.views import result_html

        return result_html(self)

    def __repr__(self) -> str:
        shape = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.scores.shape))
        return f"AttributionResult(method={self.method!r}, metric={self.metric!r}, {shape}, seconds={self.seconds:.3g})"


def stack_sites(results: Sequence[AttributionResult], sites: Sequence[str]) -> AttributionResult:
    """Stack per-site results of one method into one result with a leading ``site`` axis."""
    results, sites = list(results), list(sites)
    if not results or len(results) != len(sites):
        raise ValueError(f"Give one result per site: got {len(results)} result(s) for sites {sites}.")
    shapes = {(r.axes, tuple(r.scores.shape)) for r in results}
    if len(shapes) > 1:
        raise ValueError(f"Results to stack must share axes and shape; got {sorted(shapes)}.")
    first = results[0]
    pp = None
    if all(r.per_prompt is not None for r in results):
        pp = torch.stack([r.per_prompt for r in results], 1)
    return replace(
        first,
        scores=torch.stack([r.scores for r in results]),
        per_prompt=pp,
        axes=("site",) + first.axes,
        labels={**first.labels, "site": list(sites)},
        seconds=sum(r.seconds for r in results),
    )
