"""Pareto search over the objective's hyperparameters (seed paper 003, Sec. 4.2, Fig. 2).

No single setting of Psi = E_m + lambda_F F + lambda_M M_1 (Eq. 9) is best at everything:
an intervention that always flips the answer may disturb the rest of the distribution,
and a sparse one may flip too few answers. The paper grid-searches lambda_F, lambda_M
and the margin m over {0, 1, 10, 100} each (64 runs per method), evaluates every run
with Sec. 3.4's measures (E_0, F, the count of |theta| > 0.01) on train and test, and
draws the Pareto fronts of effectiveness vs faithfulness and vs minimality.

``pareto_grid`` runs that search and keeps it on disk: each finished configuration is
appended to a JSONL file as one full line, flushed and fsynced at once. A configuration's
``key`` hashes everything that determines its result (method, lambda_F, lambda_M, m, seed,
sites, layers, positions, epochs, lr, batch size, init std, the model's weights and the
tokens and answers of both splits), so rerunning the same call skips what is done: an
interrupted search resumes where it stopped. A crash in the middle of a write can leave a
partial last line; it is ignored with a warning (and cut off before the next append). Any
other line that is not a row of this shape (invalid JSON, ``{}``, a list, a row without
``key`` or with a non-numeric measure) raises a ValueError naming the file and the line.

``pareto_front`` keeps the non-dominated points of two columns. Effectiveness and
faithfulness are maximised (0 is best); the minimality count, ``n_params`` and
``n_locations`` are minimised (fewer non-negligible parameters is better).
``pareto_figure`` draws both trade-offs on train and test.

>>> import tempfile, pathlib
>>> from mechsteer.tasks import ccc
>>> from mechsteer.tiny import tiny_model
>>> model = tiny_model("gpt2")
>>> train_ds, test_ds = ccc(model, n=8).split()
>>> path = pathlib.Path(tempfile.mkdtemp()) / "grid.jsonl"
>>> kw = dict(methods=["activ_scalar"], lambda_f=[0, 1], lambda_m=[0], margins=[1], epochs=1, progress=False)
>>> df = pareto_grid(model, train_ds, test_ds, path, **kw)
>>> len(df), len(path.read_text().splitlines())
(2, 2)
>>> len(pareto_grid(model, train_ds, test_ds, path, **kw))  # resumes: nothing left to run
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

from mechsteer._io import write_text
from mechsteer._validate import finite_float, nonneg_int, positive_int
from mechsteer.interventions.base import DEFAULT_INIT_STD
from mechsteer.interventions.evaluate import evaluate_splits
from mechsteer.interventions.kinds import KINDS, kind_class
from mechsteer.interventions.train import TrainConfig, train
from mechsteer.models import fingerprint

GRID = (0, 1, 10, 100)  # Fig. 2: lambda_F, lambda_M, m in {0, 1, 10, 100}
SPLITS = ("train", "test")
MEASURES = ("effectiveness", "faithfulness", "minimality", "n_locations")
MINIMISED = ("minimality", "n_params", "n_locations")  # column names (or suffixes) minimised by pareto_front


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


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """All rows of a ``pareto_grid`` JSONL file (a partial last line is ignored with a warning).

    A complete line that is not such a row raises a ValueError naming the file and line.
    """
    return pd.DataFrame(_read_lines(Path(path))[0])


def _read_lines(path: Path) -> tuple[list[dict], int]:
    """(rows, byte length of the complete lines); warns about a partial trailing line.

    Every complete line must be one row as ``pareto_grid`` writes it, else a ValueError
    names the file, the line number and what is wrong with it.
    """
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # complete lines end with a newline
    rows = []
    for i, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}, line {i} is not valid JSON ({err}); delete that line to resume.") from None
        rows.append(_check_row(row, f"{path}, line {i}"))
    if data[end:].strip():
        warnings.warn(
            f"{path} ends with a partial line ({len(data) - end} bytes, from an interrupted write); "
            "ignoring it, that configuration will run again.",
            stacklevel=3,
        )
    return rows, end


NUMBERS = ("lambda_f", "lambda_m", "margin", "seed", "n_params")  # in every row
MEASURED = tuple(f"{s}_{m}" for s in SPLITS for m in MEASURES)  # in every row; null when a run diverged
NULLABLE = (*MEASURED, "final_psi", "seconds", "lr")  # numbers or null where present
JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def _check_row(row, where: str) -> dict:
    """``row`` if it has the shape of a ``pareto_grid`` row; else ValueError naming ``where``."""
    fix = "delete that line to resume (its configuration will run again)"
    if not isinstance(row, dict):
        kind, text = JSON_TYPES.get(type(row), "number"), json.dumps(row)[:60]
        raise ValueError(f"{where} is a JSON {kind} ({text}), not a pareto_grid row (an object); {fix}.")
    missing = [k for k in ("key", "method", *NUMBERS, *MEASURED) if k not in row]
    if missing:
        raise ValueError(f"{where} lacks the fields {missing} that every pareto_grid row has; {fix}.")
    for k in ("key", "method"):
        if not isinstance(row[k], str) or not row[k]:
            raise ValueError(f"{where}: {k!r} must be a non-empty string, got {row[k]!r}; {fix}.")
    for k in (*NUMBERS, *NULLABLE):
        v = row.get(k)
        if (v is not None or k in NUMBERS) and (isinstance(v, bool) or not isinstance(v, (int, float))):
            null = " or null" if k in NULLABLE else ""
            raise ValueError(f"{where}: {k!r} must be a number{null}, got {v!r}; {fix}.")
    return row


def _append_line(path: Path, row: dict) -> None:
    """Append ``row`` as one JSON line, flushed and fsynced before returning."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


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


