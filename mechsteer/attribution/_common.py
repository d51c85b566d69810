"""Shared plumbing for attribution methods: input checks, the metric, timing.

Every method takes a ``ContrastiveDataset`` (clean prompts, corrupted prompts, correct and
wrong answer ids) and explains a metric of the last-position logits, by default the logit
difference f_c - f_w averaged over prompts. A custom metric is a callable
``metric(logits, dataset) -> scalar tensor``; ``check_metric_output`` rejects anything else.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from mechsteer.metrics import logit_diff
from mechsteer.sites import get_site
from mechsteer.tasks.base import ContrastiveDataset

Metric = Callable[[Tensor, ContrastiveDataset], Tensor]


def default_metric(logits: Tensor, ds: ContrastiveDataset) -> Tensor:
    """Mean logit difference f_c - f_w at the last position."""
    return logit_diff(logits, ds.correct.to(logits.device), ds.wrong.to(logits.device))


def per_prompt_metric(logits: Tensor, ds: ContrastiveDataset) -> Tensor:
    """Logit difference per prompt, ``(batch,)``."""
    return logit_diff(logits, ds.correct.to(logits.device), ds.wrong.to(logits.device), reduce="none")


def check_metric_output(value: Tensor, name: str = "metric") -> Tensor:
    """Raise ValueError unless ``value`` is a scalar tensor."""
    if not isinstance(value, Tensor) or value.numel() != 1:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"The {name} must return a scalar tensor (e.g. a mean over prompts); it returned {shape}. "
            "Reduce it, e.g. with .mean()."
        )
    return value.reshape(())


def check_dataset(ds: ContrastiveDataset, corrupted: ContrastiveDataset | None = None) -> None:
    """Raise ValueError when clean and corrupted prompts cannot be compared position by position."""
    if not isinstance(ds, ContrastiveDataset):
        raise TypeError(f"Expected a ContrastiveDataset (mechsteer.tasks), got {type(ds).__name__}.")
    if ds.tokens.shape != ds.corrupted_tokens.shape:
        raise ValueError(
            f"Clean tokens {tuple(ds.tokens.shape)} and corrupted tokens {tuple(ds.corrupted_tokens.shape)} "
            "differ in shape: patching compares them position by position."
        )
    if corrupted is not None and len(corrupted) != len(ds):
        raise ValueError(f"Clean and corrupted datasets differ in size: {len(ds)} vs {len(corrupted)}.")


def check_sites(sites: Sequence[str] | str, allowed: Sequence[str]) -> list[str]:
    """Validate site names against the ones a method supports."""
    sites = [sites] if isinstance(sites, str) else list(sites)
    for s in sites:
        get_site(s)  # unknown name -> ValueError with a suggestion
        if s not in allowed:
            raise ValueError(f"This method does not support site {s!r}; it supports {list(allowed)}.")
    return sites


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """``with timer() as t: ...`` then ``t["seconds"]``."""
    out = {"seconds": float("nan")}
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start


@torch.no_grad()
def plain_forward_seconds(model, tokens: Tensor, repeats: int = 3) -> float:
    """Median wall time of one plain forward pass of ``tokens`` (after one warm-up)."""
    model(tokens)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(tokens)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]
