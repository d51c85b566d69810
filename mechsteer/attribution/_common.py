"""What every attribution method checks first: the dataset it explains.

Every method takes a ``ContrastiveDataset`` (clean prompts, corrupted prompts, correct and
wrong answer ids) and explains a metric of the logits (``mechsteer.metrics``: a name of
``DATASET_METRICS``, by default the logit difference f_c - f_w averaged over prompts, or a
callable ``metric(logits, dataset) -> scalar tensor``).
"""

from __future__ import annotations

from typing import Callable, Union

from torch import Tensor

from mechsteer.tasks.base import ContrastiveDataset

Metric = Union[str, Callable[[Tensor, ContrastiveDataset], Tensor]]


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
