"""Activation patching: which activations carry the difference between two prompts.

Take a clean prompt ("When Anne met Tom, Tom gave the book to" -> " Anne") and a corrupted
one that differs in the one detail that matters ("..., Anne gave the book to" -> " Tom").
Run one of them, swap a single activation (one layer's ``attn_out`` at one position, one
head's ``z``) for its value on the other prompt, finish the run and measure a metric m of
the logits, by default the logit difference f_c - f_w averaged over prompts (Meng et al.
2022; Wang et al. 2022; Heimersheim & Nanda 2024, "How to use and interpret activation
patching"). Two directions answer two different questions:

- ``"noising"`` (corrupted -> clean, the default): run the clean prompt, patch in the
  corrupted activation. Is this activation *necessary* for the behaviour?
  score = (m_clean - m_patched) / (m_clean - m_corr)
- ``"denoising"`` (clean -> corrupted): run the corrupted prompt, patch in the clean
  activation. Is this activation *sufficient* to restore the behaviour?
  score = (m_patched - m_corr) / (m_clean - m_corr)

In both, 0 means the patch had no effect and 1 means it moved the metric the whole way
from one run to the other (values outside [0, 1] happen: a patch can overshoot, or push
the wrong way). The two directions need not agree: a location can be necessary without
being sufficient (a backup head takes over) or sufficient without being necessary.
Noising is the default of every patching method in mechsteer (``attribution_patching``,
``run_suite``): it asks what breaks the clean behaviour, the question AtP's gradient on
the clean run estimates and the run DLA and AttnLRP explain, so their scores compare.

Per-prompt scores (``per_prompt=True``, default metric only) normalise each prompt by its
own logit differences: (ld_patched - ld_corr) / (ld_clean - ld_corr) per prompt. Their
plain mean is *not* the dataset score (which normalises the mean); the mean weighted by
each prompt's ld_clean - ld_corr is. A prompt whose clean and corrupted runs barely differ
gets a huge, meaningless per-prompt score.

Caveats: the corrupted prompt defines the question (swap a name, and you find what moves
names); patching one location at a time misses effects that need several at once; early
``resid_pre`` patches swap whole token embeddings and trivially score ~1 at the changed
position.

Cost, and why this is not ``transformer_lens.patching``: TL runs one full forward pass of
the batch per cell. This module runs the same patches batched many cells per forward, each
run starting at the patched layer and at the first position the patch changes (the
unchanged prefix comes from a KV cache), and skips cells whose patch changes nothing (see
``_patch_engine``). The numbers agree with TL's to float precision (tested).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

import mechsteer.attribution._patch_engine as engine
from mechsteer import kv_cache, runs
from mechsteer._validate import check_finite, positive_int
from mechsteer.attribution._common import Metric, check_dataset, on_axis, per_prompt_on_axis, position_axis
from mechsteer.attribution.result import AttributionResult, stack_sites
from mechsteer.metrics import (
    check_metric_output,
    check_metric_values,
    default_metric,
    logit_diff,
    normalize,
    resolve_metric,
)
from mechsteer.sites import check_sites, hook_name, sites_for
from mechsteer.tasks.base import ContrastiveDataset

PATCH_SITES = sites_for("patch")
DIRECTIONS = ("noising", "denoising")


def _scores(patched: Tensor, clean: Tensor | float, corrupted: Tensor | float, direction: str) -> Tensor:
    """Normalise patched metric values so that 0 = no effect and 1 = the full effect."""
    recovered = normalize(patched, clean, corrupted)  # (m - m_corr) / (m_clean - m_corr)
    return recovered if direction == "denoising" else 1 - recovered


def _check_args(model, ds, site, direction, metric, per_prompt) -> tuple[list[str], Metric | None, str]:
    check_dataset(ds, model=model)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'noising' or 'denoising', got {direction!r}.")
    sites = check_sites(site, PATCH_SITES, name="site")
    if "z" in sites and len(sites) > 1:
        others = [s for s in sites if s != "z"]
        raise ValueError(f"Site 'z' has head axes and cannot be stacked with {others}; patch it on its own.")
    metric, name = resolve_metric(metric)
    if metric is not None and per_prompt:
        raise ValueError(
            "per_prompt=True needs per-prompt metric values, which only the default metric (logit "
            "difference) gives; drop the custom metric or set per_prompt=False."
        )
    return sites, metric, name


def _evaluator(ds: ContrastiveDataset, metric: Metric | None, split: bool = False):
    """Logits of k whole cells, ``(k * B, ...)``, -> ``(k, B)`` logit differences (default
    metric) or ``(k,)`` values of the custom metric (one call per cell, on B prompts);
    ``split``: ``(k, B)`` values of the custom metric on each prompt alone (its own
    ``ds.subset([b])`` and its own tokens, pads cut off)."""
    B = len(ds)
    singles = [ds.subset([b]) for b in range(B)] if split else []
    lengths = ds.lengths.tolist()

    def evaluate(logits: Tensor) -> Tensor:
        k = logits.shape[0] // B
        if metric is None:
            return logit_diff(logits, ds.correct.repeat(k), ds.wrong.repeat(k), reduce="none").view(k, B)
        if split:
            return torch.stack([
                check_metric_output(metric(logits[i * B + b : i * B + b + 1, : lengths[b]], singles[b]))
                for i in range(k) for b in range(B)
            ]).view(k, B)
        return torch.stack([check_metric_output(metric(logits[i * B : (i + 1) * B], ds)) for i in range(k)])

    return evaluate


def _prompt_lds(clean_logits: Tensor, corrupt_logits: Tensor, ds) -> tuple[Tensor, Tensor]:
    """Each prompt's clean and corrupted logit difference at its last token."""
    pos = ds.answer_pos
    return (logit_diff(clean_logits, ds.correct, ds.wrong, pos=pos, reduce="none"),
            logit_diff(corrupt_logits, ds.correct, ds.wrong, pos=pos, reduce="none"))


