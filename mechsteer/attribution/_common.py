"""Shared plumbing for attribution methods: input checks, the metric, timing.

Every method takes a ``ContrastiveDataset`` (clean prompts, corrupted prompts, correct and
wrong answer ids) and explains a metric of the last-position logits, by default the logit
difference f_c - f_w averaged over prompts. A custom metric is a callable
``metric(logits, dataset) -> scalar tensor``; ``check_metric_output`` rejects anything else.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from mechsteer import sites
from mechsteer.metrics import (  # noqa: F401 (re-exported for the methods of this package)
    check_metric_output,
    check_metric_values,
    default_metric,
    per_prompt_metric,
)
from mechsteer.runs import plain_forward_seconds, timer  # noqa: F401
from mechsteer.tasks.base import ContrastiveDataset

Metric = Callable[[Tensor, ContrastiveDataset], Tensor]


def check_dataset(
    ds: ContrastiveDataset, corrupted: ContrastiveDataset | None = None, *, model=None
) -> None:
    """Raise ValueError when clean and corrupted prompts cannot be compared position by
    position, or (given ``model``) when a token or answer id is outside its vocabulary
    (``ContrastiveDataset.validate_for``; else a bare IndexError comes from deep inside)."""
    if not isinstance(ds, ContrastiveDataset):
        raise TypeError(f"Expected a ContrastiveDataset (mechsteer.tasks), got {type(ds).__name__}.")
    if ds.tokens.shape != ds.corrupted_tokens.shape:
        raise ValueError(
            f"Clean tokens {tuple(ds.tokens.shape)} and corrupted tokens {tuple(ds.corrupted_tokens.shape)} "
            "differ in shape: patching compares them position by position."
        )
    if corrupted is not None and len(corrupted) != len(ds):
        raise ValueError(f"Clean and corrupted datasets differ in size: {len(ds)} vs {len(corrupted)}.")
    if model is not None:
        ds.validate_for(model)


check_sites = sites.check_sites  # the site module holds which method may use which site
