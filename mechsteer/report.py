"""The HTML report: one page of sections, readable offline.

A section is one function that returns a ``Section`` (title, HTML, plotly figures, and
the figures' numbers for ``summary.json``). ``Report.write`` embeds plotly.js once in the
page (never a CDN link), so ``index.html`` opens with no network, and writes
``index.html`` and ``summary.json`` atomically.

>>> from mechsteer.tiny import tiny_model
>>> import tempfile, pathlib
>>> report = Report("demo")
>>> _ = report.add(model_section(tiny_model("gpt2")))
>>> path = report.write(tempfile.mkdtemp())
>>> "plotly" in path.read_text()[:4_000_000], (path.parent / "summary.json").exists()
(True, True)
"""

from __future__ import annotations

import datetime as _dt
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from mechsteer import _io
from mechsteer.models import describe, fingerprint
from mechsteer.sites import site_table


@dataclass
class Section:
    """One part of the report. ``key`` names its entry in ``summary.json``."""

    key: str
    title: str
    html: str = ""
    figures: list[Any] = field(default_factory=list)  # drawn after ``html`` and ``parts``
    summary: dict[str, Any] = field(default_factory=dict)
    parts: list[Any] = field(default_factory=list)  # HTML strings and figures, in reading order


def table_html(df: pd.DataFrame, **kwargs: Any) -> str:
    """A DataFrame as a compact HTML table (values escaped)."""
    return df.to_html(classes="tbl", border=0, escape=True, **kwargs)


