"""Pareto search over the objective's hyperparameters (seed paper 003, Sec. 4.2, Fig. 2).

No single setting of Psi = E_m + lambda_F F + lambda_M M_1 (Eq. 9) is best at everything:
an intervention that always flips the answer may disturb the rest of the distribution,
and a sparse one may flip too few answers. The paper grid-searches lambda_F, lambda_M
and the margin m over {0, 1, 10, 100} each (64 runs per method), evaluates every run
with Sec. 3.4's measures (E_0, F, the count of |theta| > 0.01) on train and test, and
draws the Pareto fronts of effectiveness vs faithfulness and vs minimality.

``pareto_grid`` runs that search as an Optuna study (``mechsteer.interventions.sweep``):
one trial per configuration (method, lambda_F, lambda_M, m, seed), ``GridSampler`` for the
paper's grid or NSGA-II (``sampler="nsga2"``, ``n_trials=``) to look for the train split's
(E_0, F, minimality) front in fewer trials. The study lives in ``out/study.db`` (SQLite)
unless ``storage=`` names a database that several machines share, so an interrupted
search resumes where it stopped and several workers can run one search
(``pareto_search(..., workers=N)``; ``mechsteer pareto --workers N``). Training is seeded
per configuration, so the rows do not depend on which worker ran what. A configuration's
``key`` hashes everything that determines its result (method, lambda_F, lambda_M, m, seed,
sites, layers, positions, epochs, lr, batch size, init std, the model's weights and the
tokens and answers of both splits); a configuration already finished in another study of
the same storage (or in an old ``out/grid.jsonl``) is read back, not rerun. The table is
written to ``out/trials.csv``, one row per configuration.

``pareto_front`` keeps the non-dominated points of two columns. Effectiveness and
faithfulness are maximised (0 is best); the minimality count, ``n_params`` and
``n_locations`` are minimised (fewer non-negligible parameters is better).
``pareto_figure`` draws both trade-offs on train and test.

>>> import tempfile
>>> from mechsteer.tasks import ccc
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> train_ds, test_ds = ccc(model, n=8).split()
>>> out = tempfile.mkdtemp()
>>> kw = dict(methods=["activ_scalar"], lambda_f=[0, 1], lambda_m=[0], margins=[1], epochs=1, progress=False)
>>> df = pareto_grid(model, train_ds, test_ds, out, **kw)
>>> len(df), len(read_results(f"{out}/trials.csv"))
(2, 2)
>>> len(pareto_grid(model, train_ds, test_ds, out, **kw))  # resumes: nothing left to run
2
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from mechsteer._validate import finite_float, nonneg_int, positive_int
from mechsteer.interventions.base import DEFAULT_INIT_STD
from mechsteer.interventions.evaluate import evaluate_splits
from mechsteer.interventions.kinds import KINDS, kind_class
from mechsteer.interventions.pareto_rows import MEASURES, SPLITS, TIMING, _read_lines, read_results, write_trials
from mechsteer.interventions.sweep import SAMPLERS, Sweep, finished_rows, storage_url
from mechsteer.interventions.train import TrainConfig, train
from mechsteer.models import fingerprint

__all__ = ["GRID", "MEASURES", "SPLITS", "TIMING", "config_key", "dataset_id", "open_sweep", "pareto_figure",
           "pareto_front", "pareto_grid", "read_results"]

GRID = (0, 1, 10, 100)  # Fig. 2: lambda_F, lambda_M, m in {0, 1, 10, 100}
MINIMISED = ("minimality", "n_params", "n_locations")  # column names (or suffixes) minimised by pareto_front
TRIALS_FILE = "trials.csv"
LEGACY_FILE = "grid.jsonl"  # mechsteer 0.3's log; its rows are read back, not rerun


def dataset_id(ds) -> str:
    """Short SHA-256 of a dataset's tokens and answer ids (its identity in config keys)."""
    h = hashlib.sha256()
    for t in (ds.tokens, ds.correct, ds.wrong):
        t = t.detach().cpu().to(torch.int64).contiguous()
        h.update(f"{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def config_key(spec: dict) -> str:
    """Stable key of one configuration: a short SHA-256 of its JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _grid_values(name: str, values: Sequence[float | int]) -> list[float]:
    """``values`` as floats: a non-empty list of finite numbers >= 0 (bools refused)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of finite numbers >= 0, got {values!r}.")
    out = [finite_float(f"{name}[{i}]", v) for i, v in enumerate(values)]
    if any(v < 0 for v in out):
        raise ValueError(f"{name} must be a non-empty list of finite numbers >= 0, got {values!r}.")
    return out


def _int_list(name: str, values: Sequence[int] | int) -> list[int]:
    """``values`` (or one int) as a non-empty list of ints >= 0 (bools refused)."""
    if isinstance(values, int) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of integers >= 0, got {values!r}.")
    return [nonneg_int(f"{name}[{i}]", v) for i, v in enumerate(values)]


class ParetoSweep:
    """A Pareto search opened on its study: ``work()`` runs configurations, ``frame()``
    reads the finished ones (grid order), ``write()`` exports ``trials.csv``."""

    def __init__(self, model, train_ds, test_ds, sweep: Sweep, shared: dict, base_cfg: TrainConfig,
                 cache: dict[str, dict], out: Path):
        self.model, self.train_ds, self.test_ds = model, train_ds, test_ds
        self.sweep, self.shared, self.base_cfg, self.cache, self.out = sweep, shared, base_cfg, cache, out

    def key(self, params: dict) -> str:
        """The key of the configuration ``params`` (method, lambda_f, lambda_m, margin, seed)."""
        return config_key({**params, **self.shared})

    def _objective(self, params: dict, trial) -> tuple[dict, bool]:
        key = self.key(params)
        row = self.cache.get(key) or (self.sweep.find(key) if self.sweep.kind != "grid" else None)
        if row is not None:
            return row, False
        return _run_one(self.model, self.train_ds, self.test_ds, {**params, **self.shared}, key, self.base_cfg), True

    def work(self, *, wait: bool = True, n_trials: int | None = None,
             on_result: Callable[[dict], None] | None = None, progress: bool = True) -> int:
        """Run configurations until the search is done (see ``Sweep.work``); return how many ran here."""
        if n_trials is None and self.sweep.kind != "grid":
            raise ValueError(f"sampler={self.sweep.kind!r} needs n_trials= (how many configurations to try).")
        total = n_trials if n_trials is not None else len(self.sweep.points())
        done = {r["key"] for r in self.sweep.rows()}
        with tqdm(total=total, initial=min(len(done), total), desc="pareto grid", disable=not progress) as bar:
            def seen(row: dict, new: bool) -> None:
                if new and on_result is not None:
                    on_result(row)
                if row["key"] not in done:
                    done.add(row["key"])
                    bar.update(1)
                bar.set_postfix(method=row["method"], E=row["test_effectiveness"])

            return self.sweep.work(self._objective, wait=wait, n_trials=n_trials, on_trial=seen)

    def log(self) -> list[dict]:
        """The finished rows, first finished first."""
        return self.sweep.rows()

    def frame(self) -> pd.DataFrame:
        """One row per finished configuration: in grid order (NSGA-II: first finished first)."""
        rows = self.log()
        if self.sweep.kind == "grid":
            by_key = {r["key"]: r for r in rows}
            rows = [by_key[k] for k in (self.key(p) for p in self.sweep.points()) if k in by_key]
        return pd.DataFrame(rows)

    def write(self) -> Path:
        """Write ``out/trials.csv``; return its path."""
        return write_trials(self.out / TRIALS_FILE, self.frame().to_dict(orient="records"))


def open_sweep(
    model,
    train_ds,
    test_ds,
    out: str | os.PathLike,
    *,
    methods: Sequence[str] = ("activ_scalar", "steer_vec"),
    sites: Sequence[str] = ("attn_out", "mlp_out"),
    layers: Sequence[int] | None = None,  # None: every layer
    positions: str | Sequence[int] = "all",
    lambda_f: Sequence[float | int] = GRID,
    lambda_m: Sequence[float | int] = GRID,
    margins: Sequence[float | int] = GRID,
    seeds: Sequence[int] = (0,),  # seeds the init and the mini-batch order
    epochs: int = 25,  # App. A.1
    lr: float | None = None,  # None: App. A.1's default per method
    batch_size: int = 32,  # prompts per forward (each at beta = +1 and -1 in it)
    init_std: float = DEFAULT_INIT_STD,
    sampler: str = "grid",  # "grid": every configuration; "nsga2": NSGA-II for n_trials trials
    storage: str | None = None,  # database URL; None: sqlite:///out/study.db
    study: str | None = None,  # study name; None: one derived from the settings
) -> ParetoSweep:
    """Check the arguments and open (create or join) the search's study; run nothing.

    Raises a ValueError when the study exists and was made for another model, other
    data or other settings (its fingerprint differs from this worker's).
    """
    methods = [methods] if isinstance(methods, str) else list(methods)
    sites = [sites] if isinstance(sites, str) else list(sites)
    unknown = [m for m in methods if m not in KINDS]
    if unknown or not methods:
        raise ValueError(f"methods {list(methods)!r}: choose from {sorted(KINDS)}.")
    grids = [_grid_values(n, v) for n, v in (("lambda_f", lambda_f), ("lambda_m", lambda_m), ("margins", margins))]
    seeds, layers = _int_list("seeds", seeds), None if layers is None else _int_list("layers", layers)
    epochs, batch_size = positive_int("epochs", epochs), positive_int("batch_size", batch_size)
    lr = None if lr is None else finite_float("lr", lr)
    if finite_float("init_std", init_std) < 0:
        raise ValueError(f"init_std must be a finite number >= 0, got {init_std}.")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {list(SAMPLERS)}, got {sampler!r}.")
    if not train_ds.is_padded and (test_ds.is_padded or train_ds.n_pos != test_ds.n_pos):
        raise ValueError(f"train prompts all have {train_ds.n_pos} tokens but test prompts do not (up to "
                         f"{test_ds.n_pos}): interventions trained on token columns cannot be tested on other "
                         "lengths. Split one mixed-length dataset (its interventions use named or end-relative "
                         "slots), or build both splits with one length.")
    base_cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, progress=False)  # validates
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {str(out)!r} is a file; pareto_grid writes a folder (study.db, trials.csv): give "
                         "a directory (an old grid.jsonl inside it is read back).")
    out.mkdir(parents=True, exist_ok=True)
    legacy = {r["key"]: r for r in _read_lines(out / LEGACY_FILE)[0]}  # raises on a malformed line
    shared = {
        "sites": list(sites), "layers": None if layers is None else list(layers),
        "positions": positions if isinstance(positions, str) else list(positions),
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "init_std": init_std,
        "model": fingerprint(model)["weights_sha256"][:16],
        "train_data": dataset_id(train_ds), "test_data": dataset_id(test_ds),
    }
    space = {"method": methods, "lambda_f": grids[0], "lambda_m": grids[1], "margin": grids[2], "seed": seeds}
    fp = {k: shared[k] for k in ("model", "train_data", "test_data")}
    settings = {**{k: v for k, v in shared.items() if k not in fp}, "space": space, "sampler": sampler}
    name = study or f"pareto-{config_key({**settings, **fp})[:12]}"
    url = storage or storage_url(out)
    sweep = Sweep(url, name, space, fingerprint=fp, settings=settings, sampler=sampler)
    cache = {**legacy, **finished_rows(url, exclude=name)}
    return ParetoSweep(model, train_ds, test_ds, sweep, shared, base_cfg, cache, out)


