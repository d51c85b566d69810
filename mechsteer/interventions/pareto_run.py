"""The Pareto search as one run: task -> study -> fronts -> files (seed paper 003, Sec. 4.2).

``pareto_search(model, task, out)`` builds the task for the model, splits it into train
and test, runs ``pareto_grid``'s study (``out/study.db`` unless ``storage=`` names a
shared database; an interrupted search resumes when rerun with the same ``out``) and
returns a ``ParetoRun``: the table (one row per configuration), the Pareto fronts (the
``key`` of each front row, per split and trade-off) and the figure.

``workers=N`` runs the search in N processes: this one and N - 1 started with
``multiprocessing``'s spawn, each loading the model once (by ``model_name``, with
``model_kwargs``) and building the same task; each checks its model and data against the
study's fingerprint before it takes a trial. Several machines join one search by giving
the same ``storage`` (a database URL) and ``study`` name. Seeded training makes the rows
the same whatever the number of workers (the run facts ``seconds``, ``finished``,
``trial``, ``worker`` aside).

``ParetoRun.write(out)`` writes ``trials.csv``, ``grid.jsonl`` (the rows, first finished
first, as mechsteer 0.3 logged them), ``pareto.html`` (figure and table) and
``summary.json`` (task, model, study, n_configs, fronts, rows). It runs nothing: the
``mechsteer pareto`` command is ``pareto_search(...).write(out)``.

>>> import tempfile
>>> from mechsteer.tiny import tiny_model
>>> out = tempfile.mkdtemp()
>>> run = pareto_search(tiny_model("gpt2"), "ccc", out, n=8, methods=["activ_scalar"], lambda_f=[0, 1],
...                     lambda_m=[0], margins=[1], epochs=1, progress=False)
>>> len(run.grid), sorted(run.fronts)
(2, ['test_faithfulness', 'test_minimality', 'train_faithfulness', 'train_minimality'])
>>> sorted(p.name for p in run.write(out).parent.iterdir())
['grid.jsonl', 'pareto.html', 'study.db', 'summary.json', 'trials.csv']
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch

from mechsteer import _io
from mechsteer._validate import positive_int
from mechsteer.interventions.pareto import SPLITS, open_sweep, pareto_figure, pareto_front
from mechsteer.interventions.pareto_rows import write_trials
from mechsteer.plots import figures_page

LOG_FILE = "grid.jsonl"
TRADE_OFFS = ("faithfulness", "minimality")  # each plotted against effectiveness E_0


@dataclass
class ParetoRun:
    """A finished (or resumed) Pareto search: its table, fronts and figure."""

    task: str
    model: str  # the model's name (model.cfg.model_name)
    grid: pd.DataFrame  # one row per configuration, grid order (trials.csv)
    fronts: dict[str, list[str]]  # "{split}_{trade-off}" -> keys of the front rows, sorted by the trade-off
    figure: go.Figure
    log: list[dict]  # the same rows, first finished first (grid.jsonl)
    study: str = ""  # the Optuna study's name
    storage: str = ""  # its storage URL, password hidden

    def summary(self) -> dict[str, Any]:
        """``task``, ``model``, ``study``, ``storage``, ``n_configs``, ``fronts`` and every row (``rows``)."""
        return {"task": self.task, "model": self.model, "study": self.study, "storage": self.storage,
                "n_configs": len(self.grid), "fronts": self.fronts, "rows": self.grid.to_dict(orient="records")}

    def html(self) -> str:
        """``pareto.html``: the figure, then the table (values rounded to 4 digits)."""
        table = self.grid.drop(columns=["key"]).round(4).to_html(classes="tbl", border=0, escape=True, index=False)
        page = figures_page(f"mechsteer pareto: {self.task}", [self.figure])
        return page.replace("</body>", f"<h2>Pareto search</h2>{table}</body>")

    def write(self, out: str | os.PathLike) -> Path:
        """Write ``trials.csv``, ``grid.jsonl``, ``pareto.html`` and ``summary.json`` into
        ``out``; return the path of ``summary.json``."""
        out = Path(out)
        write_trials(out / "trials.csv", self.grid.to_dict(orient="records"))
        _io.write_text(out / LOG_FILE, "".join(json.dumps(row) + "\n" for row in self.log))
        _io.write_text(out / "pareto.html", self.html())
        return _io.write_json(out / "summary.json", self.summary())


def _split(model, task: str, n: int | None, seed: int, test_fraction: float, task_kwargs: dict | None):
    from mechsteer.tasks import make_task

    return make_task(task, model, n=n, seed=seed, **(task_kwargs or {})).split(test_fraction)


def _worker(recipe: dict, messages) -> None:
    """A spawned worker: load the model, build the task, join the study (its fingerprint
    checked), say "ready", run trials; an error is sent to the coordinator."""
    try:
        from mechsteer.models import load_model

        torch.set_num_threads(recipe["threads"])
        model = load_model(recipe["model_name"], **recipe["model_kwargs"])
        train_ds, test_ds = _split(model, *recipe["task"])
        search = open_sweep(model, train_ds, test_ds, recipe["out"], **recipe["grid"])
        messages.put(("ready", ""))
        search.work(wait=False, n_trials=recipe["n_trials"], progress=False)
    except BaseException as err:  # reported by the coordinator, which finishes the search
        messages.put(("error", f"{type(err).__name__}: {err}"))
        raise SystemExit(1) from None


def _start_workers(n: int, recipe: dict) -> list:
    """Start ``n`` spawned workers and wait until each has joined the study; a worker
    that cannot (another model, a wrong storage URL) stops them all with its error."""
    import queue

    ctx = mp.get_context("spawn")
    messages = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(recipe, messages), name=f"pareto-worker-{i}") for i in range(1, n + 1)]
    for p in procs:
        p.start()
    ready, errors = 0, []
    while ready + len(errors) < n:
        try:
            kind, text = messages.get(timeout=1.0)
        except queue.Empty:
            if not any(p.is_alive() for p in procs):
                errors.append("a worker exited before joining the study")
                break
            continue
        ready, errors = (ready + 1, errors) if kind == "ready" else (ready, [*errors, text])
    if errors:
        for p in procs:
            p.terminate()
            p.join()
        raise ValueError(f"{len(errors)} of {n} worker processes could not join the study: {'; '.join(errors)}")
    return procs


def pareto_search(
    model,
    task: str = "ccc",
    out: str | os.PathLike = "pareto",
    *,
    n: int | None = 64,  # prompts, split 3:1 into train and test
    seed: int = 0,  # seeds the task and, unless seeds= is given, the one training seed
    test_fraction: float = 0.25,
    task_kwargs: dict[str, Any] | None = None,
    workers: int = 1,  # processes on this machine, this one included
    model_name: str | None = None,  # what the other workers load (default: model, when it is a name)
    model_kwargs: dict[str, Any] | None = None,  # load_model's keywords (device, dtype, ...)
    n_trials: int | None = None,  # the study's budget (None: the whole grid)
    progress: bool = True,
    **grid_kwargs: Any,
) -> ParetoRun:
    """Build ``task``, run ``pareto_grid``'s study at ``out`` with ``grid_kwargs``
    (methods, sites, lambda_f, lambda_m, margins, epochs, lr, batch_size, seeds,
    sampler, storage, study, ...) in ``workers`` processes, and return its ``ParetoRun``.

    ``model`` is a loaded model or a name for ``load_model``. With ``workers > 1`` the
    other processes load ``model_name`` (or ``model`` when it is a name) themselves.
    """
    workers, n_trials = positive_int("workers", workers), positive_int("n_trials", n_trials, allow_none=True)
    if n_trials is None and grid_kwargs.get("sampler", "grid") != "grid":
        raise ValueError(f"sampler={grid_kwargs['sampler']!r} needs n_trials= (how many configurations to try).")
    model_kwargs = dict(model_kwargs or {})
    if isinstance(model, str):
        from mechsteer.models import load_model

        model_name = model if model_name is None else model_name
        model = load_model(model, **model_kwargs)
    if workers > 1 and model_name is None:
        raise ValueError(f"workers={workers} needs model_name= (the name each worker process loads, e.g. "
                         "'tiny-llama' or 'HuggingFaceTB/SmolLM2-135M'), or pass the model by name.")
    task_args = (task, n, seed, test_fraction, task_kwargs)
    train_ds, test_ds = _split(model, *task_args)
    out = Path(out)
    grid_kwargs.setdefault("seeds", (seed,))
    search = open_sweep(model, train_ds, test_ds, out, **grid_kwargs)
    recipe = {"model_name": model_name, "model_kwargs": model_kwargs, "task": task_args, "out": str(out),
              "grid": {**grid_kwargs, "study": search.sweep.study.study_name, "storage": search.sweep.url},
              "n_trials": n_trials, "threads": torch.get_num_threads()}
    procs = _start_workers(workers - 1, recipe)
    try:
        search.work(wait=True, n_trials=n_trials, progress=progress)
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
    failed = [f"{p.name} exited with code {p.exitcode}" for p in procs if p.exitcode != 0]
    if failed:  # (the search is complete: this process finished what they left)
        warnings.warn(f"{len(failed)} of {workers - 1} worker processes failed: {'; '.join(failed)}", stacklevel=2)
    df = search.frame()
    name = model.cfg.model_name
    fronts = {f"{split}_{y}": pareto_front(df, f"{split}_effectiveness", f"{split}_{y}")["key"].tolist()
              for split in SPLITS for y in TRADE_OFFS}
    figure = pareto_figure(df, title=f"Pareto fronts: {task} on {name}")
    return ParetoRun(task, name, df, fronts, figure, search.log(), search.sweep.study.study_name,
                     search.sweep.public_url)