class Report:
    """An ordered list of sections written to ``DIR/index.html`` and ``DIR/summary.json``."""

    def __init__(self, title: str = "mechsteer report", meta: dict[str, Any] | None = None):
        self.title = title
        self.meta = dict(meta or {})  # how the report was made (settings, seconds): summary.json's "meta"
        self.sections: list[Section] = []

    def add(self, section: Section) -> Section:
        """Append ``section``; its ``key`` must be new."""
        if any(s.key == section.key for s in self.sections):
            raise ValueError(f"The report already has a section {section.key!r}.")
        self.sections.append(section)
        return section

    def summary(self) -> dict[str, Any]:
        """Every section's numbers, keyed by section."""
        import mechsteer

        return {
            "mechsteer_version": mechsteer.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **({"meta": self.meta} if self.meta else {}),
            **{s.key: s.summary for s in self.sections},
        }

    def to_html(self) -> str:
        """The whole page, with plotly.js inlined once."""
        from plotly.offline import get_plotlyjs

        toc = "".join(f'<li><a href="#{s.key}">{html.escape(s.title)}</a></li>' for s in self.sections)
        body = []
        for s in self.sections:
            items = [s.html, *s.parts, *s.figures]
            rendered = [
                item if isinstance(item, str)
                else f'<div class="fig">{item.to_html(full_html=False, include_plotlyjs=False, div_id=f"{s.key}-{i}")}</div>'
                for i, item in enumerate(items)
            ]
            body.append(f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>{"".join(rendered)}</section>')
        return (
            "<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style>"
            f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
            f"<h1>{html.escape(self.title)}</h1><ul class='toc'>{toc}</ul>{''.join(body)}</body></html>"
        )

    def write(self, out_dir: str | Path) -> Path:
        """Write ``index.html`` and ``summary.json`` into ``out_dir``; return the page's path."""
        out = Path(out_dir)
        _io.write_json(out / "summary.json", self.summary())
        return _io.write_text(out / "index.html", self.to_html())


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
.tbl{border-collapse:collapse;font-size:0.9em;margin:0.5em 0}.tbl td,.tbl th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left}
code{background:#f4f4f4;padding:1px 4px}.toc{columns:2}
"""


def model_section(model) -> Section:
    """Model name, sizes, fingerprint and the sites mechsteer can hook on it."""
    info = describe(model)
    fp = fingerprint(model)
    sites = pd.DataFrame(site_table(model, 8))
    facts = pd.DataFrame({"value": {**info, "weights_sha256": fp["weights_sha256"][:16] + "..."}})
    return Section(
        key="model",
        title=f"Model: {info['name']}",
        html=table_html(facts) + "<h3>Sites</h3>" + table_html(sites, index=False),
        summary={**info, "fingerprint": fp},
    )


def task_section(model, datasets: list) -> Section:
    """Preview of contrastive datasets: prompts, drop counts, and whether the model prefers
    the correct answer on clean prompts and the wrong one on corrupted prompts."""
    from mechsteer.plots import logit_diff_strip

    parts, summary = [], {}
    for ds in datasets:
        clean, corrupt = ds.logit_diffs(model)
        stats = {
            "n": len(ds),
            "n_pos": ds.n_pos,
            "dropped": ds.dropped,
            "accuracy": float((clean > 0).float().mean()),
            "logit_diff": float(clean.mean()),
            "corrupted_accuracy": float((corrupt > 0).float().mean()),
            "corrupted_logit_diff": float(corrupt.mean()),
        }
        summary[ds.name] = stats
        preview = ds.to_frame().head(5)
        parts.append(
            f"<h3>{ds.name.upper()}: {len(ds)} prompts of {ds.n_pos} tokens</h3>"
            f"<p>Dropped while generating: <code>{html.escape(str(ds.dropped))}</code>. "
            f"The model prefers the correct answer on <b>{stats['accuracy']:.0%}</b> of clean prompts "
            f"(mean logit difference {stats['logit_diff']:.2f}) and on {stats['corrupted_accuracy']:.0%} "
            f"of corrupted prompts ({stats['corrupted_logit_diff']:.2f}).</p>"
            + table_html(preview, index=False)
        )
        parts.append(logit_diff_strip(clean.tolist(), corrupt.tolist(), title=f"{ds.name.upper()}: logit difference per prompt"))
    return Section(key="tasks", title="Contrastive tasks", parts=parts, summary=summary)


def attribution_section(suites: list) -> Section:
    """Attribution methods side by side on each task: heatmaps per grid, agreement
    (Spearman, top-k Jaccard) and cost in forward-equivalents."""
    parts, summary = [], {}
    for suite in suites:
        summary[suite.task] = suite.summary()
        parts.append(
            f"<h3>{suite.task.upper()} ({suite.n} prompts)</h3><p>Cost of each method, in plain forward "
            f"passes of the same batch (one forward: {suite.plain_forward_seconds:.3f} s):</p>"
            + table_html(suite.costs().round(3), index=False)
        )
        for grid, cmp in suite.comparisons.items():
            parts.append(_titled(cmp.figure, suite, grid))
            parts.append(f"<h4>{grid}: agreement (Spearman / top-{cmp.k} Jaccard)</h4>")
            parts.append(table_html(cmp.pairs.round(3), index=False))
        fn = suite.false_negatives()
        if len(fn):
            parts.append(
                "<h4>False negatives of the estimates (Kram&aacute;r et al. 2024): of the top-k locations by "
                "exact patching (|score|), how many each estimate misses in its own top-k, and the worst rank "
                "it gives one of them</h4>"
                + table_html(fn[["grid", "method", "k", "missed", "worst_rank"]], index=False)
            )
    return Section(key="attribution", title="Attribution methods", parts=parts, summary=summary)


def _titled(figure, suite, grid: str):
    """A copy of a comparison figure whose title names the task, the model and the grid, and
    says when each panel was divided by its max |score| (all colour ranges [-1, 1])."""
    import plotly.graph_objects as go

    fig = go.Figure(figure)
    normalised = all(getattr(t, "zmax", None) == 1.0 for t in fig.data)
    on = f" on {suite.model_name}" if getattr(suite, "model_name", None) else ""
    fig.update_layout(title=f"{suite.task.upper()}{on}: {grid} scores" + (", each method divided by its max |score|" if normalised else ""))
    if normalised:
        fig.update_traces(colorbar_title="score / max |score|")
    return fig


def fv_section(run) -> Section:
    """Function vectors (paper 000): head scores of AIE, AttnLRP and AtP side by side with
    their top-k overlap, zero-shot accuracy of FV and DFV per selection method, the FV
    layer sweep, samples per minute, and a steered continuation."""
    from mechsteer.attribution.compare import compare
    from mechsteer.fv.plots import accuracy_figure, sweep_figure

    cfg = run.config
    names = list(run.global_scores)
    cmp = compare([run.global_scores[m] for m in names], k=cfg.k, names=names,
                  title=f"Global head scores over {len(run.tasks)} tasks (top-{cfg.k} overlap below)")
    glob, task = run.accuracy_table("global"), run.accuracy_table("task")
    acc = glob.merge(task, on="name", how="left", suffixes=("", " (per-task heads)"))
    spm = pd.DataFrame({"samples / minute": run.samples_per_minute}).round(2)
    used = pd.DataFrame([{"task": t, "instructions": d.instructions, "accuracy with instruction": round(d.accuracy, 3),
                          "mean_z prompts": len(d.clean), "scored": len(d.scored), "test": len(d.test)}
                         for t, d in run.tasks.items()])
    parts = [
        f"<p>{len(run.tasks)} tasks pass the filter; top-{cfg.k} heads per method, FV layer per method "
        f"<code>{html.escape(str(run.fv_layer))}</code>, DFV re-injects each head's mean at its own z site.</p>",
        table_html(used, index=False),
        cmp.figure,
        table_html(cmp.pairs.round(3), index=False),
        "<h3>Zero-shot accuracy on held-out inputs (mean over tasks)</h3>",
        table_html(acc.round(3), index=False),
        accuracy_figure(run.accuracy),
    ]
    if len(run.sweep):
        parts.append(sweep_figure(run.sweep))
    parts += ["<h3>Cost of head selection</h3>", table_html(spm)]
    if run.example is not None:
        parts += ["<h3>Steered continuation (every generated token steered, as in paper 000 Table 2)</h3>",
                  table_html(run.example[["name", "prompt", "text"]], index=False)]
    summary = run.summary()
    return Section(key="function_vectors", title="Function vectors: head selection and injection", parts=parts,
                   summary={k: summary[k] for k in ("tasks", "accuracy", "samples_per_minute", "top_heads", "fv_layer")})


def steering_section(runs: list) -> Section:
    """Activation scaling (seed paper 003) on one task: ActivScalar vs SteerVec vs DynScalar
    (E_0, F, minimality, parameters; train and test), the ActivScalar alphas per layer and
    position, and the logit difference as a function of beta (where the answer flips)."""
    from mechsteer.interventions.plots import alpha_heatmap, beta_sweep_figure

    rows, parts, summary, sweeps = [], [], {}, {}
    for run in runs:
        s = run.summary()
        sweep = run.beta_sweep  # computed by steer_task: the report only draws
        s["flip_beta"] = run.flip_beta
        summary[run.method] = {k: s[k] for k in ("n_params", "train", "test", "flip_beta", "seconds")}
        rows.append({"method": run.method, "n_params": s["n_params"],
                     **{f"{split} {k}": s[split][k] for split in ("train", "test")
                        for k in ("effectiveness", "faithfulness", "minimality")},
                     "flip beta": s["flip_beta"], "seconds": s["seconds"]})
        sweeps[run.method] = sweep
    first = runs[0]
    cfg = first.config
    parts.append(
        f"<p>{first.task.upper()}: {len(first.train_ds)} train and {len(first.test_ds)} test prompts of "
        f"{first.train_ds.n_pos} tokens; sites {', '.join(first.intervention.sites)} at every layer; "
        f"{cfg.epochs} epochs of Adam, batch {cfg.batch_size}, margin {cfg.margin}, lambda_F {cfg.lambda_f}, "
        f"lambda_M {cfg.lambda_m}. Effectiveness E_0 and faithfulness F are &lt;= 0 (0 is best); minimality "
        "counts parameters with |value| &gt; 0.01; 'flip beta' is where the mean logit difference crosses 0.</p>"
    )
    parts.append(table_html(pd.DataFrame(rows).round(3), index=False))
    for run in runs:
        if run.method == "activ_scalar":
            parts.append(alpha_heatmap(run.intervention, run.test_ds))
        parts.append(beta_sweep_figure(sweeps[run.method], title=f"{run.method}: logit difference vs beta (test prompts)"))
    return Section(key="steering", title="Activation scaling: learned interventions", parts=parts, summary=summary)


def replication_section(run) -> Section:
    """The replication report (``mechsteer.replicate``): each claim of papers 000, 003 and
    004 beside mechsteer's number, its 95% interval, sample size and verdict; then the
    tables behind the rows (FV accuracy per task, Table 1 timing)."""
    t = run.table()
    t["value [95%]"] = [f"{v:.3g}" if lo == hi == v else f"{v:.3g} [{lo:.3g}, {hi:.3g}]"
                        for v, lo, hi in zip(t["value"], t["lo"], t["hi"])]
    shown = t[["paper", "where", "claim", "paper_value", "measure", "value [95%]", "n", "verdict", "why"]]
    counts = ", ".join(f"{v} {html.escape(k)}" for k, v in run.counts().items())
    parts = [f"<p>{len(t)} claims on <code>{html.escape(str(run.meta.get('model')))}</code>: {counts}. "
             "Intervals: Wilson for accuracies, bootstrap over prompts otherwise; a single number is exact "
             "or one timed run.</p>", table_html(shown, index=False)]
    for name, df in run.tables.items():
        parts += [f"<h3>{html.escape(name)}</h3>", table_html(df.round(3), index=False)]
    return Section("replication", "Replication: the papers' claims beside mechsteer's numbers", parts=parts,
                   summary={"counts": run.counts(), "claims": t.drop(columns=["value [95%]"]).to_dict(orient="records")})
