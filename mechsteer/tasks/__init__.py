"""Tasks: datasets of prompts and answers that methods explain or steer."""

from mechsteer.tasks.base import build_dataset
from mechsteer.tasks.dataset import ContrastiveDataset
from mechsteer.tasks.records import from_records, load_records
from mechsteer.tasks.ccc import ccc
from mechsteer.tasks.ioi import ioi

TASKS = {"ccc": ccc, "ioi": ioi}


def make_task(name: str, model, n: int | None = 64, seed: int = 0, **kwargs) -> ContrastiveDataset:
    """Build the contrastive task called ``name`` ("ccc" or "ioi") for ``model``."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of {sorted(TASKS)}.")
    return TASKS[name](model, n=n, seed=seed, **kwargs)


__all__ = ["ContrastiveDataset", "build_dataset", "from_records", "load_records", "ccc", "ioi", "make_task", "TASKS"]