def pareto_grid(
    model,
    train_ds,
    test_ds,
    out: str | os.PathLike,
    *,
    n_trials: int | None = None,  # the study's budget (None: the whole grid); NSGA-II needs one
    on_result: Callable[[dict], None] | None = None,  # called with each newly computed row
    progress: bool = True,
    **settings,
) -> pd.DataFrame:
    """Train and evaluate every (method, lambda_F, lambda_M, m, seed) on the study in
    ``out`` (or ``storage=``); resume what is there; write ``out/trials.csv``.

    ``settings`` are ``open_sweep``'s: methods, sites, layers, positions, lambda_f,
    lambda_m, margins, seeds, epochs, lr, batch_size, init_std, sampler, storage, study.
    One row per configuration, in grid order: the hyperparameters, ``key``, train/test
    E_0 (``train_effectiveness``), F, minimality count (and ``n_locations`` for SteerVec),
    ``n_params``, ``lr``, ``final_psi`` (last training step), ``error`` (the message of a
    run that diverged, whose measures are then empty; None otherwise) and the run facts
    ``seconds``, ``finished``, ``trial``, ``worker``. Returns when every configuration is
    done, including those that other workers of the study are running.
    """
    n_trials = positive_int("n_trials", n_trials, allow_none=True)
    search = open_sweep(model, train_ds, test_ds, out, **settings)
    search.work(n_trials=n_trials, on_result=on_result, progress=progress)
    search.write()
    return search.frame()