def _padded_scores(values: Tensor, refs: tuple[Tensor, Tensor], direction: str, axis, m_clean: Tensor,
                   m_corr: Tensor, shape: tuple) -> Tensor:
    """Right-padded prompts, per position: ``(layer, cell, B)`` patched per-prompt metric
    values -> scores on ``axis``: each prompt's effect (noising m_clean_b - m_patched_b,
    denoising m_patched_b - m_corr_b; ``refs`` = per-prompt (m_clean_b, m_corr_b)) averaged
    over the prompts that have each position, divided by the dataset's m_clean - m_corr (as
    for equal lengths, where this is the mean's score)."""
    v = values.permute(2, 0, 1).reshape(values.shape[2], values.shape[0], *shape)  # (B, layer, *cells)
    ref = (refs[0] if direction == "noising" else refs[1]).to(v.dtype).reshape(-1, *[1] * (v.ndim - 1))
    effect = ref - v if direction == "noising" else v - ref
    return on_axis(effect, axis) / (m_clean - m_corr)


def _per_prompt_scores(values: Tensor, clean_logits: Tensor, corrupt_logits: Tensor, ds, direction: str) -> Tensor:
    """``(layer, cell, B)`` patched logit differences -> ``(B, layer, cell)`` per-prompt scores."""
    ld_clean, ld_corr = _prompt_lds(clean_logits, corrupt_logits, ds)
    if (ld_clean - ld_corr).abs().min() < 1e-6:
        warnings.warn(
            "Some prompts have (almost) equal clean and corrupted logit differences; their "
            "per-prompt scores are meaningless.",
            stacklevel=3,
        )
    return _scores(values.permute(2, 0, 1), ld_clean[:, None, None], ld_corr[:, None, None], direction)


