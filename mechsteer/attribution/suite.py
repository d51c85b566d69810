"""Run several attribution methods on one dataset, on shared grids, with their costs.

Three grids every method can fill (AtP* fills "heads" with GradDrop on whole heads;
``false_negatives()`` scores atp, atp* and atp-ig against patching):

- ``heads``: layer x head (patching each head's z at all positions; AtP on z summed over
  positions; DLA per head; AttnLRP relevance on each head's attention weights from the
  last position);
- ``attn_out`` and ``mlp_out``: layer x position.

Patching and AtP run in the same direction (default ``"noising"``, the default of both:
what breaks the clean behaviour, the direction AtP's clean-run gradient estimates, and
the clean run DLA and AttnLRP explain), so their rank correlation compares like with
like. Each method's cost is its wall time divided by one plain forward pass of the same
batch, measured in the same run (``forward_equivalents``). Every result's ``method`` is
the name passed in ``methods``. ``Suite.write(out)`` saves the tables, figures and
summary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from mechsteer._validate import positive_int
from mechsteer.attribution._common import check_dataset, position_axis
from mechsteer.attribution.atp import attribution_patching_all
from mechsteer.attribution.atp_ig import atp_ig_all
from mechsteer.attribution.atp_star import atp_star_all
from mechsteer.attribution.compare import Comparison, compare
from mechsteer.attribution.dla import direct_logit_attribution_all
from mechsteer.attribution.lrp import attnlrp
from mechsteer.attribution.patching import activation_patching
from mechsteer.attribution.recall import false_negatives
from mechsteer.attribution.result import AttributionResult
from mechsteer.runs import parse_bytes, plain_forward_seconds
from mechsteer.tasks.base import ContrastiveDataset

METHODS = ("patching", "atp", "atp*", "atp-ig", "dla", "attnlrp")
IG_STEPS = 4  # points on the path for method "atp-ig"
GRIDS = ("heads", "attn_out", "mlp_out")


def _patching(model, ds, direction, progress, positions, max_memory=None):
    heads = activation_patching(model, ds, site="z", per_position=False, direction=direction, progress=progress,
                                max_memory=max_memory)
    sites = activation_patching(model, ds, site=["attn_out", "mlp_out"], direction=direction, progress=progress,
                                positions=positions, max_memory=max_memory)
    out = {"heads": heads, "attn_out": sites.select(site="attn_out"), "mlp_out": sites.select(site="mlp_out")}
    return out, heads.seconds + sites.seconds


def _heads(res, ds):
    # prompts of different lengths: the whole-head total is summed per prompt (head_totals)
    return res["z"] if ds.is_padded else res["z"].sum("pos")


def _atp(model, ds, direction, progress, positions, max_memory=None):
    res = attribution_patching_all(model, ds, sites=("attn_out", "mlp_out", "z"), direction=direction,
                                   positions=positions, head_totals=ds.is_padded)
    return {"heads": _heads(res, ds), "attn_out": res["attn_out"], "mlp_out": res["mlp_out"]}, res["z"].seconds


def _atp_star(model, ds, direction, progress, positions, max_memory=None):
    # head_totals: GradDrop combines whole-head estimates (a head is one node of the heads grid)
    res = atp_star_all(model, ds, sites=("attn_out", "mlp_out", "z"), direction=direction, head_totals=True,
                       positions=positions)
    return {"heads": res["z"], "attn_out": res["attn_out"], "mlp_out": res["mlp_out"]}, res["z"].seconds


def _atp_ig(model, ds, direction, progress, positions, max_memory=None):
    res = atp_ig_all(model, ds, sites=("attn_out", "mlp_out", "z"), direction=direction, steps=IG_STEPS,
                     positions=positions, head_totals=ds.is_padded)
    return {"heads": _heads(res, ds), "attn_out": res["attn_out"], "mlp_out": res["mlp_out"]}, res["z"].seconds


def _dla(model, ds, direction, progress, positions, max_memory=None):
    res = direct_logit_attribution_all(model, ds, sites=("z", "attn_out", "mlp_out"), positions=positions)
    return {"heads": res["z"], "attn_out": res["attn_out"], "mlp_out": res["mlp_out"]}, res["z"].seconds


def _attnlrp(model, ds, direction, progress, positions, max_memory=None):
    res = attnlrp(model, ds, readout=("sites", "heads"), sites=("attn_out", "mlp_out"), progress=progress,
                  positions=positions, max_memory=max_memory)
    sites = res["sites"]
    out = {"heads": res["heads"], "attn_out": sites.select(site="attn_out"), "mlp_out": sites.select(site="mlp_out")}
    return out, sites.seconds


RUNNERS = {"patching": _patching, "atp": _atp, "atp*": _atp_star, "atp-ig": _atp_ig, "dla": _dla, "attnlrp": _attnlrp}
ESTIMATES = ("atp", "atp*", "atp-ig")  # methods whose false negatives against patching the suite reports


@dataclass
class Suite:
    """Results of several methods on one dataset: ``results[grid][method]``."""

    task: str
    n: int
    results: dict[str, dict[str, AttributionResult]]
    seconds: dict[str, float]
    plain_forward_seconds: float
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    model_name: str = ""

    @property
    def forward_equivalents(self) -> dict[str, float]:
        """Each method's time in plain forward passes of the same batch."""
        return {m: s / self.plain_forward_seconds for m, s in self.seconds.items()}

    def frame(self):
        """All scores as one tidy table (task, grid, method, axes, score)."""
        import pandas as pd

        frames = []
        for grid, by_method in self.results.items():
            for r in by_method.values():
                df = r.to_frame()
                df.insert(0, "grid", grid)
                frames.append(df)
        out = pd.concat(frames, ignore_index=True)
        out.insert(0, "task", self.task)
        return out

    def costs(self):
        """Seconds and forward-equivalents per method."""
        import pandas as pd

        fe = self.forward_equivalents
        return pd.DataFrame(
            [{"method": m, "seconds": s, "forward_equivalents": fe[m]} for m, s in self.seconds.items()]
        )

    def agreement(self):
        """One row per grid and pair of methods: Spearman and top-k Jaccard."""
        import pandas as pd

        return pd.concat([c.pairs.assign(grid=g) for g, c in self.comparisons.items()], ignore_index=True)

    def false_negatives(self, ks: Sequence[int] = (10, 20)):
        """Per grid, estimate (atp, atp*, atp-ig, those run) and k: how many of the true
        top-k locations by exact patching the estimate misses in its own top-k, and the
        rank it gives each (``recall.false_negatives``). Empty without "patching"."""
        import pandas as pd

        frames = [
            false_negatives(by["patching"], by[m], ks=ks).assign(grid=g, method=m)
            for g, by in self.results.items() if "patching" in by
            for m in ESTIMATES if m in by
        ]
        cols = ["grid", "method", "k", "missed", "worst_rank", "ranks", "locations"]
        return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)

    def figures(self) -> list:
        """The methods side by side on each grid (one method: its own heatmaps)."""
        if self.comparisons:
            return [c.figure for c in self.comparisons.values()]
        return [r.plot(title=f"{self.task.upper()}: {g} ({m})") for g, by in self.results.items() for m, r in by.items()]

    def write(self, out: str | Path) -> Path:
        """Write ``scores.csv``, ``costs.csv``, ``agreement.csv`` (two methods or more),
        ``figures.html`` and ``summary.json`` (with the false negatives of atp, atp* and
        atp-ig against patching) into ``out`` (each file atomically); returns ``out``."""
        from mechsteer import _io
        from mechsteer.plots import figures_page

        out = Path(out)
        _io.write_text(out / "scores.csv", self.frame().to_csv(index=False))
        _io.write_text(out / "costs.csv", self.costs().to_csv(index=False))
        if self.comparisons:
            _io.write_text(out / "agreement.csv", self.agreement().to_csv(index=False))
        title = f"mechsteer attribution: {self.task}" + (f" on {self.model_name}" if self.model_name else "")
        _io.write_text(out / "figures.html", figures_page(title, self.figures()))
        _io.write_json(out / "summary.json", self.summary())
        return out

    def summary(self) -> dict:
        """Numbers for ``summary.json``."""
        fe = self.forward_equivalents
        return {
            "task": self.task,
            "model": self.model_name,
            "n": self.n,
            "plain_forward_seconds": self.plain_forward_seconds,
            "methods": {m: {"seconds": s, "forward_equivalents": fe[m]} for m, s in self.seconds.items()},
            "spearman": {g: c.spearman.to_dict() for g, c in self.comparisons.items()},
            "jaccard_top_k": {g: c.jaccard.to_dict() for g, c in self.comparisons.items()},
            "false_negatives": {
                f"{r.grid}/{r.method}/top{r.k}": {"missed": r.missed, "worst_rank": r.worst_rank, "ranks": r.ranks}
                for r in self.false_negatives().itertuples()
            },
        }


