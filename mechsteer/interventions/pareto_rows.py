"""The rows of a Pareto sweep: their columns, ``trials.csv``, and old ``grid.jsonl`` files.

A row is one configuration: its hyperparameters, ``key`` (what determines the result),
train/test E_0, F, minimality count (and ``n_locations`` for SteerVec), ``n_params``,
``lr``, ``final_psi``, ``error`` (None unless training diverged) and the run facts
``seconds``, ``finished`` (UNIX time), ``trial`` (its study's trial number) and
``worker`` (host:pid). ``trials.csv`` holds one row per configuration of a sweep.
``read_results`` reads a sweep folder (its study), a ``trials.csv``, or a ``grid.jsonl``
written by mechsteer 0.3 (each line checked: a partial last line from an interrupted write
is ignored with a warning, any other malformed line raises a ValueError naming it).

>>> import tempfile, pathlib
>>> path = pathlib.Path(tempfile.mkdtemp()) / "trials.csv"
>>> _ = write_trials(path, [{"key": "a", "method": "activ_scalar", "lambda_f": 0.0, "lambda_m": 0.0, "margin": 1.0,
...     "seed": 0, "n_params": 8, "sites": ["mlp_out"], **{c: -0.5 for c in MEASURED}}])
>>> read_results(path)[["method", "train_effectiveness"]].values.tolist()
[['activ_scalar', -0.5]]
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pandas as pd

from mechsteer._io import write_text
from mechsteer.interventions.sweep import STUDY_FILE, finished_rows, storage_url

SPLITS = ("train", "test")
MEASURES = ("effectiveness", "faithfulness", "minimality", "n_locations")
HYPER = ("method", "lambda_f", "lambda_m", "margin", "seed")
TIMING = ("seconds", "finished", "trial", "worker")  # run facts: differ between equal runs


def read_results(path: str | os.PathLike) -> pd.DataFrame:
    """The rows of a sweep: ``path`` is its folder (read from ``study.db``, or its
    ``trials.csv`` when the study is elsewhere), a ``trials.csv``, or an old ``grid.jsonl``.

    A complete JSONL line that is not such a row raises a ValueError naming the file and line.
    """
    path = Path(path)
    if path.is_dir():
        if (path / STUDY_FILE).exists():
            return trials_frame(sorted(finished_rows(storage_url(path)).values(), key=lambda r: r.get("finished") or 0))
        path = path / "trials.csv"
    if path.suffix == ".csv":
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; give a sweep folder, its trials.csv or a grid.jsonl.")
        return pd.read_csv(path)
    return pd.DataFrame(_read_lines(path)[0])


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


def trials_frame(rows: list[dict]) -> pd.DataFrame:
    """``rows`` as a table: hyperparameters, measures, the rest, run facts last."""
    df = pd.DataFrame(rows)
    first = [c for c in (*HYPER, *MEASURED) if c in df.columns]
    last = [c for c in TIMING if c in df.columns]
    return df[first + [c for c in df.columns if c not in first and c not in last] + last]


def write_trials(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write ``rows`` (one per configuration) as ``trials.csv``; return its path."""
    return write_text(Path(path), trials_frame(rows).to_csv(index=False))