def _run_one(model, train_ds, test_ds, spec: dict, key: str, base_cfg: TrainConfig) -> dict:
    """Train one configuration and evaluate it on both splits (one JSON-ready row)."""
    start = time.perf_counter()
    cls = kind_class(spec["method"])
    iv = cls.for_dataset(  # token columns for equal lengths; named / end-relative slots for mixed
        model, train_ds, sites=spec["sites"], layers=spec["layers"], positions=spec["positions"],
        init_std=spec["init_std"], seed=spec["seed"],
    )
    cfg = TrainConfig(
        epochs=base_cfg.epochs, lr=base_cfg.lr, batch_size=base_cfg.batch_size, margin=spec["margin"],
        lambda_f=spec["lambda_f"], lambda_m=spec["lambda_m"], seed=spec["seed"], progress=False,
    )
    row = {"key": key, **spec, "lr": cfg.learning_rate(iv), "n_params": iv.n_params}
    try:
        hist = train(model, iv, train_ds, cfg)
    except FloatingPointError as err:  # recorded (measures None), so the grid goes on and skips it next time
        warnings.warn(f"Configuration {spec['method']} lambda_F={spec['lambda_f']} lambda_M={spec['lambda_m']} "
                      f"m={spec['margin']} seed={spec['seed']} diverged: {err}", stacklevel=3)
        hist, scores, row["error"] = None, {s: {} for s in SPLITS}, str(err)
    else:
        scores = evaluate_splits(model, iv, train_ds, test_ds, batch_size=base_cfg.batch_size)
        row["error"] = None
    for split in SPLITS:
        for m in MEASURES:
            row[f"{split}_{m}"] = scores[split].get(m)  # n_locations: SteerVec only (else None)
    row["final_psi"] = None if hist is None else float(hist["psi"].iloc[-1])
    row["seconds"] = time.perf_counter() - start
    row["finished"] = time.time()
    return row


