"""Shared plumbing for attribution methods: input checks, the metric, timing.

Every method takes a ``ContrastiveDataset`` (clean prompts, corrupted prompts, correct and
wrong answer ids) and explains a metric of the last-position logits, by default the logit
difference f_c - f_w averaged over prompts. A custom metric is a callable
``metric(logits, dataset) -> scalar tensor``; ``check_metric_output`` rejects anything else.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from mechsteer._validate import check_finite
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


def check_metric_values(method: str, clean: Tensor, corrupted: Tensor) -> None:
    """FloatingPointError unless the clean and corrupted metric values are finite: a NaN
    weight or an overflow shows up here, before it turns every score into NaN."""
    check_finite(f"{method}: metric on the clean prompts", clean.detach())
    check_finite(f"{method}: metric on the corrupted prompts", corrupted.detach())


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


def check_sites(
    sites: Sequence[str] | str, allowed: Sequence[str], *, name: str = "site", hints: Mapping[str, str] | None = None
) -> list[str]:
    """Validate site names against the ones a method supports: a non-empty str or list of
    distinct names; ``name`` is the argument named in errors, ``hints`` extra advice per site."""
    if isinstance(sites, str):
        sites = [sites]
    elif isinstance(sites, Sequence):
        sites = list(sites)
    else:
        raise TypeError(f"{name} must be a site name or a list of them, got {type(sites).__name__}: {sites!r}.")
    if not sites:
        raise ValueError(f"{name} is empty ({sites!r}); pass at least one site of {list(allowed)}.")
    for s in sites:
        if not isinstance(s, str):
            raise TypeError(f"{name} must hold site names (str), got {s!r} ({type(s).__name__}) in {sites!r}.")
        get_site(s)  # unknown name -> ValueError with a suggestion
        if s not in allowed:
            hint = (hints or {}).get(s, "")
            raise ValueError(
                f"This method does not support site {s!r} ({name}={sites!r}); it supports sites {list(allowed)}.{hint}"
            )
    if len(set(sites)) != len(sites):
        raise ValueError(f"{name} names a site twice: {sites!r}; pass each site once.")
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