def pareto_grid(
    model,
    train_ds,
    test_ds,
    path: str | os.PathLike,
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
    on_result: Callable[[dict], None] | None = None,  # called with each newly written row
    progress: bool = True,
) -> pd.DataFrame:
    """Train and evaluate every (method, lambda_F, lambda_M, m, seed); resume from ``path``.

    One row per configuration, in grid order: the hyperparameters, ``key``, train/test
    E_0 (``train_effectiveness``), F, minimality count (and ``n_locations`` for SteerVec),
    ``n_params``, ``final_psi`` (last training step), ``seconds`` and ``error`` (the message
    of a run that diverged, whose measures are then empty; None otherwise). Configurations
    whose key is already in ``path`` are read back, not rerun.
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
    if train_ds.n_pos != test_ds.n_pos:
        raise ValueError(f"train and test prompts differ in length ({train_ds.n_pos} vs {test_ds.n_pos}) "
                         "tokens; position-bound interventions need one length: build both from one dataset.")
    base_cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, progress=False)  # validates
    path = Path(path)
    rows, end = _read_lines(path)
    if path.exists() and end < path.stat().st_size:  # cut the partial line off before appending
        write_text(path, path.read_bytes()[:end].decode())
    done = {r["key"]: r for r in rows}
    shared = {
        "sites": list(sites), "layers": None if layers is None else list(layers),
        "positions": positions if isinstance(positions, str) else list(positions),
        "epochs": epochs, "lr": lr, "batch_size": batch_size, "init_std": init_std,
        "model": fingerprint(model)["weights_sha256"][:16],
        "train_data": dataset_id(train_ds), "test_data": dataset_id(test_ds),
    }
    configs = [
        {"method": m, "lambda_f": f, "lambda_m": lm, "margin": mg, "seed": int(s), **shared}
        for m in methods for f in grids[0] for lm in grids[1] for mg in grids[2] for s in seeds
    ]
    out = []
    with tqdm(configs, desc="pareto grid", disable=not progress) as bar:
        for spec in bar:
            key = config_key(spec)
            if key not in done:
                done[key] = _run_one(model, train_ds, test_ds, spec, key, base_cfg)
                _append_line(path, done[key])
                if on_result is not None:
                    on_result(done[key])
            out.append(done[key])
            bar.set_postfix(method=spec["method"], E=done[key]["test_effectiveness"])
    return pd.DataFrame(out)


def _run_one(model, train_ds, test_ds, spec: dict, key: str, base_cfg: TrainConfig) -> dict:
    """Train one configuration and evaluate it on both splits (one JSON-ready row)."""
    start = time.perf_counter()
    cls = kind_class(spec["method"])
    iv = cls.for_model(
        model, sites=spec["sites"], layers=spec["layers"], positions=spec["positions"],
        n_pos=train_ds.n_pos, init_std=spec["init_std"], seed=spec["seed"],
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