def activation_patching(
    model,
    ds: ContrastiveDataset,
    *,
    site: str | Sequence[str] = "attn_out",
    direction: str = "noising",  # "noising" | "denoising" (str, so a typo gets our ValueError)
    per_position: bool = True,
    metric: Metric | None = "logit_diff",
    per_prompt: bool = False,
    batch_size: int | None = None,
    progress: bool = True,
    positions: str = "auto",  # position axis with per_position: "auto" | "tokens" | "named" | "end"
    max_memory: int | float | str | None = None,  # budget per forward when batch_size is None: bytes or "2GB"
) -> AttributionResult:
    """Patch every location of ``site`` between the clean and corrupted prompts of ``ds``.

    ``"noising"`` (default): score = (m_clean - m_patched) / (m_clean - m_corr) on the clean
    run; ``"denoising"``: score = (m_patched - m_corr) / (m_clean - m_corr) on the corrupted
    run. 0 = no effect, 1 = the full clean-vs-corrupted effect. m is ``metric``: a name of
    ``mechsteer.metrics.DATASET_METRICS`` (default ``"logit_diff"``, the mean f_c - f_w) or
    a callable ``metric(logits, ds) -> scalar``.

    Axes: ``("layer", "pos")`` for ``resid_pre``, ``resid_mid``, ``resid_post``,
    ``attn_out``, ``mlp_out`` (``("layer",)`` with ``per_position=False``: all positions
    patched at once); a list of those adds a leading ``"site"`` axis. Site ``"z"`` patches
    heads: ``("layer", "head")`` with ``per_position=False`` (a head at every position at
    once), ``("layer", "head", "pos")`` with ``per_position=True``.

    ``per_prompt=True`` also keeps per-prompt scores normalised by each prompt's own logit
    differences (default metric only). ``batch_size`` is the number of prompts (sequences)
    per forward pass, each with one cell patched (rounded down to whole cells of
    ``len(ds)`` prompts, at least one cell); None fits it to ``max_memory`` (bytes or
    ``"2GB"``; default a share of the device's free memory, ``runs.memory_budget``). ``result.meta`` holds the direction and the clean
    and corrupted metric values.

    Prompts of different lengths (right-padded; ``mechsteer.tasks.positions``): every
    prompt's logit difference is read at its own last token. Per position, each prompt is
    patched at its own token positions and the scores are put on the ``positions`` axis
    (``"auto"``: token positions for equal lengths, else the dataset's named positions,
    else end-relative ``end-k .. end``): each entry is the mean effect over the prompts
    that have it, over the dataset's m_clean - m_corr; a patch at a pad changes nothing
    and is left out. There a custom metric is evaluated on each prompt alone
    (``metric(logits of prompt b, ds.subset([b]))``), so it should be a mean over prompts.

    >>> from mechsteer.tiny import tiny_model
    >>> from mechsteer.tasks import ioi
    >>> model = tiny_model("gpt2")
    >>> result = activation_patching(model, ioi(model, n=4), site="z", per_position=False, progress=False)
    >>> result.axes, tuple(result.scores.shape)
    (('layer', 'head'), (2, 4))
    """
    sites, metric, metric_name = _check_args(model, ds, site, direction, metric, per_prompt)
    axis = position_axis(ds, positions) if per_position else None
    batch_size = positive_int("batch_size", batch_size, allow_none=True)
    ds = ds.to(model.cfg.device)
    base, source = (ds.corrupted_tokens, ds.tokens) if direction == "denoising" else (ds.tokens, ds.corrupted_tokens)
    B, n_pos, n_layers = len(ds), ds.n_pos, model.cfg.n_layers
    layers = range(n_layers)
    # per position on a named or end-relative axis, a custom metric is evaluated per prompt
    split = metric is not None and per_position and axis.mode != "tokens"
    m, evaluate = metric or default_metric, _evaluator(ds, metric, split)
    last = ds.last if ds.is_padded and metric is None else None  # per-row answer reads in the sweep
    keep_logits = 1 if metric is None else n_pos
    if last is not None:
        keep_logits = n_pos - int(last.min())
    with runs.timer() as t, torch.no_grad(), kv_cache.bridged(model), runs.float32_logits(model):  # KV cache reaches TL's attention
        # (1) cache: the source run at the patched sites; the run being patched: the
        # residual entering each block, its own site values and its keys and values.
        site_names = [hook_name(s, l, model) for s in sites for l in layers]
        src_logits, src_cache = runs.cache_at(model, source, site_names)
        resid_names = [hook_name("resid_pre", l, model) for l in layers]
        (base_logits, past), base_cache = runs.cache_at(
            model, base, list(dict.fromkeys(resid_names + site_names)), return_type="logits_and_cache"
        )
        clean_logits, corrupt_logits = (src_logits, base_logits) if direction == "denoising" else (base_logits, src_logits)
        m_clean = check_metric_output(m(clean_logits, ds), name="metric")
        m_corr = check_metric_output(m(corrupt_logits, ds), name="metric")
        check_metric_values("activation_patching", m_clean, m_corr)
        resid = {l: base_cache[hook_name("resid_pre", l)] for l in layers}
        skip_fmt = runs.skipping_works(model, resid[n_layers - 1][:1], n_layers - 1)
        prefix = runs.PrefixKV.of(past, B, n_pos) if n_pos > 1 else None
        if prefix is not None and not prefix.works(model, resid[n_layers - 1], base_logits, skip_fmt):
            prefix = None
        rows = runs.batch_rows(model, n_pos, B, keep_logits, batch_size, max_memory=max_memory)
        plans = {}  # site -> (grid, source activations per layer, (start, cells) groups per layer)
        for s in sites:
            grid = engine.make_grid(s, per_position, n_pos, model.cfg.n_heads, device=ds.tokens.device)
            src = {l: src_cache[hook_name(s, l)] for l in layers}
            groups = {}
            for l in layers:
                first = grid.first_changed(src[l], base_cache[hook_name(s, l)], ds.mask if ds.is_padded else None)
                groups[l] = engine.plan(first if prefix else torch.where(first < n_pos, 0, n_pos), n_pos, B, rows)
            plans[s] = (grid, src, groups)
        cell_groups = [cells for _, _, groups in plans.values() for g in groups.values() for _, cells in g]
        n_forwards = sum(-(-len(cells) * B // rows) for cells in cell_groups)
        # (1, B) or (1,): the value of a patch that changes nothing
        at_last = base_logits if last is None else base_logits[torch.arange(B, device=last.device), last][:, None]
        unpatched = evaluate(at_last)
        values = {}  # site -> (layer, cell, B) patched logit diffs, or (layer, cell) metric values
        with tqdm(total=n_forwards, desc="activation patching", disable=not progress) as bar:
            for s, (grid, src, groups) in plans.items():
                # (2)-(4): batched rows, each run from the patched layer and first changed position
                values[s] = engine.sweep(
                    model, site=s, grid=grid, groups=groups, base_resid=resid, source=src, unpatched=unpatched,
                    base_logits=None if metric is None else base_logits, prefix=prefix, evaluate=evaluate,
                    n_prompts=B, rows_per_forward=rows, skip_fmt=skip_fmt,
                    forward_kwargs={"logits_to_keep": 1} if metric is None else {}, bar=bar, last=last,
                )
    meta = {
        "direction": direction, "clean_metric": m_clean.item(), "corrupted_metric": m_corr.item(),
        "per_position": per_position, "rows_per_forward": rows, "forwards": n_forwards,
        "cells": sum(g.n_cells * n_layers for g, _, _ in plans.values()),
        "cells_run": sum(len(cells) for cells in cell_groups),
        "skipped_lower_blocks": skip_fmt is not None, "reused_prefix": prefix is not None,
    }
    axes = ("layer",) + (("head",) if "z" in sites else ()) + (("pos",) if per_position else ())
    out = []
    for s, (grid, _, _) in plans.items():
        pp = _per_prompt_scores(values[s], clean_logits, corrupt_logits, ds, direction) if per_prompt else None
        pp = None if pp is None else pp.reshape(B, n_layers, *grid.shape)
        if per_position and axis.mode != "tokens":  # prompts of different lengths: per prompt, then the axis
            refs = (evaluate(clean_logits)[0], evaluate(corrupt_logits)[0]) if split else \
                _prompt_lds(clean_logits, corrupt_logits, ds)
            scores = _padded_scores(values[s], refs, direction, axis, m_clean, m_corr, grid.shape)
            pp = per_prompt_on_axis(pp, axis)
        else:
            mean = values[s].mean(-1) if metric is None else values[s]  # (layer, cell)
            scores = _scores(mean, m_clean, m_corr, direction).reshape(n_layers, *grid.shape)
        out.append(AttributionResult(
            scores=check_finite(f"activation_patching: scores at site {s!r}", scores),
            axes=axes,
            method="patching",
            metric=metric_name,
            labels={"pos": axis.labels} if per_position else {},
            seconds=t["seconds"],
            per_prompt=pp,
            meta={**meta, "site": s},
        ))
    if isinstance(site, str):
        return out[0]
    stacked = stack_sites(out, sites)
    stacked.seconds, stacked.meta = t["seconds"], {**meta, "site": sites}
    return stacked