def _minimised(column: str) -> bool:
    return any(column == m or column.endswith("_" + m) for m in MINIMISED)


def pareto_front(df: pd.DataFrame, x: str, y: str, minimize: Sequence[str] | None = None) -> pd.DataFrame:
    """Non-dominated rows of ``df`` on columns ``x`` and ``y``, sorted by ``x``.

    Directions: columns named in ``minimize`` are minimised, all others maximised. By
    default the minimality count, ``n_params`` and ``n_locations`` (e.g.
    ``test_minimality``) are minimised, effectiveness and faithfulness maximised. A row is
    dominated when another is at least as good on both columns and better on one; rows
    with NaN in ``x`` or ``y`` are dropped, exact ties are all kept.

    >>> df = pd.DataFrame({"E": [-1.0, -0.5, 0.0, -0.6], "F": [0.0, -0.2, -1.0, -0.3]})
    >>> pareto_front(df, "F", "E").index.tolist()
    [2, 1, 0]
    >>> pareto_front(df.rename(columns={"F": "minimality"}), "minimality", "E").index.tolist()
    [2]
    """
    for c in (x, y):
        if c not in df.columns:
            raise ValueError(f"Column {c!r} is not in the table; its columns are {list(df.columns)}.")
    mins = set(minimize) if minimize is not None else {c for c in (x, y) if _minimised(c)}
    sub = df.dropna(subset=[x, y])
    pts = np.stack([sub[c].to_numpy(dtype=float) * (-1.0 if c in mins else 1.0) for c in (x, y)], 1)  # (N, 2)
    ge = (pts[None, :, :] >= pts[:, None, :]).all(-1)  # ge[i, j]: j at least as good as i on both
    gt = (pts[None, :, :] > pts[:, None, :]).any(-1)
    dominated = (ge & gt).any(1)
    return sub[~dominated].sort_values(x, kind="stable")


