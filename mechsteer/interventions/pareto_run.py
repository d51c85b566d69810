"""The Pareto search as one run: task -> grid -> fronts -> files (seed paper 003, Sec. 4.2).

``pareto_search(model, task, out)`` builds the task for the model, splits it into train
and test, runs ``pareto_grid`` with its JSONL file at ``out/grid.jsonl`` (each finished
configuration is written at once, so an interrupted search resumes when rerun with the
same ``out``) and returns a ``ParetoRun``: the grid table, the Pareto fronts (the ``key``
of each front row, per split and trade-off) and the figure. ``ParetoRun.write(out)``
writes ``grid.csv``, ``pareto.html`` (figure and table) and ``summary.json`` (task,
model, n_configs, fronts, rows), and ``grid.jsonl`` too when ``out`` is not the search's
folder. It runs nothing: the ``mechsteer pareto`` command is ``pareto_search(...).write(out)``.

>>> import tempfile
>>> from mechsteer.tiny import tiny_model
>>> out = tempfile.mkdtemp()
>>> run = pareto_search(tiny_model("gpt2"), "ccc", out, n=8, methods=["activ_scalar"], lambda_f=[0, 1],
...                     lambda_m=[0], margins=[1], epochs=1, progress=False)
>>> len(run.grid), sorted(run.fronts)
(2, ['test_faithfulness', 'test_minimality', 'train_faithfulness', 'train_minimality'])
>>> sorted(p.name for p in run.write(out).parent.iterdir())
['grid.csv', 'grid.jsonl', 'pareto.html', 'summary.json']
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from mechsteer import _io
from mechsteer.interventions.pareto import SPLITS, pareto_figure, pareto_front, pareto_grid
from mechsteer.plots import figures_page

GRID_FILE = "grid.jsonl"
TRADE_OFFS = ("faithfulness", "minimality")  # each plotted against effectiveness E_0


@dataclass
class ParetoRun:
    """A finished (or resumed) Pareto search: its table, fronts and figure."""

    task: str
    model: str  # the model's name (model.cfg.model_name)
    grid: pd.DataFrame  # one row per configuration, as pareto_grid returns it
    fronts: dict[str, list[str]]  # "{split}_{trade-off}" -> keys of the front rows, sorted by the trade-off
    figure: go.Figure
    grid_path: Path  # the JSONL file the search wrote (and resumes from)

    def summary(self) -> dict[str, Any]:
        """``task``, ``model``, ``n_configs``, ``fronts`` and every row (``rows``)."""
        return {"task": self.task, "model": self.model, "n_configs": len(self.grid), "fronts": self.fronts,
                "rows": self.grid.to_dict(orient="records")}

    def html(self) -> str:
        """``pareto.html``: the figure, then the grid table (values rounded to 4 digits)."""
        table = self.grid.drop(columns=["key"]).round(4).to_html(classes="tbl", border=0, escape=True, index=False)
        page = figures_page(f"mechsteer pareto: {self.task}", [self.figure])
        return page.replace("</body>", f"<h2>Pareto search</h2>{table}</body>")

    def write(self, out: str | os.PathLike) -> Path:
        """Write ``grid.csv``, ``pareto.html``, ``summary.json`` (and ``grid.jsonl`` when
        ``out`` is not the search's folder) into ``out``; return the path of ``summary.json``."""
        out = Path(out)
        jsonl = out / GRID_FILE
        if not (jsonl.exists() and jsonl.samefile(self.grid_path)):
            _io.write_text(jsonl, self.grid_path.read_text(encoding="utf-8"))
        _io.write_text(out / "grid.csv", self.grid.to_csv(index=False))
        _io.write_text(out / "pareto.html", self.html())
        return _io.write_json(out / "summary.json", self.summary())


def pareto_search(
    model,
    task: str = "ccc",
    out: str | os.PathLike = "pareto",
    *,
    n: int | None = 64,  # prompts, split 3:1 into train and test
    seed: int = 0,  # seeds the task and, unless seeds= is given, the one training seed
    test_fraction: float = 0.25,
    task_kwargs: dict[str, Any] | None = None,
    **grid_kwargs: Any,
) -> ParetoRun:
    """Build ``task``, run ``pareto_grid`` (resumable, at ``out/grid.jsonl``) with
    ``grid_kwargs`` (methods, sites, lambda_f, lambda_m, margins, epochs, lr, batch_size,
    seeds, ...) and return its ``ParetoRun``."""
    from mechsteer.tasks import make_task

    train_ds, test_ds = make_task(task, model, n=n, seed=seed, **(task_kwargs or {})).split(test_fraction)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid_kwargs.setdefault("seeds", (seed,))
    df = pareto_grid(model, train_ds, test_ds, out / GRID_FILE, **grid_kwargs)
    name = model.cfg.model_name
    fronts = {f"{split}_{y}": pareto_front(df, f"{split}_effectiveness", f"{split}_{y}")["key"].tolist()
              for split in SPLITS for y in TRADE_OFFS}
    figure = pareto_figure(df, title=f"Pareto fronts: {task} on {name}")
    return ParetoRun(task, name, df, fronts, figure, out / GRID_FILE)
