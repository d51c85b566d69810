"""Tasks: datasets of prompts and answers that methods explain or steer."""

import os
from pathlib import Path

from mechsteer.tasks.base import build_dataset
from mechsteer.tasks.dataset import ContrastiveDataset
from mechsteer.tasks.records import from_records, load_records
from mechsteer.tasks.ccc import ccc
from mechsteer.tasks.ioi import ioi

TASKS = {"ccc": ccc, "ioi": ioi}


DATA_SUFFIXES = (".jsonl", ".json", ".csv")


def make_task(name: str | os.PathLike, model, n: int | None = 64, seed: int = 0, **kwargs) -> ContrastiveDataset:
    """Build the contrastive task called ``name`` ("ccc" or "ioi") for ``model``, or read a
    user's records from ``name`` when it is a path to a .jsonl / .json / .csv file
    (``from_records``: kept in the file's order, the first ``n``; ``seed`` is not used, so
    ``split()`` tests on the file's last quarter).

    >>> from mechsteer.tiny import tiny_model
    >>> make_task("ioi", tiny_model("gpt2"), n=4).name
    'ioi'
    """
    if isinstance(name, os.PathLike) or (isinstance(name, str) and name.endswith(DATA_SUFFIXES)):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"Data file {str(path)!r} not found (a .jsonl, .json or .csv of records).")
        return from_records(model, path, name=path.stem, n=n, **kwargs)
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}, or give a path to a "
                         f"{' / '.join(DATA_SUFFIXES)} file of records.")
    return TASKS[name](model, n=n, seed=seed, **kwargs)


__all__ = ["ContrastiveDataset", "build_dataset", "from_records", "load_records", "ccc", "ioi", "make_task", "TASKS"]