PANELS = (("faithfulness", "F"), ("minimality", "minimality (count |theta| > 0.01)"))
COLOURS = {"activ_scalar": "#1f77b4", "steer_vec": "#d62728", "dyn_scalar": "#2ca02c"}
NAMES = {m: cls.__name__ for m, cls in KINDS.items()}
HOVER = ("lambda_f", "lambda_m", "margin", "seed", "n_params")


def pareto_figure(df: pd.DataFrame, *, title: str = "Pareto fronts", per_method: bool = False):
    """Plotly figure (Fig. 2): E_0 against F and against minimality, train (top) and test.

    Points are coloured by method (train crosses, test dots) and hover shows lambda_F,
    lambda_M, m, seed and n_params. Each panel draws the front over all methods (dashed
    line), or one front per method with ``per_method=True``.

    >>> df = pd.DataFrame({"method": ["activ_scalar", "steer_vec"], "lambda_f": [0.0, 1.0],
    ...     "lambda_m": [0.0, 0.0], "margin": [1.0, 1.0], "seed": [0, 0], "n_params": [8, 512],
    ...     **{f"{s}_{m}": [-0.5, -0.1] for s in SPLITS for m in ("effectiveness", "faithfulness", "minimality")}})
    >>> [t.name for t in pareto_figure(df).data][:3]
    ['ActivScalar', 'SteerVec', 'Pareto front']
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    need = ["method", *HOVER] + [f"{s}_{m}" for s in SPLITS for m in ("effectiveness", "faithfulness", "minimality")]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"The table lacks columns {missing}; pass the DataFrame that pareto_grid returns.")
    fig = make_subplots(
        rows=2, cols=2, horizontal_spacing=0.1, vertical_spacing=0.14,
        subplot_titles=[f"{s}: E_0 vs {short}" for s in SPLITS for short in ("F", "minimality")],
    )
    hover = "<br>".join(f"{c}=%{{customdata[{i}]}}" for i, c in enumerate(HOVER))
    methods = list(dict.fromkeys(df["method"]))
    for r, split in enumerate(SPLITS, 1):
        for c, (measure, x_title) in enumerate(PANELS, 1):
            x, y = f"{split}_{measure}", f"{split}_effectiveness"
            first = r == 1 and c == 1
            for m in methods:
                sub = df[df["method"] == m]
                fig.add_trace(go.Scatter(
                    x=sub[x], y=sub[y], mode="markers", name=NAMES.get(m, m), legendgroup=m, showlegend=first,
                    marker={"color": COLOURS.get(m), "symbol": "x" if split == "train" else "circle", "size": 8},
                    customdata=sub[list(HOVER)].to_numpy(),
                    hovertemplate=f"<b>{NAMES.get(m, m)}</b><br>{x}=%{{x:.4g}}<br>{y}=%{{y:.4g}}<br>{hover}<extra></extra>",
                ), row=r, col=c)
            groups = [(f"front {NAMES.get(m, m)}", df[df["method"] == m], COLOURS.get(m)) for m in methods] \
                if per_method else [("Pareto front", df, "black")]
            for name, sub, colour in groups:
                front = pareto_front(sub, x, y)
                fig.add_trace(go.Scatter(
                    x=front[x], y=front[y], mode="lines", name=name, legendgroup=name, showlegend=first,
                    line={"color": colour, "dash": "dash", "width": 1.5}, hoverinfo="skip",
                ), row=r, col=c)
            fig.update_xaxes(title_text=x_title, row=r, col=c)
            fig.update_yaxes(title_text="E_0", row=r, col=c)
    fig.update_layout(title=title, height=720, width=960, template="plotly_white")
    return fig