def run_suite(
    model,
    ds: ContrastiveDataset,
    methods: Sequence[str] = METHODS,
    *,
    direction: str = "noising",
    k: int = 10,
    progress: bool = True,
    positions: str = "auto",
    max_memory: int | float | str | None = None,
) -> Suite:
    """Run ``methods`` on ``ds``, fill every grid, and compare the methods on each grid.

``direction`` is patching's and AtP's (default ``"noising"``); ``k`` the top-k of the
Jaccard overlaps. Each method runs at its own default ``batch_size`` (prompts per forward);
patching and AttnLRP size theirs to ``max_memory`` (bytes or ``"2GB"``; default a share of the
free memory, ``runs.memory_budget``).
``positions`` is the position axis of the ``attn_out`` and ``mlp_out`` grids (``"auto"`` |
``"tokens"`` | ``"named"`` | ``"end"``; ``mechsteer.tasks.positions``): a dataset of prompts of
different lengths is compared on its named or end-relative positions.

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("llama")
    >>> suite = run_suite(model, ioi(model, n=4), ["atp", "dla"], progress=False)
    >>> sorted(suite.results["heads"]), list(suite.comparisons)
    (['atp', 'dla'], ['heads', 'attn_out', 'mlp_out'])
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    unknown = [m for m in methods if m not in RUNNERS]
    if unknown or not methods:
        raise ValueError(f"Unknown methods {unknown or methods}; choose from {list(METHODS)}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods names a method twice: {methods}; pass each once.")
    if direction not in ("noising", "denoising"):
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}.")
    k = positive_int("k", k)
    if max_memory is not None:
        parse_bytes(max_memory)  # a bad budget fails before any method runs
    check_dataset(ds, model=model)
    position_axis(ds, positions)  # a bad mode fails before any method runs
    fwd = plain_forward_seconds(model, ds.tokens)
    results: dict[str, dict[str, AttributionResult]] = {g: {} for g in GRIDS}
    seconds = {}
    for m in methods:
        out, secs = RUNNERS[m](model, ds, direction, progress, positions, max_memory)
        seconds[m] = secs
        for g in GRIDS:
            results[g][m] = out[g]  # out[g].method == m
    suite = Suite(task=ds.name, n=len(ds), results=results, seconds=seconds, plain_forward_seconds=fwd,
                  model_name=getattr(model.cfg, "model_name", "") or "")
    if len(methods) >= 2:
        for g in GRIDS:
            suite.comparisons[g] = compare(
                list(results[g].values()), names=list(results[g]), k=k, title=f"{ds.name.upper()}: {g}"
            )
    return suite
