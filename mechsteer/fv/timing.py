"""Paper 000's Table 1, like for like: samples per minute of each head-scoring method.

Table 1 of "Fast & Faithful Function Vectors" reports samples processed per minute by AIE
(Todd et al.'s procedure: one forward pass *per head* per sample) and by AttnLRP (one
forward and one backward pass per sample), 3.05 vs 1339 on average. A comparison is only
fair when every method scores **the same prompts at the same batch size**, so ``table1``
times each method on one prompt set at each batch size given (batch 1 and batched):

- ``"naive"``: the paper's AIE procedure (``aie(mode="naive")``): layer x head forward
  passes of each group of ``batch_size`` corrupted prompts;
- ``"fast"``: mechsteer's AIE (``aie(mode="fast")``, the same numbers to 1e-5): one
  forward, then one-token patched runs of many heads at once, chunked to memory;
- ``"lrp"``: ``lrp_head_scores`` (AttnLRP relevance of the attention to the intensional
  frame), one forward + backward per group;
- ``"atp"``: ``atp_head_scores`` (the gradient estimate of the AIE), one forward +
  backward per group.

A *sample* is one prompt scored over all heads, as in the paper. The naive mode's cost is
the same for every head, so with ``naive_layers`` it is timed on the first layers and its
rate scaled to all layers (the row says so in ``timed_layers``). Every method is run once
on one prompt before timing (warm-up), and the plain forward of the batch is timed too, so
each row also gives its cost in plain forwards.

>>> from mechsteer.tiny import tiny_model
>>> from mechsteer.tasks.fv import fv_prompts, corrupt
>>> from mechsteer.fv.means import mean_head_z
>>> model = tiny_model("gpt2")
>>> clean = fv_prompts(model, "antonym", n=2, instructions=[0])
>>> t = table1(model, clean, corrupt(model, clean), mean_head_z(model, clean, progress=False), batch_sizes=(1, 2))
>>> t[["method", "batch_size", "n_prompts"]].values.tolist()[:2]
[['naive', 1, 2], ['fast', 1, 2]]
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from mechsteer._validate import positive_int
from mechsteer.fv.indirect_effect import aie
from mechsteer.fv.means import check_mean_z, check_prompts
from mechsteer.fv.scores import atp_head_scores, lrp_head_scores
from mechsteer.runs import timer
from mechsteer.tasks.fv import FVPrompts

METHODS = ("naive", "fast", "lrp", "atp")
PROCEDURE = {
    "naive": "AIE as in the paper: one forward pass per head per prompt group",
    "fast": "AIE, mechsteer's fast mode (same numbers): cached prefix, one-token patched runs batched over heads",
    "lrp": "AttnLRP head relevance to the intensional frame: one forward + backward",
    "atp": "AtP estimate of the AIE: one forward + backward",
}


def _run(method: str, model, clean: FVPrompts, corrupted: FVPrompts, mean_z: Tensor, bs: int, layers) -> None:
    if method in ("naive", "fast"):
        aie(model, corrupted, mean_z, mode=method, batch_size=bs, layers=layers if method == "naive" else None,
            progress=False)
    elif method == "lrp":
        lrp_head_scores(model, clean, batch_size=bs, max_rank=10**9, progress=False)  # every prompt used: same work
    else:
        atp_head_scores(model, corrupted, mean_z, batch_size=bs, progress=False)


def table1(
    model,
    clean: FVPrompts,
    corrupted: FVPrompts,
    mean_z: Float[Tensor, "layer head d_head"],
    *,
    batch_sizes: Sequence[int] = (1, 16),
    methods: Sequence[str] = METHODS,
    naive_layers: int | None = None,
) -> pd.DataFrame:
    """Samples per minute of each of ``methods`` on the same prompts at each of ``batch_sizes``.

    ``clean``: instruction prompts with intensional frames (LRP); ``corrupted``: the same
    prompts corrupted (``tasks.fv.corrupt``; AIE and AtP), so every method sees the same
    prompts and token lengths. ``naive_layers``: time the naive AIE on that many layers and
    scale its rate to all layers (None: all layers).

    Returns one row per (method, batch_size): ``method``, ``procedure``, ``batch_size``,
    ``n_prompts``, ``seconds``, ``samples_per_minute``, ``timed_layers``,
    ``plain_forwards`` (seconds over one plain forward pass of all the prompts at that
    batch size) and ``speedup_vs_naive`` (at the same batch size; NaN without a naive row).
    """
    check_prompts(model, clean, "clean")
    check_prompts(model, corrupted, "corrupted")
    check_mean_z(model, mean_z)
    if len(clean) != len(corrupted) or [len(t) for t in clean.tokens] != [len(t) for t in corrupted.tokens]:
        raise ValueError("clean and corrupted must hold the same prompts (same count and token lengths); "
                         "build corrupted with tasks.fv.corrupt(model, clean).")
    if isinstance(methods, str) or not methods or any(m not in METHODS for m in methods):
        raise ValueError(f"methods must be a non-empty sequence drawn from {METHODS}, got {methods!r}.")
    if isinstance(batch_sizes, int) or not batch_sizes:
        raise ValueError(f"batch_sizes must be a non-empty sequence of positive ints, got {batch_sizes!r}.")
    batch_sizes = [positive_int("batch_sizes", b) for b in batch_sizes]
    L = model.cfg.n_layers
    timed = L if naive_layers is None else min(positive_int("naive_layers", naive_layers), L)
    layers = list(range(timed))
    one_c, one_x = clean.subset([0]), corrupted.subset([0])
    for m in methods:  # warm-up: first-call costs (allocations, kernels, caches) are not the method's
        _run(m, model, one_c, one_x, mean_z, 1, layers[:1])
    rows = []
    for bs in batch_sizes:
        with torch.no_grad(), timer() as plain:
            for _, tokens in corrupted.batches(bs):
                model(tokens.to(model.cfg.device))
        for m in methods:
            with timer() as t:
                _run(m, model, clean, corrupted, mean_z, bs, layers)
            seconds = t["seconds"] * (L / timed if m == "naive" else 1.0)
            rows.append({"method": m, "procedure": PROCEDURE[m], "batch_size": bs, "n_prompts": len(clean),
                         "seconds": seconds, "samples_per_minute": 60.0 * len(clean) / seconds,
                         "timed_layers": timed if m == "naive" else L,
                         "plain_forwards": seconds / plain["seconds"]})
    df = pd.DataFrame(rows)
    naive = df[df["method"] == "naive"].set_index("batch_size")["samples_per_minute"]
    df["speedup_vs_naive"] = [r.samples_per_minute / naive[r.batch_size] if r.batch_size in naive.index else float("nan")
                              for r in df.itertuples()]
    return df
