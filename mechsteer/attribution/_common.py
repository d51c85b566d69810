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
from mechsteer.tasks.positions import MODES as POSITION_MODES
from mechsteer.tasks.positions import reduce_positions

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


# ---- positions: mixed-length (right-padded) datasets ---------------------------------------
# Every method computes per-position values per prompt in token coordinates (batch, ..., pos)
# and puts them on one position axis shared by all prompts (mechsteer.tasks.positions):
# "tokens" (equal lengths: the historical axis, reduced exactly as before), "named" or "end".


def position_axis(ds: ContrastiveDataset, positions: str = "auto"):
    """``ds.position_axis(positions)``: the axis per-position results are reported on."""
    if not isinstance(positions, str) or positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {list(POSITION_MODES)}, got {positions!r}.")
    return ds.position_axis(positions)


def on_axis(x: Tensor, axis, dim: int = -1, *, how: str = "mean") -> Tensor:
    """Per-prompt values at token positions ``x`` (batch first, positions at ``dim``)
    reduced over prompts onto ``axis``: the mean (``how="mean"``) or sum (``"sum"``) over
    the prompts that have each entry. On a "tokens" axis this is ``x.mean(0)`` /
    ``x.sum(0)``, bit for bit what methods returned before mixed lengths."""
    if axis.mode == "tokens":
        return x.mean(0) if how == "mean" else x.sum(0)
    kept = reduce_positions(x, axis, dim, per_prompt=True)  # (batch, ..., n), 0 where absent
    if how == "sum":
        return kept.sum(0)
    dim = dim % x.ndim
    shape = [len(x)] + [1] * (x.ndim - 1)
    shape[dim] = axis.index.shape[1]
    present = axis.present.to(x.device).reshape(shape).to(x.dtype)
    return kept.sum(0) / present.sum(0).clamp(min=1)


def per_prompt_on_axis(x: Tensor | None, axis, dim: int = -1) -> Tensor | None:
    """Per-prompt values at token positions on ``axis`` (prompt-major; 0 where a prompt has
    no such entry); unchanged on a "tokens" axis."""
    if x is None or axis.mode == "tokens":
        return x
    return reduce_positions(x, axis, dim, per_prompt=True)


def check_linear_metric(metric, method: str) -> None:
    """ValueError for the teacher-forced answer log-probability, which no linear
    decomposition of the logits explains."""
    if isinstance(metric, str) and metric == "answer_logprob":
        raise ValueError(
            f"{method} cannot explain metric='answer_logprob': the summed log-probability of every answer token "
            "is nonlinear in the logits (a log-softmax, over several forward positions), so its terms would not add "
            "up. Use metric='logit_diff' (the logit difference at the first token where the answers differ), or "
            "activation_patching / attribution_patching for answer_logprob."
        )
